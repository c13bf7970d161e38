//! A Kubernetes API test server (core v1 pods, secrets, events, and `coordination.k8s.io/v1`
//! leases, on 127.0.0.1) whose built-in kubelet runs pods as local processes.

// Tests script the kubelet (image pull failures, unschedulable pods, evictions, …). An image
// script says what the registry does; the container's `imagePullPolicy` says whether it is
// asked: `IfNotPresent` and `Never` use an image the node holds (unscripted images, ones
// pulled before, ones put there with `seed_node_image`), `Always` always pulls, and `Never`
// without the image is `ErrImageNeverPull`, as a real kubelet.
// Snapshots (`pods()`, `secrets()`, `events()`, [`Snapshot`]) are `k8s_openapi` types; the
// store itself keeps `serde_json::Value`s, exactly what was served.

mod api;
mod kubelet;
mod store;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, Pod, Secret};
use serde_json::{Value, json};

use kubelet::{Ctl, PodRt};
pub use kubelet::{ImageScript, PodMatch};
use store::{Res, Store};

/// The user every request is made as (what `403` messages and access reviews name).
pub const DEFAULT_USER: &str = "system:serviceaccount:ci:kiln";
/// The bearer token written into kubeconfigs; the server accepts any token.
pub const TOKEN: &str = "kube-test-token";
/// The node every scheduled pod lands on.
pub const NODE: &str = "kiln-test-node-1";

/// One request the server answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    pub method: String,
    /// Path and query, as sent.
    pub path: String,
    pub status: u16,
    /// When the request reached the server (before the configured latency).
    pub at: std::time::Instant,
    /// `metadata.name` from the body of a create (`POST`), which names its object nowhere else.
    pub name: Option<String>,
}

/// What a [`KubeServer::wait_for`] condition looks at.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub pods: Vec<Pod>,
    pub secrets: Vec<Secret>,
    pub events: Vec<Event>,
}

impl Snapshot {
    pub fn pod(&self, name: &str) -> Option<&Pod> {
        self.pods
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some(name))
    }

    pub fn secret(&self, name: &str) -> Option<&Secret> {
        self.secrets
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some(name))
    }

    /// Events whose `involvedObject.name` is `name`, oldest first.
    pub fn events_for(&self, name: &str) -> Vec<&Event> {
        self.events
            .iter()
            .filter(|e| e.involved_object.name.as_deref() == Some(name))
            .collect()
    }

    /// The pod's phase, `""` when the pod or its phase is missing.
    pub fn phase(&self, name: &str) -> &str {
        self.pod(name)
            .and_then(|p| p.status.as_ref())
            .and_then(|s| s.phase.as_deref())
            .unwrap_or("")
    }
}

/// Everything behind the one lock.
pub(crate) struct State {
    pub(crate) store: Store,
    pub(crate) requests: Vec<RequestRecord>,
    pub(crate) latency: Duration,
    pub(crate) user: String,
    /// `(verb, resource)` pairs answered with 403; resource may be `pods/status`, `*` matches all.
    pub(crate) denied: BTreeSet<(String, String)>,
    /// The one namespace the user's permissions hold in (a namespaced Role, no ClusterRole):
    /// anything in another namespace or at the cluster scope is 403. `None`: everywhere.
    pub(crate) confined_to: Option<String>,
    pub(crate) kubelet_enabled: bool,
    pub(crate) aliases: HashMap<String, PathBuf>,
    pub(crate) images: HashMap<String, ImageScript>,
    /// Scripted images the node holds already (pulled before, or seeded with
    /// `seed_node_image`): `IfNotPresent` and `Never` use them without asking the registry.
    /// An image with no script counts as present.
    pub(crate) node_images: BTreeSet<String>,
    /// Registries that answer pulls only with one of these logins: registry → (user, password).
    pub(crate) logins: HashMap<String, (String, String)>,
    pub(crate) unschedulable: Vec<PodMatch>,
    pub(crate) holds: Vec<PodMatch>,
    /// Pod uids let through a hold by `release_pod`.
    pub(crate) released: BTreeSet<String>,
    pub(crate) runtimes: Vec<PodRt>,
    /// How long the kubelet takes from scheduling a pod to starting its containers (image
    /// pulls, sandbox creation on a serverless node); `set_start_delay`.
    pub(crate) start_delay: Duration,
}

pub(crate) struct Inner {
    state: Mutex<State>,
    /// Bumped on every change; watch streams and waiters wake on it.
    changed: tokio::sync::watch::Sender<u64>,
    /// Bumped by `end_watches`: open watch streams end.
    watch_generation: tokio::sync::watch::Sender<u64>,
    root: PathBuf,
}

impl Inner {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` under the lock, then wakes watchers and waiters.
    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let out = f(&mut self.lock());
        self.changed.send_modify(|n| *n += 1);
        out
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }
}

impl State {
    /// The pod named `name` (any namespace): `(namespace, uid)`.
    fn pod_by_name(&self, name: &str) -> Option<(String, String)> {
        self.store
            .objects
            .iter()
            .find(|((res, _, n), _)| *res == Res::Pods && n == name)
            .map(|((_, ns, _), pod)| {
                (
                    ns.clone(),
                    pod["metadata"]["uid"].as_str().unwrap_or("").to_owned(),
                )
            })
    }

    /// The runtime of the pod named `name`: the live pod's, else the most recent one.
    fn runtime_by_name(&self, name: &str) -> Option<&PodRt> {
        if let Some((_, uid)) = self.pod_by_name(name)
            && let Some(rt) = self.runtimes.iter().find(|rt| rt.uid == uid)
        {
            return Some(rt);
        }
        self.runtimes.iter().rev().find(|rt| rt.name == name)
    }

    fn send(&self, pod: &str, ctl: Ctl) {
        match self.runtime_by_name(pod) {
            Some(rt) => {
                let _ = rt.ctl.send(ctl);
            }
            None => panic!("no pod {pod:?} has been started by the kubelet"),
        }
    }
}

/// The test API server. Dropping it kills every process its kubelet started.
pub struct KubeServer {
    url: String,
    inner: Arc<Inner>,
    server: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl KubeServer {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                store: Store::new(1000),
                requests: Vec::new(),
                latency: Duration::ZERO,
                user: DEFAULT_USER.to_owned(),
                denied: BTreeSet::new(),
                confined_to: None,
                kubelet_enabled: true,
                aliases: HashMap::new(),
                images: HashMap::new(),
                node_images: BTreeSet::new(),
                logins: HashMap::new(),
                unschedulable: Vec::new(),
                holds: Vec::new(),
                released: BTreeSet::new(),
                runtimes: Vec::new(),
                start_delay: Duration::ZERO,
            }),
            changed: tokio::sync::watch::Sender::new(0),
            watch_generation: tokio::sync::watch::Sender::new(0),
            root: dir.path().to_owned(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let router = axum::Router::new()
            .fallback(api::handle)
            .with_state(inner.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Self {
            url,
            inner,
            server,
            _dir: dir,
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Writes a kubeconfig for this server (dummy bearer token, context namespace `namespace`).
    pub fn kubeconfig(&self, path: impl AsRef<Path>, namespace: &str) {
        let config = format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: kiln-test\nclusters:\n- name: kiln-test\n  cluster:\n    server: {}\ncontexts:\n- name: kiln-test\n  context:\n    cluster: kiln-test\n    user: kiln\n    namespace: {namespace}\nusers:\n- name: kiln\n  user:\n    token: {TOKEN}\n",
            self.url
        );
        std::fs::write(path, config).unwrap();
    }

    /// A `kube::Client` for this server with `namespace` as default namespace.
    pub fn client(&self, namespace: &str) -> kube::Client {
        let mut config = kube::Config::new(self.url.parse().unwrap());
        config.default_namespace = namespace.to_owned();
        kube::Client::try_from(config).unwrap()
    }

    /// Delays every API response by `latency`.
    pub fn set_latency(&self, latency: Duration) {
        self.inner.with(|s| s.latency = latency);
    }

    /// How many changes the watch history keeps (default 1000); older resourceVersions get 410.
    pub fn set_history_limit(&self, limit: usize) {
        self.inner.with(|s| s.store.set_history_limit(limit));
    }

    /// Forgets the whole watch history: watching from any resourceVersion before now gets 410.
    pub fn compact(&self) {
        self.inner.with(|s| s.store.compact());
    }

    /// Ends every open watch stream (as a server does when `timeoutSeconds` runs out).
    pub fn end_watches(&self) {
        self.inner.watch_generation.send_modify(|n| *n += 1);
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.inner.lock().store.rv
    }

    /// Answers `verb` on `resource` (`pods`, `secrets`, `pods/status`, `*`) with 403 from now on.
    pub fn deny(&self, verb: &str, resource: &str) {
        self.inner
            .with(|s| s.denied.insert((verb.to_owned(), resource.to_owned())));
    }

    pub fn allow(&self, verb: &str, resource: &str) {
        self.inner
            .with(|s| s.denied.remove(&(verb.to_owned(), resource.to_owned())));
    }

    /// Grants the user's permissions in `namespace` only, as a Role and RoleBinding there do
    /// (no ClusterRole): requests in other namespaces and cluster-wide lists and watches are
    /// 403, and access reviews say so.
    pub fn grant_only_in(&self, namespace: &str) {
        self.inner
            .with(|s| s.confined_to = Some(namespace.to_owned()));
    }

    /// The user name 403 messages and access reviews use.
    pub fn set_user(&self, user: &str) {
        self.inner.with(|s| s.user = user.to_owned());
    }

    pub fn requests(&self) -> Vec<RequestRecord> {
        self.inner.lock().requests.clone()
    }

    /// Names of the pods created successfully, in order.
    pub fn creations(&self) -> Vec<String> {
        self.inner.lock().store.creations.clone()
    }

    /// The most pods that existed (created, not yet removed) at the same time.
    pub fn max_pods_at_once(&self) -> usize {
        self.inner.lock().store.max_pods
    }

    pub fn snapshot(&self) -> Snapshot {
        let state = self.inner.lock();
        Snapshot {
            pods: state.store.typed(Res::Pods),
            secrets: state.store.typed(Res::Secrets),
            events: state.store.typed(Res::Events),
        }
    }

    pub fn pods(&self) -> Vec<Pod> {
        self.inner.lock().store.typed(Res::Pods)
    }

    pub fn secrets(&self) -> Vec<Secret> {
        self.inner.lock().store.typed(Res::Secrets)
    }

    pub fn events(&self) -> Vec<Event> {
        self.inner.lock().store.typed(Res::Events)
    }

    pub fn pod(&self, name: &str) -> Option<Pod> {
        self.snapshot().pod(name).cloned()
    }

    /// Every `coordination.k8s.io/v1` Lease.
    pub fn leases(&self) -> Vec<k8s_openapi::api::coordination::v1::Lease> {
        self.inner.lock().store.typed(Res::Leases)
    }

    /// The stored JSON of `resource` (`pods`, `secrets`, `events`) `namespace`/`name`.
    pub fn object(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        let res = Res::parse(resource).or_else(|| Res::parse_coordination(resource))?;
        let state = self.inner.lock();
        state
            .store
            .objects
            .get(&(res, namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Creates an object directly in the store (no kubelet, no permission check), e.g. a
    /// Secret a pod mounts.
    pub fn insert(&self, namespace: &str, object: Value) -> Value {
        let res = match object["kind"].as_str() {
            Some("Pod") => Res::Pods,
            Some("Secret") => Res::Secrets,
            Some("Event") => Res::Events,
            Some("Lease") => Res::Leases,
            Some("ConfigMap") => Res::ConfigMaps,
            Some("PersistentVolumeClaim") => Res::PersistentVolumeClaims,
            other => panic!("cannot insert a {other:?}"),
        };
        let inner = self.inner.clone();
        let created = self
            .inner
            .with(|s| s.store.create(res, namespace, object))
            .unwrap_or_else(|e| panic!("insert failed: {}", e.message));
        if res == Res::Pods {
            kubelet::on_created(&inner, &created);
        }
        created
    }

    // --- kubelet -----------------------------------------------------------------------------

    /// Whether new pods get scheduled and run (default true); when off they stay Pending.
    pub fn set_kubelet(&self, enabled: bool) {
        self.inner.with(|s| s.kubelet_enabled = enabled);
    }

    /// Makes the kubelet take `delay` from scheduling each pod to starting its containers (the
    /// time a serverless node spends creating the sandbox and pulling the images): meanwhile
    /// the pod is Pending with its containers `ContainerCreating` (`PodInitializing`).
    pub fn set_start_delay(&self, delay: Duration) {
        self.inner.with(|s| s.start_delay = delay);
    }

    /// Runs `path` when a container's `command[0]` is `command` (e.g. `/usr/local/bin/kiln`).
    pub fn alias_binary(&self, command: &str, path: impl Into<PathBuf>) {
        let path = path.into();
        self.inner
            .with(|s| s.aliases.insert(command.to_owned(), path));
    }

    /// Scripts what pulling `image` does (exact match, or the image without its tag/digest).
    pub fn script_image(&self, image: &str, script: ImageScript) {
        self.inner
            .with(|s| s.images.insert(image.to_owned(), script));
    }

    /// Makes `registry` (`registry.example.com:5005`) refuse pulls without the login `username`
    /// / `password` in one of the pod's `imagePullSecrets`, as a private registry does.
    pub fn require_login(&self, registry: &str, username: &str, password: &str) {
        self.inner.with(|s| {
            s.logins.insert(
                registry.to_owned(),
                (username.to_owned(), password.to_owned()),
            )
        });
    }

    /// Where the data of the PersistentVolumeClaim `claim` lives (created when a pod mounts it).
    pub fn claim_dir(&self, namespace: &str, claim: &str) -> PathBuf {
        kubelet::claim_dir(self.inner.root(), namespace, claim)
    }

    /// Puts `image` (exact reference) on the node, as an earlier pull would have: pods whose
    /// pull policy is `IfNotPresent` or `Never` use it whatever the registry's script says.
    pub fn seed_node_image(&self, image: &str) {
        self.inner.with(|s| s.node_images.insert(image.to_owned()));
    }

    pub fn clear_image_script(&self, image: &str) {
        self.inner.with(|s| s.images.remove(image));
    }

    /// Matching pods are not scheduled (`Unschedulable`) until `release_scheduling`.
    pub fn unschedulable(&self, which: PodMatch) {
        self.inner.with(|s| s.unschedulable.push(which));
    }

    pub fn release_scheduling(&self) {
        self.inner.with(|s| s.unschedulable.clear());
    }

    /// Matching pods are scheduled but their containers do not start until released.
    pub fn hold(&self, which: PodMatch) {
        self.inner.with(|s| s.holds.push(which));
    }

    /// Ends every hold: held pods start.
    pub fn release_hold(&self) {
        self.inner.with(|s| s.holds.clear());
    }

    /// Lets the current pod named `name` through the holds.
    pub fn release_pod(&self, name: &str) {
        self.inner.with(|s| {
            let (_, uid) = s
                .pod_by_name(name)
                .unwrap_or_else(|| panic!("no pod {name:?}"));
            s.released.insert(uid);
        });
    }

    /// The kernel OOM-kills `container`: SIGKILL, terminated `OOMKilled` with exit code 137.
    pub fn oom_kill(&self, pod: &str, container: &str) {
        self.inner
            .with(|s| s.send(pod, Ctl::OomKill(container.to_owned())));
    }

    /// The kubelet evicts the pod for memory pressure: phase Failed, reason `Evicted`.
    pub fn evict(&self, pod: &str) {
        self.inner.with(|s| s.send(pod, Ctl::Evict));
    }

    /// The scheduler preempts the pod (condition `DisruptionTarget`, then graceful deletion).
    pub fn preempt(&self, pod: &str) {
        self.inner.with(|s| s.send(pod, Ctl::Preempt));
    }

    /// An ECI spot instance is reclaimed: `ContainerInstanceExpired`, then Failed `BidFailed`.
    pub fn spot_reclaim(&self, pod: &str) {
        self.inner.with(|s| s.send(pod, Ctl::SpotReclaim));
    }

    /// The node stops answering: phase Failed, reason `NodeLost`.
    pub fn node_lost(&self, pod: &str) {
        self.inner.with(|s| s.send(pod, Ctl::NodeLost));
    }

    /// Ends a container that has no command (a simulated service) with `exit_code`.
    pub fn stop_container(&self, pod: &str, container: &str, exit_code: i32) {
        self.inner.with(|s| {
            s.send(
                pod,
                Ctl::Stop {
                    container: container.to_owned(),
                    code: exit_code,
                },
            )
        });
    }

    /// Everything the container wrote to stdout and stderr so far.
    pub fn logs(&self, pod: &str, container: &str) -> String {
        let state = self.inner.lock();
        state
            .runtime_by_name(pod)
            .and_then(|rt| rt.containers.get(container))
            .map(|c| String::from_utf8_lossy(&c.log).into_owned())
            .unwrap_or_default()
    }

    /// Whether any process of the container's process group still exists.
    pub fn process_alive(&self, pod: &str, container: &str) -> bool {
        let state = self.inner.lock();
        state
            .runtime_by_name(pod)
            .and_then(|rt| rt.containers.get(container))
            .and_then(|c| c.pgid)
            .is_some_and(kubelet::group_alive)
    }

    /// The local directory of the pod's sandbox (volumes, home, termination messages).
    pub fn sandbox(&self, pod: &str) -> Option<PathBuf> {
        let state = self.inner.lock();
        state.runtime_by_name(pod).map(|rt| rt.sandbox.clone())
    }

    /// The local directory backing the pod's volume `volume`.
    pub fn volume_dir(&self, pod: &str, volume: &str) -> Option<PathBuf> {
        let state = self.inner.lock();
        state
            .runtime_by_name(pod)
            .and_then(|rt| rt.volumes.get(volume).cloned())
    }

    /// Waits until `done` holds for the server's state; panics after `timeout` with a dump.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&Snapshot) -> bool,
    ) -> Snapshot {
        let mut changed = self.inner.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            changed.mark_unchanged();
            let snapshot = self.snapshot();
            if done(&snapshot) {
                return snapshot;
            }
            if tokio::time::timeout_at(deadline, changed.changed())
                .await
                .is_err()
            {
                panic!(
                    "condition not met within {timeout:?}; pods:\n{}\nevents:\n{}",
                    self.dump(Res::Pods),
                    self.dump(Res::Events)
                );
            }
        }
    }

    /// Waits until the pod `name` exists and `done` holds for it.
    pub async fn wait_pod(
        &self,
        name: &str,
        timeout: Duration,
        mut done: impl FnMut(&Pod) -> bool,
    ) -> Pod {
        let snapshot = self
            .wait_for(timeout, |s| s.pod(name).is_some_and(&mut done))
            .await;
        snapshot.pod(name).cloned().unwrap()
    }

    /// Waits until the pod `name` no longer exists.
    pub async fn wait_gone(&self, name: &str, timeout: Duration) {
        self.wait_for(timeout, |s| s.pod(name).is_none()).await;
    }

    fn dump(&self, res: Res) -> String {
        let state = self.inner.lock();
        state
            .store
            .objects
            .iter()
            .filter(|((r, _, _), _)| *r == res)
            .map(|(_, v)| {
                let mut v = v.clone();
                if let Some(m) = v["metadata"].as_object_mut() {
                    m.remove("managedFields");
                }
                v.to_string()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for KubeServer {
    fn drop(&mut self) {
        self.server.abort();
        let state = self.inner.lock();
        for rt in &state.runtimes {
            for c in rt.containers.values() {
                if let Some(pgid) = c.pgid {
                    kubelet::kill_group(pgid, true);
                }
            }
        }
    }
}

/// A Kubernetes `Status` failure.
#[derive(Clone, Debug)]
pub(crate) struct ApiError {
    pub(crate) code: u16,
    pub(crate) reason: &'static str,
    pub(crate) message: String,
    pub(crate) details: Option<Value>,
}

impl ApiError {
    pub(crate) fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    pub(crate) fn details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    pub(crate) fn not_found(res: Res, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", res.qualified()),
        )
        .details(json!({ "name": name, "group": res.group(), "kind": res.plural() }))
    }

    pub(crate) fn conflict(res: Res, name: &str, why: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": {why}",
                res.qualified()
            ),
        )
        .details(json!({ "name": name, "group": res.group(), "kind": res.plural() }))
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub(crate) fn status(&self) -> Value {
        let mut status = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}

/// `key → value` of a JSON object's string values.
pub(crate) fn string_map(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

pub(crate) fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}
