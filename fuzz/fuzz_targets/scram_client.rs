//! The SCRAM client against a hostile upstream: `client_final` and
//! `verify_server_final` never panic on any server message, and a forged
//! server signature is never accepted.
//!
//! Input: `<server-first>\n<server-final>` (raw bytes). In the server-first
//! half, `{N}` is replaced by the client's nonce and `{S}` by the role's
//! base64 salt, so the fuzzer can reach the code past the nonce and salt
//! checks without guessing 24 random characters.
#![no_main]

use ephemera_engine::scram::{ScramClient, ScramError};
use ephemera_engine::ScramSecret;
use libfuzzer_sys::fuzz_target;

fn replace(haystack: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut i = 0;
    while i < haystack.len() {
        if haystack[i..].starts_with(needle) {
            out.extend_from_slice(with);
            i += needle.len();
        } else {
            out.push(haystack[i]);
            i += 1;
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let secret = ScramSecret::generate();
    let verifier = secret.verifier();
    // SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>
    let salt = verifier.split(['$', ':']).nth(2).unwrap().to_owned();
    let mut client = ScramClient::new(&secret);
    let first = String::from_utf8(client.client_first()).unwrap();
    let nonce = first.rsplit_once("r=").unwrap().1.to_owned();

    let (server_first, server_final) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    // Before the first round, a final message is out of order.
    assert_eq!(
        client.verify_server_final(server_final),
        Err(ScramError::OutOfOrder)
    );
    let server_first = replace(server_first, b"{N}", nonce.as_bytes());
    let server_first = replace(&server_first, b"{S}", salt.as_bytes());
    let Ok(client_final) = client.client_final(&server_first) else {
        return;
    };
    let client_final = String::from_utf8(client_final).expect("client-final is UTF-8");
    assert!(client_final.starts_with("c=biws,r="));
    assert_eq!(
        client.client_final(&server_first),
        Err(ScramError::OutOfOrder)
    );
    // Without the server key, no input can be a valid signature (2^-256).
    assert!(client.verify_server_final(server_final).is_err());
});
