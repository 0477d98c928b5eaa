//! OPS-3: a bad configuration value stops start-up with a message naming the variable.

use std::process::Command;

fn run_with(vars: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_crm-profiles"));
    cmd.env_clear()
        .env("AUTH_MODE", "disabled")
        .env("METRICS_LISTEN_ADDR", "off")
        .env("GRPC_LISTEN_ADDR", "127.0.0.1:0");
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run crm-profiles");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).to_string())
}

#[test]
fn bad_values_fail_start_up_naming_the_variable() {
    for (var, value) in [
        ("REQUEST_TIMEOUT_MS", "soon"),
        ("DATABASE_URL", "mysql://somewhere"),
        ("LOG_FORMAT", "xml"),
        ("MAX_CONCURRENT_REQUESTS", "-3"),
        ("GRPC_LISTEN_ADDR", "localhost"),
    ] {
        let (code, stderr) = run_with(&[(var, value)]);
        assert_eq!(code, Some(2), "{var}: {stderr}");
        assert!(stderr.contains(var), "{var} is not named in: {stderr}");
    }
    let (code, stderr) = run_with(&[("AUTH_MODE", "jwt")]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("JWT_SECRET"), "{stderr}");
}

#[test]
fn config_lists_every_variable_with_its_default() {
    let out = Command::new(env!("CARGO_BIN_EXE_crm-profiles")).arg("config").output().expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    for v in crm_kit::config::KIT_VARS.iter().chain(crm_profiles::PROFILE_VARS) {
        assert!(text.contains(v.name), "{} missing from `crm-profiles config`", v.name);
    }
}
