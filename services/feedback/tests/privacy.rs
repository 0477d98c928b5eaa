//! What a caller without `pii:read` sees of customers' own words (SEC-4),
//! what events carry of them (SEC-5), and the authoritative answer to
//! "does this customer have an open complaint?" outreach asks (REL-6).

mod common;

use std::sync::atomic::Ordering;

use common::*;
use crm_kit::Role;
use crm_kit::privacy::WITHHELD;
use crm_proto::common::v1::Channel;
use crm_proto::feedback::v1 as pb;
use tonic::Code;
use uuid::Uuid;

const SAID: &str = "我是张三丰，快递丢了，请打13812345678或发邮件 zhang@example.com，三丰等着";
const MASKED: &str = "我是张**，快递丢了，请打138****5678或发邮件 z***@example.com，**等着";

async fn outbox_mentions(app: &App, needle: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM kit_outbox WHERE position(convert_to($1, 'UTF8') IN envelope) > 0")
        .bind(needle)
        .fetch_one(&app.pool)
        .await
        .expect("outbox")
}

#[tokio::test]
async fn sec4_feedback_text_ticket_notes_and_comments_are_masked_without_pii_read() {
    let app = start().await;
    let customer = Uuid::now_v7();
    app.masker.name(&customer.to_string(), "张三丰");
    let mut agent = client(&app, &[Role::Agent]);
    let mut reader = client_with(&app, &[Role::Agent], true);

    let submitted =
        agent.submit_feedback(feedback(customer, Channel::Hotline, SAID)).await.expect("submit").into_inner();
    let f = submitted.feedback.expect("feedback");
    assert_eq!(f.text, MASKED, "the submitter without pii:read gets it back masked too");
    let get = |id: &str| pb::GetFeedbackRequest { feedback_id: id.to_string() };
    assert_eq!(agent.get_feedback(get(&f.feedback_id)).await.expect("get").into_inner().text, MASKED);
    assert_eq!(reader.get_feedback(get(&f.feedback_id)).await.expect("get").into_inner().text, SAID);
    let listed = agent
        .list_feedback(pb::ListFeedbackRequest { customer_id: customer.to_string(), ..Default::default() })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.feedback.iter().map(|f| f.text.as_str()).collect::<Vec<_>>(), [MASKED]);

    // A note an agent wrote with the customer's number in it.
    let t = submitted.ticket.expect("a complaint opens a ticket");
    let moved = agent
        .transition_ticket(pb::TransitionTicketRequest {
            ticket_id: t.ticket_id.clone(),
            target_state: pb::TicketState::Acknowledged as i32,
            note: "called 138 1234 5678, 三丰 will wait".into(),
            request_id: rid(),
            ..Default::default()
        })
        .await
        .expect("acknowledge")
        .into_inner();
    let shown = agent.get_ticket(pb::GetTicketRequest { ticket_id: moved.ticket_id.clone() }).await.expect("ticket");
    let notes: Vec<String> = shown.into_inner().history.into_iter().map(|h| h.note).filter(|n| !n.is_empty()).collect();
    assert!(notes.contains(&"called 138****5678, ** will wait".to_string()), "{notes:?}");

    // A survey comment, in the answer and in the event.
    let answer = agent
        .submit_survey_response(pb::SubmitSurveyResponseRequest {
            response: Some(pb::SurveyResponse {
                customer_id: customer.to_string(),
                kind: pb::SurveyKind::Csat as i32,
                score: 2,
                comment: "张三丰: mail me at zhang@example.com".into(),
                ..Default::default()
            }),
            request_id: rid(),
        })
        .await
        .expect("survey")
        .into_inner();
    assert_eq!(answer.comment, "张**: mail me at z***@example.com");
    for needle in ["13812345678", "zhang@example.com", "张三丰"] {
        assert_eq!(outbox_mentions(&app, needle).await, 0, "no event carries {needle:?} (SEC-5)");
    }

    // profiles unreachable: the text is withheld, not shown unmasked.
    app.masker.down.store(true, Ordering::SeqCst);
    let withheld = agent.get_feedback(get(&f.feedback_id)).await.expect("get").into_inner();
    assert_eq!(withheld.text, WITHHELD);
    assert_eq!(reader.get_feedback(get(&f.feedback_id)).await.expect("get").into_inner().text, SAID);
}

#[tokio::test]
async fn rel6_open_complaints_are_answered_from_the_tickets_themselves() {
    let app = start().await;
    let (complaining, resolved, quiet) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let mut agent = client(&app, &[Role::Agent]);
    complain(&mut agent, complaining).await;
    let t = complain(&mut agent, resolved).await.ticket.expect("ticket");
    for s in [pb::TicketState::Acknowledged, pb::TicketState::InProgress, pb::TicketState::Resolved] {
        agent
            .transition_ticket(pb::TransitionTicketRequest {
                ticket_id: t.ticket_id.clone(),
                target_state: s as i32,
                note: "done".into(),
                request_id: rid(),
                ..Default::default()
            })
            .await
            .expect("move");
    }
    let mut service = client(&app, &[Role::Service]);
    let open = service
        .check_open_complaints(pb::CheckOpenComplaintsRequest {
            customer_ids: [complaining, resolved, quiet].iter().map(Uuid::to_string).collect(),
        })
        .await
        .expect("check")
        .into_inner()
        .customer_ids;
    assert_eq!(open, [complaining.to_string()]);
    let e = agent
        .check_open_complaints(pb::CheckOpenComplaintsRequest { customer_ids: vec![quiet.to_string()] })
        .await
        .expect_err("a service call");
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = service
        .check_open_complaints(pb::CheckOpenComplaintsRequest { customer_ids: vec![quiet.to_string(); 1001] })
        .await
        .expect_err("too many");
    assert_eq!(crm_kit::testing::bad_fields(&e), ["customer_ids"]);
}
