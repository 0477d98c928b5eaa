//! Starts profiles in-process on port 0 with its own schema, real PostgreSQL and Redis.
#![allow(dead_code)]

use std::time::Duration;

use crm_kit::Role;
use crm_kit::lifecycle::Shutdown;
use crm_proto::profiles::v1 as pb;
use crm_proto::profiles::v1::profiles_service_client::ProfilesServiceClient;
use sqlx::PgPool;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub type Client = ProfilesServiceClient<InterceptedService<Channel, Bearer>>;

pub struct App {
    pub url: String,
    pub pool: PgPool,
    pub shutdown: Shutdown,
    pub metrics: crm_kit::metrics::Metrics,
}

impl Drop for App {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

#[derive(Clone)]
pub struct Bearer(pub String);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", format!("Bearer {}", self.0).parse().expect("ascii"));
        Ok(req)
    }
}

pub async fn start() -> App {
    start_with(|_| {}).await
}

pub async fn start_with(adjust: impl FnOnce(&mut crm_kit::config::KitConfig)) -> App {
    start_full(adjust, false).await
}

/// Profiles with its event consumers, reading streams under `prefix`.
pub async fn start_with_consumers(prefix: &str) -> App {
    let prefix = prefix.to_string();
    start_full(move |c| c.event_stream_prefix = prefix, true).await
}

async fn start_full(adjust: impl FnOnce(&mut crm_kit::config::KitConfig), consumers: bool) -> App {
    let mut config = crm_kit::testing::config("profiles").await;
    adjust(&mut config);
    let mut kit = crm_kit::Kit::start(crm_profiles::SPEC, config).await.expect("kit starts");
    let (api, cache) = crm_profiles::build(
        &kit,
        &crm_profiles::ProfilesConfig { cache_enabled: true, cache_ttl: Duration::from_secs(60) },
    );
    if consumers {
        kit.spawn_consumer(
            crm_profiles::timeline::SOURCES,
            crm_profiles::timeline::TimelineProjector::new(cache.clone()),
        )
        .expect("consumer");
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let pool = kit.pg.clone();
    let shutdown = kit.shutdown_handle();
    let metrics = kit.metrics.clone();
    let routes =
        tonic::service::Routes::new(crm_proto::profiles::v1::profiles_service_server::ProfilesServiceServer::new(api));
    tokio::spawn(kit.serve_on(listener, routes, crm_profiles::access_policy()));
    App { url, pool, shutdown, metrics }
}

impl App {
    pub fn client(&self, roles: &[Role], pii: bool) -> Client {
        let channel = crm_kit::client::channel(&self.url).expect("channel");
        ProfilesServiceClient::with_interceptor(channel, Bearer(crm_kit::testing::token(roles, pii)))
    }

    pub fn admin(&self) -> Client {
        self.client(&[Role::Admin], true)
    }

    pub async fn count(&self, table: &str) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
            .fetch_one(&self.pool)
            .await
            .expect("count")
    }
}

pub fn person(name: &str, phone: &str, email: &str) -> pb::Customer {
    pb::Customer {
        name: name.into(),
        phone: phone.into(),
        email: email.into(),
        region: "CN-SH".into(),
        ..Default::default()
    }
}

pub async fn create(client: &mut Client, c: pb::Customer) -> pb::Customer {
    client
        .create_customer(pb::CreateCustomerRequest { customer: Some(c), request_id: uuid::Uuid::new_v4().to_string() })
        .await
        .expect("create")
        .into_inner()
        .customer
        .expect("customer")
}

pub fn ts(seconds: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp { seconds, nanos: 0 })
}

/// The field names of an INVALID_ARGUMENT status.
pub fn bad_fields(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    status
        .get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|f| f.field.clone()).collect())
        .unwrap_or_default()
}

static NO_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate::Migrator::DEFAULT;

/// A schema with only the kit's tables, standing in for another service's database.
pub async fn producer_pool() -> PgPool {
    let config = crm_kit::testing::config("producer").await;
    let pool = crm_kit::db::pg_pool(&config).expect("pool");
    crm_kit::db::migrate(&pool, &config.database_schema, &NO_MIGRATIONS).await.expect("kit tables");
    pool
}

/// Publishes what `service` has in that outbox to `<prefix>.<service>.events`.
pub async fn publish(pool: &PgPool, prefix: &str, service: &str) {
    let mut config = crm_kit::testing::config(service).await;
    config.event_stream_prefix = prefix.to_string();
    let redis = crm_kit::db::Redis::connect(&crm_kit::testing::redis_url(), Duration::from_secs(1)).expect("redis");
    let relay =
        crm_kit::outbox::OutboxRelay::new(pool.clone(), redis, service, crm_kit::metrics::Metrics::new(service))
            .configured(&config, service);
    relay.publish_once().await.expect("publish");
}

impl App {
    /// The value of a counter in the metrics exposition.
    pub fn counter(&self, series: &str) -> f64 {
        self.metrics
            .render()
            .lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }
}
