//! A feedback replica in-process on port 0 with its own schema (real
//! PostgreSQL), a manual clock, and stand-ins for profiles and outreach that
//! record calls and can be made unreachable.

#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use crm_feedback::clock::ManualClock;
use crm_feedback::desk::{Desk, FeedbackMetrics, Settings};
use crm_feedback::domain::sla::Calendar;
use crm_feedback::partners::{Call, CallError, CustomerCheck, Outreach, Profiles};
use crm_kit::Role;
use crm_kit::testing::Bearer;
use crm_proto::feedback::v1 as pb;
use crm_proto::feedback::v1::feedback_service_client::FeedbackServiceClient;
use crm_proto::outreach::v1 as outreach;
use uuid::Uuid;

/// profiles as a table: every id is live unless told otherwise.
#[derive(Default)]
pub struct FakeProfiles {
    pub answers: Mutex<HashMap<Uuid, CustomerCheck>>,
    pub down: AtomicBool,
    pub calls: AtomicUsize,
}

impl Profiles for FakeProfiles {
    fn check(&self, customer: Uuid) -> Call<'_, Result<CustomerCheck, CallError>> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.down.load(Ordering::SeqCst) {
                return Err(CallError::Retry("profiles unreachable (test)".into()));
            }
            Ok(self.answers.lock().unwrap().get(&customer).copied().unwrap_or(CustomerCheck::Live(customer)))
        })
    }
}

/// outreach that records what it is asked; `failures` calls fail first;
/// while a test holds `gate` for writing, calls wait (a replica gone quiet
/// in the middle of a call).
#[derive(Default)]
pub struct FakeOutreach {
    pub received: Mutex<Vec<outreach::AcknowledgeFeedbackRequest>>,
    pub failures: AtomicUsize,
    pub gate: tokio::sync::RwLock<()>,
    pub calls: AtomicUsize,
}

impl Outreach for FakeOutreach {
    fn acknowledge(&self, request: outreach::AcknowledgeFeedbackRequest) -> Call<'_, Result<String, CallError>> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let _open = self.gate.read().await;
            if self.failures.load(Ordering::SeqCst) > 0 {
                self.failures.fetch_sub(1, Ordering::SeqCst);
                return Err(CallError::Retry("outreach unavailable (test)".into()));
            }
            let mut r = self.received.lock().unwrap();
            // outreach is idempotent by request id: a repeat sends nothing new.
            if !r.iter().any(|x| x.request_id == request.request_id) {
                r.push(request);
            }
            Ok("message m ALLOWED".into())
        })
    }
}

pub struct App {
    pub url: String,
    pub pool: sqlx::PgPool,
    pub desk: Desk,
    pub clock: Arc<ManualClock>,
    pub profiles: Arc<FakeProfiles>,
    pub outreach: Arc<FakeOutreach>,
    pub masker: Arc<crm_kit::testing::NamesMasker>,
    shutdown: crm_kit::lifecycle::Shutdown,
}

impl Drop for App {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

/// A local Shanghai time.
pub fn sh(y: i32, m: u32, d: u32, h: u32, min: u32, s: u32) -> DateTime<Utc> {
    chrono_tz::Asia::Shanghai.with_ymd_and_hms(y, m, d, h, min, s).unwrap().with_timezone(&Utc)
}

/// Tuesday 1 December 2026, 10:00 in Shanghai: a working day, mid-morning.
pub fn tuesday_10am() -> DateTime<Utc> {
    sh(2026, 12, 1, 10, 0, 0)
}

pub async fn start() -> App {
    start_at(tuesday_10am()).await
}

pub async fn start_at(at: DateTime<Utc>) -> App {
    let config = crm_kit::testing::config("feedback").await;
    let kit = crm_kit::Kit::start(crm_feedback::SPEC, config).await.expect("kit");
    let clock = Arc::new(ManualClock::at(at));
    let profiles = Arc::new(FakeProfiles::default());
    let outreach = Arc::new(FakeOutreach::default());
    let masker = Arc::new(crm_kit::testing::NamesMasker::default());
    let desk = Desk {
        pool: kit.pg.clone(),
        classifier: crm_feedback::classifier().expect("classifier"),
        calendar: Arc::new(Calendar::office(chrono_tz::Asia::Shanghai)),
        policies: Arc::new(crm_feedback::domain::ticket::Policies::default()),
        clock: clock.clone(),
        profiles: Some(profiles.clone()),
        outreach: Some(outreach.clone()),
        masker: Some(masker.clone()),
        settings: Settings { call_lease: chrono::Duration::seconds(5), ..Settings::default() },
        metrics: FeedbackMetrics::default(),
        calls_in_flight: Arc::new(tokio::sync::Semaphore::new(crm_feedback::desk::MAX_CALLS_IN_FLIGHT)),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let pool = kit.pg.clone();
    let shutdown = kit.shutdown_handle();
    let routes = tonic::service::Routes::new(pb::feedback_service_server::FeedbackServiceServer::new(
        crm_feedback::api::FeedbackApi::new(desk.clone()),
    ));
    tokio::spawn(kit.serve_on(listener, routes, crm_feedback::access_policy()));
    App { url, pool, desk, clock, profiles, outreach, masker, shutdown }
}

pub type Client =
    FeedbackServiceClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>>;

pub fn client(app: &App, roles: &[Role]) -> Client {
    client_with(app, roles, false)
}

/// A client whose token carries `pii:read` when `pii`.
pub fn client_with(app: &App, roles: &[Role], pii: bool) -> Client {
    FeedbackServiceClient::with_interceptor(
        crm_kit::client::channel(&app.url).expect("channel"),
        Bearer::minted(roles, pii),
    )
}

pub fn rid() -> String {
    Uuid::now_v7().to_string()
}

pub fn feedback(customer: Uuid, channel: crm_proto::common::v1::Channel, text: &str) -> pb::SubmitFeedbackRequest {
    pb::SubmitFeedbackRequest {
        feedback: Some(pb::Feedback {
            customer_id: customer.to_string(),
            channel: channel as i32,
            text: text.into(),
            ..Default::default()
        }),
        request_id: rid(),
    }
}

pub const COMPLAINT: &str = "我的快递丢件了，物流信息一直不更新，太失望了！";

/// Submits a complaint for `customer` and returns the response.
pub async fn complain(c: &mut Client, customer: Uuid) -> pb::SubmitFeedbackResponse {
    c.submit_feedback(feedback(customer, crm_proto::common::v1::Channel::Hotline, COMPLAINT))
        .await
        .expect("submit")
        .into_inner()
}

/// Counts rows of a table in the app's schema.
pub async fn count(app: &App, table: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
        .fetch_one(&app.pool)
        .await
        .expect("count")
}

/// Events of a type written to the outbox.
pub async fn events(app: &App, event_type: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM kit_outbox WHERE event_type = $1")
        .bind(event_type)
        .fetch_one(&app.pool)
        .await
        .expect("events")
}

pub async fn wait_for<F: AsyncFnMut() -> bool>(what: &str, mut done: F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn clock<'a>(t: &'a pb::Ticket, kind: &str) -> &'a pb::SlaClock {
    t.sla_clocks.iter().find(|c| c.kind == kind).unwrap_or_else(|| panic!("no {kind} clock in {t:?}"))
}

pub fn time(t: &Option<prost_types::Timestamp>) -> DateTime<Utc> {
    let t = t.as_ref().expect("time");
    DateTime::from_timestamp(t.seconds, t.nanos as u32).expect("valid")
}
