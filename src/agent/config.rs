//! `[agent]`: how `kiln agent` behaves inside each build (trace pacing, limits, shell).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::problem::Problem;

/// `[agent]`: behaviour of `kiln agent` inside a build.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Maximum trace size in KiB; output past it is dropped with a notice (GitLab's 4096).
    pub output_limit: u64,
    /// Trace update interval used until GitLab sends its own.
    #[serde(with = "humantime_serde")]
    pub trace_interval: Duration,
    /// How often to tell GitLab the job is alive when it produces no output.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// Time limit for `after_script`.
    #[serde(with = "humantime_serde")]
    pub after_script_timeout: Duration,
    /// The shell that runs scripts (`bash` when present, else `sh`).
    pub shell: Option<String>,
    /// How long a build waits for each service's `HEALTHCHECK_TCP_PORT` to accept connections
    /// (Kubernetes executor) before it goes on with a warning.
    #[serde(with = "humantime_serde")]
    pub service_wait: Duration,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            output_limit: 4096,
            trace_interval: Duration::from_secs(3),
            keepalive_interval: Duration::from_secs(30),
            after_script_timeout: Duration::from_secs(300),
            shell: None,
            service_wait: Duration::from_secs(30),
        }
    }
}

impl AgentConfig {
    /// Every problem of `[agent]`.
    pub(crate) fn problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        if self.output_limit == 0 {
            problems.push(Problem::new(
                "agent.output_limit",
                "must be at least 1 (KiB)",
            ));
        }
        if self.trace_interval.is_zero() {
            problems.push(Problem::new(
                "agent.trace_interval",
                "must be longer than 0s",
            ));
        }
        problems
    }
}
