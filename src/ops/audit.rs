//! The audit log: one JSON object per line, written and flushed per event.
//!
//! Events: `lease_issued`, `issue_failed`, `login`, `renewed`, `denied`,
//! `revoked`, `expired`, `reaped`, `revoke_failed`, and, when a revocation had
//! to undo something a session left behind, `object_neutralised`,
//! `object_dropped`, `prepared_transaction_rolled_back`. Each carries the time, the lease
//! and who/what it concerns, and the reason or the actor. There is no field
//! that could hold a secret: events are built from [`Lease`]s, which hold
//! none.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ephemera_engine::{Lease, LeaseId};
use serde::Serialize;
use time::OffsetDateTime;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditKind {
    LeaseIssued,
    /// Policy allowed the session but the credential could not be minted
    /// (database down, admin role lacking a privilege, a template's
    /// statement failing).
    IssueFailed,
    Login,
    Renewed,
    Denied,
    Revoked,
    Expired,
    Reaped,
    RevokeFailed,
    /// An object that would have run with the template owner's rights was
    /// changed before the handover (`reason` names it and what changed).
    ObjectNeutralised,
    /// An object was dropped instead of handed over.
    ObjectDropped,
    /// A prepared transaction of the role was rolled back before the drop.
    PreparedTransactionRolledBack,
}

#[derive(Debug, Clone, Serialize)]
pub struct AuditEvent {
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    pub event: AuditKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_id: Option<LeaseId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_addr: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Who caused it, for actions by people or systems (an admin's SPIFFE ID,
    /// `reaper`, `policy`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// For refusals: how many refusals of the same peer before this one
    /// were not recorded (over its event rate).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suppressed: Option<u64>,
}

impl AuditEvent {
    /// An event about a lease.
    pub fn lease(event: AuditKind, lease: &Lease) -> Self {
        AuditEvent {
            time: OffsetDateTime::now_utc(),
            event,
            lease_id: Some(lease.id),
            identity: Some(lease.identity.clone()),
            template: Some(lease.template.clone()),
            role: Some(lease.role.clone()),
            database: Some(lease.database.clone()),
            client_addr: lease.client_addr.map(|a| a.to_string()),
            reason: None,
            actor: None,
            suppressed: None,
        }
    }

    /// A refused connection (no lease was issued).
    pub fn denied(
        identity: Option<String>,
        template: Option<String>,
        client_addr: SocketAddr,
        reason: String,
    ) -> Self {
        Self::refused(AuditKind::Denied, identity, template, client_addr, reason)
    }

    /// A session the policy allowed but whose role could not be minted.
    pub fn issue_failed(
        identity: String,
        template: String,
        client_addr: SocketAddr,
        reason: String,
    ) -> Self {
        Self::refused(
            AuditKind::IssueFailed,
            Some(identity),
            Some(template),
            client_addr,
            reason,
        )
    }

    fn refused(
        event: AuditKind,
        identity: Option<String>,
        template: Option<String>,
        client_addr: SocketAddr,
        reason: String,
    ) -> Self {
        AuditEvent {
            time: OffsetDateTime::now_utc(),
            event,
            lease_id: None,
            identity,
            template,
            role: None,
            database: None,
            client_addr: Some(client_addr.to_string()),
            reason: Some(reason),
            actor: None,
            suppressed: None,
        }
    }

    pub fn suppressed(mut self, count: u64) -> Self {
        self.suppressed = Some(count);
        self
    }

    /// What revocation undid for `lease` (one event per object).
    pub fn cleanup(lease: &Lease, cleanup: &ephemera_engine::Cleanup) -> Self {
        use ephemera_engine::Cleanup;
        let (kind, database, reason) = match cleanup {
            Cleanup::Neutralised {
                database,
                object,
                how,
            } => (
                AuditKind::ObjectNeutralised,
                database,
                format!("{object}: {how}"),
            ),
            Cleanup::Dropped {
                database,
                object,
                why,
            } => (
                AuditKind::ObjectDropped,
                database,
                format!("{object}: {why}"),
            ),
            Cleanup::PreparedTransactionRolledBack { database, gid } => (
                AuditKind::PreparedTransactionRolledBack,
                database,
                format!("prepared transaction {gid:?} rolled back: its role is being dropped"),
            ),
        };
        let mut event = AuditEvent::lease(kind, lease).reason(reason);
        event.database = Some(database.clone());
        event
    }

    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    pub fn actor(mut self, actor: impl Into<String>) -> Self {
        self.actor = Some(actor.into());
        self
    }
}

/// Where audit events go: a JSON-lines file (if configured) and the process
/// log (always, at info level, target `ephemera::ops::audit`).
#[derive(Debug)]
pub struct AuditLog {
    file: Option<(PathBuf, Mutex<File>)>,
}

impl AuditLog {
    /// Events to the process log only.
    pub fn log_only() -> Self {
        AuditLog { file: None }
    }

    /// Append to `path` (created with mode 0600 if missing).
    pub fn open(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        Ok(AuditLog {
            file: Some((path.to_owned(), Mutex::new(file))),
        })
    }

    pub fn record(&self, event: AuditEvent) {
        let line = serde_json::to_string(&event).expect("audit events always serialise");
        tracing::info!(target: "ephemera::ops::audit", "{line}");
        if let Some((path, file)) = &self.file {
            let mut file = file.lock().unwrap_or_else(|p| p.into_inner());
            // One write per line: O_APPEND keeps lines whole; no buffering,
            // so a crash loses nothing already recorded.
            if let Err(error) = file.write_all(format!("{line}\n").as_bytes()) {
                tracing::error!(path = %path.display(), %error, "cannot write the audit log");
            }
        }
    }
}
