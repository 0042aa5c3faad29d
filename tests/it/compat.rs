//! Real clients, unmodified (issue 6): psql, pgbench, pg_dump + pg_restore,
//! tokio-postgres, psycopg 3 and node-postgres run the same scenarios through
//! Ephemera (with an SVID) and directly against PostgreSQL (with a password);
//! the results must be equal apart from the role names.
//!
//! The Python and Node clients live in `tests/clients/`; `.ci/run` installs
//! what they need (`psycopg[binary]`, `npm ci` in `tests/clients/node`).
#![allow(clippy::unwrap_used, clippy::too_many_lines)] // a test: a panic is its failure message; scenarios read top to bottom

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use common::proxy::{
    role_prefix, roles_with_prefix, start_proxy_with_extra_config, wait_until_no_roles,
    ProxyOptions, TestProxy, BILLING_ID, DATABASE, GROUP,
};
use common::{cluster, make_tls_connect};
use rand::distributions::{Alphanumeric, DistString};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;
use tokio_postgres::types::{to_sql_checked, FromSql, IsNull, ToSql, Type};
use tokio_postgres::{AsyncMessage, Client, SimpleQueryMessage};

/// A second identity, given the same templates by an extra policy rule: the
/// other end of LISTEN/NOTIFY.
const OTHER_ID: &str = "spiffe://example.org/ns/prod/sa/other";
/// Direct logins (password, no proxy), members of the group like the minted roles.
const DIRECT_A: &str = "compat_direct_a";
const DIRECT_B: &str = "compat_direct_b";
/// The whole run of one client may take this long.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(180);

// ----- fixtures -------------------------------------------------------------

struct DirectLogins {
    password_a: String,
    password_b: String,
}

static DIRECT: OnceCell<DirectLogins> = OnceCell::const_new();

/// The upstream fixture plus two direct login roles (SCRAM verifiers only, so
/// no password reaches the statement log).
async fn direct_logins() -> &'static DirectLogins {
    DIRECT
        .get_or_init(|| async {
            common::proxy::upstream().await;
            let mut sql = String::new();
            let mut passwords = Vec::new();
            for role in [DIRECT_A, DIRECT_B] {
                let password = Alphanumeric.sample_string(&mut rand::thread_rng(), 24);
                let verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
                sql.push_str(&format!(
                    "CREATE ROLE {role} LOGIN PASSWORD '{verifier}' IN ROLE {GROUP};\n"
                ));
                passwords.push(password);
            }
            // pg_restore -j runs several sessions (several minted roles): they
            // share the objects by `SET ROLE compat_owner` (pg_restore --role).
            sql.push_str(&format!(
                "CREATE ROLE compat_owner NOLOGIN;
                 GRANT compat_owner TO {GROUP};
                 GRANT CREATE ON DATABASE {DATABASE} TO compat_owner;\n"
            ));
            cluster().exec_sql("postgres", &sql).await;
            let password_b = passwords.pop().expect("two passwords");
            let password_a = passwords.pop().expect("two passwords");
            DirectLogins {
                password_a,
                password_b,
            }
        })
        .await
}

/// A proxy serving `template` to [`BILLING_ID`] and [`OTHER_ID`].
async fn start_proxy(template: &str, template_extra: &str) -> TestProxy {
    direct_logins().await;
    let mut options = ProxyOptions::templates(&[template]);
    options.template_extra = template_extra.to_string();
    start_proxy_with_extra_config(
        options,
        &format!("[[policy]]\nspiffe_id = \"{OTHER_ID}\"\ntemplates = [\"{template}\"]\n"),
    )
    .await
}

/// Where and how one client connects: through the proxy (SVID) or directly
/// (password).
#[derive(Debug, Clone)]
struct Endpoint {
    port: u16,
    user: String,
    sslrootcert: PathBuf,
    /// (certificate, key) through the proxy.
    cert: Option<(PathBuf, PathBuf)>,
    password: Option<String>,
}

impl Endpoint {
    fn proxied(proxy: &TestProxy, template: &str, spiffe_id: &str) -> Endpoint {
        let cert = proxy.files.write_cert(&proxy.svid(spiffe_id));
        Endpoint {
            port: proxy.addr.port(),
            user: template.to_string(),
            sslrootcert: proxy.files.server_ca_path.clone(),
            cert: Some(cert),
            password: None,
        }
    }

    async fn direct(user: &str) -> Endpoint {
        let logins = direct_logins().await;
        let password = if user == DIRECT_A {
            &logins.password_a
        } else {
            &logins.password_b
        };
        Endpoint {
            port: cluster().port(),
            user: user.to_string(),
            sslrootcert: cluster().ca_pem_path().to_path_buf(),
            cert: None,
            password: Some(password.clone()),
        }
    }

    /// A libpq connection string.
    fn conninfo(&self) -> String {
        let mut s = format!(
            "host={} port={} user={} dbname={DATABASE} sslmode=verify-full sslrootcert={}",
            common::HOST,
            self.port,
            self.user,
            self.sslrootcert.display()
        );
        if let Some((cert, key)) = &self.cert {
            s.push_str(&format!(
                " sslcert={} sslkey={}",
                cert.display(),
                key.display()
            ));
        }
        if let Some(password) = &self.password {
            s.push_str(&format!(" password={password}"));
        }
        s
    }

    /// The same as JSON for the scripts (libpq keyword names).
    fn json(&self) -> Value {
        let mut v = json!({
            "host": common::HOST,
            "port": self.port,
            "user": self.user,
            "dbname": DATABASE,
            "sslmode": "verify-full",
            "sslrootcert": self.sslrootcert,
        });
        if let Some((cert, key)) = &self.cert {
            v["sslcert"] = json!(cert);
            v["sslkey"] = json!(key);
        }
        if let Some(password) = &self.password {
            v["password"] = json!(password);
        }
        v
    }

    fn pg_config(&self, application_name: &str) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host("localhost")
            .hostaddr(common::HOST.parse().expect("an IP"))
            .port(self.port)
            .user(&self.user)
            .dbname(DATABASE)
            .application_name(application_name)
            .ssl_mode(tokio_postgres::config::SslMode::Require)
            .connect_timeout(Duration::from_secs(10));
        if let Some(password) = &self.password {
            config.password(password);
        }
        config
    }

    fn tls(&self) -> tokio_postgres_rustls::MakeRustlsConnect {
        let ca = std::fs::read_to_string(&self.sslrootcert).expect("the CA file");
        let cert = self.cert.as_ref().map(|(cert, key)| {
            let cert_pem = std::fs::read_to_string(cert).expect("cert");
            let key_pem = std::fs::read_to_string(key).expect("key");
            // Rebuild a TestCert-like client config from the files.
            (cert_pem, key_pem)
        });
        match cert {
            None => make_tls_connect(&ca, None),
            Some((cert_pem, key_pem)) => {
                use rustls_pki_types::pem::PemObject;
                let chain: Vec<_> =
                    rustls_pki_types::CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                        .collect::<Result<_, _>>()
                        .expect("cert PEM");
                let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
                    .expect("key PEM");
                let mut roots = rustls::RootCertStore::empty();
                for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca.as_bytes()) {
                    roots.add(c.expect("CA PEM")).expect("a trust anchor");
                }
                let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .expect("protocol versions")
                .with_root_certificates(roots)
                .with_client_auth_cert(chain, key)
                .expect("client cert");
                tokio_postgres_rustls::MakeRustlsConnect::new(config)
            }
        }
    }

    /// Connect with tokio-postgres; the connection task forwards notifications.
    async fn connect(
        &self,
        application_name: &str,
    ) -> (
        Client,
        tokio::sync::mpsc::UnboundedReceiver<(String, String, i32)>,
    ) {
        let (client, mut connection) = self
            .pg_config(application_name)
            .connect(self.tls())
            .await
            .unwrap_or_else(|e| panic!("tokio-postgres connects as {}: {e}", self.user));
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                match message {
                    Ok(AsyncMessage::Notification(n)) => {
                        let _ = tx.send((
                            n.channel().to_string(),
                            n.payload().to_string(),
                            n.process_id(),
                        ));
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        });
        (client, rx)
    }
}

/// Both identities through the proxy, and both direct logins.
async fn endpoints(proxy: &TestProxy, template: &str) -> ([Endpoint; 2], [Endpoint; 2]) {
    (
        [
            Endpoint::proxied(proxy, template, BILLING_ID),
            Endpoint::proxied(proxy, template, OTHER_ID),
        ],
        [
            Endpoint::direct(DIRECT_A).await,
            Endpoint::direct(DIRECT_B).await,
        ],
    )
}

// ----- comparing ------------------------------------------------------------

/// Replace role names (minted `eph_compat_…` and the direct logins) by `<role>`.
fn normalize(text: &str) -> String {
    let text = text.replace(DIRECT_A, "<role>").replace(DIRECT_B, "<role>");
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(at) = rest.find("eph_compat_") {
        out.push_str(&rest[..at]);
        out.push_str("<role>");
        rest = &rest[at..];
        let end = rest
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(rest.len());
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

fn normalize_json(value: &Value) -> Value {
    serde_json::from_str(&normalize(&value.to_string())).expect("still JSON")
}

/// Paths at which two JSON documents differ.
fn differences(path: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for key in x.keys().chain(y.keys().filter(|k| !x.contains_key(*k))) {
                differences(
                    &format!("{path}.{key}"),
                    x.get(key).unwrap_or(&Value::Null),
                    y.get(key).unwrap_or(&Value::Null),
                    out,
                );
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                differences(&format!("{path}[{i}]"), p, q, out);
            }
        }
        _ if a != b => {
            let show = |v: &Value| {
                let s = v.to_string();
                if s.len() > 300 {
                    format!("{}…", &s[..300])
                } else {
                    s
                }
            };
            out.push(format!(
                "{path}:\n    direct:  {}\n    proxied: {}",
                show(a),
                show(b)
            ));
        }
        _ => {}
    }
}

/// With `EPHEMERA_COMPAT_SHOW=1`, print a run's result document.
fn show_document(client: &str, document: &Value) {
    if std::env::var_os("EPHEMERA_COMPAT_SHOW").is_some() {
        let text = serde_json::to_string_pretty(document).expect("JSON");
        eprintln!("{client} (through Ephemera):\n{text}");
    }
}

fn assert_same(client: &str, direct: &Value, proxied: &Value) {
    let (direct, proxied) = (normalize_json(direct), normalize_json(proxied));
    let mut diffs = Vec::new();
    differences("$", &direct, &proxied, &mut diffs);
    assert!(
        diffs.is_empty(),
        "{client}: the results through Ephemera differ from the direct run:\n{}",
        diffs.join("\n")
    );
}

/// The run's roles are gone once its sessions ended.
async fn assert_roles_dropped(template: &str) {
    let prefix = role_prefix(template);
    assert!(
        wait_until_no_roles(&prefix, Duration::from_secs(5)).await,
        "roles left behind: {:?}",
        roles_with_prefix(&prefix).await
    );
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

// ----- running client programs ----------------------------------------------

fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

/// Runs a program to completion (with a deadline): its stdout, or a description
/// of the failure with its stderr.
async fn try_run(
    what: &str,
    program: &Path,
    args: &[&str],
    envs: &[(&str, &str)],
    stdin: Option<Vec<u8>>,
) -> Result<String, String> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .envs(envs.iter().copied())
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot start {}: {e}", program.display()));
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin");
        tokio::spawn(async move {
            let _ = pipe.write_all(&input).await;
        });
    }
    let output = tokio::time::timeout(CLIENT_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| format!("{what}: did not finish within {CLIENT_TIMEOUT:?}"))?
        .expect("wait");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "{what} failed ({}):\nstderr: {}\nstdout (end): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr),
            &stdout[stdout.len().saturating_sub(2000)..]
        ))
    }
}

/// [`try_run`], panicking on failure.
async fn run(
    what: &str,
    program: &Path,
    args: &[&str],
    envs: &[(&str, &str)],
    stdin: Option<Vec<u8>>,
) -> String {
    try_run(what, program, args, envs, stdin)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Both runs' outputs; panics naming every run that failed.
fn both(direct: Result<String, String>, proxied: Result<String, String>) -> (String, String) {
    match (direct, proxied) {
        (Ok(d), Ok(p)) => (d, p),
        (Ok(_), Err(p)) => panic!("only the run through Ephemera failed; {p}"),
        (Err(d), Ok(_)) => panic!("only the direct run failed; {d}"),
        (Err(d), Err(p)) => panic!("both runs failed;\n{d}\n{p}"),
    }
}

/// Panics with the install instruction if `check` fails.
fn require(client: &str, program: &str, args: &[&str], install: &str) {
    let ok = std::process::Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "the compatibility client {client} is missing: {install} (.ci/run installs it)"
    );
}

fn require_psycopg() {
    require(
        "psycopg 3 (Python)",
        "python3",
        &["-c", "import psycopg"],
        "python3 -m pip install 'psycopg[binary]'",
    );
}

fn script_args(a: &Endpoint, b: &Endpoint) -> String {
    json!({ "a": a.json(), "b": b.json() }).to_string()
}

// ----- psycopg 3 and node-postgres ------------------------------------------

/// Issue 19: every scenario also runs on a template with statement audit,
/// whose relay must be byte for byte the same.
const AUDITED: &str = "audit_statements = true\naudit_parameters = true";

/// Statement events the proxy recorded for `template`.
fn statement_events(proxy: &TestProxy, template: &str) -> usize {
    proxy
        .files
        .audit_events()
        .iter()
        .filter(|e| e["event"] == "statement" && e["template"] == template)
        .count()
}

/// What `audit_statements` must have led to: events for an audited
/// template, none for another.
fn assert_statement_events(template_extra: &str, events: usize) {
    if template_extra.contains("audit_statements = true") {
        assert!(events > 0, "an audited template records its statements");
    } else {
        assert_eq!(
            events, 0,
            "a template without audit_statements records none"
        );
    }
}

async fn script_client_matches(
    client: &str,
    template: &str,
    template_extra: &str,
    program: &str,
    script: &Path,
) {
    let proxy = start_proxy(template, template_extra).await;
    let ([pa, pb], [da, db]) = endpoints(&proxy, template).await;
    let script = script.to_str().expect("UTF-8 path");
    let program = PathBuf::from(program);
    let (proxied_args, direct_args) = (script_args(&pa, &pb), script_args(&da, &db));
    let (what_proxied, what_direct) = (
        format!("{client} through Ephemera"),
        format!("{client} directly"),
    );
    let (args_proxied, args_direct) = ([script, &proxied_args], [script, &direct_args]);
    let (proxied, direct) = tokio::join!(
        try_run(&what_proxied, &program, &args_proxied, &[], None),
        try_run(&what_direct, &program, &args_direct, &[], None),
    );
    let (direct, proxied) = both(direct, proxied);
    let parse = |s: &str| -> Value {
        serde_json::from_str(s.trim())
            .unwrap_or_else(|e| panic!("{client} printed no JSON document ({e}): {s}"))
    };
    let (proxied, direct) = (parse(&proxied), parse(&direct));
    show_document(client, &proxied);
    assert_same(client, &direct, &proxied);
    // Sanity: the proxied run really ran as a minted role.
    let identity = proxied["identity"].to_string();
    assert!(
        identity.contains(&role_prefix(template)),
        "{client} ran as {identity}"
    );
    assert_roles_dropped(template).await;
    assert_statement_events(template_extra, statement_events(&proxy, template));
    proxy.shutdown().await;
}

/// Issue 12: async libpq (psycopg's AsyncConnection) reading wide rows and
/// COPY output, and the pid the driver is told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg3_async_scenarios_match_the_direct_run() {
    require_psycopg();
    script_client_matches(
        "psycopg async",
        "compat_async",
        "",
        "python3",
        &clients_dir().join("python/async_scenarios.py"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg3_scenarios_match_the_direct_run() {
    require_psycopg();
    script_client_matches(
        "psycopg",
        "compat_py",
        "",
        "python3",
        &clients_dir().join("python/scenarios.py"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg3_scenarios_match_on_an_audited_template() {
    require_psycopg();
    script_client_matches(
        "psycopg (audited)",
        "compat_py_audited",
        AUDITED,
        "python3",
        &clients_dir().join("python/scenarios.py"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres_scenarios_match_the_direct_run() {
    let node_dir = clients_dir().join("node");
    require(
        "node-postgres (npm pg)",
        "node",
        &[
            "-e",
            &format!(
                "require({:?}); require({:?})",
                node_dir.join("node_modules/pg"),
                node_dir.join("node_modules/pg-copy-streams")
            ),
        ],
        "npm ci --prefix tests/clients/node",
    );
    script_client_matches(
        "node-postgres",
        "compat_node",
        "",
        "node",
        &node_dir.join("scenarios.js"),
    )
    .await;
}

// ----- tokio-postgres ---------------------------------------------------------

/// `json`/`jsonb` as text (the crate's serde_json support is not enabled here).
#[derive(Debug)]
struct Json(String);

impl ToSql for Json {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        if *ty == Type::JSONB {
            out.extend_from_slice(&[1]);
        }
        out.extend_from_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSON || *ty == Type::JSONB
    }

    to_sql_checked!();
}

impl<'a> FromSql<'a> for Json {
    fn from_sql(
        ty: &Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let raw = if *ty == Type::JSONB { &raw[1..] } else { raw };
        Ok(Json(String::from_utf8(raw.to_vec())?))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSON || *ty == Type::JSONB
    }
}

fn sqlstate(error: &tokio_postgres::Error) -> String {
    error
        .code()
        .map(|c| c.code().to_string())
        .unwrap_or_else(|| error.to_string())
}

/// Rows of a simple query, as text.
async fn simple_rows(client: &Client, sql: &str) -> Value {
    let messages = client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let mut sets = vec![];
    let mut rows = vec![];
    for message in messages {
        match message {
            SimpleQueryMessage::Row(row) => rows.push(
                (0..row.len())
                    .map(|i| json!(row.get(i)))
                    .collect::<Vec<_>>(),
            ),
            SimpleQueryMessage::CommandComplete(n) => {
                sets.push(json!({ "rows": std::mem::take(&mut rows), "count": n }))
            }
            _ => {}
        }
    }
    json!(sets)
}

const CANCEL_SLEEP_SECS: f64 = 8.0;

/// The tokio-postgres scenarios, as one JSON document.
async fn tokio_scenarios(a: &Endpoint, b: &Endpoint) -> Value {
    let app = "compat-tokio";
    let mut doc = serde_json::Map::new();
    let mut config = a.pg_config(app);
    config.options("-c statement_timeout=54321");
    let (mut client, connection) = config.connect(a.tls()).await.expect("connects");
    tokio::spawn(connection);

    // Identity, and application_name as the upstream's superuser sees it.
    let row = client
        .query_one(
            "SELECT current_user::text, session_user::text, application_name,
                    pg_has_role(current_user, $1, 'MEMBER'), pg_backend_pid()
             FROM pg_stat_activity WHERE pid = pg_backend_pid()",
            &[&GROUP],
        )
        .await
        .expect("identity");
    let me: String = row.get(0);
    let backend_pid: i32 = row.get(4);
    // By this backend's pid: other tests' sessions may share a direct user.
    let upstream_app: Vec<String> = cluster()
        .superuser("postgres")
        .await
        .query(
            "SELECT application_name FROM pg_stat_activity WHERE usename = $1 AND pid = $2",
            &[&me, &backend_pid],
        )
        .await
        .expect("pg_stat_activity")
        .iter()
        .map(|r| r.get(0))
        .collect();
    doc.insert(
        "identity".into(),
        json!([
            me,
            row.get::<_, String>(1),
            row.get::<_, String>(2),
            row.get::<_, bool>(3),
            upstream_app
        ]),
    );

    // Extended protocol with parameters of many types (binary format).
    let at = SystemTime::UNIX_EPOCH + Duration::from_micros(1_709_251_198_123_456);
    let ints: Vec<Option<i32>> = vec![Some(1), None, Some(-3)];
    let texts: Vec<Option<String>> = vec![Some("x".into()), None, Some("ünï 🎉".into())];
    let blob: Vec<u8> = vec![0, 1, 2, 0xfe, 0xff, 0];
    let text = "héllo wörld — 日本語 🎉 'quoted' \"double\" \\ back";
    let json_value = Json(r#"{"a": [1, 2.5, {"b": null}], "ü": "ñ"}"#.into());
    let null: Option<i32> = None;
    let row = client
        .query_one(
            "SELECT $1::int4, $2::int8, ($3::text::numeric * 3)::text, $4::text, $5::bytea,
                    $6::bool, $7::timestamptz, $8::jsonb, $9::int4[], $10::text[], $11::int4,
                    $12::float8, $13::json",
            &[
                &42i32,
                &(i64::MAX - 7),
                &"-12345678901234567890.123456789",
                &text,
                &blob,
                &true,
                &at,
                &json_value,
                &ints,
                &texts,
                &null,
                &1.5e300f64,
                &Json("[true, null]".into()),
            ],
        )
        .await
        .expect("typed parameters");
    doc.insert(
        "types".into(),
        json!([
            row.get::<_, i32>(0),
            row.get::<_, i64>(1).to_string(),
            row.get::<_, String>(2),
            row.get::<_, String>(3),
            format!("{:?}", row.get::<_, Vec<u8>>(4)),
            row.get::<_, bool>(5),
            format!("{:?}", row.get::<_, SystemTime>(6)),
            row.get::<_, Json>(7).0,
            format!("{:?}", row.get::<_, Vec<Option<i32>>>(8)),
            format!("{:?}", row.get::<_, Vec<Option<String>>>(9)),
            row.get::<_, Option<i32>>(10),
            row.get::<_, f64>(11).to_string(),
            row.get::<_, Json>(12).0,
        ]),
    );
    // Simple protocol: several statements in one string, text results.
    doc.insert(
        "simple".into(),
        simple_rows(
            &client,
            "SELECT 1 AS one, 'ünï'::text, NULL::int; SELECT '2024-02-29 23:59:58+00'::timestamptz::text, '{1,2}'::int[]::text",
        )
        .await,
    );

    // Prepared statements reused across transactions.
    client
        .batch_execute("CREATE TEMP TABLE prep (id int PRIMARY KEY, label text)")
        .await
        .expect("temp table");
    let insert = client
        .prepare("INSERT INTO prep VALUES ($1, $2)")
        .await
        .expect("prepare");
    let count = client
        .prepare("SELECT count(*), max(label) FROM prep WHERE id >= $1")
        .await
        .expect("prepare");
    let mut per_txn = vec![];
    for txn in 0..3i32 {
        let tx = client.transaction().await.expect("begin");
        for i in 0..3i32 {
            tx.execute(&insert, &[&(txn * 10 + i), &format!("t{txn}-{i}")])
                .await
                .expect("insert");
        }
        let row = tx.query_one(&count, &[&(txn * 10)]).await.expect("count");
        per_txn.push(json!([row.get::<_, i64>(0), row.get::<_, String>(1)]));
        tx.commit().await.expect("commit");
    }
    doc.insert("prepared".into(), json!(per_txn));

    // A rolled back transaction.
    client
        .batch_execute("CREATE TEMP TABLE rb (x int); INSERT INTO rb VALUES (1)")
        .await
        .expect("rb");
    let tx = client.transaction().await.expect("begin");
    tx.execute("INSERT INTO rb VALUES (2), (3)", &[])
        .await
        .expect("insert");
    let inside: i64 = tx
        .query_one("SELECT count(*) FROM rb", &[])
        .await
        .expect("count")
        .get(0);
    tx.rollback().await.expect("rollback");
    let after: i64 = client
        .query_one("SELECT count(*) FROM rb", &[])
        .await
        .expect("count")
        .get(0);
    doc.insert("rollback".into(), json!([inside, after]));

    // A server error mid-transaction, and recovery.
    let tx = client.transaction().await.expect("begin");
    tx.execute("INSERT INTO rb VALUES (4)", &[])
        .await
        .expect("insert");
    let error = tx
        .query_one("SELECT 1 / $1::int4", &[&0i32])
        .await
        .expect_err("division by zero");
    let aborted = tx
        .query_one("SELECT 1", &[])
        .await
        .expect_err("the transaction is aborted");
    tx.rollback().await.expect("rollback");
    let after: i64 = client
        .query_one("SELECT count(*) FROM rb", &[])
        .await
        .expect("recovered")
        .get(0);
    doc.insert(
        "error_recovery".into(),
        json!([sqlstate(&error), sqlstate(&aborted), after]),
    );

    // COPY FROM STDIN (binary) and COPY TO STDOUT (text), 100 000 rows.
    client
        .batch_execute("CREATE TEMP TABLE cp (id int, name text, amount int8)")
        .await
        .expect("cp");
    let sink = client
        .copy_in("COPY cp (id, name, amount) FROM STDIN BINARY")
        .await
        .expect("copy in");
    let writer = tokio_postgres::binary_copy::BinaryCopyInWriter::new(
        sink,
        &[Type::INT4, Type::TEXT, Type::INT8],
    );
    let mut writer = std::pin::pin!(writer);
    for i in 0..100_000i32 {
        writer
            .as_mut()
            .write(&[
                &i,
                &format!("row ünï {i}\ttab"),
                &(i64::from(i) * 1_000_003),
            ])
            .await
            .expect("copy row");
    }
    let copied = writer.finish().await.expect("copy finish");
    let summary = simple_rows(
        &client,
        "SELECT count(*), sum(id), md5(string_agg(cp::text, '|' ORDER BY id)) FROM cp",
    )
    .await;
    let stream = client
        .copy_out("COPY (SELECT * FROM cp ORDER BY id) TO STDOUT")
        .await
        .expect("copy out");
    let out = http_body_util::BodyExt::collect(axum::body::Body::from_stream(stream))
        .await
        .expect("copy out data")
        .to_bytes();
    doc.insert(
        "copy".into(),
        json!({ "copied": copied, "server": summary, "out_bytes": out.len(), "out_sha256": sha256_hex(&out) }),
    );

    // A 64 MiB bytea round trip.
    let big: Vec<u8> = (0..64 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let row = client
        .query_one(
            "SELECT $1::bytea, length($1::bytea), md5($1::bytea)",
            &[&big],
        )
        .await
        .expect("64 MiB bytea");
    let back: Vec<u8> = row.get(0);
    doc.insert(
        "big_bytea".into(),
        json!([back == big, row.get::<_, i32>(1), row.get::<_, String>(2)]),
    );
    drop((back, big));

    // Pipelined queries: all sent before the first answer is read.
    let stmt = client
        .prepare("SELECT $1::int4 * 2, $2::text")
        .await
        .expect("prepare");
    let q = |i: i32| {
        let (client, stmt) = (&client, &stmt);
        async move {
            match client.query_one(stmt, &[&i, &format!("p{i}")]).await {
                Ok(row) => json!([row.get::<_, i32>(0), row.get::<_, String>(1)]),
                Err(e) => json!(["error", sqlstate(&e)]),
            }
        }
    };
    let failing = async {
        match client.query_one("SELECT 1 / $1::int4", &[&0i32]).await {
            Ok(_) => json!("no error"),
            Err(e) => json!(["error", sqlstate(&e)]),
        }
    };
    let piped = tokio::join!(q(0), q(1), q(2), q(3), failing, q(5), q(6), q(7));
    doc.insert(
        "pipeline".into(),
        json!([piped.0, piped.1, piped.2, piped.3, piped.4, piped.5, piped.6, piped.7]),
    );

    // SET / SHOW.
    client
        .batch_execute(
            "SET DateStyle = 'ISO, DMY'; SET TIME ZONE 'Asia/Tokyo'; SET work_mem = '7MB';
             SET search_path = pg_temp, public; SET intervalstyle = 'iso_8601'",
        )
        .await
        .expect("SET");
    let shown = simple_rows(
        &client,
        "SHOW datestyle; SHOW timezone; SHOW work_mem; SHOW search_path; SHOW intervalstyle;
         SHOW statement_timeout; SHOW client_encoding; SHOW application_name;
         SELECT '2024-03-01 12:00:00+00'::timestamptz::text, '1 day 2 hours'::interval::text;
         RESET ALL; SHOW work_mem",
    )
    .await;
    doc.insert("settings".into(), shown);
    drop(client);

    // LISTEN/NOTIFY between two identities, on a channel of our own (the
    // direct and the proxied run, and other clients' tests, run side by side
    // in the same database).
    let (listener, mut notifications) = a.connect(app).await;
    let (notifier, _) = b.connect(app).await;
    let channel = format!("compat_{}", uuid::Uuid::new_v4().simple());
    listener
        .batch_execute(&format!("LISTEN {channel}"))
        .await
        .expect("LISTEN");
    let notifier_pid: i32 = notifier
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    let roles = (
        simple_rows(&listener, "SELECT current_user").await,
        simple_rows(&notifier, "SELECT current_user").await,
    );
    notifier
        .batch_execute(&format!(
            "NOTIFY {channel}, 'hello ü'; SELECT pg_notify('{channel}', 'second')"
        ))
        .await
        .expect("NOTIFY");
    let mut got = vec![];
    for _ in 0..2 {
        let (got_channel, payload, pid) =
            tokio::time::timeout(Duration::from_secs(10), notifications.recv())
                .await
                .expect("a notification within 10 s")
                .expect("the connection is open");
        got.push(json!([
            got_channel == channel,
            payload,
            pid == notifier_pid
        ]));
    }
    doc.insert(
        "listen_notify".into(),
        json!({ "got": got, "different_roles": roles.0 != roles.1 }),
    );
    drop((listener, notifier));

    // Cancel a running query (over TLS, with the session's own cancel key).
    let (client, _) = a.connect(app).await;
    let token = client.cancel_token();
    let started = Instant::now();
    let sleeper = tokio::spawn(async move {
        let result = client
            .query_one("SELECT pg_sleep($1)", &[&CANCEL_SLEEP_SECS])
            .await
            .map(|_| ());
        (client, result)
    });
    let deadline = Duration::from_secs_f64(CANCEL_SLEEP_SECS);
    while !sleeper.is_finished() && started.elapsed() < deadline {
        token
            .cancel_query(a.tls())
            .await
            .expect("cancel request sent");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (client, result) = sleeper.await.expect("task");
    let usable = simple_rows(&client, "SELECT 'still usable'").await;
    doc.insert(
        "cancel".into(),
        json!([
            result.map_err(|e| sqlstate(&e)).err(),
            started.elapsed() < deadline,
            usable
        ]),
    );
    Value::Object(doc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_scenarios_match_the_direct_run() {
    tokio_postgres_matches("compat_tokio", "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_scenarios_match_on_an_audited_template() {
    tokio_postgres_matches("compat_tokio_audited", AUDITED).await;
}

async fn tokio_postgres_matches(template: &str, template_extra: &str) {
    let proxy = start_proxy(template, template_extra).await;
    let ([pa, pb], [da, db]) = endpoints(&proxy, template).await;
    let (proxied, direct) = tokio::join!(tokio_scenarios(&pa, &pb), tokio_scenarios(&da, &db));
    show_document("tokio-postgres", &proxied);
    assert_same("tokio-postgres", &direct, &proxied);
    assert_eq!(
        proxied["listen_notify"]["got"],
        json!([[true, "hello ü", true], [true, "second", true]]),
        "both notifications arrive, from the notifier's backend"
    );
    assert_eq!(
        proxied["identity"][4],
        json!(["compat-tokio"]),
        "application_name reaches pg_stat_activity upstream"
    );
    assert_roles_dropped(template).await;
    assert_statement_events(template_extra, statement_events(&proxy, template));
    proxy.shutdown().await;
}

// ----- psql, pgbench, pg_dump + pg_restore ------------------------------------

fn bin(name: &str) -> PathBuf {
    cluster().bin_dir().join(name)
}

/// Replace the number after every `PID ` (psql's notification lines).
fn normalize_pids(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("PID ") {
        out.push_str(&rest[..at + 4]);
        rest = rest[at + 4..].trim_start_matches(|c: char| c.is_ascii_digit());
        out.push_str("<pid>");
    }
    out.push_str(rest);
    out
}

/// Equal texts after normalisation, or the first differing line.
fn assert_same_text(client: &str, direct: &str, proxied: &str) {
    let (direct, proxied) = (
        normalize_pids(&normalize(direct)),
        normalize_pids(&normalize(proxied)),
    );
    if direct == proxied {
        return;
    }
    let (d, p): (Vec<_>, Vec<_>) = (direct.lines().collect(), proxied.lines().collect());
    let at = d
        .iter()
        .zip(&p)
        .position(|(x, y)| x != y)
        .unwrap_or(d.len().min(p.len()));
    panic!(
        "{client}: the output through Ephemera differs from the direct run at line {} \
         ({} vs {} lines):\n    direct:  {:?}\n    proxied: {:?}",
        at + 1,
        d.len(),
        p.len(),
        d.get(at),
        p.get(at)
    );
}

/// The channel name psql's output shows, whatever the run's own channel.
const PSQL_CHANNEL: &str = "compat_channel";

/// The psql script: simple protocol throughout (psql 15 has no `\bind`).
/// `channel` is this run's own LISTEN/NOTIFY channel: the direct and the
/// proxied run go side by side in one database.
fn psql_script(other: &Endpoint, channel: &str) -> String {
    let mut s = String::from(
        r#"\set ON_ERROR_STOP 0
SELECT current_user, session_user, application_name, pg_has_role(current_user, 'billing_rw', 'MEMBER') FROM pg_stat_activity WHERE pid = pg_backend_pid();
SHOW statement_timeout;
SELECT 42::int, 9223372036854775800::bigint, '-12345678901234567890.123456789'::numeric * 3 AS n, 'héllo wörld — 日本語 🎉'::text, '\x0001feff'::bytea, true, '2024-02-29 23:59:58.123456+00'::timestamptz, '{"a": [1, null], "ü": "ñ"}'::jsonb, ARRAY[1, NULL, 3], ARRAY['x', NULL, 'ünï'], NULL::text;
CREATE TEMP TABLE prep (id int PRIMARY KEY, label text);
PREPARE ins(int, text) AS INSERT INTO prep VALUES ($1, $2);
BEGIN; EXECUTE ins(1, 'a'); COMMIT;
BEGIN; EXECUTE ins(2, 'b'); COMMIT;
SELECT * FROM prep ORDER BY id;
BEGIN; INSERT INTO prep VALUES (3, 'c'); SELECT count(*) FROM prep; ROLLBACK;
SELECT count(*) FROM prep;
BEGIN; INSERT INTO prep VALUES (4, 'd'); SELECT 1 / 0; SELECT 1; ROLLBACK;
SELECT count(*) FROM prep;
CREATE TEMP TABLE cp (id int, name text, amount numeric);
COPY cp FROM STDIN;
"#,
    );
    for i in 0..100_000 {
        s.push_str(&format!(
            "{i}\trow ünï {i}\\ttab\t{}.{:03}\n",
            i / 8,
            i % 1000
        ));
    }
    s.push_str(&format!(
        r#"\.
SELECT count(*), sum(id), md5(string_agg(cp::text, '|' ORDER BY id)) FROM cp;
COPY (SELECT * FROM cp ORDER BY id) TO STDOUT;
SET DateStyle = 'ISO, DMY'; SET TIME ZONE 'Asia/Tokyo'; SET work_mem = '7MB'; SET intervalstyle = 'iso_8601';
SHOW DateStyle; SHOW TimeZone; SHOW work_mem; SHOW IntervalStyle; SHOW client_encoding;
SELECT '2024-03-01 12:00:00+00'::timestamptz, '1 day 2 hours'::interval;
RESET ALL; SHOW work_mem;
LISTEN {channel};
\! {psql} "{conninfo}" -X -q -c "NOTIFY {channel}, 'hello ü'" -c "SELECT pg_notify('{channel}', current_user)"
SELECT 'after notify';
"#,
        psql = bin("psql").display(),
        conninfo = other.conninfo(),
    ));
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_scenarios_match_the_direct_run() {
    psql_matches("compat_psql", "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_scenarios_match_on_an_audited_template() {
    psql_matches("compat_psql_audited", AUDITED).await;
}

async fn psql_matches(template: &str, template_extra: &str) {
    let proxy = start_proxy(template, template_extra).await;
    let ([pa, pb], [da, db]) = endpoints(&proxy, template).await;
    let psql = bin("psql");
    let envs = [
        ("PGAPPNAME", "compat-psql"),
        ("PGOPTIONS", "-c statement_timeout=54321"),
    ];
    let run_psql = |a: &Endpoint, b: &Endpoint, what: &'static str| {
        let channel = format!("compat_{}", uuid::Uuid::new_v4().simple());
        let (conninfo, script, psql) = (a.conninfo(), psql_script(b, &channel), psql.clone());
        async move {
            // Unaligned: column widths would depend on the role names' length.
            let args = [conninfo.as_str(), "-X", "-A", "-f", "-"];
            // stderr (the error lines) merged into the comparison.
            let mut args: Vec<&str> = args.to_vec();
            args.push("-L");
            args.push("/dev/null");
            try_run(what, &psql, &args, &envs, Some(script.into_bytes()))
                .await
                .map(|out| out.replace(&channel, PSQL_CHANNEL))
        }
    };
    let (proxied, direct) = tokio::join!(
        run_psql(&pa, &pb, "psql through Ephemera"),
        run_psql(&da, &db, "psql directly")
    );
    let (direct, proxied) = both(direct, proxied);
    assert!(
        proxied.contains("compat-psql") && proxied.contains(&role_prefix(template)),
        "{}",
        &proxied[..proxied.len().min(2000)]
    );
    assert!(
        proxied.contains("Asynchronous notification \"compat_channel\" with payload \"hello ü\""),
        "the notification from the other identity arrived"
    );
    assert_same_text("psql", &direct, &proxied);
    assert_roles_dropped(template).await;
    assert_statement_events(template_extra, statement_events(&proxy, template));
    proxy.shutdown().await;
}

/// Lines of pgbench's report that do not depend on timing.
fn pgbench_summary(output: &str) -> Vec<String> {
    const KEEP: &[&str] = &[
        "transaction type",
        "scaling factor",
        "query mode",
        "number of clients",
        "number of threads",
        "number of transactions",
        "number of failed",
    ];
    output
        .lines()
        .filter(|l| KEEP.iter().any(|k| l.starts_with(k)))
        .map(str::to_string)
        .collect()
}

async fn pgbench_run(endpoint: &Endpoint, schema: &str, what: &str) -> Result<Value, String> {
    let options = format!("-c search_path={schema}");
    let envs = [
        ("PGOPTIONS", options.as_str()),
        ("PGAPPNAME", "compat-pgbench"),
    ];
    let conninfo = endpoint.conninfo();
    let mut doc = vec![];
    // Client-side data generation: TRUNCATE + COPY of 100 000 accounts.
    let init = try_run(
        what,
        &bin("pgbench"),
        &["-i", "-I", "g", "-s", "1", "-q", &conninfo],
        &envs,
        None,
    )
    .await?;
    doc.push(json!(init
        .lines()
        .filter(|l| l.starts_with("generating"))
        .count()));
    for mode in ["simple", "extended", "prepared"] {
        let out = try_run(
            what,
            &bin("pgbench"),
            &[
                "-n", "-c", "2", "-j", "2", "-t", "50", "-M", mode, &conninfo,
            ],
            &envs,
            None,
        )
        .await?;
        doc.push(json!(pgbench_summary(&out)));
    }
    let check = try_run(
        what,
        &bin("psql"),
        &[
            &conninfo,
            "-X",
            "-A",
            "-t",
            "-c",
            "SELECT count(*), (SELECT sum(abalance) FROM pgbench_accounts) = sum(delta) FROM pgbench_history",
        ],
        &envs,
        None,
    )
    .await?;
    doc.push(json!(check.trim()));
    Ok(json!(doc))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_matches_the_direct_run() {
    let template = "compat_pgbench";
    let proxy = start_proxy(template, "").await;
    let ([pa, _], [da, _]) = endpoints(&proxy, template).await;
    // The superuser creates the tables (pgbench -i steps d, t, p) in one
    // schema per run; the clients fill them and run the benchmark.
    for schema in ["compat_pgb_direct", "compat_pgb_proxied"] {
        cluster()
            .exec_sql(DATABASE, &format!("CREATE SCHEMA {schema}"))
            .await;
        let options = format!("-c search_path={schema}");
        run(
            "pgbench -i as the superuser",
            &bin("pgbench"),
            &[
                "-i",
                "-I",
                "dtp",
                "-s",
                "1",
                "-q",
                &cluster().superuser_url(DATABASE),
            ],
            &[("PGOPTIONS", options.as_str())],
            None,
        )
        .await;
        cluster()
            .exec_sql(
                DATABASE,
                &format!(
                    "GRANT USAGE ON SCHEMA {schema} TO {GROUP};
                     GRANT ALL ON ALL TABLES IN SCHEMA {schema} TO {GROUP};"
                ),
            )
            .await;
    }
    let (proxied, direct) = tokio::join!(
        pgbench_run(&pa, "compat_pgb_proxied", "pgbench through Ephemera"),
        pgbench_run(&da, "compat_pgb_direct", "pgbench directly"),
    );
    let (direct, proxied) = match (direct, proxied) {
        (Ok(d), Ok(p)) => (d, p),
        (d, p) => panic!("pgbench failed:\ndirect: {d:?}\nproxied: {p:?}"),
    };
    show_document("pgbench", &proxied);
    assert_eq!(proxied[4], json!("300|t"), "{proxied}");
    assert_same("pgbench", &direct, &proxied);
    assert_roles_dropped(template).await;
    proxy.shutdown().await;
}

/// Dump a schema with pg_dump, rename it, restore it with pg_restore (two
/// jobs), and compare the restored data with the original.
async fn dump_restore(
    endpoint: &Endpoint,
    schema: &str,
    dir: &Path,
    what: &str,
) -> Result<Value, String> {
    let file = dir.join(format!("{schema}.dump"));
    let file = file.to_str().expect("UTF-8");
    let conninfo = endpoint.conninfo();
    let envs = [("PGAPPNAME", "compat-dump")];
    try_run(
        what,
        &bin("pg_dump"),
        &[
            "-Fc",
            "--no-owner",
            "--no-privileges",
            "-n",
            schema,
            "-f",
            file,
            &conninfo,
        ],
        &envs,
        None,
    )
    .await?;
    let listing = try_run(what, &bin("pg_restore"), &["-l", file], &[], None).await?;
    // "215; 1259 16390 TABLE compat_dump_x t postgres": drop ids and OIDs.
    let listing: Vec<String> = listing
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .map(|l| {
            l.splitn(4, ' ')
                .nth(3)
                .unwrap_or(l)
                .replace(schema, "<schema>")
        })
        .collect();
    cluster()
        .exec_sql(
            DATABASE,
            &format!("ALTER SCHEMA {schema} RENAME TO {schema}_orig"),
        )
        .await;
    try_run(
        what,
        &bin("pg_restore"),
        &[
            "--no-owner",
            "--no-privileges",
            "--role=compat_owner",
            "-j",
            "2",
            "-d",
            &conninfo,
            file,
        ],
        &envs,
        None,
    )
    .await?;
    let admin = cluster().superuser(DATABASE).await;
    let mut compared = vec![];
    for table in ["items", "tags"] {
        let q = |s: &str| {
            format!("SELECT count(*)::text || ' ' || md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) FROM {s}.{table} t")
        };
        let restored: String = admin
            .query_one(&q(schema), &[])
            .await
            .map_err(|e| format!("{what}: restored {table}: {e}"))?
            .get(0);
        let original: String = admin
            .query_one(&q(&format!("{schema}_orig")), &[])
            .await
            .expect("original")
            .get(0);
        compared.push(json!([table, restored == original, restored]));
    }
    let next: i64 = admin
        .query_one(&format!("SELECT nextval('{schema}.items_id_seq')"), &[])
        .await
        .map_err(|e| format!("{what}: the restored sequence: {e}"))?
        .get(0);
    let view: i64 = admin
        .query_one(&format!("SELECT count(*) FROM {schema}.big_items"), &[])
        .await
        .map_err(|e| format!("{what}: the restored view: {e}"))?
        .get(0);
    Ok(json!({ "listing": listing, "tables": compared, "next_id": next, "view_rows": view }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_dump_and_pg_restore_round_trip_matches_the_direct_run() {
    let template = "compat_dump";
    let proxy = start_proxy(template, "").await;
    let ([pa, _], [da, _]) = endpoints(&proxy, template).await;
    for schema in ["compat_dump_direct", "compat_dump_proxied"] {
        cluster()
            .exec_sql(
                DATABASE,
                &format!(
                    "CREATE SCHEMA {schema};
                     CREATE TABLE {schema}.items (id serial PRIMARY KEY, name text NOT NULL,
                         amount numeric(12,2), data bytea, at timestamptz, doc jsonb, labels text[]);
                     CREATE INDEX ON {schema}.items (name);
                     CREATE TABLE {schema}.tags (item int REFERENCES {schema}.items, tag text);
                     INSERT INTO {schema}.items (name, amount, data, at, doc, labels)
                         SELECT 'item ünï ' || i, i * 1.25, decode(md5(i::text), 'hex'),
                                '2024-01-01 00:00:00+00'::timestamptz + i * interval '1 minute',
                                jsonb_build_object('i', i, 'even', i % 2 = 0),
                                ARRAY['a' || i, NULL] FROM generate_series(1, 5000) i;
                     INSERT INTO {schema}.tags SELECT i, 'tag' || (i % 7) FROM generate_series(1, 5000, 3) i;
                     CREATE VIEW {schema}.big_items AS SELECT * FROM {schema}.items WHERE amount > 3000;
                     GRANT USAGE ON SCHEMA {schema} TO {GROUP};
                     GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO {GROUP};
                     GRANT SELECT ON ALL SEQUENCES IN SCHEMA {schema} TO {GROUP};"
                ),
            )
            .await;
    }
    let dir = tempfile::tempdir().expect("a temp dir");
    let (proxied, direct) = tokio::join!(
        dump_restore(
            &pa,
            "compat_dump_proxied",
            dir.path(),
            "pg_dump/pg_restore through Ephemera"
        ),
        dump_restore(
            &da,
            "compat_dump_direct",
            dir.path(),
            "pg_dump/pg_restore directly"
        ),
    );
    let (direct, proxied) = match (direct, proxied) {
        (Ok(d), Ok(p)) => (d, p),
        (d, p) => panic!("pg_dump/pg_restore failed:\ndirect: {d:?}\nproxied: {p:?}"),
    };
    show_document("pg_dump/pg_restore", &proxied);
    for t in proxied["tables"].as_array().expect("tables") {
        assert_eq!(t[1], json!(true), "restored through Ephemera: {t}");
    }
    assert_same("pg_dump/pg_restore", &direct, &proxied);
    assert_roles_dropped(template).await;
    proxy.shutdown().await;
}
