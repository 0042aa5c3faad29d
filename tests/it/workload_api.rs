//! The SPIFFE Workload API: Ephemera's client module
//! (`ephemera::identity::workload_api`) against the tests' own agent
//! (`common::workload_api`), and `ephemera serve` with `[tls] workload_api`.
#![allow(clippy::unwrap_used, clippy::too_many_lines)] // a test: a panic is its failure message; scenarios read top to bottom

use std::time::Duration;

use ephemera::identity::workload_api::{SvidUnavailable, WorkloadApi};

use crate::common;
use common::workload_api::{TestWorkloadApi, WorkloadMaterial};
use common::TestCa;

/// Our own identities: no other test revokes them.
const SERVER_ID: &str = "spiffe://example.org/wlapi/ephemera";
const PARTNER_TD: &str = "partner-wlapi.org";

const WAIT: Duration = Duration::from_secs(10);

fn material(ca: &TestCa, id: &str) -> WorkloadMaterial {
    WorkloadMaterial::new(id, ca.svid(id), vec![ca.cert_der()])
}

#[tokio::test]
async fn the_client_follows_rotations_and_keeps_the_last_good_material() {
    let ca1 = TestCa::new("wlapi-client-ca-1");
    let partner = TestCa::new("wlapi-client-partner");
    let mut agent = TestWorkloadApi::start(
        material(&ca1, SERVER_ID).with_bundle(PARTNER_TD, vec![partner.cert_der()]),
    )
    .await;
    let api = WorkloadApi::start(&agent.endpoint()).unwrap();
    let first = api.ready(WAIT).await.unwrap();
    assert_eq!(first.svid.spiffe_id.as_str(), SERVER_ID);
    assert_eq!(first.trust_domain(), "example.org");
    assert_eq!(api.bundle("example.org").unwrap(), vec![ca1.cert_der()]);
    assert_eq!(api.bundle(PARTNER_TD).unwrap(), vec![partner.cert_der()]);
    assert_eq!(
        first.federated().map(|(td, _)| td).collect::<Vec<_>>(),
        [PARTNER_TD]
    );
    assert!(!format!("{:?}", first.svid).contains("PRIVATE"));
    assert!(format!("{:?}", first.svid).contains("<redacted>"));
    assert!(agent.calls.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    assert_eq!(
        agent
            .refused_without_header
            .load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the spiffe crate sends the workload.spiffe.io header"
    );

    // A CA rotation mid-stream: new bundle, new SVID.
    let ca2 = TestCa::new("wlapi-client-ca-2");
    agent.push(
        material(&ca2, SERVER_ID).with_bundle("example.org", vec![ca1.cert_der(), ca2.cert_der()]),
    );
    let second = api.next_after(first.generation, WAIT).await.unwrap();
    assert_eq!(
        second.bundle("example.org").unwrap(),
        [ca1.cert_der(), ca2.cert_der()]
    );
    assert_ne!(second.svid.chain, first.svid.chain);
    assert!(
        api.bundle(PARTNER_TD).is_none(),
        "the partner bundle was withdrawn"
    );

    // The agent goes away: the last good material stays, and the cause is
    // known once the SVID runs out; a new agent is picked up again.
    agent.stop().await;
    assert_eq!(api.svid().unwrap().chain, second.svid.chain);
    let ca3 = TestCa::new("wlapi-client-ca-3");
    agent.push(material(&ca3, SERVER_ID));
    agent.resume();
    let third = api
        .next_after(second.generation, Duration::from_secs(40))
        .await
        .unwrap();
    assert_eq!(third.bundle("example.org").unwrap(), [ca3.cert_der()]);
}

#[tokio::test]
async fn the_client_says_why_there_is_no_svid() {
    // No agent at all.
    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("unix://{}/nothing.sock", dir.path().display());
    let api = WorkloadApi::start(&endpoint).unwrap();
    match api.ready(Duration::from_secs(2)).await {
        Err(SvidUnavailable::AgentUnreachable { endpoint: e, .. }) => assert_eq!(e, endpoint),
        other => panic!("expected AgentUnreachable, got {other:?}"),
    }
    assert!(api.current_svid().is_none());

    // An agent that has no identity for us.
    let agent = TestWorkloadApi::start(WorkloadMaterial::default()).await;
    let api = WorkloadApi::start(&agent.endpoint()).unwrap();
    match api.ready(Duration::from_secs(2)).await {
        Err(SvidUnavailable::Rejected { reason, .. }) => {
            assert!(reason.contains("no identity issued"), "{reason}");
        }
        other => panic!("expected Rejected, got {other:?}"),
    }

    // An expired SVID is reported as such.
    let ca = TestCa::new("wlapi-expired-ca");
    let agent = TestWorkloadApi::start(WorkloadMaterial::new(
        SERVER_ID,
        ca.svid_expired(SERVER_ID),
        vec![ca.cert_der()],
    ))
    .await;
    let api = WorkloadApi::start(&agent.endpoint()).unwrap();
    match api.ready(Duration::from_secs(5)).await {
        Err(e @ SvidUnavailable::Expired { .. }) => {
            assert!(e.to_string().contains(SERVER_ID), "{e}");
            assert_eq!(e.sqlstate(), "08001");
        }
        other => panic!("expected Expired, got {other:?}"),
    }
    assert!(WorkloadApi::start("http://example.org").is_err());
}

#[tokio::test]
async fn the_test_agent_refuses_calls_without_the_security_header() {
    use ephemera_test_workload_api::spiffe_workload_api_client::SpiffeWorkloadApiClient;
    use ephemera_test_workload_api::X509svidRequest;

    let ca = TestCa::new("wlapi-header-ca");
    let agent = TestWorkloadApi::start(material(&ca, SERVER_ID)).await;
    let path = agent.socket_path();
    let channel = tonic::transport::Endpoint::from_static("http://agent")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .unwrap();
    let mut client = SpiffeWorkloadApiClient::new(channel);
    let status = client
        .fetch_x509svid(X509svidRequest {})
        .await
        .expect_err("no header: refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("security header"), "{status:?}");
    assert_eq!(
        agent
            .refused_without_header
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );

    // With the header, the same call streams the SVID.
    let mut request = tonic::Request::new(X509svidRequest {});
    request
        .metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    let mut stream = client.fetch_x509svid(request).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.svids[0].spiffe_id, SERVER_ID);
}
