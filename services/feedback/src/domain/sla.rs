//! FBK-3: SLA clocks on a business calendar.
//!
//! A [`Calendar`] says which seconds count: working days (ISO weekdays, minus
//! holidays, plus make-up working days such as China's 调休 Saturdays) between
//! an opening and a closing time, in the calendar's time zone; or every second
//! (24x7, for urgent tickets). An [`SlaClock`] accumulates counted seconds
//! while it runs; it pauses while the ticket waits on the customer (where the
//! policy allows), stops when its target event happens (first response,
//! resolution) and resumes when a resolved ticket is reopened. Its deadline
//! is the instant at which the counted time reaches the target if it keeps
//! running; a breach is `now >= deadline` — at the deadline, not before.

use std::collections::BTreeSet;

use chrono::{DateTime, Datelike, Duration, NaiveDate, NaiveTime, TimeZone, Utc, Weekday};
use chrono_tz::Tz;

/// Which seconds count towards an SLA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Calendar {
    /// Time zone of the working hours.
    pub tz: Tz,
    /// Working weekdays (Monday = index 0).
    pub workdays: [bool; 7],
    /// Opening time (local).
    pub open: NaiveTime,
    /// Closing time (local), after `open`.
    pub close: NaiveTime,
    /// Days off although they are working weekdays.
    pub holidays: BTreeSet<NaiveDate>,
    /// Working days although they are not working weekdays.
    pub extra_workdays: BTreeSet<NaiveDate>,
}

/// The longest stretch a deadline computation looks ahead (a calendar with
/// no working day in it would otherwise never end).
const MAX_LOOKAHEAD_DAYS: i64 = 3 * 366;

impl Calendar {
    /// Monday to Friday, 09:00-18:00 in `tz`, no holidays.
    pub fn office(tz: Tz) -> Calendar {
        Calendar {
            tz,
            workdays: [true, true, true, true, true, false, false],
            open: NaiveTime::from_hms_opt(9, 0, 0).unwrap_or_default(),
            close: NaiveTime::from_hms_opt(18, 0, 0).unwrap_or_default(),
            holidays: BTreeSet::new(),
            extra_workdays: BTreeSet::new(),
        }
    }

    /// Seconds of one working day (e.g. 32 400 for 09:00-18:00).
    pub fn day_seconds(&self) -> i64 {
        (self.close - self.open).num_seconds()
    }

    /// Whether `date` is a working day.
    pub fn is_workday(&self, date: NaiveDate) -> bool {
        if self.extra_workdays.contains(&date) {
            return true;
        }
        if self.holidays.contains(&date) {
            return false;
        }
        self.workdays[date.weekday().num_days_from_monday() as usize]
    }

    /// The working window of a local date, in UTC (None on a day off).
    fn window(&self, date: NaiveDate) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
        if !self.is_workday(date) {
            return None;
        }
        let at = |t: NaiveTime| {
            // A local time skipped by a DST change: the earliest valid instant after it.
            self.tz
                .from_local_datetime(&date.and_time(t))
                .earliest()
                .or_else(|| self.tz.from_local_datetime(&(date.and_time(t) + Duration::hours(1))).earliest())
                .map(|d| d.with_timezone(&Utc))
        };
        Some((at(self.open)?, at(self.close)?))
    }

    /// Counted seconds in `[from, to)`.
    pub fn business_seconds(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> i64 {
        if to <= from {
            return 0;
        }
        let mut date = from.with_timezone(&self.tz).date_naive();
        let last = to.with_timezone(&self.tz).date_naive();
        let mut total = 0;
        while date <= last {
            if let Some((open, close)) = self.window(date) {
                let start = open.max(from);
                let end = close.min(to);
                if end > start {
                    total += (end - start).num_seconds();
                }
            }
            date = match date.succ_opt() {
                Some(d) => d,
                None => break,
            };
        }
        total
    }

    /// The instant at which `seconds` counted seconds have passed after `from`
    /// (`from` itself if `seconds <= 0`). None if the calendar has no working
    /// time within three years.
    pub fn add_business_seconds(&self, from: DateTime<Utc>, seconds: i64) -> Option<DateTime<Utc>> {
        if seconds <= 0 {
            return Some(from);
        }
        let mut left = seconds;
        let mut date = from.with_timezone(&self.tz).date_naive();
        for _ in 0..MAX_LOOKAHEAD_DAYS {
            if let Some((open, close)) = self.window(date) {
                let start = open.max(from);
                if close > start {
                    let available = (close - start).num_seconds();
                    if available >= left {
                        return Some(start + Duration::seconds(left));
                    }
                    left -= available;
                }
            }
            date = date.succ_opt()?;
        }
        None
    }

    /// Parses working weekdays such as "Mon-Fri", "Mon-Sat" or "Mon,Tue,Thu".
    pub fn parse_workdays(s: &str) -> Result<[bool; 7], String> {
        let day = |d: &str| -> Result<usize, String> {
            d.trim()
                .parse::<Weekday>()
                .map(|w| w.num_days_from_monday() as usize)
                .map_err(|_| format!("{d:?} is not a weekday (Mon..Sun)"))
        };
        let mut days = [false; 7];
        for part in s.split(',').filter(|p| !p.trim().is_empty()) {
            match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (day(a)?, day(b)?);
                    if a > b {
                        return Err(format!("range {part:?} runs backwards"));
                    }
                    days[a..=b].iter_mut().for_each(|d| *d = true);
                }
                None => days[day(part)?] = true,
            }
        }
        if !days.iter().any(|d| *d) {
            return Err("at least one working weekday is needed".into());
        }
        Ok(days)
    }

    /// Parses "09:00-18:00".
    pub fn parse_hours(s: &str) -> Result<(NaiveTime, NaiveTime), String> {
        let (a, b) = s.split_once('-').ok_or_else(|| format!("{s:?} is not HH:MM-HH:MM"))?;
        let t = |x: &str| NaiveTime::parse_from_str(x.trim(), "%H:%M").map_err(|_| format!("{x:?} is not HH:MM"));
        let (open, close) = (t(a)?, t(b)?);
        if close <= open {
            return Err(format!("{s:?}: closing must be after opening"));
        }
        Ok((open, close))
    }

    /// Parses a comma-separated list of ISO dates.
    pub fn parse_dates(s: &str) -> Result<BTreeSet<NaiveDate>, String> {
        s.split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .map(|d| NaiveDate::parse_from_str(d, "%Y-%m-%d").map_err(|_| format!("{d:?} is not a YYYY-MM-DD date")))
            .collect()
    }
}

/// Counts every second (urgent tickets, FBK-3 "24x7 for urgent").
pub fn always(from: DateTime<Utc>, to: DateTime<Utc>) -> i64 {
    (to - from).num_seconds().max(0)
}

/// Which calendar a clock counts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counting {
    /// The business calendar.
    BusinessHours,
    /// Every second.
    Always,
}

/// Counted seconds in `[from, to)`.
pub fn counted(cal: &Calendar, counting: Counting, from: DateTime<Utc>, to: DateTime<Utc>) -> i64 {
    match counting {
        Counting::BusinessHours => cal.business_seconds(from, to),
        Counting::Always => always(from, to),
    }
}

/// When `seconds` more counted seconds have passed after `from`.
pub fn advance(cal: &Calendar, counting: Counting, from: DateTime<Utc>, seconds: i64) -> Option<DateTime<Utc>> {
    match counting {
        Counting::BusinessHours => cal.add_business_seconds(from, seconds),
        Counting::Always => Some(from + Duration::seconds(seconds.max(0))),
    }
}

/// The kind of SLA clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClockKind {
    /// Until the ticket is acknowledged.
    FirstResponse,
    /// Until the ticket is resolved.
    Resolution,
}

impl ClockKind {
    /// "first_response" or "resolution" (as stored and on the wire).
    pub fn key(self) -> &'static str {
        match self {
            ClockKind::FirstResponse => "first_response",
            ClockKind::Resolution => "resolution",
        }
    }

    /// Parses [`ClockKind::key`].
    pub fn from_key(s: &str) -> Option<ClockKind> {
        match s {
            "first_response" => Some(ClockKind::FirstResponse),
            "resolution" => Some(ClockKind::Resolution),
            _ => None,
        }
    }
}

/// One SLA clock of a ticket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlaClock {
    /// Which clock.
    pub kind: ClockKind,
    /// Target in counted seconds.
    pub target: i64,
    /// How it counts.
    pub counting: Counting,
    /// Counted seconds of the stretches that ended (paused, stopped).
    pub elapsed_closed: i64,
    /// Start of the current running stretch; None while paused or stopped.
    pub running_since: Option<DateTime<Utc>>,
    /// Paused while waiting on the customer.
    pub paused: bool,
    /// When its target event happened (stopped for good unless reopened).
    pub met_at: Option<DateTime<Utc>>,
    /// When the watcher found it breached (set once).
    pub breached_at: Option<DateTime<Utc>>,
}

impl SlaClock {
    /// A clock started at `at`.
    pub fn start(kind: ClockKind, target: i64, counting: Counting, at: DateTime<Utc>) -> SlaClock {
        SlaClock {
            kind,
            target,
            counting,
            elapsed_closed: 0,
            running_since: Some(at),
            paused: false,
            met_at: None,
            breached_at: None,
        }
    }

    /// Counted seconds so far.
    pub fn elapsed(&self, cal: &Calendar, now: DateTime<Utc>) -> i64 {
        self.elapsed_closed + self.running_since.map(|s| counted(cal, self.counting, s, now)).unwrap_or(0)
    }

    /// The instant the target is reached if the clock keeps running; None
    /// while paused or stopped.
    pub fn deadline(&self, cal: &Calendar) -> Option<DateTime<Utc>> {
        let since = self.running_since?;
        advance(cal, self.counting, since, self.target - self.elapsed_closed)
    }

    /// Whether the clock is breached at `now`: it ran (or runs) past its target.
    pub fn is_breached_at(&self, cal: &Calendar, now: DateTime<Utc>) -> bool {
        match self.running_since {
            Some(_) => self.deadline(cal).is_some_and(|d| now >= d),
            // Stopped or paused: late if the time spent reached the target.
            None => self.elapsed_closed >= self.target,
        }
    }

    fn close_stretch(&mut self, cal: &Calendar, at: DateTime<Utc>) {
        if let Some(since) = self.running_since.take() {
            self.elapsed_closed += counted(cal, self.counting, since, at);
        }
    }

    /// Pauses a running clock (waiting on the customer).
    pub fn pause(&mut self, cal: &Calendar, at: DateTime<Utc>) {
        if self.running_since.is_some() {
            self.close_stretch(cal, at);
            self.paused = true;
        }
    }

    /// Resumes a paused clock.
    pub fn resume(&mut self, at: DateTime<Utc>) {
        if self.paused && self.met_at.is_none() {
            self.paused = false;
            self.running_since = Some(at);
        }
    }

    /// Stops the clock: its target event happened.
    pub fn meet(&mut self, cal: &Calendar, at: DateTime<Utc>) {
        if self.met_at.is_none() {
            self.close_stretch(cal, at);
            self.paused = false;
            self.met_at = Some(at);
        }
    }

    /// Runs a met clock again (the resolution was rejected), keeping the time spent.
    pub fn reopen(&mut self, at: DateTime<Utc>) {
        if self.met_at.take().is_some() {
            self.paused = false;
            self.running_since = Some(at);
        }
    }

    /// Moves the clock to another policy's target and counting (FBK-3:
    /// re-categorising keeps the time already spent). The running stretch
    /// is closed under the old counting first.
    pub fn retarget(&mut self, cal: &Calendar, target: i64, counting: Counting, at: DateTime<Utc>) {
        let was_running = self.running_since.is_some();
        self.close_stretch(cal, at);
        self.target = target;
        self.counting = counting;
        if was_running {
            self.running_since = Some(at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shanghai() -> Calendar {
        Calendar::office(chrono_tz::Asia::Shanghai)
    }

    /// A local Shanghai time as UTC.
    fn sh(y: i32, m: u32, d: u32, h: u32, min: u32) -> DateTime<Utc> {
        chrono_tz::Asia::Shanghai.with_ymd_and_hms(y, m, d, h, min, 0).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn business_seconds_count_only_working_hours() {
        let cal = shanghai();
        // Tuesday 2026-12-01 08:00 -> 10:00 local: only 09:00-10:00 counts.
        assert_eq!(cal.business_seconds(sh(2026, 12, 1, 8, 0), sh(2026, 12, 1, 10, 0)), 3600);
        // Friday 17:00 -> Monday 10:00: one hour on Friday, one on Monday.
        assert_eq!(cal.business_seconds(sh(2026, 12, 4, 17, 0), sh(2026, 12, 7, 10, 0)), 7200);
        // A weekend counts nothing.
        assert_eq!(cal.business_seconds(sh(2026, 12, 5, 9, 0), sh(2026, 12, 6, 18, 0)), 0);
    }

    #[test]
    fn a_complaint_at_5_30_pm_on_friday_is_due_at_9_30_on_monday() {
        let cal = shanghai();
        let due = cal.add_business_seconds(sh(2026, 12, 4, 17, 30), 3600).unwrap();
        assert_eq!(due, sh(2026, 12, 7, 9, 30));
    }

    #[test]
    fn a_ticket_opened_before_opening_starts_counting_at_opening() {
        let cal = shanghai();
        assert_eq!(cal.add_business_seconds(sh(2026, 12, 1, 3, 0), 900).unwrap(), sh(2026, 12, 1, 9, 15));
    }

    #[test]
    fn holidays_are_skipped_and_make_up_days_count() {
        let mut cal = shanghai();
        // National Day week: Thursday 2026-10-01 and Friday 10-02 off; Saturday 10-10 worked.
        cal.holidays = Calendar::parse_dates("2026-10-01, 2026-10-02").unwrap();
        cal.extra_workdays = Calendar::parse_dates("2026-10-10").unwrap();
        // Wednesday 09-30 17:00 + 2 h: one hour on Wednesday, then Monday 10-05 09:00-10:00.
        assert_eq!(cal.add_business_seconds(sh(2026, 9, 30, 17, 0), 7200).unwrap(), sh(2026, 10, 5, 10, 0));
        assert_eq!(cal.business_seconds(sh(2026, 10, 10, 0, 0), sh(2026, 10, 11, 0, 0)), 9 * 3600);
    }

    #[test]
    fn a_calendar_in_another_zone_with_dst_counts_local_hours() {
        let cal = Calendar::office(chrono_tz::Europe::London);
        let london =
            |d, h| chrono_tz::Europe::London.with_ymd_and_hms(2026, 3, d, h, 0, 0).unwrap().with_timezone(&Utc);
        // Friday 27 March 17:00 + 2 h over the DST weekend: Monday 30 March 10:00 BST.
        assert_eq!(cal.add_business_seconds(london(27, 17), 7200).unwrap(), london(30, 10));
    }

    #[test]
    fn twenty_four_seven_counts_every_second() {
        let cal = shanghai();
        let from = sh(2026, 12, 5, 23, 50);
        assert_eq!(advance(&cal, Counting::Always, from, 900).unwrap(), sh(2026, 12, 6, 0, 5));
        assert_eq!(counted(&cal, Counting::Always, from, sh(2026, 12, 6, 0, 5)), 900);
    }

    #[test]
    fn breach_is_at_the_deadline_not_before() {
        let cal = shanghai();
        let c = SlaClock::start(ClockKind::FirstResponse, 3600, Counting::BusinessHours, sh(2026, 12, 1, 10, 0));
        let deadline = c.deadline(&cal).unwrap();
        assert_eq!(deadline, sh(2026, 12, 1, 11, 0));
        assert!(!c.is_breached_at(&cal, deadline - Duration::seconds(1)));
        assert!(c.is_breached_at(&cal, deadline));
    }

    #[test]
    fn a_pause_stops_the_clock_and_moves_the_deadline() {
        let cal = shanghai();
        let mut c = SlaClock::start(ClockKind::Resolution, 6 * 3600, Counting::BusinessHours, sh(2026, 12, 1, 9, 0));
        c.pause(&cal, sh(2026, 12, 1, 11, 0));
        assert_eq!(c.deadline(&cal), None);
        assert_eq!(c.elapsed(&cal, sh(2026, 12, 2, 15, 0)), 2 * 3600, "paused time does not count");
        assert!(!c.is_breached_at(&cal, sh(2026, 12, 9, 9, 0)), "a paused clock never breaches");
        c.resume(sh(2026, 12, 2, 9, 0));
        // 4 hours left from Wednesday 09:00.
        assert_eq!(c.deadline(&cal).unwrap(), sh(2026, 12, 2, 13, 0));
    }

    #[test]
    fn a_met_clock_is_not_breached_and_a_reopened_one_keeps_its_time() {
        let cal = shanghai();
        let mut c = SlaClock::start(ClockKind::Resolution, 6 * 3600, Counting::BusinessHours, sh(2026, 12, 1, 9, 0));
        c.meet(&cal, sh(2026, 12, 1, 14, 0));
        assert_eq!(c.elapsed_closed, 5 * 3600);
        assert!(!c.is_breached_at(&cal, sh(2026, 12, 30, 9, 0)));
        c.reopen(sh(2026, 12, 2, 9, 0));
        assert_eq!(c.deadline(&cal).unwrap(), sh(2026, 12, 2, 10, 0));
    }

    #[test]
    fn retargeting_carries_the_time_spent() {
        let cal = shanghai();
        // An inquiry (1 business day) found to be a complaint (1 h) after 30 minutes.
        let mut c = SlaClock::start(ClockKind::FirstResponse, 9 * 3600, Counting::BusinessHours, sh(2026, 12, 1, 9, 0));
        c.retarget(&cal, 3600, Counting::BusinessHours, sh(2026, 12, 1, 9, 30));
        assert_eq!(c.deadline(&cal).unwrap(), sh(2026, 12, 1, 10, 0));
        // ... and already past a shorter target: breached at once.
        c.retarget(&cal, 900, Counting::Always, sh(2026, 12, 1, 9, 40));
        assert!(c.is_breached_at(&cal, sh(2026, 12, 1, 9, 40)));
    }

    #[test]
    fn configuration_strings_parse_or_say_why_not() {
        assert_eq!(Calendar::parse_workdays("Mon-Fri").unwrap(), [true, true, true, true, true, false, false]);
        assert_eq!(Calendar::parse_workdays("Mon,Wed,Sat").unwrap(), [true, false, true, false, false, true, false]);
        assert!(Calendar::parse_workdays("Fri-Mon").is_err());
        assert!(Calendar::parse_workdays("Funday").is_err());
        assert!(Calendar::parse_workdays("").is_err());
        let (o, c) = Calendar::parse_hours("08:30-17:30").unwrap();
        assert_eq!((c - o).num_seconds(), 9 * 3600);
        assert!(Calendar::parse_hours("18:00-09:00").is_err());
        assert!(Calendar::parse_dates("2026-13-01").is_err());
    }

    #[test]
    fn a_calendar_without_working_time_has_no_deadline() {
        let mut cal = shanghai();
        cal.workdays = [false; 7];
        assert_eq!(cal.add_business_seconds(sh(2026, 12, 1, 9, 0), 60), None);
    }
}
