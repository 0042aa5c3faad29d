//! The engine's steps against the ledger and the role, each one
//! transaction.

use ephemera_engine::{EngineError, Lease, LeaseComment, LeaseKind, ScramSecret};
use ephemera_engine_postgres::sql::{quote_ident, quote_literal};
use time::OffsetDateTime;
use tokio_postgres::Client;

use crate::ledger::{lease_json, unquotable, LEASES, ROLES, TURN_WAIT};
use crate::role::{close_sql, open_sql, rfc3339};
use crate::{failed, table};

/// Another lease of `lease.role` that handed a client a password and has
/// not expired: who holds it. (A standalone lease's holder logs in
/// whenever it likes, so nobody else may change the password under it.)
pub async fn standalone_holder(
    client: &Client,
    lease: &Lease,
) -> Result<Option<String>, EngineError> {
    let sql = format!(
        "SELECT lease FROM {} WHERE role = $1",
        table(LEASES).map_err(unquotable)?
    );
    let rows = client
        .query(&sql, &[&lease.role])
        .await
        .map_err(failed("read a static role's leases"))?;
    let now = OffsetDateTime::now_utc();
    Ok(rows
        .iter()
        .filter_map(|row| LeaseComment::from_json(row.get::<_, &str>(0)).ok())
        .find(|other| other.kind == LeaseKind::Standalone && other.expires_at > now)
        .map(|other| other.identity))
}

/// Record the lease and open the role to `secret` until `valid_until`,
/// one transaction: a lease that opened the role is always in the ledger.
pub async fn record_and_open(
    client: &mut Client,
    lease: &Lease,
    secret: &ScramSecret,
    valid_until: OffsetDateTime,
) -> Result<(), EngineError> {
    let action = "check out a static role";
    let insert = format!(
        "INSERT INTO {} (lease_id, role, lease) VALUES ($1, $2, $3)",
        table(LEASES).map_err(unquotable)?
    );
    let open = open_sql(&lease.role, secret, valid_until).map_err(unquotable)?;
    let tx = client.transaction().await.map_err(failed(action))?;
    tx.execute(
        &insert,
        &[&lease.id.to_string(), &lease.role, &lease_json(lease)],
    )
    .await
    .map_err(failed(action))?;
    tx.batch_execute(&open).await.map_err(failed(action))?;
    tx.commit().await.map_err(failed(action))
}

pub async fn renew(client: &mut Client, lease: &Lease) -> Result<(), EngineError> {
    let action = "renew a static lease";
    let update = format!(
        "UPDATE {} SET lease = $2 WHERE lease_id = $1",
        table(LEASES).map_err(unquotable)?
    );
    let tx = client.transaction().await.map_err(failed(action))?;
    let updated = tx
        .execute(&update, &[&lease.id.to_string(), &lease_json(lease)])
        .await
        .map_err(failed(action))?;
    if updated == 0 {
        return Err(EngineError::Gone(lease.role.clone()));
    }
    if lease.kind == LeaseKind::Standalone {
        let sql = format!(
            "ALTER ROLE {} VALID UNTIL {};\n",
            quote_ident(&lease.role).map_err(unquotable)?,
            quote_literal(&rfc3339(lease.expires_at)).map_err(unquotable)?
        );
        tx.batch_execute(&sql).await.map_err(failed(action))?;
    }
    tx.commit().await.map_err(failed(action))
}

/// On the turn's connection (its transaction began before the login):
/// the role's one backend that started since, and is no other lease's, is
/// this lease's. Record it, close the role, commit (which gives the turn
/// back).
pub async fn record_backend(
    client: &Client,
    lease: &Lease,
    rotate: bool,
) -> Result<(), EngineError> {
    let action = "record a static lease's backend";
    let leases = table(LEASES).map_err(unquotable)?;
    let sql = format!(
        "UPDATE {leases} l SET (backend_pid, backend_start) = (
             SELECT s.pid, s.backend_start
               FROM pg_catalog.pg_stat_get_activity(NULL) s
              WHERE s.usesysid = (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = $2)
                AND s.backend_start >= pg_catalog.now()
                AND s.pid NOT IN (SELECT o.backend_pid FROM {leases} o
                                   WHERE o.role = $2 AND o.backend_pid IS NOT NULL)
              ORDER BY s.backend_start DESC LIMIT 1)
          WHERE l.lease_id = $1
          RETURNING l.backend_pid"
    );
    // pg_stat_activity shows a backend's start time only to those with
    // its role's privileges: ours for this transaction only, if need be.
    let member: bool = client
        .query_one(
            "SELECT pg_catalog.pg_has_role(current_user, $1, 'USAGE')",
            &[&lease.role],
        )
        .await
        .map_err(failed(action))?
        .get(0);
    let role = quote_ident(&lease.role).map_err(unquotable)?;
    if !member {
        client
            .batch_execute(&format!("GRANT {role} TO CURRENT_USER"))
            .await
            .map_err(failed(action))?;
    }
    let row = client
        .query_opt(&sql, &[&lease.id.to_string(), &lease.role])
        .await
        .map_err(failed(action))?;
    if !member {
        client
            .batch_execute(&format!("REVOKE {role} FROM CURRENT_USER"))
            .await
            .map_err(failed(action))?;
    }
    let pid: Option<i32> = row.and_then(|row| row.get(0));
    if pid.is_none() {
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(EngineError::refused(
            action,
            None,
            format!(
                "Ephemera's backend as {:?} is not in pg_stat_activity, so revoking this lease \
                 could not end it; refusing the session",
                lease.role
            ),
        ));
    }
    let mut close = close_sql(&lease.role, rotate).map_err(unquotable)?;
    close.push_str("COMMIT;\n");
    client.batch_execute(&close).await.map_err(failed(action))
}

/// What [`revoke`] did.
pub enum Revoked {
    /// The lease was not (any more) in the ledger.
    NotInLedger,
    /// Its backend is gone; other leases keep the role.
    Ended,
    /// Its backend is gone and the role is closed, with a verifier nobody
    /// holds.
    Closed,
}

/// Take the role's turn, take the lease out of the ledger, terminate its
/// backend (a standalone lease's: those of the role that started since it
/// was issued and are no other lease's), and close the role if that was
/// its last lease (or the one whose holder had a password, or per-lease
/// keys are in use), one transaction.
pub async fn revoke(
    client: &mut Client,
    lease: &Lease,
    per_lease: bool,
) -> Result<Revoked, EngineError> {
    let action = "revoke a static lease";
    let (leases, roles) = (
        table(LEASES).map_err(unquotable)?,
        table(ROLES).map_err(unquotable)?,
    );
    let tx = client.transaction().await.map_err(failed(action))?;
    tx.batch_execute(&format!(
        "SELECT pg_catalog.set_config('lock_timeout', '{TURN_WAIT}', true)"
    ))
    .await
    .map_err(failed(action))?;
    tx.execute(
        &format!("SELECT 1 FROM {roles} WHERE role = $1 FOR NO KEY UPDATE"),
        &[&lease.role],
    )
    .await
    .map_err(failed(action))?;
    let deleted = tx
        .query_opt(
            &format!(
                "DELETE FROM {leases} WHERE lease_id = $1 RETURNING backend_pid, backend_start::text"
            ),
            &[&lease.id.to_string()],
        )
        .await
        .map_err(failed(action))?;
    let Some(deleted) = deleted else {
        tx.commit().await.map_err(failed(action))?;
        return Ok(Revoked::NotInLedger);
    };
    let (pid, started): (Option<i32>, Option<String>) = (deleted.get(0), deleted.get(1));
    let member = tx
        .query_opt(
            "SELECT pg_catalog.pg_has_role(current_user, oid, 'USAGE')
               FROM pg_catalog.pg_roles WHERE rolname = $1",
            &[&lease.role],
        )
        .await
        .map_err(failed(action))?;
    let Some(member) = member.map(|row| row.get::<_, bool>(0)) else {
        // The role was dropped by someone else: nothing to end or close.
        tx.commit().await.map_err(failed(action))?;
        return Ok(Revoked::Ended);
    };
    end_backends(&tx, lease, member, pid, started).await?;
    let remaining: i64 = tx
        .query_one(
            &format!("SELECT count(*) FROM {leases} WHERE role = $1"),
            &[&lease.role],
        )
        .await
        .map_err(failed(action))?
        .get(0);
    let close = remaining == 0 || lease.kind == LeaseKind::Standalone || per_lease;
    if close {
        let sql = close_sql(&lease.role, true).map_err(unquotable)?;
        tx.batch_execute(&sql).await.map_err(failed(action))?;
    }
    tx.commit().await.map_err(failed(action))?;
    Ok(if close {
        Revoked::Closed
    } else {
        Revoked::Ended
    })
}

/// Terminate the revoked lease's backends (see [`revoke`]), as a member of
/// its role for this transaction only, unless the admin is one already.
async fn end_backends(
    tx: &tokio_postgres::Transaction<'_>,
    lease: &Lease,
    member: bool,
    pid: Option<i32>,
    started: Option<String>,
) -> Result<(), EngineError> {
    let action = "revoke a static lease";
    let leases = table(LEASES).map_err(unquotable)?;
    let role = quote_ident(&lease.role).map_err(unquotable)?;
    if !member {
        tx.batch_execute(&format!("GRANT {role} TO CURRENT_USER"))
            .await
            .map_err(failed(action))?;
    }
    let terminate = format!(
        "SELECT count(pg_catalog.pg_terminate_backend(s.pid, 5000))
           FROM pg_catalog.pg_stat_get_activity(NULL) s
          WHERE s.usesysid = (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = $1)
            AND CASE WHEN $2::boolean
                     THEN s.pid = $3::integer AND s.backend_start = ($4::text)::timestamptz
                     ELSE s.backend_start >= ($5::text)::timestamptz
                          AND s.pid NOT IN (SELECT o.backend_pid FROM {leases} o
                                             WHERE o.role = $1 AND o.backend_pid IS NOT NULL)
                END"
    );
    let session = lease.kind == LeaseKind::Session;
    if !session || pid.is_some() {
        tx.query_one(
            &terminate,
            &[
                &lease.role,
                &session,
                &pid,
                &started,
                &rfc3339(lease.issued_at),
            ],
        )
        .await
        .map_err(failed(action))?;
    }
    if !member {
        tx.batch_execute(&format!("REVOKE {role} FROM CURRENT_USER"))
            .await
            .map_err(failed(action))?;
    }
    Ok(())
}
