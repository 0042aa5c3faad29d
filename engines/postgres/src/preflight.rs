//! `ephemera check-config --connect` for the postgres engine: what only the
//! upstream can tell.
//!
//! Can the admin role log in? Does it have CREATEROLE? Is the reaper
//! election's schema the admin's? Do the templates' databases, group roles
//! and owners exist, and may the admin grant the groups (PostgreSQL 16+:
//! ADMIN OPTION) and reassign to the owners? Every problem comes back with
//! the key it concerns and what to do; a query that fails says so, with the
//! server's message, rather than passing for "does not exist". With
//! `upstream.login = "certificate"`, a probe role logs in with a certificate
//! from the login CA (`login_probe.rs`).

use ephemera_engine::{AdminLogin, EngineSetup, KeyProblem, Preflight};
use tokio_postgres::Client;

use crate::{admin, election, role_templates, RoleTemplate};

/// How many objects a warning names before it says "and N more".
const EXAMPLES: usize = 5;

pub(crate) async fn preflight(setup: &EngineSetup) -> Preflight {
    let templates = match role_templates(&setup.templates) {
        Ok(templates) => templates,
        Err(e) => {
            return Preflight {
                problems: vec![KeyProblem::new("templates", e.to_string())],
                warnings: Vec::new(),
            }
        }
    };
    let mut templates: Vec<RoleTemplate> = templates.into_values().collect();
    templates.sort_by(|a, b| a.name.cmp(&b.name));
    let mut check = Preflight {
        problems: check_admin_and_templates(setup, &templates).await,
        warnings: Vec::new(),
    };
    // upstream.login = "certificate": does PostgreSQL take the certificate?
    check
        .problems
        .extend(crate::login_probe::check(setup, &templates).await);
    if check.problems.is_empty() {
        check.warnings = owner_ceiling_warnings(setup, &templates).await;
    }
    check
}

async fn check_admin_and_templates(
    setup: &EngineSetup,
    templates: &[RoleTemplate],
) -> Vec<KeyProblem> {
    let admin = &setup.admin;
    let client = match admin::connect(
        &setup.upstream,
        admin,
        &admin.database,
        "log in as the admin role",
    )
    .await
    {
        Ok(client) => client,
        Err(e) => {
            return vec![KeyProblem::new(
                "upstream",
                format!(
                    "cannot log in to {} (database {:?}) as {:?}: {e}; check upstream.host, port, sslmode, admin_user and admin_password_file, and that PostgreSQL is running",
                    setup.upstream.address(), admin.database, admin.user
                ),
            )];
        }
    };
    let mut problems = Vec::new();
    let version = match check_admin_role(&client, admin, &mut problems).await {
        Some(version) => version,
        None => return problems,
    };
    check_election_schema(&client, admin, &mut problems).await;
    let checker = Checker {
        client: &client,
        admin,
        version,
        address: setup.upstream.address(),
    };
    for template in templates {
        checker.template(template, &mut problems).await;
    }
    problems
}

/// CREATEROLE, and the server version (`None`: the role cannot be inspected).
async fn check_admin_role(
    client: &Client,
    admin: &AdminLogin,
    problems: &mut Vec<KeyProblem>,
) -> Option<i32> {
    let row = client
        .query_one(
            "SELECT rolcreaterole OR rolsuper, current_setting('server_version_num')::int
             FROM pg_catalog.pg_roles WHERE rolname = current_user",
            &[],
        )
        .await;
    let row = match row {
        Ok(row) => row,
        Err(e) => {
            problems.push(KeyProblem::new(
                "upstream",
                format!("cannot inspect the admin role: {}", db_message(&e)),
            ));
            return None;
        }
    };
    let (can_create, version): (bool, i32) = (row.get(0), row.get(1));
    if !can_create {
        problems.push(KeyProblem::new(
            "upstream.admin_user",
            format!(
                "{:?} lacks CREATEROLE; run: ALTER ROLE \"{}\" CREATEROLE",
                admin.user, admin.user
            ),
        ));
    }
    Some(version)
}

/// The reaper election's schema (SECURITY.md, finding 1).
async fn check_election_schema(
    client: &Client,
    admin: &AdminLogin,
    problems: &mut Vec<KeyProblem>,
) {
    let schema = election::SCHEMA;
    let row = client
        .query_one(
            "SELECT (SELECT pg_catalog.pg_get_userbyid(nspowner)::text
                       FROM pg_catalog.pg_namespace WHERE nspname = $1),
                    pg_catalog.has_database_privilege(pg_catalog.current_database(), 'CREATE')",
            &[&schema],
        )
        .await;
    let row = match row {
        Ok(row) => row,
        Err(e) => {
            problems.push(KeyProblem::new(
                "upstream",
                format!("cannot inspect the admin database: {}", db_message(&e)),
            ));
            return;
        }
    };
    let (owner, may_create): (Option<String>, bool) = (row.get(0), row.get(1));
    let fix = format!(
        "as a superuser, in database {:?}: CREATE SCHEMA {schema} AUTHORIZATION \"{}\"; \
         REVOKE ALL ON SCHEMA {schema} FROM PUBLIC",
        admin.database, admin.user
    );
    match owner {
        None if !may_create => problems.push(KeyProblem::new(
            "upstream.admin_database",
            format!("the reaper election needs the schema \"{schema}\", which does not exist and {:?} may not create; {fix}", admin.user),
        )),
        Some(owner) if owner != admin.user => problems.push(KeyProblem::new(
            "upstream.admin_database",
            format!("the schema \"{schema}\" belongs to {owner:?}, who could hold the reaper election; it must be {:?}'s alone: ALTER SCHEMA {schema} OWNER TO \"{}\" (or drop it and {fix})", admin.user, admin.user),
        )),
        _ => {}
    }
}

/// Checks of one template's names against the catalog.
struct Checker<'a> {
    client: &'a Client,
    admin: &'a AdminLogin,
    version: i32,
    address: String,
}

impl Checker<'_> {
    /// Does `sql` (with `$1` = `name`) return a row? A failed query is a
    /// problem of its own, reported under `key` with the server's message.
    async fn exists(
        &self,
        sql: &str,
        name: &str,
        key: &str,
        problems: &mut Vec<KeyProblem>,
    ) -> Option<bool> {
        match self.client.query_opt(sql, &[&name]).await {
            Ok(row) => Some(row.is_some()),
            Err(e) => {
                problems.push(KeyProblem::new(
                    key,
                    format!(
                        "cannot check {name:?} on {}: {}",
                        self.address,
                        db_message(&e)
                    ),
                ));
                None
            }
        }
    }

    async fn template(&self, template: &RoleTemplate, problems: &mut Vec<KeyProblem>) {
        let key = format!("templates.{}", template.name);
        let database_key = format!("{key}.database");
        let found = self
            .exists(
                "SELECT 1 FROM pg_catalog.pg_database WHERE datname = $1",
                &template.database,
                &database_key,
                problems,
            )
            .await;
        if found == Some(false) {
            problems.push(KeyProblem::new(
                database_key,
                format!(
                    "database {:?} does not exist on {}; create it or fix the name",
                    template.database, self.address
                ),
            ));
        }
        for (i, group) in template.member_of.iter().enumerate() {
            self.group(&format!("{key}.member_of[{i}]"), group, problems)
                .await;
        }
        if let Some(owner) = &template.owner {
            self.owner(&format!("{key}.owner"), owner, problems).await;
        }
    }

    async fn group(&self, key: &str, group: &str, problems: &mut Vec<KeyProblem>) {
        let missing = format!("group role {group:?} does not exist; run: CREATE ROLE \"{group}\" NOLOGIN, and grant it the privileges sessions need");
        // PostgreSQL 16+ grants a role only with ADMIN OPTION on it.
        let needs = (self.version >= 160_000).then(|| Membership {
            sql: "SELECT 1 WHERE pg_catalog.pg_has_role(current_user, $1, 'MEMBER WITH ADMIN OPTION')",
            fix: format!("PostgreSQL 16+ needs ADMIN OPTION to grant {group:?}; run: GRANT \"{group}\" TO \"{}\" WITH ADMIN OPTION", self.admin.user),
        });
        self.role(key, group, missing, needs, problems).await;
    }

    async fn owner(&self, key: &str, owner: &str, problems: &mut Vec<KeyProblem>) {
        let missing = format!("role {owner:?} does not exist; create it or remove `owner`");
        let needs = Some(Membership {
            sql: "SELECT 1 WHERE pg_catalog.pg_has_role(current_user, $1, 'MEMBER')",
            fix: format!("REASSIGN OWNED to {owner:?} needs the admin role to be a member; run: GRANT \"{owner}\" TO \"{}\"", self.admin.user),
        });
        self.role(key, owner, missing, needs, problems).await;
    }

    /// Does `role` exist, and (if it does) has the admin role the
    /// membership `needs` asks for? Each "no" is a problem under `key`.
    async fn role(
        &self,
        key: &str,
        role: &str,
        missing: String,
        needs: Option<Membership>,
        problems: &mut Vec<KeyProblem>,
    ) {
        let role_exists = "SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1";
        match self.exists(role_exists, role, key, problems).await {
            Some(false) => problems.push(KeyProblem::new(key, missing)),
            Some(true) => {
                let Some(needs) = needs else { return };
                if self.exists(needs.sql, role, key, problems).await == Some(false) {
                    problems.push(KeyProblem::new(key, needs.fix));
                }
            }
            None => {}
        }
    }
}

/// A membership the admin role needs in a role, and what to run if not.
struct Membership {
    sql: &'static str,
    fix: String,
}

/// What the owner may do, on the template's database, that the groups may
/// not (one line per object and privilege).
const OWNER_CEILING_SQL: &str = "SELECT o.kind || ' ' || o.name || ': ' || o.priv
   FROM (
     SELECT 'table' AS kind, c.oid::pg_catalog.regclass::text AS name, p.priv,
            pg_catalog.has_table_privilege($1, c.oid, p.priv) AS owner_may,
            EXISTS (SELECT 1 FROM unnest($2::text[]) g
                     WHERE pg_catalog.has_table_privilege(g, c.oid, p.priv)) AS groups_may
       FROM pg_catalog.pg_class c
       JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
      CROSS JOIN unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE']) p(priv)
      WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
        AND n.nspname NOT IN ('pg_catalog', 'information_schema')
        AND n.nspname NOT LIKE 'pg\\_toast%'
     UNION ALL
     SELECT 'schema', pg_catalog.quote_ident(n.nspname), p.priv,
            pg_catalog.has_schema_privilege($1, n.oid, p.priv),
            EXISTS (SELECT 1 FROM unnest($2::text[]) g
                     WHERE pg_catalog.has_schema_privilege(g, n.oid, p.priv))
       FROM pg_catalog.pg_namespace n
      CROSS JOIN unnest(ARRAY['USAGE', 'CREATE']) p(priv)
      WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
        AND n.nspname NOT LIKE 'pg\\_%'
   ) o
  WHERE o.owner_may AND NOT o.groups_may
  ORDER BY 1";

/// `owner` is the privilege ceiling of every session: whatever a session
/// leaves behind is handed to it (SECURITY.md, finding 2). Warn where the
/// owner may do, on the template's database, what the `member_of` groups
/// may not.
async fn owner_ceiling_warnings(
    setup: &EngineSetup,
    templates: &[RoleTemplate],
) -> Vec<KeyProblem> {
    let mut warnings = Vec::new();
    for template in templates {
        let Some(owner) = &template.owner else {
            continue;
        };
        let key = format!("templates.{}.owner", template.name);
        let cannot = |reason: String| {
            KeyProblem::new(
                key.clone(),
                format!("cannot compare the owner's privileges with the groups': {reason}"),
            )
        };
        let client = match admin::connect(
            &setup.upstream,
            &setup.admin,
            &template.database,
            "log in as the admin role",
        )
        .await
        {
            Ok(client) => client,
            Err(e) => {
                warnings.push(cannot(e.to_string()));
                continue;
            }
        };
        match client
            .query(OWNER_CEILING_SQL, &[owner, &template.member_of])
            .await
        {
            Ok(rows) if rows.is_empty() => {}
            Ok(rows) => {
                let mut examples: Vec<String> =
                    rows.iter().take(EXAMPLES).map(|r| r.get(0)).collect();
                if rows.len() > EXAMPLES {
                    examples.push(format!("and {} more", rows.len() - EXAMPLES));
                }
                warnings.push(KeyProblem::new(
                    key.clone(),
                    format!(
                        "{owner:?} may do what the member_of groups may not ({}); a session's \
                         objects are handed to {owner:?}, so the owner is the privilege ceiling \
                         of every session (docs/templates.md): use an owner with no more than \
                         the groups' privileges",
                        examples.join(", ")
                    ),
                ));
            }
            Err(e) => warnings.push(cannot(db_message(&e))),
        }
    }
    warnings
}

fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}
