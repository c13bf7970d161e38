//! Keeps each source's loop running: a loop that panics (a bug meeting input nobody foresaw) is
//! restarted after a backoff instead of leaving its source silently dead — and until it runs
//! again `/readyz` says so, with the panic, and the status page shows how often it happened.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use tokio_util::sync::CancellationToken;

use crate::sources::{Chain, Health, Source, panic_message};

/// The first wait before a panicked loop is restarted; it doubles with each panic in a row.
const FIRST_RESTART: Duration = Duration::from_secs(1);
/// The longest wait before a restart.
const MAX_RESTART: Duration = Duration::from_secs(60);
/// A loop that ran this long since its last restart is healthy again: the next panic waits
/// [`FIRST_RESTART`].
const HEALTHY_AFTER: Duration = Duration::from_secs(300);

/// What went wrong with one source's loop.
#[derive(Debug, Clone, Default)]
struct Crash {
    /// Panics since the coordinator started.
    count: u32,
    /// The last panic's message.
    last: String,
    /// Whether the loop is down now (waiting to be restarted).
    down: bool,
}

/// The crashes of every source's loop, by the source's position in the coordinator's list.
#[derive(Debug, Default)]
pub(crate) struct Crashes {
    sources: Mutex<Vec<Crash>>,
}

impl Crashes {
    pub(crate) fn new(sources: usize) -> Self {
        Self {
            sources: Mutex::new(vec![Crash::default(); sources]),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Crash>> {
        self.sources.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, index: usize, message: String) -> u32 {
        let mut sources = self.lock();
        let Some(crash) = sources.get_mut(index) else {
            return 0;
        };
        crash.count += 1;
        crash.last = message;
        crash.down = true;
        crash.count
    }

    fn restarted(&self, index: usize) {
        if let Some(crash) = self.lock().get_mut(index) {
            crash.down = false;
        }
    }

    /// `health` of source `index`, with what its loop's panics add: not ready while the loop is
    /// down, and the last panic as the last error.
    pub(crate) fn overlay(&self, index: usize, mut health: Health) -> Health {
        let sources = self.lock();
        let Some(crash) = sources.get(index).filter(|c| c.count > 0) else {
            return health;
        };
        let said = format!(
            "its loop panicked {} time(s), last: {}",
            crash.count, crash.last
        );
        if crash.down {
            health.ready = false;
            health.state = "restarting after a panic".to_owned();
            health.last_error = Some(said);
        } else if health.last_error.is_none() {
            health.last_error = Some(format!("{said} (restarted)"));
        }
        health
    }

    /// Whether any source's loop is down now.
    pub(crate) fn any_down(&self) -> bool {
        self.lock().iter().any(|c| c.down)
    }
}

/// Runs `source` (the `index`th) until `shutdown`, restarting its loop whenever it panics.
pub(crate) async fn supervise(
    index: usize,
    source: Arc<dyn Source>,
    chain: Arc<dyn Chain>,
    crashes: Arc<Crashes>,
    shutdown: CancellationToken,
) {
    let mut wait = FIRST_RESTART;
    loop {
        let started = tokio::time::Instant::now();
        let run = Arc::clone(&source).run(Arc::clone(&chain), shutdown.clone());
        let Err(panic) = std::panic::AssertUnwindSafe(run).catch_unwind().await else {
            return;
        };
        let message = panic_message(panic.as_ref());
        let count = crashes.record(index, message.clone());
        if started.elapsed() >= HEALTHY_AFTER {
            wait = FIRST_RESTART;
        }
        tracing::error!(
            source = %format!("{}/{}", source.kind().name(), source.name()),
            panic = %message,
            count,
            "a source's loop panicked; restarting it in {}s",
            wait.as_secs()
        );
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shutdown.cancelled() => return,
        }
        wait = (wait * 2).min(MAX_RESTART);
        crashes.restarted(index);
    }
}
