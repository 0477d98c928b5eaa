//! FBK-1, FBK-2, FBK-4 through gRPC: intake classifies and routes, praise
//! needs no ticket, the customer rule (unknown refused, merged linked,
//! profiles down accepted and checked later), the acknowledgement survives
//! an outreach outage, repeats link, idempotent retries.

mod common;

use std::sync::atomic::Ordering;

use chrono::Duration;
use common::*;
use crm_feedback::closed_loop;
use crm_feedback::partners::CustomerCheck;
use crm_kit::Role;
use crm_kit::testing::bad_fields;
use crm_proto::common::v1::Channel;
use crm_proto::feedback::v1 as pb;
use crm_proto::outreach::v1::AcknowledgementKind;
use uuid::Uuid;

#[tokio::test]
async fn a_complaint_is_classified_routed_ticketed_and_acknowledged() {
    let app = start().await;
    let mut agent = client(&app, &[Role::Agent]);
    let customer = Uuid::now_v7();
    let req = feedback(customer, Channel::Hotline, COMPLAINT);
    let r = agent.submit_feedback(req.clone()).await.expect("submit").into_inner();
    let f = r.feedback.clone().expect("feedback");
    let c = f.classification.clone().expect("classification");
    assert_eq!(c.category, pb::Category::ServiceComplaint as i32);
    assert_eq!(c.language, "zh");
    assert!(c.sentiment < -0.15, "{c:?}");
    assert!(!c.evidence.is_empty(), "explainable: the terms that decided it are listed");
    assert!(f.customer_verified);
    let t = r.ticket.clone().expect("a complaint opens a ticket");
    assert_eq!((t.queue.as_str(), t.state), ("customer-care", pb::TicketState::Open as i32));
    assert_eq!(f.ticket_id, t.ticket_id);
    assert_eq!(events(&app, "crm.feedback.v1.FeedbackReceived").await, 1);
    assert_eq!(events(&app, "crm.feedback.v1.TicketOpened").await, 1);

    // The closed loop: an acknowledgement through outreach, in the customer's language.
    wait_for("the acknowledgement", async || !app.outreach.received.lock().unwrap().is_empty()).await;
    let ack = app.outreach.received.lock().unwrap()[0].clone();
    assert_eq!(ack.customer_id, customer.to_string());
    assert_eq!(ack.feedback_id, f.feedback_id);
    assert_eq!(ack.ticket_id, t.ticket_id);
    assert_eq!(ack.locale, "zh-CN");
    assert_eq!(ack.channel, Channel::Hotline as i32);
    assert_eq!(ack.kind, AcknowledgementKind::Received as i32);

    // A retry with the same request id returns the first answer and stores nothing more.
    let again = agent.submit_feedback(req).await.expect("retry").into_inner();
    assert_eq!(again, r);
    assert_eq!(count(&app, "feedback").await, 1);
    assert_eq!(count(&app, "tickets").await, 1);
}

#[tokio::test]
async fn praise_is_recorded_and_acknowledged_without_a_ticket() {
    let app = start().await;
    let mut agent = client(&app, &[Role::Agent]);
    let r = agent
        .submit_feedback(feedback(Uuid::now_v7(), Channel::Wechat, "今天店员小王特别耐心地帮我挑选，非常感谢"))
        .await
        .expect("submit")
        .into_inner();
    assert_eq!(r.feedback.as_ref().unwrap().classification.as_ref().unwrap().category, pb::Category::Other as i32);
    assert!(r.ticket.is_none());
    assert_eq!(count(&app, "tickets").await, 0);
    wait_for("the acknowledgement", async || app.outreach.received.lock().unwrap().len() == 1).await;
}

#[tokio::test]
async fn an_unknown_or_erased_customer_is_refused_and_a_merged_one_is_linked_to_the_survivor() {
    let app = start().await;
    let mut agent = client(&app, &[Role::Agent]);
    let (unknown, erased, loser, survivor) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    {
        let mut answers = app.profiles.answers.lock().unwrap();
        answers.insert(unknown, CustomerCheck::Unknown);
        answers.insert(erased, CustomerCheck::Erased);
        answers.insert(loser, CustomerCheck::Live(survivor));
    }
    for who in [unknown, erased] {
        let e = agent.submit_feedback(feedback(who, Channel::Email, COMPLAINT)).await.expect_err("refused");
        assert_eq!(bad_fields(&e), ["feedback.customer_id"]);
    }
    assert_eq!(count(&app, "feedback").await, 0, "a refused item stores nothing");
    let r = agent.submit_feedback(feedback(loser, Channel::Email, COMPLAINT)).await.expect("merged").into_inner();
    assert_eq!(r.feedback.unwrap().customer_id, survivor.to_string());
    assert_eq!(r.ticket.unwrap().customer_id, survivor.to_string());
}

#[tokio::test]
async fn with_profiles_down_feedback_is_accepted_and_the_customer_checked_before_acknowledging() {
    let app = start().await;
    let mut agent = client(&app, &[Role::Agent]);
    let (loser, survivor) = (Uuid::now_v7(), Uuid::now_v7());
    app.profiles.answers.lock().unwrap().insert(loser, CustomerCheck::Live(survivor));
    app.profiles.down.store(true, Ordering::SeqCst);
    let r =
        agent.submit_feedback(feedback(loser, Channel::OnlineChat, COMPLAINT)).await.expect("accepted").into_inner();
    let f = r.feedback.unwrap();
    assert!(!f.customer_verified, "accepted unconfirmed rather than lost");
    assert_eq!(f.customer_id, loser.to_string());
    // The immediate attempt finds profiles down: nothing is sent to an unconfirmed customer.
    wait_for("the first attempt", async || app.profiles.calls.load(Ordering::SeqCst) >= 2).await;
    first_attempt_recorded(&app).await;
    assert!(app.outreach.received.lock().unwrap().is_empty());

    app.profiles.down.store(false, Ordering::SeqCst);
    app.clock.advance(Duration::minutes(5));
    closed_loop::run_due(&app.desk, 10).await.expect("retry round");
    let acks = app.outreach.received.lock().unwrap().clone();
    assert_eq!(acks.len(), 1);
    assert_eq!(acks[0].customer_id, survivor.to_string(), "linked to the survivor once profiles answered");
    let f = agent.get_feedback(pb::GetFeedbackRequest { feedback_id: f.feedback_id }).await.unwrap().into_inner();
    assert!(f.customer_verified);
    assert_eq!(f.customer_id, survivor.to_string());
}

#[tokio::test]
async fn an_outreach_outage_delays_the_acknowledgement_but_loses_none() {
    let app = start().await;
    let mut agent = client(&app, &[Role::Agent]);
    app.outreach.failures.store(2, Ordering::SeqCst);
    complain(&mut agent, Uuid::now_v7()).await;
    wait_for("the failed first attempt", async || app.outreach.failures.load(Ordering::SeqCst) == 1).await;
    first_attempt_recorded(&app).await;
    // Not due yet: backoff.
    assert_eq!(closed_loop::run_due(&app.desk, 10).await.unwrap(), 0);
    app.clock.advance(Duration::seconds(10));
    assert_eq!(closed_loop::run_due(&app.desk, 10).await.unwrap(), 1, "second attempt fails too");
    assert!(app.outreach.received.lock().unwrap().is_empty());
    app.clock.advance(Duration::seconds(10));
    assert_eq!(closed_loop::run_due(&app.desk, 10).await.unwrap(), 1);
    assert_eq!(app.outreach.received.lock().unwrap().len(), 1);
    app.clock.advance(Duration::hours(1));
    assert_eq!(closed_loop::run_due(&app.desk, 10).await.unwrap(), 0, "done calls are not made again");
    let (attempts, done): (i32, bool) =
        sqlx::query_as("SELECT attempts, done_at IS NOT NULL FROM loop_calls").fetch_one(&app.pool).await.unwrap();
    assert_eq!((attempts, done), (3, true));
}

/// Waits until the immediate attempt's outcome is written (a worker round
/// run while that write holds the row would skip it).
async fn first_attempt_recorded(app: &App) {
    wait_for("the first attempt's outcome", async || {
        sqlx::query_scalar::<_, bool>("SELECT outcome <> '' FROM loop_calls").fetch_one(&app.pool).await.unwrap()
    })
    .await;
}

#[tokio::test]
async fn an_acknowledgement_is_leased_at_birth_and_taken_over_once_its_lease_runs_out() {
    // FBK-3: the replica that took the item makes the acknowledgement right
    // after commit, from a row written already leased to it; if it goes
    // quiet, another takes over after the lease (5 s in these tests) and the
    // customer still gets one message.
    let app = start().await;
    let mut agent = client(&app, &[Role::Agent]);
    let held = app.outreach.gate.write().await;
    complain(&mut agent, Uuid::now_v7()).await;
    wait_for("the immediate call", async || app.outreach.calls.load(Ordering::SeqCst) == 1).await;
    let row = async || -> (i32, bool) {
        sqlx::query_as("SELECT attempts, done_at IS NOT NULL FROM loop_calls").fetch_one(&app.pool).await.unwrap()
    };
    assert_eq!(row().await, (1, false), "written leased: attempt 1 under way, no write needed to claim it");
    assert_eq!(closed_loop::run_due(&app.desk, 10).await.unwrap(), 0, "not made twice while leased");
    app.clock.advance(Duration::seconds(6));
    let desk = app.desk.clone();
    let worker = tokio::spawn(async move { closed_loop::run_due(&desk, 10).await });
    wait_for("the worker's attempt", async || row().await == (2, false)).await;
    drop(held);
    assert_eq!(worker.await.unwrap().unwrap(), 1);
    wait_for("both attempts settled", async || row().await == (2, true)).await;
    assert_eq!(app.outreach.received.lock().unwrap().len(), 1, "one message: one request id for both attempts");
}

#[tokio::test]
async fn the_same_topic_from_the_same_customer_within_30_days_links_to_the_earlier_ticket() {
    let app = start().await;
    let mut agent = client(&app, &[Role::Agent]);
    let customer = Uuid::now_v7();
    let first = complain(&mut agent, customer).await.ticket.unwrap();
    assert_eq!(first.topic, "delivery");
    app.clock.advance(Duration::days(10));
    let second = agent
        .submit_feedback(feedback(customer, Channel::AppPush, "The courier lost my parcel again. Still not delivered."))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.repeat_of_ticket_id, first.ticket_id, "FBK-4: same customer, same topic, 10 days later");
    // Another topic, or another customer, is not a repeat.
    let other = agent
        .submit_feedback(feedback(customer, Channel::AppPush, "The app keeps crashing when I open my points page"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(other.repeat_of_ticket_id, "");
    let stranger = complain(&mut agent, Uuid::now_v7()).await;
    assert_eq!(stranger.repeat_of_ticket_id, "");
    // Past the window it is a new matter.
    app.clock.advance(Duration::days(31));
    let later = complain(&mut agent, customer).await;
    assert_eq!(later.repeat_of_ticket_id, "");
}

#[tokio::test]
async fn a_person_reclassifies_an_item_its_ticket_follows_and_the_share_is_reported() {
    let app = start().await;
    let mut agent = client(&app, &[Role::Agent]);
    let r = agent
        .submit_feedback(feedback(Uuid::now_v7(), Channel::Email, "How do I change the delivery address of my order?"))
        .await
        .unwrap()
        .into_inner();
    let t = r.ticket.unwrap();
    assert_eq!(t.queue, "support");
    // Inquiry: one working day (9 h) from 10:00 = tomorrow 10:00.
    assert_eq!(time(&clock(&t, "first_response").deadline), sh(2026, 12, 2, 10, 0, 0));
    praise(&mut agent).await;
    app.clock.advance(Duration::minutes(30));
    let f = agent
        .reclassify_feedback(pb::ReclassifyFeedbackRequest {
            feedback_id: r.feedback.unwrap().feedback_id,
            category: pb::Category::ServiceComplaint as i32,
            request_id: rid(),
        })
        .await
        .expect("reclassify")
        .into_inner();
    assert_eq!(f.manual_category, pb::Category::ServiceComplaint as i32);
    assert_eq!(f.classification.unwrap().category, pb::Category::FunctionInquiry as i32, "the automatic one is kept");
    assert_eq!(f.reclassified_by, "tester");
    let t = agent.get_ticket(pb::GetTicketRequest { ticket_id: t.ticket_id }).await.unwrap().into_inner();
    assert_eq!((t.category, t.queue.as_str()), (pb::Category::ServiceComplaint as i32, "customer-care"));
    // FBK-3: the 30 minutes already spent count against the complaint's hour.
    assert_eq!(time(&clock(&t, "first_response").deadline), sh(2026, 12, 1, 11, 0, 0));
    assert_eq!(time(&clock(&t, "resolution").deadline), sh(2026, 12, 1, 16, 0, 0));
    let mut analyst = client(&app, &[Role::Analyst]);
    let stats =
        analyst.get_classification_stats(pb::GetClassificationStatsRequest::default()).await.unwrap().into_inner();
    assert_eq!((stats.total, stats.reclassified), (2, 1));
    assert!((stats.reclassified_share - 0.5).abs() < 1e-9);
    assert_eq!(
        stats.reclassifications,
        [pb::Reclassification {
            automatic: pb::Category::FunctionInquiry as i32,
            manual: pb::Category::ServiceComplaint as i32,
            count: 1
        }]
    );
}

async fn praise(c: &mut Client) {
    c.submit_feedback(feedback(Uuid::now_v7(), Channel::Social, "Thank you, the staff were wonderful!"))
        .await
        .expect("praise");
}

#[tokio::test]
async fn feedback_lists_newest_first_with_filters_and_pages() {
    let app = start().await;
    let mut agent = client(&app, &[Role::Agent]);
    let customer = Uuid::now_v7();
    for _ in 0..3 {
        complain(&mut agent, customer).await;
        app.clock.advance(Duration::minutes(1));
    }
    praise(&mut agent).await;
    let page = agent
        .list_feedback(pb::ListFeedbackRequest {
            customer_id: customer.to_string(),
            page_size: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.feedback.len(), 2);
    assert!(!page.next_page_token.is_empty());
    let rest = agent
        .list_feedback(pb::ListFeedbackRequest {
            customer_id: customer.to_string(),
            page_size: 2,
            page_token: page.next_page_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.feedback.len(), 1);
    assert!(rest.next_page_token.is_empty());
    let complaints = agent
        .list_feedback(pb::ListFeedbackRequest {
            category: pb::Category::ServiceComplaint as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(complaints.feedback.len(), 3);
    // A token is bound to its filter.
    let e = agent
        .list_feedback(pb::ListFeedbackRequest { page_token: page.next_page_token, ..Default::default() })
        .await
        .expect_err("token of another filter");
    assert_eq!(bad_fields(&e), ["page_token"]);
}
