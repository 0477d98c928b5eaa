//! REL-1 on every feedback RPC: missing and oversized fields, unknown enum
//! values, bad ratings, bad ids, bad page tokens and masks get
//! INVALID_ARGUMENT naming each bad field, and nothing is stored. Roles are
//! enforced per RPC (SEC-1).

mod common;

use common::*;
use crm_kit::Role;
use crm_kit::testing::bad_fields;
use crm_proto::common::v1::Channel;
use crm_proto::feedback::v1 as pb;
use tonic::Code;
use uuid::Uuid;

fn item(customer: &str, channel: i32, text: &str, rating: i32) -> pb::SubmitFeedbackRequest {
    pb::SubmitFeedbackRequest {
        feedback: Some(pb::Feedback {
            customer_id: customer.into(),
            channel,
            text: text.into(),
            rating,
            ..Default::default()
        }),
        request_id: rid(),
    }
}

#[tokio::test]
async fn bad_feedback_is_refused_naming_every_field_and_nothing_is_stored() {
    let app = start().await;
    let mut c = client(&app, &[Role::Agent]);
    let customer = Uuid::now_v7().to_string();
    let hotline = Channel::Hotline as i32;
    let cases: Vec<(pb::SubmitFeedbackRequest, Vec<&str>)> = vec![
        (
            pb::SubmitFeedbackRequest { feedback: None, request_id: rid() },
            vec!["feedback", "feedback.customer_id", "feedback.channel", "feedback.text"],
        ),
        (item(&customer, hotline, "", 0), vec!["feedback.text"]),
        (item(&customer, hotline, "   \n ", 0), vec!["feedback.text"]),
        (item(&customer, hotline, &"很".repeat(1_000_000), 0), vec!["feedback.text"]),
        (item(&customer, hotline, &"x".repeat(10_001), 0), vec!["feedback.text"]),
        (item(&customer, 999, "hello", 0), vec!["feedback.channel"]),
        (item(&customer, Channel::Sms as i32, "hello", 0), vec!["feedback.channel"]),
        (item(&customer, 0, "hello", 0), vec!["feedback.channel"]),
        (item(&customer, hotline, "hello", 6), vec!["feedback.rating"]),
        (item(&customer, hotline, "hello", -1), vec!["feedback.rating"]),
        (item("not-an-id", hotline, "hello", 0), vec!["feedback.customer_id"]),
        (item("", hotline, "hello", 0), vec!["feedback.customer_id"]),
        (
            pb::SubmitFeedbackRequest { request_id: String::new(), ..item(&customer, hotline, "hello", 0) },
            vec!["request_id"],
        ),
    ];
    for (req, fields) in cases {
        let e = c.submit_feedback(req).await.expect_err("refused");
        assert_eq!(bad_fields(&e), fields);
    }
    // Exactly 10 000 characters is accepted.
    c.submit_feedback(item(&customer, hotline, &"好".repeat(10_000), 0)).await.expect("10 000 characters");
    assert_eq!(count(&app, "feedback").await, 1);
}

fn fields<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> Vec<String> {
    bad_fields(&r.expect_err("refused"))
}

#[tokio::test]
async fn every_other_rpc_checks_its_fields() {
    let app = start().await;
    let mut c = client(&app, &[Role::Admin]);
    let id = Uuid::now_v7().to_string();
    assert_eq!(fields(c.get_feedback(pb::GetFeedbackRequest { feedback_id: "x".into() }).await), ["feedback_id"]);
    assert_eq!(
        fields(
            c.list_feedback(pb::ListFeedbackRequest {
                customer_id: "x".into(),
                category: 9,
                page_size: -1,
                ..Default::default()
            })
            .await
        ),
        ["page_size"]
    );
    assert_eq!(
        fields(
            c.list_feedback(pb::ListFeedbackRequest { customer_id: "x".into(), category: 9, ..Default::default() })
                .await
        ),
        ["customer_id", "category"]
    );
    assert_eq!(
        fields(c.list_feedback(pb::ListFeedbackRequest { page_token: "zz".into(), ..Default::default() }).await),
        ["page_token"]
    );
    assert_eq!(
        fields(
            c.reclassify_feedback(pb::ReclassifyFeedbackRequest {
                feedback_id: "x".into(),
                category: 0,
                request_id: String::new()
            })
            .await
        ),
        ["feedback_id", "category", "request_id"]
    );
    assert_eq!(fields(c.classify_text(pb::ClassifyTextRequest { text: String::new() }).await), ["text"]);
    assert_eq!(fields(c.get_ticket(pb::GetTicketRequest { ticket_id: "x".into() }).await), ["ticket_id"]);
    assert_eq!(
        fields(
            c.list_tickets(pb::ListTicketsRequest { state: 42, customer_id: "x".into(), ..Default::default() }).await
        ),
        ["customer_id", "state"]
    );
    assert_eq!(
        fields(
            c.assign_ticket(pb::AssignTicketRequest { ticket_id: id.clone(), assignee: " ".into(), request_id: rid() })
                .await
        ),
        ["assignee"]
    );
    assert_eq!(
        fields(
            c.transition_ticket(pb::TransitionTicketRequest {
                ticket_id: id.clone(),
                target_state: 99,
                new_category: 77,
                request_id: rid(),
                ..Default::default()
            })
            .await
        ),
        ["target_state", "new_category"]
    );
    assert_eq!(
        fields(
            c.record_verification(pb::RecordVerificationRequest {
                ticket_id: "x".into(),
                request_id: rid(),
                ..Default::default()
            })
            .await
        ),
        ["ticket_id"]
    );
    assert_eq!(
        fields(
            c.submit_survey_response(pb::SubmitSurveyResponseRequest {
                response: Some(pb::SurveyResponse {
                    customer_id: id.clone(),
                    kind: 5,
                    ticket_id: "t".into(),
                    ..Default::default()
                }),
                request_id: rid(),
            })
            .await
        ),
        ["response.kind", "response.ticket_id"]
    );
    assert_eq!(
        fields(
            c.create_improvement_action(pb::CreateImprovementActionRequest {
                action: Some(pb::ImprovementAction {
                    ticket_ids: vec!["nope".into()],
                    status: 12,
                    ..Default::default()
                }),
                request_id: rid(),
            })
            .await
        ),
        [
            "action.title",
            "action.owner_department",
            "action.success_measure",
            "action.deadline",
            "action.status",
            "action.ticket_ids[0]"
        ]
    );
    assert_eq!(
        fields(
            c.update_improvement_action(pb::UpdateImprovementActionRequest {
                action: Some(pb::ImprovementAction { action_id: id.clone(), ..Default::default() }),
                update_mask: Some(prost_types::FieldMask { paths: vec!["owner".into()] }),
                request_id: rid(),
                ..Default::default()
            })
            .await
        ),
        ["update_mask"]
    );
    assert_eq!(
        fields(c.list_improvement_actions(pb::ListImprovementActionsRequest { status: 8, ..Default::default() }).await),
        ["status"]
    );
    // Unknown ids are NOT_FOUND, naming the resource.
    let e = c.get_ticket(pb::GetTicketRequest { ticket_id: id.clone() }).await.expect_err("unknown");
    assert_eq!(e.code(), Code::NotFound);
    let e = c
        .create_improvement_action(pb::CreateImprovementActionRequest {
            action: Some(pb::ImprovementAction {
                title: "t".into(),
                owner_department: "d".into(),
                success_measure: "m".into(),
                deadline: Some(prost_types::Timestamp { seconds: 1_900_000_000, nanos: 0 }),
                ticket_ids: vec![id],
                ..Default::default()
            }),
            request_id: rid(),
        })
        .await
        .expect_err("unknown ticket");
    assert_eq!(bad_fields(&e), ["action.ticket_ids"]);
    for table in ["feedback", "tickets", "survey_responses", "improvement_actions", "kit_outbox"] {
        assert_eq!(count(&app, table).await, 0, "{table} untouched");
    }
}

#[tokio::test]
async fn roles_are_enforced_per_rpc() {
    let app = start().await;
    let mut analyst = client(&app, &[Role::Analyst]);
    let e = analyst
        .submit_feedback(feedback(Uuid::now_v7(), Channel::Email, "hello"))
        .await
        .expect_err("analysts only read");
    assert_eq!(e.code(), Code::PermissionDenied);
    let mut agent = client(&app, &[Role::Agent]);
    let e =
        agent.get_classification_stats(pb::GetClassificationStatsRequest::default()).await.expect_err("agents do not");
    assert_eq!(e.code(), Code::PermissionDenied);
    let policies =
        analyst.list_sla_policies(pb::ListSlaPoliciesRequest {}).await.expect("analysts read policies").into_inner();
    assert_eq!(policies.policies.len(), 8);
    assert!(policies.calendar.contains("Asia/Shanghai"), "{}", policies.calendar);
    let c = analyst
        .classify_text(pb::ClassifyTextRequest { text: "What time does the store open?".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.category, pb::Category::FunctionInquiry as i32);
}
