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
