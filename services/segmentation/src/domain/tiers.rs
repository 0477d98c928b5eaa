//! SEG-2: value tiers and the moves between them.

use crm_proto::common::v1::Tier;

use super::Thresholds;

/// What the tier rules look at for one customer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TierFacts {
    /// Net spend of the last 12 months, minor units (CNY).
    pub spend_12m_minor: i64,
    /// Share of the spending base that spends more: 0.0 is the top spender.
    pub spend_rank_share: f64,
    /// Whether the customer bought or interacted recently (not dormant).
    pub days_since_last_activity: Option<i32>,
    /// Days since the first purchase; `None` if never bought.
    pub days_since_first_purchase: Option<i32>,
    /// Spend per complete calendar month, oldest first, the last complete
    /// month last (a month in progress would look like a decline).
    pub monthly_spend_minor: Vec<i64>,
    /// SEG-3 high potential (able to spend more than they do).
    pub high_potential: bool,
}

/// A tier and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierDecision {
    /// The tier.
    pub tier: Tier,
    /// Why, in words an agent can repeat.
    pub reason: String,
}

/// Months at the end of `monthly` in a row where spend grew by more than `rate`.
pub fn consecutive_growth(monthly: &[i64], rate: f64) -> usize {
    monthly
        .windows(2)
        .rev()
        .take_while(|w| match (w[0], w[1]) {
            (0, now) => now > 0,
            (before, now) => (now - before) as f64 / before as f64 > rate,
        })
        .count()
}

/// Months at the end of `monthly` in a row where spend fell by more than `rate`.
pub fn consecutive_decline(monthly: &[i64], rate: f64) -> usize {
    monthly
        .windows(2)
        .rev()
        .take_while(|w| match (w[0], w[1]) {
            (0, _) => false,
            (before, now) => (before - now) as f64 / before as f64 > rate,
        })
        .count()
}

fn cny(minor: i64) -> String {
    format!("{:.0} CNY", minor as f64 / 100.0)
}

/// The tier the facts alone give, before the move rules.
pub fn base_tier(f: &TierFacts, t: &Thresholds) -> TierDecision {
    let decide = |tier, reason: String| TierDecision { tier, reason };
    match f.days_since_last_activity {
        Some(d) if d >= t.dormant_days => {
            return decide(Tier::Dormant, format!("no purchase or interaction for {d} days (>= {})", t.dormant_days));
        }
        None => return decide(Tier::Dormant, "no purchase or interaction on record".into()),
        _ => {}
    }
    if f.spend_12m_minor > 0 && f.spend_rank_share < t.diamond_top_share {
        return decide(Tier::Diamond, format!("top {:.0} % by 12-month spend", t.diamond_top_share * 100.0));
    }
    if f.spend_12m_minor >= t.diamond_min_spend_minor {
        return decide(
            Tier::Diamond,
            format!("12-month spend {} >= {}", cny(f.spend_12m_minor), cny(t.diamond_min_spend_minor)),
        );
    }
    if f.spend_12m_minor > 0 && f.spend_rank_share < t.gold_top_share {
        return decide(
            Tier::Gold,
            format!("top {:.0}-{:.0} % by 12-month spend", t.diamond_top_share * 100.0, t.gold_top_share * 100.0),
        );
    }
    if f.days_since_first_purchase.is_some_and(|d| d < t.new_days) {
        return decide(
            Tier::Silver,
            format!("new customer (first purchase {} days ago)", f.days_since_first_purchase.unwrap_or(0)),
        );
    }
    if f.high_potential {
        return decide(Tier::Potential, "spends less than the growth of their demand suggests (high potential)".into());
    }
    decide(Tier::Silver, "active customer outside the top 50 % by spend".into())
}

/// SEG-2: the next tier given the current one. GOLD moves up to DIAMOND after
/// `promotion_months` consecutive months of growth above `promotion_growth`;
/// DIAMOND moves down to GOLD only after `demotion_months` consecutive
/// months of decline above `demotion_decline` (so a diamond is not lost to
/// one bad quarter). DORMANT always applies. A first assessment (no current
/// tier) applies the move rules to the base tier, so assessing again on the
/// same facts moves nobody.
pub fn next_tier(current: Tier, f: &TierFacts, t: &Thresholds) -> TierDecision {
    let base = base_tier(f, t);
    if base.tier == Tier::Dormant {
        return base;
    }
    let current = if current == Tier::Unspecified { base.tier } else { current };
    let growth = consecutive_growth(&f.monthly_spend_minor, t.promotion_growth);
    let decline = consecutive_decline(&f.monthly_spend_minor, t.demotion_decline);
    match current {
        Tier::Gold if base.tier != Tier::Diamond && growth >= t.promotion_months => TierDecision {
            tier: Tier::Diamond,
            reason: format!("{growth} consecutive months of spend growth > {:.0} %", t.promotion_growth * 100.0),
        },
        Tier::Diamond if base.tier != Tier::Diamond => {
            if decline >= t.demotion_months {
                TierDecision {
                    tier: Tier::Gold,
                    reason: format!(
                        "{decline} consecutive months of spend decline > {:.0} %",
                        t.demotion_decline * 100.0
                    ),
                }
            } else {
                TierDecision {
                    tier: Tier::Diamond,
                    reason: format!(
                        "kept: demotion needs {} consecutive months of decline > {:.0} % ({decline} so far)",
                        t.demotion_months,
                        t.demotion_decline * 100.0
                    ),
                }
            }
        }
        _ => base,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(spend: i64, rank: f64, months: &[i64]) -> TierFacts {
        TierFacts {
            spend_12m_minor: spend,
            spend_rank_share: rank,
            days_since_last_activity: Some(10),
            days_since_first_purchase: Some(400),
            monthly_spend_minor: months.to_vec(),
            high_potential: false,
        }
    }

    #[test]
    fn base_tiers_follow_spend_rank_and_activity() {
        let t = Thresholds::default();
        let cases = [
            (facts(500_000, 0.01, &[]), Tier::Diamond),
            (facts(1_000_000, 0.30, &[]), Tier::Diamond), // >= 10 000 CNY
            (facts(200_000, 0.20, &[]), Tier::Gold),
            (facts(10_000, 0.70, &[]), Tier::Silver),
            (TierFacts { days_since_last_activity: Some(200), ..facts(500_000, 0.01, &[]) }, Tier::Dormant),
            (TierFacts { days_since_first_purchase: Some(20), ..facts(1_000, 0.90, &[]) }, Tier::Silver),
            (TierFacts { high_potential: true, ..facts(1_000, 0.90, &[]) }, Tier::Potential),
        ];
        for (f, want) in cases {
            assert_eq!(base_tier(&f, &t).tier, want, "{f:?}");
        }
    }

    #[test]
    fn gold_with_three_months_growth_over_20pct_is_promoted() {
        let t = Thresholds::default();
        let f = facts(200_000, 0.20, &[10_000, 12_100, 14_700, 17_800]);
        let d = next_tier(Tier::Gold, &f, &t);
        assert_eq!(d.tier, Tier::Diamond);
        assert_eq!(d.reason, "3 consecutive months of spend growth > 20 %");
    }

    #[test]
    fn gold_with_growth_of_exactly_20pct_or_only_two_months_stays_gold() {
        let t = Thresholds::default();
        assert_eq!(next_tier(Tier::Gold, &facts(200_000, 0.2, &[10_000, 12_000, 14_400, 17_280]), &t).tier, Tier::Gold);
        assert_eq!(next_tier(Tier::Gold, &facts(200_000, 0.2, &[10_000, 9_000, 12_100, 14_700]), &t).tier, Tier::Gold);
    }

    #[test]
    fn diamond_needs_six_consecutive_months_of_decline_over_30pct_to_be_demoted() {
        let t = Thresholds::default();
        let falling: Vec<i64> = (0..7).map(|i| (100_000.0 * 0.6f64.powi(i)) as i64).collect();
        let d = next_tier(Tier::Diamond, &facts(200_000, 0.20, &falling), &t);
        assert_eq!((d.tier, d.reason.as_str()), (Tier::Gold, "6 consecutive months of spend decline > 30 %"));
        let five = &falling[1..];
        let kept = next_tier(Tier::Diamond, &facts(200_000, 0.20, five), &t);
        assert_eq!(kept.tier, Tier::Diamond, "five months are not enough: {}", kept.reason);
    }

    #[test]
    fn a_first_assessment_applies_the_move_rules_so_a_second_moves_nobody() {
        let t = Thresholds::default();
        let growing = facts(200_000, 0.20, &[10_000, 12_100, 14_700, 17_800]);
        let first = next_tier(Tier::Unspecified, &growing, &t);
        assert_eq!(first.tier, Tier::Diamond, "{}", first.reason);
        assert_eq!(next_tier(first.tier, &growing, &t).tier, Tier::Diamond);
        let plain = facts(200_000, 0.20, &[]);
        assert_eq!(next_tier(Tier::Unspecified, &plain, &t).tier, Tier::Gold);
    }

    #[test]
    fn dormancy_overrides_everything() {
        let t = Thresholds::default();
        let f = TierFacts { days_since_last_activity: Some(365), ..facts(900_000, 0.01, &[1, 2, 3, 4]) };
        assert_eq!(next_tier(Tier::Diamond, &f, &t).tier, Tier::Dormant);
    }

    #[test]
    fn growth_and_decline_count_from_the_latest_month() {
        assert_eq!(consecutive_growth(&[100, 130, 100, 130, 170], 0.2), 2);
        assert_eq!(consecutive_growth(&[0, 0, 50], 0.2), 1, "from nothing to something is growth");
        assert_eq!(consecutive_decline(&[100, 60, 30, 40], 0.3), 0);
        assert_eq!(consecutive_decline(&[0, 0, 0], 0.3), 0);
    }
}
