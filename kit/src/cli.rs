//! The command line every service binary shares:
//!
//! - `<service>` or `<service> serve`: run the server;
//! - `<service> migrate`: apply migrations and exit (Kubernetes Job);
//! - `<service> replay --since <time>`: publish the events written since
//!   then again (REL-3; consumers skip what they have);
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
        "serve" | "migrate" | "replay" => {}
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
            println!("usage: {} [serve | migrate | replay --since TIME | config]", spec.name);
            println!("  serve    run the gRPC server (default)");
            println!("  migrate  apply database migrations and exit");
            println!("  replay   publish again the events written since TIME (RFC 3339, or e.g. 6h or 2d ago)");
            println!("  config   list the environment variables, their defaults and meaning");
            return ExitCode::SUCCESS;
        }
        other => {
            eprintln!("{}: unknown command {other:?}; try --help", spec.name);
            return ExitCode::from(2);
        }
    }
    let since = match command {
        "replay" => match replay_since(&args[1..], chrono::Utc::now()) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("{}: {e}", spec.name);
                return ExitCode::from(2);
            }
        },
        _ => None,
    };
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
        if let Some(since) = since {
            let pg = crate::db::pg_pool(&config)?;
            let n = crate::outbox::replay(&pg, since).await.map_err(|e| KitError::Serve(format!("replay: {e}")))?;
            tracing::info!(events = n, since = %since, "events marked for publishing again; a running replica's relay publishes them");
            println!("{n} events since {since} will be published again by the relay");
            return Ok(());
        }
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

/// The time of `replay --since TIME`: RFC 3339, or an age such as `6h`, `2d`, `30m`.
fn replay_since(args: &[String], now: chrono::DateTime<chrono::Utc>) -> Result<chrono::DateTime<chrono::Utc>, String> {
    let value = match args {
        [flag, v] if flag == "--since" => v.as_str(),
        _ => return Err("usage: replay --since TIME (RFC 3339, or an age such as 6h, 2d, 30m)".into()),
    };
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(value) {
        return Ok(t.with_timezone(&chrono::Utc));
    }
    let (n, unit) = value.split_at(value.len().saturating_sub(1));
    let n: i64 = n.parse().map_err(|_| format!("--since {value:?}: expected RFC 3339 or an age such as 6h"))?;
    let age = match unit {
        "m" => chrono::Duration::minutes(n),
        "h" => chrono::Duration::hours(n),
        "d" => chrono::Duration::days(n),
        _ => return Err(format!("--since {value:?}: an age ends in m, h or d")),
    };
    Ok(now - age)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_takes_a_time_or_an_age() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-12-05T12:00:00Z").unwrap().with_timezone(&chrono::Utc);
        let args = |v: &str| vec!["--since".to_string(), v.to_string()];
        assert_eq!(replay_since(&args("6h"), now).unwrap(), now - chrono::Duration::hours(6));
        assert_eq!(replay_since(&args("2d"), now).unwrap(), now - chrono::Duration::days(2));
        assert_eq!(
            replay_since(&args("2026-12-01T00:00:00+08:00"), now).unwrap().to_rfc3339(),
            "2026-11-30T16:00:00+00:00"
        );
        assert!(replay_since(&args("soon"), now).is_err());
        assert!(replay_since(&[], now).is_err());
    }
}
