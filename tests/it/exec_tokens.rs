//! Batch jobs with tokens: `ephemera exec --token-file` / `--token-env` and
//! `ephemera creds --token-file` talk to the admin API with
//! `Authorization: Bearer <token>` and no client certificate; the job gets
//! one lease, revoked when it exits; a bad token is refused with 401 and a
//! JSON error, and a token opens none of the admin-only endpoints.
#![allow(clippy::unwrap_used, clippy::too_many_lines)] // a test: a panic is its failure message; scenarios read top to bottom

use crate::common;

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use common::proxy::{
    path_str, psql, role_prefix, roles_with_prefix, start_proxy_with_extra_config,
    wait_until_no_roles, ProxyOptions, TestProxy,
};
use ephemera::admin::api::LeaseFilter;
use ephemera::admin::client::{AdminClient, AdminClientError};
use ephemera::identity::token::BearerToken;
use serde_json::json;

use crate::tokens::{jwks, now, Signer};

const CI_ISS: &str = "https://ci.example";
const AUD: &str = "ephemera";
const TEMPLATE: &str = "xt_migrate";
/// The job's identity: `<issuer name>:<sub>`, its own (no other test's).
const JOB: &str = "ci:repo:acme/exec-tokens:ref:refs/heads/main";

async fn start(dir: &Path, signer: &Signer) -> TestProxy {
    let file = dir.join("ci-jwks.json");
    std::fs::write(&file, jwks(&[signer])).unwrap();
    let extra = format!(
        r#"
[[tokens.issuer]]
name = "ci"
issuer = "{CI_ISS}"
audience = "{AUD}"
jwks_file = "{file}"

[[policy]]
token_issuer = "ci"
claims = {{ repository = "acme/exec-tokens" }}
templates = ["{TEMPLATE}"]
"#,
        file = file.display()
    );
    let mut options = ProxyOptions::templates(&[TEMPLATE]);
    options.admin_listen = Some("127.0.0.1:0".into());
    start_proxy_with_extra_config(options, &extra).await
}

fn job_token(signer: &Signer) -> String {
    signer.sign(
        &json!({"iss": CI_ISS, "aud": AUD, "sub": "repo:acme/exec-tokens:ref:refs/heads/main",
                        "repository": "acme/exec-tokens", "iat": now() - 5, "exp": now() + 600}),
    )
}

/// `ephemera <args…>` against the proxy's admin API with only its CA: no
/// client certificate, the test's PG* variables removed.
fn ephemera(proxy: &TestProxy, args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_ephemera"));
    for (name, _) in std::env::vars_os() {
        let name_text = name.to_string_lossy();
        if name_text.starts_with("PG") || name_text.starts_with("EPHEMERA_") {
            command.env_remove(name);
        }
    }
    command
        .args(args)
        .env(
            "EPHEMERA_ADMIN",
            format!("https://{}", proxy.admin_addr.unwrap()),
        )
        .env("EPHEMERA_CA", &proxy.files.server_ca_path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

async fn run(mut command: tokio::process::Command) -> Output {
    tokio::time::timeout(Duration::from_secs(30), command.output())
        .await
        .expect("ephemera finishes in time")
        .expect("ephemera runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn revoked_by_job(proxy: &TestProxy) -> usize {
    proxy
        .files
        .audit_events()
        .iter()
        .filter(|e| e["event"] == "revoked" && e["template"] == TEMPLATE && e["actor"] == JOB)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_with_a_token_runs_a_job_with_one_lease_revoked_at_exit() {
    let signer = Signer::es256("ci-1");
    let dir = tempfile::tempdir().unwrap();
    let proxy = start(dir.path(), &signer).await;
    let prefix = role_prefix(TEMPLATE);
    let token = job_token(&signer);
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, &token).unwrap();
    let cluster_ca = common::cluster().ca_pem_path();
    let psql = path_str(&psql()).to_owned();
    let exec_args = |how: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = vec!["exec".into()];
        args.extend(how.iter().map(|s| s.to_string()));
        args.extend(
            [
                "--template",
                TEMPLATE,
                "--sslmode",
                "verify-full",
                "--sslrootcert",
                path_str(cluster_ca),
                "--",
                &psql,
                "-X",
                "-A",
                "-t",
                "-c",
                "select current_user",
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        args
    };

    // --token-file: psql runs as a minted role, dropped when it exits.
    let args = exec_args(&["--token-file", path_str(&token_file)]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = run(ephemera(&proxy, &args)).await;
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert_eq!(output.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.trim().starts_with(&prefix), "{stdout}");
    assert!(!stderr.contains(&token), "the token is printed: {stderr}");
    assert!(wait_until_no_roles(&prefix, Duration::from_secs(5)).await);
    assert_eq!(revoked_by_job(&proxy), 1, "exec gave its one lease back");
    let issued: Vec<_> = proxy
        .files
        .audit_events()
        .into_iter()
        .filter(|e| e["event"] == "lease_issued" && e["template"] == TEMPLATE)
        .collect();
    assert_eq!(issued.len(), 1, "{issued:?}");
    assert_eq!(issued[0]["identity"], JOB);

    // --token-env, the way a CI job runs it.
    let args = exec_args(&["--token-env", "XT_ID_TOKEN"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut command = ephemera(&proxy, &args);
    command.env("XT_ID_TOKEN", &token);
    let output = run(command).await;
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert!(wait_until_no_roles(&prefix, Duration::from_secs(5)).await);
    assert_eq!(revoked_by_job(&proxy), 2);

    // `ephemera creds --token-file` prints a password for the template.
    let output = run(ephemera(
        &proxy,
        &[
            "creds",
            TEMPLATE,
            "--json",
            "--token-file",
            path_str(&token_file),
        ],
    ))
    .await;
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let creds: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let role = creds["username"].as_str().unwrap().to_owned();
    assert!(role.starts_with(&prefix), "{creds}");
    // … and the token's holder may give that lease back itself.
    let ca = vec![proxy.files.server_ca.cert_der()];
    let url = format!("https://{}", proxy.admin_addr.unwrap());
    let client =
        AdminClient::with_token(&url, BearerToken::new(token.clone()).unwrap(), ca.clone())
            .unwrap();
    let lease_id = creds["lease_id"].as_str().unwrap().parse().unwrap();
    client.revoke_lease(lease_id).await.unwrap();
    assert!(wait_until_no_roles(&prefix, Duration::from_secs(5)).await);

    // A token opens no admin-only endpoint.
    match client.list_leases(&LeaseFilter::default()).await {
        Err(AdminClientError::Api { status, .. }) => assert_eq!(status, 401),
        other => panic!("a token listed leases: {other:?}"),
    }

    // A bad token (another key under the same kid) is refused with 401 and
    // a JSON error; exec mints nothing and fails.
    let forged = job_token(&Signer::es256("ci-1"));
    let bad = AdminClient::with_token(&url, BearerToken::new(forged.clone()).unwrap(), ca).unwrap();
    match bad.creds(TEMPLATE).await {
        Err(AdminClientError::Api { status, message }) => {
            assert_eq!(status, 401);
            assert!(message.contains("signature"), "{message}");
            assert!(!message.contains(&forged));
        }
        other => panic!("a forged token got credentials: {other:?}"),
    }
    let mut command = ephemera(
        &proxy,
        &exec_args(&["--token-env", "XT_ID_TOKEN"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    command.env("XT_ID_TOKEN", &forged);
    let output = run(command).await;
    let stderr = text(&output.stderr);
    assert_ne!(output.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("401") || stderr.contains("refused"),
        "{stderr}"
    );
    assert!(!stderr.contains(&forged), "the token is printed: {stderr}");
    assert!(roles_with_prefix(&prefix).await.is_empty());

    // No certificate and no token: 401 too.
    let none = run(ephemera(&proxy, &["creds", TEMPLATE])).await;
    assert_ne!(none.status.code(), Some(0));
    proxy.shutdown().await;
}

#[tokio::test]
async fn without_token_issuers_the_admin_api_still_requires_a_client_certificate() {
    let mut options = ProxyOptions::templates(&["xt_plain"]);
    options.admin_listen = Some("127.0.0.1:0".into());
    let proxy = TestProxy::start(options).await;
    let url = format!("https://{}", proxy.admin_addr.unwrap());
    let token = job_token(&Signer::es256("ci-1"));
    let client = AdminClient::with_token(
        &url,
        BearerToken::new(token).unwrap(),
        vec![proxy.files.server_ca.cert_der()],
    )
    .unwrap();
    match client.creds("xt_plain").await {
        Err(AdminClientError::Api { status, message }) => {
            panic!("a cert-less client got an HTTP answer: {status} {message}")
        }
        Err(_) => {}
        Ok(_) => panic!("a cert-less client got credentials"),
    }
    assert!(roles_with_prefix(&role_prefix("xt_plain")).await.is_empty());
    proxy.shutdown().await;
}
