//! Matching statements to their outcomes. The server answers a session's
//! messages in the order they were sent, so a queue of what is still
//! waiting for an answer is enough, pipelined or not; the only subtlety is
//! the extended protocol's error rule: after an `ErrorResponse`, the server
//! skips everything up to the next `Sync`.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use super::record::{
    CopyDirection, InFlight, Outcome, Protocol, ServerError, StatementRecord, StatementText,
};

/// Named prepared statements (and portals) whose texts a session's audit
/// keeps; beyond this, a new statement's text is recorded when it is
/// prepared (outcome `prepared`) instead of at each Execute, so memory
/// stays bounded and no text goes unrecorded.
const MAX_NAMED: usize = 10_000;

/// Messages waiting for the server's answer, at most: past it (a client
/// pipelining without reading), the relay stops reading the client until
/// answers come, so matching never loses track.
pub const MAX_PENDING: usize = 100_000;

/// A client message that the server will answer.
#[derive(Debug)]
enum Pending {
    Query(InFlight),
    Execute(InFlight),
    Parse,
    Bind,
    Describe,
    Close,
    Sync,
    FunctionCall,
}

#[derive(Debug, Clone)]
struct Portal {
    text: Arc<StatementText>,
    parameters: Option<Arc<Vec<Option<String>>>>,
}

/// One session's statements between client and server.
#[derive(Debug, Default)]
pub struct Tracker {
    pending: VecDeque<Pending>,
    statements: HashMap<String, Arc<StatementText>>,
    portals: HashMap<String, Portal>,
    /// Finished statements, for the audit log.
    pub done: VecDeque<StatementRecord>,
}

fn unknown(what: &str, name: &str) -> Arc<StatementText> {
    let text = format!("<{what} {name:?}: its text is in its `prepared` event>");
    Arc::new(StatementText {
        bytes: 0,
        text,
        sha256: None,
    })
}

impl Tracker {
    /// Messages waiting for the server's answer.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    fn push(&mut self, pending: Pending) {
        self.pending.push_back(pending);
    }

    // ----- from the client ---------------------------------------------

    pub fn query(&mut self, text: StatementText) {
        self.push(Pending::Query(InFlight::new(
            Arc::new(text),
            Protocol::Simple,
            None,
        )));
    }

    pub fn parse(&mut self, name: String, text: StatementText) {
        if name.is_empty()
            || self.statements.len() < MAX_NAMED
            || self.statements.contains_key(&name)
        {
            self.statements.insert(name, Arc::new(text));
        } else {
            let prepared = InFlight::new(Arc::new(text), Protocol::Extended, None);
            self.done.push_back(prepared.record(Outcome::Prepared));
        }
        self.push(Pending::Parse);
    }

    pub fn bind(
        &mut self,
        portal: String,
        statement: &str,
        parameters: Option<Vec<Option<String>>>,
    ) {
        let text = self
            .statements
            .get(statement)
            .cloned()
            .unwrap_or_else(|| unknown("prepared statement", statement));
        let parameters = parameters.map(Arc::new);
        if portal.is_empty() || self.portals.len() < MAX_NAMED || self.portals.contains_key(&portal)
        {
            self.portals.insert(portal, Portal { text, parameters });
        } else {
            let bound = InFlight::new(text, Protocol::Extended, parameters);
            self.done.push_back(bound.record(Outcome::Prepared));
        }
        self.push(Pending::Bind);
    }

    pub fn execute(&mut self, portal: &str) {
        let Portal { text, parameters } =
            self.portals.get(portal).cloned().unwrap_or_else(|| Portal {
                text: unknown("portal", portal),
                parameters: None,
            });
        self.push(Pending::Execute(InFlight::new(
            text,
            Protocol::Extended,
            parameters,
        )));
    }

    pub fn describe(&mut self) {
        self.push(Pending::Describe);
    }

    /// `Close` of a statement (`b'S'`) or a portal (`b'P'`).
    pub fn close(&mut self, what: u8, name: &str) {
        match what {
            b'S' => self.statements.remove(name),
            _ => self.portals.remove(name).map(|p| p.text),
        };
        self.push(Pending::Close);
    }

    pub fn sync(&mut self) {
        self.push(Pending::Sync);
    }

    pub fn function_call(&mut self) {
        self.push(Pending::FunctionCall);
    }

    /// CopyData from the client: COPY FROM STDIN's bytes.
    pub fn client_copy_data(&mut self, len: usize) {
        self.add_copy_bytes(len);
    }

    // ----- from the server ---------------------------------------------

    fn front_copy(&mut self) -> Option<&mut Option<(CopyDirection, u64)>> {
        match self.pending.front_mut() {
            Some(Pending::Query(s) | Pending::Execute(s)) => Some(&mut s.copy),
            _ => None,
        }
    }

    fn add_copy_bytes(&mut self, len: usize) {
        if let Some(Some((_, bytes))) = self.front_copy() {
            *bytes += len as u64;
        }
    }

    /// ParseComplete, BindComplete, CloseComplete, or the end of a
    /// Describe (RowDescription or NoData answering it).
    pub fn step_done(&mut self) {
        if matches!(
            self.pending.front(),
            Some(Pending::Parse | Pending::Bind | Pending::Close | Pending::Describe)
        ) {
            self.pending.pop_front();
        }
    }

    /// RowDescription / NoData: ends a Describe, is part of a Query.
    pub fn described(&mut self) {
        if matches!(self.pending.front(), Some(Pending::Describe)) {
            self.pending.pop_front();
        }
    }

    pub fn copy_response(&mut self, direction: CopyDirection) {
        if let Some(copy) = self.front_copy() {
            *copy = Some((direction, 0));
        }
    }

    pub fn server_copy_data(&mut self, len: usize) {
        if let Some(Some((CopyDirection::Out | CopyDirection::Both, bytes))) = self.front_copy() {
            *bytes += len as u64;
        }
    }

    /// CommandComplete, or EmptyQueryResponse (`tag` empty), or
    /// PortalSuspended (`suspended`).
    pub fn complete(&mut self, tag: String, suspended: bool) {
        match self.pending.front_mut() {
            Some(Pending::Query(s)) => s.tags.push(tag),
            Some(Pending::Execute(_)) => {
                if let Some(Pending::Execute(mut s)) = self.pending.pop_front() {
                    s.tags.push(tag);
                    let outcome = if suspended {
                        Outcome::Suspended
                    } else {
                        Outcome::Ok
                    };
                    self.done.push_back(s.record(outcome));
                }
            }
            _ => {}
        }
    }

    pub fn error(&mut self, error: ServerError) {
        match self.pending.front_mut() {
            Some(Pending::Query(s)) => {
                s.error = Some(error);
            }
            Some(Pending::Sync | Pending::FunctionCall) | None => {}
            Some(_) => {
                // The extended protocol: this message failed and the server
                // skips the rest up to the Sync. A failed Parse or Bind
                // (a plan-time error) is its Execute's outcome.
                let mut error = Some(error);
                while let Some(next) = self.pending.front() {
                    if matches!(next, Pending::Sync | Pending::Query(_)) {
                        break;
                    }
                    if let Some(Pending::Execute(mut s)) = self.pending.pop_front() {
                        s.error = error.take();
                        let outcome = if s.error.is_some() {
                            Outcome::Error
                        } else {
                            Outcome::NotRun
                        };
                        self.done.push_back(s.record(outcome));
                    }
                }
            }
        }
    }

    /// ReadyForQuery: the answer to a Query, a Sync or a FunctionCall.
    pub fn ready(&mut self) {
        while let Some(next) = self.pending.pop_front() {
            match next {
                Pending::Query(s) => {
                    self.done.push_back(s.record(Outcome::Ok));
                    return;
                }
                Pending::Sync | Pending::FunctionCall => return,
                Pending::Execute(s) => self.done.push_back(s.record(Outcome::NotRun)),
                _ => {}
            }
        }
    }

    /// The session ended: what was sent and never answered.
    pub fn end(&mut self) {
        while let Some(next) = self.pending.pop_front() {
            if let Pending::Query(s) | Pending::Execute(s) = next {
                self.done.push_back(s.record(Outcome::NoAnswer));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(t: &str) -> StatementText {
        StatementText {
            text: t.into(),
            bytes: t.len(),
            sha256: None,
        }
    }

    fn error(code: &str) -> ServerError {
        ServerError {
            sqlstate: code.into(),
            message: "boom".into(),
        }
    }

    fn done(t: &mut Tracker) -> Vec<(String, Outcome, Option<String>, Option<String>)> {
        t.done
            .drain(..)
            .map(|r| (r.statement, r.outcome, r.command_tag, r.sqlstate))
            .collect()
    }

    #[test]
    fn a_query_of_two_statements_is_one_event_with_both_tags() {
        let mut t = Tracker::default();
        t.query(text("select 1; delete from t"));
        t.complete("SELECT 1".into(), false);
        t.complete("DELETE 3".into(), false);
        assert!(t.done.is_empty(), "not before ReadyForQuery");
        t.ready();
        assert_eq!(
            done(&mut t),
            vec![(
                "select 1; delete from t".into(),
                Outcome::Ok,
                Some("SELECT 1; DELETE 3".into()),
                None
            )]
        );
    }

    #[test]
    fn a_pipeline_is_matched_in_order_and_what_an_error_skipped_is_not_run() {
        let mut t = Tracker::default();
        t.parse(String::new(), text("select 1"));
        t.bind(String::new(), "", None);
        t.execute("");
        t.parse("s2".into(), text("select 1/0"));
        t.bind("p2".into(), "s2", None);
        t.execute("p2");
        t.parse(String::new(), text("select 3"));
        t.bind(String::new(), "", None);
        t.execute("");
        t.sync();
        t.step_done();
        t.step_done();
        t.complete("SELECT 1".into(), false);
        t.step_done();
        t.step_done();
        t.error(error("22012"));
        t.ready();
        assert_eq!(
            done(&mut t),
            vec![
                (
                    "select 1".into(),
                    Outcome::Ok,
                    Some("SELECT 1".into()),
                    None
                ),
                (
                    "select 1/0".into(),
                    Outcome::Error,
                    None,
                    Some("22012".into())
                ),
                ("select 3".into(), Outcome::NotRun, None, None),
            ]
        );
    }

    #[test]
    fn a_bind_that_fails_is_its_executes_error() {
        let mut t = Tracker::default();
        t.parse(String::new(), text("select 1/$1"));
        t.bind(String::new(), "", None);
        t.execute("");
        t.sync();
        t.step_done();
        t.error(error("22012"));
        t.ready();
        assert_eq!(
            done(&mut t),
            vec![(
                "select 1/$1".into(),
                Outcome::Error,
                None,
                Some("22012".into())
            )]
        );
    }

    #[test]
    fn a_prepared_statement_is_recorded_at_each_execute() {
        let mut t = Tracker::default();
        t.parse("ins".into(), text("insert into t values ($1)"));
        t.sync();
        t.step_done();
        t.ready();
        for _ in 0..2 {
            t.bind(String::new(), "ins", Some(vec![Some("7".into()), None]));
            t.execute("");
            t.sync();
            t.step_done();
            t.complete("INSERT 0 1".into(), false);
            t.ready();
        }
        let records: Vec<_> = t.done.drain(..).collect();
        assert_eq!(records.len(), 2);
        for r in records {
            assert_eq!(r.statement, "insert into t values ($1)");
            assert_eq!(r.command_tag.as_deref(), Some("INSERT 0 1"));
            assert_eq!(r.parameters, Some(vec![Some("7".into()), None]));
        }
    }

    #[test]
    fn past_the_named_statement_limit_a_text_is_recorded_when_prepared() {
        let mut t = Tracker::default();
        for n in 0..MAX_NAMED {
            t.parse(format!("s{n}"), text("select 1"));
        }
        assert!(t.done.is_empty());
        t.parse("hidden".into(), text("delete from audit_me"));
        let r = t.done.pop_front().expect("recorded at once");
        assert_eq!(
            (r.statement.as_str(), r.outcome),
            ("delete from audit_me", Outcome::Prepared)
        );
    }

    #[test]
    fn copy_records_its_direction_and_bytes() {
        let mut t = Tracker::default();
        t.query(text("copy t from stdin"));
        t.copy_response(CopyDirection::In);
        t.client_copy_data(10);
        t.client_copy_data(5);
        t.complete("COPY 2".into(), false);
        t.ready();
        let r = t.done.pop_front().unwrap();
        assert_eq!(
            (r.copy_direction, r.copy_bytes),
            (Some(CopyDirection::In), Some(15))
        );
        assert_eq!(r.command_tag.as_deref(), Some("COPY 2"));
    }

    #[test]
    fn an_unanswered_statement_is_recorded_at_the_end() {
        let mut t = Tracker::default();
        t.query(text("select pg_sleep(60)"));
        t.end();
        assert_eq!(
            done(&mut t),
            vec![("select pg_sleep(60)".into(), Outcome::NoAnswer, None, None)]
        );
    }
}
