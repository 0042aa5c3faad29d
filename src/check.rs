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

/// Connect as the admin role and check what the templates need.
pub async fn check_upstream(settings: &Settings) -> Vec<ConfigProblem> {
    let admin = &settings.engine.admin;
    let address = settings.upstream.address();
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
