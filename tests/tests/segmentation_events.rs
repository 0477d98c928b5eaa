//! Issue 4 end to end: profiles and segmentation as real processes. Facts
//! recorded in profiles flow to segmentation as events, and the incremental
//! recompute (SEG-7) shows each customer's tier, grid cell, lifecycle stage
//! and churn reasons through the API without anyone asking for a recompute.

use std::time::Duration;

use chrono::Utc;
use crm_demo::{Suite, Urls};
use crm_e2e::ServiceProcess;
use crm_kit::Role;
use crm_proto::common::v1::{LifecycleStage, Money, Tier};
use crm_proto::profiles::v1 as pf;
use crm_proto::segmentation::v1 as sg;

fn purchase(id: &str, customer: &str, cny: i64, days_ago: i64) -> pf::Transaction {
    pf::Transaction {
        transaction_id: id.into(),
        customer_id: customer.into(),
        kind: pf::TransactionKind::Purchase as i32,
        amount: Some(Money { amount_minor: cny * 100, currency: "CNY".into() }),
        occurred_at: Some(prost_types::Timestamp {
            seconds: (Utc::now() - chrono::Duration::days(days_ago)).timestamp(),
            nanos: 0,
        }),
        ..Default::default()
    }
}

async fn create(suite: &Suite, name: &str, email: &str) -> String {
    let mut p = suite.profiles.clone();
    let customer = pf::Customer {
        kind: pf::CustomerKind::Person as i32,
        name: name.into(),
        email: email.into(),
        region: "CN-SH".into(),
        timezone: "Asia/Shanghai".into(),
        ..Default::default()
    };
    let created = p
        .create_customer(pf::CreateCustomerRequest {
            customer: Some(customer),
            request_id: crm_kit::testing::unique_name("create"),
        })
        .await
        .expect("create")
        .into_inner();
    created.customer.expect("customer").customer_id
}

async fn record(suite: &Suite, transactions: Vec<pf::Transaction>) {
    let mut p = suite.profiles.clone();
    p.batch_record_transactions(pf::BatchRecordTransactionsRequest {
        transactions,
        request_id: crm_kit::testing::unique_name("tx"),
    })
    .await
    .expect("record");
}

/// Polls the segmentation view of `customer` until `done` holds (30 s).
async fn view_until(
    suite: &Suite,
    customer: &str,
    what: &str,
    done: impl Fn(&sg::CustomerSegmentation) -> bool,
) -> sg::CustomerSegmentation {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut s = suite.segmentation.clone();
        let got = s
            .get_customer_segmentation(sg::GetCustomerSegmentationRequest { customer_id: customer.into() })
            .await
            .map(|r| r.into_inner());
        if let Ok(view) = &got
            && done(view)
        {
            return view.clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}: {got:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn rules(view: &sg::CustomerSegmentation) -> Vec<String> {
    view.churn_risk.as_ref().map(|r| r.reasons.iter().map(|x| x.rule.clone()).collect()).unwrap_or_default()
}

#[tokio::test]
async fn profiles_facts_reach_the_segmentation_view_through_the_incremental_recompute() {
    let prefix = crm_kit::testing::unique_name("e2e");
    let env = [("EVENT_STREAM_PREFIX", prefix.as_str()), ("CONSUMER_BLOCK_MS", "200")];
    let profiles = ServiceProcess::start("profiles", &env).await;
    let segmentation =
        ServiceProcess::start("segmentation", &[env[0], env[1], ("SEGMENTATION_INCREMENTAL_IDLE_MS", "100")]).await;
    let urls = Urls {
        profiles: profiles.url.clone(),
        segmentation: segmentation.url.clone(),
        // Not called here; the suite wants an address for each.
        outreach: profiles.url.clone(),
        feedback: profiles.url.clone(),
        analytics: profiles.url.clone(),
    };
    let token = crm_kit::testing::token(&[Role::Admin, Role::Service, Role::Analyst], true);
    let suite = Suite::connect(&urls, &token).expect("clients");

    // A generated base, and the first calibration over it (what the monthly
    // schedule would run): the distribution new facts are ranked against.
    crm_demo::seed(&suite, 60, 11).await.expect("seed");
    let whale = create(&suite, "Wang Whale", "whale@example.com").await;
    let lapsed = create(&suite, "Li Lapsed", "lapsed@example.com").await;
    record(&suite, vec![purchase("e2e-l1", &lapsed, 80, 400)]).await;
    let mut s = suite.segmentation.clone();
    let mut calibrated = false;
    for round in 0..60 {
        // Until segmentation has seen the lapsed customer, a recompute would rank without them.
        let op = s
            .start_recompute(sg::StartRecomputeRequest {
                scope: sg::RecomputeScope::Calibration as i32,
                request_id: format!("e2e-calibrate-{round}"),
            })
            .await
            .expect("start")
            .into_inner();
        for _ in 0..300 {
            let o = s
                .get_recompute(sg::GetRecomputeRequest { operation_id: op.operation_id.clone() })
                .await
                .expect("poll")
                .into_inner();
            if o.state == sg::OperationState::Succeeded as i32 {
                break;
            }
            assert_ne!(o.state, sg::OperationState::Failed as i32, "{o:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let view =
            s.get_customer_segmentation(sg::GetCustomerSegmentationRequest { customer_id: lapsed.clone() }).await;
        if view.is_ok_and(|v| v.into_inner().rfm.is_some_and(|r| r.frequency == 0 && r.recency_days >= 400)) {
            calibrated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(calibrated, "the calibration saw the lapsed customer");

    // SEG-2/3/4: a purchase of 20 000 CNY makes a DIAMOND, new, high-value customer.
    record(&suite, vec![purchase("e2e-w1", &whale, 20_000, 3)]).await;
    let view = view_until(&suite, &whale, "the whale's tier", |v| v.tier == Tier::Diamond as i32).await;
    assert_eq!(view.lifecycle_stage, LifecycleStage::New as i32, "{view:?}");
    assert_eq!(view.grid_cell, sg::GridCell::MatureStable as i32, "high value, no trend yet: {view:?}");
    let first = view.tier_history.first().expect("the move is recorded");
    assert_eq!(first.to_tier, Tier::Diamond as i32);
    assert!(first.reason.contains("spend"), "{first:?}");
    let freshness = view.freshness.expect("every answer says how fresh it is");
    assert!(freshness.as_of.is_some_and(|t| t.seconds >= Utc::now().timestamp() - 60), "{freshness:?}");

    // SEG-4/5: bought once, 400 days ago, never interacted: churned, dormant, and why.
    let view = view_until(&suite, &lapsed, "the lapsed customer", |v| v.tier == Tier::Dormant as i32).await;
    assert_eq!(view.lifecycle_stage, LifecycleStage::Churned as i32, "{view:?}");
    assert_eq!(view.grid_cell, sg::GridCell::LowValueStable as i32, "{view:?}");
    assert!(rules(&view).contains(&"LOW_ACTIVITY_NO_INTERACTION_3M".to_string()), "{:?}", rules(&view));

    // They come back: the move out of DORMANT follows the event, with its reason.
    record(&suite, vec![purchase("e2e-l2", &lapsed, 20, 0)]).await;
    let view = view_until(&suite, &lapsed, "the comeback", |v| v.tier != Tier::Dormant as i32).await;
    assert_eq!(view.tier, Tier::Silver as i32, "{view:?}");
    assert_ne!(view.lifecycle_stage, LifecycleStage::Churned as i32, "{view:?}");
    let moves: Vec<(i32, i32)> = view.tier_history.iter().map(|m| (m.from_tier, m.to_tier)).collect();
    assert_eq!(moves.first(), Some(&(Tier::Dormant as i32, Tier::Silver as i32)), "{moves:?}");
}
