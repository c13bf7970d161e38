//! The source-neutral job model: what the coordinator knows about a job it took, and how it ended.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a job failed, in GitLab's vocabulary (the richest of the CI servers kiln speaks to).
///
/// Other sources map these onto their own terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureReason {
    /// The user's script exited non-zero (or was OOM-killed by its own limit).
    ScriptFailure,
    /// Infrastructure failed: the agent died, the pod was evicted, the node was lost.
    RunnerSystemFailure,
    /// The job ran past its timeout.
    JobExecutionTimeout,
    /// The job's image could not be pulled.
    ImagePullFailure,
    /// Nothing more specific is known.
    UnknownFailure,
    /// The job asked for something the runner's configuration does not allow.
    RunnerConfigurationError,
    /// The job needs a feature this runner does not have.
    RunnerUnsupported,
    /// A service the job depends on (artifacts, registry) failed.
    RunnerExternalDependencyFailure,
    /// Data the job received was corrupt.
    DataIntegrityFailure,
}

impl FailureReason {
    /// The wire name GitLab uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ScriptFailure => "script_failure",
            Self::RunnerSystemFailure => "runner_system_failure",
            Self::JobExecutionTimeout => "job_execution_timeout",
            Self::ImagePullFailure => "image_pull_failure",
            Self::UnknownFailure => "unknown_failure",
            Self::RunnerConfigurationError => "runner_configuration_error",
            Self::RunnerUnsupported => "runner_unsupported",
            Self::RunnerExternalDependencyFailure => "runner_external_dependency_failure",
            Self::DataIntegrityFailure => "data_integrity_failure",
        }
    }

    /// Whether this reason blames infrastructure rather than the user's script.
    ///
    /// GitLab only accepts a reason the job lists in `features.failure_reasons`; the fallback for
    /// an unlisted one depends on who is to blame.
    pub fn is_infrastructure(self) -> bool {
        !matches!(self, Self::ScriptFailure | Self::JobExecutionTimeout)
    }
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a job ended, as reported to its CI server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The job succeeded.
    Success,
    /// The job failed for `reason`; `message` is the line a person reads in the log.
    Failed {
        /// Why, in GitLab's vocabulary.
        reason: FailureReason,
        /// A one-line explanation.
        message: String,
    },
}

/// Which CI server a job came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceKind {
    /// A GitLab runner.
    GitLab,
    /// A Jenkins controller's queue.
    Jenkins,
}

impl SourceKind {
    /// The short name used in labels, pod names and metrics.
    pub fn short(self) -> &'static str {
        match self {
            Self::GitLab => "gl",
            Self::Jenkins => "jk",
        }
    }

    /// The full name, as in the `kiln.dev/source` label.
    pub fn name(self) -> &'static str {
        match self {
            Self::GitLab => "gitlab",
            Self::Jenkins => "jenkins",
        }
    }
}

/// Identifies a job a coordinator took, across sources.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JobKey {
    /// The CI server it came from.
    pub source: SourceKind,
    /// The name of the runner/source entry in the config that took it.
    pub runner: String,
    /// The CI server's id for the job.
    pub id: u64,
}

impl JobKey {
    /// The deterministic name of everything kiln creates for this job (`kiln-gl-<id>`).
    pub fn resource_name(&self) -> String {
        format!("kiln-{}-{}", self.source.short(), self.id)
    }
}

impl fmt::Display for JobKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}#{}", self.source.short(), self.runner, self.id)
    }
}
