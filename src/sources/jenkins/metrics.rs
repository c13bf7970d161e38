//! The Jenkins source's metrics.

use std::fmt::Write;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::build::{Ending, FailureReason, Outcome};
use crate::telemetry::StageMetrics;
use crate::telemetry::registered;

/// Every Jenkins source's metrics, labelled by the source's name and the agent's label.
#[derive(Debug)]
pub(crate) struct JenkinsMetrics {
    /// Agents started; agents alive now.
    pub(crate) agents_started: Family<AgentLabels, Counter>,
    pub(crate) agents: Family<AgentLabels, Gauge>,
    /// Agents that never served a build, by reason.
    pub(crate) agent_failures: Family<AgentFailureLabels, Counter>,
}

impl StageMetrics for JenkinsMetrics {
    fn register(registry: &mut Registry) -> Self {
        let agents_started = registered(
            registry,
            "jenkins_agents_started",
            "One-shot Jenkins agents started (node + pod)",
        );
        let agent_failures = registered(
            registry,
            "jenkins_agent_failures",
            "Jenkins agents deleted before serving a build, by reason",
        );
        let agents = registered(registry, "jenkins_agents", "Jenkins agents alive now");
        Self {
            agents_started,
            agents,
            agent_failures,
        }
    }
}

/// Labels of Jenkins agent metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct AgentLabels {
    /// The Jenkins source's name.
    pub(crate) jenkins: String,
    /// The Jenkins label.
    pub(crate) label: String,
}

/// Labels of a Jenkins agent that never served a build.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct AgentFailureLabels {
    /// The Jenkins source's name.
    pub(crate) jenkins: String,
    /// The Jenkins label.
    pub(crate) label: String,
    pub(crate) reason: AgentFailure,
}

/// Why an agent was deleted before it served a build.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub(crate) enum AgentFailure {
    /// It did not connect within `connect_timeout` (`connect_timeout`).
    ConnectTimeout,
    /// Its node or secret could not be made (`provision_error`).
    ProvisionError,
    /// Its build ended before it connected, for this reason (`image_pull_failure`, …).
    Build(FailureReason),
    /// Its build ended before it connected with no failure reason (as the outcome's name).
    Ended(Outcome),
}

impl AgentFailure {
    /// The failure of an agent whose build ended before it connected.
    pub(crate) fn of(ending: &Ending) -> Self {
        ending
            .reason()
            .map_or(Self::Ended(ending.outcome), Self::Build)
    }

    /// As in the metric and the log.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::ConnectTimeout => "connect_timeout",
            Self::ProvisionError => "provision_error",
            Self::Build(reason) => reason.as_str(),
            Self::Ended(outcome) => outcome.as_str(),
        }
    }
}

impl EncodeLabelValue for AgentFailure {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        encoder.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::Metrics;

    #[test]
    fn names_help_texts_and_reasons_read_as_the_dashboard_expects() {
        let metrics = Metrics::new();
        let jenkins = metrics.stage::<JenkinsMetrics>();
        let failed = |reason| AgentFailureLabels {
            jenkins: "ci".into(),
            label: "maven".into(),
            reason,
        };
        jenkins
            .agent_failures
            .get_or_create(&failed(AgentFailure::ConnectTimeout))
            .inc();
        let pulled = Ending::failed(FailureReason::ImagePullFailure, "no such image");
        jenkins
            .agent_failures
            .get_or_create(&failed(AgentFailure::of(&pulled)))
            .inc();
        let mut canceled = pulled.clone();
        canceled.outcome = Outcome::Canceled;
        jenkins
            .agent_failures
            .get_or_create(&failed(AgentFailure::of(&canceled)))
            .inc();
        let maven = AgentLabels {
            jenkins: "ci".into(),
            label: "maven".into(),
        };
        jenkins.agents_started.get_or_create(&maven).inc();
        jenkins.agents.get_or_create(&maven).set(2);
        let text = metrics.encode();
        for line in [
            r#"kiln_jenkins_agents_started_total{jenkins="ci",label="maven"} 1"#,
            r#"kiln_jenkins_agents{jenkins="ci",label="maven"} 2"#,
            "# HELP kiln_jenkins_agent_failures Jenkins agents deleted before serving a build, by reason.",
            r#"kiln_jenkins_agent_failures_total{jenkins="ci",label="maven",reason="connect_timeout"} 1"#,
            r#"kiln_jenkins_agent_failures_total{jenkins="ci",label="maven",reason="image_pull_failure"} 1"#,
            r#"kiln_jenkins_agent_failures_total{jenkins="ci",label="maven",reason="canceled"} 1"#,
            "# HELP kiln_jenkins_agents Jenkins agents alive now.",
            "# HELP kiln_jenkins_agents_started One-shot Jenkins agents started (node + pod).",
        ] {
            assert!(text.contains(line), "{line}\n{text}");
        }
    }
}
