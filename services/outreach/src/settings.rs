//! The stored contact policy (OUT-5) and channel settings (OUT-1): parsing the
//! wire form into the domain's, once, with field errors.

use chrono::NaiveTime;
use crm_kit::{ApiError, FieldViolations};
use crm_proto::common::v1::Channel;
use crm_proto::outreach::v1 as pb;
use prost::Message;
use sqlx::PgConnection;

use crate::domain::channel;
use crate::domain::policy::{Cap, ContactPolicy, OverCap, QuietHours, Window};

/// The SPEC default policy in wire form.
pub fn default_policy() -> pb::ContactPolicy {
    pb::ContactPolicy {
        caps: vec![pb::FrequencyCap {
            channel: 0,
            max_contacts: 2,
            calendar_days: 1,
            rolling_hours: 0,
            over_cap: pb::OverCapAction::Defer as i32,
        }],
        quiet_start: "21:00".into(),
        quiet_end: "08:00".into(),
        backoff_after_unanswered: 3,
        backoff_min_days: 7,
        global_control_percent: 0,
        etag: String::new(),
    }
}

fn hhmm(s: &str) -> Option<NaiveTime> {
    if s.len() != 5 {
        return None;
    }
    NaiveTime::parse_from_str(s, "%H:%M").ok()
}

/// Parses a wire policy; every bad field is named (prefixed with `prefix`).
pub fn parse_policy(p: &pb::ContactPolicy, prefix: &str) -> Result<ContactPolicy, ApiError> {
    let mut v = FieldViolations::new();
    let mut caps = Vec::new();
    if p.caps.len() > 20 {
        // REL-5: no per-item work on a list over its limit.
        v.add(format!("{prefix}caps"), "at most 20 caps");
        return Err(ApiError::InvalidArgument(v));
    }
    for (i, c) in p.caps.iter().enumerate() {
        let f = |name: &str| format!("{prefix}caps[{i}].{name}");
        let ch = match Channel::try_from(c.channel) {
            Ok(Channel::Unspecified) => None,
            Ok(ch) if channel::is_outbound(ch) => Some(ch),
            _ => {
                v.add(f("channel"), "must be an outbound channel or CHANNEL_UNSPECIFIED for all channels");
                None
            }
        };
        if !(1..=1000).contains(&c.max_contacts) {
            v.add(f("max_contacts"), "must be 1..1000");
        }
        let window = match (c.calendar_days, c.rolling_hours) {
            (0, h) if (1..=24 * 31).contains(&h) => Window::RollingHours(h as u32),
            (d, 0) if (1..=31).contains(&d) => Window::CalendarDays(d as u32),
            _ => {
                v.add(f("calendar_days"), "set exactly one of calendar_days (1..31) and rolling_hours (1..744)");
                Window::CalendarDays(1)
            }
        };
        let over_cap = match pb::OverCapAction::try_from(c.over_cap) {
            Ok(pb::OverCapAction::Unspecified | pb::OverCapAction::Defer) => OverCap::Defer,
            Ok(pb::OverCapAction::Drop) => OverCap::Drop,
            Err(_) => {
                v.add(f("over_cap"), "unknown value");
                OverCap::Defer
            }
        };
        caps.push(Cap { channel: ch, max_contacts: c.max_contacts.max(0) as u32, window, over_cap });
    }
    let quiet = match (p.quiet_start.as_str(), p.quiet_end.as_str()) {
        ("", "") => None,
        (s, e) => {
            let start = hhmm(s);
            let end = hhmm(e);
            if start.is_none() {
                v.add(format!("{prefix}quiet_start"), "must be local time \"HH:MM\" (both empty: no quiet hours)");
            }
            if end.is_none() {
                v.add(format!("{prefix}quiet_end"), "must be local time \"HH:MM\" (both empty: no quiet hours)");
            }
            start.zip(end).map(|(start, end)| QuietHours { start, end })
        }
    };
    if !(0..=100).contains(&p.backoff_after_unanswered) {
        v.add(format!("{prefix}backoff_after_unanswered"), "must be 0..100 (0 disables backoff)");
    }
    if !(0..=365).contains(&p.backoff_min_days) {
        v.add(format!("{prefix}backoff_min_days"), "must be 0..365");
    }
    if !(0..=20).contains(&p.global_control_percent) {
        v.add(format!("{prefix}global_control_percent"), "must be 0..20");
    }
    v.into_result()?;
    Ok(ContactPolicy {
        caps,
        quiet,
        backoff_after_unanswered: p.backoff_after_unanswered as u32,
        backoff_min_days: p.backoff_min_days as u32,
        global_control_percent: p.global_control_percent as u32,
    })
}

/// The stored policy (wire form with etag), or the default.
pub async fn load_policy(conn: &mut PgConnection) -> Result<pb::ContactPolicy, ApiError> {
    let row: Option<(Vec<u8>, i64)> =
        sqlx::query_as("SELECT policy, version FROM contact_policy").fetch_optional(&mut *conn).await?;
    Ok(match row {
        Some((bytes, version)) => {
            let mut p = pb::ContactPolicy::decode(bytes.as_slice()).map_err(ApiError::internal)?;
            p.etag = format!("v{version}");
            p
        }
        None => pb::ContactPolicy { etag: "v0".into(), ..default_policy() },
    })
}

/// Channel settings: (cost in minor units, enabled, adapter) by channel.
pub async fn load_channels(conn: &mut PgConnection) -> Result<Vec<(Channel, i64, bool, String)>, sqlx::Error> {
    let stored: Vec<(i16, i64, bool, String)> =
        sqlx::query_as("SELECT channel, cost_minor, enabled, adapter FROM channels").fetch_all(&mut *conn).await?;
    Ok(channel::OUTBOUND
        .iter()
        .map(|(ch, cost)| {
            stored
                .iter()
                .find(|(c, ..)| *c as i32 == *ch as i32)
                .map(|(_, cost, enabled, adapter)| (*ch, *cost, *enabled, adapter.clone()))
                .unwrap_or((*ch, *cost, true, "log".to_string()))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_wire_policy_is_the_domain_default() {
        assert_eq!(parse_policy(&default_policy(), "").unwrap(), ContactPolicy::default());
    }

    #[test]
    fn bad_policies_name_every_field() {
        let p = pb::ContactPolicy {
            caps: vec![pb::FrequencyCap {
                channel: 8,
                max_contacts: 0,
                calendar_days: 1,
                rolling_hours: 4,
                over_cap: 9,
            }],
            quiet_start: "25:00".into(),
            quiet_end: "8:00".into(),
            backoff_after_unanswered: -1,
            backoff_min_days: 0,
            global_control_percent: 50,
            etag: String::new(),
        };
        let err = parse_policy(&p, "policy.").unwrap_err();
        let ApiError::InvalidArgument(v) = err else { panic!("{err:?}") };
        let fields: Vec<&str> = v.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "policy.caps[0].channel",
                "policy.caps[0].max_contacts",
                "policy.caps[0].calendar_days",
                "policy.caps[0].over_cap",
                "policy.quiet_start",
                "policy.quiet_end",
                "policy.backoff_after_unanswered",
                "policy.global_control_percent"
            ]
        );
    }
}
