//! SPIFFE IDs: `spiffe://<trust domain>/<path>`, parsed and checked.

use std::fmt;

/// The longest SPIFFE ID accepted (the SPIFFE spec's limit for URIs).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;

/// A syntactically valid SPIFFE ID: `spiffe://<trust-domain>/<path>`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    uri: String,
    /// Byte offset where the path starts (== uri.len() if there is none).
    path_start: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("a SPIFFE ID must start with \"spiffe://\"")]
    WrongScheme,
    #[error("a SPIFFE ID can be at most {MAX_SPIFFE_ID_LEN} bytes")]
    TooLong,
    #[error("the trust domain is empty")]
    EmptyTrustDomain,
    #[error("the trust domain may contain only lower-case letters, digits, '.', '-' and '_' (no port, user info or upper case)")]
    BadTrustDomain,
    #[error("path segments may contain only letters, digits, '.', '-' and '_' (no percent-encoding, query or fragment)")]
    BadPathCharacter,
    #[error("the path has an empty segment (\"//\" or a trailing \"/\")")]
    EmptySegment,
    #[error("the path has a \".\" or \"..\" segment")]
    DotSegment,
}

impl SpiffeId {
    /// Parse and validate per the SPIFFE ID specification.
    pub fn parse(uri: &str) -> Result<Self, SpiffeIdError> {
        parse_spiffe_uri(uri, false)?;
        let rest = &uri["spiffe://".len()..];
        let path_start = "spiffe://".len() + rest.find('/').unwrap_or(rest.len());
        Ok(SpiffeId {
            uri: uri.to_owned(),
            path_start,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.uri
    }

    pub fn trust_domain(&self) -> &str {
        &self.uri["spiffe://".len()..self.path_start]
    }

    /// The path's segments (none for the trust domain's own ID).
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.uri[self.path_start..].split('/').skip(1)
    }
}

/// Shared by [`SpiffeId::parse`] and the policy's patterns: with
/// `allow_wildcards`, the segments `*` and `**` are accepted too (their
/// placement is the policy's business).
pub(crate) fn parse_spiffe_uri(uri: &str, allow_wildcards: bool) -> Result<(), SpiffeIdError> {
    let rest = uri
        .strip_prefix("spiffe://")
        .ok_or(SpiffeIdError::WrongScheme)?;
    if uri.len() > MAX_SPIFFE_ID_LEN {
        return Err(SpiffeIdError::TooLong);
    }
    let (trust_domain, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if trust_domain.is_empty() {
        return Err(SpiffeIdError::EmptyTrustDomain);
    }
    if !trust_domain
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err(SpiffeIdError::BadTrustDomain);
    }
    if path.is_empty() {
        return Ok(());
    }
    for segment in path[1..].split('/') {
        match segment {
            "" => return Err(SpiffeIdError::EmptySegment),
            "." | ".." => return Err(SpiffeIdError::DotSegment),
            "*" | "**" if allow_wildcards => {}
            _ if segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')) => {}
            _ => return Err(SpiffeIdError::BadPathCharacter),
        }
    }
    Ok(())
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.uri, f)
    }
}
