//! `crm-profiles [serve | migrate | config]`.

// Measured in BENCHMARKS.md: markedly faster than glibc malloc for this workload.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    crm_kit::cli::main(crm_profiles::SPEC, crm_profiles::run)
}
