//! Who a session or lease is for: an X.509-SVID's SPIFFE ID, or a verified
//! token's identity.

use std::fmt;

use super::spiffe_id::SpiffeId;
use super::token::VerifiedToken;

#[derive(Debug, Clone, PartialEq)]
pub enum Principal {
    /// A client certificate (X.509-SVID).
    Svid(SpiffeId),
    /// A token: its SPIFFE ID (JWT-SVIDs) or `<issuer>:<sub>`.
    Token(Box<VerifiedToken>),
}

impl Principal {
    /// The identity string audit, leases and metrics show.
    pub fn as_str(&self) -> &str {
        match self {
            Principal::Svid(id) => id.as_str(),
            Principal::Token(token) => &token.identity,
        }
    }

    /// The SPIFFE ID, for SVIDs and JWT-SVIDs.
    pub fn spiffe_id(&self) -> Option<SpiffeId> {
        match self {
            Principal::Svid(id) => Some(id.clone()),
            Principal::Token(token) => SpiffeId::parse(&token.identity).ok(),
        }
    }

    pub fn token(&self) -> Option<&VerifiedToken> {
        match self {
            Principal::Svid(_) => None,
            Principal::Token(token) => Some(token),
        }
    }
}

impl From<SpiffeId> for Principal {
    fn from(id: SpiffeId) -> Self {
        Principal::Svid(id)
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
