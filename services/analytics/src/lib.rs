//! The analytics service: is retention improving, which campaign paid off
//! (SPEC 4.5). Where things are: the consumer of every service's events in
//! [`ingest`] (facts and rollups, set-based); who bought when and segment
//! members as bitmaps for before/after tests in [`bits`]; KPI formulas and
//! statistics in [`domain`]; the queries behind each RPC in [`api`].

pub mod api;
pub mod bits;
pub mod domain;
pub mod ingest;

use chrono_tz::Tz;
use crm_kit::config::{ConfigError, Env, VarSpec, var};
use crm_kit::{AccessPolicy, Kit, KitError, Role, ServiceSpec};
use crm_proto::analytics::v1::analytics_service_server::AnalyticsServiceServer;

/// Error domain and short name.
pub const SERVICE: &str = "analytics";
/// The gRPC service.
pub const GRPC_SERVICE: &str = "crm.analytics.v1.AnalyticsService";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Analytics' own variables (documented in docs/configuration.md).
pub const ANALYTICS_VARS: &[VarSpec] = &[
    var("ANALYTICS_TIMEZONE", "Asia/Shanghai", "IANA zone whose days and months KPIs are reported in."),
    var(
        "ANALYTICS_ATTRIBUTION_DAYS",
        "7",
        "Days after a campaign assignment in which a purchase or response counts for lift (OUT-8, ANA-3).",
    ),
    var(
        "ANALYTICS_CONSUMERS",
        "2",
        "Event batches a replica applies at once (consumers of the group in this replica), 1 to 16.",
    ),
];

/// What the kit needs to run analytics.
pub const SPEC: ServiceSpec = ServiceSpec {
    name: SERVICE,
    grpc_services: &[GRPC_SERVICE],
    default_port: 50055,
    migrator: &MIGRATOR,
    descriptors: crm_proto::FILE_DESCRIPTOR_SET,
    vars: ANALYTICS_VARS,
    long_running: &[],
};

/// Analytics' settings.
#[derive(Debug, Clone)]
pub struct AnalyticsConfig {
    /// `ANALYTICS_TIMEZONE`.
    pub tz: Tz,
    /// `ANALYTICS_ATTRIBUTION_DAYS`.
    pub attribution: chrono::Duration,
    /// `ANALYTICS_CONSUMERS`.
    pub consumers: usize,
}

impl AnalyticsConfig {
    /// Reads `ANALYTICS_*` from `env`.
    pub fn load(env: &Env) -> Result<Self, ConfigError> {
        let name = env.raw("ANALYTICS_TIMEZONE").unwrap_or_else(|| "Asia/Shanghai".into());
        let tz = name
            .parse()
            .map_err(|_| ConfigError::new("ANALYTICS_TIMEZONE", Some(&name), "is not an IANA time zone"))?;
        let days = env.bounded("ANALYTICS_ATTRIBUTION_DAYS", 7, 1, 365)?;
        let consumers = env.bounded("ANALYTICS_CONSUMERS", 2, 1, 16)? as usize;
        Ok(Self { tz, attribution: chrono::Duration::days(days as i64), consumers })
    }

    /// The event consumer with these settings.
    pub fn ingest(&self) -> ingest::Ingest {
        ingest::Ingest { tz: self.tz, window: self.attribution }
    }
}

/// Who may call what (SEC-1): every KPI is for admins, analysts and services.
pub fn access_policy() -> AccessPolicy {
    use Role::{Admin, Analyst, Service};
    const ALL: &[Role] = &[Admin, Analyst, Service];
    AccessPolicy::new().service(
        GRPC_SERVICE,
        &[
            ("GetRetention", ALL),
            ("GetChurnAndRepurchase", ALL),
            ("GetCampaignPerformance", ALL),
            ("GetLift", ALL),
            ("GetCustomerValue", ALL),
            ("GetServiceQuality", ALL),
            ("CompareKpi", ALL),
        ],
    )
}

/// Every stream analytics consumes (ANA-1).
pub const SOURCES: &[&str] = &["profiles", "segmentation", "outreach", "feedback"];

/// Starts the consumer, the outbox relay (erasure confirmations) and the
/// upkeep of the activity bitmaps (the first build, then the sweep of
/// purchases stored without their bits).
pub fn spawn_workers(kit: &mut Kit, config: &AnalyticsConfig) -> Result<(), KitError> {
    kit.spawn_outbox_relay();
    let signal = kit.shutdown_signal();
    kit.spawn(bits::maintain(kit.pg.clone(), config.tz, std::time::Duration::from_secs(60), signal));
    kit.spawn_consumers(SOURCES, config.ingest(), config.consumers)
}

/// Wires and serves analytics.
pub async fn run(mut kit: Kit) -> Result<(), KitError> {
    let config = AnalyticsConfig::load(&Env::process())?;
    spawn_workers(&mut kit, &config)?;
    let api = api::AnalyticsApi::new(kit.pg.clone(), config.tz);
    let routes = tonic::service::Routes::new(
        AnalyticsServiceServer::new(api).max_decoding_message_size(kit.config.max_message_bytes),
    );
    kit.serve(routes, access_policy()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_analytics_variable_is_documented() {
        let doc = include_str!("../../../docs/configuration.md");
        for v in ANALYTICS_VARS {
            assert!(doc.contains(&format!("`{}`", v.name)), "docs/configuration.md does not document {}", v.name);
        }
    }

    #[test]
    fn bad_settings_fail_naming_the_variable() {
        let load = |pairs: &[(&str, &str)]| AnalyticsConfig::load(&Env::from_pairs(pairs.iter().copied()));
        assert!(load(&[]).is_ok());
        assert!(load(&[("ANALYTICS_TIMEZONE", "Moon/Base")]).unwrap_err().to_string().contains("ANALYTICS_TIMEZONE"));
        assert!(
            load(&[("ANALYTICS_ATTRIBUTION_DAYS", "0")])
                .unwrap_err()
                .to_string()
                .contains("ANALYTICS_ATTRIBUTION_DAYS")
        );
    }

    #[test]
    fn every_rpc_declares_its_roles() {
        let undeclared = access_policy().undeclared(crm_proto::FILE_DESCRIPTOR_SET, &[GRPC_SERVICE]).unwrap();
        assert!(undeclared.is_empty(), "{undeclared:?}");
    }
}
