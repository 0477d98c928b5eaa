//! Helpers to run the service binaries as real processes in end-to-end tests.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Polls `done` every 100 ms until it holds; fails the test after 30 s, naming `what`.
pub async fn wait_for<F: AsyncFnMut() -> bool>(what: &str, mut done: F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !done().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A time zone where it is day now (09:00-20:00 local), so that messages to
/// a customer living there are not held for quiet hours (OUT-5).
pub fn daytime_zone() -> &'static str {
    use chrono::Timelike;
    let now = chrono::Utc::now();
    ["Asia/Shanghai", "Europe/London", "America/New_York", "America/Los_Angeles", "Asia/Kolkata", "Pacific/Auckland"]
        .into_iter()
        .find(|z| z.parse::<chrono_tz::Tz>().is_ok_and(|tz| (9..20).contains(&now.with_timezone(&tz).hour())))
        .unwrap_or("UTC")
}

/// A free local port.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// The path of a workspace binary built by cargo (`crm-profiles`, ...).
pub fn binary(name: &str) -> PathBuf {
    let mut dir = std::env::current_exe().expect("test exe");
    dir.pop();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(name)
}

fn spawn(service: &str, env: &[(String, String)]) -> Child {
    let mut cmd = Command::new(binary(&format!("crm-{service}")));
    cmd.stdout(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("start service")
}

/// A running service process; terminated (SIGTERM) on drop.
pub struct ServiceProcess {
    /// The child.
    pub child: Child,
    /// gRPC URL.
    pub url: String,
    /// Schema it owns.
    pub schema: String,
    /// Its event stream prefix (`EVENT_STREAM_PREFIX`): tests never publish into a shared stream.
    pub prefix: String,
    /// `profiles`, `segmentation`, ...
    pub service: String,
    /// The environment it was started with (a restart uses the same).
    env: Vec<(String, String)>,
}

impl ServiceProcess {
    /// Builds the binary if needed and starts `crm-<service>` with its own
    /// schema (`DATABASE_SCHEMA` in `extra` overrides it, for replicas), a
    /// stable `CONSUMER_NAME` (a restarted process resumes its pending
    /// events) and `extra` on top.
    pub async fn start(service: &str, extra: &[(&str, &str)]) -> ServiceProcess {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-q", "-p", &format!("crm-{service}")])
            .status()
            .expect("cargo build");
        assert!(status.success(), "building crm-{service}");
        let db = crm_kit::testing::test_database_url().await;
        let port = free_port();
        let prefix = crm_kit::testing::unique_name("e2e");
        let secret = String::from_utf8_lossy(crm_kit::testing::TEST_JWT_SECRET).to_string();
        let mut env: Vec<(String, String)> = [
            ("DATABASE_URL", db.as_str()),
            ("DATABASE_SCHEMA", crm_kit::testing::schema_name().as_str()),
            ("EVENT_STREAM_PREFIX", prefix.as_str()),
            ("REDIS_URL", crm_kit::testing::redis_url().as_str()),
            ("GRPC_LISTEN_ADDR", format!("127.0.0.1:{port}").as_str()),
            ("METRICS_LISTEN_ADDR", format!("127.0.0.1:{}", free_port()).as_str()),
            ("JWT_SECRET", secret.as_str()),
            ("SHUTDOWN_DRAIN_DELAY_MS", "0"),
            ("OUTBOX_POLL_INTERVAL_MS", "20"),
            ("HEALTH_CHECK_INTERVAL_MS", "200"),
            ("CONSUMER_NAME", crm_kit::testing::unique_name(service).as_str()),
            ("RUST_LOG", "warn"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in extra {
            env.retain(|(name, _)| name != k);
            env.push((k.to_string(), v.to_string()));
        }
        let get = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).unwrap_or_default();
        let (schema, prefix) = (get("DATABASE_SCHEMA"), get("EVENT_STREAM_PREFIX"));
        let child = spawn(service, &env);
        let process = ServiceProcess {
            child,
            url: format!("http://127.0.0.1:{port}"),
            schema,
            prefix,
            service: service.to_string(),
            env,
        };
        process.wait_serving(service).await;
        process
    }

    /// Its `CONSUMER_NAME` (also the name it claims background work under).
    pub fn consumer_name(&self) -> String {
        self.env.iter().find(|(k, _)| k == "CONSUMER_NAME").map(|(_, v)| v.clone()).unwrap_or_default()
    }

    /// Kills the process at once (SIGKILL): no drain, nothing flushed.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again with the same environment (port, schema, consumer
    /// name), after a kill or a terminate, and waits until it serves.
    pub async fn restart(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
        self.child = spawn(&self.service, &self.env);
        self.wait_serving(&self.service.clone()).await;
    }

    async fn wait_serving(&self, service: &str) {
        use tonic_health::pb::health_check_response::ServingStatus;
        use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while tokio::time::Instant::now() < deadline {
            if let Ok(channel) = crm_kit::client::channel(&self.url) {
                let mut h = HealthClient::new(channel);
                if let Ok(r) = h.check(HealthCheckRequest { service: String::new() }).await
                    && r.into_inner().status == ServingStatus::Serving as i32
                {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("crm-{service} did not report SERVING within 30 s");
    }

    /// Sends SIGTERM and waits (without blocking the runtime, so this
    /// process's client connections can see the server go away) for the exit
    /// status; then deletes the event streams of its prefix.
    pub async fn terminate(&mut self) -> Option<i32> {
        let code = self.stop().await;
        if let Ok(client) = redis::Client::open(crm_kit::testing::redis_url())
            && let Ok(mut conn) = client.get_multiplexed_async_connection().await
        {
            for service in ["profiles", "segmentation", "outreach", "feedback", "analytics"] {
                let stream = crm_kit::outbox::stream_name(&self.prefix, service);
                let _: Result<(), _> = redis::cmd("DEL").arg(stream).query_async(&mut conn).await;
            }
        }
        code
    }

    async fn stop(&mut self) -> Option<i32> {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while tokio::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = self.child.kill();
        None
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        // A test that failed early: do not leave the process behind.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A small OTLP/gRPC trace receiver: what the services export, for tests
/// that follow one trace across processes (no external collector).
#[derive(Clone, Default)]
pub struct Receiver {
    spans: std::sync::Arc<std::sync::Mutex<Vec<Span>>>,
    /// `http://127.0.0.1:<port>`, for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub endpoint: String,
}

/// One exported span.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Span {
    /// `service.name` of its resource, e.g. "crm-feedback".
    pub service: String,
    /// Trace id, 32 hex digits.
    pub trace_id: String,
    /// Span name.
    pub name: String,
}

impl Receiver {
    /// Starts a receiver on a free port.
    pub async fn start() -> Receiver {
        use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let receiver = Receiver { endpoint: format!("http://127.0.0.1:{port}"), ..Default::default() };
        let server = receiver.clone();
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(server))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
        });
        receiver
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Span> {
        self.spans.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The services that exported a span of `trace_id`.
    pub fn services_in(&self, trace_id: &str) -> std::collections::BTreeSet<String> {
        self.spans().into_iter().filter(|s| s.trace_id == trace_id).map(|s| s.service).collect()
    }
}

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest>,
    ) -> Result<
        tonic::Response<opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse>,
        tonic::Status,
    > {
        use opentelemetry_proto::tonic::common::v1::any_value::Value;
        let mut seen = self.spans.lock().map_err(|e| tonic::Status::internal(e.to_string()))?;
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(Value::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    let trace_id: String = span.trace_id.iter().map(|b| format!("{b:02x}")).collect();
                    seen.push(Span { service: service.clone(), trace_id, name: span.name });
                }
            }
        }
        Ok(tonic::Response::new(opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}
