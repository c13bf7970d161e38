//! The coordinator as one source sees it: the [`Chain`] a source's loop is given, over the
//! limiter, the launcher and this replica's membership.

use std::sync::Arc;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use super::launch::{Launcher, Start};
use super::limiter::Limiter;
use super::replicas::Membership;
use super::warm::Placement;
use crate::build::{About, Build, Workload};
use crate::sources::{Chain, MemberState, Slot, Source, WarmFloor};

/// The chain of one source.
pub(crate) struct SourceChain {
    pub(crate) source: Arc<dyn Source>,
    pub(crate) launcher: Launcher,
    pub(crate) limiter: Limiter,
    pub(crate) shutdown: CancellationToken,
    pub(crate) membership: Membership,
}

impl SourceChain {
    /// Where `build` starts (`None`: not a build the warm pools place).
    async fn place(&self, build: &Build) -> Option<Placement> {
        self.launcher
            .pools
            .place(
                &*self.launcher.executor,
                self.source.kind(),
                self.source.name(),
                build,
            )
            .await
    }
}

impl Chain for SourceChain {
    fn leading(&self) -> bool {
        self.membership.leading()
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
                () = self.launcher.executor.ready() => {}
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
            // A build that fits an idle warm pod is handed to it: that take is its persist.
            let placement = self.place(build).await;
            if let Some(Placement::Warm { .. }) = placement {
            } else if let Some(shared) = self.launcher.executor.shared() {
                let persisted = match &placement {
                    Some(placement) => shared.persist(&placement.apply(build.clone())).await,
                    None => shared.persist(build).await,
                };
                if let Err(e) = persisted {
                    tracing::warn!(build = %build.key, name = %build.name, error = %e, "cannot write the build down before its work is acknowledged; the launch tries again");
                }
            }
            if let Some(placement) = placement {
                self.launcher.pools.remember(&build.name, placement);
            }
        })
    }

    fn launch(&self, slot: Slot, build: Build) {
        let source = Arc::clone(&self.source);
        if let Some(placement) = self.launcher.pools.recall(&build.name) {
            self.launcher
                .spawn(source, Some(slot), Start::placed(build, placement));
            return;
        }
        if !matches!(build.workload, Workload::KilnAgent { .. }) {
            self.launcher
                .spawn(source, Some(slot), Start::launch(build));
            return;
        }
        // Not persisted through this chain: placed now.
        let launcher = self.launcher.clone();
        let (kind, name) = (self.source.kind(), self.source.name().to_owned());
        self.launcher.tracker.spawn(async move {
            let placement = launcher
                .pools
                .place(&*launcher.executor, kind, &name, &build)
                .await;
            let start = match placement {
                Some(placement) => Start::placed(build, placement),
                None => Start::launch(build),
            };
            launcher.spawn(source, Some(slot), start);
        });
    }

    fn stop(&self, name: &str) -> BoxFuture<'_, ()> {
        // A withdrawn build that took a warm pod is that pod now.
        let name = match self.launcher.pools.recall(name) {
            Some(Placement::Warm { pod, .. }) => pod,
            _ => name.to_owned(),
        };
        Box::pin(async move { self.launcher.executor.delete(&name).await })
    }

    fn explain(&self, name: &str) -> BoxFuture<'_, String> {
        let name = name.to_owned();
        Box::pin(async move { self.launcher.executor.explain(&name).await })
    }

    fn describe<'a>(&'a self, name: &'a str, about: About) -> BoxFuture<'a, ()> {
        // A short job's news can come after its runner ended: its record in the history is
        // described then (the cost counted at its end keeps the project known then).
        if !self.launcher.table.describe(name, &about) {
            self.launcher.history.describe(name, &about);
        }
        Box::pin(async {})
    }

    fn warm_floors(&self) -> Vec<WarmFloor> {
        self.launcher
            .pools
            .floors(self.source.kind(), self.source.name())
    }

    fn warm_member(&self, name: &str, pool: &str, state: MemberState) {
        self.launcher.pools.member(name, pool, state);
    }

    fn exists(&self, name: &str) -> BoxFuture<'_, bool> {
        let name = name.to_owned();
        Box::pin(async move {
            if self.launcher.table.follows(&name) {
                return true;
            }
            match self.launcher.executor.shared() {
                Some(shared) => shared.exists(&name).await,
                None => false,
            }
        })
    }
}
