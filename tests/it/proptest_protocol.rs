//! Property tests for every message the front door builds or parses
//! (`src/protocol.rs`), the SPIFFE ID grammar (`src/identity.rs`), the policy
//! patterns (`src/policy.rs`) and SQL quoting (`engines/postgres/src/sql.rs`).
//!
//! The reference parsers here are written from the PostgreSQL protocol
//! documentation and the SPIFFE ID specification, not from Ephemera's code.
//! The fuzz targets in `fuzz/` check the same properties on unstructured
//! input; these run in `cargo test` (256 cases per property, a few seconds).
#![allow(clippy::unwrap_used, clippy::too_many_lines)] // a test: a panic is its failure message; scenarios read top to bottom

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use bytes::{BufMut, BytesMut};
use ephemera::identity::{SpiffeId, MAX_SPIFFE_ID_LEN};
use ephemera::policy::IdPattern;
use ephemera::session::protocol::{
    authentication_ok, backend_key_data, decode_first_packet, encode_cancel, encode_startup,
    error_fields, fatal, negotiate_protocol_version, read_first_packet, ready_for_query_idle,
    CancelKey, FirstPacket, ProtocolError, MAX_STARTUP_PACKET_LEN, MAX_STARTUP_PARAMETERS,
};
use ephemera_engine_postgres::sql::{quote_ident, quote_literal};
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;

const SSL_REQUEST_CODE: i32 = 80_877_103;
const GSSENC_REQUEST_CODE: i32 = 80_877_104;
const CANCEL_REQUEST_CODE: i32 = 80_877_102;

/// Run a future that cannot wait: reading from a `&[u8]` never returns
/// `Pending`, so one poll finishes it.
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

fn be_i32(bytes: &[u8]) -> i32 {
    i32::from_be_bytes(bytes[..4].try_into().unwrap())
}

/// A backend message: (type byte, body), checking that the length field
/// counts everything but the type byte.
fn backend_message(raw: &[u8]) -> (u8, &[u8]) {
    assert!(raw.len() >= 5, "{raw:?}");
    assert_eq!(be_i32(&raw[1..]) as usize, raw.len() - 1, "length field");
    (raw[0], &raw[5..])
}

/// Split `body` into NUL-terminated strings; the body must end with a NUL.
fn cstrings(body: &[u8]) -> Vec<&[u8]> {
    assert_eq!(body.last(), Some(&0), "not NUL-terminated: {body:?}");
    body[..body.len() - 1].split(|&b| b == 0).collect()
}

/// Text with no NUL (PostgreSQL strings cannot hold one), any other
/// character, including multi-byte ones.
fn text(max: usize) -> impl Strategy<Value = String> {
    vec(any::<char>().prop_filter("no NUL", |c| *c != '\0'), 0..=max)
        .prop_map(|chars| chars.into_iter().collect())
}

fn startup_parameters() -> impl Strategy<Value = BTreeMap<String, String>> {
    let key = prop_oneof![
        3 => text(12).prop_filter("non-empty", |s| !s.is_empty()),
        1 => prop::sample::select(vec!["user", "database", "options", "application_name", "_pq_.x"])
            .prop_map(str::to_owned),
    ];
    btree_map(key, text(40), 0..=MAX_STARTUP_PARAMETERS)
}

// ---------------------------------------------------------------- first packets

/// `len` bytes, about a third of them NUL, from a xorshift seed.
fn nul_heavy(len: usize, mut seed: u64) -> Vec<u8> {
    seed |= 1;
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            match seed % 3 {
                0 => 0,
                1 => b'k',
                _ => (seed >> 8) as u8,
            }
        })
        .collect()
}

proptest! {
    /// StartupMessage: parameters → encode_startup → decode_first_packet
    /// (and read_first_packet) → the same parameters.
    #[test]
    fn startup_round_trips(parameters in startup_parameters(), trailing in vec(any::<u8>(), 0..16)) {
        let pairs: Vec<(&str, &str)> =
            parameters.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let packet = encode_startup(&pairs);
        prop_assert!(packet.len() <= MAX_STARTUP_PACKET_LEN);
        prop_assert_eq!(be_i32(&packet) as usize, packet.len());
        prop_assert_eq!(be_i32(&packet[4..]), 3 << 16);

        match decode_first_packet(packet.clone()) {
            Ok(FirstPacket::Startup(startup)) => {
                prop_assert_eq!(startup.minor_version, 0);
                prop_assert_eq!(&startup.parameters, &parameters);
            }
            other => prop_assert!(false, "{:?}", other),
        }

        // The reader takes exactly the packet; what follows stays unread.
        let mut bytes = packet.to_vec();
        bytes.extend_from_slice(&trailing);
        let mut reader = &bytes[..];
        match now(read_first_packet(&mut reader)) {
            Ok(FirstPacket::Startup(startup)) => prop_assert_eq!(startup.parameters, parameters),
            other => prop_assert!(false, "{:?}", other),
        }
        prop_assert_eq!(reader, &trailing[..]);
    }

    /// More than MAX_STARTUP_PARAMETERS well-formed parameters are refused.
    #[test]
    fn too_many_startup_parameters_are_refused(extra in 1usize..40, value_len in 0usize..4) {
        let parameters: Vec<(String, String)> = (0..MAX_STARTUP_PARAMETERS + extra)
            .map(|i| (format!("k{i}"), "v".repeat(value_len)))
            .collect();
        let pairs: Vec<(&str, &str)> =
            parameters.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        prop_assert!(matches!(
            decode_first_packet(encode_startup(&pairs)),
            Err(ProtocolError::TooManyParameters)
        ));
    }

    /// CancelRequest: any key → encode_cancel → the 16-byte packet the
    /// protocol describes → decode_first_packet → the same key.
    #[test]
    fn cancel_request_round_trips(pid in any::<i32>(), secret in any::<i32>(), trailing in vec(any::<u8>(), 0..16)) {
        let key = CancelKey { pid, secret };
        let packet = encode_cancel(key);
        let mut expected = Vec::new();
        for word in [16, CANCEL_REQUEST_CODE, pid, secret] {
            expected.extend_from_slice(&word.to_be_bytes());
        }
        prop_assert_eq!(&packet[..], &expected[..]);
        prop_assert_eq!(decode_first_packet(packet).unwrap(), FirstPacket::Cancel(key));

        let mut bytes = expected.clone();
        bytes.extend_from_slice(&trailing);
        let mut reader = &bytes[..];
        prop_assert_eq!(now(read_first_packet(&mut reader)).unwrap(), FirstPacket::Cancel(key));
        prop_assert_eq!(reader, &trailing[..]);
    }

    /// Any packet with a valid length prefix: decoding never panics and never
    /// blames the length; reading it consumes exactly the packet.
    #[test]
    fn decode_never_panics_with_a_valid_length_prefix(
        code in prop_oneof![
            any::<i32>(),
            Just(SSL_REQUEST_CODE),
            Just(GSSENC_REQUEST_CODE),
            Just(CANCEL_REQUEST_CODE),
            any::<u16>().prop_map(|minor| (3 << 16) | i32::from(minor)),
        ],
        body in prop_oneof![
            vec(any::<u8>(), 0..64),
            // NUL-heavy bodies look like parameter lists.
            vec(prop_oneof![Just(0u8), Just(b'a'), any::<u8>()], 0..600),
            // Near the size limit; generated from a seed (cheap to shrink).
            (MAX_STARTUP_PACKET_LEN - 64..=MAX_STARTUP_PACKET_LEN - 8, any::<u64>())
                .prop_map(|(len, seed)| nul_heavy(len, seed)),
        ],
        trailing in vec(any::<u8>(), 0..8),
    ) {
        let mut packet = BytesMut::new();
        packet.put_i32(8 + body.len() as i32);
        packet.put_i32(code);
        packet.put_slice(&body);
        let bytes = [&packet[..], &trailing[..]].concat();

        let decoded = decode_first_packet(packet.clone());
        prop_assert!(!matches!(decoded, Err(ProtocolError::BadLength(_))), "{:?}", decoded);
        if let Ok(FirstPacket::Startup(startup)) = &decoded {
            prop_assert!(startup.parameters.keys().all(|k| !k.is_empty()));
        }

        let mut reader = &bytes[..];
        let read = now(read_first_packet(&mut reader));
        prop_assert_eq!(format!("{read:?}"), format!("{decoded:?}"));
        prop_assert_eq!(reader, &trailing[..]);
    }

    /// Arbitrary bytes, whatever their length prefix says: no panic, and the
    /// reader never takes more than the declared length.
    #[test]
    fn decode_never_panics_on_arbitrary_bytes(bytes in vec(any::<u8>(), 0..64)) {
        let _ = decode_first_packet(BytesMut::from(&bytes[..]));
        let mut reader = &bytes[..];
        let read = now(read_first_packet(&mut reader));
        if bytes.len() >= 4 {
            let declared = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
            if !(8..=MAX_STARTUP_PACKET_LEN).contains(&declared) {
                prop_assert!(matches!(read, Err(ProtocolError::BadLength(n)) if n == declared));
                prop_assert_eq!(reader, &bytes[4..]);
            } else if declared <= bytes.len() {
                prop_assert_eq!(reader, &bytes[declared..]);
            }
        }
    }
}

#[test]
fn ssl_and_gssenc_requests_are_exactly_eight_bytes() {
    for (code, expected) in [
        (SSL_REQUEST_CODE, FirstPacket::SslRequest),
        (GSSENC_REQUEST_CODE, FirstPacket::GssEncRequest),
    ] {
        let mut packet = BytesMut::new();
        packet.put_i32(8);
        packet.put_i32(code);
        assert_eq!(decode_first_packet(packet.clone()).unwrap(), expected);
        let mut longer = packet.clone();
        longer[3] = 12;
        longer.put_i32(0);
        assert!(matches!(
            decode_first_packet(longer),
            Err(ProtocolError::Malformed(_))
        ));
    }
}

// ------------------------------------------------------------ backend messages

proptest! {
    /// ErrorResponse: fatal(code, message, hint) is a well-framed 'E' message
    /// whose fields read back, and error_fields gives code and message back.
    #[test]
    fn error_response_round_trips(
        code in "[0-9A-Z]{5}",
        message in text(300),
        hint in proptest::option::of(text(300)),
    ) {
        let raw = fatal(&code, &message, hint.as_deref());
        let (kind, body) = backend_message(&raw);
        prop_assert_eq!(kind, b'E');
        prop_assert_eq!(error_fields(body), (code.clone(), message.clone()));

        // The body is (type byte, string, NUL)* then a final NUL.
        prop_assert_eq!(body.last(), Some(&0));
        let mut fields = Vec::new();
        let mut rest = &body[..body.len() - 1];
        while let Some((&field, tail)) = rest.split_first() {
            let end = tail.iter().position(|&b| b == 0).expect("field not terminated");
            fields.push((field, std::str::from_utf8(&tail[..end]).unwrap()));
            rest = &tail[end + 1..];
        }
        let mut expected = vec![
            (b'S', "FATAL"),
            (b'V', "FATAL"),
            (b'C', code.as_str()),
            (b'M', message.as_str()),
        ];
        if let Some(hint) = &hint {
            expected.push((b'H', hint.as_str()));
        }
        prop_assert_eq!(fields, expected);
    }

    /// error_fields tolerates anything a backend (or a fuzzer) sends.
    #[test]
    fn error_fields_never_panics(body in vec(prop_oneof![Just(0u8), Just(b'C'), Just(b'M'), any::<u8>()], 0..200)) {
        let (code, message) = error_fields(&body);
        prop_assert!(!code.contains('\0') && !message.contains('\0'));
    }

    /// BackendKeyData: 'K', length 12, pid, secret.
    #[test]
    fn backend_key_data_round_trips(pid in any::<i32>(), secret in any::<i32>()) {
        let raw = backend_key_data(CancelKey { pid, secret });
        let (kind, body) = backend_message(&raw);
        prop_assert_eq!(kind, b'K');
        prop_assert_eq!(body.len(), 8);
        prop_assert_eq!(be_i32(body), pid);
        prop_assert_eq!(be_i32(&body[4..]), secret);
        // What we hand out is what a CancelRequest quoting it decodes to.
        let cancel = decode_first_packet(encode_cancel(CancelKey { pid, secret })).unwrap();
        prop_assert_eq!(cancel, FirstPacket::Cancel(CancelKey { pid: be_i32(body), secret: be_i32(&body[4..]) }));
    }

    /// NegotiateProtocolVersion: 'v', length = total - type byte, newest
    /// minor 0, the option count, then each option as a C string.
    #[test]
    fn negotiate_protocol_version_framing(options in vec(text(30).prop_map(|s| format!("_pq_.{s}")), 0..MAX_STARTUP_PARAMETERS)) {
        let raw = negotiate_protocol_version(options.clone());
        let (kind, body) = backend_message(&raw);
        prop_assert_eq!(kind, b'v');
        prop_assert_eq!(be_i32(body), 0);
        prop_assert_eq!(be_i32(&body[4..]) as usize, options.len());
        let strings = &body[8..];
        if options.is_empty() {
            prop_assert!(strings.is_empty());
        } else {
            let got: Vec<&[u8]> = cstrings(strings);
            let want: Vec<&[u8]> = options.iter().map(|s| s.as_bytes()).collect();
            prop_assert_eq!(got, want);
        }
    }
}

/// ErrorResponse may be long (pgwire allows up to i32::MAX): a refusal
/// quoting a long client-chosen name with `{:?}` is still framed correctly.
#[test]
fn long_error_responses_are_framed() {
    let message = format!(
        "there is no role template named {:?}",
        "\u{7f}".repeat(9_000)
    );
    let raw = fatal("28000", &message, Some(&"h".repeat(40_000)));
    let (kind, body) = backend_message(&raw);
    assert_eq!(kind, b'E');
    assert_eq!(error_fields(body), ("28000".to_owned(), message));
}

#[test]
fn fixed_backend_messages() {
    assert_eq!(&authentication_ok()[..], b"R\0\0\0\x08\0\0\0\0");
    assert_eq!(&ready_for_query_idle()[..], b"Z\0\0\0\x05I");
}

// ---------------------------------------------------------------- SPIFFE IDs

/// The SPIFFE ID grammar, from the spec: `spiffe://` trust-domain path,
/// trust domain `[a-z0-9._-]+`, path `(/segment)*` with segments
/// `[A-Za-z0-9._-]+` other than `.` and `..`, at most 2048 bytes. With
/// `wildcards` (policy patterns), a segment may be `*`, and the last one `**`.
fn reference_spiffe(s: &str, wildcards: bool) -> Option<(&str, Vec<&str>)> {
    if s.len() > MAX_SPIFFE_ID_LEN {
        return None;
    }
    let rest = s.strip_prefix("spiffe://")?;
    let (td, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if td.is_empty()
        || !td
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
    {
        return None;
    }
    let mut segments = Vec::new();
    let mut remaining = path;
    while let Some(after_slash) = remaining.strip_prefix('/') {
        let end = after_slash.find('/').unwrap_or(after_slash.len());
        let segment = &after_slash[..end];
        remaining = &after_slash[end..];
        let wildcard = wildcards && (segment == "*" || (segment == "**" && remaining.is_empty()));
        let plain = !segment.is_empty()
            && segment != "."
            && segment != ".."
            && segment
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
        if !(wildcard || plain) {
            return None;
        }
        segments.push(segment);
    }
    Some((td, segments))
}

fn reference_matches(pattern: &[&str], id: &[&str]) -> bool {
    match (pattern.first(), id.first()) {
        (None, None) => true,
        (Some(&"**"), _) => pattern.len() == 1 && !id.is_empty(),
        (Some(_), None) | (None, Some(_)) => false,
        (Some(&"*"), Some(_)) => reference_matches(&pattern[1..], &id[1..]),
        (Some(want), Some(got)) => want == got && reference_matches(&pattern[1..], &id[1..]),
    }
}

/// Strings near the grammar: a scheme that is or almost is `spiffe://`, a
/// trust domain and segments drawn from valid and invalid pieces, and
/// sometimes an over-long segment.
fn spiffe_like() -> impl Strategy<Value = String> {
    let scheme = prop_oneof![
        8 => Just("spiffe://"),
        1 => prop::sample::select(vec!["", "SPIFFE://", "https://", "spiffe:/", "spiffe:///", "spiffe//"]),
    ];
    let td_char = prop::sample::select(vec![
        'a', 'z', '0', '9', '.', '-', '_', 'A', ':', '@', '%', '/', ' ', 'é', '*',
    ]);
    let trust_domain = vec(td_char, 0..8).prop_map(|c| c.into_iter().collect::<String>());
    let segment = prop_oneof![
        6 => "[A-Za-z0-9._-]{1,6}",
        1 => prop::sample::select(vec![
            "", ".", "..", "*", "**", "***", "a*", "%2F", "a?b", "a#b", "é", " ", "..a", "a.",
        ]).prop_map(str::to_owned),
        1 => (2000usize..2100).prop_map(|n| "a".repeat(n)),
    ];
    let trailing = prop::sample::select(vec!["", "", "", "/", "//", "?q", "#f"]);
    (scheme, trust_domain, vec(segment, 0..6), trailing).prop_map(|(s, td, segs, t)| {
        let mut uri = format!("{s}{td}");
        for seg in segs {
            uri.push('/');
            uri.push_str(&seg);
        }
        uri.push_str(t);
        uri
    })
}

proptest! {
    /// SpiffeId::parse accepts exactly what the reference grammar accepts,
    /// and the accepted ID's parts are the reference's.
    #[test]
    fn spiffe_id_parse_matches_the_reference_grammar(uri in prop_oneof![4 => spiffe_like(), 1 => any::<String>()]) {
        let parsed = SpiffeId::parse(&uri);
        let reference = reference_spiffe(&uri, false);
        prop_assert_eq!(parsed.is_ok(), reference.is_some(), "{:?}: {:?}", uri, parsed);
        if let (Ok(id), Some((td, segments))) = (parsed, reference) {
            prop_assert_eq!(id.as_str(), uri.as_str());
            prop_assert_eq!(id.trust_domain(), td);
            prop_assert_eq!(id.segments().collect::<Vec<_>>(), segments);
        }
    }

    /// IdPattern::parse accepts exactly the wildcard grammar, and `matches`
    /// agrees with the reference matcher.
    #[test]
    fn id_patterns_match_the_reference(pattern in spiffe_like(), id in spiffe_like()) {
        // Give the pair a fair chance of sharing a trust domain.
        let id = match (pattern.split_once("://"), id.split_once("://")) {
            (Some((_, p)), Some((s, i))) if p.starts_with('a') => {
                let td = p.split('/').next().unwrap();
                let path = i.find('/').map_or("", |n| &i[n..]);
                format!("{s}://{td}{path}")
            }
            _ => id,
        };
        let parsed = IdPattern::parse(&pattern);
        let reference = reference_spiffe(&pattern, true);
        prop_assert_eq!(parsed.is_ok(), reference.is_some(), "{:?}: {:?}", pattern, parsed);
        if let (Ok(p), Some((ptd, psegs)), Ok(i), Some((td, segs))) =
            (&parsed, &reference, SpiffeId::parse(&id), reference_spiffe(&id, false))
        {
            prop_assert_eq!(
                p.matches(&i),
                *ptd == td && reference_matches(psegs, &segs),
                "{:?} ~ {:?}", pattern, id
            );
        }
    }
}

// ---------------------------------------------------------------- SQL quoting

/// Lex a quoted token opening at `s[open]`, as PostgreSQL's scanner does:
/// a doubled quote is one quote; with `escapes` (E'' strings) a backslash
/// escapes the next character. Returns the value and the index of the
/// closing quote.
fn lex_quoted(s: &str, open: usize, quote: char, escapes: bool) -> Option<(String, usize)> {
    let mut chars = s.char_indices().skip_while(|&(i, _)| i < open).peekable();
    assert_eq!(chars.next().map(|(_, c)| c), Some(quote));
    let mut value = String::new();
    while let Some((i, c)) = chars.next() {
        if escapes && c == '\\' {
            value.push(chars.next()?.1);
        } else if c == quote {
            if chars.peek().map(|&(_, c)| c) == Some(quote) {
                chars.next();
                value.push(quote);
            } else {
                return Some((value, i));
            }
        } else {
            value.push(c);
        }
    }
    None
}

fn sql_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("\"".to_owned()),
        Just("'".to_owned()),
        Just("\\".to_owned()),
        Just("E'".to_owned()),
        Just("; DROP ROLE postgres; --".to_owned()),
        Just("$$".to_owned()),
        text(4),
    ];
    vec(piece, 0..8).prop_map(|p| p.concat())
}

proptest! {
    /// quote_ident: one token, ending at its last character, that reads back
    /// as the input.
    #[test]
    fn quote_ident_round_trips(name in sql_text()) {
        let quoted = quote_ident(&name).unwrap();
        let q = quoted.as_str();
        let (value, close) = lex_quoted(q, 0, '"', false).expect("identifier not closed");
        prop_assert_eq!(close, q.len() - 1, "{:?} ends early", q);
        prop_assert_eq!(value, name);
    }

    /// quote_literal: the same, under either standard_conforming_strings:
    /// '…' never contains a backslash, E'…' is read with escapes.
    #[test]
    fn quote_literal_round_trips(value in sql_text()) {
        let quoted = quote_literal(&value).unwrap();
        let q = quoted.as_str();
        let escaped = q.starts_with('E');
        prop_assert_eq!(escaped, value.contains('\\'));
        if !escaped {
            prop_assert!(!q.contains('\\'));
        }
        let (read, close) = lex_quoted(q, usize::from(escaped), '\'', escaped)
            .expect("literal not closed");
        prop_assert_eq!(close, q.len() - 1, "{:?} ends early", q);
        prop_assert_eq!(read, value);
    }

    /// Text with a NUL cannot be quoted at all.
    #[test]
    fn nul_is_refused(before in text(5), after in text(5)) {
        let s = format!("{before}\0{after}");
        prop_assert!(quote_ident(&s).is_err());
        prop_assert!(quote_literal(&s).is_err());
    }
}

// ------------------------------------------- found by the fuzzer (fixed)

/// A StartupMessage whose last parameter name has no value and no list
/// terminator (`...k64\0`) must be refused, as PostgreSQL does ("expected
/// terminator as last byte"); it once slipped a 65th parameter past
/// MAX_STARTUP_PARAMETERS. Likewise bytes after the terminator
/// (`user\0x\0\0junk\0`). Found by `fuzz/fuzz_targets/first_packet.rs`.
#[test]
fn unterminated_startup_packets_are_refused() {
    let mut body: Vec<u8> = (0..MAX_STARTUP_PARAMETERS)
        .flat_map(|i| format!("k{i}\0v\0").into_bytes())
        .collect();
    body.extend_from_slice(b"k64\0");
    let mut packet = BytesMut::new();
    packet.put_i32(8 + body.len() as i32);
    packet.put_i32(3 << 16);
    packet.put_slice(&body);
    let decoded = decode_first_packet(packet);
    assert!(decoded.is_err(), "{decoded:?}");

    let mut packet = BytesMut::new();
    packet.put_i32(13);
    packet.put_i32(3 << 16);
    packet.put_slice(b"user\0");
    let decoded = decode_first_packet(packet);
    assert!(decoded.is_err(), "{decoded:?}");

    // Bytes after the terminator.
    let body = b"user\0x\0\0junk\0";
    let mut packet = BytesMut::new();
    packet.put_i32(8 + body.len() as i32);
    packet.put_i32(3 << 16);
    packet.put_slice(body);
    let decoded = decode_first_packet(packet);
    assert!(decoded.is_err(), "{decoded:?}");
}
