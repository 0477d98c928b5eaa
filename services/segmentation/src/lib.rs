//! The segmentation service: which group is each customer in, and why
//! (SPEC 4.2). This first part is the read model built from profiles'
//! events ([`read_model`]); scores, tiers, segments and the gRPC API build on it.

pub mod domain;
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
