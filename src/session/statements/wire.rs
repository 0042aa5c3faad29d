//! Reading the messages the statement audit needs from each direction's
//! frames: statement texts, names and parameters from the client; command
//! tags, errors and ReadyForQuery from the server. Everything else is
//! counted past without being kept.

use super::framing::FrameHandler;
use super::record::{CopyDirection, ServerError, TextCapture};
use super::tracker::Tracker;

/// The longest name (statement, portal) kept; PostgreSQL's own limit is 63.
const NAME_BYTES: usize = 128;
/// The most of an ErrorResponse kept (its message may quote data).
const ERROR_BYTES: usize = 2048;
/// The most of a CommandComplete kept.
const TAG_BYTES: usize = 256;

/// What the client side keeps of the message being read.
#[derive(Debug, Default)]
enum ClientMessage {
    #[default]
    Other,
    Query(TextCapture),
    /// `Parse`: the statement's name, then its text.
    Parse {
        name: Vec<u8>,
        name_done: bool,
        text: TextCapture,
    },
    /// Bind, Execute, Close: the first bytes of the body.
    Small {
        kind: u8,
        body: Vec<u8>,
        limit: usize,
    },
    CopyData(usize),
}

/// The client direction's reader.
#[derive(Debug)]
pub struct ClientSide {
    message: ClientMessage,
    max_bytes: usize,
    parameters: bool,
}

impl ClientSide {
    pub fn new(max_bytes: usize, parameters: bool) -> Self {
        ClientSide {
            message: ClientMessage::Other,
            max_bytes,
            parameters,
        }
    }

    pub fn with<'a>(&'a mut self, tracker: &'a mut Tracker) -> ClientFrames<'a> {
        ClientFrames {
            side: self,
            tracker,
        }
    }
}

pub struct ClientFrames<'a> {
    side: &'a mut ClientSide,
    tracker: &'a mut Tracker,
}

impl FrameHandler for ClientFrames<'_> {
    fn start(&mut self, kind: u8, len: usize) {
        let max = self.side.max_bytes;
        self.side.message = match kind {
            b'Q' => ClientMessage::Query(TextCapture::new(max)),
            b'P' => ClientMessage::Parse {
                name: Vec::new(),
                name_done: false,
                text: TextCapture::new(max),
            },
            b'B' => {
                let limit = if self.side.parameters {
                    2 * NAME_BYTES + 64 + max
                } else {
                    2 * NAME_BYTES + 2
                };
                small(kind, limit)
            }
            b'E' | b'C' => small(kind, NAME_BYTES + 8),
            b'd' => ClientMessage::CopyData(len),
            b'D' => {
                self.tracker.describe();
                ClientMessage::Other
            }
            b'S' => {
                self.tracker.sync();
                ClientMessage::Other
            }
            b'F' => {
                self.tracker.function_call();
                ClientMessage::Other
            }
            _ => ClientMessage::Other,
        };
    }

    fn body(&mut self, mut part: &[u8]) {
        match &mut self.side.message {
            ClientMessage::Query(text) => {
                text.push(part);
            }
            ClientMessage::Parse {
                name,
                name_done,
                text,
            } => {
                if !*name_done {
                    let (taken, done) = match part.iter().position(|&b| b == 0) {
                        Some(nul) => (nul, true),
                        None => (part.len(), false),
                    };
                    let room = NAME_BYTES.saturating_sub(name.len());
                    name.extend_from_slice(&part[..taken.min(room)]);
                    *name_done = done;
                    part = &part[(taken + usize::from(done))..];
                }
                if *name_done {
                    text.push(part);
                }
            }
            ClientMessage::Small { body, limit, .. } => {
                let room = limit.saturating_sub(body.len());
                body.extend_from_slice(&part[..part.len().min(room)]);
            }
            ClientMessage::Other | ClientMessage::CopyData(_) => {}
        }
    }

    fn end(&mut self) {
        match std::mem::take(&mut self.side.message) {
            ClientMessage::Query(text) => self.tracker.query(text.finish()),
            ClientMessage::Parse { name, text, .. } => {
                self.tracker.parse(lossy(&name), text.finish());
            }
            ClientMessage::Small { kind, body, limit } => {
                let cut = body.len() >= limit;
                self.small_message(kind, &body, cut);
            }
            ClientMessage::CopyData(len) => self.tracker.client_copy_data(len),
            ClientMessage::Other => {}
        }
    }
}

fn small(kind: u8, limit: usize) -> ClientMessage {
    ClientMessage::Small {
        kind,
        body: Vec::new(),
        limit,
    }
}

impl ClientFrames<'_> {
    fn small_message(&mut self, kind: u8, body: &[u8], cut: bool) {
        let mut fields = Fields(body);
        match kind {
            b'B' => {
                let portal = fields.name();
                let statement = fields.name();
                let parameters = self
                    .side
                    .parameters
                    .then(|| bind_parameters(&mut fields, self.side.max_bytes, cut));
                self.tracker.bind(portal, &statement, parameters);
            }
            b'E' => {
                let portal = fields.name();
                self.tracker.execute(&portal);
            }
            b'C' => {
                let what = fields.byte();
                let name = fields.name();
                self.tracker.close(what, &name);
            }
            _ => {}
        }
    }
}

/// Bind's parameters, as text: text-format values as they are, binary
/// ones in hex (`\x…`), NULL as `None`, each cut at `max_bytes`; a
/// message cut before its end says so in its last entry.
fn bind_parameters(fields: &mut Fields<'_>, max_bytes: usize, cut: bool) -> Vec<Option<String>> {
    let formats: Vec<i16> = (0..fields.i16().max(0)).map(|_| fields.i16()).collect();
    let count = fields.i16().max(0);
    let mut values = Vec::new();
    for i in 0..count {
        let binary = match formats.len() {
            0 => false,
            1 => formats[0] == 1,
            _ => formats.get(usize::try_from(i).unwrap_or(0)).copied() == Some(1),
        };
        let len = fields.i32();
        if len < 0 {
            values.push(None);
            continue;
        }
        let Some(value) = fields.take(usize::try_from(len).unwrap_or(0)) else {
            values.push(Some(
                "<cut: the parameters exceed audit_statement_max_bytes>".into(),
            ));
            return values;
        };
        let mut shown = if binary {
            format!("\\x{}", hex(value))
        } else {
            lossy(value)
        };
        if shown.len() > max_bytes {
            let mut end = max_bytes;
            while !shown.is_char_boundary(end) {
                end -= 1;
            }
            shown.truncate(end);
            shown.push('…');
        }
        values.push(Some(shown));
    }
    if cut && values.len() < usize::try_from(count).unwrap_or(0) {
        values.push(Some(
            "<cut: the parameters exceed audit_statement_max_bytes>".into(),
        ));
    }
    values
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A message body read field by field; a short body reads as zeros and
/// empty strings (the audit records what it can, the server judges).
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = rest;
        Some(head)
    }

    fn byte(&mut self) -> u8 {
        self.take(1).map_or(0, |b| b[0])
    }

    fn i16(&mut self) -> i16 {
        self.take(2).map_or(0, |b| i16::from_be_bytes([b[0], b[1]]))
    }

    fn i32(&mut self) -> i32 {
        self.take(4)
            .map_or(-1, |b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A NUL-terminated string.
    fn name(&mut self) -> String {
        let end = self.0.iter().position(|&b| b == 0).unwrap_or(self.0.len());
        let name = lossy(&self.0[..end]);
        self.0 = self.0.get(end + 1..).unwrap_or(&[]);
        name
    }
}

/// What the server side keeps of the message being read.
#[derive(Debug, Default)]
pub struct ServerSide {
    kind: u8,
    len: usize,
    body: Vec<u8>,
    keep: usize,
}

impl ServerSide {
    pub fn with<'a>(&'a mut self, tracker: &'a mut Tracker) -> ServerFrames<'a> {
        ServerFrames {
            side: self,
            tracker,
        }
    }
}

pub struct ServerFrames<'a> {
    side: &'a mut ServerSide,
    tracker: &'a mut Tracker,
}

impl FrameHandler for ServerFrames<'_> {
    fn start(&mut self, kind: u8, len: usize) {
        self.side.kind = kind;
        self.side.len = len;
        self.side.body.clear();
        self.side.keep = match kind {
            b'C' => TAG_BYTES,
            b'E' => ERROR_BYTES,
            _ => 0,
        };
    }

    fn body(&mut self, part: &[u8]) {
        let room = self.side.keep.saturating_sub(self.side.body.len());
        if room > 0 {
            self.side
                .body
                .extend_from_slice(&part[..part.len().min(room)]);
        }
    }

    fn end(&mut self) {
        let t = &mut *self.tracker;
        match self.side.kind {
            b'1' | b'2' | b'3' => t.step_done(),
            b'T' | b'n' => t.described(),
            b'C' => t.complete(Fields(&self.side.body).name(), false),
            b'I' => t.complete(String::new(), false),
            b's' => t.complete(String::new(), true),
            b'E' => t.error(server_error(&self.side.body)),
            b'Z' => t.ready(),
            b'G' => t.copy_response(CopyDirection::In),
            b'H' => t.copy_response(CopyDirection::Out),
            b'W' => t.copy_response(CopyDirection::Both),
            b'd' => t.server_copy_data(self.side.len),
            _ => {}
        }
    }
}

/// SQLSTATE (`C`) and message (`M`) of an ErrorResponse.
fn server_error(body: &[u8]) -> ServerError {
    let mut error = ServerError {
        sqlstate: String::new(),
        message: String::new(),
    };
    let mut fields = Fields(body);
    while !fields.0.is_empty() {
        let code = fields.byte();
        if code == 0 {
            break;
        }
        let value = fields.name();
        match code {
            b'C' => error.sqlstate = value,
            b'M' => error.message = value,
            _ => {}
        }
    }
    error
}

#[cfg(test)]
mod tests {
    use super::super::framing::Framer;
    use super::super::record::Outcome;
    use super::*;

    use crate::session::protocol::test_message as message;

    #[test]
    fn an_extended_statement_with_parameters_is_read_off_the_wire() {
        let mut tracker = Tracker::default();
        let mut client = ClientSide::new(64, true);
        let mut server = ServerSide::default();
        let mut bind = b"\0s1\0".to_vec();
        bind.extend_from_slice(&1i16.to_be_bytes());
        bind.extend_from_slice(&0i16.to_be_bytes());
        bind.extend_from_slice(&2i16.to_be_bytes());
        bind.extend_from_slice(&5i32.to_be_bytes());
        bind.extend_from_slice(b"alice");
        bind.extend_from_slice(&(-1i32).to_be_bytes());
        bind.extend_from_slice(&0i16.to_be_bytes());
        let to_server = [
            message(b'P', b"s1\0select $1, $2\0\0\0"),
            message(b'B', &bind),
            message(b'E', b"\0\0\0\0\0"),
            message(b'S', b""),
        ]
        .concat();
        let to_client = [
            message(b'1', b""),
            message(b'2', b""),
            message(b'D', b"\0\x02\0\0\0\x05alice\xff\xff\xff\xff"),
            message(b'C', b"SELECT 1\0"),
            message(b'Z', b"I"),
        ]
        .concat();
        let mut framer = Framer::default();
        for chunk in to_server.chunks(3) {
            framer.feed(chunk, &mut client.with(&mut tracker));
        }
        let mut framer = Framer::default();
        framer.feed(&to_client, &mut server.with(&mut tracker));
        let record = tracker.done.pop_front().expect("one statement");
        assert_eq!(record.statement, "select $1, $2");
        assert_eq!(record.outcome, Outcome::Ok);
        assert_eq!(record.command_tag.as_deref(), Some("SELECT 1"));
        assert_eq!(
            record.parameters,
            Some(vec![Some("alice".to_string()), None])
        );
    }

    #[test]
    fn an_error_gives_its_sqlstate_and_message() {
        let e = server_error(b"SERROR\0VERROR\0C42P01\0Mrelation \"nope\" does not exist\0\0");
        assert_eq!(e.sqlstate, "42P01");
        assert_eq!(e.message, "relation \"nope\" does not exist");
    }
}
