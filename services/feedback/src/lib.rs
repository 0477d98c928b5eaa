//! The feedback service: what did customers tell us, and did we close the
//! loop (SPEC 4.4). Where things are: handlers in [`api`]; rules in
//! [`domain`] (classification [`domain::classify`], SLA clocks
//! [`domain::sla`], ticket states and policies [`domain::ticket`]); intake in
//! [`intake`]; tickets in storage in [`tickets`]; the closed loop with the
//! customer through outreach in [`closed_loop`]; the SLA watcher in [`jobs`];
//! what it takes from profiles' events in [`read_model`].

pub mod api;
pub mod clock;
pub mod closed_loop;
pub mod desk;
pub mod domain;
pub mod evaluation;
pub mod intake;
pub mod jobs;
pub mod partners;
pub mod privacy;
pub mod read_model;
pub mod tickets;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use crm_kit::client::Outgoing;
use crm_kit::config::{ConfigError, Env, VarSpec, var};
use crm_kit::{AccessPolicy, Kit, KitError, Role, ServiceSpec};
use crm_proto::feedback::v1::feedback_service_server::FeedbackServiceServer;

use crate::clock::{Clock, SystemClock};
use crate::desk::{Desk, FeedbackMetrics, Settings};
use crate::domain::classify::Classifier;
use crate::domain::sla::Calendar;
use crate::domain::ticket::Policies;
use crate::partners::{Outreach, OutreachClient, Profiles, ProfilesClient};

/// Error domain and short name.
pub const SERVICE: &str = "feedback";
/// The gRPC service.
pub const GRPC_SERVICE: &str = "crm.feedback.v1.FeedbackService";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Feedback's own variables (documented in docs/configuration.md).
pub const FEEDBACK_VARS: &[VarSpec] = &[
    var(
        "FEEDBACK_PROFILES_URL",
        "",
        "profiles' gRPC URL, to check the customer of every item (FBK-1); unset: customers are not checked.",
    ),
    var(
        "FEEDBACK_OUTREACH_URL",
        "",
        "outreach's gRPC URL, for acknowledgements and resolution checks (closed loop); unset: none are sent.",
    ),
    var("FEEDBACK_CALL_TIMEOUT_MS", "1000", "Timeout of one call to profiles or outreach."),
    var(
        "FEEDBACK_CALENDAR_TIMEZONE",
        "Asia/Shanghai",
        "IANA zone of the business calendar SLA clocks count in (FBK-3).",
    ),
    var("FEEDBACK_WORKDAYS", "Mon-Fri", "Working weekdays, e.g. `Mon-Fri` or `Mon-Sat` or `Mon,Wed,Fri`."),
    var("FEEDBACK_BUSINESS_HOURS", "09:00-18:00", "Working hours of a working day, local time."),
    var("FEEDBACK_HOLIDAYS", "", "Days off that fall on working weekdays, comma-separated `YYYY-MM-DD`."),
    var(
        "FEEDBACK_EXTRA_WORKDAYS",
        "",
        "Working days that are not working weekdays (e.g. make-up Saturdays), comma-separated `YYYY-MM-DD`.",
    ),
    var(
        "FEEDBACK_SLA_POLICIES",
        "",
        "SLA targets overriding the SPEC defaults, e.g. `complaint=1h/6h,suggestion=3d,inquiry=1d,other=1d,urgent=15m`.",
    ),
    var("FEEDBACK_ESCALATION_STEP_MINUTES", "30", "Time between escalation steps after an SLA breach."),
    var("FEEDBACK_REPEAT_WINDOW_DAYS", "30", "Window of repeat detection (FBK-4)."),
    var("FEEDBACK_WATCH_INTERVAL_MS", "1000", "How often the SLA watcher and the closed-loop worker run."),
];

/// What the kit needs to run feedback.
pub const SPEC: ServiceSpec = ServiceSpec {
    name: SERVICE,
    grpc_services: &[GRPC_SERVICE],
    default_port: 50054,
    migrator: &MIGRATOR,
    descriptors: crm_proto::FILE_DESCRIPTOR_SET,
    vars: FEEDBACK_VARS,
    long_running: &[],
};

/// Feedback's settings.
#[derive(Debug, Clone)]
pub struct FeedbackConfig {
    /// `FEEDBACK_PROFILES_URL`.
    pub profiles_url: Option<String>,
    /// `FEEDBACK_OUTREACH_URL`.
    pub outreach_url: Option<String>,
    /// `FEEDBACK_CALL_TIMEOUT_MS`.
    pub call_timeout: Duration,
    /// The business calendar (`FEEDBACK_CALENDAR_TIMEZONE`, `_WORKDAYS`, `_BUSINESS_HOURS`, `_HOLIDAYS`, `_EXTRA_WORKDAYS`).
    pub calendar: Calendar,
    /// `FEEDBACK_ESCALATION_STEP_MINUTES`, `FEEDBACK_REPEAT_WINDOW_DAYS`.
    pub settings: Settings,
    /// `FEEDBACK_WATCH_INTERVAL_MS`.
    pub watch_interval: Duration,
    /// `FEEDBACK_SLA_POLICIES`.
    pub policies: Policies,
}

impl FeedbackConfig {
    /// Reads `FEEDBACK_*` from `env`.
    pub fn load(env: &Env) -> Result<Self, ConfigError> {
        let raw = |name: &str, default: &str| env.raw(name).unwrap_or_else(|| default.to_string());
        let tz_name = raw("FEEDBACK_CALENDAR_TIMEZONE", "Asia/Shanghai");
        let tz = tz_name
            .parse()
            .map_err(|_| ConfigError::new("FEEDBACK_CALENDAR_TIMEZONE", Some(&tz_name), "is not an IANA time zone"))?;
        let mut calendar = Calendar::office(tz);
        let days = raw("FEEDBACK_WORKDAYS", "Mon-Fri");
        calendar.workdays =
            Calendar::parse_workdays(&days).map_err(|e| ConfigError::new("FEEDBACK_WORKDAYS", Some(&days), e))?;
        let hours = raw("FEEDBACK_BUSINESS_HOURS", "09:00-18:00");
        (calendar.open, calendar.close) =
            Calendar::parse_hours(&hours).map_err(|e| ConfigError::new("FEEDBACK_BUSINESS_HOURS", Some(&hours), e))?;
        let holidays = raw("FEEDBACK_HOLIDAYS", "");
        calendar.holidays =
            Calendar::parse_dates(&holidays).map_err(|e| ConfigError::new("FEEDBACK_HOLIDAYS", Some(&holidays), e))?;
        let extra = raw("FEEDBACK_EXTRA_WORKDAYS", "");
        calendar.extra_workdays =
            Calendar::parse_dates(&extra).map_err(|e| ConfigError::new("FEEDBACK_EXTRA_WORKDAYS", Some(&extra), e))?;
        let url = |name: &'static str| -> Result<Option<String>, ConfigError> {
            match env.raw(name).filter(|u| !u.is_empty()) {
                None => Ok(None),
                Some(_) => Ok(Some(env.url(name, "", &["http", "https"])?)),
            }
        };
        let sla = raw("FEEDBACK_SLA_POLICIES", "");
        let policies = Policies::parse(&sla).map_err(|e| ConfigError::new("FEEDBACK_SLA_POLICIES", Some(&sla), e))?;
        Ok(Self {
            policies,
            profiles_url: url("FEEDBACK_PROFILES_URL")?,
            outreach_url: url("FEEDBACK_OUTREACH_URL")?,
            call_timeout: env.millis("FEEDBACK_CALL_TIMEOUT_MS", 1000)?,
            calendar,
            settings: Settings {
                repeat_window_days: env.bounded("FEEDBACK_REPEAT_WINDOW_DAYS", 30, 1, 365)? as i64,
                escalation_step: chrono::Duration::minutes(env.bounded(
                    "FEEDBACK_ESCALATION_STEP_MINUTES",
                    30,
                    1,
                    7 * 24 * 60,
                )? as i64),
                ..Settings::default()
            },
            watch_interval: env.millis("FEEDBACK_WATCH_INTERVAL_MS", 1000)?,
        })
    }
}

/// Who may call what (SEC-1); the roles are also in the contract's comments.
pub fn access_policy() -> AccessPolicy {
    use Role::{Admin, Agent, Analyst, Service};
    const READ: &[Role] = &[Admin, Agent, Analyst];
    const WORK: &[Role] = &[Admin, Agent];
    AccessPolicy::new().service(
        GRPC_SERVICE,
        &[
            ("SubmitFeedback", &[Admin, Agent, Service]),
            ("GetFeedback", READ),
            ("ListFeedback", READ),
            ("ReclassifyFeedback", WORK),
            ("ClassifyText", READ),
            ("GetTicket", READ),
            ("ListTickets", READ),
            ("AssignTicket", WORK),
            ("TransitionTicket", WORK),
            ("RecordVerification", &[Admin, Agent, Service]),
            ("SubmitSurveyResponse", &[Admin, Agent, Service]),
            ("CreateImprovementAction", WORK),
            ("UpdateImprovementAction", WORK),
            ("ListImprovementActions", READ),
            ("ListSlaPolicies", READ),
            ("GetClassificationStats", &[Admin, Analyst]),
            ("CheckOpenComplaints", &[Admin, Service]),
        ],
    )
}

/// The classifier, built once per process (jieba's dictionary takes a few
/// hundred milliseconds to load).
pub fn classifier() -> Result<Arc<Classifier>, KitError> {
    static CLASSIFIER: std::sync::OnceLock<Arc<Classifier>> = std::sync::OnceLock::new();
    if let Some(c) = CLASSIFIER.get() {
        return Ok(c.clone());
    }
    let c = Arc::new(Classifier::shipped().map_err(|e| KitError::Wiring(format!("shipped lexicon: {e}")))?);
    Ok(CLASSIFIER.get_or_init(|| c).clone())
}

/// The desk of a replica over the kit's pool, with the partners configured.
pub fn desk(kit: &Kit, config: &FeedbackConfig, clock: Arc<dyn Clock>) -> Result<Desk, KitError> {
    let outgoing = Outgoing::new(&kit.auth, SERVICE);
    let wiring = |name: &str, e: tonic::transport::Error| KitError::Wiring(format!("{name}: {e}"));
    let masker: Option<Arc<dyn crm_kit::privacy::TextMasker>> = match &config.profiles_url {
        Some(url) => Some(Arc::new(
            crm_kit::privacy::ProfilesMasker::new(url, outgoing.clone(), config.call_timeout)
                .map_err(|e| wiring("FEEDBACK_PROFILES_URL", e))?,
        )),
        None => None,
    };
    let profiles: Option<Arc<dyn Profiles>> = match &config.profiles_url {
        Some(url) => Some(Arc::new(
            ProfilesClient::new(url, outgoing.clone(), config.call_timeout)
                .map_err(|e| wiring("FEEDBACK_PROFILES_URL", e))?,
        )),
        None => None,
    };
    let outreach: Option<Arc<dyn Outreach>> = match &config.outreach_url {
        Some(url) => Some(Arc::new(
            OutreachClient::new(url, outgoing, config.call_timeout).map_err(|e| wiring("FEEDBACK_OUTREACH_URL", e))?,
        )),
        None => None,
    };
    if profiles.is_none() {
        tracing::warn!(
            "FEEDBACK_PROFILES_URL is not set: customers of feedback are not checked, and callers without pii:read see free text withheld"
        );
    }
    let metrics = FeedbackMetrics::default();
    metrics.register(&kit.metrics);
    Ok(Desk {
        pool: kit.pg.clone(),
        classifier: classifier()?,
        calendar: Arc::new(config.calendar.clone()),
        policies: Arc::new(config.policies.clone()),
        clock,
        profiles,
        outreach,
        masker,
        settings: config.settings.clone(),
        metrics,
        calls_in_flight: Arc::new(tokio::sync::Semaphore::new(desk::MAX_CALLS_IN_FLIGHT)),
    })
}

/// Starts the background work of a replica: the profiles-events consumer,
/// the outbox relay, the SLA watcher and the closed-loop worker.
pub fn spawn_workers(kit: &mut Kit, desk: &Desk, config: &FeedbackConfig) -> Result<(), KitError> {
    kit.spawn_outbox_relay();
    kit.spawn_consumer(&["profiles"], read_model::ProfilesEvents)?;
    let signal = kit.shutdown_signal();
    kit.spawn(jobs::run(desk.clone(), config.watch_interval, signal));
    Ok(())
}

/// Wires and serves feedback.
pub async fn run(mut kit: Kit) -> Result<(), KitError> {
    let config = FeedbackConfig::load(&Env::process())?;
    let desk = desk(&kit, &config, Arc::new(SystemClock))?;
    spawn_workers(&mut kit, &desk, &config)?;
    let routes = tonic::service::Routes::new(
        FeedbackServiceServer::new(api::FeedbackApi::new(desk)).max_decoding_message_size(kit.config.max_message_bytes),
    );
    kit.serve(routes, access_policy()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_feedback_variable_is_documented() {
        let doc = include_str!("../../../docs/configuration.md");
        for v in FEEDBACK_VARS {
            assert!(doc.contains(&format!("`{}`", v.name)), "docs/configuration.md does not document {}", v.name);
        }
    }

    #[test]
    fn bad_settings_fail_naming_the_variable() {
        let load = |pairs: &[(&str, &str)]| FeedbackConfig::load(&Env::from_pairs(pairs.iter().copied()));
        let ok = load(&[]).expect("defaults load");
        assert_eq!(ok.calendar.day_seconds(), 9 * 3600);
        for (name, value) in [
            ("FEEDBACK_CALENDAR_TIMEZONE", "Mars/Olympus"),
            ("FEEDBACK_WORKDAYS", "Funday"),
            ("FEEDBACK_BUSINESS_HOURS", "18:00-09:00"),
            ("FEEDBACK_HOLIDAYS", "2026-02-30"),
            ("FEEDBACK_EXTRA_WORKDAYS", "tomorrow"),
            ("FEEDBACK_PROFILES_URL", "ftp://profiles"),
            ("FEEDBACK_ESCALATION_STEP_MINUTES", "0"),
            ("FEEDBACK_SLA_POLICIES", "complaint=1 week"),
        ] {
            let err = load(&[(name, value)]).unwrap_err();
            assert!(err.to_string().contains(name), "{name}: {err}");
        }
        let cal = load(&[("FEEDBACK_HOLIDAYS", "2026-10-01,2026-10-02"), ("FEEDBACK_WORKDAYS", "Mon-Sat")]).unwrap();
        assert_eq!(cal.calendar.holidays.len(), 2);
        assert!(cal.calendar.workdays[5]);
    }

    #[test]
    fn every_rpc_declares_its_roles() {
        let undeclared = access_policy().undeclared(crm_proto::FILE_DESCRIPTOR_SET, &[GRPC_SERVICE]).unwrap();
        assert!(undeclared.is_empty(), "{undeclared:?}");
    }
}
