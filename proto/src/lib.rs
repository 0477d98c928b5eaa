//! The retention platform's gRPC contracts (`proto/crm/**`), generated at
//! build time. One module per protobuf package: `crm_proto::profiles::v1`, ...
//!
//! [`FILE_DESCRIPTOR_SET`] holds every contract's descriptors (comments
//! included) for server reflection, so grpcurl users need no .proto files.

pub mod codec;

/// Encoded `google.protobuf.FileDescriptorSet` of all `crm.*.v1` packages.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/crm_descriptor.bin"));

/// `crm.common.v1`: ids, money, channels, tiers, the event envelope.
pub mod common {
    pub mod v1 {
        tonic::include_proto!("crm.common.v1");
    }
}

/// `crm.profiles.v1` (SPEC 4.1).
pub mod profiles {
    pub mod v1 {
        tonic::include_proto!("crm.profiles.v1");
    }
}

/// `crm.segmentation.v1` (SPEC 4.2).
pub mod segmentation {
    pub mod v1 {
        tonic::include_proto!("crm.segmentation.v1");
    }
}

/// `crm.outreach.v1` (SPEC 4.3).
pub mod outreach {
    pub mod v1 {
        tonic::include_proto!("crm.outreach.v1");
    }
}

/// `crm.feedback.v1` (SPEC 4.4).
pub mod feedback {
    pub mod v1 {
        tonic::include_proto!("crm.feedback.v1");
    }
}

/// `crm.analytics.v1` (SPEC 4.5).
pub mod analytics {
    pub mod v1 {
        tonic::include_proto!("crm.analytics.v1");
    }
}

/// `google.rpc` error details, compiled so reflection can describe them
/// (the kit builds statuses with `tonic-types`).
pub mod google_rpc {
    tonic::include_proto!("google.rpc");
}

/// Every event payload message carries its fully-qualified protobuf name, so
/// an [`common::v1::EventEnvelope`] can be built and decoded without strings
/// scattered through the services.
pub trait EventPayload: prost::Message + prost::Name + Default {}
impl<T: prost::Message + prost::Name + Default> EventPayload for T {}
