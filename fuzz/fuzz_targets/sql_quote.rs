//! `quote_ident` / `quote_literal`: whatever the input, the output is one
//! complete token — lexing it the way PostgreSQL does ends exactly at its
//! last byte — and un-doubling its quotes gives the input back. So nothing a
//! role, template or database name contains can leave the quotes.
#![no_main]

use ephemera_engine_postgres::sql::{quote_ident, quote_literal};
use libfuzzer_sys::fuzz_target;

/// Lex a quoted token that starts at `s[open]` (the opening quote `q`),
/// PostgreSQL style: `qq` inside is one `q`; with `backslashes` (E'' strings)
/// `\x` is `x` for the two escapes we produce. Returns (value, index of the
/// closing quote), or None if the token is not closed.
fn lex(s: &[u8], open: usize, q: u8, backslashes: bool) -> Option<(Vec<u8>, usize)> {
    assert_eq!(s[open], q);
    let mut value = Vec::new();
    let mut i = open + 1;
    while i < s.len() {
        match s[i] {
            b'\\' if backslashes => {
                let next = *s.get(i + 1)?;
                assert!(
                    matches!(next, b'\\' | b'\''),
                    "unexpected escape \\{}",
                    next as char
                );
                value.push(next);
                i += 2;
            }
            c if c == q => {
                if s.get(i + 1) == Some(&q) {
                    value.push(q);
                    i += 2;
                } else {
                    return Some((value, i));
                }
            }
            c => {
                value.push(c);
                i += 1;
            }
        }
    }
    None
}

fuzz_target!(|data: &[u8]| {
    let input = String::from_utf8_lossy(data);
    let has_nul = input.contains('\0');

    match quote_ident(&input) {
        Err(_) => assert!(has_nul),
        Ok(quoted) => {
            assert!(!has_nul);
            let q = quoted.as_str().as_bytes();
            let (value, close) = lex(q, 0, b'"', false).expect("identifier not closed");
            assert_eq!(close, q.len() - 1, "identifier {quoted:?} ends early");
            assert_eq!(value, input.as_bytes());
        }
    }

    match quote_literal(&input) {
        Err(_) => assert!(has_nul),
        Ok(quoted) => {
            assert!(!has_nul);
            let q = quoted.as_str().as_bytes();
            let escape = q[0] == b'E';
            assert_eq!(escape, input.contains('\\'), "E'' exactly when needed");
            let open = usize::from(escape);
            // With standard_conforming_strings = on, '' strings take
            // backslashes literally; E'' strings always interpret them.
            let (value, close) = lex(q, open, b'\'', escape).expect("literal not closed");
            assert_eq!(close, q.len() - 1, "literal {quoted:?} ends early");
            assert_eq!(value, input.as_bytes());
            // With standard_conforming_strings = off, a '' string would
            // interpret backslashes: there are none unless E'' is used.
            if !escape {
                assert!(!q.contains(&b'\\'));
            }
        }
    }
});
