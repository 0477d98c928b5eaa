//! The command line every service binary shares:
//!
//! - `<service>` or `<service> serve`: run the server;
//! - `<service> migrate`: apply migrations and exit (Kubernetes Job);
//! - `<service> config`: list the environment variables with defaults.
//!
//! A bad configuration value exits with status 2 and a message naming the
//! variable, before anything else happens (OPS-3).

use std::future::Future;
use std::process::ExitCode;

use crate::config::{Env, KIT_VARS, KitConfig};
use crate::server::{Kit, KitError, ServiceSpec};
use crate::telemetry;

/// Runs a service binary. `run` receives the started [`Kit`] and serves.
pub fn main<F, Fut>(spec: ServiceSpec, run: F) -> ExitCode
where
    F: FnOnce(Kit) -> Fut,
    Fut: Future<Output = Result<(), KitError>>,
{
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = args.first().map(String::as_str).unwrap_or("serve");
    match command {
        "serve" | "migrate" => {}
        "config" => {
            // Written without println!, which panics when the reader goes away (`config | head`).
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "Environment variables of {} (default, meaning):", spec.name);
            for v in KIT_VARS.iter().chain(spec.vars) {
                let default = if v.default.is_empty() { "(unset)" } else { v.default };
                if writeln!(out, "  {:<30} {:<30} {}", v.name, default, v.doc).is_err() {
                    break;
                }
            }
            return ExitCode::SUCCESS;
        }
        "-h" | "--help" | "help" => {
            println!("usage: {} [serve | migrate | config]", spec.name);
            println!("  serve    run the gRPC server (default)");
            println!("  migrate  apply database migrations and exit");
            println!("  config   list the environment variables, their defaults and meaning");
            return ExitCode::SUCCESS;
        }
        other => {
            eprintln!("{}: unknown command {other:?}; try --help", spec.name);
            return ExitCode::from(2);
        }
    }
    let config = match KitConfig::load(spec.name, spec.default_port, &Env::process()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}: {e}", spec.name);
            return ExitCode::from(2);
        }
    };
    let runtime =
        match tokio::runtime::Builder::new_multi_thread().worker_threads(config.worker_threads).enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("{}: cannot start the async runtime: {e}", spec.name);
                return ExitCode::FAILURE;
            }
        };
    let result = runtime.block_on(async move {
        let _telemetry = telemetry::init(&config).map_err(|e| KitError::Wiring(e.to_string()))?;
        if command == "migrate" {
            Kit::migrate_only(spec, &config).await?;
            tracing::info!(schema = %config.database_schema, "migrations applied");
            return Ok(());
        }
        let kit = Kit::start(spec, config).await?;
        run(kit).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(KitError::Config(e)) => {
            eprintln!("{}: {e}", spec.name);
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("{}: {e}", spec.name);
            ExitCode::FAILURE
        }
    }
}
