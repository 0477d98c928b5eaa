//! Compiles the probe contract used only by the kit's own integration tests
//! (a tiny service exercising auth, idempotency, outbox and propagation).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Migrations are embedded by `sqlx::migrate!`: rebuild when one changes.
    println!("cargo:rerun-if-changed=migrations");
    println!("cargo:rerun-if-changed=tests/migrations");
    println!("cargo:rerun-if-changed=tests/proto");
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let mut config = tonic_prost_build::Config::new();
    config.enable_type_names();
    tonic_prost_build::configure()
        .codec_path("crm_proto::codec::Codec")
        .file_descriptor_set_path(std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("kittest_descriptor.bin"))
        .compile_with_config(config, &["tests/proto/probe.proto"], &["tests/proto"])?;
    Ok(())
}
