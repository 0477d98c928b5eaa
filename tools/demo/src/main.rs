//! `crm-demo seed [--customers N]`: loads the generated demo data set into
//! profiles (`make run` does it).
//!
//! `crm-demo run [--customers N]`: runs the retention loop end to end through
//! the five services' public gRPC APIs and prints a short report (`make demo`).
//!
//! Both sign their own token with the local JWT secret (`JWT_SECRET` or
//! `JWT_SECRET_FILE`); service URLs default to the ports of `make run`
//! (`--profiles URL` etc. to change them).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use crm_demo::{LoopConfig, Suite, Urls};
use crm_kit::auth::{Role, TokenRequest, mint};
use crm_kit::config::Env;

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(out) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("crm-demo: {e}");
            ExitCode::FAILURE
        }
    }
}

fn token() -> Result<String, String> {
    let env = Env::process();
    let secret = crm_kit::auth::secret_from_env(&env)?;
    mint(
        &secret,
        &TokenRequest {
            subject: "crm-demo".into(),
            roles: vec![Role::Admin, Role::Service, Role::Analyst],
            permissions: vec![],
            ttl: Duration::from_secs(3600),
            issuer: env.raw("JWT_ISSUER").unwrap_or_else(|| "crm".into()),
            audience: env.raw("JWT_AUDIENCE").unwrap_or_else(|| "crm".into()),
        },
    )
    .map_err(|e| e.to_string())
}

const USAGE: &str = "usage: crm-demo seed|run [--customers N] [--profiles URL] [--segmentation URL] [--outreach URL] [--feedback URL] [--analytics URL]";

async fn run() -> Result<String, String> {
    let mut args = std::env::args().skip(1);
    let command = args.next().unwrap_or_default();
    let mut urls = Urls::default();
    let mut cfg = LoopConfig::default();
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--customers" => cfg.customers = value()?.parse().map_err(|_| "--customers needs a number")?,
            "--profiles" => urls.profiles = value()?,
            "--segmentation" => urls.segmentation = value()?,
            "--outreach" => urls.outreach = value()?,
            "--feedback" => urls.feedback = value()?,
            "--analytics" => urls.analytics = value()?,
            other => return Err(format!("unknown argument {other:?}; {USAGE}")),
        }
    }
    let suite = Suite::connect(&urls, &token()?)?;
    match command.as_str() {
        "seed" => {
            let started = Instant::now();
            let s = crm_demo::seed(&suite, cfg.customers, cfg.seed).await?;
            Ok(format!(
                "demo data in profiles: {} customers created, {} already there; {} transactions and {} interactions recorded; consent set for {} customers ({:.1} s)",
                s.created,
                s.matched,
                s.transactions,
                s.interactions,
                s.consents,
                started.elapsed().as_secs_f64()
            ))
        }
        "run" => Ok(crm_demo::retention_loop(&suite, &cfg).await?.render()),
        _ => Err(USAGE.into()),
    }
}
