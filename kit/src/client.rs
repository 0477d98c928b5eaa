//! Outgoing gRPC calls to other services (SPEC 2): every call carries the
//! current trace context (`traceparent`/`tracestate`) and this service's
//! bearer token, injected by an interceptor rather than by hand in handlers.
//!
//! ```ignore
//! let channel = client::channel("http://profiles:50051")?;
//! let mut profiles = ProfilesServiceClient::with_interceptor(channel, client::Outgoing::new(&kit.auth, "feedback"));
//! ```

use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::auth::Authenticator;
use crate::telemetry;

/// A lazily connecting channel to `url` with sane timeouts.
pub fn channel(url: &str) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(url.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true)
        .connect_lazy())
}

/// Injects trace context and the service's bearer token into every call.
#[derive(Clone, Debug)]
pub struct Outgoing {
    auth: Option<Authenticator>,
    service: String,
}

impl Outgoing {
    /// Calls made by `service`, authenticated with its service token.
    pub fn new(auth: &Authenticator, service: &str) -> Self {
        Self { auth: Some(auth.clone()), service: service.to_string() }
    }

    /// Trace propagation only (no token), e.g. for tests and tools.
    pub fn trace_only() -> Self {
        Self { auth: None, service: String::new() }
    }
}

impl Interceptor for Outgoing {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let cx = tracing::Span::current().context();
        telemetry::inject_into_metadata(&cx, request.metadata_mut());
        if let Some(auth) = &self.auth
            && let Some(token) = auth.service_token(&self.service).map_err(|e| e.into_status(&self.service))?
        {
            let value = MetadataValue::try_from(format!("Bearer {token}"))
                .map_err(|_| tonic::Status::internal("service token is not valid metadata"))?;
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}
