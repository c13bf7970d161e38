//! The GitHub source's metrics.

use std::fmt::Write;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::build::FailureReason;
use crate::telemetry::StageMetrics;
use crate::telemetry::registered;

impl StageMetrics for GitHubMetrics {
    fn register(registry: &mut Registry) -> Self {
        Self {
            runners_started: registered(
                registry,
                "github_runners_started",
                "GitHub just-in-time runners started",
            ),
            registrations_removed: registered(
                registry,
                "github_registrations_removed",
                "GitHub runner registrations removed because no runner served them",
            ),
            jobs_lost: registered(
                registry,
                "github_jobs_lost",
                "GitHub jobs lost with their runner, by the runner build's failure reason",
            ),
            // The name says "API" because the label could name others; only GitHub reports one.
            rate_limit_saturation: registered(
                registry,
                "api_rate_limit_saturation",
                "How much of an API's rate limit is used, 0 to 1",
            ),
        }
    }
}

/// Every GitHub source's metrics (labelled by the source's name).
pub(crate) struct GitHubMetrics {
    /// Runners started.
    pub(crate) runners_started: Family<GitHubLabels, Counter>,
    /// Registrations removed because no runner served them.
    pub(crate) registrations_removed: Family<GitHubLabels, Counter>,
    /// Jobs lost with their runner (evicted, OOM-killed, spot reclaim).
    pub(crate) jobs_lost: Family<LostLabels, Counter>,
    /// How much of GitHub's rate limit is used (0..1), as `kiln_api_rate_limit_saturation{api="github"}`.
    pub(crate) rate_limit_saturation: Family<ApiLabels, Gauge<f64, AtomicU64>>,
}

/// Labels naming an API kiln calls.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ApiLabels {
    /// The API.
    pub(crate) api: Api,
}

/// The APIs whose rate limit kiln reports.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub(crate) enum Api {
    /// GitHub's REST API (the installation's hourly limit).
    GitHub,
}

impl EncodeLabelValue for Api {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        encoder.write_str(match self {
            Api::GitHub => "github",
        })
    }
}

/// Labels naming a GitHub source.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct GitHubLabels {
    /// The GitHub source's name.
    pub(crate) github: String,
}

/// Labels of a GitHub job lost with its runner.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct LostLabels {
    /// The GitHub source's name.
    pub(crate) github: String,
    /// The failure reason of the runner's build.
    pub(crate) reason: LostReason,
}

/// The failure reason of a lost runner's build, as its wire name.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub(crate) struct LostReason(pub(crate) FailureReason);

impl EncodeLabelValue for LostReason {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        encoder.write_str(self.0.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_help_texts_and_reasons_read_as_the_dashboard_expects() {
        // As before the metrics moved out of `telemetry::Metrics`: docs/github.md names them.
        let metrics = crate::telemetry::Metrics::new();
        let github = metrics.stage::<GitHubMetrics>();
        github
            .jobs_lost
            .get_or_create(&LostLabels {
                github: "acme".into(),
                reason: LostReason(FailureReason::RunnerSystemFailure),
            })
            .inc();
        let acme = GitHubLabels {
            github: "acme".into(),
        };
        github.runners_started.get_or_create(&acme).inc();
        github.registrations_removed.get_or_create(&acme).inc();
        let text = metrics.encode();
        for line in [
            r#"kiln_github_runners_started_total{github="acme"} 1"#,
            r#"kiln_github_registrations_removed_total{github="acme"} 1"#,
            r#"kiln_github_jobs_lost_total{github="acme",reason="runner_system_failure"} 1"#,
            "# HELP kiln_github_jobs_lost GitHub jobs lost with their runner, by the runner build's failure reason.",
            "# HELP kiln_github_runners_started GitHub just-in-time runners started.",
            "# HELP kiln_github_registrations_removed GitHub runner registrations removed because no runner served them.",
        ] {
            assert!(text.contains(line), "{line}\n{text}");
        }
    }
}
