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

pub(crate) mod run;

use std::collections::{BTreeMap, BTreeSet};

use ephemera_engine::Cleanup;

use crate::sql::{printed_by_server, quote_ident, quote_literal, Quoted, Unquotable};
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

/// Step 2's query, for the roles in `params` (see [`plan_params`]): every
/// role name; the roles whose objects are handed to an owner; the roles
/// whose large objects are removed.
/// Rows: role, kind, name, detail. With `search_path` empty, `regclass` and
/// `regprocedure` print schema-qualified and quoted.
pub fn plan_sql(server_version: i32, params: &[Vec<String>; 3]) -> Result<String, Unquotable> {
    let mut sql = String::from(
        "WITH r AS (SELECT oid, rolname FROM pg_catalog.pg_roles WHERE rolname = ANY($1)),
              h AS (SELECT oid, rolname FROM r WHERE rolname = ANY($2))
         SELECT r.rolname::text, 'prepared', x.gid, x.database::text
           FROM pg_catalog.pg_prepared_xacts x JOIN r ON r.rolname = x.owner
         UNION ALL
         SELECT DISTINCT r.rolname::text, 'database', d.datname::text, NULL
           FROM pg_catalog.pg_shdepend s JOIN r ON s.refobjid = r.oid
           JOIN pg_catalog.pg_database d ON d.oid = s.dbid
          WHERE s.refclassid = 'pg_catalog.pg_authid'::pg_catalog.regclass
            AND d.datname <> pg_catalog.current_database()
         UNION ALL
         SELECT DISTINCT r.rolname::text, 'acl_owner', ow.rolname::text, d.datname::text
           FROM pg_catalog.pg_shdepend a JOIN r ON a.refobjid = r.oid
           JOIN pg_catalog.pg_shdepend o ON o.dbid = a.dbid AND o.classid = a.classid
                AND o.objid = a.objid AND o.deptype = 'o'
           JOIN pg_catalog.pg_roles ow ON ow.oid = o.refobjid
           JOIN pg_catalog.pg_database d ON d.oid = a.dbid
          WHERE a.deptype = 'a'
            AND a.refclassid = 'pg_catalog.pg_authid'::pg_catalog.regclass
            AND NOT ow.rolsuper
            AND NOT pg_catalog.pg_has_role(current_user, ow.oid, 'MEMBER')
         UNION ALL
         SELECT h.rolname::text, 'routine', p.oid::pg_catalog.regprocedure::text, NULL
           FROM pg_catalog.pg_proc p JOIN h ON p.proowner = h.oid WHERE p.prosecdef
         UNION ALL
         SELECT h.rolname::text, 'view', c.oid::pg_catalog.regclass::text, NULL
           FROM pg_catalog.pg_class c JOIN h ON c.relowner = h.oid
          WHERE c.relkind = 'v' AND NOT EXISTS (
                SELECT 1 FROM pg_catalog.pg_options_to_table(c.reloptions) o
                 WHERE o.option_name = 'security_invoker'
                   AND lower(o.option_value) IN ('true', 'on', 'yes', '1'))
         UNION ALL
         SELECT h.rolname::text, 'matview', c.oid::pg_catalog.regclass::text, NULL
           FROM pg_catalog.pg_class c JOIN h ON c.relowner = h.oid WHERE c.relkind = 'm'
         UNION ALL
         SELECT h.rolname::text, 'rule', w.rulename::text, c.oid::pg_catalog.regclass::text
           FROM pg_catalog.pg_rewrite w JOIN pg_catalog.pg_class c ON c.oid = w.ev_class
           JOIN h ON c.relowner = h.oid WHERE w.rulename <> '_RETURN'
         UNION ALL
         SELECT h.rolname::text, 'index', i.indexrelid::pg_catalog.regclass::text, NULL
           FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class c ON c.oid = i.indrelid
           JOIN h ON c.relowner = h.oid
          WHERE (i.indexprs IS NOT NULL OR i.indpred IS NOT NULL)
            AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint k WHERE k.conindid = i.indexrelid)
         UNION ALL
         SELECT h.rolname::text, 'constraint', k.conname::text, c.oid::pg_catalog.regclass::text
           FROM pg_catalog.pg_constraint k JOIN pg_catalog.pg_index i ON i.indexrelid = k.conindid
           JOIN pg_catalog.pg_class c ON c.oid = k.conrelid JOIN h ON c.relowner = h.oid
          WHERE i.indexprs IS NOT NULL OR i.indpred IS NOT NULL
         UNION ALL
         SELECT r.rolname::text, 'large_object', m.oid::text, NULL
           FROM pg_catalog.pg_largeobject_metadata m JOIN r ON m.lomowner = r.oid
          WHERE r.rolname = ANY($3)",
    );
    if server_version >= 140_000 {
        sql.push_str(
            "
         UNION ALL
         SELECT h.rolname::text, 'statistics', n.nspname::text, x.stxname::text
           FROM pg_catalog.pg_statistic_ext x JOIN pg_catalog.pg_class c ON c.oid = x.stxrelid
           JOIN pg_catalog.pg_namespace n ON n.oid = x.stxnamespace
           JOIN h ON c.relowner = h.oid WHERE x.stxexprs IS NOT NULL",
        );
    }
    // Inlined as literals: the plan runs in the same simple query as the
    // fence, one round trip. One pass, so that a name can never be taken
    // for a placeholder.
    let lists = params
        .iter()
        .map(|names| {
            let list = names
                .iter()
                .map(|n| quote_literal(n).map(|q| q.to_string()))
                .collect::<Result<Vec<_>, _>>()?
                .join(", ");
            Ok(format!("ARRAY[{list}]::text[]"))
        })
        .collect::<Result<Vec<_>, Unquotable>>()?;
    let mut out = String::with_capacity(sql.len() + 256);
    let mut rest = sql.as_str();
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let index = rest[at + 1..]
            .chars()
            .next()
            .and_then(|c| c.to_digit(10))
            .map(|d| d as usize);
        match index {
            Some(n @ 1..=3) => {
                out.push_str(&lists[n - 1]);
                rest = &rest[at + 2..];
            }
            _ => {
                out.push('$');
                rest = &rest[at + 1..];
            }
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// The plan's parameters for `roles`.
pub fn plan_params(roles: &[RoleToRevoke<'_>]) -> [Vec<String>; 3] {
    let names = |keep: &dyn Fn(&RoleToRevoke<'_>) -> bool| {
        roles
            .iter()
            .filter(|r| keep(r))
            .map(|r| r.role.to_owned())
            .collect::<Vec<_>>()
    };
    [
        names(&|_| true),
        names(&|r| r.owner().is_some()),
        names(&|r| r.removes_large_objects()),
    ]
}

/// A prepared transaction to roll back as its role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    pub role: String,
    pub database: String,
    pub gid: String,
}

/// A change made in the template database before the handover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectChange {
    pub statement: String,
    pub cleanup: Cleanup,
}

/// What step 2 found, for all roles of a batch.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    pub prepared: Vec<Prepared>,
    /// Other databases, each with the roles that have dependencies there.
    pub other_databases: BTreeMap<String, BTreeSet<String>>,
    /// By database: owners of objects on which someone granted the roles a
    /// privilege. Only a grantor can revoke a grant, so revocation joins
    /// these roles for the `DROP OWNED` (and leaves them again).
    pub grantors: BTreeMap<String, BTreeSet<String>>,
    /// By role, in the order they run.
    pub changes: BTreeMap<String, Vec<ObjectChange>>,
}

impl Plan {
    /// Build the plan from the rows of [`plan_sql`] (`database`: the
    /// template database, where the changes are made).
    pub fn from_rows(
        database: &str,
        rows: impl IntoIterator<Item = [Option<String>; 4]>,
        server_version: i32,
    ) -> Result<Plan, Unquotable> {
        let mut plan = Plan::default();
        for [role, kind, name, detail] in rows {
            let (Some(role), Some(kind), Some(name)) = (role, kind, name) else {
                continue;
            };
            let change = |statement: String, cleanup: Cleanup| ObjectChange { statement, cleanup };
            let neutralised = |object: String, how: &'static str| Cleanup::Neutralised {
                database: database.to_owned(),
                object,
                how,
            };
            let dropped = |object: String, why: &'static str| Cleanup::Dropped {
                database: database.to_owned(),
                object,
                why,
            };
            let change = match (kind.as_str(), detail) {
                ("prepared", Some(db)) => {
                    plan.prepared.push(Prepared {
                        role,
                        database: db,
                        gid: name,
                    });
                    continue;
                }
                ("database", _) => {
                    plan.other_databases.entry(name).or_default().insert(role);
                    continue;
                }
                ("acl_owner", Some(db)) => {
                    plan.grantors.entry(db).or_default().insert(name);
                    continue;
                }
                ("routine", _) => change(
                    format!(
                        "ALTER ROUTINE {} SECURITY INVOKER",
                        printed_by_server(&name)?
                    ),
                    neutralised(
                        format!("function {name}"),
                        "made SECURITY INVOKER: it would have run as the owner",
                    ),
                ),
                ("view", _) if server_version >= 150_000 => change(
                    format!(
                        "ALTER VIEW {} SET (security_invoker = true)",
                        printed_by_server(&name)?
                    ),
                    neutralised(
                        format!("view {name}"),
                        "set security_invoker: it would have read with the owner's rights",
                    ),
                ),
                ("view", _) => change(
                    format!("DROP VIEW IF EXISTS {} CASCADE", printed_by_server(&name)?),
                    dropped(
                        format!("view {name}"),
                        "it would have read with the owner's rights (no security_invoker before PostgreSQL 15)",
                    ),
                ),
                ("matview", _) => change(
                    format!(
                        "DROP MATERIALIZED VIEW IF EXISTS {} CASCADE",
                        printed_by_server(&name)?
                    ),
                    dropped(
                        format!("materialized view {name}"),
                        "REFRESH would have run its query as the owner",
                    ),
                ),
                ("rule", Some(table)) => change(
                    format!(
                        "DROP RULE IF EXISTS {} ON {}",
                        quote_ident(&name)?,
                        printed_by_server(&table)?
                    ),
                    dropped(
                        format!("rule {name} on {table}"),
                        "its actions would have run with the owner's rights",
                    ),
                ),
                ("index", _) => change(
                    format!("DROP INDEX IF EXISTS {}", printed_by_server(&name)?),
                    dropped(
                        format!("index {name}"),
                        "its expressions would have run as the owner (ANALYZE, VACUUM, REINDEX)",
                    ),
                ),
                ("constraint", Some(table)) => change(
                    format!(
                        "ALTER TABLE {} DROP CONSTRAINT IF EXISTS {} CASCADE",
                        printed_by_server(&table)?,
                        quote_ident(&name)?
                    ),
                    dropped(
                        format!("constraint {name} on {table}"),
                        "its index expressions would have run as the owner",
                    ),
                ),
                ("statistics", Some(object)) => change(
                    format!(
                        "DROP STATISTICS IF EXISTS {}.{}",
                        quote_ident(&name)?,
                        quote_ident(&object)?
                    ),
                    dropped(
                        format!("statistics {name}.{object}"),
                        "its expressions would have run as the owner (ANALYZE)",
                    ),
                ),
                ("large_object", _) => {
                    // An oid: digits only, or the row is not ours.
                    let Ok(oid) = name.parse::<u32>() else { continue };
                    change(
                        format!("SELECT pg_catalog.lo_unlink({oid})"),
                        dropped(
                            format!("large object {oid}"),
                            "a session's large objects are not handed over (keep_large_objects)",
                        ),
                    )
                }
                _ => continue,
            };
            plan.changes.entry(role).or_default().push(change);
        }
        Ok(plan)
    }

    /// Every cleanup for `role`, in the order it happens.
    pub fn cleanup_for(&self, role: &str) -> Vec<Cleanup> {
        let mut cleanup: Vec<Cleanup> = self
            .prepared
            .iter()
            .filter(|p| p.role == role)
            .map(|p| Cleanup::PreparedTransactionRolledBack {
                database: p.database.clone(),
                gid: p.gid.clone(),
            })
            .collect();
        cleanup.extend(
            self.changes
                .get(role)
                .into_iter()
                .flatten()
                .map(|c| c.cleanup.clone()),
        );
        cleanup
    }
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
