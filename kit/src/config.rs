//! Configuration from environment variables (OPS-3, 12-factor).
//!
//! Every variable the kit reads is declared once in [`KIT_VARS`] with its
//! default and meaning; `docs/configuration.md` is checked against that list
//! by a test, so the documentation cannot drift. A bad value fails start-up
//! with a [`ConfigError`] naming the variable.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// A declared environment variable.
#[derive(Debug, Clone, Copy)]
pub struct VarSpec {
    /// Variable name.
    pub name: &'static str,
    /// Default when unset, as text ("" means no default: unset is allowed and means "off").
    pub default: &'static str,
    /// What it means.
    pub doc: &'static str,
    /// Secret values are never echoed in errors or logs.
    pub secret: bool,
}

/// Declares a variable (for services' own lists).
pub const fn var(name: &'static str, default: &'static str, doc: &'static str) -> VarSpec {
    VarSpec { name, default, doc, secret: false }
}

/// Variables read by every service through the kit.
pub const KIT_VARS: &[VarSpec] = &[
    var(
        "GRPC_LISTEN_ADDR",
        "0.0.0.0:<service port>",
        "Address the gRPC server listens on. Service ports: profiles 50051, segmentation 50052, outreach 50053, feedback 50054, analytics 50055.",
    ),
    var(
        "METRICS_LISTEN_ADDR",
        "0.0.0.0:<service port + 1000>",
        "Address of the Prometheus metrics endpoint (`GET /metrics`); `off` disables it.",
    ),
    var("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/crm", "PostgreSQL connection URL."),
    var(
        "DATABASE_SCHEMA",
        "<service name>",
        "PostgreSQL schema owned by this service; created if missing. Each service has its own (SPEC 2).",
    ),
    var("DATABASE_MAX_CONNECTIONS", "10", "Maximum PostgreSQL connections in the pool of one replica."),
    var(
        "DATABASE_ACQUIRE_TIMEOUT_MS",
        "2000",
        "How long a request waits for a PostgreSQL connection before failing with UNAVAILABLE.",
    ),
    var(
        "DATABASE_STATEMENT_TIMEOUT_MS",
        "10000",
        "PostgreSQL `statement_timeout` of the service's sessions; 0 disables.",
    ),
    var(
        "MIGRATE_ON_START",
        "true",
        "Apply pending migrations when the server starts. Set false when a `migrate` Job runs them (Kubernetes).",
    ),
    var(
        "REDIS_URL",
        "redis://127.0.0.1:6379",
        "Redis URL of both roles, the cache and the event streams, unless REDIS_CACHE_URL or REDIS_STREAMS_URL say otherwise.",
    ),
    var(
        "REDIS_CACHE_URL",
        "<REDIS_URL>",
        "Redis of the cache role (hot profiles): may evict (allkeys-lru) and keep nothing on disk.",
    ),
    var(
        "REDIS_STREAMS_URL",
        "<REDIS_URL>",
        "Redis of the event streams: must not evict (a service refuses to start on an allkeys-* policy) and should persist (AOF); see docs/operations.md.",
    ),
    var("REDIS_TIMEOUT_MS", "250", "Per-command Redis timeout; past it the caller falls back or retries (REL-2)."),
    var("LOG_FORMAT", "text", "`text` for humans or `json` for log shippers; both carry trace_id and span_id."),
    var("RUST_LOG", "info", "Log filter in `tracing_subscriber::EnvFilter` syntax, e.g. `info,crm_kit=debug`."),
    var(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "",
        "OTLP/gRPC collector endpoint, e.g. `http://otel-collector:4317`. Unset: spans are not exported (ids still propagate).",
    ),
    var("OTEL_SERVICE_NAME", "crm-<service name>", "Service name reported in traces."),
    var(
        "OTEL_TRACES_SAMPLER_ARG",
        "1.0",
        "Share of new traces sampled, 0.0..1.0 (parent-based: a sampled caller's decision is kept).",
    ),
    var(
        "AUTH_MODE",
        "jwt",
        "`jwt` validates bearer tokens on every RPC; `disabled` turns authentication off for local development (logged loudly, SEC-1).",
    ),
    VarSpec {
        name: "JWT_SECRET",
        default: "",
        doc: "HS256 shared secret (at least 32 bytes). One of JWT_SECRET, JWT_SECRET_FILE or JWT_PUBLIC_KEY_FILE is required in `jwt` mode.",
        secret: true,
    },
    var("JWT_SECRET_FILE", "", "File holding the HS256 secret (e.g. a mounted Kubernetes Secret)."),
    var(
        "JWT_PUBLIC_KEY_FILE",
        "",
        "PEM public key (RSA or EC) for RS256/ES256 tokens issued by an external identity provider.",
    ),
    var("JWT_ISSUER", "crm", "Required `iss` claim."),
    var("JWT_AUDIENCE", "crm", "Required `aud` claim."),
    var("JWT_LEEWAY_SECONDS", "30", "Clock skew tolerated on `exp` and `nbf`."),
    var(
        "SERVICE_TOKEN_FILE",
        "",
        "Bearer token this service presents to other services. Unset with an HS256 secret: the service mints its own short-lived `service` token.",
    ),
    var(
        "REQUEST_TIMEOUT_MS",
        "10000",
        "Server-side deadline of a request; a shorter client `grpc-timeout` wins. Past it: DEADLINE_EXCEEDED.",
    ),
    var(
        "MAX_CONCURRENT_REQUESTS",
        "512",
        "Requests handled at once by one replica; beyond it requests are shed at once with RESOURCE_EXHAUSTED (REL-4).",
    ),
    var(
        "MAX_MESSAGE_BYTES",
        "4194304",
        "Largest request message accepted (1024..67108864); a larger one is refused with RESOURCE_EXHAUSTED before it is read (REL-5).",
    ),
    var(
        "SHUTDOWN_DRAIN_DELAY_MS",
        "2000",
        "After SIGTERM: time health reports NOT_SERVING while still accepting, so load balancers stop routing here.",
    ),
    var(
        "SHUTDOWN_GRACE_SECONDS",
        "25",
        "After the drain delay: time in-flight requests get to finish before the process exits anyway.",
    ),
    var("HEALTH_CHECK_INTERVAL_MS", "2000", "How often PostgreSQL reachability is probed for the health status."),
    var("OUTBOX_POLL_INTERVAL_MS", "100", "How often the outbox relay looks for unpublished events when idle."),
    var("OUTBOX_BATCH_SIZE", "500", "Events published per relay transaction."),
    var(
        "OUTBOX_RETENTION_HOURS",
        "168",
        "How long published events stay in the outbox table (for audit and re-publishing).",
    ),
    var(
        "EVENT_STREAM_PREFIX",
        "crm",
        "Prefix of the event stream names (`<prefix>.<service>.events`); lets several environments share one Redis.",
    ),
    var("CONSUMER_BATCH_SIZE", "100", "Events read per consumer round."),
    var("CONSUMER_BLOCK_MS", "1000", "How long a consumer blocks waiting for new events."),
    var(
        "CONSUMER_CLAIM_IDLE_MS",
        "30000",
        "Events pending this long at another (crashed) consumer of the group are claimed.",
    ),
    var(
        "CONSUMER_NAME",
        "<hostname>-<pid>",
        "Name of this replica within its consumer groups; stable names resume their own pending events after a restart.",
    ),
    var(
        "IDEMPOTENCY_RETENTION_HOURS",
        "48",
        "How long a `request_id` and its first result are kept (SPEC 3: at least 24 h).",
    ),
    var(
        "INBOX_RETENTION_HOURS",
        "168",
        "How long consumers remember applied event ids; keep it longer than any event can be redelivered (REL-3).",
    ),
    var("RETENTION_INTERVAL_SECONDS", "600", "How often expired idempotency keys and inbox entries are purged."),
    var("TOKIO_WORKER_THREADS", "<CPUs available>", "Async worker threads; size it to the pod's CPU limit."),
];

/// A configuration value that could not be used. The message names the variable.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {var}{shown}: {reason}")]
pub struct ConfigError {
    /// The variable at fault.
    pub var: &'static str,
    shown: String,
    /// Why it was rejected.
    pub reason: String,
}

impl ConfigError {
    /// An error about `var`; the value is echoed unless the variable is secret.
    pub fn new(var: &'static str, value: Option<&str>, reason: impl Into<String>) -> Self {
        let secret = KIT_VARS.iter().any(|v| v.name == var && v.secret);
        let shown = match value {
            Some(_) if secret => " (value hidden)".to_string(),
            Some(v) => format!("={v:?}"),
            None => String::new(),
        };
        Self { var, shown, reason: reason.into() }
    }
}

/// A source of variables: the process environment, or a map in tests.
#[derive(Debug, Clone, Default)]
pub struct Env {
    overrides: Option<HashMap<String, String>>,
}

impl Env {
    /// Reads the process environment.
    pub fn process() -> Self {
        Self { overrides: None }
    }

    /// Reads only the given pairs (tests).
    pub fn from_pairs<K: Into<String>, V: Into<String>>(pairs: impl IntoIterator<Item = (K, V)>) -> Self {
        Self { overrides: Some(pairs.into_iter().map(|(k, v)| (k.into(), v.into())).collect()) }
    }

    /// The raw value of `name`; an empty value counts as unset.
    pub fn raw(&self, name: &str) -> Option<String> {
        let value = match &self.overrides {
            Some(map) => map.get(name).cloned(),
            None => std::env::var(name).ok(),
        };
        value.filter(|v| !v.trim().is_empty())
    }

    /// Parses `name` with `FromStr`, or returns `default` when unset.
    pub fn parse_or<T: FromStr>(&self, name: &'static str, default: T, expected: &str) -> Result<T, ConfigError> {
        match self.raw(name) {
            None => Ok(default),
            Some(v) => v.trim().parse().map_err(|_| ConfigError::new(name, Some(&v), format!("expected {expected}"))),
        }
    }

    /// A whole number of milliseconds.
    pub fn millis(&self, name: &'static str, default_ms: u64) -> Result<Duration, ConfigError> {
        self.parse_or(name, default_ms, "a whole number of milliseconds").map(Duration::from_millis)
    }

    /// A positive whole number in `[min, max]`.
    pub fn bounded(&self, name: &'static str, default: u64, min: u64, max: u64) -> Result<u64, ConfigError> {
        let v: u64 = self.parse_or(name, default, "a whole number")?;
        if v < min || v > max {
            return Err(ConfigError::new(name, Some(&v.to_string()), format!("must be between {min} and {max}")));
        }
        Ok(v)
    }

    /// `true`/`false` (also `1`/`0`, `yes`/`no`).
    pub fn flag(&self, name: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self.raw(name) {
            None => Ok(default),
            Some(v) => match v.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => Ok(true),
                "false" | "0" | "no" | "off" => Ok(false),
                _ => Err(ConfigError::new(name, Some(&v), "expected true or false")),
            },
        }
    }

    /// One of `choices` (case-insensitive), returned lower-cased.
    pub fn choice(&self, name: &'static str, default: &'static str, choices: &[&str]) -> Result<String, ConfigError> {
        let v = self.raw(name).unwrap_or_else(|| default.to_string()).trim().to_ascii_lowercase();
        if choices.contains(&v.as_str()) {
            Ok(v)
        } else {
            Err(ConfigError::new(name, Some(&v), format!("expected one of: {}", choices.join(", "))))
        }
    }

    /// A socket address like `0.0.0.0:50051`.
    pub fn addr(&self, name: &'static str, default: SocketAddr) -> Result<SocketAddr, ConfigError> {
        self.parse_or(name, default, "an address like 0.0.0.0:50051")
    }

    /// A URL with one of the given schemes.
    pub fn url(&self, name: &'static str, default: &str, schemes: &[&str]) -> Result<String, ConfigError> {
        let v = self.raw(name).unwrap_or_else(|| default.to_string());
        let scheme_ok = schemes.iter().any(|s| v.starts_with(&format!("{s}://")));
        if !scheme_ok {
            return Err(ConfigError::new(
                name,
                Some(&redact_url(&v)),
                format!("expected a URL starting with {}://", schemes.join(":// or ")),
            ));
        }
        Ok(v)
    }
}

/// Hides the password of a URL for messages and logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            match userinfo.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &userinfo[..c], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// How tokens are checked (SEC-1).
#[derive(Debug, Clone)]
pub enum AuthConfig {
    /// Authentication disabled (development only).
    Disabled,
    /// JWT bearer tokens.
    Jwt(JwtConfig),
}

/// JWT settings.
#[derive(Clone)]
pub struct JwtConfig {
    /// Verification key material.
    pub key: JwtKey,
    /// Required issuer.
    pub issuer: String,
    /// Required audience.
    pub audience: String,
    /// Tolerated clock skew in seconds.
    pub leeway_seconds: u64,
    /// Token presented to other services, if configured.
    pub service_token_file: Option<PathBuf>,
}

impl std::fmt::Debug for JwtConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtConfig")
            .field("key", &self.key)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

/// Key material for JWT verification.
#[derive(Clone)]
pub enum JwtKey {
    /// HS256 shared secret: verifies, and lets the service mint its own service token.
    Secret(Vec<u8>),
    /// PEM public key (RS256 or ES256): verifies only.
    PublicPem(Vec<u8>),
}

impl std::fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JwtKey::Secret(_) => f.write_str("Secret(***)"),
            JwtKey::PublicPem(_) => f.write_str("PublicPem"),
        }
    }
}

/// The kit's configuration of one service replica.
#[derive(Debug, Clone)]
pub struct KitConfig {
    /// Short service name, e.g. "profiles".
    pub service: String,
    /// gRPC listen address.
    pub grpc_addr: SocketAddr,
    /// Metrics listen address; `None` disables the endpoint.
    pub metrics_addr: Option<SocketAddr>,
    /// PostgreSQL URL.
    pub database_url: String,
    /// PostgreSQL schema of this service.
    pub database_schema: String,
    /// Pool size.
    pub database_max_connections: u32,
    /// Pool acquire timeout.
    pub database_acquire_timeout: Duration,
    /// Statement timeout (zero: none).
    pub database_statement_timeout: Duration,
    /// Run migrations at start.
    pub migrate_on_start: bool,
    /// Redis URL of the cache role.
    pub redis_url: String,
    /// Redis URL of the event streams.
    pub redis_streams_url: String,
    /// Redis per-command timeout.
    pub redis_timeout: Duration,
    /// "text" or "json".
    pub log_format: String,
    /// OTLP endpoint, if exporting.
    pub otlp_endpoint: Option<String>,
    /// Trace service name.
    pub otel_service_name: String,
    /// Sampling ratio for new traces.
    pub trace_sample_ratio: f64,
    /// Authentication.
    pub auth: AuthConfig,
    /// Server-side request deadline.
    pub request_timeout: Duration,
    /// Concurrent requests before shedding.
    pub max_concurrent_requests: usize,
    /// Largest request message accepted.
    pub max_message_bytes: usize,
    /// NOT_SERVING-but-accepting time after SIGTERM.
    pub shutdown_drain_delay: Duration,
    /// Time in-flight requests get to finish.
    pub shutdown_grace: Duration,
    /// PostgreSQL probe interval for health.
    pub health_check_interval: Duration,
    /// Relay idle poll interval.
    pub outbox_poll_interval: Duration,
    /// Relay batch size.
    pub outbox_batch_size: i64,
    /// Retention of published outbox rows.
    pub outbox_retention: Duration,
    /// Prefix of stream names.
    pub event_stream_prefix: String,
    /// Consumer read batch.
    pub consumer_batch_size: usize,
    /// Consumer block time.
    pub consumer_block: Duration,
    /// Idle time before claiming another consumer's pending events.
    pub consumer_claim_idle: Duration,
    /// Consumer name of this replica.
    pub consumer_name: String,
    /// Idempotency key retention.
    pub idempotency_retention: Duration,
    /// Inbox entry retention.
    pub inbox_retention: Duration,
    /// Period of the retention job.
    pub retention_interval: Duration,
    /// Tokio worker threads.
    pub worker_threads: usize,
}

impl KitConfig {
    /// Loads the configuration of `service` (whose gRPC port defaults to
    /// `default_port`) from `env`. The first bad variable is reported.
    pub fn load(service: &str, default_port: u16, env: &Env) -> Result<Self, ConfigError> {
        let grpc_default = SocketAddr::from(([0, 0, 0, 0], default_port));
        let metrics_addr = match env.raw("METRICS_LISTEN_ADDR") {
            Some(v) if v.trim().eq_ignore_ascii_case("off") => None,
            _ => Some(
                env.addr("METRICS_LISTEN_ADDR", SocketAddr::from(([0, 0, 0, 0], default_port.saturating_add(1000))))?,
            ),
        };
        let schema = env.raw("DATABASE_SCHEMA").unwrap_or_else(|| service.to_string());
        if !is_identifier(&schema) {
            return Err(ConfigError::new(
                "DATABASE_SCHEMA",
                Some(&schema),
                "expected a lower-case identifier ([a-z_][a-z0-9_]{0,62})",
            ));
        }
        let ratio: f64 = env.parse_or("OTEL_TRACES_SAMPLER_ARG", 1.0, "a number between 0.0 and 1.0")?;
        if !(0.0..=1.0).contains(&ratio) {
            return Err(ConfigError::new(
                "OTEL_TRACES_SAMPLER_ARG",
                Some(&ratio.to_string()),
                "must be between 0.0 and 1.0",
            ));
        }
        let otlp_endpoint = match env.raw("OTEL_EXPORTER_OTLP_ENDPOINT") {
            None => None,
            Some(_) => Some(env.url("OTEL_EXPORTER_OTLP_ENDPOINT", "", &["http", "https"])?),
        };
        let default_workers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        Ok(Self {
            service: service.to_string(),
            grpc_addr: env.addr("GRPC_LISTEN_ADDR", grpc_default)?,
            metrics_addr,
            database_url: env.url(
                "DATABASE_URL",
                "postgres://postgres@127.0.0.1:5432/crm",
                &["postgres", "postgresql"],
            )?,
            database_schema: schema,
            database_max_connections: env.bounded("DATABASE_MAX_CONNECTIONS", 10, 1, 1000)? as u32,
            database_acquire_timeout: env.millis("DATABASE_ACQUIRE_TIMEOUT_MS", 2000)?,
            database_statement_timeout: env.millis("DATABASE_STATEMENT_TIMEOUT_MS", 10_000)?,
            migrate_on_start: env.flag("MIGRATE_ON_START", true)?,
            redis_url: match env.raw("REDIS_CACHE_URL") {
                Some(_) => env.url("REDIS_CACHE_URL", "", &["redis", "rediss", "unix"])?,
                None => env.url("REDIS_URL", "redis://127.0.0.1:6379", &["redis", "rediss", "unix"])?,
            },
            redis_streams_url: match env.raw("REDIS_STREAMS_URL") {
                Some(_) => env.url("REDIS_STREAMS_URL", "", &["redis", "rediss", "unix"])?,
                None => env.url("REDIS_URL", "redis://127.0.0.1:6379", &["redis", "rediss", "unix"])?,
            },
            redis_timeout: env.millis("REDIS_TIMEOUT_MS", 250)?,
            log_format: env.choice("LOG_FORMAT", "text", &["text", "json"])?,
            otlp_endpoint,
            otel_service_name: env.raw("OTEL_SERVICE_NAME").unwrap_or_else(|| format!("crm-{service}")),
            trace_sample_ratio: ratio,
            auth: load_auth(env)?,
            request_timeout: env.millis("REQUEST_TIMEOUT_MS", 10_000)?,
            max_concurrent_requests: env.bounded("MAX_CONCURRENT_REQUESTS", 512, 1, 1_000_000)? as usize,
            max_message_bytes: env.bounded("MAX_MESSAGE_BYTES", 4 * 1024 * 1024, 1024, 64 * 1024 * 1024)? as usize,
            shutdown_drain_delay: env.millis("SHUTDOWN_DRAIN_DELAY_MS", 2000)?,
            shutdown_grace: Duration::from_secs(env.bounded("SHUTDOWN_GRACE_SECONDS", 25, 0, 3600)?),
            health_check_interval: env.millis("HEALTH_CHECK_INTERVAL_MS", 2000)?,
            outbox_poll_interval: env.millis("OUTBOX_POLL_INTERVAL_MS", 100)?,
            outbox_batch_size: env.bounded("OUTBOX_BATCH_SIZE", 500, 1, 10_000)? as i64,
            outbox_retention: Duration::from_secs(3600 * env.bounded("OUTBOX_RETENTION_HOURS", 168, 1, 24 * 365)?),
            event_stream_prefix: {
                let p = env.raw("EVENT_STREAM_PREFIX").unwrap_or_else(|| "crm".into());
                if p.is_empty() || p.len() > 40 || !p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                    return Err(ConfigError::new("EVENT_STREAM_PREFIX", Some(&p), "expected 1..40 of [A-Za-z0-9._-]"));
                }
                p
            },
            consumer_batch_size: env.bounded("CONSUMER_BATCH_SIZE", 100, 1, 10_000)? as usize,
            consumer_block: env.millis("CONSUMER_BLOCK_MS", 1000)?,
            consumer_claim_idle: env.millis("CONSUMER_CLAIM_IDLE_MS", 30_000)?,
            consumer_name: env.raw("CONSUMER_NAME").unwrap_or_else(default_consumer_name),
            idempotency_retention: Duration::from_secs(
                3600 * env.bounded("IDEMPOTENCY_RETENTION_HOURS", 48, 24, 24 * 365)?,
            ),
            inbox_retention: Duration::from_secs(3600 * env.bounded("INBOX_RETENTION_HOURS", 168, 1, 24 * 365)?),
            retention_interval: Duration::from_secs(env.bounded("RETENTION_INTERVAL_SECONDS", 600, 1, 86_400)?),
            worker_threads: env.bounded("TOKIO_WORKER_THREADS", default_workers as u64, 1, 1024)? as usize,
        })
    }
}

fn load_auth(env: &Env) -> Result<AuthConfig, ConfigError> {
    if env.choice("AUTH_MODE", "jwt", &["jwt", "disabled"])? == "disabled" {
        return Ok(AuthConfig::Disabled);
    }
    let read_file = |name: &'static str| -> Result<Option<Vec<u8>>, ConfigError> {
        match env.raw(name) {
            None => Ok(None),
            Some(path) => std::fs::read(&path)
                .map(Some)
                .map_err(|e| ConfigError::new(name, Some(&path), format!("cannot read file: {e}"))),
        }
    };
    let key = if let Some(secret) = env.raw("JWT_SECRET") {
        JwtKey::Secret(secret.into_bytes())
    } else if let Some(secret) = read_file("JWT_SECRET_FILE")? {
        JwtKey::Secret(trim_bytes(secret))
    } else if let Some(pem) = read_file("JWT_PUBLIC_KEY_FILE")? {
        JwtKey::PublicPem(pem)
    } else {
        return Err(ConfigError::new(
            "JWT_SECRET",
            None,
            "AUTH_MODE=jwt needs JWT_SECRET, JWT_SECRET_FILE or JWT_PUBLIC_KEY_FILE (or set AUTH_MODE=disabled for local development)",
        ));
    };
    if let JwtKey::Secret(s) = &key
        && s.len() < 32
    {
        let var = if env.raw("JWT_SECRET").is_some() { "JWT_SECRET" } else { "JWT_SECRET_FILE" };
        return Err(ConfigError::new(var, None, "an HS256 secret must be at least 32 bytes"));
    }
    Ok(AuthConfig::Jwt(JwtConfig {
        key,
        issuer: env.raw("JWT_ISSUER").unwrap_or_else(|| "crm".into()),
        audience: env.raw("JWT_AUDIENCE").unwrap_or_else(|| "crm".into()),
        leeway_seconds: env.bounded("JWT_LEEWAY_SECONDS", 30, 0, 600)?,
        service_token_file: env.raw("SERVICE_TOKEN_FILE").map(PathBuf::from),
    }))
}

fn trim_bytes(mut v: Vec<u8>) -> Vec<u8> {
    while v.last().is_some_and(|b| b.is_ascii_whitespace()) {
        v.pop();
    }
    v
}

fn default_consumer_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_string()))
        .unwrap_or_else(|| "local".into());
    format!("{host}-{}", std::process::id())
}

/// Whether `s` is a safe unquoted PostgreSQL identifier.
pub fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && s.len() <= 63
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev_env(extra: &[(&str, &str)]) -> Env {
        let mut pairs = vec![("AUTH_MODE", "disabled")];
        pairs.extend_from_slice(extra);
        Env::from_pairs(pairs.into_iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn defaults_load_without_any_variable_in_dev_mode() {
        let cfg = KitConfig::load("profiles", 50051, &dev_env(&[])).expect("defaults are valid");
        assert_eq!(cfg.grpc_addr.port(), 50051);
        assert_eq!(cfg.metrics_addr.map(|a| a.port()), Some(51051));
        assert_eq!(cfg.database_schema, "profiles");
        assert_eq!(cfg.request_timeout, Duration::from_secs(10));
        assert!(matches!(cfg.auth, AuthConfig::Disabled));
    }

    #[test]
    fn bad_number_names_the_variable() {
        let err = KitConfig::load("profiles", 50051, &dev_env(&[("REQUEST_TIMEOUT_MS", "soon")])).unwrap_err();
        assert_eq!(err.var, "REQUEST_TIMEOUT_MS");
        assert!(err.to_string().contains("REQUEST_TIMEOUT_MS=\"soon\""), "{err}");
    }

    #[test]
    fn out_of_range_and_bad_choice_name_the_variable() {
        let err = KitConfig::load("p", 1, &dev_env(&[("MAX_CONCURRENT_REQUESTS", "0")])).unwrap_err();
        assert_eq!(err.var, "MAX_CONCURRENT_REQUESTS");
        let err = KitConfig::load("p", 1, &dev_env(&[("LOG_FORMAT", "xml")])).unwrap_err();
        assert_eq!(err.var, "LOG_FORMAT");
        let err = KitConfig::load("p", 1, &dev_env(&[("DATABASE_URL", "mysql://x")])).unwrap_err();
        assert_eq!(err.var, "DATABASE_URL");
        let err = KitConfig::load("p", 1, &dev_env(&[("DATABASE_SCHEMA", "Robert'); drop")])).unwrap_err();
        assert_eq!(err.var, "DATABASE_SCHEMA");
    }

    #[test]
    fn jwt_mode_requires_a_key_and_hides_the_secret() {
        let env = Env::from_pairs([("AUTH_MODE", "jwt")]);
        assert_eq!(KitConfig::load("p", 1, &env).unwrap_err().var, "JWT_SECRET");
        let env = Env::from_pairs([("JWT_SECRET", "short-secret")]);
        let err = KitConfig::load("p", 1, &env).unwrap_err();
        assert_eq!(err.var, "JWT_SECRET");
        assert!(!err.to_string().contains("short-secret"), "{err}");
    }

    #[test]
    fn the_cache_and_the_streams_use_redis_url_unless_told_otherwise() {
        let both = KitConfig::load("p", 1, &dev_env(&[("REDIS_URL", "redis://one:6379")])).expect("valid");
        assert_eq!(
            (both.redis_url.as_str(), both.redis_streams_url.as_str()),
            ("redis://one:6379", "redis://one:6379")
        );
        let split = KitConfig::load(
            "p",
            1,
            &dev_env(&[("REDIS_CACHE_URL", "redis://cache:6379"), ("REDIS_STREAMS_URL", "redis://streams:6379")]),
        )
        .expect("valid");
        assert_eq!(
            (split.redis_url.as_str(), split.redis_streams_url.as_str()),
            ("redis://cache:6379", "redis://streams:6379")
        );
        let err = KitConfig::load("p", 1, &dev_env(&[("REDIS_STREAMS_URL", "http://x")])).unwrap_err();
        assert_eq!(err.var, "REDIS_STREAMS_URL");
    }

    #[test]
    fn passwords_are_redacted_from_urls() {
        assert_eq!(redact_url("postgres://u:pw@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redact_url("redis://h:6379"), "redis://h:6379");
    }

    #[test]
    fn every_kit_variable_is_documented() {
        let doc = include_str!("../../docs/configuration.md");
        for v in KIT_VARS {
            assert!(doc.contains(&format!("`{}`", v.name)), "docs/configuration.md does not document {}", v.name);
        }
    }
}
