//! With OTEL_EXPORTER_OTLP_ENDPOINT set, a service exports its spans over
//! OTLP/gRPC (SPEC 2), here to a small receiver inside the test, and keeps
//! the caller's trace id and its own service name.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crm_e2e::ServiceProcess;
use crm_proto::profiles::v1 as pb;
use crm_proto::profiles::v1::profiles_service_client::ProfilesServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

/// (service.name, trace id hex, span name) of every span received.
#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<(String, String, String)>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut seen = self.0.lock().map_err(|e| tonic::Status::internal(e.to_string()))?;
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
                    let trace: String = span.trace_id.iter().map(|b| format!("{b:02x}")).collect();
                    seen.push((service.clone(), trace, span.name));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

#[tokio::test]
async fn spans_are_exported_over_otlp_with_the_callers_trace_id() {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let server = receiver.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(server))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });

    let endpoint = format!("http://127.0.0.1:{port}");
    let mut profiles = ServiceProcess::start(
        "profiles",
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "100")],
    )
    .await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let token = crm_kit::testing::token(&[crm_kit::Role::Admin], false);
    let channel = crm_kit::client::channel(&profiles.url).expect("channel");
    let mut client = ProfilesServiceClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
        let md = req.metadata_mut();
        md.insert("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01").parse().expect("ascii"));
        md.insert("authorization", format!("Bearer {token}").parse().expect("ascii"));
        Ok(req)
    });
    let err = client
        .get_customer(pb::GetCustomerRequest {
            customer_id: "00000000-0000-0000-0000-0000000000aa".into(),
            purpose: String::new(),
        })
        .await
        .expect_err("no such customer");
    assert_eq!(err.code(), tonic::Code::NotFound);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let found = loop {
        let got = receiver.0.lock().expect("lock").clone();
        if let Some(span) = got.iter().find(|(_, t, _)| t == trace_id) {
            break span.clone();
        }
        if tokio::time::Instant::now() > deadline {
            // Flushing at shutdown is the last chance.
            profiles.terminate().await;
            let got = receiver.0.lock().expect("lock").clone();
            break got
                .iter()
                .find(|(_, t, _)| t == trace_id)
                .cloned()
                .unwrap_or_else(|| panic!("no span of the trace arrived: {got:?}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(found.0, "crm-profiles");
    assert_eq!(found.2, "crm.profiles.v1.ProfilesService/GetCustomer");
}
