//! Intermediate CAs: an SVID issued under an intermediate of the trust
//! bundle is accepted, unless that intermediate's key usage says it may not
//! sign certificates (present without keyCertSign, RFC 5280). Refused on the
//! PostgreSQL port with 28000 and on the admin API with 403, both saying why.
#![allow(clippy::unwrap_used, clippy::too_many_lines)] // a test: a panic is its failure message; scenarios read top to bottom

use crate::common;

use common::proxy::{
    admin_client, role_prefix, roles_with_prefix, ProxyOptions, TestProxy, BILLING_ID, DATABASE,
};
use ephemera::admin::client::AdminClientError;
use rcgen::KeyUsagePurpose;

fn admin_options(templates: &[&str]) -> ProxyOptions {
    let mut options = ProxyOptions::templates(templates);
    options.admin_listen = Some("127.0.0.1:0".into());
    options
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intermediate_without_key_cert_sign_cannot_vouch_for_an_svid() {
    let template = "ic_ku";
    let proxy = TestProxy::start(admin_options(&[template])).await;
    let admin_addr = proxy.admin_addr.expect("the admin API is configured");
    let root = &proxy.files.svid_ca;

    let bad_ca = root
        .intermediate_with_key_usages("no-keycertsign", vec![KeyUsagePurpose::DigitalSignature]);
    let bad = bad_ca.svid(BILLING_ID);
    assert!(
        bad.chain_der().len() == 2,
        "the leaf and its intermediate are presented"
    );

    let error = match proxy.connect(Some(&bad), template, DATABASE).await {
        Ok(_) => panic!("an SVID under an intermediate without keyCertSign was accepted"),
        Err(error) => error,
    };
    let db = error
        .as_db_error()
        .unwrap_or_else(|| panic!("expected an ErrorResponse, got {error:?}"));
    assert_eq!(db.code().code(), "28000", "{db:?}");
    assert!(db.message().contains("keyCertSign"), "{}", db.message());
    assert!(
        db.message().contains("no-keycertsign"),
        "names the CA: {}",
        db.message()
    );
    assert!(
        roles_with_prefix(&role_prefix(template)).await.is_empty(),
        "nothing is created for a refused client"
    );

    match admin_client(&proxy.files, admin_addr, &bad).health().await {
        Err(AdminClientError::Api {
            status: 403,
            message,
        }) => assert!(message.contains("keyCertSign"), "{message}"),
        other => panic!("the admin API refuses the SVID with 403, got {other:?}"),
    }

    // A proper intermediate (keyCertSign, cRLSign) still vouches for SVIDs,
    // and so does one without a key usage extension (RFC 5280 path
    // validation accepts it; see SECURITY.md section 8).
    let good_ca = root.intermediate("good-intermediate");
    let no_ku_ca = root.intermediate_with_key_usages("no-key-usage", Vec::new());
    for ca in [&good_ca, &no_ku_ca] {
        let svid = ca.svid(BILLING_ID);
        let client = proxy
            .connect(Some(&svid), template, DATABASE)
            .await
            .unwrap_or_else(|e| panic!("an SVID under {} is accepted: {e}", ca.name()));
        let user: String = client
            .query_one("SELECT current_user::text", &[])
            .await
            .expect("query")
            .get(0);
        assert!(user.starts_with(&role_prefix(template)), "{user}");
        drop(client);
        admin_client(&proxy.files, admin_addr, &svid)
            .health()
            .await
            .unwrap_or_else(|e| panic!("the admin API accepts an SVID under {}: {e}", ca.name()));
    }
    proxy.shutdown().await;
}
