//! Generates the Rust code of every `crm.*.v1` contract and the encoded
//! descriptor set that server reflection serves. Uses the vendored `protoc`,
//! so no system protobuf compiler is needed.
use std::path::PathBuf;

const PROTOS: &[&str] = &[
    // Served by reflection only, so grpcurl can print rich error details.
    "google/rpc/error_details.proto",
    "crm/common/v1/common.proto",
    "crm/profiles/v1/profiles.proto",
    "crm/segmentation/v1/segmentation.proto",
    "crm/outreach/v1/outreach.proto",
    "crm/feedback/v1/feedback.proto",
    "crm/analytics/v1/analytics.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let well_known = protoc_bin_vendored::include_path()?;
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let include = well_known.to_string_lossy().into_owned();
    // Type names let events be packed into `google.protobuf.Any` by type.
    let mut config = tonic_prost_build::Config::new();
    config.enable_type_names();
    // Deterministic encoding of maps: idempotency fingerprints hash requests.
    config.btree_map(["."]);
    // Undecodable requests are INVALID_ARGUMENT, not INTERNAL (src/codec.rs).
    tonic_prost_build::configure()
        .codec_path("crate::codec::Codec")
        .file_descriptor_set_path(out_dir.join("crm_descriptor.bin"))
        .compile_with_config(config, PROTOS, &[".", include.as_str()])?;
    Ok(())
}
