//! Helpers for tests against the real PostgreSQL and Redis (feature `testing`).
//!
//! Each test gets its own schema in the `crm_test` database, so tests run in
//! parallel without seeing each other's rows; stream names are unique per
//! test too. `TEST_DATABASE_URL` and `TEST_REDIS_URL` override the defaults.

use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry_sdk::trace::InMemorySpanExporter;

use sqlx::Connection;

use crate::config::{AuthConfig, Env, JwtConfig, JwtKey, KitConfig};

/// The HS256 secret test configurations use.
pub const TEST_JWT_SECRET: &[u8] = b"test-secret-test-secret-test-secret!";

/// Base URL of the test database server (without a database name).
pub fn database_server_url() -> String {
    std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// Redis URL for tests.
pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A short unique name with a prefix, usable as a schema, service or stream name.
pub fn unique_name(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}_{}", &id[..12])
}

/// A fresh schema name that records when it was made: `t<unix secs hex>_<random>`.
pub fn schema_name() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("t{secs:08x}_{}", &id[..8])
}

/// Schemas of tests that ended long ago are dropped (once per test binary),
/// so repeated runs on one machine do not pile them up.
const SCHEMA_RETENTION: Duration = Duration::from_secs(3 * 3600);

/// Ensures the `crm_test` database exists and returns its URL.
pub async fn test_database_url() -> String {
    static CLEANED: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    let server = database_server_url();
    let url = format!("{server}/crm_test");
    if sqlx::PgConnection::connect(&url).await.is_err() {
        let mut admin = sqlx::PgConnection::connect(&format!("{server}/postgres"))
            .await
            .expect("PostgreSQL must be running for this test (make test starts it)");
        // Another test binary may create it concurrently; "already exists" is fine.
        let _ = sqlx::query("CREATE DATABASE crm_test").execute(&mut admin).await;
    }
    CLEANED.get_or_init(|| drop_old_schemas(&url)).await;
    url
}

async fn drop_old_schemas(url: &str) {
    let Ok(mut conn) = sqlx::PgConnection::connect(url).await else { return };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let names: Vec<String> =
        sqlx::query_scalar("SELECT nspname FROM pg_namespace WHERE nspname ~ '^t[0-9a-f]{8}_[0-9a-f]{8}$'")
            .fetch_all(&mut conn)
            .await
            .unwrap_or_default();
    for name in names {
        let made = u64::from_str_radix(&name[1..9], 16).unwrap_or(u64::MAX);
        if now.saturating_sub(made) > SCHEMA_RETENTION.as_secs() && crate::config::is_identifier(&name) {
            // Name checked to be a plain identifier just above.
            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE")))
                .execute(&mut conn)
                .await;
        }
    }
}

/// A configuration for a service named `service` with its own fresh schema,
/// a JWT secret, ephemeral ports and fast timings.
pub async fn config(service: &str) -> KitConfig {
    telemetry();
    let url = test_database_url().await;
    let env = Env::from_pairs([
        ("DATABASE_URL", url.as_str()),
        ("REDIS_URL", redis_url().as_str()),
        ("GRPC_LISTEN_ADDR", "127.0.0.1:0"),
        ("METRICS_LISTEN_ADDR", "off"),
        ("AUTH_MODE", "disabled"),
    ]);
    let mut cfg = KitConfig::load(service, 0, &env).expect("test configuration is valid");
    cfg.database_schema = schema_name();
    cfg.auth = AuthConfig::Jwt(JwtConfig {
        key: JwtKey::Secret(TEST_JWT_SECRET.to_vec()),
        issuer: "crm".into(),
        audience: "crm".into(),
        leeway_seconds: 0,
        service_token_file: None,
    });
    cfg.database_max_connections = 5;
    cfg.shutdown_drain_delay = Duration::from_millis(100);
    cfg.shutdown_grace = Duration::from_secs(10);
    cfg.health_check_interval = Duration::from_millis(200);
    cfg.outbox_poll_interval = Duration::from_millis(20);
    cfg.consumer_block = Duration::from_millis(200);
    cfg.consumer_claim_idle = Duration::from_millis(500);
    cfg.consumer_name = unique_name("c");
    // Streams of its own: a test or benchmark never publishes into the
    // `crm.*.events` streams of a suite running on the same machine.
    cfg.event_stream_prefix = unique_name("t");
    cfg
}

/// Mints a test token.
pub fn token(roles: &[crate::auth::Role], pii: bool) -> String {
    crate::auth::mint(
        TEST_JWT_SECRET,
        &crate::auth::TokenRequest {
            subject: "tester".into(),
            roles: roles.to_vec(),
            permissions: if pii { vec![crate::auth::PII_READ.into()] } else { vec![] },
            ttl: Duration::from_secs(600),
            issuer: "crm".into(),
            audience: "crm".into(),
        },
    )
    .expect("minting a test token")
}

/// Installs telemetry once per test binary with an in-memory span exporter,
/// so trace ids exist (as in production) and tests can inspect spans.
pub fn telemetry() -> &'static InMemorySpanExporter {
    static EXPORTER: OnceLock<InMemorySpanExporter> = OnceLock::new();
    EXPORTER.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        let guard =
            crate::telemetry::init_with_exporter("crm-tests", exporter.clone()).expect("telemetry installs once");
        // Spans are exported as they end; the provider lives as long as the test binary.
        std::mem::forget(guard);
        exporter
    })
}

/// Adds a bearer token to every call of a test client.
#[derive(Clone, Debug)]
pub struct Bearer(pub String);

impl Bearer {
    /// A test token with `roles` (and `pii:read` when `pii`).
    pub fn minted(roles: &[crate::auth::Role], pii: bool) -> Self {
        Self(token(roles, pii))
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let value = format!("Bearer {}", self.0)
            .parse()
            .map_err(|_| tonic::Status::internal("test token is not valid metadata"))?;
        req.metadata_mut().insert("authorization", value);
        Ok(req)
    }
}

/// The fields named by an INVALID_ARGUMENT's `BadRequest` (panics on another code).
pub fn bad_fields(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    status
        .get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|f| f.field.clone()).collect())
        .unwrap_or_default()
}

/// An event of `source` carrying `payload`, as a consumer hands it to its
/// handler (fresh event id, occurred at `occurred_at` seconds).
pub fn event<T: prost::Name + prost::Message>(source: &str, payload: &T, occurred_at: i64) -> crate::consumer::Event {
    crate::consumer::Event {
        envelope: crm_proto::common::v1::EventEnvelope {
            event_id: uuid::Uuid::now_v7().to_string(),
            event_type: T::full_name(),
            source: source.into(),
            occurred_at: Some(prost_types::Timestamp { seconds: occurred_at, nanos: 0 }),
            payload: Some(prost_types::Any::from_msg(payload).expect("pack")),
            ..Default::default()
        },
        stream: format!("crm.{source}.events"),
        stream_id: "1-0".into(),
    }
}

/// Two consumers at once, as two replicas run them: applies `first` in a
/// transaction left open, then `second` in another one; asserts that the
/// second waits for the first (`case` names the run), then commits both.
pub async fn apply_concurrently<H: crate::consumer::EventHandler + Clone>(
    pool: &sqlx::PgPool,
    handler: H,
    first: &crate::consumer::Event,
    second: crate::consumer::Event,
    case: &str,
) {
    let mut open = pool.begin().await.expect("tx");
    handler.handle(&mut open, first).await.expect("first applied");
    let (pool2, handler2) = (pool.clone(), handler.clone());
    let other = tokio::spawn(async move {
        let mut tx = pool2.begin().await.expect("tx");
        handler2.handle(&mut tx, &second).await.expect("second applied");
        tx.commit().await.expect("second committed");
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!other.is_finished(), "{case}: the second event waits for the first's customer rows");
    open.commit().await.expect("first committed");
    other.await.expect("second task");
}

/// One gRPC message frame: a zero flag byte (not compressed), the length as
/// four big-endian bytes, the message.
pub fn frame(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 5);
    out.push(0);
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// Sends `body` (raw gRPC frames, well-formed or not: see [`frame`]) to
/// `path` on the server at `url` with a bearer `token`, and returns the
/// status the server answered (code OK on success). For hostile-input tests:
/// oversized, truncated and undecodable messages that a generated client
/// cannot produce.
pub async fn raw_call(url: &str, path: &str, body: Vec<u8>, token: &str) -> tonic::Status {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let channel = match crate::client::channel(url) {
        Ok(c) => c,
        Err(e) => return tonic::Status::unavailable(e.to_string()),
    };
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("{url}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", format!("Bearer {token}"))
        .body(tonic::body::Body::new(
            http_body_util::Full::new(prost::bytes::Bytes::from(body)).map_err(|never| match never {}),
        ));
    let request = match request {
        Ok(r) => r,
        Err(e) => return tonic::Status::internal(e.to_string()),
    };
    let response = match channel.oneshot(request).await {
        Ok(r) => r,
        Err(e) => return tonic::Status::unavailable(e.to_string()),
    };
    if let Some(status) = tonic::Status::from_header_map(response.headers()) {
        return status;
    }
    match response.into_body().collect().await {
        Ok(collected) => collected
            .trailers()
            .and_then(tonic::Status::from_header_map)
            .unwrap_or_else(|| tonic::Status::unknown("the response carried no grpc-status")),
        Err(e) => e,
    }
}

/// A [`crate::privacy::TextMasker`] that knows customers' names from a map
/// (the real one asks profiles) and can be made unreachable, for services' tests.
#[derive(Debug, Default)]
pub struct NamesMasker {
    names: std::sync::Mutex<std::collections::HashMap<String, Vec<String>>>,
    /// While set, masking fails as an unreachable profiles would.
    pub down: std::sync::atomic::AtomicBool,
}

impl NamesMasker {
    /// Records the name of a customer.
    pub fn name(&self, customer_id: &str, name: &str) {
        if let Ok(mut names) = self.names.lock() {
            names.entry(customer_id.to_string()).or_default().push(name.to_string());
        }
    }
}

impl crate::privacy::TextMasker for NamesMasker {
    fn mask(&self, texts: Vec<(String, String)>) -> crate::privacy::Masking<'_> {
        Box::pin(async move {
            if self.down.load(std::sync::atomic::Ordering::SeqCst) {
                return Err("profiles unreachable (test)".to_string());
            }
            let names = self.names.lock().map_err(|e| e.to_string())?;
            Ok(texts
                .into_iter()
                .map(|(id, t)| {
                    let of: Vec<&str> =
                        names.get(&id).map(|n| n.iter().map(String::as_str).collect()).unwrap_or_default();
                    crate::privacy::mask_text(&t, &of)
                })
                .collect())
        })
    }
}

/// A redis-server of a test's own on a free port, for fault tests: kill it,
/// restart it (empty: it keeps nothing on disk) or pause it, without touching
/// the Redis other tests share. Killed when dropped.
#[derive(Debug)]
pub struct PrivateRedis {
    child: Option<std::process::Child>,
    args: Vec<String>,
    /// Its port.
    pub port: u16,
    /// `redis://127.0.0.1:<port>`.
    pub url: String,
}

impl PrivateRedis {
    /// Starts one with these extra arguments (e.g. `--maxmemory-policy allkeys-lru`).
    pub async fn start(args: &[&str]) -> PrivateRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let mut redis = PrivateRedis {
            child: None,
            args: args.iter().map(|a| a.to_string()).collect(),
            port,
            url: format!("redis://127.0.0.1:{port}"),
        };
        redis.restart().await;
        redis
    }

    /// Kills it at once (SIGKILL): what it held is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills it if it runs, then starts it again on the same port, empty.
    pub async fn restart(&mut self) {
        self.kill();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(&self.args)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed (make test installs it)");
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(client) = redis::Client::open(self.url.as_str())
                && let Ok(mut conn) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING").query_async::<String>(&mut conn).await.is_ok()
            {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "the private redis-server did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}
