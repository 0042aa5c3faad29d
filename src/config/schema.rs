//! The file schema: the TOML DBAs write. Keep these names: DBAs and our
//! checks write against them (config.toml is the annotated example).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// The longest duration any key accepts, and the longest `ttl` the admin
/// API's renew accepts: 10 years (`"10y"`; humantime's year is 365.25 days).
/// Longer ones are refused: lease times are computed from them, and far
/// enough ahead (the year 9999) a time is no longer representable.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 31_557_600);

pub use crate::tls::server_config::{ALPN_POSTGRESQL, CLIENT_RECORD_PLAINTEXT};

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
    #[serde(default)]
    pub tokens: TokensSection,
}

/// `[tokens]`: identity tokens accepted as the password inside TLS.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensSection {
    /// `[[tokens.issuer]]`, one per issuer.
    #[serde(default)]
    pub issuer: Vec<IssuerSection>,
}

/// One `[[tokens.issuer]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerSection {
    /// Short name, used in identities (`<name>:<sub>`), policy and audit.
    pub name: String,
    /// Must equal the token's `iss` (optional for JWT-SVID issuers).
    #[serde(default)]
    pub issuer: Option<String>,
    /// The token's `aud` must contain it.
    pub audience: String,
    #[serde(default)]
    pub jwks_url: Option<String>,
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// CA certificates (PEM) for fetching the JWKS; default: the system's.
    #[serde(default)]
    pub jwks_ca: Option<PathBuf>,
    /// The lease ends no later than the token's `exp`.
    #[serde(default = "defaults::bind_to_expiry")]
    pub bind_to_expiry: bool,
    /// A token opens at most one lease, across replicas.
    #[serde(default)]
    pub single_use: bool,
    /// JWT-SVIDs: `sub` must be a SPIFFE ID of this trust domain.
    #[serde(default)]
    pub spiffe_trust_domain: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// Where the admin API listens (HTTPS with client certificates).
    pub listen: String,
    /// SPIFFE ID patterns (as in `[[policy]]`) allowed to administer leases.
    pub identities: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSection {
    /// JSON-lines audit log; unset: audit events go to the process log only.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// `statement` events waiting for the writer, at most; then each
    /// template's `audit_overflow` decides.
    #[serde(default = "defaults::statement_queue")]
    pub statement_queue: usize,
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
    /// Threads that serve sessions, each with its own single-threaded
    /// runtime; a session lives its whole life on one. Default: the
    /// number of cores.
    #[serde(default)]
    pub workers: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// Ephemera's certificate, key and trust bundle from files (with
    /// `trust_domains` and `federation`) …
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
    #[serde(default)]
    pub trust_bundle: Option<PathBuf>,
    #[serde(default)]
    pub trust_domains: Vec<String>,
    /// … or all of it from the SPIFFE Workload API at this endpoint
    /// (`unix:///run/spire/sockets/agent.sock`).
    #[serde(default)]
    pub workload_api: Option<String>,
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
    /// How sessions log in as minted roles: `"scram"` (the default) or
    /// `"certificate"` (a client certificate per login, issued by the CA in
    /// `login_ca_cert`/`login_ca_key`).
    #[serde(default = "defaults::upstream_login")]
    pub login: String,
    #[serde(default)]
    pub login_ca_cert: String,
    #[serde(default)]
    pub login_ca_key: String,
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

impl Default for AuditSection {
    fn default() -> Self {
        AuditSection {
            path: None,
            statement_queue: defaults::statement_queue(),
        }
    }
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
    /// One `statement` audit event per statement the sessions run.
    #[serde(default)]
    pub audit_statements: bool,
    /// Statements longer than this are cut in the event (with their full
    /// length and SHA-256).
    #[serde(default = "defaults::audit_statement_max_bytes")]
    pub audit_statement_max_bytes: usize,
    /// Also record the Bind parameters (they carry data: off by default).
    #[serde(default)]
    pub audit_parameters: bool,
    /// `"block"` (the session waits for the audit queue) or `"drop"`.
    #[serde(default = "defaults::audit_overflow")]
    pub audit_overflow: String,
    /// `"none"` (a credential per connection) or `"session"` (one lease
    /// per identity, template and database, its backends reused).
    #[serde(default = "defaults::pool")]
    pub pool: String,
    /// Upstream backends of one pool at most.
    #[serde(default = "defaults::template_pool_size")]
    pub pool_size: u32,
    /// An idle backend is closed after this; the lease ends with its pool.
    #[serde(default = "defaults::pool_idle_timeout", with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    /// How long a client waits for a backend when all are busy.
    #[serde(default = "defaults::pool_wait", with = "humantime_serde")]
    pub pool_wait: Duration,
    /// What makes a backend clean for the next client.
    #[serde(default = "defaults::reset_query")]
    pub reset_query: String,
}

impl TemplateSection {
    /// The keys [`TemplateSection`] reads; the rest go to the engine.
    pub const KEYS: [&'static str; 13] = [
        "engine",
        "database",
        "ttl",
        "max_ttl",
        "audit_statements",
        "audit_statement_max_bytes",
        "audit_parameters",
        "audit_overflow",
        "pool",
        "pool_size",
        "pool_idle_timeout",
        "pool_wait",
        "reset_query",
    ];
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySection {
    /// A SPIFFE ID pattern (X.509- and JWT-SVIDs) …
    #[serde(default)]
    pub spiffe_id: Option<String>,
    /// … or a `[[tokens.issuer]]` name, with `claims`.
    #[serde(default)]
    pub token_issuer: Option<String>,
    #[serde(default)]
    pub claims: Option<serde_json::Map<String, serde_json::Value>>,
    /// With `spiffe_id`: the rule is for that agent acting for a person,
    /// whose token (of this issuer, matching these claims) it presents.
    #[serde(default)]
    pub on_behalf_of: Option<OnBehalfOfSection>,
    pub templates: Vec<String>,
}

/// `on_behalf_of = { token_issuer = "corp", claims = { groups = "finance" } }`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnBehalfOfSection {
    pub token_issuer: String,
    pub claims: Option<serde_json::Map<String, serde_json::Value>>,
}

mod defaults {
    use std::time::Duration;

    pub fn audit_statement_max_bytes() -> usize {
        4096
    }

    pub fn statement_queue() -> usize {
        crate::ops::statement_log::DEFAULT_QUEUE
    }

    pub fn audit_overflow() -> String {
        "block".into()
    }

    pub fn pool() -> String {
        "none".into()
    }
    pub fn template_pool_size() -> u32 {
        10
    }
    pub fn pool_idle_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn pool_wait() -> Duration {
        Duration::from_secs(5)
    }
    pub fn reset_query() -> String {
        "DISCARD ALL".into()
    }

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
    pub fn upstream_login() -> String {
        "scram".into()
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
    pub fn bind_to_expiry() -> bool {
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
