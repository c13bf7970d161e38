//! The coordinator's metrics: builds alive by phase, how they ended, how long they took and
//! waited, and what they cost. Registered once per process through [`Metrics::stage`].
//!
//! [`Metrics::stage`]: crate::telemetry::Metrics::stage

use std::fmt::Write;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::table::Phase;
use crate::build::{Ending, FailureReason, Outcome, SourceKind};
use crate::telemetry::{Histograms, StageMetrics, registered, registered_histograms};

/// How a build ended, without the failure reason (a label of its own).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
enum Ended {
    Succeeded,
    Failed,
    Canceled,
    Lost,
}

impl From<Outcome> for Ended {
    fn from(outcome: Outcome) -> Self {
        match outcome {
            Outcome::Succeeded => Self::Succeeded,
            Outcome::Failed(_) => Self::Failed,
            Outcome::Canceled => Self::Canceled,
            Outcome::Lost => Self::Lost,
        }
    }
}

impl EncodeLabelValue for Ended {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        // The words of `Outcome::as_str`.
        encoder.write_str(match self {
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Canceled => "canceled",
            Self::Lost => "lost",
        })
    }
}

impl EncodeLabelValue for SourceKind {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.name())
    }
}

impl EncodeLabelValue for FailureReason {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

impl EncodeLabelValue for Phase {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

/// Labels naming a source kind (`gitlab`, `jenkins`, `github`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: SourceKind,
}

/// Labels of a finished build; `reason` is empty unless it failed.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    source: SourceKind,
    outcome: Ended,
    reason: Option<FailureReason>,
}

/// Labels of a build's duration.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DurationLabels {
    source: SourceKind,
    outcome: Ended,
}

/// Labels of the builds alive now.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    source: SourceKind,
    phase: Phase,
}

/// Labels of what builds cost; `class` is empty without a resource class.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CostLabels {
    source: SourceKind,
    project: String,
    class: String,
}

/// The coordinator's metric families.
#[derive(Debug)]
pub(crate) struct CoordinatorMetrics {
    builds_finished: Family<OutcomeLabels, Counter>,
    build_duration: Histograms<DurationLabels>,
    build_queue_wait: Histograms<SourceLabels>,
    builds: Family<PhaseLabels, Gauge>,
    build_cost: Family<CostLabels, Counter<f64, AtomicU64>>,
}

impl StageMetrics for CoordinatorMetrics {
    fn register(registry: &mut Registry) -> Self {
        Self {
            builds_finished: registered(
                registry,
                "builds_finished",
                "Builds finished, by source, outcome and failure reason",
            ),
            build_duration: registered_histograms(
                registry,
                "build_duration_seconds",
                "Time from a build's launch to its end",
                (1.0, 2.0, 16),
            ),
            build_queue_wait: registered_histograms(
                registry,
                "build_queue_wait_seconds",
                "Time from work being queued on its CI server until its build ran",
                (0.25, 2.0, 16),
            ),
            builds: registered(registry, "builds", "Builds alive now, by phase"),
            build_cost: registered(
                registry,
                "build_cost",
                "What finished builds cost: pod-seconds times vCPU and GiB times their prices",
            ),
        }
    }
}

impl CoordinatorMetrics {
    /// A build of `source` was handed to the executor (or adopted).
    pub(crate) fn launched(&self, source: SourceKind) {
        self.phase(source, Phase::Pending, 1);
    }

    /// A build of `source` runs now, after its work waited `waited` since it was queued.
    pub(crate) fn running(&self, source: SourceKind, waited: Option<Duration>) {
        self.phase(source, Phase::Pending, -1);
        self.phase(source, Phase::Running, 1);
        if let Some(waited) = waited {
            self.build_queue_wait
                .get_or_create(&SourceLabels { source })
                .observe(waited.as_secs_f64());
        }
    }

    /// A build of `source` that was in `phase` ended as `ending`, `took` after its launch.
    pub(crate) fn ended(&self, source: SourceKind, phase: Phase, ending: &Ending, took: Duration) {
        self.phase(source, phase, -1);
        let outcome = Ended::from(ending.outcome);
        self.builds_finished
            .get_or_create(&OutcomeLabels {
                source,
                outcome,
                reason: ending.reason(),
            })
            .inc();
        self.build_duration
            .get_or_create(&DurationLabels { source, outcome })
            .observe(took.as_secs_f64());
    }

    /// A finished build of `source` and `project` in resource class `class` cost `cost`.
    pub(crate) fn cost(&self, source: SourceKind, project: &str, class: Option<&str>, cost: f64) {
        self.build_cost
            .get_or_create(&CostLabels {
                source,
                project: project.to_owned(),
                class: class.unwrap_or_default().to_owned(),
            })
            .inc_by(cost);
    }

    fn phase(&self, source: SourceKind, phase: Phase, by: i64) {
        self.builds
            .get_or_create(&PhaseLabels { source, phase })
            .inc_by(by);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::Metrics;

    /// The series a build's life leaves, by name and labels exactly as dashboards and alerts
    /// query them.
    #[test]
    fn label_values_are_the_strings_dashboards_query() {
        let metrics = Metrics::new();
        let stage = metrics.stage::<CoordinatorMetrics>();
        stage.launched(SourceKind::Jenkins);
        stage.running(SourceKind::Jenkins, Some(Duration::from_secs(1)));
        stage.ended(
            SourceKind::Jenkins,
            Phase::Running,
            &Ending::failed(FailureReason::ImagePullFailure, "no such image"),
            Duration::from_secs(3),
        );
        stage.launched(SourceKind::GitHub);
        stage.ended(
            SourceKind::GitHub,
            Phase::Pending,
            &Ending::lost("detached"),
            Duration::from_secs(1),
        );
        stage.cost(SourceKind::GitLab, "group/demo", None, 0.5);
        let text = metrics.encode();
        for line in [
            r#"kiln_builds_finished_total{source="jenkins",outcome="failed",reason="image_pull_failure"} 1"#,
            r#"kiln_builds_finished_total{source="github",outcome="lost",reason=""} 1"#,
            r#"kiln_build_duration_seconds_count{source="jenkins",outcome="failed"} 1"#,
            r#"kiln_build_queue_wait_seconds_count{source="jenkins"} 1"#,
            r#"kiln_builds{source="jenkins",phase="running"} 0"#,
            r#"kiln_builds{source="jenkins",phase="pending"} 0"#,
            r#"kiln_builds{source="github",phase="pending"} 0"#,
            r#"kiln_build_cost_total{source="gitlab",project="group/demo",class=""} 0.5"#,
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from:\n{text}"
            );
        }
    }

    #[test]
    fn the_outcome_label_is_the_outcome_as_logged() {
        let metrics = Metrics::new();
        let stage = metrics.stage::<CoordinatorMetrics>();
        let outcomes = [
            Outcome::Succeeded,
            Outcome::Failed(FailureReason::ScriptFailure),
            Outcome::Canceled,
            Outcome::Lost,
        ];
        for outcome in outcomes {
            let ending = Ending {
                outcome,
                detail: String::new(),
                reported: true,
                exit_code: None,
            };
            stage.launched(SourceKind::GitLab);
            stage.ended(SourceKind::GitLab, Phase::Pending, &ending, Duration::ZERO);
        }
        let text = metrics.encode();
        for outcome in outcomes {
            let series = format!(
                r#"kiln_build_duration_seconds_count{{source="gitlab",outcome="{}"}} 1"#,
                outcome.as_str()
            );
            assert!(
                text.lines().any(|l| l == series),
                "{series} missing from:\n{text}"
            );
        }
    }
}
