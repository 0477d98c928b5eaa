//! `crm-analytics [serve | migrate | config]`.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    crm_kit::cli::main(crm_analytics::SPEC, crm_analytics::run)
}
