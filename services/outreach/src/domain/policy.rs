//! OUT-5: the contact policy, as one pure function over the customer's recent
//! contacts. The dispatcher calls [`check_contact`] for every message whatever
//! its source, while it holds the customer's lock, and records the decision.
//!
//! Rules, first match decides:
//! 1. `GLOBAL_CONTROL`: a marketing message to a member of the global control group is dropped.
//! 2. `ALREADY_IN_CAMPAIGN`: a campaign never contacts the same customer twice; dropped.
//! 3. `OPTED_OUT`: consent for this channel and purpose was revoked; dropped at once,
//!    also for messages queued before the opt-out.
//! 4. `NO_CONSENT`: marketing needs an explicit grant for the channel; dropped.
//!    Service messages (acknowledgements, ticket replies) need no grant, only no revocation.
//! 5. `OPEN_COMPLAINT`: no marketing while the customer has an open complaint; dropped.
//! 6. `QUIET_HOURS`: inside quiet hours in the customer's time zone; deferred to their end.
//! 7. `BACKOFF`: after `backoff_after_unanswered` consecutive contacts with no response,
//!    marketing waits `backoff_min_days` after the last contact; deferred.
//! 8. caps (`DAILY_CAP`, `WEEKLY_CAP`, `CALENDAR_CAP`, `ROLLING_CAP`): at most
//!    `max_contacts` in the cap's window; deferred to when the window has room, or dropped.
//!
//! A deferral never lands inside quiet hours: it moves to their end.

use chrono::{DateTime, Datelike, Duration, NaiveDate, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;
use crm_proto::common::v1::{Channel, Purpose};

/// How a cap counts: calendar days in the customer's time zone or rolling hours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// 1 = the local day; 7 = the local week starting Monday; N = the N local days ending today.
    CalendarDays(u32),
    /// The last N hours.
    RollingHours(u32),
}

/// What happens to a message over a cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverCap {
    /// Deferred to when the window has room.
    Defer,
    /// Dropped.
    Drop,
}

/// A frequency cap with its window stated explicitly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cap {
    /// Channel it counts; `None` counts all channels together.
    pub channel: Option<Channel>,
    /// Maximum contacts in the window.
    pub max_contacts: u32,
    /// The window.
    pub window: Window,
    /// Over-cap action.
    pub over_cap: OverCap,
}

impl Cap {
    /// The rule code a suppression by this cap is recorded with.
    pub fn rule(&self) -> &'static str {
        match self.window {
            Window::CalendarDays(1) => "DAILY_CAP",
            Window::CalendarDays(7) => "WEEKLY_CAP",
            Window::CalendarDays(_) => "CALENDAR_CAP",
            Window::RollingHours(_) => "ROLLING_CAP",
        }
    }
}

/// Local quiet hours; `start > end` wraps midnight (21:00-08:00).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuietHours {
    /// First quiet minute.
    pub start: NaiveTime,
    /// First minute after.
    pub end: NaiveTime,
}

impl QuietHours {
    /// Whether local time `t` is quiet.
    pub fn contains(&self, t: NaiveTime) -> bool {
        if self.start == self.end {
            false
        } else if self.start < self.end {
            t >= self.start && t < self.end
        } else {
            t >= self.start || t < self.end
        }
    }
}

/// The contact policy (OUT-5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContactPolicy {
    /// Frequency caps; all must have room.
    pub caps: Vec<Cap>,
    /// Quiet hours, if any.
    pub quiet: Option<QuietHours>,
    /// Consecutive unanswered contacts before backoff (0 disables it).
    pub backoff_after_unanswered: u32,
    /// Minimum days between marketing contacts during backoff.
    pub backoff_min_days: u32,
    /// Share of all customers in the global control group, percent.
    pub global_control_percent: u32,
}

impl Default for ContactPolicy {
    /// SPEC defaults: 2 per local day on all channels (deferred), quiet 21:00-08:00,
    /// backoff after 3 unanswered contacts to one per 7 days, no global control group.
    fn default() -> Self {
        Self {
            caps: vec![Cap {
                channel: None,
                max_contacts: 2,
                window: Window::CalendarDays(1),
                over_cap: OverCap::Defer,
            }],
            quiet: Some(QuietHours {
                start: NaiveTime::from_hms_opt(21, 0, 0).expect("valid"),
                end: NaiveTime::from_hms_opt(8, 0, 0).expect("valid"),
            }),
            backoff_after_unanswered: 3,
            backoff_min_days: 7,
            global_control_percent: 0,
        }
    }
}

/// The customer's consent for the attempt's channel and purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consent {
    /// Granted and not expired.
    Granted,
    /// Explicitly revoked (an opt-out).
    Revoked,
    /// Never given, or expired.
    Unknown,
}

/// A contact that went out (verdict SENT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Contact {
    /// When.
    pub at: DateTime<Utc>,
    /// On which channel.
    pub channel: Channel,
}

/// What the policy knows about the customer at decision time.
#[derive(Debug, Clone)]
pub struct Recipient<'a> {
    /// Their time zone.
    pub timezone: Tz,
    /// Contacts of the recent past (at least the longest cap window), any order.
    pub contacts: &'a [Contact],
    /// Consecutive contacts since their last response.
    pub unanswered_streak: u32,
    /// Consent for the attempt's channel and purpose.
    pub consent: Consent,
    /// An open complaint ticket.
    pub open_complaint: bool,
    /// In the global control group.
    pub in_global_control: bool,
    /// The attempt's campaign has already contacted them.
    pub already_in_campaign: bool,
}

/// The message being decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    /// Channel.
    pub channel: Channel,
    /// Purpose.
    pub purpose: Purpose,
}

/// The verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send now.
    Send,
    /// Try again at this time.
    Defer(DateTime<Utc>),
    /// Never send.
    Drop,
}

/// A decision with the rule that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Verdict.
    pub verdict: Verdict,
    /// Rule code, e.g. "DAILY_CAP"; "ALLOWED" when sent.
    pub rule: &'static str,
    /// Human-readable detail for "why was this customer not contacted?".
    pub detail: String,
}

impl Decision {
    fn drop(rule: &'static str, detail: impl Into<String>) -> Self {
        Self { verdict: Verdict::Drop, rule, detail: detail.into() }
    }
}

fn channel_name(c: Channel) -> &'static str {
    c.as_str_name().trim_start_matches("CHANNEL_")
}

/// The UTC instant of local `date` at `time` (the earliest one around a DST change;
/// a skipped local time moves on by an hour).
fn local_instant(tz: Tz, date: NaiveDate, time: NaiveTime) -> DateTime<Utc> {
    let naive = date.and_time(time);
    tz.from_local_datetime(&naive)
        .earliest()
        .or_else(|| tz.from_local_datetime(&(naive + Duration::hours(1))).earliest())
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_else(|| Utc.from_utc_datetime(&naive))
}

/// The end of the quiet period that `at` falls in, or `None` if `at` is not quiet.
fn quiet_until(quiet: &QuietHours, tz: Tz, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let local = at.with_timezone(&tz);
    if !quiet.contains(local.time()) {
        return None;
    }
    let today = local.date_naive();
    let date = if local.time() < quiet.end { today } else { today.succ_opt().unwrap_or(today) };
    Some(local_instant(tz, date, quiet.end))
}

/// First instant of the window of `cap` that contains `now`, and when a
/// contact made at `at` leaves the window.
fn window_start(window: Window, tz: Tz, now: DateTime<Utc>) -> DateTime<Utc> {
    match window {
        Window::RollingHours(h) => now - Duration::hours(h as i64),
        Window::CalendarDays(days) => {
            let today = now.with_timezone(&tz).date_naive();
            let first = if days == 7 {
                today - Duration::days(today.weekday().num_days_from_monday() as i64)
            } else {
                today - Duration::days(days.max(1) as i64 - 1)
            };
            local_instant(tz, first, NaiveTime::MIN)
        }
    }
}

fn leaves_window(window: Window, tz: Tz, at: DateTime<Utc>) -> DateTime<Utc> {
    match window {
        Window::RollingHours(h) => at + Duration::hours(h as i64),
        Window::CalendarDays(days) => {
            let date = at.with_timezone(&tz).date_naive();
            let next = if days == 7 {
                date + Duration::days(7 - date.weekday().num_days_from_monday() as i64)
            } else {
                date + Duration::days(days.max(1) as i64)
            };
            local_instant(tz, next, NaiveTime::MIN)
        }
    }
}

/// OUT-5: decides whether `attempt` may go to `recipient` at `now`.
pub fn check_contact(
    policy: &ContactPolicy,
    recipient: &Recipient<'_>,
    attempt: Attempt,
    now: DateTime<Utc>,
) -> Decision {
    let marketing = attempt.purpose != Purpose::Service;
    if marketing && recipient.in_global_control {
        return Decision::drop("GLOBAL_CONTROL", "in the global control group: no marketing contact");
    }
    if recipient.already_in_campaign {
        return Decision::drop("ALREADY_IN_CAMPAIGN", "this campaign has already contacted the customer");
    }
    if let Some(refused) = consent_and_complaints(recipient.consent, recipient.open_complaint, attempt) {
        return refused;
    }
    let tz = recipient.timezone;
    let defer = |until: DateTime<Utc>, rule: &'static str, detail: String| {
        // Never wake up inside quiet hours.
        let until = policy.quiet.as_ref().and_then(|q| quiet_until(q, tz, until)).unwrap_or(until);
        Decision { verdict: Verdict::Defer(until), rule, detail }
    };
    if let Some(quiet) = &policy.quiet
        && let Some(until) = quiet_until(quiet, tz, now)
    {
        return defer(
            until,
            "QUIET_HOURS",
            format!("quiet hours {}-{} ({tz})", quiet.start.format("%H:%M"), quiet.end.format("%H:%M")),
        );
    }
    if marketing
        && policy.backoff_after_unanswered > 0
        && recipient.unanswered_streak >= policy.backoff_after_unanswered
    {
        let last = recipient.contacts.iter().map(|c| c.at).max();
        if let Some(last) = last {
            let allowed = last + Duration::days(policy.backoff_min_days as i64);
            if now < allowed {
                return defer(
                    allowed,
                    "BACKOFF",
                    format!(
                        "{} contacts without a response: at most one every {} days",
                        recipient.unanswered_streak, policy.backoff_min_days
                    ),
                );
            }
        }
    }
    for cap in &policy.caps {
        if cap.channel.is_some_and(|c| c != attempt.channel) {
            continue;
        }
        let start = window_start(cap.window, tz, now);
        // Contacts stamped after `now` count too: another replica (or a
        // transaction that took the lock first) may have a clock a little ahead.
        let mut inside: Vec<DateTime<Utc>> = recipient
            .contacts
            .iter()
            .filter(|c| c.at >= start && cap.channel.is_none_or(|ch| ch == c.channel))
            .map(|c| c.at)
            .collect();
        if (inside.len() as u32) < cap.max_contacts {
            continue;
        }
        let scope = cap.channel.map(channel_name).unwrap_or("all channels");
        let window = match cap.window {
            Window::CalendarDays(1) => format!("on {} ({tz})", now.with_timezone(&tz).date_naive()),
            Window::CalendarDays(7) => format!("in the week of {} ({tz})", start.with_timezone(&tz).date_naive()),
            Window::CalendarDays(d) => format!("in the last {d} local days ({tz})"),
            Window::RollingHours(h) => format!("in the last {h} hours"),
        };
        let detail = format!("{} of {} contacts used {window}, {scope}", inside.len(), cap.max_contacts);
        if cap.over_cap == OverCap::Drop {
            return Decision::drop(cap.rule(), detail);
        }
        // Room appears when enough of the oldest contacts have left the window.
        inside.sort();
        let must_leave = inside.len() + 1 - cap.max_contacts as usize;
        let until = leaves_window(cap.window, tz, inside[must_leave - 1]);
        return defer(until, cap.rule(), detail);
    }
    Decision { verdict: Verdict::Send, rule: "ALLOWED", detail: String::new() }
}

/// OUT-5, PRF-7: no contact against the customer's consent for the purpose
/// (an opt-out stops everything on the channel), and no marketing while a
/// complaint is open. `None` when neither refuses.
pub fn consent_and_complaints(consent: Consent, open_complaint: bool, attempt: Attempt) -> Option<Decision> {
    let marketing = attempt.purpose != Purpose::Service;
    let channel = channel_name(attempt.channel);
    match consent {
        Consent::Revoked => {
            return Some(Decision::drop(
                "OPTED_OUT",
                format!("opted out of {} on {channel}", purpose_name(attempt.purpose)),
            ));
        }
        Consent::Unknown if marketing => {
            return Some(Decision::drop("NO_CONSENT", format!("no marketing consent on {channel}")));
        }
        _ => {}
    }
    if marketing && open_complaint {
        return Some(Decision::drop("OPEN_COMPLAINT", "an open complaint ticket: no marketing until it is resolved"));
    }
    None
}

/// REL-6: the last look before a message is handed to its channel, with
/// consent and complaints read from profiles and feedback at that moment
/// (not from the event-fed copies the decision used), so a withdrawal or a
/// complaint that returned before it stops the message.
pub fn check_at_hand_off(consent: Consent, open_complaint: bool, attempt: Attempt) -> Option<Decision> {
    consent_and_complaints(consent, open_complaint, attempt)
        .map(|d| Decision { detail: format!("{} (at hand-off, as recorded now)", d.detail), ..d })
}

fn purpose_name(p: Purpose) -> &'static str {
    match p {
        Purpose::Service => "service messages",
        _ => "marketing",
    }
}

/// Parses an IANA zone; unknown or empty names fall back to `fallback`.
pub fn zone(name: &str, fallback: Tz) -> Tz {
    name.parse().unwrap_or(fallback)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rel6_at_hand_off_a_withdrawal_or_a_complaint_stops_marketing_and_only_a_withdrawal_stops_service() {
        let marketing = Attempt { channel: Channel::Sms, purpose: Purpose::Marketing };
        let service = Attempt { channel: Channel::Sms, purpose: Purpose::Service };
        let rule = |d: Option<Decision>| d.map(|d| d.rule);
        assert_eq!(rule(check_at_hand_off(Consent::Granted, false, marketing)), None);
        assert_eq!(rule(check_at_hand_off(Consent::Revoked, false, marketing)), Some("OPTED_OUT"));
        assert_eq!(rule(check_at_hand_off(Consent::Unknown, false, marketing)), Some("NO_CONSENT"));
        assert_eq!(rule(check_at_hand_off(Consent::Granted, true, marketing)), Some("OPEN_COMPLAINT"));
        assert_eq!(rule(check_at_hand_off(Consent::Unknown, true, service)), None);
        assert_eq!(rule(check_at_hand_off(Consent::Revoked, false, service)), Some("OPTED_OUT"));
        let d = check_at_hand_off(Consent::Revoked, false, marketing).expect("refused");
        assert!(d.detail.ends_with("(at hand-off, as recorded now)"), "{}", d.detail);
        assert_eq!(d.verdict, Verdict::Drop);
    }

    const SHANGHAI: Tz = chrono_tz::Asia::Shanghai;
    const NEW_YORK: Tz = chrono_tz::America::New_York;

    fn at(tz: Tz, s: &str) -> DateTime<Utc> {
        let naive = chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M").expect("time");
        tz.from_local_datetime(&naive).single().expect("unambiguous").with_timezone(&Utc)
    }

    fn recipient(tz: Tz, contacts: &[Contact]) -> Recipient<'_> {
        Recipient {
            timezone: tz,
            contacts,
            unanswered_streak: 0,
            consent: Consent::Granted,
            open_complaint: false,
            in_global_control: false,
            already_in_campaign: false,
        }
    }

    const SMS: Attempt = Attempt { channel: Channel::Sms, purpose: Purpose::Marketing };

    fn sms(at: DateTime<Utc>) -> Contact {
        Contact { at, channel: Channel::Sms }
    }

    #[test]
    fn second_contact_of_the_local_day_is_allowed_and_the_third_is_deferred_to_the_next_morning() {
        let policy = ContactPolicy::default();
        let now = at(SHANGHAI, "2026-11-22 15:00");
        let one = [sms(at(SHANGHAI, "2026-11-22 09:00"))];
        assert_eq!(check_contact(&policy, &recipient(SHANGHAI, &one), SMS, now).verdict, Verdict::Send);
        let two = [sms(at(SHANGHAI, "2026-11-22 09:00")), sms(at(SHANGHAI, "2026-11-22 10:00"))];
        let d = check_contact(&policy, &recipient(SHANGHAI, &two), SMS, now);
        assert_eq!(d.rule, "DAILY_CAP");
        // Midnight is quiet, so the deferral moves on to 08:00 local.
        assert_eq!(d.verdict, Verdict::Defer(at(SHANGHAI, "2026-11-23 08:00")));
        assert!(d.detail.contains("2 of 2"), "{}", d.detail);
    }

    #[test]
    fn the_daily_cap_counts_the_customers_local_day_not_utcs() {
        let policy = ContactPolicy::default();
        // 23:30 in New York on the 21st is 04:30 UTC on the 22nd: a different local day.
        let yesterday = [sms(at(NEW_YORK, "2026-11-21 10:00")), sms(at(NEW_YORK, "2026-11-21 11:00"))];
        let now = at(NEW_YORK, "2026-11-22 09:00");
        assert_eq!(check_contact(&policy, &recipient(NEW_YORK, &yesterday), SMS, now).verdict, Verdict::Send);
    }

    #[test]
    fn quiet_hours_start_at_22_00_in_the_customers_zone() {
        let policy = ContactPolicy {
            quiet: Some(QuietHours {
                start: NaiveTime::from_hms_opt(22, 0, 0).unwrap(),
                end: NaiveTime::from_hms_opt(8, 0, 0).unwrap(),
            }),
            ..ContactPolicy::default()
        };
        let r = recipient(NEW_YORK, &[]);
        assert_eq!(check_contact(&policy, &r, SMS, at(NEW_YORK, "2026-11-22 21:59")).verdict, Verdict::Send);
        let d = check_contact(&policy, &r, SMS, at(NEW_YORK, "2026-11-22 22:00"));
        assert_eq!((d.rule, d.verdict), ("QUIET_HOURS", Verdict::Defer(at(NEW_YORK, "2026-11-23 08:00"))));
        let d = check_contact(&policy, &r, SMS, at(NEW_YORK, "2026-11-23 07:59"));
        assert_eq!(d.verdict, Verdict::Defer(at(NEW_YORK, "2026-11-23 08:00")));
        assert_eq!(check_contact(&policy, &r, SMS, at(NEW_YORK, "2026-11-23 08:00")).verdict, Verdict::Send);
        // 22:00 in New York is 11:00 in Shanghai: a Shanghai customer is not quiet then.
        let same_instant = at(NEW_YORK, "2026-11-22 22:00");
        assert_eq!(check_contact(&policy, &recipient(SHANGHAI, &[]), SMS, same_instant).verdict, Verdict::Send);
    }

    #[test]
    fn the_third_unanswered_contact_triggers_backoff_until_a_response() {
        let policy = ContactPolicy::default();
        let last = at(SHANGHAI, "2026-11-20 10:00");
        let contacts = [sms(last)];
        let now = at(SHANGHAI, "2026-11-22 10:00");
        let mut r = recipient(SHANGHAI, &contacts);
        r.unanswered_streak = 2;
        assert_eq!(check_contact(&policy, &r, SMS, now).verdict, Verdict::Send);
        r.unanswered_streak = 3;
        let d = check_contact(&policy, &r, SMS, now);
        assert_eq!((d.rule, d.verdict), ("BACKOFF", Verdict::Defer(at(SHANGHAI, "2026-11-27 10:00"))));
        assert_eq!(check_contact(&policy, &r, SMS, at(SHANGHAI, "2026-11-27 10:00")).verdict, Verdict::Send);
        // Service messages are not marketing: no backoff.
        let service = Attempt { channel: Channel::Sms, purpose: Purpose::Service };
        assert_eq!(check_contact(&policy, &r, service, now).verdict, Verdict::Send);
    }

    #[test]
    fn consent_rules_drop_and_say_why() {
        let policy = ContactPolicy::default();
        let now = at(SHANGHAI, "2026-11-22 10:00");
        let mut r = recipient(SHANGHAI, &[]);
        r.consent = Consent::Revoked;
        assert_eq!(check_contact(&policy, &r, SMS, now).rule, "OPTED_OUT");
        let service = Attempt { channel: Channel::Sms, purpose: Purpose::Service };
        assert_eq!(check_contact(&policy, &r, service, now).rule, "OPTED_OUT");
        r.consent = Consent::Unknown;
        let d = check_contact(&policy, &r, SMS, now);
        assert_eq!((d.rule, d.verdict), ("NO_CONSENT", Verdict::Drop));
        // Acknowledging a customer's own feedback needs no marketing grant.
        assert_eq!(check_contact(&policy, &r, service, now).verdict, Verdict::Send);
    }

    #[test]
    fn open_complaints_stop_marketing_but_not_service_messages() {
        let policy = ContactPolicy::default();
        let now = at(SHANGHAI, "2026-11-22 10:00");
        let mut r = recipient(SHANGHAI, &[]);
        r.open_complaint = true;
        assert_eq!(check_contact(&policy, &r, SMS, now).rule, "OPEN_COMPLAINT");
        let service = Attempt { channel: Channel::Sms, purpose: Purpose::Service };
        assert_eq!(check_contact(&policy, &r, service, now).verdict, Verdict::Send);
    }

    #[test]
    fn campaigns_never_contact_twice_and_the_global_control_group_gets_no_marketing() {
        let policy = ContactPolicy::default();
        let now = at(SHANGHAI, "2026-11-22 10:00");
        let mut r = recipient(SHANGHAI, &[]);
        r.already_in_campaign = true;
        assert_eq!(check_contact(&policy, &r, SMS, now).rule, "ALREADY_IN_CAMPAIGN");
        let mut r = recipient(SHANGHAI, &[]);
        r.in_global_control = true;
        assert_eq!(check_contact(&policy, &r, SMS, now).rule, "GLOBAL_CONTROL");
    }

    #[test]
    fn service_messages_count_against_the_daily_cap_too() {
        let policy = ContactPolicy::default();
        let now = at(SHANGHAI, "2026-11-22 15:00");
        let two = [sms(at(SHANGHAI, "2026-11-22 09:00")), sms(at(SHANGHAI, "2026-11-22 10:00"))];
        let service = Attempt { channel: Channel::Email, purpose: Purpose::Service };
        assert_eq!(check_contact(&policy, &recipient(SHANGHAI, &two), service, now).rule, "DAILY_CAP");
    }

    #[test]
    fn channel_weekly_and_rolling_caps_state_their_windows() {
        let weekly_sms = Cap {
            channel: Some(Channel::Sms),
            max_contacts: 3,
            window: Window::CalendarDays(7),
            over_cap: OverCap::Drop,
        };
        let rolling = Cap { channel: None, max_contacts: 1, window: Window::RollingHours(4), over_cap: OverCap::Defer };
        let policy = ContactPolicy { caps: vec![weekly_sms, rolling], quiet: None, ..ContactPolicy::default() };
        // 2026-11-23 is a Monday.
        let week = [
            sms(at(SHANGHAI, "2026-11-23 09:00")),
            sms(at(SHANGHAI, "2026-11-24 09:00")),
            sms(at(SHANGHAI, "2026-11-25 09:00")),
        ];
        let thursday = at(SHANGHAI, "2026-11-26 15:00");
        let d = check_contact(&policy, &recipient(SHANGHAI, &week), SMS, thursday);
        assert_eq!((d.rule, d.verdict), ("WEEKLY_CAP", Verdict::Drop));
        // Email is not capped weekly; the rolling cap has room (last contact 30 h ago).
        let email = Attempt { channel: Channel::Email, purpose: Purpose::Marketing };
        assert_eq!(check_contact(&policy, &recipient(SHANGHAI, &week), email, thursday).verdict, Verdict::Send);
        // The week before Monday does not count.
        let sunday = [sms(at(SHANGHAI, "2026-11-22 09:00")); 3];
        let monday = at(SHANGHAI, "2026-11-23 15:00");
        assert_eq!(check_contact(&policy, &recipient(SHANGHAI, &sunday), SMS, monday).verdict, Verdict::Send);
        // Rolling: one contact in 4 hours; the next is deferred to 4 h after it.
        let recent = [Contact { at: at(SHANGHAI, "2026-11-26 13:00"), channel: Channel::Email }];
        let d = check_contact(&policy, &recipient(SHANGHAI, &recent), email, thursday);
        assert_eq!((d.rule, d.verdict), ("ROLLING_CAP", Verdict::Defer(at(SHANGHAI, "2026-11-26 17:00"))));
    }

    #[test]
    fn quiet_hours_that_do_not_wrap_and_a_disabled_window() {
        let q = QuietHours {
            start: NaiveTime::from_hms_opt(12, 0, 0).unwrap(),
            end: NaiveTime::from_hms_opt(13, 0, 0).unwrap(),
        };
        assert!(!q.contains(NaiveTime::from_hms_opt(11, 59, 0).unwrap()));
        assert!(q.contains(NaiveTime::from_hms_opt(12, 0, 0).unwrap()));
        assert!(!q.contains(NaiveTime::from_hms_opt(13, 0, 0).unwrap()));
        let none = QuietHours { start: q.start, end: q.start };
        assert!(!none.contains(q.start));
    }

    #[test]
    fn a_contact_stamped_just_after_now_still_counts() {
        // Another replica's clock may run a little ahead of this one's.
        let policy = ContactPolicy::default();
        let now = at(SHANGHAI, "2026-11-22 15:00");
        let later = [sms(now + Duration::milliseconds(3)), sms(at(SHANGHAI, "2026-11-22 09:00"))];
        assert_eq!(check_contact(&policy, &recipient(SHANGHAI, &later), SMS, now).rule, "DAILY_CAP");
    }

    #[test]
    fn unknown_zones_fall_back() {
        assert_eq!(zone("Europe/Berlin", SHANGHAI), chrono_tz::Europe::Berlin);
        assert_eq!(zone("", SHANGHAI), SHANGHAI);
        assert_eq!(zone("Mars/Olympus", SHANGHAI), SHANGHAI);
    }
}
