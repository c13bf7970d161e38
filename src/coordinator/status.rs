//! What the HTTP server shows of the chain: readiness, capacity in use and the builds alive,
//! for every source (never a secret).

use std::sync::Arc;

use super::dispatch::{Alive, Table};
use crate::sources::{Health, Source};

/// A view of the coordinator for `/readyz` and the status page.
#[derive(Clone)]
pub struct Status {
    sources: Vec<Arc<dyn Source>>,
    table: Table,
    concurrent: usize,
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
}

impl Status {
    pub(crate) fn new(sources: Vec<Arc<dyn Source>>, table: Table, concurrent: usize) -> Self {
        Self {
            sources,
            table,
            concurrent,
        }
    }

    /// Ready when every source can take work.
    pub fn ready(&self) -> bool {
        self.sources.iter().all(|s| s.health().ready)
    }

    /// Every source with its health and builds alive.
    pub fn sources(&self) -> Vec<SourceView> {
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        self.sources
            .iter()
            .map(|source| SourceView {
                kind: source.kind().name(),
                name: source.name().to_owned(),
                health: source.health(),
                builds: table
                    .values()
                    .filter(|b| b.key.source == source.kind() && b.key.runner == source.name())
                    .count(),
            })
            .collect()
    }

    /// (builds alive, `concurrent`): builds only, not requests waiting for work.
    pub fn capacity(&self) -> (usize, usize) {
        let alive = self.table.lock().unwrap_or_else(|e| e.into_inner()).len();
        (alive, self.concurrent)
    }

    /// The builds alive now, oldest first.
    pub fn builds(&self) -> Vec<Alive> {
        let mut builds: Vec<Alive> = self
            .table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        builds.sort_by_key(|b| b.since);
        builds
    }
}
