//! What the HTTP server shows of the chain: readiness, capacity in use, every source's health,
//! and the builds alive and lately finished — one history for every source, never a secret.

use std::sync::Arc;

use super::history::{BuildRecord, History};
use super::supervise::Crashes;
use super::table::Table;
use super::warm::{ColdWaitView, PoolView, WarmPools};
use crate::sources::{Health, Source};

/// A view of the coordinator for `/readyz`, the status page and its JSON API.
#[derive(Clone)]
pub struct Status {
    sources: Vec<Arc<dyn Source>>,
    table: Table,
    history: Arc<History>,
    concurrent: usize,
    crashes: Arc<Crashes>,
    pools: Arc<WarmPools>,
}

/// One source as the status page shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceView {
    /// `gitlab`, `jenkins`, `github`.
    pub kind: &'static str,
    /// The entry's name.
    pub name: String,
    /// Its health.
    pub health: Health,
    /// Its builds alive now.
    pub builds: usize,
    /// Builds it may run at once besides `concurrent` (0: no own limit).
    pub limit: usize,
}

impl Status {
    pub(crate) fn new(
        sources: Vec<Arc<dyn Source>>,
        table: Table,
        history: Arc<History>,
        concurrent: usize,
        crashes: Arc<Crashes>,
        pools: Arc<WarmPools>,
    ) -> Self {
        Self {
            sources,
            table,
            history,
            concurrent,
            crashes,
            pools,
        }
    }

    /// Every warm pool: idle, starting and busy members, refills, hits and misses, and what
    /// its idle members cost today.
    pub fn warm_pools(&self) -> Vec<PoolView> {
        self.pools.views()
    }

    /// How long cold builds waited for their pod, by image (the figure that says which pool
    /// would pay off), slowest first.
    pub fn cold_waits(&self) -> Vec<ColdWaitView> {
        self.pools.cold_waits()
    }

    /// Ready when every source can take work (and its loop runs).
    pub fn ready(&self) -> bool {
        !self.crashes.any_down() && self.sources.iter().all(|s| s.health().ready)
    }

    /// Every source with its health and builds alive.
    pub fn sources(&self) -> Vec<SourceView> {
        self.sources
            .iter()
            .enumerate()
            .map(|(index, source)| SourceView {
                kind: source.kind().name(),
                name: source.name().to_owned(),
                health: self.crashes.overlay(index, source.health()),
                builds: self.table.count(source.kind(), source.name()),
                limit: source.limit(),
            })
            .collect()
    }

    /// (builds alive, `concurrent`): builds only, not requests waiting for work.
    pub fn capacity(&self) -> (usize, usize) {
        (self.table.len(), self.concurrent)
    }

    /// The builds alive now (latest launch first), then the finished ones the history keeps
    /// (latest end first).
    pub fn builds(&self) -> Vec<Arc<BuildRecord>> {
        let mut builds = self.table.records();
        builds.extend(self.history.newest_first());
        builds
    }

    /// How many finished builds the history keeps at most (`status.history`).
    pub fn history_limit(&self) -> usize {
        self.history.limit()
    }
}

#[cfg(test)]
impl Status {
    /// A view of `sources` with no build alive and `finished` (oldest first) in a history of
    /// `limit`, for the HTTP server's tests.
    pub(crate) fn with_history(
        sources: Vec<Arc<dyn Source>>,
        finished: Vec<BuildRecord>,
        limit: usize,
        concurrent: usize,
    ) -> Self {
        let history = Arc::new(History::new(limit));
        for record in finished {
            history.push(record);
        }
        let crashes = Arc::new(Crashes::new(sources.len()));
        let pools = Arc::new(WarmPools::none(&crate::telemetry::Metrics::new()));
        Self::new(
            sources,
            Table::default(),
            history,
            concurrent,
            crashes,
            pools,
        )
    }
}
