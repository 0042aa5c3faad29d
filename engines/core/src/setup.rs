//! How the proxy learns about an engine and starts it.
//!
//! An [`EngineKind`] is registered with the proxy once (`src/engines.rs`).
//! It owns everything engine-specific about a template: its keys in
//! `[templates.<name>]` (deserialised and checked by the kind itself, with
//! key paths), the `check-config --connect` preflight, and starting the
//! [`Engine`] with the upstream and admin login the proxy's `[upstream]`
//! section describes.

use std::any::Any;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::{Engine, EngineError, Password};

/// Where the upstream database is and how to reach it: the proxy's
/// `[upstream]` section. The proxy owns the TLS settings; engines use the
/// client configuration they are given.
#[derive(Clone)]
pub struct Upstream {
    pub host: String,
    pub port: u16,
    /// TLS for connections to the upstream; `None`: plain TCP or a Unix
    /// socket (`sslmode = "disable"`).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub connect_timeout: Duration,
    /// How sessions log in as the roles engines make (`upstream.login`).
    pub login: UpstreamLoginMethod,
}

/// `upstream.login`: how Ephemera proves a minted role upstream.
#[derive(Debug, Clone, Default)]
pub enum UpstreamLoginMethod {
    /// SCRAM-SHA-256 with keys drawn per role (the default).
    #[default]
    Scram,
    /// A client certificate per login, issued by this CA (the one
    /// PostgreSQL's `ssl_ca_file` names): roles get no password at all.
    Certificate(Arc<crate::LoginCa>),
}

impl Upstream {
    /// libpq's rule: a host that starts with `/` is the directory holding
    /// the Unix-domain socket `.s.PGSQL.<port>`.
    pub fn is_unix_socket_dir(host: &str) -> bool {
        host.starts_with('/')
    }

    /// `host:port`, or the socket file's path, for messages.
    pub fn address(&self) -> String {
        if Self::is_unix_socket_dir(&self.host) {
            std::path::Path::new(&self.host)
                .join(format!(".s.PGSQL.{}", self.port))
                .display()
                .to_string()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls.is_some())
            .field("connect_timeout", &self.connect_timeout)
            .field("login", &self.login)
            .finish()
    }
}

/// How an engine logs in to administer credentials (`upstream.admin_*`).
/// Reloadable: a rotated password reaches the engine through
/// [`Engine::reload`].
#[derive(Debug, Clone)]
pub struct AdminLogin {
    pub user: String,
    pub password: Password,
    /// The database for housekeeping (the ledger, the reaper election).
    pub database: String,
    /// Admin connections per database pool.
    pub pool_size: usize,
}

/// The engine-specific part of one template, as its [`EngineKind`]
/// validated it. Opaque to the proxy; the engine gets its own type back with
/// [`TemplateSpec::get`].
#[derive(Clone)]
pub struct TemplateSpec(Arc<dyn Any + Send + Sync>);

impl TemplateSpec {
    pub fn new<T: Any + Send + Sync>(spec: T) -> Self {
        TemplateSpec(Arc::new(spec))
    }

    /// The engine's own template type, if this spec is one.
    pub fn get<T: Any>(&self) -> Option<&T> {
        self.0.downcast_ref()
    }
}

impl fmt::Debug for TemplateSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TemplateSpec(..)")
    }
}

/// One configured template, as an engine sees it.
#[derive(Debug, Clone)]
pub struct Template {
    /// `[templates.<name>]`.
    pub name: String,
    /// The database its sessions connect to.
    pub database: String,
    pub spec: TemplateSpec,
}

/// The keys of one `[templates.<name>]` table that belong to its engine
/// (everything but the proxy's own: `engine`, `database`, `ttl`, `max_ttl`).
pub type TemplateKeys = serde_json::Map<String, serde_json::Value>;

/// Something wrong with a configuration key, found by an engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyProblem {
    /// The key path: relative to the template table from
    /// [`EngineKind::template`] (`member_of[0]`), absolute from
    /// [`EngineKind::preflight`] (`templates.billing_rw.owner`).
    pub key: String,
    pub message: String,
}

impl KeyProblem {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        KeyProblem {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// What an engine is started with.
#[derive(Debug, Clone)]
pub struct EngineSetup {
    pub upstream: Upstream,
    pub admin: AdminLogin,
    /// How long a fresh credential opens the door (`lease.login_window`).
    pub login_window: Duration,
    /// This engine's templates (those naming it in `engine = …`).
    pub templates: Vec<Template>,
}

/// What `check-config --connect` found: problems fail the check, warnings
/// do not.
#[derive(Debug, Default)]
pub struct Preflight {
    pub problems: Vec<KeyProblem>,
    pub warnings: Vec<KeyProblem>,
}

/// A kind of engine, as registered with the proxy.
#[async_trait]
pub trait EngineKind: Send + Sync + 'static {
    /// What templates write in `engine = "…"`, and what leases record.
    fn name(&self) -> &'static str;

    /// Deserialise and check the engine's keys of template `name`, whose
    /// sessions use `database` ([`crate::keys::from_keys`] gives key paths
    /// for free). Return every problem, each with its key relative to the
    /// template table.
    fn template(
        &self,
        name: &str,
        database: &str,
        keys: TemplateKeys,
    ) -> Result<TemplateSpec, Vec<KeyProblem>>;

    /// Start the engine. Nothing may be dialled here: connections are made
    /// lazily, so the proxy starts while the upstream is down.
    fn start(&self, setup: EngineSetup) -> Result<Arc<dyn Engine>, EngineError>;

    /// `check-config --connect`: log in as the admin and check what the
    /// templates need, with absolute key paths.
    async fn preflight(&self, setup: &EngineSetup) -> Preflight;

    /// Whether templates of this engine may say `pool = "session"`: one
    /// lease shared by a pool of upstream connections (its engine
    /// implements [`crate::Engine::reopen_login`] and honours
    /// [`crate::IssueRequest::connection_limit`]).
    fn pools(&self) -> bool {
        false
    }
}
