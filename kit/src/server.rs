//! Service bootstrap: everything a service needs around its handlers
//! (SPEC 2, OPS-4). A service's `run()` is a few lines:
//!
//! ```ignore
//! pub async fn run(kit: Kit) -> Result<(), KitError> {
//!     let api = ProfilesApi::new(kit.pg.clone(), kit.redis.clone());
//!     kit.spawn_outbox_relay();
//!     kit.serve(Routes::new(ProfilesServiceServer::new(api)), access_policy()).await
//! }
//! ```
//!
//! - `grpc.health.v1`: NOT_SERVING until PostgreSQL answers, whenever it stops
//!   answering, and from the moment SIGTERM arrives (readiness); the service
//!   name `liveness` stays SERVING while the process runs.
//! - Server reflection v1 and v1alpha (grpcurl 1.8 speaks only v1alpha),
//!   listing just this service, health and reflection.
//! - The [`crate::edge`] layer (shedding, tracing, auth, deadlines, metrics).
//! - Graceful shutdown: on SIGTERM/SIGINT, NOT_SERVING for
//!   `SHUTDOWN_DRAIN_DELAY_MS` while still accepting, then stop accepting and
//!   let in-flight requests finish within `SHUTDOWN_GRACE_SECONDS`, then stop
//!   background workers (the relay publishes what is left).

use std::net::SocketAddr;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::migrate::Migrator;
use tokio::task::JoinHandle;
use tonic::service::Routes;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::auth::{AccessPolicy, Authenticator};
use crate::config::{ConfigError, KitConfig};
use crate::consumer::{Consumer, ConsumerSettings, EventHandler};
use crate::db::{self, Redis};
use crate::edge::EdgeLayer;
use crate::lifecycle::{Shutdown, ShutdownSignal};
use crate::metrics::Metrics;
use crate::outbox::OutboxRelay;

/// The health service name of liveness (Kubernetes `livenessProbe.grpc.service`).
pub const LIVENESS: &str = "liveness";

/// What the kit needs to know about a service.
#[derive(Debug, Clone, Copy)]
pub struct ServiceSpec {
    /// Short name: "profiles", "segmentation", ...
    pub name: &'static str,
    /// Fully-qualified gRPC services it serves, e.g. "crm.profiles.v1.ProfilesService".
    pub grpc_services: &'static [&'static str],
    /// Default gRPC port (metrics: +1000).
    pub default_port: u16,
    /// The service's embedded migrations (`sqlx::migrate!()`).
    pub migrator: &'static Migrator,
    /// Encoded descriptor set holding its contract (`crm_proto::FILE_DESCRIPTOR_SET`),
    /// served by reflection and used to check the access policy is complete.
    pub descriptors: &'static [u8],
    /// The service's own environment variables (beyond the kit's), for
    /// `<service> config` and the documentation check.
    pub vars: &'static [crate::config::VarSpec],
    /// Streaming RPCs (method names) that may run longer than
    /// `REQUEST_TIMEOUT_MS`, e.g. bulk imports; the client's `grpc-timeout`
    /// still applies to them.
    pub long_running: &'static [&'static str],
}

/// Start-up or serving failure.
#[derive(Debug, thiserror::Error)]
pub enum KitError {
    /// Bad configuration (names the variable).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Migrations failed.
    #[error("migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// An RPC has no access rule, or similar wiring mistakes.
    #[error("{0}")]
    Wiring(String),
    /// Binding or serving failed.
    #[error("server: {0}")]
    Serve(String),
}

/// A running service replica's shared resources.
pub struct Kit {
    /// Configuration.
    pub config: KitConfig,
    /// The service.
    pub spec: ServiceSpec,
    /// PostgreSQL pool (search_path = the service's schema).
    pub pg: PgPool,
    /// Redis of the cache role (`REDIS_CACHE_URL`).
    pub redis: Redis,
    /// Redis of the event streams (`REDIS_STREAMS_URL`).
    pub streams: Redis,
    /// Metrics registry.
    pub metrics: Metrics,
    /// Token verification.
    pub auth: Authenticator,
    /// Health reporter.
    pub health: HealthReporter,
    shutdown: Shutdown,
    tasks: Vec<JoinHandle<()>>,
}

impl Kit {
    /// Opens pools (lazily), applies migrations when `MIGRATE_ON_START`
    /// (retrying while PostgreSQL comes up, for up to 30 s) and starts the
    /// health watcher.
    pub async fn start(spec: ServiceSpec, config: KitConfig) -> Result<Self, KitError> {
        let pg = db::pg_pool(&config)?;
        let redis = Redis::connect(&config.redis_url, config.redis_timeout)?;
        let streams = Redis::connect(&config.redis_streams_url, config.redis_timeout)?;
        db::check_streams_redis(&config.redis_streams_url).await?;
        let auth = Authenticator::new(&config.auth).map_err(|e| KitError::Wiring(e.to_string()))?;
        let metrics = Metrics::new(spec.name);
        let (health, _) = tonic_health::server::health_reporter();
        // tonic-health starts out SERVING; nothing is until PostgreSQL answers.
        set_status(&health, spec.grpc_services, false).await;
        // Liveness: SERVING for as long as the process runs, even while
        // PostgreSQL is away or the replica drains (a restart would not help).
        health.set_service_status(LIVENESS, ServingStatus::Serving).await;
        if config.migrate_on_start {
            migrate_with_retry(&pg, &config.database_schema, spec.migrator, Duration::from_secs(30)).await?;
        }
        let mut kit = Kit {
            config,
            spec,
            pg,
            redis,
            streams,
            metrics,
            auth,
            health,
            shutdown: Shutdown::new(),
            tasks: Vec::new(),
        };
        kit.spawn_health_watcher();
        kit.spawn_retention();
        Ok(kit)
    }

    /// Applies migrations once (the `migrate` subcommand).
    pub async fn migrate_only(spec: ServiceSpec, config: &KitConfig) -> Result<(), KitError> {
        let pg = db::pg_pool(config)?;
        migrate_with_retry(&pg, &config.database_schema, spec.migrator, Duration::from_secs(60)).await?;
        pg.close().await;
        Ok(())
    }

    /// A handle that shuts the service down like SIGTERM does.
    pub fn shutdown_handle(&self) -> Shutdown {
        self.shutdown.clone()
    }

    /// A signal background tasks can wait on.
    pub fn shutdown_signal(&self) -> ShutdownSignal {
        self.shutdown.signal()
    }

    /// Spawns a background task stopped at shutdown (it should watch `shutdown_signal()`).
    pub fn spawn(&mut self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.tasks.push(tokio::spawn(task));
    }

    /// Starts the outbox relay of this service.
    pub fn spawn_outbox_relay(&mut self) {
        let relay = OutboxRelay::new(self.pg.clone(), self.streams.clone(), self.spec.name, self.metrics.clone())
            .configured(&self.config, self.spec.name);
        let signal = self.shutdown.signal();
        self.spawn(relay.run(signal));
    }

    /// Starts a consumer of the event streams of `services` (e.g. `["outreach"]`).
    pub fn spawn_consumer<H: EventHandler>(&mut self, services: &[&str], handler: H) -> Result<(), KitError> {
        self.spawn_named_consumer(ConsumerSettings::from_config(&self.config, self.streams(services)), handler)
    }

    fn streams(&self, services: &[&str]) -> Vec<String> {
        services.iter().map(|s| crate::outbox::stream_name(&self.config.event_stream_prefix, s)).collect()
    }

    /// Starts `n` consumers of the streams of `services` in this replica,
    /// members of the same group (named `<CONSUMER_NAME>-<i>`), so that one
    /// replica applies `n` batches at once, as `n` replicas would. The
    /// handler must be safe under concurrent batches, as with replicas.
    pub fn spawn_consumers<H: EventHandler + Clone>(
        &mut self,
        services: &[&str],
        handler: H,
        n: usize,
    ) -> Result<(), KitError> {
        if n <= 1 {
            return self.spawn_consumer(services, handler);
        }
        let streams = self.streams(services);
        for i in 0..n {
            let mut settings = ConsumerSettings::from_config(&self.config, streams.clone());
            settings.name = format!("{}-{i}", settings.name);
            self.spawn_named_consumer(settings, handler.clone())?;
        }
        Ok(())
    }

    fn spawn_named_consumer<H: EventHandler>(
        &mut self,
        settings: ConsumerSettings,
        handler: H,
    ) -> Result<(), KitError> {
        let consumer =
            Consumer::new(self.pg.clone(), &self.config.redis_streams_url, settings, handler, self.metrics.clone())
                .map_err(|e| ConfigError::new("REDIS_STREAMS_URL", None, e.to_string()))?;
        let signal = self.shutdown.signal();
        self.spawn(consumer.run(signal));
        Ok(())
    }

    /// Purges expired idempotency keys and inbox entries (SPEC 3, REL-5).
    fn spawn_retention(&mut self) {
        let job = crate::retention::Retention::new(
            self.pg.clone(),
            self.config.idempotency_retention,
            self.config.inbox_retention,
            self.metrics.clone(),
        );
        let every = self.config.retention_interval;
        let signal = self.shutdown.signal();
        self.spawn(job.run(every, signal));
    }

    fn spawn_health_watcher(&mut self) {
        // Its own connection: a busy request pool must not read as "database down".
        let mut probe_config = self.config.clone();
        probe_config.database_max_connections = 1;
        let pg = db::pg_pool(&probe_config).unwrap_or_else(|_| self.pg.clone());
        let health = self.health.clone();
        let metrics = self.metrics.clone();
        let names: Vec<&'static str> = self.spec.grpc_services.to_vec();
        let interval = self.config.health_check_interval;
        let signal = self.shutdown.signal();
        self.spawn(async move {
            let mut last: Option<bool> = None;
            loop {
                let up =
                    !signal.is_triggered() && db::pg_reachable(&pg, interval.max(Duration::from_millis(500))).await;
                // Draining is final: never flip back to SERVING after SIGTERM.
                let up = up && !signal.is_triggered();
                if last != Some(up) {
                    set_status(&health, &names, up).await;
                    metrics.serving.set(up as i64);
                    if up {
                        tracing::info!("PostgreSQL reachable: health SERVING");
                    } else if !signal.is_triggered() {
                        tracing::warn!("PostgreSQL unreachable: health NOT_SERVING");
                    }
                    last = Some(up);
                }
                if !signal.sleep(interval).await {
                    set_status(&health, &names, false).await;
                    metrics.serving.set(0);
                    break;
                }
            }
        });
    }

    /// Binds `GRPC_LISTEN_ADDR` and serves until SIGTERM/SIGINT.
    pub async fn serve(self, routes: Routes, policy: AccessPolicy) -> Result<(), KitError> {
        let listener = tokio::net::TcpListener::bind(self.config.grpc_addr).await.map_err(|e| {
            KitError::Serve(format!("cannot listen on GRPC_LISTEN_ADDR {}: {e}", self.config.grpc_addr))
        })?;
        let shutdown = self.shutdown.clone();
        let signal = termination_signal();
        tokio::spawn(async move {
            signal.await;
            tracing::info!("termination signal received: draining");
            shutdown.trigger();
        });
        self.serve_on(listener, routes, policy).await
    }

    /// Serves on an already bound listener until the shutdown handle (or a
    /// signal, via [`Kit::serve`]) fires. Tests bind port 0 and call this.
    pub async fn serve_on(
        mut self,
        listener: tokio::net::TcpListener,
        routes: Routes,
        policy: AccessPolicy,
    ) -> Result<(), KitError> {
        let missing = policy
            .undeclared(self.spec.descriptors, self.spec.grpc_services)
            .map_err(|e| KitError::Wiring(format!("descriptor set: {e}")))?;
        if !missing.is_empty() {
            return Err(KitError::Wiring(format!("RPCs without an access rule: {}", missing.join(", "))));
        }
        let addr = listener.local_addr().map_err(|e| KitError::Serve(e.to_string()))?;
        let routes = self.with_health_and_reflection(routes)?;
        let long_running = self
            .spec
            .grpc_services
            .iter()
            .flat_map(|svc| self.spec.long_running.iter().map(move |m| format!("/{svc}/{m}")))
            .collect();
        let edge = EdgeLayer::new(
            self.spec.name,
            policy,
            self.auth.clone(),
            self.metrics.clone(),
            self.config.max_concurrent_requests,
            self.config.request_timeout,
        )
        .with_long_running(long_running)
        .with_max_message_bytes(self.config.max_message_bytes);

        if let Some(metrics_addr) = self.config.metrics_addr {
            let listener = Metrics::bind(metrics_addr)
                .await
                .map_err(|e| KitError::Serve(format!("cannot listen on METRICS_LISTEN_ADDR {metrics_addr}: {e}")))?;
            let metrics = self.metrics.clone();
            let signal = self.shutdown.signal();
            self.spawn(async move {
                if let Err(e) = metrics.serve(listener, signal.wait()).await {
                    tracing::warn!(error = %e, "metrics endpoint stopped");
                }
            });
        }

        // Drain: NOT_SERVING first, keep accepting for the drain delay, then stop accepting.
        let signal = self.shutdown.signal();
        let health = self.health.clone();
        let names: Vec<&'static str> = self.spec.grpc_services.to_vec();
        let drain_delay = self.config.shutdown_drain_delay;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            signal.wait().await;
            set_status(&health, &names, false).await;
            tokio::time::sleep(drain_delay).await;
            let _ = stop_tx.send(());
        });
        let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel::<()>();
        let stop = async move {
            let _ = stop_rx.await;
            let _ = stopped_tx.send(());
        };

        tracing::info!(%addr, service = self.spec.name, auth = self.auth.enabled(), "serving gRPC");
        let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let server = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .layer(edge)
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, stop);
        let grace = self.config.shutdown_grace;
        let outcome = tokio::select! {
            r = server => r.map_err(|e| KitError::Serve(e.to_string())),
            _ = async { let _ = stopped_rx.await; tokio::time::sleep(grace).await } => {
                tracing::warn!(grace_s = grace.as_secs(), "grace period over with requests still in flight; exiting");
                Ok(())
            }
        };
        // Whatever ended the server, stop the workers and wait for them briefly.
        self.shutdown.trigger();
        for task in self.tasks.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        tracing::info!("stopped");
        outcome
    }

    fn with_health_and_reflection(&self, routes: Routes) -> Result<Routes, KitError> {
        let health = tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(self.health.clone()),
        );
        let mut v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(self.spec.descriptors)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("grpc.health.v1.Health");
        let mut v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(self.spec.descriptors)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("grpc.health.v1.Health");
        for name in self.spec.grpc_services {
            v1 = v1.with_service_name(*name);
            v1alpha = v1alpha.with_service_name(*name);
        }
        let v1 = v1.build_v1().map_err(|e| KitError::Wiring(format!("reflection v1: {e}")))?;
        let v1alpha = v1alpha.build_v1alpha().map_err(|e| KitError::Wiring(format!("reflection v1alpha: {e}")))?;
        Ok(routes.add_service(health).add_service(v1).add_service(v1alpha))
    }
}

async fn set_status(health: &HealthReporter, names: &[&str], up: bool) {
    let status = if up { ServingStatus::Serving } else { ServingStatus::NotServing };
    health.set_service_status("", status).await;
    for n in names {
        health.set_service_status(*n, status).await;
    }
}

async fn migrate_with_retry(
    pg: &PgPool,
    schema: &str,
    migrator: &Migrator,
    patience: Duration,
) -> Result<(), KitError> {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        match db::migrate(pg, schema, migrator).await {
            Ok(()) => return Ok(()),
            Err(e) if is_connectivity(&e) && tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, "PostgreSQL not reachable yet; retrying migrations");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn is_connectivity(e: &sqlx::migrate::MigrateError) -> bool {
    matches!(e, sqlx::migrate::MigrateError::Execute(sqlx::Error::PoolTimedOut | sqlx::Error::Io(_)))
}

/// Registers SIGTERM and SIGINT handlers now and returns a future resolving
/// on the first of them. Registering before serving means a signal can never
/// hit the default action (immediate exit) while requests are in flight.
pub fn termination_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        async move {
            match (term, int) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {},
                        _ = int.recv() => {},
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async move {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Where a running service can be reached (printed by `make run`).
pub fn describe(addr: SocketAddr, metrics: Option<SocketAddr>) -> String {
    match metrics {
        Some(m) => format!("gRPC {addr}, metrics http://{m}/metrics"),
        None => format!("gRPC {addr}"),
    }
}
