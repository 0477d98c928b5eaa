//! The segmentation service: which group is each customer in, and why
//! (SPEC 4.2). Where things are: handlers in [`api`], rules in [`domain`],
//! the read model of profiles' events in [`read_model`], the set-based
//! recompute in [`recompute`], segments in [`segments`], background work in [`jobs`].

pub mod api;
pub mod domain;
pub mod jobs;
pub mod read_model;
pub mod recompute;
pub mod segments;

use crm_kit::ServiceSpec;
use crm_kit::config::{ConfigError, Env, VarSpec, var};

/// Error domain and short name.
pub const SERVICE: &str = "segmentation";
/// The gRPC service.
pub const GRPC_SERVICE: &str = "crm.segmentation.v1.SegmentationService";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Segmentation's own variables (documented in docs/configuration.md): every
/// SEG threshold with the SPEC's default, and the incremental recompute.
pub const SEGMENTATION_VARS: &[VarSpec] = &[
    var(
        "SEGMENTATION_RFM_WINDOW_MONTHS",
        "12",
        "SEG-1/2: spend and purchase window in calendar months (current month included), 1 to 24.",
    ),
    var("SEGMENTATION_DIAMOND_TOP_PERCENT", "5", "SEG-2: DIAMOND = this top percentage by window spend ..."),
    var("SEGMENTATION_DIAMOND_MIN_SPEND_CNY", "10000", "SEG-2: ... or a window spend of at least this many CNY."),
    var("SEGMENTATION_GOLD_TOP_PERCENT", "50", "SEG-2: GOLD = up to this top percentage by window spend."),
    var(
        "SEGMENTATION_PROMOTION_MONTHS",
        "3",
        "SEG-2: GOLD -> DIAMOND after this many consecutive months of growth ...",
    ),
    var("SEGMENTATION_PROMOTION_GROWTH_PERCENT", "20", "SEG-2: ... each above this percentage."),
    var(
        "SEGMENTATION_DEMOTION_MONTHS",
        "6",
        "SEG-2: DIAMOND -> GOLD after this many consecutive months of decline ...",
    ),
    var("SEGMENTATION_DEMOTION_DECLINE_PERCENT", "30", "SEG-2: ... each above this percentage."),
    var("SEGMENTATION_DORMANT_DAYS", "180", "SEG-2: DORMANT after this many days without a purchase or interaction."),
    var("SEGMENTATION_NEW_DAYS", "90", "SEG-2/4: a first purchase this recent makes a customer new."),
    var("SEGMENTATION_VALUE_HIGH_PERCENT", "20", "SEG-3: high value = this top percentage by annual spend ..."),
    var("SEGMENTATION_VALUE_MEDIUM_PERCENT", "50", "SEG-3: ... medium value up to this one."),
    var(
        "SEGMENTATION_POTENTIAL_GROWTH_PERCENT",
        "20",
        "SEG-3: high potential from this spend trend (3 months against the 3 before) ...",
    ),
    var(
        "SEGMENTATION_POTENTIAL_INQUIRIES",
        "2",
        "SEG-3: ... or this many inquiries in the current month and the 2 before.",
    ),
    var("SEGMENTATION_ACTIVE_DAYS", "90", "SEG-4: active means a purchase within this many days."),
    var("SEGMENTATION_MATURE_DAYS", "730", "SEG-4: mature means a customer for at least this many days."),
    var("SEGMENTATION_CHURNED_DAYS", "365", "SEG-4: churned after this many days without a purchase."),
    var(
        "SEGMENTATION_DECLINING_DROP_PERCENT",
        "30",
        "SEG-4: declining when spend fell at least this percentage (3 months against the 3 before).",
    ),
    var("SEGMENTATION_CHURN_NO_PURCHASE_DAYS", "90", "SEG-5: no purchase for more than this many days ..."),
    var("SEGMENTATION_CHURN_RESPONSE_PERCENT", "30", "SEG-5: ... and a response rate below this percentage."),
    var("SEGMENTATION_CHURN_ACTIVITY_PERCENT", "30", "SEG-5: activity below this percentage of the base average ..."),
    var("SEGMENTATION_CHURN_NO_INTERACTION_DAYS", "90", "SEG-5: ... and no interaction for more than this many days."),
    var(
        "SEGMENTATION_CHURN_SPEND_DROP_PERCENT",
        "50",
        "SEG-5: spend of the last 3 months down at least this percentage against the 3 before.",
    ),
    var("SEGMENTATION_CHURN_NO_LOGIN_DAYS", "7", "SEG-5: this many consecutive days without a login."),
    var(
        "SEGMENTATION_CHURN_SILENT_DAYS",
        "180",
        "SEG-5: this many days without any interaction marks a personal call-back.",
    ),
    var("SEGMENTATION_CHURN_MEDIUM_SCORE", "30", "SEG-5: churn level MEDIUM from this score (0-100) ..."),
    var("SEGMENTATION_CHURN_HIGH_SCORE", "60", "SEG-5: ... HIGH from this one."),
    var(
        "SEGMENTATION_INCREMENTAL_IDLE_MS",
        "200",
        "SEG-7: pause of the incremental recompute when no customer is waiting.",
    ),
    var(
        "SEGMENTATION_OPERATION_LEASE_SECONDS",
        "30",
        "SEG-7, REL-7: a recompute whose runner stopped heartbeating this long is taken over by another replica.",
    ),
    var(
        "SEGMENTATION_CONSUMERS",
        "2",
        "Event batches a replica applies to the read model at once (consumers of the replica's group), 1 to 16.",
    ),
];

/// Segmentation's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentationConfig {
    /// The SEG thresholds.
    pub thresholds: domain::Thresholds,
    /// `SEGMENTATION_INCREMENTAL_IDLE_MS`.
    pub incremental_idle: std::time::Duration,
    /// `SEGMENTATION_CONSUMERS`.
    pub consumers: usize,
    /// `SEGMENTATION_OPERATION_LEASE_SECONDS`.
    pub operation_lease: std::time::Duration,
}

impl SegmentationConfig {
    /// Reads `SEGMENTATION_*` from `env`; a bad or inconsistent value fails naming the variable.
    pub fn load(env: &Env) -> Result<Self, ConfigError> {
        let d = domain::Thresholds::default();
        let share = |name: &'static str, default: f64| -> Result<f64, ConfigError> {
            Ok(env.bounded(name, (default * 100.0).round() as u64, 1, 99)? as f64 / 100.0)
        };
        let days = |name: &'static str, default: i32| -> Result<i32, ConfigError> {
            Ok(env.bounded(name, default as u64, 1, 3650)? as i32)
        };
        let t = domain::Thresholds {
            rfm_window_months: env.bounded("SEGMENTATION_RFM_WINDOW_MONTHS", d.rfm_window_months as u64, 1, 24)?
                as usize,
            diamond_top_share: share("SEGMENTATION_DIAMOND_TOP_PERCENT", d.diamond_top_share)?,
            diamond_min_spend_minor: env.bounded(
                "SEGMENTATION_DIAMOND_MIN_SPEND_CNY",
                d.diamond_min_spend_minor as u64 / 100,
                1,
                1_000_000_000,
            )? as i64
                * 100,
            gold_top_share: share("SEGMENTATION_GOLD_TOP_PERCENT", d.gold_top_share)?,
            promotion_months: env.bounded("SEGMENTATION_PROMOTION_MONTHS", d.promotion_months as u64, 1, 24)? as usize,
            promotion_growth: share("SEGMENTATION_PROMOTION_GROWTH_PERCENT", d.promotion_growth)?,
            demotion_months: env.bounded("SEGMENTATION_DEMOTION_MONTHS", d.demotion_months as u64, 1, 24)? as usize,
            demotion_decline: share("SEGMENTATION_DEMOTION_DECLINE_PERCENT", d.demotion_decline)?,
            dormant_days: days("SEGMENTATION_DORMANT_DAYS", d.dormant_days)?,
            new_days: days("SEGMENTATION_NEW_DAYS", d.new_days)?,
            value_high_share: share("SEGMENTATION_VALUE_HIGH_PERCENT", d.value_high_share)?,
            value_medium_share: share("SEGMENTATION_VALUE_MEDIUM_PERCENT", d.value_medium_share)?,
            potential_growth: share("SEGMENTATION_POTENTIAL_GROWTH_PERCENT", d.potential_growth)?,
            potential_inquiries: env.bounded(
                "SEGMENTATION_POTENTIAL_INQUIRIES",
                d.potential_inquiries as u64,
                1,
                1000,
            )? as i32,
            active_days: days("SEGMENTATION_ACTIVE_DAYS", d.active_days)?,
            mature_days: days("SEGMENTATION_MATURE_DAYS", d.mature_days)?,
            churned_days: days("SEGMENTATION_CHURNED_DAYS", d.churned_days)?,
            declining_drop: share("SEGMENTATION_DECLINING_DROP_PERCENT", d.declining_drop)?,
            churn_no_purchase_days: days("SEGMENTATION_CHURN_NO_PURCHASE_DAYS", d.churn_no_purchase_days)?,
            churn_response_rate: share("SEGMENTATION_CHURN_RESPONSE_PERCENT", d.churn_response_rate)?,
            churn_activity_share: share("SEGMENTATION_CHURN_ACTIVITY_PERCENT", d.churn_activity_share)?,
            churn_no_interaction_days: days("SEGMENTATION_CHURN_NO_INTERACTION_DAYS", d.churn_no_interaction_days)?,
            churn_spend_drop: share("SEGMENTATION_CHURN_SPEND_DROP_PERCENT", d.churn_spend_drop)?,
            churn_no_login_days: days("SEGMENTATION_CHURN_NO_LOGIN_DAYS", d.churn_no_login_days)?,
            churn_silent_days: days("SEGMENTATION_CHURN_SILENT_DAYS", d.churn_silent_days)?,
            churn_medium: env.bounded("SEGMENTATION_CHURN_MEDIUM_SCORE", d.churn_medium as u64, 1, 100)? as i32,
            churn_high: env.bounded("SEGMENTATION_CHURN_HIGH_SCORE", d.churn_high as u64, 1, 100)? as i32,
        };
        let order = |name: &'static str, ok: bool, why: &str| -> Result<(), ConfigError> {
            if ok { Ok(()) } else { Err(ConfigError::new(name, env.raw(name).as_deref(), why.to_string())) }
        };
        order(
            "SEGMENTATION_GOLD_TOP_PERCENT",
            t.gold_top_share > t.diamond_top_share,
            "must be above SEGMENTATION_DIAMOND_TOP_PERCENT",
        )?;
        order(
            "SEGMENTATION_VALUE_MEDIUM_PERCENT",
            t.value_medium_share > t.value_high_share,
            "must be above SEGMENTATION_VALUE_HIGH_PERCENT",
        )?;
        order(
            "SEGMENTATION_CHURN_HIGH_SCORE",
            t.churn_high > t.churn_medium,
            "must be above SEGMENTATION_CHURN_MEDIUM_SCORE",
        )?;
        let incremental_idle = env.millis("SEGMENTATION_INCREMENTAL_IDLE_MS", 200)?;
        let consumers = env.bounded("SEGMENTATION_CONSUMERS", 2, 1, 16)? as usize;
        let operation_lease =
            std::time::Duration::from_secs(env.bounded("SEGMENTATION_OPERATION_LEASE_SECONDS", 30, 3, 3600)?);
        Ok(Self { thresholds: t, incremental_idle, consumers, operation_lease })
    }
}

/// What the kit needs to run segmentation.
pub const SPEC: ServiceSpec = ServiceSpec {
    name: SERVICE,
    grpc_services: &[GRPC_SERVICE],
    default_port: 50052,
    migrator: &MIGRATOR,
    descriptors: crm_proto::FILE_DESCRIPTOR_SET,
    vars: SEGMENTATION_VARS,
    long_running: &["StreamSegmentMembers"],
};

use crm_kit::auth::roles::{ANY, DESIGNERS};
use crm_kit::{AccessPolicy, Kit, KitError};
use crm_proto::segmentation::v1::segmentation_service_server::SegmentationServiceServer;

/// Who may call what (SEC-1).
pub fn access_policy() -> AccessPolicy {
    use crm_kit::Role::{Admin, Analyst, Service};
    AccessPolicy::new().service(
        GRPC_SERVICE,
        &[
            ("GetCustomerSegmentation", ANY),
            ("ListTierHistory", ANY),
            ("CreateSegment", DESIGNERS),
            ("GetSegment", ANY),
            ("ListSegments", ANY),
            ("UpdateSegment", DESIGNERS),
            ("DeleteSegment", DESIGNERS),
            ("PreviewSegment", DESIGNERS),
            ("ListSegmentMembers", ANY),
            ("StreamSegmentMembers", &[Admin, Analyst, Service]),
            ("ListCustomerSegments", ANY),
            ("StartRecompute", DESIGNERS),
            ("GetRecompute", DESIGNERS),
        ],
    )
}

/// Wires and serves segmentation: the read-model consumer, the recompute
/// worker and schedule, the incremental recompute, the outbox relay and the API.
pub async fn run(mut kit: Kit) -> Result<(), KitError> {
    let config = SegmentationConfig::load(&Env::process())?;
    kit.spawn_outbox_relay();
    kit.spawn_consumers(&["profiles", "feedback"], read_model::ReadModel, config.consumers)?;
    let signal = kit.shutdown_signal();
    let worker = kit.config.consumer_name.clone();
    kit.spawn(jobs::run(kit.pg.clone(), worker, config.thresholds.clone(), config.operation_lease, signal));
    let signal = kit.shutdown_signal();
    kit.spawn(jobs::run_incremental(kit.pg.clone(), config.thresholds, config.incremental_idle, signal));
    let routes = tonic::service::Routes::new(
        SegmentationServiceServer::new(api::SegmentationApi::new(kit.pg.clone()))
            .max_decoding_message_size(kit.config.max_message_bytes),
    );
    kit.serve(routes, access_policy()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_segmentation_variable_is_documented() {
        let doc = include_str!("../../../docs/configuration.md");
        for v in SEGMENTATION_VARS {
            assert!(doc.contains(&format!("`{}`", v.name)), "docs/configuration.md does not document {}", v.name);
        }
    }

    #[test]
    fn the_documented_defaults_are_the_spec_defaults() {
        let defaults = Env::from_pairs(SEGMENTATION_VARS.iter().map(|v| (v.name, v.default)));
        let loaded = SegmentationConfig::load(&defaults).expect("defaults load");
        assert_eq!(loaded, SegmentationConfig::load(&Env::from_pairs::<&str, &str>([])).expect("empty loads"));
        assert_eq!(loaded.thresholds, domain::Thresholds::default());
    }

    #[test]
    fn thresholds_are_configurable_and_bad_ones_fail_naming_the_variable() {
        let load = |pairs: &[(&str, &str)]| SegmentationConfig::load(&Env::from_pairs(pairs.iter().copied()));
        let t = load(&[("SEGMENTATION_DIAMOND_TOP_PERCENT", "10"), ("SEGMENTATION_PROMOTION_MONTHS", "4")])
            .expect("valid")
            .thresholds;
        assert_eq!((t.diamond_top_share, t.promotion_months), (0.10, 4));
        for (name, value) in [
            ("SEGMENTATION_DIAMOND_TOP_PERCENT", "0"),
            ("SEGMENTATION_RFM_WINDOW_MONTHS", "25"),
            ("SEGMENTATION_CHURN_RESPONSE_PERCENT", "abc"),
            ("SEGMENTATION_GOLD_TOP_PERCENT", "5"),
            ("SEGMENTATION_CHURN_HIGH_SCORE", "20"),
        ] {
            let e = load(&[(name, value)]).expect_err(name).to_string();
            assert!(e.contains(name), "{name}={value}: {e}");
        }
    }

    #[test]
    fn every_rpc_declares_its_roles() {
        let undeclared = access_policy().undeclared(crm_proto::FILE_DESCRIPTOR_SET, &[GRPC_SERVICE]).unwrap();
        assert!(undeclared.is_empty(), "{undeclared:?}");
    }
}
