//! FBK-3: ticket states, SLA policies by category and urgency, routing to a
//! department queue, and the escalation chain after a breach.

use crate::domain::classify::Category;
use crate::domain::sla::{Calendar, ClockKind, Counting};

/// Ticket states (FBK-3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Opened; first-response clock running.
    Open,
    /// An agent responded.
    Acknowledged,
    /// Being worked on.
    InProgress,
    /// Waiting on the customer (clocks paused where the policy allows).
    WaitingOnCustomer,
    /// Resolved; verification requested from the customer.
    Resolved,
    /// The customer confirmed: the loop is closed.
    Verified,
    /// The customer did not confirm; work resumes.
    Reopened,
}

impl State {
    /// Every state.
    pub const ALL: [State; 7] = [
        State::Open,
        State::Acknowledged,
        State::InProgress,
        State::WaitingOnCustomer,
        State::Resolved,
        State::Verified,
        State::Reopened,
    ];

    /// The stored code (the wire enum's number).
    pub fn code(self) -> i16 {
        match self {
            State::Open => 1,
            State::Acknowledged => 2,
            State::InProgress => 3,
            State::WaitingOnCustomer => 4,
            State::Resolved => 5,
            State::Verified => 6,
            State::Reopened => 7,
        }
    }

    /// From [`State::code`].
    pub fn from_code(code: i16) -> Option<State> {
        State::ALL.into_iter().find(|s| s.code() == code)
    }

    /// Upper-case name as in the contract.
    pub fn name(self) -> &'static str {
        match self {
            State::Open => "OPEN",
            State::Acknowledged => "ACKNOWLEDGED",
            State::InProgress => "IN_PROGRESS",
            State::WaitingOnCustomer => "WAITING_ON_CUSTOMER",
            State::Resolved => "RESOLVED",
            State::Verified => "VERIFIED",
            State::Reopened => "REOPENED",
        }
    }

    /// Whether the ticket still needs work (not resolved or verified).
    pub fn is_open(self) -> bool {
        !matches!(self, State::Resolved | State::Verified)
    }
}

/// What a legal move does to the SLA clocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockEffect {
    /// Nothing.
    None,
    /// Stop the first-response clock (met).
    MeetFirstResponse,
    /// Pause running clocks (if the policy allows).
    Pause,
    /// Resume paused clocks.
    Resume,
    /// Stop the resolution clock (met) and ask the customer to verify.
    MeetResolution,
    /// Run the resolution clock again.
    ReopenResolution,
}

/// The move's effect, or None if `from -> to` is illegal.
pub fn transition(from: State, to: State) -> Option<ClockEffect> {
    use State::*;
    Some(match (from, to) {
        (Open, Acknowledged) => ClockEffect::MeetFirstResponse,
        (Acknowledged, InProgress) | (Reopened, InProgress) => ClockEffect::None,
        (InProgress, WaitingOnCustomer) => ClockEffect::Pause,
        (WaitingOnCustomer, InProgress) => ClockEffect::Resume,
        (InProgress, Resolved) => ClockEffect::MeetResolution,
        (Resolved, Verified) => ClockEffect::None,
        (Resolved, Reopened) => ClockEffect::ReopenResolution,
        _ => return None,
    })
}

/// The states reachable from `from`, for error messages.
pub fn next_states(from: State) -> Vec<State> {
    State::ALL.into_iter().filter(|to| transition(from, *to).is_some()).collect()
}

/// A target of an SLA policy, in the calendar's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Counted seconds.
    Seconds(i64),
    /// Counted minutes.
    Minutes(i64),
    /// Counted hours.
    Hours(i64),
    /// Working days (each as long as the calendar's working day).
    BusinessDays(i64),
}

impl Target {
    /// In counted seconds on `cal`.
    pub fn seconds(self, cal: &Calendar, counting: Counting) -> i64 {
        match self {
            Target::Seconds(s) => s,
            Target::Minutes(m) => m * 60,
            Target::Hours(h) => h * 3600,
            Target::BusinessDays(d) => match counting {
                Counting::BusinessHours => d * cal.day_seconds(),
                Counting::Always => d * 86_400,
            },
        }
    }
}

/// An SLA policy (FBK-3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Category it applies to.
    pub category: Category,
    /// The urgent variant.
    pub urgent: bool,
    /// First-response target.
    pub first_response: Target,
    /// Resolution target, if any.
    pub resolution: Option<Target>,
    /// How its clocks count.
    pub counting: Counting,
    /// Whether waiting on the customer pauses the clocks.
    pub pausable: bool,
    /// Queue (department) tickets go to.
    pub queue: &'static str,
}

/// Queue of each category (routing, FBK-3).
pub fn queue_of(category: Category) -> &'static str {
    match category {
        Category::ServiceComplaint => "customer-care",
        Category::ProductSuggestion => "product",
        Category::FunctionInquiry => "support",
        Category::Other => "customer-care",
    }
}

/// The policy of a ticket (SPEC defaults): complaint first response 1 h and
/// resolution 6 h; product suggestion first response 3 days; inquiry and
/// other 24 h (one working day); all on the business calendar. Urgent:
/// first response 15 min, 24x7, resolution as the category's but 24x7,
/// never paused.
pub fn policy(category: Category, urgent: bool) -> Policy {
    let (first_response, resolution) = match category {
        Category::ServiceComplaint => (Target::Hours(1), Some(Target::Hours(6))),
        Category::ProductSuggestion => (Target::BusinessDays(3), None),
        Category::FunctionInquiry | Category::Other => (Target::BusinessDays(1), None),
    };
    if urgent {
        Policy {
            category,
            urgent,
            first_response: Target::Minutes(15),
            resolution,
            counting: Counting::Always,
            pausable: false,
            queue: queue_of(category),
        }
    } else {
        Policy {
            category,
            urgent,
            first_response,
            resolution,
            counting: Counting::BusinessHours,
            pausable: true,
            queue: queue_of(category),
        }
    }
}

/// The SLA policies in force: the SPEC defaults of [`policy`], with targets
/// overridden by configuration (`FEEDBACK_SLA_POLICIES`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policies(Vec<Policy>);

impl Default for Policies {
    fn default() -> Self {
        Policies(Category::ALL.into_iter().flat_map(|c| [policy(c, false), policy(c, true)]).collect())
    }
}

impl Policies {
    /// The policy of a ticket.
    pub fn of(&self, category: Category, urgent: bool) -> Policy {
        self.0
            .iter()
            .find(|p| p.category == category && p.urgent == urgent)
            .copied()
            .unwrap_or_else(|| policy(category, urgent))
    }

    /// Every policy, for ListSlaPolicies.
    pub fn all(&self) -> &[Policy] {
        &self.0
    }

    /// The defaults with overrides such as
    /// `complaint=1h/6h, suggestion=3d, inquiry=1d, other=1d, urgent=15m, complaint.urgent=10m/4h`:
    /// a category (or `urgent` for every urgent policy), then the first-response
    /// target and optionally `/` the resolution target; units `s`, `m`, `h`, and
    /// `d` (working days on the business calendar, days for urgent ones); a
    /// trailing `@24x7` counts every second instead of business hours.
    pub fn parse(spec: &str) -> Result<Policies, String> {
        let mut out = Policies::default();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (who, targets) =
                part.split_once('=').ok_or_else(|| format!("{part:?} is not <category>=<target>[/<target>]"))?;
            let (targets, around_the_clock) = match targets.trim().strip_suffix("@24x7") {
                Some(t) => (t, true),
                None => (targets, false),
            };
            let (first, resolution) = match targets.split_once('/') {
                Some((a, b)) => (parse_target(a)?, Some(parse_target(b)?)),
                None => (parse_target(targets)?, None),
            };
            let (name, urgent) = match who.trim() {
                "urgent" => ("", Some(true)),
                w => match w.strip_suffix(".urgent") {
                    Some(c) => (c, Some(true)),
                    None => (w, Some(false)),
                },
            };
            let category = if name.is_empty() {
                None
            } else {
                Some(
                    Category::from_key(name)
                        .ok_or_else(|| format!("{name:?} is not complaint, suggestion, inquiry or other"))?,
                )
            };
            for p in out.0.iter_mut() {
                if category.is_none_or(|c| c == p.category) && urgent.is_none_or(|u| u == p.urgent) {
                    p.first_response = first;
                    if resolution.is_some() {
                        p.resolution = resolution;
                    }
                    if around_the_clock {
                        p.counting = Counting::Always;
                    }
                }
            }
        }
        Ok(out)
    }
}

fn parse_target(s: &str) -> Result<Target, String> {
    let s = s.trim();
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = n.parse().map_err(|_| format!("{s:?} is not a duration such as 30s, 15m, 6h or 3d"))?;
    if n <= 0 {
        return Err(format!("{s:?}: a target must be positive"));
    }
    match unit {
        "s" => Ok(Target::Seconds(n)),
        "m" => Ok(Target::Minutes(n)),
        "h" => Ok(Target::Hours(n)),
        "d" => Ok(Target::BusinessDays(n)),
        _ => Err(format!("{s:?}: the unit must be s, m, h or d")),
    }
}

/// The clocks a policy runs and their targets in counted seconds.
pub fn clock_targets(p: &Policy, cal: &Calendar) -> Vec<(ClockKind, i64)> {
    let mut out = vec![(ClockKind::FirstResponse, p.first_response.seconds(cal, p.counting))];
    if let Some(r) = p.resolution {
        out.push((ClockKind::Resolution, r.seconds(cal, p.counting)));
    }
    out
}

/// Whether an item needs a ticket: everything but plain praise or thanks
/// (OTHER, not urgent, not negative), which is recorded without one.
pub fn needs_ticket(category: Category, urgent: bool, sentiment: f64) -> bool {
    urgent || category != Category::Other || sentiment < 0.0
}

/// The escalation chain after a breach (FBK-3): 1 notify the assignee and
/// queue, 2 reassign to the queue's supervisor, 3 notify the department head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Escalation {
    /// Level 1.
    Notify,
    /// Level 2.
    Reassign,
    /// Level 3.
    NotifyHead,
}

impl Escalation {
    /// The level after `level` (0 = none yet), if any.
    pub fn after(level: i16) -> Option<Escalation> {
        match level {
            0 => Some(Escalation::Notify),
            1 => Some(Escalation::Reassign),
            2 => Some(Escalation::NotifyHead),
            _ => None,
        }
    }

    /// Its level number.
    pub fn level(self) -> i16 {
        match self {
            Escalation::Notify => 1,
            Escalation::Reassign => 2,
            Escalation::NotifyHead => 3,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use State::*;

    #[test]
    fn the_legal_moves_are_exactly_those_of_the_contract() {
        let legal: Vec<(State, State)> = State::ALL
            .into_iter()
            .flat_map(|a| State::ALL.into_iter().map(move |b| (a, b)))
            .filter(|(a, b)| transition(*a, *b).is_some())
            .collect();
        assert_eq!(
            legal,
            [
                (Open, Acknowledged),
                (Acknowledged, InProgress),
                (InProgress, WaitingOnCustomer),
                (InProgress, Resolved),
                (WaitingOnCustomer, InProgress),
                (Resolved, Verified),
                (Resolved, Reopened),
                (Reopened, InProgress),
            ]
        );
    }

    #[test]
    fn skipping_steps_or_leaving_verified_is_illegal() {
        assert_eq!(transition(Open, Resolved), None);
        assert_eq!(transition(Verified, Reopened), None);
        assert_eq!(transition(Open, Open), None);
        assert_eq!(next_states(Resolved), [Verified, Reopened]);
    }

    #[test]
    fn default_policies_follow_the_spec() {
        let cal = Calendar::office(chrono_tz::Asia::Shanghai);
        let targets = |c, u| clock_targets(&policy(c, u), &cal);
        use ClockKind::*;
        assert_eq!(targets(Category::ServiceComplaint, false), [(FirstResponse, 3600), (Resolution, 21_600)]);
        assert_eq!(targets(Category::ProductSuggestion, false), [(FirstResponse, 3 * 9 * 3600)]);
        assert_eq!(targets(Category::FunctionInquiry, false), [(FirstResponse, 9 * 3600)]);
        assert_eq!(targets(Category::Other, false), [(FirstResponse, 9 * 3600)]);
        let urgent = policy(Category::ServiceComplaint, true);
        assert_eq!(clock_targets(&urgent, &cal), [(FirstResponse, 900), (Resolution, 21_600)]);
        assert_eq!(urgent.counting, Counting::Always);
        assert!(!urgent.pausable);
        assert_eq!(policy(Category::ProductSuggestion, false).queue, "product");
        assert_eq!(Policies::default().all().len(), 8);
    }

    #[test]
    fn policies_are_configurable_and_bad_ones_say_why() {
        let p = Policies::parse("complaint=30m/4h, urgent=5m, inquiry=2d").unwrap();
        let cal = Calendar::office(chrono_tz::Asia::Shanghai);
        use ClockKind::*;
        assert_eq!(
            clock_targets(&p.of(Category::ServiceComplaint, false), &cal),
            [(FirstResponse, 1800), (Resolution, 14_400)]
        );
        assert_eq!(clock_targets(&p.of(Category::FunctionInquiry, false), &cal), [(FirstResponse, 2 * 9 * 3600)]);
        assert_eq!(clock_targets(&p.of(Category::Other, true), &cal)[0], (FirstResponse, 300));
        assert_eq!(p.of(Category::ProductSuggestion, false), policy(Category::ProductSuggestion, false), "untouched");
        let s = Policies::parse("complaint.urgent=20s/90s").unwrap();
        assert_eq!(
            clock_targets(&s.of(Category::ServiceComplaint, true), &cal),
            [(FirstResponse, 20), (Resolution, 90)]
        );
        let always = Policies::parse("complaint=2h/8h@24x7").unwrap();
        assert_eq!(always.of(Category::ServiceComplaint, false).counting, Counting::Always);
        assert_eq!(p.of(Category::ServiceComplaint, false).counting, Counting::BusinessHours);
        assert_eq!(Policies::parse("").unwrap(), Policies::default());
        for bad in ["complaint", "gripe=1h", "complaint=1w", "complaint=0m", "complaint=h"] {
            assert!(Policies::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn praise_gets_no_ticket_but_everything_else_does() {
        assert!(!needs_ticket(Category::Other, false, 0.8));
        assert!(needs_ticket(Category::Other, false, -0.3));
        assert!(needs_ticket(Category::Other, true, 0.5));
        assert!(needs_ticket(Category::FunctionInquiry, false, 0.0));
    }

    #[test]
    fn the_escalation_chain_has_three_steps() {
        assert_eq!(Escalation::after(0), Some(Escalation::Notify));
        assert_eq!(Escalation::after(1), Some(Escalation::Reassign));
        assert_eq!(Escalation::after(2), Some(Escalation::NotifyHead));
        assert_eq!(Escalation::after(3), None);
    }
}
