//! The token as a secret, why one is refused, and what a verified one says.

use std::fmt;

/// The largest token accepted, checked before anything is parsed.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Clock skew tolerated for `exp`, `nbf` and `iat`.
pub const LEEWAY_SECONDS: u64 = 30;

/// A bearer token as a client sent it. It is a credential: `Debug` shows
/// only its length, and it is never logged.
#[derive(Clone)]
pub struct BearerToken(String);

impl BearerToken {
    /// Refused if it is longer than [`MAX_TOKEN_BYTES`] (nothing is parsed).
    pub fn new(token: String) -> Result<Self, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLarge);
        }
        Ok(BearerToken(token.trim().to_owned()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BearerToken(<{} bytes, redacted>)", self.0.len())
    }
}

/// Why a token is refused. The messages go to the client: they name the
/// reason and never echo the token or its claims.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("no token was sent; send your identity token as the password")]
    Missing,
    #[error("the token is larger than {MAX_TOKEN_BYTES} bytes")]
    TooLarge,
    #[error("the password is not a JSON Web Token")]
    Malformed,
    #[error("the token's algorithm is not accepted (only RS256/384/512, PS256, ES256/384 and EdDSA; never none or HMAC)")]
    AlgorithmNotAllowed,
    #[error("the token's issuer is not one Ephemera accepts (tokens.issuer)")]
    UnknownIssuer,
    #[error("the token's key id (kid) is not in the issuer {0:?}'s key set")]
    UnknownKey(String),
    #[error("the token has no key id (kid) and the issuer {0:?} has more than one key")]
    NoKeyId(String),
    #[error("the token's signature does not verify against the issuer {0:?}'s keys")]
    BadSignature(String),
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    #[error("the token was issued in the future (iat)")]
    IssuedInFuture,
    #[error("the token's audience (aud) does not include {0:?}")]
    WrongAudience(String),
    #[error("the token's issuer (iss) is not {0:?}")]
    WrongIssuer(String),
    #[error("the token lacks the {0:?} claim")]
    MissingClaim(String),
    #[error("the token's subject is not a SPIFFE ID of trust domain {0:?}")]
    BadSpiffeSubject(String),
    #[error("the keys of issuer {issuer:?} are not available: {reason}")]
    KeysUnavailable { issuer: String, reason: String },
    #[error("this token has already been used (issuer {0:?} is single_use)")]
    Replayed(String),
}

/// A token that verified: who it names, and what it says.
#[derive(Clone, PartialEq)]
pub struct VerifiedToken {
    /// The `[[tokens.issuer]]` name.
    pub issuer: String,
    /// The SPIFFE ID (JWT-SVIDs) or `<issuer name>:<sub>`.
    pub identity: String,
    /// Every claim, verified.
    pub claims: serde_json::Map<String, serde_json::Value>,
    pub expires_at: time::OffsetDateTime,
    /// Cap the lease at `expires_at` (the issuer's `bind_to_expiry`).
    pub bind_to_expiry: bool,
    /// Set when the issuer is `single_use`: `<issuer>:jti:<jti>` or
    /// `<issuer>:sha256:<hash of the token>`.
    pub single_use_key: Option<String>,
}

impl fmt::Debug for VerifiedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifiedToken")
            .field("issuer", &self.issuer)
            .field("identity", &self.identity)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}
