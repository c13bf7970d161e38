//! Executors run one build each and report how it ended; they know nothing about CI servers.

pub mod local;

use std::time::Duration;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::agent::AgentResult;
use crate::job::JobKey;

/// What the launcher hands an executor: everything one build needs.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The job.
    pub key: JobKey,
    /// The agent's job file (JSON of [`crate::agent::AgentJob`]); holds the job token.
    pub job_file: Vec<u8>,
    /// The job's timeout; the executor gives up a margin after it.
    pub timeout: Duration,
}

/// How a build ended, as far as the executor can tell.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// What the agent reported, if it got that far.
    pub result: Option<AgentResult>,
    /// A one-line account of how the build ended (exit code, signal, …), for the trace when the
    /// agent could not report the job itself.
    pub detail: String,
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
}
