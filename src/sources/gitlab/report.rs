//! What the coordinator says to GitLab about a job on its build's behalf: the failure the build
//! could not report, and whether GitLab still runs the job (after a restart).

use std::time::Duration;

use crate::build::FailureReason;
use crate::gitlab::api::{ApiError, JobUpdate, RunnerApi, UpdateAck};
use crate::gitlab::payload::JobPayload;
use crate::sources::pacer::Pacer;

/// Reports on one job with its own token.
#[derive(Debug, Clone)]
pub struct JobReporter {
    api: RunnerApi,
    job: Box<JobPayload>,
    runner: String,
}

impl JobReporter {
    /// A reporter for `job`, talking to GitLab through `api`.
    pub fn new(api: RunnerApi, job: JobPayload, runner: String) -> Self {
        Self {
            api,
            job: Box::new(job),
            runner,
        }
    }

    /// The job.
    pub fn job(&self) -> &JobPayload {
        &self.job
    }

    /// Fails the job: appends `message` to its trace and sends the final state with a reason
    /// GitLab accepts for it.
    ///
    /// # Errors
    /// GitLab unreachable or answering unexpectedly after a few tries.
    pub async fn fail(&self, reason: FailureReason, message: &str) -> Result<(), ApiError> {
        let job = &self.job;
        let text = format!("\n\x1b[31;1mERROR: Job failed ({reason}): {message}\x1b[0;m\n");
        if let Err(e) = self.api.append_trace(job.id, &job.token, &text).await {
            tracing::warn!(runner = %self.runner, job = job.id, error = %e, "could not append the failure to the trace");
        }
        let update = JobUpdate {
            token: &job.token,
            state: "failed",
            failure_reason: Some(job.accepted_reason(reason)),
            exit_code: None,
            output: None,
        };
        let mut pacer = Pacer::new(Duration::from_secs(1), Duration::from_secs(30));
        for attempt in 1..=8u32 {
            match self.api.update_job(job.id, &update).await {
                Ok(UpdateAck::Pending(control)) => {
                    tokio::time::sleep(control.update_interval.unwrap_or(pacer.backoff())).await;
                }
                Ok(_) => return Ok(()),
                Err(e) if e.is_transient() && attempt < 8 => {
                    tokio::time::sleep(pacer.failed()).await;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Whether GitLab still runs the job, asked with the keep-alive update runners send
    /// (`PUT jobs/:id {state: running}`): 403/404 or a finished `Job-Status` mean it does not.
    ///
    /// # Errors
    /// GitLab unreachable or answering unexpectedly.
    pub async fn is_running(&self) -> Result<bool, ApiError> {
        let update = JobUpdate {
            token: &self.job.token,
            state: "running",
            failure_reason: None,
            exit_code: None,
            output: None,
        };
        Ok(match self.api.update_job(self.job.id, &update).await? {
            UpdateAck::Gone(_) => false,
            UpdateAck::Accepted(control) | UpdateAck::Pending(control) => !matches!(
                control.job_status.as_deref(),
                Some("canceled" | "failed" | "success")
            ),
            UpdateAck::ChecksumMismatch => true,
        })
    }
}
