//! The outreach service: who do we contact, how, when, at what cost
//! (SPEC 4.3). Where things are: handlers in [`api`], rules in [`domain`]
//! (the contact policy is [`domain::policy`]), the policy's enforcement point
//! in [`dispatch`], channel adapters in [`delivery`], campaign launches in
//! [`campaigns`], lifecycle triggers in [`triggers`], the read model of other services' events in [`read_model`],
//! background loops in [`jobs`].

pub mod api;
pub mod authority;
pub mod campaigns;
pub mod delivery;
pub mod directory;
pub mod dispatch;
pub mod domain;
pub mod jobs;
pub mod messages;
pub mod privacy;
pub mod read_model;
pub mod settings;
pub mod smtp;
pub mod tasks;
pub mod templates;
pub mod triggers;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono_tz::Tz;
use crm_kit::config::{ConfigError, Env, VarSpec, var};
use crm_kit::{AccessPolicy, Kit, KitError, Role, ServiceSpec};
use crm_proto::outreach::v1::outreach_service_server::OutreachServiceServer;
use tokio::sync::Notify;

/// Error domain and short name.
pub const SERVICE: &str = "outreach";
/// The gRPC service.
pub const GRPC_SERVICE: &str = "crm.outreach.v1.OutreachService";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Outreach's own variables (documented in docs/configuration.md).
pub const OUTREACH_VARS: &[VarSpec] = &[
    var(
        "OUTREACH_DEFAULT_TIMEZONE",
        "Asia/Shanghai",
        "IANA zone for customers without a valid one: quiet hours and local-day caps (OUT-5) are computed in it.",
    ),
    var("OUTREACH_BATCH", "1000", "Messages per dispatcher (policy) and delivery batch."),
    var("OUTREACH_POLL_MS", "200", "How often idle dispatch and delivery loops look for due messages."),
    var("OUTREACH_MAX_ATTEMPTS", "5", "Delivery attempts before a message is dead-lettered (OUT-1)."),
    var(
        "OUTREACH_RETRY_BACKOFF_MS",
        "5000",
        "First retry delay after a transient delivery failure; doubles per attempt, at most an hour.",
    ),
    var(
        "OUTREACH_DELIVERY_LEASE_MS",
        "60000",
        "How long a delivery batch owns its messages; after a crash another replica retries them with the same idempotency key.",
    ),
    var(
        "OUTREACH_WEBHOOK_URL",
        "",
        "http:// URL of the webhook adapter's endpoint; unset disables the webhook adapter.",
    ),
    VarSpec {
        name: "OUTREACH_WEBHOOK_SECRET",
        default: "",
        doc: "HMAC-SHA256 key of the webhook's X-CRM-Signature header; required with OUTREACH_WEBHOOK_URL.",
        secret: true,
    },
    var("OUTREACH_WEBHOOK_TIMEOUT_MS", "5000", "Timeout of one webhook call."),
    var(
        "OUTREACH_PROFILES_URL",
        "",
        "profiles' gRPC URL, for names and addresses at send time (audited unmasked reads); unset: generic greeting, no address.",
    ),
    var(
        "OUTREACH_FEEDBACK_URL",
        "",
        "feedback's gRPC URL, asked for open complaints right before a marketing message is handed over (REL-6); unset: complaints stop marketing once their events arrive.",
    ),
    var(
        "OUTREACH_CALL_TIMEOUT_MS",
        "2000",
        "Timeout of one call to profiles or feedback at hand-off or for masking; past it the messages wait for a retry.",
    ),
    var("OUTREACH_SMTP_RELAY", "", "host:port of the SMTP relay of the smtp adapter (e-mail); unset disables it."),
    var("OUTREACH_SMTP_FROM", "crm@localhost", "Sender address of e-mails."),
    var("OUTREACH_SMTP_TIMEOUT_MS", "10000", "Timeout of one SMTP session."),
];

/// What the kit needs to run outreach.
pub const SPEC: ServiceSpec = ServiceSpec {
    name: SERVICE,
    grpc_services: &[GRPC_SERVICE],
    default_port: 50053,
    migrator: &MIGRATOR,
    descriptors: crm_proto::FILE_DESCRIPTOR_SET,
    vars: OUTREACH_VARS,
    long_running: &[],
};

/// Outreach's settings.
#[derive(Debug, Clone)]
pub struct OutreachConfig {
    /// `OUTREACH_DEFAULT_TIMEZONE`.
    pub default_timezone: Tz,
    /// `OUTREACH_BATCH`.
    pub batch: i64,
    /// `OUTREACH_POLL_MS`.
    pub poll: Duration,
    /// `OUTREACH_MAX_ATTEMPTS`.
    pub max_attempts: i32,
    /// `OUTREACH_RETRY_BACKOFF_MS`.
    pub backoff: Duration,
    /// `OUTREACH_DELIVERY_LEASE_MS`.
    pub lease: Duration,
    /// `OUTREACH_WEBHOOK_URL` and `_SECRET`.
    pub webhook: Option<(http::Uri, Vec<u8>)>,
    /// `OUTREACH_WEBHOOK_TIMEOUT_MS`.
    pub webhook_timeout: Duration,
    /// `OUTREACH_PROFILES_URL`.
    pub profiles_url: Option<String>,
    /// `OUTREACH_FEEDBACK_URL`.
    pub feedback_url: Option<String>,
    /// `OUTREACH_CALL_TIMEOUT_MS`.
    pub call_timeout: Duration,
    /// `OUTREACH_SMTP_*`.
    pub smtp: Option<smtp::Smtp>,
}

impl OutreachConfig {
    /// Reads `OUTREACH_*` from `env`.
    pub fn load(env: &Env) -> Result<Self, ConfigError> {
        let tz_name = env.raw("OUTREACH_DEFAULT_TIMEZONE").unwrap_or_else(|| "Asia/Shanghai".into());
        let default_timezone: Tz = tz_name
            .parse()
            .map_err(|_| ConfigError::new("OUTREACH_DEFAULT_TIMEZONE", Some(&tz_name), "is not an IANA time zone"))?;
        let webhook = match env.raw("OUTREACH_WEBHOOK_URL").filter(|u| !u.is_empty()) {
            None => None,
            Some(url) => {
                let uri: http::Uri = url
                    .parse()
                    .ok()
                    .filter(|u: &http::Uri| u.scheme_str() == Some("http") && u.host().is_some())
                    .ok_or_else(|| ConfigError::new("OUTREACH_WEBHOOK_URL", Some(&url), "must be an http:// URL"))?;
                let secret = env.raw("OUTREACH_WEBHOOK_SECRET").filter(|s| s.len() >= 16).ok_or_else(|| {
                    ConfigError::new(
                        "OUTREACH_WEBHOOK_SECRET",
                        None,
                        "must be set (16+ bytes) when OUTREACH_WEBHOOK_URL is",
                    )
                })?;
                Some((uri, secret.into_bytes()))
            }
        };
        Ok(Self {
            default_timezone,
            batch: env.bounded("OUTREACH_BATCH", 1000, 1, 10_000)? as i64,
            poll: env.millis("OUTREACH_POLL_MS", 200)?,
            max_attempts: env.bounded("OUTREACH_MAX_ATTEMPTS", 5, 1, 50)? as i32,
            backoff: env.millis("OUTREACH_RETRY_BACKOFF_MS", 5000)?,
            lease: env.millis("OUTREACH_DELIVERY_LEASE_MS", 60_000)?,
            webhook,
            webhook_timeout: env.millis("OUTREACH_WEBHOOK_TIMEOUT_MS", 5000)?,
            profiles_url: match env.raw("OUTREACH_PROFILES_URL").filter(|u| !u.is_empty()) {
                None => None,
                Some(_) => Some(env.url("OUTREACH_PROFILES_URL", "", &["http", "https"])?),
            },
            feedback_url: match env.raw("OUTREACH_FEEDBACK_URL").filter(|u| !u.is_empty()) {
                None => None,
                Some(_) => Some(env.url("OUTREACH_FEEDBACK_URL", "", &["http", "https"])?),
            },
            call_timeout: env.millis("OUTREACH_CALL_TIMEOUT_MS", 2000)?,
            smtp: match env.raw("OUTREACH_SMTP_RELAY").filter(|r| !r.is_empty()) {
                None => None,
                Some(relay) => Some(smtp_config(env, relay)?),
            },
        })
    }
}

fn smtp_config(env: &Env, relay: String) -> Result<smtp::Smtp, ConfigError> {
    let port = relay.rsplit_once(':').filter(|(h, _)| !h.is_empty()).and_then(|(_, p)| p.parse::<u16>().ok());
    if port.is_none() {
        return Err(ConfigError::new("OUTREACH_SMTP_RELAY", Some(&relay), "must be host:port"));
    }
    let from = env.raw("OUTREACH_SMTP_FROM").unwrap_or_else(|| "crm@localhost".into());
    if !from.contains('@') || from.contains(['<', '>', ' ', '\r', '\n']) {
        return Err(ConfigError::new("OUTREACH_SMTP_FROM", Some(&from), "must be a plain e-mail address"));
    }
    Ok(smtp::Smtp { relay, from, timeout: env.millis("OUTREACH_SMTP_TIMEOUT_MS", 10_000)? })
}

/// Who may call what (SEC-1); the roles are also in the contract's comments.
pub fn access_policy() -> AccessPolicy {
    use Role::{Admin, Agent, Analyst, Service};
    const READ: &[Role] = &[Admin, Agent, Analyst];
    const DESIGN: &[Role] = &[Admin, Analyst];
    AccessPolicy::new().service(
        GRPC_SERVICE,
        &[
            ("ListChannels", &[Admin, Analyst, Service]),
            ("UpdateChannel", &[Admin]),
            ("CreateTemplate", DESIGN),
            ("GetTemplate", READ),
            ("ListTemplates", READ),
            ("UpdateTemplate", DESIGN),
            ("PreviewTemplate", READ),
            ("CreateCampaign", DESIGN),
            ("GetCampaign", READ),
            ("ListCampaigns", READ),
            ("UpdateCampaign", DESIGN),
            ("PreviewCampaign", DESIGN),
            ("TransitionCampaign", DESIGN),
            ("SendMessage", &[Admin, Agent, Service]),
            ("AcknowledgeFeedback", &[Service, Admin]),
            ("GetMessage", READ),
            ("ListMessages", READ),
            ("RetryMessage", &[Admin]),
            ("RecordOutcome", &[Admin, Service]),
            ("ListContactDecisions", READ),
            ("GetContactPolicy", &[Admin, Analyst, Service]),
            ("UpdateContactPolicy", &[Admin]),
            ("GetOffer", &[Admin, Agent, Service]),
            ("CreateTask", &[Admin, Agent, Service]),
            ("GetTask", &[Admin, Agent]),
            ("ListTasks", READ),
            ("UpdateTask", &[Admin, Agent]),
        ],
    )
}

/// The pieces of a running outreach replica.
pub struct Parts {
    /// The API.
    pub api: api::OutreachApi,
    /// The delivery worker.
    pub deliverer: delivery::Deliverer,
    /// Wakes the dispatcher.
    pub dispatch_wake: Arc<Notify>,
    /// Wakes the deliverer.
    pub deliver_wake: Arc<Notify>,
}

/// Builds the API and workers over the kit's pool.
pub fn build(kit: &Kit, config: &OutreachConfig) -> Parts {
    let mut adapters: HashMap<String, Arc<dyn delivery::Adapter>> = HashMap::new();
    adapters.insert("log".into(), Arc::new(delivery::Sink::new(kit.pg.clone())));
    if let Some((url, secret)) = &config.webhook {
        let webhook = delivery::Webhook::new(url.clone(), secret.clone(), config.webhook_timeout);
        adapters.insert("webhook".into(), Arc::new(webhook));
    }
    if let Some(smtp) = &config.smtp {
        adapters.insert("smtp".into(), Arc::new(smtp.clone()));
    }
    let directory: Option<Arc<dyn directory::Directory>> = config.profiles_url.as_deref().and_then(|url| {
        match directory::ProfilesDirectory::new(url, crm_kit::client::Outgoing::new(&kit.auth, SERVICE)) {
            Ok(d) => Some(Arc::new(d) as Arc<dyn directory::Directory>),
            Err(e) => {
                tracing::error!(error = %e, "OUTREACH_PROFILES_URL unusable: messages carry no names or addresses");
                None
            }
        }
    });
    let outgoing = || crm_kit::client::Outgoing::new(&kit.auth, SERVICE);
    let unusable = |var: &str, e: tonic::transport::Error| tracing::error!(error = %e, "{var} unusable");
    let consent: Option<Arc<dyn authority::ConsentSource>> = config.profiles_url.as_deref().and_then(|url| {
        authority::ProfilesConsent::new(url, outgoing(), config.call_timeout)
            .map(|c| Arc::new(c) as Arc<dyn authority::ConsentSource>)
            .map_err(|e| unusable("OUTREACH_PROFILES_URL", e))
            .ok()
    });
    let complaints: Option<Arc<dyn authority::ComplaintSource>> = config.feedback_url.as_deref().and_then(|url| {
        authority::FeedbackComplaints::new(url, outgoing(), config.call_timeout)
            .map(|c| Arc::new(c) as Arc<dyn authority::ComplaintSource>)
            .map_err(|e| unusable("OUTREACH_FEEDBACK_URL", e))
            .ok()
    });
    if consent.is_none() || complaints.is_none() {
        tracing::warn!(
            "OUTREACH_PROFILES_URL or OUTREACH_FEEDBACK_URL is not set: opt-outs and complaints stop messages only once their events arrive (REL-6 needs both)"
        );
    }
    let configured: Vec<String> = adapters.keys().cloned().collect();
    let deliverer = delivery::Deliverer {
        pool: kit.pg.clone(),
        adapters,
        lease: config.lease,
        max_attempts: config.max_attempts,
        backoff: config.backoff,
        directory,
        consent,
        complaints,
    };
    let deliver_wake = Arc::new(Notify::new());
    let dispatch_wake = Arc::new(Notify::new());
    let masker: Option<Arc<dyn crm_kit::privacy::TextMasker>> = config.profiles_url.as_deref().and_then(|url| {
        let outgoing = crm_kit::client::Outgoing::new(&kit.auth, SERVICE);
        crm_kit::privacy::ProfilesMasker::new(url, outgoing, config.call_timeout)
            .map(|m| Arc::new(m) as Arc<dyn crm_kit::privacy::TextMasker>)
            .map_err(|e| tracing::error!(error = %e, "OUTREACH_PROFILES_URL unusable: task notes are withheld from callers without pii:read"))
            .ok()
    });
    let api = api::OutreachApi::new(kit.pg.clone(), config.default_timezone, deliver_wake.clone(), configured)
        .with_masker(masker);
    Parts { api, deliverer, dispatch_wake, deliver_wake }
}

/// Starts the background loops of one replica.
pub fn spawn_workers(kit: &mut Kit, config: &OutreachConfig, parts: &Parts) {
    let pace = jobs::Pace { batch: config.batch, idle: config.poll };
    let signal = kit.shutdown_signal();
    kit.spawn(jobs::dispatcher(
        kit.pg.clone(),
        config.default_timezone,
        pace,
        parts.deliverer.clone(),
        parts.dispatch_wake.clone(),
        signal.clone(),
    ));
    kit.spawn(jobs::deliverer(parts.deliverer.clone(), pace, parts.deliver_wake.clone(), signal.clone()));
    kit.spawn(jobs::clocks(
        kit.pg.clone(),
        config.default_timezone,
        parts.dispatch_wake.clone(),
        Duration::from_secs(1),
        signal,
    ));
}

/// Wires and serves outreach: the read-model consumer, the outbox relay,
/// the dispatch/delivery/clock loops and the API.
pub async fn run(mut kit: Kit) -> Result<(), KitError> {
    let config = OutreachConfig::load(&Env::process())?;
    templates::seed(&kit.pg).await.map_err(|e| KitError::Wiring(format!("cannot seed system templates: {e}")))?;
    kit.spawn_outbox_relay();
    kit.spawn_consumer(&["profiles", "segmentation", "feedback"], read_model::ReadModel)?;
    let parts = build(&kit, &config);
    spawn_workers(&mut kit, &config, &parts);
    let routes = tonic::service::Routes::new(
        OutreachServiceServer::new(parts.api).max_decoding_message_size(kit.config.max_message_bytes),
    );
    kit.serve(routes, access_policy()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outreach_variable_is_documented() {
        let doc = include_str!("../../../docs/configuration.md");
        for v in OUTREACH_VARS {
            assert!(doc.contains(&format!("`{}`", v.name)), "docs/configuration.md does not document {}", v.name);
        }
    }

    #[test]
    fn bad_settings_fail_naming_the_variable() {
        let load = |pairs: &[(&str, &str)]| OutreachConfig::load(&Env::from_pairs(pairs.iter().copied()));
        assert!(load(&[]).is_ok());
        let err = load(&[("OUTREACH_DEFAULT_TIMEZONE", "Mars/Base")]).unwrap_err();
        assert!(err.to_string().contains("OUTREACH_DEFAULT_TIMEZONE"), "{err}");
        let err = load(&[("OUTREACH_WEBHOOK_URL", "ftp://x")]).unwrap_err();
        assert!(err.to_string().contains("OUTREACH_WEBHOOK_URL"), "{err}");
        let err = load(&[("OUTREACH_WEBHOOK_URL", "http://hooks.local/crm")]).unwrap_err();
        assert!(err.to_string().contains("OUTREACH_WEBHOOK_SECRET"), "{err}");
        assert!(
            load(&[
                ("OUTREACH_WEBHOOK_URL", "http://hooks.local/crm"),
                ("OUTREACH_WEBHOOK_SECRET", "0123456789abcdef")
            ])
            .is_ok()
        );
    }

    #[test]
    fn every_rpc_declares_its_roles() {
        let undeclared = access_policy().undeclared(crm_proto::FILE_DESCRIPTOR_SET, &[GRPC_SERVICE]).unwrap();
        assert!(undeclared.is_empty(), "{undeclared:?}");
    }
}
