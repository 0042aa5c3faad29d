use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;

use crate::{Lease, LeaseId, ScramSecret};

/// What the proxy asks an engine for: a credential for `identity`, shaped by
/// the role template named `template`.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    pub lease_id: LeaseId,
    /// The verified SPIFFE ID of the workload.
    pub identity: String,
    /// The template name, as configured (`[templates.<name>]`).
    pub template: String,
    /// Where the workload connected from, for the audit trail.
    pub client_addr: Option<SocketAddr>,
    /// How long the credential is meant to live (the lease's TTL).
    pub ttl: Duration,
}

/// A freshly minted credential. The secret redacts itself in `Debug`.
#[derive(Debug)]
pub struct IssuedCredential {
    pub lease: Lease,
    /// The SCRAM keys the role logs in with; the password is never materialised.
    pub secret: ScramSecret,
}

/// What a successful revoke found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevokeOutcome {
    /// The credential existed and is now gone.
    Revoked,
    /// Nothing to do: the credential was already gone (revoked elsewhere, or
    /// creation never committed).
    AlreadyGone,
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
}

/// A backend that can mint and revoke credentials.
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

    async fn revoke(&self, lease: &Lease) -> Result<RevokeOutcome, EngineError>;
}
