//! OUT-7: agent tasks ("service execution tracking"): legal status moves and
//! overdue escalation.

use chrono::{DateTime, Duration, Utc};
use crm_proto::outreach::v1::TaskStatus;

/// Hours between escalation levels of an overdue task.
pub const ESCALATION_STEP_HOURS: i64 = 24;

/// Whether an agent may move a task from `from` to `to`. OVERDUE is set by the
/// watcher only; DONE and NOT_EXECUTED are final.
pub fn can_move(from: TaskStatus, to: TaskStatus) -> bool {
    use TaskStatus::*;
    matches!(
        (from, to),
        (Planned, InProgress | Done | NotExecuted)
            | (InProgress, Done | NotExecuted)
            | (Overdue, InProgress | Done | NotExecuted)
    )
}

/// Whether the status is final.
pub fn is_final(status: TaskStatus) -> bool {
    matches!(status, TaskStatus::Done | TaskStatus::NotExecuted)
}

/// Escalation level of an open task at `now`: 0 before its due time, 1 when
/// due, one more for every further [`ESCALATION_STEP_HOURS`].
pub fn escalation_level(due: DateTime<Utc>, now: DateTime<Utc>) -> i32 {
    if now < due {
        return 0;
    }
    1 + ((now - due).num_seconds() / Duration::hours(ESCALATION_STEP_HOURS).num_seconds()) as i32
}

#[cfg(test)]
mod tests {
    use super::*;
    use TaskStatus::*;

    #[test]
    fn agents_move_tasks_forward_only() {
        assert!(can_move(Planned, InProgress));
        assert!(can_move(Overdue, Done));
        assert!(!can_move(Done, InProgress));
        assert!(!can_move(NotExecuted, Planned));
        assert!(!can_move(Planned, Overdue));
        assert!(!can_move(InProgress, Planned));
    }

    #[test]
    fn overdue_tasks_escalate_a_level_a_day() {
        let due = DateTime::from_timestamp(1_000_000, 0).unwrap();
        assert_eq!(escalation_level(due, due - Duration::seconds(1)), 0);
        assert_eq!(escalation_level(due, due), 1);
        assert_eq!(escalation_level(due, due + Duration::hours(23)), 1);
        assert_eq!(escalation_level(due, due + Duration::hours(24)), 2);
        assert_eq!(escalation_level(due, due + Duration::hours(72)), 4);
    }
}
