//! Tracing, logs and W3C trace-context propagation (SPEC 2).
//!
//! - Every RPC is a span (created by [`crate::edge`]); its parent is taken
//!   from the incoming `traceparent`/`tracestate` metadata before the span is
//!   entered, so a trace never splits.
//! - Outgoing calls inject the current context ([`crate::client`]); events
//!   carry it in their envelope ([`event_trace_context`]) and consumers
//!   continue it ([`context_from_event`]).
//! - Logs are text or JSON and carry `trace_id`/`span_id` fields.
//! - Spans are exported with OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.

use std::collections::HashMap;
use std::sync::OnceLock;

use crm_proto::common::v1::TraceContext;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanExporter};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::KitConfig;

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Flushes and shuts the tracer provider down when dropped (end of `main`).
#[must_use = "dropping the guard flushes spans; keep it until shutdown"]
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
}

impl TelemetryGuard {
    /// Exports buffered spans now.
    pub fn flush(&self) {
        let _ = self.provider.force_flush();
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        let _ = self.provider.force_flush();
        let _ = self.provider.shutdown();
    }
}

/// Error installing telemetry.
#[derive(Debug, thiserror::Error)]
#[error("telemetry: {0}")]
pub struct TelemetryError(String);

/// Installs logging and tracing for a service from its configuration.
pub fn init(config: &KitConfig) -> Result<TelemetryGuard, TelemetryError> {
    let mut builder = SdkTracerProvider::builder()
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(config.trace_sample_ratio))))
        .with_resource(resource(&config.otel_service_name));
    if let Some(endpoint) = &config.otlp_endpoint {
        use opentelemetry_otlp::WithExportConfig;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .build()
            .map_err(|e| TelemetryError(format!("OTEL_EXPORTER_OTLP_ENDPOINT: {e}")))?;
        builder = builder.with_batch_exporter(exporter);
    }
    install(builder.build(), &config.log_format, &config.otel_service_name)
}

/// Installs logging and tracing with a given exporter, exporting each span as
/// it ends, and logs to the test harness's captured output (tests use
/// `opentelemetry_sdk`'s in-memory exporter).
pub fn init_with_exporter<E: SpanExporter + 'static>(
    service_name: &str,
    exporter: E,
) -> Result<TelemetryGuard, TelemetryError> {
    let provider =
        SdkTracerProvider::builder().with_simple_exporter(exporter).with_resource(resource(service_name)).build();
    install(provider, "test", service_name)
}

fn resource(service_name: &str) -> Resource {
    Resource::builder()
        .with_service_name(service_name.to_string())
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build()
}

fn install(
    provider: SdkTracerProvider,
    log_format: &str,
    service_name: &str,
) -> Result<TelemetryGuard, TelemetryError> {
    if PROVIDER.set(provider.clone()).is_err() {
        return Err(TelemetryError("telemetry is already installed in this process".into()));
    }
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    opentelemetry::global::set_tracer_provider(provider.clone());
    let tracer = provider.tracer(service_name.to_string());
    // RUST_LOG filters logs only. Spans feed tracing (and trace propagation) at
    // INFO whatever the log level: a quiet log must not silently cut traces.
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_error_events_to_status(true)
        .with_filter(LevelFilter::INFO);
    let log_filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(otel);
    let result = if log_format == "test" {
        // Captured by the test harness, shown only for failing tests.
        registry
            .with(tracing_subscriber::fmt::layer().with_target(false).with_test_writer().with_filter(log_filter()))
            .try_init()
    } else if log_format == "json" {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(true)
                    .with_filter(log_filter()),
            )
            .try_init()
    } else {
        registry.with(tracing_subscriber::fmt::layer().with_target(false).with_filter(log_filter())).try_init()
    };
    result.map_err(|e| TelemetryError(format!("cannot install the log subscriber: {e}")))?;
    Ok(TelemetryGuard { provider })
}

/// Records the span's OpenTelemetry trace and span ids as the fields
/// `trace_id` and `span_id` (declared `Empty` when the span was created), so
/// every log line inside it carries them.
pub fn record_trace_ids(span: &Span) {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        span.record("trace_id", tracing::field::display(sc.trace_id()));
        span.record("span_id", tracing::field::display(sc.span_id()));
    }
}

/// Trace id of the current span as 32 hex digits, or "" outside a trace.
pub fn current_trace_id() -> String {
    let cx = Span::current().context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() { sc.trace_id().to_string() } else { String::new() }
}

/// The parent context carried by incoming HTTP/2 headers (gRPC metadata).
pub fn extract_from_headers(headers: &http::HeaderMap) -> Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// Writes `cx` into outgoing gRPC metadata as `traceparent`/`tracestate`.
pub fn inject_into_metadata(cx: &Context, metadata: &mut tonic::metadata::MetadataMap) {
    TraceContextPropagator::new().inject_context(cx, &mut MetadataInjector(metadata));
}

/// The trace context of the current span, for an event envelope.
pub fn event_trace_context() -> TraceContext {
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&Span::current().context(), &mut carrier);
    TraceContext {
        traceparent: carrier.remove("traceparent").unwrap_or_default(),
        tracestate: carrier.remove("tracestate").unwrap_or_default(),
    }
}

/// The parent context an event carries.
pub fn context_from_event(tc: Option<&TraceContext>) -> Context {
    let mut carrier: HashMap<String, String> = HashMap::new();
    if let Some(tc) = tc {
        if !tc.traceparent.is_empty() {
            carrier.insert("traceparent".into(), tc.traceparent.clone());
        }
        if !tc.tracestate.is_empty() {
            carrier.insert("tracestate".into(), tc.tracestate.clone());
        }
    }
    TraceContextPropagator::new().extract(&carrier)
}

/// Makes `parent` the parent of `span` (which must not have been entered yet)
/// and records its ids. A missing or invalid parent starts a new trace.
pub fn adopt_parent(span: &Span, parent: Context) {
    if parent.span().span_context().is_valid() {
        // Fails only if the span was already started; callers create it just before.
        let _ = span.set_parent(parent);
    }
    record_trace_ids(span);
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}
