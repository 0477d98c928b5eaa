//! The retention loop end to end on generated data, through the public gRPC
//! APIs only (DX-3): customers and purchases -> segments and churn risk -> a
//! win-back campaign with a holdout -> outcomes -> feedback and tickets ->
//! KPIs. `crm-demo run` prints its [`Report`]; the end-to-end test in
//! `tests/` drives the same loop and checks its results.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use crm_proto::analytics::v1 as an;
use crm_proto::analytics::v1::analytics_service_client::AnalyticsServiceClient;
use crm_proto::common::v1::{Channel, LifecycleStage, Money, Purpose, TimeRange};
use crm_proto::feedback::v1 as fb;
use crm_proto::feedback::v1::feedback_service_client::FeedbackServiceClient;
use crm_proto::outreach::v1 as out;
use crm_proto::outreach::v1::outreach_service_client::OutreachServiceClient;
use crm_proto::profiles::v1 as pf;
use crm_proto::profiles::v1::import_records_request::Record;
use crm_proto::profiles::v1::profiles_service_client::ProfilesServiceClient;
use crm_proto::segmentation::v1 as sg;
use crm_proto::segmentation::v1::segmentation_service_client::SegmentationServiceClient;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel as Transport;

/// Adds the bearer token and the caller's trace context to every call.
#[derive(Clone)]
pub struct Auth(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

type Chan = InterceptedService<Transport, Auth>;

/// Where the five services are.
#[derive(Debug, Clone)]
pub struct Urls {
    /// profiles.
    pub profiles: String,
    /// segmentation.
    pub segmentation: String,
    /// outreach.
    pub outreach: String,
    /// feedback.
    pub feedback: String,
    /// analytics.
    pub analytics: String,
}

impl Default for Urls {
    fn default() -> Self {
        let u = |p: u16| format!("http://127.0.0.1:{p}");
        Urls { profiles: u(50051), segmentation: u(50052), outreach: u(50053), feedback: u(50054), analytics: u(50055) }
    }
}

/// The clients of the five services.
#[derive(Clone)]
pub struct Suite {
    /// profiles.
    pub profiles: ProfilesServiceClient<Chan>,
    /// segmentation.
    pub segmentation: SegmentationServiceClient<Chan>,
    /// outreach.
    pub outreach: OutreachServiceClient<Chan>,
    /// feedback.
    pub feedback: FeedbackServiceClient<Chan>,
    /// analytics.
    pub analytics: AnalyticsServiceClient<Chan>,
}

impl Suite {
    /// Clients of the suite at `urls`, calling with `token`.
    pub fn connect(urls: &Urls, token: &str) -> Result<Suite, String> {
        let auth = Auth(format!("Bearer {token}").parse().map_err(|_| "the token is not ASCII")?);
        let ch = |u: &str| {
            crm_kit::client::channel(u)
                .map(|c| InterceptedService::new(c, auth.clone()))
                .map_err(|e| format!("{u}: {e}"))
        };
        Ok(Suite {
            profiles: ProfilesServiceClient::new(ch(&urls.profiles)?).max_encoding_message_size(16 << 20),
            segmentation: SegmentationServiceClient::new(ch(&urls.segmentation)?),
            outreach: OutreachServiceClient::new(ch(&urls.outreach)?),
            feedback: FeedbackServiceClient::new(ch(&urls.feedback)?),
            analytics: AnalyticsServiceClient::new(ch(&urls.analytics)?),
        })
    }
}

fn status(what: &str) -> impl Fn(tonic::Status) -> String + '_ {
    move |s| format!("{what}: {:?} {}", s.code(), s.message())
}

/// What the seed loaded.
#[derive(Debug, Clone, Default)]
pub struct Seeded {
    /// Customers created now.
    pub created: i64,
    /// Customers already there.
    pub matched: i64,
    /// Transactions recorded.
    pub transactions: i64,
    /// Interactions recorded.
    pub interactions: i64,
    /// Customers given their consent.
    pub consents: usize,
}

/// Loads the generated data set (customers, purchases, interactions,
/// consent) into profiles. Safe to repeat: customers match and rows deduplicate.
pub async fn seed(suite: &Suite, customers: usize, seed: u64) -> Result<Seeded, String> {
    let generated = crm_datagen::Generator::new(crm_datagen::Config { customers, seed, ..Default::default() });
    let mut rows = Vec::new();
    let mut consents = Vec::new();
    for g in generated {
        consents.push((g.external_id(), g.consents()));
        let reference = g.external_id();
        rows.push(pf::ImportRecordsRequest { record: Some(Record::Customer(g.customer)), customer_ref: None });
        rows.extend(g.transactions.into_iter().map(|t| pf::ImportRecordsRequest {
            record: Some(Record::Transaction(t)),
            customer_ref: Some(reference.clone()),
        }));
        rows.extend(g.interactions.into_iter().map(|i| pf::ImportRecordsRequest {
            record: Some(Record::Interaction(i)),
            customer_ref: Some(reference.clone()),
        }));
    }
    let mut p = suite.profiles.clone();
    let r = p.import_records(tokio_stream::iter(rows)).await.map_err(status("ImportRecords"))?.into_inner();
    let granted = lanes(
        16,
        consents.into_iter().filter(|(_, g)| !g.is_empty()).collect(),
        |p: &mut ProfilesServiceClient<Chan>, (external, grants): (pf::ExternalId, Vec<pf::ConsentGrant>)| {
            let mut p = p.clone();
            async move {
                let key = format!("demo-consent-{}", external.id);
                let customer = p
                    .resolve_customer(pf::ResolveCustomerRequest {
                        identity: Some(pf::resolve_customer_request::Identity::ExternalId(external)),
                        purpose: "demo: seed consent".into(),
                    })
                    .await
                    .map_err(status("ResolveCustomer"))?
                    .into_inner();
                p.update_consent(pf::UpdateConsentRequest {
                    customer_id: customer.customer_id,
                    changes: grants,
                    request_id: key,
                })
                .await
                .map_err(status("UpdateConsent"))?;
                Ok(())
            }
        },
        &suite.profiles,
    )
    .await?;
    Ok(Seeded {
        created: r.customers_created,
        matched: r.customers_matched,
        transactions: r.transactions_recorded,
        interactions: r.interactions_recorded,
        consents: granted,
    })
}

/// Runs `f` over `items` on `n` concurrent lanes; returns how many ran.
/// Records `kind` for each message (with its revenue, if any), 16 calls at a time.
async fn record_outcomes(
    outreach: &OutreachServiceClient<Chan>,
    run: &str,
    kind: out::OutcomeKind,
    messages: Vec<(String, Option<i64>)>,
) -> Result<usize, String> {
    let prefix = format!("{run}-{}", kind.as_str_name().trim_start_matches("OUTCOME_KIND_").to_ascii_lowercase());
    let record = move |o: &mut OutreachServiceClient<Chan>, (m, revenue): (String, Option<i64>)| {
        let mut o = o.clone();
        let request_id = format!("{prefix}-{m}");
        async move {
            o.record_outcome(out::RecordOutcomeRequest {
                message_id: m,
                outcome: kind as i32,
                revenue: revenue.map(|amount_minor| Money { amount_minor, currency: "CNY".into() }),
                request_id,
                ..Default::default()
            })
            .await
            .map_err(status("RecordOutcome"))?;
            Ok(())
        }
    };
    lanes(16, messages, record, outreach).await
}

async fn lanes<C, T, F, Fut>(n: usize, items: Vec<T>, f: F, client: &C) -> Result<usize, String>
where
    C: Clone + Send + 'static,
    T: Send + 'static,
    F: Fn(&mut C, T) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    let total = items.len();
    let mut split: Vec<Vec<T>> = (0..n).map(|_| Vec::new()).collect();
    for (i, item) in items.into_iter().enumerate() {
        split[i % n].push(item);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for lane in split {
        let (mut c, f) = (client.clone(), f.clone());
        tasks.spawn(async move {
            for item in lane {
                f(&mut c, item).await?;
            }
            Ok::<(), String>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.map_err(|e| e.to_string())??;
    }
    Ok(total)
}

/// How the loop is run.
#[derive(Debug, Clone)]
pub struct LoopConfig {
    /// Generated customers.
    pub customers: usize,
    /// Data seed.
    pub seed: u64,
    /// Names and request ids of this run (a rerun makes its own campaign).
    pub run: String,
    /// Longest wait for one step (events reaching a service, a recompute).
    pub patience: Duration,
    /// Share of contacted customers who convert, and of holdout customers who buy anyway.
    pub response: (f64, f64),
    /// Wait until analytics shows an SLA breach (the end-to-end test runs feedback with short SLAs).
    pub expect_breach: bool,
}

impl Default for LoopConfig {
    fn default() -> Self {
        LoopConfig {
            customers: 2000,
            seed: 2026,
            run: format!("demo-{}", chrono::Utc::now().format("%Y%m%d%H%M%S")),
            // Events of a fresh seed may still be reaching segmentation and outreach.
            patience: Duration::from_secs(180),
            response: (0.22, 0.08),
            expect_breach: false,
        }
    }
}

/// What the loop did and what analytics made of it.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The seed.
    pub seeded: Seeded,
    /// Win-back segment and its size.
    pub segment: (String, usize),
    /// The campaign.
    pub campaign: String,
    /// Messages by the rule that decided them.
    pub decisions: BTreeMap<String, usize>,
    /// Holdout customers (recorded, never contacted).
    pub holdout: HashSet<String>,
    /// Messages sent to holdout customers (must be 0).
    pub holdout_contacted: usize,
    /// Customers contacted.
    pub contacted: usize,
    /// Contacted customers who converted, holdout customers who bought.
    pub conversions: (usize, usize),
    /// Feedback items and tickets submitted, and one that is kept open (its SLA runs out).
    pub feedback: (usize, usize),
    /// A ticket left unanswered (for the SLA watcher).
    pub open_ticket: String,
    /// Survey answers given.
    pub surveys: usize,
    /// KPIs.
    pub retention: an::RetentionReport,
    /// Lift of the campaign against its holdout.
    pub lift: an::LiftReport,
    /// Campaign performance.
    pub performance: an::CampaignPerformanceReport,
    /// Service quality.
    pub quality: an::ServiceQualityReport,
    /// Seconds the loop took.
    pub seconds: f64,
}

async fn wait<F, Fut, T>(what: &str, patience: Duration, mut poll: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>, String>>,
{
    let deadline = Instant::now() + patience;
    loop {
        if let Some(v) = poll().await? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(format!("timed out after {} s waiting for {what}", patience.as_secs()));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn recompute(suite: &Suite, request_id: String, patience: Duration) -> Result<(), String> {
    let mut s = suite.segmentation.clone();
    let op = s
        .start_recompute(sg::StartRecomputeRequest { request_id, ..Default::default() })
        .await
        .map_err(status("StartRecompute"))?
        .into_inner();
    wait("the recompute", patience, || {
        let mut s = s.clone();
        let id = op.operation_id.clone();
        async move {
            let o = s
                .get_recompute(sg::GetRecomputeRequest { operation_id: id })
                .await
                .map_err(status("GetRecompute"))?
                .into_inner();
            match sg::OperationState::try_from(o.state) {
                Ok(sg::OperationState::Succeeded) => Ok(Some(())),
                Ok(sg::OperationState::Failed) => Err(format!("recompute failed: {}", o.error)),
                _ => Ok(None),
            }
        }
    })
    .await
}

fn cond(field: &str, op: sg::Operator, values: &[&str]) -> sg::RuleNode {
    sg::RuleNode {
        node: Some(sg::rule_node::Node::Condition(sg::Condition {
            field: field.into(),
            op: op as i32,
            values: values.iter().map(|v| v.to_string()).collect(),
        })),
    }
}

/// Texts of the feedback the demo's customers send (from the evaluation set's kinds).
const FEEDBACK: &[(&str, Channel)] = &[
    ("快递一个星期都没送到，客服电话也打不通，太失望了！", Channel::Hotline),
    ("The courier left my parcel outside in the rain and now the item is damaged.", Channel::Email),
    ("请问会员积分怎么兑换优惠券？", Channel::OnlineChat),
    ("建议APP增加夜间模式，晚上看着太刺眼了", Channel::AppPush),
    ("收到的衣服有明显的污渍和开线，质量太差了", Channel::Wechat),
    ("How do I link my in-store membership card to the app?", Channel::OnlineChat),
    ("今天店员小王特别耐心地帮我挑选，非常感谢", Channel::Social),
    ("I was charged twice for the same order. Please refund the duplicate payment.", Channel::Hotline),
];

/// Runs the loop on the suite.
pub async fn retention_loop(suite: &Suite, cfg: &LoopConfig) -> Result<Report, String> {
    let started = Instant::now();
    let mut report = Report { seeded: seed(suite, cfg.customers, cfg.seed).await?, ..Default::default() };
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let run = &cfg.run;

    // 1. Segments and churn risk: recompute until segmentation has seen the customers.
    let mut p = suite.profiles.clone();
    let last = p
        .resolve_customer(pf::ResolveCustomerRequest {
            identity: Some(pf::resolve_customer_request::Identity::ExternalId(pf::ExternalId {
                source: crm_datagen::SOURCE.into(),
                id: (cfg.customers - 1).to_string(),
            })),
            purpose: "demo: find a generated customer".into(),
        })
        .await
        .map_err(status("ResolveCustomer"))?
        .into_inner()
        .customer_id;
    let mut round = 0;
    wait("segmentation to score the imported customers", cfg.patience, || {
        round += 1;
        let (suite, last, id) = (suite.clone(), last.clone(), format!("{run}-recompute-{round}"));
        let patience = cfg.patience;
        async move {
            recompute(&suite, id, patience).await?;
            let mut s = suite.segmentation.clone();
            Ok(s.get_customer_segmentation(sg::GetCustomerSegmentationRequest { customer_id: last })
                .await
                .ok()
                .map(|_| ()))
        }
    })
    .await?;

    // 2. A win-back segment: lapsing, sleeping or churned customers.
    let rule = sg::RuleNode {
        node: Some(sg::rule_node::Node::Any(sg::RuleList {
            nodes: vec![
                cond(
                    "lifecycle_stage",
                    sg::Operator::In,
                    &[
                        LifecycleStage::Declining.as_str_name(),
                        LifecycleStage::Sleeping.as_str_name(),
                        LifecycleStage::Churned.as_str_name(),
                    ],
                ),
                cond("churn_level", sg::Operator::In, &["CHURN_RISK_LEVEL_HIGH"]),
            ],
        })),
    };
    let mut s = suite.segmentation.clone();
    let segment = s
        .create_segment(sg::CreateSegmentRequest {
            segment: Some(sg::Segment {
                display_name: format!("Win-back ({run})"),
                rule: Some(rule),
                ..Default::default()
            }),
            request_id: format!("{run}-segment"),
        })
        .await
        .map_err(status("CreateSegment"))?
        .into_inner();
    recompute(suite, format!("{run}-recompute-members"), cfg.patience).await?;
    let members = s
        .get_segment(sg::GetSegmentRequest { segment_id: segment.segment_id.clone() })
        .await
        .map_err(status("GetSegment"))?
        .into_inner()
        .member_count as usize;
    if members == 0 {
        return Err("the win-back segment is empty".into());
    }
    report.segment = (segment.segment_id.clone(), members);

    // 3. A win-back campaign, A/B with a 10 % holdout, through the contact policy.
    let mut o = suite.outreach.clone();
    let body = |locale: &str, text: &str| out::TemplateBody {
        locale: locale.into(),
        subject: String::new(),
        body: text.into(),
    };
    let mut templates: BTreeMap<String, String> = BTreeMap::new();
    for channel in [Channel::Sms, Channel::Wechat] {
        let t = o
            .create_template(out::CreateTemplateRequest {
                template: Some(out::Template {
                    display_name: format!("Win-back {} ({run})", channel.as_str_name()),
                    channel: channel as i32,
                    content_type: out::ContentType::ExclusiveOffer as i32,
                    purpose: Purpose::Marketing as i32,
                    bodies: vec![
                        body("zh-CN", "{{name}}，好久不见！{{tier}}会员专享{{discount}}优惠，回来看看吧。"),
                        body("en", "{{name}}, we miss you! {{discount}} off for {{tier}} members: come back and see."),
                    ],
                    ..Default::default()
                }),
                request_id: format!("{run}-template-{}", channel.as_str_name()),
            })
            .await
            .map_err(status("CreateTemplate"))?
            .into_inner();
        templates.insert(channel.as_str_name().to_string(), t.template_id);
    }
    let plan = |channels: &[Channel]| out::TierChannelPlan {
        tier: 0,
        channels: channels.iter().map(|c| *c as i32).collect(),
        template_ids: channels
            .iter()
            .map(|c| (c.as_str_name().to_string(), templates.get(c.as_str_name()).cloned().unwrap_or_default()))
            .collect(),
    };
    let campaign = o
        .create_campaign(out::CreateCampaignRequest {
            campaign: Some(out::Campaign {
                display_name: format!("Win-back ({run})"),
                segment_ids: vec![segment.segment_id.clone()],
                holdout_percent: 10,
                variants: vec![
                    out::Variant { name: "A".into(), traffic_percent: 50, channel_plan: vec![plan(&[Channel::Sms])] },
                    out::Variant {
                        name: "B".into(),
                        traffic_percent: 50,
                        channel_plan: vec![plan(&[Channel::Wechat, Channel::Sms])],
                    },
                ],
                budget: Some(Money { amount_minor: 10_000_000, currency: "CNY".into() }),
                purpose: Purpose::Marketing as i32,
                ..Default::default()
            }),
            request_id: format!("{run}-campaign"),
        })
        .await
        .map_err(status("CreateCampaign"))?
        .into_inner();
    report.campaign = campaign.campaign_id.clone();
    // outreach learns the segment's members from segmentation's events, and
    // the customers' consent from profiles' (granted by most of them): wait
    // until its preview has the members and a steady estimate of what the
    // policy suppresses that no longer covers most of the audience.
    let last_suppressed = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(-1));
    let audience = wait("outreach to know the segment's members and their consent", cfg.patience, || {
        let mut o = o.clone();
        let id = campaign.campaign_id.clone();
        let last = last_suppressed.clone();
        async move {
            let p = o
                .preview_campaign(out::PreviewCampaignRequest { campaign_id: id })
                .await
                .map_err(status("PreviewCampaign"))?
                .into_inner();
            let previous = last.swap(p.suppressed_estimate, std::sync::atomic::Ordering::SeqCst);
            let steady = p.suppressed_estimate == previous && p.suppressed_estimate * 2 < p.audience_size;
            Ok((p.audience_size as usize >= members && steady).then_some(p.audience_size as usize))
        }
    })
    .await?;
    // A demo should not depend on the time of day: quiet hours off for the run, restored after.
    let policy =
        o.get_contact_policy(out::GetContactPolicyRequest {}).await.map_err(status("GetContactPolicy"))?.into_inner();
    let mask = |paths: &[&str]| Some(prost_types::FieldMask { paths: paths.iter().map(|p| p.to_string()).collect() });
    o.update_contact_policy(out::UpdateContactPolicyRequest {
        policy: Some(out::ContactPolicy::default()),
        update_mask: mask(&["quiet_start", "quiet_end"]),
        request_id: format!("{run}-quiet-off"),
        ..Default::default()
    })
    .await
    .map_err(status("UpdateContactPolicy"))?;
    let launched = launch(suite, cfg, &campaign.campaign_id, audience, &mut report).await;
    o.update_contact_policy(out::UpdateContactPolicyRequest {
        policy: Some(policy),
        update_mask: mask(&["quiet_start", "quiet_end"]),
        request_id: format!("{run}-quiet-back"),
        ..Default::default()
    })
    .await
    .map_err(status("UpdateContactPolicy (restore)"))?;
    let (sent, holdout_customers) = launched?;

    // 4. Outcomes: contacted customers convert more often than the holdout buys anyway.
    let mut conversions = Vec::new();
    for (message, customer) in &sent {
        if rng.random_bool(cfg.response.0) {
            conversions.push((message.clone(), customer.clone(), rng.random_range(200..900) * 100));
        }
    }
    let mut holdout_buyers: Vec<(String, i64)> = Vec::new();
    for c in &holdout_customers {
        if rng.random_bool(cfg.response.1) {
            holdout_buyers.push((c.clone(), rng.random_range(200..900) * 100));
        }
    }
    report.conversions = (conversions.len(), holdout_buyers.len());
    let now = prost_types::Timestamp::from(std::time::SystemTime::now());
    let delivered = sent.iter().map(|(m, _)| (m.clone(), None)).collect();
    record_outcomes(&suite.outreach, run, out::OutcomeKind::Delivered, delivered).await?;
    let purchase = |customer: &str, amount: i64, key: String| pf::Transaction {
        transaction_id: key,
        customer_id: customer.to_string(),
        kind: pf::TransactionKind::Purchase as i32,
        amount: Some(Money { amount_minor: amount, currency: "CNY".into() }),
        occurred_at: Some(now),
        category: "win-back".into(),
        channel: Channel::Online as i32,
        ..Default::default()
    };
    let mut buys: Vec<pf::Transaction> =
        conversions.iter().map(|(m, c, a)| purchase(c, *a, format!("{run}-buy-{m}"))).collect();
    buys.extend(holdout_buyers.iter().map(|(c, a)| purchase(c, *a, format!("{run}-holdout-buy-{c}"))));
    for (i, chunk) in buys.chunks(500).enumerate() {
        p.batch_record_transactions(pf::BatchRecordTransactionsRequest {
            transactions: chunk.to_vec(),
            request_id: format!("{run}-buys-{i}"),
        })
        .await
        .map_err(status("BatchRecordTransactions"))?;
    }
    let converted = conversions.iter().map(|(m, _, amount)| (m.clone(), Some(*amount))).collect();
    record_outcomes(&suite.outreach, run, out::OutcomeKind::Converted, converted).await?;

    // 5. Feedback and tickets: some worked to verification, one left waiting; surveys.
    feedback(suite, cfg, &mut report, &mut rng).await?;

    // 6. KPIs, once analytics has every event of the campaign.
    let targeted = audience as i64;
    let mut a = suite.analytics.clone();
    let lift = wait("analytics to count the campaign's groups and conversions", cfg.patience, || {
        let mut a = a.clone();
        let (id, expected) = (campaign.campaign_id.clone(), report.conversions);
        async move {
            let l = a.get_lift(an::GetLiftRequest { campaign_id: id, ..Default::default() }).await;
            let Ok(l) = l else { return Ok(None) };
            let l = l.into_inner();
            let (t, c) = (l.treated.unwrap_or_default(), l.control.unwrap_or_default());
            let complete = t.denominator + c.denominator >= targeted
                && t.numerator >= expected.0 as i64
                && c.numerator >= expected.1 as i64;
            Ok(complete.then_some(l))
        }
    })
    .await?;
    report.lift = lift;
    let tickets = report.feedback.1 as i64;
    report.quality = wait("analytics to count the tickets", cfg.patience, || {
        let mut a = a.clone();
        let breach = cfg.expect_breach;
        async move {
            let q = a
                .get_service_quality(an::GetServiceQualityRequest::default())
                .await
                .map_err(status("GetServiceQuality"))?
                .into_inner();
            let sla = q.sla_compliance.unwrap_or_default();
            let ready = sla.denominator >= tickets && (!breach || sla.numerator < sla.denominator);
            Ok(ready.then_some(q))
        }
    })
    .await?;
    report.performance = a
        .get_campaign_performance(an::GetCampaignPerformanceRequest {
            campaign_id: campaign.campaign_id.clone(),
            group_by: "variant".into(),
            ..Default::default()
        })
        .await
        .map_err(status("GetCampaignPerformance"))?
        .into_inner();
    let year = Some(TimeRange {
        start_time: Some(prost_types::Timestamp::from(
            std::time::SystemTime::now() - Duration::from_secs(400 * 86_400),
        )),
        end_time: Some(now),
    });
    report.retention = a
        .get_retention(an::GetRetentionRequest { cohort_range: year })
        .await
        .map_err(status("GetRetention"))?
        .into_inner();
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Starts the campaign and waits until every member has a decision: the sent
/// messages (id, customer) and the holdout's customers.
async fn launch(
    suite: &Suite,
    cfg: &LoopConfig,
    campaign: &str,
    audience: usize,
    report: &mut Report,
) -> Result<(Vec<(String, String)>, Vec<String>), String> {
    let mut o = suite.outreach.clone();
    o.transition_campaign(out::TransitionCampaignRequest {
        campaign_id: campaign.into(),
        target_state: out::CampaignState::Running as i32,
        request_id: format!("{}-run", cfg.run),
    })
    .await
    .map_err(status("TransitionCampaign"))?;
    let messages = wait("every member of the campaign to have a decision", cfg.patience, || {
        let o = o.clone();
        let id = campaign.to_string();
        async move {
            let all = all_messages(o, &id).await?;
            // Decided: sent, suppressed, or deferred by a rule (a daily cap the
            // customer's lifecycle messages used up today, say: it waits for tomorrow).
            let decided = all
                .iter()
                .filter(|m| {
                    m.state != out::MessageState::Queued as i32
                        || m.decision.as_ref().is_some_and(|d| d.verdict == out::Verdict::Deferred as i32)
                })
                .count();
            Ok((all.len() >= audience && decided == all.len()).then_some(all))
        }
    })
    .await?;
    let mut sent = Vec::new();
    let mut holdout = Vec::new();
    for m in &messages {
        let rule = m.decision.as_ref().map(|d| d.rule.clone()).unwrap_or_default();
        *report.decisions.entry(rule.clone()).or_default() += 1;
        let contacted = m.state == out::MessageState::Sent as i32 || m.state == out::MessageState::Delivered as i32;
        if rule == "HOLDOUT" {
            holdout.push(m.customer_id.clone());
            report.holdout.insert(m.customer_id.clone());
        } else if contacted {
            sent.push((m.message_id.clone(), m.customer_id.clone()));
        }
    }
    report.holdout_contacted = messages
        .iter()
        .filter(|m| report.holdout.contains(&m.customer_id))
        .filter(|m| m.state == out::MessageState::Sent as i32 || m.state == out::MessageState::Delivered as i32)
        .count();
    report.contacted = sent.len();
    Ok((sent, holdout))
}

async fn all_messages(mut o: OutreachServiceClient<Chan>, campaign: &str) -> Result<Vec<out::Message>, String> {
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let page = o
            .list_messages(out::ListMessagesRequest {
                campaign_id: campaign.into(),
                page_size: 1000,
                page_token: token,
                ..Default::default()
            })
            .await
            .map_err(status("ListMessages"))?
            .into_inner();
        all.extend(page.messages);
        if page.next_page_token.is_empty() {
            return Ok(all);
        }
        token = page.next_page_token;
    }
}

async fn feedback(suite: &Suite, cfg: &LoopConfig, report: &mut Report, rng: &mut StdRng) -> Result<(), String> {
    let run = &cfg.run;
    let mut f = suite.feedback.clone();
    let p = suite.profiles.clone();
    let customer = |i: usize| {
        let mut p = p.clone();
        async move {
            p.resolve_customer(pf::ResolveCustomerRequest {
                identity: Some(pf::resolve_customer_request::Identity::ExternalId(pf::ExternalId {
                    source: crm_datagen::SOURCE.into(),
                    id: i.to_string(),
                })),
                purpose: "demo: find a generated customer".into(),
            })
            .await
            .map(|c| c.into_inner().customer_id)
            .map_err(status("ResolveCustomer"))
        }
    };
    let count = 40.min(cfg.customers);
    let mut tickets = Vec::new();
    for i in 0..count {
        let (text, channel) = FEEDBACK[i % FEEDBACK.len()];
        let r = f
            .submit_feedback(fb::SubmitFeedbackRequest {
                feedback: Some(fb::Feedback {
                    customer_id: customer(i * 7 % cfg.customers).await?,
                    channel: channel as i32,
                    text: text.into(),
                    ..Default::default()
                }),
                request_id: format!("{run}-feedback-{i}"),
            })
            .await
            .map_err(status("SubmitFeedback"))?
            .into_inner();
        if let Some(t) = r.ticket {
            tickets.push(t);
        }
    }
    report.feedback = (count, tickets.len());
    // The first complaint is left waiting: its SLA runs out. Most others are worked on.
    let mut left_open = false;
    for (i, t) in tickets.iter().enumerate() {
        if !left_open && t.category == fb::Category::ServiceComplaint as i32 {
            left_open = true;
            report.open_ticket = t.ticket_id.clone();
            continue;
        }
        if rng.random_bool(0.2) {
            continue;
        }
        for (k, state) in [fb::TicketState::Acknowledged, fb::TicketState::InProgress, fb::TicketState::Resolved]
            .into_iter()
            .enumerate()
        {
            f.transition_ticket(fb::TransitionTicketRequest {
                ticket_id: t.ticket_id.clone(),
                target_state: state as i32,
                request_id: format!("{run}-move-{i}-{k}"),
                note: "handled in the demo".into(),
                ..Default::default()
            })
            .await
            .map_err(status("TransitionTicket"))?;
        }
        f.record_verification(fb::RecordVerificationRequest {
            ticket_id: t.ticket_id.clone(),
            confirmed: rng.random_bool(0.8),
            request_id: format!("{run}-verify-{i}"),
            ..Default::default()
        })
        .await
        .map_err(status("RecordVerification"))?;
    }
    // Surveys: NPS from 120 customers, CSAT from 60.
    for i in 0..120.min(cfg.customers) {
        let roll: f64 = rng.random();
        let score = if roll < 0.45 {
            rng.random_range(9..=10)
        } else if roll < 0.75 {
            rng.random_range(7..=8)
        } else {
            rng.random_range(0..=6)
        };
        f.submit_survey_response(fb::SubmitSurveyResponseRequest {
            response: Some(fb::SurveyResponse {
                customer_id: customer((i * 13 + 5) % cfg.customers).await?,
                kind: fb::SurveyKind::Nps as i32,
                score,
                ..Default::default()
            }),
            request_id: format!("{run}-nps-{i}"),
        })
        .await
        .map_err(status("SubmitSurveyResponse"))?;
    }
    for i in 0..60.min(cfg.customers) {
        let score = *[5, 5, 4, 4, 4, 3, 2, 5].get(rng.random_range(0..8)).unwrap_or(&4);
        f.submit_survey_response(fb::SubmitSurveyResponseRequest {
            response: Some(fb::SurveyResponse {
                customer_id: customer((i * 17 + 3) % cfg.customers).await?,
                kind: fb::SurveyKind::Csat as i32,
                score,
                ..Default::default()
            }),
            request_id: format!("{run}-csat-{i}"),
        })
        .await
        .map_err(status("SubmitSurveyResponse"))?;
    }
    report.surveys = 120.min(cfg.customers) + 60.min(cfg.customers);
    Ok(())
}

fn pct(r: &Option<an::Rate>) -> String {
    r.as_ref()
        .map(|r| format!("{:.1} % ({}/{})", r.value * 100.0, r.numerator, r.denominator))
        .unwrap_or_else(|| "-".into())
}

fn cny(m: &Option<Money>) -> String {
    m.as_ref().map(|m| format!("{:.2} CNY", m.amount_minor as f64 / 100.0)).unwrap_or_default()
}

impl Report {
    /// A short readable report.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let l = &self.lift;
        let i = l.interval.unwrap_or_default();
        s.push_str(&format!("Retention loop, end to end through the public gRPC APIs ({:.1} s)\n\n", self.seconds));
        s.push_str(&format!(
            "Customers:   {} imported ({} new), {} purchases, {} interactions, consent for {}\n",
            self.seeded.created + self.seeded.matched,
            self.seeded.created,
            self.seeded.transactions,
            self.seeded.interactions,
            self.seeded.consents
        ));
        s.push_str(&format!(
            "Segment:     win-back (lapsing, sleeping, churned or high churn risk): {} customers\n",
            self.segment.1
        ));
        let decisions: Vec<String> = self.decisions.iter().map(|(k, v)| format!("{k} {v}")).collect();
        s.push_str(&format!(
            "Campaign:    {} (A/B with a 10 % holdout); decisions: {}\n",
            self.campaign,
            decisions.join(", ")
        ));
        s.push_str(&format!(
            "             {} contacted; holdout {} customers, {} of them contacted\n",
            self.contacted,
            self.holdout.len(),
            self.holdout_contacted
        ));
        s.push_str(&format!(
            "Outcomes:    {} contacted customers converted; {} holdout customers bought anyway\n\n",
            self.conversions.0, self.conversions.1
        ));
        s.push_str("KPIs from analytics\n");
        let r = &self.retention;
        s.push_str(&format!("  Retention: D1 {}  D7 {}  D30 {}\n", pct(&r.d1), pct(&r.d7), pct(&r.d30)));
        for c in r.cohorts.iter().rev().take(3).rev() {
            let cells: Vec<String> = c.retention.iter().take(6).map(|v| format!("{:.0}%", v * 100.0)).collect();
            let start = c
                .cohort_start
                .as_ref()
                .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, 0))
                .map(|t| t.format("%Y-%m").to_string())
                .unwrap_or_default();
            s.push_str(&format!("    cohort {start} ({} customers): {}\n", c.size, cells.join(" ")));
        }
        s.push_str(&format!(
            "  Lift:      treated {} vs holdout {}: {:+.1} points, 95 % CI [{:+.1}, {:+.1}], p = {:.4}{}; incremental revenue {}\n",
            pct(&l.treated),
            pct(&l.control),
            l.absolute_lift * 100.0,
            i.low * 100.0,
            i.high * 100.0,
            l.p_value,
            if l.significant { " (significant)" } else { " (not significant)" },
            cny(&l.incremental_revenue)
        ));
        for row in &self.performance.rows {
            s.push_str(&format!(
                "    variant {:<14} targeted {:>5}, reach {}, conversion {}, cost {}, revenue {}, ROI {:.1}{}\n",
                row.group,
                row.targeted,
                pct(&row.reach),
                pct(&row.conversion),
                cny(&row.cost),
                cny(&row.revenue),
                row.roi,
                if row.roi_warning { " (below 1:3)" } else { "" }
            ));
        }
        let q = &self.quality;
        s.push_str(&format!(
            "  Service:   NPS {:.0}, CSAT {:.2}, SLA compliance {}, closed loop {}, repeat complaints {}\n",
            q.nps,
            q.csat,
            pct(&q.sla_compliance),
            pct(&q.closed_loop),
            pct(&q.repeat_complaints)
        ));
        if let Some(fr) = &q.first_response {
            s.push_str(&format!("             first response p50 {:.0} s, p90 {:.0} s\n", fr.p50, fr.p90));
        }
        let mix: Vec<String> = q
            .category_mix
            .iter()
            .map(|(k, v)| format!("{} {v}", k.trim_start_matches("CATEGORY_").to_lowercase()))
            .collect();
        s.push_str(&format!("             feedback by category: {}\n", mix.join(", ")));
        s
    }
}
