//! Jenkins as a job source: for each queued build waiting for a label kiln serves, a one-shot
//! inbound agent (a Jenkins node + a pod running `jenkins/inbound-agent` over WebSocket); the
//! node is taken offline once its build starts and deleted with its pod when the build ends.
//! No Jenkins plugin needed; nothing runs while the queue is empty.

mod agent;
pub mod api;
pub mod config;
mod metrics;
mod queue;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::build::{About, Ending, Found, Outcome, SourceKind};
use crate::sources::driver::{Looked, QueueCore, QueueDriven};
use crate::sources::health::{Access, Failing, HealthTracker, Words};
use crate::sources::pacer::Pacer;
use crate::sources::pool::{Demand, Phase, Pool};
use crate::sources::warm::{self, Floors};
use crate::sources::{Adoption, Chain, MemberState, WarmFloor};
use crate::telemetry::Metrics;
use agent::{ANNOTATION_LABEL, ANNOTATION_NODE, ANNOTATION_POOL, AgentSpec, LABEL_NODE};
use api::{Computer, Credentials, JenkinsApi, JenkinsError};
use metrics::{AgentFailure, AgentFailureLabels, AgentLabels, JenkinsMetrics};

pub use config::JenkinsConfig;

/// Description of every node kiln creates; how kiln recognizes its nodes after a restart.
const NODE_DESCRIPTION: &str = "kiln one-shot agent";
/// Description of a label's anchor node.
const ANCHOR_DESCRIPTION: &str =
    "kiln label anchor: never connects; lets Jenkins name the label a queued build waits for";
/// The bare reason Jenkins gives when it has no agent nodes at all: it names no label then.
const NO_NODES_WHY: &str = "Waiting for next available executor";
/// The queue item of a warm agent's build: none (Jenkins numbers its items from 1).
const WARM_QUEUE_ID: u64 = 0;
/// The message on a node kiln took offline after its build started.
const OFFLINE_MESSAGE: &str = "kiln: one build per agent; deleted when this build ends";
/// The longest wait between queue polls after errors.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How a Jenkins source's health shows. Jenkins needs no token check before work can be
/// taken: a failing Jenkins is shown (and backed off from), not a reason to mark kiln unready.
const WORDS: Words = Words {
    checking: "verifying",
    rejected: "paused: credentials rejected",
    failing: Failing::BacksOff,
};

/// One Jenkins controller kiln provisions agents for.
pub struct JenkinsSource {
    core: QueueCore<Event>,
    config: JenkinsConfig,
    api: JenkinsApi,
    metrics: Arc<JenkinsMetrics>,
    wake: Arc<Notify>,
}

/// News for the poll loop from the coordinator.
pub(super) enum Event {
    /// An agent of an earlier run, still running.
    Adopted {
        node: String,
        build: String,
        label: String,
        queue_id: u64,
        /// The warm pool it was started for.
        pool: Option<String>,
    },
    /// An agent's build ended (its pod or process is gone).
    Ended { build: String, ending: Ending },
}

/// Wakes a source's poller (the webhook).
#[derive(Debug, Clone)]
pub struct Wake {
    /// The source's name.
    pub name: String,
    /// The webhook secret, if any.
    pub secret: Option<String>,
    notify: Arc<Notify>,
}

impl Wake {
    /// A waker notifying `notify` (tests and other callers of the router).
    pub fn new(name: String, secret: Option<String>, notify: Arc<Notify>) -> Self {
        Self {
            name,
            secret,
            notify,
        }
    }

    /// Makes the source look at the queue now.
    pub fn wake(&self) {
        self.notify.notify_one();
    }
}

/// What the poll loop keeps of an agent kiln started and has not deleted yet, besides its
/// label (its group), queue item (its work) and phase in the [`Pool`], by node name.
struct Agent {
    /// The name of its build (pod or process).
    build: String,
    /// Whether kiln took its node offline (it took its build).
    offlined: bool,
}

impl JenkinsSource {
    /// A source for entry `index` of `[[sources.jenkins]]`.
    ///
    /// # Errors
    /// An unusable URL.
    pub fn new(
        config: &JenkinsConfig,
        index: usize,
        metrics: Arc<Metrics>,
    ) -> Result<Self, JenkinsError> {
        let credentials = match (&config.token, &config.password) {
            (Some(token), _) if !token.is_empty() => Credentials::Token {
                user: config.user.clone(),
                token: token.clone(),
            },
            (_, password) => Credentials::Password {
                user: config.user.clone(),
                password: password.clone().unwrap_or_default(),
            },
        };
        Ok(Self {
            api: JenkinsApi::new(&config.url, credentials)?,
            core: QueueCore::new(
                SourceKind::Jenkins,
                config.display_name(index),
                config.limit,
                HealthTracker::new(&config.url, WORDS, Access::Accepted),
            ),
            config: config.clone(),
            metrics: metrics.stage::<JenkinsMetrics>(),
            wake: Arc::new(Notify::new()),
        })
    }

    /// The handle the webhook uses.
    pub fn waker(&self) -> Wake {
        Wake {
            name: self.core.name.clone(),
            secret: self.config.webhook_secret.clone(),
            notify: Arc::clone(&self.wake),
        }
    }

    fn adopted(
        &self,
        state: &mut State,
        node: String,
        build: String,
        label: String,
        queue_id: u64,
        pool: Option<String>,
    ) {
        tracing::info!(jenkins = %self.core.name, node = %node, build = %build, pool = pool.as_deref(), "adopted an agent of an earlier run");
        let agent = Agent {
            build,
            offlined: false,
        };
        let started = Instant::now();
        state.agents.insert(
            node.clone(),
            label,
            queue_id,
            started,
            Phase::Starting,
            agent,
        );
        // A warm agent is a member of its pool again (its age counts from now); a busy one is
        // reported taken at the first look.
        if let Some(pool) = pool {
            state.agents.join(&node, &pool);
            state.chain.warm_member(&node, &pool, MemberState::Idle);
        }
    }

    /// Sets `kiln_jenkins_agents` for every label kiln serves.
    fn count_agents(&self, state: &State) {
        for label in &self.config.labels {
            let alive = state.agents.count(label);
            self.metrics
                .agents
                .get_or_create(&self.labels(label))
                .set(i64::try_from(alive).unwrap_or(i64::MAX));
        }
    }

    fn labels(&self, label: &str) -> AgentLabels {
        AgentLabels {
            jenkins: self.core.name.clone(),
            label: label.to_owned(),
        }
    }

    fn failed(&self, label: &str, reason: AgentFailure) {
        self.metrics
            .agent_failures
            .get_or_create(&AgentFailureLabels {
                jenkins: self.core.name.clone(),
                label: label.to_owned(),
                reason,
            })
            .inc();
    }

    /// One look at Jenkins: move each agent along its life, then start agents for waiting
    /// builds.
    async fn tick(&self, state: &mut State) -> Result<(), JenkinsError> {
        let computers = self.api.computers_by_name().await?;
        // Nodes this run failed to delete (a 429 or 5xx on doDelete, a create whose answer was
        // lost) would stay, offline, until the next start of kiln: every look retries them.
        // Only this run's own nodes — another replica's are none of its business.
        for node in std::mem::take(&mut state.undeleted) {
            if computers.contains_key(&node) {
                self.delete_node(state, &node).await;
            }
        }
        for node in state.agents.names() {
            self.advance(state, &node, computers.get(&node)).await;
        }
        if !state.chain.leading() {
            // Another replica of kiln provisions from the queue; this one only sees its own
            // agents through their lives.
            return Ok(());
        }
        let mut items = self.api.queue().await?;
        let agent_nodes = computers.keys().filter(|name| !is_built_in(name)).count();
        if agent_nodes == 0
            && items
                .iter()
                .any(|i| i.buildable && i.why.as_deref().map(str::trim) == Some(NO_NODES_WHY))
        {
            self.create_anchors().await;
            // The anchors change what the queue says: read it again.
            items = self.api.queue().await?;
        }
        self.provision(state, &items).await;
        Ok(())
    }

    /// With no agent node at all, Jenkins' queue names no label (`Waiting for next available
    /// executor`). One permanently offline node per label makes it name the label (or that
    /// node) again; it never connects and never runs anything.
    async fn create_anchors(&self) {
        for label in &self.config.labels {
            let name = anchor_name(label);
            tracing::info!(jenkins = %self.core.name, node = %name, label, "Jenkins has no agent nodes, so its queue does not say which label builds wait for; creating an offline anchor node for the label");
            if let Err(e) = self.api.create_node(&name, label, ANCHOR_DESCRIPTION).await {
                tracing::warn!(jenkins = %self.core.name, node = %name, error = %e, "cannot create the label anchor node");
            }
        }
    }

    /// Moves one agent along: connected → busy (taken offline) → idle again (deleted); or
    /// deleted when it never connects.
    async fn advance(&self, state: &mut State, node: &str, computer: Option<&Computer>) {
        let Some(agent) = state.agents.get_mut(node) else {
            return;
        };
        let Some(computer) = computer else {
            tracing::warn!(jenkins = %self.core.name, node, "the agent's node was deleted in Jenkins; deleting its pod");
            self.retire(state, node).await;
            return;
        };
        if !computer.offline && agent.phase == Phase::Starting {
            agent.phase = Phase::Idle;
        }
        if !computer.idle {
            if agent.phase != Phase::Busy {
                tracing::info!(jenkins = %self.core.name, node, "agent took its build; taking it offline so it takes no other");
            }
            if let Some(pool) = state.agents.busy(node) {
                state.chain.warm_member(node, &pool, MemberState::Taken);
            }
            let Some(agent) = state.agents.get_mut(node) else {
                return;
            };
            if !agent.detail.offlined && !computer.temporarily_offline {
                match self.api.toggle_offline(node, OFFLINE_MESSAGE).await {
                    Ok(()) => agent.detail.offlined = true,
                    Err(e) => {
                        tracing::warn!(jenkins = %self.core.name, node, error = %e, "cannot take the agent offline; retrying")
                    }
                }
            } else if computer.temporarily_offline {
                agent.detail.offlined = true;
            }
            return;
        }
        if agent.phase == Phase::Busy {
            tracing::info!(jenkins = %self.core.name, node, "agent's build ended; deleting node and pod");
            self.retire(state, node).await;
            return;
        }
        if agent.phase == Phase::Starting && agent.started.elapsed() > self.config.connect_timeout {
            let (label, build, queue_id) =
                (agent.group.clone(), agent.detail.build.clone(), agent.work);
            let events = state.chain.explain(&build).await;
            tracing::error!(
                jenkins = %self.core.name, node, build = %build, label = %label,
                "the agent did not connect within {}{}; deleting it (its build gets a fresh agent)",
                humantime::format_duration(self.config.connect_timeout),
                events
            );
            self.failed(&label, AgentFailure::ConnectTimeout);
            state.agents.attempt_failed(queue_id);
            self.retire(state, node).await;
        }
    }

    /// The build of an agent ended on its own: it failed to start, was evicted, or the agent
    /// exited.
    async fn build_ended(&self, state: &mut State, node: &str, ending: Ending) {
        let Some(agent) = state.agents.get(node) else {
            return;
        };
        let (label, queue_id, connected) = (
            agent.group.clone(),
            agent.work,
            agent.phase != Phase::Starting,
        );
        if ending.outcome == Outcome::Lost {
            // Another coordinator runs it; nothing to clean up here.
            state.agents.remove(node);
            return;
        }
        if connected {
            tracing::warn!(jenkins = %self.core.name, node, detail = %ending.detail, "the agent's build ended; deleting the node");
        } else {
            let reason = AgentFailure::of(&ending);
            tracing::error!(jenkins = %self.core.name, node, reason = reason.as_str(), detail = %ending.detail, "the agent failed before it connected; deleting it (its build gets a fresh agent)");
            self.failed(&label, reason);
            state.agents.attempt_failed(queue_id);
        }
        self.retire(state, node).await;
    }

    /// Deletes an agent's node and its build.
    async fn retire(&self, state: &mut State, node: &str) {
        let Some(agent) = state.agents.remove(node) else {
            return;
        };
        warm::left(state.chain.as_ref(), &mut state.warm_backoff, node, &agent);
        self.delete_node(state, node).await;
        state.chain.stop(&agent.detail.build).await;
        self.count_agents(state);
    }

    /// Starts agents for builds waiting on kiln's labels: never more than waiting builds per
    /// label, within the global, per-Jenkins and per-label limits; deletes idle agents no build
    /// waits for (see [`Pool`]).
    async fn provision(&self, state: &mut State, items: &[api::QueueItem]) {
        // Read at every look: schedule windows move the floors.
        let mut floors = self.floors(state);
        floors.hold_back(&mut state.warm_backoff, &state.agents, Instant::now());
        let mut waiting: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
        for item in items.iter().filter(|i| i.buildable) {
            let Some(target) = item.why.as_deref().and_then(queue::waiting_for) else {
                continue;
            };
            let anchored = self.config.labels.iter().find(|l| anchor_name(l) == target);
            let label = if let Some(label) = self.config.labels.iter().find(|l| *l == target) {
                label.as_str()
            } else if let Some(label) = anchored {
                label.as_str()
            } else if let Some(agent) = state.agents.get(target) {
                // The label's only node is one of kiln's: Jenkins names the node.
                agent.group.as_str()
            } else {
                continue;
            };
            waiting.entry(label).or_default().push(item.id);
        }
        let demands: Vec<Demand<String>> = self
            .config
            .labels
            .iter()
            .map(|label| {
                let mut ids = waiting.remove(label.as_str()).unwrap_or_default();
                ids.sort_unstable();
                Demand {
                    cap: self.config.label_limits.get(label).copied(),
                    floor: floors.floor(label),
                    ..Demand::new(label.clone(), ids)
                }
            })
            .collect();
        warm::adopt_strays(
            state.chain.as_ref(),
            &mut state.agents,
            &floors,
            demands.iter().map(|d| (&d.group, d.work.len())),
            &self.core.name,
        );
        for node in state
            .agents
            .aged(|pool| floors.max_idle_age(pool), Instant::now())
        {
            tracing::info!(jenkins = %self.core.name, node = %node, "warm agent idle longer than its pool's max_idle_age; replacing it");
            self.retire(state, &node).await;
        }
        let plan = state.agents.plan(demands);
        let job_of = |queue_id: u64| {
            items
                .iter()
                .find(|i| i.id == queue_id)
                .and_then(|i| i.task.as_ref())
                .map(|t| t.name.clone())
                .unwrap_or_default()
        };
        for (item, attempts) in plan.given_up {
            let job = job_of(item);
            tracing::error!(jenkins = %self.core.name, item, job = %job, attempts, "no agent connected for this build after {attempts} tries; kiln stops starting agents for it (see the failures above)");
        }
        for node in plan.retire {
            tracing::info!(jenkins = %self.core.name, node = %node, "idle agent with no build waiting for it; deleting node and pod");
            self.retire(state, &node).await;
        }
        for start in plan.start {
            let pool = match start.work {
                Some(_) => None,
                None => match floors.pool_for(&start.group, &state.agents) {
                    Some(floor) => Some(floor.clone()),
                    None => continue,
                },
            };
            // A free slot within `concurrent` and this source's `limit`.
            let Some(slot) = state.chain.try_slot() else {
                return;
            };
            let queue_id = start.work.unwrap_or(WARM_QUEUE_ID);
            self.start_agent(
                state,
                &start.group,
                queue_id,
                &job_of(queue_id),
                pool.as_ref(),
                slot,
            )
            .await;
        }
    }

    /// The warm pools' floors for this source, by label.
    fn floors(&self, state: &mut State) -> Floors<String> {
        Floors::new(
            state.chain.warm_floors(),
            |floor| match &floor.label {
                None => {
                    Err("it names no label, and a Jenkins source keeps its agents by label".into())
                }
                Some(label) if !self.config.labels.contains(label) => Err(format!(
                    "its label {label:?} is not one of the source's `labels`"
                )),
                Some(label) => Ok(label.clone()),
            },
            &self.core.name,
            &mut state.ignored_pools,
        )
    }

    /// Starts an agent for queue item `queue_id`, or a warm one for pool `pool`.
    async fn start_agent(
        &self,
        state: &mut State,
        label: &str,
        queue_id: u64,
        job: &str,
        pool: Option<&WarmFloor>,
        slot: crate::sources::Slot,
    ) {
        let node = node_name(label);
        let attempt = state.agents.attempts(queue_id) + 1;
        let description = match pool {
            Some(floor) => format!(
                "{NODE_DESCRIPTION} ({}, warm pool {})",
                self.core.name, floor.pool
            ),
            None => format!(
                "{NODE_DESCRIPTION} ({}, queue item {queue_id})",
                self.core.name
            ),
        };
        if let Err(e) = self.api.create_node(&node, label, &description).await {
            tracing::error!(jenkins = %self.core.name, node, error = %e, "cannot create the agent node");
            // The create may have reached Jenkins even so (the answer was lost): make sure.
            state.undeleted.insert(node.clone());
            self.failed(label, AgentFailure::ProvisionError);
            return;
        }
        let secret = match self.api.agent_secret(&node).await {
            Ok(secret) => secret,
            Err(e) => {
                tracing::error!(jenkins = %self.core.name, node, error = %e, "cannot read the agent secret; deleting the node");
                self.delete_node(state, &node).await;
                self.failed(label, AgentFailure::ProvisionError);
                return;
            }
        };
        let url = self.api.url().to_string();
        let build = AgentSpec {
            jenkins: &self.core.name,
            url: &url,
            node: &node,
            label,
            queue_id,
            job,
            secret: &secret,
            agent_image: &self.config.agent_image,
            template: self.config.pod_templates.get(label),
            warm: pool,
        }
        .build();
        let pool = pool.map(|floor| floor.pool.as_str());
        tracing::info!(jenkins = %self.core.name, node, build = %build.name, label, queue_item = queue_id, pool, attempt, "agent started");
        self.metrics
            .agents_started
            .get_or_create(&self.labels(label))
            .inc();
        let agent = Agent {
            build: build.name.clone(),
            offlined: false,
        };
        let started = Instant::now();
        state.agents.insert(
            node.clone(),
            label.to_owned(),
            queue_id,
            started,
            Phase::Starting,
            agent,
        );
        if let Some(pool) = pool {
            state.agents.join(&node, pool);
            state.chain.warm_member(&node, pool, MemberState::Idle);
        }
        // How it ends, including failing to start, comes back as an `Ended` event.
        state.chain.launch(slot, build);
    }

    /// Deletes an agent node; one that cannot be deleted now is retried at the next look.
    async fn delete_node(&self, state: &mut State, node: &str) {
        if let Err(e) = self.api.delete_node(node).await {
            tracing::warn!(jenkins = %self.core.name, node, error = %e, "cannot delete the node; the next poll retries");
            state.undeleted.insert(node.to_owned());
        }
    }

    /// Whether `computer` is an agent node this source created (by its description).
    fn is_our_node(&self, computer: &api::Computer) -> bool {
        computer
            .description
            .as_deref()
            .is_some_and(|d| d.starts_with(&format!("{NODE_DESCRIPTION} ({},", self.core.name)))
    }

    /// After a restart: adopted agents whose node is gone are deleted, the others take their
    /// state from their node; kiln-described nodes with no agent are deleted.
    async fn recover(&self, state: &mut State) -> Result<(), JenkinsError> {
        let computers = self.api.computers_by_name().await?;
        for node in state.agents.names() {
            match computers.get(&node) {
                None => {
                    tracing::info!(jenkins = %self.core.name, node = %node, "agent of an earlier run without its node; deleting it");
                    self.retire(state, &node).await;
                }
                Some(computer) => {
                    if let Some(agent) = state.agents.get_mut(&node) {
                        let connected = !computer.offline || computer.temporarily_offline;
                        let busy = !computer.idle || computer.temporarily_offline;
                        agent.phase = match (busy, connected) {
                            (true, _) => Phase::Busy,
                            (false, true) => Phase::Idle,
                            (false, false) => Phase::Starting,
                        };
                        agent.detail.offlined = computer.temporarily_offline;
                    }
                }
            }
        }
        for computer in computers.values() {
            // Only the leading replica provisions, so only it knows that a node of kiln's
            // without an agent of its own is left over.
            if self.is_our_node(computer)
                && !state.agents.contains(&computer.display_name)
                && state.chain.leading()
            {
                tracing::info!(jenkins = %self.core.name, node = %computer.display_name, "node of an earlier run without its agent; deleting it");
                if let Err(e) = self.api.delete_node(&computer.display_name).await {
                    tracing::warn!(jenkins = %self.core.name, node = %computer.display_name, error = %e, "cannot delete the node");
                }
            }
        }
        Ok(())
    }
}

/// What the poll loop knows between ticks.
pub(super) struct State {
    /// Agents by node name, by label, for their queue items.
    agents: Pool<String, Agent>,
    /// Whether the agents of an earlier run were matched with their nodes.
    recovered: bool,
    /// Nodes of this run whose delete failed (or whose create may have succeeded unseen).
    undeleted: BTreeSet<String>,
    /// Warm pools a warning said mean nothing to this source (said once each).
    ignored_pools: HashSet<String>,
    /// Warm pools whose members fail before they get going.
    warm_backoff: warm::Backoff,
    /// The coordinator.
    chain: Arc<dyn Chain>,
}

/// Provisions agents until kiln shuts down. Agents outlive a shutdown; the next start adopts
/// them.
impl QueueDriven for JenkinsSource {
    type State = State;
    type Event = Event;
    type Error = JenkinsError;

    fn start(&self, chain: Arc<dyn Chain>) -> (State, Pacer, Option<Arc<Notify>>) {
        tracing::info!(jenkins = %self.core.name, url = %self.api.url(), labels = ?self.config.labels, "Jenkins source started");
        let state = State {
            agents: Pool::new(self.config.max_attempts),
            undeleted: BTreeSet::new(),
            ignored_pools: HashSet::new(),
            warm_backoff: warm::Backoff::default(),
            recovered: false,
            chain,
        };
        let pacer = Pacer::new(self.config.poll_interval, MAX_BACKOFF);
        (state, pacer, Some(Arc::clone(&self.wake)))
    }

    fn adopt_found(&self, found: &Found) -> Adoption {
        let node = found
            .annotations
            .get(ANNOTATION_NODE)
            .or_else(|| found.labels.get(LABEL_NODE))
            .cloned();
        match node {
            Some(node) if found.exists => {
                let label = found
                    .annotations
                    .get(ANNOTATION_LABEL)
                    .cloned()
                    .unwrap_or_default();
                let about = About {
                    project: String::new(),
                    job: format!("{label} (agent {node})"),
                    pipeline: None,
                    url: None,
                    queued_at: None,
                };
                self.core.inbox.send(Event::Adopted {
                    node,
                    build: found.name.clone(),
                    label,
                    queue_id: found.key.id,
                    pool: found.annotations.get(ANNOTATION_POOL).cloned(),
                });
                Adoption::Follow(about)
            }
            Some(_) => Adoption::Discard("the agent's pod is gone; its node is deleted".into()),
            None => Adoption::Discard("an agent build without its Jenkins node name".into()),
        }
    }

    fn ended_event(name: &str, ending: &Ending) -> Event {
        Event::Ended {
            build: name.to_owned(),
            ending: ending.clone(),
        }
    }

    async fn look(&self, state: &mut State) -> Result<Looked, JenkinsError> {
        if !state.recovered {
            self.recover(state).await?;
            state.recovered = true;
        }
        self.tick(state).await?;
        Ok(Looked::Talked)
    }

    /// News of an agent calls for a look at once: its node may need deleting.
    async fn handle(&self, state: &mut State, event: Event) -> bool {
        match event {
            Event::Adopted {
                node,
                build,
                label,
                queue_id,
                pool,
            } => self.adopted(state, node, build, label, queue_id, pool),
            Event::Ended { build, ending } => {
                let node = state
                    .agents
                    .iter()
                    .find(|(_, a)| a.detail.build == build)
                    .map(|(node, _)| node.clone());
                if let Some(node) = node {
                    self.build_ended(state, &node, ending).await;
                }
            }
        }
        true
    }

    async fn settle(&self, state: &mut State) {
        self.count_agents(state);
    }

    fn stopped(&self, state: &State) {
        tracing::info!(jenkins = %self.core.name, agents = state.agents.len(), "Jenkins source stopped; agents keep running and are adopted at the next start");
    }

    fn core(&self) -> &QueueCore<Event> {
        &self.core
    }
}

/// The anchor node of `label`.
fn anchor_name(label: &str) -> String {
    format!("kiln-anchor-{}", clean_label(label))
}

/// Jenkins' own node (named differently across versions).
fn is_built_in(name: &str) -> bool {
    matches!(name, "Built-In Node" | "master" | "(built-in)" | "")
}

fn clean_label(label: &str) -> String {
    let clean: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(30)
        .collect();
    clean.trim_matches('-').to_owned()
}

/// A node name never used before: Jenkins derives the agent secret from the name.
fn node_name(label: &str) -> String {
    let suffix: u64 = rand::rng().random();
    format!(
        "kiln-{}-{:012x}",
        clean_label(label),
        suffix & 0xffff_ffff_ffff
    )
}
