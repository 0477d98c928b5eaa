//! No event lost, none applied twice (REL-3, REL-7): the stream is trimmed
//! only below what every consumer group still needs; a stream that lost
//! entries is noticed and refilled from the outbox; a relay round that timed
//! out after Redis appended is not appended twice; an entry gone before it
//! was applied is a dead letter; a streams Redis that would evict keys is
//! refused. Redis faults use a private redis-server, never the shared one.

mod common;

use std::time::Duration;

use crm_kit::consumer::{Consumer, ConsumerSettings};
use crm_kit::db::Redis;
use crm_kit::outbox::{OutboxRelay, stream_name};
use crm_kit::testing::{self, PrivateRedis};

fn relay(run: &common::Running, redis_url: &str) -> OutboxRelay {
    let redis = Redis::connect(redis_url, Duration::from_millis(250)).expect("redis url");
    OutboxRelay::new(run.pool.clone(), redis, &run.config.service, run.metrics.clone())
}

fn consumer(run: &common::Running, redis_url: &str, group: &str, batch: usize) -> Consumer<common::EffectWriter> {
    let settings = ConsumerSettings {
        group: group.to_string(),
        name: format!("{group}-1"),
        streams: vec![stream_name("crm", &run.config.service)],
        batch_size: batch,
        block: Duration::from_millis(100),
        claim_idle: Duration::from_secs(60),
    };
    Consumer::new(run.pool.clone(), redis_url, settings, common::EffectWriter::default(), run.metrics.clone())
        .expect("consumer")
}

async fn notes(run: &common::Running, n: usize) {
    let mut client = common::client(&run.url, common::admin()).await;
    for _ in 0..n {
        client
            .record_note(common::pb::RecordNoteRequest { request_id: testing::unique_name("r"), note: "n".into() })
            .await
            .expect("note");
    }
}

async fn redis(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url).expect("url").get_multiplexed_async_connection().await.expect("redis")
}

async fn length(url: &str, stream: &str) -> usize {
    redis::cmd("XLEN").arg(stream).query_async(&mut redis(url).await).await.expect("xlen")
}

/// (rows, distinct events) of the effects table: equal when nothing was applied twice.
async fn effects(run: &common::Running) -> (i64, i64) {
    sqlx::query_as("SELECT count(*), count(DISTINCT event_id) FROM effects")
        .fetch_one(&run.pool)
        .await
        .expect("effects")
}

async fn drain(c: &mut Consumer<common::EffectWriter>) {
    while c.poll_once().await.expect("round") > 0 {}
}

/// The relay's loss check, retried while its connection to a restarted Redis reconnects.
async fn repaired(relay: &OutboxRelay) -> u64 {
    for _ in 0..50 {
        if let Ok(Some(n)) = relay.repair().await {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the loss check never succeeded");
}

fn counter(run: &common::Running, name: &str) -> f64 {
    run.metrics
        .render()
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn rel7_the_stream_is_trimmed_only_below_what_every_group_still_needs() {
    let run = common::start(common::test_config().await).await;
    let url = testing::redis_url();
    let stream = stream_name("crm", &run.config.service);
    let relay = relay(&run, &url);
    notes(&run, 30).await;
    assert_eq!(relay.publish_once().await.expect("publish"), 30);
    assert_eq!(relay.trim().await.expect("trim"), 0, "no group reads it yet: nothing is trimmed");

    let mut fast = consumer(&run, &url, &testing::unique_name("fast"), 10);
    let mut slow = consumer(&run, &url, &testing::unique_name("slow"), 100);
    assert_eq!(fast.poll_once().await.expect("fast"), 10);
    // The slow group exists but has read nothing: everything stays for it.
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg(testing::unique_name("idle"))
        .arg("0")
        .query_async(&mut redis(&url).await)
        .await
        .expect("group");
    assert_eq!(relay.trim().await.expect("trim"), 0);
    assert_eq!(length(&url, &stream).await, 30);

    // A group that read entries but has not acknowledged them keeps them too.
    drain(&mut slow).await;
    let stuck = testing::unique_name("stuck");
    let mut conn = redis(&url).await;
    let _: () =
        redis::cmd("XGROUP").arg("CREATE").arg(&stream).arg(&stuck).arg("0").query_async(&mut conn).await.expect("g");
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(&stuck)
        .arg("c")
        .arg("COUNT")
        .arg(5)
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(&mut conn)
        .await
        .expect("read without ack");
    let groups: Vec<redis::Value> =
        redis::cmd("XINFO").arg("GROUPS").arg(&stream).query_async(&mut conn).await.expect("info");
    assert_eq!(groups.len(), 4);
    // The idle group still needs everything.
    assert_eq!(relay.trim().await.expect("trim"), 0);
    let idle: Vec<String> = {
        let reply: redis::streams::StreamInfoGroupsReply =
            redis::cmd("XINFO").arg("GROUPS").arg(&stream).query_async(&mut conn).await.expect("info");
        reply.groups.into_iter().filter(|g| g.name.starts_with("idle")).map(|g| g.name).collect()
    };
    for g in idle {
        let _: () = redis::cmd("XGROUP").arg("DESTROY").arg(&stream).arg(g).query_async(&mut conn).await.expect("drop");
    }
    // Now: fast needs from the 11th, stuck from the 1st (pending), slow nothing.
    assert_eq!(relay.trim().await.expect("trim"), 0, "the stuck group's pending entries stay");
    let _: () =
        redis::cmd("XGROUP").arg("DESTROY").arg(&stream).arg(&stuck).query_async(&mut conn).await.expect("drop");
    assert_eq!(relay.trim().await.expect("trim"), 10, "what the fast and the slow group are past goes");
    assert_eq!(length(&url, &stream).await, 20);
    drain(&mut fast).await;
    assert_eq!(relay.trim().await.expect("trim"), 20);
    assert_eq!(effects(&run).await, (60, 30), "both groups applied all 30");
    run.shutdown.trigger();
}

#[tokio::test]
async fn rel3_a_stream_that_lost_entries_is_refilled_from_the_outbox_and_applied_once() {
    let run = common::start(common::test_config().await).await;
    let mut private = PrivateRedis::start(&[]).await;
    let stream = stream_name("crm", &run.config.service);
    let relay = relay(&run, &private.url);
    let group = testing::unique_name("reader");
    notes(&run, 5).await;
    assert_eq!(relay.publish_once().await.expect("publish"), 5);
    drain(&mut consumer(&run, &private.url, &group, 100)).await;
    notes(&run, 5).await;
    assert_eq!(relay.publish_once().await.expect("publish"), 5);
    assert_eq!(relay.repair().await.expect("check"), Some(0), "nothing lost yet");

    // Redis restarts without persistence between publish and consume.
    private.restart().await;
    assert_eq!(repaired(&relay).await, 10, "every retained event is published again");
    assert_eq!(relay.publish_once().await.expect("publish"), 10);
    drain(&mut consumer(&run, &private.url, &group, 100)).await;
    assert_eq!(
        effects(&run).await,
        (10, 10),
        "the five consumed before are not applied twice, the five lost are applied"
    );

    // A failover to a replica that lagged: the last entries are missing, the stream is not empty.
    notes(&run, 3).await;
    assert_eq!(relay.publish_once().await.expect("publish"), 3);
    let mut conn = redis(&private.url).await;
    let tail: redis::streams::StreamRangeReply = redis::cmd("XREVRANGE")
        .arg(&stream)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(4)
        .query_async(&mut conn)
        .await
        .expect("tail");
    let (lost, kept) = tail.ids.split_at(3);
    for e in lost {
        let _: () = redis::cmd("XDEL").arg(&stream).arg(&e.id).query_async(&mut conn).await.expect("xdel");
    }
    let _: () = redis::cmd("XSETID").arg(&stream).arg(&kept[0].id).query_async(&mut conn).await.expect("xsetid");
    assert_eq!(repaired(&relay).await, 3, "only what the replica lacked");
    assert_eq!(relay.publish_once().await.expect("publish"), 3);
    drain(&mut consumer(&run, &private.url, &group, 100)).await;
    assert_eq!(effects(&run).await, (13, 13));
    assert_eq!(counter(&run, "crm_stream_losses_total"), 2.0);
    assert_eq!(counter(&run, "crm_outbox_republished_total"), 13.0);
    run.shutdown.trigger();
}

/// REL-3: under load the relay appends again within milliseconds of a
/// restart; the stream it makes anew must not hide what the old one lost.
#[tokio::test]
async fn rel3_a_stream_restarted_empty_and_written_at_once_still_gets_back_what_it_lost() {
    let run = common::start(common::test_config().await).await;
    let mut private = PrivateRedis::start(&[]).await;
    let relay = relay(&run, &private.url);
    let group = testing::unique_name("reader");
    notes(&run, 5).await;
    assert_eq!(relay.publish_once().await.expect("publish"), 5);
    private.restart().await;
    // New events, published before any periodic check could run.
    notes(&run, 3).await;
    let mut published = 0;
    for _ in 0..50 {
        match relay.publish_once().await {
            Ok(n) if n > 0 => published += n,
            Ok(_) if published > 0 => break,
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert_eq!(published, 8, "the five the restart lost go out again, before the three new ones");
    assert_eq!(relay.repair().await.expect("check"), Some(0), "nothing left to refill");
    drain(&mut consumer(&run, &private.url, &group, 100)).await;
    assert_eq!(effects(&run).await, (8, 8));
    assert_eq!(counter(&run, "crm_stream_losses_total"), 1.0);
    run.shutdown.trigger();
}

#[tokio::test]
async fn rel3_a_round_that_timed_out_after_redis_appended_is_not_appended_twice() {
    let run = common::start(common::test_config().await).await;
    let private = PrivateRedis::start(&["--enable-debug-command", "yes"]).await;
    let stream = stream_name("crm", &run.config.service);
    let relay = relay(&run, &private.url);
    // A first round opens the relay's connection.
    notes(&run, 1).await;
    assert_eq!(relay.publish_once().await.expect("publish"), 1);
    notes(&run, 5).await;
    // Redis stalls for a second: the relay gives up after 250 ms, Redis appends afterwards.
    let url = private.url.clone();
    let started = tokio::time::Instant::now();
    tokio::spawn(async move {
        // The client may give up waiting; Redis sleeps all the same.
        let _: Result<(), _> = redis::cmd("DEBUG").arg("SLEEP").arg("1").query_async(&mut redis(&url).await).await;
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(relay.publish_once().await.is_err(), "the round times out");
    tokio::time::sleep_until(started + Duration::from_millis(1300)).await;
    assert_eq!(length(&private.url, &stream).await, 6, "Redis appended the batch all the same");
    assert_eq!(relay.publish_once().await.expect("retry"), 5, "the retry records them");
    assert_eq!(length(&private.url, &stream).await, 6, "without appending them twice");
    assert_eq!(counter(&run, "crm_outbox_duplicates_avoided_total"), 5.0);
    run.shutdown.trigger();
}

#[tokio::test]
async fn rel7_an_entry_gone_before_it_was_applied_is_a_dead_letter_never_a_silent_ack() {
    let run = common::start(common::test_config().await).await;
    let url = testing::redis_url();
    let stream = stream_name("crm", &run.config.service);
    notes(&run, 3).await;
    relay(&run, &url).publish_once().await.expect("publish");
    let group = testing::unique_name("g");
    let mut conn = redis(&url).await;
    let _: () =
        redis::cmd("XGROUP").arg("CREATE").arg(&stream).arg(&group).arg("0").query_async(&mut conn).await.expect("g");
    // Its consumer reads the three and dies before applying them; one entry is deleted meanwhile.
    let read: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(&group)
        .arg(format!("{group}-1"))
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(&mut conn)
        .await
        .expect("read");
    let second = read.keys[0].ids[1].id.clone();
    let _: () = redis::cmd("XDEL").arg(&stream).arg(&second).query_async(&mut conn).await.expect("xdel");
    drain(&mut consumer(&run, &url, &group, 100)).await;
    assert_eq!(effects(&run).await, (2, 2));
    let dead: Vec<(String, String)> =
        sqlx::query_as("SELECT stream_id, error FROM kit_dead_events WHERE consumer = $1")
            .bind(&group)
            .fetch_all(&run.pool)
            .await
            .expect("dead letters");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].0, second);
    assert!(dead[0].1.starts_with("lost"), "{}", dead[0].1);
    assert!(run.metrics.render().contains("outcome=\"lost\""), "counted as lost");
    run.shutdown.trigger();
}

#[tokio::test]
async fn rel3_a_streams_redis_that_evicts_keys_is_refused_at_start_and_a_cache_one_is_not() {
    let evicting = PrivateRedis::start(&["--maxmemory-policy", "allkeys-lru"]).await;
    let mut config = common::test_config().await;
    config.redis_streams_url = evicting.url.clone();
    let refused = crm_kit::Kit::start(common::spec("probe_refused"), config).await;
    match refused {
        Err(crm_kit::KitError::Config(e)) => {
            assert_eq!(e.var, "REDIS_STREAMS_URL");
            assert!(e.to_string().contains("allkeys-lru"), "{e}");
        }
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(_) => panic!("a streams Redis with allkeys-lru was accepted"),
    }
    let mut config = common::test_config().await;
    config.redis_url = evicting.url.clone();
    assert!(crm_kit::Kit::start(common::spec("probe_cache"), config).await.is_ok(), "the cache may evict");
}

#[tokio::test]
async fn rel3_replay_publishes_again_what_was_written_since_and_consumers_skip_what_they_have() {
    let run = common::start(common::test_config().await).await;
    let url = testing::redis_url();
    let relay = relay(&run, &url);
    let group = testing::unique_name("replayed");
    notes(&run, 4).await;
    relay.publish_once().await.expect("publish");
    drain(&mut consumer(&run, &url, &group, 100)).await;
    let since = chrono::Utc::now() - chrono::Duration::hours(1);
    assert_eq!(crm_kit::outbox::replay(&run.pool, since).await.expect("replay"), 4);
    assert_eq!(relay.publish_once().await.expect("publish"), 4);
    drain(&mut consumer(&run, &url, &group, 100)).await;
    assert_eq!(effects(&run).await, (4, 4), "replayed events are recognised");
    run.shutdown.trigger();
}
