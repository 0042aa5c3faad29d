//! The postgres-static engine (issue 18): sessions land as an existing
//! role, no clear password for it is ever sent, each lease's backend is
//! its own to end, and the role is closed with a verifier nobody holds
//! once its leases are over. (The crash and restart: `tests/static_crash.rs`.)
#![allow(clippy::unwrap_used, clippy::too_many_lines)] // a test: a panic is its failure message; scenarios read top to bottom

use crate::common;

use std::time::Duration;

use common::cluster;
use common::proxy::{
    admin_client, psql, start_proxy_with_extra_config, upstream, ProxyOptions, TestProxy, ADMIN_ID,
    ADMIN_USER, BILLING_ID, DATABASE, STRANGER_ID,
};
use ephemera::admin::api::LeaseFilter;
use ephemera_engine::{AdminLogin, EngineKind, EngineSetup, Password, Template, Upstream};
use ephemera_engine_postgres_static::{parse_template, StaticKind};

/// A LOGIN role of the DBA's, owning a table in `billing`, with a password
/// the test set (and nobody uses).
async fn legacy_role(role: &str) {
    let c = cluster();
    let verifier = postgres_protocol::password::scram_sha_256(b"the-dba-once-knew-this");
    c.exec_sql(
        "postgres",
        &format!("CREATE ROLE {role} LOGIN PASSWORD '{verifier}'"),
    )
    .await;
    c.exec_sql(
        DATABASE,
        &format!(
            "CREATE TABLE {role}_ledger (id int); INSERT INTO {role}_ledger VALUES (1), (2), (3);
             ALTER TABLE {role}_ledger OWNER TO {role};"
        ),
    )
    .await;
}

/// A proxy with template `template` checking out `role`, for
/// [`BILLING_ID`] and [`STRANGER_ID`].
async fn proxy_for(template: &str, role: &str, extra: &str) -> TestProxy {
    upstream().await;
    legacy_role(role).await;
    let mut options = ProxyOptions::templates(&[]);
    options.admin_listen = Some("127.0.0.1:0".into());
    start_proxy_with_extra_config(
        options,
        &format!(
            "[templates.{template}]\nengine = \"postgres-static\"\ndatabase = \"{DATABASE}\"\n\
             role = \"{role}\"\nttl = \"1m\"\n{extra}\n\
             [[policy]]\nspiffe_id = \"{BILLING_ID}\"\ntemplates = [\"{template}\"]\n\
             [[policy]]\nspiffe_id = \"{STRANGER_ID}\"\ntemplates = [\"{template}\"]\n"
        ),
    )
    .await
}

/// `rolpassword` (the verifier) and whether `VALID UNTIL` is past.
async fn authid(role: &str) -> (String, bool) {
    let row = cluster()
        .superuser("postgres")
        .await
        .query_one(
            "SELECT rolpassword, coalesce(rolvaliduntil < now(), false) FROM pg_authid WHERE rolname = $1",
            &[&role],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// The static leases of `role` in the ledger.
async fn ledger_rows(role: &str) -> i64 {
    cluster()
        .superuser("postgres")
        .await
        .query_one(
            "SELECT count(*) FROM ephemera.static_leases WHERE role = $1",
            &[&role],
        )
        .await
        .unwrap()
        .get(0)
}

async fn wait_for_ledger(role: &str, rows: i64) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while ledger_rows(role).await != rows {
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

/// Every `PASSWORD '…'` the server logged for `role` is a SCRAM verifier.
fn only_verifiers_logged_for(role: &str, log: &str) {
    for line in log.lines().filter(|l| l.contains(role)) {
        for (i, _) in line.match_indices("PASSWORD '") {
            assert!(
                line[i + 10..].starts_with("SCRAM-SHA-256$"),
                "a password that is not a verifier: {line}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_lands_as_the_static_role_and_leaves_it_closed_with_a_new_verifier() {
    let (template, role) = ("legacy_billing", "st_billing_app");
    let log_start = cluster().log_len();
    let proxy = proxy_for(template, role, "").await;
    let (before, _) = authid(role).await;

    let svid = proxy.svid(BILLING_ID);
    let conninfo = proxy.conninfo(&svid, template, DATABASE);
    let output = tokio::process::Command::new(psql())
        .args([
            conninfo.as_str(),
            "-X",
            "-A",
            "-t",
            "-c",
            &format!("SELECT current_user, count(*) FROM {role}_ledger"),
        ])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        stdout.trim(),
        format!("{role}|3"),
        "psql is the role, sees its objects"
    );

    assert!(
        wait_for_ledger(role, 0).await,
        "the session's end takes its lease out of the ledger"
    );
    let (after, closed) = authid(role).await;
    assert_ne!(after, before, "the verifier changed");
    assert!(after.starts_with("SCRAM-SHA-256$"), "{after}");
    assert!(closed, "VALID UNTIL is past");

    // Nobody logs in as the role with the old password any more.
    let old = cluster()
        .connect(role, "the-dba-once-knew-this", DATABASE)
        .await;
    assert!(old.is_err(), "the DBA's old password is gone");

    only_verifiers_logged_for(role, &cluster().server_log_since(log_start));
    let audit = std::fs::read_to_string(proxy.files.dir.path().join("audit.jsonl")).unwrap();
    assert!(!audit.contains("SCRAM-SHA-256$"), "{audit}");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_identities_share_the_role_and_revoking_one_ends_only_its_session() {
    let (template, role) = ("legacy_shared", "st_shared_app");
    let proxy = proxy_for(template, role, "").await;
    let billing = proxy
        .connect(Some(&proxy.svid(BILLING_ID)), template, DATABASE)
        .await
        .expect("the first identity's session");
    let stranger = proxy
        .connect(Some(&proxy.svid(STRANGER_ID)), template, DATABASE)
        .await
        .expect("the second identity's session, at the same time");
    let whoami = "SELECT current_user::text, pg_backend_pid()";
    let (a, b) = (
        billing.query_one(whoami, &[]).await.unwrap(),
        stranger.query_one(whoami, &[]).await.unwrap(),
    );
    assert_eq!(a.get::<_, String>(0), role);
    assert_eq!(b.get::<_, String>(0), role);
    assert_ne!(a.get::<_, i32>(1), b.get::<_, i32>(1));
    assert_eq!(ledger_rows(role).await, 2);

    let admin = admin_client(
        &proxy.files,
        proxy.admin_addr.unwrap(),
        &proxy.svid(ADMIN_ID),
    );
    let filter = LeaseFilter {
        identity: Some(BILLING_ID.into()),
        template: Some(template.into()),
        state: None,
    };
    let lease = admin.list_leases(&filter).await.unwrap().remove(0);
    assert_eq!(lease.role, role);
    admin.revoke_lease(lease.id).await.expect("revoked");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while billing.simple_query("SELECT 1").await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the revoked lease's session still runs"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let row = stranger
        .query_one("SELECT count(*) FROM st_shared_app_ledger", &[])
        .await
        .expect("the other identity's session lives on");
    assert_eq!(row.get::<_, i64>(0), 3);
    assert_eq!(ledger_rows(role).await, 1);

    drop(stranger);
    assert!(wait_for_ledger(role, 0).await);
    assert!(authid(role).await.1, "closed after the last lease");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_credentials_work_until_the_lease_ends_and_never_after() {
    let (template, role) = ("legacy_batch", "st_batch_app");
    let proxy = proxy_for(template, role, "").await;
    let svid = proxy.svid(BILLING_ID);
    let job = admin_client(&proxy.files, proxy.admin_addr.unwrap(), &svid);
    let creds = job.creds(template).await.expect("standalone credentials");
    assert_eq!(creds.username, role);
    let direct = cluster()
        .connect(role, &creds.password, DATABASE)
        .await
        .expect("the password logs in directly");
    assert_eq!(
        direct
            .query_one("SELECT current_user::text", &[])
            .await
            .unwrap()
            .get::<_, String>(0),
        role
    );
    // Nobody may change the password under the holder.
    let refused = proxy.connect(Some(&svid), template, DATABASE).await;
    assert!(refused.is_err(), "a session waits for the standalone lease");

    job.revoke_lease(creds.lease_id).await.expect("given back");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while direct.simple_query("SELECT 1").await.is_ok() {
        assert!(tokio::time::Instant::now() < deadline, "still connected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        cluster()
            .connect(role, &creds.password, DATABASE)
            .await
            .is_err(),
        "the password is useless once the lease ended"
    );
    assert!(authid(role).await.1);
    // And sessions can have the role again.
    let session = proxy.connect(Some(&svid), template, DATABASE).await;
    assert!(session.is_ok(), "{:?}", session.err());
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_preflight_checks_the_role_and_says_what_it_owns() {
    let admin_password = upstream().await.admin_password.clone();
    legacy_role("st_preflight_app").await;
    cluster()
        .exec_sql(
            "postgres",
            "CREATE ROLE st_nologin NOLOGIN; CREATE ROLE st_super LOGIN SUPERUSER;",
        )
        .await;
    let c = cluster();
    let template = |name: &str, role: &str| {
        let keys = serde_json::json!({ "role": role });
        let serde_json::Value::Object(keys) = keys else {
            unreachable!()
        };
        Template {
            name: name.into(),
            database: DATABASE.into(),
            spec: ephemera_engine::TemplateSpec::new(parse_template(name, DATABASE, keys).unwrap()),
        }
    };
    let setup = |templates| EngineSetup {
        upstream: Upstream {
            host: c.socket_dir().display().to_string(),
            port: c.port(),
            tls: None,
            connect_timeout: Duration::from_secs(10),
            login: ephemera_engine::UpstreamLoginMethod::Scram,
        },
        admin: AdminLogin {
            user: ADMIN_USER.into(),
            password: Password::new(admin_password.clone()),
            database: "postgres".into(),
            pool_size: 1,
        },
        login_window: Duration::from_secs(10),
        templates,
    };
    let good = StaticKind
        .preflight(&setup(vec![template("pf_good", "st_preflight_app")]))
        .await;
    assert!(good.problems.is_empty(), "{:?}", good.problems);
    assert_eq!(good.warnings.len(), 1, "{:?}", good.warnings);
    assert_eq!(good.warnings[0].key, "templates.pf_good.role");
    assert!(
        good.warnings[0]
            .message
            .contains("table st_preflight_app_ledger"),
        "{:?}",
        good.warnings
    );

    let bad = StaticKind
        .preflight(&setup(vec![
            template("pf_missing", "st_nobody"),
            template("pf_nologin", "st_nologin"),
            template("pf_super", "st_super"),
        ]))
        .await;
    let messages: Vec<String> = bad
        .problems
        .iter()
        .map(|p| format!("{}: {}", p.key, p.message))
        .collect();
    assert_eq!(messages.len(), 3, "{messages:#?}");
    assert!(messages[0].starts_with("templates.pf_missing.role: role \"st_nobody\" does not exist"));
    assert!(messages[1].contains("cannot log in"), "{messages:#?}");
    assert!(messages[2].contains("superuser"), "{messages:#?}");
}
