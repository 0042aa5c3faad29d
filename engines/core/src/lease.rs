use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// A lease's identifier (a random UUID).
pub type LeaseId = uuid::Uuid;

/// One credential's life: who holds it, what it is, and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub id: LeaseId,
    /// The engine that minted it (`"postgres"`).
    pub engine: &'static str,
    pub template: String,
    /// The database role (or other principal) the credential logs in as.
    pub role: String,
    /// The SPIFFE ID the lease was issued to.
    pub identity: String,
    pub database: String,
    pub client_addr: Option<SocketAddr>,
    pub issued_at: OffsetDateTime,
    pub expires_at: OffsetDateTime,
}

impl Lease {
    /// The record written next to the credential in the database (for
    /// PostgreSQL: `COMMENT ON ROLE`), so the database itself says which
    /// credentials exist, whose they are and when they expire.
    pub fn comment(&self) -> LeaseComment {
        LeaseComment {
            ephemera_lease: 1,
            lease_id: self.id,
            identity: self.identity.clone(),
            template: self.template.clone(),
            database: self.database.clone(),
            issued_at: self.issued_at,
            expires_at: self.expires_at,
        }
    }
}

/// The JSON form of a lease kept in the database. `ephemera_lease` is a format
/// version, so a reader can tell our comments from anyone else's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseComment {
    pub ephemera_lease: u32,
    pub lease_id: LeaseId,
    pub identity: String,
    pub template: String,
    pub database: String,
    #[serde(with = "time::serde::rfc3339")]
    pub issued_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

impl LeaseComment {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a lease comment always serialises")
    }

    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comment_round_trips_through_json() {
        let issued_at = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        let lease = Lease {
            id: uuid::Uuid::new_v4(),
            engine: "postgres",
            template: "billing_rw".into(),
            role: "eph_billing_rw_abc".into(),
            identity: "spiffe://example.org/ns/prod/sa/billing".into(),
            database: "billing".into(),
            client_addr: None,
            issued_at,
            expires_at: issued_at + time::Duration::minutes(15),
        };
        let json = lease.comment().to_json();
        assert!(
            json.contains("\"expires_at\":\"2023-11-14T22:28:20Z\""),
            "{json}"
        );
        assert_eq!(LeaseComment::from_json(&json).unwrap(), lease.comment());
    }
}
