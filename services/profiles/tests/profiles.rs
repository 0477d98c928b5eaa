//! Profiles through gRPC against real PostgreSQL and Redis (SPEC 4.1).

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{bad_fields, create, person, ts};
use crm_kit::Role;
use crm_proto::common::v1::{Channel, Money, Purpose, TimeRange};
use crm_proto::profiles::v1 as pb;
use tonic::Code;

#[tokio::test]
async fn prf3_concurrent_creates_with_one_phone_give_one_customer() {
    let app = common::start().await;
    let client = app.admin();
    let calls = (0..16).map(|i| {
        let mut c = client.clone();
        async move {
            c.create_customer(pb::CreateCustomerRequest {
                customer: Some(person(&format!("Racer {i}"), "+86 139 0000 0001", "")),
                request_id: format!("race-{i}"),
            })
            .await
            .map(|r| r.into_inner())
        }
    });
    let results: Vec<_> = futures_util::future::join_all(calls).await.into_iter().map(|r| r.expect("create")).collect();
    let ids: HashSet<_> = results.iter().map(|r| r.customer.as_ref().expect("c").customer_id.clone()).collect();
    assert_eq!(ids.len(), 1, "one customer for one phone");
    assert_eq!(results.iter().filter(|r| r.created).count(), 1);
    assert!(results.iter().filter(|r| !r.created).all(|r| r.matched_by == "phone"));
    assert_eq!(app.count("customers").await, 1);
}

#[tokio::test]
async fn sec1_a_replayed_create_is_masked_for_a_caller_without_pii_read() {
    let app = common::start().await;
    let request = pb::CreateCustomerRequest {
        customer: Some(person("王小明", "+8613900000060", "wang@example.com")),
        request_id: "replay-me".into(),
    };
    let mut service = app.client(&[Role::Service], true);
    let first = service.create_customer(request.clone()).await.expect("create").into_inner();
    let mut agent = app.client(&[Role::Agent], false);
    let replay = agent.create_customer(request).await.expect("replay").into_inner();
    assert_eq!(
        replay.customer.as_ref().map(|c| c.customer_id.clone()),
        first.customer.as_ref().map(|c| c.customer_id.clone())
    );
    let c = replay.customer.expect("customer");
    assert!(c.masked);
    assert_eq!(c.phone, "139****0060");
}

#[tokio::test]
async fn prf3_a_create_matching_by_email_fills_empty_fields_without_duplicating() {
    let app = common::start().await;
    let mut admin = app.admin();
    let first = create(&mut admin, person("Wei Li", "", "wei@example.com")).await;
    let second = admin
        .create_customer(pb::CreateCustomerRequest {
            customer: Some(pb::Customer {
                tags: vec!["vip".into()],
                ..person("Wei Li", "+6581234567", "WEI@example.com")
            }),
            request_id: "second".into(),
        })
        .await
        .expect("create")
        .into_inner();
    assert!(!second.created);
    assert_eq!(second.matched_by, "email");
    assert_eq!(second.customer.expect("customer").customer_id, first.customer_id);
    let c = admin
        .get_customer(pb::GetCustomerRequest { customer_id: first.customer_id.clone(), purpose: "check".into() })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(c.phone, "+6581234567", "the empty phone was filled in");
    assert_eq!(c.tags, ["vip"]);
    assert_eq!(app.count("customers").await, 1);
}

#[tokio::test]
async fn prf9_a_read_after_a_completed_update_never_returns_the_old_profile() {
    let app = common::start().await;
    let mut admin = app.admin();
    let c = create(&mut admin, person("Version 0", "+8613900000002", "")).await;
    let id = c.customer_id.clone();
    // Readers hammer the same profile while it is updated, keeping it hot in the cache.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let mut r = app.admin();
            let id = id.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = r
                        .get_customer(pb::GetCustomerRequest { customer_id: id.clone(), purpose: "test".into() })
                        .await;
                }
            })
        })
        .collect();
    for i in 1..=40 {
        let updated = admin
            .update_customer(pb::UpdateCustomerRequest {
                customer: Some(pb::Customer {
                    customer_id: id.clone(),
                    name: format!("Version {i}"),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask { paths: vec!["name".into()] }),
                etag: String::new(),
                request_id: format!("upd-{i}"),
            })
            .await
            .expect("update")
            .into_inner();
        assert_eq!(updated.etag, format!("v{}", i + 1));
        let read = admin
            .get_customer(pb::GetCustomerRequest { customer_id: id.clone(), purpose: "test".into() })
            .await
            .expect("get")
            .into_inner();
        assert_eq!(read.name, format!("Version {i}"), "read after update {i} returned an older profile");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        r.await.expect("reader");
    }
}

#[tokio::test]
async fn prf9_with_redis_at_a_closed_port_reads_still_answer() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let app = common::start_with(|c| c.redis_url = format!("redis://127.0.0.1:{port}")).await;
    let mut admin = app.admin();
    let c = create(&mut admin, person("No Cache", "+8613900000003", "")).await;
    for _ in 0..3 {
        let read = admin
            .get_customer(pb::GetCustomerRequest { customer_id: c.customer_id.clone(), purpose: "test".into() })
            .await
            .expect("GetCustomer answers from PostgreSQL")
            .into_inner();
        assert_eq!(read.name, "No Cache");
    }
    let updated = admin
        .update_customer(pb::UpdateCustomerRequest {
            customer: Some(pb::Customer {
                customer_id: c.customer_id.clone(),
                region: "CN-BJ".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask { paths: vec!["region".into()] }),
            etag: String::new(),
            request_id: "r".into(),
        })
        .await
        .expect("updates work without Redis")
        .into_inner();
    assert_eq!(updated.region, "CN-BJ");
}

#[tokio::test]
async fn sec1_without_pii_read_personal_data_is_masked_and_unmasked_reads_are_audited() {
    let app = common::start().await;
    let mut admin = app.admin();
    let c = create(&mut admin, person("张三丰", "+8613812345678", "zhang@example.com")).await;
    let get = |purpose: &str| pb::GetCustomerRequest { customer_id: c.customer_id.clone(), purpose: purpose.into() };

    let agent = app.client(&[Role::Agent], false).get_customer(get("call")).await.expect("agent").into_inner();
    assert!(agent.masked);
    assert_eq!(
        (agent.name.as_str(), agent.phone.as_str(), agent.email.as_str()),
        ("张**", "138****5678", "z***@example.com")
    );

    let no_purpose = admin.get_customer(get("")).await.expect("no purpose").into_inner();
    assert!(no_purpose.masked, "pii:read without a stated purpose stays masked");
    assert_eq!(app.count("access_audit").await, 0);

    let full = admin.get_customer(get("complaint #42")).await.expect("admin").into_inner();
    assert!(!full.masked);
    assert_eq!(full.phone, "+8613812345678");
    let audit = admin
        .list_access_audit(pb::ListAccessAuditRequest { customer_id: c.customer_id.clone(), ..Default::default() })
        .await
        .expect("audit")
        .into_inner();
    assert_eq!(audit.entries.len(), 1);
    let entry = &audit.entries[0];
    assert_eq!((entry.subject.as_str(), entry.purpose.as_str()), ("tester", "complaint #42"));
    assert_eq!(entry.method, "/crm.profiles.v1.ProfilesService/GetCustomer");
    assert_eq!(entry.trace_id.len(), 32);

    let tampered = sqlx::query("DELETE FROM access_audit").execute(&app.pool).await;
    assert!(tampered.is_err(), "the audit is append-only");
    let denied = app.client(&[Role::Agent], true).list_access_audit(pb::ListAccessAuditRequest::default()).await;
    assert_eq!(denied.expect_err("agents cannot read the audit").code(), Code::PermissionDenied);
}

#[tokio::test]
async fn prf8_erase_removes_personal_data_everywhere_in_profiles_and_is_idempotent() {
    let app = common::start().await;
    let mut admin = app.admin();
    let c = create(
        &mut admin,
        pb::Customer { tags: vec!["vip".into()], ..person("Erase Me", "+8613900000004", "erase@example.com") },
    )
    .await;
    // Warm the cache with the unmasked record.
    admin
        .get_customer(pb::GetCustomerRequest { customer_id: c.customer_id.clone(), purpose: "t".into() })
        .await
        .expect("get");
    admin
        .batch_record_interactions(pb::BatchRecordInteractionsRequest {
            interactions: vec![pb::Interaction {
                interaction_id: "i1".into(),
                customer_id: c.customer_id.clone(),
                kind: pb::InteractionKind::Inquiry as i32,
                occurred_at: ts(1_760_000_000),
                note: "my address is 1 Secret Road".into(),
                ..Default::default()
            }],
            request_id: "i".into(),
        })
        .await
        .expect("interactions");
    let erase = |request_id: &str| pb::EraseCustomerRequest {
        customer_id: c.customer_id.clone(),
        reason: "GDPR request 7".into(),
        request_id: request_id.into(),
    };
    let first = admin.erase_customer(erase("e1")).await.expect("erase").into_inner().status.expect("status");
    assert!(first.confirmed.contains_key("profiles"));
    assert!(first.pending.contains(&"segmentation".to_string()));
    let second = admin.erase_customer(erase("e2")).await.expect("erase again").into_inner().status.expect("status");
    assert_eq!(first.request_time, second.request_time, "a second erasure changes nothing");

    let read = admin
        .get_customer(pb::GetCustomerRequest { customer_id: c.customer_id.clone(), purpose: "t".into() })
        .await
        .expect("get")
        .into_inner();
    assert!(read.erased);
    assert!(read.phone.is_empty() && read.email.is_empty() && read.tags.is_empty());
    assert_ne!(read.name, "Erase Me");
    let leftovers: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM customers WHERE name = 'Erase Me' OR phone IS NOT NULL OR email IS NOT NULL) \
              + (SELECT count(*) FROM interactions WHERE note <> '') + (SELECT count(*) FROM external_ids)",
    )
    .fetch_one(&app.pool)
    .await
    .expect("count");
    assert_eq!(leftovers, 0, "no personal data left in profiles' tables");
    let stored_responses: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM kit_idempotency k, UNNEST(ARRAY['Erase Me', '+8613900000004', 'erase@example.com']) AS pii \
         WHERE position(convert_to(pii, 'UTF8') IN k.response) > 0",
    )
    .fetch_one(&app.pool)
    .await
    .expect("count");
    assert_eq!(stored_responses, 0, "no stored idempotent response keeps personal data");
    let events: i64 =
        sqlx::query_scalar("SELECT count(*) FROM kit_outbox WHERE event_type = 'crm.profiles.v1.CustomerErased'")
            .fetch_one(&app.pool)
            .await
            .expect("count");
    assert_eq!(events, 1, "CustomerErased is emitted once");
    let update = admin
        .update_customer(pb::UpdateCustomerRequest {
            customer: Some(pb::Customer {
                customer_id: c.customer_id.clone(),
                name: "Back".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask { paths: vec!["name".into()] }),
            etag: String::new(),
            request_id: "after-erase".into(),
        })
        .await
        .expect_err("an erased customer cannot be updated");
    assert_eq!(update.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn prf4_transactions_are_idempotent_by_id_and_rows_are_rejected_with_reasons() {
    let app = common::start().await;
    let mut admin = app.admin();
    let c = create(&mut admin, person("Buyer", "+8613900000005", "")).await;
    let tx = |id: &str, customer: &str, amount: i64, at: i64| pb::Transaction {
        transaction_id: id.into(),
        customer_id: customer.into(),
        kind: pb::TransactionKind::Purchase as i32,
        amount: Some(Money { amount_minor: amount, currency: "CNY".into() }),
        occurred_at: ts(at),
        category: "shoes".into(),
        channel: Channel::Online as i32,
        ..Default::default()
    };
    let batch = pb::BatchRecordTransactionsRequest {
        transactions: vec![
            tx("t1", &c.customer_id, 19_900, 1_760_000_000),
            tx("t2", &c.customer_id, 5_000, 1_760_100_000),
            tx("t3", "00000000-0000-0000-0000-000000000000", 100, 1_760_000_000),
            tx("t4", &c.customer_id, -1, 1_760_000_000),
        ],
        request_id: "batch-1".into(),
    };
    let r = admin.batch_record_transactions(batch.clone()).await.expect("batch").into_inner();
    assert_eq!((r.accepted, r.duplicates), (2, 0));
    let rejected: Vec<_> = r.rejections.iter().map(|x| (x.index, x.field.as_str())).collect();
    assert_eq!(rejected, [(2, "customer_id"), (3, "amount.amount_minor")]);
    let again = admin
        .batch_record_transactions(pb::BatchRecordTransactionsRequest { request_id: "batch-2".into(), ..batch })
        .await
        .expect("again")
        .into_inner();
    assert_eq!((again.accepted, again.duplicates), (0, 2), "same transaction ids are not recorded twice");
    assert_eq!(app.count("transactions").await, 2);
    let events: i64 =
        sqlx::query_scalar("SELECT count(*) FROM kit_outbox WHERE event_type = 'crm.profiles.v1.TransactionRecorded'")
            .fetch_one(&app.pool)
            .await
            .expect("count");
    assert_eq!(events, 2);

    // PRF-5: the timeline, newest first, paginated.
    let mut token = String::new();
    let mut seen = Vec::new();
    loop {
        let page = admin
            .list_timeline(pb::ListTimelineRequest {
                customer_id: c.customer_id.clone(),
                page_size: 1,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .expect("timeline")
            .into_inner();
        seen.extend(page.entries.iter().map(|e| e.source_id.clone()));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, ["t2", "t1"]);
}

#[tokio::test]
async fn prf7_consent_opt_out_takes_effect_and_expired_grants_count_as_none() {
    let app = common::start().await;
    let mut admin = app.admin();
    let c = create(&mut admin, person("Consenting", "+8613900000006", "")).await;
    let grant = |channel: Channel, granted: bool, expire: Option<i64>| pb::ConsentGrant {
        channel: channel as i32,
        purpose: Purpose::Marketing as i32,
        granted,
        source: "app-signup".into(),
        expire_time: expire.and_then(ts),
        ..Default::default()
    };
    let update = |changes, id: &str| pb::UpdateConsentRequest {
        customer_id: c.customer_id.clone(),
        changes,
        request_id: id.into(),
    };
    admin
        .update_consent(update(
            vec![grant(Channel::Sms, true, None), grant(Channel::Email, true, Some(1_000_000_000))],
            "c1",
        ))
        .await
        .expect("grant");
    let state =
        admin.update_consent(update(vec![grant(Channel::Sms, false, None)], "c2")).await.expect("opt out").into_inner();
    let by_channel = |ch: Channel| state.grants.iter().find(|g| g.channel == ch as i32).expect("grant").granted;
    assert!(!by_channel(Channel::Sms), "opt-out is immediate");
    assert!(!by_channel(Channel::Email), "an expired grant counts as no consent");
    let history = admin
        .list_consent_history(pb::ListConsentHistoryRequest {
            customer_id: c.customer_id.clone(),
            ..Default::default()
        })
        .await
        .expect("history")
        .into_inner();
    assert_eq!(history.changes.len(), 3);
    assert_eq!(history.changes[0].changed_by, "tester");
    let events: i64 =
        sqlx::query_scalar("SELECT count(*) FROM kit_outbox WHERE event_type = 'crm.profiles.v1.ConsentChanged'")
            .fetch_one(&app.pool)
            .await
            .expect("count");
    assert_eq!(events, 2);
}

/// REL-6: the read models of outreach and segmentation order consent changes
/// by their time; a replica whose clock runs an hour behind must still give
/// its change a time after the one it replaces.
#[tokio::test]
async fn rel6_a_consent_change_is_timed_after_the_one_it_replaces_whatever_the_clock() {
    let app = common::start().await;
    let mut admin = app.admin();
    let c = create(&mut admin, person("Clocked", "+8613900000016", "")).await;
    let sms = |granted| pb::ConsentGrant {
        channel: Channel::Sms as i32,
        purpose: Purpose::Marketing as i32,
        granted,
        ..Default::default()
    };
    let first = admin
        .update_consent(pb::UpdateConsentRequest {
            customer_id: c.customer_id.clone(),
            changes: vec![sms(true)],
            request_id: "clock-1".into(),
        })
        .await
        .expect("grant")
        .into_inner();
    let first_time = first.grants[0].update_time.expect("update_time");
    let id: uuid::Uuid = c.customer_id.parse().expect("id");
    let mut tx = app.pool.begin().await.expect("tx");
    let behind = chrono::Utc::now() - chrono::Duration::hours(1);
    crm_profiles::store::set_consent(&mut tx, id, &sms(false), "slow-replica", behind).await.expect("withdraw");
    let now = crm_profiles::store::consents(&mut tx, id).await.expect("consents");
    tx.commit().await.expect("commit");
    let second_time = now[0].update_time.expect("update_time");
    assert!(!now[0].granted);
    assert!(
        (second_time.seconds, second_time.nanos) > (first_time.seconds, first_time.nanos),
        "the withdrawal ({second_time:?}) must be timed after the grant it replaces ({first_time:?})"
    );
}

#[tokio::test]
async fn prf6_list_filters_and_pages_through_every_match_once() {
    let app = common::start().await;
    let mut admin = app.admin();
    for i in 0..7 {
        let region = if i % 2 == 0 { "CN-SH" } else { "CN-BJ" };
        create(
            &mut admin,
            pb::Customer {
                region: region.into(),
                tags: vec!["wave".into()],
                ..person(&format!("Lister {i}"), &format!("+86139000001{i:02}"), "")
            },
        )
        .await;
    }
    create(&mut admin, person("Someone Else", "+8613900000200", "")).await;
    let mut names = Vec::new();
    let mut token = String::new();
    loop {
        let page = admin
            .list_customers(pb::ListCustomersRequest {
                tags: vec!["wave".into()],
                region: "CN-SH".into(),
                page_size: 2,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .expect("list")
            .into_inner();
        names.extend(page.customers.iter().map(|c| c.name.clone()));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(names.len(), 4, "{names:?}");
    let by_prefix = admin
        .list_customers(pb::ListCustomersRequest {
            text_prefix: "lister".into(),
            purpose: "check".into(),
            ..Default::default()
        })
        .await
        .expect("prefix")
        .into_inner();
    assert_eq!(by_prefix.customers.len(), 7);
    let foreign_token = token_of(&mut admin).await;
    let other_filter = admin
        .list_customers(pb::ListCustomersRequest {
            region: "CN-BJ".into(),
            page_token: foreign_token,
            ..Default::default()
        })
        .await
        .expect_err("a token of another filter is refused");
    assert_eq!(bad_fields(&other_filter), ["page_token"]);
}

async fn token_of(admin: &mut common::Client) -> String {
    admin
        .list_customers(pb::ListCustomersRequest { page_size: 1, ..Default::default() })
        .await
        .expect("list")
        .into_inner()
        .next_page_token
}

#[tokio::test]
async fn stale_etags_are_aborted_and_identity_clashes_refused() {
    let app = common::start().await;
    let mut admin = app.admin();
    let a = create(&mut admin, person("A", "+8613900000007", "")).await;
    let _b = create(&mut admin, person("B", "+8613900000008", "")).await;
    let update = |id: &str, c: pb::Customer, path: &str, etag: &str, rid: &str| pb::UpdateCustomerRequest {
        customer: Some(pb::Customer { customer_id: id.into(), ..c }),
        update_mask: Some(prost_types::FieldMask { paths: vec![path.into()] }),
        etag: etag.into(),
        request_id: rid.into(),
    };
    admin
        .update_customer(update(
            &a.customer_id,
            pb::Customer { name: "A2".into(), ..Default::default() },
            "name",
            "v1",
            "u1",
        ))
        .await
        .expect("fresh etag");
    let stale = admin
        .update_customer(update(
            &a.customer_id,
            pb::Customer { name: "A3".into(), ..Default::default() },
            "name",
            "v1",
            "u2",
        ))
        .await
        .expect_err("stale");
    assert_eq!(stale.code(), Code::Aborted);
    let clash = admin
        .update_customer(update(
            &a.customer_id,
            pb::Customer { phone: "+86 139 0000 0008".into(), ..Default::default() },
            "phone",
            "",
            "u3",
        ))
        .await
        .expect_err("phone of another customer");
    assert_eq!(clash.code(), Code::AlreadyExists);
}

#[tokio::test]
async fn rel1_bad_input_names_the_field_and_stores_nothing() {
    let app = common::start().await;
    let mut admin = app.admin();
    let existing = create(&mut admin, person("Existing", "+8613900000009", "")).await;
    let before = (app.count("customers").await, app.count("kit_outbox").await, app.count("kit_idempotency").await);

    let cases: Vec<(pb::CreateCustomerRequest, Vec<&str>)> = vec![
        (pb::CreateCustomerRequest { customer: None, request_id: "r".into() }, vec!["customer"]),
        (
            pb::CreateCustomerRequest { customer: Some(person("X", "", "")), request_id: String::new() },
            vec!["request_id"],
        ),
        (
            pb::CreateCustomerRequest { customer: Some(person("", "12", "nope")), request_id: "r".into() },
            vec!["customer.name", "customer.phone", "customer.email"],
        ),
        (
            pb::CreateCustomerRequest { customer: Some(person(&"x".repeat(201), "", "")), request_id: "r".into() },
            vec!["customer.name"],
        ),
        (
            pb::CreateCustomerRequest {
                customer: Some(pb::Customer { gender: 77, ..person("X", "", "") }),
                request_id: "r".into(),
            },
            vec!["customer.gender"],
        ),
        (
            pb::CreateCustomerRequest {
                customer: Some(pb::Customer { kind: 9, ..person("X", "", "") }),
                request_id: "r".into(),
            },
            vec!["customer.kind"],
        ),
        (
            pb::CreateCustomerRequest {
                customer: Some(pb::Customer { tags: vec!["a".repeat(65)], ..person("X", "", "") }),
                request_id: "r".into(),
            },
            vec!["customer.tags[0]"],
        ),
        (
            pb::CreateCustomerRequest { customer: Some(person("X", "", "")), request_id: "x".repeat(129) },
            vec!["request_id"],
        ),
    ];
    for (req, want) in cases {
        let err = admin.create_customer(req).await.expect_err("bad create");
        assert_eq!(bad_fields(&err), want);
    }
    let mask = |paths: &[&str]| Some(prost_types::FieldMask { paths: paths.iter().map(|p| p.to_string()).collect() });
    let err = admin
        .update_customer(pb::UpdateCustomerRequest {
            customer: Some(pb::Customer { customer_id: existing.customer_id.clone(), ..Default::default() }),
            update_mask: mask(&["customer_id"]),
            etag: String::new(),
            request_id: "m".into(),
        })
        .await
        .expect_err("read-only path");
    assert_eq!(bad_fields(&err), ["update_mask"]);
    let err = admin
        .update_customer(pb::UpdateCustomerRequest {
            customer: Some(pb::Customer { customer_id: existing.customer_id.clone(), ..Default::default() }),
            update_mask: None,
            etag: String::new(),
            request_id: "m2".into(),
        })
        .await
        .expect_err("no mask");
    assert_eq!(bad_fields(&err), ["update_mask"]);
    let err = admin
        .update_customer(pb::UpdateCustomerRequest {
            customer: Some(pb::Customer {
                customer_id: existing.customer_id.clone(),
                email: "broken".into(),
                ..Default::default()
            }),
            update_mask: mask(&["email"]),
            etag: String::new(),
            request_id: "m3".into(),
        })
        .await
        .expect_err("bad email");
    assert_eq!(bad_fields(&err), ["customer.email"]);
    let err = admin
        .get_customer(pb::GetCustomerRequest { customer_id: "not-a-uuid".into(), purpose: String::new() })
        .await
        .expect_err("bad id");
    assert_eq!(bad_fields(&err), ["customer_id"]);
    let missing = admin
        .get_customer(pb::GetCustomerRequest {
            customer_id: "00000000-0000-0000-0000-000000000001".into(),
            purpose: String::new(),
        })
        .await
        .expect_err("unknown id");
    assert_eq!(missing.code(), Code::NotFound);
    let err = admin
        .list_customers(pb::ListCustomersRequest { page_token: "garbage".into(), ..Default::default() })
        .await
        .expect_err("token");
    assert_eq!(bad_fields(&err), ["page_token"]);
    let err = admin
        .list_customers(pb::ListCustomersRequest { page_size: -1, tier: 42, ..Default::default() })
        .await
        .expect_err("size");
    assert_eq!(bad_fields(&err), ["page_size", "tier"]);
    let err = admin
        .list_timeline(pb::ListTimelineRequest {
            customer_id: existing.customer_id.clone(),
            kinds: vec![99],
            time_range: Some(TimeRange {
                start_time: Some(prost_types::Timestamp { seconds: 0, nanos: -1 }),
                end_time: None,
            }),
            ..Default::default()
        })
        .await
        .expect_err("bad kinds");
    assert_eq!(bad_fields(&err), ["kinds[0]", "time_range.start_time"]);
    let err = admin
        .update_consent(pb::UpdateConsentRequest {
            customer_id: existing.customer_id.clone(),
            changes: vec![pb::ConsentGrant { channel: 0, purpose: 17, ..Default::default() }],
            request_id: "c".into(),
        })
        .await
        .expect_err("bad consent");
    assert_eq!(bad_fields(&err), ["changes[0].channel", "changes[0].purpose"]);
    let err = admin
        .batch_record_transactions(pb::BatchRecordTransactionsRequest { transactions: vec![], request_id: "b".into() })
        .await
        .expect_err("empty batch");
    assert_eq!(bad_fields(&err), ["transactions"]);
    let err = admin
        .erase_customer(pb::EraseCustomerRequest {
            customer_id: existing.customer_id.clone(),
            reason: String::new(),
            request_id: String::new(),
        })
        .await
        .expect_err("erase");
    assert_eq!(bad_fields(&err), ["reason", "request_id"]);
    let err = admin
        .export_customer_data(pb::ExportCustomerDataRequest {
            customer_id: existing.customer_id.clone(),
            purpose: String::new(),
        })
        .await
        .expect_err("export");
    assert_eq!(bad_fields(&err), ["purpose"]);

    let after = (app.count("customers").await, app.count("kit_outbox").await, app.count("kit_idempotency").await);
    assert_eq!(before, after, "nothing stored changed");
    // Oversized messages are refused by the transport, and the service stays up.
    let huge = pb::CreateCustomerRequest {
        customer: Some(person(&"y".repeat(5 * 1024 * 1024), "", "")),
        request_id: "big".into(),
    };
    let err = admin.create_customer(huge).await.expect_err("oversized");
    assert!(
        matches!(err.code(), Code::ResourceExhausted | Code::OutOfRange | Code::Internal | Code::InvalidArgument),
        "{err:?}"
    );
    admin
        .get_customer(pb::GetCustomerRequest { customer_id: existing.customer_id, purpose: String::new() })
        .await
        .expect("still up");
}

#[tokio::test]
async fn batch_get_and_resolve_find_customers_by_id_and_identity() {
    let app = common::start().await;
    let mut admin = app.admin();
    let a = create(
        &mut admin,
        pb::Customer {
            external_ids: vec![pb::ExternalId { source: "pos".into(), id: "C-1".into() }],
            ..person("Findable", "+8613900000010", "find@example.com")
        },
    )
    .await;
    let batch = admin
        .batch_get_customers(pb::BatchGetCustomersRequest {
            customer_ids: vec![a.customer_id.clone(), "00000000-0000-0000-0000-000000000002".into()],
            purpose: String::new(),
        })
        .await
        .expect("batch")
        .into_inner();
    assert_eq!(batch.customers.len(), 1);
    assert_eq!(batch.missing_ids, ["00000000-0000-0000-0000-000000000002"]);
    use pb::resolve_customer_request::Identity;
    for identity in [
        Identity::Phone("139 0000 0010".into()),
        Identity::Email("FIND@example.com".into()),
        Identity::ExternalId(pb::ExternalId { source: "POS".into(), id: "C-1".into() }),
    ] {
        let found = admin
            .resolve_customer(pb::ResolveCustomerRequest { identity: Some(identity), purpose: "support call".into() })
            .await
            .expect("resolve")
            .into_inner();
        assert_eq!(found.customer_id, a.customer_id);
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
}

#[tokio::test]
async fn prf3_a_merged_away_customer_still_resolves_and_a_merge_can_be_undone() {
    let app = common::start().await;
    let mut admin = app.admin();
    let a =
        create(&mut admin, pb::Customer { tags: vec!["vip".into()], ..person("Wei Li", "+8613900000020", "") }).await;
    let b = create(
        &mut admin,
        pb::Customer { tags: vec!["newsletter".into()], ..person("W. Li", "+8613900000021", "wei.li@example.com") },
    )
    .await;
    let tx = |id: &str, customer: &str| pb::Transaction {
        transaction_id: id.into(),
        customer_id: customer.into(),
        kind: pb::TransactionKind::Purchase as i32,
        amount: Some(Money { amount_minor: 1000, currency: "CNY".into() }),
        occurred_at: ts(1_760_000_000),
        ..Default::default()
    };
    admin
        .batch_record_transactions(pb::BatchRecordTransactionsRequest {
            transactions: vec![tx("ta", &a.customer_id), tx("tb", &b.customer_id)],
            request_id: "t".into(),
        })
        .await
        .expect("transactions");

    let merge = |request_id: &str, loser: &str| pb::MergeCustomersRequest {
        survivor_id: a.customer_id.clone(),
        loser_id: loser.into(),
        reason: "same person, confirmed by phone".into(),
        take_from_loser: None,
        request_id: request_id.into(),
    };
    let self_merge = admin.merge_customers(merge("m0", &a.customer_id)).await.expect_err("self merge");
    assert_eq!(bad_fields(&self_merge), ["loser_id"]);
    let merged = admin.merge_customers(merge("m1", &b.customer_id)).await.expect("merge").into_inner();
    let get = |id: &str| pb::GetCustomerRequest { customer_id: id.into(), purpose: "check".into() };
    let via_loser = admin.get_customer(get(&b.customer_id)).await.expect("alias resolves").into_inner();
    assert_eq!(via_loser.customer_id, a.customer_id, "the loser's id resolves to the survivor");
    assert_eq!(via_loser.email, "wei.li@example.com", "an empty survivor field was filled from the loser");
    assert_eq!(via_loser.phone, "+8613900000020", "the survivor's own value won");
    assert_eq!(via_loser.tags, ["vip", "newsletter"]);
    assert_eq!(via_loser.alias_ids, std::slice::from_ref(&b.customer_id));
    let by_phone = admin
        .resolve_customer(pb::ResolveCustomerRequest {
            identity: Some(pb::resolve_customer_request::Identity::Phone("+8613900000021".into())),
            purpose: "support call".into(),
        })
        .await
        .expect("the loser's phone resolves")
        .into_inner();
    assert_eq!(by_phone.customer_id, a.customer_id);
    let again = admin
        .create_customer(pb::CreateCustomerRequest {
            customer: Some(person("W. Li", "+86 139 0000 0021", "")),
            request_id: "recreate".into(),
        })
        .await
        .expect("create")
        .into_inner();
    assert!(!again.created, "a create with the loser's phone finds the survivor");
    let timeline = admin
        .list_timeline(pb::ListTimelineRequest { customer_id: a.customer_id.clone(), ..Default::default() })
        .await
        .expect("timeline")
        .into_inner();
    let mut ids: Vec<_> = timeline.entries.iter().map(|e| e.source_id.clone()).collect();
    ids.sort();
    assert_eq!(ids, ["ta", "tb"], "the loser's history moved to the survivor");
    let events: i64 =
        sqlx::query_scalar("SELECT count(*) FROM kit_outbox WHERE event_type = 'crm.profiles.v1.CustomerMerged'")
            .fetch_one(&app.pool)
            .await
            .expect("count");
    assert_eq!(events, 1);

    let unmerge = |request_id: &str| pb::UnmergeCustomerRequest {
        merge_id: merged.merge_id.clone(),
        reason: "not the same person".into(),
        request_id: request_id.into(),
    };
    let undone = admin.unmerge_customer(unmerge("u1")).await.expect("unmerge").into_inner();
    assert_eq!(undone.restored.expect("restored").customer_id, b.customer_id);
    let a_after = admin.get_customer(get(&a.customer_id)).await.expect("a").into_inner();
    assert_eq!(
        (a_after.email.as_str(), a_after.tags.clone()),
        ("", vec!["vip".to_string()]),
        "what came from the loser went back"
    );
    let b_after = admin.get_customer(get(&b.customer_id)).await.expect("b").into_inner();
    assert_eq!(b_after.customer_id, b.customer_id, "the loser is its own customer again");
    assert_eq!(b_after.email, "wei.li@example.com");
    let b_timeline = admin
        .list_timeline(pb::ListTimelineRequest { customer_id: b.customer_id.clone(), ..Default::default() })
        .await
        .expect("timeline")
        .into_inner();
    assert_eq!(b_timeline.entries.iter().map(|e| e.source_id.as_str()).collect::<Vec<_>>(), ["tb"]);
    let twice = admin.unmerge_customer(unmerge("u2")).await.expect_err("already undone");
    assert_eq!(twice.code(), Code::FailedPrecondition);
    assert_eq!(app.count("customers").await, 2);
}

fn import_stream(g: &[crm_datagen::Generated]) -> Vec<pb::ImportRecordsRequest> {
    use pb::import_records_request::Record;
    let mut rows = Vec::new();
    for x in g {
        rows.push(pb::ImportRecordsRequest { record: Some(Record::Customer(x.customer.clone())), customer_ref: None });
        for t in &x.transactions {
            rows.push(pb::ImportRecordsRequest {
                record: Some(Record::Transaction(t.clone())),
                customer_ref: Some(x.external_id()),
            });
        }
        for i in &x.interactions {
            rows.push(pb::ImportRecordsRequest {
                record: Some(Record::Interaction(i.clone())),
                customer_ref: Some(x.external_id()),
            });
        }
    }
    rows
}

#[tokio::test]
async fn prf4_bulk_import_reports_every_rejected_row_and_is_safe_to_rerun() {
    use pb::import_records_request::Record;
    let app = common::start().await;
    let mut admin = app.admin();
    let generated: Vec<_> =
        crm_datagen::Generator::new(crm_datagen::Config { customers: 700, ..Default::default() }).collect();
    let mut rows = import_stream(&generated);
    let expected_tx: usize = generated.iter().map(|g| g.transactions.len()).sum();
    let expected_int: usize = generated.iter().map(|g| g.interactions.len()).sum();
    // Bad rows in the middle of the stream.
    let bad_at = rows.len();
    rows.push(pb::ImportRecordsRequest { record: Some(Record::Customer(person("", "12", ""))), customer_ref: None });
    rows.push(pb::ImportRecordsRequest {
        record: Some(Record::Transaction(pb::Transaction {
            transaction_id: "orphan".into(),
            kind: pb::TransactionKind::Purchase as i32,
            amount: Some(Money { amount_minor: 100, currency: "CNY".into() }),
            occurred_at: ts(1_760_000_000),
            ..Default::default()
        })),
        customer_ref: Some(pb::ExternalId { source: "datagen".into(), id: "no-such-customer".into() }),
    });
    rows.push(pb::ImportRecordsRequest { record: None, customer_ref: None });

    let first = admin.import_records(tokio_stream::iter(rows.clone())).await.expect("import").into_inner();
    assert_eq!(first.customers_created, 700);
    assert_eq!(first.transactions_recorded as usize, expected_tx);
    assert_eq!(first.interactions_recorded as usize, expected_int);
    let rejected: Vec<_> = first.rejections.iter().map(|r| (r.index as usize - bad_at, r.field.as_str())).collect();
    assert_eq!(rejected, [(0, "customer.name"), (1, "customer_ref"), (2, "record")]);
    assert_eq!(first.rejected, 3);
    assert_eq!(app.count("customers").await, 700);
    let created_events: i64 =
        sqlx::query_scalar("SELECT count(*) FROM kit_outbox WHERE event_type = 'crm.profiles.v1.CustomerCreated'")
            .fetch_one(&app.pool)
            .await
            .expect("count");
    assert_eq!(created_events, 700);

    let again = admin.import_records(tokio_stream::iter(rows)).await.expect("re-import").into_inner();
    assert_eq!((again.customers_created, again.customers_matched), (0, 700), "customers match on re-import");
    assert_eq!((again.transactions_recorded, again.interactions_recorded), (0, 0));
    assert_eq!(again.duplicates as usize, expected_tx + expected_int);
    assert_eq!(app.count("customers").await, 700);
    assert_eq!(app.count("transactions").await as usize, expected_tx);

    // An imported customer is whole: identity normalised, history attached.
    let g = &generated[3];
    let found = admin
        .resolve_customer(pb::ResolveCustomerRequest {
            identity: Some(pb::resolve_customer_request::Identity::ExternalId(g.external_id())),
            purpose: "check".into(),
        })
        .await
        .expect("resolve")
        .into_inner();
    assert_eq!(found.phone, g.customer.phone);
    let timeline = admin
        .list_timeline(pb::ListTimelineRequest {
            customer_id: found.customer_id,
            page_size: 1000,
            kinds: vec![pb::TimelineEntryKind::Transaction as i32],
            ..Default::default()
        })
        .await
        .expect("timeline")
        .into_inner();
    assert_eq!(timeline.entries.len(), g.transactions.len());
}

#[tokio::test]
async fn prf10_suspected_duplicates_are_scored_and_explained() {
    let app = common::start().await;
    let mut admin = app.admin();
    let birthday = Some(crm_proto::common::v1::Date { year: 1990, month: 5, day: 1 });
    let a = create(&mut admin, pb::Customer { birthday, ..person("Wei Li", "+8613900000030", "") }).await;
    let b = create(&mut admin, pb::Customer { birthday, ..person("wei li", "+8613800000030", "") }).await;
    create(&mut admin, person("Wei Li", "+8613700001234", "")).await; // same name only: weak
    create(&mut admin, person("Somebody Else", "+8613900009999", "")).await;
    let report = admin
        .list_suspected_duplicates(pb::ListSuspectedDuplicatesRequest::default())
        .await
        .expect("report")
        .into_inner();
    assert_eq!(report.duplicates.len(), 1, "{:?}", report.duplicates);
    let d = &report.duplicates[0];
    let mut pair = [d.customer_id.clone(), d.other_customer_id.clone()];
    pair.sort();
    let mut want = [a.customer_id.clone(), b.customer_id.clone()];
    want.sort();
    assert_eq!(pair, want);
    assert_eq!(d.score, 100);
    assert!(d.reasons.contains(&"same birthday".to_string()) && d.reasons.contains(&"similar phone".to_string()));
    let weak = admin
        .list_suspected_duplicates(pb::ListSuspectedDuplicatesRequest { min_score: 30, ..Default::default() })
        .await
        .expect("weak")
        .into_inner();
    assert!(weak.duplicates.len() >= 3, "weaker pairs appear with a lower threshold");
    let bad = admin
        .list_suspected_duplicates(pb::ListSuspectedDuplicatesRequest { min_score: 101, ..Default::default() })
        .await
        .expect_err("bad score");
    assert_eq!(bad_fields(&bad), ["min_score"]);
}

#[tokio::test]
async fn prf5_contacts_feedback_and_tier_moves_from_other_services_join_the_timeline() {
    use crm_proto::feedback::v1 as fb;
    use crm_proto::outreach::v1 as out;
    use crm_proto::segmentation::v1 as seg;
    let prefix = crm_kit::testing::unique_name("tl");
    let app = common::start_with_consumers(&prefix).await;
    let mut admin = app.admin();
    let c = create(&mut admin, person("Timeline", "+8613900000040", "")).await;

    // Another service's outbox and relay, publishing under the same prefix.
    let producer = common::producer_pool().await;
    let mut tx = producer.begin().await.expect("tx");
    let message = out::Message {
        message_id: "m-1".into(),
        customer_id: c.customer_id.clone(),
        channel: Channel::Sms as i32,
        campaign_id: "winback".into(),
        state: out::MessageState::Sent as i32,
        send_time: ts(1_760_000_100),
        ..Default::default()
    };
    let agg = crm_kit::outbox::Aggregate { kind: "message", id: "m-1" };
    crm_kit::outbox::enqueue(
        &mut tx,
        "outreach",
        agg,
        "r",
        &out::MessageSent { message: Some(message), holdout: false },
    )
    .await
    .expect("enqueue");
    let feedback = fb::FeedbackReceived {
        feedback_id: "f-1".into(),
        customer_id: c.customer_id.clone(),
        channel: Channel::Hotline as i32,
        category: fb::Category::ServiceComplaint as i32,
        sentiment: -0.6,
        receive_time: ts(1_760_000_200),
        ..Default::default()
    };
    crm_kit::outbox::enqueue(
        &mut tx,
        "feedback",
        crm_kit::outbox::Aggregate { kind: "feedback", id: "f-1" },
        "r",
        &feedback,
    )
    .await
    .expect("enqueue");
    let tier = seg::TierChanged {
        customer_id: c.customer_id.clone(),
        r#move: Some(seg::TierMove {
            from_tier: crm_proto::common::v1::Tier::Silver as i32,
            to_tier: crm_proto::common::v1::Tier::Gold as i32,
            reason: "top 50 % by 12-month spend".into(),
            move_time: ts(1_760_000_300),
        }),
    };
    crm_kit::outbox::enqueue(
        &mut tx,
        "segmentation",
        crm_kit::outbox::Aggregate { kind: "customer", id: &c.customer_id },
        "r",
        &tier,
    )
    .await
    .expect("enqueue");
    tx.commit().await.expect("commit");
    for service in ["outreach", "feedback", "segmentation"] {
        common::publish(&producer, &prefix, service).await;
    }

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let kinds = loop {
        let t = admin
            .list_timeline(pb::ListTimelineRequest { customer_id: c.customer_id.clone(), ..Default::default() })
            .await
            .expect("timeline")
            .into_inner();
        let kinds: Vec<i32> = t.entries.iter().map(|e| e.kind).collect();
        if kinds.len() >= 3 || tokio::time::Instant::now() > deadline {
            break kinds;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        kinds,
        [
            pb::TimelineEntryKind::TierChange as i32,
            pb::TimelineEntryKind::Feedback as i32,
            pb::TimelineEntryKind::Contact as i32
        ],
        "newest first"
    );
    let read = admin
        .get_customer(pb::GetCustomerRequest { customer_id: c.customer_id.clone(), purpose: String::new() })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(
        read.tier,
        crm_proto::common::v1::Tier::Gold as i32,
        "the tier from segmentation is on the record (cache invalidated)"
    );
}

#[tokio::test]
async fn prf1_organisations_get_their_size_class_and_persons_cannot_have_one() {
    let app = common::start().await;
    let mut admin = app.admin();
    let org = pb::Customer {
        kind: pb::CustomerKind::Organization as i32,
        organization: Some(pb::Organization {
            industry: "retail".into(),
            size: 0,
            annual_revenue: Some(Money { amount_minor: 250_000_000 * 100, currency: "CNY".into() }),
        }),
        ..person("Acme Trading Ltd", "+8613900000050", "buyer@acme.example.com")
    };
    let created = create(&mut admin, org).await;
    assert_eq!(created.kind, pb::CustomerKind::Organization as i32);
    assert_eq!(
        created.organization.expect("org").size,
        pb::OrganizationSize::Large as i32,
        "PRF-1: >= 100 M CNY is large"
    );
    let bad = admin
        .create_customer(pb::CreateCustomerRequest {
            customer: Some(pb::Customer {
                organization: Some(pb::Organization::default()),
                ..person("Just A Person", "", "")
            }),
            request_id: "org-person".into(),
        })
        .await
        .expect_err("a person with organisation details");
    assert_eq!(bad_fields(&bad), ["customer.organization"]);
}

#[tokio::test]
async fn prf8_export_returns_everything_unmasked_and_is_audited() {
    let app = common::start().await;
    let mut admin = app.admin();
    let c = create(&mut admin, person("Export Me", "+8613900000051", "export@example.com")).await;
    admin
        .batch_record_transactions(pb::BatchRecordTransactionsRequest {
            transactions: vec![pb::Transaction {
                transaction_id: "tx-export".into(),
                customer_id: c.customer_id.clone(),
                kind: pb::TransactionKind::Purchase as i32,
                amount: Some(Money { amount_minor: 4200, currency: "CNY".into() }),
                occurred_at: ts(1_760_000_000),
                ..Default::default()
            }],
            request_id: "t".into(),
        })
        .await
        .expect("tx");
    admin
        .update_consent(pb::UpdateConsentRequest {
            customer_id: c.customer_id.clone(),
            changes: vec![pb::ConsentGrant {
                channel: Channel::Email as i32,
                purpose: Purpose::Marketing as i32,
                granted: true,
                ..Default::default()
            }],
            request_id: "c".into(),
        })
        .await
        .expect("consent");
    let export = admin
        .export_customer_data(pb::ExportCustomerDataRequest {
            customer_id: c.customer_id.clone(),
            purpose: "access request #9".into(),
        })
        .await
        .expect("export")
        .into_inner();
    let record = export.customer.expect("customer");
    assert_eq!((record.phone.as_str(), record.masked), ("+8613900000051", false));
    assert_eq!(export.transactions.len(), 1);
    assert_eq!(export.consent_history.len(), 1);
    assert_eq!(export.timeline.len(), 2, "purchase and consent change");
    let audit = admin
        .list_access_audit(pb::ListAccessAuditRequest { customer_id: c.customer_id.clone(), ..Default::default() })
        .await
        .expect("audit")
        .into_inner();
    assert_eq!(audit.entries[0].method, "/crm.profiles.v1.ProfilesService/ExportCustomerData");
    let agent = app
        .client(&[Role::Agent], true)
        .export_customer_data(pb::ExportCustomerDataRequest { customer_id: c.customer_id, purpose: "x".into() })
        .await;
    assert_eq!(agent.expect_err("admins only").code(), Code::PermissionDenied);
}

#[tokio::test]
async fn prf9_concurrent_misses_of_a_hot_profile_load_it_once_and_entries_expire() {
    let app = common::start().await;
    let mut admin = app.admin();
    let c = create(&mut admin, person("Hot", "+8613900000052", "")).await;
    let before = app.counter("crm_profile_cache_loads_total");
    let reads = (0..50).map(|_| {
        let mut r = app.admin();
        let id = c.customer_id.clone();
        async move {
            r.get_customer(pb::GetCustomerRequest { customer_id: id, purpose: String::new() })
                .await
                .map(|r| r.into_inner().customer_id)
        }
    });
    let results = futures_util::future::join_all(reads).await;
    assert!(results.iter().all(|r| r.as_ref().is_ok_and(|id| *id == c.customer_id)));
    assert_eq!(
        app.counter("crm_profile_cache_loads_total") - before,
        1.0,
        "50 concurrent misses shared one database load"
    );
    let redis = redis::Client::open(crm_kit::testing::redis_url()).expect("redis");
    let mut conn = redis.get_multiplexed_async_connection().await.expect("redis");
    let ttl: i64 = redis::cmd("PTTL")
        .arg(format!("crm:profiles:customer:{}", c.customer_id))
        .query_async(&mut conn)
        .await
        .expect("pttl");
    assert!(ttl > 0 && ttl <= 60_000, "cached entries carry the TTL: {ttl} ms");
}

#[tokio::test]
async fn rel1_the_remaining_rpcs_name_bad_fields_too() {
    let app = common::start().await;
    let mut admin = app.admin();
    let a = create(&mut admin, person("Valid", "+8613900000053", "")).await;
    let before = (app.count("customers").await, app.count("kit_outbox").await, app.count("merges").await);
    let err = admin
        .merge_customers(pb::MergeCustomersRequest {
            survivor_id: a.customer_id.clone(),
            loser_id: "nope".into(),
            reason: String::new(),
            take_from_loser: Some(prost_types::FieldMask { paths: vec!["customer_id".into()] }),
            request_id: "m".into(),
        })
        .await
        .expect_err("merge");
    assert_eq!(bad_fields(&err), ["loser_id", "reason", "take_from_loser"]);
    let err = admin
        .unmerge_customer(pb::UnmergeCustomerRequest {
            merge_id: "x".into(),
            reason: "r".into(),
            request_id: "u".into(),
        })
        .await
        .expect_err("unmerge");
    assert_eq!(bad_fields(&err), ["merge_id"]);
    let missing = admin
        .unmerge_customer(pb::UnmergeCustomerRequest {
            merge_id: "00000000-0000-0000-0000-000000000009".into(),
            reason: "r".into(),
            request_id: "u2".into(),
        })
        .await
        .expect_err("unknown merge");
    assert_eq!(missing.code(), Code::NotFound);
    let err = admin
        .batch_record_interactions(pb::BatchRecordInteractionsRequest { interactions: vec![], request_id: "i".into() })
        .await
        .expect_err("empty");
    assert_eq!(bad_fields(&err), ["interactions"]);
    let err = admin
        .batch_get_customers(pb::BatchGetCustomersRequest { customer_ids: vec!["bad".into()], purpose: String::new() })
        .await
        .expect_err("batch get");
    assert_eq!(bad_fields(&err), ["customer_ids[0]"]);
    let err = admin
        .resolve_customer(pb::ResolveCustomerRequest { identity: None, purpose: String::new() })
        .await
        .expect_err("resolve");
    assert_eq!(bad_fields(&err), ["identity"]);
    let err = admin
        .resolve_customer(pb::ResolveCustomerRequest {
            identity: Some(pb::resolve_customer_request::Identity::Email("nope".into())),
            purpose: String::new(),
        })
        .await
        .expect_err("resolve email");
    assert_eq!(bad_fields(&err), ["email"]);
    let err = admin
        .list_access_audit(pb::ListAccessAuditRequest {
            customer_id: "bad".into(),
            page_token: "zz".into(),
            ..Default::default()
        })
        .await
        .expect_err("audit");
    assert_eq!(bad_fields(&err), ["customer_id", "page_token"]);
    let err = admin
        .list_consent_history(pb::ListConsentHistoryRequest {
            customer_id: a.customer_id.clone(),
            page_token: "zz".into(),
            ..Default::default()
        })
        .await
        .expect_err("history");
    assert_eq!(bad_fields(&err), ["page_token"]);
    let err =
        admin.get_erasure_status(pb::GetErasureStatusRequest { customer_id: String::new() }).await.expect_err("status");
    assert_eq!(bad_fields(&err), ["customer_id"]);
    let err = admin.get_consent(pb::GetConsentRequest { customer_id: "bad".into() }).await.expect_err("consent");
    assert_eq!(bad_fields(&err), ["customer_id"]);
    let err = admin
        .list_suspected_duplicates(pb::ListSuspectedDuplicatesRequest { page_token: "zz".into(), ..Default::default() })
        .await
        .expect_err("dups");
    assert_eq!(bad_fields(&err), ["page_token"]);
    let after = (app.count("customers").await, app.count("kit_outbox").await, app.count("merges").await);
    assert_eq!(before, after, "nothing stored changed");
}

#[tokio::test]
async fn prf3_concurrent_imports_of_the_same_customers_create_each_once() {
    let app = common::start().await;
    let generated: Vec<_> =
        crm_datagen::Generator::new(crm_datagen::Config { customers: 2500, seed: 5, ..Default::default() }).collect();
    let rows: Vec<pb::ImportRecordsRequest> = generated
        .iter()
        .map(|g| pb::ImportRecordsRequest {
            record: Some(pb::import_records_request::Record::Customer(g.customer.clone())),
            customer_ref: None,
        })
        .collect();
    let imports = (0..3).map(|_| {
        let mut c = app.admin();
        let rows = rows.clone();
        async move { c.import_records(tokio_stream::iter(rows)).await.map(|r| r.into_inner()) }
    });
    let results: Vec<_> =
        futures_util::future::join_all(imports).await.into_iter().map(|r| r.expect("import")).collect();
    assert_eq!(results.iter().map(|r| r.customers_created).sum::<i64>(), 2500);
    assert_eq!(results.iter().map(|r| r.customers_matched).sum::<i64>(), 5000);
    assert_eq!(app.count("customers").await, 2500);
}

#[tokio::test]
async fn prf9_when_redis_stops_reads_fall_back_and_when_it_returns_the_cache_resumes() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let spawn_redis = || {
        std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed")
    };
    let mut redis = spawn_redis();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let app = common::start_with(|c| c.redis_url = format!("redis://127.0.0.1:{port}")).await;
    let mut admin = app.admin();
    let c = create(&mut admin, person("Cached", "+8613900000070", "")).await;
    let get = || pb::GetCustomerRequest { customer_id: c.customer_id.clone(), purpose: String::new() };
    admin.get_customer(get()).await.expect("first read fills the cache");
    admin.get_customer(get()).await.expect("second read");
    let hits_before = app.counter("crm_profile_cache_lookups_total{service=\"profiles\",result=\"hit\"}");
    assert!(hits_before >= 1.0, "the cache served a hit");

    let _ = redis.kill();
    let _ = redis.wait();
    for _ in 0..5 {
        let read = admin.get_customer(get()).await.expect("reads answer while Redis is stopped").into_inner();
        assert_eq!(read.customer_id, c.customer_id);
    }

    let mut redis = spawn_redis();
    let mut resumed = false;
    for _ in 0..50 {
        admin.get_customer(get()).await.expect("read");
        if app.counter("crm_profile_cache_lookups_total{service=\"profiles\",result=\"hit\"}") > hits_before {
            resumed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = redis.kill();
    let _ = redis.wait();
    assert!(resumed, "the cache serves hits again once Redis is back");
}

fn customer_row(c: pb::Customer) -> pb::ImportRecordsRequest {
    pb::ImportRecordsRequest { record: Some(pb::import_records_request::Record::Customer(c)), customer_ref: None }
}

/// `n` new customers with phones and e-mails no other row uses.
fn filler(tag: &str, n: usize) -> Vec<pb::ImportRecordsRequest> {
    (0..n)
        .map(|i| customer_row(person(&format!("Filler {tag} {i}"), "", &format!("filler-{tag}-{i}@example.com"))))
        .collect()
}

#[tokio::test]
async fn prf3_import_chunks_written_side_by_side_both_fill_in_a_customer_they_match_by_different_keys() {
    // Chunks with no identity key in common are written at the same time;
    // here the first chunk matches X by phone and the second by e-mail, so
    // both fill X in, and the second must wait for the first, not fail.
    let app = common::start().await;
    let mut admin = app.admin();
    let x = create(&mut admin, person("Both Ways", "+86 139 0000 0900", "both@example.com")).await;
    let mut by_phone = person("Both Ways", "+86 139 0000 0900", "");
    by_phone.tags = vec!["from-a".into()];
    let mut by_email = person("Both Ways", "", "both@example.com");
    by_email.tags = vec!["from-b".into()];
    let mut rows = vec![customer_row(by_phone)];
    rows.extend(filler("a", 2499));
    rows.push(customer_row(by_email));
    rows.extend(filler("b", 2499));
    let response = admin.import_records(tokio_stream::iter(rows)).await.expect("import").into_inner();
    assert_eq!((response.customers_created, response.customers_matched, response.rejected), (4998, 2, 0));
    assert_eq!(app.count("customers").await, 4999);
    let after = admin
        .get_customer(pb::GetCustomerRequest { customer_id: x.customer_id.clone(), purpose: String::new() })
        .await
        .expect("get")
        .into_inner();
    let tags: HashSet<_> = after.tags.iter().map(String::as_str).collect();
    assert!(tags.contains("from-a") && tags.contains("from-b"), "both chunks filled X in: {tags:?}");
}

#[tokio::test]
async fn prf3_creates_during_an_import_of_the_same_customers_give_one_customer_each() {
    // The import holds the identity lock exclusively while its chunks are
    // open (several at a time), so a single create of an imported customer
    // lands wholly before or wholly after the chunk holding it. (Enough
    // connections that every create waits for the lock, not for the pool.)
    let app = common::start_with(|c| c.database_max_connections = 12).await;
    let generated: Vec<_> =
        crm_datagen::Generator::new(crm_datagen::Config { customers: 15_000, seed: 9, ..Default::default() })
            .map(|g| g.customer)
            .collect();
    let rows: Vec<_> = generated.iter().cloned().map(customer_row).collect();
    let mut importer = app.admin();
    let import = tokio::spawn(async move { importer.import_records(tokio_stream::iter(rows)).await });
    let creates = generated.iter().step_by(2000).cloned().enumerate().map(|(i, c)| {
        let mut client = app.admin();
        async move {
            tokio::time::sleep(Duration::from_millis(150 * i as u64)).await;
            client
                .create_customer(pb::CreateCustomerRequest { customer: Some(c), request_id: format!("during-{i}") })
                .await
                .map(|r| r.into_inner())
        }
    });
    let created = futures_util::future::join_all(creates).await;
    let response = import.await.expect("import task").expect("import").into_inner();
    let created: Vec<_> = created.into_iter().map(|r| r.expect("a create during the import answers")).collect();
    let by_create = created.iter().filter(|r| r.created).count() as i64;
    assert_eq!(response.customers_created + by_create, 15_000, "each customer created once");
    assert_eq!(response.customers_matched, by_create, "the import matched what the creates made first");
    assert_eq!(app.count("customers").await, 15_000);
}

#[tokio::test]
async fn prf3_a_cancelled_import_lets_go_of_the_identity_lock() {
    let app = common::start().await;
    let (send, receive) = tokio::sync::mpsc::channel(16);
    let mut importer = app.admin();
    let import =
        tokio::spawn(
            async move { importer.import_records(tokio_stream::wrappers::ReceiverStream::new(receive)).await },
        );
    for row in filler("cancelled", 7000) {
        send.send(row).await.expect("the import reads its stream");
    }
    // The first chunk is being written and the second half received: cancel.
    tokio::time::sleep(Duration::from_millis(100)).await;
    import.abort();
    drop(send);
    let mut admin = app.admin();
    let after = tokio::time::timeout(
        Duration::from_secs(20),
        create(&mut admin, person("After Cancel", "+86 139 0000 0901", "")),
    )
    .await
    .expect("a create after a cancelled import does not wait for ever");
    assert!(!after.customer_id.is_empty());
}

#[tokio::test]
async fn prf4_a_failing_chunk_ends_the_import_naming_the_row_it_stopped_at_and_a_rerun_completes_it() {
    // A database failure in the second chunk (rows 2 500 to 4 999): the
    // first chunk stays imported, the error says where the import stopped,
    // and once the cause is gone the same import completes it.
    let app = common::start().await;
    for statement in [
        "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
         IF NEW.name = 'Poison Row' THEN RAISE EXCEPTION 'poisoned' USING ERRCODE = '57014'; END IF; \
         RETURN NEW; END $$",
        "CREATE TRIGGER poison BEFORE INSERT ON customers FOR EACH ROW EXECUTE FUNCTION poison()",
    ] {
        sqlx::raw_sql(statement).execute(&app.pool).await.expect("poison trigger");
    }
    let mut rows = filler("a", 2500);
    rows.extend(filler("b", 100));
    rows.push(customer_row(person("Poison Row", "", "poison@example.com")));
    rows.extend(filler("c", 2399));
    rows.extend(filler("d", 2500));
    let mut admin = app.admin();
    let status = admin.import_records(tokio_stream::iter(rows.clone())).await.expect_err("the second chunk fails");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().starts_with("import stopped at row 2500: "), "{}", status.message());
    assert_eq!(app.count("customers").await, 2500, "the first chunk is imported, nothing after it");

    sqlx::raw_sql("DROP TRIGGER poison ON customers").execute(&app.pool).await.expect("drop trigger");
    let response = admin.import_records(tokio_stream::iter(rows)).await.expect("rerun").into_inner();
    assert_eq!((response.customers_created, response.customers_matched, response.rejected), (5000, 2500, 0));
    assert_eq!(app.count("customers").await, 7500);
}
