//! The test API server's scheduler + kubelet: runs each pod's containers as local processes and reports real-looking status and Events.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::store::{Key, Res, uuid};
use super::{Inner, NODE, State, now};

/// What pulling an image does, set with `KubeServer::script_image`.
#[derive(Clone, Debug)]
pub enum ImageScript {
    /// The pull fails: `ErrImagePull`, then `ImagePullBackOff`, retried until the script is
    /// cleared. `message` replaces the registry's "pull access denied" answer.
    PullFails { message: Option<String> },
    /// The reference cannot be parsed: `InvalidImageName`.
    InvalidName,
    /// The container cannot be configured: `CreateContainerConfigError` with `message`.
    ConfigError { message: String },
    /// The image is pulled, taking this long.
    PullDelay(Duration),
}

/// Which pods a scheduling or hold script applies to.
#[derive(Clone, Debug)]
pub enum PodMatch {
    All,
    Name(String),
    /// A label `key=value`.
    Label(String, String),
}

impl PodMatch {
    fn matches(&self, pod: &Value) -> bool {
        match self {
            Self::All => true,
            Self::Name(n) => pod["metadata"]["name"].as_str() == Some(n),
            Self::Label(k, v) => pod["metadata"]["labels"][k].as_str() == Some(v),
        }
    }
}

/// What the pod's task is told.
#[derive(Debug)]
pub(crate) enum Ctl {
    Exited {
        container: String,
        code: i32,
    },
    /// Graceful deletion through the API.
    Delete {
        grace: i64,
    },
    /// The object is gone from the API: kill everything now.
    Kill,
    OomKill(String),
    Evict,
    Preempt,
    SpotReclaim,
    NodeLost,
    Stop {
        container: String,
        code: i32,
    },
}

/// What the rest of the server sees of a pod the kubelet runs.
pub(crate) struct PodRt {
    pub(crate) uid: String,
    pub(crate) name: String,
    pub(crate) ctl: mpsc::UnboundedSender<Ctl>,
    pub(crate) sandbox: PathBuf,
    pub(crate) volumes: BTreeMap<String, PathBuf>,
    pub(crate) containers: BTreeMap<String, CtrRt>,
}

#[derive(Default)]
pub(crate) struct CtrRt {
    pub(crate) pgid: Option<i32>,
    pub(crate) log: Vec<u8>,
    pub(crate) started: bool,
    pub(crate) finished: bool,
}

pub(crate) fn kill_group(pgid: i32, hard: bool) {
    let signal = if hard {
        Signal::SIGKILL
    } else {
        Signal::SIGTERM
    };
    let _ = killpg(Pid::from_raw(pgid), signal);
}

/// Whether a process of the group still runs; zombies (killed orphans that init has not
/// reaped yet) do not count.
pub(crate) fn group_alive(pgid: i32) -> bool {
    if killpg(Pid::from_raw(pgid), None).is_err() {
        return false;
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return true;
    };
    entries.flatten().any(|entry| {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            return false;
        };
        // `pid (comm) state ppid pgrp …`; comm may contain anything up to the last ')'.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            return false;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        fields.len() > 3 && fields[0] != "Z" && fields[0] != "X" && fields[2] == pgid.to_string()
    })
}

/// The next pod IP: a loopback address of its own (`127.x.y.z`), so a process of the pod can
/// listen on the pod's IP and the test (and kiln) reach it there, as on a pod network. Unique
/// across every test server of the process, and apart from other test processes' (seeded by
/// the process id).
fn next_pod_ip() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let _ = NEXT.compare_exchange(
        0,
        (std::process::id() % 200 + 20) << 16,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    // Never .0 or .255 in the last place, never 127.0.x.x (the test servers' own).
    let host = n & 0xffff;
    let (third, fourth) = (host / 250, host % 250 + 2);
    format!("127.{}.{}.{}", (n >> 16) & 0xff, third & 0xff, fourth)
}

/// Starts the kubelet's work on a freshly created pod.
pub(crate) fn on_created(inner: &Arc<Inner>, pod: &Value) {
    let (tx, rx) = mpsc::unbounded_channel();
    let ns = pod["metadata"]["namespace"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    let name = pod["metadata"]["name"].as_str().unwrap_or("").to_owned();
    let uid = pod["metadata"]["uid"].as_str().unwrap_or("").to_owned();
    let sandbox = inner
        .root()
        .join("pods")
        .join(format!("{ns}_{name}_{}", &uid[..8.min(uid.len())]));
    let enabled = inner.with(|s| {
        if !s.kubelet_enabled {
            return false;
        }
        s.runtimes.push(PodRt {
            uid: uid.clone(),
            name: name.clone(),
            ctl: tx.clone(),
            sandbox: sandbox.clone(),
            volumes: BTreeMap::new(),
            containers: BTreeMap::new(),
        });
        true
    });
    if !enabled {
        return;
    }
    let containers = |list: &str| -> Vec<Ctr> {
        pod["spec"][list]
            .as_array()
            .into_iter()
            .flatten()
            .map(|spec| Ctr::new(spec, &sandbox))
            .collect()
    };
    let task = PodTask {
        inner: inner.clone(),
        key: (Res::Pods, ns, name),
        uid,
        tx,
        rx,
        pending: VecDeque::new(),
        spec: pod["spec"].clone(),
        labels: pod["metadata"]["labels"].clone(),
        init: containers("initContainers"),
        app: containers("containers"),
        sandbox,
        stage: Stage::Scheduling,
        conditions: Vec::new(),
        reason: None,
        start_time: None,
        pod_ip: String::new(),
        scheduled_at: None,
        mounts_warned: None,
        deadline: None,
        volumes: BTreeMap::new(),
    };
    tokio::spawn(task.run());
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    Scheduling,
    Held,
    Mounting,
    Starting,
    Done,
}

#[derive(Clone, Debug)]
enum CState {
    Waiting(String, Option<String>),
    Running(String),
    Terminated {
        code: i32,
        reason: String,
        message: Option<String>,
        started: Option<String>,
        finished: String,
    },
}

struct Ctr {
    name: String,
    image: String,
    spec: Value,
    state: CState,
    container_id: Option<String>,
    image_id: Option<String>,
    pgid: Option<i32>,
    simulated: bool,
    oom: bool,
    lost: bool,
    /// Pulling (delay or failure loop) is under way.
    pull: Option<Pull>,
    /// Not retried before this instant (config errors, pull back-off).
    retry_at: Option<Instant>,
    term_file: PathBuf,
}

#[derive(Clone, Copy, Debug)]
enum Pull {
    Until(Instant),
    BackOff(u32),
}

impl Ctr {
    fn new(spec: &Value, sandbox: &Path) -> Self {
        let name = spec["name"].as_str().unwrap_or("").to_owned();
        Self {
            image: spec["image"].as_str().unwrap_or("").to_owned(),
            spec: spec.clone(),
            state: CState::Waiting("ContainerCreating".into(), None),
            container_id: None,
            image_id: None,
            pgid: None,
            simulated: false,
            oom: false,
            lost: false,
            pull: None,
            retry_at: None,
            term_file: sandbox
                .join("termination")
                .join(&name)
                .join("termination-log"),
            name,
        }
    }

    fn running(&self) -> bool {
        matches!(self.state, CState::Running(_))
    }

    fn terminated(&self) -> bool {
        matches!(self.state, CState::Terminated { .. })
    }

    fn exit_code(&self) -> Option<i32> {
        match self.state {
            CState::Terminated { code, .. } => Some(code),
            _ => None,
        }
    }

    fn status(&self) -> Value {
        let state = match &self.state {
            CState::Waiting(reason, message) => {
                let mut w = json!({ "reason": reason });
                if let Some(m) = message {
                    w["message"] = json!(m);
                }
                json!({ "waiting": w })
            }
            CState::Running(at) => json!({ "running": { "startedAt": at } }),
            CState::Terminated {
                code,
                reason,
                message,
                started,
                finished,
            } => {
                let mut t = json!({ "exitCode": code, "reason": reason, "finishedAt": finished });
                if let Some(m) = message {
                    t["message"] = json!(m);
                }
                if let Some(s) = started {
                    t["startedAt"] = json!(s);
                }
                if let Some(id) = &self.container_id {
                    t["containerID"] = json!(id);
                }
                json!({ "terminated": t })
            }
        };
        let mut status = json!({
            "name": self.name, "image": self.image, "imageID": self.image_id.clone().unwrap_or_default(),
            "ready": self.running(), "started": self.running(), "restartCount": 0,
            "state": state, "lastState": {},
        });
        if let Some(id) = &self.container_id {
            status["containerID"] = json!(id);
        }
        status
    }
}

struct PodTask {
    inner: Arc<Inner>,
    key: Key,
    uid: String,
    tx: mpsc::UnboundedSender<Ctl>,
    rx: mpsc::UnboundedReceiver<Ctl>,
    pending: VecDeque<Ctl>,
    spec: Value,
    labels: Value,
    init: Vec<Ctr>,
    app: Vec<Ctr>,
    sandbox: PathBuf,
    stage: Stage,
    /// `(type, status, reason, message, lastTransitionTime)` beyond the standard ones.
    conditions: Vec<(String, String, String, String, String)>,
    /// `status.reason`, `status.message` of a pod the node gave up on.
    reason: Option<(String, String)>,
    start_time: Option<String>,
    pod_ip: String,
    /// When the pod was scheduled (its containers start a `start_delay` later).
    scheduled_at: Option<Instant>,
    mounts_warned: Option<Instant>,
    deadline: Option<Instant>,
    volumes: BTreeMap<String, PathBuf>,
}

/// The task ends (the pod is gone).
struct Gone;

impl PodTask {
    fn name(&self) -> &str {
        &self.key.2
    }

    fn ns(&self) -> &str {
        &self.key.1
    }

    async fn run(mut self) {
        let _ = self.lifecycle().await;
        // Whatever still runs dies with the pod.
        for c in self.init.iter().chain(&self.app) {
            if let Some(pgid) = c.pgid {
                kill_group(pgid, true);
            }
        }
    }

    async fn lifecycle(&mut self) -> Result<(), Gone> {
        loop {
            self.advance()?;
            if self.stage == Stage::Done {
                return Ok(());
            }
            let ctl = if let Some(ctl) = self.pending.pop_front() {
                Some(ctl)
            } else {
                let deadline = self.deadline;
                let tick = tokio::time::sleep(Duration::from_millis(25));
                tokio::select! {
                    ctl = self.rx.recv() => ctl,
                    () = tick => None,
                    () = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                        self.deadline = None;
                        self.fail_on_node(
                            "DeadlineExceeded",
                            "Pod was active on the node longer than the specified deadline",
                            Duration::from_secs(u64::try_from(self.grace()).unwrap_or(0)),
                        ).await?;
                        None
                    }
                }
            };
            if let Some(ctl) = ctl {
                self.handle(ctl).await?;
            }
        }
    }

    fn grace(&self) -> i64 {
        self.spec["terminationGracePeriodSeconds"]
            .as_i64()
            .unwrap_or(30)
    }

    fn matches_any(&self, list: &[super::PodMatch]) -> bool {
        let pod = json!({ "metadata": { "name": self.name(), "labels": self.labels } });
        list.iter().any(|m| m.matches(&pod))
    }

    /// Takes every step that can be taken now.
    fn advance(&mut self) -> Result<(), Gone> {
        if self.stage == Stage::Scheduling {
            // The scheduler does not place a pod whose claim does not exist.
            let missing_claim = self.spec["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v["persistentVolumeClaim"]["claimName"].as_str())
                .find(|claim| {
                    let s = self.inner.lock();
                    s.store
                        .get(Res::PersistentVolumeClaims, self.ns(), claim)
                        .is_none()
                })
                .map(str::to_owned);
            let (blocked, message) = {
                let s = self.inner.lock();
                match &missing_claim {
                    Some(claim) => (true, format!("0/3 nodes are available: persistentvolumeclaim \"{claim}\" not found. preemption: 0/3 nodes are available: 3 Preemption is not helpful for scheduling.")),
                    None => (self.matches_any(&s.unschedulable), "0/3 nodes are available: 3 Insufficient cpu. preemption: 0/3 nodes are available: 3 No preemption victims found for incoming pod.".to_owned()),
                }
            };
            if blocked {
                let message = message.as_str();
                if self.condition("PodScheduled").is_none() {
                    self.set_condition("PodScheduled", "False", "Unschedulable", message);
                    self.event(
                        "Warning",
                        "FailedScheduling",
                        message,
                        "default-scheduler",
                        None,
                    );
                }
                return self.publish();
            }
            self.set_condition("PodScheduled", "True", "", "");
            self.stage = Stage::Held;
            self.pod_ip = next_pod_ip();
            self.scheduled_at = Some(Instant::now());
            self.start_time = Some(now());
            if let Some(secs) = self.spec["activeDeadlineSeconds"].as_u64() {
                self.deadline = Some(Instant::now() + Duration::from_secs(secs));
            }
            let waiting = if self.init.is_empty() {
                "ContainerCreating"
            } else {
                "PodInitializing"
            };
            for c in &mut self.init {
                c.state = CState::Waiting("PodInitializing".into(), None);
            }
            for c in &mut self.app {
                c.state = CState::Waiting(waiting.into(), None);
            }
            self.bind()?;
            self.event(
                "Normal",
                "Scheduled",
                &format!(
                    "Successfully assigned {}/{} to {NODE}",
                    self.ns(),
                    self.name()
                ),
                "default-scheduler",
                None,
            );
        }
        if self.stage == Stage::Held {
            let held = {
                let s = self.inner.lock();
                self.matches_any(&s.holds) && !s.released.contains(&self.uid)
            };
            if held {
                return self.publish();
            }
            let delay = self.inner.lock().start_delay;
            if self.scheduled_at.is_some_and(|at| at.elapsed() < delay) {
                return self.publish();
            }
            self.stage = Stage::Mounting;
        }
        if self.stage == Stage::Mounting {
            match self.mount() {
                Ok(()) => {
                    self.set_condition("PodReadyToStartContainers", "True", "", "");
                    self.stage = Stage::Starting;
                }
                Err(message) => {
                    if self
                        .mounts_warned
                        .is_none_or(|t| t.elapsed() > Duration::from_secs(2))
                    {
                        self.mounts_warned = Some(Instant::now());
                        self.event("Warning", "FailedMount", &message, "kubelet", None);
                    }
                    return self.publish();
                }
            }
        }
        if self.stage == Stage::Starting {
            self.start_containers();
            if self.all_stopped() {
                self.stage = Stage::Done;
            }
        }
        self.publish()
    }

    /// Init containers one after another, then every app container.
    fn start_containers(&mut self) {
        for i in 0..self.init.len() {
            match self.init[i].exit_code() {
                Some(0) => continue,
                Some(_) => return,
                None if self.init[i].running() => return,
                None => {
                    self.try_start(true, i);
                    return;
                }
            }
        }
        if self.reason.is_some() {
            return;
        }
        for i in 0..self.app.len() {
            if matches!(self.app[i].state, CState::Waiting(..)) {
                self.try_start(false, i);
            }
        }
    }

    fn all_stopped(&self) -> bool {
        let init_failed = self
            .init
            .iter()
            .any(|c| c.exit_code().is_some_and(|c| c != 0));
        if self.reason.is_some() || init_failed {
            return self.init.iter().chain(&self.app).all(|c| !c.running());
        }
        !self.app.is_empty() && self.app.iter().all(Ctr::terminated)
    }

    fn ctr(&mut self, init: bool, i: usize) -> &mut Ctr {
        if init {
            &mut self.init[i]
        } else {
            &mut self.app[i]
        }
    }

    fn script_for(&self, image: &str) -> Option<super::ImageScript> {
        let s = self.inner.lock();
        let repo = image.split('@').next().unwrap_or(image);
        let without_tag = match repo.rsplit_once(':') {
            Some((r, tag)) if !tag.contains('/') => r,
            _ => repo,
        };
        s.images
            .get(image)
            .or_else(|| s.images.get(without_tag))
            .cloned()
    }

    fn try_start(&mut self, init: bool, i: usize) {
        let now_i = Instant::now();
        let c = self.ctr(init, i);
        if c.retry_at.is_some_and(|t| t > now_i) {
            return;
        }
        if let Some(Pull::Until(t)) = c.pull
            && t > now_i
        {
            return;
        }
        let image = c.image.clone();
        let name = c.name.clone();
        let field = format!(
            "spec.{}{{{name}}}",
            if init { "initContainers" } else { "containers" }
        );
        // The pull policy (defaulted by the API server) decides whether the registry is asked
        // at all: `IfNotPresent` and `Never` use an image the node holds already.
        let policy = c.spec["imagePullPolicy"]
            .as_str()
            .unwrap_or("IfNotPresent")
            .to_owned();
        let scripted = self.script_for(&image);
        let registry_script = matches!(
            scripted,
            Some(super::ImageScript::PullFails { .. } | super::ImageScript::PullDelay(_))
        );
        let on_node = !registry_script || self.inner.lock().node_images.contains(&image);
        if policy == "Never" && !on_node {
            let message =
                format!("Container image \"{image}\" is not present with pull policy of Never");
            let c = self.ctr(init, i);
            if c.retry_at.is_none() {
                c.state = CState::Waiting("ErrImageNeverPull".into(), Some(message.clone()));
                self.event(
                    "Warning",
                    "ErrImageNeverPull",
                    &message,
                    "kubelet",
                    Some(&field),
                );
            }
            self.ctr(init, i).retry_at = Some(now_i + Duration::from_secs(2));
            return;
        }
        let script = if registry_script && on_node && policy != "Always" {
            None
        } else if self.pull_authorized(&image, &field) {
            scripted
        } else {
            Some(super::ImageScript::PullFails { message: None })
        };
        let initial = if init || !self.init.is_empty() {
            "PodInitializing"
        } else {
            "ContainerCreating"
        };
        match script {
            Some(super::ImageScript::InvalidName) => {
                let message = format!(
                    "Failed to apply default image tag \"{image}\": couldn't parse image name \"{image}\": invalid reference format"
                );
                let c = self.ctr(init, i);
                if c.retry_at.is_none() {
                    c.retry_at = Some(now_i + Duration::from_secs(2));
                    c.state = CState::Waiting("InvalidImageName".into(), Some(message.clone()));
                    self.event(
                        "Warning",
                        "InspectFailed",
                        &message,
                        "kubelet",
                        Some(&field),
                    );
                    self.event(
                        "Warning",
                        "Failed",
                        "Error: InvalidImageName",
                        "kubelet",
                        Some(&field),
                    );
                } else {
                    c.retry_at = Some(now_i + Duration::from_secs(2));
                }
                return;
            }
            Some(super::ImageScript::PullFails { message }) => {
                let reference = full_reference(&image);
                let message = message.unwrap_or_else(|| format!(
                    "failed to pull and unpack image \"{reference}\": failed to resolve reference \"{reference}\": pull access denied, repository does not exist or may require authorization: server message: insufficient_scope: authorization failed"
                ));
                let c = self.ctr(init, i);
                let attempt = match c.pull {
                    Some(Pull::BackOff(n)) => n + 1,
                    _ => 0,
                };
                let in_backoff = matches!(&c.state, CState::Waiting(r, _) if r == "ErrImagePull");
                if in_backoff {
                    // ErrImagePull → back-off, which lasts longer each time.
                    let back_off = Duration::from_millis(500 * 2u64.pow(attempt.min(3)));
                    c.state = CState::Waiting(
                        "ImagePullBackOff".into(),
                        Some(format!(
                            "Back-off pulling image \"{image}\": ErrImagePull: {message}"
                        )),
                    );
                    c.pull = Some(Pull::BackOff(attempt));
                    c.retry_at = Some(now_i + back_off);
                    self.event(
                        "Normal",
                        "BackOff",
                        &format!("Back-off pulling image \"{image}\""),
                        "kubelet",
                        Some(&field),
                    );
                    self.event(
                        "Warning",
                        "Failed",
                        "Error: ImagePullBackOff",
                        "kubelet",
                        Some(&field),
                    );
                } else {
                    c.state = CState::Waiting("ErrImagePull".into(), Some(message.clone()));
                    c.pull = Some(Pull::BackOff(attempt));
                    c.retry_at = Some(now_i + Duration::from_millis(200));
                    self.event(
                        "Normal",
                        "Pulling",
                        &format!("Pulling image \"{image}\""),
                        "kubelet",
                        Some(&field),
                    );
                    self.event(
                        "Warning",
                        "Failed",
                        &format!("Failed to pull image \"{image}\": {message}"),
                        "kubelet",
                        Some(&field),
                    );
                    self.event(
                        "Warning",
                        "Failed",
                        "Error: ErrImagePull",
                        "kubelet",
                        Some(&field),
                    );
                }
                return;
            }
            Some(super::ImageScript::ConfigError { message }) => {
                self.config_error(init, i, &message, &field);
                return;
            }
            Some(super::ImageScript::PullDelay(delay)) => {
                let c = self.ctr(init, i);
                match c.pull {
                    None => {
                        c.pull = Some(Pull::Until(now_i + delay));
                        c.state = CState::Waiting(initial.into(), None);
                        self.event(
                            "Normal",
                            "Pulling",
                            &format!("Pulling image \"{image}\""),
                            "kubelet",
                            Some(&field),
                        );
                        return;
                    }
                    Some(Pull::Until(_)) => {
                        c.pull = None;
                        c.image_id = Some(image_id(&image));
                        self.inner.lock().node_images.insert(image.clone());
                        let secs = delay.as_secs_f64();
                        self.event(
                            "Normal",
                            "Pulled",
                            &format!("Successfully pulled image \"{image}\" in {secs:.3}s ({secs:.3}s including waiting). Image size: 4194304 bytes."),
                            "kubelet",
                            Some(&field),
                        );
                    }
                    Some(Pull::BackOff(_)) => c.pull = None,
                }
            }
            None => {
                let c = self.ctr(init, i);
                let retried = c.pull.take().is_some();
                c.image_id = Some(image_id(&image));
                if retried {
                    self.inner.lock().node_images.insert(image.clone());
                }
                let message = if retried {
                    format!(
                        "Successfully pulled image \"{image}\" in 105ms (105ms including waiting). Image size: 4194304 bytes."
                    )
                } else {
                    format!("Container image \"{image}\" already present on machine")
                };
                self.event("Normal", "Pulled", &message, "kubelet", Some(&field));
            }
        }
        let launch = match self.prepare(init, i) {
            Ok(launch) => launch,
            Err(message) => {
                self.config_error(init, i, &message, &field);
                return;
            }
        };
        let c = self.ctr(init, i);
        c.retry_at = None;
        c.container_id = Some(format!(
            "containerd://{}",
            hex::encode(Sha256::digest(uuid()))
        ));
        self.event(
            "Normal",
            "Created",
            &format!("Created container: {name}"),
            "kubelet",
            Some(&field),
        );
        match launch {
            None => {
                let c = self.ctr(init, i);
                c.simulated = true;
                c.state = CState::Running(now());
                self.runtime_ctr(&name, |r| r.started = true);
                self.event(
                    "Normal",
                    "Started",
                    &format!("Started container {name}"),
                    "kubelet",
                    Some(&field),
                );
            }
            Some(launch) => match self.spawn(&name, launch) {
                Ok(pgid) => {
                    let c = self.ctr(init, i);
                    c.pgid = Some(pgid);
                    c.state = CState::Running(now());
                    self.event(
                        "Normal",
                        "Started",
                        &format!("Started container {name}"),
                        "kubelet",
                        Some(&field),
                    );
                }
                Err(message) => {
                    let c = self.ctr(init, i);
                    c.state = CState::Terminated {
                        code: 128,
                        reason: "StartError".into(),
                        message: Some(message.clone()),
                        started: None,
                        finished: now(),
                    };
                    self.runtime_ctr(&name, |r| r.finished = true);
                    self.event(
                        "Warning",
                        "Failed",
                        &format!("Error: {message}"),
                        "kubelet",
                        Some(&field),
                    );
                }
            },
        }
    }

    fn config_error(&mut self, init: bool, i: usize, message: &str, field: &str) {
        let c = self.ctr(init, i);
        let first = !matches!(&c.state, CState::Waiting(r, _) if r == "CreateContainerConfigError");
        c.state = CState::Waiting(
            "CreateContainerConfigError".into(),
            Some(message.to_owned()),
        );
        c.retry_at = Some(Instant::now() + Duration::from_secs(1));
        if first || c.retry_at.is_some() {
            self.event(
                "Warning",
                "Failed",
                &format!("Error: {message}"),
                "kubelet",
                Some(field),
            );
        }
    }

    fn runtime_ctr(&self, name: &str, f: impl FnOnce(&mut super::kubelet::CtrRt)) {
        self.inner.with(|s| {
            if let Some(rt) = s.runtimes.iter_mut().find(|rt| rt.uid == self.uid) {
                f(rt.containers.entry(name.to_owned()).or_default());
            }
        });
    }

    /// Volumes → local directories (secret volumes written out).
    fn mount(&mut self) -> Result<(), String> {
        let volumes = self.spec["volumes"].as_array().cloned().unwrap_or_default();
        let mut dirs = BTreeMap::new();
        for vol in &volumes {
            let name = vol["name"].as_str().unwrap_or("");
            let dir = self.sandbox.join("volumes").join(name);
            if let Some(path) = vol["hostPath"]["path"].as_str() {
                dirs.insert(name.to_owned(), PathBuf::from(path));
                continue;
            }
            if let Some(claim) = vol["persistentVolumeClaim"]["claimName"].as_str() {
                // The claim's data outlives the pod; its directory is the volume (linked into
                // the sandbox beside the others).
                let data = claim_dir(self.inner.root(), self.ns(), claim);
                std::fs::create_dir_all(&data)
                    .map_err(|e| format!("MountVolume.SetUp failed for volume \"{name}\" : {e}"))?;
                if let Some(parent) = dir.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
                }
                let _ = std::os::unix::fs::symlink(&data, &dir);
                dirs.insert(name.to_owned(), data);
                continue;
            }
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("MountVolume.SetUp failed for volume \"{name}\" : {e}"))?;
            if vol["secret"].is_object() {
                self.write_secret(name, &vol["secret"], &dir)?;
            }
            if vol["configMap"].is_object() {
                self.write_config_map(name, &vol["configMap"], &dir)?;
            }
            dirs.insert(name.to_owned(), dir);
        }
        std::fs::create_dir_all(self.sandbox.join("home")).map_err(|e| e.to_string())?;
        for c in self.init.iter().chain(&self.app) {
            if let Some(parent) = c.term_file.parent() {
                std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
            }
        }
        self.volumes = dirs.clone();
        let sandbox = self.sandbox.clone();
        self.inner.with(|s| {
            if let Some(rt) = s.runtimes.iter_mut().find(|rt| rt.uid == self.uid) {
                rt.volumes = dirs;
                rt.sandbox = sandbox;
            }
        });
        Ok(())
    }

    /// Writes a ConfigMap volume: every key (or the `items`) as a file.
    fn write_config_map(&self, volume: &str, source: &Value, dir: &Path) -> Result<(), String> {
        let name = source["name"].as_str().unwrap_or("");
        let optional = source["optional"].as_bool().unwrap_or(false);
        let config_map = {
            let s = self.inner.lock();
            s.store.get(Res::ConfigMaps, self.ns(), name).cloned()
        };
        let Some(config_map) = config_map else {
            if optional {
                return Ok(());
            }
            return Err(format!(
                "MountVolume.SetUp failed for volume \"{volume}\" : configmap \"{name}\" not found"
            ));
        };
        let data = super::string_map(&config_map["data"]);
        let files: Vec<(String, String)> = match source["items"].as_array() {
            Some(items) => items
                .iter()
                .map(|it| {
                    (
                        it["key"].as_str().unwrap_or("").to_owned(),
                        it["path"].as_str().unwrap_or("").to_owned(),
                    )
                })
                .collect(),
            None => data.keys().map(|k| (k.clone(), k.clone())).collect(),
        };
        for (key, path) in files {
            let Some(text) = data.get(&key) else {
                if optional {
                    continue;
                }
                return Err(format!(
                    "MountVolume.SetUp failed for volume \"{volume}\" : configmap references non-existent config key: {key}"
                ));
            };
            let file = dir.join(&path);
            if let Some(parent) = file.parent() {
                std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
            }
            std::fs::write(&file, text).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Whether the pod may pull `image`: a registry that requires a login (`require_login`)
    /// answers only a pull with that login from one of the pod's `imagePullSecrets`; the
    /// kubelet warns about pull Secrets it cannot read and pulls without them, as a real one.
    fn pull_authorized(&self, image: &str, field: &str) -> bool {
        let registry = registry_of(image);
        let login = self.inner.lock().logins.get(&registry).cloned();
        let Some((user, password)) = login else {
            return true;
        };
        let names: Vec<String> = self.spec["imagePullSecrets"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["name"].as_str().map(str::to_owned))
            .collect();
        let mut missing = Vec::new();
        let mut authorized = false;
        for name in &names {
            let Some(secret) = self.secret(name) else {
                missing.push(name.clone());
                continue;
            };
            if secret.type_.as_deref() != Some("kubernetes.io/dockerconfigjson") {
                continue;
            }
            let Some(bytes) = secret
                .data
                .as_ref()
                .and_then(|d| d.get(".dockerconfigjson"))
            else {
                continue;
            };
            let Ok(config) = serde_json::from_slice::<Value>(&bytes.0) else {
                continue;
            };
            for (key, entry) in config["auths"].as_object().into_iter().flatten() {
                if registry_of_key(key) != registry {
                    continue;
                }
                let (u, p) = match (entry["username"].as_str(), entry["password"].as_str()) {
                    (Some(u), Some(p)) => (u.to_owned(), p.to_owned()),
                    _ => {
                        use base64::Engine;
                        let decoded = entry["auth"]
                            .as_str()
                            .and_then(|a| base64::engine::general_purpose::STANDARD.decode(a).ok())
                            .and_then(|b| String::from_utf8(b).ok())
                            .unwrap_or_default();
                        let (u, p) = decoded.split_once(':').unwrap_or_default();
                        (u.to_owned(), p.to_owned())
                    }
                };
                authorized |= u == user && p == password;
            }
        }
        if !missing.is_empty() {
            self.event(
                "Warning",
                "FailedToRetrieveImagePullSecret",
                &format!(
                    "Unable to retrieve some image pull secrets ({}); attempting to pull the image may not succeed.",
                    missing.join(", ")
                ),
                "kubelet",
                Some(field),
            );
        }
        authorized
    }

    fn secret(&self, name: &str) -> Option<Secret> {
        let s = self.inner.lock();
        s.store
            .get(Res::Secrets, self.ns(), name)
            .and_then(|v| serde_json::from_value(v.clone()).ok())
    }

    fn write_secret(&self, volume: &str, source: &Value, dir: &Path) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        let secret_name = source["secretName"].as_str().unwrap_or("");
        let optional = source["optional"].as_bool().unwrap_or(false);
        let Some(secret) = self.secret(secret_name) else {
            if optional {
                return Ok(());
            }
            return Err(format!(
                "MountVolume.SetUp failed for volume \"{volume}\" : secret \"{secret_name}\" not found"
            ));
        };
        let data: BTreeMap<String, Vec<u8>> = secret
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect();
        let default_mode = source["defaultMode"].as_u64().unwrap_or(0o644) as u32;
        let files: Vec<(String, String, u32)> = match source["items"].as_array() {
            Some(items) => items
                .iter()
                .map(|it| {
                    (
                        it["key"].as_str().unwrap_or("").to_owned(),
                        it["path"].as_str().unwrap_or("").to_owned(),
                        it["mode"].as_u64().map_or(default_mode, |m| m as u32),
                    )
                })
                .collect(),
            None => data
                .keys()
                .map(|k| (k.clone(), k.clone(), default_mode))
                .collect(),
        };
        for (key, path, mode) in files {
            let Some(bytes) = data.get(&key) else {
                if optional {
                    continue;
                }
                return Err(format!(
                    "MountVolume.SetUp failed for volume \"{volume}\" : references non-existent secret key: {key}"
                ));
            };
            let file = dir.join(&path);
            if let Some(parent) = file.parent() {
                std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
            }
            std::fs::write(&file, bytes).map_err(|e| e.to_string())?;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode & 0o777))
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// The local command line of a container, `None` for one without a command (simulated).
    fn prepare(&self, init: bool, i: usize) -> Result<Option<Launch>, String> {
        let c = if init { &self.init[i] } else { &self.app[i] };
        let spec = &c.spec;
        // Container path → local path, longest first.
        let mut mounts: Vec<(String, PathBuf)> = spec["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| {
                let dir = self.volumes.get(m["name"].as_str()?)?;
                let sub = m["subPath"].as_str().unwrap_or("");
                let local = if sub.is_empty() {
                    dir.clone()
                } else {
                    dir.join(sub)
                };
                Some((
                    m["mountPath"].as_str()?.trim_end_matches('/').to_owned(),
                    local,
                ))
            })
            .collect();
        let term_path = spec["terminationMessagePath"]
            .as_str()
            .unwrap_or("/dev/termination-log")
            .to_owned();
        mounts.push((term_path, c.term_file.clone()));
        mounts.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        let map = |s: &str| map_paths(s, &mounts);

        let mut env: Vec<(String, String)> = Vec::new();
        for e in spec["env"].as_array().into_iter().flatten() {
            let name = e["name"].as_str().unwrap_or("").to_owned();
            let value = if let Some(v) = e["value"].as_str() {
                expand(v, &env)
            } else if let Some(r) = e["valueFrom"]["secretKeyRef"].as_object() {
                let secret = r.get("name").and_then(Value::as_str).unwrap_or("");
                let key = r.get("key").and_then(Value::as_str).unwrap_or("");
                let optional = r.get("optional").and_then(Value::as_bool).unwrap_or(false);
                match self.secret(secret) {
                    Some(s) => match s.data.unwrap_or_default().get(key) {
                        Some(v) => String::from_utf8_lossy(&v.0).into_owned(),
                        None if optional => continue,
                        None => {
                            return Err(format!(
                                "couldn't find key {key} in Secret {}/{secret}",
                                self.ns()
                            ));
                        }
                    },
                    None if optional => continue,
                    None => return Err(format!("secret \"{secret}\" not found")),
                }
            } else if let Some(path) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                match path {
                    "metadata.name" => self.name().to_owned(),
                    "metadata.namespace" => self.ns().to_owned(),
                    "metadata.uid" => self.uid.clone(),
                    "spec.nodeName" => NODE.to_owned(),
                    "status.podIP" => self.pod_ip.clone(),
                    "status.hostIP" => "10.0.0.11".to_owned(),
                    other => match other
                        .strip_prefix("metadata.labels['")
                        .and_then(|r| r.strip_suffix("']"))
                    {
                        Some(label) => self.labels[label].as_str().unwrap_or("").to_owned(),
                        None => String::new(),
                    },
                }
            } else {
                String::new()
            };
            env.retain(|(n, _)| *n != name);
            env.push((name, value));
        }
        for from in spec["envFrom"].as_array().into_iter().flatten() {
            let Some(secret) = from["secretRef"]["name"].as_str() else {
                continue;
            };
            let prefix = from["prefix"].as_str().unwrap_or("");
            match self.secret(secret) {
                Some(s) => {
                    for (k, v) in s.data.unwrap_or_default() {
                        let name = format!("{prefix}{k}");
                        if !env.iter().any(|(n, _)| *n == name) {
                            env.push((name, String::from_utf8_lossy(&v.0).into_owned()));
                        }
                    }
                }
                None if from["secretRef"]["optional"].as_bool() == Some(true) => {}
                None => return Err(format!("secret \"{secret}\" not found")),
            }
        }

        let command: Vec<String> = spec["command"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(|s| expand(s, &env)))
            .collect();
        let args: Vec<String> = spec["args"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(|s| expand(s, &env)))
            .collect();
        if command.is_empty() {
            return Ok(None);
        }
        let program = {
            let first = &command[0];
            let mapped = map(first);
            if mapped != *first {
                PathBuf::from(mapped)
            } else if let Some(alias) = self.inner.lock().aliases.get(first) {
                alias.clone()
            } else {
                let base = Path::new(first)
                    .file_name()
                    .map(|b| b.to_string_lossy().into_owned())
                    .unwrap_or_default();
                match which(&base) {
                    Some(p) if !first.contains('/') || !Path::new(first).exists() => p,
                    _ if Path::new(first).is_file() => PathBuf::from(first),
                    _ => {
                        return Ok(Some(Launch::NotFound(first.clone())));
                    }
                }
            }
        };
        let mut local_env = vec![
            ("PATH".to_owned(), std::env::var("PATH").unwrap_or_default()),
            (
                "HOME".to_owned(),
                self.sandbox.join("home").to_string_lossy().into_owned(),
            ),
        ];
        for (k, v) in env {
            local_env.retain(|(n, _)| *n != k);
            local_env.push((k, map(&v)));
        }
        let workdir = spec["workingDir"]
            .as_str()
            .filter(|w| !w.is_empty())
            .map_or_else(|| self.sandbox.clone(), |w| PathBuf::from(map(w)));
        Ok(Some(Launch::Run {
            program,
            args: command[1..].iter().chain(&args).map(|a| map(a)).collect(),
            env: local_env,
            workdir,
        }))
    }

    /// Starts the process in its own group, with its output captured and its exit reported.
    fn spawn(&self, name: &str, launch: Launch) -> Result<i32, String> {
        let (program, args, env, workdir) = match launch {
            Launch::NotFound(cmd) => {
                return Err(format!(
                    "failed to create containerd task: failed to create shim task: OCI runtime create failed: runc create failed: unable to start container process: error during container init: exec: \"{cmd}\": executable file not found in $PATH: unknown"
                ));
            }
            Launch::Run {
                program,
                args,
                env,
                workdir,
            } => (program, args, env, workdir),
        };
        let mut child = tokio::process::Command::new(&program)
            .args(&args)
            .env_clear()
            .envs(env)
            .current_dir(&workdir)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                format!(
                    "failed to create containerd task: failed to create shim task: OCI runtime create failed: runc create failed: unable to start container process: error during container init: exec: \"{}\": {e}: unknown",
                    program.display()
                )
            })?;
        let pid = child.id().and_then(|p| i32::try_from(p).ok()).unwrap_or(0);
        self.runtime_ctr(name, |r| {
            r.pgid = Some(pid);
            r.started = true;
        });
        let readers: Vec<Box<dyn tokio::io::AsyncRead + Unpin + Send>> = [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        ]
        .into_iter()
        .flatten()
        .collect();
        let mut copiers = Vec::new();
        for mut reader in readers {
            let inner = self.inner.clone();
            let uid = self.uid.clone();
            let name = name.to_owned();
            copiers.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                while let Ok(n) = reader.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    inner.with(|s| {
                        if let Some(c) = s
                            .runtimes
                            .iter_mut()
                            .find(|rt| rt.uid == uid)
                            .and_then(|rt| rt.containers.get_mut(&name))
                        {
                            c.log.extend_from_slice(&buf[..n]);
                        }
                    });
                }
            }));
        }
        let tx = self.tx.clone();
        let container = name.to_owned();
        tokio::spawn(async move {
            use std::os::unix::process::ExitStatusExt;
            let code = match child.wait().await {
                Ok(status) => status
                    .code()
                    .unwrap_or_else(|| 128 + status.signal().unwrap_or(9)),
                Err(_) => 137,
            };
            // Output still buffered in the pipes belongs to the log before the exit is seen;
            // a background grandchild holding the pipe open must not hold the exit back.
            for copier in copiers {
                let _ = tokio::time::timeout(Duration::from_millis(500), copier).await;
            }
            let _ = tx.send(Ctl::Exited { container, code });
        });
        Ok(pid)
    }

    fn find(&mut self, container: &str) -> Option<&mut Ctr> {
        self.init
            .iter_mut()
            .chain(self.app.iter_mut())
            .find(|c| c.name == container)
    }

    fn terminate(&mut self, container: &str, code: i32) {
        let Some(c) = self.find(container) else {
            return;
        };
        let started = match &c.state {
            CState::Running(at) => Some(at.clone()),
            CState::Terminated { .. } => return,
            CState::Waiting(..) => None,
        };
        let reason = if c.lost {
            "ContainerStatusUnknown"
        } else if c.oom {
            "OOMKilled"
        } else if code == 0 {
            "Completed"
        } else {
            "Error"
        };
        let message = if c.lost {
            Some("The container could not be located when the pod was terminated".to_owned())
        } else {
            std::fs::read(&c.term_file)
                .ok()
                .filter(|b| !b.is_empty())
                .map(|b| String::from_utf8_lossy(&b[..b.len().min(4096)]).into_owned())
        };
        c.state = CState::Terminated {
            code: if c.lost { 137 } else { code },
            reason: reason.into(),
            message,
            started,
            finished: now(),
        };
        c.pgid = None;
        let name = c.name.clone();
        self.runtime_ctr(&name, |r| r.finished = true);
    }

    async fn handle(&mut self, ctl: Ctl) -> Result<(), Gone> {
        match ctl {
            Ctl::Exited { container, code } => self.terminate(&container, code),
            Ctl::Stop { container, code } => {
                if self
                    .find(&container)
                    .is_some_and(|c| c.simulated && c.running())
                {
                    self.terminate(&container, code);
                }
            }
            Ctl::OomKill(container) => {
                let Some(c) = self.find(&container) else {
                    return Ok(());
                };
                if !c.running() {
                    return Ok(());
                }
                c.oom = true;
                let simulated = c.simulated;
                if let Some(pgid) = c.pgid {
                    kill_group(pgid, true);
                }
                self.event(
                    "Warning",
                    "OOMKilling",
                    &format!("Memory cgroup out of memory: Killed process in container {container} of pod {}", self.name()),
                    "kernel-monitor",
                    None,
                );
                if simulated {
                    self.terminate(&container, 137);
                }
            }
            Ctl::Delete { grace } => {
                self.stop_all(Duration::from_secs(u64::try_from(grace).unwrap_or(0)), true)
                    .await;
                self.publish()?;
                self.inner.with(|s| s.remove_now(&self.key, "Background"));
                return Err(Gone);
            }
            Ctl::Kill => {
                self.stop_all(Duration::ZERO, false).await;
                return Err(Gone);
            }
            Ctl::Evict => {
                let message = "The node was low on resource: memory. Threshold quantity: 100Mi, available: 51200Ki. ";
                let mut detail = String::from(message);
                for c in self.app.iter().filter(|c| c.running()) {
                    detail.push_str(&format!(
                        "Container {} was using 1843200Ki, request is 0, has larger consumption of memory. ",
                        c.name
                    ));
                }
                let detail = detail.trim_end().to_owned();
                self.set_condition("DisruptionTarget", "True", "TerminationByKubelet", &detail);
                self.event("Warning", "Evicted", &detail, "kubelet", None);
                self.fail_on_node("Evicted", &detail, Duration::ZERO)
                    .await?;
            }
            Ctl::Preempt => {
                self.set_condition(
                    "DisruptionTarget",
                    "True",
                    "PreemptionByScheduler",
                    "default-scheduler: preempting to accommodate a higher priority pod",
                );
                self.publish()?;
                self.event(
                    "Normal",
                    "Preempted",
                    &format!("Preempted by pod {} on node {NODE}", uuid()),
                    "default-scheduler",
                    None,
                );
                let key = self.key.clone();
                let _ = self
                    .inner
                    .with(|s| s.delete(&key, &super::store::DeleteOptions::default()));
            }
            Ctl::SpotReclaim => {
                self.set_condition(
                    "ContainerInstanceExpired",
                    "True",
                    "ContainerInstanceExpired",
                    "The spot instance is going to be released",
                );
                self.publish()?;
                self.event(
                    "Warning",
                    "SpotToBeReleased",
                    "Spot ECI will be released in 3 minutes",
                    "eci-controller",
                    None,
                );
                self.fail_on_node(
                    "BidFailed",
                    "The spot instance that runs the pod has been released",
                    Duration::from_secs(u64::try_from(self.grace()).unwrap_or(0)),
                )
                .await?;
            }
            Ctl::NodeLost => {
                for c in self.init.iter_mut().chain(self.app.iter_mut()) {
                    c.lost = true;
                }
                let message = format!(
                    "Node {NODE} which was running pod {} is unresponsive",
                    self.name()
                );
                self.fail_on_node("NodeLost", &message, Duration::ZERO)
                    .await?;
            }
        }
        Ok(())
    }

    /// Stops everything and leaves the pod Failed with `status.reason`.
    async fn fail_on_node(
        &mut self,
        reason: &str,
        message: &str,
        grace: Duration,
    ) -> Result<(), Gone> {
        if self.stage == Stage::Done {
            return Ok(());
        }
        if reason == "DeadlineExceeded" {
            self.event("Warning", "DeadlineExceeded", message, "kubelet", None);
        }
        self.reason = Some((reason.to_owned(), message.to_owned()));
        self.stop_all(grace, reason != "NodeLost").await;
        // Containers that never started stay as they were; the pod is done.
        self.stage = Stage::Done;
        self.publish()
    }

    /// SIGTERM to every running container, SIGKILL after `grace`, until all have exited.
    async fn stop_all(&mut self, grace: Duration, announce: bool) {
        let running: Vec<(String, Option<i32>, bool)> = self
            .init
            .iter()
            .chain(&self.app)
            .filter(|c| c.running())
            .map(|c| (c.name.clone(), c.pgid, c.simulated))
            .collect();
        for (name, pgid, simulated) in &running {
            if announce {
                let field = format!("spec.containers{{{name}}}");
                self.event(
                    "Normal",
                    "Killing",
                    &format!("Stopping container {name}"),
                    "kubelet",
                    Some(&field),
                );
            }
            match pgid {
                Some(pgid) => kill_group(*pgid, grace.is_zero()),
                None if *simulated => self.terminate(name, if grace.is_zero() { 137 } else { 0 }),
                None => {}
            }
        }
        let kill_at = Instant::now() + grace;
        let mut killed = grace.is_zero();
        while self
            .init
            .iter()
            .chain(&self.app)
            .any(|c| c.running() && c.pgid.is_some())
        {
            let wait_until = if killed {
                Instant::now() + Duration::from_secs(5)
            } else {
                kill_at
            };
            match tokio::time::timeout_at(wait_until, self.rx.recv()).await {
                Ok(Some(Ctl::Exited { container, code })) => self.terminate(&container, code),
                Ok(Some(Ctl::Kill)) if !killed => {
                    killed = true;
                    self.kill_remaining();
                }
                Ok(Some(other)) => self.pending.push_back(other),
                Ok(None) => return,
                Err(_) if !killed => {
                    killed = true;
                    self.kill_remaining();
                }
                Err(_) => {
                    // A process that survives SIGKILL for 5 s: report it lost.
                    let stuck: Vec<String> = self
                        .init
                        .iter()
                        .chain(&self.app)
                        .filter(|c| c.running())
                        .map(|c| c.name.clone())
                        .collect();
                    for name in stuck {
                        self.terminate(&name, 137);
                    }
                }
            }
        }
    }

    fn kill_remaining(&mut self) {
        for c in self.init.iter().chain(&self.app) {
            if let Some(pgid) = c.pgid {
                kill_group(pgid, true);
            }
        }
    }

    fn condition(&self, kind: &str) -> Option<&(String, String, String, String, String)> {
        self.conditions.iter().find(|c| c.0 == kind)
    }

    fn set_condition(&mut self, kind: &str, status: &str, reason: &str, message: &str) {
        match self.conditions.iter_mut().find(|c| c.0 == kind) {
            Some(c) => {
                if c.1 != status {
                    c.4 = now();
                }
                c.1 = status.to_owned();
                c.2 = reason.to_owned();
                c.3 = message.to_owned();
            }
            None => self.conditions.push((
                kind.to_owned(),
                status.to_owned(),
                reason.to_owned(),
                message.to_owned(),
                now(),
            )),
        }
    }

    fn phase(&self) -> &'static str {
        if self.stage < Stage::Mounting || (self.stage == Stage::Mounting && self.reason.is_none())
        {
            return "Pending";
        }
        if self.reason.is_some() {
            return if self.stage == Stage::Done {
                "Failed"
            } else {
                "Running"
            };
        }
        if self
            .init
            .iter()
            .any(|c| c.exit_code().is_some_and(|c| c != 0))
        {
            return "Failed";
        }
        if self.init.iter().any(|c| c.exit_code() != Some(0)) {
            return "Pending";
        }
        let waiting = self
            .app
            .iter()
            .filter(|c| matches!(c.state, CState::Waiting(..)))
            .count();
        let running = self.app.iter().filter(|c| c.running()).count();
        if waiting > 0 {
            "Pending"
        } else if running > 0 {
            "Running"
        } else if self.app.iter().any(|c| c.exit_code() != Some(0)) {
            "Failed"
        } else {
            "Succeeded"
        }
    }

    /// The derived conditions (Initialized, Ready, ContainersReady).
    fn derive_conditions(&mut self) {
        if self.stage == Stage::Scheduling {
            return;
        }
        if self.condition("PodReadyToStartContainers").is_none() {
            self.set_condition("PodReadyToStartContainers", "False", "", "");
        }
        let incomplete: Vec<&str> = self
            .init
            .iter()
            .filter(|c| c.exit_code() != Some(0))
            .map(|c| c.name.as_str())
            .collect();
        let (status, reason, message) = if incomplete.is_empty() {
            ("True", "", String::new())
        } else {
            (
                "False",
                "ContainersNotInitialized",
                format!(
                    "containers with incomplete status: [{}]",
                    incomplete.join(" ")
                ),
            )
        };
        self.set_condition("Initialized", status, reason, &message);
        let phase = self.phase();
        let unready: Vec<&str> = self
            .app
            .iter()
            .filter(|c| !c.running())
            .map(|c| c.name.as_str())
            .collect();
        let (status, reason, message) = if matches!(phase, "Succeeded" | "Failed") {
            ("False", "PodCompleted", String::new())
        } else if unready.is_empty() {
            ("True", "", String::new())
        } else {
            (
                "False",
                "ContainersNotReady",
                format!("containers with unready status: [{}]", unready.join(" ")),
            )
        };
        for kind in ["Ready", "ContainersReady"] {
            self.set_condition(kind, status, reason, &message);
        }
    }

    fn status(&mut self) -> Value {
        self.derive_conditions();
        let order = [
            "PodReadyToStartContainers",
            "Initialized",
            "Ready",
            "ContainersReady",
            "PodScheduled",
        ];
        let mut conditions: Vec<&(String, String, String, String, String)> =
            self.conditions.iter().collect();
        conditions.sort_by_key(|c| order.iter().position(|o| *o == c.0).unwrap_or(order.len()));
        let conditions: Vec<Value> = conditions
            .into_iter()
            .map(|(kind, status, reason, message, at)| {
                let mut c = json!({ "type": kind, "status": status, "lastProbeTime": null, "lastTransitionTime": at });
                if !reason.is_empty() {
                    c["reason"] = json!(reason);
                }
                if !message.is_empty() {
                    c["message"] = json!(message);
                }
                c
            })
            .collect();
        let mut status =
            json!({ "phase": self.phase(), "conditions": conditions, "qosClass": "BestEffort" });
        if self.stage > Stage::Scheduling {
            status["hostIP"] = json!("10.0.0.11");
            status["hostIPs"] = json!([{ "ip": "10.0.0.11" }]);
            status["startTime"] = json!(self.start_time);
            status["containerStatuses"] = self.app.iter().map(Ctr::status).collect();
            if !self.init.is_empty() {
                status["initContainerStatuses"] = self.init.iter().map(Ctr::status).collect();
            }
        }
        if self.stage >= Stage::Starting && self.reason.as_ref().is_none_or(|r| r.0 != "NodeLost") {
            status["podIP"] = json!(self.pod_ip);
            status["podIPs"] = json!([{ "ip": self.pod_ip }]);
        }
        if let Some((reason, message)) = &self.reason {
            status["reason"] = json!(reason);
            status["message"] = json!(message);
        }
        status
    }

    /// Writes the status through the store when it changed; `Gone` when the pod was removed.
    fn publish(&mut self) -> Result<(), Gone> {
        let status = self.status();
        let key = self.key.clone();
        let uid = self.uid.clone();
        self.inner.with(|s| {
            let Some(pod) = s.store.objects.get(&key) else {
                return Err(Gone);
            };
            if pod["metadata"]["uid"].as_str() != Some(uid.as_str()) {
                return Err(Gone);
            }
            if pod["status"] == status {
                return Ok(());
            }
            let mut pod = pod.clone();
            pod["status"] = status;
            s.store.replace(&key, pod);
            Ok(())
        })
    }

    /// The scheduler's binding: `spec.nodeName`.
    fn bind(&mut self) -> Result<(), Gone> {
        let key = self.key.clone();
        let uid = self.uid.clone();
        self.inner.with(|s| {
            let Some(pod) = s.store.objects.get(&key) else {
                return Err(Gone);
            };
            if pod["metadata"]["uid"].as_str() != Some(uid.as_str()) {
                return Err(Gone);
            }
            let mut pod = pod.clone();
            pod["spec"]["nodeName"] = json!(NODE);
            s.store.replace(&key, pod);
            Ok(())
        })?;
        self.publish()
    }

    /// Records an Event about this pod; a repeat of the same one counts up.
    fn event(&self, kind: &str, reason: &str, message: &str, component: &str, field: Option<&str>) {
        let (ns, name, uid) = (
            self.ns().to_owned(),
            self.name().to_owned(),
            self.uid.clone(),
        );
        self.inner
            .with(|s| record_event(s, &ns, &name, &uid, kind, reason, message, component, field));
    }
}

#[allow(clippy::too_many_arguments)]
fn record_event(
    s: &mut State,
    ns: &str,
    pod: &str,
    uid: &str,
    kind: &str,
    reason: &str,
    message: &str,
    component: &str,
    field: Option<&str>,
) {
    let time = now();
    let existing = s.store.objects.iter().find(|((r, n, _), e)| {
        *r == Res::Events
            && n == ns
            && e["involvedObject"]["uid"].as_str() == Some(uid)
            && e["reason"].as_str() == Some(reason)
            && e["message"].as_str() == Some(message)
    });
    if let Some((key, event)) = existing {
        let key = key.clone();
        let mut event = event.clone();
        event["count"] = json!(event["count"].as_i64().unwrap_or(1) + 1);
        event["lastTimestamp"] = json!(time);
        s.store.replace(&key, event);
        return;
    }
    let mut involved =
        json!({ "kind": "Pod", "namespace": ns, "name": pod, "uid": uid, "apiVersion": "v1" });
    if let Some(field) = field {
        involved["fieldPath"] = json!(field);
    }
    // The recorder's naming: `<object>.<UnixNano in hex>`, so names sort by time.
    let nanos = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0);
    let mut name = format!("{pod}.{nanos:x}");
    let mut bump = nanos;
    while s.store.get(Res::Events, ns, &name).is_some() {
        bump += 1;
        name = format!("{pod}.{bump:x}");
    }
    let host = if component == "kubelet" {
        json!({ "component": component, "host": NODE })
    } else {
        json!({ "component": component })
    };
    let event = json!({
        "kind": "Event", "apiVersion": "v1",
        "metadata": { "name": name },
        "involvedObject": involved,
        "reason": reason, "message": message, "type": kind,
        "source": host,
        "firstTimestamp": time, "lastTimestamp": time, "count": 1,
        "reportingComponent": component, "reportingInstance": if component == "kubelet" { NODE } else { "" },
    });
    let _ = s.store.create(Res::Events, ns, event);
}

enum Launch {
    Run {
        program: PathBuf,
        args: Vec<String>,
        env: Vec<(String, String)>,
        workdir: PathBuf,
    },
    NotFound(String),
}

/// Rewrites every container path in `s` that lies under a mount (at a path boundary) to
/// the local directory behind it; `mounts` is sorted longest first.
fn map_paths(s: &str, mounts: &[(String, PathBuf)]) -> String {
    let path_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/');
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    'outer: while i < s.len() {
        let before_ok = s[..i].chars().next_back().is_none_or(|c| !path_char(c));
        if before_ok && s[i..].starts_with('/') {
            for (mount, local) in mounts {
                if mount.is_empty() || !s[i..].starts_with(mount.as_str()) {
                    continue;
                }
                let end = i + mount.len();
                let after_ok = s[end..]
                    .chars()
                    .next()
                    .is_none_or(|c| c == '/' || !path_char(c));
                if after_ok {
                    out.push_str(&local.to_string_lossy());
                    i = end;
                    continue 'outer;
                }
            }
        }
        let ch = s[i..].chars().next().unwrap_or(' ');
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

/// Kubernetes `$(VAR)` expansion against the container's earlier env entries.
fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = s.to_owned();
    for (name, value) in env {
        out = out.replace(&format!("$({name})"), value);
    }
    out.replace("$$(", "$(")
}

fn which(name: &str) -> Option<PathBuf> {
    if name.is_empty() {
        return None;
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Where the data of claim `claim` in `namespace` lives.
pub(crate) fn claim_dir(root: &Path, namespace: &str, claim: &str) -> PathBuf {
    root.join("claims").join(namespace).join(claim)
}

/// The registry host of an image reference (`docker.io` for Docker Hub's short names).
fn registry_of(image: &str) -> String {
    match image.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            first.to_owned()
        }
        _ => "docker.io".to_owned(),
    }
}

/// The registry host of a key of `auths` (`https://registry.example.com/v1/` → the host), as
/// the kubelet's credential keyring matches them.
fn registry_of_key(key: &str) -> String {
    let host = key
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or_default();
    match host {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".to_owned(),
        other => other.to_owned(),
    }
}

fn full_reference(image: &str) -> String {
    let with_tag = if image
        .rsplit('/')
        .next()
        .is_some_and(|last| last.contains(':') || last.contains('@'))
    {
        image.to_owned()
    } else {
        format!("{image}:latest")
    };
    let first = with_tag.split('/').next().unwrap_or("");
    if with_tag.contains('/')
        && (first.contains('.') || first.contains(':') || first == "localhost")
    {
        with_tag
    } else if with_tag.contains('/') {
        format!("docker.io/{with_tag}")
    } else {
        format!("docker.io/library/{with_tag}")
    }
}

fn image_id(image: &str) -> String {
    let reference = full_reference(image);
    let repo = reference.split(['@']).next().unwrap_or(&reference);
    let repo = match repo.rsplit_once(':') {
        Some((r, tag)) if !tag.contains('/') => r,
        _ => repo,
    };
    format!(
        "{repo}@sha256:{}",
        hex::encode(Sha256::digest(image.as_bytes()))
    )
}
