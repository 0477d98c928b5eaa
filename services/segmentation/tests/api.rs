//! The segmentation API through gRPC against real PostgreSQL (SPEC 4.2).

use std::time::Duration;

use crm_kit::Role;
use crm_kit::testing::Bearer;
use crm_kit::testing::bad_fields;
use crm_proto::segmentation::v1 as pb;
use crm_proto::segmentation::v1::segmentation_service_client::SegmentationServiceClient;
use crm_segmentation::domain::Thresholds;
use tonic::Code;

struct App {
    url: String,
    pool: sqlx::PgPool,
    shutdown: crm_kit::lifecycle::Shutdown,
}

impl Drop for App {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

async fn start() -> App {
    let config = crm_kit::testing::config("segmentation").await;
    let kit = crm_kit::Kit::start(crm_segmentation::SPEC, config).await.expect("kit");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let pool = kit.pg.clone();
    let shutdown = kit.shutdown_handle();
    let api = crm_segmentation::api::SegmentationApi::new(kit.pg.clone());
    let routes = tonic::service::Routes::new(pb::segmentation_service_server::SegmentationServiceServer::new(api));
    tokio::spawn(kit.serve_on(listener, routes, crm_segmentation::access_policy()));
    App { url, pool, shutdown }
}

type Client =
    SegmentationServiceClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>>;

fn client(app: &App, roles: &[Role]) -> Client {
    SegmentationServiceClient::with_interceptor(
        crm_kit::client::channel(&app.url).expect("channel"),
        Bearer::minted(roles, false),
    )
}

fn cond(field: &str, op: pb::Operator, values: &[&str]) -> pb::RuleNode {
    pb::RuleNode {
        node: Some(pb::rule_node::Node::Condition(pb::Condition {
            field: field.into(),
            op: op as i32,
            values: values.iter().map(|v| v.to_string()).collect(),
        })),
    }
}

/// Two customers, one active spender and one lapsed one, straight into the read model.
async fn seed(pool: &sqlx::PgPool) -> (String, String) {
    let active = "00000000-0000-4000-8000-0000000000a1";
    let lapsed = "00000000-0000-4000-8000-0000000000b2";
    sqlx::query("INSERT INTO customers (customer_id, registered_at, region, tags) VALUES ($1::uuid, now() - interval '800 days', 'CN-SH', ARRAY['vip']), ($2::uuid, now() - interval '800 days', 'CN-BJ', '{}')")
        .bind(active)
        .bind(lapsed)
        .execute(pool)
        .await
        .expect("customers");
    sqlx::query(
        "INSERT INTO transactions (transaction_id, customer_id, kind, amount_minor, currency, occurred_at) VALUES \
         ('a1', $1::uuid, 1, 2500000, 'CNY', now() - interval '10 days'), ('a2', $1::uuid, 1, 100000, 'CNY', now() - interval '40 days'), \
         ('b1', $2::uuid, 1, 5000, 'CNY', now() - interval '400 days')",
    )
    .bind(active)
    .bind(lapsed)
    .execute(pool)
    .await
    .expect("transactions");
    sqlx::query("INSERT INTO freshness (slot, newest_event_at) VALUES (0, now())")
        .execute(pool)
        .await
        .expect("freshness");
    crm_segmentation::read_model::rebuild_all(pool).await.expect("facts");
    (active.into(), lapsed.into())
}

#[tokio::test]
async fn the_segmentation_view_segments_and_recompute_operations_work_through_grpc() {
    let app = start().await;
    let (active, lapsed) = seed(&app.pool).await;
    let mut analyst = client(&app, &[Role::Analyst]);

    let not_yet = analyst
        .get_customer_segmentation(pb::GetCustomerSegmentationRequest { customer_id: active.clone() })
        .await
        .expect_err("not scored");
    assert_eq!(not_yet.code(), Code::FailedPrecondition);

    // SEG-7: an on-demand recompute is a long-running operation a client polls.
    let op = analyst
        .start_recompute(pb::StartRecomputeRequest { scope: 0, request_id: "rc-1".into() })
        .await
        .expect("start")
        .into_inner();
    assert_eq!(op.state, pb::OperationState::Pending as i32);
    assert!(crm_segmentation::jobs::run_one(&app.pool, "test-worker", &Thresholds::default()).await.expect("worker"));
    let done = analyst
        .get_recompute(pb::GetRecomputeRequest { operation_id: op.operation_id.clone() })
        .await
        .expect("poll")
        .into_inner();
    assert_eq!((done.state, done.progress_percent), (pb::OperationState::Succeeded as i32, 100), "{done:?}");

    let view = analyst
        .get_customer_segmentation(pb::GetCustomerSegmentationRequest { customer_id: active.clone() })
        .await
        .expect("view")
        .into_inner();
    assert_eq!(view.tier, crm_proto::common::v1::Tier::Diamond as i32, "25 000 CNY in 12 months");
    assert_eq!(view.tier_history.len(), 1);
    assert!(view.freshness.as_ref().is_some_and(|f| f.as_of.is_some() && f.computed_at.is_some()));
    let lapsed_view = analyst
        .get_customer_segmentation(pb::GetCustomerSegmentationRequest { customer_id: lapsed.clone() })
        .await
        .expect("view")
        .into_inner();
    assert_eq!(lapsed_view.lifecycle_stage, crm_proto::common::v1::LifecycleStage::Churned as i32);
    let risk = lapsed_view.churn_risk.expect("risk");
    assert!(risk.reasons.iter().all(|r| !r.explanation.is_empty()));

    // SEG-6: preview, save, materialise, list both ways.
    let rule = cond("days_since_last_purchase", pb::Operator::Gt, &["90"]);
    let preview = analyst
        .preview_segment(pb::PreviewSegmentRequest { rule: Some(rule.clone()), sample_size: 5 })
        .await
        .expect("preview")
        .into_inner();
    assert_eq!(preview.count, 1);
    assert_eq!(preview.sample_customer_ids, std::slice::from_ref(&lapsed));
    let segment = analyst
        .create_segment(pb::CreateSegmentRequest {
            segment: Some(pb::Segment { display_name: "Lapsed".into(), rule: Some(rule), ..Default::default() }),
            request_id: "seg-1".into(),
        })
        .await
        .expect("create")
        .into_inner();
    // SPEC 3: a retried create returns the first result (stored with the change itself).
    let replay = analyst
        .create_segment(pb::CreateSegmentRequest {
            segment: Some(pb::Segment {
                display_name: "Lapsed".into(),
                rule: Some(cond("days_since_last_purchase", pb::Operator::Gt, &["90"])),
                ..Default::default()
            }),
            request_id: "seg-1".into(),
        })
        .await
        .expect("replay")
        .into_inner();
    assert_eq!((replay.segment_id.as_str(), replay.display_name.as_str()), (segment.segment_id.as_str(), "Lapsed"));
    let op = analyst
        .start_recompute(pb::StartRecomputeRequest {
            scope: pb::RecomputeScope::Segments as i32,
            request_id: "rc-2".into(),
        })
        .await
        .expect("start")
        .into_inner();
    crm_segmentation::jobs::run_one(&app.pool, "test-worker", &Thresholds::default()).await.expect("worker");
    assert_eq!(
        analyst
            .get_recompute(pb::GetRecomputeRequest { operation_id: op.operation_id })
            .await
            .expect("poll")
            .into_inner()
            .state,
        pb::OperationState::Succeeded as i32
    );
    let members = analyst
        .list_segment_members(pb::ListSegmentMembersRequest {
            segment_id: segment.segment_id.clone(),
            ..Default::default()
        })
        .await
        .expect("members")
        .into_inner();
    assert_eq!(
        members.members.iter().map(|m| m.customer_id.clone()).collect::<Vec<_>>(),
        std::slice::from_ref(&lapsed)
    );
    let mut stream = analyst
        .stream_segment_members(pb::StreamSegmentMembersRequest { segment_id: segment.segment_id.clone() })
        .await
        .expect("stream")
        .into_inner();
    let mut streamed = Vec::new();
    while let Some(m) = stream.message().await.expect("message") {
        streamed.push(m.customer_id);
    }
    assert_eq!(streamed, std::slice::from_ref(&lapsed));
    let of_customer = analyst
        .list_customer_segments(pb::ListCustomerSegmentsRequest { customer_id: lapsed.clone() })
        .await
        .expect("segments")
        .into_inner();
    assert_eq!(of_customer.segments.iter().map(|s| s.display_name.as_str()).collect::<Vec<_>>(), ["Lapsed"]);
    let got = analyst
        .get_segment(pb::GetSegmentRequest { segment_id: segment.segment_id.clone() })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(got.member_count, 1);
    let listed = analyst.list_segments(pb::ListSegmentsRequest::default()).await.expect("list").into_inner();
    assert_eq!(listed.segments.len(), 1);

    let renamed = analyst
        .update_segment(pb::UpdateSegmentRequest {
            segment: Some(pb::Segment {
                segment_id: segment.segment_id.clone(),
                display_name: "Lapsed buyers".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask { paths: vec!["display_name".into()] }),
            etag: got.etag.clone(),
            request_id: "upd-1".into(),
        })
        .await
        .expect("rename")
        .into_inner();
    assert_eq!(renamed.display_name, "Lapsed buyers");
    let stale = analyst
        .update_segment(pb::UpdateSegmentRequest {
            segment: Some(pb::Segment {
                segment_id: segment.segment_id.clone(),
                description: "x".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask { paths: vec!["description".into()] }),
            etag: got.etag,
            request_id: "upd-2".into(),
        })
        .await
        .expect_err("stale etag");
    assert_eq!(stale.code(), Code::Aborted);
    analyst
        .delete_segment(pb::DeleteSegmentRequest { segment_id: segment.segment_id.clone(), request_id: "del-1".into() })
        .await
        .expect("delete");
    analyst
        .delete_segment(pb::DeleteSegmentRequest { segment_id: segment.segment_id.clone(), request_id: "del-2".into() })
        .await
        .expect("delete twice");
    assert_eq!(
        analyst.get_segment(pb::GetSegmentRequest { segment_id: segment.segment_id }).await.expect_err("gone").code(),
        Code::NotFound
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
}

#[tokio::test]
async fn bad_input_names_the_field_and_roles_are_enforced() {
    let app = start().await;
    let mut analyst = client(&app, &[Role::Analyst]);
    let err = analyst
        .create_segment(pb::CreateSegmentRequest {
            segment: Some(pb::Segment {
                display_name: String::new(),
                rule: Some(cond("tier", pb::Operator::Eq, &["TIER_NOPE"])),
                ..Default::default()
            }),
            request_id: "s".into(),
        })
        .await
        .expect_err("bad segment");
    assert_eq!(bad_fields(&err), ["segment.display_name", "segment.rule.condition.values[0]"]);
    let err = analyst
        .preview_segment(pb::PreviewSegmentRequest { rule: None, sample_size: 500 })
        .await
        .expect_err("bad preview");
    assert_eq!(bad_fields(&err), ["rule", "sample_size"]);
    let err = analyst
        .get_customer_segmentation(pb::GetCustomerSegmentationRequest { customer_id: "nope".into() })
        .await
        .expect_err("bad id");
    assert_eq!(bad_fields(&err), ["customer_id"]);
    let err = analyst
        .list_segment_members(pb::ListSegmentMembersRequest {
            segment_id: "x".into(),
            page_token: "zz".into(),
            page_size: -1,
        })
        .await
        .expect_err("members");
    assert_eq!(bad_fields(&err), ["segment_id", "page_size", "page_token"]);
    let err = analyst
        .start_recompute(pb::StartRecomputeRequest { scope: 42, request_id: "r".into() })
        .await
        .expect_err("scope");
    assert_eq!(bad_fields(&err), ["scope"]);
    let agent = client(&app, &[Role::Agent])
        .create_segment(pb::CreateSegmentRequest::default())
        .await
        .expect_err("agents cannot design segments");
    assert_eq!(agent.code(), Code::PermissionDenied);
    let segments: i64 = sqlx::query_scalar("SELECT count(*) FROM segments").fetch_one(&app.pool).await.expect("count");
    assert_eq!(segments, 0, "nothing stored");
}
