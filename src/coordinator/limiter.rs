//! Capacity: at most `concurrent` jobs at once overall and `limit` per runner. A job holds a
//! [`Permit`] from before its request is sent until its build ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Shared capacity of one coordinator.
#[derive(Debug, Clone)]
pub struct Limiter {
    global: Arc<Semaphore>,
    per_runner: Arc<Mutex<HashMap<String, Arc<Semaphore>>>>,
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
            per_runner: Arc::default(),
            concurrent,
        }
    }

    /// Waits for a slot for `runner`, whose own `limit` is 0 for none.
    pub async fn acquire(&self, runner: &str, limit: usize) -> Permit {
        let runner_permit = match self.runner_semaphore(runner, limit) {
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

    /// A slot for `runner` if one is free now (for sources that decide per tick, like
    /// Jenkins' provisioner); `None` otherwise.
    pub fn try_acquire(&self, runner: &str, limit: usize) -> Option<Permit> {
        let runner_permit = match self.runner_semaphore(runner, limit) {
            Some(semaphore) => Some(semaphore.try_acquire_owned().ok()?),
            None => None,
        };
        let global = Arc::clone(&self.global).try_acquire_owned().ok()?;
        Some(Permit {
            _runner: runner_permit,
            _global: global,
        })
    }

    /// The semaphore of `runner`'s own limit (`None` without one).
    fn runner_semaphore(&self, runner: &str, limit: usize) -> Option<Arc<Semaphore>> {
        (limit > 0).then(|| {
            Arc::clone(
                self.per_runner
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(runner.to_owned())
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

    #[tokio::test(start_paused = true)]
    async fn global_and_runner_limits_hold() {
        let limiter = Limiter::new(3);
        let a = limiter.acquire("a", 1).await;
        // Runner `a` is at its limit of 1 although 2 global slots are free.
        assert!(
            tokio::time::timeout(Duration::from_secs(1), limiter.acquire("a", 1))
                .await
                .is_err()
        );
        let _b1 = limiter.acquire("b", 0).await;
        let _b2 = limiter.acquire("b", 0).await;
        assert_eq!(limiter.available(), 0);
        drop(a);
        let _a2 = tokio::time::timeout(Duration::from_secs(1), limiter.acquire("a", 1))
            .await
            .unwrap();
    }
}
