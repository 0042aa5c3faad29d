//! The client against a tiny hyper + tokio-rustls server that requires a
//! client certificate, with certificates made by rcgen on the spot.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper::{header, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use time::macros::datetime;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use ephemera_engine::{LeaseKind, LeaseState};
use serde::Serialize;

use super::connection::Endpoint;
use super::error::{api_error, MAX_ERROR_TEXT};
use super::{encode_component, lease_query, AdminClient, AdminClientError};
use crate::admin::api::{ApiError, Health, LeaseFilter, LeaseList, LeaseView};

const ADMIN_ID: &str = "spiffe://example.org/ns/ops/sa/admin";
const LEASE_ID: &str = "6f1c2b1e-3c4d-4e5f-8a9b-0c1d2e3f4a5b";
/// The lease ID the test server refuses with a 403 `ApiError`.
const FORBIDDEN_ID: &str = "00000000-0000-4000-8000-000000000403";
const FORBIDDEN_MESSAGE: &str = "spiffe://example.org/ns/ops/sa/admin is not an admin identity";

// ----- a throwaway PKI ------------------------------------------------------

struct Ca {
    cert: CertificateDer<'static>,
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

struct Leaf {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    cert_pem: String,
    key_pem: String,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key).unwrap();
    Ca {
        cert: cert.der().clone(),
        pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

fn leaf(ca: &Ca, sans: Vec<SanType>, usage: ExtendedKeyUsagePurpose) -> Leaf {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "test leaf");
    params.is_ca = IsCa::ExplicitNoCa;
    params.subject_alt_names = sans;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    Leaf {
        chain: vec![cert.der().clone()],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// A server certificate for 127.0.0.1 and `localhost`.
fn server_cert(ca: &Ca) -> Leaf {
    let sans = vec![
        SanType::IpAddress(Ipv4Addr::LOCALHOST.into()),
        SanType::DnsName(Ia5String::try_from("localhost").unwrap()),
    ];
    leaf(ca, sans, ExtendedKeyUsagePurpose::ServerAuth)
}

/// An X.509-SVID (one `spiffe://` URI SAN).
fn svid(ca: &Ca, spiffe_id: &str) -> Leaf {
    let sans = vec![SanType::URI(Ia5String::try_from(spiffe_id).unwrap())];
    leaf(ca, sans, ExtendedKeyUsagePurpose::ClientAuth)
}

// ----- the test server --------------------------------------------------------

fn sample_lease() -> LeaseView {
    LeaseView {
        id: LEASE_ID.parse().unwrap(),
        engine: "postgres".into(),
        kind: LeaseKind::Session,
        template: "billing_rw".into(),
        role: "eph_billing_rw_a1b2c3".into(),
        identity: "spiffe://example.org/ns/prod/sa/api".into(),
        subject: None,
        database: "billing".into(),
        client_addr: Some("127.0.0.1:51000".into()),
        issued_at: datetime!(2025-01-02 03:04:05 UTC),
        expires_at: datetime!(2025-01-02 03:14:05 UTC),
        max_expires_at: datetime!(2025-01-02 11:04:05 UTC),
        state: LeaseState::Active,
        ended_at: None,
        end_reason: None,
    }
}

fn json_response(status: StatusCode, body: &impl Serialize) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(body).unwrap())))
        .unwrap()
}

/// The routes: `GET /v1/leases` lists [`sample_lease`], the forbidden
/// lease is a 403 `ApiError`, `/healthz` is fine, the rest a plain-text 404.
fn route(method: &Method, path: &str) -> Response<Full<Bytes>> {
    match (method, path) {
        (&Method::GET, "/v1/leases") => json_response(
            StatusCode::OK,
            &LeaseList {
                leases: vec![sample_lease()],
            },
        ),
        (&Method::GET, "/healthz") => json_response(
            StatusCode::OK,
            &Health {
                status: "ok".into(),
            },
        ),
        (&Method::GET, p) if p == format!("/v1/leases/{FORBIDDEN_ID}") => json_response(
            StatusCode::FORBIDDEN,
            &ApiError {
                error: FORBIDDEN_MESSAGE.into(),
            },
        ),
        _ => Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Full::new(Bytes::from_static(b"no such route\n")))
            .unwrap(),
    }
}

/// Serves [`route`] over TLS, requiring a client certificate from
/// `client_ca`; records each request as `METHOD path?query`.
async fn start_server(server: Leaf, client_ca: &Ca) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(client_ca.cert.clone()).unwrap();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(server.chain, server.key)
        .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));

    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        // Ends with the test's runtime.
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let log = log.clone();
            tokio::spawn(async move {
                // A refused handshake is part of some tests; ignore it.
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                    let target = request
                        .uri()
                        .path_and_query()
                        .map(|pq| pq.as_str().to_owned())
                        .unwrap_or_default();
                    log.lock()
                        .unwrap()
                        .push(format!("{} {target}", request.method()));
                    let response = route(request.method(), request.uri().path());
                    async move { Ok::<_, Infallible>(response) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, seen)
}

/// A server (certificate from `server_ca`, trusting clients of `ca`) and
/// a client for it whose SVID is issued by `ca` and which trusts `ca`.
async fn setup() -> (AdminClient, Arc<Mutex<Vec<String>>>) {
    let ca = ca("test ca");
    let (addr, seen) = start_server(server_cert(&ca), &ca).await;
    let me = svid(&ca, ADMIN_ID);
    let client = AdminClient::new(&format!("https://{addr}"), me.chain, me.key, vec![ca.cert])
        .unwrap()
        .with_timeout(Duration::from_secs(10));
    (client, seen)
}

// ----- against the server -------------------------------------------------------

#[tokio::test]
async fn lists_leases_with_an_encoded_filter() {
    let (client, seen) = setup().await;
    let filter = LeaseFilter {
        identity: Some("spiffe://example.org/ns/prod/sa/api".into()),
        template: Some("billing_rw".into()),
        state: Some(LeaseState::Active),
    };
    let leases = client.list_leases(&filter).await.unwrap();
    assert_eq!(leases, vec![sample_lease()]);
    assert_eq!(
        seen.lock().unwrap().as_slice(),
        [
            "GET /v1/leases?identity=spiffe%3A%2F%2Fexample.org%2Fns%2Fprod%2Fsa%2Fapi\
          &template=billing_rw&state=active"
        ]
    );

    // No filter, no query string.
    client.list_leases(&LeaseFilter::default()).await.unwrap();
    assert_eq!(seen.lock().unwrap().last().unwrap(), "GET /v1/leases");
}

#[tokio::test]
async fn a_403_api_error_becomes_an_api_error() {
    let (client, _) = setup().await;
    let error = client
        .show_lease(FORBIDDEN_ID.parse().unwrap())
        .await
        .unwrap_err();
    match &error {
        AdminClientError::Api { status, message } => {
            assert_eq!(*status, 403);
            assert_eq!(message, FORBIDDEN_MESSAGE);
        }
        other => panic!("expected AdminClientError::Api, got {other:?}"),
    }
    let text = error.to_string();
    assert!(text.contains("refused this identity (403)"), "{text}");
    assert!(text.contains("[admin] identities"), "{text}");
}

#[tokio::test]
async fn a_non_json_error_body_is_quoted() {
    let (client, _) = setup().await;
    let error = client
        .revoke_lease(LEASE_ID.parse().unwrap())
        .await
        .unwrap_err();
    match error {
        AdminClientError::Api { status, message } => {
            assert_eq!(status, 404);
            assert_eq!(message, "no such route");
        }
        other => panic!("expected AdminClientError::Api, got {other:?}"),
    }
}

#[tokio::test]
async fn connects_by_dns_name_too() {
    let ca = ca("test ca");
    let (addr, _) = start_server(server_cert(&ca), &ca).await;
    let me = svid(&ca, ADMIN_ID);
    let url = format!("https://localhost:{}", addr.port());
    let client = AdminClient::new(&url, me.chain, me.key, vec![ca.cert]).unwrap();
    assert_eq!(client.health().await.unwrap().status, "ok");
}

#[tokio::test]
async fn an_untrusted_server_is_a_tls_error_naming_the_address() {
    let server_ca = ca("server ca");
    let client_ca = ca("client ca");
    let (addr, _) = start_server(server_cert(&server_ca), &client_ca).await;
    let me = svid(&client_ca, ADMIN_ID);
    // The client trusts only its own CA, not the one that signed the server.
    let client = AdminClient::new(
        &format!("https://{addr}"),
        me.chain,
        me.key,
        vec![client_ca.cert],
    )
    .unwrap();
    let error = client.health().await.unwrap_err();
    assert!(matches!(error, AdminClientError::Tls { .. }), "{error:?}");
    let text = error.to_string();
    assert!(text.contains(&addr.to_string()), "{text}");
    assert!(text.contains("--ca"), "{text}");
}

#[tokio::test]
async fn a_refused_client_certificate_is_an_error_naming_the_address() {
    let ca = ca("test ca");
    let (addr, _) = start_server(server_cert(&ca), &ca).await;
    // An SVID from a CA the server does not trust.
    let stranger = svid(&self::ca("stranger"), ADMIN_ID);
    let client = AdminClient::new(
        &format!("https://{addr}"),
        stranger.chain,
        stranger.key,
        vec![ca.cert],
    )
    .unwrap();
    let error = client.health().await.unwrap_err();
    // TLS 1.3 reports the refusal after the client's side of the
    // handshake, so it surfaces while exchanging the request.
    assert!(
        matches!(
            error,
            AdminClientError::Tls { .. } | AdminClientError::Http { .. }
        ),
        "{error:?}"
    );
    assert!(error.to_string().contains(&addr.to_string()), "{error}");
}

#[tokio::test]
async fn nothing_listening_is_a_connect_error() {
    // Bind and drop to find a port nobody listens on.
    let port = {
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        listener.local_addr().unwrap().port()
    };
    let ca = ca("test ca");
    let me = svid(&ca, ADMIN_ID);
    let url = format!("https://127.0.0.1:{port}");
    let client = AdminClient::new(&url, me.chain, me.key, vec![ca.cert]).unwrap();
    let error = client.health().await.unwrap_err();
    assert!(
        matches!(error, AdminClientError::Connect { .. }),
        "{error:?}"
    );
    assert!(
        error.to_string().contains(&format!("127.0.0.1:{port}")),
        "{error}"
    );
}

// ----- files --------------------------------------------------------------------

#[tokio::test]
async fn from_files_reads_pem() {
    let ca = ca("test ca");
    let (addr, _) = start_server(server_cert(&ca), &ca).await;
    let me = svid(&ca, ADMIN_ID);
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, ca_path) = (
        dir.path().join("svid.pem"),
        dir.path().join("svid-key.pem"),
        dir.path().join("ca.pem"),
    );
    std::fs::write(&cert, &me.cert_pem).unwrap();
    std::fs::write(&key, &me.key_pem).unwrap();
    std::fs::write(&ca_path, &ca.pem).unwrap();
    let client =
        AdminClient::from_files(&format!("https://{addr}"), &cert, &key, &ca_path).unwrap();
    assert_eq!(client.health().await.unwrap().status, "ok");
}

#[test]
fn file_errors_name_the_file_but_never_quote_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca("test ca");
    let me = svid(&ca, ADMIN_ID);
    let cert = dir.path().join("svid.pem");
    std::fs::write(&cert, &me.cert_pem).unwrap();
    let url = "https://127.0.0.1:8443";

    let missing = dir.path().join("missing.pem");
    let error = AdminClient::from_files(url, &missing, &missing, &missing).unwrap_err();
    assert!(
        matches!(error, AdminClientError::ReadCert { .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("missing.pem"), "{error}");

    // A "key" that is not PEM, and one with a broken BEGIN line: the
    // message must not echo any of it.
    for (name, contents) in [
        ("raw-key.pem", "SECRET-KEY-MATERIAL\n".to_owned()),
        (
            "broken-key.pem",
            "-----BEGIN PRIVATE KEY SECRET-KEY-MATERIAL\nAAAA\n-----END PRIVATE KEY-----\n"
                .to_owned(),
        ),
    ] {
        let key = dir.path().join(name);
        std::fs::write(&key, contents).unwrap();
        let error = AdminClient::from_files(url, &cert, &key, &cert).unwrap_err();
        assert!(
            matches!(error, AdminClientError::ReadKey { .. }),
            "{error:?}"
        );
        let text = format!("{error} {error:?}");
        assert!(text.contains(name), "{text}");
        assert!(!text.contains("SECRET"), "{text}");
    }

    // A key that does not belong to the certificate.
    let other_key = dir.path().join("other-key.pem");
    std::fs::write(&other_key, svid(&ca, ADMIN_ID).key_pem).unwrap();
    let error = AdminClient::from_files(url, &cert, &other_key, &cert).unwrap_err();
    assert!(matches!(error, AdminClientError::TlsConfig(_)), "{error:?}");

    // A CA file without certificates.
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let key = dir.path().join("svid-key.pem");
    std::fs::write(&key, &me.key_pem).unwrap();
    let error = AdminClient::from_files(url, &cert, &key, &empty).unwrap_err();
    assert!(
        matches!(error, AdminClientError::ReadCa { .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("empty.pem"), "{error}");
}

#[test]
fn debug_does_not_show_the_key() {
    let ca = ca("test ca");
    let me = svid(&ca, ADMIN_ID);
    let client =
        AdminClient::new("https://127.0.0.1:8443", me.chain, me.key, vec![ca.cert]).unwrap();
    assert_eq!(
        format!("{client:?}"),
        "AdminClient { url: https://127.0.0.1:8443, timeout: 30s, .. }"
    );
}

// ----- pure helpers -------------------------------------------------------------

#[test]
fn parses_urls() {
    let e = Endpoint::parse("https://127.0.0.1:8443").unwrap();
    assert_eq!((e.host.as_str(), e.port), ("127.0.0.1", 8443));
    assert_eq!(e.authority, "127.0.0.1:8443");
    assert!(matches!(e.server_name, ServerName::IpAddress(_)));

    let e = Endpoint::parse("https://[::1]:9000/").unwrap();
    assert_eq!((e.host.as_str(), e.port), ("::1", 9000));
    assert_eq!(e.authority, "[::1]:9000");
    assert!(matches!(e.server_name, ServerName::IpAddress(_)));

    let e = Endpoint::parse("https://admin.ephemera.internal").unwrap();
    assert_eq!((e.host.as_str(), e.port), ("admin.ephemera.internal", 443));
    assert_eq!(
        e.server_name,
        ServerName::try_from("admin.ephemera.internal").unwrap()
    );

    for bad in [
        "http://127.0.0.1:8443",
        "127.0.0.1:8443",
        "https://",
        "https://127.0.0.1:8443/v1",
        "https://127.0.0.1:8443?x=1",
        "https://user@127.0.0.1:8443",
        "https://bad_host!:8443",
        "not a url",
    ] {
        let error = Endpoint::parse(bad).unwrap_err();
        assert!(
            matches!(error, AdminClientError::BadUrl { .. }),
            "{bad}: {error:?}"
        );
        assert!(
            error.to_string().contains("https://127.0.0.1:8443"),
            "{error}"
        );
    }
}

#[test]
fn encodes_components() {
    assert_eq!(encode_component("billing_rw-1.x~"), "billing_rw-1.x~");
    assert_eq!(
        encode_component("spiffe://example.org/a b&c=d+é"),
        "spiffe%3A%2F%2Fexample.org%2Fa%20b%26c%3Dd%2B%C3%A9"
    );
    let only_state = LeaseFilter {
        state: Some(LeaseState::Expired),
        ..LeaseFilter::default()
    };
    assert_eq!(lease_query(&only_state), "?state=expired");
    assert_eq!(lease_query(&LeaseFilter::default()), "");
}

#[test]
fn api_errors_from_bodies() {
    let error = api_error(StatusCode::CONFLICT, br#"{"error":"lease is revoked"}"#);
    assert_eq!(
        error.to_string(),
        "the admin API cannot do that now (409): lease is revoked"
    );
    let error = api_error(
        StatusCode::FORBIDDEN,
        br#"{"error":"spiffe://x/y is not an admin identity; admin identities are listed in [admin] identities"}"#,
    );
    assert_eq!(
        error.to_string().matches("[admin] identities").count(),
        1,
        "{error}"
    );
    match api_error(StatusCode::SERVICE_UNAVAILABLE, b"") {
        AdminClientError::Api { status, message } => {
            assert_eq!((status, message.as_str()), (503, "Service Unavailable"));
        }
        other => panic!("{other:?}"),
    }
    match api_error(StatusCode::BAD_GATEWAY, "x".repeat(5000).as_bytes()) {
        AdminClientError::Api { message, .. } => {
            assert_eq!(message.chars().count(), MAX_ERROR_TEXT + 1);
        }
        other => panic!("{other:?}"),
    }
}
