//! `ephemera dev` end to end: the printed lines work pasted as they are, the
//! admin sees the live session's lease, Ctrl-C stops everything and leaves
//! no role, and a second run reuses the CA and the cluster.
#![allow(clippy::unwrap_used, clippy::too_many_lines)] // a test: a panic is its failure message; scenarios read top to bottom

use crate::common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::proxy::{free_port, signal};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Start `ephemera dev`; return it and the printed command lines.
async fn start_dev(dir: &Path, listen: &str, admin: &str) -> (Child, Vec<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ephemera"))
        .args(["dev", "--dir"])
        .arg(dir)
        .args(["--listen", listen, "--admin-listen", admin])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("ephemera dev starts");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut commands = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let line = tokio::time::timeout_at(deadline.into(), lines.next_line())
            .await
            .expect("ephemera dev prints its instructions in time")
            .expect("read stdout")
            .expect("ephemera dev exited before it was ready");
        if line.starts_with("  psql ")
            || line.starts_with("  PGPASSWORD=")
            || line.contains(" leases list ")
            || line.contains(" exec ")
            || line.contains(" connect --to ")
        {
            commands.push(line.trim().to_owned());
        }
        if line.starts_with("Press Ctrl-C") {
            break;
        }
    }
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, commands)
}

async fn sh(line: &str) -> std::process::Output {
    Command::new("sh")
        .args(["-c", line])
        .env(
            "PATH",
            format!(
                "{}:{}",
                common::cluster().bin_dir().display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .output()
        .await
        .expect("sh runs")
}

fn text(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_runs_pasted_lines_and_stops_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let listen = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let (mut dev, commands) = start_dev(dir.path(), &listen, &admin).await;
    assert_eq!(
        commands.len(),
        6,
        "psql, token psql, leases list, exec, connect and credential-less psql lines: {commands:?}"
    );
    let (psql_line, token_line, list_line, exec_line) =
        (&commands[0], &commands[1], &commands[2], &commands[3]);
    let (connect_line, bare_psql_line) = (&commands[4], &commands[5]);
    assert!(token_line.starts_with("PGPASSWORD="), "{token_line}");
    assert!(!token_line.contains("sslcert"), "{token_line}");

    // 1. The psql line, pasted as is.
    let out = sh(psql_line).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("eph_app_rw_") && text(&out).contains("hello from Ephemera"),
        "{}",
        text(&out)
    );

    // 1b. The dev token's line, pasted as is: no client certificate, the
    // token as the password; it lands as the dev issuer's identity.
    let out = sh(token_line).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("eph_app_rw_") && text(&out).contains("hello from Ephemera"),
        "{}",
        text(&out)
    );
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap_or_default();
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"lease_issued\"") && l.contains("\"dev:developer\"")),
        "{audit}"
    );

    // 2. A live session's lease shows in the printed leases line.
    let sleeper_line = psql_line.replace(
        "-c 'select current_user, message from greetings'",
        "-c 'select pg_sleep(30)'",
    );
    assert_ne!(&sleeper_line, psql_line);
    let mut sleeper = Command::new("sh")
        .args(["-c", &sleeper_line])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("a live session");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = sh(list_line).await;
        assert!(out.status.success(), "{}", text(&out));
        if text(&out)
            .lines()
            .any(|l| l.contains("active") && l.contains("spiffe://ephemera.dev/app/web"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the live lease never showed: {}",
            text(&out)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 3. The exec line.
    let out = sh(exec_line).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("eph_nightly_"), "{}", text(&out));

    // 4. The connector line, and psql with no credentials through it.
    assert!(!bare_psql_line.contains("ssl"), "{bare_psql_line}");
    let mut connector = Command::new("sh")
        .args(["-c", &format!("exec {connect_line}")])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("the connector line runs");
    let port = bare_psql_line
        .split("port=")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .expect("a port in the psql line");
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(format!("127.0.0.1:{port}"))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "the connector never listened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = sh(bare_psql_line).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("eph_app_rw_") && text(&out).contains("hello from Ephemera"),
        "{}",
        text(&out)
    );
    signal(&connector, libc::SIGTERM);
    let status = tokio::time::timeout(Duration::from_secs(15), connector.wait())
        .await
        .expect("the connector stops on SIGTERM")
        .expect("wait");
    assert!(status.success(), "{status:?}");

    // Ctrl-C: leases revoked (the live session is terminated), cluster stopped, exit 0.
    signal(&dev, libc::SIGINT);
    let status = tokio::time::timeout(Duration::from_secs(30), dev.wait())
        .await
        .expect("ephemera dev stops")
        .expect("wait");
    assert!(status.success(), "{status:?}");
    let ended = tokio::time::timeout(Duration::from_secs(5), sleeper.wait())
        .await
        .expect("the live session was ended")
        .expect("wait");
    assert!(!ended.success());
    let data_dir = dir.path().canonicalize().expect("dir").join("pg");
    let left = std::process::Command::new("pgrep")
        .args(["-f", &format!("postgres -D {}", data_dir.display())])
        .output()
        .expect("pgrep");
    assert!(
        left.stdout.is_empty(),
        "postgres still running: {}",
        String::from_utf8_lossy(&left.stdout)
    );

    // A second run reuses the CA and the cluster; no role survived the first.
    let ca_before = std::fs::read(dir.path().join("certs/ca.pem")).expect("CA");
    let (mut again, commands) = start_dev(dir.path(), &listen, &admin).await;
    assert_eq!(
        std::fs::read(dir.path().join("certs/ca.pem")).expect("CA"),
        ca_before
    );
    let config = std::fs::read_to_string(dir.path().join("config.toml")).expect("config");
    let port = config
        .lines()
        .find_map(|l| l.strip_prefix("port = "))
        .expect("upstream port")
        .to_owned();
    let password =
        std::fs::read_to_string(dir.path().join("secrets/superuser-password")).expect("password");
    let out = Command::new(common::proxy::psql())
        .args([
            &format!(
                "host=127.0.0.1 port={port} dbname=postgres user=postgres sslmode=verify-full sslrootcert={}",
                dir.path().join("certs/ca.pem").display()
            ),
            "-X",
            "-A",
            "-t",
            "-c",
            "select count(*) from pg_roles where rolname like 'eph\\_%'",
        ])
        .env("PGPASSWORD", password.trim())
        .output()
        .await
        .expect("psql");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "0",
        "{}",
        text(&out)
    );
    let out = sh(&commands[0]).await;
    assert!(
        out.status.success(),
        "the reused setup works: {}",
        text(&out)
    );
    signal(&again, libc::SIGTERM);
    let status = tokio::time::timeout(Duration::from_secs(30), again.wait())
        .await
        .expect("stops")
        .expect("wait");
    assert!(status.success());
}
