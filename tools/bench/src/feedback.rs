//! feedback (issue 6), `make bench-feedback`:
//! - classification quality on both halves of the labelled evaluation set;
//! - the classifier alone on one core vs bare jieba segmentation of the same
//!   texts (the floor: cutting the words is the least any Chinese classifier does);
//! - SubmitFeedback open loop at a steady rate (default 500/s) with the real
//!   profiles check and outreach acknowledgement in-process, vs a bare
//!   single-row INSERT of the same item at the same rate.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crm_feedback::domain::classify::Classifier;
use crm_feedback::evaluation;
use crm_kit::Role;
use crm_proto::common::v1::Channel;
use crm_proto::feedback::v1 as fb;
use crm_proto::feedback::v1::feedback_service_client::FeedbackServiceClient;

use crate::{Bearer, open_loop_warm, row};

/// Unmeasured warm-up before each measured run.
const WARMUP: Duration = Duration::from_secs(2);

fn texts() -> Vec<String> {
    evaluation::parse(evaluation::EVAL_SET).expect("evaluation set").into_iter().map(|i| i.text).collect()
}

/// Items per second through `f` on this thread for about `secs` seconds.
fn per_second(texts: &[String], secs: f64, mut f: impl FnMut(&str) -> usize) -> (f64, usize) {
    let started = Instant::now();
    let (mut n, mut sink) = (0usize, 0usize);
    while started.elapsed().as_secs_f64() < secs {
        for t in texts {
            sink = sink.wrapping_add(f(t));
            n += 1;
        }
    }
    (n as f64 / started.elapsed().as_secs_f64(), sink)
}

fn classifier_speed() {
    let c = Classifier::shipped().expect("lexicon");
    let texts = texts();
    let jieba = jieba_rs::Jieba::new();
    // Warm both up, then measure on this one thread.
    per_second(&texts, 0.5, |t| c.classify(t, None).evidence.len());
    let (floor, _) = per_second(&texts, 3.0, |t| jieba.cut(t, true).len());
    let (ours, _) = per_second(&texts, 3.0, |t| c.classify(t, None).evidence.len());
    let chars: usize = texts.iter().map(|t| t.chars().count()).sum::<usize>() / texts.len();
    println!(
        "### Classifier alone, one core ({} items of the evaluation set, {chars} characters on average)\n",
        texts.len()
    );
    println!("| run | items/s | vs floor |\n|---|---|---|");
    println!("| floor: jieba word segmentation only (`cut`, HMM on) | {floor:.0} | baseline |");
    println!(
        "| classify: segmentation, lexicon, negation/contrast, urgency, topic, evidence | {ours:.0} | {:.0} % |\n",
        100.0 * ours / floor
    );
}

async fn intake(rate: u64, seconds: u64, with_outreach: bool) {
    // profiles (real, with its Redis cache) and outreach (real), in this process.
    let (profiles_url, profiles_stop, _) = crate::start_profiles(true).await;
    let mut p = crate::clients(&profiles_url, 1).remove(0);
    let customers = crate::seed(&mut p, 2000).await;
    let out_cfg = crm_kit::testing::config("outreach").await;
    let mut out_kit = crm_kit::Kit::start(crm_outreach::SPEC, out_cfg).await.expect("outreach kit");
    crm_outreach::templates::seed(&out_kit.pg).await.expect("templates");
    let oc = crm_outreach::OutreachConfig::load(&crm_kit::config::Env::from_pairs([("OUTREACH_POLL_MS", "50")]))
        .expect("cfg");
    let parts = crm_outreach::build(&out_kit, &oc);
    crm_outreach::spawn_workers(&mut out_kit, &oc, &parts);
    let out_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let outreach_url = format!("http://{}", out_listener.local_addr().expect("addr"));
    let outreach_stop = out_kit.shutdown_handle();
    let routes = tonic::service::Routes::new(
        crm_proto::outreach::v1::outreach_service_server::OutreachServiceServer::new(parts.api),
    );
    tokio::spawn(out_kit.serve_on(out_listener, routes, crm_outreach::access_policy()));

    let mut cfg = crm_kit::testing::config("feedback").await;
    cfg.max_concurrent_requests = 10_000;
    cfg.database_max_connections = 16;
    let mut kit = crm_kit::Kit::start(crm_feedback::SPEC, cfg).await.expect("feedback kit");
    let mut vars = vec![("FEEDBACK_PROFILES_URL", profiles_url.clone())];
    if with_outreach {
        vars.push(("FEEDBACK_OUTREACH_URL", outreach_url.clone()));
    }
    let fcfg = crm_feedback::FeedbackConfig::load(&crm_kit::config::Env::from_pairs(vars)).expect("feedback config");
    let desk = crm_feedback::desk(&kit, &fcfg, Arc::new(crm_feedback::clock::SystemClock)).expect("desk");
    crm_feedback::spawn_workers(&mut kit, &desk, &fcfg).expect("workers");
    let pool = kit.pg.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let feedback_stop = kit.shutdown_handle();
    let routes = tonic::service::Routes::new(fb::feedback_service_server::FeedbackServiceServer::new(
        crm_feedback::api::FeedbackApi::new(desk),
    ));
    tokio::spawn(kit.serve_on(listener, routes, crm_feedback::access_policy()));

    let token = crm_kit::testing::token(&[Role::Agent], false);
    let value: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().expect("ascii");
    let clients: Vec<_> = (0..8)
        .map(|_| {
            FeedbackServiceClient::with_interceptor(crm_kit::client::channel(&url).expect("ch"), Bearer(value.clone()))
        })
        .collect();
    let texts = Arc::new(texts());
    let customers = Arc::new(customers);
    let channels = [Channel::Hotline, Channel::OnlineChat, Channel::AppPush, Channel::Wechat, Channel::Email];

    // Floor: the same item as one INSERT into a table shaped like feedback's, at the same rate.
    sqlx::raw_sql("CREATE TABLE insert_floor (LIKE feedback INCLUDING DEFAULTS)")
        .execute(&pool)
        .await
        .expect("floor table");
    let floor = {
        let (pool, texts, customers) = (pool.clone(), texts.clone(), customers.clone());
        open_loop_warm(rate, WARMUP, Duration::from_secs(seconds), move |i| {
            let (pool, texts, customers) = (pool.clone(), texts.clone(), customers.clone());
            async move {
                let customer = uuid::Uuid::parse_str(&customers[i % customers.len()]).unwrap_or_default();
                sqlx::query(
                    "INSERT INTO insert_floor (feedback_id, customer_id, submitted_customer_id, customer_verified, channel, text, language, \
                     category, confidence, urgent, sentiment, topic, evidence, created_at) \
                     VALUES ($1,$2,$2,true,1,$3,'zh',2,0.9,false,-0.5,'delivery','[]',now())",
                )
                .bind(uuid::Uuid::now_v7())
                .bind(customer)
                .bind(&texts[i % texts.len()])
                .execute(&pool)
                .await
                .is_ok()
            }
        })
        .await
    };
    let ours = open_loop_warm(rate, WARMUP, Duration::from_secs(seconds), move |i| {
        let mut c = clients[i % clients.len()].clone();
        let req = fb::SubmitFeedbackRequest {
            feedback: Some(fb::Feedback {
                customer_id: customers[i % customers.len()].clone(),
                channel: channels[i % channels.len()] as i32,
                text: texts[i % texts.len()].clone(),
                ..Default::default()
            }),
            request_id: uuid::Uuid::now_v7().to_string(),
        };
        async move { c.submit_feedback(req).await.is_ok() }
    })
    .await;
    let (acks, pending): (i64, i64) =
        sqlx::query_as("SELECT count(*) FILTER (WHERE outcome LIKE 'message%'), count(*) FILTER (WHERE done_at IS NULL) FROM loop_calls")
            .fetch_one(&pool)
            .await
            .unwrap_or((0, 0));
    let tickets: i64 = sqlx::query_scalar("SELECT count(*) FROM tickets").fetch_one(&pool).await.unwrap_or(0);
    if with_outreach {
        println!("### SubmitFeedback with the closed loop, open loop at {rate}/s for {seconds} s\n");
        println!(
            "Real profiles (customer check, Redis-cached) and real outreach (an AcknowledgeFeedback per item: a contact-policy \
             decision and a sink delivery) in the same process, all on the same two cores; 2 000 customers; the texts of the evaluation set in turn.\n"
        );
    } else {
        println!("### SubmitFeedback, open loop at {rate}/s for {seconds} s\n");
        println!(
            "Real profiles (customer check, Redis-cached) in the same process; the closed loop off (no outreach); \
             2 000 customers; the texts of the evaluation set in turn; {}-second unmeasured warm-up before each run.\n",
            WARMUP.as_secs()
        );
    }
    println!("| run | ops/s | p50 ms | p99 ms | errors | vs floor |\n|---|---|---|---|---|---|");
    println!("{}", row("floor: one INSERT of the item into a table shaped like `feedback`", &floor, None));
    println!(
        "{}",
        row(
            "SubmitFeedback: classify, profiles check, item + ticket + clocks + events + loop call",
            &ours,
            Some(&floor)
        )
    );
    println!(
        "\np99 {:.2} ms vs the floor's {:.2} ms ({:.1}x); {tickets} tickets opened; acknowledgements sent through outreach: {acks}, still queued at the end: {pending}.\n",
        ours.p99_us as f64 / 1000.0,
        floor.p99_us as f64 / 1000.0,
        ours.p99_us as f64 / floor.p99_us.max(1) as f64,
    );
    feedback_stop.trigger();
    outreach_stop.trigger();
    profiles_stop.trigger();
}

/// Runs every feedback benchmark.
pub async fn run(rate: u64, seconds: u64) {
    println!("## feedback (issue 6)\n");
    let c = Classifier::shipped().expect("lexicon");
    let items = evaluation::parse(evaluation::EVAL_SET).expect("evaluation set");
    println!("### Classification on the labelled evaluation set ({} items)\n", items.len());
    println!("{}", evaluation::markdown(&evaluation::evaluate(&c, &items)));
    classifier_speed();
    intake(rate, seconds, false).await;
    intake(rate, seconds, true).await;
}
