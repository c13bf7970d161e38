//! The job file an executor hands `kiln agent`: a GitLab job as GitLab sent it, plus how the
//! agent should behave. It travels in the build's secrets (it holds the job token).

use serde::{Deserialize, Serialize};

use super::config::AgentConfig;

/// What the executor hands the agent (written as JSON to the job file).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentJob {
    /// GitLab's base URL.
    pub gitlab_url: String,
    /// The job JSON exactly as GitLab sent it.
    pub job: serde_json::Value,
    /// Agent behaviour from the coordinator's config.
    #[serde(default)]
    pub settings: AgentConfig,
    /// The executor's name, shown in the trace (`local`, `kubernetes`).
    #[serde(default = "local")]
    pub executor: String,
    /// The runner's name, shown in the trace.
    #[serde(default)]
    pub runner: String,
    /// Fingerprints of the coordinator's credentials (runner tokens, source tokens, keys),
    /// masked in the trace though the build never holds them.
    #[serde(default)]
    pub masked: Vec<super::Fingerprint>,
}

fn local() -> String {
    "local".into()
}
