//! Prometheus metrics (SPEC 2): request count, latency histogram and status
//! codes per RPC, in-flight and shed requests, outbox lag, consumer progress;
//! services register their own (cache hit ratio, ...) with [`Metrics::register`].
//! Served as text at `GET /metrics` on `METRICS_LISTEN_ADDR`.

use std::net::SocketAddr;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry};

/// Label set: name/value pairs.
pub type Labels = Vec<(&'static str, String)>;

type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 0.5 ms .. ~16 s.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 16))
}

/// The metrics of one service replica.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
    /// `crm_grpc_server_requests_total{method, code}`.
    pub requests: Family<Labels, Counter>,
    /// `crm_grpc_server_request_duration_seconds{method}`.
    pub latency: HistogramFamily,
    /// `crm_grpc_server_in_flight_requests`.
    pub in_flight: Gauge<i64, AtomicI64>,
    /// `crm_grpc_server_shed_total`: requests refused by load shedding.
    pub shed: Counter,
    /// `crm_outbox_pending_events`: events waiting in the outbox.
    pub outbox_pending: Gauge<i64, AtomicI64>,
    /// `crm_outbox_oldest_pending_age_seconds`: outbox lag.
    pub outbox_lag_seconds: Gauge<i64, AtomicI64>,
    /// `crm_outbox_published_total`.
    pub outbox_published: Counter,
    /// `crm_outbox_relay_errors_total`.
    pub outbox_errors: Counter,
    /// `crm_outbox_republished_total`: events published again after the stream lost them.
    pub outbox_republished: Counter,
    /// `crm_outbox_duplicates_avoided_total`: events a failed round had appended, recorded rather than appended twice.
    pub outbox_duplicates_avoided: Counter,
    /// `crm_stream_losses_total`: times the stream was found behind the outbox.
    pub stream_losses: Counter,
    /// `crm_stream_trimmed_total`: entries trimmed once every group was past them.
    pub stream_trimmed: Counter,
    /// `crm_events_consumed_total{consumer, outcome}` (applied, duplicate, dead_letter, lost).
    pub events_consumed: Family<Labels, Counter>,
    /// `crm_consumer_errors_total{consumer}`.
    pub consumer_errors: Family<Labels, Counter>,
    /// `crm_health_serving`: 1 when the service reports SERVING.
    pub serving: Gauge<i64, AtomicI64>,
    /// `crm_retention_purged_total{table}`: rows deleted past their retention.
    pub retention_purged: Family<Labels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Creates the registry with the kit's metrics; every series carries `service`.
    pub fn new(service: &str) -> Self {
        let mut registry =
            Registry::with_prefix_and_labels("crm", [("service".into(), service.to_string().into())].into_iter());
        let m = Metrics {
            registry: Arc::new(Mutex::new(Registry::default())),
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            in_flight: Gauge::default(),
            shed: Counter::default(),
            outbox_pending: Gauge::default(),
            outbox_lag_seconds: Gauge::default(),
            outbox_published: Counter::default(),
            outbox_errors: Counter::default(),
            outbox_republished: Counter::default(),
            outbox_duplicates_avoided: Counter::default(),
            stream_losses: Counter::default(),
            stream_trimmed: Counter::default(),
            events_consumed: Family::default(),
            consumer_errors: Family::default(),
            serving: Gauge::default(),
            retention_purged: Family::default(),
        };
        registry.register(
            "grpc_server_requests",
            "gRPC requests handled, by method and status code",
            m.requests.clone(),
        );
        registry.register(
            "grpc_server_request_duration_seconds",
            "gRPC request latency until the response ends",
            m.latency.clone(),
        );
        registry.register("grpc_server_in_flight_requests", "gRPC requests being handled now", m.in_flight.clone());
        registry.register(
            "grpc_server_shed",
            "Requests refused at once because the replica was at MAX_CONCURRENT_REQUESTS",
            m.shed.clone(),
        );
        registry.register("outbox_pending_events", "Events committed but not yet published", m.outbox_pending.clone());
        registry.register(
            "outbox_oldest_pending_age_seconds",
            "Age of the oldest unpublished event (outbox lag)",
            m.outbox_lag_seconds.clone(),
        );
        registry.register("outbox_published", "Events published to the bus", m.outbox_published.clone());
        registry.register(
            "outbox_relay_errors",
            "Failed relay rounds (e.g. Redis unreachable)",
            m.outbox_errors.clone(),
        );
        registry.register(
            "outbox_republished",
            "Events published again because the stream had lost them",
            m.outbox_republished.clone(),
        );
        registry.register(
            "outbox_duplicates_avoided",
            "Events a failed relay round had appended, recorded instead of appended twice",
            m.outbox_duplicates_avoided.clone(),
        );
        registry.register(
            "stream_losses",
            "Times the stream was found behind what the outbox recorded (Redis lost entries)",
            m.stream_losses.clone(),
        );
        registry.register(
            "stream_trimmed",
            "Stream entries trimmed once every consumer group was past them",
            m.stream_trimmed.clone(),
        );
        registry.register("events_consumed", "Events handled by consumers, by outcome", m.events_consumed.clone());
        registry.register("consumer_errors", "Transient consumer failures (retried)", m.consumer_errors.clone());
        registry.register("health_serving", "1 when health reports SERVING", m.serving.clone());
        registry.register(
            "retention_purged",
            "Idempotency keys and inbox entries deleted past their retention, by table",
            m.retention_purged.clone(),
        );
        *m.registry.lock().unwrap_or_else(|p| p.into_inner()) = registry;
        m
    }

    /// Registers a service's own metric, named `crm_<name>`.
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        self.registry.lock().unwrap_or_else(|p| p.into_inner()).register(name, help, metric);
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &registry);
        out
    }

    /// Serves `GET /metrics` until `shutdown` resolves.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        use axum::routing::get;
        let app = axum::Router::new().route(
            "/metrics",
            get(move || {
                let m = self.clone();
                async move {
                    (
                        [(http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
                        m.render(),
                    )
                }
            }),
        );
        axum::serve(listener, app).with_graceful_shutdown(shutdown).await
    }

    /// Binds the metrics address.
    pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
        tokio::net::TcpListener::bind(addr).await
    }
}
