//! The coordinator: the one place where sources and executors meet. It owns, once for every
//! source, the chain sources → limiter → launcher → executor → back to the source: capacity
//! (`concurrent` and each source's limit), dispatch, restart adoption and orphan cleanup,
//! graceful shutdown, and the chain's metrics and status.

mod adoption;
mod cost;
mod dispatch;
mod history;
pub mod limiter;
mod replicas;
mod status;
mod supervise;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::executor::{Executor, SharedBuilds};
use crate::sources::{Chain, Source};
use crate::telemetry::Metrics;
use adoption::Pass;
pub use cost::{CostConfig, Prices};
pub use dispatch::{Alive, Phase};
use dispatch::{Dispatcher, SourceChain};
use history::History;
pub use history::{BuildRecord, End};
use limiter::Limiter;
use replicas::Replicas;
pub use replicas::Timing as LeaseTiming;
pub use status::{SourceView, Status};
use supervise::Crashes;

/// How long stopped builds get to report before the coordinator stops waiting.
const CANCEL_WAIT: Duration = Duration::from_secs(120);
/// How long detaching from builds that outlive the coordinator may take.
const DETACH_WAIT: Duration = Duration::from_secs(10);
/// How often a replica looks for builds no live replica follows even when no replica died
/// (a build a dead replica launched while its Lease was unreadable, an orphan for a new leader).
const SAFETY_SCAN: Duration = Duration::from_secs(60);

/// How the coordinator runs.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Builds at once across all sources.
    pub concurrent: usize,
    /// How long shutdown waits for builds that do not survive it (local processes).
    pub shutdown_timeout: Duration,
    /// Finished builds the status page keeps (`status.history`).
    pub history: usize,
    /// What a vCPU-hour and a GiB-hour cost unless a resource class says otherwise.
    pub prices: Prices,
    /// The replicas' Leases (with an executor that has them).
    pub leases: LeaseTiming,
}

/// The coordinator of one `kiln run`.
pub struct Coordinator {
    settings: Settings,
    sources: Vec<Arc<dyn Source>>,
    limiter: Limiter,
    dispatcher: Dispatcher,
    /// Panics of the sources' loops, for `/readyz` and the status page.
    crashes: Arc<Crashes>,
}

impl Coordinator {
    /// A coordinator running the builds of `sources` on `executor`.
    pub fn new(
        settings: Settings,
        metrics: Arc<Metrics>,
        executor: Arc<dyn Executor>,
        sources: Vec<Arc<dyn Source>>,
    ) -> Self {
        Self {
            limiter: Limiter::new(settings.concurrent),
            dispatcher: Dispatcher {
                tracker: TaskTracker::new(),
                executor,
                jobs: metrics.stage(),
                metrics,
                table: Arc::new(Mutex::new(HashMap::new())),
                history: Arc::new(History::new(settings.history)),
                prices: settings.prices,
                cancel: CancellationToken::new(),
            },
            settings,
            crashes: Arc::new(Crashes::new(sources.len())),
            sources,
        }
    }

    /// Readiness, capacity and the builds alive, for the HTTP server.
    pub fn status(&self) -> Status {
        Status::new(
            self.sources.clone(),
            Arc::clone(&self.dispatcher.table),
            Arc::clone(&self.dispatcher.history),
            self.settings.concurrent,
            Arc::clone(&self.crashes),
        )
    }

    /// Adopts the builds an earlier coordinator left, runs every source until `shutdown`, then
    /// stops taking work: builds that survive the coordinator (pods) are left running for the
    /// next one; builds that do not (local processes) get `shutdown_timeout` to finish and are
    /// then stopped and reported.
    pub async fn run(self, shutdown: CancellationToken) {
        let dispatcher = &self.dispatcher;
        let replicas = Arc::new(Replicas::new(
            dispatcher.executor.shared().and_then(SharedBuilds::leases),
            self.settings.leases,
        ));
        // Renew this replica's Lease and read the others' before looking at any build.
        let first = replicas.round().await;
        let stop_replicas = CancellationToken::new();
        let wanted = Arc::new(Notify::new());
        // From here on the Leases are renewed by a task of their own, which nothing awaits
        // behind: a take-over of many builds (each a claim and a call to its CI server) takes
        // longer than a Lease lasts, and a replica that stops renewing meanwhile is taken for
        // dead by the others.
        let renewer = tokio::spawn(renew_leases(
            Arc::clone(&replicas),
            stop_replicas.clone(),
            Arc::clone(&wanted),
        ));
        let listed = adoption::adopt_all(
            dispatcher,
            &self.limiter,
            &self.sources,
            &replicas,
            Pass::Start,
        )
        .await;
        let keeper = tokio::spawn(take_over(
            Arc::clone(&replicas),
            dispatcher.clone(),
            self.limiter.clone(),
            self.sources.clone(),
            stop_replicas.clone(),
            wanted,
            !(listed && (first.read || !replicas.shared_builds())),
        ));
        let mut sources = tokio::task::JoinSet::new();
        for (index, source) in self.sources.iter().enumerate() {
            let chain: Arc<dyn Chain> = Arc::new(SourceChain {
                source: Arc::clone(source),
                dispatcher: dispatcher.clone(),
                limiter: self.limiter.clone(),
                shutdown: shutdown.clone(),
                replicas: Arc::clone(&replicas),
            });
            sources.spawn(supervise::supervise(
                index,
                Arc::clone(source),
                chain,
                Arc::clone(&self.crashes),
                shutdown.clone(),
            ));
        }
        tracing::info!(
            sources = self.sources.len(),
            concurrent = self.settings.concurrent,
            executor = dispatcher.executor.name(),
            "coordinator started"
        );
        shutdown.cancelled().await;
        while sources.join_next().await.is_some() {}
        // No take-overs while stopping; the Leases are given up once the builds are let go.
        stop_replicas.cancel();
        let _ = keeper.await;
        let _ = renewer.await;
        let tracker = &dispatcher.tracker;
        tracker.close();
        let running = tracker.len();
        if dispatcher.executor.shared().is_some() {
            // Builds run on without the coordinator and report themselves; the next
            // coordinator adopts them. Draining would only delay the restart.
            if running > 0 {
                tracing::info!(
                    running,
                    "shutting down: running builds keep going and are adopted by the next start"
                );
            }
            dispatcher.cancel.cancel();
            let _ = tokio::time::timeout(DETACH_WAIT, tracker.wait()).await;
            // The other replicas take the builds over at their next round.
            replicas.leave().await;
            tracing::info!("coordinator stopped");
            return;
        }
        if running > 0 {
            tracing::info!(
                running,
                "shutting down: no new work; waiting up to {} for running builds",
                humantime::format_duration(self.settings.shutdown_timeout)
            );
        }
        if tokio::time::timeout(self.settings.shutdown_timeout, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                running = tracker.len(),
                "shutdown timeout reached; stopping running builds"
            );
            dispatcher.cancel.cancel();
            if tokio::time::timeout(CANCEL_WAIT, tracker.wait())
                .await
                .is_err()
            {
                tracing::error!(running = tracker.len(), "some builds did not stop in time");
            }
        }
        replicas.leave().await;
        tracing::info!("coordinator stopped");
    }
}

/// Renews this replica's Leases and reads the others' every renew period until `stop`, and
/// wakes the take-over when a replica died or this one became the leader. It awaits nothing
/// but the Lease calls (outside the executor's rate limit), so nothing delays a renewal.
async fn renew_leases(replicas: Arc<Replicas>, stop: CancellationToken, wanted: Arc<Notify>) {
    let renew = replicas.timing().renew;
    let mut leading = replicas.leading();
    let mut next = tokio::time::Instant::now() + renew;
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            () = stop.cancelled() => return,
        }
        // A steady beat: a slow round does not push the next one later.
        next += renew;
        let now = tokio::time::Instant::now();
        if next < now {
            next = now + renew;
        }
        if !replicas.shared_builds() {
            continue;
        }
        let round = replicas.round().await;
        if !round.read {
            continue;
        }
        // A new leader takes over the orphans the last one may have left.
        let became_leader = replicas.leading() && !leading;
        leading = replicas.leading();
        if became_leader || !round.died.is_empty() {
            wanted.notify_one();
        }
    }
}

/// Takes over the builds of replicas that died (and of none) when [`renew_leases`] says so,
/// and every [`SAFETY_SCAN`] anyway, until `stop`; one pass at a time, beside the renewals.
/// `scan` says the start-up adoption could not tell whose builds are whose, so it is done
/// again as soon as it can.
async fn take_over(
    replicas: Arc<Replicas>,
    dispatcher: Dispatcher,
    limiter: Limiter,
    sources: Vec<Arc<dyn Source>>,
    stop: CancellationToken,
    wanted: Arc<Notify>,
    mut scan: bool,
) {
    let renew = replicas.timing().renew;
    let mut last_scan = tokio::time::Instant::now();
    loop {
        let wait = if scan {
            renew
        } else {
            SAFETY_SCAN.saturating_sub(last_scan.elapsed())
        };
        tokio::select! {
            () = wanted.notified() => {}
            () = tokio::time::sleep(wait) => {}
            () = stop.cancelled() => return,
        }
        let look = if replicas.shared_builds() {
            // Whose builds are whose cannot be told before the Leases were read once.
            replicas.known()
        } else {
            // The only replica: its start-up adoption took every build there is.
            scan
        };
        if look {
            scan = !adoption::adopt_all(&dispatcher, &limiter, &sources, &replicas, Pass::TakeOver)
                .await;
        }
        last_scan = tokio::time::Instant::now();
    }
}

#[cfg(test)]
mod tests;
