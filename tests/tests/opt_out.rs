//! REL-6 across real processes (PRF-7, OUT-5): once UpdateConsent (a
//! withdrawal) or SubmitFeedback (a complaint) has returned, no marketing
//! message to that customer reaches an adapter from either of two outreach
//! replicas: not a new send, not one of a running campaign.
//!
//! profiles and feedback publish their events every two seconds here, so
//! outreach's event-fed copies of consent and complaints are sure to lag
//! behind the sends: only the check at hand-off, which asks profiles and
//! feedback themselves, can stop the messages.

use std::time::Duration;

use chrono::Utc;
use crm_e2e::{ServiceProcess, wait_for};
use crm_kit::Role;
use crm_kit::testing::Bearer;
use crm_proto::common::v1::{Channel, Purpose};
use crm_proto::feedback::v1 as fb;
use crm_proto::feedback::v1::feedback_service_client::FeedbackServiceClient;
use crm_proto::outreach::v1 as out;
use crm_proto::outreach::v1::outreach_service_client::OutreachServiceClient;
use crm_proto::profiles::v1 as pb;
use crm_proto::profiles::v1::profiles_service_client::ProfilesServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel as GrpcChannel;
use uuid::Uuid;

type Profiles = ProfilesServiceClient<InterceptedService<GrpcChannel, Bearer>>;
type Outreach = OutreachServiceClient<InterceptedService<GrpcChannel, Bearer>>;

/// profiles, feedback and two outreach replicas sharing one schema.
struct Suite {
    profiles: ServiceProcess,
    feedback: ServiceProcess,
    replicas: [ServiceProcess; 2],
    db: sqlx::PgPool,
}

impl Suite {
    async fn start(batch: &str) -> Suite {
        let prefix = crm_kit::testing::unique_name("e2e");
        // Events leave profiles and feedback only every two seconds.
        let slow = [
            ("EVENT_STREAM_PREFIX", prefix.as_str()),
            ("CONSUMER_BLOCK_MS", "200"),
            ("OUTBOX_POLL_INTERVAL_MS", "2000"),
        ];
        let profiles = ServiceProcess::start("profiles", &slow).await;
        let mut env = slow.to_vec();
        env.push(("FEEDBACK_PROFILES_URL", profiles.url.as_str()));
        let feedback = ServiceProcess::start("feedback", &env).await;
        let outreach_env = [
            ("EVENT_STREAM_PREFIX", prefix.as_str()),
            ("CONSUMER_BLOCK_MS", "200"),
            ("OUTREACH_PROFILES_URL", profiles.url.as_str()),
            ("OUTREACH_FEEDBACK_URL", feedback.url.as_str()),
            ("OUTREACH_POLL_MS", "50"),
            ("OUTREACH_BATCH", batch),
        ];
        let first = ServiceProcess::start("outreach", &outreach_env).await;
        let mut shared = outreach_env.to_vec();
        shared.push(("DATABASE_SCHEMA", first.schema.as_str()));
        let mut second = ServiceProcess::start("outreach", &shared).await;
        second.schema = first.schema.clone();
        let db = sqlx::PgPool::connect(&crm_kit::testing::test_database_url().await).await.expect("db");
        Suite { profiles, feedback, replicas: [first, second], db }
    }

    fn profiles(&self) -> Profiles {
        let token = crm_kit::testing::token(&[Role::Admin], true);
        ProfilesServiceClient::with_interceptor(
            crm_kit::client::channel(&self.profiles.url).expect("ch"),
            Bearer(token),
        )
    }

    fn outreach(&self, i: usize) -> Outreach {
        let token = crm_kit::testing::token(&[Role::Admin], false);
        let url = &self.replicas[i % 2].url;
        OutreachServiceClient::with_interceptor(crm_kit::client::channel(url).expect("ch"), Bearer(token))
    }

    fn table(&self, name: &str) -> String {
        format!("{}.{name}", self.replicas[0].schema)
    }

    /// Quiet hours off (the test must not depend on the time of day) and a marketing SMS template.
    async fn marketing_template(&self) -> String {
        let mut o = self.outreach(0);
        o.update_contact_policy(out::UpdateContactPolicyRequest {
            policy: Some(out::ContactPolicy::default()),
            update_mask: Some(prost_types::FieldMask { paths: vec!["quiet_start".into(), "quiet_end".into()] }),
            etag: String::new(),
            request_id: crm_kit::testing::unique_name("policy"),
        })
        .await
        .expect("policy");
        o.create_template(out::CreateTemplateRequest {
            template: Some(out::Template {
                display_name: "offer".into(),
                channel: Channel::Sms as i32,
                content_type: out::ContentType::ExclusiveOffer as i32,
                purpose: Purpose::Marketing as i32,
                bodies: vec![out::TemplateBody {
                    locale: "zh-CN".into(),
                    subject: String::new(),
                    body: "{{name}}，{{discount}}优惠".into(),
                }],
                ..Default::default()
            }),
            request_id: crm_kit::testing::unique_name("template"),
        })
        .await
        .expect("template")
        .into_inner()
        .template_id
    }

    /// `n` customers in profiles with SMS marketing consent, once outreach's copy shows it.
    async fn consenting(&self, n: usize) -> Vec<String> {
        let mut ids = Vec::with_capacity(n);
        for _ in 0..n {
            let mut p = self.profiles();
            let phone = format!("+86139{:08}", Uuid::new_v4().as_u128() % 100_000_000);
            let id = p
                .create_customer(pb::CreateCustomerRequest {
                    customer: Some(pb::Customer {
                        name: "Opt Out".into(),
                        phone,
                        timezone: "UTC".into(),
                        preferred_channel: Channel::Sms as i32,
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
            p.update_consent(consent(&id, true)).await.expect("grant");
            ids.push(id);
        }
        let uuids: Vec<Uuid> = ids.iter().map(|s| Uuid::parse_str(s).expect("id")).collect();
        let sql = format!("SELECT count(*) FROM {} WHERE customer_id = ANY($1) AND granted", self.table("consents"));
        wait_for("outreach's copy of the grants", async || {
            sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql.clone()))
                .bind(&uuids)
                .fetch_one(&self.db)
                .await
                .unwrap_or(0)
                == n as i64
        })
        .await;
        ids
    }

    async fn send(&self, i: usize, customer: &str, template: &str) -> out::Message {
        self.outreach(i)
            .send_message(out::SendMessageRequest {
                customer_id: customer.into(),
                channel: Channel::Sms as i32,
                template_id: template.into(),
                variables: Default::default(),
                request_id: crm_kit::testing::unique_name("send"),
            })
            .await
            .expect("send")
            .into_inner()
            .message
            .expect("message")
    }

    /// (state, rule, detail, sent_at) of messages, once none waits for a decision or the adapter.
    async fn settled(&self, ids: &[String]) -> Vec<(i16, String, String, Option<chrono::DateTime<Utc>>)> {
        let ids: Vec<Uuid> = ids.iter().map(|s| Uuid::parse_str(s).expect("id")).collect();
        let pending =
            format!("SELECT count(*) FROM {} WHERE message_id = ANY($1) AND state IN (1, 2)", self.table("messages"));
        wait_for("every message decided and handed over or refused", async || {
            sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(pending.clone()))
                .bind(&ids)
                .fetch_one(&self.db)
                .await
                .unwrap_or(1)
                == 0
        })
        .await;
        let sql =
            format!("SELECT state, rule, detail, sent_at FROM {} WHERE message_id = ANY($1)", self.table("messages"));
        sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(&ids).fetch_all(&self.db).await.expect("messages")
    }

    async fn delivered_to(&self, customers: &[String]) -> i64 {
        let ids: Vec<Uuid> = customers.iter().map(|s| Uuid::parse_str(s).expect("id")).collect();
        let sql = format!("SELECT count(*) FROM {} WHERE customer_id = ANY($1)", self.table("sink_deliveries"));
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).bind(&ids).fetch_one(&self.db).await.expect("sink")
    }

    async fn stop(mut self) {
        for r in &mut self.replicas {
            r.terminate().await;
        }
        self.feedback.terminate().await;
        self.profiles.terminate().await;
    }
}

fn consent(customer: &str, granted: bool) -> pb::UpdateConsentRequest {
    pb::UpdateConsentRequest {
        customer_id: customer.into(),
        changes: vec![pb::ConsentGrant {
            channel: Channel::Sms as i32,
            purpose: Purpose::Marketing as i32,
            granted,
            source: "e2e".into(),
            ..Default::default()
        }],
        request_id: crm_kit::testing::unique_name("consent"),
    }
}

const STATE_SENT: i16 = 3;
const STATE_SUPPRESSED: i16 = 5;

#[tokio::test]
async fn rel6_withdrawal_or_complaint_then_send_sends_nothing_from_either_replica() {
    let suite = Suite::start("100").await;
    let template = suite.marketing_template().await;
    let customers = suite.consenting(60).await;
    let (withdrawing, rest) = customers.split_at(50);
    let (complaining, keeping) = rest.split_at(5);

    // 50 times: the withdrawal returns, then a send goes to one of the two replicas.
    let runs = withdrawing.iter().enumerate().map(|(i, c)| {
        let suite = &suite;
        let template = template.clone();
        async move {
            suite.profiles().update_consent(consent(c, false)).await.expect("withdraw");
            suite.send(i, c, &template).await.message_id
        }
    });
    let withdrawn_messages: Vec<String> = futures_util::future::join_all(runs).await;

    // The same with a complaint: SubmitFeedback has opened a complaint ticket, then the send.
    let agent = crm_kit::testing::token(&[Role::Agent], false);
    let mut f = FeedbackServiceClient::with_interceptor(
        crm_kit::client::channel(&suite.feedback.url).expect("ch"),
        Bearer(agent),
    );
    let mut complained_messages = Vec::new();
    for (i, c) in complaining.iter().enumerate() {
        let submitted = f
            .submit_feedback(fb::SubmitFeedbackRequest {
                feedback: Some(fb::Feedback {
                    customer_id: c.clone(),
                    channel: Channel::Hotline as i32,
                    text: "我的快递丢件了，物流信息一直不更新，太失望了！".into(),
                    ..Default::default()
                }),
                request_id: crm_kit::testing::unique_name("fb"),
            })
            .await
            .expect("complaint")
            .into_inner();
        assert!(submitted.ticket.is_some(), "a complaint ticket is open");
        complained_messages.push(suite.send(i, c, &template).await.message_id);
    }
    // And customers who changed nothing are still reached: the path delivers at all.
    let mut kept_messages = Vec::new();
    for (i, c) in keeping.iter().enumerate() {
        kept_messages.push(suite.send(i, c, &template).await.message_id);
    }

    for m in suite.settled(&withdrawn_messages).await {
        assert_eq!((m.0, m.1.as_str()), (STATE_SUPPRESSED, "OPTED_OUT"), "{m:?}");
        assert!(
            m.2.contains("at hand-off"),
            "outreach's copy still said granted; the hand-off check stopped it: {m:?}"
        );
    }
    for m in suite.settled(&complained_messages).await {
        assert_eq!((m.0, m.1.as_str()), (STATE_SUPPRESSED, "OPEN_COMPLAINT"), "{m:?}");
    }
    assert!(suite.settled(&kept_messages).await.iter().all(|m| m.0 == STATE_SENT));
    assert_eq!(suite.delivered_to(withdrawing).await, 0, "no message reached an adapter after a withdrawal");
    assert_eq!(suite.delivered_to(complaining).await, 0, "no marketing reached an adapter after a complaint");
    assert_eq!(suite.delivered_to(keeping).await, keeping.len() as i64);
    suite.stop().await;
}

#[tokio::test]
async fn rel6_a_withdrawal_during_a_running_campaign_stops_its_messages_on_both_replicas() {
    // Small batches: the campaign runs for a while over both replicas.
    let suite = Suite::start("5").await;
    let template = suite.marketing_template().await;
    let customers = suite.consenting(120).await;
    let segment = Uuid::now_v7();
    let ids: Vec<Uuid> = customers.iter().map(|s| Uuid::parse_str(s).expect("id")).collect();
    let members = format!(
        "INSERT INTO {} (segment_id, customer_id) SELECT $1, * FROM UNNEST($2::uuid[])",
        suite.table("segment_members")
    );
    sqlx::query(sqlx::AssertSqlSafe(members)).bind(segment).bind(&ids).execute(&suite.db).await.expect("members");
    let mut o = suite.outreach(0);
    let campaign = o
        .create_campaign(out::CreateCampaignRequest {
            campaign: Some(out::Campaign {
                display_name: "Running".into(),
                segment_ids: vec![segment.to_string()],
                variants: vec![out::Variant {
                    name: "A".into(),
                    traffic_percent: 100,
                    channel_plan: vec![out::TierChannelPlan {
                        tier: 0,
                        channels: vec![Channel::Sms as i32],
                        template_ids: [(Channel::Sms.as_str_name().to_string(), template.clone())]
                            .into_iter()
                            .collect(),
                    }],
                }],
                schedule: Some(out::Schedule { when: Some(out::schedule::When::Now(true)), timezone: String::new() }),
                ..Default::default()
            }),
            request_id: crm_kit::testing::unique_name("campaign"),
        })
        .await
        .expect("campaign")
        .into_inner();
    o.transition_campaign(out::TransitionCampaignRequest {
        campaign_id: campaign.campaign_id.clone(),
        target_state: out::CampaignState::Running as i32,
        request_id: crm_kit::testing::unique_name("run"),
    })
    .await
    .expect("run");
    let sent = format!("SELECT count(*) FROM {} WHERE campaign_id = $1", suite.table("sink_deliveries"));
    let campaign_id = Uuid::parse_str(&campaign.campaign_id).expect("id");
    wait_for("the campaign's first deliveries", async || {
        sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sent.clone()))
            .bind(campaign_id)
            .fetch_one(&suite.db)
            .await
            .unwrap_or(0)
            > 0
    })
    .await;

    // Mid-campaign, a fifth of the audience withdraws.
    let withdrawing: Vec<String> = customers.iter().step_by(5).cloned().collect();
    let runs = withdrawing.iter().map(|c| {
        let mut p = suite.profiles();
        let c = c.clone();
        async move { p.update_consent(consent(&c, false)).await.expect("withdraw") }
    });
    futures_util::future::join_all(runs).await;
    let returned = Utc::now();

    let done = format!("SELECT count(*) FROM {} WHERE campaign_id = $1 AND state IN (1, 2)", suite.table("messages"));
    wait_for("every campaign message handed over or refused", async || {
        let left: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(done.clone()))
            .bind(campaign_id)
            .fetch_one(&suite.db)
            .await
            .unwrap_or(1);
        let made: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM {} WHERE campaign_id = $1",
            suite.table("messages")
        )))
        .bind(campaign_id)
        .fetch_one(&suite.db)
        .await
        .unwrap_or(0);
        made == customers.len() as i64 && left == 0
    })
    .await;
    let withdrawn: Vec<Uuid> = withdrawing.iter().map(|s| Uuid::parse_str(s).expect("id")).collect();
    let after = format!(
        "SELECT count(*) FROM {} WHERE campaign_id = $1 AND customer_id = ANY($2) AND state IN (3, 4) AND sent_at >= $3",
        suite.table("messages")
    );
    let late: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(after))
        .bind(campaign_id)
        .bind(&withdrawn)
        .bind(returned)
        .fetch_one(&suite.db)
        .await
        .expect("late");
    assert_eq!(late, 0, "no message to a customer who had withdrawn was handed over after the withdrawal returned");
    let stopped = format!(
        "SELECT count(*) FROM {} WHERE campaign_id = $1 AND customer_id = ANY($2) AND state = 5 AND rule = 'OPTED_OUT'",
        suite.table("messages")
    );
    let stopped: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(stopped))
        .bind(campaign_id)
        .bind(&withdrawn)
        .fetch_one(&suite.db)
        .await
        .expect("stopped");
    let delivered_before = suite.delivered_to(&withdrawing).await;
    assert_eq!(stopped + delivered_before, withdrawing.len() as i64, "each was either reached before or stopped");
    let others: Vec<String> = customers.iter().filter(|c| !withdrawing.contains(c)).cloned().collect();
    assert_eq!(suite.delivered_to(&others).await, others.len() as i64, "everyone else was reached once");
    tokio::time::sleep(Duration::from_millis(10)).await;
    suite.stop().await;
}
