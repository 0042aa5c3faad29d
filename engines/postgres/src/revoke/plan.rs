//! Step 2 of a revocation: the plan. One query finds what the roles left
//! behind; [`Plan::from_rows`] turns its rows into what steps 3 and 4 do.

use std::collections::{BTreeMap, BTreeSet};

use ephemera_engine::Cleanup;

use super::RoleToRevoke;
use crate::sql::{printed_by_server, quote_ident, quote_literal, Unquotable};

/// Step 2's query, for the roles in `params` (see [`plan_params`]): every
/// role name; the roles whose objects are handed to an owner; the roles
/// whose large objects are removed.
/// Rows: role, kind, name, detail. With `search_path` empty, `regclass` and
/// `regprocedure` print schema-qualified and quoted.
pub fn plan_sql(server_version: i32, params: &[Vec<String>; 3]) -> Result<String, Unquotable> {
    let mut sql = String::from(PLAN_SQL);
    if server_version >= 140_000 {
        sql.push_str(PLAN_STATISTICS_SQL);
    }
    inline_lists(&sql, params)
}

/// Rows of step 2 for every PostgreSQL version we support.
const PLAN_SQL: &str = "WITH r AS (SELECT oid, rolname FROM pg_catalog.pg_roles WHERE rolname = ANY($1)),
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
          WHERE r.rolname = ANY($3)";

/// Expression statistics (PostgreSQL 14+).
const PLAN_STATISTICS_SQL: &str = "
         UNION ALL
         SELECT h.rolname::text, 'statistics', n.nspname::text, x.stxname::text
           FROM pg_catalog.pg_statistic_ext x JOIN pg_catalog.pg_class c ON c.oid = x.stxrelid
           JOIN pg_catalog.pg_namespace n ON n.oid = x.stxnamespace
           JOIN h ON c.relowner = h.oid WHERE x.stxexprs IS NOT NULL";

/// Put `$1`..`$3` in `sql` as `ARRAY[…]::text[]` literals of `params`.
fn inline_lists(sql: &str, params: &[Vec<String>; 3]) -> Result<String, Unquotable> {
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
    let mut rest = sql;
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

/// One object a plan row names, in the template database.
struct Found<'a> {
    database: &'a str,
    kind: &'a str,
    name: &'a str,
    detail: Option<&'a str>,
}

impl Found<'_> {
    fn neutralised(&self, object: String, how: &'static str) -> Cleanup {
        Cleanup::Neutralised {
            database: self.database.to_owned(),
            object,
            how,
        }
    }

    fn dropped(&self, object: String, why: &'static str) -> Cleanup {
        Cleanup::Dropped {
            database: self.database.to_owned(),
            object,
            why,
        }
    }

    /// Objects whose code would run as their owner once handed over:
    /// SECURITY DEFINER routines, views, materialized views, rules.
    fn runs_as_owner(&self, server_version: i32) -> Result<Option<ObjectChange>, Unquotable> {
        let name = self.name;
        let change = |statement: String, cleanup: Cleanup| ObjectChange { statement, cleanup };
        Ok(Some(match (self.kind, self.detail) {
            ("routine", _) => change(
                format!("ALTER ROUTINE {} SECURITY INVOKER", printed_by_server(name)?),
                self.neutralised(
                    format!("function {name}"),
                    "made SECURITY INVOKER: it would have run as the owner",
                ),
            ),
            ("view", _) if server_version >= 150_000 => change(
                format!(
                    "ALTER VIEW {} SET (security_invoker = true)",
                    printed_by_server(name)?
                ),
                self.neutralised(
                    format!("view {name}"),
                    "set security_invoker: it would have read with the owner's rights",
                ),
            ),
            ("view", _) => change(
                format!("DROP VIEW IF EXISTS {} CASCADE", printed_by_server(name)?),
                self.dropped(
                    format!("view {name}"),
                    "it would have read with the owner's rights (no security_invoker before PostgreSQL 15)",
                ),
            ),
            ("matview", _) => change(
                format!(
                    "DROP MATERIALIZED VIEW IF EXISTS {} CASCADE",
                    printed_by_server(name)?
                ),
                self.dropped(
                    format!("materialized view {name}"),
                    "REFRESH would have run its query as the owner",
                ),
            ),
            ("rule", Some(table)) => change(
                format!(
                    "DROP RULE IF EXISTS {} ON {}",
                    quote_ident(name)?,
                    printed_by_server(table)?
                ),
                self.dropped(
                    format!("rule {name} on {table}"),
                    "its actions would have run with the owner's rights",
                ),
            ),
            _ => return Ok(None),
        }))
    }

    /// Objects with expressions the owner's maintenance would run
    /// (indexes, constraints, statistics), and large objects, which are
    /// not handed over.
    fn expression(&self) -> Result<Option<ObjectChange>, Unquotable> {
        let name = self.name;
        let change = |statement: String, cleanup: Cleanup| ObjectChange { statement, cleanup };
        Ok(Some(match (self.kind, self.detail) {
            ("index", _) => change(
                format!("DROP INDEX IF EXISTS {}", printed_by_server(name)?),
                self.dropped(
                    format!("index {name}"),
                    "its expressions would have run as the owner (ANALYZE, VACUUM, REINDEX)",
                ),
            ),
            ("constraint", Some(table)) => change(
                format!(
                    "ALTER TABLE {} DROP CONSTRAINT IF EXISTS {} CASCADE",
                    printed_by_server(table)?,
                    quote_ident(name)?
                ),
                self.dropped(
                    format!("constraint {name} on {table}"),
                    "its index expressions would have run as the owner",
                ),
            ),
            ("statistics", Some(object)) => change(
                format!(
                    "DROP STATISTICS IF EXISTS {}.{}",
                    quote_ident(name)?,
                    quote_ident(object)?
                ),
                self.dropped(
                    format!("statistics {name}.{object}"),
                    "its expressions would have run as the owner (ANALYZE)",
                ),
            ),
            ("large_object", _) => {
                // An oid: digits only, or the row is not ours.
                let Ok(oid) = name.parse::<u32>() else {
                    return Ok(None);
                };
                change(
                    format!("SELECT pg_catalog.lo_unlink({oid})"),
                    self.dropped(
                        format!("large object {oid}"),
                        "a session's large objects are not handed over (keep_large_objects)",
                    ),
                )
            }
            _ => return Ok(None),
        }))
    }
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
            match (kind.as_str(), detail) {
                ("prepared", Some(db)) => plan.prepared.push(Prepared {
                    role,
                    database: db,
                    gid: name,
                }),
                ("database", _) => {
                    plan.other_databases.entry(name).or_default().insert(role);
                }
                ("acl_owner", Some(db)) => {
                    plan.grantors.entry(db).or_default().insert(name);
                }
                (kind, detail) => {
                    let object = Found {
                        database,
                        kind,
                        name: &name,
                        detail: detail.as_deref(),
                    };
                    let change = match object.runs_as_owner(server_version)? {
                        Some(change) => Some(change),
                        None => object.expression()?,
                    };
                    if let Some(change) = change {
                        plan.changes.entry(role).or_default().push(change);
                    }
                }
            }
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
