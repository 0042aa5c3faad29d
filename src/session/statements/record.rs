//! What the statement audit keeps of a statement while it waits for its
//! outcome, and the event it becomes.

use std::sync::Arc;
use std::time::Instant;

use sha2::{Digest, Sha256};

pub use crate::ops::statement_log::{CopyDirection, Outcome, Protocol, StatementRecord};

/// A statement's text as the audit records it: at most `max_bytes` of it,
/// with its full length, and its SHA-256 when it was cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatementText {
    pub text: String,
    pub bytes: usize,
    /// Hex SHA-256 of the whole text; only for a text that was cut.
    pub sha256: Option<String>,
}

impl StatementText {
    pub fn is_cut(&self) -> bool {
        self.sha256.is_some()
    }
}

/// Collects a NUL-terminated text as it streams past: the first
/// `max_bytes`, and the hash of the whole once it grows beyond them (short
/// statements, the common case, are never hashed).
#[derive(Debug)]
pub struct TextCapture {
    kept: Vec<u8>,
    max_bytes: usize,
    bytes: usize,
    hasher: Option<Sha256>,
    /// The terminating NUL was seen: later bytes are not part of the text.
    done: bool,
}

impl TextCapture {
    pub fn new(max_bytes: usize) -> Self {
        TextCapture {
            kept: Vec::new(),
            max_bytes,
            bytes: 0,
            hasher: None,
            done: false,
        }
    }

    #[cfg(test)]
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Take bytes up to the NUL; returns how many of `part` were used
    /// (including the NUL).
    pub fn push(&mut self, part: &[u8]) -> usize {
        if self.done {
            return 0;
        }
        let (text, used) = match part.iter().position(|&b| b == 0) {
            Some(nul) => {
                self.done = true;
                (&part[..nul], nul + 1)
            }
            None => (part, part.len()),
        };
        self.bytes += text.len();
        let room = self.max_bytes.saturating_sub(self.kept.len());
        if let Some(hasher) = &mut self.hasher {
            hasher.update(text);
        } else if text.len() > room {
            let mut hasher = Sha256::new();
            hasher.update(&self.kept);
            hasher.update(text);
            self.hasher = Some(hasher);
        }
        self.kept.extend_from_slice(&text[..text.len().min(room)]);
        used
    }

    pub fn finish(self) -> StatementText {
        let mut text = String::from_utf8_lossy(&self.kept).into_owned();
        if self.hasher.is_some() {
            // A cut in the middle of a character leaves a replacement
            // character; drop it rather than invent one.
            if text.ends_with('\u{FFFD}') && !self.kept.ends_with("\u{FFFD}".as_bytes()) {
                text.pop();
            }
        }
        StatementText {
            text,
            bytes: self.bytes,
            sha256: self.hasher.map(|h| hex(&h.finalize())),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// One statement on its way: sent, not yet answered.
#[derive(Debug)]
pub struct InFlight {
    pub text: Arc<StatementText>,
    pub protocol: Protocol,
    pub parameters: Option<Arc<Vec<Option<String>>>>,
    pub sent: Instant,
    pub tags: Vec<String>,
    pub error: Option<ServerError>,
    pub copy: Option<(CopyDirection, u64)>,
}

/// The parts of an `ErrorResponse` the audit records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    pub sqlstate: String,
    pub message: String,
}

impl InFlight {
    pub fn new(
        text: Arc<StatementText>,
        protocol: Protocol,
        parameters: Option<Arc<Vec<Option<String>>>>,
    ) -> Self {
        InFlight {
            text,
            protocol,
            parameters,
            sent: Instant::now(),
            tags: Vec::new(),
            error: None,
            copy: None,
        }
    }

    pub fn record(self, outcome: Outcome) -> StatementRecord {
        let outcome = match (outcome, &self.error) {
            (Outcome::Ok, Some(_)) => Outcome::Error,
            (outcome, _) => outcome,
        };
        let duration_us = u64::try_from(self.sent.elapsed().as_micros()).unwrap_or(u64::MAX);
        let (sqlstate, error) = match self.error {
            Some(e) => (Some(e.sqlstate), Some(e.message)),
            None => (None, None),
        };
        StatementRecord {
            protocol: self.protocol,
            statement: self.text.text.clone(),
            statement_bytes: self.text.bytes,
            statement_cut: self.text.is_cut(),
            statement_sha256: self.text.sha256.clone(),
            parameters: self.parameters.map(|p| p.as_ref().clone()),
            outcome,
            command_tag: (!self.tags.is_empty()).then(|| self.tags.join("; ")),
            sqlstate,
            error,
            duration_us,
            copy_direction: self.copy.map(|(d, _)| d),
            copy_bytes: self.copy.map(|(_, n)| n),
            dropped_before: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_text_is_kept_whole_and_not_hashed() {
        let mut capture = TextCapture::new(16);
        assert_eq!(capture.push(b"select"), 6);
        assert_eq!(capture.push(b" 1\0rest"), 3);
        assert!(capture.is_done());
        let text = capture.finish();
        assert_eq!((text.text.as_str(), text.bytes), ("select 1", 8));
        assert!(!text.is_cut());
    }

    #[test]
    fn a_long_text_is_cut_with_its_length_and_hash() {
        let statement = format!("select '{}'", "x".repeat(100));
        let mut capture = TextCapture::new(16);
        for part in statement.as_bytes().chunks(7) {
            capture.push(part);
        }
        capture.push(b"\0");
        let text = capture.finish();
        assert_eq!(text.text, statement[..16]);
        assert_eq!(text.bytes, statement.len());
        assert_eq!(
            text.sha256.as_deref(),
            Some(hex(&Sha256::digest(statement.as_bytes())).as_str())
        );
    }

    #[test]
    fn a_cut_inside_a_character_does_not_invent_one() {
        let mut capture = TextCapture::new(5);
        capture.push("abcdé\0".as_bytes());
        assert_eq!(capture.finish().text, "abcd");
    }
}
