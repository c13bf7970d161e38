//! The one shape of a queue-driven source (Jenkins, GitHub): news from the coordinator and
//! webhooks comes through an [`Inbox`]; a look at the CI server is due on the source's
//! [`Pacer`] (every interval, later while backing off after errors, early when a webhook asks);
//! every look's outcome goes to the source's [`HealthTracker`]. The source says what a look,
//! a piece of news and the end of a turn do ([`QueueDriven`]); being a [`Source`] follows.

use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::health::HealthTracker;
use super::pacer::Pacer;
use super::{Adoption, Chain, Health, Source};
use crate::build::{BuildKey, Ending, Found, SourceKind};

/// What a look did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Looked {
    /// It talked to the CI server, successfully.
    Talked,
    /// It was not this replica's to take (another one leads): nothing to record.
    Skipped,
}

/// A source driven by [`drive`]: what it does at each step of the loop.
pub(super) trait QueueDriven: Send + Sync + 'static {
    /// What the loop keeps between turns.
    type State: Send;
    /// News for the loop.
    type Event: Send;
    /// Why a look failed.
    type Error: std::error::Error + Send;

    /// What every such source has.
    fn core(&self) -> &QueueCore<Self::Event>;

    /// The loop's first state, its schedule, and what wakes it early (a webhook), when it
    /// starts with `chain`.
    fn start(&self, chain: Arc<dyn Chain>) -> (Self::State, Pacer, Option<Arc<Notify>>);

    /// What to do with a build of this source found at start-up (news of one to follow goes
    /// to the inbox).
    fn adopt_found(&self, found: &Found) -> Adoption;

    /// The news that build `name` ended.
    fn ended_event(name: &str, ending: &Ending) -> Self::Event;

    /// One look at the CI server.
    fn look<'a>(
        &'a self,
        state: &'a mut Self::State,
    ) -> impl Future<Output = Result<Looked, Self::Error>> + Send + 'a;

    /// Takes one piece of news; true when it calls for a look at once.
    fn handle<'a>(
        &'a self,
        state: &'a mut Self::State,
        event: Self::Event,
    ) -> impl Future<Output = bool> + Send + 'a;

    /// Ends a turn, looked or not (starts what the state now calls for, updates gauges).
    fn settle<'a>(&'a self, state: &'a mut Self::State) -> impl Future<Output = ()> + Send + 'a;

    /// Kiln shuts down; the loop ends after this.
    fn stopped(&self, state: &Self::State);
}

/// What every queue-driven source has: its name, limit, inbox and health.
#[derive(Debug)]
pub(super) struct QueueCore<E> {
    /// The CI server's kind.
    kind: SourceKind,
    /// The entry's name (unique per kind).
    pub(super) name: String,
    /// Builds it may run at once besides `concurrent` (0: no own limit).
    limit: usize,
    /// Where news for the loop goes.
    pub(super) inbox: Inbox<E>,
    /// Where the outcome of each look goes.
    pub(super) health: HealthTracker,
}

impl<E> QueueCore<E> {
    pub(super) fn new(kind: SourceKind, name: String, limit: usize, health: HealthTracker) -> Self {
        Self {
            kind,
            name,
            limit,
            inbox: Inbox::new(),
            health,
        }
    }
}

/// The channel news comes through: sent to from anywhere, received by the one loop.
#[derive(Debug)]
pub(crate) struct Inbox<E> {
    sender: mpsc::UnboundedSender<E>,
    receiver: Mutex<Option<mpsc::UnboundedReceiver<E>>>,
}

impl<E> Inbox<E> {
    pub(crate) fn new() -> Self {
        let (sender, receiver) = mpsc::unbounded_channel();
        Self {
            sender,
            receiver: Mutex::new(Some(receiver)),
        }
    }

    /// Sends news to the loop (dropped once the loop ended: nobody needs it then).
    pub(crate) fn send(&self, event: E) {
        let _ = self.sender.send(event);
    }

    /// The receiving end, for the one loop that runs (`None` when it was taken already).
    pub(super) fn take(&self) -> Option<mpsc::UnboundedReceiver<E>> {
        self.receiver
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

impl<S: QueueDriven> Source for S {
    fn kind(&self) -> SourceKind {
        self.core().kind
    }

    fn name(&self) -> &str {
        &self.core().name
    }

    fn limit(&self) -> usize {
        self.core().limit
    }

    fn run(
        self: Arc<Self>,
        chain: Arc<dyn Chain>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, ()> {
        Box::pin(async move { drive(&*self, chain, shutdown).await })
    }

    fn adopt<'a>(&'a self, found: &'a Found) -> BoxFuture<'a, Adoption> {
        let adoption = self.adopt_found(found);
        Box::pin(async move { adoption })
    }

    fn ended<'a>(
        &'a self,
        _key: &'a BuildKey,
        name: &'a str,
        ending: &'a Ending,
    ) -> BoxFuture<'a, ()> {
        self.core().inbox.send(S::ended_event(name, ending));
        Box::pin(async {})
    }

    fn health(&self) -> Health {
        self.core().health.health()
    }
}

/// Runs `source`'s loop until `shutdown`: news from its inbox, looks on its pacer, early
/// looks when a webhook wakes it.
async fn drive<S: QueueDriven>(source: &S, chain: Arc<dyn Chain>, shutdown: CancellationToken) {
    let core = source.core();
    let Some(mut inbox) = core.inbox.take() else {
        return;
    };
    let (mut state, mut pacer, wake) = source.start(chain);
    let mut look_now = true;
    loop {
        while let Ok(event) = inbox.try_recv() {
            look_now |= source.handle(&mut state, event).await;
        }
        if look_now || Instant::now() >= pacer.next() {
            look_now = false;
            match source.look(&mut state).await {
                Ok(Looked::Talked) => {
                    core.health.succeeded();
                    pacer.succeeded();
                }
                Ok(Looked::Skipped) => pacer.skipped(),
                Err(e) => {
                    let wait = pacer.failed();
                    let error = crate::net::error_chain(&e);
                    tracing::warn!(source = %core.name, kind = core.kind.name(), error = %error, "looking at the CI server failed; retrying in {}s", wait.as_secs());
                    core.health.failed(error);
                }
            }
            // News that came while looking is newer than what the look saw: taken before the
            // turn acts, so a listing never undoes it (a job taken while it was listed queued).
            while let Ok(event) = inbox.try_recv() {
                look_now |= source.handle(&mut state, event).await;
            }
        }
        source.settle(&mut state).await;
        // Until the next look: a webhook may bring it forward (see Pacer), news is taken at
        // once.
        loop {
            let woken = async {
                match &wake {
                    Some(wake) => wake.notified().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = tokio::time::sleep_until(pacer.next()) => break,
                () = woken => {
                    if pacer.wake() {
                        tracing::debug!(source = %core.name, "woken by webhook");
                        break;
                    }
                    tracing::debug!(source = %core.name, "webhook folded into the next scheduled look");
                }
                Some(event) = inbox.recv() => {
                    look_now |= source.handle(&mut state, event).await;
                    break;
                }
                () = shutdown.cancelled() => {
                    source.stopped(&state);
                    return;
                }
            }
        }
    }
}
