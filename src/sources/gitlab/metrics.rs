//! The GitLab runners' metrics: `jobs/request` calls and their duration, the time jobs waited in
//! GitLab's queue, paused runners. (The `kiln_jobs_*` counts, which every source's builds feed,
//! are the coordinator's: `coordinator/metrics.rs`.)

use std::fmt::Write;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::telemetry::{Histograms, StageMetrics, registered, registered_histograms};

/// Labels naming a runner (one `[[sources.gitlab]]` entry).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RunnerLabels {
    /// The runner's name.
    pub(crate) runner: String,
}

/// Labels of a `jobs/request` call's result.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RequestLabels {
    /// The runner's name.
    pub(crate) runner: String,
    /// What GitLab answered.
    pub(crate) result: RequestResult,
}

/// What a `jobs/request` call brought.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub(crate) enum RequestResult {
    /// A job (one kiln can run, or one it must fail).
    Job,
    /// No job.
    NoJob,
    /// 429.
    RateLimited,
    /// 403: the token was rejected.
    Forbidden,
    /// No answer GitLab documents (transport error, 5xx, …).
    Error,
}

impl RequestResult {
    fn as_str(self) -> &'static str {
        match self {
            Self::Job => "job",
            Self::NoJob => "no_job",
            Self::RateLimited => "rate_limited",
            Self::Forbidden => "forbidden",
            Self::Error => "error",
        }
    }
}

impl EncodeLabelValue for RequestResult {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

/// The GitLab stage's metric families (registered once, shared by every runner).
#[derive(Debug)]
pub(crate) struct GitLabMetrics {
    /// `jobs/request` calls by result.
    pub(crate) job_requests: Family<RequestLabels, Counter>,
    /// Duration of `jobs/request` calls (long polls included).
    pub(crate) poll_duration: Histograms<RunnerLabels>,
    /// Time jobs waited in GitLab's queue (`time_in_queue_seconds`).
    pub(crate) queue_time: Histograms<RunnerLabels>,
    /// 1 while a runner is paused because GitLab rejected its token.
    pub(crate) runner_paused: Family<RunnerLabels, Gauge>,
}

impl StageMetrics for GitLabMetrics {
    fn register(registry: &mut Registry) -> Self {
        Self {
            job_requests: registered(
                registry,
                "gitlab_job_requests",
                "jobs/request calls to GitLab by result",
            ),
            poll_duration: registered_histograms(
                registry,
                "gitlab_poll_duration_seconds",
                "Duration of jobs/request calls, long polls included",
                (0.01, 2.0, 14),
            ),
            queue_time: registered_histograms(
                registry,
                "job_queue_time_seconds",
                "Time jobs waited in the CI server's queue before kiln took them",
                (0.5, 2.0, 14),
            ),
            runner_paused: registered(
                registry,
                "runner_paused",
                "1 while a runner is paused because its token was rejected",
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::Metrics;

    /// The names, help texts and label values the Grafana dashboard and alerts query.
    #[test]
    fn the_metrics_keep_the_names_and_label_values_users_query() {
        let metrics = Metrics::new();
        let gitlab = metrics.stage::<GitLabMetrics>();
        for result in [
            RequestResult::Job,
            RequestResult::NoJob,
            RequestResult::RateLimited,
            RequestResult::Forbidden,
            RequestResult::Error,
        ] {
            gitlab
                .job_requests
                .get_or_create(&RequestLabels {
                    runner: "r".into(),
                    result,
                })
                .inc();
        }
        let runner = RunnerLabels { runner: "r".into() };
        gitlab.runner_paused.get_or_create(&runner).set(1);
        gitlab.poll_duration.get_or_create(&runner).observe(0.5);
        gitlab.queue_time.get_or_create(&runner).observe(3.0);
        let text = metrics.encode();
        for expected in [
            "# HELP kiln_gitlab_job_requests jobs/request calls to GitLab by result.\n# TYPE kiln_gitlab_job_requests counter",
            "kiln_gitlab_job_requests_total{runner=\"r\",result=\"job\"} 1",
            "kiln_gitlab_job_requests_total{runner=\"r\",result=\"no_job\"} 1",
            "kiln_gitlab_job_requests_total{runner=\"r\",result=\"rate_limited\"} 1",
            "kiln_gitlab_job_requests_total{runner=\"r\",result=\"forbidden\"} 1",
            "kiln_gitlab_job_requests_total{runner=\"r\",result=\"error\"} 1",
            "# HELP kiln_runner_paused 1 while a runner is paused because its token was rejected.",
            "kiln_runner_paused{runner=\"r\"} 1",
            "# HELP kiln_gitlab_poll_duration_seconds Duration of jobs/request calls, long polls included.",
            "kiln_gitlab_poll_duration_seconds_bucket{le=\"0.01\",runner=\"r\"} 0",
            "# HELP kiln_job_queue_time_seconds Time jobs waited in the CI server's queue before kiln took them.",
            "kiln_job_queue_time_seconds_bucket{le=\"0.5\",runner=\"r\"} 0",
        ] {
            assert!(text.contains(expected), "{expected} missing from\n{text}");
        }
    }
}
