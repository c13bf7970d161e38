//! Restart adoption, take-over and orphan cleanup, once for every source: the builds an
//! earlier coordinator (or a replica that died) left are listed from the executor in one go,
//! each is handed to the source it belongs to, which says whether to follow it, start it again
//! or remove it; builds of no configured source are removed (by the leading replica).
//!
//! Of the builds listed, a replica takes only its own (at start-up), those labelled with no
//! replica, and those of dead replicas — each after claiming it, so that of several replicas
//! exactly one follows it. A live replica's builds are never touched.

use std::sync::Arc;

use futures::StreamExt;

use super::dispatch::{Dispatcher, Start};
use super::limiter::Limiter;
use super::replicas::{Owner, Replicas};
use crate::build::Found;
use crate::executor::{Claim, SharedBuilds};
use crate::sources::{Adoption, Slot, Source};

/// Why the builds are looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pass {
    /// At start-up: this replica's own builds (of its earlier run) are adopted too.
    Start,
    /// While running: the builds of replicas that died, and of none.
    TakeOver,
}

/// Adopts the builds the executor lists that are this replica's to follow. Followed builds
/// take their slot of capacity first (before any source asks for work), so they count against
/// `concurrent`. Returns whether the builds could be listed.
pub(crate) async fn adopt_all(
    dispatcher: &Dispatcher,
    limiter: &Limiter,
    sources: &[Arc<dyn Source>],
    replicas: &Replicas,
    pass: Pass,
) -> bool {
    // A take-over reads only the builds of replicas not known to be alive (and unlabelled
    // ones): listing every live replica's builds with their secrets each time would cost the
    // API server and kiln's memory in proportion to all builds running.
    let live = match pass {
        Pass::TakeOver => replicas.live(),
        Pass::Start => None,
    };
    let Some(shared) = dispatcher.executor.shared() else {
        // The executor's builds are this process's alone: none outlived an earlier one.
        return true;
    };
    let listed = match &live {
        Some(live) => shared.list_except(live).await,
        None => shared.list().await,
    };
    let found = match listed {
        Ok(found) => found,
        Err(e) => {
            tracing::error!(error = %e, "cannot list the builds of an earlier run; they are adopted later");
            return false;
        }
    };
    let mut candidates = Vec::new();
    for found in found {
        if dispatcher.follows(&found.name) {
            continue;
        }
        let owner = replicas.owner(found.replica.as_deref());
        match (owner, pass) {
            (Owner::Live, _) | (Owner::Mine, Pass::TakeOver) => continue,
            (Owner::Mine, Pass::Start) | (Owner::Free, _) => {}
        }
        let configured = sources
            .iter()
            .any(|s| s.kind() == found.key.source && s.name() == found.key.runner);
        if !configured && !replicas.leading() {
            // Orphan cleanup is the leader's chore (its configuration may still have the
            // source, in the middle of a rollout).
            tracing::debug!(build = %found.key, name = %found.name, "a build of a source this replica does not have; leaving it to the leader");
            continue;
        }
        candidates.push(found);
    }
    if !candidates.is_empty() {
        let what = match pass {
            Pass::Start => "adopting the builds of an earlier run",
            Pass::TakeOver => "taking over the builds of replicas that are gone",
        };
        tracing::info!(builds = candidates.len(), "{what}");
    }
    // Builds are taken over side by side: each is a claim (an API call under the executor's
    // rate limit) and its source's look at it (a call to its CI server, which may be slow),
    // and a thousand of them one after another would leave the dead replica's failures
    // unreported for minutes. As many at once as the executor's rate limit lets go out at once.
    let parallel = shared.parallel_calls().max(1);
    futures::stream::iter(candidates)
        .for_each_concurrent(parallel, |found| async move {
            if claim(shared, replicas, &found).await {
                adopt(dispatcher, limiter, sources, found).await;
            }
        })
        .await;
    true
}

/// Claims `found` for this replica when it must (see [`Found::needs_claim`]); whether this
/// replica follows it now.
async fn claim(shared: &dyn SharedBuilds, replicas: &Replicas, found: &Found) -> bool {
    // A build owned by another replica (or none) is claimed first: of replicas taking it at
    // once one wins, and the executor follows only builds labelled with this replica (also
    // when, without Leases, this one takes every build). One of its own whose pod still names
    // the replica it came from (a claim stopped half way) is brought in line.
    let needs_claim = replicas.identity().is_some_and(|me| found.needs_claim(me));
    if !needs_claim {
        return true;
    }
    match shared.claim(found).await {
        Claim::Won => {
            tracing::info!(build = %found.key, name = %found.name, from = found.replica.as_deref().unwrap_or("no replica"), "claimed the build");
            true
        }
        Claim::Lost => {
            tracing::debug!(build = %found.key, name = %found.name, "another replica claimed the build first");
            false
        }
        Claim::Failed(message) => {
            tracing::warn!(build = %found.key, name = %found.name, error = %message, "cannot claim the build; trying again later");
            false
        }
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
        Adoption::Relaunch(build) => {
            tracing::info!(build = %found.key, name = %found.name, "the build of an earlier run never started; starting it now");
            Start::launch(*build)
        }
    };
    tracing::info!(build = %found.key, name = %found.name, "adopted a build of an earlier run");
    // Adopted builds count against capacity; when there are more than `concurrent` (it was
    // lowered), the surplus is followed anyway and new work waits until enough have ended.
    let slot = limiter
        .try_acquire(source.kind(), source.name(), source.limit())
        .map(Slot::new);
    if slot.is_none() {
        tracing::warn!(build = %found.key, "more builds run than `concurrent` allows; new work waits until enough of them end");
    }
    dispatcher.spawn(Arc::clone(source), slot, start);
}
