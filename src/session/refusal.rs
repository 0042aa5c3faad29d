//! Refusals: every way a client can be turned away, with the SQLSTATE and a
//! message (and hint) that says what to do about it.

use std::collections::BTreeSet;

use bytes::BytesMut;
use ephemera_engine::EngineError;

use crate::identity::token::TokenError;
use crate::identity::IdentityError;
use crate::session::protocol::{fatal, sqlstate, ProtocolError};
use crate::session::upstream::UpstreamError;

const CONNECT_HINT: &str = "Connect with TLS and your X.509-SVID as the client certificate, e.g. \
     \"sslmode=verify-full sslrootcert=<ephemera CA> sslcert=<svid.pem> sslkey=<svid-key.pem>\" \
     (or, where token issuers are configured, your identity token as the password).";

#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("Ephemera accepts only TLS connections with a client certificate")]
    TlsRequired,
    #[error("GSSAPI encryption is not supported by Ephemera; use TLS")]
    GssEncryption,
    #[error("direct TLS connections must negotiate the \"postgresql\" ALPN protocol")]
    DirectTlsWithoutAlpn,
    #[error("{0}")]
    Identity(IdentityError),
    #[error("{0}")]
    Token(TokenError),
    #[error("{0}")]
    Protocol(ProtocolError),
    #[error("no role template requested for identity {identity}")]
    NoTemplate {
        identity: String,
        allowed: BTreeSet<String>,
    },
    #[error("there is no role template named {template:?} (identity {identity})")]
    UnknownTemplate {
        identity: String,
        template: String,
        allowed: BTreeSet<String>,
    },
    #[error("identity {identity} may not use role template {template:?}")]
    Denied {
        identity: String,
        template: String,
        allowed: BTreeSet<String>,
    },
    #[error("role template {template:?} is for database {expected:?}, not {requested:?}")]
    WrongDatabase {
        template: String,
        expected: String,
        requested: String,
    },
    #[error("replication connections are not supported through Ephemera")]
    Replication,
    #[error("could not create a role for this session on the upstream PostgreSQL at {upstream}: {source}")]
    Mint {
        upstream: String,
        source: EngineError,
    },
    #[error("{0}")]
    Upstream(UpstreamError),
    #[error("too many connections: Ephemera relays at most {limit} sessions at once (listen.max_connections)")]
    TooManyConnections { limit: usize },
    #[error("all {size} backends of this identity's pool for template {template:?} are busy, and none came free within {wait} (pool_size, pool_wait)")]
    PoolExhausted {
        template: String,
        size: u32,
        wait: String,
    },
    #[error("identity {identity} is creating sessions too fast: at most {burst} at once and {rate} per second (lease.issue_rate_per_identity)")]
    RateLimited {
        identity: String,
        rate: f64,
        burst: u32,
    },
}

impl Refusal {
    /// The SQLSTATE the client gets. Where the database itself refused
    /// for lack of resources (class 53, e.g. `53300` too many connections),
    /// its own code is passed on, so clients back off as they would from
    /// PostgreSQL.
    pub fn sqlstate(&self) -> &str {
        use sqlstate::*;
        if let Refusal::Mint { source, .. } = self {
            if let Some(code) = source.sqlstate().filter(|c| c.class() == "53") {
                return code.code();
            }
        }
        match self {
            Refusal::TlsRequired
            | Refusal::GssEncryption
            | Refusal::Identity(_)
            | Refusal::Token(_)
            | Refusal::NoTemplate { .. }
            | Refusal::UnknownTemplate { .. }
            | Refusal::Denied { .. }
            | Refusal::WrongDatabase { .. } => INVALID_AUTHORIZATION,
            Refusal::DirectTlsWithoutAlpn => PROTOCOL_VIOLATION,
            Refusal::Protocol(ProtocolError::UnsupportedVersion(..)) => FEATURE_NOT_SUPPORTED,
            Refusal::Protocol(_) => PROTOCOL_VIOLATION,
            Refusal::Replication => FEATURE_NOT_SUPPORTED,
            Refusal::Mint {
                source: EngineError::Unavailable { .. },
                ..
            } => CONNECTION_FAILURE,
            Refusal::Mint { .. } => REJECTED_CONNECTION,
            Refusal::Upstream(UpstreamError::Refused { .. }) => REJECTED_CONNECTION,
            Refusal::Upstream(_) => CONNECTION_FAILURE,
            Refusal::TooManyConnections { .. }
            | Refusal::RateLimited { .. }
            | Refusal::PoolExhausted { .. } => TOO_MANY_CONNECTIONS,
        }
    }

    /// A short, stable name for metrics labels.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::TlsRequired => "tls_required",
            Refusal::GssEncryption => "gssenc",
            Refusal::DirectTlsWithoutAlpn => "no_alpn",
            Refusal::Identity(_) => "identity",
            Refusal::Token(_) => "token",
            Refusal::Protocol(_) => "protocol",
            Refusal::NoTemplate { .. } => "no_template",
            Refusal::UnknownTemplate { .. } => "unknown_template",
            Refusal::Denied { .. } => "policy",
            Refusal::WrongDatabase { .. } => "wrong_database",
            Refusal::Replication => "replication",
            Refusal::Mint { .. } => "mint_failed",
            Refusal::Upstream(_) => "upstream",
            Refusal::TooManyConnections { .. } => "too_many_connections",
            Refusal::PoolExhausted { .. } => "pool_exhausted",
            Refusal::RateLimited { .. } => "rate_limited",
        }
    }

    pub fn hint(&self) -> Option<String> {
        match self {
            Refusal::TlsRequired
            | Refusal::GssEncryption
            | Refusal::Identity(IdentityError::NoCertificate) => Some(CONNECT_HINT.to_owned()),
            Refusal::Identity(_) => Some(
                "Use a current X.509-SVID issued by a trust domain Ephemera accepts (sslcert/sslkey)."
                    .to_owned(),
            ),
            Refusal::Token(TokenError::Replayed(_)) => Some(
                "Fetch a fresh token: this issuer's tokens open one session each.".to_owned(),
            ),
            Refusal::Token(_) => Some(
                "Send a current identity token of an issuer Ephemera accepts, minted for its audience, as the password."
                    .to_owned(),
            ),
            Refusal::NoTemplate { allowed, .. }
            | Refusal::UnknownTemplate { allowed, .. }
            | Refusal::Denied { allowed, .. } => Some(alternatives(allowed)),
            Refusal::WrongDatabase { expected, .. } => Some(format!("Connect with dbname={expected}.")),
            Refusal::Mint { .. } | Refusal::Upstream(_) => Some(
                "This is not caused by your connection settings; retry later or ask the Ephemera operator to check its log."
                    .to_owned(),
            ),
            Refusal::PoolExhausted { .. } => Some(
                "Close idle connections of this identity, or ask the DBA for a larger pool_size.".to_owned(),
            ),
            Refusal::TooManyConnections { .. } | Refusal::RateLimited { .. } => {
                Some("Retry in a moment; reuse connections (a pool) instead of opening one per request.".to_owned())
            }
            _ => None,
        }
    }

    /// The `ErrorResponse` to send. An upstream's own refusal is passed on as is.
    pub fn to_message(&self) -> BytesMut {
        if let Refusal::Upstream(UpstreamError::Refused { raw, .. }) = self {
            return raw.clone();
        }
        fatal(self.sqlstate(), &self.to_string(), self.hint().as_deref())
    }
}

fn alternatives(allowed: &BTreeSet<String>) -> String {
    if allowed.is_empty() {
        "This identity may use no role template; ask your DBA to add a [[policy]] rule for it."
            .to_owned()
    } else {
        let list: Vec<&str> = allowed.iter().map(String::as_str).collect();
        format!("Set user=<template> to one of: {}.", list.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ephemera_engine::SqlState;

    fn mint(code: &str) -> Refusal {
        Refusal::Mint {
            upstream: "db:5432".into(),
            source: EngineError::refused("create a role", SqlState::new(code), "refused"),
        }
    }

    #[test]
    fn the_databases_own_sqlstate_reaches_the_client_when_it_is_about_resources() {
        assert_eq!(mint("53300").sqlstate(), "53300");
        assert_eq!(mint("53200").sqlstate(), "53200");
        assert_eq!(mint("42501").sqlstate(), sqlstate::REJECTED_CONNECTION);
        let unavailable = Refusal::Mint {
            upstream: "db:5432".into(),
            source: EngineError::Unavailable {
                action: "create a role",
                source: "connection refused".into(),
            },
        };
        assert_eq!(unavailable.sqlstate(), sqlstate::CONNECTION_FAILURE);
    }
}
