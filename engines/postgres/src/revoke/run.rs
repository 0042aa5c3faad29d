//! Running a revocation: the engine's steps, each a round trip or a
//! transaction, with the SQL from [`super`].

use std::collections::HashMap;

use ephemera_engine::{EngineError, Lease};

use super::{Plan, RoleToRevoke};
use crate::admin::{db_error, unquotable};
use crate::sql::{quote_ident, quote_literal};
use crate::template::RoleTemplate;
use crate::{revoke, PostgresEngine, UNDEFINED_OBJECT};

/// Why [`PostgresEngine::revoke_roles`] stopped.
pub(crate) enum RevokeError {
    /// Granting a role to ourselves failed with `undefined_object`: a role
    /// may be gone already (the client, to check which).
    Gone(deadpool_postgres::Object),
    Failed(EngineError),
}

impl From<EngineError> for RevokeError {
    fn from(e: EngineError) -> Self {
        RevokeError::Failed(e)
    }
}

impl PostgresEngine {
    pub(crate) async fn revoke_batch(
        &self,
        database: &str,
        leases: &[&Lease],
    ) -> Result<Plan, RevokeError> {
        // Cloned once per batch: the lock is not held across the awaits.
        let templates: HashMap<String, RoleTemplate> = {
            let all = self.templates.read().unwrap_or_else(|p| p.into_inner());
            leases
                .iter()
                .filter_map(|l| all.get(&l.template).map(|t| (t.name.clone(), t.clone())))
                .collect()
        };
        let roles: Vec<RoleToRevoke<'_>> = leases
            .iter()
            .map(|lease| RoleToRevoke {
                role: &lease.role,
                template: templates.get(&lease.template),
            })
            .collect();
        self.revoke_roles(database, &roles).await
    }

    /// The four steps of [`revoke`] for `roles`, all of `database`.
    pub(crate) async fn revoke_roles(
        &self,
        database: &str,
        roles: &[RoleToRevoke<'_>],
    ) -> Result<Plan, RevokeError> {
        let action = "revoke a role";
        let quoted = roles
            .iter()
            .map(|r| quote_ident(r.role))
            .collect::<Result<Vec<_>, _>>()
            .map_err(unquotable)?;
        let client = self.client(database, action).await?;
        // 1. and 2., one round trip: fence (membership, NOLOGIN), terminate
        // and wait, then read the plan with search_path empty so that its
        // names come out schema-qualified.
        let version = self.server_version(&client).await?;
        let mut sql = revoke::fence_sql(&quoted);
        sql.push_str(&revoke::terminate_sql(&quoted, revoke::Wait::ForExit).map_err(unquotable)?);
        sql.push_str("SET LOCAL search_path = '';\n");
        sql.push_str(&revoke::plan_sql(version, &revoke::plan_params(roles)).map_err(unquotable)?);
        let messages = match client.simple_query(&sql).await {
            Ok(messages) => messages,
            Err(e) if e.code().map(|c| c.code()) == Some(UNDEFINED_OBJECT) => {
                return Err(RevokeError::Gone(client));
            }
            Err(e) => return Err(db_error(action, e).into()),
        };
        let rows = messages.iter().filter_map(|message| match message {
            // The plan's rows have four columns; the terminations' one.
            tokio_postgres::SimpleQueryMessage::Row(row) if row.len() == 4 => Some([
                row.get(0).map(str::to_owned),
                row.get(1).map(str::to_owned),
                row.get(2).map(str::to_owned),
                row.get(3).map(str::to_owned),
            ]),
            _ => None,
        });
        let plan = Plan::from_rows(database, rows, version).map_err(unquotable)?;
        drop(client);
        // 3. Prepared transactions, then the other databases.
        for prepared in &plan.prepared {
            self.roll_back_prepared(prepared).await?;
        }
        for (other, roles) in &plan.other_databases {
            let sql =
                revoke::drop_elsewhere_sql(roles, plan.grantors.get(other)).map_err(unquotable)?;
            self.client(other, action)
                .await?
                .batch_execute(&sql)
                .await
                .map_err(|e| db_error("drop what a role owns in another database", e))?;
        }
        // 4. The handover and the drop, in one transaction.
        let sql = revoke::drop_sql(roles, &plan, database).map_err(unquotable)?;
        self.client(database, action)
            .await?
            .batch_execute(&sql)
            .await
            .map_err(|e| db_error(action, e))?;
        Ok(plan)
    }

    /// `ROLLBACK PREPARED` may only be run by the transaction's owner (or a
    /// superuser), outside a transaction block: as the role, one statement
    /// at a time, on a connection that is thrown away if anything fails.
    async fn roll_back_prepared(&self, prepared: &revoke::Prepared) -> Result<(), EngineError> {
        let action = "roll back a role's prepared transaction";
        let role = quote_ident(&prepared.role).map_err(unquotable)?;
        let gid = quote_literal(&prepared.gid).map_err(unquotable)?;
        let client = self.client(&prepared.database, action).await?;
        let result = async {
            client.batch_execute(&format!("SET ROLE {role}")).await?;
            let rolled_back = client
                .batch_execute(&format!("ROLLBACK PREPARED {gid}"))
                .await;
            client.batch_execute("RESET ROLE").await?;
            rolled_back
        }
        .await;
        match result {
            Ok(()) => Ok(()),
            // Finished by its 2PC manager in the meantime.
            Err(e) if e.code().map(|c| c.code()) == Some(UNDEFINED_OBJECT) => {
                let _ = client.batch_execute("RESET ROLE").await;
                Ok(())
            }
            Err(e) => {
                // Never lend out a connection that may still be the role.
                let _ = deadpool_postgres::Object::take(client);
                Err(db_error(action, e))
            }
        }
    }
}

pub(crate) async fn is_role_gone(client: &tokio_postgres::Client, role: &str) -> bool {
    matches!(
        client
            .query_opt(
                "SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1",
                &[&role]
            )
            .await,
        Ok(None)
    )
}
