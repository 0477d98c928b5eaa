//! OUT-3: the campaign state machine and the deterministic assignment of a
//! customer to a variant, the holdout or the global control group.

use crm_proto::outreach::v1::CampaignState;
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// OUT-3: whether a campaign may move from `from` to `to`.
pub fn can_transition(from: CampaignState, to: CampaignState) -> bool {
    use CampaignState::*;
    matches!(
        (from, to),
        (Draft, Scheduled | Running | Cancelled)
            | (Scheduled, Running | Paused | Cancelled)
            | (Running, Paused | Completed | Cancelled)
            | (Paused, Running | Scheduled | Cancelled)
    )
}

/// A stable number in 0..10 000 for `key`: the same on every replica and every run.
pub fn bucket(key: &[u8]) -> u32 {
    let digest = Sha256::digest(key);
    u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]) % 10_000
}

/// Whether a customer is in the global control group of `percent` % (OUT-3):
/// a stable share of all customers, the same for every campaign and trigger.
pub fn in_global_control(customer: Uuid, percent: u32) -> bool {
    let mut key = b"global-control:".to_vec();
    key.extend_from_slice(customer.as_bytes());
    bucket(&key) < percent.min(100) * 100
}

/// Where a customer lands in a campaign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Group {
    /// Recorded, never contacted.
    Holdout,
    /// Index into the campaign's variants.
    Variant(usize),
}

/// OUT-3: deterministic per customer and campaign. The holdout takes the first
/// `holdout_percent` of the buckets; the rest is split by the variants' traffic
/// shares (which sum to 100).
pub fn assign(campaign: Uuid, customer: Uuid, holdout_percent: u32, traffic: &[u32]) -> Group {
    let mut key = campaign.as_bytes().to_vec();
    key.extend_from_slice(customer.as_bytes());
    let b = bucket(&key);
    let holdout = holdout_percent.min(100) * 100;
    if b < holdout {
        return Group::Holdout;
    }
    // Position within the non-holdout range, scaled to 0..10 000.
    let span = 10_000 - holdout;
    let pos = (b - holdout) as u64 * 10_000 / span.max(1) as u64;
    let mut edge = 0u64;
    for (i, share) in traffic.iter().enumerate() {
        edge += *share as u64 * 100;
        if pos < edge {
            return Group::Variant(i);
        }
    }
    Group::Variant(traffic.len().saturating_sub(1))
}

/// OUT-6: tier discounts in percent (DIAMOND 20, GOLD 15, SILVER 10).
pub fn tier_discount(tier: crm_proto::common::v1::Tier) -> u32 {
    use crm_proto::common::v1::Tier;
    match tier {
        Tier::Diamond => 20,
        Tier::Gold => 15,
        Tier::Silver => 10,
        _ => 0,
    }
}

/// OUT-6: 1 point per 1 CNY spent; 100 points are a 1 CNY coupon, so a
/// point is worth one minor unit (fen).
pub fn points(spend_minor: i64) -> i64 {
    spend_minor.max(0) / 100
}

/// OUT-6: the coupon value in minor units of `points`.
pub fn coupon_value_minor(points: i64) -> i64 {
    points.max(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use CampaignState::*;

    #[test]
    fn only_the_documented_moves_are_legal() {
        let all = [Draft, Scheduled, Running, Paused, Completed, Cancelled];
        let legal = [
            (Draft, Scheduled),
            (Draft, Running),
            (Draft, Cancelled),
            (Scheduled, Running),
            (Scheduled, Paused),
            (Scheduled, Cancelled),
            (Running, Paused),
            (Running, Completed),
            (Running, Cancelled),
            (Paused, Running),
            (Paused, Scheduled),
            (Paused, Cancelled),
        ];
        for from in all {
            for to in all {
                assert_eq!(can_transition(from, to), legal.contains(&(from, to)), "{from:?} -> {to:?}");
            }
        }
    }

    #[test]
    fn assignment_is_deterministic_and_follows_the_split() {
        let campaign = Uuid::from_u128(7);
        let mut counts = [0usize; 3];
        for i in 0..20_000u128 {
            let customer = Uuid::from_u128(i);
            let group = assign(campaign, customer, 10, &[50, 50]);
            assert_eq!(group, assign(campaign, customer, 10, &[50, 50]));
            match group {
                Group::Holdout => counts[0] += 1,
                Group::Variant(v) => counts[1 + v] += 1,
            }
        }
        // 10 % holdout, the rest halved: 2 000 / 9 000 / 9 000 within sampling noise.
        assert!((1_800..2_200).contains(&counts[0]), "{counts:?}");
        assert!((8_600..9_400).contains(&counts[1]), "{counts:?}");
        assert!((8_600..9_400).contains(&counts[2]), "{counts:?}");
    }

    #[test]
    fn on_100_000_customers_every_group_is_within_one_point_of_its_share() {
        let campaign = Uuid::from_u128(0x5eed);
        let n = 100_000u128;
        let mut counts = [0u32; 4];
        for i in 0..n {
            match assign(campaign, Uuid::from_u128(i * 7919 + 13), 10, &[20, 30, 50]) {
                Group::Holdout => counts[0] += 1,
                Group::Variant(v) => counts[1 + v] += 1,
            }
        }
        // Holdout 10 %; the other 90 % split 20/30/50: 18 %, 27 %, 45 % of everyone.
        for (count, expected) in counts.iter().zip([10.0, 18.0, 27.0, 45.0]) {
            let share = 100.0 * *count as f64 / n as f64;
            assert!((share - expected).abs() < 1.0, "{share:.2} % vs {expected} %: {counts:?}");
        }
    }

    #[test]
    fn another_campaign_draws_another_holdout_but_the_global_control_group_is_stable() {
        let a: Vec<bool> = (0..2000u128)
            .map(|i| assign(Uuid::from_u128(1), Uuid::from_u128(i), 10, &[100]) == Group::Holdout)
            .collect();
        let b: Vec<bool> = (0..2000u128)
            .map(|i| assign(Uuid::from_u128(2), Uuid::from_u128(i), 10, &[100]) == Group::Holdout)
            .collect();
        assert_ne!(a, b);
        let control = (0..10_000u128).filter(|i| in_global_control(Uuid::from_u128(*i), 5)).count();
        assert!((400..600).contains(&control), "{control}");
        assert!((0..1000u128).all(|i| !in_global_control(Uuid::from_u128(i), 0)));
    }

    #[test]
    fn tier_offers_and_points() {
        use crm_proto::common::v1::Tier;
        assert_eq!([Tier::Diamond, Tier::Gold, Tier::Silver, Tier::Dormant].map(tier_discount), [20, 15, 10, 0]);
        // 1 234.56 CNY spent: 1 234 points, worth 12.34 CNY.
        assert_eq!(points(123_456), 1_234);
        assert_eq!(coupon_value_minor(1_234), 1_234);
    }
}
