#![forbid(unsafe_code)]
//! The seam between Ephemera and the systems it mints credentials for.
//!
//! An [`EngineKind`] is what the proxy registers: it validates its
//! templates' keys and starts an [`Engine`]. An [`Engine`] issues a credential for a [`IssueRequest`] (who is asking,
//! for which template) and revokes it when its [`Lease`] ends. The proxy never
//! knows how a credential is made; an engine never knows about TLS, SPIFFE or
//! the wire protocol.
//!
//! Shared types live here so every engine speaks the same language:
//! [`Lease`] (the record of one credential's life, also written into the
//! database as the role's comment) and [`ScramSecret`] (the SCRAM-SHA-256 keys
//! a minted role logs in with, which never print themselves).

mod engine;
pub mod keys;
mod lease;
pub mod login_cert;
mod password;
pub mod scram;
mod setup;
pub mod sql;

pub use engine::{
    Cleanup, Engine, EngineError, IssueRequest, IssuedCredential, ReaperElection, RevokeOutcome,
    SqlState, UpstreamLogin,
};
pub use lease::{checked_add, checked_sub, Lease, LeaseComment, LeaseId, LeaseKind, LeaseState};
pub use login_cert::{ClientCertificate, LoginCa, LoginCaError, LoginCertError};
pub use password::Password;
pub use scram::ScramSecret;
pub use setup::{
    AdminLogin, EngineKind, EngineSetup, KeyProblem, Preflight, Template, TemplateKeys,
    TemplateSpec, Upstream, UpstreamLoginMethod,
};
