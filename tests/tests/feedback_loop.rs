//! Issue 6 across real processes: feedback intake -> profiles lookup ->
//! outreach acknowledgement, all in one trace (exported over OTLP to a
//! receiver in the test); the feedback shows in the profiles timeline (PRF-5)
//! and, once its ticket is resolved, the customer gets a resolution check.

use crm_e2e::{Receiver, ServiceProcess, wait_for};
use crm_kit::Role;
use crm_kit::testing::Bearer;
use crm_proto::common::v1::Channel;
use crm_proto::feedback::v1 as fb;
use crm_proto::feedback::v1::feedback_service_client::FeedbackServiceClient;
use crm_proto::outreach::v1 as out;
use crm_proto::outreach::v1::outreach_service_client::OutreachServiceClient;
use crm_proto::profiles::v1 as pb;
use crm_proto::profiles::v1::profiles_service_client::ProfilesServiceClient;

#[tokio::test]
async fn intake_checks_profiles_and_acknowledges_through_outreach_in_one_trace() {
    let receiver = Receiver::start().await;
    let prefix = crm_kit::testing::unique_name("e2e");
    let otel = receiver.endpoint.as_str();
    let common = [
        ("EVENT_STREAM_PREFIX", prefix.as_str()),
        ("CONSUMER_BLOCK_MS", "200"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", otel),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let mut profiles = ServiceProcess::start("profiles", &common).await;
    let mut env: Vec<(&str, &str)> = common.to_vec();
    env.extend([("OUTREACH_PROFILES_URL", profiles.url.as_str()), ("OUTREACH_POLL_MS", "50")]);
    let mut outreach = ServiceProcess::start("outreach", &env).await;
    let mut env: Vec<(&str, &str)> = common.to_vec();
    env.extend([
        ("FEEDBACK_PROFILES_URL", profiles.url.as_str()),
        ("FEEDBACK_OUTREACH_URL", outreach.url.as_str()),
        ("FEEDBACK_WATCH_INTERVAL_MS", "200"),
    ]);
    let mut feedback = ServiceProcess::start("feedback", &env).await;

    let admin = crm_kit::testing::token(&[Role::Admin], true);
    let mut p = ProfilesServiceClient::with_interceptor(
        crm_kit::client::channel(&profiles.url).unwrap(),
        Bearer(admin.clone()),
    );
    let customer = p
        .create_customer(pb::CreateCustomerRequest {
            customer: Some(pb::Customer {
                name: "Han Meimei".into(),
                email: "han.meimei@example.com".into(),
                timezone: "UTC".into(),
                preferred_channel: Channel::Email as i32,
                ..Default::default()
            }),
            request_id: crm_kit::testing::unique_name("create"),
        })
        .await
        .expect("create")
        .into_inner()
        .customer
        .expect("customer")
        .customer_id;

    // The agent desktop submits a complaint inside a trace of its own.
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let traceparent = format!("00-{trace_id}-b7ad6b7169203331-01");
    let agent = crm_kit::testing::token(&[Role::Agent], false);
    let mut f = FeedbackServiceClient::with_interceptor(
        crm_kit::client::channel(&feedback.url).unwrap(),
        Bearer(agent.clone()),
    );
    let mut submit = tonic::Request::new(fb::SubmitFeedbackRequest {
        feedback: Some(fb::Feedback {
            customer_id: customer.clone(),
            channel: Channel::Email as i32,
            text: "My parcel never arrived and nobody answers the hotline. Very disappointed.".into(),
            ..Default::default()
        }),
        request_id: crm_kit::testing::unique_name("fb"),
    });
    submit.metadata_mut().insert("traceparent", traceparent.parse().expect("ascii"));
    let submitted = f.submit_feedback(submit).await.expect("submit").into_inner();
    let item = submitted.feedback.expect("feedback");
    assert!(item.customer_verified, "profiles confirmed the customer");
    let ticket = submitted.ticket.expect("a complaint opens a ticket");

    // outreach recorded the acknowledgement for the customer.
    let mut o = OutreachServiceClient::with_interceptor(
        crm_kit::client::channel(&outreach.url).unwrap(),
        Bearer(admin.clone()),
    );
    let messages = |o: &mut OutreachServiceClient<_>| {
        let req = out::ListMessagesRequest { customer_id: customer.clone(), page_size: 10, ..Default::default() };
        let mut o = o.clone();
        async move { o.list_messages(req).await.expect("messages").into_inner().messages }
    };
    let mut ack = None;
    wait_for("the acknowledgement in outreach", async || {
        ack = messages(&mut o).await.into_iter().find(|m| m.trigger == "feedback_acknowledgement");
        ack.is_some()
    })
    .await;

    // One trace across the three services: feedback's request, its call to
    // profiles, and outreach's handling of the acknowledgement.
    // Each service exports its spans in its own batches: another span of a
    // service can arrive before the one asked for, so wait for the RPCs.
    let rpcs = [
        "crm.feedback.v1.FeedbackService/SubmitFeedback",
        "crm.profiles.v1.ProfilesService/GetCustomer",
        "crm.outreach.v1.OutreachService/AcknowledgeFeedback",
    ];
    let traced =
        || -> Vec<String> { receiver.spans().into_iter().filter(|s| s.trace_id == trace_id).map(|s| s.name).collect() };
    wait_for("the three services' RPCs in the trace", async || {
        let names = traced();
        rpcs.iter().all(|rpc| names.iter().any(|n| n == rpc))
    })
    .await;
    assert_eq!(receiver.services_in(trace_id).len(), 3, "spans of all three services in the trace");
    let names = traced();
    for rpc in rpcs {
        assert!(names.iter().any(|n| n == rpc), "{rpc} missing from the trace: {names:?}");
    }

    // PRF-5: the feedback reaches the customer's timeline in profiles.
    wait_for("the feedback in the profiles timeline", async || {
        let t = p
            .list_timeline(pb::ListTimelineRequest {
                customer_id: customer.clone(),
                page_size: 20,
                ..Default::default()
            })
            .await
            .expect("timeline")
            .into_inner();
        t.entries.iter().any(|e| e.source_service == "feedback" && e.source_id == item.feedback_id)
    })
    .await;

    // Closed loop: resolving the ticket asks the customer to confirm.
    let mut f =
        FeedbackServiceClient::with_interceptor(crm_kit::client::channel(&feedback.url).unwrap(), Bearer(agent));
    for state in [fb::TicketState::Acknowledged, fb::TicketState::InProgress, fb::TicketState::Resolved] {
        f.transition_ticket(fb::TransitionTicketRequest {
            ticket_id: ticket.ticket_id.clone(),
            target_state: state as i32,
            request_id: crm_kit::testing::unique_name("move"),
            ..Default::default()
        })
        .await
        .expect("transition");
    }
    wait_for("the resolution check in outreach", async || {
        messages(&mut o).await.iter().any(|m| m.trigger == "feedback_verification")
    })
    .await;

    for s in [&mut feedback, &mut outreach, &mut profiles] {
        s.terminate().await;
    }
}
