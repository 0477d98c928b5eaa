//! REL-2: PostgreSQL down means a fast UNAVAILABLE and NOT_SERVING; when it
//! comes back the service recovers without a restart. Uses a private
//! PostgreSQL on a spare port (the shared server is never touched).

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::pb;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// A throwaway PostgreSQL cluster run as the `postgres` system user.
struct PrivatePostgres {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
}

impl PrivatePostgres {
    fn create() -> Option<Self> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .find(|p| p.join("initdb").exists())?;
        let dir = std::env::temp_dir().join(format!("crm-pg-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).ok()?;
        Command::new("chown").args(["postgres:postgres", dir.to_str()?]).status().ok()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
        let pg = PrivatePostgres { bin, dir, port };
        let ok = pg.as_postgres("initdb", &["-D", pg.dir.to_str()?, "-U", "postgres", "--auth=trust", "-E", "UTF8"]);
        ok.then_some(pg)
    }

    fn as_postgres(&self, tool: &str, args: &[&str]) -> bool {
        let tool = self.bin.join(tool);
        let mut cmd = if nix_uid_is_root() { Command::new("runuser") } else { Command::new(&tool) };
        if nix_uid_is_root() {
            cmd.args(["-u", "postgres", "--"]).arg(&tool);
        }
        cmd.args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn start(&self) -> bool {
        let opts = format!("-p {} -k {} -c listen_addresses=127.0.0.1", self.port, self.dir.display());
        let log = self.dir.join("log");
        self.as_postgres(
            "pg_ctl",
            &[
                "-D",
                self.dir.to_str().unwrap_or_default(),
                "-o",
                &opts,
                "-l",
                log.to_str().unwrap_or_default(),
                "-w",
                "start",
            ],
        )
    }

    fn stop(&self) -> bool {
        self.as_postgres("pg_ctl", &["-D", self.dir.to_str().unwrap_or_default(), "-m", "immediate", "-w", "stop"])
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn nix_uid_is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

async fn status(health: &mut HealthClient<tonic::transport::Channel>) -> i32 {
    health.check(HealthCheckRequest { service: String::new() }).await.map(|r| r.into_inner().status).unwrap_or(-1)
}

async fn wait_status(health: &mut HealthClient<tonic::transport::Channel>, want: ServingStatus) -> bool {
    for _ in 0..100 {
        if status(health).await == want as i32 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test]
async fn a_database_outage_is_unavailable_and_not_serving_and_heals_without_restart() {
    let Some(pg) = PrivatePostgres::create() else {
        panic!(
            "cannot create a private PostgreSQL cluster (initdb under /usr/lib/postgresql, run as the postgres user)"
        );
    };
    assert!(pg.start(), "private PostgreSQL starts");
    let mut config = common::test_config().await;
    config.database_url = format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port);
    config.database_acquire_timeout = Duration::from_millis(500);
    let run = common::start(config).await;
    let mut health = HealthClient::new(crm_kit::client::channel(&run.url).expect("channel"));
    let mut client = common::client(&run.url, common::admin()).await;
    let note = |id: &str| pb::RecordNoteRequest { request_id: id.into(), note: "n".into() };

    assert!(wait_status(&mut health, ServingStatus::Serving).await, "SERVING while PostgreSQL is up");
    client.record_note(note("before")).await.expect("works while up");

    assert!(pg.stop(), "private PostgreSQL stops");
    assert!(wait_status(&mut health, ServingStatus::NotServing).await, "NOT_SERVING while PostgreSQL is down");
    let started = std::time::Instant::now();
    let err = client.record_note(note("during")).await.expect_err("no database");
    assert_eq!(err.code(), Code::Unavailable);
    assert!(started.elapsed() < Duration::from_secs(3), "fails fast: {:?}", started.elapsed());

    assert!(pg.start(), "private PostgreSQL starts again");
    assert!(wait_status(&mut health, ServingStatus::Serving).await, "SERVING again without a restart");
    let mut recovered = false;
    for attempt in 0..20 {
        if client.record_note(note(&format!("after-{attempt}"))).await.is_ok() {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(recovered, "requests succeed again without a restart");
    run.shutdown.trigger();
}
