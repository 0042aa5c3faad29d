//! `ephemera serve` with `[tls] workload_api`: the server's certificate and
//! every trust bundle come from the tests' own Workload API, and a CA
//! rotation pushed down the stream applies to the next connection, with no
//! restart and no signal (issue 16, acceptance 4); JWT-SVIDs are checked
//! against the JWT bundle from the same stream.
#![allow(clippy::unwrap_used, clippy::too_many_lines)] // a test: a panic is its failure message; scenarios read top to bottom

use std::time::{Duration, Instant};

use ephemera::admin::api::LeaseFilter;
use rcgen::SanType;

use crate::common;
use crate::tokens::{jwks, now, Signer};
use common::proxy::{ProxyFiles, ProxyOptions, TestProxy, ADMIN_ID, DATABASE};
use common::workload_api::{TestWorkloadApi, WorkloadMaterial};
use common::{make_tls_connect, svid_params, TestCa, TestCert};

/// Our own identities: no other test revokes them.
const SERVER_ID: &str = "spiffe://example.org/wlapi-serve/ephemera";
const APP_ID: &str = "spiffe://example.org/wlapi-serve/app";
const PARTNER_TD: &str = "partner-wlserve.org";
const PARTNER_ID: &str = "spiffe://partner-wlserve.org/etl";
const TEMPLATE: &str = "wlapi_rw";

/// Ephemera's own X.509-SVID, with the names clients verify it by.
fn server_svid(ca: &TestCa) -> TestCert {
    let mut params = svid_params(SERVER_ID);
    params
        .subject_alt_names
        .push(SanType::DnsName("localhost".try_into().unwrap()));
    params
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    ca.issue("ephemera server svid", &params)
}

/// The proxy's configuration with `[tls]` in its Workload API form,
/// served.
async fn proxy_on(agent: &TestWorkloadApi) -> TestProxy {
    TestProxy::serve(files_for(&agent.endpoint(), "").await).await
}

/// The proxy's configuration with `[tls]` in its Workload API form (plus
/// `tls_extra` in that section).
async fn files_for(endpoint: &str, tls_extra: &str) -> ProxyFiles {
    let mut options = ProxyOptions::templates(&[TEMPLATE]);
    options.admin_listen = Some("127.0.0.1:0".into());
    let files = ProxyFiles::write(&options, "127.0.0.1:0").await;
    let config = std::fs::read_to_string(&files.config_path).unwrap();
    let start = config.find("[tls]").unwrap();
    let end = start + config[start..].find("[upstream]").unwrap();
    let config = format!(
        "{}[tls]\nworkload_api = \"{}\"\n{tls_extra}\n\n{}\n[[policy]]\nspiffe_id = \"{APP_ID}\"\ntemplates = [\"{TEMPLATE}\"]\n\n[[policy]]\nspiffe_id = \"{PARTNER_ID}\"\ntemplates = [\"{TEMPLATE}\"]\n",
        &config[..start],
        endpoint,
        &config[end..]
    );
    std::fs::write(&files.config_path, config).unwrap();
    files
}

/// `ephemera check-config ARGS`: (success, stdout + stderr).
async fn check_config(args: Vec<String>) -> (bool, String) {
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_ephemera"))
            .arg("check-config")
            .args(args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_validates_the_form_and_connect_reports_what_the_agent_sent() {
    let ca = TestCa::new("wlcheck-ca");
    let partner = TestCa::new("wlcheck-partner");
    let agent = TestWorkloadApi::start(
        WorkloadMaterial::new(SERVER_ID, server_svid(&ca), vec![ca.cert_der()])
            .with_bundle(PARTNER_TD, vec![partner.cert_der()]),
    )
    .await;
    let files = files_for(&agent.endpoint(), "").await;
    let path = files.config_path.display().to_string();
    let (ok, text) = check_config(vec![path.clone()]).await;
    assert!(ok, "{text}");
    let (ok, text) = check_config(vec!["--connect".into(), path]).await;
    assert!(ok, "{text}");
    assert!(
        text.contains(SERVER_ID) && text.contains("expires"),
        "{text}"
    );
    assert!(
        text.contains("trust domain example.org") && text.contains(PARTNER_TD),
        "{text}"
    );

    // Both forms at once: each file key is named.
    let mixed = files_for(
        &agent.endpoint(),
        "cert = \"server.pem\"\ntrust_domains = [\"example.org\"]",
    )
    .await;
    let (ok, text) = check_config(vec![mixed.config_path.display().to_string()]).await;
    assert!(!ok, "{text}");
    assert!(
        text.contains("tls.cert") && text.contains("tls.trust_domains"),
        "{text}"
    );
    assert!(text.contains("tls.workload_api is set"), "{text}");

    // Not an endpoint; and an agent that is not there (--connect).
    let bad = files_for("http://agent", "").await;
    let (ok, text) = check_config(vec![bad.config_path.display().to_string()]).await;
    assert!(!ok && text.contains("tls.workload_api"), "{text}");
    let dir = tempfile::tempdir().unwrap();
    let gone = files_for(&format!("unix://{}/none.sock", dir.path().display()), "").await;
    let (ok, text) = check_config(vec![
        "--connect".into(),
        gone.config_path.display().to_string(),
    ])
    .await;
    assert!(
        !ok && text.contains("tls.workload_api") && text.contains("unreachable"),
        "{text}"
    );
}

/// Connect with `client`, trusting `server_cas` for Ephemera's certificate.
async fn connect(
    proxy: &TestProxy,
    server_cas: &[&TestCa],
    client: &TestCert,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let pem: String = server_cas.iter().map(|ca| ca.cert_pem()).collect();
    let tls = make_tls_connect(&pem, Some(client));
    let (c, connection) = proxy.pg_config(TEMPLATE, DATABASE).connect(tls).await?;
    tokio::spawn(connection);
    Ok(c)
}

async fn current_user(client: &tokio_postgres::Client) -> String {
    client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0)
}

fn sqlstate(e: &tokio_postgres::Error) -> Option<String> {
    e.as_db_error().map(|db| db.code().code().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_accepts_clients_after_a_ca_rotation_pushed_by_the_workload_api() {
    let ca1 = TestCa::new("wlserve-ca-1");
    let partner = TestCa::new("wlserve-partner");
    let agent = TestWorkloadApi::start(
        WorkloadMaterial::new(SERVER_ID, server_svid(&ca1), vec![ca1.cert_der()])
            .with_bundle(PARTNER_TD, vec![partner.cert_der()]),
    )
    .await;
    let proxy = proxy_on(&agent).await;

    // Clients of the home CA and of the federated domain's land as fresh roles.
    let old_session = connect(&proxy, &[&ca1], &ca1.svid(APP_ID)).await.unwrap();
    assert!(current_user(&old_session).await.starts_with("eph_"));
    let partner_session = connect(&proxy, &[&ca1], &partner.svid(PARTNER_ID))
        .await
        .unwrap();
    assert!(current_user(&partner_session).await.starts_with("eph_"));
    // A federated domain's SVIDs chain to that domain's bundle only.
    let refused = connect(&proxy, &[&ca1], &partner.svid(APP_ID))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&refused).as_deref(), Some("28000"), "{refused:?}");

    // The admin API has its certificate from the same source.
    let admin_addr = proxy.admin_addr.unwrap();
    let admin = |ca: &TestCa| {
        let svid = ca.svid(ADMIN_ID);
        ephemera::admin::client::AdminClient::new(
            &format!("https://{admin_addr}"),
            svid.chain_der(),
            svid.key_der(),
            vec![ca.cert_der()],
        )
        .unwrap()
    };
    admin(&ca1)
        .list_leases(&LeaseFilter::default())
        .await
        .unwrap();

    // The CA rotates: a new bundle without the old CA, and a new server
    // SVID signed by the new CA.
    let ca2 = TestCa::new("wlserve-ca-2");
    agent.push(
        WorkloadMaterial::new(SERVER_ID, server_svid(&ca2), vec![ca2.cert_der()])
            .with_bundle(PARTNER_TD, vec![partner.cert_der()]),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let new_session = loop {
        match connect(&proxy, &[&ca2], &ca2.svid(APP_ID)).await {
            Ok(client) => break client,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("the rotation never applied: {e:?}"),
        }
    };
    assert!(current_user(&new_session).await.starts_with("eph_"));

    // The old CA is gone from the bundle: its SVIDs are refused; the server
    // now presents the new CA's certificate (a client trusting only the
    // old CA cannot verify it); the open session goes on untouched.
    let refused = connect(&proxy, &[&ca1, &ca2], &ca1.svid(APP_ID))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&refused).as_deref(), Some("28000"), "{refused:?}");
    let untrusted = connect(&proxy, &[&ca1], &ca2.svid(APP_ID))
        .await
        .unwrap_err();
    assert!(
        sqlstate(&untrusted).is_none(),
        "a TLS failure: {untrusted:?}"
    );
    assert!(current_user(&old_session).await.starts_with("eph_"));
    let partner_again = connect(&proxy, &[&ca2], &partner.svid(PARTNER_ID)).await;
    assert!(partner_again.is_ok(), "{partner_again:?}");
    admin(&ca2)
        .list_leases(&LeaseFilter::default())
        .await
        .unwrap();

    // SIGHUP's reload leaves the TLS material to the stream.
    proxy.reloader.reload().unwrap();
    let after_reload = connect(&proxy, &[&ca2], &ca2.svid(APP_ID)).await;
    assert!(after_reload.is_ok(), "{after_reload:?}");

    drop((old_session, partner_session, new_session));
    proxy.shutdown().await;
}

#[tokio::test]
async fn serve_without_a_reachable_agent_says_so() {
    // What `ephemera serve` does at start, with a 1 s wait instead of 30 s:
    // no agent, no TLS material, and the error names the endpoint and cause.
    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("unix://{}/agent.sock", dir.path().display());
    let error =
        ephemera::tls::workload::WorkloadTls::start(&endpoint, None, Duration::from_secs(1))
            .await
            .err()
            .expect("no agent: no TLS material");
    let text = error.to_string();
    assert!(
        text.contains("tls.workload_api")
            && text.contains(&endpoint)
            && text.contains("unreachable"),
        "{text}"
    );
    assert_eq!(error.sqlstate(), "08001");
}

/// A JWT bundle as SPIRE's Workload API sends it: the keys marked
/// `"use": "jwt-svid"`.
fn jwt_bundle(signer: &Signer) -> Vec<u8> {
    let mut set: serde_json::Value = serde_json::from_str(&jwks(&[signer])).unwrap();
    set["keys"][0]["use"] = "jwt-svid".into();
    set.to_string().into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_svids_are_checked_against_the_workload_apis_jwt_bundle_and_its_rotation() {
    let ca = TestCa::new("wlserve-jwt-ca");
    let (old, new) = (Signer::es256("wl-jwt-1"), Signer::es256("wl-jwt-2"));
    let with_jwt = |signer: &Signer| {
        let mut material = WorkloadMaterial::new(SERVER_ID, server_svid(&ca), vec![ca.cert_der()]);
        material
            .jwt_bundles
            .insert("example.org".into(), jwt_bundle(signer));
        material
    };
    let agent = TestWorkloadApi::start(with_jwt(&old)).await;
    // No jwks_file, no jwks_url: the issuer's keys are the stream's.
    let issuer = "[[tokens.issuer]]\nname = \"spire\"\nspiffe_trust_domain = \"example.org\"\naudience = \"spiffe://example.org/ephemera\"\n";
    let proxy = TestProxy::serve(files_for(&agent.endpoint(), issuer).await).await;
    let login = |token: String| {
        let tls = make_tls_connect(ca.cert_pem(), None);
        let mut config = proxy.pg_config(TEMPLATE, DATABASE);
        config.password(token);
        async move {
            let (client, connection) = config.connect(tls).await?;
            tokio::spawn(connection);
            Ok::<_, tokio_postgres::Error>(client)
        }
    };
    let claims = serde_json::json!({"sub": APP_ID, "aud": "spiffe://example.org/ephemera",
                                    "exp": now() + 600, "iat": now()});

    let client = login(old.sign(&claims)).await.unwrap();
    assert!(current_user(&client).await.starts_with("eph_"));
    // A key the bundle does not hold is refused, naming no token.
    let stranger = Signer::es256("wl-jwt-stranger");
    let refused = login(stranger.sign(&claims)).await.unwrap_err();
    assert_eq!(sqlstate(&refused).as_deref(), Some("28000"), "{refused:?}");

    // The agent rotates the JWT signing key: a token of the new key is
    // accepted with no restart (the unknown kid asks the agent again, at
    // most once per refresh interval), and the old key is gone.
    agent.push(with_jwt(&new));
    let deadline = Instant::now() + Duration::from_secs(15);
    let rotated = loop {
        match login(new.sign(&claims)).await {
            Ok(client) => break client,
            Err(e) if Instant::now() < deadline => {
                assert_eq!(sqlstate(&e).as_deref(), Some("28000"), "{e:?}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!("the rotated JWT bundle was never used: {e:?}"),
        }
    };
    assert!(current_user(&rotated).await.starts_with("eph_"));
    let old_again = login(old.sign(&claims)).await.unwrap_err();
    assert_eq!(
        sqlstate(&old_again).as_deref(),
        Some("28000"),
        "the old key is gone: {old_again:?}"
    );
    assert!(
        current_user(&client).await.starts_with("eph_"),
        "open sessions go on"
    );
    drop((client, rotated));
    proxy.shutdown().await;
}
