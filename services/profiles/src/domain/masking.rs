//! SPEC 3: personal data is masked for callers without `pii:read`.

use crm_proto::profiles::v1::{Address, Customer};

/// `138****5678` for mainland numbers; other numbers keep "+", their first
/// 3 and last 4 digits.
pub fn phone(e164: &str) -> String {
    if e164.is_empty() {
        return String::new();
    }
    let digits = e164.trim_start_matches('+');
    let (prefix, national) = match digits.strip_prefix("86") {
        Some(n) => ("", n),
        None => ("+", digits),
    };
    let n = national.chars().count();
    if n <= 7 {
        return format!("{prefix}{}", "*".repeat(n));
    }
    format!("{prefix}{}{}{}", &national[..3], "*".repeat(n - 7), &national[n - 4..])
}

/// `z***@example.com`.
pub fn email(address: &str) -> String {
    match address.split_once('@') {
        Some((local, domain)) => {
            let first: String = local.chars().take(1).collect();
            format!("{first}***@{domain}")
        }
        None if address.is_empty() => String::new(),
        None => "***".into(),
    }
}

/// A person's name keeps the surname only: `张*` / `张**`, `W*** Li`.
pub fn name(full: &str) -> String {
    let full = full.trim();
    let is_cjk = full
        .chars()
        .next()
        .is_some_and(|c| ('\u{4e00}'..='\u{9fff}').contains(&c) || ('\u{3400}'..='\u{4dbf}').contains(&c));
    if is_cjk {
        let mut chars = full.chars();
        let surname = chars.next().map(String::from).unwrap_or_default();
        let rest = chars.filter(|c| !c.is_whitespace()).count().max(1);
        return format!("{surname}{}", "*".repeat(rest));
    }
    let words: Vec<&str> = full.split_whitespace().collect();
    match words.as_slice() {
        [] => String::new(),
        [one] => format!("{}***", one.chars().next().unwrap_or('*')),
        [first, .., last] => format!("{}*** {last}", first.chars().next().unwrap_or('*')),
    }
}

/// Masks an external id: first 2 and last 2 characters.
pub fn identifier(id: &str) -> String {
    let chars: Vec<char> = id.chars().collect();
    if chars.len() <= 4 {
        return "*".repeat(chars.len());
    }
    format!(
        "{}{}{}",
        chars[..2].iter().collect::<String>(),
        "*".repeat(chars.len() - 4),
        chars[chars.len() - 2..].iter().collect::<String>()
    )
}

/// Masks every personal field of a customer and marks it `masked`.
pub fn customer(c: &mut Customer) {
    c.name = name(&c.name);
    c.phone = phone(&c.phone);
    c.email = email(&c.email);
    c.birthday = None;
    if let Some(a) = c.address.as_mut() {
        *a = Address {
            city: a.city.clone(),
            province: a.province.clone(),
            country: a.country.clone(),
            ..Default::default()
        };
    }
    for x in &mut c.external_ids {
        x.id = identifier(&x.id);
    }
    c.masked = true;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_follow_spec_section_3() {
        assert_eq!(phone("+8613812345678"), "138****5678");
        assert_eq!(phone("+6581234567"), "+658***4567");
        assert_eq!(email("zhang.san@example.com"), "z***@example.com");
        assert_eq!(name("张三"), "张*");
        assert_eq!(name("张伟明"), "张**");
        assert_eq!(name("Wei Li"), "W*** Li");
        assert_eq!(name("Madonna"), "M***");
        assert_eq!(identifier("wx-123456"), "wx*****56");
    }

    #[test]
    fn a_masked_customer_shows_no_personal_value() {
        let mut c = Customer {
            name: "王小明".into(),
            phone: "+8613812345678".into(),
            email: "wang@example.com".into(),
            birthday: Some(crm_proto::common::v1::Date { year: 1990, month: 5, day: 1 }),
            address: Some(Address {
                line1: "1 Road".into(),
                city: "Shanghai".into(),
                postal_code: "200000".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        customer(&mut c);
        assert!(c.masked);
        assert_eq!((c.name.as_str(), c.phone.as_str(), c.email.as_str()), ("王**", "138****5678", "w***@example.com"));
        assert!(c.birthday.is_none());
        let a = c.address.unwrap();
        assert_eq!((a.line1.as_str(), a.postal_code.as_str(), a.city.as_str()), ("", "", "Shanghai"));
    }
}
