//! The profiles service: who the customer is (SPEC 4.1).
//!
//! Where things are: handlers in [`api`], rules in [`domain`], SQL in
//! [`store`], the Redis hot-profile cache in [`cache`], emitted events in
//! [`events`].

pub mod api;
pub mod cache;
pub mod domain;
pub mod duplicates;
pub mod events;
pub mod import;
pub mod merging;
pub mod privacy;
pub mod store;
pub mod timeline;

use std::time::Duration;

use crm_kit::auth::roles::{ADMIN, ANY, MACHINE, OPERATORS, STAFF};
use crm_kit::config::{Env, VarSpec, var};
use crm_kit::{AccessPolicy, Kit, KitError, Role, ServiceSpec};
use crm_proto::profiles::v1::profiles_service_server::ProfilesServiceServer;

/// Error domain and short name.
pub const SERVICE: &str = "profiles";
/// The gRPC service.
pub const GRPC_SERVICE: &str = "crm.profiles.v1.ProfilesService";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// What the kit needs to run profiles.
pub const SPEC: ServiceSpec = ServiceSpec {
    name: SERVICE,
    grpc_services: &[GRPC_SERVICE],
    default_port: 50051,
    migrator: &MIGRATOR,
    descriptors: crm_proto::FILE_DESCRIPTOR_SET,
    vars: PROFILE_VARS,
    long_running: &["ImportRecords"],
};

/// Profiles' own variables (documented in docs/configuration.md).
pub const PROFILE_VARS: &[VarSpec] = &[
    var("PROFILE_CACHE_ENABLED", "true", "Use the Redis hot-profile cache (PRF-9); false reads PostgreSQL only."),
    var(
        "PROFILE_CACHE_TTL_SECONDS",
        "300",
        "Lifetime of a cached profile; also bounds staleness if an invalidation could not reach Redis.",
    ),
];

const READERS: &[Role] = &[Role::Admin, Role::Agent, Role::Analyst, Role::Service];

/// Who may call what (SEC-1); the roles are also listed in the contract's comments.
pub fn access_policy() -> AccessPolicy {
    AccessPolicy::new().service(
        GRPC_SERVICE,
        &[
            ("CreateCustomer", OPERATORS),
            ("GetCustomer", READERS),
            ("BatchGetCustomers", READERS),
            ("UpdateCustomer", OPERATORS),
            ("ListCustomers", ANY),
            ("ResolveCustomer", OPERATORS),
            ("MergeCustomers", STAFF),
            ("UnmergeCustomer", ADMIN),
            ("BatchRecordTransactions", MACHINE),
            ("BatchRecordInteractions", OPERATORS),
            ("ImportRecords", MACHINE),
            ("ListTimeline", OPERATORS),
            ("GetConsent", OPERATORS),
            ("UpdateConsent", OPERATORS),
            ("ListConsentHistory", STAFF),
            ("ExportCustomerData", ADMIN),
            ("EraseCustomer", ADMIN),
            ("GetErasureStatus", ADMIN),
            ("ListAccessAudit", ADMIN),
            ("ListSuspectedDuplicates", &[Role::Admin, Role::Agent, Role::Analyst]),
            ("BatchGetConsent", MACHINE),
            ("MaskFreeText", MACHINE),
        ],
    )
}

/// Profiles' own settings.
#[derive(Debug, Clone)]
pub struct ProfilesConfig {
    /// `PROFILE_CACHE_ENABLED` (default true).
    pub cache_enabled: bool,
    /// `PROFILE_CACHE_TTL_SECONDS` (default 300).
    pub cache_ttl: Duration,
}

impl ProfilesConfig {
    /// Reads `PROFILE_CACHE_*` from `env`.
    pub fn load(env: &Env) -> Result<Self, crm_kit::config::ConfigError> {
        Ok(Self {
            cache_enabled: env.flag("PROFILE_CACHE_ENABLED", true)?,
            cache_ttl: Duration::from_secs(env.bounded("PROFILE_CACHE_TTL_SECONDS", 300, 1, 86_400)?),
        })
    }
}

/// Wires and serves profiles.
pub async fn run(mut kit: Kit) -> Result<(), KitError> {
    let config = ProfilesConfig::load(&Env::process())?;
    let (api, cache) = build(&kit, &config);
    kit.spawn_outbox_relay();
    // PRF-5: contacts, feedback and tier moves from the other services.
    kit.spawn_consumer(timeline::SOURCES, timeline::TimelineProjector::new(cache.clone()))?;
    let signal = kit.shutdown_signal();
    kit.spawn(async move {
        while signal.sleep(Duration::from_secs(1)).await {
            cache.flush_pending().await;
        }
    });
    let routes = tonic::service::Routes::new(
        ProfilesServiceServer::new(api).max_decoding_message_size(kit.config.max_message_bytes),
    );
    kit.serve(routes, access_policy()).await
}

/// The API and its cache for a started kit (tests call this too).
pub fn build(kit: &Kit, config: &ProfilesConfig) -> (api::ProfilesApi, cache::ProfileCache) {
    let cache =
        cache::ProfileCache::new(config.cache_enabled.then(|| kit.redis.clone()), config.cache_ttl, &kit.metrics);
    (api::ProfilesApi::new(kit.pg.clone(), cache.clone()), cache)
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_profiles_variable_is_documented() {
        let doc = include_str!("../../../docs/configuration.md");
        for v in super::PROFILE_VARS {
            assert!(doc.contains(&format!("`{}`", v.name)), "docs/configuration.md does not document {}", v.name);
        }
    }
}
