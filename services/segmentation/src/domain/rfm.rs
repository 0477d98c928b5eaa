//! SEG-1: RFM scores and the standard named RFM segments.

use crm_proto::segmentation::v1::RfmSegment;

/// A 1..5 quintile score from a percentile 0..100 where higher is better.
pub fn quintile(percentile: f64) -> u8 {
    ((percentile / 20.0).floor() as i64 + 1).clamp(1, 5) as u8
}

/// The named segment of (recency, frequency, monetary) scores, each 1..5.
/// Evaluated top to bottom; every one of the 125 combinations has a name.
pub fn segment(r: u8, f: u8, m: u8) -> RfmSegment {
    use RfmSegment::*;
    let fm = (f + m) as f64 / 2.0;
    match (r, f) {
        (4..=5, _) if fm >= 4.0 => Champions,
        (3..=5, _) if fm >= 3.0 && f >= 3 => Loyal,
        (5, 1) => New,
        (4..=5, 2..=3) => PotentialLoyalist,
        (4, 1) => Promising,
        (3, 2..=3) => NeedsAttention,
        (3, 1) => AboutToSleep,
        (1, _) if fm >= 4.0 => CantLose,
        (1..=2, 3..=5) => AtRisk,
        (2, _) => Hibernating,
        _ => Lost,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quintiles_split_the_percentile_range_in_five() {
        assert_eq!([0.0, 19.9, 20.0, 59.0, 80.0, 100.0].map(quintile), [1, 1, 2, 3, 5, 5]);
    }

    #[test]
    fn named_segments_follow_the_usual_rfm_map() {
        use RfmSegment::*;
        let cases = [
            ((5, 5, 5), Champions),
            ((4, 4, 4), Champions),
            ((3, 4, 3), Loyal),
            ((5, 1, 1), New),
            ((5, 2, 2), PotentialLoyalist),
            ((4, 1, 1), Promising),
            ((3, 2, 2), NeedsAttention),
            ((3, 1, 1), AboutToSleep),
            ((1, 5, 5), CantLose),
            ((2, 4, 2), AtRisk),
            ((2, 1, 1), Hibernating),
            ((1, 1, 1), Lost),
        ];
        for ((r, f, m), want) in cases {
            assert_eq!(segment(r, f, m), want, "r{r} f{f} m{m}");
        }
    }

    #[test]
    fn every_score_combination_has_a_named_segment() {
        for r in 1..=5 {
            for f in 1..=5 {
                for m in 1..=5 {
                    assert_ne!(segment(r, f, m), RfmSegment::Unspecified);
                }
            }
        }
    }
}
