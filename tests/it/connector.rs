//! `ephemera connect` (issue 16): applications with no credentials at all,
//! over loopback TCP and a Unix socket, land as a fresh role of the
//! connector's SVID; rotated SVID files change the next connection's
//! identity; cancels pass through; `--allow-uid`, a non-loopback
//! `--listen`, a missing or expired SVID and an unreachable Ephemera are
//! refused clearly; `/readyz` tells; `--token-file` works; shutdown lets
//! open sessions finish for the grace period.
#![allow(clippy::unwrap_used, clippy::too_many_lines)] // a test: a panic is its failure message; scenarios read top to bottom

use crate::common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::proxy::{
    free_port, psql, role_prefix, roles_with_prefix, start_proxy_with_extra_config,
    wait_until_no_roles, ProxyOptions, TestProxy, DATABASE,
};
use common::workload_api::{TestWorkloadApi, WorkloadMaterial};
use common::TestCert;
use ephemera::connector::{workload_api_source, Connector, ConnectorOptions, Credential, FileSvid};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

const ONE: &str = "spiffe://example.org/connector/one";
const TWO: &str = "spiffe://example.org/connector/two";

/// A proxy whose policy gives `templates` to the connector's identities.
async fn proxy_for(templates: &[&str], extra: &str) -> TestProxy {
    let list: Vec<String> = templates.iter().map(|t| format!("\"{t}\"")).collect();
    let policy = format!(
        "[[policy]]\nspiffe_id = \"{ONE}\"\ntemplates = [{list}]\n\n[[policy]]\nspiffe_id = \"{TWO}\"\ntemplates = [{list}]\n{extra}",
        list = list.join(", ")
    );
    start_proxy_with_extra_config(ProxyOptions::templates(templates), &policy).await
}

/// A connector serving in this process until dropped or stopped.
struct Running {
    addr: SocketAddr,
    socket: Option<PathBuf>,
    http: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn start(options: ConnectorOptions) -> Running {
        let connector = Connector::bind(options).await.unwrap();
        let addr = connector.local_addr().unwrap();
        let socket = connector.socket_path();
        let http = connector.http_addr();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(connector.serve(async move {
            let _ = rx.await;
        }));
        Running {
            addr,
            socket,
            http,
            stop: Some(tx),
            task,
        }
    }

    /// A tokio-postgres configuration with only host, port, dbname, user.
    fn pg_config(&self, template: &str) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(self.addr.port())
            .user(template)
            .dbname(DATABASE)
            .connect_timeout(Duration::from_secs(10));
        config
    }

    async fn connect(
        &self,
        template: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, connection) = self
            .pg_config(template)
            .connect(tokio_postgres::NoTls)
            .await?;
        tokio::spawn(connection);
        Ok(client)
    }

    async fn connect_unix(
        &self,
        template: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let dir = self.socket.as_ref().unwrap().parent().unwrap().to_owned();
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(dir)
            .port(self.addr.port())
            .user(template)
            .dbname(DATABASE)
            .connect_timeout(Duration::from_secs(10));
        let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        Ok(client)
    }
}

impl Running {
    /// Send the shutdown signal (as SIGTERM does in the binary).
    fn signal_stop(&mut self) {
        let _ = self.stop.take().unwrap().send(());
    }

    /// Wait at most `timeout` for the connector to finish.
    async fn finished_within(&mut self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, &mut self.task).await.is_ok()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn options(proxy: &TestProxy, credential: Credential) -> ConnectorOptions {
    ConnectorOptions {
        to: format!("127.0.0.1:{}", proxy.addr.port()),
        ca: proxy.files.server_ca_path.clone(),
        credential,
        listen: "127.0.0.1:0".parse().unwrap(),
        tcp: true,
        socket_dir: None,
        allow_uid: Vec::new(),
        http: None,
        grace: Duration::from_secs(10),
    }
}

/// Write `cert` to fixed paths in `dir` (rewriting them rotates the SVID).
fn write_svid(dir: &Path, cert: &TestCert) -> (PathBuf, PathBuf) {
    cert.write(dir, "svid")
}

fn file_svid(dir: &Path, cert: &TestCert) -> Credential {
    let (cert, key) = write_svid(dir, cert);
    Credential::Svid(Arc::new(FileSvid::new(cert, key)))
}

/// The session's role and the identity in its lease (the role's comment).
async fn who(client: &tokio_postgres::Client) -> (String, String) {
    let row = client
        .query_one(
            "SELECT session_user::text, shobj_description(
                 (SELECT oid FROM pg_roles WHERE rolname = session_user), 'pg_authid')",
            &[],
        )
        .await
        .unwrap();
    let comment: String = row.get(1);
    let lease: serde_json::Value = serde_json::from_str(&comment).unwrap();
    (row.get(0), lease["identity"].as_str().unwrap().to_owned())
}

fn sqlstate(error: &tokio_postgres::Error) -> (String, String) {
    let db = error
        .as_db_error()
        .unwrap_or_else(|| panic!("not a server error: {error:?}"));
    (db.code().code().to_owned(), db.message().to_owned())
}

/// psql with nothing but host, port, dbname and user; its output.
async fn psql_as_app(conninfo: &str, sql: &str) -> std::process::Output {
    tokio::process::Command::new(psql())
        .args([conninfo, "-X", "-A", "-t", "-c", sql])
        .env_remove("PGPASSWORD")
        .env_remove("PGSSLMODE")
        .env_remove("PGSSLCERT")
        .output()
        .await
        .unwrap()
}

const WHO_SQL: &str = "select session_user || ' ' || (shobj_description((select oid from pg_roles where rolname = session_user), 'pg_authid')::json->>'identity')";

/// psql as an application on `host` (an address or the socket directory):
/// the identity its session's lease names, once it is checked to be a
/// fresh role of `template`.
async fn psql_identity(host: &str, port: u16, template: &str) -> String {
    let conninfo = format!("host={host} port={port} dbname={DATABASE} user={template}");
    let out = psql_as_app(&conninfo, WHO_SQL).await;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{host}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (role, identity) = text.trim().split_once(' ').unwrap();
    assert!(role.starts_with(&role_prefix(template)), "{text}");
    identity.to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_without_credentials_lands_as_the_svid_over_tcp_and_the_unix_socket() {
    let template = "k_psql";
    let proxy = proxy_for(&[template], "").await;
    let dir = tempfile::tempdir().unwrap();
    let mut options = options(&proxy, file_svid(dir.path(), &proxy.svid(ONE)));
    let sockets = tempfile::tempdir().unwrap();
    options.socket_dir = Some(sockets.path().to_owned());
    let connector = Running::start(options).await;
    let socket = connector.socket.clone().unwrap();
    assert_eq!(
        socket.file_name().unwrap().to_str().unwrap(),
        format!(".s.PGSQL.{}", connector.addr.port())
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777,
        0o600,
        "without --allow-uid only our own uid may open the socket"
    );

    for host in ["127.0.0.1".to_owned(), sockets.path().display().to_string()] {
        let identity = psql_identity(&host, connector.addr.port(), template).await;
        assert_eq!(identity, ONE, "via {host}");
    }
    assert!(
        wait_until_no_roles(&role_prefix(template), Duration::from_secs(10)).await,
        "the roles are dropped when psql exits"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_svid_files_change_the_next_connections_identity_only() {
    let template = "k_rotate";
    let proxy = proxy_for(&[template], "").await;
    let dir = tempfile::tempdir().unwrap();
    let connector = Running::start(options(&proxy, file_svid(dir.path(), &proxy.svid(ONE)))).await;

    let first = connector.connect(template).await.unwrap();
    assert_eq!(who(&first).await.1, ONE);
    // Rotation: the same paths, rewritten with another identity.
    write_svid(dir.path(), &proxy.svid(TWO));
    let second = connector.connect(template).await.unwrap();
    let (second_role, second_id) = who(&second).await;
    assert_eq!(second_id, TWO, "the next connection uses the new SVID");
    let (first_role, first_id) = who(&first).await;
    assert_eq!(first_id, ONE, "the open session continues as it was");
    assert_ne!(first_role, second_role);
    drop((first, second));
    assert!(wait_until_no_roles(&role_prefix(template), Duration::from_secs(10)).await);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_through_the_connector_ends_a_long_sleep_within_two_seconds() {
    let template = "k_cancel";
    let proxy = proxy_for(&[template], "").await;
    let dir = tempfile::tempdir().unwrap();
    let connector = Running::start(options(&proxy, file_svid(dir.path(), &proxy.svid(ONE)))).await;
    let client = connector.connect(template).await.unwrap();
    let token = client.cancel_token();
    let sleeper = tokio::spawn(async move {
        let result = client.simple_query("SELECT pg_sleep(60)").await;
        (client, result)
    });
    crate::cancel::wait_for_running_sleep(template).await;
    let started = Instant::now();
    // Plaintext to the connector's port, as libpq before 17 and psql's Ctrl-C do.
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let (client, result) = tokio::time::timeout(Duration::from_secs(2), sleeper)
        .await
        .expect("the sleep ends within 2 s of the cancel")
        .unwrap();
    let error = result.expect_err("the sleep was cancelled");
    assert_eq!(error.code().map(|c| c.code()), Some("57014"), "{error:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    client.simple_query("SELECT 1").await.expect("still usable");
    drop(client);

    // psql's Ctrl-C through the connector.
    let conninfo = format!(
        "host=127.0.0.1 port={} dbname={DATABASE} user={template}",
        connector.addr.port()
    );
    let mut child = tokio::process::Command::new(psql())
        .args([conninfo.as_str(), "-X", "-c", "select pg_sleep(60)"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    crate::cancel::wait_for_running_sleep(template).await;
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    // Our own child, as a terminal's Ctrl-C would.
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(2), child.wait())
        .await
        .expect("psql ends within 2 s of Ctrl-C")
        .unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .await
        .unwrap();
    assert!(!status.success());
    assert!(
        stderr.contains("canceling statement due to user request"),
        "{stderr}"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_loopback_listen_is_refused_saying_why() {
    let dir = tempfile::tempdir().unwrap();
    let ca = common::TestCa::new("connector-ca");
    let ca_path = ca.write_pem(dir.path());
    let options = ConnectorOptions {
        to: "127.0.0.1:1".into(),
        ca: ca_path.clone(),
        credential: Credential::TokenFile(dir.path().join("token")),
        listen: "0.0.0.0:0".parse().unwrap(),
        tcp: true,
        socket_dir: None,
        allow_uid: Vec::new(),
        http: None,
        grace: Duration::from_secs(1),
    };
    let error = Connector::bind(options).await.err().unwrap().to_string();
    assert!(error.contains("not a loopback address"), "{error}");
    assert!(error.contains("anyone who can reach its port"), "{error}");

    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_ephemera"))
        .args(["connect", "--to", "127.0.0.1:1", "--ca"])
        .arg(&ca_path)
        .args(["--token-file", "/nonexistent", "--listen", "0.0.0.0:5432"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a loopback address"), "{stderr}");

    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_ephemera"))
        .args(["connect", "--to", "127.0.0.1:1", "--ca"])
        .arg(&ca_path)
        .args(["--workload-api", "/run/spire/sockets/agent.sock"])
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not a SPIFFE Workload API endpoint"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_uid_refuses_other_uids_on_the_unix_socket() {
    let template = "k_uid";
    let proxy = proxy_for(&[template], "").await;
    let dir = tempfile::tempdir().unwrap();
    let credential = file_svid(dir.path(), &proxy.svid(ONE));
    let me = nix::unistd::Uid::effective().as_raw();
    assert_ne!(me, 12345);

    let sockets = tempfile::tempdir().unwrap();
    let mut refusing = options(&proxy, credential.clone());
    refusing.socket_dir = Some(sockets.path().to_owned());
    refusing.allow_uid = vec![12345];
    let connector = Running::start(refusing).await;
    let error = connector.connect_unix(template).await.err().unwrap();
    let (code, message) = sqlstate(&error);
    assert_eq!(code, "28000", "{message}");
    assert!(message.contains(&format!("uid {me}")), "{message}");
    assert!(message.contains("--allow-uid"), "{message}");
    drop(connector);

    let sockets = tempfile::tempdir().unwrap();
    let mut allowing = options(&proxy, credential);
    allowing.socket_dir = Some(sockets.path().to_owned());
    allowing.allow_uid = vec![12345, me];
    let connector = Running::start(allowing).await;
    let client = connector.connect_unix(template).await.unwrap();
    assert_eq!(who(&client).await.1, ONE);
    drop(client);
    drop(connector);

    // The Unix socket alone: no TCP port another local user could use.
    let sockets = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut socket_only = options(&proxy, file_svid(dir.path(), &proxy.svid(ONE)));
    socket_only.listen = format!("127.0.0.1:{port}").parse().unwrap();
    socket_only.tcp = false;
    socket_only.socket_dir = Some(sockets.path().to_owned());
    let connector = Connector::bind(socket_only).await.unwrap();
    assert_eq!(connector.local_addr(), None);
    let socket = connector.socket_path().unwrap();
    assert!(socket.ends_with(format!(".s.PGSQL.{port}")));
    let task = tokio::spawn(connector.serve(std::future::pending()));
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err());
    let mut config = tokio_postgres::Config::new();
    config
        .host_path(sockets.path())
        .port(port)
        .user(template)
        .dbname(DATABASE);
    let (client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    assert_eq!(who(&client).await.1, ONE);
    drop(client);
    task.abort();
    assert!(wait_until_no_roles(&role_prefix(template), Duration::from_secs(10)).await);
    proxy.shutdown().await;
}

/// `GET path` on the connector's HTTP port: (status, body).
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).await.unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_needs_a_valid_svid_and_no_svid_is_a_clear_fatal() {
    let template = "k_ready";
    let proxy = proxy_for(&[template], "").await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("svid.pem"), dir.path().join("svid-key.pem"));
    let mut options = options(
        &proxy,
        Credential::Svid(Arc::new(FileSvid::new(&cert, &key))),
    );
    options.http = Some("127.0.0.1:0".parse().unwrap());
    let connector = Running::start(options).await;
    let http = connector.http.unwrap();
    assert_eq!(get(http, "/healthz").await.0, 200);

    // No SVID files yet.
    let (status, body) = get(http, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("svid.pem"), "{body}");
    let error = connector.connect(template).await.err().unwrap();
    let (code, message) = sqlstate(&error);
    assert_eq!(code, "08001", "{message}");
    assert!(message.contains("svid.pem"), "{message}");

    // An expired one.
    write_svid(dir.path(), &proxy.files.svid_ca.svid_expired(ONE));
    let (status, body) = get(http, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("expired"), "{body}");
    let (code, message) = sqlstate(&connector.connect(template).await.err().unwrap());
    assert_eq!(code, "08001", "{message}");
    assert!(message.contains("expired"), "{message}");

    // A valid one.
    write_svid(dir.path(), &proxy.svid(ONE));
    let (status, body) = get(http, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(ONE), "{body}");
    let client = connector.connect(template).await.unwrap();
    assert_eq!(who(&client).await.1, ONE);
    drop(client);

    let (status, metrics) = get(http, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("ephemera_connector_connections_total 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ephemera_connector_errors_total{cause=\"svid_expired\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ephemera_connector_errors_total{cause=\"svid_files\"} 1"),
        "{metrics}"
    );
    let expiry: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("ephemera_connector_svid_expiry_seconds "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(expiry > 60.0 && expiry <= 7200.0, "{expiry}");
    assert!(wait_until_no_roles(&role_prefix(template), Duration::from_secs(10)).await);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_ephemera_is_a_fatal_naming_its_address() {
    let dir = tempfile::tempdir().unwrap();
    let ca = common::TestCa::new("connector-ca");
    let svid = ca.svid(ONE);
    let port = free_port();
    let mut options = ConnectorOptions {
        to: format!("127.0.0.1:{port}"),
        ca: ca.write_pem(dir.path()),
        credential: file_svid(dir.path(), &svid),
        listen: "127.0.0.1:0".parse().unwrap(),
        tcp: true,
        socket_dir: None,
        allow_uid: Vec::new(),
        http: Some("127.0.0.1:0".parse().unwrap()),
        grace: Duration::from_secs(1),
    };
    options.grace = Duration::from_secs(1);
    let connector = Running::start(options).await;
    let (code, message) = sqlstate(&connector.connect("k_none").await.err().unwrap());
    assert_eq!(code, "08001", "{message}");
    assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
    let (status, body) = get(connector.http.unwrap(), "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains(&format!("127.0.0.1:{port}")), "{body}");
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_file_is_the_password_read_again_for_every_connection() {
    use serde_json::json;
    let template = "k_token";
    let dir = tempfile::tempdir().unwrap();
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let raw = pair.public_key_raw();
    let jwks = json!({"keys": [{"kty": "EC", "crv": "P-256", "x": b64(&raw[1..33]),
        "y": b64(&raw[33..65]), "kid": "k1", "alg": "ES256", "use": "sig"}]});
    let jwks_path = dir.path().join("jwks.json");
    std::fs::write(&jwks_path, jwks.to_string()).unwrap();
    let extra = format!(
        r#"
[[tokens.issuer]]
name = "connector"
issuer = "https://connector.example"
audience = "ephemera"
jwks_file = "{}"

[[policy]]
token_issuer = "connector"
claims = {{ repository = "acme/connector" }}
templates = ["{template}"]
"#,
        jwks_path.display()
    );
    let proxy = start_proxy_with_extra_config(ProxyOptions::templates(&[template]), &extra).await;
    let key = jsonwebtoken::EncodingKey::from_ec_der(&pair.serialize_der());
    let token = |repository: &str| {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some("k1".into());
        let claims = json!({"iss": "https://connector.example", "aud": "ephemera",
            "sub": format!("repo:{repository}"), "repository": repository,
            "iat": now - 10, "nbf": now - 10, "exp": now + 600});
        jsonwebtoken::encode(&header, &claims, &key).unwrap()
    };
    let token_path = dir.path().join("token");
    std::fs::write(&token_path, format!("{}\n", token("acme/connector"))).unwrap();
    let connector =
        Running::start(options(&proxy, Credential::TokenFile(token_path.clone()))).await;

    let client = connector.connect(template).await.unwrap();
    let role: String = client
        .query_one("SELECT session_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert!(role.starts_with(&role_prefix(template)), "{role}");

    // The file is read again: a token the policy does not allow is refused
    // by Ephemera, and the application sees Ephemera's refusal.
    std::fs::write(&token_path, token("acme/other")).unwrap();
    let (code, message) = sqlstate(&connector.connect(template).await.err().unwrap());
    assert_eq!(code, "28000", "{message}");
    std::fs::write(&token_path, token("acme/connector")).unwrap();
    connector.connect(template).await.unwrap();
    drop(client);
    assert!(wait_until_no_roles(&role_prefix(template), Duration::from_secs(10)).await);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_accepting_and_ends_sessions_after_the_grace_period() {
    let template = "k_grace";
    let proxy = proxy_for(&[template], "").await;
    let dir = tempfile::tempdir().unwrap();
    let mut options = options(&proxy, file_svid(dir.path(), &proxy.svid(ONE)));
    options.grace = Duration::from_secs(2);
    let mut connector = Running::start(options).await;
    let client = connector.connect(template).await.unwrap();
    connector.signal_stop();
    // Not accepting any more.
    let deadline = Instant::now() + Duration::from_secs(5);
    while tokio::net::TcpStream::connect(connector.addr).await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting after shutdown");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The open session runs on during the grace period.
    client
        .simple_query("SELECT 1")
        .await
        .expect("usable during the grace period");
    assert!(
        connector.finished_within(Duration::from_secs(6)).await,
        "the connector ends after the grace period"
    );
    let error = client.simple_query("SELECT 1").await.unwrap_err();
    assert!(error.is_closed() || error.code().is_some(), "{error:?}");
    assert!(wait_until_no_roles(&role_prefix(template), Duration::from_secs(10)).await);
    proxy.shutdown().await;
}

/// Poll `/readyz` until it answers `status` (the Workload API client
/// follows the agent in the background); the last answer.
async fn readyz_until(http: SocketAddr, status: u16) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = get(http, "/readyz").await;
        if answer.0 == status || Instant::now() > deadline {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svids_from_the_workload_api_rotate_for_the_next_connection_and_expire_clearly() {
    let template = "k_wlapi";
    let proxy = proxy_for(&[template], "").await;
    let ca = &proxy.files.svid_ca;
    let material = |id: &str, svid: TestCert| WorkloadMaterial::new(id, svid, vec![ca.cert_der()]);
    let agent = TestWorkloadApi::start(material(ONE, proxy.svid(ONE))).await;
    let source = workload_api_source(&agent.endpoint()).unwrap();
    let mut options = options(&proxy, Credential::Svid(source));
    options.http = Some("127.0.0.1:0".parse().unwrap());
    let connector = Running::start(options).await;
    let http = connector.http.unwrap();

    let (status, body) = readyz_until(http, 200).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(ONE), "{body}");
    let identity = psql_identity("127.0.0.1", connector.addr.port(), template).await;
    assert_eq!(identity, ONE, "psql lands as the Workload API's SVID");
    let first = connector.connect(template).await.unwrap();
    assert_eq!(who(&first).await.1, ONE);

    // The agent pushes a new SVID (another identity, to tell them apart):
    // the next connection presents it; the open session is untouched.
    agent.push(material(TWO, proxy.svid(TWO)));
    let deadline = Instant::now() + Duration::from_secs(10);
    let second = loop {
        let client = connector.connect(template).await.unwrap();
        if who(&client).await.1 == TWO {
            break client;
        }
        assert!(Instant::now() < deadline, "the pushed SVID was never used");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(
        who(&first).await.1,
        ONE,
        "the open session keeps its identity"
    );

    // The agent's last SVID expires without a newer one: a clear FATAL and
    // /readyz 503 instead of a hang; open sessions go on.
    agent.push(material(TWO, ca.svid_expired(TWO)));
    let (status, body) = readyz_until(http, 503).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("expired"), "{body}");
    let (code, message) = sqlstate(&connector.connect(template).await.err().unwrap());
    assert_eq!(code, "08001", "{message}");
    assert!(message.contains("expired"), "{message}");
    assert!(message.contains(&agent.endpoint()), "{message}");
    assert_eq!(who(&second).await.1, TWO);
    drop((first, second));
    assert!(wait_until_no_roles(&role_prefix(template), Duration::from_secs(10)).await);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_workload_api_is_a_fatal_naming_it() {
    let template = "k_wlapi_gone";
    let proxy = proxy_for(&[template], "").await;
    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("unix://{}", dir.path().join("agent.sock").display());
    let mut options = options(
        &proxy,
        Credential::Svid(workload_api_source(&endpoint).unwrap()),
    );
    options.http = Some("127.0.0.1:0".parse().unwrap());
    let connector = Running::start(options).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let message = loop {
        let (code, message) = sqlstate(&connector.connect(template).await.err().unwrap());
        assert_eq!(code, "08001", "{message}");
        if message.contains("unreachable") || Instant::now() > deadline {
            break message;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert!(message.contains("unreachable"), "{message}");
    assert!(message.contains(&endpoint), "{message}");
    let (status, body) = get(connector.http.unwrap(), "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(roles_with_prefix(&role_prefix(template)).await.is_empty());
    proxy.shutdown().await;
}
