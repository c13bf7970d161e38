//! Restart adoption, take-over and orphan cleanup, once for every source: the builds an
//! earlier coordinator (or a replica that died) left are listed from the executor in one go,
//! each is handed to the source it belongs to, which says whether to follow it, start it again
//! or remove it; builds of no configured source are removed (by the leading replica).
//!
//! Of the builds listed, a replica takes only its own (at start-up), those labelled with no
//! replica, and those of dead replicas — each after claiming it, so that of several replicas
//! exactly one follows it. A live replica's builds are never touched.
//!
//! After start-up, [`take_over`] looks again whenever the membership view says builds were
//! left behind, and on a slow safety beat anyway.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::launch::{Launcher, Start};
use super::limiter::Limiter;
use super::replicas::{Membership, Owner, View};
use crate::build::Found;
use crate::executor::{Claim, SharedBuilds};
use crate::sources::{Adoption, Slot, Source};

/// How often a replica looks for builds no live replica follows even when no replica died
/// (a build a dead replica launched while its Lease was unreadable, an orphan for a new leader).
const SAFETY_SCAN: Duration = Duration::from_secs(60);

/// Whether the last look at the builds found every one this replica may follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backlog {
    /// The builds were listed with the replicas known: the next look is at the safety scan,
    /// or sooner when builds are left behind.
    Clear,
    /// The builds could not be listed, or not told apart because the replicas' Leases were not
    /// read yet: they are looked at again a renew period later.
    Unsorted,
}

impl Backlog {
    /// After a look that listed the builds (`listed`) with `view`.
    pub(crate) fn after(listed: bool, view: &View) -> Self {
        if listed && view.known() {
            Self::Clear
        } else {
            Self::Unsorted
        }
    }

    /// How long after a look the next one is due, with Leases renewed every `renew`.
    fn next_look(self, renew: Duration) -> Duration {
        match self {
            Self::Clear => SAFETY_SCAN,
            Self::Unsorted => renew,
        }
    }

    /// Whether a look is worth it with `view`: with other replicas once whose builds are whose
    /// can be told; as the only replica just to finish a start-up adoption that could not list
    /// (it took every build there is otherwise).
    fn worth_a_look(self, view: &View) -> bool {
        if view.shared_builds() {
            view.known()
        } else {
            self == Self::Unsorted
        }
    }
}

/// What a take-over works with.
pub(crate) struct TakeOver {
    pub(crate) launcher: Launcher,
    pub(crate) limiter: Limiter,
    pub(crate) sources: Vec<Arc<dyn Source>>,
    pub(crate) membership: Membership,
    /// How often the Leases are renewed.
    pub(crate) renew: Duration,
}

/// Takes over the builds of replicas that died (and of none) when the membership view says
/// builds were left behind, and when [`Backlog::next_look`] says, until `stop`; one pass at a
/// time, beside the membership loop. `backlog` is what the start-up adoption left.
pub(crate) async fn take_over(mut take: TakeOver, mut backlog: Backlog, stop: CancellationToken) {
    let mut last_look = tokio::time::Instant::now();
    loop {
        let due = last_look + backlog.next_look(take.renew);
        tokio::select! {
            () = take.membership.left_behind() => {}
            () = tokio::time::sleep_until(due) => {}
            () = stop.cancelled() => return,
        }
        let view = take.membership.view();
        if backlog.worth_a_look(&view) {
            let listed = adopt_all(
                &take.launcher,
                &take.limiter,
                &take.sources,
                &take.membership,
                Pass::TakeOver,
            )
            .await;
            backlog = if listed {
                Backlog::Clear
            } else {
                Backlog::Unsorted
            };
        }
        last_look = tokio::time::Instant::now();
    }
}

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
    launcher: &Launcher,
    limiter: &Limiter,
    sources: &[Arc<dyn Source>],
    membership: &Membership,
    pass: Pass,
) -> bool {
    // A take-over reads only the builds of replicas not known to be alive (and unlabelled
    // ones): listing every live replica's builds with their secrets each time would cost the
    // API server and kiln's memory in proportion to all builds running.
    let live = match pass {
        Pass::TakeOver => membership.view().live(),
        Pass::Start => None,
    };
    let Some(shared) = launcher.executor.shared() else {
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
    // Whose builds are whose as the Leases said when the listing was back.
    let view = membership.view();
    let mut candidates = Vec::new();
    for found in found {
        if launcher.table.follows(&found.name) {
            continue;
        }
        let owner = view.owner(found.replica.as_deref());
        match (owner, pass) {
            (Owner::Live, _) | (Owner::Mine, Pass::TakeOver) => continue,
            (Owner::Mine, Pass::Start) | (Owner::Free, _) => {}
        }
        let configured = sources
            .iter()
            .any(|s| s.kind() == found.key.source && s.name() == found.key.runner);
        if !configured && !view.leading() {
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
    let view = &view;
    futures::stream::iter(candidates)
        .for_each_concurrent(parallel, |found| async move {
            if claim(shared, view, &found).await {
                adopt(launcher, limiter, sources, found).await;
            }
        })
        .await;
    true
}

/// Claims `found` for this replica when it must (see [`Found::needs_claim`]); whether this
/// replica follows it now.
async fn claim(shared: &dyn SharedBuilds, view: &View, found: &Found) -> bool {
    // A build owned by another replica (or none) is claimed first: of replicas taking it at
    // once one wins, and the executor follows only builds labelled with this replica (also
    // when, without Leases, this one takes every build). One of its own whose pod still names
    // the replica it came from (a claim stopped half way) is brought in line.
    let needs_claim = view.identity().is_some_and(|me| found.needs_claim(me));
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

async fn adopt(launcher: &Launcher, limiter: &Limiter, sources: &[Arc<dyn Source>], found: Found) {
    let Some(source) = sources
        .iter()
        .find(|s| s.kind() == found.key.source && s.name() == found.key.runner)
    else {
        tracing::warn!(build = %found.key, name = %found.name, "a build of a source that is no longer configured; removing it");
        launcher.executor.delete(&found.name).await;
        return;
    };
    let adoption = source.adopt(&found).await;
    let start = match adoption {
        Adoption::Discard(reason) => {
            tracing::info!(build = %found.key, name = %found.name, %reason, "removing a build of an earlier run");
            launcher.executor.delete(&found.name).await;
            return;
        }
        Adoption::Follow(about) if found.exists => Start {
            key: found.key.clone(),
            name: found.name.clone(),
            about,
            launch: None,
            placed: None,
        },
        Adoption::Follow(_) => {
            // Nothing runs it and the source cannot say how to start it again.
            tracing::warn!(build = %found.key, name = %found.name, "only the secrets of this build are left; removing them");
            launcher.executor.delete(&found.name).await;
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
    launcher.spawn(Arc::clone(source), slot, start);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::replicas::Replicas;
    use crate::coordinator::replicas::tests::sharing;

    const RENEW: Duration = Duration::from_secs(5);

    #[test]
    fn the_only_replica_looks_again_only_when_its_start_up_could_not_list() {
        let alone = Replicas::new(None, Default::default()).membership().view();
        let clear = Backlog::after(true, &alone);
        assert_eq!(clear, Backlog::Clear);
        assert!(!clear.worth_a_look(&alone));
        assert_eq!(clear.next_look(RENEW), SAFETY_SCAN);
        let unsorted = Backlog::after(false, &alone);
        assert_eq!(unsorted, Backlog::Unsorted);
        assert!(unsorted.worth_a_look(&alone));
        assert_eq!(unsorted.next_look(RENEW), RENEW);
    }

    #[tokio::test(start_paused = true)]
    async fn replicas_look_once_whose_builds_are_whose_is_known() {
        let replicas = sharing(&Arc::default(), "a", Default::default());
        let unknown = replicas.membership().view();
        assert_eq!(
            Backlog::after(true, &unknown),
            Backlog::Unsorted,
            "a start-up before the Leases were read took only its own builds"
        );
        assert!(!Backlog::Unsorted.worth_a_look(&unknown));
        assert!(!Backlog::Clear.worth_a_look(&unknown));
        replicas.round().await;
        let known = replicas.membership().view();
        assert_eq!(Backlog::after(true, &known), Backlog::Clear);
        assert_eq!(Backlog::after(false, &known), Backlog::Unsorted);
        assert!(Backlog::Clear.worth_a_look(&known));
        assert!(Backlog::Unsorted.worth_a_look(&known));
    }
}
