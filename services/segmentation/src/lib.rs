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

/// Error domain and short name.
pub const SERVICE: &str = "segmentation";
/// The gRPC service.
pub const GRPC_SERVICE: &str = "crm.segmentation.v1.SegmentationService";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// What the kit needs to run segmentation.
pub const SPEC: ServiceSpec = ServiceSpec {
    name: SERVICE,
    grpc_services: &[GRPC_SERVICE],
    default_port: 50052,
    migrator: &MIGRATOR,
    descriptors: crm_proto::FILE_DESCRIPTOR_SET,
    vars: &[],
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
/// worker and schedule, the outbox relay and the API.
pub async fn run(mut kit: Kit) -> Result<(), KitError> {
    kit.spawn_outbox_relay();
    kit.spawn_consumer(&["profiles", "feedback"], read_model::ReadModel)?;
    let signal = kit.shutdown_signal();
    kit.spawn(jobs::run(kit.pg.clone(), kit.config.consumer_name.clone(), domain::Thresholds::default(), signal));
    let routes = tonic::service::Routes::new(SegmentationServiceServer::new(api::SegmentationApi::new(kit.pg.clone())));
    kit.serve(routes, access_policy()).await
}
