//! Configuration: the TOML schema DBAs write (`config.toml`), `EPHEMERA_`
//! environment overrides, and its validation into the [`Settings`] the
//! proxy runs with.
//!
//! Loading never stops at the first problem: it collects every one, each
//! with the key it is about (`templates.billing_rw.database`) and what to do.
//! Relative paths are relative to the configuration file's directory.

pub mod check;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ephemera_engine::{AdminLogin, Password, Template, Upstream};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

use crate::engines::{EngineRegistry, EngineTemplates, EnginesConfig};
use crate::identity::{AcceptAnyClientCert, SvidVerifier};
use crate::policy::{IdPattern, Policy, PolicyRule};
use crate::tls::upstream::{SslMode, UpstreamTls};

/// The longest duration any key accepts, and the longest `ttl` the admin
/// API's renew accepts: 10 years (`"10y"`; humantime's year is 365.25 days).
/// Longer ones are refused: lease times are computed from them, and far
/// enough ahead (the year 9999) a time is no longer representable.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 31_557_600);

/// The ALPN protocol PostgreSQL 17 clients announce for direct TLS.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

// ---------------------------------------------------------------------------
// The file schema. Keep these names: DBAs write against them.
// ---------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: ListenSection,
    pub tls: TlsSection,
    pub upstream: UpstreamSection,
    #[serde(default)]
    pub lease: LeaseSection,
    /// Each template's table as written: the proxy takes its own keys
    /// ([`TemplateSection`]) and hands the rest to the template's engine.
    #[serde(default)]
    pub templates: BTreeMap<String, serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    pub policy: Vec<PolicySection>,
    #[serde(default)]
    pub admin: Option<AdminSection>,
    #[serde(default)]
    pub audit: AuditSection,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// Where the admin API listens (HTTPS with client certificates).
    pub listen: String,
    /// SPIFFE ID patterns (as in `[[policy]]`) allowed to administer leases.
    pub identities: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSection {
    /// JSON-lines audit log; unset: audit events go to the process log only.
    #[serde(default)]
    pub path: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenSection {
    pub address: String,
    #[serde(default = "defaults::handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Relayed sessions at once; past it, new clients get 53300.
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub trust_bundle: PathBuf,
    pub trust_domains: Vec<String>,
    /// Federated trust domains, each with its own bundle file: their SVIDs
    /// must chain to that bundle, and only theirs may.
    #[serde(default)]
    pub federation: BTreeMap<String, PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSection {
    pub host: String,
    pub port: u16,
    #[serde(default = "defaults::admin_database")]
    pub admin_database: String,
    pub admin_user: String,
    pub admin_password_file: PathBuf,
    #[serde(default = "defaults::sslmode")]
    pub sslmode: String,
    #[serde(default)]
    pub ca: String,
    #[serde(default = "defaults::pool_size")]
    pub pool_size: usize,
    #[serde(default = "defaults::connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseSection {
    #[serde(default = "defaults::login_window", with = "humantime_serde")]
    pub login_window: Duration,
    #[serde(default = "defaults::reap_interval", with = "humantime_serde")]
    pub reap_interval: Duration,
    #[serde(default = "defaults::bind_to_svid")]
    pub bind_to_svid: bool,
    /// New leases per identity per second (token bucket refill rate).
    #[serde(default = "defaults::issue_rate")]
    pub issue_rate_per_identity: f64,
    /// New leases an identity may take at once (token bucket size).
    #[serde(default = "defaults::issue_burst")]
    pub issue_burst_per_identity: u32,
}

impl Default for LeaseSection {
    fn default() -> Self {
        LeaseSection {
            login_window: defaults::login_window(),
            reap_interval: defaults::reap_interval(),
            bind_to_svid: defaults::bind_to_svid(),
            issue_rate_per_identity: defaults::issue_rate(),
            issue_burst_per_identity: defaults::issue_burst(),
        }
    }
}

/// The proxy's own keys of a `[templates.<name>]` table; every other key
/// belongs to the engine the template names.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateSection {
    /// Which engine mints this template's credentials.
    #[serde(default = "defaults::engine")]
    pub engine: String,
    pub database: String,
    #[serde(default = "defaults::ttl", with = "humantime_serde")]
    pub ttl: Duration,
    #[serde(default = "defaults::max_ttl", with = "humantime_serde")]
    pub max_ttl: Duration,
}

impl TemplateSection {
    /// The keys [`TemplateSection`] reads; the rest go to the engine.
    pub const KEYS: [&'static str; 4] = ["engine", "database", "ttl", "max_ttl"];
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySection {
    pub spiffe_id: String,
    pub templates: Vec<String>,
}

/// The most plaintext a TLS record towards a PostgreSQL client carries, as
/// PostgreSQL itself sends (its SSL buffer is 8 KiB).
pub const CLIENT_RECORD_PLAINTEXT: usize = 8192;
/// rustls counts `max_fragment_size` with the record header (type, version,
/// length).
const TLS_RECORD_HEADER: usize = 5;

mod defaults {
    use std::time::Duration;

    pub fn engine() -> String {
        crate::engines::DEFAULT_ENGINE.into()
    }
    pub fn handshake_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn admin_database() -> String {
        "postgres".into()
    }
    pub fn sslmode() -> String {
        "require".into()
    }
    pub fn pool_size() -> usize {
        4
    }
    pub fn connect_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn login_window() -> Duration {
        Duration::from_secs(60)
    }
    pub fn ttl() -> Duration {
        Duration::from_secs(15 * 60)
    }
    pub fn max_ttl() -> Duration {
        Duration::from_secs(60 * 60)
    }
    pub fn reap_interval() -> Duration {
        Duration::from_secs(10)
    }
    pub fn bind_to_svid() -> bool {
        true
    }
    pub fn max_connections() -> usize {
        1000
    }
    pub fn issue_rate() -> f64 {
        10.0
    }
    pub fn issue_burst() -> u32 {
        50
    }
}

// ---------------------------------------------------------------------------
// Problems
// ---------------------------------------------------------------------------

/// One thing wrong with a configuration, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// The key path, e.g. `templates.billing_rw.database` (empty: the file).
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

/// Every problem found in a configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors {
    pub path: PathBuf,
    pub problems: Vec<ConfigProblem>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} has {} problem(s):",
            self.path.display(),
            self.problems.len()
        )?;
        for problem in &self.problems {
            writeln!(f, "  {problem}")?;
        }
        Ok(())
    }
}

#[derive(Default)]
struct Problems(Vec<ConfigProblem>);

impl Problems {
    fn add(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigProblem {
            key: key.into(),
            message: message.into(),
        });
    }

    /// Refuse a duration past [`MAX_DURATION`].
    fn at_most_max(&mut self, key: impl Into<String>, value: Duration) {
        if value > MAX_DURATION {
            self.add(
                key,
                format!(
                    "{} is too long: durations may be at most 10 years (\"10y\")",
                    humantime::format_duration(value)
                ),
            );
        }
    }
}

// ---------------------------------------------------------------------------
// The validated settings
// ---------------------------------------------------------------------------

/// Where the upstream PostgreSQL is and how sessions reach it.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    pub host: String,
    pub port: u16,
    pub tls: UpstreamTls,
    pub connect_timeout: Duration,
}

impl UpstreamSettings {
    /// `host:port`, or the socket file's path, for messages.
    pub fn address(&self) -> String {
        match self.unix_socket() {
            Some(path) => path.display().to_string(),
            None => format!("{}:{}", self.host, self.port),
        }
    }

    /// The Unix-domain socket to connect to, if `host` is a directory (as in
    /// libpq: a host starting with `/` names the directory holding
    /// `.s.PGSQL.<port>`).
    pub fn unix_socket(&self) -> Option<PathBuf> {
        is_unix_socket_dir(&self.host)
            .then(|| Path::new(&self.host).join(format!(".s.PGSQL.{}", self.port)))
    }
}

/// libpq's rule: a host that starts with `/` is a socket directory.
fn is_unix_socket_dir(host: &str) -> bool {
    host.starts_with('/')
}

/// What the proxy needs to know about a template (the engine has the rest).
#[derive(Debug, Clone)]
pub struct TemplateSettings {
    pub database: String,
    pub ttl: Duration,
    pub max_ttl: Duration,
}

/// Lease timing.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    pub login_window: Duration,
    pub reap_interval: Duration,
    /// Cap session leases at the client certificate's expiry.
    pub bind_to_svid: bool,
    pub issue_rate_per_identity: f64,
    pub issue_burst_per_identity: u32,
}

/// The admin API's listener and who may use it.
pub struct AdminSettings {
    pub listen: SocketAddr,
    pub identities: Vec<IdPattern>,
    /// Same server certificate as the proxy; client certificates required
    /// and verified against the trust bundle during the handshake.
    pub tls: Arc<rustls::ServerConfig>,
}

impl fmt::Debug for AdminSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminSettings")
            .field("listen", &self.listen)
            .field("identities", &self.identities)
            .finish_non_exhaustive()
    }
}

/// Everything the proxy runs with, validated.
pub struct Settings {
    pub listen: SocketAddr,
    pub handshake_timeout: Duration,
    pub max_connections: usize,
    pub server_tls: Arc<rustls::ServerConfig>,
    pub svid_verifier: Arc<SvidVerifier>,
    pub upstream: UpstreamSettings,
    /// The engines, what they start with, and their templates.
    pub engines: EnginesConfig,
    /// Templates and policy: what SIGHUP reloads.
    pub rules: Rules,
    pub lease: LeaseSettings,
    pub admin: Option<AdminSettings>,
    pub audit_path: Option<PathBuf>,
    /// The file this was loaded from, to reload it.
    pub source: Option<PathBuf>,
}

/// The reloadable part of the configuration.
#[derive(Debug, Clone)]
pub struct Rules {
    pub templates: BTreeMap<String, TemplateSettings>,
    pub policy: Policy,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("listen", &self.listen)
            .field("upstream", &self.upstream)
            .field("rules", &self.rules)
            .finish_non_exhaustive()
    }
}

impl Settings {
    /// Load `path` (TOML) with `EPHEMERA_*` overrides
    /// (`EPHEMERA_UPSTREAM__PORT=5433` sets `upstream.port`) and validate it.
    pub fn load(path: &Path) -> Result<Settings, ConfigErrors> {
        Self::load_with(path, EngineRegistry::builtin())
    }

    /// [`Settings::load`] with the engines of `registry` (the built-in ones
    /// plus any a program or test registered).
    pub fn load_with(path: &Path, registry: EngineRegistry) -> Result<Settings, ConfigErrors> {
        let fail = |problems: Vec<ConfigProblem>| ConfigErrors {
            path: path.to_owned(),
            problems,
        };
        let file = read_file_config(path).map_err(|p| fail(vec![p]))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut settings = Settings::from_file_config(file, base, registry).map_err(fail)?;
        settings.source = Some(path.to_owned());
        Ok(settings)
    }

    /// Validate an already parsed configuration; relative paths are
    /// resolved against `base`.
    pub fn from_file_config(
        file: FileConfig,
        base: &Path,
        registry: EngineRegistry,
    ) -> Result<Settings, Vec<ConfigProblem>> {
        let mut problems = Problems::default();
        let provider = Arc::new(rustls::crypto::ring::default_provider());

        let listen = match file.listen.address.parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                problems.add(
                    "listen.address",
                    format!(
                        "{:?} is not an IP address and port, e.g. \"127.0.0.1:5432\"",
                        file.listen.address
                    ),
                );
                None
            }
        };
        problems.at_most_max("listen.handshake_timeout", file.listen.handshake_timeout);
        problems.at_most_max("upstream.connect_timeout", file.upstream.connect_timeout);
        problems.at_most_max("lease.login_window", file.lease.login_window);
        problems.at_most_max("lease.reap_interval", file.lease.reap_interval);
        if file.listen.handshake_timeout.is_zero() {
            problems.add(
                "listen.handshake_timeout",
                "must be longer than 0s, e.g. \"10s\"",
            );
        }

        // -- TLS towards clients, and the SPIFFE trust bundle --
        let mut trust_domains = Vec::new();
        if file.tls.trust_domains.is_empty() {
            problems.add(
                "tls.trust_domains",
                "list at least one SPIFFE trust domain whose SVIDs are accepted, e.g. [\"example.org\"]",
            );
        }
        for (i, domain) in file.tls.trust_domains.iter().enumerate() {
            match crate::identity::SpiffeId::parse(&format!("spiffe://{domain}")) {
                Ok(id) if id.segments().next().is_none() => trust_domains.push(domain.clone()),
                _ => problems.add(
                    format!("tls.trust_domains[{i}]"),
                    format!("{domain:?} is not a trust domain name (lower-case letters, digits, '.', '-', '_'; no scheme or path)"),
                ),
            }
        }
        let mut bundle = load_certs(
            &base.join(&file.tls.trust_bundle),
            "tls.trust_bundle",
            &mut problems,
        );
        let mut svid_verifier = bundle.as_ref().and_then(|bundle| {
            match SvidVerifier::new(bundle, trust_domains.clone(), provider.clone()) {
                Ok(v) => Some(v),
                Err(e) => {
                    problems.add("tls.trust_bundle", format!("{e}; it must hold the PEM CA certificate(s) of your SPIFFE trust domain"));
                    None
                }
            }
        });
        for (domain, path) in &file.tls.federation {
            let key = format!("tls.federation.{domain}");
            match crate::identity::SpiffeId::parse(&format!("spiffe://{domain}")) {
                Ok(id) if id.segments().next().is_none() => {}
                _ => {
                    problems.add(key, format!("{domain:?} is not a trust domain name"));
                    continue;
                }
            }
            if trust_domains.contains(domain) {
                problems.add(
                    key,
                    format!("{domain:?} is also in tls.trust_domains; a trust domain has one bundle: list it in one place"),
                );
                continue;
            }
            let Some(certs) = load_certs(&base.join(path), &key, &mut problems) else {
                continue;
            };
            svid_verifier = match svid_verifier.map(|v| v.with_federated(domain.clone(), &certs)) {
                Some(Ok(v)) => Some(v),
                Some(Err(e)) => {
                    problems.add(
                        key,
                        format!(
                            "{e}; it must hold the PEM CA certificate(s) of trust domain {domain}"
                        ),
                    );
                    None
                }
                None => None,
            };
            // The admin API's TLS layer accepts every bundle's CAs; the
            // verifier then holds each SVID to its own domain's bundle.
            if let Some(all) = bundle.as_mut() {
                all.extend(certs);
            }
        }
        let svid_verifier = svid_verifier.map(Arc::new);
        let cert_chain = load_certs(&base.join(&file.tls.cert), "tls.cert", &mut problems);
        let key = load_key(&base.join(&file.tls.key), "tls.key", &mut problems);
        let server_identity = cert_chain.zip(key);
        let server_tls = match (&svid_verifier, clone_identity(&server_identity)) {
            (Some(verifier), Some((chain, key))) => {
                match rustls::ServerConfig::builder_with_provider(provider.clone())
                    .with_safe_default_protocol_versions()
                    .map(|b| {
                        b.with_client_cert_verifier(Arc::new(AcceptAnyClientCert::new(
                            verifier.clone(),
                        )))
                    })
                    .and_then(|b| b.with_single_cert(chain, key))
                {
                    Ok(mut config) => {
                        config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
                        // What PostgreSQL sends: records of at most 8 KiB of
                        // plaintext. libpq in non-blocking mode can leave a
                        // bigger record's decrypted bytes buffered where its
                        // socket wait never sees them, and async clients
                        // hang (SECURITY.md, review findings).
                        config.max_fragment_size =
                            Some(CLIENT_RECORD_PLAINTEXT + TLS_RECORD_HEADER);
                        Some(Arc::new(config))
                    }
                    Err(e) => {
                        problems.add(
                            "tls.key",
                            format!("the key does not fit the certificate in tls.cert ({e})"),
                        );
                        None
                    }
                }
            }
            _ => None,
        };

        // -- upstream --
        let up = &file.upstream;
        let sslmode = match up.sslmode.as_str() {
            "disable" => Some(SslMode::Disable),
            "require" => Some(SslMode::Require),
            "verify-full" => Some(SslMode::VerifyFull),
            other => {
                problems.add(
                    "upstream.sslmode",
                    format!("{other:?} is not one of \"disable\", \"require\", \"verify-full\""),
                );
                None
            }
        };
        if is_unix_socket_dir(&up.host) && matches!(sslmode, Some(m) if m != SslMode::Disable) {
            problems.add(
                "upstream.sslmode",
                format!(
                    "upstream.host {:?} is a Unix-domain socket directory, where PostgreSQL \
                     offers no TLS: set sslmode = \"disable\" (the socket file's permissions \
                     guard it), or use a TCP host name",
                    up.host
                ),
            );
        }
        let upstream_ca = if up.ca.is_empty() {
            if sslmode == Some(SslMode::VerifyFull) {
                problems.add(
                    "upstream.ca",
                    "sslmode = \"verify-full\" needs the upstream's CA certificate (PEM path)",
                );
                None
            } else {
                Some(Vec::new())
            }
        } else {
            load_certs(&base.join(&up.ca), "upstream.ca", &mut problems)
        };
        let upstream_tls = match (sslmode, upstream_ca) {
            (Some(mode), Some(ca)) => match UpstreamTls::new(mode, &ca) {
                Ok(tls) => Some(tls),
                Err(e) => {
                    problems.add("upstream.ca", e.to_string());
                    None
                }
            },
            _ => None,
        };
        let admin_password = read_secret_file(
            &base.join(&up.admin_password_file),
            "upstream.admin_password_file",
            &mut problems,
        );
        if up.pool_size == 0 {
            problems.add("upstream.pool_size", "must be at least 1");
        }
        if up.host.is_empty() {
            problems.add("upstream.host", "must name the upstream PostgreSQL host");
        }
        if up.port == 0 {
            problems.add(
                "upstream.port",
                "must be the upstream PostgreSQL port, e.g. 5432",
            );
        }

        // -- lease --
        if file.lease.login_window.is_zero() {
            problems.add("lease.login_window", "must be longer than 0s, e.g. \"60s\"");
        }
        if file.listen.max_connections == 0 {
            problems.add("listen.max_connections", "must be at least 1");
        }
        if !(file.lease.issue_rate_per_identity > 0.0
            && file.lease.issue_rate_per_identity.is_finite())
        {
            problems.add(
                "lease.issue_rate_per_identity",
                "must be a positive number of new leases per second, e.g. 10",
            );
        }
        if file.lease.issue_burst_per_identity == 0 {
            problems.add("lease.issue_burst_per_identity", "must be at least 1");
        }
        if file.lease.reap_interval.is_zero() {
            problems.add(
                "lease.reap_interval",
                "must be longer than 0s, e.g. \"10s\"",
            );
        }

        // -- templates --
        let (templates, engine_templates) = templates(&file.templates, &registry, &mut problems);

        // -- policy --
        let mut rules = Vec::new();
        for (i, rule) in file.policy.iter().enumerate() {
            let key = format!("policy[{i}]");
            match IdPattern::parse(&rule.spiffe_id) {
                Ok(pattern) => rules.push(PolicyRule {
                    pattern,
                    templates: rule.templates.clone(),
                }),
                Err(e) => problems.add(
                    format!("{key}.spiffe_id"),
                    format!("{:?} is not a SPIFFE ID pattern: {e}", rule.spiffe_id),
                ),
            }
            for (j, template) in rule.templates.iter().enumerate() {
                if !file.templates.contains_key(template) {
                    problems.add(
                        format!("{key}.templates[{j}]"),
                        format!("no template named {template:?}; define [templates.{template}] or fix the name"),
                    );
                }
            }
        }

        // -- admin API --
        let admin = file.admin.as_ref().and_then(|admin| {
            let listen = match admin.listen.parse::<SocketAddr>() {
                Ok(addr) => Some(addr),
                Err(_) => {
                    problems.add(
                        "admin.listen",
                        format!(
                            "{:?} is not an IP address and port, e.g. \"127.0.0.1:8443\"",
                            admin.listen
                        ),
                    );
                    None
                }
            };
            if admin.identities.is_empty() {
                problems.add(
                    "admin.identities",
                    "list the SPIFFE IDs (patterns) allowed to administer leases",
                );
            }
            let mut identities = Vec::new();
            for (i, pattern) in admin.identities.iter().enumerate() {
                match IdPattern::parse(pattern) {
                    Ok(p) => identities.push(p),
                    Err(e) => problems.add(
                        format!("admin.identities[{i}]"),
                        format!("{pattern:?} is not a SPIFFE ID pattern: {e}"),
                    ),
                }
            }
            let tls = admin_tls(
                bundle.as_deref()?,
                clone_identity(&server_identity)?,
                provider.clone(),
            )
            .map_err(|e| problems.add("admin", format!("cannot set up TLS for the admin API: {e}")))
            .ok()?;
            Some(AdminSettings {
                listen: listen?,
                identities,
                tls,
            })
        });

        match (
            listen,
            server_tls,
            svid_verifier,
            upstream_tls,
            admin_password,
        ) {
            (Some(listen), Some(server_tls), Some(svid_verifier), Some(tls), Some(password))
                if problems.0.is_empty() =>
            {
                Ok(Settings {
                    listen,
                    handshake_timeout: file.listen.handshake_timeout,
                    max_connections: file.listen.max_connections,
                    server_tls,
                    svid_verifier,
                    upstream: UpstreamSettings {
                        host: up.host.clone(),
                        port: up.port,
                        tls: tls.clone(),
                        connect_timeout: up.connect_timeout,
                    },
                    engines: EnginesConfig {
                        registry,
                        upstream: Upstream {
                            host: up.host.clone(),
                            port: up.port,
                            tls: tls.engine_config(),
                            connect_timeout: up.connect_timeout,
                        },
                        admin: AdminLogin {
                            user: up.admin_user.clone(),
                            password,
                            database: up.admin_database.clone(),
                            pool_size: up.pool_size,
                        },
                        login_window: file.lease.login_window,
                        templates: engine_templates,
                    },
                    rules: Rules {
                        templates,
                        policy: Policy::new(rules),
                    },
                    lease: LeaseSettings {
                        login_window: file.lease.login_window,
                        reap_interval: file.lease.reap_interval,
                        bind_to_svid: file.lease.bind_to_svid,
                        issue_rate_per_identity: file.lease.issue_rate_per_identity,
                        issue_burst_per_identity: file.lease.issue_burst_per_identity,
                    },
                    admin,
                    audit_path: file.audit.path.as_ref().map(|p| base.join(p)),
                    source: None,
                })
            }
            _ => Err(problems.0),
        }
    }
}

/// Split each template's table between the proxy's keys and its engine's,
/// and have the engine check its part. Problems carry full key paths.
fn templates(
    tables: &BTreeMap<String, serde_json::Map<String, serde_json::Value>>,
    registry: &EngineRegistry,
    problems: &mut Problems,
) -> (BTreeMap<String, TemplateSettings>, EngineTemplates) {
    let mut settings = BTreeMap::new();
    let mut engine_templates = Vec::new();
    if tables.is_empty() {
        problems.add(
            "templates",
            "define at least one role template, e.g. [templates.app_rw]",
        );
    }
    for (name, table) in tables {
        let key = format!("templates.{name}");
        let at = |sub: &str| {
            if sub.is_empty() {
                key.clone()
            } else {
                format!("{key}.{sub}")
            }
        };
        let (own, engine_keys): (serde_json::Map<_, _>, serde_json::Map<_, _>) = table
            .clone()
            .into_iter()
            .partition(|(k, _)| TemplateSection::KEYS.contains(&k.as_str()));
        let t: TemplateSection =
            match ephemera_engine::keys::from_keys(serde_json::Value::Object(own)) {
                Ok(t) => t,
                Err(problem) => {
                    problems.add(at(&problem.key), problem.message);
                    continue;
                }
            };
        if t.database.is_empty() {
            problems.add(
                at("database"),
                "must name the database sessions of this template use",
            );
        }
        if t.ttl.is_zero() {
            problems.add(at("ttl"), "must be longer than 0s, e.g. \"15m\"");
        }
        problems.at_most_max(at("ttl"), t.ttl);
        problems.at_most_max(at("max_ttl"), t.max_ttl);
        if t.max_ttl < t.ttl {
            problems.add(
                at("max_ttl"),
                format!(
                    "must be at least ttl ({}), e.g. \"1h\"",
                    humantime::format_duration(t.ttl)
                ),
            );
        }
        let Some(kind) = registry.get(&t.engine) else {
            problems.add(
                at("engine"),
                format!(
                    "no engine named {:?}; use one of {:?}",
                    t.engine,
                    registry.names()
                ),
            );
            continue;
        };
        match kind.template(name, &t.database, engine_keys) {
            Ok(spec) => engine_templates.push((
                kind.name(),
                Template {
                    name: name.clone(),
                    database: t.database.clone(),
                    spec,
                },
            )),
            Err(engine_problems) => {
                for problem in engine_problems {
                    problems.add(at(&problem.key), problem.message);
                }
            }
        }
        settings.insert(
            name.clone(),
            TemplateSettings {
                database: t.database,
                ttl: t.ttl,
                max_ttl: t.max_ttl,
            },
        );
    }
    (
        settings,
        EngineTemplates {
            templates: engine_templates,
        },
    )
}

type ServerIdentity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn clone_identity(identity: &Option<ServerIdentity>) -> Option<ServerIdentity> {
    identity
        .as_ref()
        .map(|(chain, key)| (chain.clone(), key.clone_key()))
}

/// The admin API's TLS: client certificates are required and must chain to
/// the trust bundle before any HTTP is spoken.
fn admin_tls(
    bundle: &[CertificateDer<'static>],
    (chain, key): ServerIdentity,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in bundle {
        roots.add(cert.clone()).map_err(|e| e.to_string())?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| e.to_string())?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Secret files that group or others may access (mode & 0o077 != 0, the
/// rule by which libpq refuses a client key): `tls.key` and
/// `upstream.admin_password_file`, paths resolved against `base`. Each
/// warning names the key and the file and says `chmod 600`. A file that
/// cannot be looked at is left to the loading itself to report.
pub fn secret_file_warnings(file: &FileConfig, base: &Path) -> Vec<ConfigProblem> {
    use std::os::unix::fs::PermissionsExt;
    let secrets = [
        ("tls.key", &file.tls.key),
        (
            "upstream.admin_password_file",
            &file.upstream.admin_password_file,
        ),
    ];
    let mut warnings = Vec::new();
    for (key, path) in secrets {
        let path = base.join(path);
        let Ok(metadata) = std::fs::metadata(&path) else {
            continue;
        };
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            warnings.push(ConfigProblem {
                key: key.to_owned(),
                message: format!(
                    "{} has mode {mode:04o}: group or others can access this secret (libpq would refuse such a key file); run: chmod 600 {}",
                    path.display(),
                    path.display()
                ),
            });
        }
    }
    warnings
}

/// Parse the file (and environment overrides) into the schema.
pub fn read_file_config(path: &Path) -> Result<FileConfig, ConfigProblem> {
    if !path.is_file() {
        return Err(ConfigProblem {
            key: String::new(),
            message: format!("cannot read {}: no such file", path.display()),
        });
    }
    config::Config::builder()
        .add_source(config::File::from(path).format(config::FileFormat::Toml))
        .add_source(
            // Only section-qualified variables (EPHEMERA_UPSTREAM__PORT) are
            // configuration; EPHEMERA_LOG and friends belong to the command.
            config::Environment::with_prefix("EPHEMERA")
                .source(Some(
                    std::env::vars()
                        .filter(|(k, _)| k.starts_with("EPHEMERA_") && k.contains("__"))
                        .collect(),
                ))
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("tls.trust_domains"),
        )
        .build()
        .and_then(|c| c.try_deserialize::<FileConfig>())
        .map_err(|e| parse_problem(&e.to_string()))
}

/// Turn the parser's message ("… for key `upstream`") into a problem with
/// its key path first and a hint on what to do.
fn parse_problem(message: &str) -> ConfigProblem {
    let (text, key) = match message.rsplit_once(" for key `") {
        Some((text, key)) => (text, key.trim_end_matches('`').to_owned()),
        None => (message, String::new()),
    };
    if let Some(rest) = text.strip_prefix("unknown field `") {
        if let Some((field, expected)) = rest.split_once('`') {
            let key = if key.is_empty() {
                field.to_owned()
            } else {
                format!("{key}.{field}")
            };
            return ConfigProblem {
                key,
                message: format!(
                    "unknown key; remove it or fix its spelling{}",
                    expected.replacen(',', ":", 1)
                ),
            };
        }
    }
    if let Some(field) = text
        .strip_prefix("missing configuration field \"")
        .and_then(|r| r.strip_suffix('"'))
    {
        return ConfigProblem {
            key: field.to_owned(),
            message: "is required; see config.toml for an annotated example".into(),
        };
    }
    if text.contains("expected a duration") {
        return ConfigProblem {
            key,
            message: format!("{text}; write a duration such as \"10s\", \"5m\" or \"1h\""),
        };
    }
    if let Some(field) = text
        .strip_prefix("missing field `")
        .and_then(|r| r.strip_suffix('`'))
    {
        let key = if key.is_empty() {
            field.to_owned()
        } else {
            format!("{key}.{field}")
        };
        return ConfigProblem {
            key,
            message: "is required; see config.toml for an annotated example".into(),
        };
    }
    ConfigProblem {
        key,
        message: text.to_owned(),
    }
}

fn load_certs(
    path: &Path,
    key: &str,
    problems: &mut Problems,
) -> Option<Vec<CertificateDer<'static>>> {
    match CertificateDer::pem_file_iter(path).and_then(|iter| iter.collect::<Result<Vec<_>, _>>()) {
        Ok(certs) if certs.is_empty() => {
            problems.add(key, format!("{} holds no PEM certificate", path.display()));
            None
        }
        Ok(certs) => Some(certs),
        Err(e) => {
            problems.add(
                key,
                format!("cannot read PEM certificates from {}: {e}", path.display()),
            );
            None
        }
    }
}

fn load_key(path: &Path, key: &str, problems: &mut Problems) -> Option<PrivateKeyDer<'static>> {
    match PrivateKeyDer::from_pem_file(path) {
        Ok(k) => Some(k),
        // The error never contains key material, only what kind of problem.
        Err(e) => {
            problems.add(
                key,
                format!("cannot read a PEM private key from {}: {e}", path.display()),
            );
            None
        }
    }
}

fn read_secret_file(path: &Path, key: &str, problems: &mut Problems) -> Option<Password> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let secret = text.trim_end_matches(['\r', '\n']).to_owned();
            if secret.is_empty() {
                problems.add(key, format!("{} is empty", path.display()));
                None
            } else {
                Some(Password::new(secret))
            }
        }
        Err(e) => {
            problems.add(key, format!("cannot read {}: {e}", path.display()));
            None
        }
    }
}
