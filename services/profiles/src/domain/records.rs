//! PRF-4: what a valid transaction or interaction row is.

use crm_proto::common::v1::Channel;
use crm_proto::profiles::v1::{Direction, Interaction, InteractionKind, Transaction, TransactionKind};

/// A rejected row: (field, reason).
pub type Rejection = (String, String);

fn reject(field: &str, reason: &str) -> Result<(), Rejection> {
    Err((field.to_string(), reason.to_string()))
}

fn valid_time(t: Option<&prost_types::Timestamp>) -> bool {
    t.is_some_and(|t| t.seconds > 0 && t.seconds < 253_402_300_799 && (0..1_000_000_000).contains(&t.nanos))
}

/// Checks a transaction row (the customer is checked by the caller).
pub fn check_transaction(t: &Transaction) -> Result<(), Rejection> {
    if t.transaction_id.trim().is_empty() || t.transaction_id.chars().count() > 128 {
        return reject("transaction_id", "is required, 1..128 characters");
    }
    if t.customer_id.is_empty() {
        return reject("customer_id", "is required");
    }
    match TransactionKind::try_from(t.kind) {
        Ok(TransactionKind::Purchase | TransactionKind::Refund) => {}
        _ => return reject("kind", "must be TRANSACTION_KIND_PURCHASE or TRANSACTION_KIND_REFUND"),
    }
    let Some(amount) = &t.amount else { return reject("amount", "is required") };
    if amount.amount_minor <= 0 {
        return reject("amount.amount_minor", "must be positive (a refund is a positive amount of kind REFUND)");
    }
    if amount.currency.len() != 3 || !amount.currency.chars().all(|c| c.is_ascii_uppercase()) {
        return reject("amount.currency", "must be an ISO-4217 code such as CNY");
    }
    if !valid_time(t.occurred_at.as_ref()) {
        return reject("occurred_at", "is required and must be a valid time");
    }
    if t.product_id.chars().count() > 128 {
        return reject("product_id", "is longer than 128 characters");
    }
    if t.category.chars().count() > 64 {
        return reject("category", "is longer than 64 characters");
    }
    if Channel::try_from(t.channel).is_err() {
        return reject("channel", "is not a known Channel");
    }
    Ok(())
}

/// Checks an interaction row.
pub fn check_interaction(x: &Interaction) -> Result<(), Rejection> {
    if x.interaction_id.chars().count() > 128 {
        return reject("interaction_id", "is longer than 128 characters");
    }
    if x.customer_id.is_empty() {
        return reject("customer_id", "is required");
    }
    if InteractionKind::try_from(x.kind).is_err() || x.kind == 0 {
        return reject("kind", "is required and must be a known InteractionKind");
    }
    if Channel::try_from(x.channel).is_err() {
        return reject("channel", "is not a known Channel");
    }
    if Direction::try_from(x.direction).is_err() {
        return reject("direction", "is not a known Direction");
    }
    if !valid_time(x.occurred_at.as_ref()) {
        return reject("occurred_at", "is required and must be a valid time");
    }
    if x.note.chars().count() > 2000 {
        return reject("note", "is longer than 2000 characters");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crm_proto::common::v1::Money;

    fn purchase() -> Transaction {
        Transaction {
            transaction_id: "t1".into(),
            customer_id: "c".into(),
            kind: TransactionKind::Purchase as i32,
            amount: Some(Money { amount_minor: 1999, currency: "CNY".into() }),
            occurred_at: Some(prost_types::Timestamp { seconds: 1_700_000_000, nanos: 0 }),
            ..Default::default()
        }
    }

    #[test]
    fn rows_name_the_field_at_fault() {
        assert!(check_transaction(&purchase()).is_ok());
        let cases: Vec<(Transaction, &str)> = vec![
            (Transaction { transaction_id: String::new(), ..purchase() }, "transaction_id"),
            (Transaction { kind: 9, ..purchase() }, "kind"),
            (Transaction { amount: None, ..purchase() }, "amount"),
            (
                Transaction { amount: Some(Money { amount_minor: -5, currency: "CNY".into() }), ..purchase() },
                "amount.amount_minor",
            ),
            (
                Transaction { amount: Some(Money { amount_minor: 5, currency: "yuan".into() }), ..purchase() },
                "amount.currency",
            ),
            (Transaction { occurred_at: None, ..purchase() }, "occurred_at"),
        ];
        for (t, field) in cases {
            assert_eq!(check_transaction(&t).unwrap_err().0, field);
        }
    }
}
