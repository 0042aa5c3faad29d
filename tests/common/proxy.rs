//! An Ephemera proxy for tests, in-process or as the real binary, in front of
//! the shared test cluster.
//!
//! The upstream gets, once per test binary ([`upstream()`]): an admin role
//! `ephemera_admin` with CREATEROLE only (created from a SCRAM verifier, so
//! no password reaches the statement log), a database `billing` with a table
//! `invoices`, and a group role `billing_rw` that may read and write it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ephemera::{Server, Settings};
use rand::distributions::{Alphanumeric, DistString};
use tokio::sync::{oneshot, OnceCell};

use super::pg::{cert_cluster, cluster};
use super::pki::{make_tls_connect, TestCa, TestCert};

pub const TRUST_DOMAIN: &str = "example.org";
/// The identity the default policy allows every template to.
pub const BILLING_ID: &str = "spiffe://example.org/ns/prod/sa/billing";
/// An identity in the trust domain that the default policy allows nothing.
pub const STRANGER_ID: &str = "spiffe://example.org/ns/prod/sa/stranger";
pub const ADMIN_USER: &str = "ephemera_admin";
/// The identity the test configuration lists in `[admin] identities`.
pub const ADMIN_ID: &str = "spiffe://example.org/ops/admin";
pub const DATABASE: &str = "billing";
pub const GROUP: &str = "billing_rw";

pub struct UpstreamFixture {
    pub admin_password: String,
}

static UPSTREAM: OnceCell<UpstreamFixture> = OnceCell::const_new();
static CERT_UPSTREAM: OnceCell<UpstreamFixture> = OnceCell::const_new();

/// Prepare the upstream (idempotent, once per test binary).
pub async fn upstream() -> &'static UpstreamFixture {
    prepare(&UPSTREAM, cluster()).await
}

/// The same fixture on the certificate-login cluster ([`cert_cluster`]).
pub async fn cert_upstream() -> &'static UpstreamFixture {
    prepare(&CERT_UPSTREAM, cert_cluster()).await
}

async fn prepare(
    cell: &'static OnceCell<UpstreamFixture>,
    c: &'static super::pg::TestCluster,
) -> &'static UpstreamFixture {
    cell.get_or_init(|| async {
        let admin_password = Alphanumeric.sample_string(&mut rand::thread_rng(), 24);
        let verifier = postgres_protocol::password::scram_sha_256(admin_password.as_bytes());
        c.exec_sql(
            "postgres",
            &format!(
                "CREATE ROLE {ADMIN_USER} LOGIN CREATEROLE PASSWORD '{verifier}';
                     CREATE ROLE {GROUP} NOLOGIN;
                     CREATE ROLE billing_owner NOLOGIN;
                     GRANT billing_owner TO {ADMIN_USER};
                     CREATE SCHEMA ephemera AUTHORIZATION {ADMIN_USER};
                     REVOKE ALL ON SCHEMA ephemera FROM PUBLIC;"
            ),
        )
        .await;
        // CREATE DATABASE cannot share a transaction with anything else.
        c.exec_sql("postgres", &format!("CREATE DATABASE {DATABASE}"))
            .await;
        c.exec_sql(
            DATABASE,
            &format!(
                "CREATE TABLE invoices (id int PRIMARY KEY, amount numeric NOT NULL);
                     INSERT INTO invoices VALUES (1, 9.99), (2, 20.00);
                     GRANT SELECT, INSERT, UPDATE, DELETE ON invoices TO {GROUP};
                     GRANT CREATE ON SCHEMA public TO {GROUP};
                     GRANT SELECT ON invoices TO {ADMIN_USER} WITH GRANT OPTION;"
            ),
        )
        .await;
        UpstreamFixture { admin_password }
    })
    .await
}

/// What to put in the proxy's configuration.
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    /// Template names; each uses database `billing` and joins `billing_rw`,
    /// and the policy gives all of them to [`BILLING_ID`].
    pub templates: Vec<String>,
    /// Overrides the upstream port (e.g. a closed one).
    pub upstream_port: Option<u16>,
    /// Reach the upstream over its Unix-domain socket (no TLS) instead of
    /// TCP with `verify-full`.
    pub upstream_unix_socket: bool,
    pub login_window: &'static str,
    pub handshake_timeout: &'static str,
    /// Extra TOML appended to every template section.
    pub template_extra: String,
    pub reap_interval: &'static str,
    /// Serve the admin API for [`ADMIN_ID`] on this address (`127.0.0.1:0`
    /// for a random port).
    pub admin_listen: Option<String>,
    /// Extra TOML lines for the `[listen]` and `[lease]` sections.
    pub listen_extra: String,
    pub lease_extra: String,
    /// `upstream.login = "certificate"` against the [`cert_cluster`] (with
    /// its login CA), instead of SCRAM against the shared cluster.
    pub cert_login: bool,
}

impl ProxyOptions {
    pub fn templates(names: &[&str]) -> Self {
        ProxyOptions {
            templates: names.iter().map(|s| s.to_string()).collect(),
            upstream_port: None,
            upstream_unix_socket: false,
            login_window: "60s",
            handshake_timeout: "10s",
            template_extra: String::new(),
            reap_interval: "10s",
            admin_listen: None,
            listen_extra: String::new(),
            lease_extra: String::new(),
            cert_login: false,
        }
    }
}

/// Certificates and configuration on disk for one proxy.
pub struct ProxyFiles {
    pub dir: tempfile::TempDir,
    /// The SPIFFE trust bundle's CA: it issues the workloads' SVIDs.
    pub svid_ca: TestCa,
    /// The CA that signed the proxy's own server certificate.
    pub server_ca: TestCa,
    pub server_ca_path: PathBuf,
    pub config_path: PathBuf,
}

impl ProxyFiles {
    /// The audit log's lines, parsed (every line must be JSON).
    pub fn audit_events(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.dir.path().join("audit.jsonl")).unwrap_or_default();
        text.lines()
            .map(|line| {
                serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("audit line is not JSON ({e}): {line}"))
            })
            .collect()
    }

    /// The audit log's events once `done` holds for them, or as they are
    /// after 10 s. The audit writer runs off the session's thread, so an
    /// event lands a little after what caused it: poll, never read once.
    pub async fn audit_events_when(
        &self,
        done: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let events = self.audit_events();
            if done(&events) || tokio::time::Instant::now() >= deadline {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Write `cert` to disk; returns (cert, key) paths.
    pub fn write_cert(&self, cert: &TestCert) -> (PathBuf, PathBuf) {
        let name = format!(
            "cert-{}",
            Alphanumeric.sample_string(&mut rand::thread_rng(), 8)
        );
        cert.write(self.dir.path(), &name)
    }
}

impl ProxyFiles {
    /// Write certificates and `config.toml` listening on `listen`.
    pub async fn write(options: &ProxyOptions, listen: &str) -> ProxyFiles {
        let (c, upstream) = if options.cert_login {
            (cert_cluster(), cert_upstream().await)
        } else {
            (cluster(), upstream().await)
        };
        let dir = tempfile::tempdir().expect("a temp dir for the proxy");
        let login = match c.login_ca().filter(|_| options.cert_login) {
            Some(ca) => {
                std::fs::write(dir.path().join("login-ca.pem"), ca.cert_pem())
                    .expect("writing the login CA");
                let key = dir.path().join("login-ca-key.pem");
                std::fs::write(&key, ca.key_pem()).expect("writing the login CA key");
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
                    .expect("chmod 600 the login CA key");
                "login = \"certificate\"\nlogin_ca_cert = \"login-ca.pem\"\nlogin_ca_key = \"login-ca-key.pem\"\n"
            }
            None => "",
        };
        let svid_ca = TestCa::new("spiffe-bundle");
        let server_ca = TestCa::new("ephemera-server");
        let server = server_ca.server_cert(&["localhost"], &["127.0.0.1".parse().expect("an IP")]);
        server.write(dir.path(), "server");
        let bundle_path = svid_ca.write_pem(dir.path());
        let server_ca_path = server_ca.write_pem(dir.path());
        std::fs::write(dir.path().join("admin-password"), &upstream.admin_password)
            .expect("writing the admin password file");
        let mut toml = format!(
            r#"
[listen]
address = "{listen}"
handshake_timeout = "{handshake_timeout}"
{listen_extra}

[tls]
cert = "server.pem"
key = "server-key.pem"
trust_bundle = "{bundle}"
trust_domains = ["{TRUST_DOMAIN}"]

[upstream]
host = "{host}"
port = {port}
admin_database = "postgres"
admin_user = "{ADMIN_USER}"
admin_password_file = "admin-password"
{upstream_tls}
{login}pool_size = 2

[lease]
login_window = "{login_window}"
reap_interval = "{reap_interval}"
{lease_extra}

[audit]
path = "audit.jsonl"
"#,
            bundle = bundle_path.display(),
            host = if options.upstream_unix_socket {
                c.socket_dir().display().to_string()
            } else {
                c.host().to_string()
            },
            port = options.upstream_port.unwrap_or(c.port()),
            upstream_tls = if options.upstream_unix_socket {
                "sslmode = \"disable\"".to_string()
            } else {
                format!(
                    "sslmode = \"verify-full\"\nca = \"{}\"",
                    c.ca_pem_path().display()
                )
            },
            login_window = options.login_window,
            handshake_timeout = options.handshake_timeout,
            reap_interval = options.reap_interval,
            listen_extra = options.listen_extra,
            lease_extra = options.lease_extra,
        );
        if let Some(admin_listen) = &options.admin_listen {
            toml.push_str(&format!(
                "\n[admin]\nlisten = \"{admin_listen}\"\nidentities = [\"{ADMIN_ID}\"]\n"
            ));
        }
        for name in &options.templates {
            toml.push_str(&format!(
                "\n[templates.{name}]\ndatabase = \"{DATABASE}\"\nmember_of = [\"{GROUP}\"]\n{}\n",
                options.template_extra
            ));
        }
        let all: Vec<String> = options
            .templates
            .iter()
            .map(|t| format!("\"{t}\""))
            .collect();
        toml.push_str(&format!(
            "\n[[policy]]\nspiffe_id = \"{BILLING_ID}\"\ntemplates = [{}]\n",
            all.join(", ")
        ));
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, toml).expect("writing config.toml");
        ProxyFiles {
            dir,
            svid_ca,
            server_ca,
            server_ca_path,
            config_path,
        }
    }

    /// A valid SVID for `spiffe_id` from the trust bundle's CA.
    pub fn svid(&self, spiffe_id: &str) -> TestCert {
        self.svid_ca.svid(spiffe_id)
    }

    /// A libpq connection string for `psql` with `cert` (written to disk).
    pub fn conninfo(
        &self,
        addr: SocketAddr,
        cert: &TestCert,
        template: &str,
        database: &str,
    ) -> String {
        let name = format!(
            "client-{}",
            Alphanumeric.sample_string(&mut rand::thread_rng(), 8)
        );
        let (cert_path, key_path) = cert.write(self.dir.path(), &name);
        format!(
            "host={} port={} dbname={database} user={template} sslmode=verify-full sslrootcert={} sslcert={} sslkey={}",
            addr.ip(),
            addr.port(),
            self.server_ca_path.display(),
            cert_path.display(),
            key_path.display()
        )
    }
}

/// An in-process proxy serving on a random port until dropped or shut down.
pub struct TestProxy {
    pub files: ProxyFiles,
    pub addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    /// Reloads templates and policy from `files.config_path` (as SIGHUP does).
    pub reloader: ephemera::server::Reloader,
    /// How many connections each session thread was handed.
    pub workers: ephemera::workers::WorkerLoad,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestProxy {
    pub async fn start(options: ProxyOptions) -> TestProxy {
        TestProxy::serve(ProxyFiles::write(&options, "127.0.0.1:0").await).await
    }

    /// Serve the configuration in `files` until shut down.
    pub async fn serve(files: ProxyFiles) -> TestProxy {
        TestProxy::serve_with(files, ephemera::engines::EngineRegistry::builtin()).await
    }

    /// [`TestProxy::serve`] with the engines of `registry` (e.g. one defined
    /// by the test).
    pub async fn serve_with(
        files: ProxyFiles,
        registry: ephemera::engines::EngineRegistry,
    ) -> TestProxy {
        let settings =
            Settings::load_with(&files.config_path, registry).unwrap_or_else(|e| panic!("{e}"));
        let server = Server::bind(settings).await.expect("the proxy binds");
        let addr = server.local_addr();
        let admin_addr = server.admin_addr();
        let reloader = server.reloader();
        let workers = server.services().relay_threads.load().clone();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(async move {
            let _ = rx.await;
        }));
        TestProxy {
            files,
            addr,
            admin_addr,
            reloader,
            workers,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// A tokio-postgres config for this proxy (TLS is required by the caller's connector).
    pub fn pg_config(&self, template: &str, database: &str) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host("localhost")
            .hostaddr(self.addr.ip())
            .port(self.addr.port())
            .user(template)
            .dbname(database)
            .ssl_mode(tokio_postgres::config::SslMode::Require)
            .connect_timeout(Duration::from_secs(10));
        config
    }

    /// Connect through the proxy with `cert` as client certificate (or none).
    pub async fn connect(
        &self,
        cert: Option<&TestCert>,
        template: &str,
        database: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let tls = make_tls_connect(self.files.server_ca.cert_pem(), cert);
        let (client, connection) = self.pg_config(template, database).connect(tls).await?;
        tokio::spawn(connection);
        Ok(client)
    }

    pub fn svid(&self, spiffe_id: &str) -> TestCert {
        self.files.svid(spiffe_id)
    }

    pub fn conninfo(&self, cert: &TestCert, template: &str, database: &str) -> String {
        self.files.conninfo(self.addr, cert, template, database)
    }

    /// Stop accepting, revoke every lease, wait for the server task.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("the server task ends cleanly");
        }
    }
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("address").port()
}

/// An admin API client for `addr` presenting `cert`, trusting the proxy's CA.
pub fn admin_client(
    files: &ProxyFiles,
    addr: SocketAddr,
    cert: &TestCert,
) -> ephemera::admin::client::AdminClient {
    ephemera::admin::client::AdminClient::new(
        &format!("https://{addr}"),
        cert.chain_der(),
        cert.key_der(),
        vec![files.server_ca.cert_der()],
    )
    .expect("an admin client")
}

/// A role as a crashed Ephemera leaves it: an expired lease in its comment.
pub fn plant_expired_role_sql(role: &str, template: &str) -> String {
    let comment = serde_json::json!({
        "ephemera_lease": 1,
        "lease_id": uuid::Uuid::new_v4(),
        "kind": "session",
        "identity": BILLING_ID,
        "template": template,
        "database": DATABASE,
        "issued_at": "2020-01-01T00:00:00Z",
        "expires_at": "2020-01-01T00:15:00Z",
        "max_expires_at": "2020-01-01T01:00:00Z"
    });
    format!("CREATE ROLE \"{role}\" LOGIN; COMMENT ON ROLE \"{role}\" IS '{comment}';\n")
}

/// Roles whose names start with `prefix`, as the superuser sees them.
pub async fn roles_with_prefix(prefix: &str) -> Vec<String> {
    let client = cluster().superuser("postgres").await;
    client
        .query(
            "SELECT rolname FROM pg_roles WHERE starts_with(rolname, $1) ORDER BY 1",
            &[&prefix],
        )
        .await
        .expect("listing roles")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// Poll until no role starts with `prefix`; false if some remain at the deadline.
pub async fn wait_until_no_roles(prefix: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if roles_with_prefix(prefix).await.is_empty() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The role-name prefix of a template.
pub fn role_prefix(template: &str) -> String {
    format!("eph_{template}_")
}

/// Path of the `psql` binary of the test cluster's installation.
pub fn psql() -> PathBuf {
    cluster().bin_dir().join("psql")
}

pub fn path_str(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

/// The `ephemera` binary serving `config`, once it accepts connections on
/// `listen`. Its stderr goes to `stderr_path` (if given).
pub async fn spawn_binary(
    config: &Path,
    listen: &str,
    stderr_path: Option<&Path>,
    envs: &[(&str, &str)],
) -> tokio::process::Child {
    let stderr = match stderr_path {
        Some(path) => std::process::Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .expect("the stderr file"),
        ),
        None => std::process::Stdio::null(),
    };
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ephemera"))
        .args(["serve", "--config"])
        .arg(config)
        .envs(envs.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .expect("ephemera starts");
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(listen).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "ephemera did not start listening on {listen}"
        );
        if child.try_wait().expect("wait").is_some() {
            let log = stderr_path
                .and_then(|p| std::fs::read_to_string(p).ok())
                .unwrap_or_default();
            let tail: String = log.lines().rev().take(20).collect::<Vec<_>>().join("\n");
            panic!("ephemera exited early; last log lines (newest first):\n{tail}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child
}

/// Send `signal` to a child process.
pub fn signal(child: &tokio::process::Child, signal: i32) {
    let pid = child.id().expect("the child is running") as i32;
    let signal = nix::sys::signal::Signal::try_from(signal).expect("a signal number");
    // Our own child process.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).expect("signalling a child");
}

/// Like [`TestProxy::start`], with `extra_toml` appended to `config.toml`
/// before the proxy loads it (e.g. more `[[policy]]` rules or templates).
pub async fn start_proxy_with_extra_config(options: ProxyOptions, extra_toml: &str) -> TestProxy {
    let files = ProxyFiles::write(&options, "127.0.0.1:0").await;
    let mut config = std::fs::read_to_string(&files.config_path).expect("reading config.toml");
    config.push('\n');
    config.push_str(extra_toml);
    config.push('\n');
    std::fs::write(&files.config_path, config).expect("writing config.toml");
    TestProxy::serve(files).await
}
