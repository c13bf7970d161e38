//! The Jenkins source's metrics.

use std::fmt::Write;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::build::{Ending, FailureReason};
use crate::sources::registered;
use crate::telemetry::StageMetrics;

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
    /// Its build ended before it connected with no failure reason: the outcome's name.
    Ended(&'static str),
}

impl AgentFailure {
    /// The failure of an agent whose build ended before it connected.
    pub(crate) fn of(ending: &Ending) -> Self {
        ending
            .reason()
            .map_or_else(|| Self::Ended(ending.outcome.as_str()), Self::Build)
    }

    /// As in the metric and the log.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::ConnectTimeout => "connect_timeout",
            Self::ProvisionError => "provision_error",
            Self::Build(reason) => reason.as_str(),
            Self::Ended(outcome) => outcome,
        }
    }
}

impl EncodeLabelValue for AgentFailure {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        encoder.write_str(self.as_str())
    }
}
