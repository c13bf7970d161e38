//! Capacity: at most `concurrent` jobs at once overall and `limit` per source. A job holds a
//! [`Permit`] from before its request is sent until its build ends.
//!
//! A source is its kind and its name together: names are unique per kind only, so a GitHub
//! organization `acme` and a Jenkins entry `acme` each have their own limit.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::build::SourceKind;

/// Which source a limit belongs to.
type SourceId = (SourceKind, String);

/// Shared capacity of one coordinator.
#[derive(Debug, Clone)]
pub struct Limiter {
    global: Arc<Semaphore>,
    per_source: Arc<Mutex<HashMap<SourceId, Arc<Semaphore>>>>,
    concurrent: usize,
}

/// One slot of capacity; released when dropped.
#[derive(Debug)]
pub struct Permit {
    _runner: Option<OwnedSemaphorePermit>,
    _global: OwnedSemaphorePermit,
}

impl Limiter {
    /// A limiter for `concurrent` jobs.
    pub fn new(concurrent: usize) -> Self {
        Self {
            // Validation caps `concurrent` far below this; the clamp only keeps a config that
            // skipped validation from panicking the semaphore.
            global: Arc::new(Semaphore::new(concurrent.min(Semaphore::MAX_PERMITS))),
            per_source: Arc::default(),
            concurrent,
        }
    }

    /// Waits for a slot for source `name` of `kind`, whose own `limit` is 0 for none.
    pub async fn acquire(&self, kind: SourceKind, name: &str, limit: usize) -> Permit {
        let runner_permit = match self.source_semaphore(kind, name, limit) {
            // The semaphores are never closed, so acquiring cannot fail.
            Some(semaphore) => semaphore.acquire_owned().await.ok(),
            None => None,
        };
        let global = loop {
            if let Ok(permit) = Arc::clone(&self.global).acquire_owned().await {
                break permit;
            }
        };
        Permit {
            _runner: runner_permit,
            _global: global,
        }
    }

    /// A slot for source `name` of `kind` if one is free now (for sources that decide per
    /// tick, like Jenkins' provisioner); `None` otherwise.
    pub fn try_acquire(&self, kind: SourceKind, name: &str, limit: usize) -> Option<Permit> {
        let runner_permit = match self.source_semaphore(kind, name, limit) {
            Some(semaphore) => Some(semaphore.try_acquire_owned().ok()?),
            None => None,
        };
        let global = Arc::clone(&self.global).try_acquire_owned().ok()?;
        Some(Permit {
            _runner: runner_permit,
            _global: global,
        })
    }

    /// The semaphore of a source's own limit (`None` without one).
    fn source_semaphore(
        &self,
        kind: SourceKind,
        name: &str,
        limit: usize,
    ) -> Option<Arc<Semaphore>> {
        (limit > 0).then(|| {
            Arc::clone(
                self.per_source
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry((kind, name.to_owned()))
                    .or_insert_with(|| Arc::new(Semaphore::new(limit.min(Semaphore::MAX_PERMITS)))),
            )
        })
    }

    /// Jobs that could start now.
    pub fn available(&self) -> usize {
        self.global.available_permits()
    }

    /// The configured `concurrent`.
    pub fn capacity(&self) -> usize {
        self.concurrent
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const GITLAB: SourceKind = SourceKind::GitLab;

    #[tokio::test(start_paused = true)]
    async fn global_and_runner_limits_hold() {
        let limiter = Limiter::new(3);
        let a = limiter.acquire(GITLAB, "a", 1).await;
        // Runner `a` is at its limit of 1 although 2 global slots are free.
        assert!(
            tokio::time::timeout(Duration::from_secs(1), limiter.acquire(GITLAB, "a", 1))
                .await
                .is_err()
        );
        let _b1 = limiter.acquire(GITLAB, "b", 0).await;
        let _b2 = limiter.acquire(GITLAB, "b", 0).await;
        assert_eq!(limiter.available(), 0);
        drop(a);
        let _a2 = tokio::time::timeout(Duration::from_secs(1), limiter.acquire(GITLAB, "a", 1))
            .await
            .unwrap();
    }

    /// Names are unique per kind only: a GitHub organization and a Jenkins entry both named
    /// `acme` have a limit each (they shared the first one's semaphore).
    #[test]
    fn sources_of_different_kinds_with_one_name_have_their_own_limit() {
        let limiter = Limiter::new(10);
        let _github = limiter
            .try_acquire(SourceKind::GitHub, "acme", 1)
            .expect("GitHub's one slot");
        assert!(limiter.try_acquire(SourceKind::GitHub, "acme", 1).is_none());
        let jenkins: Vec<Permit> = (0..5)
            .map(|i| {
                limiter
                    .try_acquire(SourceKind::Jenkins, "acme", 5)
                    .unwrap_or_else(|| panic!("Jenkins' slot {i} of 5"))
            })
            .collect();
        assert_eq!(jenkins.len(), 5);
        assert!(
            limiter
                .try_acquire(SourceKind::Jenkins, "acme", 5)
                .is_none()
        );
    }
}
