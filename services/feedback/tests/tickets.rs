//! FBK-3 states and the closed loop through gRPC; FBK-5 surveys; FBK-6
//! improvement actions; PRF-8 erasure from profiles' events.

mod common;

use common::*;
use crm_kit::Role;
use crm_proto::common::v1::Channel;
use crm_proto::feedback::v1 as pb;
use crm_proto::outreach::v1::AcknowledgementKind;
use tonic::Code;
use uuid::Uuid;

fn move_to(ticket: &str, to: pb::TicketState, etag: &str) -> pb::TransitionTicketRequest {
    pb::TransitionTicketRequest {
        ticket_id: ticket.into(),
        target_state: to as i32,
        etag: etag.into(),
        note: "done".into(),
        request_id: rid(),
        ..Default::default()
    }
}

#[tokio::test]
async fn illegal_moves_and_stale_etags_are_refused_and_change_nothing() {
    let app = start().await;
    let mut agent = client(&app, &[Role::Agent]);
    let t = complain(&mut agent, Uuid::now_v7()).await.ticket.unwrap();
    let e = agent.transition_ticket(move_to(&t.ticket_id, pb::TicketState::Resolved, "")).await.expect_err("skip");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("OPEN") && e.message().contains("ACKNOWLEDGED"), "{}", e.message());
    let e =
        agent.transition_ticket(move_to(&t.ticket_id, pb::TicketState::Acknowledged, "v999")).await.expect_err("stale");
    assert_eq!(e.code(), Code::Aborted);
    let same = agent.get_ticket(pb::GetTicketRequest { ticket_id: t.ticket_id.clone() }).await.unwrap().into_inner();
    assert_eq!((same.state, same.etag.as_str()), (pb::TicketState::Open as i32, t.etag.as_str()));
    let ok = agent
        .transition_ticket(move_to(&t.ticket_id, pb::TicketState::Acknowledged, &t.etag))
        .await
        .expect("with etag");
    assert_eq!(ok.into_inner().state, pb::TicketState::Acknowledged as i32);
}

#[tokio::test]
async fn resolving_asks_the_customer_who_verifies_or_reopens() {
    let app = start().await;
    let mut agent = client(&app, &[Role::Agent]);
    let t = complain(&mut agent, Uuid::now_v7()).await.ticket.unwrap();
    for s in [pb::TicketState::Acknowledged, pb::TicketState::InProgress] {
        agent.transition_ticket(move_to(&t.ticket_id, s, "")).await.expect("move");
    }
    app.clock.set(sh(2026, 12, 1, 12, 0, 0));
    let resolved =
        agent.transition_ticket(move_to(&t.ticket_id, pb::TicketState::Resolved, "")).await.unwrap().into_inner();
    assert!(clock(&resolved, "resolution").met_time.is_some());
    assert_eq!(events(&app, "crm.feedback.v1.TicketResolved").await, 1);
    wait_for("the resolution check", async || {
        app.outreach.received.lock().unwrap().iter().any(|r| r.kind == AcknowledgementKind::ResolutionCheck as i32)
    })
    .await;

    // The customer says no: reopened, the resolution clock runs again with the 2 h spent.
    let mut service = client(&app, &[Role::Service]);
    let reopened = service
        .record_verification(pb::RecordVerificationRequest {
            ticket_id: t.ticket_id.clone(),
            confirmed: false,
            comment: "still not delivered".into(),
            request_id: rid(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reopened.state, pb::TicketState::Reopened as i32);
    let r = clock(&reopened, "resolution");
    assert!(r.met_time.is_none());
    assert_eq!(time(&r.deadline), sh(2026, 12, 1, 16, 0, 0), "4 h left from 12:00");

    // Work resumes; resolved again, a second resolution check; the customer confirms: loop closed.
    agent.transition_ticket(move_to(&t.ticket_id, pb::TicketState::InProgress, "")).await.unwrap();
    agent.transition_ticket(move_to(&t.ticket_id, pb::TicketState::Resolved, "")).await.unwrap();
    wait_for("the second resolution check", async || {
        app.outreach
            .received
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.kind == AcknowledgementKind::ResolutionCheck as i32)
            .count()
            == 2
    })
    .await;
    let verified = service
        .record_verification(pb::RecordVerificationRequest {
            ticket_id: t.ticket_id.clone(),
            confirmed: true,
            request_id: rid(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(verified.state, pb::TicketState::Verified as i32);
    assert_eq!(events(&app, "crm.feedback.v1.TicketVerified").await, 2, "one rejection, one confirmation");
    // Verified is final; a verification of a ticket not awaiting one is refused.
    let e = service
        .record_verification(pb::RecordVerificationRequest {
            ticket_id: t.ticket_id.clone(),
            confirmed: true,
            request_id: rid(),
            ..Default::default()
        })
        .await
        .expect_err("not resolved");
    assert_eq!(e.code(), Code::FailedPrecondition);
    let full = agent.get_ticket(pb::GetTicketRequest { ticket_id: t.ticket_id }).await.unwrap().into_inner();
    let actions: Vec<&str> = full.history.iter().map(|h| h.action.as_str()).collect();
    assert!(
        actions.contains(&"verification_requested") && actions.contains(&"rejected") && actions.contains(&"verified"),
        "{actions:?}"
    );
}

#[tokio::test]
async fn tickets_list_by_queue_and_deadline_with_pages() {
    let app = start().await;
    let mut agent = client(&app, &[Role::Agent]);
    for _ in 0..3 {
        complain(&mut agent, Uuid::now_v7()).await;
    }
    agent.submit_feedback(feedback(Uuid::now_v7(), Channel::Email, "建议APP增加夜间模式")).await.unwrap();
    let care = agent
        .list_tickets(pb::ListTicketsRequest { queue: "customer-care".into(), page_size: 2, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(care.tickets.len(), 2);
    let rest = agent
        .list_tickets(pb::ListTicketsRequest {
            queue: "customer-care".into(),
            page_size: 2,
            page_token: care.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.tickets.len(), 1);
    let all = agent.list_tickets(pb::ListTicketsRequest::default()).await.unwrap().into_inner().tickets;
    assert_eq!(all.len(), 4);
    assert_eq!(all.last().unwrap().queue, "product", "the suggestion's 3-day deadline is the latest");
    crm_feedback::jobs::watch_once(&app.desk, sh(2026, 12, 1, 11, 0, 0), 100).await.unwrap();
    let breached = agent
        .list_tickets(pb::ListTicketsRequest { breached_only: true, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(breached.tickets.len(), 3);
}

#[tokio::test]
async fn survey_answers_are_checked_stored_and_a_comment_becomes_feedback() {
    let app = start().await;
    let mut service = client(&app, &[Role::Service]);
    let customer = Uuid::now_v7();
    let answer = |kind: pb::SurveyKind, score: i32, comment: &str| pb::SubmitSurveyResponseRequest {
        response: Some(pb::SurveyResponse {
            customer_id: customer.to_string(),
            kind: kind as i32,
            score,
            comment: comment.into(),
            campaign_id: "winback-2026-11".into(),
            ..Default::default()
        }),
        request_id: rid(),
    };
    for (kind, score) in
        [(pb::SurveyKind::Nps, 11), (pb::SurveyKind::Nps, -1), (pb::SurveyKind::Csat, 0), (pb::SurveyKind::Csat, 6)]
    {
        let e = service.submit_survey_response(answer(kind, score, "")).await.expect_err("out of range");
        assert_eq!(crm_kit::testing::bad_fields(&e), ["response.score"], "{kind:?} {score}");
    }
    let nps = service.submit_survey_response(answer(pb::SurveyKind::Nps, 10, "")).await.unwrap().into_inner();
    assert!(nps.feedback_id.is_empty());
    let csat = service
        .submit_survey_response(answer(pb::SurveyKind::Csat, 1, "客服态度很差，问三遍都答非所问"))
        .await
        .unwrap()
        .into_inner();
    assert!(!csat.feedback_id.is_empty(), "the comment was taken in as feedback");
    assert_eq!(events(&app, "crm.feedback.v1.SurveyAnswered").await, 2);
    let mut agent = client(&app, &[Role::Agent]);
    let f = agent.get_feedback(pb::GetFeedbackRequest { feedback_id: csat.feedback_id }).await.unwrap().into_inner();
    assert_eq!(f.channel, Channel::Survey as i32);
    assert_eq!(f.rating, 1);
    assert!(!f.ticket_id.is_empty(), "a complaint in a survey comment opens a ticket");
    assert_eq!(count(&app, "survey_responses").await, 2);
}

#[tokio::test]
async fn improvement_actions_link_tickets_and_update_by_mask_and_etag() {
    let app = start().await;
    let mut agent = client(&app, &[Role::Agent]);
    let t1 = complain(&mut agent, Uuid::now_v7()).await.ticket.unwrap().ticket_id;
    let t2 = complain(&mut agent, Uuid::now_v7()).await.ticket.unwrap().ticket_id;
    let deadline = prost_types::Timestamp { seconds: sh(2027, 1, 15, 18, 0, 0).timestamp(), nanos: 0 };
    let a = agent
        .create_improvement_action(pb::CreateImprovementActionRequest {
            action: Some(pb::ImprovementAction {
                title: "Courier hand-over photos".into(),
                owner_department: "Logistics".into(),
                deadline: Some(deadline),
                success_measure: "lost-parcel complaints down 50 % in 8 weeks".into(),
                ticket_ids: vec![t1.clone(), t2.clone()],
                ..Default::default()
            }),
            request_id: rid(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.status, pb::ActionStatus::Plan as i32);
    assert_eq!(a.ticket_ids.len(), 2);
    let mask = |p: &[&str]| Some(prost_types::FieldMask { paths: p.iter().map(|s| s.to_string()).collect() });
    let update = |etag: &str| pb::UpdateImprovementActionRequest {
        action: Some(pb::ImprovementAction {
            action_id: a.action_id.clone(),
            status: pb::ActionStatus::Do as i32,
            title: "ignored: not in the mask".into(),
            ..Default::default()
        }),
        update_mask: mask(&["status"]),
        etag: etag.into(),
        request_id: rid(),
    };
    let e = agent.update_improvement_action(update("v9")).await.expect_err("stale");
    assert_eq!(e.code(), Code::Aborted);
    let b = agent.update_improvement_action(update(&a.etag)).await.unwrap().into_inner();
    assert_eq!((b.status, b.title.as_str()), (pb::ActionStatus::Do as i32, "Courier hand-over photos"));
    assert_ne!(b.etag, a.etag);
    let listed = agent
        .list_improvement_actions(pb::ListImprovementActionsRequest {
            status: pb::ActionStatus::Do as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.actions, [b]);
}

#[tokio::test]
async fn an_erased_customer_loses_the_text_of_their_feedback_and_erasure_is_confirmed() {
    use crm_kit::consumer::EventHandler;
    let app = start().await;
    let mut agent = client(&app, &[Role::Agent]);
    let customer = Uuid::now_v7();
    let r = complain(&mut agent, customer).await;
    let mut service = client(&app, &[Role::Service]);
    service
        .submit_survey_response(pb::SubmitSurveyResponseRequest {
            response: Some(pb::SurveyResponse {
                customer_id: customer.to_string(),
                kind: pb::SurveyKind::Csat as i32,
                score: 2,
                comment: "the courier was rude".into(),
                ..Default::default()
            }),
            request_id: rid(),
        })
        .await
        .unwrap();
    let erased = crm_proto::profiles::v1::CustomerErased { customer_id: customer.to_string(), alias_ids: vec![] };
    let event = crm_kit::consumer::Event {
        envelope: crm_proto::common::v1::EventEnvelope {
            event_id: Uuid::now_v7().to_string(),
            event_type: "crm.profiles.v1.CustomerErased".into(),
            source: "profiles".into(),
            payload: Some(prost_types::Any::from_msg(&erased).unwrap()),
            request_id: "erase-1".into(),
            ..Default::default()
        },
        stream: "test".into(),
        stream_id: "0-1".into(),
    };
    let mut tx = app.pool.begin().await.unwrap();
    crm_feedback::read_model::ProfilesEvents.handle(&mut tx, &event).await.expect("handled");
    tx.commit().await.unwrap();
    let texts: Vec<String> = sqlx::query_scalar("SELECT text FROM feedback").fetch_all(&app.pool).await.unwrap();
    assert_eq!(texts, ["", ""], "both items' text is gone");
    let comments: Vec<String> =
        sqlx::query_scalar("SELECT comment FROM survey_responses").fetch_all(&app.pool).await.unwrap();
    assert_eq!(comments, [""]);
    let f = agent
        .get_feedback(pb::GetFeedbackRequest { feedback_id: r.feedback.unwrap().feedback_id })
        .await
        .unwrap()
        .into_inner();
    assert!(f.text.is_empty() && f.classification.unwrap().evidence.is_empty());
    assert_eq!(events(&app, "crm.common.v1.ErasureConfirmed").await, 1);
}
