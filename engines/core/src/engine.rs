use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use time::OffsetDateTime;

use crate::{
    AdminLogin, ClientCertificate, Lease, LeaseId, LeaseKind, Password, ScramSecret, Template,
};

/// What the proxy asks an engine for: a credential for `identity`, shaped by
/// the role template named `template`.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    pub lease_id: LeaseId,
    pub kind: LeaseKind,
    /// The verified SPIFFE ID of the workload.
    pub identity: String,
    /// The person an agent acts for (`on_behalf_of`), if any.
    pub subject: Option<String>,
    /// The template name, as configured (`[templates.<name>]`).
    pub template: String,
    /// Where the workload connected from, for the audit trail.
    pub client_addr: Option<SocketAddr>,
    /// How long the credential lives before it must be renewed.
    pub ttl: Duration,
    /// The latest it may ever live to (issue time + max TTL, or earlier,
    /// e.g. capped at the client certificate's expiry).
    pub max_expires_at: OffsetDateTime,
    /// How many connections the credential's holder may have open at once
    /// (a pooled template's `pool_size`); `None`: the engine's default for
    /// the kind (one for a session lease).
    pub connection_limit: Option<u32>,
}

/// A freshly minted credential. Secrets redact themselves in `Debug`.
#[derive(Debug)]
pub struct IssuedCredential {
    pub lease: Lease,
    /// How Ephemera logs in upstream as the credential (session leases).
    pub login: UpstreamLogin,
    /// For standalone leases: the password handed to the client, who logs
    /// in directly. An engine that cannot give one cannot serve standalone
    /// leases (the proxy refuses them with a clear error).
    pub client_password: Option<Password>,
}

/// How the proxy proves it is the credential's role when it logs in
/// upstream (`src/session/upstream.rs` speaks each of these).
#[derive(Debug)]
pub enum UpstreamLogin {
    /// SCRAM-SHA-256 with keys the engine drew: no password ever existed.
    Scram(ScramSecret),
    /// SCRAM-SHA-256 with a password (the keys are derived from the
    /// server's salt and iteration count during the exchange).
    Password(Password),
    /// TLS with a client certificate for the role (its CN), issued for
    /// this one login and valid for the login window only
    /// (`upstream.login = "certificate"`): the role has no password or
    /// verifier at all.
    Certificate(ClientCertificate),
}

/// A SQLSTATE error code (five characters), as the database reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlState(String);

impl SqlState {
    /// `None` unless `code` is five ASCII digits or upper-case letters.
    pub fn new(code: &str) -> Option<Self> {
        (code.len() == 5
            && code
                .bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase()))
        .then(|| SqlState(code.to_owned()))
    }

    pub fn code(&self) -> &str {
        &self.0
    }

    /// The class: the first two characters (`53` for insufficient resources).
    pub fn class(&self) -> &str {
        &self.0[..2]
    }
}

impl std::fmt::Display for SqlState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a successful revoke found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevokeOutcome {
    /// The credential existed and is now gone. `cleanup` lists what had to
    /// be undone first (each gets an audit event of its own).
    Revoked { cleanup: Vec<Cleanup> },
    /// Nothing to do: the credential was already gone (revoked elsewhere, or
    /// creation never committed).
    AlreadyGone,
}

impl RevokeOutcome {
    /// Revoked, with nothing left behind to clean up.
    pub fn revoked() -> Self {
        RevokeOutcome::Revoked {
            cleanup: Vec::new(),
        }
    }
}

/// Something a session left behind that revocation had to undo before the
/// credential could go (see SECURITY.md, "Review findings").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cleanup {
    /// An object that would have run with the template owner's rights once
    /// handed over, changed so that it runs with its caller's.
    Neutralised {
        database: String,
        /// The object as the database names it (`function public.f(integer)`).
        object: String,
        /// What was changed (`made SECURITY INVOKER`).
        how: &'static str,
    },
    /// An object dropped instead of handed over.
    Dropped {
        database: String,
        object: String,
        why: &'static str,
    },
    /// A prepared (two-phase) transaction of the role, rolled back: nobody
    /// but a superuser could finish it once the role is gone.
    PreparedTransactionRolledBack { database: String, gid: String },
}

/// What [`Engine::lead_reaper`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReaperElection {
    /// This replica reaps.
    Leader,
    /// Another replica (the same admin role) holds the election.
    Follower,
    /// The election is held or blocked by someone who is not Ephemera's
    /// admin role: reap anyway (revocation is idempotent) and say so loudly.
    Squatted {
        /// Who holds it, as the database reports it (`role (pid 1234)`).
        holders: Vec<String>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("no role template named {0:?} is configured")]
    UnknownTemplate(String),
    #[error("could not reach the database to {action}: {source}")]
    Unavailable {
        action: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the database refused to {action}: {source}{}", code.as_ref().map(|c| format!(" (SQLSTATE {c})")).unwrap_or_default())]
    Refused {
        action: &'static str,
        /// The database's own error code, when it sent one.
        code: Option<SqlState>,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("invalid template {template:?}: {reason}")]
    InvalidTemplate { template: String, reason: String },
    #[error("the credential {0:?} no longer exists")]
    Gone(String),
    /// A lease time computed from a duration is not representable (an
    /// absurdly long ttl, max_ttl or login_window).
    #[error("{0} is out of the range of representable times; use a shorter duration")]
    TimeOutOfRange(String),
    /// The engine cannot do what was asked (e.g. hand a client a password
    /// for a standalone lease).
    /// The login certificate for a role could not be issued.
    #[error(transparent)]
    LoginCertificate(#[from] crate::LoginCertError),
    #[error("the {engine} engine cannot {what}")]
    Unsupported {
        engine: &'static str,
        what: &'static str,
    },
}

impl EngineError {
    /// A refusal from the database, with its SQLSTATE when it gave one.
    pub fn refused(
        action: &'static str,
        code: Option<SqlState>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        EngineError::Refused {
            action,
            code,
            source: source.into(),
        }
    }

    /// The database's SQLSTATE, if this error carries one.
    pub fn sqlstate(&self) -> Option<&SqlState> {
        match self {
            EngineError::Refused { code, .. } => code.as_ref(),
            _ => None,
        }
    }
}

/// A backend that can mint, renew, list and revoke credentials.
///
/// `issue` must be atomic: either the credential exists with its lease
/// recorded alongside it, or nothing was created. `revoke` must be idempotent:
/// revoking a credential that is already gone succeeds with
/// [`RevokeOutcome::AlreadyGone`]. Retrying failed revokes is the caller's job
/// (see the proxy's lease manager); an engine makes one attempt per call.
#[async_trait]
pub trait Engine: Send + Sync + 'static {
    /// A short name for logs and the lease record (`"postgres"`).
    fn name(&self) -> &'static str;

    async fn issue(&self, request: IssueRequest) -> Result<IssuedCredential, EngineError>;

    /// Replace the templates and the admin login (a configuration reload).
    /// Either everything is replaced or, on error, nothing is. Leases of
    /// templates that disappeared must still revoke correctly.
    fn reload(&self, templates: Vec<Template>, admin: AdminLogin) -> Result<(), EngineError>;

    /// Record the lease's new `expires_at` with the credential (and, for
    /// standalone leases, extend the password's validity to it).
    async fn renew(&self, lease: &Lease) -> Result<(), EngineError>;

    async fn revoke(&self, lease: &Lease) -> Result<RevokeOutcome, EngineError>;

    /// Ephemera's own login as a session lease's credential has succeeded:
    /// make sure nobody can log in with it again (the session could have
    /// changed its own password). Engines whose credentials cannot be
    /// reused need not do anything.
    async fn close_login(&self, _lease: &Lease) -> Result<(), EngineError> {
        Ok(())
    }

    /// A pooled lease needs another upstream connection: open the login
    /// window again, for one login with a fresh credential (whatever the
    /// pool's sessions did to the old one is replaced), and return how to
    /// log in. The caller closes it again with [`Engine::close_login`] and
    /// never opens two at once for one lease. Engines whose kind says
    /// [`crate::EngineKind::pools`] must implement it.
    async fn reopen_login(&self, lease: &Lease) -> Result<UpstreamLogin, EngineError> {
        let _ = lease;
        Err(EngineError::Unsupported {
            engine: self.name(),
            what: "open another login for a pooled lease",
        })
    }

    /// Revoke several leases (the reaper's path): one result per lease, in
    /// order, each as [`Engine::revoke`] would give it. Engines may batch;
    /// this default revokes one by one.
    async fn revoke_many(&self, leases: &[Lease]) -> Vec<Result<RevokeOutcome, EngineError>> {
        let mut results = Vec::with_capacity(leases.len());
        for lease in leases {
            results.push(self.revoke(lease).await);
        }
        results
    }

    /// Record the use of a `single_use` token (`key`: its `jti` or hash,
    /// with the issuer's name) in the backend, shared by every replica, to
    /// be kept until `expires_at`. `Ok(true)`: first use; `Ok(false)`: it
    /// was used before. `template` says which template the token is for
    /// (the engine set routes by it).
    async fn claim_token_use(
        &self,
        _template: &str,
        _key: &str,
        _expires_at: OffsetDateTime,
    ) -> Result<bool, EngineError> {
        Err(EngineError::Unsupported {
            engine: self.name(),
            what: "record single_use tokens",
        })
    }

    /// Every lease the backend itself records (the ledger), whoever issued it.
    async fn list(&self) -> Result<Vec<Lease>, EngineError>;

    /// Try to become (or stay) the one reaper among replicas sharing this
    /// backend.
    async fn lead_reaper(&self) -> Result<ReaperElection, EngineError>;
}
