//! The PostgreSQL wire messages the front door reads and writes before a
//! session is relayed. Message types come from `pgwire`; framing of the
//! first packet is ours, because it must be exact.
//!
//! The first packet of a connection (and the first inside TLS) has no type
//! byte: `int32 length, int32 code, body`. We read exactly `length` bytes
//! and never more, so nothing a client sends after an `SSLRequest` can be
//! mistaken for data that arrived inside TLS (CVE-2021-23214).

use std::collections::BTreeMap;

use bytes::{BufMut, BytesMut};
use pgwire::messages::cancel::CancelRequest;
use pgwire::messages::response::{ErrorResponse, ReadyForQuery, TransactionStatus};
use pgwire::messages::startup::{
    Authentication, BackendKeyData, NegotiateProtocolVersion, SecretKey, Startup,
};
use pgwire::messages::{DecodeContext, Message, ProtocolVersion};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The largest first packet accepted (PostgreSQL's own limit).
pub const MAX_STARTUP_PACKET_LEN: usize = 10_000;
/// The most startup parameters accepted in one `StartupMessage`.
pub const MAX_STARTUP_PARAMETERS: usize = 64;

const SSL_REQUEST_CODE: i32 = 80_877_103;
const GSSENC_REQUEST_CODE: i32 = 80_877_104;
const CANCEL_REQUEST_CODE: i32 = 80_877_102;

/// What a client may send first.
#[derive(Debug, PartialEq, Eq)]
pub enum FirstPacket {
    SslRequest,
    GssEncRequest,
    Cancel(CancelKey),
    Startup(StartupRequest),
}

/// The key a client quotes in a `CancelRequest` (or that we hand out in
/// `BackendKeyData`). The secret is not printed by `Debug`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CancelKey {
    pub pid: i32,
    pub secret: i32,
}

impl std::fmt::Debug for CancelKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CancelKey")
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupRequest {
    /// Protocol 3.x minor version the client asked for.
    pub minor_version: u16,
    pub parameters: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("connection closed during the handshake")]
    Closed,
    #[error("I/O error during the handshake: {0}")]
    Io(std::io::Error),
    #[error("invalid startup packet length {0} (must be 8 to {MAX_STARTUP_PACKET_LEN} bytes)")]
    BadLength(usize),
    #[error("unsupported frontend protocol {0}.{1}: Ephemera speaks protocol 3")]
    UnsupportedVersion(u16, u16),
    #[error("malformed {0}")]
    Malformed(&'static str),
    #[error("too many startup parameters (at most {MAX_STARTUP_PARAMETERS})")]
    TooManyParameters,
    #[error("{0} is not allowed here")]
    Unexpected(&'static str),
}

impl From<std::io::Error> for ProtocolError {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            ProtocolError::Closed
        } else {
            ProtocolError::Io(e)
        }
    }
}

/// Read one first packet, exactly its length and not a byte more.
pub async fn read_first_packet<R: AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<FirstPacket, ProtocolError> {
    let mut header = [0u8; 4];
    reader.read_exact(&mut header).await?;
    let len = u32::from_be_bytes(header) as usize;
    if !(8..=MAX_STARTUP_PACKET_LEN).contains(&len) {
        return Err(ProtocolError::BadLength(len));
    }
    let mut packet = BytesMut::zeroed(len);
    packet[..4].copy_from_slice(&header);
    reader.read_exact(&mut packet[4..]).await?;
    decode_first_packet(packet)
}

/// Decode a complete first packet (length prefix included). Pure, so it can
/// be fuzzed and property-tested.
pub fn decode_first_packet(mut packet: BytesMut) -> Result<FirstPacket, ProtocolError> {
    let len = packet.len();
    if !(8..=MAX_STARTUP_PACKET_LEN).contains(&len)
        || u32::from_be_bytes([packet[0], packet[1], packet[2], packet[3]]) as usize != len
    {
        return Err(ProtocolError::BadLength(len));
    }
    let code = i32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
    let context = DecodeContext::new(ProtocolVersion::PROTOCOL3_0);
    match code {
        SSL_REQUEST_CODE if len == 8 => Ok(FirstPacket::SslRequest),
        GSSENC_REQUEST_CODE if len == 8 => Ok(FirstPacket::GssEncRequest),
        SSL_REQUEST_CODE => Err(ProtocolError::Malformed("SSLRequest")),
        GSSENC_REQUEST_CODE => Err(ProtocolError::Malformed("GSSENCRequest")),
        CANCEL_REQUEST_CODE => {
            // We only ever issue 4-byte secrets (protocol 3.0 keys).
            if len != 16 {
                return Err(ProtocolError::Malformed("CancelRequest"));
            }
            let request = CancelRequest::decode(&mut packet, &context)
                .map_err(|_| ProtocolError::Malformed("CancelRequest"))?
                .ok_or(ProtocolError::Malformed("CancelRequest"))?;
            let secret = request
                .secret_key
                .as_i32()
                .ok_or(ProtocolError::Malformed("CancelRequest"))?;
            Ok(FirstPacket::Cancel(CancelKey {
                pid: request.pid,
                secret,
            }))
        }
        _ => {
            let major = (code >> 16) as u16;
            let minor = (code & 0xffff) as u16;
            if major != 3 {
                return Err(ProtocolError::UnsupportedVersion(major, minor));
            }
            let parameters = decode_startup_parameters(&packet[8..])?;
            Ok(FirstPacket::Startup(StartupRequest {
                minor_version: minor,
                parameters,
            }))
        }
    }
}

/// The body of a protocol-3 `StartupMessage`: `(name\0 value\0)* \0`, and
/// exactly that, as PostgreSQL reads it: every name has a value, names are
/// not empty, the list ends with a NUL that is the packet's last byte, and
/// nothing follows it. At most [`MAX_STARTUP_PARAMETERS`] pairs. Bytes that
/// are not UTF-8 are replaced (U+FFFD), so a name or value never holds a NUL.
fn decode_startup_parameters(body: &[u8]) -> Result<BTreeMap<String, String>, ProtocolError> {
    const LAYOUT: &str = "StartupMessage (expected name/value pairs ending with a NUL byte)";
    let mut parameters = BTreeMap::new();
    let mut pairs = 0usize;
    let mut rest = body;
    loop {
        match rest {
            [0] => return Ok(parameters),
            [] | [0, ..] => return Err(ProtocolError::Malformed(LAYOUT)),
            _ => {}
        }
        let (name, after_name) = split_cstr(rest).ok_or(ProtocolError::Malformed(LAYOUT))?;
        let (value, after_value) =
            split_cstr(after_name).ok_or(ProtocolError::Malformed(LAYOUT))?;
        pairs += 1;
        if pairs > MAX_STARTUP_PARAMETERS {
            return Err(ProtocolError::TooManyParameters);
        }
        parameters.insert(
            String::from_utf8_lossy(name).into_owned(),
            String::from_utf8_lossy(value).into_owned(),
        );
        rest = after_value;
    }
}

/// Split `bytes` at its first NUL: the string before it and what follows.
fn split_cstr(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let nul = bytes.iter().position(|&b| b == 0)?;
    Some((&bytes[..nul], &bytes[nul + 1..]))
}

/// SQLSTATE codes the front door uses.
pub mod sqlstate {
    pub const INVALID_AUTHORIZATION: &str = "28000";
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    pub const CONNECTION_FAILURE: &str = "08006";
    pub const REJECTED_CONNECTION: &str = "08004";
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
}

/// A `FATAL` `ErrorResponse`.
pub fn fatal(code: &str, message: &str, hint: Option<&str>) -> BytesMut {
    let mut fields = vec![
        (b'S', "FATAL".to_owned()),
        (b'V', "FATAL".to_owned()),
        (b'C', code.to_owned()),
        (b'M', message.to_owned()),
    ];
    if let Some(hint) = hint {
        fields.push((b'H', hint.to_owned()));
    }
    encode(ErrorResponse::new(fields))
}

pub fn authentication_ok() -> BytesMut {
    encode(Authentication::Ok)
}

/// `AuthenticationCleartextPassword`: only ever sent inside TLS, to ask
/// for an identity token.
pub fn authentication_cleartext_password() -> BytesMut {
    encode(Authentication::CleartextPassword)
}

/// What a client answered to [`authentication_cleartext_password`].
#[derive(Debug)]
pub enum PasswordAnswer {
    /// The password, as bytes (the terminating NUL removed).
    Password(Vec<u8>),
    /// Longer than the limit: not read, not parsed.
    TooLarge,
}

/// Read a `PasswordMessage` of at most `limit` bytes of password. A longer
/// one is refused from its length field alone.
pub async fn read_password<R: AsyncRead + Unpin>(
    reader: &mut R,
    limit: usize,
) -> Result<PasswordAnswer, ProtocolError> {
    let mut header = [0u8; 5];
    reader.read_exact(&mut header).await?;
    if header[0] != b'p' {
        return Err(ProtocolError::Unexpected("a message other than a password"));
    }
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if len < 5 {
        return Err(ProtocolError::Malformed("password message"));
    }
    // Length field (4) and the terminating NUL (1) around the password.
    if len - 5 > limit {
        return Ok(PasswordAnswer::TooLarge);
    }
    let mut body = vec![0u8; len - 4];
    reader.read_exact(&mut body).await?;
    if body.pop() != Some(0) || body.contains(&0) {
        return Err(ProtocolError::Malformed("password message"));
    }
    Ok(PasswordAnswer::Password(body))
}

pub fn backend_key_data(key: CancelKey) -> BytesMut {
    encode(BackendKeyData::new(key.pid, SecretKey::I32(key.secret)))
}

pub fn ready_for_query_idle() -> BytesMut {
    encode(ReadyForQuery::new(TransactionStatus::Idle))
}

/// Tell a client asking for protocol 3.`minor` (or for `_pq_.` options) that
/// we speak 3.0 and ignore those options.
pub fn negotiate_protocol_version(unsupported_options: Vec<String>) -> BytesMut {
    encode(NegotiateProtocolVersion::new(0, unsupported_options))
}

fn encode(message: impl Message) -> BytesMut {
    let mut buf = BytesMut::with_capacity(64);
    message
        .encode(&mut buf)
        .expect("front-door messages are small and well-formed");
    buf
}

/// Split a raw backend `ErrorResponse`/`NoticeResponse` body into (SQLSTATE,
/// message), for logs. Tolerates anything.
pub fn error_fields(body: &[u8]) -> (String, String) {
    let mut code = String::new();
    let mut message = String::new();
    let mut rest = body;
    while let Some((&kind, tail)) = rest.split_first() {
        if kind == 0 {
            break;
        }
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        let value = String::from_utf8_lossy(&tail[..end]).into_owned();
        match kind {
            b'C' => code = value,
            b'M' => message = value,
            _ => {}
        }
        rest = tail.get(end + 1..).unwrap_or_default();
    }
    (code, message)
}

/// Build a raw first packet; used by tests and benchmarks.
pub fn encode_startup(parameters: &[(&str, &str)]) -> BytesMut {
    let mut startup = Startup::new();
    for (k, v) in parameters {
        startup.parameters.insert((*k).to_owned(), (*v).to_owned());
    }
    encode(startup)
}

/// Build a raw `CancelRequest` packet.
pub fn encode_cancel(key: CancelKey) -> BytesMut {
    let mut buf = BytesMut::with_capacity(16);
    buf.put_i32(16);
    buf.put_i32(CANCEL_REQUEST_CODE);
    buf.put_i32(key.pid);
    buf.put_i32(key.secret);
    buf
}

/// One protocol message after the startup phase, raw: its type, its
/// length (counting itself) and its body. For the tests of the modules
/// that frame the relay's bytes.
#[cfg(test)]
pub(crate) fn test_message(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![kind];
    m.extend_from_slice(
        &u32::try_from(body.len() + 4)
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    m.extend_from_slice(body);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(code: i32, body: &[u8]) -> BytesMut {
        let mut buf = BytesMut::new();
        buf.put_i32(8 + body.len() as i32);
        buf.put_i32(code);
        buf.put_slice(body);
        buf
    }

    #[test]
    fn recognises_each_first_packet() {
        assert_eq!(
            decode_first_packet(packet(SSL_REQUEST_CODE, b"")).unwrap(),
            FirstPacket::SslRequest
        );
        assert_eq!(
            decode_first_packet(packet(GSSENC_REQUEST_CODE, b"")).unwrap(),
            FirstPacket::GssEncRequest
        );
        let key = CancelKey {
            pid: 42,
            secret: -7,
        };
        assert_eq!(
            decode_first_packet(encode_cancel(key)).unwrap(),
            FirstPacket::Cancel(key)
        );
        let startup = encode_startup(&[("user", "billing_rw"), ("database", "billing")]);
        match decode_first_packet(startup).unwrap() {
            FirstPacket::Startup(s) => {
                assert_eq!(s.parameters["user"], "billing_rw");
                assert_eq!(s.parameters["database"], "billing");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refuses_bad_packets() {
        let mut wrong_len = packet(SSL_REQUEST_CODE, b"");
        wrong_len[3] = 9;
        assert!(matches!(
            decode_first_packet(wrong_len),
            Err(ProtocolError::BadLength(8))
        ));
        assert!(matches!(
            decode_first_packet(packet(2 << 16, b"user\0x\0\0")),
            Err(ProtocolError::UnsupportedVersion(2, 0))
        ));
        assert!(matches!(
            decode_first_packet(packet(3 << 16, b"user\0x")),
            Err(ProtocolError::Malformed(_))
        ));
        let many: Vec<u8> = (0..100)
            .flat_map(|i| format!("k{i}\0v\0").into_bytes())
            .chain([0])
            .collect();
        assert!(matches!(
            decode_first_packet(packet(3 << 16, &many)),
            Err(ProtocolError::TooManyParameters)
        ));
    }

    #[tokio::test]
    async fn reads_exactly_one_packet_and_no_more() {
        let mut bytes = packet(SSL_REQUEST_CODE, b"").to_vec();
        bytes.extend_from_slice(b"\x16\x03\x01 injected");
        let mut reader = &bytes[..];
        assert_eq!(
            read_first_packet(&mut reader).await.unwrap(),
            FirstPacket::SslRequest
        );
        assert_eq!(reader, b"\x16\x03\x01 injected");
        let huge = (MAX_STARTUP_PACKET_LEN as u32 + 1).to_be_bytes();
        assert!(matches!(
            read_first_packet(&mut &huge[..]).await,
            Err(ProtocolError::BadLength(_))
        ));
    }

    #[test]
    fn error_responses_carry_code_message_and_hint() {
        let raw = fatal("28000", "denied", Some("do this"));
        assert_eq!(raw[0], b'E');
        let (code, message) = error_fields(&raw[5..]);
        assert_eq!((code.as_str(), message.as_str()), ("28000", "denied"));
        assert!(raw.windows(8).any(|w| w == b"Hdo this"));
    }
}
