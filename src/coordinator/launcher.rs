//! The launcher turns a claimed job into what an executor runs: the agent's job file.

use crate::agent::AgentJob;
use crate::config::AgentConfig;
use crate::executor::Launch;
use crate::sources::gitlab::poller::ClaimedJob;

/// The launch of a claimed GitLab job on an executor called `executor`.
pub fn gitlab_launch(claimed: &ClaimedJob, settings: &AgentConfig, executor: &str) -> Launch {
    let job = AgentJob {
        gitlab_url: claimed.runner.url().to_owned(),
        job: claimed.raw.clone(),
        settings: settings.clone(),
        executor: executor.to_owned(),
        runner: claimed.runner.name.clone(),
    };
    Launch {
        key: claimed.key.clone(),
        // Serializing plain data into a Vec cannot fail.
        job_file: serde_json::to_vec(&job).unwrap_or_default(),
        timeout: claimed.job.timeout(),
        still_wanted: None,
    }
}
