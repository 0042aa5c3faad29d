//! `ephemera check-config --connect`: what only the upstream can tell.
//!
//! Can the admin role log in? Does it have CREATEROLE? Do the templates'
//! databases, group roles and owners exist, and may the admin grant the
//! groups (PostgreSQL 16+: ADMIN OPTION) and reassign to the owners?
//! Every problem comes back with the key it concerns and what to do.

use std::time::Duration;

use crate::config::{ConfigProblem, Settings};

fn problem(key: impl Into<String>, message: impl Into<String>) -> ConfigProblem {
    ConfigProblem {
        key: key.into(),
        message: message.into(),
    }
}

/// What `--connect` found: problems fail the check, warnings do not.
#[derive(Debug, Default)]
pub struct UpstreamCheck {
    pub problems: Vec<ConfigProblem>,
    pub warnings: Vec<ConfigProblem>,
}

/// Connect as the admin role and check what the templates need.
pub async fn check_upstream(settings: &Settings) -> UpstreamCheck {
    let mut check = UpstreamCheck {
        problems: check_admin_and_templates(settings).await,
        warnings: Vec::new(),
    };
    if check.problems.is_empty() {
        check.warnings = owner_ceiling_warnings(settings).await;
    }
    check
}

/// How many objects a warning names before it says "and N more".
const EXAMPLES: usize = 5;

/// `owner` is the privilege ceiling of every session: whatever a session
/// leaves behind is handed to it (SECURITY.md, finding 2). Warn where the
/// owner may do, on the template's database, what the `member_of` groups
/// may not.
async fn owner_ceiling_warnings(settings: &Settings) -> Vec<ConfigProblem> {
    let mut warnings = Vec::new();
    for template in &settings.engine.templates {
        let Some(owner) = &template.owner else {
            continue;
        };
        let key = format!("templates.{}.owner", template.name);
        let client = match connect(settings, &template.database).await {
            Ok(client) => client,
            Err(reason) => {
                warnings.push(problem(
                    key,
                    format!("cannot compare the owner's privileges with the groups': {reason}"),
                ));
                continue;
            }
        };
        let rows = client
            .query(
                "SELECT o.kind || ' ' || o.name || ': ' || o.priv
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
                  ORDER BY 1",
                &[owner, &template.member_of],
            )
            .await;
        match rows {
            Ok(rows) if rows.is_empty() => {}
            Ok(rows) => {
                let mut examples: Vec<String> =
                    rows.iter().take(EXAMPLES).map(|r| r.get(0)).collect();
                if rows.len() > EXAMPLES {
                    examples.push(format!("and {} more", rows.len() - EXAMPLES));
                }
                warnings.push(problem(
                    key,
                    format!(
                        "{owner:?} may do what the member_of groups may not ({}); a session's \
                         objects are handed to {owner:?}, so the owner is the privilege ceiling \
                         of every session (docs/templates.md): use an owner with no more than \
                         the groups' privileges",
                        examples.join(", ")
                    ),
                ));
            }
            Err(e) => warnings.push(problem(
                key,
                format!(
                    "cannot compare the owner's privileges with the groups': {}",
                    db_message(&e)
                ),
            )),
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

/// A connection as the admin role to `database`.
async fn connect(settings: &Settings, database: &str) -> Result<tokio_postgres::Client, String> {
    let admin = &settings.engine.admin;
    let mut config = admin_config(settings);
    config.dbname(database);
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new((*admin.tls.client_config()).clone());
    let (client, connection) = config.connect(tls).await.map_err(|e| db_message(&e))?;
    tokio::spawn(connection);
    Ok(client)
}

fn admin_config(settings: &Settings) -> tokio_postgres::Config {
    let admin = &settings.engine.admin;
    let mut config = tokio_postgres::Config::new();
    config
        .host(&admin.host)
        .port(admin.port)
        .user(&admin.user)
        .password(admin.password.expose())
        .dbname(&admin.database)
        .application_name("ephemera check-config")
        .ssl_mode(match admin.tls.mode {
            ephemera_engine_postgres::SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            _ => tokio_postgres::config::SslMode::Require,
        })
        .connect_timeout(Duration::from_secs(10));
    config
}

async fn check_admin_and_templates(settings: &Settings) -> Vec<ConfigProblem> {
    let admin = &settings.engine.admin;
    let address = settings.upstream.address();
    let config = admin_config(settings);
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new((*admin.tls.client_config()).clone());
    let client = match config.connect(tls).await {
        Ok((client, connection)) => {
            tokio::spawn(connection);
            client
        }
        Err(e) => {
            let reason = match e.as_db_error() {
                Some(db) => db.message().to_owned(),
                None => e.to_string(),
            };
            return vec![problem(
                "upstream",
                format!(
                    "cannot log in to {address} (database {:?}) as {:?}: {reason}; check upstream.host, port, sslmode, admin_user and admin_password_file, and that PostgreSQL is running",
                    admin.database, admin.user
                ),
            )];
        }
    };
    let mut problems = Vec::new();
    let row = match client
        .query_one(
            "SELECT rolcreaterole OR rolsuper, current_setting('server_version_num')::int
             FROM pg_catalog.pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
    {
        Ok(row) => row,
        Err(e) => {
            return vec![problem(
                "upstream",
                format!("cannot inspect the admin role: {e}"),
            )]
        }
    };
    let (can_create, version): (bool, i32) = (row.get(0), row.get(1));
    if !can_create {
        problems.push(problem(
            "upstream.admin_user",
            format!(
                "{:?} lacks CREATEROLE; run: ALTER ROLE \"{}\" CREATEROLE",
                admin.user, admin.user
            ),
        ));
    }
    // The reaper election's schema (SECURITY.md, finding 1).
    match client
        .query_one(
            "SELECT (SELECT pg_catalog.pg_get_userbyid(nspowner)::text
                       FROM pg_catalog.pg_namespace WHERE nspname = 'ephemera'),
                    pg_catalog.has_database_privilege(pg_catalog.current_database(), 'CREATE')",
            &[],
        )
        .await
    {
        Ok(row) => {
            let (owner, may_create): (Option<String>, bool) = (row.get(0), row.get(1));
            let fix = format!(
                "as a superuser, in database {:?}: CREATE SCHEMA ephemera AUTHORIZATION \"{}\"; \
                 REVOKE ALL ON SCHEMA ephemera FROM PUBLIC",
                admin.database, admin.user
            );
            match owner {
                None if !may_create => problems.push(problem(
                    "upstream.admin_database",
                    format!("the reaper election needs the schema \"ephemera\", which does not exist and {:?} may not create; {fix}", admin.user),
                )),
                Some(owner) if owner != admin.user => problems.push(problem(
                    "upstream.admin_database",
                    format!("the schema \"ephemera\" belongs to {owner:?}, who could hold the reaper election; it must be {:?}'s alone: ALTER SCHEMA ephemera OWNER TO \"{}\" (or drop it and {fix})", admin.user, admin.user),
                )),
                _ => {}
            }
        }
        Err(e) => problems.push(problem(
            "upstream",
            format!("cannot inspect the admin database: {}", db_message(&e)),
        )),
    }
    for template in &settings.engine.templates {
        let key = format!("templates.{}", template.name);
        let exists = |sql: &'static str, name: String| {
            let client = &client;
            async move {
                client
                    .query_opt(sql, &[&name])
                    .await
                    .map(|row| row.is_some())
                    .unwrap_or(false)
            }
        };
        if !exists(
            "SELECT 1 FROM pg_catalog.pg_database WHERE datname = $1",
            template.database.clone(),
        )
        .await
        {
            problems.push(problem(
                format!("{key}.database"),
                format!(
                    "database {:?} does not exist on {address}; create it or fix the name",
                    template.database
                ),
            ));
        }
        for (i, group) in template.member_of.iter().enumerate() {
            if !exists("SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1", group.clone()).await {
                problems.push(problem(
                    format!("{key}.member_of[{i}]"),
                    format!("group role {group:?} does not exist; run: CREATE ROLE \"{group}\" NOLOGIN, and grant it the privileges sessions need"),
                ));
            } else if version >= 160_000
                && !exists(
                    "SELECT 1 WHERE pg_catalog.pg_has_role(current_user, $1, 'MEMBER WITH ADMIN OPTION')",
                    group.clone(),
                )
                .await
            {
                problems.push(problem(
                    format!("{key}.member_of[{i}]"),
                    format!("PostgreSQL 16+ needs ADMIN OPTION to grant {group:?}; run: GRANT \"{group}\" TO \"{}\" WITH ADMIN OPTION", admin.user),
                ));
            }
        }
        if let Some(owner) = &template.owner {
            if !exists(
                "SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1",
                owner.clone(),
            )
            .await
            {
                problems.push(problem(
                    format!("{key}.owner"),
                    format!("role {owner:?} does not exist; create it or remove `owner`"),
                ));
            } else if !exists(
                "SELECT 1 WHERE pg_catalog.pg_has_role(current_user, $1, 'MEMBER')",
                owner.clone(),
            )
            .await
            {
                problems.push(problem(
                    format!("{key}.owner"),
                    format!("REASSIGN OWNED to {owner:?} needs the admin role to be a member; run: GRANT \"{owner}\" TO \"{}\"", admin.user),
                ));
            }
        }
    }
    problems
}
