//! GitHub Actions as a job source: just-in-time runners, one build each, for the queued jobs
//! whose `runs-on` labels kiln's runners carry. Woken by the `workflow_job` webhook, and
//! reconciled through the REST API on a timer and at start, because webhooks are not
//! guaranteed. Runners are fungible (GitHub gives a queued job to any idle matching runner), so
//! kiln keeps the number of idle runners equal to the number of matching queued jobs, each named
//! after a queued job (`kiln-gh-<job id>`) so that two coordinators never start two runners for
//! one job. A runner that dies before taking a job has its registration deleted (no zombie) and
//! is replaced while the job still waits.

mod api;
mod config;
mod webhook;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use rand::Rng;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::build::{
    About, Build, BuildKey, ClassChoice, Ending, EnvValue, EnvVar, FailureReason, ForeignAgent,
    Found, Outcome, Process, SourceKind, Workload,
};
use crate::sources::{Adoption, Chain, Health, Slot, Source};
use crate::telemetry::{GitHubLabels, GitHubReasonLabels, Metrics};
use api::{Deleted, GitHubApi, GitHubError, JobView};
use config::Scope;
pub use config::{GITHUB_API, GitHubConfig};
use webhook::{Deliveries, WorkflowJobEvent};

/// The prefix of every runner kiln registers.
const RUNNER_PREFIX: &str = "kiln-gh-";
/// The label that names a job's resource class.
const CLASS_LABEL: &str = "kiln-class=";
/// The key of the JIT config among a runner build's secrets.
const JIT_KEY: &str = "jitconfig";
/// The runner's environment variable for `--jitconfig` (actions/runner reads
/// `ACTIONS_RUNNER_INPUT_<ARG>`): the config never shows on a command line.
const JIT_ENV: &str = "ACTIONS_RUNNER_INPUT_JITCONFIG";
/// Annotation with the runner's registration id.
const ANNOTATION_RUNNER_ID: &str = "kiln.dev/github-runner-id";
/// Annotation with the runner's resource class.
const ANNOTATION_CLASS: &str = "kiln.dev/github-class";
/// Runners started for one job that died before taking any job, before kiln stops trying.
const MAX_ATTEMPTS: u32 = 3;
/// The longest wait between tries after GitHub errors.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Names a job's runners can have at once (`kiln-gh-<job>`, `kiln-gh-<job>-2`, …).
const MAX_NAMES: u32 = 4;
/// The runner's work folder inside the image.
const RUNNER_HOME: &str = "/home/runner";

/// One `[[sources.github]]` entry.
pub struct GitHubSource {
    name: String,
    config: GitHubConfig,
    scope: Scope,
    /// The labels a job may ask for, lower-cased: `self-hosted`, the configured labels, and
    /// the class labels.
    accepted: HashSet<String>,
    metrics: Arc<Metrics>,
    events: mpsc::UnboundedSender<Event>,
    inbox: Mutex<Option<mpsc::UnboundedReceiver<Event>>>,
    deliveries: Mutex<Deliveries>,
    health: Mutex<HealthState>,
}

#[derive(Debug, Default, Clone)]
struct HealthState {
    connected: bool,
    contact: crate::sources::Contact,
}

/// The webhook's way into a GitHub source.
#[derive(Clone)]
pub struct GitHubHook {
    /// The source's name.
    pub name: String,
    secret: Option<String>,
    source: Arc<GitHubSource>,
}

/// How a webhook delivery was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// A `workflow_job` event, handed to the source.
    Accepted,
    /// A redelivery (same `X-GitHub-Delivery`): dropped.
    Duplicate,
    /// Another event kind (`ping`, …): nothing to do.
    Ignored,
}

impl GitHubHook {
    /// Whether this source has a webhook secret at all.
    pub fn enabled(&self) -> bool {
        self.secret.is_some()
    }

    /// Whether `signature` signs `body` with this source's secret.
    pub fn signed(&self, body: &[u8], signature: &str) -> bool {
        self.secret
            .as_deref()
            .is_some_and(|secret| webhook::verify(secret, body, signature))
    }

    /// Takes a delivery whose signature checked out.
    ///
    /// # Errors
    /// A `workflow_job` body that is not the documented JSON (the message says why).
    pub fn deliver(&self, delivery: &str, event: &str, body: &[u8]) -> Result<Delivery, String> {
        if event != "workflow_job" {
            return Ok(Delivery::Ignored);
        }
        let parsed: WorkflowJobEvent =
            serde_json::from_slice(body).map_err(|e| format!("not a workflow_job event: {e}"))?;
        if !self
            .source
            .deliveries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .first(delivery)
        {
            return Ok(Delivery::Duplicate);
        }
        let _ = self.source.events.send(Event::Webhook(Box::new(parsed)));
        Ok(Delivery::Accepted)
    }
}

/// News for the loop.
enum Event {
    /// A runner build of an earlier run, still there.
    Adopted {
        name: String,
        runner_id: Option<u64>,
        class: Option<String>,
        job_id: u64,
    },
    /// A runner's build ended.
    Ended { name: String, ending: Ending },
    /// A `workflow_job` webhook.
    Webhook(Box<WorkflowJobEvent>),
}

/// A queued job kiln may serve.
#[derive(Debug, Clone)]
struct Queued {
    job: JobView,
    class: Option<String>,
}

/// One of kiln's runners.
#[derive(Debug, Clone)]
struct Runner {
    id: Option<u64>,
    class: Option<String>,
    /// The job id it was named after.
    named_for: u64,
    /// The job it took, once known: (repo, run id, run attempt, job id).
    job: Option<(String, u64, u32, u64)>,
    /// Consecutive passes at which it was idle beyond what the queue needs.
    surplus_passes: u32,
}

/// What the loop knows between passes.
struct State {
    chain: Arc<dyn Chain>,
    api: Option<GitHubApi>,
    queued: BTreeMap<u64, Queued>,
    runners: BTreeMap<String, Runner>,
    /// Runners of a job that died before taking one, by the job.
    attempts: HashMap<u64, u32>,
    /// Runs whose job was lost with its runner, waiting to complete for their re-run.
    reruns: Vec<(String, u64, u32)>,
    /// Runs re-run already (once each), by (run id, attempt).
    reran: HashSet<(u64, u32)>,
}

impl GitHubSource {
    /// The source of entry `index`.
    pub fn new(config: &GitHubConfig, index: usize, metrics: Arc<Metrics>) -> Self {
        let (events, inbox) = mpsc::unbounded_channel();
        let mut accepted: HashSet<String> = config
            .labels
            .iter()
            .chain(config.label_classes.keys())
            .map(|l| l.to_lowercase())
            .collect();
        accepted.insert("self-hosted".into());
        Self {
            name: config.display_name(index),
            scope: config.scope().unwrap_or(Scope::Org(String::new())),
            config: config.clone(),
            accepted,
            metrics,
            events,
            inbox: Mutex::new(Some(inbox)),
            deliveries: Mutex::new(Deliveries::default()),
            health: Mutex::new(HealthState::default()),
        }
    }

    /// The webhook handle of this source.
    pub fn hook(self: &Arc<Self>) -> GitHubHook {
        GitHubHook {
            name: self.name.clone(),
            secret: self.config.webhook_secret.clone(),
            source: Arc::clone(self),
        }
    }

    fn labels(&self) -> GitHubLabels {
        GitHubLabels {
            github: self.name.clone(),
        }
    }

    fn set_health(&self, connected: Option<bool>, last_error: Option<String>) {
        let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(connected) = connected {
            health.connected = connected;
        }
        health.contact.record(last_error);
    }

    /// Whether a job with these `runs-on` labels runs on kiln's runners, and its class.
    fn classify(&self, labels: &[String]) -> Option<Option<String>> {
        let mut class = None;
        for label in labels {
            let lower = label.to_lowercase();
            if let Some(name) = lower.strip_prefix(CLASS_LABEL) {
                class = Some(name.to_owned());
                continue;
            }
            if !self.accepted.contains(&lower) {
                return None;
            }
            if let Some((_, named)) = self
                .config
                .label_classes
                .iter()
                .find(|(l, _)| l.to_lowercase() == lower)
            {
                class.get_or_insert_with(|| named.clone());
            }
        }
        Some(class)
    }

    /// Whether a job of repository `repo` is in this source's scope.
    fn in_scope(&self, repo: &str, org: Option<&str>) -> bool {
        match &self.scope {
            Scope::Repo { owner, repo: name } => {
                repo.eq_ignore_ascii_case(&format!("{owner}/{name}"))
            }
            Scope::Org(login) => {
                org.is_some_and(|o| o.eq_ignore_ascii_case(login))
                    || repo
                        .split_once('/')
                        .is_some_and(|(owner, _)| owner.eq_ignore_ascii_case(login))
            }
        }
    }

    async fn reconcile_loop(self: Arc<Self>, chain: Arc<dyn Chain>, shutdown: CancellationToken) {
        let Some(mut inbox) = self.inbox.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        let mut state = State {
            chain,
            api: None,
            queued: BTreeMap::new(),
            runners: BTreeMap::new(),
            attempts: HashMap::new(),
            reruns: Vec::new(),
            reran: HashSet::new(),
        };
        let mut next_reconcile = Instant::now();
        let mut backoff = Duration::from_secs(5);
        tracing::info!(github = %self.name, api = %crate::net::redact_url(&self.config.api_url), labels = ?self.config.labels, "GitHub source started");
        loop {
            while let Ok(event) = inbox.try_recv() {
                self.handle(&mut state, event).await;
            }
            if state.api.is_none() {
                match GitHubApi::connect(&self.config).await {
                    Ok(api) => {
                        tracing::info!(github = %self.name, "signed in to GitHub");
                        state.api = Some(api);
                        self.set_health(Some(true), None);
                    }
                    Err(e) => {
                        tracing::warn!(github = %self.name, error = %e, "cannot sign in to GitHub; retrying in {}s", backoff.as_secs());
                        self.set_health(Some(false), Some(e.to_string()));
                        next_reconcile = Instant::now() + backoff;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
            // Reconciling (finding queued jobs webhooks missed, removing stale registrations) is
            // a singleton chore: one replica of kiln at a time does it. Webhooks any replica
            // receives still start runners; their names make the launches idempotent.
            if state.api.is_some() && Instant::now() >= next_reconcile && !state.chain.leading() {
                next_reconcile = Instant::now() + self.config.reconcile_interval;
            }
            if state.api.is_some() && Instant::now() >= next_reconcile {
                match self.reconcile(&mut state).await {
                    Ok(()) => {
                        backoff = Duration::from_secs(5);
                        self.set_health(None, None);
                        next_reconcile = Instant::now() + self.config.reconcile_interval;
                    }
                    Err(e) => {
                        tracing::warn!(github = %self.name, error = %e, "reconciling with GitHub failed; retrying in {}s", backoff.as_secs());
                        self.set_health(None, Some(e.to_string()));
                        next_reconcile = Instant::now() + backoff;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
            if state.api.is_some() {
                self.scale(&mut state).await;
            }
            tokio::select! {
                () = tokio::time::sleep_until(next_reconcile) => {}
                Some(event) = inbox.recv() => self.handle(&mut state, event).await,
                () = shutdown.cancelled() => {
                    tracing::info!(github = %self.name, runners = state.runners.len(), "GitHub source stopped; runners keep running and are adopted at the next start");
                    return;
                }
            }
        }
    }

    async fn handle(&self, state: &mut State, event: Event) {
        match event {
            Event::Adopted {
                name,
                runner_id,
                class,
                job_id,
            } => {
                state.runners.insert(
                    name,
                    Runner {
                        id: runner_id,
                        class,
                        named_for: job_id,
                        job: None,
                        surplus_passes: 0,
                    },
                );
            }
            Event::Ended { name, ending } => self.runner_ended(state, &name, &ending).await,
            Event::Webhook(event) => self.webhook(state, &event),
        }
    }

    fn webhook(&self, state: &mut State, event: &WorkflowJobEvent) {
        let job = &event.workflow_job;
        if !self.in_scope(
            &event.repository.full_name,
            event.organization.as_ref().map(|o| o.login.as_str()),
        ) {
            return;
        }
        tracing::debug!(github = %self.name, action = %event.action, job = job.id, "workflow_job webhook");
        match event.action.as_str() {
            "queued" => {
                if let Some(class) = self.classify(&job.labels) {
                    state.queued.insert(
                        job.id,
                        Queued {
                            job: JobView {
                                id: job.id,
                                run_id: job.run_id,
                                run_attempt: job.run_attempt,
                                repo: event.repository.full_name.clone(),
                                labels: job.labels.clone(),
                                status: "queued".into(),
                                runner_name: None,
                                name: job.name.clone(),
                                url: job.html_url.clone().unwrap_or_default(),
                                created_at: Some(SystemTime::now()),
                            },
                            class,
                        },
                    );
                }
            }
            "in_progress" => {
                state.queued.remove(&job.id);
                if let Some(runner) = job
                    .runner_name
                    .as_deref()
                    .and_then(|name| state.runners.get_mut(name))
                {
                    runner.job = Some((
                        event.repository.full_name.clone(),
                        job.run_id,
                        job.run_attempt,
                        job.id,
                    ));
                }
            }
            "completed" => {
                state.queued.remove(&job.id);
            }
            _ => {}
        }
    }

    /// Lists the scope's jobs and runners: the queued jobs kiln serves, which of kiln's runners
    /// took a job, registrations without a runner (zombies) and runs waiting to be re-run.
    async fn reconcile(&self, state: &mut State) -> Result<(), GitHubError> {
        let Some(api) = &state.api else {
            return Ok(());
        };
        let jobs = api.active_jobs().await?;
        let mut queued = BTreeMap::new();
        for job in jobs {
            if let Some(runner) = job
                .runner_name
                .as_deref()
                .and_then(|name| state.runners.get_mut(name))
            {
                runner.job = Some((job.repo.clone(), job.run_id, job.run_attempt, job.id));
            }
            if job.status == "queued"
                && let Some(class) = self.classify(&job.labels)
            {
                queued.insert(job.id, Queued { job, class });
            }
        }
        state.queued = queued;
        state
            .attempts
            .retain(|job, _| state.queued.contains_key(job));
        for registration in api.runners().await? {
            if !registration.name.starts_with(RUNNER_PREFIX) {
                continue;
            }
            match state.runners.get_mut(&registration.name) {
                Some(runner) => {
                    runner.id.get_or_insert(registration.id);
                    if registration.busy && runner.job.is_none() {
                        runner.job = Some((String::new(), 0, 0, 0));
                    }
                }
                None if registration.status == "offline" && !registration.busy => {
                    // Registered, but no build of this replica's runs it: its pod died while
                    // no coordinator ran, kiln died between the JIT config and the pod — or
                    // another replica started it and its pod is still on the way.
                    if state.chain.exists(&registration.name).await {
                        continue;
                    }
                    tracing::info!(github = %self.name, runner = %registration.name, "removing a runner registration that has no runner");
                    if let Err(e) = api.delete_runner(registration.id).await {
                        tracing::warn!(github = %self.name, runner = %registration.name, error = %e, "cannot remove the runner registration");
                    } else {
                        self.metrics
                            .github_registrations_removed
                            .get_or_create(&self.labels())
                            .inc();
                    }
                }
                None => {}
            }
        }
        let mut waiting = Vec::new();
        for (repo, run_id, attempt) in std::mem::take(&mut state.reruns) {
            match api.run(&repo, run_id).await {
                Ok((status, now)) if status == "completed" && now <= u64::from(attempt) => {
                    match api.rerun_failed(&repo, run_id).await {
                        Ok(()) => {
                            tracing::info!(github = %self.name, repo = %repo, run = run_id, "re-running the failed jobs of a run whose job was lost with its runner");
                            state.reran.insert((run_id, attempt));
                        }
                        Err(e) => {
                            tracing::warn!(github = %self.name, repo = %repo, run = run_id, error = %e, "cannot re-run the run's failed jobs")
                        }
                    }
                }
                Ok((status, _)) if status != "completed" => waiting.push((repo, run_id, attempt)),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(github = %self.name, run = run_id, error = %e, "cannot read a run to re-run");
                    waiting.push((repo, run_id, attempt));
                }
            }
        }
        state.reruns = waiting;
        if let Some(used) = api.rate_limit_used().await {
            self.metrics
                .api_rate_limit_saturation
                .get_or_create(&crate::telemetry::ApiLabels {
                    api: "github".into(),
                })
                .set(used);
        }
        Ok(())
    }

    /// Starts runners until every class has as many idle runners as queued jobs (plus the warm
    /// floor), and retires idle runners beyond that.
    async fn scale(&self, state: &mut State) {
        let mut classes: BTreeMap<Option<String>, Vec<u64>> = BTreeMap::new();
        classes.entry(None).or_default();
        for (id, queued) in &state.queued {
            classes.entry(queued.class.clone()).or_default().push(*id);
        }
        for (class, jobs) in classes {
            let idle = state
                .runners
                .values()
                .filter(|r| r.class == class && r.job.is_none())
                .count();
            let floor = if class.is_none() {
                self.config.min_idle
            } else {
                0
            };
            let wanted = jobs.len() + floor;
            let mut missing = wanted.saturating_sub(idle);
            // Jobs with no idle runner named for them first, so each job's runner carries its
            // name (`kiln-gh-<job>`, the same on every coordinator); suffixed names only when
            // a job's own runner took another job.
            let named: HashSet<u64> = state
                .runners
                .values()
                .filter(|r| r.job.is_none())
                .map(|r| r.named_for)
                .collect();
            let (uncovered, covered): (Vec<u64>, Vec<u64>) =
                jobs.iter().partition(|job| !named.contains(job));
            for job in uncovered.iter().chain(&covered) {
                if missing == 0 {
                    break;
                }
                // Named for the job; when that runner took another job (runners are
                // fungible), the next name in line.
                let Some(name) = (1..=MAX_NAMES)
                    .map(|n| runner_name(*job, n))
                    .find(|name| !state.runners.contains_key(name))
                else {
                    continue;
                };
                if state.attempts.get(job).copied().unwrap_or(0) >= MAX_ATTEMPTS {
                    continue;
                }
                let Some(slot) = state.chain.try_slot() else {
                    return;
                };
                let Some(queued) = state.queued.get(job).cloned() else {
                    continue;
                };
                if !self
                    .start_runner(state, &name, *job, Some(&queued), slot)
                    .await
                {
                    return;
                }
                missing -= 1;
            }
            // The warm floor: runners named for no job.
            while class.is_none() && missing > 0 && jobs.len() < wanted {
                let Some(slot) = state.chain.try_slot() else {
                    return;
                };
                let id = u64::from(rand::rng().random::<u32>());
                let name = format!("{RUNNER_PREFIX}idle-{id:08x}");
                if !self.start_runner(state, &name, id, None, slot).await {
                    return;
                }
                missing -= 1;
            }
            if idle > wanted {
                self.retire_surplus(state, &class, idle - wanted).await;
            } else {
                for runner in state.runners.values_mut().filter(|r| r.class == class) {
                    runner.surplus_passes = 0;
                }
            }
        }
    }

    /// Idle runners beyond what the queue needs, two passes in a row: their registrations are
    /// removed (unless GitHub gave them a job meanwhile) and their builds stopped.
    async fn retire_surplus(&self, state: &mut State, class: &Option<String>, surplus: usize) {
        let candidates: Vec<String> = state
            .runners
            .iter_mut()
            .filter(|(_, r)| r.class == *class && r.job.is_none())
            .take(surplus)
            .map(|(name, runner)| {
                runner.surplus_passes += 1;
                (name.clone(), runner.surplus_passes)
            })
            .filter(|(_, passes)| *passes >= 2)
            .map(|(name, _)| name)
            .collect();
        for name in candidates {
            let Some(runner) = state.runners.get(&name).cloned() else {
                continue;
            };
            if let (Some(api), Some(id)) = (&state.api, runner.id) {
                match api.delete_runner(id).await {
                    Ok(Deleted::Busy) => {
                        if let Some(r) = state.runners.get_mut(&name) {
                            r.job = Some((String::new(), 0, 0, 0));
                        }
                        continue;
                    }
                    Ok(Deleted::Gone) => {}
                    Err(e) => {
                        tracing::warn!(github = %self.name, runner = %name, error = %e, "cannot remove an idle runner's registration; keeping it");
                        continue;
                    }
                }
            }
            tracing::info!(github = %self.name, runner = %name, "idle runner with no job waiting for it; stopping it");
            state.runners.remove(&name);
            state.chain.stop(&name).await;
        }
    }

    /// Registers a JIT runner called `name` and hands its build to the chain. False when
    /// GitHub refused, so the pass stops.
    async fn start_runner(
        &self,
        state: &mut State,
        name: &str,
        id: u64,
        queued: Option<&Queued>,
        slot: Slot,
    ) -> bool {
        let Some(api) = &state.api else {
            return false;
        };
        let class = queued.and_then(|q| q.class.clone());
        let mut labels = self.config.labels.clone();
        if let Some(q) = queued {
            labels.extend(
                q.job
                    .labels
                    .iter()
                    .filter(|l| {
                        let lower = l.to_lowercase();
                        lower.starts_with(CLASS_LABEL)
                            || self
                                .config
                                .label_classes
                                .keys()
                                .any(|k| k.to_lowercase() == lower)
                    })
                    .cloned(),
            );
        }
        labels.sort();
        labels.dedup();
        let (runner_id, jit) = match api
            .jit_config(
                name,
                self.config.runner_group_id,
                labels,
                &self.config.work_folder,
            )
            .await
        {
            Ok(registered) => registered,
            Err(e) if e.status() == Some(409) => {
                // Registered already: by another coordinator starting it now, or a leftover
                // of a crash, which the next reconcile removes once it is offline.
                tracing::info!(github = %self.name, runner = name, "a runner of this name is registered already; leaving it");
                return true;
            }
            Err(e) => {
                tracing::error!(github = %self.name, runner = name, error = %e, "cannot register a runner");
                self.set_health(None, Some(e.to_string()));
                return false;
            }
        };
        let key = BuildKey {
            source: SourceKind::GitHub,
            runner: self.name.clone(),
            id,
        };
        let build = self.runner_build(key, name, runner_id, jit, class.clone(), queued);
        tracing::info!(github = %self.name, runner = name, runner_id, job = queued.map(|q| q.job.id), "starting a runner");
        self.metrics
            .github_runners_started
            .get_or_create(&self.labels())
            .inc();
        state.runners.insert(
            name.to_owned(),
            Runner {
                id: Some(runner_id),
                class,
                named_for: id,
                job: None,
                surplus_passes: 0,
            },
        );
        state.chain.launch(slot, build);
        true
    }

    fn runner_build(
        &self,
        key: BuildKey,
        name: &str,
        runner_id: u64,
        jit: String,
        class: Option<String>,
        queued: Option<&Queued>,
    ) -> Build {
        let (program, args) = self
            .config
            .runner_command
            .split_first()
            .map(|(p, a)| (p.clone(), a.to_vec()))
            .unwrap_or_default();
        let agent = ForeignAgent {
            container: "runner".into(),
            image: self.config.runner_image.clone(),
            command: Some(self.config.runner_command.clone()),
            args: None,
            env: vec![EnvVar {
                name: JIT_ENV.into(),
                value: EnvValue::Secret(JIT_KEY.into()),
            }],
            workdir: format!("{RUNNER_HOME}/{}", self.config.work_folder),
            extra_containers: Vec::new(),
            process: Some(Process {
                program,
                args,
                downloads: Vec::new(),
                missing_program: "set runner_command to the Actions runner's run.sh on this machine (https://github.com/actions/runner/releases), or use executor = \"kubernetes\"".into(),
            }),
        };
        let mut annotations =
            BTreeMap::from([(ANNOTATION_RUNNER_ID.to_owned(), runner_id.to_string())]);
        if let Some(class) = &class {
            annotations.insert(ANNOTATION_CLASS.to_owned(), class.clone());
        }
        Build {
            key,
            name: name.to_owned(),
            workload: Workload::Foreign(agent),
            secrets: BTreeMap::from([(JIT_KEY.to_owned(), jit.into_bytes())]),
            class: class.map(|name| ClassChoice {
                name,
                origin: "the job's runs-on labels".into(),
            }),
            requests: Vec::new(),
            timeout: None,
            labels: BTreeMap::new(),
            annotations,
            about: About {
                project: queued.map(|q| q.job.repo.clone()).unwrap_or_default(),
                job: queued
                    .map(|q| q.job.name.clone())
                    .unwrap_or_else(|| "warm runner".into()),
                pipeline: queued.map(|q| q.job.run_id.to_string()),
                url: queued.map(|q| q.job.url.clone()).filter(|u| !u.is_empty()),
                queued_at: queued.and_then(|q| q.job.created_at),
            },
            // A repository's workflows can run code from a fork's pull request.
            untrusted: true,
        }
    }

    /// A runner's build ended: a runner that never took a job has its registration removed (it
    /// is replaced while its job waits); one that lost its job to the infrastructure is
    /// reported, and its run re-run when configured.
    async fn runner_ended(&self, state: &mut State, name: &str, ending: &Ending) {
        let Some(runner) = state.runners.remove(name) else {
            return;
        };
        if ending.outcome == Outcome::Lost {
            return;
        }
        let mut took_job = runner.job.is_some();
        let clean_exit = ending.outcome == Outcome::Succeeded;
        if (!clean_exit || !took_job)
            && let (Some(api), Some(id)) = (&state.api, runner.id)
        {
            match api.delete_runner(id).await {
                Ok(Deleted::Busy) => took_job = true,
                Ok(Deleted::Gone) => {
                    if !took_job {
                        self.metrics
                            .github_registrations_removed
                            .get_or_create(&self.labels())
                            .inc();
                    }
                }
                Err(e) => {
                    tracing::warn!(github = %self.name, runner = name, error = %e, "cannot remove the runner's registration; the next reconcile retries")
                }
            }
        }
        let reason = ending
            .reason()
            .unwrap_or(FailureReason::RunnerSystemFailure);
        match (clean_exit, took_job) {
            (true, _) => {}
            (false, false) => {
                tracing::warn!(github = %self.name, runner = name, %reason, detail = %ending.detail, "the runner ended before it took a job; its registration is removed and a new runner replaces it while the job waits");
                *state.attempts.entry(runner.named_for).or_default() += 1;
                if state.attempts[&runner.named_for] >= MAX_ATTEMPTS {
                    tracing::error!(github = %self.name, job = runner.named_for, "{MAX_ATTEMPTS} runners for this job ended before taking a job; kiln stops starting runners for it (see the reasons above)");
                }
            }
            (false, true) => {
                let job = runner.job.clone().filter(|(repo, ..)| !repo.is_empty());
                tracing::error!(
                    github = %self.name, runner = name, %reason, detail = %ending.detail,
                    job = job.as_ref().map(|(_, _, _, id)| *id),
                    "the runner was lost while it ran a job ({}); GitHub fails that job",
                    ending.detail
                );
                self.metrics
                    .github_jobs_lost
                    .get_or_create(&GitHubReasonLabels {
                        github: self.name.clone(),
                        reason: reason.as_str().to_owned(),
                    })
                    .inc();
                if self.config.rerun_on_infrastructure_failure
                    && reason.is_infrastructure()
                    && let Some((repo, run_id, attempt, _)) = job
                    && !state.reran.contains(&(run_id, attempt))
                    && !state
                        .reruns
                        .iter()
                        .any(|(_, r, a)| *r == run_id && *a == attempt)
                {
                    tracing::info!(github = %self.name, repo = %repo, run = run_id, "the run's failed jobs are re-run once it completes (rerun_on_infrastructure_failure)");
                    state.reruns.push((repo, run_id, attempt));
                }
            }
        }
    }
}

/// The `n`th name of a runner for job `job`: `kiln-gh-<job>`, then `kiln-gh-<job>-<n>`.
fn runner_name(job: u64, n: u32) -> String {
    if n <= 1 {
        format!("{RUNNER_PREFIX}{job}")
    } else {
        format!("{RUNNER_PREFIX}{job}-{n}")
    }
}

impl Source for GitHubSource {
    fn kind(&self) -> SourceKind {
        SourceKind::GitHub
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn limit(&self) -> usize {
        self.config.max_runners
    }

    fn run(
        self: Arc<Self>,
        chain: Arc<dyn Chain>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, ()> {
        Box::pin(self.reconcile_loop(chain, shutdown))
    }

    fn adopt<'a>(&'a self, found: &'a Found) -> BoxFuture<'a, Adoption> {
        let adoption = if found.exists {
            let _ = self.events.send(Event::Adopted {
                name: found.name.clone(),
                runner_id: found
                    .annotations
                    .get(ANNOTATION_RUNNER_ID)
                    .and_then(|id| id.parse().ok()),
                class: found.annotations.get(ANNOTATION_CLASS).cloned(),
                job_id: found.key.id,
            });
            Adoption::Follow(About {
                project: String::new(),
                job: format!("runner {}", found.name),
                pipeline: None,
                url: None,
                queued_at: None,
            })
        } else {
            // Its JIT config was created, its pod never: the registration is removed as a
            // zombie by the first reconcile, and the job gets a fresh runner.
            Adoption::Discard("the runner's pod was never created".into())
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
            name: name.to_owned(),
            ending: ending.clone(),
        });
        Box::pin(async {})
    }

    fn health(&self) -> Health {
        let health = self
            .health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Health {
            ready: health.connected,
            state: match (health.connected, health.contact.last_error.is_some()) {
                (false, _) => "signing in".into(),
                (true, true) => "backing off".into(),
                (true, false) => "ready".into(),
            },
            url: crate::net::redact_url(&self.config.api_url),
            last_error: health.contact.last_error,
            last_success: health.contact.last_success,
        }
    }
}
