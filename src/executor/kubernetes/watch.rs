//! One watch over all of kiln's labelled pods, fanned out to the build that waits on each pod.
//! `kube::runtime::watcher` does the listing, re-listing on `410 Gone` and backoff.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The latest word on one pod.
#[derive(Debug, Clone, Default)]
pub(crate) enum PodSeen {
    /// Not seen yet (just created, or the watch has not caught up).
    #[default]
    Unknown,
    /// Its current state.
    Present(Arc<Pod>),
    /// Deleted; the last state if known.
    Gone(Option<Arc<Pod>>),
}

type Registry = Arc<Mutex<HashMap<String, watch::Sender<PodSeen>>>>;

/// Fans the watch out by pod name.
#[derive(Clone)]
pub(crate) struct PodWatch {
    registry: Registry,
}

/// A build's view of its pod; unsubscribes when dropped.
pub(crate) struct Subscription {
    name: String,
    registry: Registry,
    /// Changes to the pod.
    pub(crate) changes: watch::Receiver<PodSeen>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.name);
    }
}

impl PodWatch {
    /// Starts watching the pods `api` lists with `selector` until `shutdown`.
    pub(crate) fn start(api: Api<Pod>, selector: String, shutdown: CancellationToken) -> Self {
        let registry: Registry = Arc::default();
        let fan_out = Arc::clone(&registry);
        tokio::spawn(async move {
            let config = watcher::Config::default().labels(&selector);
            let mut events = watcher(api, config).default_backoff().boxed();
            let mut listed: HashSet<String> = HashSet::new();
            loop {
                let event = tokio::select! {
                    event = events.next() => event,
                    () = shutdown.cancelled() => break,
                };
                let Some(event) = event else { break };
                match event {
                    Ok(watcher::Event::Init) => listed.clear(),
                    Ok(watcher::Event::InitApply(pod) | watcher::Event::Apply(pod)) => {
                        let pod = slim(pod);
                        let name = pod.metadata.name.clone().unwrap_or_default();
                        listed.insert(name.clone());
                        send(&fan_out, &name, PodSeen::Present(Arc::new(pod)));
                    }
                    Ok(watcher::Event::InitDone) => {
                        // Pods deleted while the watch was down never get a DELETED event: a
                        // build whose pod was seen before and is missing from the new list lost
                        // it. (Pods not seen yet may simply be newer than the list.)
                        let registry = fan_out.lock().unwrap_or_else(|e| e.into_inner());
                        for (name, sender) in registry.iter() {
                            let was_present = matches!(*sender.borrow(), PodSeen::Present(_));
                            if was_present && !listed.contains(name) {
                                let last = match &*sender.borrow() {
                                    PodSeen::Present(pod) => Some(Arc::clone(pod)),
                                    _ => None,
                                };
                                sender.send_replace(PodSeen::Gone(last));
                            }
                        }
                        drop(registry);
                        listed.clear();
                    }
                    Ok(watcher::Event::Delete(pod)) => {
                        let pod = slim(pod);
                        let name = pod.metadata.name.clone().unwrap_or_default();
                        send(&fan_out, &name, PodSeen::Gone(Some(Arc::new(pod))));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "watching build pods failed; retrying with backoff");
                    }
                }
            }
        });
        Self { registry }
    }

    /// Follows pod `name`. Subscribe before creating the pod so no change is missed.
    pub(crate) fn subscribe(&self, name: &str) -> Subscription {
        let (tx, rx) = watch::channel(PodSeen::Unknown);
        self.registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_owned(), tx);
        Subscription {
            name: name.to_owned(),
            registry: Arc::clone(&self.registry),
            changes: rx,
        }
    }
}

fn send(registry: &Registry, name: &str, seen: PodSeen) {
    if let Some(sender) = registry.lock().unwrap_or_else(|e| e.into_inner()).get(name) {
        sender.send_replace(seen);
    }
}

/// Drops what kiln never reads, to keep memory flat with many pods.
fn slim(mut pod: Pod) -> Pod {
    pod.metadata.managed_fields = None;
    if let Some(annotations) = pod.metadata.annotations.as_mut() {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
    pod
}
