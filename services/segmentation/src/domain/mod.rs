//! Segmentation's business rules: pure functions over plain data, each
//! citing the SPEC rule it implements (SEG-1 to SEG-5). Thresholds live in
//! [`Thresholds`] with the SPEC's defaults; the recompute feeds these rules
//! with per-customer features computed set-based in SQL.

pub mod churn;
pub mod grid;
pub mod lifecycle;
pub mod rfm;
pub mod rules;
pub mod tiers;

/// Every configurable threshold, with the SPEC's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct Thresholds {
    /// SEG-1/SEG-2: the spend and purchase window in calendar months, the
    /// current month included (12).
    pub rfm_window_months: usize,
    /// SEG-2: DIAMOND = top share by 12-month spend (5 %).
    pub diamond_top_share: f64,
    /// SEG-2: ... or 12-month spend at least this, in CNY fen (10 000 CNY).
    pub diamond_min_spend_minor: i64,
    /// SEG-2: GOLD = top share by 12-month spend (50 %).
    pub gold_top_share: f64,
    /// SEG-2: promotion GOLD -> DIAMOND after this many consecutive months of growth ...
    pub promotion_months: usize,
    /// ... each above this rate (20 %).
    pub promotion_growth: f64,
    /// SEG-2: demotion DIAMOND -> GOLD after this many consecutive months of decline ...
    pub demotion_months: usize,
    /// ... each above this rate (30 %).
    pub demotion_decline: f64,
    /// SEG-2: DORMANT after this many days without any interaction or purchase.
    pub dormant_days: i32,
    /// SEG-2/SEG-4: a first purchase this recent makes a customer new.
    pub new_days: i32,
    /// SEG-3: value high = top share by annual spend (20 %) ...
    pub value_high_share: f64,
    /// ... medium = up to this share (50 %).
    pub value_medium_share: f64,
    /// SEG-3: potential high when spend trend is at least this (+20 %) ...
    pub potential_growth: f64,
    /// ... or the customer asked this many questions in the last 90 days.
    pub potential_inquiries: i32,
    /// SEG-4: active means a purchase within this many days.
    pub active_days: i32,
    /// SEG-4: mature means a customer for at least this many days.
    pub mature_days: i32,
    /// SEG-4: churned after this many days without a purchase.
    pub churned_days: i32,
    /// SEG-4: declining when spend of the last 3 months fell at least this
    /// share against the 3 before (30 %).
    pub declining_drop: f64,
    /// SEG-5: no purchase for more than this many days ...
    pub churn_no_purchase_days: i32,
    /// ... and a response rate below this share (30 %).
    pub churn_response_rate: f64,
    /// SEG-5: activity below this share of the base average (30 %) ...
    pub churn_activity_share: f64,
    /// ... and no interaction for more than this many days (3 months).
    pub churn_no_interaction_days: i32,
    /// SEG-5: spend of the last 3 months down at least this share against the 3 before (50 %).
    pub churn_spend_drop: f64,
    /// SEG-5: this many consecutive days without a login (7).
    pub churn_no_login_days: i32,
    /// SEG-5: this many days without any interaction marks a personal call-back (6 months).
    pub churn_silent_days: i32,
    /// SEG-5: churn level high from this score.
    pub churn_high: i32,
    /// SEG-5: churn level medium from this score.
    pub churn_medium: i32,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            rfm_window_months: 12,
            diamond_top_share: 0.05,
            diamond_min_spend_minor: 10_000 * 100,
            gold_top_share: 0.50,
            promotion_months: 3,
            promotion_growth: 0.20,
            demotion_months: 6,
            demotion_decline: 0.30,
            dormant_days: 180,
            new_days: 90,
            value_high_share: 0.20,
            value_medium_share: 0.50,
            potential_growth: 0.20,
            potential_inquiries: 2,
            active_days: 90,
            mature_days: 730,
            churned_days: 365,
            declining_drop: 0.30,
            churn_no_purchase_days: 90,
            churn_response_rate: 0.30,
            churn_activity_share: 0.30,
            churn_no_interaction_days: 90,
            churn_spend_drop: 0.50,
            churn_no_login_days: 7,
            churn_silent_days: 180,
            churn_high: 60,
            churn_medium: 30,
        }
    }
}
