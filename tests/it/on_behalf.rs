//! Agents acting for people (`on_behalf_of`): an agent with its X.509-SVID
//! and a person's token, or with a token whose RFC 8693 `act` claim names
//! it, gets the rule's template; the lease (role comment, admin API view,
//! every audit event) carries both the agent and the person; a row-level
//! security policy built on the documented recipe (docs/tokens.md) shows the
//! session that person's rows only, and nothing the session tries changes
//! what it sees.
#![allow(clippy::unwrap_used, clippy::too_many_lines)] // a test: a panic is its failure message; scenarios read top to bottom

use crate::common;

use std::time::Duration;

use common::make_tls_connect;
use common::proxy::{
    admin_client, role_prefix, roles_with_prefix, start_proxy_with_extra_config,
    wait_until_no_roles, ProxyOptions, TestProxy, ADMIN_ID, ADMIN_USER, DATABASE, GROUP,
};
use serde_json::{json, Value};

use crate::tokens::{connect, jwks, now, session_user, Signer};

const CORP_ISS: &str = "https://corp-idp.example";
const AUD: &str = "ephemera";
/// Our own agent identities (none of the revoke-by-identity tests use them).
const AGENT: &str = "spiffe://example.org/agent/obo-sql-assistant";
const OTHER_AGENT: &str = "spiffe://example.org/agent/obo-someone-else";
const TEMPLATE: &str = "obo_finance_ro";

/// The recipe of docs/tokens.md, as a DBA runs it (as the admin role, so
/// the SECURITY DEFINER function is not a superuser's), and a table whose
/// rows belong to people.
fn rls_setup_sql() -> String {
    format!(
        r#"
CREATE SCHEMA IF NOT EXISTS ephemera_rls AUTHORIZATION {ADMIN_USER};
GRANT USAGE ON SCHEMA ephemera_rls TO PUBLIC;
SET ROLE {ADMIN_USER};
CREATE OR REPLACE FUNCTION ephemera_rls.session_subject() RETURNS text
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN pg_catalog.left(d, 1) = '{{'
                THEN pg_catalog.jsonb_extract_path_text(d::pg_catalog.jsonb, 'subject') END
    FROM (SELECT pg_catalog.shobj_description(r.oid, 'pg_authid') AS d
          FROM pg_catalog.pg_roles r WHERE r.rolname = session_user) AS c
$$;
RESET ROLE;
DROP TABLE IF EXISTS obo_notes;
CREATE TABLE obo_notes (owner text NOT NULL, body text NOT NULL);
INSERT INTO obo_notes VALUES ('corp:alice', 'alice 1'), ('corp:alice', 'alice 2'),
                             ('corp:bob', 'bob 1'), ('corp:carol', 'carol 1');
ALTER TABLE obo_notes ENABLE ROW LEVEL SECURITY;
CREATE POLICY by_subject ON obo_notes USING (owner = ephemera_rls.session_subject());
GRANT SELECT ON obo_notes TO {GROUP};
"#
    )
}

fn person(sub: &str, groups: &[&str]) -> Value {
    json!({"iss": CORP_ISS, "aud": AUD, "sub": sub, "groups": groups,
           "iat": now() - 10, "exp": now() + 600})
}

async fn proxy(dir: &std::path::Path, signer: &Signer) -> TestProxy {
    let file = dir.join("corp-jwks.json");
    std::fs::write(&file, jwks(&[signer])).unwrap();
    let extra = format!(
        r#"
[[tokens.issuer]]
name = "corp"
issuer = "{CORP_ISS}"
audience = "{AUD}"
jwks_file = "{file}"

[[policy]]
spiffe_id = "{AGENT}"
on_behalf_of = {{ token_issuer = "corp", claims = {{ groups = "finance" }} }}
templates = ["{TEMPLATE}"]
"#,
        file = file.display()
    );
    let mut options = ProxyOptions::templates(&[TEMPLATE]);
    options.admin_listen = Some("127.0.0.1:0".into());
    start_proxy_with_extra_config(options, &extra).await
}

/// Connect with the agent's SVID and `token` as the password.
async fn agent_connect(
    proxy: &TestProxy,
    agent: &str,
    token: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let cert = proxy.svid(agent);
    let tls = make_tls_connect(proxy.files.server_ca.cert_pem(), Some(&cert));
    let mut config = proxy.pg_config(TEMPLATE, DATABASE);
    config.password(token);
    let (client, connection) = config.connect(tls).await?;
    tokio::spawn(connection);
    Ok(client)
}

async fn visible(client: &tokio_postgres::Client) -> Vec<String> {
    client
        .query("SELECT body FROM obo_notes ORDER BY body", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

fn sqlstate(error: &tokio_postgres::Error) -> String {
    error
        .as_db_error()
        .unwrap_or_else(|| panic!("expected an ErrorResponse, got {error:?}"))
        .code()
        .code()
        .to_owned()
}

#[tokio::test]
async fn an_agent_acts_for_a_person_and_rls_shows_that_persons_rows_only() {
    common::proxy::upstream().await;
    common::pg::exec_sql(DATABASE, &rls_setup_sql()).await;
    let corp = Signer::es256("corp-1");
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy(dir.path(), &corp).await;
    let prefix = role_prefix(TEMPLATE);

    // The agent's SVID alone does not get the template: it is asked for the
    // person's token; a person outside the rule's claims is refused.
    let cert = proxy.svid(AGENT);
    let refused = proxy.connect(Some(&cert), TEMPLATE, DATABASE).await;
    assert!(refused.is_err(), "an agent without a person's token got in");
    let outsider = corp.sign(&person("mallory", &["sales"]));
    let error = agent_connect(&proxy, AGENT, &outsider).await.err().unwrap();
    assert_eq!(sqlstate(&error), "28000", "{error}");
    // Another agent with alice's token: its SPIFFE ID is not the rule's.
    let alice_token = corp.sign(&person("alice", &["staff", "finance"]));
    let error = agent_connect(&proxy, OTHER_AGENT, &alice_token)
        .await
        .err()
        .unwrap();
    assert_eq!(sqlstate(&error), "28000", "{error}");
    // alice's token alone (no agent, no act claim) matches no rule.
    let error = connect(&proxy, TEMPLATE, &alice_token).await.err().unwrap();
    assert_eq!(sqlstate(&error), "28000", "{error}");
    assert!(roles_with_prefix(&prefix).await.is_empty());

    // The agent with alice's token lands, and sees alice's rows only.
    let client = agent_connect(&proxy, AGENT, &alice_token).await.unwrap();
    let role = session_user(&client).await;
    assert!(role.starts_with(&prefix), "{role}");
    assert_eq!(visible(&client).await, ["alice 1", "alice 2"]);

    // The role's comment carries both identities.
    let comment: String = client
        .query_one(
            "SELECT shobj_description((SELECT oid FROM pg_roles WHERE rolname = session_user), 'pg_authid')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let comment: Value = serde_json::from_str(&comment).unwrap();
    assert_eq!(comment["identity"], AGENT);
    assert_eq!(comment["subject"], "corp:alice");

    // Nothing the session tries changes what it sees.
    let forged = json!({"ephemera_lease": 1, "subject": "corp:bob"}).to_string();
    for attempt in [
        format!("COMMENT ON ROLE \"{role}\" IS '{forged}'"),
        format!("SET SESSION AUTHORIZATION {ADMIN_USER}"),
        format!("SELECT set_config('session_authorization', '{ADMIN_USER}', false)"),
        format!("SET ROLE {ADMIN_USER}"),
        "ALTER TABLE obo_notes DISABLE ROW LEVEL SECURITY".to_string(),
        "DROP POLICY by_subject ON obo_notes".to_string(),
        "CREATE OR REPLACE FUNCTION ephemera_rls.session_subject() RETURNS text LANGUAGE sql AS $$ SELECT 'corp:bob' $$".to_string(),
        "UPDATE obo_notes SET owner = 'corp:alice'".to_string(),
    ] {
        let result = client.batch_execute(&attempt).await;
        assert!(result.is_err(), "{attempt} succeeded");
        assert_eq!(visible(&client).await, ["alice 1", "alice 2"], "{attempt}");
    }
    // What does succeed leaves the result alone: a role it is a member of,
    // a search_path with a look-alike function first, a custom setting.
    for attempt in [
        format!("SET ROLE {GROUP}"),
        "CREATE SCHEMA IF NOT EXISTS obo_fake".to_string(),
        "CREATE FUNCTION obo_fake.session_subject() RETURNS text LANGUAGE sql AS $$ SELECT 'corp:bob' $$".to_string(),
        "SET search_path = obo_fake, public".to_string(),
        "SELECT set_config('ephemera.subject', 'corp:bob', false)".to_string(),
    ] {
        if let Err(error) = client.batch_execute(&attempt).await {
            eprintln!("{attempt}: refused ({error}), which is fine as well");
        }
        assert_eq!(visible(&client).await, ["alice 1", "alice 2"], "{attempt}");
    }
    let _ = client.batch_execute("RESET ROLE").await;

    // The admin API's lease view shows both.
    let admin_addr = proxy.admin_addr.unwrap();
    let admin = admin_client(&proxy.files, admin_addr, &proxy.svid(ADMIN_ID));
    let filter = ephemera::admin::api::LeaseFilter {
        identity: Some(AGENT.into()),
        ..Default::default()
    };
    let leases = admin.list_leases(&filter).await.unwrap();
    assert_eq!(leases.len(), 1, "{leases:?}");
    assert_eq!(leases[0].role, role);
    assert_eq!(leases[0].subject.as_deref(), Some("corp:alice"));
    let lease_id = leases[0].id;

    drop(client);
    assert!(wait_until_no_roles(&prefix, Duration::from_secs(10)).await);

    // An agent naming itself in the token's `act` claim (token exchange),
    // no mTLS: bob's rows. An `act` naming another agent is refused.
    let mut exchanged = person("bob", &["finance"]);
    exchanged["act"] = json!({"sub": AGENT});
    let client = connect(&proxy, TEMPLATE, &corp.sign(&exchanged))
        .await
        .unwrap();
    assert_eq!(visible(&client).await, ["bob 1"]);
    drop(client);
    exchanged["act"] = json!({"sub": OTHER_AGENT});
    let error = connect(&proxy, TEMPLATE, &corp.sign(&exchanged))
        .await
        .err()
        .unwrap();
    assert_eq!(sqlstate(&error), "28000", "{error}");
    assert!(wait_until_no_roles(&prefix, Duration::from_secs(10)).await);

    // Every audit event of alice's lease names the agent and alice.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let events = loop {
        let events: Vec<Value> = proxy
            .files
            .audit_events()
            .into_iter()
            .filter(|e| e["lease_id"] == lease_id.to_string())
            .collect();
        let done = events.iter().any(|e| e["event"] == "revoked");
        if done || std::time::Instant::now() > deadline {
            break events;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    assert!(
        kinds.contains(&"lease_issued") && kinds.contains(&"revoked"),
        "{kinds:?}"
    );
    for event in &events {
        assert_eq!(event["identity"], AGENT, "{event}");
        assert_eq!(event["subject"], "corp:alice", "{event}");
    }
    let bobs = proxy
        .files
        .audit_events()
        .into_iter()
        .filter(|e| e["event"] == "lease_issued" && e["subject"] == "corp:bob")
        .count();
    assert_eq!(bobs, 1);
    proxy.shutdown().await;
}
