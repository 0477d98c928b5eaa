//! `crm-profiles [serve | migrate | config]`.
fn main() -> std::process::ExitCode {
    crm_kit::cli::main(crm_profiles::SPEC, crm_profiles::run)
}
