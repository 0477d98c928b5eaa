//! `make bench`: each figure is reported with a raw baseline measured in the
//! same run on the same machine, and as a ratio to it.
//!
//! profiles (issue 3):
//! - GetCustomer on a cached profile vs a bare Redis GET of the same key, both
//!   closed-loop at concurrency 64 (the GET over one pipelined connection, and
//!   with a connection per worker); GetCustomer with the cache off;
//! - GetCustomer and the bare GET open-loop at a steady 5 000 requests/s
//!   (latency counted from the scheduled send time, so queueing in the load
//!   tool is not hidden; the load tool's own delay is reported beside it);
//! - bulk import of generated customers vs PostgreSQL COPY of the same rows.
//!
//! segmentation (issue 4): full recompute vs the bare aggregate query;
//! freshness of the incremental recompute at a steady event rate.
//!
//! outreach (issue 5): a campaign through the sink with every policy check on,
//! two replicas, vs a bare INSERT of the delivery log, and a policy checker.
//!
//! feedback (issue 6): classification quality, the classifier vs bare word
//! segmentation, and intake open-loop vs a bare INSERT at the same rate.
//!
//! Usage: crm-bench [--customers N] [--seconds S] [--reads-only | --import-only]
//!        crm-bench --outreach N | --recompute N [--rate R --seconds S] | --consume N | --feedback RATE
//!        crm-bench --analytics INGEST_CUSTOMERS KPI_CUSTOMERS

mod analytics;
mod feedback;
mod outreach;
mod segmentation;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crm_kit::Role;
use crm_proto::profiles::v1 as pb;
use crm_proto::profiles::v1::profiles_service_client::ProfilesServiceClient;
use crm_proto::profiles::v1::profiles_service_server::ProfilesServiceServer;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Client = ProfilesServiceClient<InterceptedService<Channel, Bearer>>;

#[derive(Clone)]
struct Bearer(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

struct Stats {
    ops: usize,
    errors: usize,
    seconds: f64,
    p50_us: u64,
    p99_us: u64,
    /// Open loop only: p99 of the load tool's own delay, from a request's
    /// scheduled send time to the first poll of its task.
    lag_p99_us: u64,
}

impl Stats {
    fn from(mut latencies: Vec<u64>, errors: usize, seconds: f64) -> Self {
        latencies.sort_unstable();
        let pick = |q: f64| {
            latencies
                .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0)
        };
        Stats { ops: latencies.len(), errors, seconds, p50_us: pick(0.50), p99_us: pick(0.99), lag_p99_us: 0 }
    }
    fn with_lag(mut self, mut lags: Vec<u64>) -> Self {
        lags.sort_unstable();
        self.lag_p99_us = lags.get(lags.len() * 99 / 100).copied().unwrap_or(0);
        self
    }
    fn rate(&self) -> f64 {
        self.ops as f64 / self.seconds
    }
}

async fn start_profiles(cache: bool) -> (String, crm_kit::lifecycle::Shutdown, sqlx::PgPool) {
    let mut config = crm_kit::testing::config("profiles").await;
    config.max_concurrent_requests = 10_000;
    config.database_max_connections = 16;
    // The COPY baseline of a million rows runs longer than the service's statement timeout.
    config.database_statement_timeout = Duration::ZERO;
    config.max_message_bytes = 64 << 20;
    let kit = crm_kit::Kit::start(crm_profiles::SPEC, config).await.expect("kit");
    let (api, _) = crm_profiles::build(
        &kit,
        &crm_profiles::ProfilesConfig { cache_enabled: cache, cache_ttl: Duration::from_secs(3600) },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let shutdown = kit.shutdown_handle();
    let pool = kit.pg.clone();
    let routes = tonic::service::Routes::new(ProfilesServiceServer::new(api).max_decoding_message_size(64 << 20));
    tokio::spawn(kit.serve_on(listener, routes, crm_profiles::access_policy()));
    (url, shutdown, pool)
}

fn clients(url: &str, n: usize) -> Vec<Client> {
    let token = crm_kit::testing::token(&[Role::Admin, Role::Service], false);
    let value: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().expect("ascii");
    (0..n)
        .map(|_| {
            ProfilesServiceClient::with_interceptor(
                crm_kit::client::channel(url).expect("channel"),
                Bearer(value.clone()),
            )
        })
        .collect()
}

async fn seed(client: &mut Client, n: usize) -> Vec<String> {
    let generated: Vec<_> =
        crm_datagen::Generator::new(crm_datagen::Config { customers: n, seed: 7, ..Default::default() }).collect();
    let rows: Vec<pb::ImportRecordsRequest> = generated
        .iter()
        .map(|g| pb::ImportRecordsRequest {
            record: Some(pb::import_records_request::Record::Customer(g.customer.clone())),
            customer_ref: None,
        })
        .collect();
    client.import_records(tokio_stream::iter(rows)).await.expect("seed import");
    let mut ids = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_customers(pb::ListCustomersRequest { page_size: 1000, page_token: token, ..Default::default() })
            .await
            .expect("list")
            .into_inner();
        ids.extend(page.customers.into_iter().map(|c| c.customer_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    ids
}

/// Closed loop: `concurrency` workers each issue the next request when the last returns.
async fn closed_loop<F, Fut>(concurrency: usize, duration: Duration, op: F) -> Stats
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let op = Arc::new(op);
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|w| {
            let op = op.clone();
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(100_000);
                let mut errors = 0;
                let mut i = w;
                while started.elapsed() < duration {
                    let t = Instant::now();
                    if op(w, i).await {
                        lat.push(t.elapsed().as_micros() as u64);
                    } else {
                        errors += 1;
                    }
                    i += concurrency;
                }
                (lat, errors)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.expect("worker");
        all.extend(l);
        errors += e;
    }
    Stats::from(all, errors, started.elapsed().as_secs_f64())
}

/// [`open_loop`] after a warm-up of `warmup` at the same rate that is not
/// measured (connection pools, HTTP/2 channels and caches fill up first).
async fn open_loop_warm<F, Fut>(rate: u64, warmup: Duration, duration: Duration, op: F) -> Stats
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    let op = Arc::new(op);
    let warm = op.clone();
    // Warm-up requests use indices past the measured ones, so they never repeat a measured request.
    open_loop(rate, warmup, move |i| warm(usize::MAX / 2 + i)).await;
    open_loop(rate, duration, move |i| op(i)).await
}

/// Open loop: requests are released at a fixed rate whatever the latency, by
/// a pacing thread with sub-millisecond precision (tokio's timer ticks in
/// whole milliseconds, which would release bursts); each latency counts from
/// its scheduled time.
async fn open_loop<F, Fut>(rate: u64, duration: Duration, op: F) -> Stats
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    let op = Arc::new(op);
    let total = (rate as f64 * duration.as_secs_f64()) as usize;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let handle = tokio::runtime::Handle::current();
    let pacer = std::thread::spawn(move || {
        let start = Instant::now();
        let mut handles = Vec::with_capacity(total);
        for i in 0..total {
            let due = start + interval * i as u32;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            let op = op.clone();
            handles.push(handle.spawn(async move {
                let lag = due.elapsed().as_micros() as u64;
                let ok = op(i).await;
                (ok, due.elapsed().as_micros() as u64, lag)
            }));
        }
        (handles, start)
    });
    let (handles, start) =
        tokio::task::spawn_blocking(move || pacer.join().expect("pacer")).await.expect("pacer thread");
    let mut lat = Vec::with_capacity(total);
    let mut lags = Vec::with_capacity(total);
    let mut errors = 0;
    for h in handles {
        let (ok, l, lag) = h.await.expect("request");
        lags.push(lag);
        if ok {
            lat.push(l);
        } else {
            errors += 1;
        }
    }
    Stats::from(lat, errors, start.elapsed().as_secs_f64()).with_lag(lags)
}

fn row(name: &str, s: &Stats, baseline: Option<&Stats>) -> String {
    let ratio = baseline.map(|b| format!("{:.0} %", 100.0 * s.rate() / b.rate())).unwrap_or_else(|| "baseline".into());
    format!(
        "| {name} | {:.0} | {:.2} | {:.2} | {} | {ratio} |",
        s.rate(),
        s.p50_us as f64 / 1000.0,
        s.p99_us as f64 / 1000.0,
        s.errors
    )
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_string() }
}

/// Single creates, one every 50 ms until `stop` is set (or `count` are done):
/// what a create waits while an import holds the identity lock, and without.
async fn paced_creates(
    mut client: Client,
    tag: &'static str,
    first_phone: usize,
    count: Option<usize>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> (Vec<u64>, usize) {
    let mut latencies = Vec::new();
    let mut errors = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    for i in 0.. {
        if count.is_some_and(|n| i >= n) || stop.load(std::sync::atomic::Ordering::Relaxed) {
            break;
        }
        tick.tick().await;
        let customer = pb::Customer {
            name: format!("Create {tag} {i}"),
            phone: format!("+86 137 {:08}", first_phone + i),
            region: "CN-SH".into(),
            ..Default::default()
        };
        let started = Instant::now();
        let ok = client
            .create_customer(pb::CreateCustomerRequest {
                customer: Some(customer),
                request_id: format!("bench-{tag}-{i}"),
            })
            .await
            .is_ok();
        latencies.push(started.elapsed().as_micros() as u64);
        errors += usize::from(!ok);
    }
    (latencies, errors)
}

fn max_ms(latencies: &[u64]) -> f64 {
    latencies.iter().copied().max().unwrap_or(0) as f64 / 1000.0
}

async fn import_vs_copy(customers: usize) -> (f64, f64) {
    let (url, shutdown, pool) = start_profiles(true).await;
    let mut client = clients(&url, 1).remove(0);
    let generated: Vec<_> =
        crm_datagen::Generator::new(crm_datagen::Config { customers, seed: 11, ..Default::default() })
            .map(|g| g.customer)
            .collect();

    // Baseline: COPY of the same rows into a table shaped like profiles' customers.
    sqlx::raw_sql("CREATE TABLE copy_baseline (LIKE customers INCLUDING ALL)")
        .execute(&pool)
        .await
        .expect("baseline table");
    let mut csv = String::with_capacity(customers * 120);
    for (i, c) in generated.iter().enumerate() {
        let id = format!("00000000-0000-4000-8000-{i:012}");
        let b = c.birthday.unwrap_or_default();
        let reg = c.registered_at.map(|t| t.seconds).unwrap_or(0);
        csv.push_str(&format!(
            "{id},1,{},{},{},{},{},{},{},{},{},{},{},{},\\x,1\n",
            csv_field(&c.name),
            c.phone,
            c.email,
            b.year,
            b.month,
            b.day,
            c.gender,
            c.region,
            c.timezone,
            c.preferred_channel,
            rfc3339(reg),
            csv_field(&format!("{{{}}}", c.tags.join(",")))
        ));
    }
    let mut conn = pool.acquire().await.expect("conn");
    let started = Instant::now();
    let mut copy = conn
        .copy_in_raw(
            "COPY copy_baseline (customer_id, kind, name, phone, email, birth_year, birth_month, birth_day, gender, region, timezone, \
             preferred_channel, registered_at, tags, attributes, version) FROM STDIN WITH (FORMAT csv)",
        )
        .await
        .expect("copy");
    copy.send(csv.as_bytes()).await.expect("copy data");
    copy.finish().await.expect("copy finish");
    let copy_rate = customers as f64 / started.elapsed().as_secs_f64();
    drop(conn);

    let rows: Vec<pb::ImportRecordsRequest> = generated
        .into_iter()
        .map(|c| pb::ImportRecordsRequest {
            record: Some(pb::import_records_request::Record::Customer(c)),
            customer_ref: None,
        })
        .collect();
    let never = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (alone, alone_errors) = paced_creates(clients(&url, 1).remove(0), "alone", 0, Some(100), never).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let during = tokio::spawn(paced_creates(clients(&url, 1).remove(0), "during", 50_000_000, None, stop.clone()));
    let started = Instant::now();
    let response = client.import_records(tokio_stream::iter(rows)).await.expect("import").into_inner();
    let elapsed = started.elapsed().as_secs_f64();
    let import_rate = response.customers_created as f64 / elapsed;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (during, during_errors) = during.await.expect("creates");
    let creates = [("alone (baseline)", alone, alone_errors), ("during the import", during, during_errors)];
    println!("\n## CreateCustomer every 50 ms, alone and while the import runs\n");
    println!("| run | creates | p50 ms | p99 ms | max ms | errors |");
    println!("|---|---|---|---|---|---|");
    for (name, latencies, errors) in creates {
        let max = max_ms(&latencies);
        let s = Stats::from(latencies, errors, elapsed);
        println!(
            "| CreateCustomer {name} | {} | {:.2} | {:.2} | {max:.2} | {} |",
            s.ops,
            s.p50_us as f64 / 1000.0,
            s.p99_us as f64 / 1000.0,
            s.errors
        );
    }
    assert_eq!(
        response.customers_created as usize,
        customers,
        "every generated customer was created: {:?}",
        response.rejections.first()
    );
    shutdown.trigger();
    (import_rate, copy_rate)
}

fn rfc3339(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0).map(|t| t.to_rfc3339()).unwrap_or_default()
}

#[tokio::main]
async fn main() {
    let mut customers = 1_000_000usize;
    let mut seconds = 10u64;
    let mut reads_only = false;
    let mut import_only = false;
    let mut recompute_customers: Option<usize> = None;
    let mut freshness_rate = 1000u64;
    let mut consume_events: Option<usize> = None;
    let mut outreach_customers: Option<usize> = None;
    let mut feedback_rate: Option<u64> = None;
    let mut analytics_customers: Option<(usize, usize)> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--customers" => customers = args.next().and_then(|v| v.parse().ok()).expect("--customers N"),
            "--seconds" => seconds = args.next().and_then(|v| v.parse().ok()).expect("--seconds S"),
            "--reads-only" => reads_only = true,
            "--import-only" => import_only = true,
            "--recompute" => recompute_customers = args.next().and_then(|v| v.parse().ok()),
            "--rate" => freshness_rate = args.next().and_then(|v| v.parse().ok()).expect("--rate EVENTS_PER_SECOND"),
            "--consume" => consume_events = args.next().and_then(|v| v.parse().ok()),
            "--outreach" => outreach_customers = args.next().and_then(|v| v.parse().ok()),
            "--feedback" => feedback_rate = args.next().and_then(|v| v.parse().ok()),
            "--analytics" => {
                let ingest =
                    args.next().and_then(|v| v.parse().ok()).expect("--analytics INGEST_CUSTOMERS KPI_CUSTOMERS");
                let kpi = args.next().and_then(|v| v.parse().ok()).expect("--analytics INGEST_CUSTOMERS KPI_CUSTOMERS");
                analytics_customers = Some((ingest, kpi));
            }
            other => panic!("unknown argument {other}"),
        }
    }
    let duration = Duration::from_secs(seconds);
    if let Some(n) = recompute_customers {
        segmentation::run(n, freshness_rate, seconds).await;
        return;
    }
    if let Some((ingest, kpi)) = analytics_customers {
        analytics::run(ingest, kpi).await;
        return;
    }
    if let Some(rate) = feedback_rate {
        feedback::run(rate, seconds).await;
        return;
    }
    if let Some(n) = outreach_customers {
        outreach::campaign(n).await;
        return;
    }
    if let Some(n) = consume_events {
        consume_throughput(n).await;
        return;
    }
    println!(
        "# profiles benchmarks ({} cores, {customers} customers for import, {seconds} s per read run)\n",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );

    if !import_only {
        reads(duration).await;
    }
    if reads_only {
        return;
    }
    let (import_rate, copy_rate) = import_vs_copy(customers).await;
    println!("\n## Bulk import vs PostgreSQL COPY of the same {customers} customers\n");
    println!("| run | customers/s | vs COPY |");
    println!("|---|---|---|");
    println!("| PostgreSQL COPY into a table shaped like customers (baseline) | {copy_rate:.0} | baseline |");
    println!(
        "| ImportRecords (validation, identity resolution, events) | {import_rate:.0} | {:.0} % |",
        100.0 * import_rate / copy_rate
    );
}

async fn reads(duration: Duration) {
    let (url, shutdown, _) = start_profiles(true).await;
    let (url_nocache, shutdown_nocache, _) = start_profiles(false).await;
    let mut admin = clients(&url, 1).remove(0);
    let ids = Arc::new(seed(&mut admin, 10_000).await);
    let ids_nocache = Arc::new(seed(&mut clients(&url_nocache, 1).remove(0), 10_000).await);
    let cached = Arc::new(clients(&url, 8));
    let uncached = Arc::new(clients(&url_nocache, 8));
    let get = |c: &Arc<Vec<Client>>, ids: &Arc<Vec<String>>, w: usize, i: usize| {
        let mut client = c[w % c.len()].clone();
        let id = ids[i % ids.len()].clone();
        async move { client.get_customer(pb::GetCustomerRequest { customer_id: id, purpose: String::new() }).await.is_ok() }
    };
    // Warm the cache: every profile once.
    for chunk in ids.chunks(500) {
        futures_util::future::join_all(
            chunk.iter().map(|id| {
                let mut c = cached[0].clone();
                let id = id.clone();
                async move {
                    c.get_customer(pb::GetCustomerRequest { customer_id: id, purpose: String::new() }).await.is_ok()
                }
            }),
        )
        .await;
    }

    let redis = redis::Client::open(crm_kit::testing::redis_url()).expect("redis");
    let keys: Arc<Vec<String>> = Arc::new(ids.iter().map(|id| format!("crm:profiles:customer:{id}")).collect());
    // A bare GET over `conns`, worker `w` on connection `w % conns.len()`.
    let bare_get = |conns: Vec<redis::aio::MultiplexedConnection>| {
        let (conns, keys) = (Arc::new(conns), keys.clone());
        move |w: usize, i: usize| {
            let mut conn = conns[w % conns.len()].clone();
            let key = keys[i % keys.len()].clone();
            async move {
                redis::cmd("GET").arg(key).query_async::<Option<Vec<u8>>>(&mut conn).await.is_ok_and(|v| v.is_some())
            }
        }
    };
    // One connection: the 64 workers' GETs share its pipeline.
    let redis_get = bare_get(vec![redis.get_multiplexed_async_connection().await.expect("redis")]);
    let baseline = closed_loop(64, duration, redis_get.clone()).await;
    // The same 64 workers with a connection each, as `redis-benchmark -c 64`
    // runs them: every GET waits for its reply, none shares a pipeline.
    let mut own = Vec::with_capacity(64);
    for _ in 0..64 {
        own.push(redis.get_multiplexed_async_connection().await.expect("redis"));
    }
    let per_connection = closed_loop(64, duration, bare_get(own)).await;
    let (c2, i2) = (cached.clone(), ids.clone());
    let hot = closed_loop(64, duration, move |w, i| get(&c2, &i2, w, i)).await;
    let (c3, i3) = (uncached.clone(), ids_nocache.clone());
    let cold = closed_loop(64, duration, move |w, i| get(&c3, &i3, w, i)).await;
    let (c4, i4) = (cached.clone(), ids.clone());
    let steady = open_loop_warm(5000, Duration::from_secs(2), duration, move |i| get(&c4, &i4, i, i)).await;
    // The same schedule from a client on a tokio runtime of its own (one
    // worker thread), as a client in another process would be: the service's
    // tasks no longer delay its sends, though both still share the two cores.
    let (url5, i5) = (url.clone(), ids.clone());
    let apart = tokio::task::spawn_blocking(move || {
        std::thread::spawn(move || {
            let runtime =
                tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
            runtime.block_on(async move {
                let c5 = Arc::new(clients(&url5, 8));
                open_loop_warm(5000, Duration::from_secs(2), duration, move |i| get(&c5, &i5, i, i)).await
            })
        })
        .join()
        .expect("client thread")
    })
    .await
    .expect("client runtime");
    // The same schedule for the bare GET: what this machine and this load tool
    // give at 5 000/s with no service in between.
    let steady_redis = open_loop(5000, duration, move |i| redis_get(i, i)).await;

    println!("## GetCustomer vs a bare Redis GET of the same key\n");
    println!("| run | ops/s | p50 ms | p99 ms | errors | vs Redis GET |");
    println!("|---|---|---|---|---|---|");
    println!("{}", row("bare Redis GET, concurrency 64 (baseline)", &baseline, None));
    println!("{}", row("bare Redis GET, concurrency 64, a connection per worker", &per_connection, Some(&baseline)));
    println!("{}", row("GetCustomer, cached, concurrency 64", &hot, Some(&baseline)));
    println!("{}", row("GetCustomer, cache off, concurrency 64", &cold, Some(&baseline)));
    println!(
        "\nGetCustomer, cached, concurrency 64, against the bare GET with a connection per worker: {:.0} %.\n",
        100.0 * hot.rate() / per_connection.rate()
    );
    // The load tool's own delay: from a request's scheduled send time to the first poll of its task.
    println!("| open loop, steady 5 000/s | ops/s | p50 ms | p99 ms | errors | load tool's delay, p99 ms |");
    println!("|---|---|---|---|---|---|");
    for (name, s) in [
        ("bare Redis GET (baseline)", &steady_redis),
        ("GetCustomer, cached", &steady),
        ("GetCustomer, cached, client on a runtime of its own", &apart),
    ] {
        println!(
            "| {name} | {:.0} | {:.2} | {:.2} | {} | {:.2} |",
            s.rate(),
            s.p50_us as f64 / 1000.0,
            s.p99_us as f64 / 1000.0,
            s.errors,
            s.lag_p99_us as f64 / 1000.0
        );
    }
    shutdown.trigger();
    shutdown_nocache.trigger();
}

/// Writes `events` into a producer's outbox, as its service would.
async fn stage(producer: &sqlx::PgPool, events: &[crm_kit::outbox::Staged]) {
    let (ids, types, aggregates, envelopes) = crm_kit::outbox::Staged::columns(events);
    sqlx::query(
        "INSERT INTO kit_outbox (event_id, event_type, aggregate_id, envelope) \
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::bytea[])",
    )
    .bind(&ids)
    .bind(&types)
    .bind(&aggregates)
    .bind(&envelopes)
    .execute(producer)
    .await
    .expect("outbox");
}

/// Deletes a bench's private stream.
async fn delete_stream(stream: &str) {
    let client = redis::Client::open(crm_kit::testing::redis_url()).expect("redis");
    let mut conn = client.get_multiplexed_async_connection().await.expect("redis");
    let _: () = redis::cmd("DEL").arg(stream).query_async(&mut conn).await.expect("cleanup");
}

/// Publishes `events` of profiles to a private stream the way the service
/// would (outbox rows, then the real relay); returns the stream's name.
async fn publish_to_stream(events: &[crm_kit::outbox::Staged]) -> String {
    static NO_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate::Migrator::DEFAULT;
    let mut config = crm_kit::testing::config("profiles").await;
    config.event_stream_prefix = crm_kit::testing::unique_name("bench");
    config.database_statement_timeout = Duration::ZERO;
    config.outbox_batch_size = 5000;
    let producer = crm_kit::db::pg_pool(&config).expect("pool");
    crm_kit::db::migrate(&producer, &config.database_schema, &NO_MIGRATIONS).await.expect("producer");
    for chunk in events.chunks(5000) {
        stage(&producer, chunk).await;
    }
    let redis = crm_kit::db::Redis::connect(&crm_kit::testing::redis_url(), Duration::from_secs(5)).expect("redis");
    let relay = crm_kit::outbox::OutboxRelay::new(
        producer.clone(),
        redis,
        "profiles",
        crm_kit::metrics::Metrics::new("profiles"),
    )
    .configured(&config, "profiles");
    while relay.publish_once().await.expect("publish") > 0 {}
    crm_kit::outbox::stream_name(&config.event_stream_prefix, "profiles")
}

/// Consumes `n` events of `stream` into `pool` with `consumers` real
/// consumers of one group at once (as that many replicas would) and
/// `handler` (batches of `batch_size`); returns events per second. Deletes
/// the stream afterwards.
async fn consume_all<H: crm_kit::consumer::EventHandler + Clone + 'static>(
    pool: &sqlx::PgPool,
    stream: &str,
    handler: H,
    batch_size: usize,
    n: usize,
    consumers: usize,
) -> f64 {
    let group = crm_kit::testing::unique_name("bench_reader");
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut readers = Vec::new();
    for i in 0..consumers.max(1) {
        let settings = crm_kit::consumer::ConsumerSettings {
            group: group.clone(),
            name: format!("bench-{i}"),
            streams: vec![stream.to_string()],
            batch_size,
            block: Duration::from_millis(100),
            claim_idle: Duration::from_secs(60),
        };
        let consumer = crm_kit::consumer::Consumer::new(
            pool.clone(),
            &crm_kit::testing::redis_url(),
            settings,
            handler.clone(),
            crm_kit::metrics::Metrics::new("bench"),
        )
        .expect("consumer");
        readers.push((consumer, done.clone()));
    }
    let started = Instant::now();
    let tasks: Vec<_> = readers
        .into_iter()
        .map(|(mut consumer, done)| {
            tokio::spawn(async move {
                while done.load(std::sync::atomic::Ordering::SeqCst) < n {
                    let k = consumer.poll_once().await.expect("consume");
                    done.fetch_add(k, std::sync::atomic::Ordering::SeqCst);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("consumer task");
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    delete_stream(stream).await;
    rate
}

/// Event ingestion: N TransactionRecorded events published to a private
/// stream, consumed into segmentation's read model (idempotent inbox,
/// batched transactions). Reports events per second.
async fn consume_throughput(events: usize) {
    let staged: Vec<crm_kit::outbox::Staged> = (0..events)
        .map(|i| {
            let customer = uuid::Uuid::from_u128((i % 50_000) as u128 + 1).to_string();
            let t = crm_proto::profiles::v1::Transaction {
                transaction_id: format!("bench-{i}"),
                customer_id: customer.clone(),
                kind: 1,
                amount: Some(crm_proto::common::v1::Money { amount_minor: 1000, currency: "CNY".into() }),
                occurred_at: Some(prost_types::Timestamp { seconds: 1_760_000_000 + i as i64, nanos: 0 }),
                ..Default::default()
            };
            let payload = crm_proto::profiles::v1::TransactionRecorded { transaction: Some(t) };
            let aggregate = crm_kit::outbox::Aggregate { kind: "customer", id: &customer };
            crm_kit::outbox::Staged::new("profiles", aggregate, "", &payload).expect("stage")
        })
        .collect();
    let stream = publish_to_stream(&staged).await;

    let reader_config = crm_kit::testing::config("segmentation").await;
    let reader = crm_kit::db::pg_pool(&reader_config).expect("pool");
    crm_kit::db::migrate(&reader, &reader_config.database_schema, crm_segmentation::SPEC.migrator)
        .await
        .expect("reader");
    let rate = consume_all(&reader, &stream, crm_segmentation::read_model::ReadModel, 500, events, 1).await;
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM transactions").fetch_one(&reader).await.expect("count");
    assert_eq!(stored as usize, events);
    println!(
        "| segmentation read model: {events} TransactionRecorded events consumed (inbox, batched) | {rate:.0} events/s |"
    );
}
