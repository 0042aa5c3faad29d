//! Message framing for the statement audit: the relay's bytes, as they pass,
//! cut into protocol messages (type byte, length, body) without copying
//! them or holding them back. Only sessions of templates with
//! `audit_statements` pay for it.

/// What a [`Framer`] tells its handler, in order, for each message.
pub trait FrameHandler {
    /// A message of type `kind` with a body of `len` bytes begins.
    fn start(&mut self, kind: u8, len: usize);
    /// The next part of its body (all parts together are `len` bytes).
    fn body(&mut self, part: &[u8]);
    /// Its body is complete.
    fn end(&mut self);
}

/// Splits one direction of a session into messages. Every message after
/// the startup phase has a one-byte type and a four-byte big-endian length
/// that counts itself and the body.
#[derive(Debug, Default)]
pub struct Framer {
    header: [u8; 5],
    header_len: usize,
    /// Body bytes of the current message still to come.
    remaining: usize,
    in_body: bool,
    /// The stream cannot be framed (a length below 4): nothing more is
    /// reported for this session.
    lost: bool,
}

impl Framer {
    pub fn is_lost(&self) -> bool {
        self.lost
    }

    /// Feed the next bytes of the stream.
    pub fn feed(&mut self, mut bytes: &[u8], handler: &mut impl FrameHandler) {
        while !bytes.is_empty() && !self.lost {
            if self.in_body {
                let n = self.remaining.min(bytes.len());
                if n > 0 {
                    handler.body(&bytes[..n]);
                }
                self.remaining -= n;
                bytes = &bytes[n..];
                if self.remaining == 0 {
                    self.in_body = false;
                    handler.end();
                }
                continue;
            }
            let n = (5 - self.header_len).min(bytes.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
            self.header_len += n;
            bytes = &bytes[n..];
            if self.header_len < 5 {
                return;
            }
            self.header_len = 0;
            let length = u32::from_be_bytes([
                self.header[1],
                self.header[2],
                self.header[3],
                self.header[4],
            ]) as usize;
            let Some(body) = length.checked_sub(4) else {
                self.lost = true;
                return;
            };
            handler.start(self.header[0], body);
            if body == 0 {
                handler.end();
            } else {
                self.remaining = body;
                self.in_body = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Collect {
        messages: Vec<(u8, Vec<u8>)>,
        open: Option<(u8, usize, Vec<u8>)>,
    }

    impl FrameHandler for Collect {
        fn start(&mut self, kind: u8, len: usize) {
            assert!(self.open.is_none(), "a message starts inside another");
            self.open = Some((kind, len, Vec::new()));
        }
        fn body(&mut self, part: &[u8]) {
            self.open
                .as_mut()
                .expect("inside a message")
                .2
                .extend_from_slice(part);
        }
        fn end(&mut self) {
            let (kind, len, body) = self.open.take().expect("inside a message");
            assert_eq!(body.len(), len);
            self.messages.push((kind, body));
        }
    }

    use crate::session::protocol::test_message as message;

    #[test]
    fn messages_are_found_however_the_stream_is_cut() {
        let stream: Vec<u8> = [
            message(b'Q', b"select 1\0"),
            message(b'S', b""),
            message(b'P', &[7; 300]),
        ]
        .concat();
        for cut in 1..stream.len() {
            let mut framer = Framer::default();
            let mut seen = Collect::default();
            for chunk in stream.chunks(cut) {
                framer.feed(chunk, &mut seen);
            }
            assert_eq!(
                seen.messages,
                vec![
                    (b'Q', b"select 1\0".to_vec()),
                    (b'S', vec![]),
                    (b'P', vec![7; 300])
                ],
                "chunks of {cut}"
            );
        }
    }

    #[test]
    fn a_length_below_four_stops_the_framing() {
        let mut framer = Framer::default();
        let mut seen = Collect::default();
        framer.feed(&[b'Q', 0, 0, 0, 3, b'Q', 0, 0, 0, 4], &mut seen);
        assert!(framer.is_lost());
        assert!(seen.messages.is_empty());
    }
}
