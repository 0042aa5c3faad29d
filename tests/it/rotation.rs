//! Certificate rotation without a restart: SPIRE rotates the trust bundle's
//! CAs and Ephemera's own (short-lived) certificate; a reload (SIGHUP) picks
//! both up for new connections, on the PostgreSQL port and the admin API.
#![allow(clippy::unwrap_used, clippy::too_many_lines)] // a test: a panic is its failure message; scenarios read top to bottom

use crate::common;

use common::proxy::{admin_client, ProxyOptions, TestProxy, ADMIN_ID, BILLING_ID, DATABASE};
use common::{make_tls_connect, TestCa, TestCert};

/// The SQLSTATE of a refused connection (with `svid`, trusting
/// `server_ca`), or None if it connected.
async fn refusal(
    proxy: &TestProxy,
    server_ca: &str,
    svid: &TestCert,
    template: &str,
) -> Option<String> {
    let tls = make_tls_connect(server_ca, Some(svid));
    match proxy.pg_config(template, DATABASE).connect(tls).await {
        Ok(_) => None,
        Err(e) => Some(
            e.code()
                .map_or_else(|| format!("no SQLSTATE: {e}"), |c| c.code().to_owned()),
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_picks_up_a_rotated_trust_bundle() {
    let template = "r_bundle";
    let mut options = ProxyOptions::templates(&[template]);
    options.admin_listen = Some("127.0.0.1:0".into());
    let proxy = TestProxy::start(options).await;
    let server_ca = proxy.files.server_ca.cert_pem();
    let old_ca = &proxy.files.svid_ca;
    let new_ca = TestCa::new("spiffe-bundle-next");
    let old_svid = old_ca.svid(BILLING_ID);
    let new_svid = new_ca.svid(BILLING_ID);
    let admin_addr = proxy.admin_addr.expect("admin API configured");

    // Before: only the old CA is trusted.
    assert_eq!(
        refusal(&proxy, server_ca, &new_svid, template)
            .await
            .as_deref(),
        Some("28000")
    );
    assert_eq!(refusal(&proxy, server_ca, &old_svid, template).await, None);
    let new_admin = admin_client(&proxy.files, admin_addr, &new_ca.svid(ADMIN_ID));
    assert!(
        new_admin.health().await.is_err(),
        "the admin API refuses the unknown CA"
    );

    // SPIRE publishes the next CA beside the current one; the operator (or
    // spiffe-helper) rewrites the bundle file and sends SIGHUP.
    let bundle = old_ca.write_pem(proxy.files.dir.path());
    std::fs::write(
        &bundle,
        format!("{}{}", old_ca.cert_pem(), new_ca.cert_pem()),
    )
    .expect("bundle");
    proxy.reloader.reload().expect("reload");
    assert_eq!(refusal(&proxy, server_ca, &new_svid, template).await, None);
    assert_eq!(refusal(&proxy, server_ca, &old_svid, template).await, None);
    new_admin
        .health()
        .await
        .expect("the admin API trusts the new CA");

    // The old CA retires.
    std::fs::write(&bundle, new_ca.cert_pem()).expect("bundle");
    proxy.reloader.reload().expect("reload");
    assert_eq!(
        refusal(&proxy, server_ca, &old_svid, template)
            .await
            .as_deref(),
        Some("28000")
    );
    assert_eq!(refusal(&proxy, server_ca, &new_svid, template).await, None);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_picks_up_a_renewed_server_certificate() {
    let template = "r_server";
    let proxy = TestProxy::start(ProxyOptions::templates(&[template])).await;
    let svid = proxy.svid(BILLING_ID);
    let old_server_ca = proxy.files.server_ca.cert_pem();
    // A session opened before the rotation lives on.
    let before = proxy
        .connect(Some(&svid), template, DATABASE)
        .await
        .expect("connects");

    let next_ca = TestCa::new("ephemera-server-next");
    next_ca
        .server_cert(&["localhost"], &["127.0.0.1".parse().expect("an IP")])
        .write(proxy.files.dir.path(), "server");
    proxy.reloader.reload().expect("reload");

    assert_eq!(
        refusal(&proxy, next_ca.cert_pem(), &svid, template).await,
        None
    );
    let stale = refusal(&proxy, old_server_ca, &svid, template).await;
    assert!(
        stale
            .as_deref()
            .is_some_and(|s| s.starts_with("no SQLSTATE")),
        "a client trusting only the old CA fails TLS: {stale:?}"
    );
    before
        .simple_query("SELECT 1")
        .await
        .expect("the earlier session is untouched");

    // A broken file is refused and the old material stays in force.
    std::fs::write(proxy.files.dir.path().join("server-key.pem"), "not a key").expect("write");
    proxy
        .reloader
        .reload()
        .expect_err("a broken key is not loaded");
    assert_eq!(
        refusal(&proxy, next_ca.cert_pem(), &svid, template).await,
        None
    );
    proxy.shutdown().await;
}
