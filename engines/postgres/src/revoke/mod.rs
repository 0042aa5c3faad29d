//! Revocation: how a role, and everything it left behind, goes.
//!
//! A role is revoked in four steps, for one role or a batch of them (all of
//! one template database):
//!
//! 1. **Fence** (template database): take membership in the roles (PostgreSQL
//!    15 and earlier give their creator no rights on them), `NOLOGIN`
//!    committed, then terminate every backend of the roles, wherever and
//!    however it logged in, and wait for each to exit: a dropped role's
//!    backend that is still cleaning up makes `DROP OWNED` fail with
//!    `could not open relation with OID …`.
//! 2. **Plan** (template database): read from the catalogs what the roles
//!    left that a plain `DROP OWNED` would get wrong: prepared transactions
//!    (which keep their locks, and only their owner can finish), grants and
//!    objects in *other* databases (which block `DROP ROLE` for ever), and,
//!    where the template hands objects to an `owner`, every object that would
//!    run with the owner's rights after the handover, and large objects.
//! 3. **Resolve** prepared transactions (as the role itself: `SET ROLE`, one
//!    `ROLLBACK PREPARED` per statement, in its database) and `DROP OWNED`
//!    in every other database where `pg_shdepend` lists the roles.
//! 4. **Drop** (template database, one transaction): neutralise or drop the
//!    planned objects, the template's revocation statements, `REASSIGN OWNED`
//!    to the owner, `DROP OWNED`, `DROP ROLE`.
//!
//! Each planned change comes back as a [`Cleanup`], which the proxy audits.

mod plan;
pub(crate) mod run;

pub use self::plan::{plan_params, plan_sql, ObjectChange, Plan, Prepared};

use std::collections::BTreeSet;

use crate::sql::{quote_ident, quote_literal, Quoted, Unquotable};
use crate::template::{render_statement, RoleTemplate};

/// How long revocation waits for each terminated backend to exit.
pub const BACKEND_EXIT_TIMEOUT_MS: u32 = 5_000;

/// Revocation never queues behind a lock for long (a session could hold
/// one on purpose); it fails and is retried with back-off instead.
const LOCK_TIMEOUT: &str = "10s";

/// One role to revoke, with what its template says about the handover.
pub struct RoleToRevoke<'a> {
    pub role: &'a str,
    pub template: Option<&'a RoleTemplate>,
}

impl RoleToRevoke<'_> {
    fn owner(&self) -> Option<&str> {
        self.template.and_then(|t| t.owner.as_deref())
    }

    fn removes_large_objects(&self) -> bool {
        self.owner().is_some() && !self.template.is_some_and(|t| t.keep_large_objects)
    }
}

/// Step 1a, its own transaction: membership and `NOLOGIN`, committed before
/// the backends are looked for, so no new login can slip in between.
pub fn fence_sql(roles: &[Quoted]) -> String {
    let mut sql = format!("GRANT {} TO CURRENT_USER;\n", join(roles));
    for role in roles {
        sql.push_str(&format!("ALTER ROLE {role} NOLOGIN;\n"));
    }
    sql
}

/// How long [`terminate_sql`] waits for each backend to exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Up to [`BACKEND_EXIT_TIMEOUT_MS`] per backend (step 1b).
    ForExit,
    /// Signal only (the drop step's second pass).
    No,
}

/// Step 1b: terminate every backend of the roles, waiting for each to exit
/// if `wait` says so.
pub fn terminate_sql(roles: &[Quoted], wait: Wait) -> Result<String, Unquotable> {
    let oids = roles
        .iter()
        .map(|role| {
            Ok(format!(
                "{}::pg_catalog.regrole",
                quote_literal(role.as_str())?
            ))
        })
        .collect::<Result<Vec<_>, Unquotable>>()?
        .join(", ");
    let timeout = match wait {
        Wait::ForExit => format!(", {BACKEND_EXIT_TIMEOUT_MS}"),
        Wait::No => String::new(),
    };
    Ok(format!(
        "SELECT pg_catalog.pg_terminate_backend(s.pid{timeout}) \
         FROM pg_catalog.pg_stat_get_activity(NULL) s WHERE s.usesysid IN ({oids});\n"
    ))
}

/// Step 3, in another database: what the roles own or were granted there.
pub fn drop_elsewhere_sql<'a>(
    roles: impl IntoIterator<Item = &'a String>,
    grantors: Option<&BTreeSet<String>>,
) -> Result<String, Unquotable> {
    let roles = roles
        .into_iter()
        .map(|r| quote_ident(r))
        .collect::<Result<Vec<_>, _>>()?;
    let mut sql =
        format!("SELECT pg_catalog.set_config('lock_timeout', '{LOCK_TIMEOUT}', true);\n");
    sql.push_str(&drop_owned_sql(&roles, grantors)?);
    Ok(sql)
}

/// `DROP OWNED BY roles`, as a member of `grantors` (so that their grants
/// to the roles can be revoked), joined for this transaction only.
fn drop_owned_sql(
    roles: &[Quoted],
    grantors: Option<&BTreeSet<String>>,
) -> Result<String, Unquotable> {
    let grantors = grantors
        .into_iter()
        .flatten()
        .map(|g| quote_ident(g))
        .collect::<Result<Vec<_>, _>>()?;
    let mut sql = String::new();
    if !grantors.is_empty() {
        sql.push_str(&format!("GRANT {} TO CURRENT_USER;\n", join(&grantors)));
    }
    sql.push_str(&format!("DROP OWNED BY {};\n", join(roles)));
    if !grantors.is_empty() {
        sql.push_str(&format!("REVOKE {} FROM CURRENT_USER;\n", join(&grantors)));
    }
    Ok(sql)
}

/// Step 4: everything in the template database, one transaction.
pub fn drop_sql(
    roles: &[RoleToRevoke<'_>],
    plan: &Plan,
    database: &str,
) -> Result<String, Unquotable> {
    let quoted = roles
        .iter()
        .map(|r| quote_ident(r.role))
        .collect::<Result<Vec<_>, _>>()?;
    let mut sql =
        format!("SELECT pg_catalog.set_config('lock_timeout', '{LOCK_TIMEOUT}', true);\n");
    // The planned names were printed schema-qualified, so they resolve
    // whatever the search_path; the revocation statements see the usual one.
    for (role, quoted_role) in roles.iter().zip(&quoted) {
        for change in plan.changes.get(role.role).into_iter().flatten() {
            sql.push_str(&change.statement);
            sql.push_str(";\n");
        }
        if let Some(template) = role.template {
            for statement in &template.revocation_statements {
                sql.push_str(&render_statement(statement, quoted_role, database)?);
                sql.push_str(";\n");
            }
        }
        if let Some(owner) = role.owner() {
            sql.push_str(&format!(
                "REASSIGN OWNED BY {quoted_role} TO {};\n",
                quote_ident(owner)?
            ));
        }
    }
    // A login that raced the fence's NOLOGIN (committed with the fence) ends
    // here; none can start any more.
    sql.push_str(&terminate_sql(&quoted, Wait::No)?);
    // Drops what is left and revokes privileges granted to the roles
    // directly, which would otherwise block DROP ROLE.
    sql.push_str(&drop_owned_sql(&quoted, plan.grantors.get(database))?);
    sql.push_str(&format!("DROP ROLE {};\n", join(&quoted)));
    Ok(sql)
}

fn join(roles: &[Quoted]) -> String {
    roles
        .iter()
        .map(Quoted::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(role: &str, kind: &str, name: &str, detail: Option<&str>) -> [Option<String>; 4] {
        [
            Some(role.into()),
            Some(kind.into()),
            Some(name.into()),
            detail.map(Into::into),
        ]
    }

    #[test]
    fn a_plan_neutralises_before_the_handover_and_names_each_object() {
        let rows = vec![
            row("eph_a", "routine", "public.f(integer)", None),
            row("eph_a", "view", "public.\"v;x\"", None),
            row("eph_a", "rule", "r\"1", Some("public.t")),
            row("eph_a", "large_object", "16411", None),
            row("eph_a", "large_object", "1; DROP TABLE x", None),
            row("eph_a", "prepared", "gid'1", Some("billing")),
            row("eph_a", "database", "other", None),
        ];
        let plan = Plan::from_rows("billing", rows, 150_000).unwrap();
        let template = RoleTemplate {
            name: "t".into(),
            database: "billing".into(),
            member_of: vec![],
            owner: Some("owner".into()),
            creation_statements: vec![],
            revocation_statements: vec![],
            keep_large_objects: false,
        };
        let roles = [RoleToRevoke {
            role: "eph_a",
            template: Some(&template),
        }];
        let sql = drop_sql(&roles, &plan, "billing").unwrap();
        let reassign = sql.find("REASSIGN OWNED").unwrap();
        for statement in [
            "ALTER ROUTINE public.f(integer) SECURITY INVOKER;",
            "ALTER VIEW public.\"v;x\" SET (security_invoker = true);",
            "DROP RULE IF EXISTS \"r\"\"1\" ON public.t;",
            "SELECT pg_catalog.lo_unlink(16411);",
        ] {
            let at = sql
                .find(statement)
                .unwrap_or_else(|| panic!("{statement}\n{sql}"));
            assert!(at < reassign, "{statement} comes before the handover");
        }
        assert!(!sql.contains("DROP TABLE"), "{sql}");
        assert!(
            sql.contains("pg_terminate_backend(s.pid) "),
            "a second, signal-only pass: {sql}"
        );
        assert!(sql.ends_with("DROP OWNED BY \"eph_a\";\nDROP ROLE \"eph_a\";\n"));
        assert_eq!(
            plan.cleanup_for("eph_a").len(),
            5,
            "{:?}",
            plan.cleanup_for("eph_a")
        );
        assert_eq!(plan.other_databases.get("other").map(|r| r.len()), Some(1));
    }

    #[test]
    fn the_plans_role_lists_are_literals_and_names_are_never_placeholders() {
        let params = [vec!["eph_a$2".to_owned()], vec![], vec!["it's".to_owned()]];
        let sql = plan_sql(150_000, &params).unwrap();
        assert!(!sql.contains("ANY($"), "{sql}");
        assert!(sql.contains("ANY(ARRAY['eph_a$2']::text[])"), "{sql}");
        assert!(sql.contains("ANY(ARRAY[]::text[])"), "{sql}");
        assert!(sql.contains("ANY(ARRAY['it''s']::text[])"), "{sql}");
    }

    #[test]
    fn views_are_dropped_where_security_invoker_does_not_exist() {
        let plan =
            Plan::from_rows("db", vec![row("eph_a", "view", "public.v", None)], 140_000).unwrap();
        assert!(plan.changes["eph_a"][0]
            .statement
            .starts_with("DROP VIEW IF EXISTS public.v"));
    }

    #[test]
    fn termination_waits_for_each_backend_to_exit() {
        let roles = [quote_ident("eph_a").unwrap()];
        assert!(fence_sql(&roles).contains("ALTER ROLE \"eph_a\" NOLOGIN;"));
        let sql = terminate_sql(&roles, Wait::ForExit).unwrap();
        assert!(sql.contains("pg_terminate_backend(s.pid, 5000)"), "{sql}");
    }
}
