//! Creating a role: its name, and the one transaction that brings it
//! into the world.

use ephemera_engine::{Lease, LeaseKind, ScramSecret};
use rand::Rng;
use time::OffsetDateTime;

use crate::sql::{quote_ident, quote_literal, Quoted, Unquotable};
use crate::template::{render_statement, RoleTemplate, RANDOM_SUFFIX_LEN, ROLE_PREFIX};

/// `eph_<template>_<18 random base-36 characters>`.
pub(crate) fn role_name(template: &str) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rngs::OsRng;
    let suffix: String = (0..RANDOM_SUFFIX_LEN)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect();
    format!("{ROLE_PREFIX}{template}_{suffix}")
}

pub(crate) fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .expect("a current timestamp formats as RFC 3339")
}

/// The one transaction that brings a role into the world. `secret`:
/// its SCRAM verifier; `None` for certificate logins
/// (`upstream.login = "certificate"`), where the role gets no password
/// clause at all, so `pg_authid.rolpassword` stays NULL.
pub(crate) fn create_role_sql(
    template: &RoleTemplate,
    role: &Quoted,
    secret: Option<&ScramSecret>,
    lease: &Lease,
    valid_until: OffsetDateTime,
    connection_limit: Option<u32>,
) -> Result<String, Unquotable> {
    let mut sql = String::with_capacity(1024);
    // Losing this commit in a crash loses only a role nobody has logged in
    // as yet; waiting for the WAL flush would cost every session.
    sql.push_str("SELECT set_config('synchronous_commit', 'off', true);\n");
    // A session role is for Ephemera's one login; a standalone lease's
    // holder may open several connections (a batch job's workers).
    // A pooled session lease: as many as its pool's backends.
    let connection_limit = match (lease.kind, connection_limit) {
        (LeaseKind::Session, Some(limit)) => i64::from(limit),
        (LeaseKind::Session, None) => 1,
        (LeaseKind::Standalone, _) => -1,
    };
    sql.push_str(&format!(
        "CREATE ROLE {role} WITH LOGIN INHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION \
         CONNECTION LIMIT {connection_limit} VALID UNTIL {}",
        quote_literal(&rfc3339(valid_until))?,
    ));
    if let Some(secret) = secret {
        sql.push_str(&format!(" PASSWORD {}", quote_literal(&secret.verifier())?));
    }
    if !template.member_of.is_empty() {
        let groups = template
            .member_of
            .iter()
            .map(|g| quote_ident(g).map(|q| q.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        sql.push_str(" IN ROLE ");
        sql.push_str(&groups.join(", "));
    }
    sql.push_str(";\n");
    sql.push_str(&format!(
        "COMMENT ON ROLE {role} IS {};\n",
        quote_literal(&lease.comment().to_json())?
    ));
    for statement in &template.creation_statements {
        sql.push_str(&render_statement(statement, role, &template.database)?);
        sql.push_str(";\n");
    }
    Ok(sql)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_names_have_prefix_template_and_fit() {
        let name = role_name(&"t".repeat(crate::template::MAX_TEMPLATE_NAME_LEN));
        assert_eq!(name.len(), 63);
        let name = role_name("billing_rw");
        assert!(name.starts_with("eph_billing_rw_"), "{name}");
        assert_ne!(role_name("x"), role_name("x"));
    }

    #[test]
    fn create_sql_never_contains_anything_but_a_verifier() {
        let template = RoleTemplate {
            name: "billing_rw".into(),
            database: "billing".into(),
            member_of: vec!["billing_rw".into(), "read\"ers".into()],
            owner: None,
            creation_statements: vec!["GRANT CONNECT ON DATABASE {{database}} TO {{name}}".into()],
            revocation_statements: vec![],
            keep_large_objects: false,
        };
        let secret = ScramSecret::generate();
        let now = OffsetDateTime::now_utc();
        let lease = Lease {
            id: uuid_for_test(),
            engine: "postgres",
            kind: LeaseKind::Session,
            template: "billing_rw".into(),
            role: "eph_billing_rw_x".into(),
            identity: "spiffe://example.org/it's".into(),
            subject: None,
            database: "billing".into(),
            client_addr: None,
            issued_at: now,
            expires_at: now,
            max_expires_at: now,
        };
        let role = quote_ident("eph_billing_rw_x").unwrap();
        let sql = create_role_sql(&template, &role, Some(&secret), &lease, now, None).unwrap();
        assert!(sql.contains("PASSWORD 'SCRAM-SHA-256$1:"), "{sql}");
        let sql = create_role_sql(&template, &role, None, &lease, now, None).unwrap();
        assert!(!sql.contains("PASSWORD"), "{sql}");
        assert!(
            sql.contains("IN ROLE \"billing_rw\", \"read\"\"ers\";"),
            "{sql}"
        );
        assert!(sql.contains("it''s"), "{sql}");
        assert!(sql.contains("GRANT CONNECT ON DATABASE \"billing\" TO \"eph_billing_rw_x\";"));
    }

    fn uuid_for_test() -> ephemera_engine::LeaseId {
        "67e55044-10b1-426f-9247-bb680e5fe0c8".parse().unwrap()
    }
}
