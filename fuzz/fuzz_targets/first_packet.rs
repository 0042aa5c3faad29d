//! The pre-authentication decoder: the first bytes any client on the network
//! can send (SSLRequest, GSSENCRequest, CancelRequest, StartupMessage).
//!
//! For every input:
//! - `decode_first_packet` never panics, whatever the length prefix says;
//! - `read_first_packet` on an in-memory reader consumes exactly one packet
//!   (the declared length) and never a byte more, and agrees with
//!   `decode_first_packet` on that packet;
//! - whatever is accepted re-encodes to the same thing;
//! - a StartupMessage is read as PostgreSQL reads it (`ProcessStartupPacket`
//!   in `src/backend/tcop/backend_startup.c`, re-implemented below).
#![no_main]

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use ephemera::session::protocol::{
    decode_first_packet, encode_cancel, encode_startup, read_first_packet, FirstPacket,
    ProtocolError, MAX_STARTUP_PACKET_LEN, MAX_STARTUP_PARAMETERS,
};
use libfuzzer_sys::fuzz_target;

/// Poll a future that cannot wait: reading from `&[u8]` never returns
/// `Pending`, so one poll must finish it.
fn now<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("an in-memory read returned Pending"),
    }
}

/// PostgreSQL's reading of a protocol-3 StartupMessage body (after the
/// 8-byte header): `(name\0 value\0)* \0`, the terminator being the last
/// byte. None if PostgreSQL would refuse the layout.
fn postgres_parameters(packet: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
    let len = packet.len();
    let cstr = |at: usize| -> &[u8] {
        // PostgreSQL NUL-terminates its copy of the packet, so a string
        // running to the end stops there.
        let end = packet[at..]
            .iter()
            .position(|&b| b == 0)
            .map_or(len, |i| at + i);
        &packet[at..end]
    };
    let mut parameters = Vec::new();
    let mut offset = 8;
    while offset < len {
        let name = cstr(offset);
        if name.is_empty() {
            break;
        }
        let value_offset = offset + name.len() + 1;
        if value_offset >= len {
            break;
        }
        let value = cstr(value_offset);
        offset = value_offset + value.len() + 1;
        parameters.push((name, value));
    }
    // "expected terminator as last byte". (PostgreSQL's loop also lets a
    // lone non-NUL last byte pass as the terminator; we do not copy that.)
    (offset == len - 1 && packet[len - 1] == 0).then_some(parameters)
}

fn lossy_map(parameters: &[(&[u8], &[u8])]) -> BTreeMap<String, String> {
    parameters
        .iter()
        .map(|(k, v)| {
            (
                String::from_utf8_lossy(k).into_owned(),
                String::from_utf8_lossy(v).into_owned(),
            )
        })
        .collect()
}

fn check_accepted(packet: &[u8], decoded: &FirstPacket) {
    match decoded {
        FirstPacket::SslRequest => {
            assert_eq!(packet, [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]);
        }
        FirstPacket::GssEncRequest => {
            assert_eq!(packet, [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30]);
        }
        FirstPacket::Cancel(key) => {
            // A CancelRequest is exactly 16 bytes, so it re-encodes exactly.
            assert_eq!(&encode_cancel(*key)[..], packet);
        }
        FirstPacket::Startup(startup) => {
            assert!(packet.len() > 8);
            assert_eq!(packet[4..6], [0, 3], "protocol 3 only");
            assert_eq!(
                u16::from_be_bytes([packet[6], packet[7]]),
                startup.minor_version
            );
            for (k, v) in &startup.parameters {
                assert!(!k.is_empty(), "empty parameter name accepted");
                assert!(!k.contains('\0') && !v.contains('\0'));
            }
            match postgres_parameters(packet) {
                Some(parameters) => {
                    assert!(parameters.len() <= MAX_STARTUP_PARAMETERS);
                    assert_eq!(startup.parameters, lossy_map(&parameters));
                }
                None => panic!("accepted a startup packet PostgreSQL refuses: {startup:?}"),
            }
            assert!(startup.parameters.len() <= MAX_STARTUP_PARAMETERS);
            // Re-encode what was understood: it must decode to the same map.
            let pairs: Vec<(&str, &str)> = startup
                .parameters
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            // Lossy UTF-8 decoding can grow a packet past the limit (each
            // invalid byte becomes the 3 bytes of U+FFFD), and
            // `encode_startup` refuses (panics on) oversized packets. (And
            // the known 65th parameter, above, is refused once well-formed.)
            let size = 9 + pairs
                .iter()
                .map(|(k, v)| k.len() + v.len() + 2)
                .sum::<usize>();
            if size <= MAX_STARTUP_PACKET_LEN && pairs.len() <= MAX_STARTUP_PARAMETERS {
                let encoded = encode_startup(&pairs);
                assert_eq!(encoded.len(), size);
                match decode_first_packet(encoded) {
                    Ok(FirstPacket::Startup(again)) => {
                        assert_eq!(again.parameters, startup.parameters)
                    }
                    other => panic!("re-encoded startup packet not accepted: {other:?}"),
                }
            }
        }
    }
}

/// Same outcome (errors compared by kind and text; no I/O errors here).
fn same(a: &Result<FirstPacket, ProtocolError>, b: &Result<FirstPacket, ProtocolError>) -> bool {
    match (a, b) {
        (Ok(a), Ok(b)) => a == b,
        (Err(a), Err(b)) => {
            std::mem::discriminant(a) == std::mem::discriminant(b) && a.to_string() == b.to_string()
        }
        _ => false,
    }
}

/// A refused, well-framed protocol-3 StartupMessage must be one PostgreSQL
/// refuses too, or one over the parameter limit.
fn check_refused(packet: &[u8], error: &ProtocolError) {
    let framed = (8..=MAX_STARTUP_PACKET_LEN).contains(&packet.len())
        && u32::from_be_bytes([packet[0], packet[1], packet[2], packet[3]]) as usize
            == packet.len();
    if !framed || packet[4..6] != [0, 3] {
        return;
    }
    if let Some(parameters) = postgres_parameters(packet) {
        assert!(
            parameters.len() > MAX_STARTUP_PARAMETERS,
            "refused a startup packet PostgreSQL accepts: {error:?}"
        );
        assert!(
            matches!(error, ProtocolError::TooManyParameters),
            "{error:?}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    // 1. The pure decoder, given the whole input as "the packet".
    let whole = decode_first_packet(BytesMut::from(data));
    match &whole {
        Ok(decoded) => check_accepted(data, decoded),
        Err(error) => check_refused(data, error),
    }

    // 2. The reader: exactly one packet, never a byte more.
    let mut reader = data;
    let read = now(read_first_packet(&mut reader));
    if data.len() < 4 {
        assert!(matches!(read, Err(ProtocolError::Closed)), "{read:?}");
        return;
    }
    let declared = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
    if !(8..=MAX_STARTUP_PACKET_LEN).contains(&declared) {
        // Only the length word was read.
        assert!(
            matches!(read, Err(ProtocolError::BadLength(n)) if n == declared),
            "{read:?}"
        );
        assert_eq!(reader, &data[4..]);
        return;
    }
    if data.len() < declared {
        // The client hung up mid-packet; nothing beyond the input exists.
        assert!(matches!(read, Err(ProtocolError::Closed)), "{read:?}");
        return;
    }
    // A complete packet: the reader stopped exactly at its end...
    assert_eq!(reader, &data[declared..], "read past the declared length");
    // ...and says what the pure decoder says about those bytes.
    if declared == data.len() {
        assert!(same(&whole, &read), "{whole:?} != {read:?}");
    } else {
        let packet = &data[..declared];
        let decoded = decode_first_packet(BytesMut::from(packet));
        assert!(same(&read, &decoded), "{read:?} != {decoded:?}");
        match &read {
            Ok(decoded) => check_accepted(packet, decoded),
            Err(error) => check_refused(packet, error),
        }
    }
});
