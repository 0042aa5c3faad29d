//! One `[[tokens.issuer]]`: which tokens are its, and the checks JOSE (RFC
//! 7515/7519) and OIDC ask for, done by `jsonwebtoken` with the key and
//! algorithm chosen here.

use base64::Engine as _;
use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};
use sha2::Digest;

use super::jwks::{Jwks, KeySource};
use super::types::{TokenError, VerifiedToken, LEEWAY_SECONDS, MAX_TOKEN_BYTES};
use crate::identity::spiffe_id::SpiffeId;

/// The algorithms a token may be signed with: asymmetric only.
const ALLOWED: [Algorithm; 7] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];
const ALLOWED_NAMES: [&str; 7] = [
    "RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA",
];

/// An issuer as configured.
#[derive(Debug)]
pub struct IssuerConfig {
    pub name: String,
    /// The `iss` its tokens carry (optional for JWT-SVIDs).
    pub issuer: Option<String>,
    pub audience: String,
    pub bind_to_expiry: bool,
    pub single_use: bool,
    pub spiffe_trust_domain: Option<String>,
}

#[derive(Debug)]
pub struct Issuer {
    config: IssuerConfig,
    jwks: Jwks,
}

/// What a token says before it is verified: only used to pick the issuer.
pub struct Unverified {
    alg: Algorithm,
    kid: Option<String>,
    iss: Option<String>,
    sub: Option<String>,
}

fn b64_json(part: &str) -> Result<serde_json::Map<String, serde_json::Value>, TokenError> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .map_err(|_| TokenError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed)
}

impl Unverified {
    pub fn parse(token: &str) -> Result<Self, TokenError> {
        if token.is_empty() {
            return Err(TokenError::Missing);
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLarge);
        }
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(_sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let header = b64_json(header)?;
        let alg_name = header.get("alg").and_then(|a| a.as_str()).unwrap_or("none");
        let Some(i) = ALLOWED_NAMES.iter().position(|n| *n == alg_name) else {
            return Err(TokenError::AlgorithmNotAllowed);
        };
        if header.contains_key("crit") {
            // No critical extension is understood here (RFC 7515 §4.1.11).
            return Err(TokenError::Malformed);
        }
        let payload = b64_json(payload)?;
        let text = |key: &str| payload.get(key).and_then(|v| v.as_str()).map(str::to_owned);
        Ok(Unverified {
            alg: ALLOWED[i],
            kid: header
                .get("kid")
                .and_then(|k| k.as_str())
                .map(str::to_owned),
            iss: text("iss"),
            sub: text("sub"),
        })
    }
}

impl Issuer {
    pub fn new(config: IssuerConfig, keys: KeySource) -> Self {
        Issuer {
            config,
            jwks: Jwks::new(keys),
        }
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn config(&self) -> &IssuerConfig {
        &self.config
    }

    /// Is `token` (unverified) from this issuer? By `iss`, or for a
    /// JWT-SVID issuer without `issuer`, by the trust domain of `sub`.
    pub(super) fn claims_token(&self, token: &Unverified) -> bool {
        match (&self.config.issuer, &self.config.spiffe_trust_domain) {
            (Some(iss), _) => token.iss.as_deref() == Some(iss.as_str()),
            (None, Some(domain)) => token
                .sub
                .as_deref()
                .and_then(|s| SpiffeId::parse(s).ok())
                .is_some_and(|id| id.trust_domain() == domain),
            (None, None) => false,
        }
    }

    pub(super) async fn verify(
        &self,
        token: &str,
        unverified: &Unverified,
    ) -> Result<VerifiedToken, TokenError> {
        let name = &self.config.name;
        let jwk = self.jwks.key(name, unverified.kid.as_deref()).await?;
        if let Some(alg) = jwk.common.key_algorithm {
            if alg.to_string() != format!("{:?}", unverified.alg) {
                return Err(TokenError::BadSignature(name.clone()));
            }
        }
        let key =
            DecodingKey::from_jwk(&jwk).map_err(|_| TokenError::BadSignature(name.clone()))?;
        let mut validation = Validation::new(unverified.alg);
        validation.leeway = LEEWAY_SECONDS;
        validation.validate_nbf = true;
        validation.set_audience(&[&self.config.audience]);
        let mut required = vec!["exp", "aud", "sub"];
        if let Some(iss) = &self.config.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        let data = decode::<serde_json::Map<String, serde_json::Value>>(token, &key, &validation)
            .map_err(|e| self.refusal(e))?;
        let claims = data.claims;
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        if let Some(iat) = claims.get("iat").and_then(|v| v.as_i64()) {
            if iat > now + LEEWAY_SECONDS as i64 {
                return Err(TokenError::IssuedInFuture);
            }
        }
        let exp = claims
            .get("exp")
            .and_then(|v| v.as_i64())
            .ok_or_else(|| TokenError::MissingClaim("exp".into()))?;
        let expires_at =
            time::OffsetDateTime::from_unix_timestamp(exp).map_err(|_| TokenError::Malformed)?;
        let sub = claims
            .get("sub")
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| TokenError::MissingClaim("sub".into()))?;
        let identity = match &self.config.spiffe_trust_domain {
            Some(domain) => match SpiffeId::parse(sub) {
                Ok(id) if id.trust_domain() == domain => id.to_string(),
                _ => return Err(TokenError::BadSpiffeSubject(domain.clone())),
            },
            None => format!("{name}:{sub}"),
        };
        let single_use_key = self.config.single_use.then(|| {
            match claims
                .get("jti")
                .and_then(|v| v.as_str())
                .filter(|j| !j.is_empty())
            {
                Some(jti) => format!("{name}:jti:{jti}"),
                None => format!(
                    "{name}:sha256:{}",
                    hex(&sha2::Sha256::digest(token.as_bytes()))
                ),
            }
        });
        Ok(VerifiedToken {
            issuer: name.clone(),
            identity,
            claims,
            expires_at,
            bind_to_expiry: self.config.bind_to_expiry,
            single_use_key,
        })
    }

    fn refusal(&self, error: jsonwebtoken::errors::Error) -> TokenError {
        use jsonwebtoken::errors::ErrorKind;
        let name = self.config.name.clone();
        match error.into_kind() {
            ErrorKind::InvalidSignature
            | ErrorKind::InvalidEcdsaKey
            | ErrorKind::InvalidRsaKey(_)
            | ErrorKind::InvalidKeyFormat
            | ErrorKind::Crypto(_) => TokenError::BadSignature(name),
            ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => {
                TokenError::AlgorithmNotAllowed
            }
            ErrorKind::ExpiredSignature => TokenError::Expired,
            ErrorKind::ImmatureSignature => TokenError::NotYetValid,
            ErrorKind::InvalidAudience => TokenError::WrongAudience(self.config.audience.clone()),
            ErrorKind::InvalidIssuer => {
                TokenError::WrongIssuer(self.config.issuer.clone().unwrap_or_default())
            }
            ErrorKind::MissingRequiredClaim(claim) => TokenError::MissingClaim(claim),
            _ => TokenError::Malformed,
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
