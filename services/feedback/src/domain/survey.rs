//! FBK-5: survey answers and their scores.

/// A survey kind and the scores it accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Survey {
    /// Net promoter score 0..10.
    Nps,
    /// Customer satisfaction 1..5.
    Csat,
}

impl Survey {
    /// The accepted score range.
    pub fn range(self) -> std::ops::RangeInclusive<i32> {
        match self {
            Survey::Nps => 0..=10,
            Survey::Csat => 1..=5,
        }
    }

    /// Checks a score, saying what is accepted otherwise.
    pub fn check(self, score: i32) -> Result<i32, String> {
        let r = self.range();
        if r.contains(&score) {
            Ok(score)
        } else {
            Err(format!("must be {}..{} for {}", r.start(), r.end(), self.name()))
        }
    }

    /// "NPS" or "CSAT".
    pub fn name(self) -> &'static str {
        match self {
            Survey::Nps => "NPS",
            Survey::Csat => "CSAT",
        }
    }
}

/// ANA-5 vocabulary: an NPS promoter (9-10), passive (7-8) or detractor (0-6).
pub fn nps_group(score: i32) -> &'static str {
    match score {
        9..=10 => "promoter",
        7..=8 => "passive",
        _ => "detractor",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_are_checked_at_their_edges() {
        assert!(Survey::Nps.check(0).is_ok());
        assert!(Survey::Nps.check(10).is_ok());
        assert!(Survey::Nps.check(11).is_err());
        assert!(Survey::Nps.check(-1).is_err());
        assert!(Survey::Csat.check(0).is_err());
        assert!(Survey::Csat.check(1).is_ok());
        assert!(Survey::Csat.check(5).is_ok());
        assert!(Survey::Csat.check(6).unwrap_err().contains("1..5"));
    }

    #[test]
    fn nps_groups() {
        assert_eq!(nps_group(6), "detractor");
        assert_eq!(nps_group(7), "passive");
        assert_eq!(nps_group(8), "passive");
        assert_eq!(nps_group(9), "promoter");
    }
}
