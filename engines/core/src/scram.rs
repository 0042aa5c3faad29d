//! SCRAM-SHA-256 (RFC 5802 / RFC 7677) as Ephemera uses it.
//!
//! Ephemera never has a password for the roles it mints. It draws the
//! *salted password* itself (32 random bytes), hands PostgreSQL only the
//! verifier derived from it (`SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`),
//! and logs in with the keys. Nothing in clear ever crosses the wire or lands
//! in a statement log, and the login needs no PBKDF2 on our side.
//!
//! [`ScramClient`] is the client half of the exchange, sans-IO: feed it the
//! server's messages, send what it returns.

use std::fmt;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

use crate::Password;

type HmacSha256 = Hmac<Sha256>;

/// The SCRAM keys of one minted role. `Debug` never shows them.
#[derive(Clone)]
pub struct ScramSecret {
    iterations: u32,
    salt: [u8; 16],
    salted_password: [u8; 32],
}

impl ScramSecret {
    /// The iteration count written into the verifiers of minted roles.
    ///
    /// Iterations exist to slow down guessing of a *human* password from its
    /// verifier. Our salted password is 256 uniformly random bits that never
    /// had a password behind it, so guessing costs 2^256 HMACs whatever the
    /// count, and stretching buys nothing. It does cost: PostgreSQL runs the
    /// full PBKDF2 once in `CREATE ROLE` (to refuse an empty password), about
    /// 3 ms of server CPU at the usual 4096. So we record the minimum the
    /// verifier format allows.
    pub const MINTED_ROLE_ITERATIONS: u32 = 1;

    /// Fresh random keys for a new role.
    pub fn generate() -> Self {
        let mut rng = rand::rngs::OsRng;
        let mut salt = [0u8; 16];
        let mut salted_password = [0u8; 32];
        rng.fill_bytes(&mut salt);
        rng.fill_bytes(&mut salted_password);
        ScramSecret {
            iterations: Self::MINTED_ROLE_ITERATIONS,
            salt,
            salted_password,
        }
    }

    /// The iteration count for passwords handed to clients (standalone
    /// leases). The password is random, so this is not about guessing either,
    /// but some client libraries refuse counts below RFC 7677's 4096.
    pub const CLIENT_PASSWORD_ITERATIONS: u32 = 4096;

    /// Keys for a password a client will log in with: the salted password is
    /// `Hi(password, salt, iterations)` (PBKDF2-HMAC-SHA-256, RFC 5802). The
    /// password must be plain ASCII (see [`crate::Password::generate`]), for
    /// which SASLprep is the identity.
    pub fn from_password(password: &str, iterations: u32) -> Self {
        let mut salt = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut salt);
        Self::derive(password, salt, iterations)
    }

    /// `Hi(password, salt, iterations)` (RFC 5802), for a known salt.
    fn derive(password: &str, salt: [u8; 16], iterations: u32) -> Self {
        let mut block = salt.to_vec();
        block.extend_from_slice(&1u32.to_be_bytes());
        let mut u = Zeroizing::new(hmac(password.as_bytes(), &block));
        let mut salted_password = *u;
        for _ in 1..iterations {
            *u = hmac(password.as_bytes(), &*u);
            for (acc, x) in salted_password.iter_mut().zip(u.iter()) {
                *acc ^= x;
            }
        }
        let secret = ScramSecret {
            iterations,
            salt,
            salted_password,
        };
        salted_password.zeroize();
        secret
    }

    /// The verifier to store in the database (`CREATE ROLE … PASSWORD '<this>'`).
    /// It lets the server check a login but does not let anyone log in.
    pub fn verifier(&self) -> String {
        format!(
            "SCRAM-SHA-256${}:{}${}:{}",
            self.iterations,
            BASE64.encode(self.salt),
            BASE64.encode(self.stored_key()),
            BASE64.encode(self.server_key())
        )
    }

    fn client_key(&self) -> [u8; 32] {
        hmac(&self.salted_password, b"Client Key")
    }

    fn stored_key(&self) -> [u8; 32] {
        Sha256::digest(self.client_key()).into()
    }

    fn server_key(&self) -> [u8; 32] {
        hmac(&self.salted_password, b"Server Key")
    }
}

impl fmt::Debug for ScramSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ScramSecret(<redacted>)")
    }
}

impl Drop for ScramSecret {
    fn drop(&mut self) {
        // Do not leave the key material in freed memory.
        self.salted_password.zeroize();
    }
}

fn hmac(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(message);
    mac.finalize().into_bytes().into()
}

/// Why a SCRAM exchange with the server failed. Never carries key material.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("the server's SCRAM message is malformed ({0})")]
    Malformed(&'static str),
    #[error("the server's SCRAM nonce does not extend ours")]
    NonceMismatch,
    #[error(
        "the server holds a different verifier for this role (salt or iteration count differ)"
    )]
    VerifierMismatch,
    #[error("the server reported a SCRAM error: {0}")]
    ServerError(String),
    #[error("the server's signature is wrong: it does not hold this role's verifier")]
    BadServerSignature,
    #[error("SCRAM message received out of order")]
    OutOfOrder,
}

/// The keys a [`ScramClient`] proves itself with.
enum ClientKeys<'a> {
    /// Keys Ephemera drew: the server must hold exactly their verifier.
    Secret(&'a ScramSecret),
    /// A password: keys are derived once the server names salt and count.
    Password {
        password: &'a Password,
        derived: Option<ScramSecret>,
    },
}

/// The most PBKDF2 iterations a password login accepts from the server:
/// a hostile or misconfigured upstream must not make each login cost
/// seconds of our CPU.
const MAX_PASSWORD_ITERATIONS: u32 = 100_000;

/// The client side of one SCRAM-SHA-256 exchange (no channel binding).
pub struct ScramClient<'a> {
    keys: ClientKeys<'a>,
    client_first_bare: String,
    client_nonce: String,
    /// Set once the server's first message has been answered.
    auth_message: Option<String>,
}

impl fmt::Debug for ScramClient<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramClient").finish_non_exhaustive()
    }
}

impl<'a> ScramClient<'a> {
    /// The mechanism name to announce in `SASLInitialResponse`.
    pub const MECHANISM: &'static str = "SCRAM-SHA-256";

    pub fn new(secret: &'a ScramSecret) -> Self {
        Self::with_nonce(ClientKeys::Secret(secret), fresh_nonce())
    }

    /// A client that logs in with `password` (a role whose password the
    /// engine knows, rather than keys it drew).
    pub fn with_password(password: &'a Password) -> Self {
        Self::with_nonce(
            ClientKeys::Password {
                password,
                derived: None,
            },
            fresh_nonce(),
        )
    }

    fn with_nonce(keys: ClientKeys<'a>, client_nonce: String) -> Self {
        // PostgreSQL takes the user name from the startup packet; libpq sends
        // an empty one here too.
        let client_first_bare = format!("n=,r={client_nonce}");
        ScramClient {
            keys,
            client_first_bare,
            client_nonce,
            auth_message: None,
        }
    }

    /// `client-first-message`: GS2 header `n,,` (no channel binding) + bare part.
    pub fn client_first(&self) -> Vec<u8> {
        format!("n,,{}", self.client_first_bare).into_bytes()
    }

    /// Consume `server-first-message`, return `client-final-message`.
    pub fn client_final(&mut self, server_first: &[u8]) -> Result<Vec<u8>, ScramError> {
        if self.auth_message.is_some() {
            return Err(ScramError::OutOfOrder);
        }
        let server_first =
            std::str::from_utf8(server_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let mut parts = server_first.split(',');
        let nonce = attribute(parts.next(), 'r')?;
        let salt = attribute(parts.next(), 's')?;
        let iterations = attribute(parts.next(), 'i')?;
        if !nonce.starts_with(&self.client_nonce) || nonce.len() == self.client_nonce.len() {
            return Err(ScramError::NonceMismatch);
        }
        let salt = BASE64
            .decode(salt)
            .map_err(|_| ScramError::Malformed("salt is not base64"))?;
        let iterations: u32 = iterations
            .parse()
            .map_err(|_| ScramError::Malformed("iteration count is not a number"))?;
        let secret = match &mut self.keys {
            ClientKeys::Secret(secret) => {
                if salt != secret.salt || iterations != secret.iterations {
                    return Err(ScramError::VerifierMismatch);
                }
                &**secret
            }
            ClientKeys::Password { password, derived } => {
                let salt: [u8; 16] = salt
                    .try_into()
                    .map_err(|_| ScramError::Malformed("salt is not 16 bytes"))?;
                if iterations == 0 || iterations > MAX_PASSWORD_ITERATIONS {
                    return Err(ScramError::Malformed("iteration count out of range"));
                }
                &*derived.insert(ScramSecret::derive(password.expose(), salt, iterations))
            }
        };

        // "biws" is base64("n,,"): the GS2 header, no channel binding.
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let client_key = Zeroizing::new(secret.client_key());
        let signature = hmac(&secret.stored_key(), auth_message.as_bytes());
        let mut proof = [0u8; 32];
        for (p, (k, s)) in proof
            .iter_mut()
            .zip(client_key.iter().zip(signature.iter()))
        {
            *p = k ^ s;
        }
        self.auth_message = Some(auth_message);
        Ok(format!("{without_proof},p={}", BASE64.encode(proof)).into_bytes())
    }

    /// Check `server-final-message`: proves the server holds our verifier.
    pub fn verify_server_final(&self, server_final: &[u8]) -> Result<(), ScramError> {
        let auth_message = self.auth_message.as_ref().ok_or(ScramError::OutOfOrder)?;
        let server_final =
            std::str::from_utf8(server_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        if let Some(error) = server_final.strip_prefix("e=") {
            return Err(ScramError::ServerError(error.to_owned()));
        }
        let signature = attribute(server_final.split(',').next(), 'v')?;
        let signature = BASE64
            .decode(signature)
            .map_err(|_| ScramError::Malformed("signature is not base64"))?;
        let secret = match &self.keys {
            ClientKeys::Secret(secret) => *secret,
            ClientKeys::Password {
                derived: Some(secret),
                ..
            } => secret,
            ClientKeys::Password { derived: None, .. } => return Err(ScramError::OutOfOrder),
        };
        let expected = hmac(&secret.server_key(), auth_message.as_bytes());
        if signature.as_slice() == expected.as_slice() {
            Ok(())
        } else {
            Err(ScramError::BadServerSignature)
        }
    }
}

fn fresh_nonce() -> String {
    let mut nonce = [0u8; 18];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    BASE64.encode(nonce)
}

fn attribute(part: Option<&str>, name: char) -> Result<&str, ScramError> {
    let part = part.ok_or(ScramError::Malformed("missing attribute"))?;
    let mut chars = part.chars();
    if chars.next() == Some(name) && chars.next() == Some('=') {
        Ok(&part[2..])
    } else {
        Err(ScramError::Malformed("unexpected attribute"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy server side, written from RFC 5802 independently of the client.
    fn server_exchange(
        verifier: &str,
        client_first: &[u8],
    ) -> (String, impl Fn(&[u8]) -> Result<String, ()>) {
        let (_, rest) = verifier.split_once('$').unwrap();
        let (iter_salt, keys) = rest.split_once('$').unwrap();
        let (iterations, salt) = iter_salt.split_once(':').unwrap();
        let (stored_key, server_key) = keys.split_once(':').unwrap();
        let stored_key = BASE64.decode(stored_key).unwrap();
        let server_key = BASE64.decode(server_key).unwrap();
        let client_first = std::str::from_utf8(client_first).unwrap();
        let bare = client_first.strip_prefix("n,,").unwrap().to_owned();
        let client_nonce = bare.split("r=").nth(1).unwrap().to_owned();
        let server_first = format!("r={client_nonce}SERVERNONCE,s={salt},i={iterations}");
        let sf = server_first.clone();
        let check = move |client_final: &[u8]| {
            let client_final = std::str::from_utf8(client_final).unwrap();
            let (without_proof, proof) = client_final.rsplit_once(",p=").unwrap();
            let auth = format!("{bare},{sf},{without_proof}");
            let signature = hmac(&stored_key, auth.as_bytes());
            let proof = BASE64.decode(proof).unwrap();
            let client_key: Vec<u8> = proof
                .iter()
                .zip(signature.iter())
                .map(|(a, b)| a ^ b)
                .collect();
            if Sha256::digest(&client_key).as_slice() != stored_key.as_slice() {
                return Err(());
            }
            Ok(format!(
                "v={}",
                BASE64.encode(hmac(&server_key, auth.as_bytes()))
            ))
        };
        (server_first, check)
    }

    #[test]
    fn exchange_succeeds_against_an_independent_server() {
        let secret = ScramSecret::generate();
        let mut client = ScramClient::new(&secret);
        let (server_first, check) = server_exchange(&secret.verifier(), &client.client_first());
        let client_final = client.client_final(server_first.as_bytes()).unwrap();
        let server_final = check(&client_final).expect("server accepts the proof");
        client.verify_server_final(server_final.as_bytes()).unwrap();
    }

    #[test]
    fn a_different_secret_is_refused_both_ways() {
        let secret = ScramSecret::generate();
        let other = ScramSecret::generate();
        let mut client = ScramClient::new(&secret);
        let (server_first, _) = server_exchange(&other.verifier(), &client.client_first());
        assert_eq!(
            client.client_final(server_first.as_bytes()),
            Err(ScramError::VerifierMismatch)
        );
    }

    #[test]
    fn a_forged_server_signature_is_refused() {
        let secret = ScramSecret::generate();
        let mut client = ScramClient::new(&secret);
        let (server_first, _) = server_exchange(&secret.verifier(), &client.client_first());
        client.client_final(server_first.as_bytes()).unwrap();
        let forged = format!("v={}", BASE64.encode([7u8; 32]));
        assert_eq!(
            client.verify_server_final(forged.as_bytes()),
            Err(ScramError::BadServerSignature)
        );
        assert_eq!(
            client.verify_server_final(b"e=invalid-proof"),
            Err(ScramError::ServerError("invalid-proof".into()))
        );
    }

    #[test]
    fn a_nonce_that_does_not_extend_ours_is_refused() {
        let secret = ScramSecret::generate();
        let mut client = ScramClient::with_nonce(ClientKeys::Secret(&secret), "abc".into());
        assert_eq!(
            client.client_final(b"r=xyzdef,s=AAAA,i=1"),
            Err(ScramError::NonceMismatch)
        );
        assert_eq!(
            client.client_final(b"r=abc,s=AAAA,i=1"),
            Err(ScramError::NonceMismatch)
        );
    }

    #[test]
    fn a_password_login_derives_the_keys_from_the_servers_salt() {
        let password = Password::new("correct horse battery staple".into());
        let verifier = ScramSecret::from_password(password.expose(), 4096).verifier();
        let mut client = ScramClient::with_password(&password);
        let (server_first, check) = server_exchange(&verifier, &client.client_first());
        let client_final = client.client_final(server_first.as_bytes()).unwrap();
        let server_final = check(&client_final).expect("the server accepts the proof");
        client.verify_server_final(server_final.as_bytes()).unwrap();

        let wrong = Password::new("wrong".into());
        let mut client = ScramClient::with_password(&wrong);
        let (server_first, check) = server_exchange(&verifier, &client.client_first());
        let client_final = client.client_final(server_first.as_bytes()).unwrap();
        assert!(check(&client_final).is_err(), "a wrong password is refused");
    }

    #[test]
    fn a_password_login_refuses_absurd_iteration_counts() {
        let password = Password::new("p".into());
        let mut client = ScramClient::with_nonce(
            ClientKeys::Password {
                password: &password,
                derived: None,
            },
            "abc".into(),
        );
        let salt = BASE64.encode([1u8; 16]);
        assert_eq!(
            client.client_final(format!("r=abcdef,s={salt},i=100000000").as_bytes()),
            Err(ScramError::Malformed("iteration count out of range"))
        );
    }

    // `from_password` is checked end to end in tests/it/leases.rs: libpq and
    // tokio-postgres, with their own PBKDF2, log in with the password.

    #[test]
    fn verifier_has_postgres_format_and_debug_is_redacted() {
        let secret = ScramSecret::generate();
        let verifier = secret.verifier();
        assert!(verifier.starts_with("SCRAM-SHA-256$1:"), "{verifier}");
        assert_eq!(verifier.matches('$').count(), 2);
        let debug = format!("{secret:?}");
        assert_eq!(debug, "ScramSecret(<redacted>)");
        assert!(!debug.contains(&BASE64.encode(secret.salted_password)));
    }
}
