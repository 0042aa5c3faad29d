//! Reading the audit log back: one lease's story (`ephemera audit`) and
//! who a database role was for (`ephemera whois`), from the JSON lines
//! `audit.rs` and `statement_log.rs` write. PostgreSQL's own log names
//! roles (`eph_billing_rw_…`); this turns them back into identities long
//! after the roles are gone.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde_json::Value;
use time::OffsetDateTime;

#[derive(Debug, thiserror::Error)]
pub enum AuditQueryError {
    #[error("cannot read the audit log {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Which events to pull; every set field must match.
#[derive(Debug, Default, Clone)]
pub struct EventFilter {
    pub lease_id: Option<String>,
    pub identity: Option<String>,
    pub role: Option<String>,
    /// Events at or after this time.
    pub since: Option<OffsetDateTime>,
}

impl EventFilter {
    pub fn matches(&self, event: &Value) -> bool {
        let field = |name: &str, want: &Option<String>| {
            want.as_deref()
                .is_none_or(|want| event[name].as_str() == Some(want))
        };
        let recent = self
            .since
            .is_none_or(|since| event_time(event).is_some_and(|at| at >= since));
        field("lease_id", &self.lease_id)
            && field("identity", &self.identity)
            && field("role", &self.role)
            && recent
    }
}

pub fn event_time(event: &Value) -> Option<OffsetDateTime> {
    let text = event["time"].as_str()?;
    OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()
}

/// The events of `path` that `filter` selects, in the file's order. Lines
/// that are not JSON objects (a line cut by a full disk) are skipped and
/// counted in the second value.
pub fn read_events(
    path: &Path,
    filter: &EventFilter,
) -> Result<(Vec<Value>, usize), AuditQueryError> {
    let read_error = |source| AuditQueryError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let mut events = Vec::new();
    let mut unreadable = 0;
    for line in std::io::BufReader::new(file).lines() {
        let line = line.map_err(read_error)?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(&line) {
            Ok(event) if event.is_object() => {
                if filter.matches(&event) {
                    events.push(event);
                }
            }
            _ => unreadable += 1,
        }
    }
    Ok((events, unreadable))
}

/// Who a role was for, and when.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RoleOwner {
    pub role: String,
    pub lease_id: String,
    pub identity: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    pub template: String,
    pub database: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_addr: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issued_at: Option<String>,
    /// Until when it is (or was) valid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// When and how it ended (`revoked`, `expired`, `reaped`), from the
    /// audit log.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended_by: Option<String>,
    /// Where this answer came from: `ledger` (the role exists) or
    /// `audit log`.
    pub source: &'static str,
}

const ENDINGS: [&str; 3] = ["revoked", "expired", "reaped"];

/// The leases of `role` told by `events` (one per lease that used it: a
/// static role has many), in the order they were issued.
pub fn owners_from_events(role: &str, events: &[Value]) -> Vec<RoleOwner> {
    let text = |e: &Value, k: &str| e[k].as_str().map(str::to_owned);
    let mut owners: Vec<RoleOwner> = Vec::new();
    for e in events.iter().filter(|e| e["role"].as_str() == Some(role)) {
        let Some(lease_id) = text(e, "lease_id") else {
            continue;
        };
        let event = e["event"].as_str().unwrap_or_default();
        let at = owners.iter().position(|o| o.lease_id == lease_id);
        let owner = match at {
            Some(i) => &mut owners[i],
            None => {
                owners.push(RoleOwner {
                    role: role.to_owned(),
                    lease_id,
                    source: "audit log",
                    ..RoleOwner::default()
                });
                let last = owners.len() - 1;
                &mut owners[last]
            }
        };
        let fill = |slot: &mut Option<String>, value: Option<String>| {
            if slot.is_none() {
                *slot = value;
            }
        };
        fill(&mut owner.subject, text(e, "subject"));
        fill(&mut owner.client_addr, text(e, "client_addr"));
        for (slot, key) in [
            (&mut owner.identity, "identity"),
            (&mut owner.template, "template"),
            (&mut owner.database, "database"),
        ] {
            if slot.is_empty() {
                *slot = text(e, key).unwrap_or_default();
            }
        }
        if event == "lease_issued" {
            owner.issued_at = text(e, "time");
        }
        if ENDINGS.contains(&event) && owner.ended_at.is_none() {
            owner.ended_at = text(e, "time");
            owner.ended_by = Some(event.to_owned());
        }
    }
    owners
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_roles_story_is_put_together_from_its_events() {
        let events = vec![
            json!({"time": "2026-12-01T10:00:00Z", "event": "lease_issued", "lease_id": "L1", "role": "eph_x", "identity": "spiffe://a", "template": "t", "database": "db", "client_addr": "10.0.0.1:5000"}),
            json!({"time": "2026-12-01T10:00:01Z", "event": "statement", "lease_id": "L1", "role": "eph_x", "identity": "spiffe://a", "statement": "select 1"}),
            json!({"time": "2026-12-01T10:00:02Z", "event": "lease_issued", "lease_id": "L2", "role": "eph_other", "identity": "spiffe://b"}),
            json!({"time": "2026-12-01T10:05:00Z", "event": "revoked", "lease_id": "L1", "role": "eph_x", "identity": "spiffe://a"}),
        ];
        let owners = owners_from_events("eph_x", &events);
        assert_eq!(owners.len(), 1);
        let o = &owners[0];
        assert_eq!(
            (
                o.identity.as_str(),
                o.template.as_str(),
                o.database.as_str()
            ),
            ("spiffe://a", "t", "db")
        );
        assert_eq!(o.client_addr.as_deref(), Some("10.0.0.1:5000"));
        assert_eq!(o.issued_at.as_deref(), Some("2026-12-01T10:00:00Z"));
        assert_eq!(
            (o.ended_at.as_deref(), o.ended_by.as_deref()),
            (Some("2026-12-01T10:05:00Z"), Some("revoked"))
        );
    }

    #[test]
    fn a_filter_selects_by_lease_identity_and_time() {
        let e = json!({"time": "2026-12-01T10:00:00Z", "lease_id": "L1", "identity": "spiffe://a"});
        let since =
            |t: &str| OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok();
        assert!(EventFilter {
            lease_id: Some("L1".into()),
            ..Default::default()
        }
        .matches(&e));
        assert!(!EventFilter {
            lease_id: Some("L2".into()),
            ..Default::default()
        }
        .matches(&e));
        assert!(!EventFilter {
            identity: Some("spiffe://b".into()),
            ..Default::default()
        }
        .matches(&e));
        assert!(EventFilter {
            since: since("2026-12-01T09:00:00Z"),
            ..Default::default()
        }
        .matches(&e));
        assert!(!EventFilter {
            since: since("2026-12-01T11:00:00Z"),
            ..Default::default()
        }
        .matches(&e));
    }
}
