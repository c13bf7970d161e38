//! The coordinator: the one place where sources and executors meet. It owns, once for every
//! source, the chain sources → limiter → launcher → executor → back to the source: capacity
//! (`concurrent` and each source's limit), dispatch, restart adoption and orphan cleanup,
//! graceful shutdown, and the chain's metrics and status.

mod adoption;
mod chain;
mod cost;
mod history;
mod launch;
pub mod limiter;
mod metrics;
mod replicas;
mod status;
mod supervise;
mod table;
mod warm;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::executor::{Executor, SharedBuilds};
use crate::sources::{Chain, Source};
use crate::telemetry::Metrics;
use adoption::{Backlog, Pass, TakeOver};
use chain::SourceChain;
pub use cost::{CostConfig, Prices};
pub use history::{BuildRecord, End};
use launch::Launcher;
use limiter::Limiter;
use replicas::Replicas;
pub use replicas::Timing as LeaseTiming;
pub use status::{SourceView, Status};
use supervise::Crashes;
pub use table::{Alive, Phase};
pub(crate) use warm::config as warm_config;
pub use warm::{ColdWaitView, PoolView, WarmPoolConfig, WarmSettings, WindowConfig};

/// How long stopped builds get to report before the coordinator stops waiting.
const CANCEL_WAIT: Duration = Duration::from_secs(120);
/// How long detaching from builds that outlive the coordinator may take.
const DETACH_WAIT: Duration = Duration::from_secs(10);

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
    launcher: Launcher,
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
            launcher: Launcher::new(executor, metrics, settings.history, settings.prices),
            settings,
            crashes: Arc::new(Crashes::new(sources.len())),
            sources,
        }
    }

    /// Keeps the warm pools of `warm` (`[[warm_pools]]`): GitLab builds that fit take an idle
    /// warm pod, the other sources keep their own idle members to the pools' floors.
    #[must_use]
    pub fn warm_pools(self, warm: &WarmSettings, metrics: &Metrics) -> Self {
        self.warm_pools_clocked(warm, metrics, Arc::new(std::time::SystemTime::now))
    }

    /// [`Coordinator::warm_pools`] with the pools' clock (schedules, idle time) given.
    fn warm_pools_clocked(
        mut self,
        warm: &WarmSettings,
        metrics: &Metrics,
        clock: warm::Clock,
    ) -> Self {
        let sources: Vec<(crate::build::SourceKind, String)> = self
            .sources
            .iter()
            .map(|s| (s.kind(), s.name().to_owned()))
            .collect();
        self.launcher.pools = Arc::new(warm::WarmPools::new(
            warm,
            &sources,
            Some(&*self.launcher.executor),
            self.settings.prices,
            metrics,
            clock,
        ));
        self
    }

    /// Readiness, capacity and the builds alive, for the HTTP server.
    pub fn status(&self) -> Status {
        Status::new(
            self.sources.clone(),
            self.launcher.table.clone(),
            Arc::clone(&self.launcher.history),
            self.settings.concurrent,
            Arc::clone(&self.crashes),
            Arc::clone(&self.launcher.pools),
        )
    }

    /// Adopts the builds an earlier coordinator left, runs every source until `shutdown`, then
    /// stops taking work: builds that survive the coordinator (pods) are left running for the
    /// next one; builds that do not (local processes) get `shutdown_timeout` to finish and are
    /// then stopped and reported.
    pub async fn run(self, shutdown: CancellationToken) {
        let launcher = &self.launcher;
        let replicas = Arc::new(Replicas::new(
            launcher.executor.shared().and_then(SharedBuilds::leases),
            self.settings.leases,
        ));
        // Renew this replica's Lease and read the others' before looking at any build.
        replicas.round().await;
        // Made before the membership loop runs, so the take-over hears of every replica that
        // dies from now on.
        let membership = replicas.membership();
        // Whether the start-up adoption can tell whose builds are whose.
        let at_start = membership.view();
        let stop_replicas = CancellationToken::new();
        let keeper = tokio::spawn(Arc::clone(&replicas).keep(stop_replicas.clone()));
        let listed = adoption::adopt_all(
            launcher,
            &self.limiter,
            &self.sources,
            &membership,
            Pass::Start,
        )
        .await;
        let take_over = TakeOver {
            launcher: launcher.clone(),
            limiter: self.limiter.clone(),
            sources: self.sources.clone(),
            membership: membership.clone(),
            renew: self.settings.leases.renew,
        };
        let adopter = tokio::spawn(adoption::take_over(
            take_over,
            Backlog::after(listed, &at_start),
            stop_replicas.clone(),
        ));
        let stop_pools = CancellationToken::new();
        let pools = tokio::spawn(warm::keep(
            Arc::clone(&launcher.pools),
            Arc::clone(&launcher.executor),
            membership.clone(),
            stop_pools.clone(),
        ));
        let mut sources = tokio::task::JoinSet::new();
        for (index, source) in self.sources.iter().enumerate() {
            let chain: Arc<dyn Chain> = Arc::new(SourceChain {
                source: Arc::clone(source),
                launcher: launcher.clone(),
                limiter: self.limiter.clone(),
                shutdown: shutdown.clone(),
                membership: membership.clone(),
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
            executor = launcher.executor.name(),
            "coordinator started"
        );
        shutdown.cancelled().await;
        while sources.join_next().await.is_some() {}
        // No build takes a warm pod any more: this replica's idle ones are retired.
        stop_pools.cancel();
        let _ = pools.await;
        // No take-overs while stopping; the Leases are given up once the builds are let go.
        stop_replicas.cancel();
        let _ = adopter.await;
        let _ = keeper.await;
        let tracker = &launcher.tracker;
        tracker.close();
        let running = tracker.len();
        if launcher.executor.shared().is_some() {
            // Builds run on without the coordinator and report themselves; the next
            // coordinator adopts them. Draining would only delay the restart.
            if running > 0 {
                tracing::info!(
                    running,
                    "shutting down: running builds keep going and are adopted by the next start"
                );
            }
            launcher.cancel.cancel();
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
            launcher.cancel.cancel();
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

#[cfg(test)]
mod tests;
