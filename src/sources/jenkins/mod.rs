//! Jenkins as a job source: for each queued build waiting for a label kiln serves, a one-shot
//! inbound agent (a Jenkins node + a pod running `jenkins/inbound-agent` over WebSocket); the
//! node is taken offline once its build starts and deleted with its pod when the build ends.
//! No Jenkins plugin needed; nothing runs while the queue is empty.

mod agent;
pub mod api;
pub mod config;
mod queue;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use rand::Rng;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::build::{About, BuildKey, Ending, Found, Outcome, SourceKind};
use crate::sources::pacer::Pacer;
use crate::sources::{Adoption, Chain, Health, Source};
use crate::telemetry::{AgentFailureLabels, AgentLabels, Metrics};
use agent::{ANNOTATION_LABEL, ANNOTATION_NODE, AgentSpec, LABEL_NODE};
use api::{Computer, Credentials, JenkinsApi, JenkinsError};

pub use config::JenkinsConfig;

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
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
    /// What the coordinator tells the poll loop (adopted agents, ended builds).
    events: mpsc::UnboundedSender<Event>,
    inbox: Mutex<Option<mpsc::UnboundedReceiver<Event>>>,
    /// The last failed look at Jenkins, in plain words, and when one last succeeded.
    contact: Mutex<crate::sources::Contact>,
}

/// News for the poll loop from the coordinator.
enum Event {
    /// An agent of an earlier run, still running.
    Adopted {
        node: String,
        build: String,
        label: String,
        queue_id: u64,
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

/// An agent kiln started and has not deleted yet.
struct Agent {
    label: String,
    /// The name of its build (pod or process).
    build: String,
    queue_id: u64,
    started: Instant,
    connected: bool,
    busy_seen: bool,
    offlined: bool,
    /// Consecutive looks at which this connected, idle agent had no build to wait for.
    surplus_looks: u32,
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
        let (events, inbox) = mpsc::unbounded_channel();
        Ok(Self {
            name: config.display_name(index),
            api: JenkinsApi::new(&config.url, credentials)?,
            config: config.clone(),
            metrics,
            wake: Arc::new(Notify::new()),
            events,
            inbox: Mutex::new(Some(inbox)),
            contact: Mutex::new(crate::sources::Contact::default()),
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

    /// Provisions agents until `shutdown`. Agents outlive a shutdown; the next start adopts
    /// them.
    async fn provision_loop(self: Arc<Self>, chain: Arc<dyn Chain>, shutdown: CancellationToken) {
        let Some(mut inbox) = self.inbox.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        let mut state = State {
            agents: BTreeMap::new(),
            attempts: HashMap::new(),
            given_up: HashMap::new(),
            undeleted: BTreeSet::new(),
            chain,
        };
        let mut pacer = Pacer::new(self.config.poll_interval, MAX_BACKOFF);
        let mut recovered = false;
        tracing::info!(jenkins = %self.name, url = %self.api.url(), labels = ?self.config.labels, "Jenkins source started");
        loop {
            while let Ok(event) = inbox.try_recv() {
                self.handle(&mut state, event).await;
            }
            if !recovered {
                match self.recover(&mut state).await {
                    Ok(()) => recovered = true,
                    Err(e) => {
                        tracing::warn!(jenkins = %self.name, error = %e, "cannot recover agents yet")
                    }
                }
            }
            if !recovered {
                pacer.failed();
            } else {
                match self.tick(&mut state).await {
                    Ok(()) => {
                        self.set_last_error(None);
                        pacer.succeeded();
                    }
                    Err(e) => {
                        let wait = pacer.failed();
                        self.set_last_error(Some(crate::net::error_chain(&e)));
                        tracing::warn!(jenkins = %self.name, error = %e, "Jenkins poll failed; retrying in {}s", wait.as_secs());
                    }
                }
            }
            self.count_agents(&state);
            // Until the next look: a webhook may bring it forward (see Pacer), news of an agent
            // is handled at once.
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
                    Some(event) = inbox.recv() => {
                        self.handle(&mut state, event).await;
                        break;
                    }
                    () = shutdown.cancelled() => {
                        tracing::info!(jenkins = %self.name, agents = state.agents.len(), "Jenkins source stopped; agents keep running and are adopted at the next start");
                        return;
                    }
                }
            }
        }
    }

    async fn handle(&self, state: &mut State, event: Event) {
        match event {
            Event::Adopted {
                node,
                build,
                label,
                queue_id,
            } => {
                tracing::info!(jenkins = %self.name, node = %node, build = %build, "adopted an agent of an earlier run");
                state.agents.insert(
                    node,
                    Agent {
                        label,
                        build,
                        queue_id,
                        started: Instant::now(),
                        connected: false,
                        busy_seen: false,
                        offlined: false,
                        surplus_looks: 0,
                    },
                );
            }
            Event::Ended { build, ending } => {
                let node = state
                    .agents
                    .iter()
                    .find(|(_, a)| a.build == build)
                    .map(|(node, _)| node.clone());
                if let Some(node) = node {
                    self.build_ended(state, &node, ending).await;
                }
            }
        }
    }

    fn set_last_error(&self, error: Option<String>) {
        self.contact
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(error);
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
        let nodes: Vec<String> = state.agents.keys().cloned().collect();
        for node in nodes {
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
            let (label, build, queue_id) =
                (agent.label.clone(), agent.build.clone(), agent.queue_id);
            let events = state.chain.explain(&build).await;
            tracing::error!(
                jenkins = %self.name, node, build = %build, label = %label,
                "the agent did not connect within {}{}; deleting it (its build gets a fresh agent)",
                humantime::format_duration(self.config.connect_timeout),
                events
            );
            self.failed(&label, "connect_timeout");
            *state.attempts.entry(queue_id).or_default() += 1;
            self.retire(state, node).await;
        }
    }

    /// The build of an agent ended on its own: it failed to start, was evicted, or the agent
    /// exited.
    async fn build_ended(&self, state: &mut State, node: &str, ending: Ending) {
        let Some(agent) = state.agents.get(node) else {
            return;
        };
        let (label, queue_id, connected) = (agent.label.clone(), agent.queue_id, agent.connected);
        if ending.outcome == Outcome::Lost {
            // Another coordinator runs it; nothing to clean up here.
            state.agents.remove(node);
            return;
        }
        if connected {
            tracing::warn!(jenkins = %self.name, node, detail = %ending.detail, "the agent's build ended; deleting the node");
        } else {
            let reason = ending
                .reason()
                .map_or_else(|| ending.outcome.as_str(), |r| r.as_str());
            tracing::error!(jenkins = %self.name, node, reason, detail = %ending.detail, "the agent failed before it connected; deleting it (its build gets a fresh agent)");
            self.failed(&label, reason);
            *state.attempts.entry(queue_id).or_default() += 1;
        }
        self.retire(state, node).await;
    }

    /// Deletes an agent's node and its build.
    async fn retire(&self, state: &mut State, node: &str) {
        let Some(agent) = state.agents.remove(node) else {
            return;
        };
        self.delete_node(state, node).await;
        state.chain.stop(&agent.build).await;
        self.count_agents(state);
    }

    /// Starts agents for builds waiting on kiln's labels: never more than waiting builds per
    /// label, within the global, per-Jenkins and per-label limits.
    async fn provision(&self, state: &mut State, items: &[api::QueueItem]) {
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
                let of_label = state.agents.values().filter(|a| a.label == label).count();
                if self
                    .config
                    .label_limits
                    .get(&label)
                    .is_some_and(|limit| of_label >= *limit)
                {
                    break;
                }
                // A free slot within `concurrent` and this source's `limit`.
                let Some(slot) = state.chain.try_slot() else {
                    return;
                };
                // The oldest waiting build without an agent of its own.
                let queue_id = ids
                    .iter()
                    .copied()
                    .find(|id| !state.agents.values().any(|a| a.queue_id == *id))
                    .unwrap_or(ids[0]);
                let job = items
                    .iter()
                    .find(|i| i.id == queue_id)
                    .and_then(|i| i.task.as_ref())
                    .map(|t| t.name.clone())
                    .unwrap_or_default();
                self.start_agent(state, &label, queue_id, &job, slot).await;
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
        job: &str,
        slot: crate::sources::Slot,
    ) {
        let node = node_name(label);
        let attempt = state.attempts.get(&queue_id).copied().unwrap_or(0) + 1;
        let description = format!("{NODE_DESCRIPTION} ({}, queue item {queue_id})", self.name);
        if let Err(e) = self.api.create_node(&node, label, &description).await {
            tracing::error!(jenkins = %self.name, node, error = %e, "cannot create the agent node");
            // The create may have reached Jenkins even so (the answer was lost): make sure.
            state.undeleted.insert(node.clone());
            self.failed(label, "provision_error");
            return;
        }
        let secret = match self.api.agent_secret(&node).await {
            Ok(secret) => secret,
            Err(e) => {
                tracing::error!(jenkins = %self.name, node, error = %e, "cannot read the agent secret; deleting the node");
                self.delete_node(state, &node).await;
                self.failed(label, "provision_error");
                return;
            }
        };
        let url = self.api.url().to_string();
        let build = AgentSpec {
            jenkins: &self.name,
            url: &url,
            node: &node,
            label,
            queue_id,
            job,
            secret: &secret,
            agent_image: &self.config.agent_image,
            template: self.config.pod_templates.get(label),
        }
        .build();
        tracing::info!(jenkins = %self.name, node, build = %build.name, label, queue_item = queue_id, attempt, "agent started");
        self.metrics
            .jenkins_agents_started
            .get_or_create(&self.labels(label))
            .inc();
        state.agents.insert(
            node,
            Agent {
                label: label.to_owned(),
                build: build.name.clone(),
                queue_id,
                started: Instant::now(),
                connected: false,
                busy_seen: false,
                offlined: false,
                surplus_looks: 0,
            },
        );
        // How it ends, including failing to start, comes back as an `Ended` event.
        state.chain.launch(slot, build);
    }

    /// Deletes an agent node; one that cannot be deleted now is retried at the next look.
    async fn delete_node(&self, state: &mut State, node: &str) {
        if let Err(e) = self.api.delete_node(node).await {
            tracing::warn!(jenkins = %self.name, node, error = %e, "cannot delete the node; the next poll retries");
            state.undeleted.insert(node.to_owned());
        }
    }

    /// Whether `computer` is an agent node this source created (by its description).
    fn is_our_node(&self, computer: &api::Computer) -> bool {
        computer
            .description
            .as_deref()
            .is_some_and(|d| d.starts_with(&format!("{NODE_DESCRIPTION} ({},", self.name)))
    }

    /// After a restart: adopted agents whose node is gone are deleted, the others take their
    /// state from their node; kiln-described nodes with no agent are deleted.
    async fn recover(&self, state: &mut State) -> Result<(), JenkinsError> {
        let computers = self.api.computers_by_name().await?;
        let adopted: Vec<String> = state.agents.keys().cloned().collect();
        for node in adopted {
            match computers.get(&node) {
                None => {
                    tracing::info!(jenkins = %self.name, node = %node, "agent of an earlier run without its node; deleting it");
                    self.retire(state, &node).await;
                }
                Some(computer) => {
                    if let Some(agent) = state.agents.get_mut(&node) {
                        agent.connected = !computer.offline || computer.temporarily_offline;
                        agent.busy_seen = !computer.idle || computer.temporarily_offline;
                        agent.offlined = computer.temporarily_offline;
                    }
                }
            }
        }
        for computer in computers.values() {
            // Only the leading replica provisions, so only it knows that a node of kiln's
            // without an agent of its own is left over.
            if self.is_our_node(computer)
                && !state.agents.contains_key(&computer.display_name)
                && state.chain.leading()
            {
                tracing::info!(jenkins = %self.name, node = %computer.display_name, "node of an earlier run without its agent; deleting it");
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
    /// Nodes of this run whose delete failed (or whose create may have succeeded unseen).
    undeleted: BTreeSet<String>,
    /// The coordinator.
    chain: Arc<dyn Chain>,
}

impl Source for JenkinsSource {
    fn kind(&self) -> SourceKind {
        SourceKind::Jenkins
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn limit(&self) -> usize {
        self.config.limit
    }

    fn run(
        self: Arc<Self>,
        chain: Arc<dyn Chain>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, ()> {
        Box::pin(self.provision_loop(chain, shutdown))
    }

    fn adopt<'a>(&'a self, found: &'a Found) -> BoxFuture<'a, Adoption> {
        let node = found
            .annotations
            .get(ANNOTATION_NODE)
            .or_else(|| found.labels.get(LABEL_NODE))
            .cloned();
        let adoption = match node {
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
                let _ = self.events.send(Event::Adopted {
                    node,
                    build: found.name.clone(),
                    label,
                    queue_id: found.key.id,
                });
                Adoption::Follow(about)
            }
            Some(_) => Adoption::Discard("the agent's pod is gone; its node is deleted".into()),
            None => Adoption::Discard("an agent build without its Jenkins node name".into()),
        };
        Box::pin(async move { adoption })
    }

    fn ended<'a>(
        &'a self,
        _key: &'a BuildKey,
        name: &'a str,
        ending: &'a Ending,
    ) -> BoxFuture<'a, ()> {
        let _ = self.events.send(Event::Ended {
            build: name.to_owned(),
            ending: ending.clone(),
        });
        Box::pin(async {})
    }

    fn health(&self) -> Health {
        let contact = self
            .contact
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let last_error = contact.last_error;
        Health {
            // Jenkins needs no token check before work can be taken: a failing Jenkins is
            // shown (and backed off from), not a reason to mark kiln unready.
            ready: true,
            state: if last_error.is_some() {
                "backing off".into()
            } else {
                "ready".into()
            },
            url: crate::net::redact_url(self.api.url().as_str()),
            last_error,
            last_success: contact.last_success,
        }
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
