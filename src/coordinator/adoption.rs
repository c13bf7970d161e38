//! Restart adoption and orphan cleanup, once for every source: the builds an earlier
//! coordinator left are listed from the executor in one go, each is handed to the source it
//! belongs to, which says whether to follow it, start it again or remove it; builds of no
//! configured source are removed.

use std::sync::Arc;

use super::dispatch::{Dispatcher, Start};
use super::limiter::Limiter;
use crate::build::Found;
use crate::sources::{Adoption, Slot, Source};

/// Adopts every build the executor lists. Followed builds take their slot of capacity first
/// (before any source asks for work), so they count against `concurrent`.
pub(crate) async fn adopt_all(
    dispatcher: &Dispatcher,
    limiter: &Limiter,
    sources: &[Arc<dyn Source>],
) {
    let found = match dispatcher.executor.list().await {
        Ok(found) => found,
        Err(e) => {
            tracing::error!(error = %e, "cannot list the builds of an earlier run; they are adopted at the next start");
            return;
        }
    };
    if !found.is_empty() {
        tracing::info!(
            builds = found.len(),
            "adopting the builds of an earlier run"
        );
    }
    for found in found {
        adopt(dispatcher, limiter, sources, found).await;
    }
}

async fn adopt(
    dispatcher: &Dispatcher,
    limiter: &Limiter,
    sources: &[Arc<dyn Source>],
    found: Found,
) {
    let Some(source) = sources
        .iter()
        .find(|s| s.kind() == found.key.source && s.name() == found.key.runner)
    else {
        tracing::warn!(build = %found.key, name = %found.name, "a build of a source that is no longer configured; removing it");
        dispatcher.executor.delete(&found.name).await;
        return;
    };
    let adoption = source.adopt(&found).await;
    let start = match adoption {
        Adoption::Discard(reason) => {
            tracing::info!(build = %found.key, name = %found.name, %reason, "removing a build of an earlier run");
            dispatcher.executor.delete(&found.name).await;
            return;
        }
        Adoption::Follow(about) if found.exists => Start {
            key: found.key.clone(),
            name: found.name.clone(),
            about,
            launch: None,
        },
        Adoption::Follow(_) => {
            // Nothing runs it and the source cannot say how to start it again.
            tracing::warn!(build = %found.key, name = %found.name, "only the secrets of this build are left; removing them");
            dispatcher.executor.delete(&found.name).await;
            return;
        }
    };
    tracing::info!(build = %found.key, name = %found.name, "adopted a build of an earlier run");
    // Adopted builds count against capacity; when there are more than `concurrent` (it was
    // lowered), the surplus is followed anyway and new work waits until enough have ended.
    let slot = limiter
        .try_acquire(source.name(), source.limit())
        .map(Slot::new);
    if slot.is_none() {
        tracing::warn!(build = %found.key, "more builds run than `concurrent` allows; new work waits until enough of them end");
    }
    dispatcher.spawn(Arc::clone(source), slot, start);
}
