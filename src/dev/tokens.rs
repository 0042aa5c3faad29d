//! The dev issuer: at every start, `ephemera dev` makes a fresh P-256 key,
//! writes its public half as a JWKS (`tokens/jwks.json`, configured as the
//! `[[tokens.issuer]]` named `dev`) and signs one ready token with it, good
//! for [`TOKEN_LIFETIME`]. The private key lives only in memory: tokens of
//! an earlier run stop verifying when the JWKS is rewritten.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

use super::cluster::ClusterError;
use super::options::DevError;
use crate::identity::token::BearerToken;

/// The dev issuer's `iss` (never a real one: it is not fetched).
pub const DEV_ISSUER: &str = "https://issuer.ephemera.dev";
/// The audience of the dev token, as the dev configuration expects it.
pub const DEV_AUDIENCE: &str = "ephemera";
/// The dev token's `sub`: its identity is `dev:developer`.
pub const DEV_SUBJECT: &str = "developer";
/// How long the printed token is good for.
pub const TOKEN_LIFETIME: time::Duration = time::Duration::hours(1);

/// The JWKS on disk and a token signed for it.
pub struct DevIssuer {
    pub jwks: PathBuf,
    pub token: BearerToken,
}

impl std::fmt::Debug for DevIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevIssuer")
            .field("jwks", &self.jwks)
            .field("token", &self.token)
            .finish()
    }
}

/// Make the key, write the JWKS into `dir`, sign the token.
pub fn ensure(dir: &Path) -> Result<DevIssuer, DevError> {
    std::fs::create_dir_all(dir).map_err(|source| ClusterError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let failed = |what: &str, e: &dyn std::fmt::Display| DevError::Setup(format!("{what}: {e}"));
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| failed("cannot make the dev issuer's key", &e))?;
    let kid = format!(
        "dev-{}",
        time::OffsetDateTime::now_utc().unix_timestamp_nanos()
    );
    let raw = pair.public_key_raw();
    let (x, y) = raw
        .get(1..33)
        .zip(raw.get(33..65))
        .ok_or_else(|| DevError::Setup("unexpected P-256 public key length".into()))?;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let jwks = serde_json::json!({"keys": [{
        "kty": "EC", "crv": "P-256", "x": b64(x), "y": b64(y),
        "kid": kid, "alg": "ES256", "use": "sig"
    }]});
    let path = dir.join("jwks.json");
    std::fs::write(&path, jwks.to_string()).map_err(|source| ClusterError::Io {
        path: path.clone(),
        source,
    })?;

    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let claims = serde_json::json!({
        "iss": DEV_ISSUER, "aud": DEV_AUDIENCE, "sub": DEV_SUBJECT,
        "iat": now, "nbf": now, "exp": now + TOKEN_LIFETIME.whole_seconds(),
    });
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(kid);
    let key = EncodingKey::from_ec_der(&pair.serialize_der());
    let token = jsonwebtoken::encode(&header, &claims, &key)
        .map_err(|e| failed("cannot sign the dev token", &e))?;
    let token = BearerToken::new(token).map_err(|e| failed("the dev token", &e))?;
    Ok(DevIssuer { jwks: path, token })
}
