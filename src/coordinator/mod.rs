//! The coordinator: wires sources → limiter → launcher → executor, finishes jobs their build
//! could not report, and drains on shutdown.

pub mod launcher;
pub mod limiter;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agent::AgentJob;
use crate::config::{AgentConfig, Config};
use crate::executor::{Executor, Launch, RunReport, StillWanted};
use crate::job::JobKey;
use crate::sources::gitlab::api::{ApiError, RunnerApi};
use crate::sources::gitlab::payload::JobPayload;
use crate::sources::gitlab::poller::{self, ClaimedJob, Runner};
use crate::sources::gitlab::report::JobReporter;
use crate::telemetry::{FinishedLabels, Metrics, RunnerLabels};
use limiter::{Limiter, Permit};

/// How long cancelled builds get to report before the coordinator stops waiting.
const CANCEL_WAIT: Duration = Duration::from_secs(120);
/// How long detaching from builds that outlive the coordinator may take.
const DETACH_WAIT: Duration = Duration::from_secs(10);

/// Errors setting up the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// A runner's GitLab URL is unusable.
    #[error("runner {runner}")]
    Runner {
        /// The runner.
        runner: String,
        /// Why.
        #[source]
        source: ApiError,
    },
}

/// What the HTTP server shows: readiness and capacity.
#[derive(Debug, Clone)]
pub struct Status {
    runners: Vec<Arc<Runner>>,
    limiter: Limiter,
}

impl Status {
    /// Ready when every runner's token is verified and none is paused.
    pub fn ready(&self) -> bool {
        self.runners.iter().all(|r| r.is_ready())
    }

    /// One line per runner: name, URL, state.
    pub fn runners(&self) -> Vec<(String, String, &'static str)> {
        self.runners
            .iter()
            .map(|r| {
                let state = if r.is_paused() {
                    "paused: token rejected"
                } else if r.is_ready() {
                    "ready"
                } else {
                    "verifying"
                };
                (r.name.clone(), crate::net::redact_url(r.url()), state)
            })
            .collect()
    }

    /// (running jobs, capacity).
    pub fn capacity(&self) -> (usize, usize) {
        let cap = self.limiter.capacity();
        (cap - self.limiter.available().min(cap), cap)
    }
}

/// The coordinator of one `kiln run`.
pub struct Coordinator {
    config: Config,
    metrics: Arc<Metrics>,
    executor: Arc<dyn Executor>,
    runners: Vec<Arc<Runner>>,
    limiter: Limiter,
}

impl Coordinator {
    /// A coordinator for `config`, running builds on `executor`.
    ///
    /// # Errors
    /// A runner whose URL is unusable.
    pub fn new(
        config: Config,
        metrics: Arc<Metrics>,
        executor: Arc<dyn Executor>,
    ) -> Result<Self, CoordinatorError> {
        let runners = config
            .sources
            .gitlab
            .iter()
            .enumerate()
            .map(|(i, runner)| {
                Runner::new(
                    runner,
                    i,
                    executor.name(),
                    executor.runs_images(),
                    Arc::clone(&metrics),
                )
                .map_err(|source| CoordinatorError::Runner {
                    runner: runner.display_name(i),
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            limiter: Limiter::new(config.concurrent),
            config,
            metrics,
            executor,
            runners,
        })
    }

    /// The capacity shared by every source (Jenkins agents take their slots from it too).
    pub fn limiter(&self) -> Limiter {
        self.limiter.clone()
    }

    /// Readiness and capacity, for the HTTP server.
    pub fn status(&self) -> Status {
        Status {
            runners: self.runners.clone(),
            limiter: self.limiter.clone(),
        }
    }

    /// Takes and runs jobs until `shutdown`; then stops asking for jobs, lets running ones
    /// finish for `shutdown_timeout`, and cancels the rest (failed as runner system failures).
    pub async fn run(self, shutdown: CancellationToken) {
        let tracker = TaskTracker::new();
        let cancel_jobs = CancellationToken::new();
        let dispatcher = Dispatcher {
            tracker: tracker.clone(),
            executor: Arc::clone(&self.executor),
            metrics: Arc::clone(&self.metrics),
            settings: Arc::new(self.config.agent.clone()),
            cancel: cancel_jobs.clone(),
        };
        self.recover(&dispatcher).await;
        let mut pollers = tokio::task::JoinSet::new();
        for runner in &self.runners {
            for _ in 0..runner_concurrency(&self.config, &runner.name) {
                let dispatcher = dispatcher.clone();
                let executor = Arc::clone(&self.executor);
                pollers.spawn(poller::poll(
                    Arc::clone(runner),
                    self.limiter.clone(),
                    move || {
                        let executor = Arc::clone(&executor);
                        Box::pin(async move { executor.ready().await })
                    },
                    move |claimed| dispatcher.dispatch(claimed),
                    shutdown.clone(),
                ));
            }
        }
        tracing::info!(
            runners = self.runners.len(),
            concurrent = self.config.concurrent,
            executor = self.executor.name(),
            "coordinator started"
        );
        shutdown.cancelled().await;
        while pollers.join_next().await.is_some() {}
        tracker.close();
        let running = tracker.len();
        if self.executor.survives_restart() {
            // Builds run on without the coordinator and report themselves; the next
            // coordinator adopts them. Draining would only delay the restart.
            if running > 0 {
                tracing::info!(
                    running,
                    "shutting down: running builds keep going and are adopted by the next start"
                );
            }
            cancel_jobs.cancel();
            let _ = tokio::time::timeout(DETACH_WAIT, tracker.wait()).await;
            tracing::info!("coordinator stopped");
            return;
        }
        if running > 0 {
            tracing::info!(
                running,
                "shutting down: no new jobs; waiting up to {} for running jobs",
                humantime::format_duration(self.config.shutdown_timeout)
            );
        }
        if tokio::time::timeout(self.config.shutdown_timeout, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                running = tracker.len(),
                "shutdown timeout reached; cancelling running jobs"
            );
            cancel_jobs.cancel();
            if tokio::time::timeout(CANCEL_WAIT, tracker.wait())
                .await
                .is_err()
            {
                tracing::error!(running = tracker.len(), "some jobs did not stop in time");
            }
        }
        tracing::info!("coordinator stopped");
    }

    /// Adopts the builds an earlier coordinator left: each counts against capacity and is
    /// followed to its end; one whose job GitLab no longer runs is removed.
    async fn recover(&self, dispatcher: &Dispatcher) {
        let launches = match self.executor.recover().await {
            Ok(launches) => launches,
            Err(e) => {
                tracing::error!(error = %e, "cannot recover earlier builds; they are recovered at the next start");
                return;
            }
        };
        if !launches.is_empty() {
            tracing::info!(
                builds = launches.len(),
                "adopting the builds of an earlier run"
            );
        }
        for launch in launches {
            let Some(reporter) = self.reporter_for(&launch) else {
                tracing::error!(job = %launch.key, "cannot read the job of a recovered build; removing it");
                self.executor.discard(launch.key.clone()).await;
                continue;
            };
            let (runner, limit) = self
                .runners
                .iter()
                .find(|r| r.name == launch.key.runner)
                .map(|r| (r.name.clone(), r.limit()))
                .unwrap_or_else(|| (launch.key.runner.clone(), 0));
            // Taken now, before any poller asks for work, so adopted builds count first.
            let permit = self.limiter.acquire(&runner, limit).await;
            let dispatcher = dispatcher.clone();
            let executor = Arc::clone(&self.executor);
            dispatcher.tracker.clone().spawn(async move {
                match reporter.is_running().await {
                    Ok(false) => {
                        tracing::info!(job = %launch.key, "GitLab no longer runs this job; removing its build");
                        executor.discard(launch.key.clone()).await;
                        return;
                    }
                    Ok(true) => {}
                    Err(e) => {
                        tracing::warn!(job = %launch.key, error = %e, "cannot ask GitLab about a recovered job; following its build anyway");
                    }
                }
                dispatcher
                    .run_job(Job {
                        launch,
                        reporter,
                        runner,
                        _permit: permit,
                    })
                    .await;
            });
        }
    }

    /// A reporter for a recovered build, from the job file it carries.
    fn reporter_for(&self, launch: &Launch) -> Option<JobReporter> {
        let agent_job: AgentJob = serde_json::from_slice(&launch.job_file).ok()?;
        let payload: JobPayload = serde_json::from_value(agent_job.job).ok()?;
        if let Some(runner) = self.runners.iter().find(|r| r.name == agent_job.runner) {
            return Some(runner.reporter(&payload));
        }
        let api = RunnerApi::new(&agent_job.gitlab_url).ok()?;
        Some(JobReporter::new(api, payload, agent_job.runner))
    }
}

fn runner_concurrency(config: &Config, name: &str) -> usize {
    config
        .sources
        .gitlab
        .iter()
        .enumerate()
        .find(|(i, r)| r.display_name(*i) == name)
        .map(|(_, r)| r.request_concurrency.max(1))
        .unwrap_or(1)
}

/// Starts each claimed job's build and sees it to the end.
#[derive(Clone)]
struct Dispatcher {
    tracker: TaskTracker,
    executor: Arc<dyn Executor>,
    metrics: Arc<Metrics>,
    settings: Arc<AgentConfig>,
    cancel: CancellationToken,
}

/// One job on its way through an executor.
struct Job {
    launch: Launch,
    reporter: JobReporter,
    runner: String,
    _permit: Permit,
}

impl Dispatcher {
    fn dispatch(&self, claimed: ClaimedJob) {
        let this = self.clone();
        let job = Job {
            launch: launcher::gitlab_launch(&claimed, &self.settings, self.executor.name()),
            reporter: claimed.runner.reporter(&claimed.job),
            runner: claimed.runner.name.clone(),
            _permit: claimed.permit,
        };
        self.tracker.spawn(async move { this.run_job(job).await });
    }

    async fn run_job(self, mut job: Job) {
        let key: JobKey = job.launch.key.clone();
        let reporter = job.reporter.clone();
        job.launch.still_wanted = Some(StillWanted::new(move || {
            let reporter = reporter.clone();
            // Unreachable GitLab: keep the build (the agent or the timeouts settle it).
            Box::pin(async move { reporter.is_running().await.unwrap_or(true) })
        }));
        let labels = RunnerLabels {
            runner: job.runner.clone(),
        };
        self.metrics.jobs_started.get_or_create(&labels).inc();
        self.metrics.jobs_running.inc();
        let report = self
            .executor
            .run(job.launch, self.cancel.child_token())
            .await;
        self.metrics.jobs_running.dec();
        let (state, reason) = match report {
            Ok(report) if report.detached => {
                tracing::info!(job = %key, "left running for the next coordinator");
                return;
            }
            Ok(RunReport {
                result: Some(result),
                ..
            }) if result.reported => (result.state, result.failure_reason.unwrap_or_default()),
            Ok(report) => {
                let retry = if report.reason.is_infrastructure() {
                    format!(
                        "; kiln marks it as {} so `retry: when: {}` can re-run it",
                        report.reason, report.reason
                    )
                } else {
                    String::new()
                };
                let message = format!("{}{retry}", report.detail);
                Self::fail(&key, &job.reporter, report.reason, &message).await
            }
            Err(e) => {
                Self::fail(
                    &key,
                    &job.reporter,
                    crate::job::FailureReason::RunnerSystemFailure,
                    &e.to_string(),
                )
                .await
            }
        };
        self.metrics
            .jobs_finished
            .get_or_create(&FinishedLabels {
                runner: job.runner.clone(),
                state,
                reason,
            })
            .inc();
        tracing::info!(job = %key, "job finished");
    }

    async fn fail(
        key: &JobKey,
        reporter: &JobReporter,
        reason: crate::job::FailureReason,
        message: &str,
    ) -> (String, String) {
        tracing::warn!(job = %key, %reason, %message, "failing the job on the build's behalf");
        if let Err(e) = reporter.fail(reason, message).await {
            tracing::error!(job = %key, error = %e, "could not fail the job in GitLab; GitLab will time it out");
        }
        (
            "failed".into(),
            reporter.job().accepted_reason(reason).to_owned(),
        )
    }
}
