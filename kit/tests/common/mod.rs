//! Harness of the kit's integration tests: a probe service served by the real
//! kit on port 0, against the real PostgreSQL (own schema per test) and Redis.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use crm_kit::auth::roles;
use crm_kit::consumer::{Event, EventHandler, HandlerError};
use crm_kit::idempotency::{self, Claim};
use crm_kit::lifecycle::Shutdown;
use crm_kit::outbox::{self, Aggregate};
use crm_kit::{AccessPolicy, ApiError, Caller, IntoGrpc, Kit, ServiceSpec};
use opentelemetry_sdk::trace::InMemorySpanExporter;
use sqlx::PgPool;
use tonic::{Request, Response, Status};

pub mod pb {
    tonic::include_proto!("crm.kittest.v1");
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("kittest_descriptor");
}

use pb::probe_service_client::ProbeServiceClient;
use pb::probe_service_server::{ProbeService, ProbeServiceServer};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./tests/migrations");

pub const PROBE: &str = "crm.kittest.v1.ProbeService";

/// The in-memory span exporter shared by all tests of a binary.
pub fn spans() -> &'static InMemorySpanExporter {
    crm_kit::testing::telemetry()
}

pub fn policy() -> AccessPolicy {
    AccessPolicy::new().service(
        PROBE,
        &[("Echo", roles::ANY), ("RecordNote", roles::OPERATORS), ("Forward", roles::ANY), ("AdminOnly", roles::ADMIN)],
    )
}

#[derive(Clone)]
pub struct Probe {
    pool: PgPool,
    service: String,
    auth: crm_kit::auth::Authenticator,
}

#[tonic::async_trait]
impl ProbeService for Probe {
    async fn echo(&self, request: Request<pb::EchoRequest>) -> Result<Response<pb::EchoReply>, Status> {
        let caller = Caller::of(&request).map_err(|e| e.into_status("probe"))?.subject.clone();
        let req = request.into_inner();
        tokio::time::sleep(Duration::from_millis(req.sleep_ms as u64)).await;
        Ok(Response::new(pb::EchoReply { text: req.text, caller, trace_id: crm_kit::telemetry::current_trace_id() }))
    }

    async fn record_note(
        &self,
        request: Request<pb::RecordNoteRequest>,
    ) -> Result<Response<pb::RecordNoteReply>, Status> {
        let req = request.into_inner();
        self.record(&req).await.into_grpc("probe")
    }

    async fn forward(&self, request: Request<pb::ForwardRequest>) -> Result<Response<pb::EchoReply>, Status> {
        let req = request.into_inner();
        let channel = crm_kit::client::channel(&req.target).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut client =
            ProbeServiceClient::with_interceptor(channel, crm_kit::client::Outgoing::new(&self.auth, &self.service));
        client.echo(pb::EchoRequest { text: req.text, sleep_ms: 0 }).await
    }

    async fn admin_only(&self, request: Request<pb::EchoRequest>) -> Result<Response<pb::EchoReply>, Status> {
        self.echo(request).await
    }
}

impl Probe {
    pub fn new(pool: PgPool, service: &str, auth: crm_kit::auth::Authenticator) -> Self {
        Self { pool, service: service.to_string(), auth }
    }

    async fn record(&self, req: &pb::RecordNoteRequest) -> Result<pb::RecordNoteReply, ApiError> {
        if req.note.is_empty() {
            return Err(ApiError::invalid("note", "is required"));
        }
        let mut tx = self.pool.begin().await?;
        let fresh =
            match idempotency::claim(&mut tx, "/crm.kittest.v1.ProbeService/RecordNote", &req.request_id, req).await? {
                Claim::Replay(reply) => return Ok(reply),
                Claim::Fresh(fresh) => fresh,
            };
        let note_id = uuid::Uuid::now_v7();
        sqlx::query("INSERT INTO notes (note_id, note) VALUES ($1, $2)")
            .bind(note_id)
            .bind(&req.note)
            .execute(&mut *tx)
            .await?;
        let event = pb::NoteRecorded { note_id: note_id.to_string(), note: req.note.clone() };
        let id = note_id.to_string();
        let event_id =
            outbox::enqueue(&mut tx, &self.service, Aggregate { kind: "note", id: &id }, &req.request_id, &event)
                .await?;
        let reply = pb::RecordNoteReply { note_id: id, event_id: event_id.to_string() };
        fresh.complete(&mut tx, &reply).await?;
        tx.commit().await?;
        Ok(reply)
    }
}

/// Records each NoteRecorded event as an effect row; can be told to stall.
#[derive(Clone, Default)]
pub struct EffectWriter {
    pub stall_after: Option<usize>,
    pub seen: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl EventHandler for EffectWriter {
    async fn handle(&self, tx: &mut sqlx::PgConnection, event: &Event) -> Result<(), HandlerError> {
        let Some(note) = event.payload::<pb::NoteRecorded>()? else { return Ok(()) };
        let n = self.seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if let Some(limit) = self.stall_after
            && n >= limit
        {
            // Simulates a crash: never finishes (the task gets aborted).
            std::future::pending::<()>().await;
        }
        let event_id =
            uuid::Uuid::parse_str(&event.envelope.event_id).map_err(|e| HandlerError::Permanent(e.to_string()))?;
        sqlx::query("INSERT INTO effects (event_id, note) VALUES ($1, $2)")
            .bind(event_id)
            .bind(&note.note)
            .execute(tx)
            .await?;
        Ok(())
    }
}

/// A set-based handler: a whole batch of NoteRecorded in one statement. A
/// note "note 3" is poison: it fails the batch for good, and alone.
#[derive(Clone, Default)]
pub struct SetWriter {
    pub batches: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl EventHandler for SetWriter {
    fn set_based(&self) -> bool {
        true
    }

    async fn handle(&self, tx: &mut sqlx::PgConnection, event: &Event) -> Result<(), HandlerError> {
        self.handle_batch(tx, std::slice::from_ref(event)).await
    }

    async fn handle_batch(&self, tx: &mut sqlx::PgConnection, events: &[Event]) -> Result<(), HandlerError> {
        self.batches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let (mut ids, mut notes) = (Vec::new(), Vec::new());
        for e in events {
            let Some(note) = e.payload::<pb::NoteRecorded>()? else { continue };
            if note.note == "note 3" {
                return Err(HandlerError::Permanent("poison note".into()));
            }
            ids.push(uuid::Uuid::parse_str(&e.envelope.event_id).map_err(|e| HandlerError::Permanent(e.to_string()))?);
            notes.push(note.note);
        }
        sqlx::query("INSERT INTO effects (event_id, note) SELECT * FROM UNNEST($1::uuid[], $2::text[])")
            .bind(&ids)
            .bind(&notes)
            .execute(tx)
            .await?;
        Ok(())
    }
}

pub struct Running {
    pub addr: SocketAddr,
    pub url: String,
    pub shutdown: Shutdown,
    pub pool: PgPool,
    pub config: crm_kit::config::KitConfig,
    pub metrics: crm_kit::metrics::Metrics,
    pub health: tonic_health::server::HealthReporter,
    pub server: tokio::task::JoinHandle<Result<(), crm_kit::KitError>>,
}

pub fn spec(name: &'static str) -> ServiceSpec {
    ServiceSpec {
        name,
        grpc_services: &[PROBE],
        default_port: 0,
        migrator: &MIGRATOR,
        descriptors: pb::FILE_DESCRIPTOR_SET,
        vars: &[],
        long_running: &[],
    }
}

pub async fn test_config() -> crm_kit::config::KitConfig {
    spans();
    crm_kit::testing::config(&crm_kit::testing::unique_name("probe")).await
}

/// Starts the probe with `config`.
pub async fn start(config: crm_kit::config::KitConfig) -> Running {
    let name: &'static str = Box::leak(config.service.clone().into_boxed_str());
    let kit = Kit::start(spec(name), config.clone()).await.expect("kit starts");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let probe = Probe { pool: kit.pg.clone(), service: name.to_string(), auth: kit.auth.clone() };
    let shutdown = kit.shutdown_handle();
    let pool = kit.pg.clone();
    let metrics = kit.metrics.clone();
    let health = kit.health.clone();
    let routes = tonic::service::Routes::new(ProbeServiceServer::new(probe));
    let server = tokio::spawn(kit.serve_on(listener, routes, policy()));
    Running { addr, url: format!("http://{addr}"), shutdown, pool, config, metrics, health, server }
}

/// A client whose calls carry `token` and the current trace context.
pub async fn client(
    url: &str,
    token: Option<String>,
) -> ProbeServiceClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Auth>> {
    let channel = crm_kit::client::channel(url).expect("channel");
    ProbeServiceClient::with_interceptor(channel, Auth(token))
}

#[derive(Clone)]
pub struct Auth(pub Option<String>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req = crm_kit::client::Outgoing::trace_only().call(req)?;
        if let Some(t) = &self.0 {
            req.metadata_mut().insert("authorization", format!("Bearer {t}").parse().expect("ascii token"));
        }
        Ok(req)
    }
}

pub fn admin() -> Option<String> {
    Some(crm_kit::testing::token(&[crm_kit::Role::Admin], false))
}

/// Waits until `check` holds, polling, for up to `within`.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}
