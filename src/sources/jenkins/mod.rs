//! Jenkins as a job source: for each queued build waiting for a label kiln serves, a one-shot
//! inbound agent (a Jenkins node + a pod running `jenkins/inbound-agent` over WebSocket); the
//! node is taken offline once its build starts and deleted with its pod when the build ends.
//! No Jenkins plugin needed; nothing runs while the queue is empty.

pub mod api;
pub mod config;
mod pod;
mod queue;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::coordinator::limiter::{Limiter, Permit};
use crate::executor::kubernetes::{Ending, KubernetesExecutor};
use crate::job::SourceKind;
use crate::sources::pacer::Pacer;
use crate::telemetry::{AgentFailureLabels, AgentLabels, Metrics};
use api::{Computer, Credentials, JenkinsApi, JenkinsError};

pub use config::JenkinsConfig;
use pod::{AGENT_CONTAINER, ANNOTATION_LABEL, AgentSpec, LABEL_NODE};

/// Description of every node kiln creates; how kiln recognizes its nodes after a restart.
const NODE_DESCRIPTION: &str = "kiln one-shot agent";
/// Description of a label's anchor node.
const ANCHOR_DESCRIPTION: &str =
    "kiln label anchor: never connects; lets Jenkins name the label a queued build waits for";
/// The bare reason Jenkins gives when it has no agent nodes at all: it names no label then.
const NO_NODES_WHY: &str = "Waiting for next available executor";
/// The message on a node kiln took offline after its build started.
const OFFLINE_MESSAGE: &str = "kiln: one build per agent; deleted when this build ends";
/// The longest wait between queue polls after errors.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// One Jenkins controller kiln provisions agents for.
pub struct JenkinsSource {
    name: String,
    config: JenkinsConfig,
    api: JenkinsApi,
    executor: Arc<KubernetesExecutor>,
    limiter: Limiter,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
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

/// An agent kiln started and has not deleted yet.
struct Agent {
    label: String,
    pod: String,
    queue_id: u64,
    started: Instant,
    connected: bool,
    busy_seen: bool,
    offlined: bool,
    /// Consecutive looks at which this connected, idle agent had no build to wait for.
    surplus_looks: u32,
    stop_watch: CancellationToken,
    _permit: Permit,
}

impl JenkinsSource {
    /// A source for entry `index` of `[[sources.jenkins]]`, starting agent pods on `executor`
    /// within `limiter`'s capacity.
    ///
    /// # Errors
    /// An unusable URL.
    pub fn new(
        config: &JenkinsConfig,
        index: usize,
        executor: Arc<KubernetesExecutor>,
        limiter: Limiter,
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
            name: config.display_name(index),
            api: JenkinsApi::new(&config.url, credentials)?,
            config: config.clone(),
            executor,
            limiter,
            metrics,
            wake: Arc::new(Notify::new()),
        })
    }

    /// The handle the webhook uses.
    pub fn waker(&self) -> Wake {
        Wake {
            name: self.name.clone(),
            secret: self.config.webhook_secret.clone(),
            notify: Arc::clone(&self.wake),
        }
    }

    /// Provisions agents until `shutdown`. Agents and pods outlive a shutdown; the next start
    /// adopts them.
    pub async fn run(self, shutdown: CancellationToken) {
        let (ended_tx, mut ended_rx) = mpsc::unbounded_channel();
        let mut state = State {
            agents: BTreeMap::new(),
            attempts: HashMap::new(),
            given_up: HashMap::new(),
            ended_tx,
        };
        let mut pacer = Pacer::new(self.config.poll_interval, MAX_BACKOFF);
        let mut recovered = false;
        tracing::info!(jenkins = %self.name, url = %self.api.url(), labels = ?self.config.labels, "Jenkins source started");
        loop {
            if !recovered {
                match self.recover(&mut state, &shutdown).await {
                    Ok(()) => recovered = true,
                    Err(e) => {
                        tracing::warn!(jenkins = %self.name, error = %e, "cannot recover agents yet")
                    }
                }
            }
            while let Ok((node, ending)) = ended_rx.try_recv() {
                self.pod_ended(&mut state, &node, ending).await;
            }
            if !recovered {
                pacer.failed();
            } else {
                match self.tick(&mut state, &shutdown).await {
                    Ok(()) => pacer.succeeded(),
                    Err(e) => {
                        let wait = pacer.failed();
                        tracing::warn!(jenkins = %self.name, error = %e, "Jenkins poll failed; retrying in {}s", wait.as_secs());
                    }
                }
            }
            self.count_agents(&state);
            // Until the next look: a webhook may bring it forward (see Pacer), an ended agent
            // pod is handled at once.
            loop {
                tokio::select! {
                    () = tokio::time::sleep_until(pacer.next()) => break,
                    () = self.wake.notified() => {
                        if pacer.wake() {
                            tracing::debug!(jenkins = %self.name, "woken by webhook");
                            break;
                        }
                        tracing::debug!(jenkins = %self.name, "webhook folded into the next scheduled look");
                    }
                    Some((node, ending)) = ended_rx.recv() => {
                        self.pod_ended(&mut state, &node, ending).await;
                        break;
                    }
                    () = shutdown.cancelled() => {
                        for agent in state.agents.values() {
                            agent.stop_watch.cancel();
                        }
                        tracing::info!(jenkins = %self.name, agents = state.agents.len(), "Jenkins source stopped; agents keep running and are adopted at the next start");
                        return;
                    }
                }
            }
        }
    }
    /// Sets `kiln_jenkins_agents` for every label kiln serves.
    fn count_agents(&self, state: &State) {
        for label in &self.config.labels {
            let alive = state.agents.values().filter(|a| a.label == *label).count();
            self.metrics
                .jenkins_agents
                .get_or_create(&self.labels(label))
                .set(i64::try_from(alive).unwrap_or(i64::MAX));
        }
    }

    fn labels(&self, label: &str) -> AgentLabels {
        AgentLabels {
            jenkins: self.name.clone(),
            label: label.to_owned(),
        }
    }

    fn failed(&self, label: &str, reason: &str) {
        self.metrics
            .jenkins_agent_failures
            .get_or_create(&AgentFailureLabels {
                jenkins: self.name.clone(),
                label: label.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// One look at Jenkins: move each agent along its life, then start agents for waiting
    /// builds.
    async fn tick(
        &self,
        state: &mut State,
        shutdown: &CancellationToken,
    ) -> Result<(), JenkinsError> {
        let computers = self.api.computers_by_name().await?;
        let nodes: Vec<String> = state.agents.keys().cloned().collect();
        for node in nodes {
            self.advance(state, &node, computers.get(&node)).await;
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
        self.provision(state, &items, shutdown).await;
        Ok(())
    }

    /// With no agent node at all, Jenkins' queue names no label (`Waiting for next available
    /// executor`). One permanently offline node per label makes it name the label (or that
    /// node) again; it never connects and never runs anything.
    async fn create_anchors(&self) {
        for label in &self.config.labels {
            let name = anchor_name(label);
            tracing::info!(jenkins = %self.name, node = %name, label, "Jenkins has no agent nodes, so its queue does not say which label builds wait for; creating an offline anchor node for the label");
            if let Err(e) = self.api.create_node(&name, label, ANCHOR_DESCRIPTION).await {
                tracing::warn!(jenkins = %self.name, node = %name, error = %e, "cannot create the label anchor node");
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
            tracing::warn!(jenkins = %self.name, node, "the agent's node was deleted in Jenkins; deleting its pod");
            self.retire(state, node).await;
            return;
        };
        if !computer.offline || computer.temporarily_offline {
            agent.connected |= !computer.offline;
        }
        if !computer.idle {
            if !agent.busy_seen {
                tracing::info!(jenkins = %self.name, node, "agent took its build; taking it offline so it takes no other");
            }
            agent.busy_seen = true;
            agent.connected = true;
            if !agent.offlined && !computer.temporarily_offline {
                match self.api.toggle_offline(node, OFFLINE_MESSAGE).await {
                    Ok(()) => agent.offlined = true,
                    Err(e) => {
                        tracing::warn!(jenkins = %self.name, node, error = %e, "cannot take the agent offline; retrying")
                    }
                }
            } else if computer.temporarily_offline {
                agent.offlined = true;
            }
            return;
        }
        if agent.busy_seen {
            tracing::info!(jenkins = %self.name, node, "agent's build ended; deleting node and pod");
            self.retire(state, node).await;
            return;
        }
        if !agent.connected && agent.started.elapsed() > self.config.connect_timeout {
            let (label, pod, queue_id) = (agent.label.clone(), agent.pod.clone(), agent.queue_id);
            let events = self.executor.pod_events(&pod).await;
            tracing::error!(
                jenkins = %self.name, node, pod = %pod, label = %label,
                "the agent did not connect within {}{}; deleting it (its build gets a fresh agent)",
                humantime::format_duration(self.config.connect_timeout),
                events
            );
            self.failed(&label, "connect_timeout");
            *state.attempts.entry(queue_id).or_default() += 1;
            self.retire(state, node).await;
        }
    }

    /// The pod of an agent ended on its own: failed to start, evicted, or the agent exited.
    async fn pod_ended(&self, state: &mut State, node: &str, ending: Ending) {
        let Some(agent) = state.agents.get(node) else {
            return;
        };
        let (label, queue_id, connected) = (agent.label.clone(), agent.queue_id, agent.connected);
        if connected {
            tracing::warn!(jenkins = %self.name, node, detail = %ending.detail, "the agent's pod ended; deleting the node");
        } else {
            tracing::error!(jenkins = %self.name, node, reason = %ending.reason, detail = %ending.detail, "the agent's pod failed before it connected; deleting it (its build gets a fresh agent)");
            self.failed(&label, ending.reason.as_str());
            *state.attempts.entry(queue_id).or_default() += 1;
        }
        self.retire(state, node).await;
    }

    /// Deletes an agent's node and pod and frees its slot.
    async fn retire(&self, state: &mut State, node: &str) {
        let Some(agent) = state.agents.remove(node) else {
            return;
        };
        agent.stop_watch.cancel();
        if let Err(e) = self.api.delete_node(node).await {
            tracing::warn!(jenkins = %self.name, node, error = %e, "cannot delete the node; the next start retries");
        }
        self.executor.delete_pod(&agent.pod).await;
        self.count_agents(state);
    }

    /// Starts agents for builds waiting on kiln's labels: never more than waiting builds per
    /// label, within the global, per-Jenkins and per-label limits.
    async fn provision(
        &self,
        state: &mut State,
        items: &[api::QueueItem],
        shutdown: &CancellationToken,
    ) {
        let mut waiting: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for item in items.iter().filter(|i| i.buildable) {
            let Some(target) = item.why.as_deref().and_then(queue::waiting_for) else {
                continue;
            };
            let anchored = self.config.labels.iter().find(|l| anchor_name(l) == target);
            let label = if self.config.labels.iter().any(|l| l == target) {
                target.to_owned()
            } else if let Some(label) = anchored {
                label.clone()
            } else if let Some(agent) = state.agents.get(target) {
                // The label's only node is one of kiln's: Jenkins names the node.
                agent.label.clone()
            } else {
                continue;
            };
            let attempts = state.attempts.get(&item.id).copied().unwrap_or(0);
            if attempts >= self.config.max_attempts {
                if state.given_up.insert(item.id, ()).is_none() {
                    let job = item.task.as_ref().map(|t| t.name.as_str()).unwrap_or("?");
                    tracing::error!(jenkins = %self.name, item = item.id, job, label = %label, attempts, "no agent connected for this build after {attempts} tries; kiln stops starting agents for it (see the failures above)");
                }
                continue;
            }
            waiting.entry(label).or_default().push(item.id);
        }
        self.retire_surplus(state, &waiting).await;
        state
            .given_up
            .retain(|id, ()| items.iter().any(|i| i.id == *id));
        state
            .attempts
            .retain(|id, _| items.iter().any(|i| i.id == *id));
        for (label, mut ids) in waiting {
            ids.sort_unstable();
            let free_agents = state
                .agents
                .values()
                .filter(|a| a.label == label && !a.busy_seen)
                .count();
            let wanted = ids.len().saturating_sub(free_agents);
            for _ in 0..wanted {
                if self.config.limit > 0 && state.agents.len() >= self.config.limit {
                    return;
                }
                let of_label = state.agents.values().filter(|a| a.label == label).count();
                if self
                    .config
                    .label_limits
                    .get(&label)
                    .is_some_and(|limit| of_label >= *limit)
                {
                    break;
                }
                let Some(permit) = self.limiter.try_acquire(&self.name, 0) else {
                    return;
                };
                // The oldest waiting build without an agent of its own.
                let queue_id = ids
                    .iter()
                    .copied()
                    .find(|id| !state.agents.values().any(|a| a.queue_id == *id))
                    .unwrap_or(ids[0]);
                self.start_agent(state, &label, queue_id, permit, shutdown)
                    .await;
            }
        }
    }

    /// Connected, idle agents beyond the builds waiting for their label served a build too
    /// short to be seen busy between two looks, or lost theirs to another agent: either way
    /// they are not needed. Two looks in a row, so an agent Jenkins is just handing a build to
    /// is not taken.
    async fn retire_surplus(&self, state: &mut State, waiting: &BTreeMap<String, Vec<u64>>) {
        let mut retire = Vec::new();
        for label in &self.config.labels {
            let waiting = waiting.get(label).map_or(0, Vec::len);
            let mut idle: Vec<(&String, &mut Agent)> = state
                .agents
                .iter_mut()
                .filter(|(_, a)| a.label == *label && a.connected && !a.busy_seen)
                .collect();
            idle.sort_by_key(|(_, a)| a.started);
            let surplus = idle.len().saturating_sub(waiting);
            for (index, (node, agent)) in idle.into_iter().enumerate() {
                if index < surplus {
                    agent.surplus_looks += 1;
                    if agent.surplus_looks >= 2 {
                        retire.push(node.clone());
                    }
                } else {
                    agent.surplus_looks = 0;
                }
            }
        }
        for node in retire {
            tracing::info!(jenkins = %self.name, node = %node, "idle agent with no build waiting for it; deleting node and pod");
            self.retire(state, &node).await;
        }
    }

    async fn start_agent(
        &self,
        state: &mut State,
        label: &str,
        queue_id: u64,
        permit: Permit,
        shutdown: &CancellationToken,
    ) {
        let node = node_name(label);
        let attempt = state.attempts.get(&queue_id).copied().unwrap_or(0) + 1;
        let description = format!("{NODE_DESCRIPTION} ({}, queue item {queue_id})", self.name);
        if let Err(e) = self.api.create_node(&node, label, &description).await {
            tracing::error!(jenkins = %self.name, node, error = %e, "cannot create the agent node");
            self.failed(label, "provision_error");
            return;
        }
        let secret = match self.api.agent_secret(&node).await {
            Ok(secret) => secret,
            Err(e) => {
                tracing::error!(jenkins = %self.name, node, error = %e, "cannot read the agent secret; deleting the node");
                let _ = self.api.delete_node(&node).await;
                self.failed(label, "provision_error");
                return;
            }
        };
        let url = self.api.url().to_string();
        let spec = AgentSpec {
            jenkins: &self.name,
            url: &url,
            node: &node,
            label,
            queue_id,
            secret: &secret,
            agent_image: &self.config.agent_image,
            template: self.config.pod_templates.get(label),
        };
        let pod_name = spec.pod_name();
        let objects = pod::agent_pod(&spec, self.executor.settings(), self.executor.namespace());
        let (pod, pod_secret) = match objects {
            Ok(objects) => objects,
            Err(e) => {
                tracing::error!(jenkins = %self.name, node, error = %e, "cannot build the agent pod; deleting the node");
                let _ = self.api.delete_node(&node).await;
                self.failed(label, "runner_configuration_error");
                return;
            }
        };
        let subscription = self.executor.subscribe(&pod_name);
        if let Err(message) = self.executor.start_pod(&pod, &pod_secret).await {
            tracing::error!(jenkins = %self.name, node, %message, "cannot start the agent pod; deleting the node");
            let _ = self.api.delete_node(&node).await;
            self.failed(label, "provision_error");
            return;
        }
        tracing::info!(jenkins = %self.name, node, pod = %pod_name, label, queue_item = queue_id, attempt, "agent started");
        self.metrics
            .jenkins_agents_started
            .get_or_create(&self.labels(label))
            .inc();
        let stop_watch = shutdown.child_token();
        self.follow(&node, &pod_name, subscription, &stop_watch, state);
        state.agents.insert(
            node,
            Agent {
                label: label.to_owned(),
                pod: pod_name,
                queue_id,
                started: Instant::now(),
                connected: false,
                busy_seen: false,
                offlined: false,
                surplus_looks: 0,
                stop_watch,
                _permit: permit,
            },
        );
    }

    /// Watches an agent's pod in the background; its end is handled by the poll loop.
    fn follow(
        &self,
        node: &str,
        pod: &str,
        mut subscription: crate::executor::kubernetes::Subscription,
        stop: &CancellationToken,
        state: &State,
    ) {
        let executor = Arc::clone(&self.executor);
        let ended = state.ended_tx.clone();
        let (node, pod, stop) = (node.to_owned(), pod.to_owned(), stop.clone());
        tokio::spawn(async move {
            if let Some(ending) = executor
                .watch_pod(&pod, AGENT_CONTAINER, &mut subscription, &stop, None)
                .await
            {
                let _ = ended.send((node, ending));
            }
        });
    }

    /// Rebuilds the agent table from kiln's labelled pods and Jenkins' node list; deletes
    /// nodes whose pod is gone and pods whose node is gone.
    async fn recover(
        &self,
        state: &mut State,
        shutdown: &CancellationToken,
    ) -> Result<(), JenkinsError> {
        let computers = self.api.computers_by_name().await?;
        let pods = match self.executor.pods_of(SourceKind::Jenkins).await {
            Ok(pods) => pods,
            Err(message) => {
                tracing::warn!(jenkins = %self.name, %message, "cannot list agent pods; recovering later");
                return Err(JenkinsError::Body {
                    url: self.api.url().to_string(),
                    message: "agent pods could not be listed".into(),
                });
            }
        };
        let runner = crate::executor::kubernetes::podspec::label_value(&self.name);
        let mut pods_by_node = HashMap::new();
        for pod in pods {
            let labels = pod.metadata.labels.clone().unwrap_or_default();
            if labels.get(crate::executor::kubernetes::podspec::LABEL_RUNNER) != Some(&runner) {
                continue;
            }
            let (Some(name), Some(node)) = (pod.metadata.name.clone(), labels.get(LABEL_NODE))
            else {
                continue;
            };
            pods_by_node.insert(node.clone(), (name, pod));
        }
        for (node, (pod_name, pod)) in pods_by_node.iter() {
            let Some(computer) = computers.get(node) else {
                tracing::info!(jenkins = %self.name, node, pod = %pod_name, "agent pod without its node; deleting it");
                self.executor.delete_pod(pod_name).await;
                continue;
            };
            let label = pod
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ANNOTATION_LABEL))
                .cloned()
                .unwrap_or_default();
            let queue_id = pod
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(crate::executor::kubernetes::podspec::LABEL_JOB_ID))
                .and_then(|id| id.parse().ok())
                .unwrap_or_default();
            let permit = match self.limiter.try_acquire(&self.name, 0) {
                Some(permit) => permit,
                None => self.limiter.acquire(&self.name, 0).await,
            };
            let subscription = self.executor.subscribe(pod_name);
            let stop_watch = shutdown.child_token();
            self.follow(node, pod_name, subscription, &stop_watch, state);
            tracing::info!(jenkins = %self.name, node, pod = %pod_name, "adopted an agent of an earlier run");
            state.agents.insert(
                node.clone(),
                Agent {
                    label,
                    pod: pod_name.clone(),
                    queue_id,
                    started: Instant::now(),
                    connected: !computer.offline || computer.temporarily_offline,
                    busy_seen: !computer.idle || computer.temporarily_offline,
                    offlined: computer.temporarily_offline,
                    surplus_looks: 0,
                    stop_watch,
                    _permit: permit,
                },
            );
        }
        for computer in computers.values() {
            let ours = computer
                .description
                .as_deref()
                .is_some_and(|d| d.starts_with(&format!("{NODE_DESCRIPTION} ({},", self.name)));
            if ours && !pods_by_node.contains_key(&computer.display_name) {
                tracing::info!(jenkins = %self.name, node = %computer.display_name, "node of an earlier run without its pod; deleting it");
                if let Err(e) = self.api.delete_node(&computer.display_name).await {
                    tracing::warn!(jenkins = %self.name, node = %computer.display_name, error = %e, "cannot delete the node");
                }
            }
        }
        Ok(())
    }
}

/// What the poll loop knows between ticks.
struct State {
    /// Agents by node name.
    agents: BTreeMap<String, Agent>,
    /// Agents that failed to connect, by the queue item they were started for.
    attempts: HashMap<u64, u32>,
    /// Items kiln gave up on (logged once).
    given_up: HashMap<u64, ()>,
    /// Where agent pod watches report an ended pod.
    ended_tx: mpsc::UnboundedSender<(String, Ending)>,
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
