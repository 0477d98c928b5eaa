//! Stored messages and their wire form.

use chrono::{DateTime, Utc};
use crm_proto::common::v1::Money;
use crm_proto::outreach::v1 as pb;
use uuid::Uuid;

/// Internal message states (the `messages.state` column).
pub mod state {
    /// Waiting for a policy decision at `due_at` (new, or deferred).
    pub const QUEUED: i16 = 1;
    /// Allowed by the policy; waiting for the channel adapter.
    pub const APPROVED: i16 = 2;
    /// Handed to the adapter.
    pub const SENT: i16 = 3;
    /// The adapter or provider confirmed delivery.
    pub const DELIVERED: i16 = 4;
    /// Suppressed by the policy (or the holdout).
    pub const SUPPRESSED: i16 = 5;
    /// Failed permanently.
    pub const DEAD_LETTER: i16 = 6;
}

/// Verdict codes of the `decisions.verdict` column (the wire `Verdict`).
pub mod verdict {
    /// Sent.
    pub const SENT: i16 = 1;
    /// Deferred.
    pub const DEFERRED: i16 = 2;
    /// Dropped.
    pub const DROPPED: i16 = 3;
}

/// The columns every message read selects.
pub const COLUMNS: &str = "message_id, customer_id, channel, template_id, campaign_id, variant, trigger_name, purpose, state, \
     attempts, last_error, cost_minor, rule, detail, decided_at, due_at, expires_at, created_at, sent_at, locale, variables, fallback_channels, fallback_templates";

/// A stored message.
#[derive(Debug, Clone, sqlx::FromRow)]
#[allow(missing_docs)]
pub struct MessageRow {
    pub message_id: Uuid,
    pub customer_id: Uuid,
    pub channel: i16,
    pub template_id: Uuid,
    pub campaign_id: Option<Uuid>,
    pub variant: String,
    pub trigger_name: String,
    pub purpose: i16,
    pub state: i16,
    pub attempts: i32,
    pub last_error: String,
    pub cost_minor: i64,
    pub rule: String,
    pub detail: String,
    pub decided_at: Option<DateTime<Utc>>,
    pub due_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
    pub locale: String,
    pub variables: serde_json::Value,
    pub fallback_channels: Vec<i16>,
    pub fallback_templates: Vec<Uuid>,
}

/// A timestamp on the wire.
pub fn ts(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }
}

/// CNY money from minor units.
pub fn cny(minor: i64) -> Money {
    Money { amount_minor: minor, currency: "CNY".into() }
}

impl MessageRow {
    /// The wire state.
    pub fn wire_state(&self) -> pb::MessageState {
        match self.state {
            state::QUEUED | state::APPROVED => pb::MessageState::Queued,
            state::SENT => pb::MessageState::Sent,
            state::DELIVERED => pb::MessageState::Delivered,
            state::SUPPRESSED => pb::MessageState::Suppressed,
            state::DEAD_LETTER => pb::MessageState::DeadLetter,
            _ => pb::MessageState::Unspecified,
        }
    }

    /// The latest policy decision, if one was made.
    pub fn decision(&self) -> Option<pb::ContactDecision> {
        let decided = self.decided_at?;
        let verdict = match self.state {
            state::QUEUED => pb::Verdict::Deferred,
            state::SUPPRESSED => pb::Verdict::Dropped,
            _ => pb::Verdict::Sent,
        };
        Some(pb::ContactDecision {
            customer_id: self.customer_id.to_string(),
            message_id: self.message_id.to_string(),
            verdict: verdict as i32,
            rule: self.rule.clone(),
            detail: self.detail.clone(),
            decide_time: Some(ts(decided)),
            deferred_until: (verdict == pb::Verdict::Deferred).then(|| ts(self.due_at)),
        })
    }

    /// The wire form.
    pub fn to_wire(&self) -> pb::Message {
        pb::Message {
            message_id: self.message_id.to_string(),
            customer_id: self.customer_id.to_string(),
            channel: self.channel as i32,
            template_id: self.template_id.to_string(),
            campaign_id: self.campaign_id.map(|c| c.to_string()).unwrap_or_default(),
            variant: self.variant.clone(),
            trigger: self.trigger_name.clone(),
            purpose: self.purpose as i32,
            state: self.wire_state() as i32,
            attempts: self.attempts,
            last_error: self.last_error.clone(),
            cost: Some(cny(self.cost_minor)),
            decision: self.decision(),
            create_time: Some(ts(self.created_at)),
            send_time: self.sent_at.map(ts),
        }
    }
}
