//! Tokens at the door: a client without a client certificate sends an
//! identity token as its password (inside TLS) and lands as a fresh role,
//! for OIDC tokens (JWKS from a file, JWKS over HTTPS from a loopback
//! server) and JWT-SVIDs; every bad token is refused with 28000 and nothing
//! is minted; `single_use` holds across replicas; `bind_to_expiry` caps the
//! lease; a JWKS rotation is picked up without a restart.
#![allow(clippy::unwrap_used, clippy::too_many_lines)] // a test: a panic is its failure message; scenarios read top to bottom

use crate::common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::proxy::{
    psql, role_prefix, roles_with_prefix, start_proxy_with_extra_config, wait_until_no_roles,
    ProxyOptions, TestProxy, BILLING_ID, DATABASE,
};
use common::{make_tls_connect, TestCa};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const AUD: &str = "ephemera";
const FILE_ISS: &str = "https://file.example";
const FETCHED_ISS: &str = "https://fetched.example";
const ONCE_ISS: &str = "https://once.example";
const SPIFFE_AUD: &str = "spiffe://example.org/ephemera";

pub(crate) fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A signing key of ours, and its public JWK.
pub(crate) struct Signer {
    kid: String,
    alg: Algorithm,
    key: EncodingKey,
    jwk: Value,
}

impl Signer {
    pub(crate) fn es256(kid: &str) -> Signer {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = pair.public_key_raw();
        Signer {
            kid: kid.into(),
            alg: Algorithm::ES256,
            key: EncodingKey::from_ec_der(&pair.serialize_der()),
            jwk: json!({"kty": "EC", "crv": "P-256", "x": b64(&raw[1..33]), "y": b64(&raw[33..65]),
                        "kid": kid, "alg": "ES256", "use": "sig"}),
        }
    }

    fn eddsa(kid: &str) -> Signer {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        Signer {
            kid: kid.into(),
            alg: Algorithm::EdDSA,
            key: EncodingKey::from_ed_der(&pair.serialize_der()),
            jwk: json!({"kty": "OKP", "crv": "Ed25519", "x": b64(pair.public_key_raw()),
                        "kid": kid, "alg": "EdDSA"}),
        }
    }

    pub(crate) fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.key).unwrap()
    }
}

pub(crate) fn jwks(signers: &[&Signer]) -> String {
    json!({"keys": signers.iter().map(|s| s.jwk.clone()).collect::<Vec<_>>()}).to_string()
}

pub(crate) fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Claims of a good GitHub-like token from `iss`.
fn claims(iss: &str) -> Value {
    json!({"iss": iss, "aud": AUD, "sub": "repo:acme/billing:ref:refs/heads/main",
           "repository": "acme/billing", "ref": "refs/heads/main",
           "kubernetes.io": {"namespace": "prod"},
           "iat": now() - 10, "nbf": now() - 10, "exp": now() + 600})
}

/// A JWKS served over HTTPS on loopback; its body can be swapped (rotation).
struct JwksServer {
    url: String,
    ca_path: PathBuf,
    body: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

impl JwksServer {
    async fn start(body: String) -> JwksServer {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("jwks-server");
        let ca_path = ca.write_pem(dir.path());
        let cert = ca.server_cert(&["localhost"], &["127.0.0.1".parse().unwrap()]);
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(cert.chain_der(), cert.key_der())
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}/jwks", listener.local_addr().unwrap());
        let body = Arc::new(Mutex::new(body));
        let served = body.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, served) = (acceptor.clone(), served.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut request = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let body = served.lock().unwrap().clone();
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = tls.write_all(response.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        JwksServer {
            url,
            ca_path,
            body,
            _dir: dir,
        }
    }
}

/// The issuers and token policy for `template`, with the JWKS files in `dir`.
fn token_config(dir: &Path, file_jwks: &str, server: &JwksServer, template: &str) -> String {
    let file = dir.join("jwks.json");
    std::fs::write(&file, file_jwks).unwrap();
    format!(
        r#"
[[tokens.issuer]]
name = "filed"
issuer = "{FILE_ISS}"
audience = "{AUD}"
jwks_file = "{file}"

[[tokens.issuer]]
name = "fetched"
issuer = "{FETCHED_ISS}"
audience = "{AUD}"
jwks_url = "{url}"
jwks_ca = "{ca}"

[[tokens.issuer]]
name = "once"
issuer = "{ONCE_ISS}"
audience = "{AUD}"
jwks_file = "{file}"
single_use = true

[[tokens.issuer]]
name = "spire"
spiffe_trust_domain = "example.org"
audience = "{SPIFFE_AUD}"
jwks_file = "{file}"

[[policy]]
token_issuer = "filed"
claims = {{ repository = "acme/billing", ref = "refs/heads/*" }}
templates = ["{template}"]

[[policy]]
token_issuer = "fetched"
claims = {{ "kubernetes.io" = {{ namespace = "prod" }} }}
templates = ["{template}"]

[[policy]]
token_issuer = "once"
claims = {{ repository = "acme/*" }}
templates = ["{template}"]
"#,
        file = file.display(),
        url = server.url,
        ca = server.ca_path.display(),
    )
}

async fn token_proxy(template: &str, extra: &str) -> TestProxy {
    start_proxy_with_extra_config(ProxyOptions::templates(&[template]), extra).await
}

/// Connect without a client certificate, with `token` as the password.
pub(crate) async fn connect(
    proxy: &TestProxy,
    template: &str,
    token: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let tls = make_tls_connect(proxy.files.server_ca.cert_pem(), None);
    let mut config = proxy.pg_config(template, DATABASE);
    config.password(token);
    let (client, connection) = config.connect(tls).await?;
    tokio::spawn(connection);
    Ok(client)
}

pub(crate) async fn session_user(client: &tokio_postgres::Client) -> String {
    client
        .query_one("SELECT session_user::text", &[])
        .await
        .unwrap()
        .get(0)
}

/// Expect a refusal: (SQLSTATE, message).
async fn refused(proxy: &TestProxy, template: &str, token: &str) -> (String, String) {
    match connect(proxy, template, token).await {
        Ok(_) => panic!("a bad token was accepted"),
        Err(error) => {
            let db = error
                .as_db_error()
                .unwrap_or_else(|| panic!("expected an ErrorResponse, got {error:?}"));
            (db.code().code().to_owned(), db.message().to_owned())
        }
    }
}

#[tokio::test]
async fn a_token_of_each_kind_lands_as_a_fresh_role_dropped_at_exit() {
    let template = "tok_kinds";
    let (es, ed) = (Signer::es256("file-es"), Signer::eddsa("file-ed"));
    let fetched = Signer::es256("fetched-1");
    let server = JwksServer::start(jwks(&[&fetched])).await;
    let dir = tempfile::tempdir().unwrap();
    let extra = token_config(dir.path(), &jwks(&[&es, &ed]), &server, template);
    let proxy = token_proxy(template, &extra).await;
    let prefix = role_prefix(template);

    // OIDC, JWKS from a file, through psql with PGPASSWORD as documented.
    let token = es.sign(&claims(FILE_ISS));
    let conninfo = format!(
        "host=127.0.0.1 port={} dbname={DATABASE} user={template} sslmode=verify-full sslrootcert={}",
        proxy.addr.port(),
        proxy.files.server_ca_path.display()
    );
    let output = tokio::process::Command::new(psql())
        .args([
            conninfo.as_str(),
            "-X",
            "-A",
            "-t",
            "-c",
            "SELECT session_user",
        ])
        .env("PGPASSWORD", &token)
        .env("HOME", dir.path())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.trim().starts_with(&prefix),
        "psql: {stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(wait_until_no_roles(&prefix, Duration::from_secs(10)).await);

    // OIDC with an EdDSA key from the same file, and with a JWKS fetched
    // over HTTPS; a JWT-SVID (policy by its SPIFFE ID).
    let svid_claims =
        json!({"sub": BILLING_ID, "aud": SPIFFE_AUD, "exp": now() + 600, "iat": now()});
    let mut fetched_claims = claims(FETCHED_ISS);
    fetched_claims["repository"] = json!("acme/other");
    for token in [
        ed.sign(&claims(FILE_ISS)),
        fetched.sign(&fetched_claims),
        es.sign(&svid_claims),
    ] {
        let client = connect(&proxy, template, &token).await.unwrap();
        let role = session_user(&client).await;
        assert!(role.starts_with(&prefix), "{role}");
        assert_eq!(roles_with_prefix(&prefix).await, vec![role]);
        drop(client);
        assert!(wait_until_no_roles(&prefix, Duration::from_secs(10)).await);
    }

    let identities: Vec<String> = proxy
        .files
        .audit_events()
        .iter()
        .filter(|e| e["event"] == "lease_issued")
        .filter_map(|e| e["identity"].as_str().map(str::to_owned))
        .collect();
    for expected in [
        "filed:repo:acme/billing:ref:refs/heads/main",
        "fetched:repo:acme/billing:ref:refs/heads/main",
        BILLING_ID,
    ] {
        assert!(
            identities.iter().any(|i| i == expected),
            "{expected} in {identities:?}"
        );
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn every_bad_token_is_refused_with_28000_and_nothing_is_minted() {
    let template = "tok_bad";
    let es = Signer::es256("file-es");
    let stranger = Signer::es256("file-es"); // same kid, another key
    let unknown = Signer::es256("not-in-the-set");
    let server = JwksServer::start(jwks(&[&Signer::es256("fetched-1")])).await;
    let dir = tempfile::tempdir().unwrap();
    let extra = token_config(dir.path(), &jwks(&[&es]), &server, template);
    let proxy = token_proxy(template, &extra).await;
    let prefix = role_prefix(template);

    let with = |change: &dyn Fn(&mut Value)| {
        let mut c = claims(FILE_ISS);
        change(&mut c);
        c
    };
    let header_b64 = |header: Value| b64(header.to_string().as_bytes());
    let good_payload = b64(claims(FILE_ISS).to_string().as_bytes());
    let alg_none = format!(
        "{}.{good_payload}.",
        header_b64(json!({"alg": "none", "typ": "JWT"}))
    );
    // HS256 "signed" with the issuer's public key (the classic confusion).
    let public_key = serde_json::to_vec(&es.jwk).unwrap();
    let hs256 = jsonwebtoken::encode(
        &Header {
            kid: Some("file-es".into()),
            ..Header::new(Algorithm::HS256)
        },
        &claims(FILE_ISS),
        &EncodingKey::from_secret(&public_key),
    )
    .unwrap();
    let huge = {
        let mut c = claims(FILE_ISS);
        c["padding"] = json!("x".repeat(17 * 1024));
        es.sign(&c)
    };
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "expired",
            es.sign(&with(&|c| c["exp"] = json!(now() - 3600))),
            "expired",
        ),
        (
            "not yet valid",
            es.sign(&with(&|c| c["nbf"] = json!(now() + 3600))),
            "not valid yet",
        ),
        (
            "issued in the future",
            es.sign(&with(&|c| c["iat"] = json!(now() + 3600))),
            "in the future",
        ),
        (
            "wrong iss",
            es.sign(&with(&|c| c["iss"] = json!("https://evil.example"))),
            "issuer",
        ),
        (
            "wrong aud",
            es.sign(&with(&|c| c["aud"] = json!("someone-else"))),
            "audience",
        ),
        ("unknown kid", unknown.sign(&claims(FILE_ISS)), "key id"),
        (
            "bad signature",
            stranger.sign(&claims(FILE_ISS)),
            "signature",
        ),
        ("alg none", alg_none, "algorithm"),
        ("HS256 with the public key", hs256, "algorithm"),
        ("over 16 KiB", huge, "larger than"),
        ("not a JWT", "hunter2".into(), "not a JSON Web Token"),
        (
            "claims the policy does not allow",
            es.sign(&with(&|c| c["repository"] = json!("acme/other"))),
            "may not use",
        ),
    ];
    for (case, token, reason) in &cases {
        let (code, message) = refused(&proxy, template, token).await;
        assert_eq!(code, "28000", "{case}: {message}");
        assert!(
            message.contains(reason),
            "{case}: {message:?} should say {reason:?}"
        );
        let tail = &token[token.len().saturating_sub(20)..];
        assert!(
            !message.contains(tail),
            "{case}: the message echoes the token"
        );
        assert!(
            roles_with_prefix(&prefix).await.is_empty(),
            "{case}: a role was minted"
        );
    }
    // The audit log never holds a token.
    let audit = std::fs::read_to_string(proxy.files.dir.path().join("audit.jsonl")).unwrap();
    for (case, token, _) in &cases {
        if token.len() > 40 {
            assert!(
                !audit.contains(&token[token.len() - 40..]),
                "{case}: token in the audit log"
            );
        }
    }
    // Still serving.
    let client = connect(&proxy, template, &es.sign(&claims(FILE_ISS)))
        .await
        .unwrap();
    assert!(session_user(&client).await.starts_with(&prefix));
    drop(client);
    assert!(wait_until_no_roles(&prefix, Duration::from_secs(10)).await);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_single_use_token_opens_one_session_even_through_a_second_replica() {
    let template = "tok_once";
    let es = Signer::es256("file-es");
    let server = JwksServer::start(jwks(&[&Signer::es256("fetched-1")])).await;
    let dir = tempfile::tempdir().unwrap();
    let extra = token_config(dir.path(), &jwks(&[&es]), &server, template);
    let first = token_proxy(template, &extra).await;
    let second = token_proxy(template, &extra).await;
    let prefix = role_prefix(template);

    let mut with_jti = claims(ONCE_ISS);
    with_jti["jti"] = json!(uuid::Uuid::new_v4().to_string());
    let mut without_jti = claims(ONCE_ISS);
    without_jti["run"] = json!(uuid::Uuid::new_v4().to_string());
    for token in [es.sign(&with_jti), es.sign(&without_jti)] {
        let client = connect(&first, template, &token).await.unwrap();
        assert!(session_user(&client).await.starts_with(&prefix));
        for replica in [&first, &second] {
            let (code, message) = refused(replica, template, &token).await;
            assert_eq!(code, "28000", "{message}");
            assert!(message.contains("already been used"), "{message}");
        }
        assert_eq!(roles_with_prefix(&prefix).await.len(), 1);
        drop(client);
        assert!(wait_until_no_roles(&prefix, Duration::from_secs(10)).await);
    }
    first.shutdown().await;
    second.shutdown().await;
}

#[tokio::test]
async fn a_lease_ends_at_the_tokens_expiry_when_bound_to_it() {
    let template = "tok_exp";
    let es = Signer::es256("file-es");
    let server = JwksServer::start(jwks(&[&Signer::es256("fetched-1")])).await;
    let dir = tempfile::tempdir().unwrap();
    let extra = token_config(dir.path(), &jwks(&[&es]), &server, template);
    let proxy = token_proxy(template, &extra).await;
    let prefix = role_prefix(template);

    let mut short = claims(FILE_ISS);
    short["exp"] = json!(now() + 3);
    let client = connect(&proxy, template, &es.sign(&short)).await.unwrap();
    assert!(session_user(&client).await.starts_with(&prefix));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if client.simple_query("SELECT 1").await.is_err() {
            break;
        }
        assert!(Instant::now() < deadline, "the session outlived its token");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(wait_until_no_roles(&prefix, Duration::from_secs(10)).await);
    let token_expired = |events: &[Value]| {
        events
            .iter()
            .any(|e| e["event"] == "expired" && e.to_string().contains("token_expired"))
    };
    let reasons: Vec<Value> = proxy
        .files
        .audit_events_when(token_expired)
        .await
        .into_iter()
        .filter(|e| e["event"] == "expired")
        .collect();
    assert!(
        reasons
            .iter()
            .any(|e| e.to_string().contains("token_expired")),
        "{reasons:?}"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_jwks_rotation_is_picked_up_without_a_restart() {
    let template = "tok_rot";
    let (old, new) = (Signer::es256("fetched-1"), Signer::es256("fetched-2"));
    let server = JwksServer::start(jwks(&[&old])).await;
    let file_old = Signer::es256("file-1");
    let dir = tempfile::tempdir().unwrap();
    let extra = token_config(dir.path(), &jwks(&[&file_old]), &server, template);
    let proxy = token_proxy(template, &extra).await;
    let prefix = role_prefix(template);

    let client = connect(&proxy, template, &old.sign(&claims(FETCHED_ISS)))
        .await
        .unwrap();
    drop(client);
    // The issuer rotates: only the new key is published.
    *server.body.lock().unwrap() = jwks(&[&new]);
    let token = new.sign(&claims(FETCHED_ISS));
    let deadline = Instant::now() + Duration::from_secs(20);
    let client = loop {
        match connect(&proxy, template, &token).await {
            Ok(client) => break client,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "the new key was never fetched: {e}"
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    };
    assert!(session_user(&client).await.starts_with(&prefix));
    drop(client);

    // A JWKS file is re-read on reload (SIGHUP).
    let file_new = Signer::es256("file-2");
    let token = file_new.sign(&claims(FILE_ISS));
    let (code, _) = refused(&proxy, template, &token).await;
    assert_eq!(code, "28000");
    std::fs::write(dir.path().join("jwks.json"), jwks(&[&file_new])).unwrap();
    proxy.reloader.reload().unwrap();
    let client = connect(&proxy, template, &token).await.unwrap();
    assert!(session_user(&client).await.starts_with(&prefix));
    drop(client);
    assert!(wait_until_no_roles(&prefix, Duration::from_secs(10)).await);
    proxy.shutdown().await;
}
