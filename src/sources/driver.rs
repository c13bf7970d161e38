//! The one loop shape of a queue-driven source (Jenkins, GitHub): news from the coordinator
//! and webhooks comes through an [`Inbox`]; a look at the CI server is due on the source's
//! [`Pacer`] (every interval, later while backing off after errors, early when a webhook asks);
//! every look's outcome goes to the source's [`HealthTracker`]. The source says what a look,
//! a piece of news and the end of a turn do ([`QueueDriven`]).

use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::health::HealthTracker;
use super::pacer::Pacer;

/// What a look did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Looked {
    /// It talked to the CI server, successfully.
    Talked,
    /// It was not this replica's to take (another one leads): nothing to record.
    Skipped,
}

/// A source driven by [`drive`].
pub(super) trait QueueDriven: Send + Sync + 'static {
    /// What the loop keeps between turns.
    type State: Send;
    /// News for the loop.
    type Event: Send;
    /// Why a look failed.
    type Error: std::error::Error + Send;

    /// The CI server's kind, for logs (`Jenkins`, `GitHub`).
    const KIND: &'static str;

    /// The entry's name, for logs.
    fn entry(&self) -> &str;

    /// Where the outcome of each look goes.
    fn tracker(&self) -> &HealthTracker;

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
    fn take(&self) -> Option<mpsc::UnboundedReceiver<E>> {
        self.receiver
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

/// Runs `source`'s loop from `state` until `shutdown`: news from `inbox`, looks on `pacer`,
/// early looks when `wake` is notified (a webhook).
pub(crate) async fn drive<S: QueueDriven>(
    source: &S,
    mut state: S::State,
    inbox: &Inbox<S::Event>,
    mut pacer: Pacer,
    wake: Option<Arc<Notify>>,
    shutdown: CancellationToken,
) {
    let Some(mut inbox) = inbox.take() else {
        return;
    };
    let mut look_now = true;
    loop {
        while let Ok(event) = inbox.try_recv() {
            look_now |= source.handle(&mut state, event).await;
        }
        if look_now || Instant::now() >= pacer.next() {
            look_now = false;
            match source.look(&mut state).await {
                Ok(Looked::Talked) => {
                    source.tracker().succeeded();
                    pacer.succeeded();
                }
                Ok(Looked::Skipped) => pacer.skipped(),
                Err(e) => {
                    let wait = pacer.failed();
                    let error = crate::net::error_chain(&e);
                    tracing::warn!(source = %source.entry(), error = %error, "looking at {} failed; retrying in {}s", S::KIND, wait.as_secs());
                    source.tracker().failed(error);
                }
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
                        tracing::debug!(source = %source.entry(), "woken by webhook");
                        break;
                    }
                    tracing::debug!(source = %source.entry(), "webhook folded into the next scheduled look");
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
