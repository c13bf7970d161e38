//! GitLab as a job source: the long-poll request loop of each runner, each claimed job described
//! as a build for the coordinator, and the runner commands (`kiln register`, `unregister`,
//! `verify`). The protocol itself is the leaf `crate::gitlab`. The kiln agent inside the build
//! reports the job itself; this source fails a job only when its build could not.

mod build;
pub mod command;
mod config;
pub(crate) mod metrics;
pub mod poller;
mod registry;
pub mod report;
pub(crate) mod runner_file;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::build::{About, BuildKey, Ending, FailureReason, Found, JOB_FILE, Outcome, SourceKind};
use crate::gitlab::api::ApiError;
use crate::gitlab::payload::JobPayload;
use crate::job_file::{AgentConfig, AgentJob, Fingerprint};
use crate::sources::{Adoption, Chain, ExecutorInfo, Health, Source};
use crate::telemetry::Metrics;
pub use config::GitLabRunnerConfig;

/// How often adoption asks GitLab (0.5 s, 1 s, 2 s, 4 s apart) whether the job of a build
/// whose pod is gone still runs, before it leaves the job to GitLab's timeout.
const GONE_POD_ASKS: u32 = 5;
use poller::{ClaimedJob, Runner};
use report::JobReporter;

/// One `[[sources.gitlab]]` runner as a source of builds.
pub struct GitLabSource {
    runner: Arc<Runner>,
    config: GitLabRunnerConfig,
    settings: AgentConfig,
    executor: ExecutorInfo,
    /// Who reports each of this runner's jobs that has a build now, by job id.
    reporters: Mutex<HashMap<u64, JobReporter>>,
    /// Fingerprints of the coordinator's credentials, which every trace masks.
    masked: Vec<Fingerprint>,
}

impl GitLabSource {
    /// The runner of entry `index`, whose builds run the agent with `settings` on `executor`.
    ///
    /// # Errors
    /// An unusable URL.
    pub fn new(
        config: &GitLabRunnerConfig,
        index: usize,
        settings: &AgentConfig,
        executor: ExecutorInfo,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ApiError> {
        Ok(Self {
            runner: Runner::new(
                config,
                index,
                executor.name,
                executor.runs_images,
                executor.cache.is_some(),
                metrics,
            )?,
            config: config.clone(),
            settings: settings.clone(),
            executor,
            reporters: Mutex::new(HashMap::new()),
            masked: Vec::new(),
        })
    }

    /// Has every trace of this runner's jobs mask the credentials behind `fingerprints` (the
    /// runner's own token among them), which no build holds.
    #[must_use]
    pub fn masking(mut self, fingerprints: Vec<Fingerprint>) -> Self {
        self.masked = fingerprints;
        self
    }

    fn context(&self) -> build::Context<'_> {
        build::Context {
            runner: &self.runner.name,
            gitlab_url: self.runner.url(),
            resource_class: self.config.resource_class.as_deref(),
            settings: &self.settings,
            executor: self.executor.name,
            masked: &self.masked,
            tls_ca: self.runner.tls_ca(),
            cache: self.executor.cache.as_deref(),
        }
    }

    /// Hands a claimed job to the chain as a build: written down first, then acknowledged,
    /// then launched.
    ///
    /// GitLab assigned the job with its answer to `jobs/request`; from then on a coordinator
    /// killed before the build exists where it outlives the coordinator (its Secret) loses the
    /// job, which stays `running` in GitLab until GitLab gives up on it. So the build is
    /// persisted before anything else, the acknowledge (a round trip to GitLab, slow when GitLab
    /// is) included: the next coordinator finds it and starts it. What remains of the window
    /// is GitLab's answer on the wire and the persisting call (docs/operations.md).
    ///
    /// A job whose payload makes describing it panic (a bug meeting input nobody foresaw) is
    /// failed in GitLab with the reason, not left running there with the poller dead.
    async fn claimed(&self, chain: &dyn Chain, claimed: ClaimedJob) {
        let described = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            build::build(&claimed.job, &claimed.raw, &self.context())
        }));
        let build = match described {
            Ok(build) => build,
            Err(panic) => {
                let message = format!(
                    "kiln could not turn this job into a build (a bug in kiln: {}); please report it",
                    crate::sources::panic_message(panic.as_ref())
                );
                tracing::error!(job = %claimed.key, %message, "failing a job kiln could not describe");
                let reporter = claimed.runner.reporter(&claimed.job);
                if let Err(e) = reporter
                    .fail(FailureReason::RunnerSystemFailure, &message)
                    .await
                {
                    tracing::error!(job = %claimed.key, error = %e, "could not fail the job in GitLab; GitLab will time it out");
                }
                return;
            }
        };
        chain.persist(&build).await;
        if !claimed.runner.acknowledge(&claimed.job).await {
            tracing::warn!(job = %claimed.key, "GitLab withdrew the job before it started");
            chain.stop(&build.name).await;
            return;
        }
        self.lock()
            .insert(claimed.job.id, claimed.runner.reporter(&claimed.job));
        chain.launch(claimed.slot, build);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, JobReporter>> {
        self.reporters.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn adopt_build(&self, found: &Found) -> Adoption {
        let Some(bytes) = found.secrets.get(JOB_FILE) else {
            // The agent still reports the job; kiln has no token to report anything itself.
            tracing::warn!(build = %found.key, "a build pod without its job file; following it, but kiln cannot report for it");
            return Adoption::Follow(About::default());
        };
        let parsed = serde_json::from_slice::<AgentJob>(bytes)
            .ok()
            .and_then(|file| {
                let job: JobPayload = serde_json::from_value(file.job.clone()).ok()?;
                Some((file, job))
            });
        let Some((file, job)) = parsed else {
            return Adoption::Discard("its job file cannot be read".into());
        };
        let reporter = self.runner.reporter(&job);
        // A Secret without its pod is a build whose pod was never created or was deleted
        // (kiln died between the two creates or the two deletes, or someone deleted the pod
        // while no coordinator ran). Whether its job still runs only GitLab can say, so that
        // answer is waited for (a few tries) before the job is failed; a pod that exists is
        // merely followed, which is harmless either way.
        let attempts = if found.exists { 1 } else { GONE_POD_ASKS };
        let mut answer = reporter.is_running().await;
        for attempt in 1..attempts {
            if answer.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500) * 2u32.pow(attempt - 1)).await;
            answer = reporter.is_running().await;
        }
        match answer {
            Ok(false) => return Adoption::Discard("GitLab no longer runs this job".into()),
            Ok(true) => {}
            Err(e) if !found.exists => {
                tracing::error!(build = %found.key, error = %e, "cannot ask GitLab whether the job of a build whose pod is gone still runs; leaving the job to GitLab's timeout");
                return Adoption::Discard(
                    "GitLab could not be asked whether the job still runs".into(),
                );
            }
            Err(e) => {
                tracing::warn!(build = %found.key, error = %e, "cannot ask GitLab about an adopted job; following its build anyway");
            }
        }
        if !found.exists && found.ran == Some(false) {
            // Its pod was never created (an earlier coordinator died between the creates):
            // nothing of the job ran, so it starts now.
            self.lock().insert(job.id, reporter);
            return Adoption::Relaunch(Box::new(build::build(&job, &file.job, &self.context())));
        }
        if !found.exists {
            // Its pod existed and is gone (deleted while no coordinator ran), or nobody can
            // tell: starting the job again could run its steps twice. Fail it as the
            // infrastructure failure it is, so `retry: when: runner_system_failure` re-runs it.
            let message = "the job's build pod is gone (deleted while no kiln coordinator ran); kiln marks it as runner_system_failure so `retry: when: runner_system_failure` can re-run it";
            tracing::warn!(build = %found.key, "failing a job whose build pod is gone");
            if let Err(e) = reporter
                .fail(FailureReason::RunnerSystemFailure, message)
                .await
            {
                tracing::error!(build = %found.key, error = %e, "could not fail the job in GitLab; GitLab will time it out");
            }
            return Adoption::Discard("its build pod is gone".into());
        }
        self.lock().insert(job.id, reporter);
        Adoption::Follow(build::about(&job, self.runner.url()))
    }

    async fn report_ending(&self, key: &BuildKey, ending: &Ending) {
        if ending.outcome == Outcome::Lost {
            // Nothing to report, and the job's build may still be followed (a duplicate
            // hand-over, or shutdown): keep its reporter.
            return;
        }
        let Some(reporter) = self.lock().remove(&key.id) else {
            return;
        };
        let Outcome::Failed(reason) = ending.outcome else {
            return;
        };
        if ending.reported {
            return;
        }
        let retry = if reason.is_infrastructure() {
            format!("; kiln marks it as {reason} so `retry: when: {reason}` can re-run it")
        } else {
            String::new()
        };
        let message = format!("{}{retry}", ending.detail);
        tracing::warn!(job = %key, %reason, %message, "failing the job on the build's behalf");
        if let Err(e) = reporter.fail(reason, &message).await {
            tracing::error!(job = %key, error = %e, "could not fail the job in GitLab; GitLab will time it out");
        }
    }
}

impl Source for GitLabSource {
    fn kind(&self) -> SourceKind {
        SourceKind::GitLab
    }

    fn name(&self) -> &str {
        &self.runner.name
    }

    fn limit(&self) -> usize {
        self.config.limit
    }

    fn run(
        self: Arc<Self>,
        chain: Arc<dyn Chain>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let mut pollers = tokio::task::JoinSet::new();
            for _ in 0..self.config.request_concurrency.max(1) {
                let this = Arc::clone(&self);
                let dispatch_chain = Arc::clone(&chain);
                pollers.spawn(poller::poll(
                    Arc::clone(&self.runner),
                    Arc::clone(&chain),
                    move |claimed| {
                        let this = Arc::clone(&this);
                        let chain = Arc::clone(&dispatch_chain);
                        async move { this.claimed(chain.as_ref(), claimed).await }
                    },
                    shutdown.clone(),
                ));
            }
            while let Some(ended) = pollers.join_next().await {
                // A poller's panic is the source's: the coordinator's supervisor restarts the
                // source (and says so on /readyz) instead of leaving this runner one poller short.
                if let Err(e) = ended
                    && e.is_panic()
                {
                    std::panic::resume_unwind(e.into_panic());
                }
            }
        })
    }

    fn adopt<'a>(&'a self, found: &'a Found) -> BoxFuture<'a, Adoption> {
        Box::pin(self.adopt_build(found))
    }

    fn ended<'a>(
        &'a self,
        key: &'a BuildKey,
        _name: &'a str,
        ending: &'a Ending,
    ) -> BoxFuture<'a, ()> {
        Box::pin(self.report_ending(key, ending))
    }

    fn still_wanted<'a>(&'a self, key: &'a BuildKey) -> BoxFuture<'a, bool> {
        let reporter = self.lock().get(&key.id).cloned();
        Box::pin(async move {
            match reporter {
                // Unreachable GitLab: keep the build (the agent or the timeouts settle it).
                Some(reporter) => reporter.is_running().await.unwrap_or(true),
                None => true,
            }
        })
    }

    fn health(&self) -> Health {
        self.runner.health()
    }
}
