//! FBK-3 SLA clocks through gRPC and the watcher, with a controllable clock:
//! a breach fires at its deadline exactly, not before; pauses are honoured;
//! two watchers record one breach per clock; the escalation chain.

mod common;

use std::sync::Arc;

use chrono::Duration;
use common::*;
use crm_feedback::jobs::watch_once;
use crm_kit::Role;
use crm_proto::common::v1::Channel;
use crm_proto::feedback::v1 as pb;
use uuid::Uuid;

async fn transition(c: &mut Client, ticket: &str, to: pb::TicketState) -> pb::Ticket {
    c.transition_ticket(pb::TransitionTicketRequest {
        ticket_id: ticket.into(),
        target_state: to as i32,
        request_id: rid(),
        ..Default::default()
    })
    .await
    .expect("transition")
    .into_inner()
}

#[tokio::test]
async fn a_complaint_breaches_its_first_response_at_the_deadline_not_a_second_before() {
    let app = start().await;
    let mut agent = client(&app, &[Role::Agent]);
    let t = complain(&mut agent, Uuid::now_v7()).await.ticket.expect("a complaint opens a ticket");
    // FBK-3 defaults: complaint first response 1 h, resolution 6 h, business hours.
    let fr = clock(&t, "first_response");
    assert_eq!(time(&fr.deadline), sh(2026, 12, 1, 11, 0, 0));
    assert_eq!(time(&clock(&t, "resolution").deadline), sh(2026, 12, 1, 16, 0, 0));
    assert_eq!(t.queue, "customer-care");

    let before = watch_once(&app.desk, sh(2026, 12, 1, 10, 59, 59), 100).await.expect("watch");
    assert_eq!(before.breaches, 0, "one second before the deadline nothing is breached");
    assert_eq!(events(&app, "crm.feedback.v1.SlaBreached").await, 0);

    let at = watch_once(&app.desk, sh(2026, 12, 1, 11, 0, 0), 100).await.expect("watch");
    assert_eq!(at.breaches, 1, "at the deadline the first-response clock is breached");
    assert_eq!(events(&app, "crm.feedback.v1.SlaBreached").await, 1);
    let again = watch_once(&app.desk, sh(2026, 12, 1, 11, 5, 0), 100).await.expect("watch");
    assert_eq!(again.breaches, 0, "a breach is recorded once");
    assert_eq!(events(&app, "crm.feedback.v1.SlaBreached").await, 1);

    app.clock.set(sh(2026, 12, 1, 11, 10, 0));
    let t = agent.get_ticket(pb::GetTicketRequest { ticket_id: t.ticket_id }).await.expect("get").into_inner();
    assert!(clock(&t, "first_response").breached);
    assert!(!clock(&t, "resolution").breached);
    assert_eq!(t.escalation_level, 1, "the breach notified (level 1)");
    assert!(t.history.iter().any(|h| h.action == "sla_breached"), "{:?}", t.history);
}

#[tokio::test]
async fn a_ticket_opened_on_friday_evening_is_due_on_monday_morning() {
    // Friday 4 December 2026, 17:30 Shanghai.
    let app = start_at(sh(2026, 12, 4, 17, 30, 0)).await;
    let mut agent = client(&app, &[Role::Agent]);
    let t = complain(&mut agent, Uuid::now_v7()).await.ticket.expect("ticket");
    assert_eq!(time(&clock(&t, "first_response").deadline), sh(2026, 12, 7, 9, 30, 0));
    let weekend = watch_once(&app.desk, sh(2026, 12, 6, 23, 0, 0), 100).await.expect("watch");
    assert_eq!(weekend.breaches, 0, "the weekend does not count");
}

#[tokio::test]
async fn waiting_on_the_customer_pauses_the_clocks_and_the_deadline_moves() {
    let app = start().await;
    let mut agent = client(&app, &[Role::Agent]);
    let t = complain(&mut agent, Uuid::now_v7()).await.ticket.expect("ticket");
    app.clock.set(sh(2026, 12, 1, 10, 30, 0));
    let t = transition(&mut agent, &t.ticket_id, pb::TicketState::Acknowledged).await;
    assert!(clock(&t, "first_response").met_time.is_some());
    let t = transition(&mut agent, &t.ticket_id, pb::TicketState::InProgress).await;
    app.clock.set(sh(2026, 12, 1, 11, 0, 0));
    let t = transition(&mut agent, &t.ticket_id, pb::TicketState::WaitingOnCustomer).await;
    let r = clock(&t, "resolution");
    assert!(r.paused);
    assert_eq!(r.deadline, None, "a paused clock has no deadline");
    assert_eq!(r.elapsed_seconds, 3600);

    // The original deadline (16:00) passes while paused: no breach.
    let paused = watch_once(&app.desk, sh(2026, 12, 2, 15, 0, 0), 100).await.expect("watch");
    assert_eq!(paused.breaches, 0);

    // Resumed on Wednesday 15:00 with 5 h left: 3 h on Wednesday, 2 h on Thursday.
    app.clock.set(sh(2026, 12, 2, 15, 0, 0));
    let t = transition(&mut agent, &t.ticket_id, pb::TicketState::InProgress).await;
    assert_eq!(time(&clock(&t, "resolution").deadline), sh(2026, 12, 3, 11, 0, 0));
    assert_eq!(watch_once(&app.desk, sh(2026, 12, 3, 10, 59, 59), 100).await.unwrap().breaches, 0);
    assert_eq!(watch_once(&app.desk, sh(2026, 12, 3, 11, 0, 0), 100).await.unwrap().breaches, 1);
}

#[tokio::test]
async fn urgent_tickets_count_every_second_and_do_not_pause() {
    // Saturday night: urgent tickets do not wait for Monday.
    let app = start_at(sh(2026, 12, 5, 23, 0, 0)).await;
    let mut agent = client(&app, &[Role::Agent]);
    let r = agent
        .submit_feedback(feedback(Uuid::now_v7(), Channel::Hotline, "充电器用了两天就冒烟了，差点起火，太危险了"))
        .await
        .expect("submit")
        .into_inner();
    let t = r.ticket.expect("ticket");
    assert!(t.urgent);
    assert_eq!(time(&clock(&t, "first_response").deadline), sh(2026, 12, 5, 23, 15, 0), "15 minutes, 24x7");
    app.clock.set(sh(2026, 12, 5, 23, 5, 0));
    let t = transition(&mut agent, &t.ticket_id, pb::TicketState::Acknowledged).await;
    let t = transition(&mut agent, &t.ticket_id, pb::TicketState::InProgress).await;
    let t = transition(&mut agent, &t.ticket_id, pb::TicketState::WaitingOnCustomer).await;
    assert!(!clock(&t, "resolution").paused, "the urgent policy is not pausable");
}

#[tokio::test]
async fn a_late_acknowledgement_is_a_breach_even_before_the_watcher_runs() {
    let app = start().await;
    let mut agent = client(&app, &[Role::Agent]);
    let t = complain(&mut agent, Uuid::now_v7()).await.ticket.expect("ticket");
    app.clock.set(sh(2026, 12, 1, 11, 20, 0));
    let t = transition(&mut agent, &t.ticket_id, pb::TicketState::Acknowledged).await;
    let fr = clock(&t, "first_response");
    assert!(fr.breached && fr.met_time.is_some(), "{fr:?}");
    assert_eq!(events(&app, "crm.feedback.v1.SlaBreached").await, 1);
    // The watcher does not record it again, and the chain stops: the breached clock was met.
    assert_eq!(watch_once(&app.desk, sh(2026, 12, 1, 13, 0, 0), 100).await.unwrap(), Default::default());
    assert_eq!(events(&app, "crm.feedback.v1.SlaBreached").await, 1);
}

#[tokio::test]
async fn the_escalation_chain_notifies_reassigns_then_notifies_the_head() {
    let app = start().await;
    let mut agent = client(&app, &[Role::Agent]);
    let t = complain(&mut agent, Uuid::now_v7()).await.ticket.expect("ticket");
    agent
        .assign_ticket(pb::AssignTicketRequest {
            ticket_id: t.ticket_id.clone(),
            assignee: "li.lei".into(),
            request_id: rid(),
        })
        .await
        .expect("assign");
    assert_eq!(watch_once(&app.desk, sh(2026, 12, 1, 11, 0, 0), 100).await.unwrap().breaches, 1);
    let get = |id: String| {
        let mut c = agent.clone();
        async move { c.get_ticket(pb::GetTicketRequest { ticket_id: id }).await.expect("get").into_inner() }
    };
    let level1 = get(t.ticket_id.clone()).await;
    assert_eq!((level1.escalation_level, level1.assignee.as_str()), (1, "li.lei"));
    // FEEDBACK_ESCALATION_STEP_MINUTES = 30 (default).
    assert_eq!(watch_once(&app.desk, sh(2026, 12, 1, 11, 29, 0), 100).await.unwrap().escalations, 0);
    assert_eq!(watch_once(&app.desk, sh(2026, 12, 1, 11, 30, 0), 100).await.unwrap().escalations, 1);
    let level2 = get(t.ticket_id.clone()).await;
    assert_eq!((level2.escalation_level, level2.assignee.as_str()), (2, "care-supervisor"));
    assert_eq!(watch_once(&app.desk, sh(2026, 12, 1, 12, 0, 0), 100).await.unwrap().escalations, 1);
    let level3 = get(t.ticket_id.clone()).await;
    assert_eq!(level3.escalation_level, 3);
    assert!(level3.history.iter().any(|h| h.note.contains("care-head")), "{:?}", level3.history);
    assert_eq!(watch_once(&app.desk, sh(2026, 12, 1, 14, 0, 0), 100).await.unwrap().escalations, 0, "three steps only");
}

#[tokio::test]
async fn two_watchers_at_once_record_exactly_one_breach_per_clock() {
    let app = start().await;
    let mut agent = client(&app, &[Role::Agent]);
    let n = 40;
    for _ in 0..n {
        complain(&mut agent, Uuid::now_v7()).await;
    }
    // A second replica: its own pool on the same schema.
    let mut other = app.desk.clone();
    other.pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(3)
        .after_connect({
            let schema: String = sqlx::query_scalar("SELECT current_schema()").fetch_one(&app.pool).await.unwrap();
            move |conn, _| {
                let schema = schema.clone();
                Box::pin(async move {
                    sqlx::query(sqlx::AssertSqlSafe(format!("SET search_path TO \"{schema}\"")))
                        .execute(conn)
                        .await
                        .map(|_| ())
                })
            }
        })
        .connect(&crm_kit::testing::test_database_url().await)
        .await
        .expect("second pool");
    // After 16:00 both clocks of every complaint are due: 2n breaches in all.
    let at = sh(2026, 12, 1, 16, 0, 0);
    let (a, b) = (Arc::new(app.desk.clone()), Arc::new(other));
    let mut rounds = Vec::new();
    for i in 0..6 {
        let d = if i % 2 == 0 { a.clone() } else { b.clone() };
        rounds.push(tokio::spawn(async move { watch_once(&d, at, 7).await.expect("watch").breaches }));
    }
    let mut total = 0;
    for r in rounds {
        total += r.await.unwrap();
    }
    // Whatever the rounds missed (they take 7 tickets each), a last pass finds.
    total += watch_once(&a, at, 1000).await.unwrap().breaches;
    assert_eq!(total, 2 * n);
    assert_eq!(events(&app, "crm.feedback.v1.SlaBreached").await, 2 * n as i64);
    let dup: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT ticket_id, note FROM ticket_history WHERE action = 'sla_breached' GROUP BY 1, 2 HAVING count(*) > 1) d",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(dup, 0, "no duplicate history rows");
    assert_eq!(watch_once(&a, at + Duration::minutes(1), 1000).await.unwrap().breaches, 0);
}
