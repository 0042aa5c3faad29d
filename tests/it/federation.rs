//! SPIFFE federation: a federated trust domain has its own bundle
//! (`[tls.federation]`). Its SVIDs must chain to that bundle, and its CA
//! cannot vouch for the home domain's identities (nor the home CA for its).
#![allow(clippy::unwrap_used, clippy::too_many_lines)] // a test: a panic is its failure message; scenarios read top to bottom

use crate::common;

use common::proxy::{start_proxy_with_extra_config, ProxyOptions, TestProxy, BILLING_ID, DATABASE};
use common::{TestCa, TestCert};

const PARTNER_ID: &str = "spiffe://partner.org/ns/etl/sa/loader";

/// `None` if `svid` connects; else the SQLSTATE and message it got.
async fn outcome(proxy: &TestProxy, svid: &TestCert, template: &str) -> Option<(String, String)> {
    match proxy.connect(Some(svid), template, DATABASE).await {
        Ok(_) => None,
        Err(e) => {
            let db = e
                .as_db_error()
                .unwrap_or_else(|| panic!("an ErrorResponse, got {e:?}"));
            Some((db.code().code().to_owned(), db.message().to_owned()))
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_trust_domain_is_held_to_its_own_bundle() {
    let template = "fed_etl";
    let partner_ca = TestCa::new("partner-bundle");
    let partner_dir = tempfile::tempdir().expect("tempdir");
    let partner_bundle = partner_ca.write_pem(partner_dir.path());
    let extra = format!(
        "[tls.federation]\n\"partner.org\" = \"{}\"\n\n[[policy]]\nspiffe_id = \"{PARTNER_ID}\"\ntemplates = [\"{template}\"]\n",
        partner_bundle.display()
    );
    let proxy = start_proxy_with_extra_config(ProxyOptions::templates(&[template]), &extra).await;
    let home_ca = &proxy.files.svid_ca;

    // Each domain's own CA: accepted.
    assert_eq!(
        outcome(&proxy, &partner_ca.svid(PARTNER_ID), template).await,
        None
    );
    assert_eq!(
        outcome(&proxy, &home_ca.svid(BILLING_ID), template).await,
        None
    );

    // The partner's CA claiming a home identity, and the other way round.
    let (code, message) = outcome(&proxy, &partner_ca.svid(BILLING_ID), template)
        .await
        .expect("the partner CA cannot vouch for example.org");
    assert_eq!(code, "28000");
    assert!(
        message.contains("\"example.org\"") && message.contains("another trust domain"),
        "{message}"
    );
    let (code, message) = outcome(&proxy, &home_ca.svid(PARTNER_ID), template)
        .await
        .expect("the home CA cannot vouch for partner.org");
    assert_eq!(code, "28000");
    assert!(message.contains("\"partner.org\""), "{message}");

    // A CA in no bundle at all is still just unknown.
    let stranger_ca = TestCa::new("nobody");
    let (code, message) = outcome(&proxy, &stranger_ca.svid(PARTNER_ID), template)
        .await
        .expect("unknown CA");
    assert_eq!(code, "28000");
    assert!(
        message.contains("not signed by a CA in Ephemera's SPIFFE trust bundle"),
        "{message}"
    );
    proxy.shutdown().await;
}
