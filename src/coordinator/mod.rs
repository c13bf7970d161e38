//! The coordinator: wires sources → limiter → launcher → executor, finishes jobs their build
//! could not report, and drains on shutdown.

pub mod launcher;
pub mod limiter;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{AgentConfig, Config};
use crate::executor::{Executor, RunReport};
use crate::job::FailureReason;
use crate::sources::gitlab::api::ApiError;
use crate::sources::gitlab::poller::{self, ClaimedJob, Runner};
use crate::telemetry::{FinishedLabels, Metrics, RunnerLabels};
use limiter::Limiter;

/// How long cancelled builds get to report before the coordinator stops waiting.
const CANCEL_WAIT: Duration = Duration::from_secs(120);

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
                (r.name.clone(), r.url().to_owned(), state)
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
        let mut pollers = tokio::task::JoinSet::new();
        for runner in &self.runners {
            for _ in 0..runner_concurrency(&self.config, &runner.name) {
                let dispatcher = dispatcher.clone();
                pollers.spawn(poller::poll(
                    Arc::clone(runner),
                    self.limiter.clone(),
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

impl Dispatcher {
    fn dispatch(&self, claimed: ClaimedJob) {
        let this = self.clone();
        self.tracker
            .spawn(async move { this.run_job(claimed).await });
    }

    async fn run_job(self, claimed: ClaimedJob) {
        let launch = launcher::gitlab_launch(&claimed, &self.settings, self.executor.name());
        let labels = RunnerLabels {
            runner: claimed.runner.name.clone(),
        };
        self.metrics.jobs_started.get_or_create(&labels).inc();
        self.metrics.jobs_running.inc();
        let report = self.executor.run(launch, self.cancel.child_token()).await;
        let (state, reason) = match report {
            Ok(RunReport {
                result: Some(result),
                ..
            }) if result.reported => (result.state, result.failure_reason.unwrap_or_default()),
            Ok(report) => {
                let message = format!(
                    "{} before it reported the job; kiln marks it as a runner system failure so `retry: when: runner_system_failure` can re-run it",
                    report.detail
                );
                self.fail(&claimed, &message).await
            }
            Err(e) => self.fail(&claimed, &e.to_string()).await,
        };
        self.metrics.jobs_running.dec();
        self.metrics
            .jobs_finished
            .get_or_create(&FinishedLabels {
                runner: claimed.runner.name.clone(),
                state,
                reason,
            })
            .inc();
        tracing::info!(job = %claimed.key, "job finished");
    }

    async fn fail(&self, claimed: &ClaimedJob, message: &str) -> (String, String) {
        tracing::warn!(job = %claimed.key, %message, "failing the job on the build's behalf");
        let reason = FailureReason::RunnerSystemFailure;
        if let Err(e) = claimed.runner.fail_job(&claimed.job, reason, message).await {
            tracing::error!(job = %claimed.key, error = %e, "could not fail the job in GitLab; GitLab will time it out");
        }
        ("failed".into(), reason.as_str().into())
    }
}
