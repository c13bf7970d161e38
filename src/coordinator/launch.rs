//! The launcher stage: a build handed over by a source (or found at start-up) is launched on
//! the executor, watched to its end, deleted, and its ending handed back to its source — while
//! it holds its slot of capacity, and while the build table and metrics say where it is.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::cost::Prices;
use super::history::{End, History};
use super::metrics::CoordinatorMetrics;
use super::table::{Alive, Phase, Table};
use super::warm::{Placement, WarmPools};
use crate::build::{About, Build, BuildKey, Ending, FailureReason, Outcome, SourceKind};
use crate::executor::{Executor, LaunchError, OnRunning, StillWanted, Watch};
use crate::sources::job_metrics::JobMetrics;
use crate::sources::{Slot, Source};
use crate::telemetry::Metrics;

/// Starts each build and sees it to the end; shared by every source's chain and by adoption.
#[derive(Clone)]
pub(crate) struct Launcher {
    /// Every build's task, for shutdown to wait on.
    pub(crate) tracker: TaskTracker,
    pub(crate) executor: Arc<dyn Executor>,
    /// The builds alive now.
    pub(crate) table: Table,
    /// The builds that finished lately, for the status page.
    pub(crate) history: Arc<History>,
    /// Cancels every build's watch (shutdown).
    pub(crate) cancel: CancellationToken,
    metrics: Arc<CoordinatorMetrics>,
    /// The `kiln_jobs_*` counts, which every source's builds feed.
    jobs: Arc<JobMetrics>,
    /// What a vCPU-hour and a GiB-hour cost by default.
    prices: Prices,
    /// The warm pools (none unless configured).
    pub(crate) pools: Arc<WarmPools>,
}

/// What a build task starts from.
pub(crate) struct Start {
    pub(crate) key: BuildKey,
    pub(crate) name: String,
    pub(crate) about: About,
    /// The build to launch; `None` for a build that runs already (adopted).
    pub(crate) launch: Option<Build>,
    /// Where the build was placed (warm pod or cold), when the warm pools decided.
    pub(crate) placed: Option<Placement>,
}

impl Start {
    pub(crate) fn launch(build: Build) -> Self {
        Self {
            key: build.key.clone(),
            name: build.name.clone(),
            about: build.about.clone(),
            launch: Some(build),
            placed: None,
        }
    }

    /// `build` placed by the warm pools: launched with its start line, under its warm pod's
    /// name when it took one.
    pub(crate) fn placed(build: Build, placement: Placement) -> Self {
        Self {
            placed: Some(placement.clone()),
            ..Self::launch(placement.apply(build))
        }
    }
}

impl Launcher {
    /// A launcher of builds on `executor` that keeps the last `history` finished ones.
    pub(crate) fn new(
        executor: Arc<dyn Executor>,
        metrics: Arc<Metrics>,
        history: usize,
        prices: Prices,
    ) -> Self {
        Self {
            tracker: TaskTracker::new(),
            executor,
            table: Table::default(),
            history: Arc::new(History::new(history)),
            cancel: CancellationToken::new(),
            pools: Arc::new(WarmPools::none(&metrics)),
            metrics: metrics.stage(),
            jobs: metrics.stage(),
            prices,
        }
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
            placed,
        } = start;
        let launched = Instant::now();
        let footprint = launch
            .as_ref()
            .and_then(|build| self.executor.footprint(build));
        let fresh = self.table.insert(Alive {
            key: key.clone(),
            name: name.clone(),
            about: about.clone(),
            phase: Phase::Pending,
            since: SystemTime::now(),
            footprint,
            created: None,
            running: None,
        });
        if !fresh {
            // A second hand-over of work this coordinator already runs (a redelivered webhook,
            // a reconcile racing it): never a second build.
            tracing::info!(build = %key, name, "this build runs already; not starting it again");
            let ending = Ending::lost("the build runs already");
            source.ended(&key, &name, &ending).await;
            return;
        }
        self.metrics.launched(key.source);
        self.jobs.started(&key.runner);
        let warm_pool = placed.as_ref().and_then(Placement::pool);
        if let Some(pool) = warm_pool {
            self.pools.in_use(pool, 1);
        }
        let cold_image = placed
            .as_ref()
            .and_then(Placement::cold_image)
            .map(|image| (image.to_owned(), launched));

        let ending = self
            .launch_and_watch(&source, &key, &name, &about, launch, cold_image)
            .await;
        if let Some(pool) = warm_pool {
            self.pools.in_use(pool, -1);
        }
        let ended_at = SystemTime::now();
        if ending.outcome != Outcome::Lost {
            self.executor.delete(&name).await;
        }
        log_ending(&key, &name, &ending);
        source.ended(&key, &name, &ending).await;

        let alive = self.table.remove(&name);
        let phase = alive.as_ref().map_or(Phase::Pending, |alive| alive.phase);
        self.metrics
            .ended(key.source, phase, &ending, launched.elapsed());
        self.jobs.stopped();
        // A build kiln stopped following (`Lost`) has not finished as a job.
        if ending.outcome != Outcome::Lost {
            let reason = ending.reason().map(FailureReason::as_str);
            self.jobs.finished(
                &key.runner,
                ending.outcome == Outcome::Succeeded,
                reason.unwrap_or_default(),
            );
        }
        if let Some(alive) = alive {
            self.remember(alive, ending, ended_at);
        }
        drop(slot);
    }

    /// Puts a finished build into the history, with its cost, and counts the cost.
    fn remember(&self, alive: Alive, ending: Ending, at: SystemTime) {
        let mut record = alive.into_record();
        let cost = self.prices.of_build(&record, ending.outcome, at);
        if let (Some(cost), Some(footprint)) = (cost, &record.footprint)
            && cost > 0.0
        {
            self.metrics.cost(
                record.key.source,
                &record.about.project,
                footprint.class.as_deref(),
                cost,
            );
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
        cold_image: Option<(String, Instant)>,
    ) -> Ending {
        if let Some(build) = launch {
            let launched = self.executor.launch(&build).await;
            // A running build keeps neither its spec nor its secrets in kiln's memory.
            drop(build);
            match launched {
                Ok(()) => self.table.created(name),
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
            let (name, kind, queued_at) = (name.to_owned(), key.source, about.queued_at);
            OnRunning::new(move || {
                if this.running(&name, kind, queued_at)
                    && let Some((image, launched)) = &cold_image
                {
                    this.pools.cold_started(image, launched.elapsed());
                }
            })
        };
        let watch = Watch {
            cancel: self.cancel.child_token(),
            still_wanted: Some(still_wanted),
            on_running: Some(on_running),
        };
        self.executor.watch(name, watch).await
    }

    /// The build's main container or process runs; false when it was known to run already.
    fn running(&self, name: &str, kind: SourceKind, queued_at: Option<SystemTime>) -> bool {
        if !self.table.running(name) {
            return false;
        }
        let waited = queued_at.and_then(|at| at.elapsed().ok());
        self.metrics.running(kind, waited);
        true
    }
}

fn log_ending(key: &BuildKey, name: &str, ending: &Ending) {
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
