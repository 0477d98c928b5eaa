//! SEG-3: the nine-cell value-potential grid.

use crm_proto::segmentation::v1::GridCell;

use super::Thresholds;

/// A band of the grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Band {
    /// High.
    High,
    /// Medium.
    Medium,
    /// Low.
    Low,
}

/// Value band from the share of the base spending more (0.0 = top spender):
/// top 20 % high, 20-50 % medium, the bottom 50 % low.
pub fn value_band(spend_rank_share: f64, spend_minor: i64, t: &Thresholds) -> Band {
    if spend_minor <= 0 {
        Band::Low
    } else if spend_rank_share < t.value_high_share {
        Band::High
    } else if spend_rank_share < t.value_medium_share {
        Band::Medium
    } else {
        Band::Low
    }
}

/// Potential band from demand growth: the spend trend (last 3 months against
/// the 3 before, as a rate) and recent inquiries.
pub fn potential_band(spend_trend: Option<f64>, inquiries_90d: i32, t: &Thresholds) -> Band {
    let growing = spend_trend.is_some_and(|g| g >= t.potential_growth);
    let shrinking = spend_trend.is_some_and(|g| g <= -t.potential_growth);
    if growing || inquiries_90d >= t.potential_inquiries {
        Band::High
    } else if shrinking && inquiries_90d == 0 {
        Band::Low
    } else {
        Band::Medium
    }
}

/// The cell of a value and potential band, each with its service priority.
pub fn cell(value: Band, potential: Band) -> GridCell {
    use Band::*;
    match (value, potential) {
        (High, High) => GridCell::Core,
        (High, Medium) => GridCell::MatureStable,
        (High, Low) => GridCell::Maintain,
        (Medium, High) => GridCell::Growth,
        (Medium, Medium) => GridCell::Regular,
        (Medium, Low) => GridCell::Observe,
        (Low, High) => GridCell::Opportunity,
        (Low, Medium) => GridCell::LowValueStable,
        (Low, Low) => GridCell::ChurnWarning,
    }
}

/// Spend trend: last 3 months against the 3 before, `None` without a base.
pub fn spend_trend(last_3_months_minor: i64, previous_3_months_minor: i64) -> Option<f64> {
    (previous_3_months_minor > 0)
        .then(|| (last_3_months_minor - previous_3_months_minor) as f64 / previous_3_months_minor as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_top_spender_whose_spend_shrinks_is_maintained() {
        let t = Thresholds::default();
        let v = value_band(0.05, 900_000, &t);
        let p = potential_band(spend_trend(50_000, 100_000), 0, &t);
        assert_eq!(cell(v, p), GridCell::Maintain);
    }

    #[test]
    fn a_small_spender_asking_questions_is_an_opportunity() {
        let t = Thresholds::default();
        assert_eq!(cell(value_band(0.9, 5_000, &t), potential_band(None, 3, &t)), GridCell::Opportunity);
        assert_eq!(cell(value_band(0.9, 0, &t), potential_band(Some(-0.5), 0, &t)), GridCell::ChurnWarning);
        assert_eq!(cell(value_band(0.3, 100_000, &t), potential_band(Some(0.0), 0, &t)), GridCell::Regular);
    }
}
