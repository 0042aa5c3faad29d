//! Identity tokens at the door: OIDC ID tokens, Kubernetes service-account
//! tokens and JWT-SVIDs, sent as the password inside TLS.
//!
//! | file | what |
//! | --- | --- |
//! | `mod.rs` | the set of issuers |
//! | `types.rs` | the token as a secret, its errors, the verified result |
//! | `issuer.rs` | one `[[tokens.issuer]]`: which token is its, and the JOSE/OIDC checks |
//! | `jwks.rs` | the issuer's keys: from a file, or fetched (over HTTPS, or a JWT bundle from the SPIFFE Workload API) and cached |
//! | `fetch.rs` | the HTTPS GET (hyper over tokio-rustls) for JWKS and OIDC discovery |
//! | `claims.rs` | matching a token's claims against a policy's `claims` table |
//!
//! Verification is `jsonwebtoken`'s; this module only chooses the key and
//! the algorithm (never `none`, never HMAC) and says why a token is refused.

mod claims;
mod fetch;
mod issuer;
mod jwks;
mod types;

use std::sync::Arc;

pub use self::claims::{ClaimsError, ClaimsPattern};
pub use self::issuer::{Issuer, IssuerConfig};
pub use self::jwks::JwksError;
pub use self::jwks::KeySource;
pub use self::types::{BearerToken, TokenError, VerifiedToken, LEEWAY_SECONDS, MAX_TOKEN_BYTES};

/// The configured issuers (`[[tokens.issuer]]`), in order.
#[derive(Debug, Default)]
pub struct TokenIssuers {
    issuers: Vec<Arc<Issuer>>,
}

impl TokenIssuers {
    pub fn new(issuers: Vec<Issuer>) -> Self {
        TokenIssuers {
            issuers: issuers.into_iter().map(Arc::new).collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.issuers.is_empty()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.issuers.iter().map(|i| i.name())
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Issuer>> {
        self.issuers.iter().find(|i| i.name() == name)
    }

    /// Verify `token` against the issuer it claims to be from.
    pub async fn verify(&self, token: &BearerToken) -> Result<VerifiedToken, TokenError> {
        let unverified = issuer::Unverified::parse(token.expose())?;
        let issuer = self
            .issuers
            .iter()
            .find(|i| i.claims_token(&unverified))
            .ok_or(TokenError::UnknownIssuer)?;
        issuer.verify(token.expose(), &unverified).await
    }
}
