//! One watch over all of kiln's labelled pods, fanned out to whoever follows each pod.
//! `kube::runtime::watcher` does the listing, re-listing on `410 Gone` and backoff.
//!
//! The latest state of every pod is kept, so a build followed after its pod was listed (an
//! adopted build, or one that ended while no coordinator ran) sees that state at once instead
//! of waiting for the pod's next change.

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

/// Untaken warm pods that went away (deleted under kiln, or while the watch was down), with
/// their last state: the pools are told once, as broken, until they forget them.
type Vanished = Arc<Mutex<HashMap<String, Arc<Pod>>>>;

/// Fans the watch out by pod name.
#[derive(Clone)]
pub(crate) struct PodWatch {
    registry: Registry,
    vanished: Vanished,
    /// Whether the first list is in: from then on the registry holds every pod there is.
    synced: watch::Receiver<bool>,
}

/// A build's view of its pod.
pub(crate) struct Subscription {
    name: String,
    registry: Registry,
    /// Changes to the pod.
    pub(crate) changes: watch::Receiver<PodSeen>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        // A pod that still exists stays known (the watch keeps it current); one that is gone
        // or was never seen is forgotten with its last follower.
        let forget = registry.get(&self.name).is_some_and(|sender| {
            sender.receiver_count() <= 1 && !matches!(*sender.borrow(), PodSeen::Present(_))
        });
        if forget {
            registry.remove(&self.name);
        }
    }
}

impl PodWatch {
    /// Starts watching the pods `api` lists with `selector` until `shutdown`.
    pub(crate) fn start(api: Api<Pod>, selector: String, shutdown: CancellationToken) -> Self {
        let registry: Registry = Arc::default();
        let fan_out = Arc::clone(&registry);
        let vanished: Vanished = Arc::default();
        let gone_warm = Arc::clone(&vanished);
        let (synced_tx, synced) = watch::channel(false);
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
                        update(&fan_out, &name, PodSeen::Present(Arc::new(pod)));
                    }
                    Ok(watcher::Event::InitDone) => {
                        // Pods deleted while the watch was down never get a DELETED event: a
                        // pod seen before and missing from the new list is gone. (Pods not
                        // seen yet may simply be newer than the list.)
                        let mut registry = fan_out.lock().unwrap_or_else(|e| e.into_inner());
                        registry.retain(|name, sender| {
                            let last = match &*sender.borrow() {
                                PodSeen::Present(pod) if !listed.contains(name) => {
                                    Some(Arc::clone(pod))
                                }
                                _ => None,
                            };
                            match last {
                                Some(last) => {
                                    note_vanished(&gone_warm, name, &last);
                                    sender.send_replace(PodSeen::Gone(Some(last)));
                                    sender.receiver_count() > 0
                                }
                                None => true,
                            }
                        });
                        drop(registry);
                        listed.clear();
                        synced_tx.send_replace(true);
                    }
                    Ok(watcher::Event::Delete(pod)) => {
                        let pod = Arc::new(slim(pod));
                        let name = pod.metadata.name.clone().unwrap_or_default();
                        note_vanished(&gone_warm, &name, &pod);
                        update(&fan_out, &name, PodSeen::Gone(Some(pod)));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "watching build pods failed; retrying with backoff");
                    }
                }
            }
        });
        Self {
            registry,
            vanished,
            synced,
        }
    }

    /// Follows pod `name`: the subscription starts from the latest state known of it.
    pub(crate) fn subscribe(&self, name: &str) -> Subscription {
        let mut registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        let sender = registry
            .entry(name.to_owned())
            .or_insert_with(|| watch::channel(PodSeen::Unknown).0);
        let mut changes = sender.subscribe();
        // The state known now counts as news to the new follower.
        changes.mark_changed();
        Subscription {
            name: name.to_owned(),
            registry: Arc::clone(&self.registry),
            changes,
        }
    }

    /// Records a pod read by other means (a list at start-up) unless the watch knows it
    /// better already.
    pub(crate) fn seed(&self, pod: Pod) {
        let Some(name) = pod.metadata.name.clone() else {
            return;
        };
        let mut registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        let sender = registry
            .entry(name)
            .or_insert_with(|| watch::channel(PodSeen::Unknown).0);
        if matches!(*sender.borrow(), PodSeen::Unknown) {
            sender.send_replace(PodSeen::Present(Arc::new(slim(pod))));
        }
    }
}

impl PodWatch {
    /// Records a pod as kiln itself just wrote it (a claim's patch), unless the watch knows a
    /// newer state of it already.
    pub(crate) fn written(&self, pod: Pod) {
        let Some(name) = pod.metadata.name.clone() else {
            return;
        };
        let version = |pod: &Pod| {
            pod.metadata
                .resource_version
                .as_deref()
                .and_then(|v| v.parse::<u64>().ok())
        };
        let mut registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        let sender = registry
            .entry(name)
            .or_insert_with(|| watch::channel(PodSeen::Unknown).0);
        let newer_known = match &*sender.borrow() {
            PodSeen::Present(known) => matches!(
                (version(known), version(&pod)),
                (Some(known), Some(written)) if known > written
            ),
            PodSeen::Gone(_) => true,
            PodSeen::Unknown => false,
        };
        if !newer_known {
            sender.send_replace(PodSeen::Present(Arc::new(slim(pod))));
        }
    }
}

impl PodWatch {
    /// Waits until the watch has listed every pod once, at most `timeout`: whether it has.
    pub(crate) async fn wait_synced(&self, timeout: std::time::Duration) -> bool {
        let mut synced = self.synced.clone();
        tokio::time::timeout(timeout, synced.wait_for(|s| *s))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The latest state of every pod there is that `select` picks.
    pub(crate) fn present(&self, select: impl Fn(&Pod) -> bool) -> Vec<Arc<Pod>> {
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        registry
            .values()
            .filter_map(|sender| match &*sender.borrow() {
                PodSeen::Present(pod) if select(pod) => Some(Arc::clone(pod)),
                _ => None,
            })
            .collect()
    }

    /// The latest state of pod `name`, if it is there.
    pub(crate) fn latest(&self, name: &str) -> Option<Arc<Pod>> {
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        match &*registry.get(name)?.borrow() {
            PodSeen::Present(pod) => Some(Arc::clone(pod)),
            _ => None,
        }
    }

    /// The untaken warm pods that went away, with their last state.
    pub(crate) fn vanished(&self) -> Vec<(String, Arc<Pod>)> {
        let vanished = self.vanished.lock().unwrap_or_else(|e| e.into_inner());
        vanished
            .iter()
            .map(|(name, pod)| (name.clone(), Arc::clone(pod)))
            .collect()
    }

    /// Forgets a vanished warm pod (its pool retired it).
    pub(crate) fn forget_vanished(&self, name: &str) {
        let mut vanished = self.vanished.lock().unwrap_or_else(|e| e.into_inner());
        vanished.remove(name);
    }
}

/// Remembers `pod` if it was an untaken warm pod.
fn note_vanished(vanished: &Vanished, name: &str, pod: &Arc<Pod>) {
    if super::labels::is_untaken_warm(&pod.metadata) {
        let mut vanished = vanished.lock().unwrap_or_else(|e| e.into_inner());
        vanished.insert(name.to_owned(), Arc::clone(pod));
    }
}

/// Sets the latest state of `name`; a pod gone with nobody following it is forgotten.
fn update(registry: &Registry, name: &str, seen: PodSeen) {
    let mut registry = registry.lock().unwrap_or_else(|e| e.into_inner());
    let gone = matches!(seen, PodSeen::Gone(_));
    match registry.get(name) {
        Some(sender) => {
            sender.send_replace(seen);
            if gone && sender.receiver_count() == 0 {
                registry.remove(name);
            }
        }
        None if !gone => {
            registry.insert(name.to_owned(), watch::channel(seen).0);
        }
        None => {}
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
