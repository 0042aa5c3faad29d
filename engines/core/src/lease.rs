use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// `at + duration`, or `None` if that is not a representable time (past
/// the year 9999) or the duration does not fit `time::Duration`. Every lease
/// time computed from a configured or client-supplied duration goes through
/// this, never through `+` (which panics on overflow).
pub fn checked_add(at: OffsetDateTime, duration: std::time::Duration) -> Option<OffsetDateTime> {
    at.checked_add(time::Duration::try_from(duration).ok()?)
}

/// `at - duration`, or `None` if out of range (see [`checked_add`]).
pub fn checked_sub(at: OffsetDateTime, duration: std::time::Duration) -> Option<OffsetDateTime> {
    at.checked_sub(time::Duration::try_from(duration).ok()?)
}

/// A lease's identifier (a random UUID).
pub type LeaseId = uuid::Uuid;

/// How a lease is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaseKind {
    /// Created for one proxied session; renewed while it lives, ended with it.
    Session,
    /// Issued through the admin API to a client that logs in directly with a
    /// password (batch jobs, BI tools); ends at expiry or revocation.
    Standalone,
}

/// Where a lease is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaseState {
    Active,
    Revoked,
    Expired,
}

/// One credential's life: who holds it, what it is, and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub id: LeaseId,
    /// The engine that minted it (`"postgres"`).
    pub engine: &'static str,
    pub kind: LeaseKind,
    pub template: String,
    /// The database role (or other principal) the credential logs in as.
    pub role: String,
    /// The SPIFFE ID (or token identity) the lease was issued to: for an
    /// agent acting for a person, the agent (the actor).
    pub identity: String,
    /// The person an agent acts for (`on_behalf_of`): the identity of the
    /// token it presented, e.g. `corp:alice`. `None` for everyone else.
    pub subject: Option<String>,
    pub database: String,
    pub client_addr: Option<SocketAddr>,
    pub issued_at: OffsetDateTime,
    /// Renewal moves this forward, never past `max_expires_at`.
    pub expires_at: OffsetDateTime,
    pub max_expires_at: OffsetDateTime,
}

impl Lease {
    /// The record written next to the credential in the database (for
    /// PostgreSQL: `COMMENT ON ROLE`), so the database itself says which
    /// credentials exist, whose they are and when they expire.
    ///
    /// Every role that can connect can read it (`shobj_description`), so it
    /// carries only what the reaper and revoke-by-identity across replicas
    /// need: not the client's address (SECURITY.md, finding 11).
    pub fn comment(&self) -> LeaseComment {
        LeaseComment {
            ephemera_lease: 1,
            lease_id: self.id,
            kind: self.kind,
            identity: self.identity.clone(),
            subject: self.subject.clone(),
            template: self.template.clone(),
            database: self.database.clone(),
            client_addr: None,
            issued_at: self.issued_at,
            expires_at: self.expires_at,
            max_expires_at: self.max_expires_at,
        }
    }

    /// Rebuild a lease from the comment on `role` (the ledger's record).
    pub fn from_comment(engine: &'static str, role: String, comment: LeaseComment) -> Lease {
        Lease {
            id: comment.lease_id,
            engine,
            kind: comment.kind,
            template: comment.template,
            role,
            identity: comment.identity,
            subject: comment.subject,
            database: comment.database,
            client_addr: comment.client_addr,
            issued_at: comment.issued_at,
            expires_at: comment.expires_at,
            max_expires_at: comment.max_expires_at,
        }
    }
}

/// The JSON form of a lease kept in the database. `ephemera_lease` is a format
/// version, so a reader can tell our comments from anyone else's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseComment {
    pub ephemera_lease: u32,
    pub lease_id: LeaseId,
    pub kind: LeaseKind,
    pub identity: String,
    /// The person an agent acts for; absent in comments of other leases
    /// and of versions before issue 15.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    pub template: String,
    pub database: String,
    /// Written by versions before the review (issue 12); read, never
    /// written.
    #[serde(default, skip_serializing)]
    pub client_addr: Option<SocketAddr>,
    #[serde(with = "time::serde::rfc3339")]
    pub issued_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub max_expires_at: OffsetDateTime,
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
    fn checked_time_arithmetic_reports_overflow_instead_of_panicking() {
        let now = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        let minute = std::time::Duration::from_secs(60);
        assert_eq!(checked_add(now, minute), Some(now + minute));
        assert_eq!(checked_sub(now, minute), Some(now - minute));
        let ages = std::time::Duration::from_secs(100_000 * 31_557_600);
        assert_eq!(checked_add(now, ages), None);
        assert_eq!(checked_sub(now, ages), None);
        assert_eq!(checked_add(now, std::time::Duration::MAX), None);
    }

    #[test]
    fn comment_round_trips_through_json() {
        let issued_at = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        let lease = Lease {
            id: uuid::Uuid::new_v4(),
            engine: "postgres",
            kind: LeaseKind::Session,
            template: "billing_rw".into(),
            role: "eph_billing_rw_abc".into(),
            identity: "spiffe://example.org/ns/prod/sa/billing".into(),
            subject: Some("corp:alice".into()),
            database: "billing".into(),
            client_addr: None,
            issued_at,
            expires_at: issued_at + time::Duration::minutes(15),
            max_expires_at: issued_at + time::Duration::hours(1),
        };
        let json = lease.comment().to_json();
        assert!(
            json.contains("\"expires_at\":\"2023-11-14T22:28:20Z\""),
            "{json}"
        );
        assert_eq!(LeaseComment::from_json(&json).unwrap(), lease.comment());
        let back = Lease::from_comment("postgres", lease.role.clone(), lease.comment());
        assert_eq!(back, lease);
    }

    #[test]
    fn the_comment_never_carries_the_client_address_but_old_ones_still_read() {
        let issued_at = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        let lease = Lease {
            id: uuid::Uuid::new_v4(),
            engine: "postgres",
            kind: LeaseKind::Standalone,
            template: "t".into(),
            role: "eph_t_x".into(),
            identity: "spiffe://example.org/a".into(),
            subject: None,
            database: "db".into(),
            client_addr: Some("192.0.2.7:5432".parse().unwrap()),
            issued_at,
            expires_at: issued_at,
            max_expires_at: issued_at,
        };
        let json = lease.comment().to_json();
        assert!(!json.contains("192.0.2.7"), "{json}");
        assert!(!json.contains("subject"), "{json}");
        let old = json.replace('}', ",\"client_addr\":\"192.0.2.7:5432\"}");
        assert!(LeaseComment::from_json(&old).is_ok(), "{old}");
    }
}
