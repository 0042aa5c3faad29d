//! Configuration: the TOML schema DBAs write (`config.toml`), `EPHEMERA_`
//! environment overrides, and its validation into the [`Settings`] the
//! proxy runs with.
//!
//! Loading never stops at the first problem: it collects every one, each
//! with the key it is about (`templates.billing_rw.database`) and what to do.
//! Relative paths are relative to the configuration file's directory.
//!
//! | file | what |
//! | --- | --- |
//! | [`schema`] | the file's sections and defaults |
//! | [`read`] | parsing the file and the environment, with key paths |
//! | `validate/` | one function per section, into [`Settings`] |
//! | [`problems`] | what is wrong, and where |
//! | [`check`] | `check-config --connect`: each engine's preflight |

pub mod check;
mod problems;
pub mod read;
pub mod schema;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use self::problems::{ConfigErrors, ConfigProblem};
pub use self::read::{read_file_config, secret_file_warnings};
pub use self::schema::*;
use crate::engines::{EngineRegistry, EnginesConfig};
use crate::identity::token::TokenIssuers;
use crate::identity::SvidVerifier;
use crate::policy::{IdPattern, Policy};
use crate::tls::upstream::UpstreamTls;

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

/// libpq's rule: a host that starts with `/` is a socket directory (one
/// rule for the proxy and the engines: [`ephemera_engine::Upstream`]).
pub(crate) fn is_unix_socket_dir(host: &str) -> bool {
    ephemera_engine::Upstream::is_unix_socket_dir(host)
}

/// What the proxy needs to know about a template (the engine has the rest).
#[derive(Debug, Clone)]
pub struct TemplateSettings {
    pub database: String,
    pub ttl: Duration,
    pub max_ttl: Duration,
    /// Statement audit (`audit_statements`); `None`: off.
    pub statement_audit: Option<StatementAuditSettings>,
    /// Pooled leases (`pool = "session"`); `None`: a credential per
    /// connection.
    pub pool: Option<PoolSettings>,
}

/// A pooled template's pool (`pool = "session"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSettings {
    /// Upstream backends per pool at most (`pool_size`), and the role's
    /// `CONNECTION LIMIT`.
    pub size: u32,
    /// An idle backend is closed after this (`pool_idle_timeout`).
    pub idle_timeout: Duration,
    /// How long a client waits for a backend (`pool_wait`).
    pub wait: Duration,
    /// Sent to a backend before the next client gets it (`reset_query`).
    pub reset_query: String,
}

/// How a template's sessions are audited statement by statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatementAuditSettings {
    /// Statement text kept in an event, at most (longer: cut, with the
    /// full length and SHA-256).
    pub max_bytes: usize,
    /// Record Bind parameters too.
    pub parameters: bool,
    pub overflow: AuditOverflow,
}

/// What a session does when the statement audit queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditOverflow {
    /// The session waits until its events are queued (compliance).
    Block,
    /// The event is dropped, counted in a metric and in the next event.
    Drop,
}

impl AuditOverflow {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditOverflow::Block => "block",
            AuditOverflow::Drop => "drop",
        }
    }
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
    /// and verified against the trust bundle during the handshake. `None`
    /// with `[tls] workload_api`: built from each update instead.
    pub tls: Option<Arc<rustls::ServerConfig>>,
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
    /// Session threads (`listen.workers`), resolved: at least 1.
    pub workers: usize,
    /// Where the listeners' certificate and trust bundles come from.
    pub front_tls: FrontTls,
    pub upstream: UpstreamSettings,
    /// The engines, what they start with, and their templates.
    pub engines: EnginesConfig,
    /// Templates and policy: what SIGHUP reloads.
    pub rules: Rules,
    pub lease: LeaseSettings,
    pub admin: Option<AdminSettings>,
    pub audit_path: Option<PathBuf>,
    /// `[audit] statement_queue`.
    pub audit_statement_queue: usize,
    /// The file this was loaded from, to reload it.
    pub source: Option<PathBuf>,
}

/// `[tls]`, in one of its two forms.
pub enum FrontTls {
    /// `cert`, `key`, `trust_bundle`, `[tls.federation]`: read now, again
    /// on reload.
    Files {
        server_tls: Arc<rustls::ServerConfig>,
        svid_verifier: Arc<SvidVerifier>,
    },
    /// `workload_api`: everything from the SPIFFE Workload API's stream,
    /// once the server starts.
    WorkloadApi { endpoint: String },
}

/// The reloadable part of the configuration.
#[derive(Debug, Clone)]
pub struct Rules {
    pub templates: BTreeMap<String, TemplateSettings>,
    pub policy: Policy,
    /// `[[tokens.issuer]]`, with their keys (files are re-read on reload).
    pub tokens: Arc<TokenIssuers>,
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
        validate::settings(file, base, registry)
    }
}
