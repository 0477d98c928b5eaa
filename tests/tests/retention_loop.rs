//! Issue 7 end to end: all five services as real processes on real
//! PostgreSQL and Redis, the retention loop driven through their public
//! gRPC APIs (the same driver as `make demo`), and the results checked:
//! the holdout is never contacted, lift is computed from exactly the
//! campaign's groups, a complaint's SLA breach shows up in analytics, and one
//! request's trace id is in spans of every service it crossed, events included.

use std::time::Duration;

use crm_demo::{LoopConfig, Suite, Urls};
use crm_e2e::{Receiver, ServiceProcess};
use crm_kit::Role;
use crm_proto::common::v1::Channel;
use crm_proto::feedback::v1 as fb;
use crm_proto::feedback::v1::feedback_service_client::FeedbackServiceClient;

#[tokio::test]
async fn the_retention_loop_runs_across_all_five_services_in_one_trace() {
    let receiver = Receiver::start().await;
    let prefix = crm_kit::testing::unique_name("e2e");
    let common = [
        ("EVENT_STREAM_PREFIX", prefix.as_str()),
        ("CONSUMER_BLOCK_MS", "200"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let with = |extra: &[(&'static str, String)]| -> Vec<(&str, String)> {
        common.iter().map(|(k, v)| (*k, v.to_string())).chain(extra.iter().cloned()).collect()
    };
    let start = |service: &'static str, env: Vec<(&'static str, String)>| async move {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        ServiceProcess::start(service, &env).await
    };
    let mut profiles = start("profiles", with(&[])).await;
    let mut segmentation = start("segmentation", with(&[])).await;
    let mut outreach =
        start("outreach", with(&[("OUTREACH_PROFILES_URL", profiles.url.clone()), ("OUTREACH_POLL_MS", "50".into())]))
            .await;
    // Complaint SLAs of seconds around the clock, so a breach happens within the test.
    let mut feedback = start(
        "feedback",
        with(&[
            ("FEEDBACK_PROFILES_URL", profiles.url.clone()),
            ("FEEDBACK_OUTREACH_URL", outreach.url.clone()),
            ("FEEDBACK_SLA_POLICIES", "complaint=3s/30s@24x7,urgent=3s/30s".into()),
            ("FEEDBACK_WATCH_INTERVAL_MS", "200".into()),
        ]),
    )
    .await;
    let mut analytics = start("analytics", with(&[])).await;

    let urls = Urls {
        profiles: profiles.url.clone(),
        segmentation: segmentation.url.clone(),
        outreach: outreach.url.clone(),
        feedback: feedback.url.clone(),
        analytics: analytics.url.clone(),
    };
    let token = crm_kit::testing::token(&[Role::Admin, Role::Service, Role::Analyst], true);
    let suite = Suite::connect(&urls, &token).expect("clients");
    let cfg = LoopConfig {
        customers: 150,
        run: crm_kit::testing::unique_name("loop"),
        patience: Duration::from_secs(180),
        expect_breach: true,
        ..Default::default()
    };
    let report = crm_demo::retention_loop(&suite, &cfg).await.unwrap_or_else(|e| panic!("the loop failed: {e}"));
    println!("{}", report.render());

    // The holdout is recorded and never contacted.
    assert!(!report.holdout.is_empty(), "a 10 % holdout of {} customers", report.segment.1);
    assert_eq!(report.holdout_contacted, 0);
    assert!(report.contacted > 0);
    // Lift from exactly the campaign's groups: every member counted once, on its side.
    let (t, c) = (report.lift.treated.unwrap(), report.lift.control.unwrap());
    assert_eq!(c.denominator as usize, report.holdout.len(), "control = the holdout");
    assert_eq!(
        (t.denominator + c.denominator) as usize,
        report.decisions.values().sum::<usize>(),
        "every member, once"
    );
    assert_eq!((t.numerator as usize, c.numerator as usize), report.conversions, "the conversions within the window");
    let expect = crm_analytics::domain::stats::two_proportions(
        t.numerator as u64,
        t.denominator as u64,
        c.numerator as u64,
        c.denominator as u64,
        0.95,
    );
    assert!((report.lift.absolute_lift - expect.difference).abs() < 1e-12);
    // A complaint left unanswered breached its SLA, and analytics shows it.
    let sla = report.quality.sla_compliance.unwrap();
    assert!(sla.numerator < sla.denominator, "{sla:?}");
    assert!(report.quality.nps != 0.0 && report.quality.csat > 0.0);

    // One request, five services: a complaint is checked in profiles,
    // acknowledged by outreach, raises churn risk in segmentation (its events)
    // and lands in analytics (its events), all in the caller's trace.
    let trace_id = "5b8efff798038103d269b633813fc60c";
    let agent = crm_kit::testing::token(&[Role::Agent], false);
    let tp = format!("00-{trace_id}-eee19b7ec3c1b174-01");
    let mut f = FeedbackServiceClient::with_interceptor(
        crm_kit::client::channel(&feedback.url).unwrap(),
        move |mut req: tonic::Request<()>| {
            req.metadata_mut().insert("authorization", format!("Bearer {agent}").parse().expect("ascii"));
            req.metadata_mut().insert("traceparent", tp.parse().expect("ascii"));
            Ok(req)
        },
    );
    let customer = report.holdout.iter().next().cloned().expect("a customer");
    f.submit_feedback(fb::SubmitFeedbackRequest {
        feedback: Some(fb::Feedback {
            customer_id: customer,
            channel: Channel::Hotline as i32,
            text: "客服态度很差，问三遍都答非所问，我要投诉".into(),
            ..Default::default()
        }),
        request_id: crm_kit::testing::unique_name("traced"),
    })
    .await
    .expect("submit");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let services = ["crm-analytics", "crm-feedback", "crm-outreach", "crm-profiles", "crm-segmentation"];
    loop {
        let seen = receiver.services_in(trace_id);
        if services.iter().all(|s| seen.contains(*s)) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the trace reached only {seen:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let names: Vec<(String, String)> =
        receiver.spans().into_iter().filter(|s| s.trace_id == trace_id).map(|s| (s.service, s.name)).collect();
    for (service, span) in [
        ("crm-segmentation", "consume crm.feedback.v1.TicketOpened"),
        ("crm-analytics", "consume crm.feedback.v1.FeedbackReceived"),
        ("crm-outreach", "crm.outreach.v1.OutreachService/AcknowledgeFeedback"),
        ("crm-profiles", "crm.profiles.v1.ProfilesService/GetCustomer"),
    ] {
        assert!(names.iter().any(|(s, n)| s == service && n == span), "{service}: {span} missing from {names:?}");
    }
    for s in [&mut analytics, &mut feedback, &mut outreach, &mut segmentation, &mut profiles] {
        s.terminate().await;
    }
}
