//! Executors run one build each and report how it ended; they know nothing about CI servers.

pub mod kubernetes;
pub mod local;

use std::time::Duration;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::agent::AgentResult;
use crate::job::{FailureReason, JobKey};

/// Asks the CI server whether it still runs the job (false: canceled or finished there).
/// Executors ask while a build has not started yet (a pod still Pending), when nothing in the
/// build can notice a cancel.
#[derive(Clone)]
pub struct StillWanted(std::sync::Arc<dyn Fn() -> BoxFuture<'static, bool> + Send + Sync>);

impl StillWanted {
    /// A check running `ask`.
    pub fn new(ask: impl Fn() -> BoxFuture<'static, bool> + Send + Sync + 'static) -> Self {
        Self(std::sync::Arc::new(ask))
    }

    /// Asks.
    pub async fn ask(&self) -> bool {
        (self.0)().await
    }
}

impl std::fmt::Debug for StillWanted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StillWanted")
    }
}

/// What the launcher hands an executor: everything one build needs.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The job.
    pub key: JobKey,
    /// The agent's job file (JSON of [`crate::agent::AgentJob`]); holds the job token.
    pub job_file: Vec<u8>,
    /// The job's timeout; the executor gives up a margin after it.
    pub timeout: Duration,
    /// Whether the CI server still runs the job (set by the coordinator).
    pub still_wanted: Option<StillWanted>,
}

/// How a build ended, as far as the executor can tell.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// What the agent reported, if it got that far.
    pub result: Option<AgentResult>,
    /// A one-line account of how the build ended (exit code, signal, eviction, …), for the
    /// trace when the agent could not report the job itself.
    pub detail: String,
    /// The reason to fail the job with when the agent could not report it.
    pub reason: FailureReason,
    /// The build keeps running without this coordinator (shutdown of an executor whose builds
    /// survive restarts): nobody reports anything; the next coordinator adopts it.
    pub detached: bool,
}

impl RunReport {
    /// A build that ended without its agent reporting, for `reason`.
    pub fn failed(reason: FailureReason, detail: impl Into<String>) -> Self {
        Self {
            result: None,
            detail: detail.into(),
            reason,
            detached: false,
        }
    }
}

/// Errors starting or watching a build.
#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    /// The build's work directory or job file could not be prepared.
    #[error("cannot prepare the build of {job}: {message}")]
    Prepare {
        /// The job.
        job: JobKey,
        /// Why.
        message: String,
    },
    /// The build could not be started.
    #[error("cannot start the build of {job}: {message}")]
    Start {
        /// The job.
        job: JobKey,
        /// Why.
        message: String,
    },
    /// The builds of an earlier coordinator could not be listed.
    #[error("cannot recover the builds of an earlier run: {message}")]
    Recover {
        /// Why.
        message: String,
    },
}

/// Runs builds.
pub trait Executor: Send + Sync {
    /// Runs `launch` to its end. `cancel` stops it early (shutdown): the agent is asked to stop
    /// and report; if it cannot, the report says so.
    fn run(
        &self,
        launch: Launch,
        cancel: CancellationToken,
    ) -> BoxFuture<'_, Result<RunReport, ExecutorError>>;

    /// The executor's name, as shown in traces and sent to GitLab.
    fn name(&self) -> &'static str;

    /// Whether it honours a job's `image` and `services`.
    fn runs_images(&self) -> bool;

    /// Whether builds keep running when the coordinator stops (pods do; child processes do
    /// not). Then shutdown detaches from builds instead of draining them.
    fn survives_restart(&self) -> bool {
        false
    }

    /// The builds an earlier coordinator left behind, to be followed again (each is passed to
    /// [`Executor::run`], which adopts the existing build instead of starting a second one).
    fn recover(&self) -> BoxFuture<'_, Result<Vec<Launch>, ExecutorError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    /// Waits until a build could start at once (the Kubernetes executor: until its API rate
    /// limit has room for a build's calls). The coordinator asks before each job request, so a
    /// burst of jobs waits in the CI server's queue, not inside kiln.
    fn ready(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    /// Removes whatever is left of a recovered build whose job its CI server no longer runs.
    fn discard(&self, key: JobKey) -> BoxFuture<'_, ()> {
        let _ = key;
        Box::pin(async {})
    }
}
