//! With OTEL_EXPORTER_OTLP_ENDPOINT set, a service exports its spans over
//! OTLP/gRPC (SPEC 2), here to a small receiver inside the test, and keeps
//! the caller's trace id and its own service name.

use std::time::Duration;

use crm_e2e::{Receiver, ServiceProcess};
use crm_proto::profiles::v1 as pb;
use crm_proto::profiles::v1::profiles_service_client::ProfilesServiceClient;

#[tokio::test]
async fn spans_are_exported_over_otlp_with_the_callers_trace_id() {
    let receiver = Receiver::start().await;
    let endpoint = receiver.endpoint.clone();
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
        let got = receiver.spans();
        if let Some(span) = got.iter().find(|s| s.trace_id == trace_id) {
            break span.clone();
        }
        if tokio::time::Instant::now() > deadline {
            // Flushing at shutdown is the last chance.
            profiles.terminate().await;
            let got = receiver.spans();
            break got
                .iter()
                .find(|s| s.trace_id == trace_id)
                .cloned()
                .unwrap_or_else(|| panic!("no span of the trace arrived: {got:?}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(found.service, "crm-profiles");
    assert_eq!(found.name, "crm.profiles.v1.ProfilesService/GetCustomer");
}
