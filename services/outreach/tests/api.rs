//! The outreach API through gRPC against real PostgreSQL (SPEC 4.3): the
//! campaign loop from draft to delivered messages and outcomes, tasks,
//! offers, the decisions log, and bad input on every kind of request.

use std::time::Duration;

use crm_kit::Role;
use crm_kit::testing::Bearer;
use crm_kit::testing::bad_fields;
use crm_proto::common::v1::{Channel, Money, Purpose, Tier};
use crm_proto::outreach::v1 as pb;
use crm_proto::outreach::v1::outreach_service_client::OutreachServiceClient;
use tonic::Code;
use uuid::Uuid;

struct App {
    url: String,
    pool: sqlx::PgPool,
    shutdown: crm_kit::lifecycle::Shutdown,
    masker: std::sync::Arc<crm_kit::testing::NamesMasker>,
}

impl Drop for App {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

async fn start() -> App {
    let config = crm_kit::testing::config("outreach").await;
    let mut kit = crm_kit::Kit::start(crm_outreach::SPEC, config).await.expect("kit");
    crm_outreach::templates::seed(&kit.pg).await.expect("seed");
    let env = crm_kit::config::Env::from_pairs([("OUTREACH_POLL_MS", "20")]);
    let oc = crm_outreach::OutreachConfig::load(&env).expect("config");
    let parts = crm_outreach::build(&kit, &oc);
    crm_outreach::spawn_workers(&mut kit, &oc, &parts);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let pool = kit.pg.clone();
    let shutdown = kit.shutdown_handle();
    let masker = std::sync::Arc::new(crm_kit::testing::NamesMasker::default());
    let api = parts.api.with_masker(Some(masker.clone()));
    let routes = tonic::service::Routes::new(pb::outreach_service_server::OutreachServiceServer::new(api));
    tokio::spawn(kit.serve_on(listener, routes, crm_outreach::access_policy()));
    App { url, pool, shutdown, masker }
}

type Client = OutreachServiceClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>>;

fn client(app: &App, roles: &[Role]) -> Client {
    client_with(app, roles, false)
}

fn client_with(app: &App, roles: &[Role], pii: bool) -> Client {
    OutreachServiceClient::with_interceptor(
        crm_kit::client::channel(&app.url).expect("channel"),
        Bearer::minted(roles, pii),
    )
}

fn rid() -> String {
    Uuid::now_v7().to_string()
}

fn mask(paths: &[&str]) -> Option<prost_types::FieldMask> {
    Some(prost_types::FieldMask { paths: paths.iter().map(|p| p.to_string()).collect() })
}

fn body(locale: &str, text: &str) -> pb::TemplateBody {
    pb::TemplateBody { locale: locale.into(), subject: String::new(), body: text.into() }
}

fn template(channel: Channel, bodies: Vec<pb::TemplateBody>) -> pb::Template {
    pb::Template {
        display_name: "offer".into(),
        channel: channel as i32,
        content_type: pb::ContentType::ExclusiveOffer as i32,
        purpose: Purpose::Marketing as i32,
        bodies,
        ..Default::default()
    }
}

/// `n` customers of `tier` in `segment`, with marketing consent on SMS and WeChat.
async fn audience(pool: &sqlx::PgPool, segment: Uuid, tier: Tier, n: usize) -> Vec<Uuid> {
    let ids: Vec<Uuid> = (0..n).map(|_| Uuid::now_v7()).collect();
    sqlx::query(
        "INSERT INTO customers (customer_id, timezone, tier, spend_minor) SELECT id, 'UTC', $2, 250000 FROM UNNEST($1::uuid[]) AS t(id)",
    )
    .bind(&ids)
    .bind(tier as i16)
    .execute(pool)
    .await
    .expect("customers");
    sqlx::query(
        "INSERT INTO consents (customer_id, channel, purpose, granted) SELECT id, ch, 2, true FROM UNNEST($1::uuid[]) AS t(id), (VALUES (1), (4)) AS c(ch)",
    )
    .bind(&ids)
    .execute(pool)
    .await
    .expect("consents");
    sqlx::query("INSERT INTO segment_members (segment_id, customer_id) SELECT $1, id FROM UNNEST($2::uuid[]) AS t(id)")
        .bind(segment)
        .bind(&ids)
        .execute(pool)
        .await
        .expect("members");
    ids
}

async fn wait_for<F: AsyncFnMut() -> bool>(what: &str, mut done: F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !done().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_campaign_with_ab_variants_and_a_holdout_runs_from_draft_to_outcomes() {
    let app = start().await;
    let mut admin = client(&app, &[Role::Admin]);
    // Quiet hours off so the run does not depend on the time of day.
    admin
        .update_contact_policy(pb::UpdateContactPolicyRequest {
            policy: Some(pb::ContactPolicy::default()),
            update_mask: mask(&["quiet_start", "quiet_end"]),
            etag: String::new(),
            request_id: rid(),
        })
        .await
        .expect("policy");
    let sms = admin
        .create_template(pb::CreateTemplateRequest {
            template: Some(template(
                Channel::Sms,
                vec![body("zh-CN", "{{name}}：{{tier}}会员{{discount}}优惠，{{campaign_name}}")],
            )),
            request_id: rid(),
        })
        .await
        .expect("sms template")
        .into_inner();
    assert_eq!(sms.variables, ["campaign_name", "discount", "name", "tier"]);
    let wechat = admin
        .create_template(pb::CreateTemplateRequest {
            template: Some(template(Channel::Wechat, vec![body("zh-CN", "{{name}}，专属积分 {{points}}")])),
            request_id: rid(),
        })
        .await
        .expect("wechat template")
        .into_inner();
    let segment = Uuid::now_v7();
    let gold = audience(&app.pool, segment, Tier::Gold, 150).await;
    let silver = audience(&app.pool, segment, Tier::Silver, 150).await;
    let plan = |tier: Tier, ch: Channel, t: &pb::Template| pb::TierChannelPlan {
        tier: tier as i32,
        channels: vec![ch as i32],
        template_ids: [(ch.as_str_name().to_string(), t.template_id.clone())].into_iter().collect(),
    };
    let campaign = pb::Campaign {
        display_name: "Win-back".into(),
        segment_ids: vec![segment.to_string()],
        variants: vec![
            pb::Variant {
                name: "A".into(),
                traffic_percent: 50,
                channel_plan: vec![
                    plan(Tier::Gold, Channel::Wechat, &wechat),
                    plan(Tier::Unspecified, Channel::Sms, &sms),
                ],
            },
            pb::Variant {
                name: "B".into(),
                traffic_percent: 50,
                channel_plan: vec![plan(Tier::Unspecified, Channel::Sms, &sms)],
            },
        ],
        holdout_percent: 10,
        schedule: Some(pb::Schedule { when: Some(pb::schedule::When::Now(true)), timezone: String::new() }),
        budget: Some(Money { amount_minor: 1_000_000, currency: "CNY".into() }),
        ..Default::default()
    };
    let created = admin
        .create_campaign(pb::CreateCampaignRequest { campaign: Some(campaign.clone()), request_id: "camp-1".into() })
        .await
        .expect("create")
        .into_inner();
    assert_eq!(created.state, pb::CampaignState::Draft as i32);
    let again = admin
        .create_campaign(pb::CreateCampaignRequest { campaign: Some(campaign), request_id: "camp-1".into() })
        .await
        .expect("replay")
        .into_inner();
    assert_eq!(again.campaign_id, created.campaign_id, "a repeated request_id returns the first result");

    let preview = admin
        .preview_campaign(pb::PreviewCampaignRequest { campaign_id: created.campaign_id.clone() })
        .await
        .expect("preview")
        .into_inner();
    assert_eq!(preview.audience_size, 300);
    let contacted = preview.audience_size - preview.holdout_size;
    assert!(preview.holdout_size > 10 && preview.holdout_size < 60, "{preview:?}");
    assert_eq!(preview.variant_sizes.values().sum::<i64>(), contacted);
    assert_eq!(preview.suppressed_estimate, 0, "everyone consented");
    let gold_wechat = preview.cost_estimate.as_ref().expect("cost").amount_minor - 20 * contacted;
    assert!(
        gold_wechat > 0 && gold_wechat % 60 == 0,
        "gold customers of variant A go by WeChat (0.80, not 0.20): {preview:?}"
    );

    // OUT-3: illegal transitions are refused; DRAFT -> RUNNING launches.
    let illegal = admin
        .transition_campaign(pb::TransitionCampaignRequest {
            campaign_id: created.campaign_id.clone(),
            target_state: pb::CampaignState::Completed as i32,
            request_id: rid(),
        })
        .await
        .expect_err("draft cannot complete");
    assert_eq!(illegal.code(), Code::FailedPrecondition);
    admin
        .transition_campaign(pb::TransitionCampaignRequest {
            campaign_id: created.campaign_id.clone(),
            target_state: pb::CampaignState::Running as i32,
            request_id: rid(),
        })
        .await
        .expect("run");

    let pool = app.pool.clone();
    let campaign_id = Uuid::parse_str(&created.campaign_id).expect("id");
    wait_for("every contacted customer's message to reach the sink", async || {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM sink_deliveries WHERE campaign_id = $1")
            .bind(campaign_id)
            .fetch_one(&pool)
            .await
            .expect("count");
        n == contacted
    })
    .await;
    // The holdout was recorded and never reached the provider.
    let holdout_delivered: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sink_deliveries d JOIN campaign_assignments a ON a.customer_id = d.customer_id \
         WHERE a.campaign_id = $1 AND a.grp = 'holdout'",
    )
    .bind(campaign_id)
    .fetch_one(&pool)
    .await
    .expect("holdout");
    assert_eq!(holdout_delivered, 0);
    // Gold customers in variant A got WeChat with their points; the others SMS with their tier's discount.
    let (wechat_count, gold_in_a): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM sink_deliveries WHERE campaign_id = $1 AND channel = 4), \
                (SELECT count(*) FROM campaign_assignments WHERE campaign_id = $1 AND grp = 'A' AND tier = 2)",
    )
    .bind(campaign_id)
    .fetch_one(&pool)
    .await
    .expect("channels");
    assert_eq!(wechat_count, gold_in_a);
    let silver_body: String = sqlx::query_scalar(
        "SELECT body FROM sink_deliveries WHERE campaign_id = $1 AND customer_id = ANY($2) AND channel = 1 LIMIT 1",
    )
    .bind(campaign_id)
    .bind(&silver)
    .fetch_one(&pool)
    .await
    .expect("body");
    assert_eq!(silver_body, "尊敬的客户：银卡会员10%优惠，Win-back");

    // The campaign completes by itself once nothing is left to send, with its spend.
    let mut analyst = client(&app, &[Role::Analyst]);
    let id = created.campaign_id.clone();
    wait_for("the campaign to complete", async || {
        let c =
            analyst.get_campaign(pb::GetCampaignRequest { campaign_id: id.clone() }).await.expect("get").into_inner();
        c.state == pb::CampaignState::Completed as i32
    })
    .await;
    let done =
        analyst.get_campaign(pb::GetCampaignRequest { campaign_id: id.clone() }).await.expect("get").into_inner();
    let spent = done.spent.expect("spent").amount_minor;
    assert_eq!(spent, 80 * gold_in_a + 20 * (contacted - gold_in_a), "WeChat 0.80 and SMS 0.20 per contact");

    // OUT-8: outcomes per message, attributed inside the window; a response ends the backoff streak.
    let messages = analyst
        .list_messages(pb::ListMessagesRequest {
            customer_id: gold[0].to_string(),
            campaign_id: String::new(),
            state: 0,
            page_size: 10,
            page_token: String::new(),
        })
        .await
        .expect("list")
        .into_inner()
        .messages;
    assert_eq!(messages.len(), 1);
    let m = &messages[0];
    let mut service = client(&app, &[Role::Service]);
    if m.state == pb::MessageState::Sent as i32 {
        let converted = service
            .record_outcome(pb::RecordOutcomeRequest {
                message_id: m.message_id.clone(),
                outcome: pb::OutcomeKind::Converted as i32,
                occurred_at: None,
                revenue: Some(Money { amount_minor: 59_900, currency: "CNY".into() }),
                request_id: rid(),
            })
            .await
            .expect("outcome")
            .into_inner();
        assert!(converted.attributed);
        let twice = service
            .record_outcome(pb::RecordOutcomeRequest {
                message_id: m.message_id.clone(),
                outcome: pb::OutcomeKind::Converted as i32,
                occurred_at: None,
                revenue: Some(Money { amount_minor: 59_900, currency: "CNY".into() }),
                request_id: rid(),
            })
            .await
            .expect_err("an outcome is recorded once");
        assert_eq!(twice.code(), Code::AlreadyExists);
    } else {
        assert_eq!(m.decision.as_ref().expect("decision").rule, "HOLDOUT");
    }
    // "Why was this customer (not) contacted?"
    let decisions = analyst
        .list_contact_decisions(pb::ListContactDecisionsRequest {
            customer_id: silver[0].to_string(),
            time_range: None,
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .expect("decisions")
        .into_inner()
        .decisions;
    let held: bool = sqlx::query_scalar("SELECT grp = 'holdout' FROM campaign_assignments WHERE customer_id = $1")
        .bind(silver[0])
        .fetch_one(&app.pool)
        .await
        .expect("group");
    if held {
        assert!(decisions.is_empty(), "a held-out customer is never put to the policy");
    } else {
        assert_eq!(decisions[0].rule, "ALLOWED");
    }

    // OUT-6: the offer follows the tier.
    let offer =
        service.get_offer(pb::GetOfferRequest { customer_id: gold[1].to_string() }).await.expect("offer").into_inner();
    assert_eq!((offer.discount_percent, offer.points), (15, 2500));
    assert_eq!(offer.coupon_value.expect("coupon").amount_minor, 2500);
}

#[tokio::test]
async fn templates_are_checked_at_save_and_preview_not_at_send() {
    let app = start().await;
    let mut admin = client(&app, &[Role::Admin]);
    let err = admin
        .create_template(pb::CreateTemplateRequest {
            template: Some(template(Channel::Sms, vec![body("zh-CN", "{{nmae}} 您好"), body("fr", "Bonjour {{name")])),
            request_id: rid(),
        })
        .await
        .expect_err("unknown variable");
    assert_eq!(
        bad_fields(&err),
        ["template.bodies[0].body", "template.bodies[1].locale", "template.bodies[1].body"],
        "{err:?}"
    );
    let t = admin
        .create_template(pb::CreateTemplateRequest {
            template: Some(template(
                Channel::Sms,
                vec![body("zh-CN", "{{name}}，优惠码 {{offer_code}}"), body("en", "{{name}}, code {{offer_code}}")],
            )),
            request_id: rid(),
        })
        .await
        .expect("template")
        .into_inner();
    let preview = admin
        .preview_template(pb::PreviewTemplateRequest {
            template_id: t.template_id.clone(),
            locale: "en".into(),
            customer_id: String::new(),
            sample_values: [
                ("name".to_string(), "Wang Li".to_string()),
                ("offer_code".to_string(), "AUTUMN".to_string()),
            ]
            .into_iter()
            .collect(),
        })
        .await
        .expect("preview")
        .into_inner();
    assert_eq!(preview.body, "Wang Li, code AUTUMN");
    let missing = admin
        .preview_template(pb::PreviewTemplateRequest {
            template_id: t.template_id.clone(),
            locale: "zh-CN".into(),
            customer_id: String::new(),
            sample_values: Default::default(),
        })
        .await
        .expect_err("missing values");
    assert_eq!(bad_fields(&missing), ["sample_values"]);
    // A send that would need an offer_code nobody gives is refused before it is queued.
    let customer = Uuid::now_v7();
    let mut agent = client(&app, &[Role::Agent]);
    let refused = agent
        .send_message(pb::SendMessageRequest {
            customer_id: customer.to_string(),
            channel: 0,
            template_id: t.template_id.clone(),
            variables: Default::default(),
            request_id: rid(),
        })
        .await
        .expect_err("needs offer_code");
    assert_eq!(bad_fields(&refused), ["variables"]);
    let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM messages").fetch_one(&app.pool).await.expect("count");
    assert_eq!(queued, 0, "nothing stored");
    // Optimistic concurrency on update.
    let stale = admin
        .update_template(pb::UpdateTemplateRequest {
            template: Some(pb::Template {
                template_id: t.template_id.clone(),
                display_name: "renamed".into(),
                ..Default::default()
            }),
            update_mask: mask(&["display_name"]),
            etag: "v7".into(),
            request_id: rid(),
        })
        .await
        .expect_err("stale etag");
    assert_eq!(stale.code(), Code::Aborted);
    let renamed = admin
        .update_template(pb::UpdateTemplateRequest {
            template: Some(pb::Template {
                template_id: t.template_id.clone(),
                display_name: "renamed".into(),
                ..Default::default()
            }),
            update_mask: mask(&["display_name"]),
            etag: t.etag.clone(),
            request_id: rid(),
        })
        .await
        .expect("update")
        .into_inner();
    assert_eq!((renamed.display_name.as_str(), renamed.etag.as_str()), ("renamed", "v2"));
}

#[tokio::test]
async fn agent_tasks_move_forward_only_and_completion_is_recorded() {
    let app = start().await;
    let mut agent = client(&app, &[Role::Agent]);
    let due = prost_types::Timestamp { seconds: chrono::Utc::now().timestamp() + 3600, nanos: 0 };
    let task = agent
        .create_task(pb::CreateTaskRequest {
            task: Some(pb::Task {
                customer_id: Uuid::now_v7().to_string(),
                kind: pb::TaskKind::CallBack as i32,
                owner: "agent-7".into(),
                due_time: Some(due),
                reason: "churn risk high".into(),
                ..Default::default()
            }),
            request_id: rid(),
        })
        .await
        .expect("task")
        .into_inner();
    assert_eq!(task.status, pb::TaskStatus::Planned as i32);
    let update = |status: pb::TaskStatus, problem: &str, etag: &str| pb::UpdateTaskRequest {
        task: Some(pb::Task {
            task_id: task.task_id.clone(),
            status: status as i32,
            problem: problem.into(),
            ..Default::default()
        }),
        update_mask: mask(&["status", "problem"]),
        etag: etag.into(),
        request_id: rid(),
    };
    let refused = agent.update_task(update(pb::TaskStatus::NotExecuted, "", "")).await.expect_err("needs a reason");
    assert_eq!(bad_fields(&refused), ["task.problem"]);
    let done = agent.update_task(update(pb::TaskStatus::Done, "price too high", "")).await.expect("done").into_inner();
    assert!(done.complete_time.is_some());
    let back = agent.update_task(update(pb::TaskStatus::InProgress, "", "")).await.expect_err("final");
    assert_eq!(back.code(), Code::FailedPrecondition);
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM kit_outbox WHERE event_type IN ('crm.outreach.v1.TaskCreated', 'crm.outreach.v1.TaskCompleted')")
        .fetch_one(&app.pool)
        .await
        .expect("events");
    assert_eq!(events, 2);

    // OUT-7: an overdue task escalates.
    sqlx::query("INSERT INTO tasks (task_id, customer_id, kind, owner, due_at, status) VALUES ($1, $2, 1, 'agent-7', now() - interval '25 hours', 1)")
        .bind(Uuid::now_v7())
        .bind(Uuid::now_v7())
        .execute(&app.pool)
        .await
        .expect("overdue task");
    // The watcher runs in the background too; whichever round gets there first escalates it once.
    let mut tx = app.pool.begin().await.expect("tx");
    crm_outreach::tasks::escalate_overdue(&mut tx, chrono::Utc::now()).await.expect("escalate");
    tx.commit().await.expect("commit");
    let list = agent
        .list_tasks(pb::ListTasksRequest {
            owner: "agent-7".into(),
            status: pb::TaskStatus::Overdue as i32,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(list.tasks.len(), 1);
    assert_eq!(list.tasks[0].escalation_level, 2);
}

#[tokio::test]
async fn bad_input_names_the_field_and_stores_nothing() {
    let app = start().await;
    let mut admin = client(&app, &[Role::Admin]);
    let e = admin
        .send_message(pb::SendMessageRequest {
            customer_id: "nope".into(),
            channel: Channel::Hotline as i32,
            template_id: String::new(),
            variables: [("password".to_string(), "x".to_string())].into_iter().collect(),
            request_id: String::new(),
        })
        .await
        .expect_err("bad send");
    assert_eq!(bad_fields(&e), ["customer_id", "channel", "template_id", "variables[password]", "request_id"]);
    let e = admin
        .create_campaign(pb::CreateCampaignRequest {
            campaign: Some(pb::Campaign {
                display_name: String::new(),
                segment_ids: vec!["x".into()],
                variants: vec![pb::Variant { name: "holdout".into(), traffic_percent: 60, channel_plan: vec![] }],
                holdout_percent: 90,
                schedule: Some(pb::Schedule {
                    when: Some(pb::schedule::When::Cron("0 9 * * *".into())),
                    timezone: String::new(),
                }),
                budget: Some(Money { amount_minor: -1, currency: "USD".into() }),
                ..Default::default()
            }),
            request_id: rid(),
        })
        .await
        .expect_err("bad campaign");
    assert_eq!(
        bad_fields(&e),
        [
            "campaign.display_name",
            "campaign.segment_ids[0]",
            "campaign.variants[0].name",
            "campaign.variants[0].channel_plan",
            "campaign.variants",
            "campaign.holdout_percent",
            "campaign.schedule.cron",
            "campaign.budget"
        ]
    );
    let e = admin
        .create_campaign(pb::CreateCampaignRequest {
            campaign: Some(pb::Campaign {
                display_name: "x".into(),
                segment_ids: vec![Uuid::now_v7().to_string()],
                variants: vec![pb::Variant {
                    name: "A".into(),
                    traffic_percent: 100,
                    channel_plan: vec![pb::TierChannelPlan {
                        tier: 0,
                        channels: vec![Channel::Sms as i32],
                        template_ids: [("CHANNEL_SMS".to_string(), Uuid::now_v7().to_string())].into_iter().collect(),
                    }],
                }],
                ..Default::default()
            }),
            request_id: rid(),
        })
        .await
        .expect_err("unknown template");
    assert_eq!(bad_fields(&e), ["campaign.variants[0].channel_plan[0].template_ids"]);
    let e = admin
        .update_contact_policy(pb::UpdateContactPolicyRequest {
            policy: Some(pb::ContactPolicy {
                quiet_start: "25:00".into(),
                global_control_percent: 80,
                ..Default::default()
            }),
            update_mask: mask(&["quiet_start", "global_control_percent"]),
            etag: String::new(),
            request_id: rid(),
        })
        .await
        .expect_err("bad policy");
    assert_eq!(bad_fields(&e), ["policy.quiet_start", "policy.global_control_percent"]);
    let e = admin
        .update_contact_policy(pb::UpdateContactPolicyRequest {
            policy: Some(pb::ContactPolicy::default()),
            update_mask: mask(&["color"]),
            etag: String::new(),
            request_id: rid(),
        })
        .await
        .expect_err("bad mask");
    assert_eq!(bad_fields(&e), ["update_mask"]);
    let e = admin
        .list_messages(pb::ListMessagesRequest { page_token: "zz".into(), ..Default::default() })
        .await
        .expect_err("bad token");
    assert_eq!(bad_fields(&e), ["page_token"]);
    let e = admin
        .record_outcome(pb::RecordOutcomeRequest {
            message_id: Uuid::now_v7().to_string(),
            outcome: 42,
            occurred_at: None,
            revenue: None,
            request_id: rid(),
        })
        .await
        .expect_err("unknown enum");
    assert_eq!(bad_fields(&e), ["outcome"]);
    let e = admin
        .update_channel(pb::UpdateChannelRequest {
            channel: Some(pb::ChannelConfig {
                channel: Channel::Sms as i32,
                adapter: "webhook".into(),
                ..Default::default()
            }),
            update_mask: mask(&["adapter"]),
            request_id: rid(),
        })
        .await
        .expect_err("no webhook configured");
    assert_eq!(bad_fields(&e), ["channel.adapter"]);
    let e = admin
        .acknowledge_feedback(pb::AcknowledgeFeedbackRequest {
            customer_id: Uuid::now_v7().to_string(),
            ..Default::default()
        })
        .await
        .expect_err("ack without feedback");
    assert_eq!(bad_fields(&e), ["feedback_id", "request_id"]);
    // Roles are enforced per RPC.
    let mut analyst = client(&app, &[Role::Analyst]);
    let denied = analyst
        .update_channel(pb::UpdateChannelRequest { channel: None, update_mask: None, request_id: rid() })
        .await
        .expect_err("admin only");
    assert_eq!(denied.code(), Code::PermissionDenied);
    let stored: (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM messages), (SELECT count(*) FROM campaigns), (SELECT count(*) FROM contact_policy)",
    )
    .fetch_one(&app.pool)
    .await
    .expect("counts");
    assert_eq!(stored, (0, 0, 0));
}

#[tokio::test]
async fn feedback_is_acknowledged_as_a_service_message_even_without_marketing_consent() {
    let app = start().await;
    let customer = Uuid::now_v7();
    sqlx::query("INSERT INTO customers (customer_id, timezone, preferred_channel) VALUES ($1, 'UTC', 2)")
        .bind(customer)
        .execute(&app.pool)
        .await
        .expect("customer");
    let mut service = client(&app, &[Role::Service]);
    let ack = service
        .acknowledge_feedback(pb::AcknowledgeFeedbackRequest {
            customer_id: customer.to_string(),
            feedback_id: "fb-1".into(),
            ticket_id: "t-1".into(),
            channel: Channel::Hotline as i32,
            locale: "en".into(),
            request_id: "ack-fb-1".into(),
            kind: pb::AcknowledgementKind::Unspecified as i32,
        })
        .await
        .expect("ack")
        .into_inner()
        .message
        .expect("message");
    assert_eq!(ack.purpose, Purpose::Service as i32);
    assert_eq!(ack.channel, Channel::Email as i32, "hotline is inbound only: the preferred channel is used");
    assert_eq!(ack.trigger, "feedback_acknowledgement");
    let d = ack.decision.expect("decision");
    // Quiet hours may defer it depending on the time of day; it is never dropped for lack of marketing consent.
    assert!(d.rule == "ALLOWED" || d.rule == "QUIET_HOURS", "{d:?}");
    // FBK-3 closed loop: the resolution check is its own system template, also a service message.
    let check = service
        .acknowledge_feedback(pb::AcknowledgeFeedbackRequest {
            customer_id: customer.to_string(),
            feedback_id: "fb-1".into(),
            ticket_id: "t-1".into(),
            channel: Channel::Hotline as i32,
            locale: "zh-CN".into(),
            request_id: "check-t-1".into(),
            kind: pb::AcknowledgementKind::ResolutionCheck as i32,
        })
        .await
        .expect("resolution check")
        .into_inner()
        .message
        .expect("message");
    assert_eq!(check.trigger, "feedback_verification");
    assert_eq!(check.template_id, crm_outreach::api::VERIFY_TEMPLATE.to_string());
    assert_eq!(check.purpose, Purpose::Service as i32);
    let e = service
        .acknowledge_feedback(pb::AcknowledgeFeedbackRequest {
            customer_id: customer.to_string(),
            feedback_id: "fb-1".into(),
            request_id: "check-bad".into(),
            kind: 99,
            ..Default::default()
        })
        .await
        .expect_err("unknown kind");
    assert_eq!(bad_fields(&e), ["kind"]);
}

#[tokio::test]
async fn a_dead_lettered_message_is_retried_with_the_same_key() {
    let app = start().await;
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO messages (message_id, customer_id, channel, template_id, purpose, state, due_at, expires_at, locale, variables, \
                               attempts, last_error, decided_at) \
         VALUES ($1, $2, 1, $3, 1, 6, now(), now() + interval '1 day', 'en', '{\"feedback_id\": \"FB-1\"}', 5, 'provider down', now())",
    )
    .bind(id)
    .bind(Uuid::now_v7())
    .bind(crm_outreach::api::ACK_TEMPLATE)
    .execute(&app.pool)
    .await
    .expect("dead letter");
    let mut admin = client(&app, &[Role::Admin]);
    let dead = admin
        .list_messages(pb::ListMessagesRequest { state: pb::MessageState::DeadLetter as i32, ..Default::default() })
        .await
        .expect("list")
        .into_inner()
        .messages;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].last_error, "provider down");
    let retried = admin
        .retry_message(pb::RetryMessageRequest { message_id: id.to_string(), request_id: rid() })
        .await
        .expect("retry")
        .into_inner();
    assert_eq!((retried.state, retried.attempts), (pb::MessageState::Queued as i32, 0));
    let pool = app.pool.clone();
    wait_for("the retried message to reach the sink", async || {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM sink_deliveries WHERE idempotency_key = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .expect("sink");
        n == 1
    })
    .await;
    let again = admin
        .retry_message(pb::RetryMessageRequest { message_id: id.to_string(), request_id: rid() })
        .await
        .expect_err("no longer dead");
    assert_eq!(again.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn out6_callers_fill_only_free_variables_and_offer_values_stay_computed() {
    let app = start().await;
    let mut admin = client(&app, &[Role::Admin]);
    admin
        .update_contact_policy(pb::UpdateContactPolicyRequest {
            policy: Some(pb::ContactPolicy::default()),
            update_mask: mask(&["quiet_start", "quiet_end"]),
            etag: String::new(),
            request_id: rid(),
        })
        .await
        .expect("policy");
    let t = admin
        .create_template(pb::CreateTemplateRequest {
            template: Some(template(Channel::Sms, vec![body("en", "{{discount}} off with code {{offer_code}}")])),
            request_id: rid(),
        })
        .await
        .expect("template")
        .into_inner();
    let customer = audience(&app.pool, Uuid::now_v7(), Tier::Gold, 1).await[0];
    let mut agent = client(&app, &[Role::Agent]);
    let send = |vars: &[(&str, &str)]| pb::SendMessageRequest {
        customer_id: customer.to_string(),
        channel: Channel::Sms as i32,
        template_id: t.template_id.clone(),
        variables: vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        request_id: rid(),
    };
    // Issue 22: an agent could send "90 % off" by overriding the computed offer.
    let e = agent.send_message(send(&[("discount", "90%"), ("offer_code", "X")])).await.expect_err("computed");
    assert_eq!(bad_fields(&e), ["variables[discount]"]);
    assert!(e.message().contains("OUT-6"), "{}", e.message());
    for computed in ["name", "tier", "points", "coupon_value", "campaign_name"] {
        let e = agent.send_message(send(&[(computed, "x"), ("offer_code", "X")])).await.expect_err(computed);
        assert_eq!(bad_fields(&e), [format!("variables[{computed}]")]);
    }
    let e = agent.send_message(send(&[("offer_code", "X"), ("ticket_id", "T-1")])).await.expect_err("unused");
    assert_eq!(bad_fields(&e), ["variables[ticket_id]"], "only variables the template declares");
    let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM messages").fetch_one(&app.pool).await.expect("count");
    assert_eq!(queued, 0, "nothing stored");

    let sent = agent.send_message(send(&[("offer_code", "AUTUMN")])).await.expect("send").into_inner();
    let id = Uuid::parse_str(&sent.message.expect("message").message_id).expect("id");
    // A message stored with an offer value (say, by an older release) still renders the computed one.
    let forged = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO messages (message_id, customer_id, channel, template_id, purpose, state, due_at, expires_at, locale, variables) \
         VALUES ($1, $2, 1, $3, 2, 1, now(), now() + interval '1 day', 'en', '{\"discount\": \"90%\", \"offer_code\": \"OLD\"}')",
    )
    .bind(forged)
    .bind(customer)
    .bind(Uuid::parse_str(&t.template_id).expect("template id"))
    .execute(&app.pool)
    .await
    .expect("stored message");
    let pool = app.pool.clone();
    let mut bodies: Vec<String> = Vec::new();
    wait_for("both messages in the sink", async || {
        bodies = sqlx::query_scalar(
            "SELECT body FROM sink_deliveries WHERE idempotency_key = ANY($1) ORDER BY idempotency_key",
        )
        .bind(vec![id, forged])
        .fetch_all(&pool)
        .await
        .expect("sink");
        bodies.len() == 2
    })
    .await;
    assert_eq!(
        bodies,
        ["15% off with code AUTUMN", "15% off with code OLD"],
        "GOLD's 15 % (OUT-6), whatever was stored"
    );
}

#[tokio::test]
async fn sec4_task_notes_and_errors_are_masked_without_pii_read_and_left_out_of_events() {
    let app = start().await;
    let customer = Uuid::now_v7();
    app.masker.name(&customer.to_string(), "Wei Li");
    let mut agent = client(&app, &[Role::Agent]);
    let mut reader = client_with(&app, &[Role::Admin], true);
    let said = "Wei Li asked to call 139 1234 5678 or write to wei.li@example.com";
    let task = agent
        .create_task(pb::CreateTaskRequest {
            task: Some(pb::Task {
                customer_id: customer.to_string(),
                kind: pb::TaskKind::CallBack as i32,
                owner: "agent-7".into(),
                due_time: Some(prost_types::Timestamp { seconds: chrono::Utc::now().timestamp() + 3600, nanos: 0 }),
                reason: said.into(),
                ..Default::default()
            }),
            request_id: rid(),
        })
        .await
        .expect("task")
        .into_inner();
    let masked = "W*** Li asked to call 139****5678 or write to w***@example.com";
    assert_eq!(task.reason, masked);
    let get = || pb::GetTaskRequest { task_id: task.task_id.clone() };
    assert_eq!(agent.get_task(get()).await.expect("get").into_inner().reason, masked);
    assert_eq!(reader.get_task(get()).await.expect("get").into_inner().reason, said);
    let listed = agent
        .list_tasks(pb::ListTasksRequest { customer_id: customer.to_string(), ..Default::default() })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.tasks[0].reason, masked);
    app.masker.down.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(agent.get_task(get()).await.expect("get").into_inner().reason, crm_kit::privacy::WITHHELD);
    let in_events: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM kit_outbox WHERE position(convert_to('5678', 'UTF8') IN envelope) > 0",
    )
    .fetch_one(&app.pool)
    .await
    .expect("outbox");
    assert_eq!(in_events, 0, "TaskCreated carries no notes (SEC-5)");

    // A relay that refused the address echoed it in the error.
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO messages (message_id, customer_id, channel, template_id, purpose, state, due_at, expires_at, locale, variables, \
                               attempts, last_error, decided_at) \
         VALUES ($1, $2, 2, $3, 1, 6, now(), now() + interval '1 day', 'en', '{}', 5, '550 mailbox wei.li@example.com unknown', now())",
    )
    .bind(id)
    .bind(customer)
    .bind(crm_outreach::api::ACK_TEMPLATE)
    .execute(&app.pool)
    .await
    .expect("dead letter");
    let m = || pb::GetMessageRequest { message_id: id.to_string() };
    assert_eq!(
        agent.get_message(m()).await.expect("get").into_inner().last_error,
        "550 mailbox w***@example.com unknown"
    );
    assert_eq!(
        reader.get_message(m()).await.expect("get").into_inner().last_error,
        "550 mailbox wei.li@example.com unknown"
    );
}
