//! PRF-10: completeness of a profile.

use crm_proto::profiles::v1::{Customer, CustomerKind};

/// Share of key fields present, 0..100. Persons: name, phone, email,
/// birthday, gender, region, timezone, preferred channel, address.
/// Organisations: name, phone, email, region, timezone, preferred channel,
/// address, industry, size.
pub fn completeness(c: &Customer) -> i32 {
    let address = c.address.as_ref().is_some_and(|a| !a.city.is_empty() || !a.line1.is_empty());
    let mut checks = vec![
        !c.name.is_empty(),
        !c.phone.is_empty(),
        !c.email.is_empty(),
        !c.region.is_empty(),
        !c.timezone.is_empty(),
        c.preferred_channel != 0,
        address,
    ];
    if c.kind == CustomerKind::Organization as i32 {
        let org = c.organization.as_ref();
        checks.push(org.is_some_and(|o| !o.industry.is_empty()));
        checks.push(org.is_some_and(|o| o.size != 0));
    } else {
        checks.push(c.birthday.is_some());
        checks.push(c.gender != 0);
    }
    let present = checks.iter().filter(|b| **b).count();
    (present * 100 / checks.len()) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_full_profiles() {
        assert_eq!(completeness(&Customer::default()), 0);
        let c = Customer { name: "A".into(), phone: "+8613800000000".into(), ..Default::default() };
        assert_eq!(completeness(&c), 22);
    }
}

/// What two records have in common (PRF-10).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Likeness {
    /// Same name (case-insensitive, spaces normalised).
    pub same_name: bool,
    /// Same birthday (month and day; year too when both have one).
    pub same_birthday: bool,
    /// Phones share their last 7 digits but differ (typo, other country code).
    pub similar_phone: bool,
    /// Same e-mail local part at different domains.
    pub same_email_user: bool,
    /// Same region.
    pub same_region: bool,
}

/// Similarity 0..100 and the reasons, for a pair not merged (PRF-10).
pub fn duplicate_score(l: Likeness) -> (i32, Vec<&'static str>) {
    let mut score = 0;
    let mut reasons = Vec::new();
    for (hit, points, reason) in [
        (l.same_name, 30, "same name"),
        (l.same_birthday, 30, "same birthday"),
        (l.similar_phone, 35, "similar phone"),
        (l.same_email_user, 25, "same e-mail user at another domain"),
        (l.same_region, 10, "same region"),
    ] {
        if hit {
            score += points;
            reasons.push(reason);
        }
    }
    (score.min(100), reasons)
}

#[cfg(test)]
mod duplicate_tests {
    use super::*;

    #[test]
    fn strong_and_weak_signals_add_up() {
        let strong = Likeness { same_name: true, same_birthday: true, similar_phone: true, ..Default::default() };
        assert_eq!(duplicate_score(strong), (95, vec!["same name", "same birthday", "similar phone"]));
        let weak = Likeness { same_name: true, same_region: true, ..Default::default() };
        assert_eq!(duplicate_score(weak).0, 40);
        let all = Likeness {
            same_name: true,
            same_birthday: true,
            similar_phone: true,
            same_email_user: true,
            same_region: true,
        };
        assert_eq!(duplicate_score(all).0, 100);
    }
}
