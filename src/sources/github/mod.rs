//! GitHub Actions as a job source: just-in-time runners, one build each, for the queued jobs
//! whose `runs-on` labels kiln's runners carry. Woken by the `workflow_job` webhook, and
//! reconciled through the REST API on a timer and at start, because webhooks are not
//! guaranteed. Runners are fungible (GitHub gives a queued job to any idle matching runner), so
//! kiln keeps the number of idle runners equal to the number of matching queued jobs, each named
//! after a queued job (`kiln-gh-<job id>`) so that two coordinators never start two runners for
//! one job. A runner that dies before taking a job has its registration deleted (no zombie) and
//! is replaced while the job still waits.

mod api;
mod conditional;
mod config;
mod metrics;
#[cfg(test)]
mod tests;
mod webhook;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rand::Rng;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::build::{
    About, Build, BuildKey, ClassChoice, Ending, EnvValue, EnvVar, ExtraContainer, FailureReason,
    ForeignAgent, Found, Outcome, Process, SourceKind, Workload,
};
use crate::sources::driver::{Looked, QueueCore, QueueDriven};
use crate::sources::health::{Access, Failing, HealthTracker, Words};
use crate::sources::pacer::Pacer;
use crate::sources::pool::{Demand, Phase, Pool};
use crate::sources::warm::{self, Floors};
use crate::sources::{Adoption, Chain, MemberState, Slot, WarmFloor};
use crate::telemetry::Metrics;
use api::{Deleted, GitHubApi, GitHubError, JobStatus, JobView, RunnerGroup};
use config::Scope;
pub use config::{GITHUB_API, GitHubConfig};
use metrics::{Api, ApiLabels, GitHubLabels, GitHubMetrics, LostLabels, LostReason};
use webhook::{Deliveries, JobAction, WorkflowJobEvent};

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
/// Annotation with the warm pool a runner was started for.
const ANNOTATION_POOL: &str = "kiln.dev/warm-pool";
/// The prefix of a warm runner's name (after [`RUNNER_PREFIX`]): it is named for no job.
const WARM_INFIX: &str = "idle-";
/// Runners started for one job that died before taking any job, before kiln stops trying.
const MAX_ATTEMPTS: u32 = 3;
/// The first wait after a GitHub error, and the longest.
const FIRST_BACKOFF: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// How a GitHub source's health shows: not ready until it signed in.
const WORDS: Words = Words {
    checking: "signing in",
    rejected: "paused: credentials rejected",
    failing: Failing::BacksOff,
};
/// How long a job kiln saw leave the queue is remembered: a listing taken before it left
/// cannot bring it back meanwhile.
const LEFT_MEMORY: Duration = Duration::from_secs(3600);
/// Requests of the rate limit's window a reconcile leaves for registering and removing runners.
const RATE_RESERVE: u64 = 200;
/// The runner's work folder inside the image.
const RUNNER_HOME: &str = "/home/runner";

/// One `[[sources.github]]` entry.
pub struct GitHubSource {
    core: QueueCore<Event>,
    config: GitHubConfig,
    scope: Scope,
    /// The labels every runner is registered with: the default ones (unless
    /// `no_default_labels`) and the configured ones.
    runner_labels: Vec<String>,
    /// The labels a job may ask for, lower-cased: the runner labels and the class labels.
    accepted: HashSet<String>,
    metrics: Arc<GitHubMetrics>,
    deliveries: Mutex<Deliveries>,
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
    /// A `workflow_job` body that is not the documented JSON.
    pub fn deliver(
        &self,
        delivery: &str,
        event: &str,
        body: &[u8],
    ) -> Result<Delivery, DeliveryError> {
        if event != "workflow_job" {
            return Ok(Delivery::Ignored);
        }
        let parsed: WorkflowJobEvent =
            serde_json::from_slice(body).map_err(DeliveryError::NotWorkflowJob)?;
        if !self
            .source
            .deliveries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .first(delivery)
        {
            return Ok(Delivery::Duplicate);
        }
        self.source
            .core
            .inbox
            .send(Event::Webhook(Box::new(parsed)));
        Ok(Delivery::Accepted)
    }
}

/// Why a webhook delivery was refused.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// A `workflow_job` body that is not the documented JSON.
    #[error("not a workflow_job event: {0}")]
    NotWorkflowJob(#[source] serde_json::Error),
}

/// News for the loop.
pub(super) enum Event {
    /// A runner build of an earlier run, still there.
    Adopted {
        name: String,
        runner_id: Option<u64>,
        class: RunnerClass,
        job_id: u64,
        /// The warm pool it was started for.
        pool: Option<String>,
    },
    /// A runner's build ended.
    Ended { name: String, ending: Ending },
    /// A `workflow_job` webhook.
    Webhook(Box<WorkflowJobEvent>),
}

/// A queued job kiln may serve.
#[derive(Debug, Clone)]
pub(super) struct Queued {
    job: JobView,
    class: RunnerClass,
}

/// The resource class a job's `runs-on` labels ask for: the runners that serve it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum RunnerClass {
    /// None named: the executor's default size (and the warm floor).
    Default,
    /// This one.
    Named(String),
}

impl RunnerClass {
    fn from_name(name: Option<String>) -> Self {
        name.map_or(Self::Default, Self::Named)
    }

    fn name(&self) -> Option<&str> {
        match self {
            Self::Default => None,
            Self::Named(name) => Some(name),
        }
    }
}

/// What the loop keeps of one of kiln's runners, besides its class (its group), the job id it
/// is named after (its work) and whether it took a job (its phase) in the [`Pool`], by name.
#[derive(Debug, Clone)]
struct Runner {
    /// Its registration, once known.
    id: Option<u64>,
    /// The job it took, once known.
    took: Option<TakenJob>,
    /// The labels it was registered with.
    labels: Vec<String>,
}

/// A job one of kiln's runners took.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TakenJob {
    /// `owner/repo`.
    repo: String,
    run_id: u64,
    run_attempt: u32,
    job_id: u64,
}

/// A run whose job was lost with its runner, to re-run once it completes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rerun {
    /// `owner/repo`.
    repo: String,
    run_id: u64,
    /// The attempt that lost the job.
    attempt: u32,
}

/// What the loop knows between passes.
pub(super) struct State {
    chain: Arc<dyn Chain>,
    api: Option<GitHubApi>,
    queued: BTreeMap<u64, Queued>,
    /// Runners by name, by class, for the jobs they are named after.
    runners: Pool<RunnerClass, Runner>,
    /// Runs whose job was lost with its runner, waiting to complete for their re-run.
    reruns: Vec<Rerun>,
    /// Runs re-run already (once each), by (run id, attempt).
    reran: HashSet<(u64, u32)>,
    /// Jobs seen leave the queue (taken or completed), and when: a job's status only moves
    /// forward, so a listing taken before that cannot put it back in the queue.
    left: HashMap<u64, Instant>,
    /// Queued jobs of the scope whose labels no runner of kiln's has, by id: their repository
    /// (lower-case) and labels, for the idle-timeout warning.
    unmatched: BTreeMap<u64, (String, Vec<String>)>,
    /// Runners that ended after running a job whose news (the `in_progress` webhook) has
    /// not come yet, with their class and when they ended: each stands for one job of its
    /// class that no longer waits, though kiln cannot tell which yet. Forgotten when the
    /// news comes, or when a listing taken after the end shows the queue as it is.
    unattributed: Vec<(String, RunnerClass, Instant)>,
    /// The names of runners started (or adopted) in the last hour: never given again.
    used_names: HashMap<String, Instant>,
    /// The runner group named by `runner_group`, and when it was looked up.
    group: Option<(RunnerGroup, Instant)>,
    /// Repositories a warning said the runner group does not cover (said once each).
    uncovered: HashSet<String>,
    /// Warm pools a warning said mean nothing to this source (said once each).
    ignored_pools: HashSet<String>,
    /// Warm pools whose members fail before they get going.
    warm_backoff: warm::Backoff,
}

impl GitHubSource {
    /// The source of entry `index`.
    pub fn new(config: &GitHubConfig, index: usize, metrics: Arc<Metrics>) -> Self {
        let runner_labels = config.runner_labels();
        let accepted: HashSet<String> = runner_labels
            .iter()
            .chain(config.label_classes.keys())
            .map(|l| l.to_lowercase())
            .collect();
        Self {
            scope: config.scope().unwrap_or(Scope::Org(String::new())),
            core: QueueCore::new(
                SourceKind::GitHub,
                config.display_name(index),
                config.max_runners,
                HealthTracker::new(&config.api_url, WORDS, Access::Checking),
            ),
            config: config.clone(),
            runner_labels,
            accepted,
            metrics: metrics.stage::<GitHubMetrics>(),
            deliveries: Mutex::new(Deliveries::default()),
        }
    }

    /// The webhook handle of this source.
    pub fn hook(self: &Arc<Self>) -> GitHubHook {
        GitHubHook {
            name: self.core.name.clone(),
            secret: self.config.webhook_secret.clone(),
            source: Arc::clone(self),
        }
    }

    fn labels(&self) -> GitHubLabels {
        GitHubLabels {
            github: self.core.name.clone(),
        }
    }

    /// Whether a job with these `runs-on` labels runs on kiln's runners: its class if so.
    fn classify(&self, labels: &[String]) -> Option<RunnerClass> {
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
        Some(RunnerClass::from_name(class))
    }

    /// Whether a job of repository `repo` is in this source's scope.
    fn in_scope(&self, repo: &str, org: Option<&str>, enterprise: Option<&str>) -> bool {
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
            Scope::Enterprise(slug) => enterprise.is_some_and(|e| e.eq_ignore_ascii_case(slug)),
        }
    }

    /// Runner `name` took a job (or GitHub says it is busy: `job` unknown). When the job is
    /// newly known, the runner's build is described as that job (the status page, the cost
    /// per project): GitHub gives a queued job to any idle matching runner, so a runner often
    /// runs another job than the one it is named after.
    async fn took(state: &mut State, name: &str, job: Option<(TakenJob, About)>) {
        if job.is_some() {
            state.unattributed.retain(|(n, _, _)| n != name);
        }
        if !state.runners.contains(name) {
            // Its build ended before the news came (a short job, a late webhook): its record
            // still shows what it ran.
            if let Some((_, about)) = job
                && name.starts_with(RUNNER_PREFIX)
            {
                state.chain.describe(name, about).await;
            }
            return;
        }
        if let Some(pool) = state.runners.busy(name) {
            state.chain.warm_member(name, &pool, MemberState::Taken);
        }
        let Some(runner) = state.runners.get_mut(name) else {
            return;
        };
        let Some((taken, about)) = job else {
            return;
        };
        if runner.detail.took.as_ref() == Some(&taken) {
            return;
        }
        runner.detail.took = Some(taken);
        state.chain.describe(name, about).await;
    }

    /// Whether the job of `repo` may run on the configured runner group (a group of
    /// visibility `selected` serves only its repositories); a warning names the first job of
    /// each repository it does not cover.
    fn group_covers(&self, state: &mut State, repo: &str) -> bool {
        let Some((group, _)) = &state.group else {
            return true;
        };
        let Some(repos) = &group.repos else {
            return true;
        };
        if repos.contains(&repo.to_ascii_lowercase()) {
            return true;
        }
        if state.uncovered.insert(repo.to_ascii_lowercase()) {
            tracing::warn!(github = %self.core.name, repo, group = %group.name, "runner group {:?} does not cover repository {repo}: its jobs are left to other runners (add the repository to the group in the organization's Actions settings)", group.name);
        }
        false
    }

    /// What a build shows of the job `job` it runs.
    fn about(job: &JobView) -> About {
        About {
            project: job.repo.clone(),
            job: job.name.clone(),
            pipeline: Some(job.run_id.to_string()),
            url: Some(job.url.clone()).filter(|u| !u.is_empty()),
            queued_at: job.created_at,
        }
    }

    async fn webhook(&self, state: &mut State, event: &WorkflowJobEvent) {
        let job = &event.workflow_job;
        if !self.in_scope(
            &event.repository.full_name,
            event.organization.as_ref().map(|o| o.login.as_str()),
            event.enterprise.as_ref().map(|e| e.slug.as_str()),
        ) {
            return;
        }
        if let Some(api) = &state.api {
            api.touched(&event.repository.full_name);
        }
        tracing::debug!(github = %self.core.name, action = ?event.action, job = job.id, "workflow_job webhook");
        let view = JobView {
            id: job.id,
            run_id: job.run_id,
            run_attempt: job.run_attempt,
            repo: event.repository.full_name.clone(),
            labels: job.labels.clone(),
            status: JobStatus::Queued,
            runner_name: None,
            name: job.name.clone(),
            url: job.html_url.clone().unwrap_or_default(),
            created_at: Some(SystemTime::now()),
        };
        match event.action {
            JobAction::Queued => {
                if state.left.contains_key(&job.id) {
                    // A late (re)delivery: the job was taken already.
                    return;
                }
                if !self.group_covers(state, &event.repository.full_name) {
                    return;
                }
                match self.classify(&job.labels) {
                    Some(class) => {
                        state.queued.insert(job.id, Queued { job: view, class });
                    }
                    None => {
                        let repo = event.repository.full_name.to_ascii_lowercase();
                        state.unmatched.insert(job.id, (repo, job.labels.clone()));
                    }
                }
            }
            // Taken, or completed (the news of the runner that ran it, when `in_progress`
            // was lost or late).
            JobAction::InProgress | JobAction::Completed => {
                state.left.insert(job.id, Instant::now());
                state.unmatched.remove(&job.id);
                let queued = state.queued.remove(&job.id);
                if let Some(name) = job.runner_name.as_deref() {
                    let taken = TakenJob {
                        repo: event.repository.full_name.clone(),
                        run_id: job.run_id,
                        run_attempt: job.run_attempt,
                        job_id: job.id,
                    };
                    // What the queue knew of the job (its queueing time), else the webhook's.
                    let about = Self::about(queued.as_ref().map_or(&view, |q| &q.job));
                    Self::took(state, name, Some((taken, about))).await;
                }
            }
            JobAction::Waiting | JobAction::Other => {}
        }
    }

    /// Looks the runner group named by `runner_group` up, at the first look and every
    /// `runner_group_refresh`.
    async fn resolve_group(&self, state: &mut State) -> Result<(), GitHubError> {
        let (Some(name), Some(api)) = (&self.config.runner_group, &state.api) else {
            return Ok(());
        };
        if state
            .group
            .as_ref()
            .is_some_and(|(_, at)| at.elapsed() < self.config.runner_group_refresh)
        {
            return Ok(());
        }
        let group = api.runner_group(name).await?;
        if state.group.as_ref().is_none_or(|(g, _)| *g != group) {
            tracing::info!(github = %self.core.name, group = %group.name, id = group.id, repositories = ?group.repos.as_ref().map(HashSet::len), "runner group resolved");
            state.uncovered.clear();
        }
        state.group = Some((group, Instant::now()));
        Ok(())
    }

    /// The runner group runners join.
    fn group_id(&self, state: &State) -> u64 {
        state
            .group
            .as_ref()
            .map_or(self.config.runner_group_id, |(g, _)| g.id)
    }

    /// Lists the scope's runners and jobs: the queued jobs kiln serves, which of kiln's runners
    /// took a job, registrations without a runner (zombies) and runs waiting to be re-run.
    async fn reconcile(&self, state: &mut State) -> Result<(), GitHubError> {
        let Some(api) = state.api.take() else {
            return Ok(());
        };
        let result = self.reconcile_with(&api, state).await;
        state.api = Some(api);
        result
    }

    /// The registrations are listed before the jobs: a job listed queued was still queued
    /// after its runner was seen idle, so the two listings never show a runner busy with a
    /// job the other says waits. Jobs seen leave the queue are not put back by a listing
    /// taken before they left (`left`), and news that came while listing is taken before
    /// the pass acts (see `sources::driver`).
    async fn reconcile_with(&self, api: &GitHubApi, state: &mut State) -> Result<(), GitHubError> {
        api.may_list(RATE_RESERVE)?;
        let listing_started = Instant::now();
        let registrations = api.runners().await?;
        let (jobs, listed) = api
            .active_jobs(
                self.config.reconcile_interval,
                self.config.org_sweep_interval,
                RATE_RESERVE,
            )
            .await?;
        let listed: HashSet<String> = listed.iter().map(|r| r.to_ascii_lowercase()).collect();
        state
            .queued
            .retain(|_, q| !listed.contains(&q.job.repo.to_ascii_lowercase()));
        state
            .unmatched
            .retain(|_, (repo, _)| !listed.contains(repo));
        for job in jobs {
            if let Some(name) = job.runner_name.clone() {
                let taken = TakenJob {
                    repo: job.repo.clone(),
                    run_id: job.run_id,
                    run_attempt: job.run_attempt,
                    job_id: job.id,
                };
                Self::took(state, &name, Some((taken, Self::about(&job)))).await;
            }
            if job.status != JobStatus::Queued {
                if job.status == JobStatus::InProgress {
                    state.left.entry(job.id).or_insert_with(Instant::now);
                }
                continue;
            }
            if state.left.contains_key(&job.id) || !self.group_covers(state, &job.repo) {
                continue;
            }
            match self.classify(&job.labels) {
                Some(class) => {
                    state.queued.insert(job.id, Queued { job, class });
                }
                None => {
                    let repo = job.repo.to_ascii_lowercase();
                    state.unmatched.insert(job.id, (repo, job.labels));
                }
            }
        }
        state.left.retain(|_, at| at.elapsed() < LEFT_MEMORY);
        state.used_names.retain(|_, at| at.elapsed() < LEFT_MEMORY);
        state
            .unattributed
            .retain(|(_, _, ended)| *ended > listing_started);
        for registration in registrations {
            if !registration.name.starts_with(RUNNER_PREFIX) {
                continue;
            }
            match state.runners.get_mut(&registration.name) {
                Some(runner) => {
                    runner.detail.id.get_or_insert(registration.id);
                    if registration.busy {
                        Self::took(state, &registration.name, None).await;
                    }
                }
                None if !registration.online && !registration.busy => {
                    // Registered, but no build of this replica's runs it: its pod died while
                    // no coordinator ran, kiln died between the JIT config and the pod — or
                    // another replica started it and its pod is still on the way.
                    if state.chain.exists(&registration.name).await {
                        continue;
                    }
                    tracing::info!(github = %self.core.name, runner = %registration.name, "removing a runner registration that has no runner");
                    if let Err(e) = api.delete_runner(registration.id).await {
                        tracing::warn!(github = %self.core.name, runner = %registration.name, error = %e, "cannot remove the runner registration");
                    } else {
                        self.registration_removed();
                    }
                }
                None => {}
            }
        }
        let mut waiting = Vec::new();
        for rerun in std::mem::take(&mut state.reruns) {
            let Rerun {
                repo,
                run_id,
                attempt,
            } = &rerun;
            match api.run(repo, *run_id).await {
                Ok(run) if run.completed && run.attempt <= u64::from(*attempt) => {
                    match api.rerun_failed(repo, *run_id).await {
                        Ok(()) => {
                            tracing::info!(github = %self.core.name, repo = %repo, run = run_id, "re-running the failed jobs of a run whose job was lost with its runner");
                            state.reran.insert((*run_id, *attempt));
                        }
                        Err(e) => {
                            tracing::warn!(github = %self.core.name, repo = %repo, run = run_id, error = %e, "cannot re-run the run's failed jobs")
                        }
                    }
                }
                Ok(run) if !run.completed => waiting.push(rerun),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(github = %self.core.name, run = run_id, error = %e, "cannot read a run to re-run");
                    waiting.push(rerun);
                }
            }
        }
        state.reruns = waiting;
        if let Some(rate) = api.rate() {
            self.metrics
                .rate_limit_saturation
                .get_or_create(&ApiLabels { api: Api::GitHub })
                .set(rate.saturation());
        }
        let tally = api.take_tally();
        tracing::debug!(github = %self.core.name, repositories = listed.len(), fresh = tally.fresh, not_modified = tally.not_modified, "reconciled");
        Ok(())
    }

    /// Starts runners until every class has as many idle runners as queued jobs (plus the warm
    /// floor), and retires idle runners beyond that (see [`Pool`]).
    async fn scale(&self, state: &mut State) {
        self.time_out_idle(state).await;
        // Read at every pass: schedule windows move the floors.
        let mut floors = self.floors(state);
        floors.hold_back(&mut state.warm_backoff, &state.runners, Instant::now());
        let mut classes: BTreeMap<RunnerClass, Vec<u64>> = BTreeMap::new();
        classes.entry(RunnerClass::Default).or_default();
        for class in floors.groups() {
            classes.entry(class.clone()).or_default();
        }
        for (id, queued) in &state.queued {
            classes.entry(queued.class.clone()).or_default().push(*id);
        }
        // Jobs that ended runners ran, not known yet which: the newest waiting jobs of their
        // class stop counting (GitHub hands out the oldest first).
        for (_, class, _) in &state.unattributed {
            if let Some(jobs) = classes.get_mut(class) {
                jobs.pop();
            }
        }
        warm::adopt_strays(
            state.chain.as_ref(),
            &mut state.runners,
            &floors,
            classes.iter().map(|(class, jobs)| (class, jobs.len())),
            &self.core.name,
        );
        for name in state
            .runners
            .aged(|pool| floors.max_idle_age(pool), Instant::now())
        {
            tracing::info!(github = %self.core.name, runner = %name, "warm runner idle longer than its pool's max_idle_age; replacing it");
            self.retire(state, &name).await;
        }
        let demands = classes
            .into_iter()
            .map(|(class, jobs)| Demand {
                floor: floors.floor(&class),
                ..Demand::new(class, jobs)
            })
            .collect();
        let plan = state.runners.plan(demands);
        for (job, attempts) in plan.given_up {
            tracing::error!(github = %self.core.name, job, "{attempts} runners for this job ended before taking a job; kiln stops starting runners for it (see the reasons above)");
        }
        for name in plan.retire {
            self.retire(state, &name).await;
        }
        for start in plan.start {
            // Jobs with no idle runner named for them come first, so each job's runner
            // carries its name (`kiln-gh-<job>`, the same on every coordinator); when that
            // runner took another job (runners are fungible), the next name in line.
            let (name, id, pool) = match start.work {
                Some(job) => {
                    // Never a name used before: news about a runner comes by its name, and
                    // late news of an ended runner must not land on a new one of its name.
                    let Some(name) = (1..)
                        .map(|n| runner_name(job, n))
                        .find(|name| !state.used_names.contains_key(name))
                    else {
                        continue;
                    };
                    (name, job, None)
                }
                // The warm floor: runners named for no job.
                None => {
                    let Some(pool) = floors.pool_for(&start.group, &state.runners) else {
                        continue;
                    };
                    let (name, id) = loop {
                        let id = u64::from(rand::rng().random::<u32>());
                        let name = format!("{RUNNER_PREFIX}{WARM_INFIX}{id:08x}");
                        if !state.used_names.contains_key(&name) {
                            break (name, id);
                        }
                    };
                    (name, id, Some(pool.clone()))
                }
            };
            let Some(slot) = state.chain.try_slot() else {
                return;
            };
            let queued = start.work.and_then(|job| state.queued.get(&job).cloned());
            if !self
                .start_runner(
                    state,
                    &name,
                    id,
                    start.group,
                    queued.as_ref(),
                    pool.as_ref(),
                    slot,
                )
                .await
            {
                return;
            }
        }
    }

    /// The warm pools' floors for this source, by resource class. Only the leading replica
    /// keeps them (warm runners are named for no job: two replicas would each start theirs);
    /// another one's warm runners, idle and wanted by no floor, retire as surplus.
    fn floors(&self, state: &mut State) -> Floors<RunnerClass> {
        let floors = if state.chain.leading() {
            state.chain.warm_floors()
        } else {
            Vec::new()
        };
        Floors::new(
            floors,
            |floor| match &floor.label {
                Some(label) => Err(format!(
                    "it names label {label:?}, and a GitHub source keeps its runners by resource class (`class`), not by label"
                )),
                None => Ok(RunnerClass::from_name(floor.class.clone())),
            },
            &self.core.name,
            &mut state.ignored_pools,
        )
    }

    /// Removes the runners that took no job within `idle_timeout` of their start (warm ones
    /// excepted): GitHub gives them none — their labels match no waiting job, or their runner
    /// group does not cover the job's repository. Each counts as a failed attempt at its job.
    async fn time_out_idle(&self, state: &mut State) {
        let expired: Vec<String> = state
            .runners
            .iter()
            .filter(|(_, r)| {
                r.phase != Phase::Busy
                    && r.warm.is_none()
                    && r.started.elapsed() >= self.config.idle_timeout
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in expired {
            let Some(runner) = state.runners.get(&name) else {
                continue;
            };
            let (labels, work) = (runner.detail.labels.join(", "), runner.work);
            if let (Some(api), Some(id)) = (&state.api, runner.detail.id) {
                match api.delete_runner(id).await {
                    Ok(Deleted::Busy) => {
                        Self::took(state, &name, None).await;
                        continue;
                    }
                    Ok(Deleted::Gone) => self.registration_removed(),
                    Err(e) => {
                        tracing::warn!(github = %self.core.name, runner = %name, error = %e, "cannot remove an idle runner's registration; retrying at the next pass");
                        continue;
                    }
                }
            }
            let waiting: BTreeSet<String> = state
                .unmatched
                .values()
                .map(|(_, labels)| format!("[{}]", labels.join(", ")))
                .collect();
            let waiting = if waiting.is_empty() {
                "none".to_owned()
            } else {
                waiting.into_iter().collect::<Vec<_>>().join(" ")
            };
            tracing::warn!(
                github = %self.core.name, runner = %name, labels = %labels, unmatched = %waiting,
                "runner took no job within idle_timeout ({}s); removing it. It offered the labels [{labels}]; job labels still waiting unmatched: {waiting}. If the job it was started for has these labels, check that the runner group covers its repository",
                self.config.idle_timeout.as_secs()
            );
            state.runners.remove(&name);
            state.runners.attempt_failed(work);
            state.chain.stop(&name).await;
        }
    }

    /// An idle runner no job waits for: its registration is removed (unless GitHub gave it a
    /// job meanwhile) and its build stopped.
    async fn retire(&self, state: &mut State, name: &str) {
        let Some(id) = state.runners.get(name).map(|r| r.detail.id) else {
            return;
        };
        if let (Some(api), Some(id)) = (&state.api, id) {
            match api.delete_runner(id).await {
                Ok(Deleted::Busy) => {
                    Self::took(state, name, None).await;
                    return;
                }
                Ok(Deleted::Gone) => {}
                Err(e) => {
                    tracing::warn!(github = %self.core.name, runner = %name, error = %e, "cannot remove an idle runner's registration; keeping it");
                    return;
                }
            }
        }
        tracing::info!(github = %self.core.name, runner = %name, "idle runner with no job waiting for it; stopping it");
        if let Some(runner) = state.runners.remove(name) {
            warm::left(state.chain.as_ref(), &mut state.warm_backoff, name, &runner);
        }
        state.chain.stop(name).await;
    }

    fn registration_removed(&self) {
        self.metrics
            .registrations_removed
            .get_or_create(&self.labels())
            .inc();
    }

    /// Registers a JIT runner called `name` (for a job, or a member of warm pool `pool`) and
    /// hands its build to the chain. False when GitHub refused, so the pass stops.
    #[allow(clippy::too_many_arguments)]
    async fn start_runner(
        &self,
        state: &mut State,
        name: &str,
        id: u64,
        class: RunnerClass,
        queued: Option<&Queued>,
        pool: Option<&WarmFloor>,
        slot: Slot,
    ) -> bool {
        let Some(api) = &state.api else {
            return false;
        };
        let mut labels = self.runner_labels.clone();
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
        } else if let RunnerClass::Named(class) = &class {
            // A warm runner of a class: the labels a job names the class with.
            labels.push(format!("{CLASS_LABEL}{class}"));
            labels.extend(
                self.config
                    .label_classes
                    .iter()
                    .filter(|(_, named)| *named == class)
                    .map(|(label, _)| label.clone()),
            );
        }
        let mut seen = HashSet::new();
        labels.retain(|l| seen.insert(l.to_lowercase()));
        let (runner_id, jit) = match api
            .jit_config(
                name,
                self.group_id(state),
                labels.clone(),
                &self.config.work_folder,
            )
            .await
        {
            Ok(registered) => registered,
            Err(e) if e.status() == Some(409) => {
                // Registered already: by another coordinator starting it now, or a leftover
                // of a crash, which the next reconcile removes once it is offline.
                tracing::info!(github = %self.core.name, runner = name, "a runner of this name is registered already; leaving it");
                return true;
            }
            Err(e) => {
                tracing::error!(github = %self.core.name, runner = name, error = %e, "cannot register a runner");
                self.core.health.failed(e.to_string());
                return false;
            }
        };
        let key = BuildKey {
            source: SourceKind::GitHub,
            runner: self.core.name.clone(),
            id,
        };
        let pool_name = pool.map(|p| p.pool.as_str());
        let build = self.runner_build(key, name, runner_id, jit, class.name(), queued, pool_name);
        tracing::info!(github = %self.core.name, runner = name, runner_id, job = queued.map(|q| q.job.id), pool = pool_name, "starting a runner");
        self.metrics
            .runners_started
            .get_or_create(&self.labels())
            .inc();
        let runner = Runner {
            id: Some(runner_id),
            took: None,
            labels,
        };
        let started = Instant::now();
        state.used_names.insert(name.to_owned(), started);
        state
            .runners
            .insert(name.to_owned(), class, id, started, Phase::Idle, runner);
        if let Some(pool) = pool_name {
            state.runners.join(name, pool);
            state.chain.warm_member(name, pool, MemberState::Idle);
        }
        state.chain.launch(slot, build);
        true
    }

    #[allow(clippy::too_many_arguments)]
    fn runner_build(
        &self,
        key: BuildKey,
        name: &str,
        runner_id: u64,
        jit: String,
        class: Option<&str>,
        queued: Option<&Queued>,
        pool: Option<&str>,
    ) -> Build {
        let (program, args) = self
            .config
            .runner_command
            .split_first()
            .map(|(p, a)| (p.clone(), a.to_vec()))
            .unwrap_or_default();
        let workdir = format!("{RUNNER_HOME}/{}", self.config.work_folder);
        let mut env = vec![EnvVar {
            name: JIT_ENV.into(),
            value: EnvValue::Secret(JIT_KEY.into()),
        }];
        let mut extra_containers = Vec::new();
        if self.config.container_mode == config::ContainerMode::Dind {
            let (sidecar, docker_host) = dind_sidecar(&self.config.dind_image, &workdir);
            env.push(EnvVar {
                name: "DOCKER_HOST".into(),
                value: EnvValue::Plain(docker_host),
            });
            extra_containers.push(sidecar);
        }
        let agent = ForeignAgent {
            container: "runner".into(),
            image: self.config.runner_image.clone(),
            command: Some(self.config.runner_command.clone()),
            args: None,
            env,
            workdir,
            extra_containers,
            process: Some(Process {
                program,
                args,
                downloads: Vec::new(),
                missing_program: "set runner_command to the Actions runner's run.sh on this machine (https://github.com/actions/runner/releases), or use executor = \"kubernetes\"".into(),
            }),
        };
        let mut annotations =
            BTreeMap::from([(ANNOTATION_RUNNER_ID.to_owned(), runner_id.to_string())]);
        if let Some(class) = class {
            annotations.insert(ANNOTATION_CLASS.to_owned(), class.to_owned());
        }
        if let Some(pool) = pool {
            annotations.insert(ANNOTATION_POOL.to_owned(), pool.to_owned());
        }
        Build {
            key,
            name: name.to_owned(),
            workload: Workload::Foreign(agent),
            secrets: BTreeMap::from([(JIT_KEY.to_owned(), jit.into_bytes())]),
            class: class.map(|name| ClassChoice {
                name: name.to_owned(),
                origin: match pool {
                    Some(pool) if queued.is_none() => format!("warm pool {pool}"),
                    _ => "the job's runs-on labels".into(),
                },
            }),
            requests: Vec::new(),
            timeout: None,
            labels: BTreeMap::new(),
            annotations,
            about: About {
                project: queued.map(|q| q.job.repo.clone()).unwrap_or_default(),
                job: queued
                    .map(|q| q.job.name.clone())
                    .unwrap_or_else(|| match pool {
                        Some(pool) => format!("warm runner (pool {pool})"),
                        None => "warm runner".into(),
                    }),
                pipeline: queued.map(|q| q.job.run_id.to_string()),
                url: queued.map(|q| q.job.url.clone()).filter(|u| !u.is_empty()),
                queued_at: queued.and_then(|q| q.job.created_at),
            },
            // A repository's workflows can run code from a fork's pull request.
            untrusted: true,
            registry_auths: Vec::new(),
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
        let clean_exit = ending.outcome == Outcome::Succeeded;
        // A JIT runner exits cleanly only after its one job (removed before it took one, it
        // exits with an error): GitHub removed its registration, there is nothing to delete.
        let mut took_job = runner.phase == Phase::Busy || clean_exit;
        if clean_exit && runner.detail.took.is_none() {
            // An ephemeral runner exits cleanly after its one job.
            state
                .unattributed
                .push((name.to_owned(), runner.group.clone(), Instant::now()));
        }
        if (!clean_exit || !took_job)
            && let (Some(api), Some(id)) = (&state.api, runner.detail.id)
        {
            match api.delete_runner(id).await {
                Ok(Deleted::Busy) => took_job = true,
                Ok(Deleted::Gone) => {
                    if !took_job {
                        self.registration_removed();
                    }
                }
                Err(e) => {
                    tracing::warn!(github = %self.core.name, runner = name, error = %e, "cannot remove the runner's registration; the next reconcile retries")
                }
            }
        }
        if let Some(pool) = &runner.warm {
            match (took_job, runner.phase) {
                (true, Phase::Busy) => {}
                (true, _) => state.chain.warm_member(name, pool, MemberState::Taken),
                // It ended without a job before it was ever idle: the pool's refills wait.
                (false, Phase::Starting) => {
                    warm::left(state.chain.as_ref(), &mut state.warm_backoff, name, &runner);
                }
                (false, _) => state.chain.warm_member(name, pool, MemberState::Retired),
            }
        }
        let reason = ending
            .reason()
            .unwrap_or(FailureReason::RunnerSystemFailure);
        match (clean_exit, took_job) {
            (true, _) => {}
            (false, false) => {
                tracing::warn!(github = %self.core.name, runner = name, %reason, detail = %ending.detail, "the runner ended before it took a job; its registration is removed and a new runner replaces it while the job waits");
                state.runners.attempt_failed(runner.work);
            }
            (false, true) => {
                let job = runner.detail.took;
                tracing::error!(
                    github = %self.core.name, runner = name, %reason, detail = %ending.detail,
                    job = job.as_ref().map(|taken| taken.job_id),
                    "the runner was lost while it ran a job ({}); GitHub fails that job",
                    ending.detail
                );
                self.metrics
                    .jobs_lost
                    .get_or_create(&LostLabels {
                        github: self.core.name.clone(),
                        reason: LostReason(reason),
                    })
                    .inc();
                if self.config.rerun_on_infrastructure_failure
                    && reason.is_infrastructure()
                    && let Some(taken) = job
                {
                    let rerun = Rerun {
                        repo: taken.repo,
                        run_id: taken.run_id,
                        attempt: taken.run_attempt,
                    };
                    if !state.reran.contains(&(rerun.run_id, rerun.attempt))
                        && !state.reruns.contains(&rerun)
                    {
                        tracing::info!(github = %self.core.name, repo = %rerun.repo, run = rerun.run_id, "the run's failed jobs are re-run once it completes (rerun_on_infrastructure_failure)");
                        state.reruns.push(rerun);
                    }
                }
            }
        }
    }
}

/// The `n`th name of a runner for job `job`: `kiln-gh-<job>`, then `kiln-gh-<job>-<n>`.
/// The gid of the `docker` group in the Actions runner image, which the runner user is in:
/// the daemon's socket is made theirs (as actions-runner-controller's dind mode does).
const RUNNER_DOCKER_GID: u32 = 123;

/// The `docker:dind` sidecar of `container_mode = "dind"` and the runner's `DOCKER_HOST`. The
/// daemon listens only on a Unix socket in the work volume the pod's containers share (never
/// on TCP, where every pod of the cluster could reach a privileged daemon); the work folder is
/// at the same path in both containers, so the bind mounts the runner asks for (`container:`
/// jobs mount the work folder) name the same files in the daemon.
fn dind_sidecar(image: &str, workdir: &str) -> (ExtraContainer, String) {
    let socket = format!("{workdir}/docker.sock");
    let fields = serde_json::Map::from_iter([
        ("image".to_owned(), serde_json::json!(image)),
        (
            "args".to_owned(),
            serde_json::json!([
                "dockerd",
                format!("--host=unix://{socket}"),
                format!("--group={RUNNER_DOCKER_GID}"),
            ]),
        ),
        (
            "env".to_owned(),
            serde_json::json!([{"name": "DOCKER_TLS_CERTDIR", "value": ""}]),
        ),
        (
            "securityContext".to_owned(),
            serde_json::json!({"privileged": true, "runAsUser": 0, "runAsNonRoot": false}),
        ),
    ]);
    (
        ExtraContainer {
            name: "dind".into(),
            fields,
        },
        format!("unix://{socket}"),
    )
}

fn runner_name(job: u64, n: u32) -> String {
    if n <= 1 {
        format!("{RUNNER_PREFIX}{job}")
    } else {
        format!("{RUNNER_PREFIX}{job}-{n}")
    }
}

impl QueueDriven for GitHubSource {
    type State = State;
    type Event = Event;
    type Error = GitHubError;

    fn core(&self) -> &QueueCore<Event> {
        &self.core
    }

    /// Webhooks come as news (each one a pass at once), not as early looks: a look is a
    /// reconcile, which webhooks make rarely needed.
    fn start(&self, chain: Arc<dyn Chain>) -> (State, Pacer, Option<Arc<Notify>>) {
        tracing::info!(github = %self.core.name, api = %crate::net::redact_url(&self.config.api_url), labels = ?self.runner_labels, "GitHub source started");
        let state = State {
            chain,
            api: None,
            queued: BTreeMap::new(),
            runners: Pool::new(MAX_ATTEMPTS),
            reruns: Vec::new(),
            reran: HashSet::new(),
            left: HashMap::new(),
            unmatched: BTreeMap::new(),
            unattributed: Vec::new(),
            used_names: HashMap::new(),
            group: None,
            uncovered: HashSet::new(),
            ignored_pools: HashSet::new(),
            warm_backoff: warm::Backoff::default(),
        };
        let pacer =
            Pacer::new(self.config.reconcile_interval, MAX_BACKOFF).first_backoff(FIRST_BACKOFF);
        (state, pacer, None)
    }

    fn adopt_found(&self, found: &Found) -> Adoption {
        if found.exists {
            self.core.inbox.send(Event::Adopted {
                name: found.name.clone(),
                runner_id: found
                    .annotations
                    .get(ANNOTATION_RUNNER_ID)
                    .and_then(|id| id.parse().ok()),
                class: RunnerClass::from_name(found.annotations.get(ANNOTATION_CLASS).cloned()),
                job_id: found.key.id,
                pool: found.annotations.get(ANNOTATION_POOL).cloned(),
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
        }
    }

    fn ended_event(name: &str, ending: &Ending) -> Event {
        Event::Ended {
            name: name.to_owned(),
            ending: ending.clone(),
        }
    }

    /// News changes the queue or the runners: the pass at the end of the turn acts on it.
    async fn handle(&self, state: &mut State, event: Event) -> bool {
        match event {
            Event::Adopted {
                name,
                runner_id,
                class,
                job_id,
                pool,
            } => {
                let runner = Runner {
                    id: runner_id,
                    took: None,
                    labels: Vec::new(),
                };
                let started = Instant::now();
                state.used_names.insert(name.clone(), started);
                state
                    .runners
                    .insert(name.clone(), class, job_id, started, Phase::Idle, runner);
                // A warm runner is a member of its pool again (its age counts from now); a
                // busy one is reported taken at the first reconcile.
                if let Some(pool) = pool {
                    state.runners.join(&name, &pool);
                    state.chain.warm_member(&name, &pool, MemberState::Idle);
                }
            }
            Event::Ended { name, ending } => self.runner_ended(state, &name, &ending).await,
            Event::Webhook(event) => self.webhook(state, &event).await,
        }
        false
    }

    /// Signs in, then reconciles — a singleton chore: one replica of kiln at a time does it.
    /// Webhooks any replica receives still start runners; their names make the launches
    /// idempotent.
    async fn look(&self, state: &mut State) -> Result<Looked, GitHubError> {
        if state.api.is_none() {
            let api = GitHubApi::connect(&self.config).await?;
            tracing::info!(github = %self.core.name, "signed in to GitHub");
            state.api = Some(api);
            self.core.health.accept();
            self.core.health.succeeded();
        }
        self.resolve_group(state).await?;
        if !state.chain.leading() {
            return Ok(Looked::Skipped);
        }
        self.reconcile(state).await?;
        Ok(Looked::Talked)
    }

    async fn settle(&self, state: &mut State) {
        // Runners join the named group only: none start before it is resolved.
        let group_pending = self.config.runner_group.is_some() && state.group.is_none();
        if state.api.is_some() && !group_pending {
            self.scale(state).await;
        }
    }

    fn stopped(&self, state: &State) {
        tracing::info!(github = %self.core.name, runners = state.runners.len(), "GitHub source stopped; runners keep running and are adopted at the next start");
    }
}
