//! An issuer's signing keys (its JWKS): read from a file when the
//! configuration is loaded (and again on every reload, SIGHUP), or fetched
//! over HTTPS, cached, refetched when a token names a key id the cache does
//! not have (at most once per [`MIN_REFRESH_INTERVAL`]) or the cache is older
//! than [`MAX_AGE`], and served from the cache while the issuer is down.
//! A JWT-SVID issuer's keys can also be its trust domain's JWT bundle from
//! the SPIFFE Workload API, asked again on the same terms as a URL.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, PublicKeyUse};
use rustls::ClientConfig;

use super::fetch::{get_json, FetchError};
use super::types::TokenError;
use crate::identity::workload_api::fetch_jwt_bundle;

/// Unknown key ids refetch the JWKS at most this often.
pub const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(3);
/// A fetched JWKS is refetched when it is older than this.
pub const MAX_AGE: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Fetch(#[from] FetchError),
    #[error("not a JWKS (a JSON object with \"keys\")")]
    NotAJwks,
    #[error("the OIDC discovery document has no https jwks_uri")]
    NoJwksUri,
    #[error("it has no usable signing key (RSA, EC P-256/P-384 or Ed25519)")]
    NoUsableKey,
    #[error("{0}")]
    WorkloadApi(String),
}

/// Where an issuer's keys come from.
pub enum KeySource {
    /// Loaded from a file at configuration time.
    File { path: PathBuf, keys: Arc<Vec<Jwk>> },
    /// Fetched from a JWKS URL.
    Url { url: String, tls: Arc<ClientConfig> },
    /// OIDC discovery: `<issuer>/.well-known/openid-configuration`, then its `jwks_uri`.
    Discovery {
        issuer: String,
        tls: Arc<ClientConfig>,
    },
    /// The JWT bundle of a SPIFFE trust domain, from the Workload API that
    /// `[tls] workload_api` names (JWT-SVID issuers without a JWKS key).
    WorkloadApi {
        endpoint: String,
        trust_domain: String,
    },
}

/// How long one ask of the Workload API for JWT bundles may take.
const WORKLOAD_API_TIMEOUT: Duration = Duration::from_secs(5);

impl std::fmt::Debug for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::File { path, keys } => {
                write!(f, "File({}, {} keys)", path.display(), keys.len())
            }
            KeySource::Url { url, .. } => write!(f, "Url({url})"),
            KeySource::Discovery { issuer, .. } => write!(f, "Discovery({issuer})"),
            KeySource::WorkloadApi {
                endpoint,
                trust_domain,
            } => write!(f, "WorkloadApi({endpoint}, {trust_domain})"),
        }
    }
}

impl KeySource {
    /// Read a JWKS file now.
    pub fn file(path: &Path) -> Result<Self, JwksError> {
        let text = std::fs::read(path).map_err(|source| JwksError::Read {
            path: path.to_owned(),
            source,
        })?;
        let value = serde_json::from_slice(&text).map_err(|_| JwksError::NotAJwks)?;
        Ok(KeySource::File {
            path: path.to_owned(),
            keys: Arc::new(parse_jwks(&value)?),
        })
    }
}

/// The usable signing keys of a JWKS document. Keys of other kinds (HMAC
/// secrets, encryption keys, types we do not know) are left out.
pub fn parse_jwks(value: &serde_json::Value) -> Result<Vec<Jwk>, JwksError> {
    let keys = value
        .get("keys")
        .and_then(|k| k.as_array())
        .ok_or(JwksError::NotAJwks)?;
    let usable: Vec<Jwk> = keys
        .iter()
        .filter_map(|k| serde_json::from_value::<Jwk>(k.clone()).ok())
        .filter(|k| !matches!(k.algorithm, AlgorithmParameters::OctetKey(_)))
        .filter(|k| match &k.common.public_key_use {
            None | Some(PublicKeyUse::Signature) => true,
            // SPIFFE bundles mark JWT-SVID signing keys so.
            Some(PublicKeyUse::Other(other)) => other == "jwt-svid",
            Some(_) => false,
        })
        .collect();
    if usable.is_empty() {
        return Err(JwksError::NoUsableKey);
    }
    Ok(usable)
}

#[derive(Default)]
struct Cache {
    keys: Option<Arc<Vec<Jwk>>>,
    fetched_at: Option<Instant>,
    last_attempt: Option<Instant>,
}

/// An issuer's keys with their cache.
#[derive(Debug)]
pub struct Jwks {
    pub source: KeySource,
    cache: Mutex<Cache>,
    /// One fetch at a time; the others wait for its result.
    refreshing: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("keys", &self.keys.as_ref().map(|k| k.len()))
            .finish_non_exhaustive()
    }
}

impl Jwks {
    pub fn new(source: KeySource) -> Self {
        Jwks {
            source,
            cache: Mutex::new(Cache::default()),
            refreshing: tokio::sync::Mutex::new(()),
        }
    }

    fn cached(&self) -> (Option<Arc<Vec<Jwk>>>, bool, bool) {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = cache.fetched_at.is_some_and(|t| t.elapsed() < MAX_AGE);
        let may_retry = cache
            .last_attempt
            .is_none_or(|t| t.elapsed() >= MIN_REFRESH_INTERVAL);
        (cache.keys.clone(), fresh, may_retry)
    }

    /// The key for `kid` (or the only key, when the token names none).
    pub async fn key(&self, issuer: &str, kid: Option<&str>) -> Result<Jwk, TokenError> {
        if let KeySource::File { keys, .. } = &self.source {
            return select(keys, issuer, kid);
        }
        let (keys, fresh, may_retry) = self.cached();
        if let Some(keys) = &keys {
            let found = select(keys, issuer, kid);
            if fresh && !matches!(found, Err(TokenError::UnknownKey(_))) {
                return found;
            }
        }
        // Rate-limited: while the issuer is down, tokens are checked
        // against the keys cached before.
        if may_retry {
            self.refresh().await;
        }
        match self.cached().0 {
            Some(keys) => select(&keys, issuer, kid),
            None => Err(TokenError::KeysUnavailable {
                issuer: issuer.to_owned(),
                reason: "the key set could not be fetched (see Ephemera's log)".into(),
            }),
        }
    }

    async fn refresh(&self) {
        let started = Instant::now();
        let _one = self.refreshing.lock().await;
        {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            // Someone else fetched while we waited.
            if cache.last_attempt.is_some_and(|t| t >= started) {
                return;
            }
        }
        let result = self.fetch().await;
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.last_attempt = Some(Instant::now());
        match result {
            Ok(keys) => {
                cache.keys = Some(Arc::new(keys));
                cache.fetched_at = Some(Instant::now());
            }
            Err(error) => {
                tracing::warn!(source = ?self.source, %error, "could not fetch a token issuer's keys; using the cached ones, if any");
            }
        }
    }

    async fn fetch(&self) -> Result<Vec<Jwk>, JwksError> {
        let (jwks_uri, tls) = match &self.source {
            KeySource::File { keys, .. } => return Ok(keys.to_vec()),
            KeySource::WorkloadApi {
                endpoint,
                trust_domain,
            } => {
                let document = fetch_jwt_bundle(endpoint, trust_domain, WORKLOAD_API_TIMEOUT)
                    .await
                    .map_err(JwksError::WorkloadApi)?;
                return parse_jwks(&document);
            }
            KeySource::Url { url, tls } => (url.clone(), tls),
            KeySource::Discovery { issuer, tls } => {
                let discovery = format!(
                    "{}/.well-known/openid-configuration",
                    issuer.trim_end_matches('/')
                );
                let document = get_json(&discovery, tls.clone()).await?;
                let uri = document
                    .get("jwks_uri")
                    .and_then(|u| u.as_str())
                    .filter(|u| u.starts_with("https://"))
                    .ok_or(JwksError::NoJwksUri)?
                    .to_owned();
                (uri, tls)
            }
        };
        let document = get_json(&jwks_uri, tls.clone()).await?;
        parse_jwks(&document)
    }
}

fn select(keys: &[Jwk], issuer: &str, kid: Option<&str>) -> Result<Jwk, TokenError> {
    match kid {
        Some(kid) => keys
            .iter()
            .find(|k| k.common.key_id.as_deref() == Some(kid))
            .cloned()
            .ok_or_else(|| TokenError::UnknownKey(issuer.to_owned())),
        None => match keys {
            [only] => Ok(only.clone()),
            _ => Err(TokenError::NoKeyId(issuer.to_owned())),
        },
    }
}
