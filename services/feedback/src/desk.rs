//! The feedback desk: what the handlers and the background workers of one
//! replica share (pool, classifier, calendar, clock, partners, settings).

use std::sync::Arc;

use chrono::Duration;
use prometheus_client::metrics::counter::Counter;
use sqlx::PgPool;

use crate::clock::Clock;
use crate::domain::classify::Classifier;
use crate::domain::sla::Calendar;
use crate::domain::ticket::Policies;
use crate::partners::{Outreach, Profiles};

/// Tunables of the desk (from `FEEDBACK_*`).
#[derive(Debug, Clone)]
pub struct Settings {
    /// FBK-4 repeat window.
    pub repeat_window_days: i64,
    /// Time between escalation steps.
    pub escalation_step: Duration,
    /// How long a closed-loop call is leased to the replica making it.
    pub call_lease: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { repeat_window_days: 30, escalation_step: Duration::minutes(30), call_lease: Duration::seconds(30) }
    }
}

/// Feedback's own metrics.
#[derive(Debug, Clone, Default)]
pub struct FeedbackMetrics {
    /// SLA breaches recorded.
    pub breaches: Counter,
    /// Escalation steps taken.
    pub escalations: Counter,
    /// Closed-loop calls that failed and will be retried.
    pub loop_retries: Counter,
}

impl FeedbackMetrics {
    /// Registers them with the service's registry.
    pub fn register(&self, m: &crm_kit::metrics::Metrics) {
        m.register("feedback_sla_breaches", "SLA breaches recorded (FBK-3)", self.breaches.clone());
        m.register("feedback_escalations", "Escalation steps taken after SLA breaches", self.escalations.clone());
        m.register(
            "feedback_loop_retries",
            "Calls to outreach that failed and wait for a retry",
            self.loop_retries.clone(),
        );
    }
}

/// Everything a replica's handlers and workers share.
#[derive(Clone)]
pub struct Desk {
    /// PostgreSQL (feedback's schema).
    pub pool: PgPool,
    /// FBK-2 classifier.
    pub classifier: Arc<Classifier>,
    /// FBK-3 business calendar.
    pub calendar: Arc<Calendar>,
    /// FBK-3 SLA policies.
    pub policies: Arc<Policies>,
    /// Time source.
    pub clock: Arc<dyn Clock>,
    /// profiles (None: customers are not checked).
    pub profiles: Option<Arc<dyn Profiles>>,
    /// outreach (None: no acknowledgements are sent).
    pub outreach: Option<Arc<dyn Outreach>>,
    /// Masks free text for callers without `pii:read` (profiles' MaskFreeText;
    /// None: such callers see it withheld), SEC-4.
    pub masker: Option<Arc<dyn crm_kit::privacy::TextMasker>>,
    /// Tunables.
    pub settings: Settings,
    /// Metrics.
    pub metrics: FeedbackMetrics,
    /// Closed-loop calls made at once after a commit, at most this many at a
    /// time: when outreach is slow the rest wait for the worker instead of
    /// taking intake's database connections.
    pub calls_in_flight: Arc<tokio::sync::Semaphore>,
}

/// Closed-loop calls a replica makes at once, at most.
pub const MAX_CALLS_IN_FLIGHT: usize = 16;

impl std::fmt::Debug for Desk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Desk")
            .field("calendar", &self.calendar)
            .field("profiles", &self.profiles.is_some())
            .field("outreach", &self.outreach.is_some())
            .finish()
    }
}
