//! The tower layer every request passes through before reaching a handler
//! (SPEC 2, REL-4, SEC-1). In order:
//!
//! 1. Health and reflection go straight through (no auth, no span: probes
//!    must not flood traces).
//! 2. Load shedding: beyond `MAX_CONCURRENT_REQUESTS` in flight, the request
//!    is refused at once with RESOURCE_EXHAUSTED instead of queueing.
//! 3. A server span is created with its parent taken from the incoming
//!    `traceparent` *before* it is entered, and trace/span ids recorded.
//! 4. The bearer token is authenticated and the RPC's declared roles checked;
//!    the [`Caller`] is put into the request extensions.
//! 5. The deadline is the smaller of `REQUEST_TIMEOUT_MS` and the client's
//!    `grpc-timeout`; past it the client gets DEADLINE_EXCEEDED.
//! 6. The gRPC status is read from the response headers or trailers when the
//!    response ends, and counted with its latency. Metrics and span names
//!    carry the method only when it is a declared RPC; any other path is
//!    `unknown`, so a caller cannot grow the registry (REL-5).
//! 7. The request body is read through [`MessageLimit`]: a message declared
//!    larger than `MAX_MESSAGE_BYTES` is refused with RESOURCE_EXHAUSTED
//!    before any of it is buffered, a compressed or truncated one with
//!    INVALID_ARGUMENT (REL-5).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes_compat::Bytes;
use futures_util::future::BoxFuture;
use http_body::{Body as HttpBody, Frame};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::body::Body;
use tracing::Instrument;

use crate::auth::{AccessPolicy, Authenticator, Caller};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::telemetry;

mod bytes_compat {
    pub use prost::bytes::Bytes;
}

/// The default largest request message: gRPC's usual 4 MiB.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// How much earlier than the client's deadline the edge gives up: a tenth of
/// it, between 10 and 100 ms. A fixed 5 ms lost the race against tonic's own
/// timer (which answers CANCELLED) when the machine was busy.
fn deadline_margin(client: Duration) -> Duration {
    (client / 10).clamp(Duration::from_millis(10), Duration::from_millis(100))
}

/// Shared state of the edge.
#[derive(Clone)]
pub struct EdgeLayer {
    state: Arc<EdgeState>,
}

struct EdgeState {
    service: String,
    policy: AccessPolicy,
    auth: Authenticator,
    metrics: Metrics,
    permits: Arc<Semaphore>,
    request_timeout: Duration,
    long_running: std::collections::HashSet<String>,
    max_message_bytes: usize,
}

/// The label of a path that is not a declared RPC.
const UNKNOWN_METHOD: &str = "unknown";

impl EdgeLayer {
    /// Builds the edge of `service`.
    pub fn new(
        service: &str,
        policy: AccessPolicy,
        auth: Authenticator,
        metrics: Metrics,
        max_concurrent: usize,
        request_timeout: Duration,
    ) -> Self {
        Self {
            state: Arc::new(EdgeState {
                service: service.to_string(),
                policy,
                auth,
                metrics,
                permits: Arc::new(Semaphore::new(max_concurrent)),
                request_timeout,
                long_running: Default::default(),
                max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            }),
        }
    }

    /// The largest request message accepted (`MAX_MESSAGE_BYTES`).
    pub fn with_max_message_bytes(self, max: usize) -> Self {
        match Arc::try_unwrap(self.state) {
            Ok(mut state) => {
                state.max_message_bytes = max;
                Self { state: Arc::new(state) }
            }
            Err(state) => Self { state },
        }
    }

    /// Paths exempt from the server's default deadline (streaming imports).
    pub fn with_long_running(self, paths: std::collections::HashSet<String>) -> Self {
        match Arc::try_unwrap(self.state) {
            Ok(mut state) => {
                state.long_running = paths;
                Self { state: Arc::new(state) }
            }
            Err(state) => Self { state },
        }
    }
}

impl<S> tower::Layer<S> for EdgeLayer {
    type Service = Edge<S>;
    fn layer(&self, inner: S) -> Edge<S> {
        Edge { inner, state: self.state.clone() }
    }
}

/// The edge service wrapping the router.
#[derive(Clone)]
pub struct Edge<S> {
    inner: S,
    state: Arc<EdgeState>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<S> tower::Service<http::Request<Body>> for Edge<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        // Take the service that was polled ready; leave a fresh clone behind.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let state = self.state.clone();
        let raw_path = req.uri().path();

        if AccessPolicy::is_public(raw_path) {
            return Box::pin(async move { inner.call(req).await.map_err(Into::into) });
        }
        // Only declared RPCs name a metric series or a span (REL-5).
        let declared = state.policy.roles_for(raw_path).is_some();
        let path = raw_path.to_string();
        let label: Arc<str> = if declared { Arc::from(path.as_str()) } else { Arc::from(UNKNOWN_METHOD) };
        let limit = MessageLimit::new(state.max_message_bytes, &state.service);
        let mut req = req.map(|body| Body::new(limit.wrap(body)));

        Box::pin(async move {
            let Ok(permit) = state.permits.clone().try_acquire_owned() else {
                state.metrics.shed.inc();
                let status =
                    ApiError::ResourceExhausted("server is at its concurrency limit; retry with backoff".into())
                        .into_status(&state.service);
                record(&state.metrics, &label, "RESOURCE_EXHAUSTED", Duration::ZERO);
                return Ok(status.into_http());
            };

            let (rpc_service, rpc_method) = label.trim_start_matches('/').split_once('/').unwrap_or((&label, ""));
            let span = tracing::info_span!(
                "grpc.server",
                otel.name = %label.trim_start_matches('/'),
                otel.kind = "server",
                otel.status_code = tracing::field::Empty,
                rpc.system = "grpc",
                rpc.service = %rpc_service,
                rpc.method = %rpc_method,
                rpc.grpc.status_code = tracing::field::Empty,
                enduser.id = tracing::field::Empty,
                trace_id = tracing::field::Empty,
                span_id = tracing::field::Empty,
            );
            telemetry::adopt_parent(&span, telemetry::extract_from_headers(req.headers()));

            let started = Instant::now();
            state.metrics.in_flight.inc();
            let completion = Completion {
                metrics: state.metrics.clone(),
                path: label.clone(),
                started,
                span: span.clone(),
                code: None,
                _permit: permit,
            };

            let handled = async {
                let caller = match state.auth.authenticate(req.headers()) {
                    Ok(c) => c,
                    Err(e) => return Ok(e.into_status(&state.service).into_http()),
                };
                tracing::Span::current().record("enduser.id", caller.subject.as_str());
                if let Err(e) = state.policy.authorize(&path, &caller) {
                    return Ok(e.into_status(&state.service).into_http());
                }
                // tonic enforces the client's grpc-timeout outside this layer but
                // answers CANCELLED; answering a little earlier gives the client
                // the DEADLINE_EXCEEDED the gRPC spec asks for.
                let server_limit = if state.long_running.contains(&path) {
                    Duration::from_secs(24 * 3600)
                } else {
                    state.request_timeout
                };
                let deadline = match grpc_timeout(req.headers()) {
                    Some(client) => client.saturating_sub(deadline_margin(client)).min(server_limit),
                    None => server_limit,
                };
                req.extensions_mut().insert::<Caller>(caller);
                match tokio::time::timeout(deadline, inner.call(req)).await {
                    Ok(result) => result.map_err(Into::into),
                    Err(_) => Ok(ApiError::DeadlineExceeded(format!(
                        "request did not complete within its deadline of {} ms",
                        deadline.as_millis()
                    ))
                    .into_status(&state.service)
                    .into_http()),
                }
            }
            .instrument(span)
            .await;

            let response: http::Response<Body> = match handled {
                Ok(r) => r,
                Err(e) => {
                    // The router is infallible; keep the client informed all the same.
                    drop(completion);
                    return Err(e);
                }
            };
            // tonic's own size check (if a service's decoder limit is below
            // ours) answers OUT_OF_RANGE; no handler does, so it is a too-large message.
            let response = if header_code(response.headers()) == Some(tonic::Code::OutOfRange) {
                limit.too_large(None).into_http()
            } else {
                response
            };
            let mut completion = completion;
            if let Some(code) = header_code(response.headers()) {
                completion.code = Some(code);
            }
            let (parts, body) = response.into_parts();
            Ok(http::Response::from_parts(parts, Body::new(ObservedBody { inner: body, completion: Some(completion) })))
        })
    }
}

fn header_code(headers: &http::HeaderMap) -> Option<tonic::Code> {
    headers.get("grpc-status").and_then(|v| v.to_str().ok()).and_then(|s| s.parse::<i32>().ok()).map(tonic::Code::from)
}

/// Parses the gRPC `grpc-timeout` header: up to 8 digits and a unit (H M S m u n).
pub fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

fn record(metrics: &Metrics, method: &str, code: &str, elapsed: Duration) {
    metrics.requests.get_or_create(&vec![("method", method.to_string()), ("code", code.to_string())]).inc();
    metrics.latency.get_or_create(&vec![("method", method.to_string())]).observe(elapsed.as_secs_f64());
}

/// Records a request's outcome when its response ends (or is dropped).
struct Completion {
    metrics: Metrics,
    /// The declared method, or `unknown`.
    path: Arc<str>,
    started: Instant,
    span: tracing::Span,
    code: Option<tonic::Code>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Completion {
    fn drop(&mut self) {
        // A response dropped before its trailers: the client went away.
        let code = self.code.unwrap_or(tonic::Code::Cancelled);
        let elapsed = self.started.elapsed();
        let name = code_name(code);
        self.metrics.in_flight.dec();
        record(&self.metrics, &self.path, name, elapsed);
        self.span.record("rpc.grpc.status_code", code as i32);
        let server_fault = matches!(
            code,
            tonic::Code::Unknown
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Unimplemented
                | tonic::Code::Internal
                | tonic::Code::Unavailable
                | tonic::Code::DataLoss
        );
        let _enter = self.span.enter();
        if server_fault {
            self.span.record("otel.status_code", "ERROR");
            tracing::warn!(method = %self.path, code = name, elapsed_ms = elapsed.as_millis() as u64, "request failed");
        } else if code != tonic::Code::Ok {
            tracing::info!(method = %self.path, code = name, elapsed_ms = elapsed.as_millis() as u64, "request refused");
        } else {
            tracing::debug!(method = %self.path, elapsed_ms = elapsed.as_millis() as u64, "request done");
        }
    }
}

/// A response body that reports the gRPC status found in its trailers.
struct ObservedBody {
    inner: Body,
    completion: Option<Completion>,
}

impl HttpBody for ObservedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(c) = this.completion.as_mut()
                {
                    c.code = header_code(trailers).or(c.code);
                }
            }
            Poll::Ready(Some(Err(status))) => {
                if let Some(c) = this.completion.as_mut() {
                    c.code = Some(status.code());
                }
            }
            Poll::Ready(None) => {
                if let Some(mut c) = this.completion.take() {
                    c.code = c.code.or(Some(tonic::Code::Ok));
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// REL-5: reads the gRPC framing of a request body as it streams by (a
/// flag byte and a 4-byte length before each message) and fails the body,
/// before the message is buffered, when a message is declared larger than
/// the limit, is compressed (no compression is accepted) or is cut short.
/// tonic hands the failure to the handler as its status.
#[derive(Clone)]
struct MessageLimit {
    max: usize,
    service: Arc<str>,
}

impl MessageLimit {
    fn new(max: usize, service: &str) -> Self {
        Self { max, service: Arc::from(service) }
    }

    fn wrap(&self, inner: Body) -> LimitedBody {
        LimitedBody { inner, limit: self.clone(), header: [0; 5], have: 0, remaining: 0, failed: false }
    }

    fn too_large(&self, size: Option<usize>) -> tonic::Status {
        let size = size.map(|n| format!(" ({n} bytes)")).unwrap_or_default();
        ApiError::TooLarge(format!(
            "the request message{size} is larger than the {} bytes this service accepts (MAX_MESSAGE_BYTES); send smaller requests or fewer rows per request",
            self.max
        ))
        .into_status(&self.service)
    }

    fn malformed(&self, why: &str) -> tonic::Status {
        crm_proto::codec::malformed_in(&format!("crm.{}", self.service), format!("malformed request: {why}"))
    }
}

struct LimitedBody {
    inner: Body,
    limit: MessageLimit,
    /// The frame header being read, and how many of its bytes are in.
    header: [u8; 5],
    have: usize,
    /// Bytes of the current message still to come.
    remaining: usize,
    failed: bool,
}

impl LimitedBody {
    /// Walks the frames in `data`; an error if one breaks the limit.
    fn check(&mut self, mut data: &[u8]) -> Result<(), tonic::Status> {
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = self.remaining.min(data.len());
                self.remaining -= n;
                data = &data[n..];
                continue;
            }
            let n = (5 - self.have).min(data.len());
            self.header[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have < 5 {
                break;
            }
            self.have = 0;
            if self.header[0] != 0 {
                return Err(self.limit.malformed("compressed messages are not accepted"));
            }
            let len = u32::from_be_bytes([self.header[1], self.header[2], self.header[3], self.header[4]]) as usize;
            if len > self.limit.max {
                return Err(self.limit.too_large(Some(len)));
            }
            self.remaining = len;
        }
        Ok(())
    }
}

impl HttpBody for LimitedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.failed {
            return Poll::Ready(None);
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && let Err(status) = this.check(data)
                {
                    this.failed = true;
                    return Poll::Ready(Some(Err(status)));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) if this.have > 0 || this.remaining > 0 => {
                this.failed = true;
                Poll::Ready(Some(Err(this.limit.malformed("the request ended in the middle of a message"))))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units_parse() {
        let mut h = http::HeaderMap::new();
        h.insert("grpc-timeout", "250m".parse().unwrap());
        assert_eq!(grpc_timeout(&h), Some(Duration::from_millis(250)));
        h.insert("grpc-timeout", "2S".parse().unwrap());
        assert_eq!(grpc_timeout(&h), Some(Duration::from_secs(2)));
        h.insert("grpc-timeout", "1x".parse().unwrap());
        assert_eq!(grpc_timeout(&h), None);
        h.insert("grpc-timeout", "123456789m".parse().unwrap());
        assert_eq!(grpc_timeout(&h), None);
    }
}
