//! The engine seam (issue 13): an engine defined only here, in the test,
//! is registered with the proxy and serves a full session through it and
//! a standalone lease through the admin API. Nothing in `src/` knows it.
//!
//! The engine, `pre-created`, hands out one existing role whose password
//! it knows (from its template's `password_file`), and logs in upstream
//! with that password: a credential that is neither minted nor SCRAM keys.
#![allow(clippy::unwrap_used, clippy::too_many_lines)] // a test: a panic is its failure message; scenarios read top to bottom

use crate::common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use common::cluster;
use common::proxy::{
    admin_client, ProxyFiles, ProxyOptions, TestProxy, BILLING_ID, DATABASE, GROUP,
};
use ephemera::engines::EngineRegistry;
use ephemera_engine::keys::from_keys;
use ephemera_engine::{
    AdminLogin, Engine, EngineError, EngineKind, EngineSetup, IssueRequest, IssuedCredential,
    KeyProblem, Lease, Password, Preflight, ReaperElection, RevokeOutcome, Template, TemplateKeys,
    TemplateSpec, UpstreamLogin,
};
use rand::distributions::{Alphanumeric, DistString};
use serde::Deserialize;

const ENGINE: &str = "pre-created";

/// What the engine was asked to do, for the test to check.
#[derive(Debug, Default)]
struct Journal {
    issued: Vec<Lease>,
    revoked: Vec<String>,
    reloads: usize,
}

/// `[templates.X]` keys of the `pre-created` engine.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct PreCreatedTemplate {
    /// The existing role to hand out.
    role: String,
    /// The file holding its password.
    password_file: std::path::PathBuf,
}

struct PreCreatedKind {
    journal: Arc<Mutex<Journal>>,
}

#[async_trait]
impl EngineKind for PreCreatedKind {
    fn name(&self) -> &'static str {
        ENGINE
    }

    fn template(
        &self,
        _name: &str,
        _database: &str,
        keys: TemplateKeys,
    ) -> Result<TemplateSpec, Vec<KeyProblem>> {
        let template: PreCreatedTemplate =
            from_keys(serde_json::Value::Object(keys)).map_err(|p| vec![p])?;
        if template.role.is_empty() {
            return Err(vec![KeyProblem::new("role", "must name an existing role")]);
        }
        Ok(TemplateSpec::new(template))
    }

    fn start(&self, setup: EngineSetup) -> Result<Arc<dyn Engine>, EngineError> {
        let engine = PreCreated {
            templates: Mutex::new(setup.templates),
            journal: self.journal.clone(),
        };
        Ok(Arc::new(engine))
    }

    async fn preflight(&self, _setup: &EngineSetup) -> Preflight {
        Preflight::default()
    }
}

struct PreCreated {
    templates: Mutex<Vec<Template>>,
    journal: Arc<Mutex<Journal>>,
}

impl PreCreated {
    fn template(&self, name: &str) -> Result<(Template, PreCreatedTemplate), EngineError> {
        let templates = self.templates.lock().unwrap();
        let template = templates
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| EngineError::UnknownTemplate(name.to_owned()))?;
        let spec = template
            .spec
            .get::<PreCreatedTemplate>()
            .expect("validated by PreCreatedKind")
            .clone();
        Ok((template.clone(), spec))
    }
}

#[async_trait]
impl Engine for PreCreated {
    fn name(&self) -> &'static str {
        ENGINE
    }

    async fn issue(&self, request: IssueRequest) -> Result<IssuedCredential, EngineError> {
        let (template, spec) = self.template(&request.template)?;
        let password =
            std::fs::read_to_string(&spec.password_file).map_err(|e| EngineError::Unavailable {
                action: "read the role's password",
                source: Box::new(e),
            })?;
        let issued_at = time::OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .unwrap();
        let lease = Lease {
            id: request.lease_id,
            engine: ENGINE,
            kind: request.kind,
            template: template.name,
            role: spec.role,
            identity: request.identity,
            subject: request.subject,
            database: template.database,
            client_addr: request.client_addr,
            issued_at,
            expires_at: (issued_at + request.ttl).min(request.max_expires_at),
            max_expires_at: request.max_expires_at,
        };
        self.journal.lock().unwrap().issued.push(lease.clone());
        let password = Password::new(password.trim().to_owned());
        Ok(IssuedCredential {
            lease,
            login: UpstreamLogin::Password(password.clone()),
            client_password: Some(password),
        })
    }

    fn reload(&self, templates: Vec<Template>, _admin: AdminLogin) -> Result<(), EngineError> {
        *self.templates.lock().unwrap() = templates;
        self.journal.lock().unwrap().reloads += 1;
        Ok(())
    }

    async fn renew(&self, _lease: &Lease) -> Result<(), EngineError> {
        Ok(())
    }

    async fn revoke(&self, lease: &Lease) -> Result<RevokeOutcome, EngineError> {
        let mut journal = self.journal.lock().unwrap();
        if journal.revoked.contains(&lease.id.to_string()) {
            return Ok(RevokeOutcome::AlreadyGone);
        }
        journal.revoked.push(lease.id.to_string());
        Ok(RevokeOutcome::revoked())
    }

    async fn list(&self) -> Result<Vec<Lease>, EngineError> {
        Ok(Vec::new())
    }

    async fn lead_reaper(&self) -> Result<ReaperElection, EngineError> {
        Ok(ReaperElection::Leader)
    }
}

/// A role with a password only the test and the engine's file know, and a
/// proxy whose one template uses the `pre-created` engine.
async fn proxy_with_the_test_engine(role: &str, journal: Arc<Mutex<Journal>>) -> TestProxy {
    let mut options = ProxyOptions::templates(&[]);
    options.admin_listen = Some("127.0.0.1:0".into());
    let files = ProxyFiles::write(&options, "127.0.0.1:0").await;
    let password = Alphanumeric.sample_string(&mut rand::thread_rng(), 32);
    let verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
    cluster()
        .exec_sql(
            "postgres",
            &format!("CREATE ROLE {role} LOGIN PASSWORD '{verifier}' IN ROLE {GROUP}"),
        )
        .await;
    let password_file = files.dir.path().join(format!("{role}-password"));
    std::fs::write(&password_file, &password).unwrap();
    let mut config = std::fs::read_to_string(&files.config_path).unwrap();
    config.push_str(&format!(
        "\n[templates.{role}]\nengine = \"{ENGINE}\"\ndatabase = \"{DATABASE}\"\n\
         role = \"{role}\"\npassword_file = \"{}\"\nttl = \"1m\"\n\
         \n[[policy]]\nspiffe_id = \"{BILLING_ID}\"\ntemplates = [\"{role}\"]\n",
        password_file.display()
    ));
    std::fs::write(&files.config_path, config).unwrap();
    let registry = EngineRegistry::builtin().register(Arc::new(PreCreatedKind { journal }));
    TestProxy::serve_with(files, registry).await
}

/// Poll `check` until it holds or `timeout` passes.
async fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while !check() {
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_engine_serves_a_session_through_the_proxy_and_a_standalone_lease() {
    let role = "seam_precreated";
    let journal = Arc::new(Mutex::new(Journal::default()));
    let proxy = proxy_with_the_test_engine(role, journal.clone()).await;

    // A full session: the proxy logs in upstream with the engine's password.
    let svid = proxy.svid(BILLING_ID);
    let client = proxy
        .connect(Some(&svid), role, DATABASE)
        .await
        .expect("a session through the test engine");
    let row = client
        .query_one("SELECT current_user::text, count(*) FROM invoices", &[])
        .await
        .expect("the session queries as the pre-created role");
    assert_eq!(row.get::<_, String>(0), role);
    assert_eq!(row.get::<_, i64>(1), 2);
    let session_lease = journal.lock().unwrap().issued[0].clone();
    assert_eq!(session_lease.engine, ENGINE);
    assert_eq!(session_lease.identity, BILLING_ID);
    drop(client);
    let id = session_lease.id.to_string();
    assert!(
        eventually(Duration::from_secs(10), || journal
            .lock()
            .unwrap()
            .revoked
            .contains(&id))
        .await,
        "the session's end revokes its lease through the test engine"
    );

    // A standalone lease through the admin API: the client gets the
    // engine's password and logs in directly.
    let addr = proxy.admin_addr.expect("the admin API is configured");
    let job = admin_client(&proxy.files, addr, &svid);
    let creds = job.creds(role).await.expect("standalone credentials");
    assert_eq!(creds.username, role);
    assert_eq!(creds.database, DATABASE);
    let direct = cluster()
        .connect(&creds.username, &creds.password, &creds.database)
        .await
        .expect("the standalone password logs in directly");
    let user: String = direct
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(user, role);
    job.revoke_lease(creds.lease_id)
        .await
        .expect("the holder gives its lease back");
    let id = creds.lease_id.to_string();
    assert!(journal.lock().unwrap().revoked.contains(&id));

    // A reload hands the engine its templates again.
    proxy.reloader.reload().expect("the configuration reloads");
    assert_eq!(journal.lock().unwrap().reloads, 1);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_engine_checks_its_own_template_keys() {
    let options = ProxyOptions::templates(&[]);
    let files = ProxyFiles::write(&options, "127.0.0.1:0").await;
    let mut config = std::fs::read_to_string(&files.config_path).unwrap();
    config.push_str(&format!(
        "\n[templates.seam_typo]\nengine = \"{ENGINE}\"\ndatabase = \"{DATABASE}\"\n\
         rol = \"x\"\npassword_file = \"p\"\n\
         \n[templates.seam_pg]\ndatabase = \"{DATABASE}\"\nrole = \"x\"\n"
    ));
    std::fs::write(&files.config_path, config).unwrap();
    let journal = Arc::new(Mutex::new(Journal::default()));
    let registry = EngineRegistry::builtin().register(Arc::new(PreCreatedKind { journal }));
    let errors = ephemera::Settings::load_with(&files.config_path, registry)
        .expect_err("both templates have a wrong key");
    let keys: Vec<&str> = errors.problems.iter().map(|p| p.key.as_str()).collect();
    assert!(keys.contains(&"templates.seam_typo.rol"), "{errors}");
    assert!(
        keys.contains(&"templates.seam_pg.role"),
        "the postgres engine has no `role` key: {errors}"
    );

    // Without the registration, the engine name itself is the problem.
    let errors = ephemera::Settings::load(&files.config_path).expect_err("unknown engine");
    let problem = errors
        .problems
        .iter()
        .find(|p| p.key == "templates.seam_typo.engine")
        .unwrap_or_else(|| panic!("{errors}"));
    assert!(problem.message.contains("no engine named"), "{problem:?}");
}
