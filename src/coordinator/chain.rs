//! The coordinator as one source sees it: the [`Chain`] a source's loop is given, over the
//! limiter, the launcher and this replica's membership.

use std::sync::Arc;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use super::launch::{Launcher, Start};
use super::limiter::Limiter;
use super::replicas::Membership;
use crate::build::{About, Build};
use crate::sources::{Chain, Slot, Source};

/// The chain of one source.
pub(crate) struct SourceChain {
    pub(crate) source: Arc<dyn Source>,
    pub(crate) launcher: Launcher,
    pub(crate) limiter: Limiter,
    pub(crate) shutdown: CancellationToken,
    pub(crate) membership: Membership,
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
            if let Some(shared) = self.launcher.executor.shared()
                && let Err(e) = shared.persist(build).await
            {
                tracing::warn!(build = %build.key, name = %build.name, error = %e, "cannot write the build down before its work is acknowledged; the launch tries again");
            }
        })
    }

    fn launch(&self, slot: Slot, build: Build) {
        self.launcher
            .spawn(Arc::clone(&self.source), Some(slot), Start::launch(build));
    }

    fn stop(&self, name: &str) -> BoxFuture<'_, ()> {
        let name = name.to_owned();
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
