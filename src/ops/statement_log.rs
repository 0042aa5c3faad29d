//! The statement audit's queue and writer: `statement` events, which can
//! come thousands a second, go through a bounded queue of their own to a
//! writer thread, so a slow disk never blocks a runtime thread and a flood
//! of statements never crowds out lease events (which keep their own queue
//! in `audit.rs`).
//!
//! A full queue is the template's choice (`audit_overflow`): `block`
//! sessions wait for room (the relay stops reading their client, nothing
//! else waits) and their events are retried until written; `drop`
//! sessions go on, and what was dropped is counted in a metric and in the
//! session's next event.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc;

/// Default length of the statement queue, in events (`[audit]
/// statement_queue`).
pub const DEFAULT_QUEUE: usize = 4096;

/// Longest wait between two attempts to write a `block` template's event.
const RETRY_MAX: Duration = Duration::from_secs(1);

/// How long dropping the log waits for the writer to write what is queued.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The protocol a statement came by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// A `Query` message.
    Simple,
    /// `Parse` / `Bind` / `Execute`.
    Extended,
}

/// How a statement ended, as the server answered it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Completed (`command_tag`).
    Ok,
    /// An `ErrorResponse` (`sqlstate`, `error`).
    Error,
    /// An `Execute` whose row limit was reached (`PortalSuspended`).
    Suspended,
    /// Never run: an earlier message of its pipeline failed, so the server
    /// skipped it.
    NotRun,
    /// The session ended before the server answered.
    NoAnswer,
    /// Recorded when prepared, not at its Executes: the session holds more
    /// named statements than the audit keeps texts of (10 000); its
    /// Executes name it.
    Prepared,
}

/// COPY's direction, from the server's CopyIn/CopyOut/CopyBoth response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyDirection {
    In,
    Out,
    Both,
}

/// The statement part of a `statement` audit event (flattened into it).
#[derive(Debug, Clone, Serialize)]
pub struct StatementRecord {
    pub protocol: Protocol,
    pub statement: String,
    /// The statement's full length in bytes.
    pub statement_bytes: usize,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub statement_cut: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub statement_sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Vec<Option<String>>>,
    pub outcome: Outcome,
    /// The command tag (`SELECT 12`); for a `Query` of several statements,
    /// their tags in order, joined by `"; "`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command_tag: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sqlstate: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// From the statement passing the relay to its outcome.
    pub duration_us: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub copy_direction: Option<CopyDirection>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub copy_bytes: Option<u64>,
    /// Statement events of this session dropped (audit queue full, with
    /// `audit_overflow = "drop"`) since the last one recorded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dropped_before: Option<u64>,
}

/// One serialised event and whether it must be written (retried on a
/// write error) or may be lost (counted).
#[derive(Debug)]
pub struct Line {
    pub json: String,
    pub must_write: bool,
    /// For the drop counter's label.
    pub template: std::sync::Arc<str>,
}

/// The queue's sending end, one clone per audited session.
pub type LineSender = mpsc::Sender<Line>;

/// The statement queue and its writer thread.
#[derive(Debug)]
pub struct StatementLog {
    queue: Option<LineSender>,
    thread: Option<JoinHandle<()>>,
}

impl StatementLog {
    /// Write to `path` (appending; the same file as the lease events), or,
    /// without one, to the process log.
    pub fn start(path: Option<&Path>, capacity: usize) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = match path {
            Some(path) => Some((
                path.to_owned(),
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o600)
                    .open(path)?,
            )),
            None => None,
        };
        let (queue, lines) = mpsc::channel(capacity.max(1));
        let thread = std::thread::Builder::new()
            .name("ephemera-audit-statements".into())
            .spawn(move || write_lines(file, lines))?;
        Ok(StatementLog {
            queue: Some(queue),
            thread: Some(thread),
        })
    }

    pub fn sender(&self) -> Option<LineSender> {
        self.queue.clone()
    }
}

fn write_lines(mut file: Option<(PathBuf, File)>, mut lines: mpsc::Receiver<Line>) {
    while let Some(Line {
        mut json,
        must_write,
        template,
    }) = lines.blocking_recv()
    {
        let Some((path, file)) = &mut file else {
            tracing::info!(target: "ephemera::ops::audit", "{json}");
            continue;
        };
        json.push('\n');
        let mut wait = Duration::from_millis(10);
        loop {
            match file.write_all(json.as_bytes()).and_then(|()| file.flush()) {
                Ok(()) => break,
                Err(error) => {
                    metrics::counter!(crate::ops::telemetry::AUDIT_WRITE_FAILURES).increment(1);
                    if !must_write {
                        tracing::error!(
                            target: "ephemera::ops::audit", path = %path.display(), %error,
                            "cannot write a statement event (its template drops on overflow)"
                        );
                        metrics::counter!(crate::ops::telemetry::AUDIT_STATEMENTS_DROPPED, "template" => template.to_string())
                            .increment(1);
                        break;
                    }
                    tracing::error!(
                        target: "ephemera::ops::audit", path = %path.display(), %error,
                        "cannot write a statement event; retrying in {wait:?} (its template blocks on overflow)"
                    );
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(RETRY_MAX);
                }
            }
        }
    }
}

impl Drop for StatementLog {
    fn drop(&mut self) {
        drop(self.queue.take());
        let Some(thread) = self.thread.take() else {
            return;
        };
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while !thread.is_finished() {
            if Instant::now() >= deadline {
                tracing::error!(
                    "the statement audit's writer did not finish within {DRAIN_TIMEOUT:?}; statement events still queued are lost"
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = thread.join();
    }
}
