//! Statement audit (`audit_statements`): the relay's bytes, watched as they
//! pass, become one `statement` audit event per statement with its outcome.
//! The bytes themselves are never changed or held back; only a `block`
//! template's session waits (before reading its client again) while the
//! audit queue is full.
//!
//! `framing.rs` cuts each direction into messages, `wire.rs` reads what the
//! audit needs from them, `tracker.rs` matches statements to outcomes,
//! `record.rs` holds a statement on its way; the queue and writer are
//! `ops/statement_log.rs`.

mod framing;
mod record;
mod tracker;
mod wire;

use std::collections::VecDeque;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio_util::sync::PollSender;

use crate::config::{AuditOverflow, StatementAuditSettings};
use crate::ops::audit::AuditEvent;
use crate::ops::statement_log::{Line, LineSender};
use crate::ops::telemetry;
use crate::session::relay::Watch;

pub use record::StatementRecord;

/// One audited session's watch over its relay.
pub struct StatementWatch {
    client_frames: framing::Framer,
    server_frames: framing::Framer,
    client: wire::ClientSide,
    server: wire::ServerSide,
    tracker: tracker::Tracker,
    /// Every event starts as a copy of this one (lease, identity, template,
    /// database, client address).
    base: AuditEvent,
    template: Arc<str>,
    overflow: AuditOverflow,
    queue: PollSender<Line>,
    /// Events waiting for room in the queue (`block` only).
    outbox: VecDeque<Line>,
    /// Events dropped since the last one queued (`drop` only).
    dropped: u64,
    lost_reported: bool,
}

impl StatementWatch {
    /// `base`: an event of the session's lease (`AuditEvent::lease`).
    pub fn new(settings: &StatementAuditSettings, base: AuditEvent, queue: LineSender) -> Self {
        let template: Arc<str> = base.template.clone().unwrap_or_default().into();
        StatementWatch {
            client_frames: framing::Framer::default(),
            server_frames: framing::Framer::default(),
            client: wire::ClientSide::new(settings.max_bytes, settings.parameters),
            server: wire::ServerSide::default(),
            tracker: tracker::Tracker::default(),
            base,
            template,
            overflow: settings.overflow,
            queue: PollSender::new(queue),
            outbox: VecDeque::new(),
            dropped: 0,
            lost_reported: false,
        }
    }

    /// Turn finished statements into queued lines.
    fn collect(&mut self) {
        while let Some(mut record) = self.tracker.done.pop_front() {
            if self.dropped > 0 {
                record.dropped_before = Some(self.dropped);
            }
            let mut event = self.base.clone();
            event.time = time::OffsetDateTime::now_utc();
            event.statement = Some(Box::new(record));
            let json = match serde_json::to_string(&event) {
                Ok(json) => json,
                Err(error) => {
                    tracing::error!(target: "ephemera::ops::audit", %error, "cannot serialise a statement event");
                    continue;
                }
            };
            metrics::counter!(telemetry::AUDIT_STATEMENTS, "template" => self.template.to_string())
                .increment(1);
            let line = Line {
                json,
                must_write: self.overflow == AuditOverflow::Block,
                template: self.template.clone(),
            };
            match self.overflow {
                AuditOverflow::Block => self.outbox.push_back(line),
                AuditOverflow::Drop => self.try_queue(line),
            }
        }
        if !self.lost_reported && (self.client_frames.is_lost() || self.server_frames.is_lost()) {
            self.lost_reported = true;
            tracing::warn!(
                lease_id = ?self.base.lease_id,
                "statement audit lost track of this session's messages; its later statements are not recorded"
            );
        }
    }

    fn try_queue(&mut self, line: Line) {
        let sent = self.queue.get_ref().map(|q| q.try_send(line));
        match sent {
            Some(Ok(())) => self.dropped = 0,
            _ => {
                self.dropped += 1;
                metrics::counter!(telemetry::AUDIT_STATEMENTS_DROPPED, "template" => self.template.to_string())
                    .increment(1);
            }
        }
    }

    /// Move the outbox into the queue as far as there is room.
    fn poll_flush(&mut self, cx: &mut Context<'_>) {
        while !self.outbox.is_empty() {
            match self.queue.poll_reserve(cx) {
                Poll::Ready(Ok(())) => {
                    if let Some(line) = self.outbox.pop_front() {
                        if self.queue.send_item(line).is_err() {
                            self.writer_gone();
                        }
                    }
                }
                Poll::Ready(Err(_)) => self.writer_gone(),
                Poll::Pending => return,
            }
        }
    }

    /// The writer stopped (shutdown): what waits is lost, and said so.
    fn writer_gone(&mut self) {
        let lost = self.outbox.len();
        self.outbox.clear();
        tracing::error!(target: "ephemera::ops::audit", lost, "the statement audit's writer has stopped");
    }
}

impl Watch for StatementWatch {
    fn from_client(&mut self, bytes: &[u8]) {
        let mut frames = self.client.with(&mut self.tracker);
        self.client_frames.feed(bytes, &mut frames);
    }

    fn from_server(&mut self, bytes: &[u8]) {
        let mut frames = self.server.with(&mut self.tracker);
        self.server_frames.feed(bytes, &mut frames);
        self.collect();
    }

    fn poll_client_turn(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.collect();
        self.poll_flush(cx);
        if !self.outbox.is_empty() {
            // Wait for the writer: poll_reserve has registered the wake-up.
            return Poll::Pending;
        }
        if self.tracker.in_flight() >= tracker::MAX_PENDING {
            // Wait for the server's answers (the relay is woken by them).
            return Poll::Pending;
        }
        Poll::Ready(())
    }
}

impl Drop for StatementWatch {
    /// The session ended: statements never answered are recorded as such,
    /// and what waits is handed over without waiting (counted if lost).
    fn drop(&mut self) {
        self.tracker.end();
        self.collect();
        let waiting: Vec<Line> = self.outbox.drain(..).collect();
        for line in waiting {
            self.try_queue(line);
        }
    }
}
