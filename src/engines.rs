//! The engines Ephemera mints credentials with, and the one place where a
//! concrete engine is named.
//!
//! An engine kind ([`EngineKind`]) owns its template keys, its preflight and
//! its engine. [`EngineRegistry::builtin`] registers the engines that ship
//! with Ephemera; a program embedding Ephemera (or a test) may register
//! more with [`EngineRegistry::register`] before loading the configuration.
//! [`Engines`] is the running set: it routes each call to the engine a
//! template or lease names.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use ephemera_engine::{
    AdminLogin, Engine, EngineError, EngineKind, EngineSetup, IssueRequest, IssuedCredential,
    Lease, ReaperElection, RevokeOutcome, Template, Upstream,
};

/// The postgres engine, for what only it can do (`ephemera dev` bootstraps
/// a cluster for it).
pub use ephemera_engine_postgres as postgres;

/// What a template gets when it names no `engine`.
pub const DEFAULT_ENGINE: &str = postgres::NAME;

/// The engine kinds a configuration may name.
#[derive(Clone)]
pub struct EngineRegistry {
    kinds: BTreeMap<&'static str, Arc<dyn EngineKind>>,
}

impl std::fmt::Debug for EngineRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.kinds.keys()).finish()
    }
}

impl EngineRegistry {
    /// The engines that ship with Ephemera.
    pub fn builtin() -> Self {
        EngineRegistry {
            kinds: BTreeMap::new(),
        }
        .register(Arc::new(postgres::PostgresKind))
        .register(Arc::new(ephemera_engine_postgres_static::StaticKind))
    }

    /// Add (or replace) an engine kind under its name.
    pub fn register(mut self, kind: Arc<dyn EngineKind>) -> Self {
        self.kinds.insert(kind.name(), kind);
        self
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn EngineKind>> {
        self.kinds.get(name)
    }

    /// The registered names, for messages.
    pub fn names(&self) -> Vec<&'static str> {
        self.kinds.keys().copied().collect()
    }
}

impl Default for EngineRegistry {
    fn default() -> Self {
        Self::builtin()
    }
}

/// Each configured template with the engine it names.
#[derive(Debug, Clone)]
pub struct EngineTemplates {
    pub templates: Vec<(&'static str, Template)>,
}

impl EngineTemplates {
    /// The templates of engine `name`.
    pub fn of(&self, name: &str) -> Vec<Template> {
        self.templates
            .iter()
            .filter(|(engine, _)| *engine == name)
            .map(|(_, template)| template.clone())
            .collect()
    }
}

/// What every engine is started with, and the templates to split among them.
#[derive(Clone)]
pub struct EnginesConfig {
    pub registry: EngineRegistry,
    pub upstream: Upstream,
    pub admin: AdminLogin,
    pub login_window: std::time::Duration,
    pub templates: EngineTemplates,
}

impl std::fmt::Debug for EnginesConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnginesConfig")
            .field("registry", &self.registry)
            .field("upstream", &self.upstream)
            .field("admin", &self.admin)
            .field("templates", &self.templates)
            .finish()
    }
}

impl EnginesConfig {
    /// The setup engine `name` starts with.
    pub fn setup(&self, name: &str) -> EngineSetup {
        EngineSetup {
            upstream: self.upstream.clone(),
            admin: self.admin.clone(),
            login_window: self.login_window,
            templates: self.templates.of(name),
        }
    }

    /// The engines that have templates, each once.
    pub fn with_templates(&self) -> Vec<&'static str> {
        let mut names: Vec<&'static str> =
            self.templates.templates.iter().map(|(e, _)| *e).collect();
        names.sort_unstable();
        names.dedup();
        names
    }

    /// The engines that have templates, and always the default one (it
    /// keeps the ledger of earlier configurations reaped).
    fn in_use(&self) -> Vec<&'static str> {
        let mut names = self.with_templates();
        if self.registry.get(DEFAULT_ENGINE).is_some() && !names.contains(&DEFAULT_ENGINE) {
            names.push(DEFAULT_ENGINE);
        }
        names
    }
}

/// The running engines, by name, and which engine each template uses.
pub struct Engines {
    engines: BTreeMap<&'static str, Arc<dyn Engine>>,
    /// Template name → engine name; replaced on reload.
    routes: RwLock<BTreeMap<String, &'static str>>,
}

fn routes(templates: &EngineTemplates) -> BTreeMap<String, &'static str> {
    templates
        .templates
        .iter()
        .map(|(engine, t)| (t.name.clone(), *engine))
        .collect()
}

impl Engines {
    /// Start every engine in use. Nothing is dialled.
    pub fn start(config: &EnginesConfig) -> Result<Arc<Self>, EngineError> {
        let mut engines = BTreeMap::new();
        for name in config.in_use() {
            let kind = config
                .registry
                .get(name)
                .expect("the configuration only names registered engines");
            engines.insert(name, kind.start(config.setup(name))?);
        }
        Ok(Arc::new(Engines {
            engines,
            routes: RwLock::new(routes(&config.templates)),
        }))
    }

    /// Hand each engine its new templates and admin login. An engine that
    /// was not running before needs a restart; that is refused here, so a
    /// reload changes nothing rather than half.
    pub fn reload(&self, config: &EnginesConfig) -> Result<(), EngineError> {
        if let Some(missing) = config
            .in_use()
            .into_iter()
            .find(|name| !self.engines.contains_key(name))
        {
            return Err(EngineError::Unsupported {
                engine: missing,
                what: "be started by a reload (restart Ephemera to use a new engine)",
            });
        }
        for (name, engine) in &self.engines {
            engine.reload(config.templates.of(name), config.admin.clone())?;
        }
        *self.routes.write().unwrap_or_else(|p| p.into_inner()) = routes(&config.templates);
        Ok(())
    }

    fn by_template(&self, template: &str) -> Result<&Arc<dyn Engine>, EngineError> {
        let name = self
            .routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(template)
            .copied()
            .ok_or_else(|| EngineError::UnknownTemplate(template.to_owned()))?;
        self.by_name(name)
    }

    fn by_name(&self, name: &str) -> Result<&Arc<dyn Engine>, EngineError> {
        self.engines
            .get(name)
            .ok_or_else(|| EngineError::InvalidTemplate {
                template: name.to_owned(),
                reason: format!("no engine named {name:?} is running"),
            })
    }
}

#[async_trait]
impl Engine for Engines {
    fn name(&self) -> &'static str {
        "engines"
    }

    async fn issue(&self, request: IssueRequest) -> Result<IssuedCredential, EngineError> {
        self.by_template(&request.template)?.issue(request).await
    }

    fn reload(&self, _templates: Vec<Template>, _admin: AdminLogin) -> Result<(), EngineError> {
        Err(EngineError::Unsupported {
            engine: "engines",
            what: "reload without the whole configuration (use Engines::reload)",
        })
    }

    async fn renew(&self, lease: &Lease) -> Result<(), EngineError> {
        self.by_name(lease.engine)?.renew(lease).await
    }

    async fn revoke(&self, lease: &Lease) -> Result<RevokeOutcome, EngineError> {
        self.by_name(lease.engine)?.revoke(lease).await
    }

    async fn close_login(&self, lease: &Lease) -> Result<(), EngineError> {
        self.by_name(lease.engine)?.close_login(lease).await
    }

    async fn reopen_login(
        &self,
        lease: &Lease,
    ) -> Result<ephemera_engine::UpstreamLogin, EngineError> {
        self.by_name(lease.engine)?.reopen_login(lease).await
    }

    async fn claim_token_use(
        &self,
        template: &str,
        key: &str,
        expires_at: time::OffsetDateTime,
    ) -> Result<bool, EngineError> {
        self.by_template(template)?
            .claim_token_use(template, key, expires_at)
            .await
    }

    async fn revoke_many(&self, leases: &[Lease]) -> Vec<Result<RevokeOutcome, EngineError>> {
        // A lease of an engine that is not running gets that error; the
        // others are revoked in one batch per engine.
        let mut results: Vec<Option<Result<RevokeOutcome, EngineError>>> = leases
            .iter()
            .map(|lease| self.by_name(lease.engine).err().map(Err))
            .collect();
        for (name, engine) in &self.engines {
            let (indexes, batch): (Vec<usize>, Vec<Lease>) = leases
                .iter()
                .enumerate()
                .filter(|(_, l)| l.engine == *name)
                .map(|(i, l)| (i, l.clone()))
                .unzip();
            if batch.is_empty() {
                continue;
            }
            for (i, result) in indexes.into_iter().zip(engine.revoke_many(&batch).await) {
                results[i] = Some(result);
            }
        }
        results
            .into_iter()
            .map(|result| result.expect("every lease has its engine's result or an error"))
            .collect()
    }

    async fn list(&self) -> Result<Vec<Lease>, EngineError> {
        let mut all = Vec::new();
        for engine in self.engines.values() {
            all.extend(engine.list().await?);
        }
        Ok(all)
    }

    /// Leader if any engine elects us (revocation is idempotent, so two
    /// replicas reaping different engines' ledgers is harmless); squatted if
    /// any election is.
    async fn lead_reaper(&self) -> Result<ReaperElection, EngineError> {
        let mut outcome = ReaperElection::Follower;
        for engine in self.engines.values() {
            match (engine.lead_reaper().await?, &mut outcome) {
                (
                    ReaperElection::Squatted { holders },
                    ReaperElection::Squatted { holders: all },
                ) => all.extend(holders),
                (squatted @ ReaperElection::Squatted { .. }, _) => outcome = squatted,
                (ReaperElection::Leader, ReaperElection::Follower) => {
                    outcome = ReaperElection::Leader
                }
                _ => {}
            }
        }
        Ok(outcome)
    }
}
