//! Mints a JWT for local use (SEC-1), signed with the HS256 secret the
//! services verify (`JWT_SECRET` or `JWT_SECRET_FILE`).
//!
//! ```text
//! crm-token --role admin --pii --subject alice --ttl 8h
//! ```

use std::process::ExitCode;
use std::time::Duration;

use crm_kit::auth::{PII_READ, Role, TokenRequest, mint};
use crm_kit::config::Env;

const USAGE: &str = "usage: crm-token [--role admin|agent|analyst|service]... [--pii] [--subject NAME] [--ttl 30m|8h|7d]\n\
reads JWT_SECRET or JWT_SECRET_FILE (HS256), JWT_ISSUER (default crm) and JWT_AUDIENCE (default crm)";

fn main() -> ExitCode {
    match run(std::env::args().skip(1).collect()) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(msg) => {
            eprintln!("crm-token: {msg}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn run(args: Vec<String>) -> Result<String, String> {
    let mut roles = Vec::new();
    let mut permissions = Vec::new();
    let mut subject = std::env::var("USER").unwrap_or_else(|_| "developer".into());
    let mut ttl = Duration::from_secs(8 * 3600);
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--role" => {
                let v = it.next().ok_or("--role needs a value")?;
                roles.push(Role::parse(&v).ok_or_else(|| format!("unknown role {v:?}"))?);
            }
            "--pii" => permissions.push(PII_READ.to_string()),
            "--subject" => subject = it.next().ok_or("--subject needs a value")?,
            "--ttl" => ttl = parse_ttl(&it.next().ok_or("--ttl needs a value")?)?,
            "-h" | "--help" => return Err("help".into()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if roles.is_empty() {
        roles.push(Role::Admin);
    }
    let env = Env::process();
    let secret = crm_kit::auth::secret_from_env(&env)?;
    let request = TokenRequest {
        subject,
        roles,
        permissions,
        ttl,
        issuer: env.raw("JWT_ISSUER").unwrap_or_else(|| "crm".into()),
        audience: env.raw("JWT_AUDIENCE").unwrap_or_else(|| "crm".into()),
    };
    mint(&secret, &request).map_err(|e| e.to_string())
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    let (n, unit) = s.split_at(s.len().saturating_sub(1));
    let n: u64 = n.parse().map_err(|_| format!("bad --ttl {s:?}"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return Err(format!("bad --ttl {s:?}: use s, m, h or d")),
    };
    Ok(Duration::from_secs(secs))
}
