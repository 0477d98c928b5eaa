//! OUT-4 lifecycle triggers. Each trigger queues messages like any other
//! sender, so the contact policy applies to them too (OUT-5); each occurrence
//! has a dedupe key, so a trigger fires once however often the sweep runs and
//! however many replicas run it.
//!
//! - Date triggers, swept set-based over the read model, on the customer's
//!   local day: birthday, membership anniversary, 30 and 90 days after the
//!   last purchase, welcome after the first purchase.
//! - Event triggers, from segmentation's events: a tier change notice, a
//!   win-back message when a customer turns DORMANT, and (in
//!   [`crate::read_model`]) a call-back task when churn risk turns HIGH.
//! - "6 months silent": a personal call-back task for the account managers.
//! - The feedback acknowledgement is an RPC (`AcknowledgeFeedback`).
//!
//! Their templates are system templates with well-known ids, seeded at start
//! and editable with UpdateTemplate.

use chrono::{DateTime, Duration, Utc};
use chrono_tz::Tz;
use crm_kit::ApiError;
use crm_proto::common::v1::{Purpose, Tier};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::messages::state;
use crate::tasks::{self, NewTask};

/// A lifecycle trigger with its system template.
#[derive(Debug, Clone, Copy)]
pub struct Trigger {
    /// Name, recorded on its messages (`Message.trigger`).
    pub name: &'static str,
    /// Its template's id.
    pub template: Uuid,
    /// Purpose of its messages.
    pub purpose: Purpose,
    /// Template display name, Chinese and English body.
    pub texts: (&'static str, &'static str, &'static str),
}

const fn id(n: u128) -> Uuid {
    Uuid::from_u128(0x0000_0000_0000_4000_8000_0000_0000_0b00 + n)
}

/// Birthday: on the day, with the tier offer.
pub const BIRTHDAY: Trigger = Trigger {
    name: "birthday",
    template: id(1),
    purpose: Purpose::Marketing,
    texts: (
        "Birthday greeting",
        "{{name}}，生日快乐！{{tier}}会员生日专享{{discount}}优惠。",
        "Happy birthday, {{name}}! A {{discount}} birthday offer for {{tier}} members.",
    ),
};
/// Membership anniversary.
pub const ANNIVERSARY: Trigger = Trigger {
    name: "anniversary",
    template: id(2),
    purpose: Purpose::Marketing,
    texts: (
        "Membership anniversary",
        "{{name}}，感谢您一路相伴！会员周年专享{{discount}}优惠，积分 {{points}}。",
        "{{name}}, thank you for another year with us! {{discount}} off and {{points}} points to use.",
    ),
};
/// 30 days after the last purchase.
pub const PURCHASE_30D: Trigger = Trigger {
    name: "purchase_30d",
    template: id(3),
    purpose: Purpose::Marketing,
    texts: (
        "30 days after purchase",
        "{{name}}，上次购买的商品用得还好吗？您的积分 {{points}} 可抵 {{coupon_value}}。",
        "{{name}}, how is your purchase working out? Your {{points}} points are worth {{coupon_value}}.",
    ),
};
/// 90 days after the last purchase.
pub const PURCHASE_90D: Trigger = Trigger {
    name: "purchase_90d",
    template: id(4),
    purpose: Purpose::Marketing,
    texts: (
        "90 days after purchase",
        "{{name}}，好久不见，为您准备了{{discount}}回购优惠。",
        "{{name}}, it has been a while: here is {{discount}} off your next order.",
    ),
};
/// Welcome after the first purchase.
pub const WELCOME: Trigger = Trigger {
    name: "welcome",
    template: id(5),
    purpose: Purpose::Service,
    texts: (
        "Welcome after first purchase",
        "{{name}}，感谢您的首次购买，欢迎加入！每消费 1 元积 1 分。",
        "Welcome, {{name}}, and thank you for your first order! You earn 1 point per 1 CNY.",
    ),
};
/// Tier change notice.
pub const TIER_CHANGE: Trigger = Trigger {
    name: "tier_change",
    template: id(6),
    purpose: Purpose::Service,
    texts: (
        "Tier change notice",
        "{{name}}，您的会员等级已更新为{{tier}}，专享{{discount}}优惠。",
        "{{name}}, your membership tier is now {{tier}}, with {{discount}} off.",
    ),
};
/// Win-back for customers turning DORMANT.
pub const WIN_BACK: Trigger = Trigger {
    name: "win_back",
    template: id(7),
    purpose: Purpose::Marketing,
    texts: (
        "Win-back",
        "{{name}}，我们想念您！回来看看，{{discount}}优惠和 {{points}} 积分等着您。",
        "{{name}}, we miss you! Come back for {{discount}} off; your {{points}} points are waiting.",
    ),
};

/// Every trigger with a template.
pub const ALL: &[Trigger] = &[BIRTHDAY, ANNIVERSARY, PURCHASE_30D, PURCHASE_90D, WELCOME, TIER_CHANGE, WIN_BACK];

/// Days without a purchase or inbound interaction before a personal call-back (OUT-4).
pub const SILENT_DAYS: i64 = 180;

/// SQL: the customer's zone, or the default ($1) when unknown to PostgreSQL.
const ZONE: &str = "CASE WHEN c.timezone IN (SELECT name FROM pg_timezone_names) THEN c.timezone ELSE $1 END";

/// SQL: channel of a trigger message: the preferred one if outreach sends
/// there (and it is not a person's visit or call), else SMS.
const CHANNEL: &str = "CASE WHEN c.preferred_channel IN (1, 2, 3, 4, 6) THEN c.preferred_channel ELSE 1 END";

/// Queues the date triggers due on each customer's local day at `now`;
/// returns how many messages were queued. Idempotent.
pub async fn sweep(tx: &mut PgConnection, default_tz: Tz, now: DateTime<Utc>) -> Result<u64, ApiError> {
    // (trigger, condition on the customer `c` (zone `c.z`) and their local date `l.d`, dedupe suffix)
    let rules: [(&Trigger, &str, &str); 5] = [
        (
            &BIRTHDAY,
            "c.birth_month = extract(month FROM l.d) AND c.birth_day = extract(day FROM l.d)",
            "extract(year FROM l.d)::text",
        ),
        (
            &ANNIVERSARY,
            "c.registered_at IS NOT NULL AND (c.registered_at AT TIME ZONE c.z)::date < l.d - 300 \
             AND extract(month FROM c.registered_at AT TIME ZONE c.z) = extract(month FROM l.d) \
             AND extract(day FROM c.registered_at AT TIME ZONE c.z) = extract(day FROM l.d)",
            "extract(year FROM l.d)::text",
        ),
        (
            &PURCHASE_30D,
            "(c.last_purchase_at AT TIME ZONE c.z)::date = l.d - 30",
            "((c.last_purchase_at AT TIME ZONE c.z)::date)::text",
        ),
        (
            &PURCHASE_90D,
            "(c.last_purchase_at AT TIME ZONE c.z)::date = l.d - 90",
            "((c.last_purchase_at AT TIME ZONE c.z)::date)::text",
        ),
        (&WELCOME, "c.first_purchase_at > $2 - interval '2 days'", "'once'"),
    ];
    let mut queued = 0;
    for (trigger, condition, suffix) in rules {
        // Trigger messages expire at the end of the customer's local day.
        let sql = format!(
            "INSERT INTO messages (message_id, customer_id, channel, template_id, trigger_name, purpose, state, due_at, expires_at, dedupe_key) \
             SELECT gen_random_uuid(), customer_id, ch, $3, $4, $5, $6, $2, (d + 1)::timestamp AT TIME ZONE z, \
                    $4 || ':' || customer_id || ':' || key \
             FROM (SELECT c.customer_id, {CHANNEL} AS ch, c.z AS z, l.d AS d, {suffix} AS key \
                   FROM (SELECT c.*, {ZONE} AS z FROM customers c WHERE c.merged_into IS NULL AND c.erased_at IS NULL) c \
                   CROSS JOIN LATERAL (SELECT ($2 AT TIME ZONE c.z)::date AS d) l \
                   WHERE {condition}) due \
             ON CONFLICT DO NOTHING"
        );
        queued += sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(default_tz.name())
            .bind(now)
            .bind(trigger.template)
            .bind(trigger.name)
            .bind(trigger.purpose as i16)
            .bind(state::QUEUED)
            .execute(&mut *tx)
            .await?
            .rows_affected();
    }
    Ok(queued)
}

/// OUT-4 "6 months silent -> personal call-back": one task per silence
/// (keyed by the date the customer went quiet). Returns how many were created.
pub async fn silent_callbacks(tx: &mut PgConnection, now: DateTime<Utc>) -> Result<usize, ApiError> {
    let silent: Vec<(Uuid, DateTime<Utc>)> = sqlx::query_as(
        "SELECT c.customer_id, c.last_activity_at FROM customers c WHERE c.merged_into IS NULL AND c.erased_at IS NULL \
         AND c.last_activity_at < $1 AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.dedupe_key = 'silent:' || c.customer_id || ':' || \
         to_char(c.last_activity_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')) LIMIT 1000",
    )
    .bind(now - Duration::days(SILENT_DAYS))
    .fetch_all(&mut *tx)
    .await?;
    for (customer, since) in &silent {
        tasks::create_in(
            tx,
            NewTask {
                customer_id: *customer,
                kind: crm_proto::outreach::v1::TaskKind::CallBack,
                owner: tasks::AGENT_QUEUE.into(),
                due_at: now + Duration::days(3),
                reason: format!("6 months silent (last activity {})", since.format("%Y-%m-%d")),
                dedupe_key: Some(format!("silent:{customer}:{}", since.format("%Y-%m-%d"))),
            },
            "",
        )
        .await?;
    }
    Ok(silent.len())
}

/// OUT-4 tier change: a notice, or a win-back message when the customer
/// turns DORMANT. The first scoring (from no tier) is not a change a
/// customer should hear about.
pub async fn on_tier_change(
    tx: &mut PgConnection,
    customer: Uuid,
    from: Tier,
    to: Tier,
    event_id: &str,
    now: DateTime<Utc>,
) -> Result<bool, ApiError> {
    if from == Tier::Unspecified || to == Tier::Unspecified || from == to {
        return Ok(false);
    }
    let trigger = if to == Tier::Dormant { WIN_BACK } else { TIER_CHANGE };
    let sql = format!(
        "INSERT INTO messages (message_id, customer_id, channel, template_id, trigger_name, purpose, state, due_at, expires_at, dedupe_key) \
         SELECT gen_random_uuid(), c.customer_id, {CHANNEL}, $2, $3, $4, $5, $6, $6 + interval '7 days', $7 \
         FROM customers c WHERE c.customer_id = $1 AND c.erased_at IS NULL ON CONFLICT DO NOTHING"
    );
    let n = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(customer)
        .bind(trigger.template)
        .bind(trigger.name)
        .bind(trigger.purpose as i16)
        .bind(state::QUEUED)
        .bind(now)
        .bind(format!("{}:{event_id}", trigger.name))
        .execute(&mut *tx)
        .await?
        .rows_affected();
    Ok(n > 0)
}
