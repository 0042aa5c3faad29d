//! `ephemera exec --template T -- CMD`: a batch job with standalone
//! credentials in PG* variables, renewed while it runs and revoked when it
//! exits, against an in-process proxy and the real PostgreSQL.
#![allow(clippy::unwrap_used, clippy::too_many_lines)] // a test: a panic is its failure message; scenarios read top to bottom

use crate::common;

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::proxy::{
    path_str, psql, role_prefix, roles_with_prefix, signal, wait_until_no_roles, ProxyOptions,
    TestProxy, BILLING_ID,
};

/// How long any single `ephemera exec` run in these tests may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(30);

/// A proxy with an admin API and the given templates (plus `template_extra`).
async fn start_proxy(templates: &[&str], template_extra: &str) -> TestProxy {
    let mut options = ProxyOptions::templates(templates);
    options.admin_listen = Some("127.0.0.1:0".into());
    options.template_extra = template_extra.into();
    TestProxy::start(options).await
}

/// `ephemera exec --template <template> … -- <command…>` as [`BILLING_ID`],
/// reaching the database with `verify-full` against the cluster's CA. The
/// test's own PG* variables are removed; stdout and stderr are piped.
fn exec(proxy: &TestProxy, template: &str, command: &[&str]) -> tokio::process::Command {
    let (cert, key) = proxy.files.write_cert(&proxy.svid(BILLING_ID));
    let mut exec = tokio::process::Command::new(env!("CARGO_BIN_EXE_ephemera"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("PG") {
            exec.env_remove(name);
        }
    }
    exec.args(["exec", "--template", template, "--sslmode", "verify-full"])
        .arg("--sslrootcert")
        .arg(common::cluster().ca_pem_path())
        .arg("--")
        .args(command)
        .env(
            "EPHEMERA_ADMIN",
            format!("https://{}", proxy.admin_addr.expect("admin API")),
        )
        .env("EPHEMERA_CERT", cert)
        .env("EPHEMERA_KEY", key)
        .env("EPHEMERA_CA", &proxy.files.server_ca_path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    exec
}

/// Run to completion within [`RUN_TIMEOUT`].
async fn run(mut command: tokio::process::Command) -> Output {
    tokio::time::timeout(RUN_TIMEOUT, command.output())
        .await
        .expect("ephemera exec finishes in time")
        .expect("ephemera exec runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Audit events of `kind` for `template` whose actor is the job's identity,
/// once the lease's ending (revoked or expired) has reached the audit log:
/// the writer is off-thread, and the ending is the last event of a lease.
async fn events_by_job(proxy: &TestProxy, kind: &str, template: &str) -> usize {
    let ended = |events: &[serde_json::Value]| {
        events.iter().any(|e| {
            (e["event"] == "revoked" || e["event"] == "expired") && e["template"] == template
        })
    };
    proxy
        .files
        .audit_events_when(ended)
        .await
        .iter()
        .filter(|e| e["event"] == kind && e["template"] == template && e["actor"] == BILLING_ID)
        .count()
}

fn psql_path() -> String {
    path_str(&psql()).to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_runs_as_a_minted_role_which_is_revoked_afterwards() {
    let template = "x_nightly";
    let proxy = start_proxy(&[template], "").await;
    let psql = psql_path();
    let output = run(exec(
        &proxy,
        template,
        &[&psql, "-X", "-A", "-t", "-c", "select current_user"],
    ))
    .await;
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert_eq!(output.status.code(), Some(0), "{stdout}\n{stderr}");
    let user = stdout.trim();
    assert!(user.starts_with(&role_prefix(template)), "{stdout}");
    assert!(
        wait_until_no_roles(&role_prefix(template), Duration::from_secs(5)).await,
        "{user} is dropped after the command exits"
    );
    // Revoked by exec as the job itself, not left to expire.
    assert_eq!(events_by_job(&proxy, "revoked", template).await, 1);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_commands_exit_code_is_passed_on_and_the_lease_revoked() {
    let template = "x_code";
    let proxy = start_proxy(&[template], "").await;
    // Exits 7 only if it really got the credentials.
    let script = format!(
        "case \"$PGUSER\" in {}*) exit 7;; esac; exit 1",
        role_prefix(template)
    );
    let output = run(exec(&proxy, template, &["sh", "-c", &script])).await;
    assert_eq!(output.status.code(), Some(7), "{}", text(&output.stderr));
    assert!(wait_until_no_roles(&role_prefix(template), Duration::from_secs(5)).await);
    assert_eq!(events_by_job(&proxy, "revoked", template).await, 1);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_is_forwarded_and_the_lease_revoked_after_the_child_exits() {
    let template = "x_sigterm";
    let proxy = start_proxy(&[template], "").await;
    let mut job = exec(&proxy, template, &["sleep", "30"])
        .spawn()
        .expect("ephemera exec starts");
    let deadline = Instant::now() + Duration::from_secs(10);
    while roles_with_prefix(&role_prefix(template)).await.is_empty() {
        assert!(Instant::now() < deadline, "the lease was never issued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let signalled = Instant::now();
    signal(&job, libc::SIGTERM);
    let status = tokio::time::timeout(Duration::from_secs(10), job.wait())
        .await
        .expect("ephemera exec ends soon after SIGTERM, not after sleep 30")
        .expect("wait");
    assert!(signalled.elapsed() < Duration::from_secs(10));
    // The child died of SIGTERM: 128 + 15.
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
    assert!(wait_until_no_roles(&role_prefix(template), Duration::from_secs(5)).await);
    assert_eq!(events_by_job(&proxy, "revoked", template).await, 1);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_is_renewed_past_its_ttl_while_the_command_runs() {
    let template = "x_renew";
    let proxy = start_proxy(&[template], "ttl = \"2s\"\nmax_ttl = \"1h\"").await;
    // Sleeping twice the TTL is the scenario, not synchronisation: without
    // renewals the proxy would end the lease (and drop the role) at 2 s.
    let script = format!("sleep 4; '{}' -X -A -t -c 'select 1'", psql_path());
    let started = Instant::now();
    let output = run(exec(&proxy, template, &["sh", "-c", &script])).await;
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert_eq!(output.status.code(), Some(0), "{stdout}\n{stderr}");
    assert_eq!(stdout.trim(), "1");
    assert!(started.elapsed() >= Duration::from_secs(4));
    assert!(!stderr.contains("renewing"), "no renewal failed:\n{stderr}");
    // The job renewed its own lease (at least twice in 4 s with a 2 s TTL).
    assert!(
        events_by_job(&proxy, "renewed", template).await >= 2,
        "{:?}",
        proxy.files.audit_events()
    );
    assert!(wait_until_no_roles(&role_prefix(template), Duration::from_secs(5)).await);
    assert_eq!(events_by_job(&proxy, "revoked", template).await, 1);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_password_is_never_printed() {
    let template = "x_secret";
    let proxy = start_proxy(&[template], "").await;
    let dir = tempfile::tempdir().expect("a temp dir");
    let file = dir.path().join("password");
    let mut command = exec(
        &proxy,
        template,
        &["sh", "-c", "printenv PGPASSWORD > \"$0\"", path_str(&file)],
    );
    // Even with every library's tracing on.
    command.env("EPHEMERA_LOG", "trace");
    let output = run(command).await;
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    let password = std::fs::read_to_string(&file).expect("the command wrote the password");
    let password = password.trim();
    assert!(password.len() >= 16, "the command got a password");
    for (name, out) in [("stdout", &stdout), ("stderr", &stderr)] {
        assert!(!out.contains(password), "{name} shows the password");
        assert!(
            !out.lines().any(|line| line.contains("PGPASSWORD")),
            "{name} mentions PGPASSWORD"
        );
    }
    assert!(wait_until_no_roles(&role_prefix(template), Duration::from_secs(5)).await);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_cannot_start_exits_127_and_a_refusal_never_runs_it() {
    let template = "x_nostart";
    let proxy = start_proxy(&[template], "").await;

    let output = run(exec(&proxy, template, &["/nonexistent/ephemera-job"])).await;
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(127), "{stderr}");
    assert!(
        stderr.contains("ephemera exec: cannot start /nonexistent/ephemera-job"),
        "{stderr}"
    );
    assert!(wait_until_no_roles(&role_prefix(template), Duration::from_secs(5)).await);
    assert_eq!(events_by_job(&proxy, "revoked", template).await, 1);

    // A template the identity may not use: no credentials, the command never runs.
    let dir = tempfile::tempdir().expect("a temp dir");
    let marker = dir.path().join("ran");
    let output = run(exec(
        &proxy,
        "x_unknown",
        &["sh", "-c", "touch \"$0\"", path_str(&marker)],
    ))
    .await;
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(125), "{stderr}");
    assert!(
        stderr.contains("cannot get credentials for template x_unknown"),
        "{stderr}"
    );
    assert!(!Path::new(&marker).exists(), "the command did not run");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_stops_at_max_ttl_and_the_lease_is_left_to_expire() {
    let template = "x_maxttl";
    // Generous margins: exec renews at a third of the remaining time, which a
    // loaded machine may delay, but not past the 4 s TTL.
    let proxy = start_proxy(&[template], "ttl = \"4s\"\nmax_ttl = \"6s\"").await;
    // Outlives max_ttl: the proxy ends the lease at 6 s whatever exec does.
    let output = run(exec(&proxy, template, &["sleep", "7"])).await;
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("has reached its maximum lifetime"),
        "{stderr}"
    );
    assert!(!stderr.contains("renewing"), "no renewal failed:\n{stderr}");
    assert!(!stderr.contains("cannot revoke"), "{stderr}");
    assert_eq!(
        stderr.lines().count(),
        1,
        "one line about max_ttl:\n{stderr}"
    );
    assert!(wait_until_no_roles(&role_prefix(template), Duration::from_secs(5)).await);
    // Renewed up to max_ttl (at 1.3 s and 2.7 s), then left alone; it
    // ended by itself.
    let renewed = events_by_job(&proxy, "renewed", template).await;
    assert!((1..=3).contains(&renewed), "renewed {renewed} times");
    assert_eq!(events_by_job(&proxy, "revoked", template).await, 0);
    proxy.shutdown().await;
}
