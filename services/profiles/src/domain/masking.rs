//! SPEC 3: personal data is masked for callers without `pii:read`.

use crm_proto::profiles::v1::{Address, Customer};

pub use crm_kit::privacy::{email, identifier, name, phone};

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
