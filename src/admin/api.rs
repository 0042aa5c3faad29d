//! The admin API's JSON shapes, shared by the server ([`super`]) and the
//! client (`crate::admin::client`, used by the CLI). Documented in
//! `docs/admin-api.yaml` (OpenAPI 3).
//!
//! | method | path | body | answer |
//! | --- | --- | --- | --- |
//! | GET | /healthz | | [`Health`] (any verified SVID) |
//! | GET | /metrics | | Prometheus text (admin) |
//! | GET | /v1/leases?identity=&template=&state= | | [`LeaseList`] (admin) |
//! | GET | /v1/leases/{id} | | [`LeaseView`] (admin) |
//! | POST | /v1/leases/{id}/renew | [`RenewRequest`] (optional) | [`LeaseView`] (admin) |
//! | POST | /v1/leases/{id}/revoke | | [`LeaseView`] (admin) |
//! | POST | /v1/revoke | [`RevokeRequest`] | [`RevokeResponse`] (admin) |
//! | POST | /v1/creds/{template} | | [`Credentials`] (any SVID the policy allows the template) |
//!
//! Errors are [`ApiError`] with 400, 403, 404, 409, 413 (body too large),
//! 429 or 503.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use ephemera_engine::LeaseId;

use crate::leases::view::RevokeSelector;
/// A lease and the `GET /v1/leases` query are the lease manager's own
/// types, served as they are.
pub use crate::leases::view::{LeaseFilter, LeaseView};
use crate::leases::LeaseError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseList {
    pub leases: Vec<LeaseView>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewRequest {
    /// The new TTL from now (e.g. `"10m"`); default: the template's `ttl`.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub ttl: Option<Duration>,
}

/// Exactly one of the three selects the leases to revoke.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
}

impl RevokeRequest {
    /// The lease manager's selector for this body, or
    /// [`LeaseError::BadSelector`] unless exactly one field is given.
    pub fn selector(&self) -> Result<RevokeSelector, LeaseError> {
        RevokeSelector::exactly_one(
            self.identity.as_deref(),
            self.identity_prefix.as_deref(),
            self.template.as_deref(),
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokeResponse {
    pub revoked: usize,
}

/// A standalone lease's credentials. `password` is the only place a
/// password ever leaves Ephemera; `Debug` redacts it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    pub lease_id: LeaseId,
    pub username: String,
    pub password: String,
    pub host: String,
    pub port: u16,
    pub database: String,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("lease_id", &self.lease_id)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("database", &self.database)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}
