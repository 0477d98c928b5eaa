//! SEG-5: explainable churn risk — a score, a level, and the rules that fired
//! with the customer's own figures, so an agent can say *why*.

use crm_proto::common::v1::ChurnRiskLevel;
use crm_proto::segmentation::v1::{ChurnReason, ChurnRisk};

use super::Thresholds;

/// What the churn rules look at.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ChurnFacts {
    /// Days since the last purchase; `None` if never bought.
    pub days_since_last_purchase: Option<i32>,
    /// Share of our contacts the customer responded to (0..1); `None` without contacts.
    pub response_rate: Option<f64>,
    /// Activity (interactions) of the last 90 days against the base average (1.0 = average).
    pub activity_vs_base: f64,
    /// Days since the last interaction of any kind; `None` if none.
    pub days_since_last_interaction: Option<i32>,
    /// Spend of the last 3 months and the 3 before, minor units.
    pub spend_last_3m_minor: i64,
    /// See above.
    pub spend_previous_3m_minor: i64,
    /// Consecutive days without a login, for customers who used to log in.
    pub days_without_login: Option<i32>,
    /// Days in a row that activity fell by more than 20 % day over day.
    pub activity_down_days: i32,
    /// An unresolved complaint is open.
    pub open_complaint: bool,
    /// An SLA was breached on the customer's ticket, or a CSAT of 1-2 was given.
    pub bad_service_experience: bool,
}

fn reason(rule: &str, weight: i32, explanation: String) -> ChurnReason {
    ChurnReason { rule: rule.into(), explanation, weight }
}

/// Scores churn risk (0..100) and lists the rules that fired, highest weight first.
pub fn assess(f: &ChurnFacts, t: &Thresholds) -> ChurnRisk {
    let mut reasons = Vec::new();
    if let (Some(days), Some(rate)) = (f.days_since_last_purchase, f.response_rate)
        && days > t.churn_no_purchase_days
        && rate < t.churn_response_rate
    {
        reasons.push(reason(
            "NO_PURCHASE_90D_LOW_RESPONSE",
            30,
            format!(
                "no purchase for {days} days and response rate {:.0} % (< {:.0} %)",
                rate * 100.0,
                t.churn_response_rate * 100.0
            ),
        ));
    }
    if f.activity_vs_base < t.churn_activity_share
        && f.days_since_last_interaction.is_none_or(|d| d > t.churn_no_interaction_days)
    {
        reasons.push(reason(
            "LOW_ACTIVITY_NO_INTERACTION_3M",
            25,
            format!(
                "activity at {:.0} % of the base average and no interaction in 3 months",
                f.activity_vs_base * 100.0
            ),
        ));
    }
    if f.spend_previous_3m_minor > 0
        && (f.spend_previous_3m_minor - f.spend_last_3m_minor) as f64
            >= t.churn_spend_drop * f.spend_previous_3m_minor as f64
    {
        let drop =
            100.0 * (f.spend_previous_3m_minor - f.spend_last_3m_minor) as f64 / f.spend_previous_3m_minor as f64;
        reasons.push(reason(
            "SPEND_DOWN_50",
            25,
            format!(
                "spend of the last 3 months down {drop:.0} % against the 3 before (>= {:.0} %)",
                t.churn_spend_drop * 100.0
            ),
        ));
    }
    if let Some(days) = f.days_without_login
        && days >= t.churn_no_login_days
    {
        reasons.push(reason("NO_LOGIN_7D", 10, format!("no login for {days} consecutive days")));
    }
    if f.activity_down_days >= 3 {
        reasons.push(reason(
            "ACTIVITY_DOWN_3D",
            10,
            format!("activity down more than 20 % {} days running", f.activity_down_days),
        ));
    }
    if f.open_complaint {
        reasons.push(reason("UNRESOLVED_COMPLAINT", 20, "an unresolved complaint is open".into()));
    }
    let silent = f.days_since_last_interaction.is_some_and(|d| d >= t.churn_silent_days);
    if silent {
        reasons.push(reason(
            "SILENT_6M",
            20,
            format!("no interaction for {} days: personal call-back due", f.days_since_last_interaction.unwrap_or(0)),
        ));
    }
    if f.bad_service_experience {
        reasons.push(reason("BAD_SERVICE_EXPERIENCE", 15, "an SLA breach on their ticket or a CSAT of 1-2".into()));
    }
    reasons.sort_by(|a, b| b.weight.cmp(&a.weight).then_with(|| a.rule.cmp(&b.rule)));
    let score = reasons.iter().map(|r| r.weight).sum::<i32>().min(100);
    let level = if score >= t.churn_high {
        ChurnRiskLevel::High
    } else if score >= t.churn_medium {
        ChurnRiskLevel::Medium
    } else {
        ChurnRiskLevel::Low
    };
    ChurnRisk { score, level: level as i32, reasons, personal_callback_due: silent }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loyal() -> ChurnFacts {
        ChurnFacts {
            days_since_last_purchase: Some(10),
            response_rate: Some(0.6),
            activity_vs_base: 1.2,
            days_since_last_interaction: Some(2),
            spend_last_3m_minor: 90_000,
            spend_previous_3m_minor: 80_000,
            ..Default::default()
        }
    }

    #[test]
    fn an_active_responsive_customer_is_low_risk_with_no_reasons() {
        let r = assess(&loyal(), &Thresholds::default());
        assert_eq!((r.score, r.level, r.reasons.len()), (0, ChurnRiskLevel::Low as i32, 0));
    }

    #[test]
    fn no_purchase_in_90_days_and_low_response_fires_with_the_figures() {
        let f = ChurnFacts { days_since_last_purchase: Some(104), response_rate: Some(0.12), ..loyal() };
        let r = assess(&f, &Thresholds::default());
        assert_eq!(r.reasons[0].rule, "NO_PURCHASE_90D_LOW_RESPONSE");
        assert_eq!(r.reasons[0].explanation, "no purchase for 104 days and response rate 12 % (< 30 %)");
        assert_eq!(r.level, ChurnRiskLevel::Medium as i32);
    }

    #[test]
    fn halved_spend_and_an_open_complaint_make_high_risk() {
        let f = ChurnFacts {
            days_since_last_purchase: Some(100),
            response_rate: Some(0.1),
            spend_last_3m_minor: 30_000,
            spend_previous_3m_minor: 100_000,
            open_complaint: true,
            ..loyal()
        };
        let r = assess(&f, &Thresholds::default());
        assert_eq!(r.score, 75);
        assert_eq!(r.level, ChurnRiskLevel::High as i32);
        let rules: Vec<_> = r.reasons.iter().map(|x| x.rule.as_str()).collect();
        assert_eq!(rules, ["NO_PURCHASE_90D_LOW_RESPONSE", "SPEND_DOWN_50", "UNRESOLVED_COMPLAINT"]);
    }

    #[test]
    fn six_silent_months_mark_a_personal_call_back() {
        let f = ChurnFacts { days_since_last_interaction: Some(190), activity_vs_base: 0.0, ..loyal() };
        let r = assess(&f, &Thresholds::default());
        assert!(r.personal_callback_due);
        assert!(r.reasons.iter().any(|x| x.rule == "SILENT_6M"));
        assert!(r.reasons.iter().any(|x| x.rule == "LOW_ACTIVITY_NO_INTERACTION_3M"));
    }

    #[test]
    fn the_score_is_capped_at_100() {
        let f = ChurnFacts {
            days_since_last_purchase: Some(200),
            response_rate: Some(0.0),
            activity_vs_base: 0.0,
            days_since_last_interaction: Some(300),
            spend_last_3m_minor: 0,
            spend_previous_3m_minor: 10_000,
            days_without_login: Some(30),
            activity_down_days: 5,
            open_complaint: true,
            bad_service_experience: true,
        };
        assert_eq!(assess(&f, &Thresholds::default()).score, 100);
    }
}
