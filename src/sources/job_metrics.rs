//! The job counts (`kiln_jobs_*`) the dashboard has shown since kiln ran only GitLab jobs. Every
//! source's work feeds them: the coordinator counts the builds it runs, and a source counts work
//! it failed before any build existed (a GitLab job kiln cannot run). They live with the sources,
//! which both of those can reach.

use std::fmt::Write;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::telemetry::StageMetrics;
use crate::telemetry::registered;

/// Labels naming a source entry; `runner` is the name dashboards query.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RunnerLabels {
    runner: String,
}

/// Labels of a finished job; `reason` is empty on success.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FinishedLabels {
    runner: String,
    state: JobState,
    reason: String,
}

/// How a job ended, in GitLab's words (canceled counts as failed).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
enum JobState {
    Success,
    Failed,
}

impl EncodeLabelValue for JobState {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        encoder.write_str(match self {
            Self::Success => "success",
            Self::Failed => "failed",
        })
    }
}

/// `kiln_jobs_started`, `kiln_jobs_finished` and `kiln_jobs_running`.
#[derive(Debug)]
pub(crate) struct JobMetrics {
    started: Family<RunnerLabels, Counter>,
    finished: Family<FinishedLabels, Counter>,
    running: Gauge,
}

impl StageMetrics for JobMetrics {
    fn register(registry: &mut Registry) -> Self {
        Self {
            started: registered(registry, "jobs_started", "Jobs taken and started"),
            finished: registered(
                registry,
                "jobs_finished",
                "Jobs finished, by state and failure reason",
            ),
            running: registered(registry, "jobs_running", "Jobs running now"),
        }
    }
}

impl JobMetrics {
    /// Source entry `runner` started a build for a job.
    pub(crate) fn started(&self, runner: &str) {
        self.started
            .get_or_create(&RunnerLabels {
                runner: runner.to_owned(),
            })
            .inc();
        self.running.inc();
    }

    /// A build counted by [`JobMetrics::started`] is over (finished or no longer followed).
    pub(crate) fn stopped(&self) {
        self.running.dec();
    }

    /// A job of source entry `runner` finished: succeeded, or failed for `reason`.
    pub(crate) fn finished(&self, runner: &str, succeeded: bool, reason: &str) {
        let state = if succeeded {
            JobState::Success
        } else {
            JobState::Failed
        };
        self.finished
            .get_or_create(&FinishedLabels {
                runner: runner.to_owned(),
                state,
                reason: reason.to_owned(),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::Metrics;

    /// The names, help texts and label values the Grafana dashboard and alerts query.
    #[test]
    fn the_job_counts_keep_the_names_and_label_values_users_query() {
        let metrics = Metrics::new();
        let jobs = metrics.stage::<JobMetrics>();
        jobs.started("r");
        jobs.started("r");
        jobs.stopped();
        jobs.finished("r", true, "");
        jobs.finished("r", false, "script_failure");
        let text = metrics.encode();
        for expected in [
            "# HELP kiln_jobs_started Jobs taken and started.\n# TYPE kiln_jobs_started counter",
            "kiln_jobs_started_total{runner=\"r\"} 2",
            "# HELP kiln_jobs_finished Jobs finished, by state and failure reason.",
            "kiln_jobs_finished_total{runner=\"r\",state=\"success\",reason=\"\"} 1",
            "kiln_jobs_finished_total{runner=\"r\",state=\"failed\",reason=\"script_failure\"} 1",
            "# HELP kiln_jobs_running Jobs running now.\n# TYPE kiln_jobs_running gauge\nkiln_jobs_running 1",
        ] {
            assert!(text.contains(expected), "{expected} missing from\n{text}");
        }
    }
}
