use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use time::OffsetDateTime;

use crate::{Lease, LeaseId, LeaseKind, Password, ScramSecret};

/// What the proxy asks an engine for: a credential for `identity`, shaped by
/// the role template named `template`.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    pub lease_id: LeaseId,
    pub kind: LeaseKind,
    /// The verified SPIFFE ID of the workload.
    pub identity: String,
    /// The template name, as configured (`[templates.<name>]`).
    pub template: String,
    /// Where the workload connected from, for the audit trail.
    pub client_addr: Option<SocketAddr>,
    /// How long the credential lives before it must be renewed.
    pub ttl: Duration,
    /// The latest it may ever live to (issue time + max TTL, or earlier,
    /// e.g. capped at the client certificate's expiry).
    pub max_expires_at: OffsetDateTime,
}

/// A freshly minted credential. Secrets redact themselves in `Debug`.
#[derive(Debug)]
pub struct IssuedCredential {
    pub lease: Lease,
    /// The SCRAM keys the role logs in with.
    pub secret: ScramSecret,
    /// For standalone leases only: the password handed to the client.
    pub password: Option<Password>,
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
    #[error("the database refused to {action}: {source}")]
    Refused {
        action: &'static str,
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

    /// Every lease the backend itself records (the ledger), whoever issued it.
    async fn list(&self) -> Result<Vec<Lease>, EngineError>;

    /// Try to become (or stay) the one reaper among replicas sharing this
    /// backend.
    async fn lead_reaper(&self) -> Result<ReaperElection, EngineError>;
}
