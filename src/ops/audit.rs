//! The audit log: one JSON object per line, written and flushed per event.
//!
//! Events are written by a thread of their own, so a slow or stuck disk never
//! blocks a runtime thread: [`AuditLog::record`] hands the line to a bounded
//! queue and returns. A line that cannot be written, or finds the queue full,
//! is counted (`ephemera_audit_write_failures_total`, and, when it was never
//! handed to the writer, `ephemera_audit_events_dropped_total`) and logged at
//! ERROR with the whole event, so it is never lost silently.
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
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ephemera_engine::{Lease, LeaseId};

use super::statement_log::{self, LineSender, StatementLog};
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
    /// A statement a session ran and its outcome (`audit_statements`).
    Statement,
    /// A client of a pooled lease began its session (`client_addr`: its
    /// own address).
    SessionStart,
    /// A client of a pooled lease ended its session (`reason`: whether its
    /// backend went back to the pool).
    SessionEnd,
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
    /// The person an agent acts for (`on_behalf_of`); `identity` is the
    /// agent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
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
    /// `login` with `upstream.login = "certificate"`: the client
    /// certificate Ephemera logged in with (its serial, in decimal as
    /// `pg_stat_ssl.client_serial` shows it, and its expiry).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_cert_serial: Option<String>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option",
        default
    )]
    pub client_cert_not_after: Option<OffsetDateTime>,
    /// For `statement` events: the statement and its outcome.
    #[serde(flatten)]
    pub statement: Option<Box<statement_log::StatementRecord>>,
}

impl AuditEvent {
    /// An event about a lease.
    pub fn lease(event: AuditKind, lease: &Lease) -> Self {
        AuditEvent {
            time: OffsetDateTime::now_utc(),
            event,
            lease_id: Some(lease.id),
            identity: Some(lease.identity.clone()),
            subject: lease.subject.clone(),
            template: Some(lease.template.clone()),
            role: Some(lease.role.clone()),
            database: Some(lease.database.clone()),
            client_addr: lease.client_addr.map(|a| a.to_string()),
            reason: None,
            actor: None,
            suppressed: None,
            client_cert_serial: None,
            client_cert_not_after: None,
            statement: None,
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
            subject: None,
            template,
            role: None,
            database: None,
            client_addr: Some(client_addr.to_string()),
            reason: Some(reason),
            actor: None,
            suppressed: None,
            client_cert_serial: None,
            client_cert_not_after: None,
            statement: None,
        }
    }

    /// The client certificate a login used (`upstream.login = "certificate"`).
    pub fn client_cert(mut self, cert: &ephemera_engine::ClientCertificate) -> Self {
        self.client_cert_serial = Some(cert.serial().to_owned());
        self.client_cert_not_after = Some(cert.not_after());
        self
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

/// Lines waiting for the writer thread; past that, events are dropped
/// (counted and logged) rather than blocking the caller.
const QUEUE_CAPACITY: usize = 4096;

/// How long dropping the log waits for the writer to write what is queued.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Where audit events go: a JSON-lines file (if configured) and the process
/// log (always, at info level, target `ephemera::ops::audit`).
#[derive(Debug)]
pub struct AuditLog {
    file: Option<Writer>,
    /// `statement` events: a queue and writer of their own.
    statements: StatementLog,
}

/// The file's writer thread and the queue to it.
#[derive(Debug)]
struct Writer {
    path: PathBuf,
    /// `None` only while dropping, to close the queue.
    queue: Option<SyncSender<String>>,
    thread: Option<JoinHandle<()>>,
}

impl AuditLog {
    /// Events to the process log only.
    pub fn log_only() -> Self {
        AuditLog {
            file: None,
            statements: StatementLog::start(None, statement_log::DEFAULT_QUEUE)
                .unwrap_or_else(|error| panic!("cannot start a thread: {error}")),
        }
    }

    /// Append to `path` (created with mode 0600 if missing); statement
    /// events queue up to `statement_queue` at most.
    pub fn open(path: &Path, statement_queue: usize) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        let (queue, lines) = mpsc::sync_channel(QUEUE_CAPACITY);
        let thread_path = path.to_owned();
        let thread = std::thread::Builder::new()
            .name("ephemera-audit".into())
            .spawn(move || write_lines(&thread_path, file, lines))?;
        Ok(AuditLog {
            file: Some(Writer {
                path: path.to_owned(),
                queue: Some(queue),
                thread: Some(thread),
            }),
            statements: StatementLog::start(Some(path), statement_queue)?,
        })
    }

    /// The statement queue, for an audited session.
    pub fn statement_queue(&self) -> Option<LineSender> {
        self.statements.sender()
    }

    pub fn record(&self, event: AuditEvent) {
        let line = match serde_json::to_string(&event) {
            Ok(line) => line,
            Err(error) => {
                // Not expected (the fields are strings, numbers and a
                // timestamp); if it happens, the event still reaches the log.
                metrics::counter!(crate::ops::telemetry::AUDIT_WRITE_FAILURES).increment(1);
                tracing::error!(target: "ephemera::ops::audit", ?event, %error, "cannot serialise an audit event");
                return;
            }
        };
        tracing::info!(target: "ephemera::ops::audit", "{line}");
        let Some(writer) = &self.file else {
            return;
        };
        let Some(queue) = &writer.queue else {
            return;
        };
        let (why, line) = match queue.try_send(line) {
            Ok(()) => return,
            Err(TrySendError::Full(line)) => ("the audit log's queue is full", line),
            Err(TrySendError::Disconnected(line)) => ("the audit log's writer has stopped", line),
        };
        metrics::counter!(crate::ops::telemetry::AUDIT_WRITE_FAILURES).increment(1);
        metrics::counter!(crate::ops::telemetry::AUDIT_EVENTS_DROPPED).increment(1);
        tracing::error!(
            target: "ephemera::ops::audit",
            path = %writer.path.display(),
            event = %line,
            "{why}: event not written to the audit file"
        );
    }
}

/// The writer thread: one write per line (O_APPEND keeps lines whole), each
/// flushed before the next is taken, until the queue is closed and empty.
fn write_lines(path: &Path, mut file: File, lines: Receiver<String>) {
    for mut line in lines {
        line.push('\n');
        if let Err(error) = file.write_all(line.as_bytes()).and_then(|()| file.flush()) {
            metrics::counter!(crate::ops::telemetry::AUDIT_WRITE_FAILURES).increment(1);
            tracing::error!(
                target: "ephemera::ops::audit",
                path = %path.display(),
                %error,
                event = %line.trim_end(),
                "cannot write the audit log"
            );
        }
    }
}

impl Drop for Writer {
    /// Close the queue and give the writer a bounded time to write what is
    /// in it, so events recorded just before shutdown reach the file.
    fn drop(&mut self) {
        drop(self.queue.take());
        let Some(thread) = self.thread.take() else {
            return;
        };
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while !thread.is_finished() {
            if Instant::now() >= deadline {
                tracing::error!(
                    path = %self.path.display(),
                    "the audit log's writer did not finish within {DRAIN_TIMEOUT:?}; events still queued may not be in the file (they are in the process log)"
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        if thread.join().is_err() {
            tracing::error!(path = %self.path.display(), "the audit log's writer panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denied(n: usize) -> AuditEvent {
        AuditEvent::denied(
            None,
            None,
            "192.0.2.1:5432".parse().expect("an address"),
            format!("test {n}"),
        )
    }

    #[test]
    fn an_event_reaches_the_file_without_waiting_for_shutdown() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path, 16).expect("open");
        log.record(denied(0));
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(&path).expect("read");
            if text.lines().count() == 1 {
                assert!(text.contains("\"reason\":\"test 0\""), "{text}");
                break;
            }
            assert!(Instant::now() < deadline, "not written: {text:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(log);
    }

    #[test]
    fn events_recorded_just_before_the_log_is_dropped_are_written() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path, 16).expect("open");
        for n in 0..1000 {
            log.record(denied(n));
        }
        drop(log);
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1000);
        for (n, line) in lines.iter().enumerate() {
            let event: serde_json::Value =
                serde_json::from_str(line).expect("one JSON object a line");
            assert_eq!(event["reason"], format!("test {n}"), "in order");
        }
    }
}
