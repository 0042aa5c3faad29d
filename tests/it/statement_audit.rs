//! Statement audit (issue 19): one `statement` event per statement, with
//! its outcome, from psql, tokio-postgres (simple, extended, pipelined,
//! COPY), psycopg's pipeline mode and pgbench; none for a template without
//! `audit_statements`; and what a full audit queue does to `block` and
//! `drop` templates while everyone else goes on.
#![allow(clippy::unwrap_used, clippy::too_many_lines)] // a test: a panic is its failure message

use crate::common;

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::proxy::{start_proxy_with_extra_config, ProxyFiles, ProxyOptions, TestProxy, DATABASE};
use serde_json::Value;

/// This file's own identity: revoke-by-identity tests elsewhere must not
/// end its sessions.
const AUDIT_ID: &str = "spiffe://example.org/ns/audit/sa/reporter";

fn policy(templates: &[&str]) -> String {
    let list: Vec<String> = templates.iter().map(|t| format!("\"{t}\"")).collect();
    format!(
        "[[policy]]\nspiffe_id = \"{AUDIT_ID}\"\ntemplates = [{}]\n",
        list.join(", ")
    )
}

fn statements_of(events: &[Value], template: &str) -> Vec<Value> {
    events
        .iter()
        .filter(|e| e["event"] == "statement" && e["template"] == template)
        .cloned()
        .collect()
}

/// Poll the audit file until `template` has `count` statement events.
async fn wait_for_statements(proxy: &TestProxy, template: &str, count: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let found = statements_of(&proxy.files.audit_events(), template);
        if found.len() >= count || Instant::now() > deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn texts(events: &[Value]) -> Vec<(String, String, String)> {
    events
        .iter()
        .map(|e| {
            let outcome = e["command_tag"]
                .as_str()
                .or(e["sqlstate"].as_str())
                .unwrap_or("")
                .to_string();
            (
                e["statement"].as_str().unwrap().to_string(),
                e["outcome"].as_str().unwrap().to_string(),
                outcome,
            )
        })
        .collect()
}

fn t(statement: &str, outcome: &str, tag: &str) -> (String, String, String) {
    (statement.into(), outcome.into(), tag.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_statement_is_one_event_with_its_outcome_in_order() {
    let options = ProxyOptions::templates(&[]);
    let extra = format!(
        "[templates.audit_on]\ndatabase = \"{DATABASE}\"\nmember_of = [\"billing_rw\"]\naudit_statements = true\naudit_parameters = true\naudit_statement_max_bytes = 64\n\
         [templates.audit_off]\ndatabase = \"{DATABASE}\"\nmember_of = [\"billing_rw\"]\n{}",
        policy(&["audit_on", "audit_off"])
    );
    let proxy = start_proxy_with_extra_config(options, &extra).await;
    let svid = proxy.svid(AUDIT_ID);

    // tokio-postgres: simple, extended with parameters, an error, COPY
    // both ways, and a pipeline of three (one failing).
    let client = proxy
        .connect(Some(&svid), "audit_on", DATABASE)
        .await
        .unwrap();
    client.simple_query("select 1; select 2").await.unwrap();
    let rows = client
        .query("select amount from invoices where id = $1", &[&1i32])
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    let error = client.simple_query("select 1/0").await.unwrap_err();
    assert_eq!(error.code().unwrap().code(), "22012");
    let long = format!("select '{}' as long", "x".repeat(200));
    client.simple_query(&long).await.unwrap();
    let (a, b, c) = tokio::join!(
        client.query_one("select $1::int + 1", &[&1i32]),
        client.query_one("select 1/$1::int", &[&0i32]),
        client.query_one("select $1::text", &[&"after"]),
    );
    assert_eq!(a.unwrap().get::<_, i32>(0), 2);
    assert!(b.is_err());
    assert_eq!(c.unwrap().get::<_, String>(0), "after");
    drop(client);

    let events = wait_for_statements(&proxy, "audit_on", 7).await;
    let seen = texts(&events);
    // tokio-postgres prepares each extended statement first (its own
    // Parse/Describe/Sync), then binds and executes it: one event per
    // Execute.
    assert_eq!(
        seen[..4],
        [
            t("select 1; select 2", "ok", "SELECT 1; SELECT 1"),
            t(
                "select amount from invoices where id = $1",
                "ok",
                "SELECT 1"
            ),
            t("select 1/0", "error", "22012"),
            t(&long[..64], "ok", "SELECT 1"),
        ],
        "{events:#?}"
    );
    let piped: Vec<_> = seen[4..].to_vec();
    assert!(
        piped.len() == 3
            && piped.contains(&t("select $1::int + 1", "ok", "SELECT 1"))
            && piped.contains(&t("select 1/$1::int", "error", "22012"))
            && piped.contains(&t("select $1::text", "ok", "SELECT 1")),
        "{seen:?}"
    );
    // tokio-postgres sends parameters in binary.
    assert_eq!(events[1]["parameters"], serde_json::json!(["\\x00000001"]));
    assert_eq!(events[1]["protocol"], "extended");
    assert_eq!(events[0]["protocol"], "simple");
    assert_eq!(events[3]["statement_cut"], true);
    assert_eq!(events[3]["statement_bytes"], long.len());
    assert_eq!(
        events[3]["statement_sha256"].as_str().unwrap(),
        hex_sha256(long.as_bytes())
    );
    let lease_id = events[0]["lease_id"].as_str().unwrap();
    for e in &events {
        assert_eq!(e["lease_id"].as_str(), Some(lease_id), "one lease: {e}");
        assert_eq!(e["identity"], AUDIT_ID);
        assert_eq!(e["database"], DATABASE);
        assert!(e["client_addr"].as_str().unwrap().starts_with("127.0.0.1:"));
        assert!(e["duration_us"].as_u64().is_some());
    }
    let issued = proxy
        .files
        .audit_events()
        .into_iter()
        .find(|e| e["event"] == "lease_issued" && e["lease_id"].as_str() == Some(lease_id));
    assert!(issued.is_some(), "the lease's story is one filter away");

    // psql, and pgbench with the extended protocol.
    let before = statements_of(&proxy.files.audit_events(), "audit_on").len();
    let psql = common::proxy::psql();
    let conninfo = proxy.conninfo(&svid, "audit_on", DATABASE);
    let script = "select 40 + 2;\nselect nope;\ncreate temp table notes (n text);\n\
                  copy notes from stdin;\none\ntwo\n\\.\ncopy notes to stdout;\n";
    let mut child = std::process::Command::new(&psql)
        .args([conninfo.as_str(), "-X", "-A", "-t", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), script.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains("42") && printed.contains("one\ntwo"),
        "{printed}"
    );
    let got = wait_for_statements(&proxy, "audit_on", before + 5).await;
    assert_eq!(
        texts(&got[before..]),
        [
            t("select 40 + 2;", "ok", "SELECT 1"),
            t("select nope;", "error", "42703"),
            t("create temp table notes (n text);", "ok", "CREATE TABLE"),
            t("copy notes from stdin;", "ok", "COPY 2"),
            t("copy notes to stdout;", "ok", "COPY 2"),
        ]
    );
    let copy_in = &got[before + 3];
    // psql 15 also sends its `\.` line as data.
    assert_eq!(copy_in["copy_direction"], "in");
    assert!(
        (8..=11).contains(&copy_in["copy_bytes"].as_u64().unwrap()),
        "{copy_in}"
    );
    assert_eq!(got[before + 4]["copy_direction"], "out");
    assert_eq!(got[before + 4]["copy_bytes"], 8);
    let before = got.len();
    let script = proxy.files.dir.path().join("bench.sql");
    std::fs::write(&script, "select 1;\nselect count(*) from invoices;\n").unwrap();
    let pgbench = common::cluster().bin_dir().join("pgbench");
    let out = std::process::Command::new(&pgbench)
        .args(["-n", "-M", "extended", "-t", "5", "-f"])
        .arg(&script)
        .arg(&conninfo)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = wait_for_statements(&proxy, "audit_on", before + 10).await;
    let bench: Vec<_> = texts(&got[before..]);
    assert_eq!(bench.len(), 10, "{bench:?}");
    for pair in bench.chunks(2) {
        assert_eq!(
            pair,
            [
                t("select 1;", "ok", "SELECT 1"),
                t("select count(*) from invoices;", "ok", "SELECT 1")
            ]
        );
    }

    // psycopg 3's pipeline mode.
    {
        let before = got.len();
        let code = r#"
import sys, psycopg
with psycopg.connect(sys.argv[1]) as conn:
    with conn.pipeline():
        conn.execute("select %s::text", ("one",))
        conn.execute("select %s::text", ("two",))
        conn.execute("select %s::text", ("three",))
"#;
        let out = std::process::Command::new("python3")
            .args(["-c", code, &conninfo])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got = wait_for_statements(&proxy, "audit_on", before + 3).await;
        let piped: Vec<_> = got[before..]
            .iter()
            .filter(|e| e["statement"] == "select $1::text")
            .collect();
        assert_eq!(piped.len(), 3, "{:#?}", &got[before..]);
        let params: Vec<&Value> = piped.iter().map(|e| &e["parameters"][0]).collect();
        assert_eq!(
            params,
            [
                &Value::from("one"),
                &Value::from("two"),
                &Value::from("three")
            ]
        );
    }

    // The unaudited template: sessions, no statement events.
    let client = proxy
        .connect(Some(&svid), "audit_off", DATABASE)
        .await
        .unwrap();
    client.simple_query("select 1").await.unwrap();
    drop(client);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !proxy
        .files
        .audit_events()
        .iter()
        .any(|e| e["event"] == "revoked" && e["template"] == "audit_off")
    {
        assert!(Instant::now() < deadline, "the audit_off lease never ended");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(statements_of(&proxy.files.audit_events(), "audit_off").is_empty());
    proxy.shutdown().await;
}

fn hex_sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A FIFO as the audit file, opened for reading but not read: the
/// writer blocks as on a stuck disk. `drain` starts reading it.
struct StuckDisk {
    fifo: std::fs::File,
    read: Arc<Mutex<Vec<u8>>>,
}

impl StuckDisk {
    fn new(path: &Path) -> StuckDisk {
        let made = std::process::Command::new("mkfifo")
            .arg(path)
            .status()
            .unwrap();
        assert!(made.success());
        let fifo = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .unwrap();
        StuckDisk {
            fifo,
            read: Arc::default(),
        }
    }

    fn drain(self) -> Arc<Mutex<Vec<u8>>> {
        let read = self.read.clone();
        let mut fifo = self.fifo;
        std::thread::spawn(move || {
            let mut buf = vec![0; 64 * 1024];
            loop {
                match fifo.read(&mut buf) {
                    Ok(0) => std::thread::sleep(Duration::from_millis(5)),
                    Ok(n) => read.lock().unwrap().extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => return,
                }
            }
        });
        self.read
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_audit_disk_stalls_only_block_templates_and_drop_counts() {
    let options = ProxyOptions::templates(&[]);
    let files = ProxyFiles::write(&options, "127.0.0.1:0").await;
    let fifo_path = files.dir.path().join("audit.fifo");
    let stuck = StuckDisk::new(&fifo_path);
    let mut config = std::fs::read_to_string(&files.config_path).unwrap();
    config = config.replace(
        "path = \"audit.jsonl\"",
        "path = \"audit.fifo\"\nstatement_queue = 8",
    );
    let template = |name: &str, extra: &str| {
        format!("[templates.{name}]\ndatabase = \"{DATABASE}\"\nmember_of = [\"billing_rw\"]\n{extra}\n")
    };
    config.push_str(&template(
        "audit_block",
        "audit_statements = true\naudit_overflow = \"block\"",
    ));
    config.push_str(&template(
        "audit_drop",
        "audit_statements = true\naudit_overflow = \"drop\"",
    ));
    config.push_str(&template("audit_plain", ""));
    config.push_str(&policy(&["audit_block", "audit_drop", "audit_plain"]));
    std::fs::write(&files.config_path, config).unwrap();
    let proxy = TestProxy::serve(files).await;
    let svid = proxy.svid(AUDIT_ID);

    // The block session runs until its audit cannot keep up: the pipe
    // (64 KiB) and the queue (8) fill, and its next statement waits.
    let blocked = proxy
        .connect(Some(&svid), "audit_block", DATABASE)
        .await
        .unwrap();
    let blocked = Arc::new(blocked);
    let mut stalled = None;
    for n in 0..20_000 {
        let query = blocked.simple_query("select 'a statement of some length, to fill the pipe'");
        if tokio::time::timeout(Duration::from_secs(2), query)
            .await
            .is_err()
        {
            stalled = Some(n);
            break;
        }
    }
    let stalled_at =
        stalled.expect("a block template's session waits when the audit queue is full");
    // A statement now waits, while the other templates go on.
    let waiting = {
        let blocked = blocked.clone();
        tokio::spawn(async move {
            blocked
                .simple_query("select 'after the stall'")
                .await
                .map(|_| ())
        })
    };
    let plain = proxy
        .connect(Some(&svid), "audit_plain", DATABASE)
        .await
        .unwrap();
    plain.simple_query("select 1").await.unwrap();
    let dropping = proxy
        .connect(Some(&svid), "audit_drop", DATABASE)
        .await
        .unwrap();
    for _ in 0..50 {
        tokio::time::timeout(
            Duration::from_secs(5),
            dropping.simple_query("select 'dropped'"),
        )
        .await
        .expect("a drop template's session never waits")
        .unwrap();
    }
    assert!(!waiting.is_finished(), "the block session still waits");

    // The disk comes back: the waiting statement completes, and the drop
    // session's next event says how many were dropped before it.
    let read = stuck.drain();
    tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the block session resumes when the disk does")
        .unwrap()
        .unwrap();
    dropping.simple_query("select 'counted'").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let counted = loop {
        let text = String::from_utf8_lossy(&read.lock().unwrap()).into_owned();
        let found = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|e| e["statement"] == "select 'counted'");
        if let Some(event) = found {
            break event;
        }
        assert!(
            Instant::now() < deadline,
            "the drop session's event after the stall never came"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        counted["dropped_before"].as_u64().unwrap_or(0) >= 40,
        "stalled after {stalled_at}; {counted}"
    );
    let text = String::from_utf8_lossy(&read.lock().unwrap()).into_owned();
    let block_events = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["event"] == "statement" && e["template"] == "audit_block")
        .count();
    assert!(
        block_events > stalled_at,
        "no block event is lost: {block_events} of {stalled_at}+"
    );
    drop((plain, dropping));
    drop(blocked);
    proxy.shutdown().await;
}

fn ephemera(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ephemera"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whois_names_a_role_while_it_exists_and_after_it_is_dropped() {
    let options = ProxyOptions::templates(&[]);
    let extra = format!(
        "[templates.audit_whois]\ndatabase = \"{DATABASE}\"\nmember_of = [\"billing_rw\"]\naudit_statements = true\n{}",
        policy(&["audit_whois"])
    );
    let proxy = start_proxy_with_extra_config(options, &extra).await;
    let svid = proxy.svid(AUDIT_ID);
    let client = proxy
        .connect(Some(&svid), "audit_whois", DATABASE)
        .await
        .unwrap();
    let role: String = client
        .query_one("select session_user::text", &[])
        .await
        .unwrap()
        .get(0);
    let config = proxy.files.config_path.to_str().unwrap().to_owned();

    let (ok, out, err) = ephemera(&["whois", &role, "--config", &config, "--json"]);
    assert!(ok, "{err}");
    let owners: Value = serde_json::from_str(&out).unwrap();
    let owner = &owners[0];
    assert_eq!(owner["identity"], AUDIT_ID);
    assert_eq!(owner["template"], "audit_whois");
    assert_eq!(owner["database"], DATABASE);
    assert_eq!(owner["source"], "ledger");
    assert!(
        owner["client_addr"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{owner}"
    );
    let lease_id = owner["lease_id"].as_str().unwrap().to_owned();

    client.simple_query("select 'whois'").await.unwrap();
    drop(client);
    assert!(
        common::proxy::wait_until_no_roles(&role, Duration::from_secs(10)).await,
        "the role is dropped"
    );
    let audit_log = proxy.files.dir.path().join("audit.jsonl");
    let audit_log = audit_log.to_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let owner = loop {
        let (ok, out, err) = ephemera(&["whois", &role, "--audit-log", audit_log, "--json"]);
        assert!(ok, "{err}");
        let owners: Value = serde_json::from_str(&out).unwrap();
        if owners[0]["ended_at"].is_string() || Instant::now() > deadline {
            break owners[0].clone();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(owner["identity"], AUDIT_ID);
    assert_eq!(owner["lease_id"], lease_id.as_str());
    assert_eq!(owner["source"], "audit log");
    assert_eq!(owner["ended_by"], "revoked", "{owner}");
    let (ok, out, _) = ephemera(&["whois", &role, "--audit-log", audit_log]);
    assert!(
        ok && out.contains(AUDIT_ID) && out.contains("audit_whois"),
        "{out}"
    );

    // The lease's whole story, one filter.
    let (ok, out, err) = ephemera(&[
        "audit",
        "--audit-log",
        audit_log,
        "--lease",
        &lease_id,
        "--json",
    ]);
    assert!(ok, "{err}");
    let kinds: Vec<String> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["event"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    for kind in ["lease_issued", "login", "statement", "revoked"] {
        assert!(
            kinds.iter().any(|k| k == kind),
            "{kind} missing from {kinds:?}"
        );
    }
    let (ok, table, _) = ephemera(&["audit", "--audit-log", audit_log, "--lease", &lease_id]);
    assert!(ok && table.contains("select 'whois' → SELECT 1"), "{table}");
    let (ok, _, err) = ephemera(&["whois", "eph_nobody_at_all", "--audit-log", audit_log]);
    assert!(!ok && err.contains("no lease of role"), "{err}");
    proxy.shutdown().await;
}
