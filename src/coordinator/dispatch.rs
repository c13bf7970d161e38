//! The launcher stage: a build handed over by a source (or found at start-up) is launched on
//! the executor, watched to its end, deleted, and its ending handed back to its source — while
//! it holds its slot of capacity, and while the build table and metrics say where it is.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::cost::Prices;
use super::history::{BuildRecord, End, History};
use super::limiter::Limiter;
use super::replicas::Replicas;
use crate::build::{About, Build, BuildKey, Ending, FailureReason, Outcome};
use crate::executor::{Executor, Footprint, LaunchError, OnRunning, StillWanted, Watch};
use crate::sources::gitlab::metrics::{FinishedLabels, GitLabMetrics, JobState, RunnerLabels};
use crate::sources::{Chain, Slot, Source};
use crate::telemetry::{
    CostLabels, DurationLabels, Metrics, OutcomeLabels, PhaseLabels, SourceLabels,
};

/// Where a build is, as the coordinator tracks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Handed to the executor, not running yet.
    Pending,
    /// Its main container or process runs.
    Running,
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
        }
    }
}

/// One build alive now.
#[derive(Debug, Clone)]
pub struct Alive {
    /// The work it does.
    pub key: BuildKey,
    /// Its name.
    pub name: String,
    /// What people see about it.
    pub about: About,
    /// Where it is.
    pub phase: Phase,
    /// When the coordinator launched (or adopted) it.
    pub since: SystemTime,
    /// Its size and resource class, when the executor sizes builds.
    pub footprint: Option<Footprint>,
    /// When its pod (or process) was created; `None` before, and for adopted builds.
    pub created: Option<SystemTime>,
    /// When its main container (or process) started running.
    pub running: Option<SystemTime>,
}

impl Alive {
    /// The build as the status page shows it, with how it ended if it did.
    pub(crate) fn record(&self, end: Option<End>) -> BuildRecord {
        BuildRecord {
            key: self.key.clone(),
            name: self.name.clone(),
            about: self.about.clone(),
            footprint: self.footprint.clone(),
            launched: self.since,
            created: self.created,
            running: self.running,
            end,
        }
    }
}

/// The builds alive now, by name.
pub(crate) type Table = Arc<Mutex<HashMap<String, Alive>>>;

/// Starts each build and sees it to the end; shared by every source's [`Chain`].
#[derive(Clone)]
pub(crate) struct Dispatcher {
    pub(crate) tracker: TaskTracker,
    pub(crate) executor: Arc<dyn Executor>,
    pub(crate) metrics: Arc<Metrics>,
    /// The `kiln_jobs_*` counts, which the GitLab stage owns and every source's builds feed.
    pub(crate) jobs: Arc<GitLabMetrics>,
    pub(crate) table: Table,
    /// The builds that finished lately, for the status page.
    pub(crate) history: Arc<History>,
    /// What a vCPU-hour and a GiB-hour cost by default.
    pub(crate) prices: Prices,
    /// Cancels every build's watch (shutdown).
    pub(crate) cancel: CancellationToken,
}

/// What a build task starts from.
pub(crate) struct Start {
    pub(crate) key: BuildKey,
    pub(crate) name: String,
    pub(crate) about: About,
    /// The build to launch; `None` for a build that runs already (adopted).
    pub(crate) launch: Option<Build>,
}

impl Start {
    pub(crate) fn launch(build: Build) -> Self {
        Self {
            key: build.key.clone(),
            name: build.name.clone(),
            about: build.about.clone(),
            launch: Some(build),
        }
    }
}

impl Dispatcher {
    /// Whether build `name` is followed (or being started) now.
    pub(crate) fn follows(&self, name: &str) -> bool {
        self.table_lock().contains_key(name)
    }

    /// Follows `start` in a task of its own, holding `slot` until the build ends.
    pub(crate) fn spawn(&self, source: Arc<dyn Source>, slot: Option<Slot>, start: Start) {
        let this = self.clone();
        self.tracker
            .spawn(async move { this.run_build(source, slot, start).await });
    }

    async fn run_build(self, source: Arc<dyn Source>, slot: Option<Slot>, start: Start) {
        let Start {
            key,
            name,
            about,
            launch,
        } = start;
        let kind = key.source.name().to_owned();
        let launched = Instant::now();
        let footprint = launch
            .as_ref()
            .and_then(|build| self.executor.footprint(build));
        let duplicate = {
            let mut table = self.table_lock();
            let duplicate = table.contains_key(&name);
            if !duplicate {
                table.insert(
                    name.clone(),
                    Alive {
                        key: key.clone(),
                        name: name.clone(),
                        about: about.clone(),
                        phase: Phase::Pending,
                        since: SystemTime::now(),
                        footprint,
                        created: None,
                        running: None,
                    },
                );
            }
            duplicate
        };
        if duplicate {
            // A second hand-over of work this coordinator already runs (a redelivered webhook,
            // a reconcile racing it): never a second build.
            tracing::info!(build = %key, name, "this build runs already; not starting it again");
            let ending = Ending::lost("the build runs already");
            source.ended(&key, &name, &ending).await;
            return;
        }
        self.phase_gauge(&kind, Phase::Pending, 1);
        let runner = RunnerLabels {
            runner: key.runner.clone(),
        };
        self.jobs.jobs_started.get_or_create(&runner).inc();
        self.jobs.jobs_running.inc();

        let ending = self
            .launch_and_watch(&source, &key, &name, &about, launch)
            .await;
        let ended_at = SystemTime::now();
        if ending.outcome != Outcome::Lost {
            self.executor.delete(&name).await;
        }
        self.log_ending(&key, &name, &ending);
        source.ended(&key, &name, &ending).await;

        let alive = self.table_lock().remove(&name);
        let phase = alive.as_ref().map_or(Phase::Pending, |alive| alive.phase);
        self.phase_gauge(&kind, phase, -1);
        self.jobs.jobs_running.dec();
        self.count_ending(&key, &ending, launched);
        if let Some(alive) = alive {
            self.remember(&alive, ending, ended_at);
        }
        drop(slot);
    }

    /// Puts a finished build into the history, with its cost, and counts the cost.
    fn remember(&self, alive: &Alive, ending: Ending, at: SystemTime) {
        let mut record = alive.record(None);
        // Only a pod that was created costs anything. A build kiln stopped following (Lost)
        // runs on after this coordinator: it is not charged for a part of its life here, and
        // the coordinator that adopts it does not know its size (documented in [cost]).
        let cost = match (&record.footprint, record.created, ending.outcome) {
            (_, _, Outcome::Lost) | (None, _, _) | (_, None, _) => None,
            (Some(footprint), Some(_), _) => {
                let seconds = at
                    .duration_since(record.billed_from())
                    .unwrap_or_default()
                    .as_secs_f64();
                self.prices.cost(footprint, seconds)
            }
        };
        if let (Some(cost), Some(footprint)) = (cost, &record.footprint)
            && cost > 0.0
        {
            self.metrics
                .build_cost
                .get_or_create(&CostLabels {
                    source: record.key.source.name().to_owned(),
                    project: record.about.project.clone(),
                    class: footprint.class.clone().unwrap_or_default(),
                })
                .inc_by(cost);
        }
        record.end = Some(End {
            at,
            outcome: ending.outcome,
            detail: ending.detail,
            exit_code: ending.exit_code,
            cost,
        });
        self.history.push(record);
    }

    async fn launch_and_watch(
        &self,
        source: &Arc<dyn Source>,
        key: &BuildKey,
        name: &str,
        about: &About,
        launch: Option<Build>,
    ) -> Ending {
        if let Some(build) = launch {
            let launched = self.executor.launch(&build).await;
            // A running build keeps neither its spec nor its secrets in kiln's memory.
            drop(build);
            match launched {
                Ok(()) => {
                    if let Some(alive) = self.table_lock().get_mut(name) {
                        alive.created = Some(SystemTime::now());
                    }
                }
                Err(LaunchError::Exists(_)) => {
                    tracing::info!(build = %key, name, "another coordinator runs this build already; leaving it to that one");
                    return Ending::lost("another coordinator runs this build");
                }
                Err(LaunchError::Rejected(message)) => {
                    return Ending::failed(FailureReason::RunnerConfigurationError, message);
                }
                Err(LaunchError::Failed(message)) => {
                    return Ending::failed(FailureReason::RunnerSystemFailure, message);
                }
            }
        }
        let still_wanted = {
            let source = Arc::clone(source);
            let key = key.clone();
            StillWanted::new(move || {
                let source = Arc::clone(&source);
                let key = key.clone();
                Box::pin(async move { source.still_wanted(&key).await })
            })
        };
        let on_running = {
            let this = self.clone();
            let (name, kind, queued_at) = (
                name.to_owned(),
                key.source.name().to_owned(),
                about.queued_at,
            );
            OnRunning::new(move || this.running(&name, &kind, queued_at))
        };
        let watch = Watch {
            cancel: self.cancel.child_token(),
            still_wanted: Some(still_wanted),
            on_running: Some(on_running),
        };
        self.executor.watch(name, watch).await
    }

    /// The build's main container or process runs.
    fn running(&self, name: &str, kind: &str, queued_at: Option<SystemTime>) {
        let moved = self
            .table_lock()
            .get_mut(name)
            .filter(|alive| alive.phase == Phase::Pending)
            .map(|alive| {
                alive.phase = Phase::Running;
                alive.running = Some(SystemTime::now());
            })
            .is_some();
        if moved {
            self.phase_gauge(kind, Phase::Pending, -1);
            self.phase_gauge(kind, Phase::Running, 1);
            if let Some(waited) = queued_at.and_then(|at| at.elapsed().ok()) {
                self.metrics
                    .build_queue_wait
                    .get_or_create(&SourceLabels {
                        source: kind.to_owned(),
                    })
                    .observe(waited.as_secs_f64());
            }
        }
    }

    fn phase_gauge(&self, kind: &str, phase: Phase, by: i64) {
        self.metrics
            .builds
            .get_or_create(&PhaseLabels {
                source: kind.to_owned(),
                phase: phase.as_str().to_owned(),
            })
            .inc_by(by);
    }

    fn log_ending(&self, key: &BuildKey, name: &str, ending: &Ending) {
        match ending.outcome {
            Outcome::Lost => {
                tracing::info!(build = %key, name, detail = %ending.detail, "no longer following the build")
            }
            Outcome::Failed(reason) if !ending.reported => {
                tracing::warn!(build = %key, name, %reason, detail = %ending.detail, "build ended without reporting")
            }
            outcome => {
                tracing::info!(build = %key, name, outcome = outcome.as_str(), "build finished")
            }
        }
    }

    fn count_ending(&self, key: &BuildKey, ending: &Ending, launched: Instant) {
        let kind = key.source.name().to_owned();
        let reason = ending.reason().map(|r| r.as_str().to_owned());
        self.metrics
            .builds_finished
            .get_or_create(&OutcomeLabels {
                source: kind.clone(),
                outcome: ending.outcome.as_str().to_owned(),
                reason: reason.clone().unwrap_or_default(),
            })
            .inc();
        self.metrics
            .build_duration
            .get_or_create(&DurationLabels {
                source: kind,
                outcome: ending.outcome.as_str().to_owned(),
            })
            .observe(launched.elapsed().as_secs_f64());
        if ending.outcome != Outcome::Lost {
            let state = if ending.outcome == Outcome::Succeeded {
                JobState::Success
            } else {
                JobState::Failed
            };
            self.jobs
                .jobs_finished
                .get_or_create(&FinishedLabels {
                    runner: key.runner.clone(),
                    state,
                    reason: reason.unwrap_or_default(),
                })
                .inc();
        }
    }

    fn table_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Alive>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The coordinator as one source sees it.
pub(crate) struct SourceChain {
    pub(crate) source: Arc<dyn Source>,
    pub(crate) dispatcher: Dispatcher,
    pub(crate) limiter: Limiter,
    pub(crate) shutdown: CancellationToken,
    pub(crate) replicas: Arc<Replicas>,
}

impl Chain for SourceChain {
    fn leading(&self) -> bool {
        self.replicas.leading()
    }

    fn slot(&self) -> BoxFuture<'_, Option<Slot>> {
        Box::pin(async move {
            // `biased`: once shutdown has begun no slot is handed out, even when one is free
            // (an unbiased select picks a ready branch at random).
            let permit = tokio::select! {
                biased;
                () = self.shutdown.cancelled() => return None,
                permit = self.limiter.acquire(self.source.kind(), self.source.name(), self.source.limit()) => permit,
            };
            tokio::select! {
                biased;
                () = self.shutdown.cancelled() => return None,
                () = self.dispatcher.executor.ready() => {}
            }
            Some(Slot::new(permit))
        })
    }

    fn try_slot(&self) -> Option<Slot> {
        if self.shutdown.is_cancelled() {
            return None;
        }
        self.limiter
            .try_acquire(self.source.kind(), self.source.name(), self.source.limit())
            .map(Slot::new)
    }

    fn persist<'a>(&'a self, build: &'a Build) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if let Some(shared) = self.dispatcher.executor.shared()
                && let Err(e) = shared.persist(build).await
            {
                tracing::warn!(build = %build.key, name = %build.name, error = %e, "cannot write the build down before its work is acknowledged; the launch tries again");
            }
        })
    }

    fn launch(&self, slot: Slot, build: Build) {
        self.dispatcher
            .spawn(Arc::clone(&self.source), Some(slot), Start::launch(build));
    }

    fn stop(&self, name: &str) -> BoxFuture<'_, ()> {
        let name = name.to_owned();
        Box::pin(async move { self.dispatcher.executor.delete(&name).await })
    }

    fn explain(&self, name: &str) -> BoxFuture<'_, String> {
        let name = name.to_owned();
        Box::pin(async move { self.dispatcher.executor.explain(&name).await })
    }

    fn exists(&self, name: &str) -> BoxFuture<'_, bool> {
        let name = name.to_owned();
        Box::pin(async move {
            if self.dispatcher.follows(&name) {
                return true;
            }
            match self.dispatcher.executor.shared() {
                Some(shared) => shared.exists(&name).await,
                None => false,
            }
        })
    }
}
