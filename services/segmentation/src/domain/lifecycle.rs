//! SEG-4: lifecycle stages.

use crm_proto::common::v1::LifecycleStage;

use super::Thresholds;

/// What the lifecycle looks at.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LifecycleFacts {
    /// Days since the first purchase; `None` if never bought.
    pub days_since_first_purchase: Option<i32>,
    /// Days since the last purchase.
    pub days_since_last_purchase: Option<i32>,
    /// Spend trend (last 3 months against the 3 before), if there is a base.
    pub spend_trend: Option<f64>,
}

/// The stage a customer is in.
pub fn stage(f: &LifecycleFacts, t: &Thresholds) -> LifecycleStage {
    let (Some(first), Some(last)) = (f.days_since_first_purchase, f.days_since_last_purchase) else {
        return LifecycleStage::Prospect;
    };
    if last >= t.churned_days {
        LifecycleStage::Churned
    } else if last >= t.active_days {
        LifecycleStage::Sleeping
    } else if first < t.new_days {
        LifecycleStage::New
    } else if f.spend_trend.is_some_and(|g| g <= -t.declining_drop) {
        LifecycleStage::Declining
    } else if first >= t.mature_days {
        LifecycleStage::Mature
    } else {
        LifecycleStage::Active
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(first: Option<i32>, last: Option<i32>, trend: Option<f64>) -> LifecycleFacts {
        LifecycleFacts { days_since_first_purchase: first, days_since_last_purchase: last, spend_trend: trend }
    }

    #[test]
    fn stages_follow_purchase_history() {
        let t = Thresholds::default();
        let cases = [
            (f(None, None, None), LifecycleStage::Prospect),
            (f(Some(30), Some(30), None), LifecycleStage::New),
            (f(Some(300), Some(10), Some(0.1)), LifecycleStage::Active),
            (f(Some(900), Some(10), None), LifecycleStage::Mature),
            (f(Some(900), Some(10), Some(-0.5)), LifecycleStage::Declining),
            (f(Some(900), Some(120), None), LifecycleStage::Sleeping),
            (f(Some(900), Some(400), None), LifecycleStage::Churned),
        ];
        for (facts, want) in cases {
            assert_eq!(stage(&facts, &t), want, "{facts:?}");
        }
    }
}
