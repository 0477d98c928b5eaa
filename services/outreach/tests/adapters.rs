//! OUT-1 channel adapters against local servers: the webhook against an
//! HTTP server that verifies the signature (retries on 5xx, none on 4xx,
//! dead letters and RetryMessage), the SMTP adapter against an SMTP sink.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use crm_outreach::delivery::{Adapter, Deliverer, Webhook};
use uuid::Uuid;

const SECRET: &[u8] = b"test-webhook-secret-0123";

#[derive(Default)]
struct Receiver {
    /// Calls per idempotency key.
    calls: HashMap<String, usize>,
    /// Bodies accepted, by key.
    accepted: HashMap<String, serde_json::Value>,
    /// Signatures that did not verify.
    bad_signatures: usize,
}

/// A provider: verifies `X-CRM-Signature`, fails the first call of customers
/// whose body says "flaky" with 503 and always refuses "invalid" with 400.
async fn provider() -> (String, Arc<Mutex<Receiver>>) {
    let state = Arc::new(Mutex::new(Receiver::default()));
    let shared = state.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let state = shared.clone();
            async move {
                let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
                let signature = headers.get("x-crm-signature").and_then(|v| v.to_str().ok()).unwrap_or_default();
                let t: i64 = signature
                    .split(',')
                    .next()
                    .and_then(|p| p.strip_prefix("t="))
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(0);
                let mut s = state.lock().unwrap();
                if signature != Webhook::signature(SECRET, t, &body) || (chrono::Utc::now().timestamp() - t).abs() > 300
                {
                    s.bad_signatures += 1;
                    return StatusCode::UNAUTHORIZED;
                }
                let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                let text = json["body"].as_str().unwrap_or_default().to_string();
                let calls = {
                    let c = s.calls.entry(key.clone()).or_default();
                    *c += 1;
                    *c
                };
                if text.contains("invalid") {
                    return StatusCode::BAD_REQUEST;
                }
                if text.contains("flaky") && calls == 1 {
                    return StatusCode::SERVICE_UNAVAILABLE;
                }
                s.accepted.insert(key, json);
                StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, state)
}

async fn queue(pool: &sqlx::PgPool, offer_code: &str) -> Uuid {
    let id = Uuid::now_v7();
    let template = Uuid::now_v7();
    let t = crm_proto::outreach::v1::Template {
        display_name: "t".into(),
        channel: 1,
        purpose: 2,
        bodies: vec![crm_proto::outreach::v1::TemplateBody {
            locale: "en".into(),
            subject: String::new(),
            body: "code {{offer_code}}".into(),
        }],
        ..Default::default()
    };
    sqlx::query("INSERT INTO templates (template_id, display_name, channel, content_type, purpose, bodies) VALUES ($1, 't', 1, 4, 2, $2)")
        .bind(template)
        .bind(prost::Message::encode_to_vec(&t))
        .execute(pool)
        .await
        .expect("template");
    sqlx::query(
        "INSERT INTO messages (message_id, customer_id, channel, template_id, purpose, state, due_at, expires_at, locale, variables) \
         VALUES ($1, $2, 1, $3, 2, 2, now(), now() + interval '1 day', 'en', jsonb_build_object('offer_code', $4::text))",
    )
    .bind(id)
    .bind(Uuid::now_v7())
    .bind(template)
    .bind(offer_code)
    .execute(pool)
    .await
    .expect("message");
    sqlx::query("INSERT INTO channels (channel, cost_minor, adapter) VALUES (1, 20, 'webhook') ON CONFLICT (channel) DO UPDATE SET adapter = 'webhook'")
        .execute(pool)
        .await
        .expect("channel");
    id
}

async fn state_of(pool: &sqlx::PgPool, id: Uuid) -> (i16, i32, String) {
    sqlx::query_as("SELECT state, attempts, last_error FROM messages WHERE message_id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .expect("message")
}

#[tokio::test]
async fn the_webhook_signs_retries_5xx_and_dead_letters_4xx() {
    let (url, receiver) = provider().await;
    let config = crm_kit::testing::config("outreach").await;
    let kit = crm_kit::Kit::start(crm_outreach::SPEC, config).await.expect("kit");
    let pool = kit.pg.clone();
    let ok = queue(&pool, "OK-1").await;
    let flaky = queue(&pool, "flaky").await;
    let invalid = queue(&pool, "invalid").await;
    let webhook: Arc<dyn Adapter> =
        Arc::new(Webhook::new(url.parse().expect("uri"), SECRET.to_vec(), Duration::from_secs(2)));
    let deliverer = Deliverer {
        pool: pool.clone(),
        adapters: [("webhook".to_string(), webhook)].into_iter().collect(),
        lease: Duration::from_secs(30),
        max_attempts: 5,
        backoff: Duration::from_millis(200),
        directory: None,
        consent: None,
        complaints: None,
    };
    assert_eq!(deliverer.deliver_due(10).await.expect("round 1"), 3);
    assert_eq!(state_of(&pool, ok).await.0, 3, "delivered");
    let (st, attempts, error) = state_of(&pool, flaky).await;
    assert_eq!((st, attempts), (1, 1), "a 503 goes back to the policy for a later retry");
    assert!(error.contains("503"), "{error}");
    let (st, attempts, error) = state_of(&pool, invalid).await;
    assert_eq!((st, attempts), (6, 1), "a 400 is not retried: dead letter at once");
    assert!(error.contains("400"), "{error}");

    let due: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT due_at FROM messages WHERE message_id = $1")
        .bind(flaky)
        .fetch_one(&pool)
        .await
        .expect("due");
    assert!(due > chrono::Utc::now(), "retried after the backoff");
    // The policy approves it again (as the dispatcher would); the retry carries the same key.
    assert_eq!(deliverer.deliver_due(10).await.expect("round 2"), 0);
    sqlx::query("UPDATE messages SET state = 2, due_at = now() WHERE message_id = $1")
        .bind(flaky)
        .execute(&pool)
        .await
        .expect("approve");
    assert_eq!(deliverer.deliver_due(10).await.expect("round 3"), 1);
    assert_eq!(state_of(&pool, flaky).await.0, 3);
    {
        let r = receiver.lock().unwrap();
        assert_eq!(r.bad_signatures, 0);
        assert_eq!(r.calls.get(&flaky.to_string()), Some(&2));
        assert_eq!(r.calls.get(&invalid.to_string()), Some(&1));
        let body = &r.accepted[&ok.to_string()];
        assert_eq!(body["body"], "code OK-1");
        assert_eq!(body["channel"], "CHANNEL_SMS");
        assert_eq!(body["idempotency_key"], ok.to_string());
    }

    // A wrong secret is refused by the provider: 401 is permanent too.
    let forged: Arc<dyn Adapter> =
        Arc::new(Webhook::new(url.parse().expect("uri"), b"another-secret-000000".to_vec(), Duration::from_secs(2)));
    let forged_id = queue(&pool, "forged").await;
    let d = Deliverer { adapters: [("webhook".to_string(), forged)].into_iter().collect(), ..deliverer.clone() };
    d.deliver_due(10).await.expect("forged round");
    assert_eq!(state_of(&pool, forged_id).await.0, 6);
    assert_eq!(receiver.lock().unwrap().bad_signatures, 1);
    kit.shutdown_handle().trigger();
}

#[tokio::test]
async fn an_unreachable_webhook_is_retried_with_backoff_until_the_dead_letter() {
    let config = crm_kit::testing::config("outreach").await;
    let kit = crm_kit::Kit::start(crm_outreach::SPEC, config).await.expect("kit");
    let pool = kit.pg.clone();
    let id = queue(&pool, "x").await;
    // A closed port: connection refused is transient.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
    let url = format!("http://{closed}/hook");
    let webhook: Arc<dyn Adapter> =
        Arc::new(Webhook::new(url.parse().expect("uri"), SECRET.to_vec(), Duration::from_millis(500)));
    let deliverer = Deliverer {
        pool: pool.clone(),
        adapters: [("webhook".to_string(), webhook)].into_iter().collect(),
        lease: Duration::from_secs(30),
        max_attempts: 3,
        backoff: Duration::from_millis(1),
        directory: None,
        consent: None,
        complaints: None,
    };
    for _ in 0..3 {
        // Each retry is approved by the policy again (as the dispatcher would).
        sqlx::query("UPDATE messages SET state = 2, due_at = now()").execute(&pool).await.expect("due");
        deliverer.deliver_due(10).await.expect("round");
    }
    let (st, attempts, error) = state_of(&pool, id).await;
    assert_eq!((st, attempts), (6, 3), "{error}");
    assert!(error.contains("unreachable"), "{error}");
    kit.shutdown_handle().trigger();
}

/// One received mail.
#[derive(Debug, Clone, Default)]
struct Mail {
    from: String,
    to: String,
    data: String,
}

/// A local SMTP sink: records mail; answers RCPT TO for "full@..." with 452
/// (mailbox full: retry later) and for "nobody@..." with 550 (no such user).
async fn smtp_sink() -> (String, Arc<Mutex<Vec<Mail>>>) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mails = Arc::new(Mutex::new(Vec::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let store = mails.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let store = store.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                let mut mail = Mail::default();
                let _ = write.write_all(b"220 sink ESMTP\r\n").await;
                while let Ok(Some(line)) = lines.next_line().await {
                    let reply: &[u8] = if line.starts_with("EHLO") {
                        b"250-sink\r\n250 8BITMIME\r\n"
                    } else if let Some(from) = line.strip_prefix("MAIL FROM:") {
                        mail.from = from.trim_matches(['<', '>']).to_string();
                        b"250 ok\r\n"
                    } else if let Some(to) = line.strip_prefix("RCPT TO:") {
                        mail.to = to.trim_matches(['<', '>']).to_string();
                        if mail.to.starts_with("full@") {
                            b"452 mailbox full\r\n"
                        } else if mail.to.starts_with("nobody@") {
                            b"550 no such user\r\n"
                        } else {
                            b"250 ok\r\n"
                        }
                    } else if line == "DATA" {
                        let _ = write.write_all(b"354 go ahead\r\n").await;
                        while let Ok(Some(l)) = lines.next_line().await {
                            if l == "." {
                                break;
                            }
                            mail.data.push_str(&l);
                            mail.data.push('\n');
                        }
                        store.lock().unwrap().push(mail.clone());
                        b"250 queued\r\n"
                    } else if line == "QUIT" {
                        let _ = write.write_all(b"221 bye\r\n").await;
                        return;
                    } else {
                        b"500 what?\r\n"
                    };
                    let _ = write.write_all(reply).await;
                }
            });
        }
    });
    (addr, mails)
}

/// Contact points known to the test (the real directory is profiles).
struct Known(HashMap<Uuid, crm_outreach::directory::ContactPoints>);

impl crm_outreach::directory::Directory for Known {
    fn lookup<'a>(&'a self, ids: &'a [Uuid]) -> crm_outreach::directory::Lookup<'a> {
        Box::pin(async move { Ok(ids.iter().filter_map(|id| self.0.get(id).map(|c| (*id, c.clone()))).collect()) })
    }
}

#[tokio::test]
async fn the_smtp_adapter_delivers_to_a_local_sink_and_sorts_failures() {
    use base64::Engine;
    let (relay, mails) = smtp_sink().await;
    let config = crm_kit::testing::config("outreach").await;
    let kit = crm_kit::Kit::start(crm_outreach::SPEC, config).await.expect("kit");
    let pool = kit.pg.clone();
    crm_outreach::templates::seed(&pool).await.expect("seed");
    sqlx::query("INSERT INTO channels (channel, cost_minor, adapter) VALUES (2, 1, 'smtp')")
        .execute(&pool)
        .await
        .expect("channel");
    // Three feedback acknowledgements by e-mail: a good address, a full mailbox, an unknown user.
    let mut known = HashMap::new();
    let mut ids = Vec::new();
    for (name, email) in
        [("王小明", "wang@example.com"), ("Full Box", "full@example.com"), ("No Body", "nobody@example.com")]
    {
        let customer = Uuid::now_v7();
        known.insert(
            customer,
            crm_outreach::directory::ContactPoints { name: name.into(), phone: String::new(), email: email.into() },
        );
        let id = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO messages (message_id, customer_id, channel, template_id, purpose, state, due_at, expires_at, locale, variables) \
             VALUES ($1, $2, 2, $3, 1, 2, now(), now() + interval '1 day', 'zh-CN', '{\"feedback_id\": \"FB-42\"}')",
        )
        .bind(id)
        .bind(customer)
        .bind(crm_outreach::api::ACK_TEMPLATE)
        .execute(&pool)
        .await
        .expect("message");
        ids.push(id);
    }
    let smtp = crm_outreach::smtp::Smtp { relay, from: "crm@shop.example".into(), timeout: Duration::from_secs(5) };
    let deliverer = Deliverer {
        pool: pool.clone(),
        adapters: [("smtp".to_string(), Arc::new(smtp) as Arc<dyn Adapter>)].into_iter().collect(),
        lease: Duration::from_secs(30),
        max_attempts: 5,
        backoff: Duration::from_secs(60),
        directory: Some(Arc::new(Known(known))),
        consent: None,
        complaints: None,
    };
    assert_eq!(deliverer.deliver_due(10).await.expect("deliver"), 3);
    assert_eq!(state_of(&pool, ids[0]).await.0, 3, "sent");
    let (st, _, error) = state_of(&pool, ids[1]).await;
    assert_eq!(st, 1, "452 is temporary: back to the policy for a later retry ({error})");
    let (st, _, error) = state_of(&pool, ids[2]).await;
    assert_eq!(st, 6, "550 is permanent: dead letter ({error})");

    let mails = mails.lock().unwrap().clone();
    assert_eq!(mails.len(), 1);
    let mail = &mails[0];
    assert_eq!((mail.from.as_str(), mail.to.as_str()), ("crm@shop.example", "wang@example.com"));
    assert!(mail.data.contains(&format!("Message-ID: <{}@crm-outreach>", ids[0])), "{}", mail.data);
    let subject = base64::engine::general_purpose::STANDARD.encode("我们已收到您的反馈".as_bytes());
    assert!(mail.data.contains(&format!("Subject: =?UTF-8?B?{subject}?=")), "{}", mail.data);
    let body_b64: String = mail.data.split("\n\n").nth(1).unwrap_or_default().lines().collect();
    let body =
        String::from_utf8(base64::engine::general_purpose::STANDARD.decode(body_b64).expect("base64")).expect("utf8");
    assert_eq!(body, "王小明，您好！我们已收到您的反馈（编号 FB-42），将尽快处理。");
    kit.shutdown_handle().trigger();
}
