//! PRF-1/PRF-2: what a valid customer record is, and field-mask updates.

use crm_kit::FieldViolations;
use crm_proto::common::v1::{Channel, Date};
use crm_proto::profiles::v1::{Customer, CustomerKind, Gender, OrganizationSize, attribute_value};

use super::identity::{Email, Phone, parse_name};

/// Paths `UpdateCustomer` accepts in its field mask.
pub const UPDATABLE: &[&str] = &[
    "kind",
    "name",
    "phone",
    "email",
    "birthday",
    "gender",
    "region",
    "timezone",
    "preferred_channel",
    "registered_at",
    "address",
    "external_ids",
    "tags",
    "attributes",
    "organization",
];

const MAX_TAGS: usize = 50;
const MAX_ATTRIBUTES: usize = 100;
const MAX_EXTERNAL_IDS: usize = 20;
/// Paths an update mask may name: every field and every attribute.
pub const MAX_MASK_PATHS: usize = UPDATABLE.len() + MAX_ATTRIBUTES;

/// Validates and normalises a customer in place (phone to E.164, e-mail
/// lower-cased, name and tags trimmed). Every problem is added to `v` under
/// `prefix` (e.g. "customer."). Output-only fields are cleared.
pub fn normalise(c: &mut Customer, prefix: &str, v: &mut FieldViolations) {
    let f = |name: &str| format!("{prefix}{name}");
    if CustomerKind::try_from(c.kind).is_err() {
        v.add(f("kind"), "is not a known CustomerKind");
    } else if c.kind == CustomerKind::Unspecified as i32 {
        c.kind = CustomerKind::Person as i32;
    }
    if let Some(name) = v.check(&f("name"), parse_name(&c.name)) {
        c.name = name;
    }
    if c.phone.trim().is_empty() {
        c.phone.clear();
    } else if let Some(p) = v.check(&f("phone"), Phone::parse(&c.phone)) {
        c.phone = p.as_str().to_string();
    }
    if c.email.trim().is_empty() {
        c.email.clear();
    } else if let Some(e) = v.check(&f("email"), Email::parse(&c.email)) {
        c.email = e.as_str().to_string();
    }
    if let Some(b) = &c.birthday
        && let Err(why) = check_date(b)
    {
        v.add(f("birthday"), why);
    }
    if Gender::try_from(c.gender).is_err() {
        v.add(f("gender"), "is not a known Gender");
    }
    c.region = c.region.trim().to_string();
    if c.region.len() > 32 || !c.region.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_') {
        v.add(f("region"), "must be a region code of at most 32 letters, digits, - or _ (e.g. CN-31)");
    }
    c.timezone = c.timezone.trim().to_string();
    if !c.timezone.is_empty() && !is_time_zone_name(&c.timezone) {
        v.add(f("timezone"), "must be an IANA time zone name such as Asia/Shanghai");
    }
    if Channel::try_from(c.preferred_channel).is_err() {
        v.add(f("preferred_channel"), "is not a known Channel");
    }
    if let Some(ts) = &c.registered_at
        && (ts.seconds < 0 || ts.seconds > 253_402_300_799 || !(0..1_000_000_000).contains(&ts.nanos))
    {
        v.add(f("registered_at"), "is not a valid time");
    }
    if let Some(a) = &c.address {
        for (name, value, max) in [
            ("line1", &a.line1, 200),
            ("line2", &a.line2, 200),
            ("city", &a.city, 100),
            ("province", &a.province, 100),
            ("postal_code", &a.postal_code, 20),
            ("country", &a.country, 2),
        ] {
            if value.chars().count() > max {
                v.add(f(&format!("address.{name}")), format!("is longer than {max} characters"));
            }
        }
    }
    // REL-5: counts before any per-item work, so a huge list costs nothing.
    if c.external_ids.len() > MAX_EXTERNAL_IDS {
        v.add(f("external_ids"), format!("at most {MAX_EXTERNAL_IDS} external ids"));
        c.external_ids.clear();
    }
    for (i, x) in c.external_ids.iter_mut().enumerate() {
        x.source = x.source.trim().to_lowercase();
        x.id = x.id.trim().to_string();
        if x.source.is_empty()
            || x.source.len() > 40
            || !x.source.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
        {
            v.add(f(&format!("external_ids[{i}].source")), "must be 1..40 of [a-z0-9_-]");
        }
        if x.id.is_empty() || x.id.chars().count() > 128 {
            v.add(f(&format!("external_ids[{i}].id")), "must be 1..128 characters");
        }
    }
    if c.tags.len() > MAX_TAGS {
        v.add(f("tags"), format!("at most {MAX_TAGS} tags"));
        c.tags.clear();
    }
    let mut seen = std::collections::HashSet::with_capacity(c.tags.len());
    let mut tags: Vec<String> = Vec::with_capacity(c.tags.len());
    for (i, t) in c.tags.iter().enumerate() {
        if t.len() > 4 * 64 {
            v.add(f(&format!("tags[{i}]")), "must be 1..64 characters without commas");
            continue;
        }
        let t = t.trim().to_lowercase();
        if t.is_empty() || t.chars().count() > 64 || t.chars().any(|ch| ch.is_control() || ch == ',') {
            v.add(f(&format!("tags[{i}]")), "must be 1..64 characters without commas");
        } else if seen.insert(t.clone()) {
            tags.push(t);
        }
    }
    c.tags = tags;
    if c.attributes.len() > MAX_ATTRIBUTES {
        v.add(f("attributes"), format!("at most {MAX_ATTRIBUTES} attributes"));
        c.attributes.clear();
    }
    for (key, value) in &c.attributes {
        if !is_attribute_key(key) {
            v.add(f(&format!("attributes.{key}")), "key must match [a-z][a-z0-9_]{0,63}");
        }
        match &value.kind {
            None => v.add(f(&format!("attributes.{key}")), "has no value"),
            Some(attribute_value::Kind::StringValue(s)) if s.chars().count() > 1024 => {
                v.add(f(&format!("attributes.{key}")), "text is longer than 1024 characters")
            }
            Some(attribute_value::Kind::DoubleValue(d)) if !d.is_finite() => {
                v.add(f(&format!("attributes.{key}")), "must be a finite number")
            }
            _ => {}
        }
    }
    if let Some(org) = &mut c.organization {
        if c.kind != CustomerKind::Organization as i32 {
            v.add(f("organization"), "is only allowed when kind is CUSTOMER_KIND_ORGANIZATION");
        }
        if OrganizationSize::try_from(org.size).is_err() {
            v.add(f("organization.size"), "is not a known OrganizationSize");
        }
        if org.industry.chars().count() > 100 {
            v.add(f("organization.industry"), "is longer than 100 characters");
        }
        if let Some(rev) = &org.annual_revenue {
            // PRF-1: size class from annual revenue (CNY): large >= 100 M, medium 10-100 M, small < 10 M.
            if rev.currency == "CNY" && rev.amount_minor >= 0 {
                org.size = organization_size(rev.amount_minor) as i32;
            }
        }
    }
    // Output-only fields never come from a client.
    c.customer_id.clear();
    c.tier = 0;
    c.completeness = 0;
    c.alias_ids.clear();
    c.masked = false;
    c.erased = false;
    c.create_time = None;
    c.update_time = None;
    c.etag.clear();
}

/// PRF-3: the identity keys of a record — `phone:<e164>`, `email:<address>`,
/// `ext:<source>:<id>` — used to serialise creates sharing an identity and to
/// match records (the store's holder lookup speaks the same format).
pub fn identity_keys(c: &Customer) -> Vec<String> {
    let mut keys = Vec::new();
    if !c.phone.is_empty() {
        keys.push(format!("phone:{}", c.phone));
    }
    if !c.email.is_empty() {
        keys.push(format!("email:{}", c.email));
    }
    keys.extend(c.external_ids.iter().map(|x| format!("ext:{}:{}", x.source, x.id)));
    keys
}

/// PRF-1: size class from annual revenue in CNY minor units (fen).
pub fn organization_size(revenue_fen: i64) -> OrganizationSize {
    const MILLION_CNY: i64 = 1_000_000 * 100;
    match revenue_fen {
        r if r >= 100 * MILLION_CNY => OrganizationSize::Large,
        r if r >= 10 * MILLION_CNY => OrganizationSize::Medium,
        _ => OrganizationSize::Small,
    }
}

fn check_date(d: &Date) -> Result<(), &'static str> {
    if !(1..=12).contains(&d.month) {
        return Err("month must be 1..12");
    }
    let max_day = match d.month {
        2 if d.year == 0 || (d.year % 4 == 0 && (d.year % 100 != 0 || d.year % 400 == 0)) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    if !(1..=max_day).contains(&d.day) {
        return Err("day is not valid for the month");
    }
    if d.year != 0 && !(1900..=2100).contains(&d.year) {
        return Err("year must be 1900..2100, or 0 when unknown");
    }
    Ok(())
}

fn is_attribute_key(k: &str) -> bool {
    let mut chars = k.chars();
    matches!(chars.next(), Some('a'..='z')) && k.len() <= 64 && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
}

fn is_time_zone_name(tz: &str) -> bool {
    tz == "UTC"
        || (tz.len() <= 64
            && tz.contains('/')
            && tz.split('/').all(|part| {
                !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '+')
            }))
}

/// Applies the fields named in `mask` from `patch` onto `current`.
/// Unknown paths are violations of `update_mask`.
pub fn apply_mask(current: &mut Customer, patch: &Customer, mask: &[String], v: &mut FieldViolations) {
    if mask.is_empty() {
        v.add("update_mask", "is required: name the fields to update, e.g. \"phone,tags\"");
    }
    if mask.len() > MAX_MASK_PATHS {
        v.add("update_mask", format!("names more than {MAX_MASK_PATHS} paths"));
        return;
    }
    for path in mask {
        match path.as_str() {
            "kind" => current.kind = patch.kind,
            "name" => current.name = patch.name.clone(),
            "phone" => current.phone = patch.phone.clone(),
            "email" => current.email = patch.email.clone(),
            "birthday" => current.birthday = patch.birthday,
            "gender" => current.gender = patch.gender,
            "region" => current.region = patch.region.clone(),
            "timezone" => current.timezone = patch.timezone.clone(),
            "preferred_channel" => current.preferred_channel = patch.preferred_channel,
            "registered_at" => current.registered_at = patch.registered_at,
            "address" => current.address = patch.address.clone(),
            "external_ids" => current.external_ids = patch.external_ids.clone(),
            "tags" => current.tags = patch.tags.clone(),
            "attributes" => current.attributes = patch.attributes.clone(),
            "organization" => current.organization = patch.organization.clone(),
            p if p.starts_with("attributes.") => {
                let key = &p["attributes.".len()..];
                match patch.attributes.get(key) {
                    Some(value) => {
                        current.attributes.insert(key.to_string(), value.clone());
                    }
                    None => {
                        current.attributes.remove(key);
                    }
                }
            }
            other => v.add(
                "update_mask",
                format!("unknown or read-only field {other:?}; updatable: {}", UPDATABLE.join(", ")),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> Customer {
        Customer {
            name: " Wei  Li ".into(),
            phone: "138 1234 5678".into(),
            email: "Wei@Example.com".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_valid_customer_is_normalised() {
        let mut c = valid();
        c.tags = vec!["VIP".into(), "vip".into()];
        let mut v = FieldViolations::new();
        normalise(&mut c, "customer.", &mut v);
        assert!(v.is_empty(), "{v:?}");
        assert_eq!(
            (c.name.as_str(), c.phone.as_str(), c.email.as_str()),
            ("Wei Li", "+8613812345678", "wei@example.com")
        );
        assert_eq!(c.kind, CustomerKind::Person as i32);
        assert_eq!(c.tags, ["vip"]);
    }

    #[test]
    fn every_bad_field_is_named() {
        let mut c = Customer {
            name: String::new(),
            phone: "12".into(),
            email: "nope".into(),
            gender: 99,
            preferred_channel: 42,
            birthday: Some(Date { year: 1990, month: 2, day: 30 }),
            timezone: "Mars".into(),
            ..Default::default()
        };
        c.attributes.insert("Bad Key".into(), Default::default());
        let mut v = FieldViolations::new();
        normalise(&mut c, "customer.", &mut v);
        let fields: Vec<_> = v.iter().map(|x| x.field.clone()).collect();
        for want in [
            "customer.name",
            "customer.phone",
            "customer.email",
            "customer.gender",
            "customer.preferred_channel",
            "customer.birthday",
            "customer.timezone",
            "customer.attributes.Bad Key",
        ] {
            assert!(fields.contains(&want.to_string()), "missing {want} in {fields:?}");
        }
    }

    #[test]
    fn organisations_get_their_size_from_revenue() {
        assert_eq!(organization_size(150_000_000 * 100), OrganizationSize::Large);
        assert_eq!(organization_size(10_000_000 * 100), OrganizationSize::Medium);
        assert_eq!(organization_size(9_999_999 * 100), OrganizationSize::Small);
    }

    #[test]
    fn masks_apply_named_fields_and_refuse_unknown_ones() {
        let mut current = valid();
        let patch = Customer { region: "CN-31".into(), name: "ignored".into(), ..Default::default() };
        let mut v = FieldViolations::new();
        apply_mask(&mut current, &patch, &["region".into()], &mut v);
        assert!(v.is_empty());
        assert_eq!(current.region, "CN-31");
        assert_eq!(current.name, " Wei  Li ");
        apply_mask(&mut current, &patch, &["customer_id".into()], &mut v);
        assert_eq!(v.iter().next().map(|x| x.field.as_str()), Some("update_mask"));
    }
}
