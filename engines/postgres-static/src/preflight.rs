//! `ephemera check-config --connect` for the postgres-static engine.
//!
//! For each template: does its database exist; does its role exist, may it
//! log in, is it no superuser; may the admin role `ALTER ROLE` it
//! (CREATEROLE, and on PostgreSQL 16+ ADMIN OPTION on it); and, as a
//! warning for the DBA to read, what the role owns in the template's
//! database (what the application will touch as it).

use ephemera_engine::{AdminLogin, EngineSetup, KeyProblem, Preflight};
use ephemera_engine_postgres::admin;
use tokio_postgres::Client;

use crate::{static_templates, StaticTemplate};

/// How many owned objects the warning names before "and N more".
const EXAMPLES: usize = 5;

pub(crate) async fn preflight(setup: &EngineSetup) -> Preflight {
    let mut check = Preflight::default();
    let templates = match static_templates(&setup.templates) {
        Ok(templates) => templates,
        Err(e) => {
            check
                .problems
                .push(KeyProblem::new("templates", e.to_string()));
            return check;
        }
    };
    let mut templates: Vec<StaticTemplate> = templates.into_values().collect();
    templates.sort_by(|a, b| a.name.cmp(&b.name));
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
            check.problems.push(KeyProblem::new(
                "upstream",
                format!(
                    "cannot log in to {} (database {:?}) as {:?}: {e}",
                    setup.upstream.address(),
                    admin.database,
                    admin.user
                ),
            ));
            return check;
        }
    };
    for template in &templates {
        role_problems(&client, admin, template, &mut check.problems).await;
    }
    if check.problems.is_empty() {
        for template in &templates {
            if let Some(warning) = owned_objects(setup, template).await {
                check.warnings.push(warning);
            }
        }
    }
    check
}

/// What `role` is, and what the admin may do to it: one row, or none if
/// the role does not exist.
const ROLE_SQL: &str = "SELECT r.rolcanlogin, r.rolsuper,
        (SELECT a.rolsuper FROM pg_catalog.pg_roles a WHERE a.rolname = current_user),
        (SELECT a.rolcreaterole FROM pg_catalog.pg_roles a WHERE a.rolname = current_user),
        pg_catalog.current_setting('server_version_num')::integer >= 160000,
        pg_catalog.pg_has_role(current_user, r.oid, 'MEMBER WITH ADMIN OPTION'),
        EXISTS (SELECT 1 FROM pg_catalog.pg_database WHERE datname = $2)
   FROM pg_catalog.pg_roles r WHERE r.rolname = $1";

async fn role_problems(
    client: &Client,
    admin: &AdminLogin,
    template: &StaticTemplate,
    problems: &mut Vec<KeyProblem>,
) {
    let key = format!("templates.{}", template.name);
    let role_key = format!("{key}.role");
    let role = &template.role;
    let row = match client
        .query_opt(ROLE_SQL, &[role, &template.database])
        .await
    {
        Ok(row) => row,
        Err(e) => {
            problems.push(KeyProblem::new(
                role_key,
                format!("cannot inspect role {role:?}: {e}"),
            ));
            return;
        }
    };
    let Some(row) = row else {
        problems.push(KeyProblem::new(
            role_key,
            format!(
                "role {role:?} does not exist; this engine never creates roles: name an existing \
                 LOGIN role, or use the postgres engine to mint one per session"
            ),
        ));
        return;
    };
    let get = |i: usize| row.get::<_, Option<bool>>(i).unwrap_or(false);
    let (can_login, is_super, admin_super, admin_createrole, pg16, admin_option, database) =
        (get(0), get(1), get(2), get(3), get(4), get(5), get(6));
    if !database {
        problems.push(KeyProblem::new(
            format!("{key}.database"),
            format!(
                "database {:?} does not exist; create it or fix the name",
                template.database
            ),
        ));
    }
    if !can_login {
        problems.push(KeyProblem::new(
            role_key.clone(),
            format!("role {role:?} cannot log in; run: ALTER ROLE \"{role}\" LOGIN"),
        ));
    }
    if is_super {
        problems.push(KeyProblem::new(
            role_key.clone(),
            format!(
                "role {role:?} is a superuser: Ephemera does not hand out superuser logins, and \
                 a CREATEROLE admin could not change its password anyway"
            ),
        ));
        return;
    }
    if admin_super {
        return;
    }
    if !admin_createrole {
        problems.push(KeyProblem::new(
            "upstream.admin_user",
            format!(
                "{:?} lacks CREATEROLE, which ALTER ROLE \"{role}\" PASSWORD needs; run: \
                 ALTER ROLE \"{}\" CREATEROLE",
                admin.user, admin.user
            ),
        ));
    } else if pg16 && !admin_option {
        problems.push(KeyProblem::new(
            role_key,
            format!(
                "PostgreSQL 16+ lets {:?} ALTER ROLE \"{role}\" only with ADMIN OPTION on it; \
                 run: GRANT \"{role}\" TO \"{}\" WITH ADMIN OPTION",
                admin.user, admin.user
            ),
        ));
    }
}

/// What `role` owns in the template's database, one line per object.
const OWNED_SQL: &str = "SELECT o.kind || ' ' || o.name FROM (
     SELECT CASE c.relkind WHEN 'r' THEN 'table' WHEN 'p' THEN 'table' WHEN 'v' THEN 'view'
                 WHEN 'm' THEN 'materialized view' WHEN 'S' THEN 'sequence'
                 WHEN 'f' THEN 'foreign table' ELSE 'relation' END AS kind,
            c.oid::pg_catalog.regclass::text AS name
       FROM pg_catalog.pg_class c
      WHERE c.relowner = (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = $1)
        AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
     UNION ALL
     SELECT 'schema', pg_catalog.quote_ident(n.nspname) FROM pg_catalog.pg_namespace n
      WHERE n.nspowner = (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = $1)
     UNION ALL
     SELECT 'function', p.oid::pg_catalog.regprocedure::text FROM pg_catalog.pg_proc p
      WHERE p.proowner = (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = $1)
   ) o ORDER BY 1";

/// A warning naming what the role owns (or that it owns nothing there).
async fn owned_objects(setup: &EngineSetup, template: &StaticTemplate) -> Option<KeyProblem> {
    let key = format!("templates.{}.role", template.name);
    let role = &template.role;
    let client = admin::connect(
        &setup.upstream,
        &setup.admin,
        &template.database,
        "log in as the admin role",
    )
    .await;
    let rows = match client {
        Ok(client) => client.query(OWNED_SQL, &[role]).await,
        Err(e) => {
            return Some(KeyProblem::new(
                key,
                format!("cannot list what {role:?} owns: {e}"),
            ))
        }
    };
    let rows = match rows {
        Ok(rows) => rows,
        Err(e) => {
            return Some(KeyProblem::new(
                key,
                format!("cannot list what {role:?} owns: {e}"),
            ))
        }
    };
    let mut names: Vec<String> = rows.iter().take(EXAMPLES).map(|r| r.get(0)).collect();
    if rows.len() > EXAMPLES {
        names.push(format!("and {} more", rows.len() - EXAMPLES));
    }
    let owned = if names.is_empty() {
        "nothing".to_owned()
    } else {
        names.join(", ")
    };
    Some(KeyProblem::new(
        key,
        format!(
            "sessions of this template are {role:?} itself; in database {:?} it owns {owned} \
             (Ephemera never changes the role's objects or grants)",
            template.database
        ),
    ))
}
