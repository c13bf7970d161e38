//! Warm pods ([`WarmPods`]): build pods made before their job (`podspec::warm_pod`), counted
//! from the executor's one pod watch, taken for a build by one conditional write of their
//! Secret, and handed their job over the pod network, sealed with the pod's own key
//! (`crate::handoff`). Once taken, a warm pod is its build's pod under the pod's name: the
//! launch of that build hands the job over (idempotent; it creates nothing), and so does the
//! watch of an adopting coordinator when the one that took it died before the hand-off.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};

use super::classify::{self, Limits, Memory, Verdict};
use super::client::is_status;
use super::podspec::{BUILD_CONTAINER, HANDOFF_CONTAINER};
use super::{KubernetesExecutor, describe, images, labels, podspec, sizing};
use crate::build::{Build, BuildKey, Workload};
use crate::executor::{
    ExecutorError, LaunchError, TakeError, WarmPod, WarmPods, WarmShape, WarmState,
};
use crate::handoff::{self, Handoff};

/// The start of every warm pod's name (a build launched under such a name is a hand-off).
const WARM_PREFIX: &str = "kiln-warm-";
/// How long the first listing waits for the pod watch to have listed the pods.
const SYNC_WAIT: Duration = Duration::from_secs(30);
/// How long a hand-off is tried (the pod's agent starting to listen, a lost answer).
const HANDOFF_PATIENCE: Duration = Duration::from_secs(60);
/// How soon a hand-off the pod's agent was not ready for is tried again (it starts listening
/// a moment after its container runs).
const HANDOFF_RETRY: Duration = Duration::from_millis(50);
/// How long one hand-off request may take.
const HANDOFF_TIMEOUT: Duration = Duration::from_secs(10);
/// How old a warm pod's Secret without its pod must be to be called broken (younger ones may
/// be starting, their pod not created yet).
const LONELY_SECRET_AGE: Duration = Duration::from_secs(60);

/// What the executor keeps about warm pods besides the pod watch.
pub(super) struct WarmSide {
    http: reqwest::Client,
    /// Builds whose job this process handed over.
    handed: Mutex<HashSet<String>>,
    /// The sealed hand-off of each pod this process took, until it is handed over (saves
    /// reading the Secret again).
    taken: Mutex<HashMap<String, (BuildKey, Vec<u8>)>>,
    /// Warm pods this process retired (their deletion is no news).
    retired: Mutex<HashSet<String>>,
    /// What the classifier remembers of each untaken pod (how long a pull has failed).
    memory: Mutex<HashMap<String, Memory>>,
    /// Whether the warm Secrets left without their pod were looked for (once, at the first
    /// listing).
    lonely_checked: Mutex<bool>,
}

impl WarmSide {
    pub(super) fn new() -> Self {
        Self {
            // Pod IPs are never reached through a proxy.
            http: reqwest::Client::builder()
                .no_proxy()
                .connect_timeout(Duration::from_secs(2))
                .timeout(HANDOFF_TIMEOUT)
                .build()
                .unwrap_or_default(),
            handed: Mutex::default(),
            taken: Mutex::default(),
            retired: Mutex::default(),
            memory: Mutex::default(),
            lonely_checked: Mutex::new(false),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether `name` is a warm pod's (a build under it runs on a warm pod).
pub(super) fn is_warm(name: &str) -> bool {
    name.starts_with(WARM_PREFIX)
}

/// A new warm pod name for `pool`: the pool's name as far as a name can hold it, and a random
/// suffix.
fn new_name(pool: &str) -> String {
    let mut part: String = pool
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(30)
        .collect();
    while part.ends_with('-') {
        part.pop();
    }
    let suffix = format!("{:08x}", rand::random::<u32>());
    if part.trim_start_matches('-').is_empty() {
        format!("{WARM_PREFIX}{suffix}")
    } else {
        format!("{WARM_PREFIX}{}-{suffix}", part.trim_start_matches('-'))
    }
}

impl KubernetesExecutor {
    fn fits_shape(&self, build: &Build, shape: &WarmShape) -> Result<(), String> {
        let config = &self.config;
        let Workload::KilnAgent { image, services } = &build.workload else {
            return Err("the build is not a GitLab job".into());
        };
        if !services.is_empty() {
            return Err("the job has services".into());
        }
        let name = image
            .as_ref()
            .map_or(config.default_image.as_str(), |i| i.name.as_str());
        if name != shape.image {
            return Err(format!(
                "the job's image {name} is not the pool's ({})",
                shape.image
            ));
        }
        if let Some(image) = image {
            if image.entrypoint.iter().any(|part| !part.is_empty()) {
                return Err("the job's image sets an entrypoint".into());
            }
            if image.user.is_some() {
                return Err("the job's image sets a user".into());
            }
            // The pod's image was pulled when it started: a job that wants it pulled afresh
            // (`always`) starts cold; `if-not-present` and `never` are met.
            let asked = images::pull_policy(&image.pull_policies, config).map_err(|e| e.0)?;
            let made = images::pull_policy(&[], config).map_err(|e| e.0)?;
            if asked == Some("Always") && made != Some("Always") {
                return Err("the job asks for pull policy always".into());
            }
        }
        if let Some(first) = build.requests.first() {
            return Err(format!(
                "the job overrides its pod's settings ({})",
                first.origin
            ));
        }
        if images::docker_config(build, config).is_some() {
            return Err("the job pulls with registry logins".into());
        }
        images::check_allowed(build, config).map_err(|e| e.0)?;
        let (job_class, _) =
            sizing::resource_class(build.class.as_ref(), config).map_err(|e| e.0)?;
        let shape_choice = shape.class.as_ref().map(|name| crate::build::ClassChoice {
            name: name.clone(),
            origin: format!("warm pool `{}`", shape.pool),
        });
        let (pool_class, _) =
            sizing::resource_class(shape_choice.as_ref(), config).map_err(|e| e.0)?;
        if job_class != pool_class {
            return Err(format!(
                "the job's resource class {} is not the pool's ({})",
                job_class.as_deref().unwrap_or("(none)"),
                pool_class.as_deref().unwrap_or("(none)")
            ));
        }
        Ok(())
    }

    async fn start_warm(&self, shape: &WarmShape) -> Result<String, LaunchError> {
        let name = new_name(&shape.pool);
        let key = handoff::new_key();
        let (pod, secret) =
            podspec::warm_pod(shape, &name, &key, &self.config, self.cluster.namespace())
                .map_err(|e| LaunchError::Rejected(e.0))?;
        self.create(&pod, &secret).await?;
        // Counted from now on, before the watch shows it.
        let mut seen = pod;
        seen.metadata.creation_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now()),
        );
        self.pods.seed(seen);
        tracing::info!(pod = %name, pool = %shape.pool, image = %shape.image, "warm pod created");
        Ok(name)
    }

    /// Where an untaken warm pod is.
    fn warm_state(&self, pod: &Pod) -> WarmState {
        let name = pod.metadata.name.clone().unwrap_or_default();
        if pod.metadata.deletion_timestamp.is_some() {
            return WarmState::Broken("the pod is being deleted".into());
        }
        let limits = Limits {
            main: BUILD_CONTAINER,
            pending_timeout: self.config.pending_timeout,
            image_pull_grace: self.config.image_pull_grace,
        };
        let verdict = {
            let mut memory = lock(&self.warm.memory);
            let memory = memory.entry(name).or_default();
            classify::classify(pod, Timestamp::now(), limits, memory)
        };
        match verdict {
            Verdict::Ended(end) => return WarmState::Broken(end.detail),
            Verdict::NextPullPolicy { failure, .. } => return WarmState::Broken(failure),
            Verdict::Wait { .. } => {}
        }
        let statuses = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_deref())
            .unwrap_or_default();
        let state_of = |container: &str| {
            statuses
                .iter()
                .find(|c| c.name == container)
                .and_then(|c| c.state.clone())
        };
        if let Some(ended) = state_of(HANDOFF_CONTAINER).and_then(|s| s.terminated) {
            return WarmState::Broken(format!(
                "its handoff container ended before it took a job (exit code {})",
                ended.exit_code
            ));
        }
        let running = |container: &str| state_of(container).is_some_and(|s| s.running.is_some());
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if phase == Some("Running") && running(HANDOFF_CONTAINER) && running(BUILD_CONTAINER) {
            WarmState::Idle
        } else {
            WarmState::Starting
        }
    }

    fn warm_pod_of(&self, pod: &Pod, state: WarmState) -> WarmPod {
        WarmPod {
            name: pod.metadata.name.clone().unwrap_or_default(),
            pool: labels::warm_pool_of(&pod.metadata).unwrap_or_default(),
            state,
            created: pod
                .metadata
                .creation_timestamp
                .as_ref()
                .map_or(SystemTime::now(), |t| SystemTime::from(t.0)),
            replica: labels::replica_of(&pod.metadata),
        }
    }

    async fn list_warm(&self) -> Result<Vec<WarmPod>, ExecutorError> {
        if !self.pods.wait_synced(SYNC_WAIT).await {
            return Err(ExecutorError::List {
                message: "the watch of the build pods has not listed them yet".into(),
            });
        }
        let mut found: BTreeMap<String, WarmPod> = BTreeMap::new();
        {
            let mut retired = lock(&self.warm.retired);
            let present = self.pods.present(|p| labels::is_untaken_warm(&p.metadata));
            let vanished = self.pods.vanished();
            // A retired pod is remembered until the watch has seen it go.
            retired.retain(|name| {
                present
                    .iter()
                    .any(|p| p.metadata.name.as_ref() == Some(name))
                    || vanished.iter().any(|(n, _)| n == name)
            });
            for pod in present {
                let name = pod.metadata.name.clone().unwrap_or_default();
                if retired.contains(&name) {
                    continue;
                }
                let state = self.warm_state(&pod);
                found.insert(name, self.warm_pod_of(&pod, state));
            }
            for (name, last) in vanished {
                if retired.remove(&name) {
                    self.pods.forget_vanished(&name);
                    continue;
                }
                if found.contains_key(&name) {
                    continue;
                }
                let cause = classify::deleted(Some(&last)).detail;
                let warm = self.warm_pod_of(
                    &last,
                    WarmState::Broken(cause.replace("build pod", "warm pod")),
                );
                found.insert(name, warm);
            }
        }
        let check_lonely = !std::mem::replace(&mut *lock(&self.warm.lonely_checked), true);
        if check_lonely {
            for warm in self.lonely_warm_secrets(&found).await? {
                found.insert(warm.name.clone(), warm);
            }
        }
        let mut memory = lock(&self.warm.memory);
        memory.retain(|name, _| found.contains_key(name));
        Ok(found.into_values().collect())
    }

    /// Untaken warm pods' Secrets whose pod is gone (a coordinator died between the two
    /// creates, or the pod was deleted while no coordinator watched), as broken warm pods.
    async fn lonely_warm_secrets(
        &self,
        known: &BTreeMap<String, WarmPod>,
    ) -> Result<Vec<WarmPod>, ExecutorError> {
        let secrets: Api<Secret> = self.cluster.api();
        let params = ListParams::default().labels(&self.selector);
        let list = self
            .cluster
            .call(|| secrets.list(&params))
            .await
            .map_err(|e| ExecutorError::List {
                message: format!(
                    "cannot list the warm pods' Secrets in namespace `{}`: {}",
                    self.cluster.namespace(),
                    describe(&e)
                ),
            })?;
        let now = SystemTime::now();
        Ok(list
            .items
            .into_iter()
            .filter(|s| labels::is_untaken_warm(&s.metadata))
            .filter_map(|s| {
                let name = s.metadata.name.clone()?;
                let created = s
                    .metadata
                    .creation_timestamp
                    .as_ref()
                    .map_or(now, |t| SystemTime::from(t.0));
                let old = now.duration_since(created).unwrap_or_default() > LONELY_SECRET_AGE;
                (old && !known.contains_key(&name) && self.pods.latest(&name).is_none()).then(
                    || WarmPod {
                        name,
                        pool: labels::warm_pool_of(&s.metadata).unwrap_or_default(),
                        state: WarmState::Broken("its pod is gone".into()),
                        created,
                        replica: labels::replica_of(&s.metadata),
                    },
                )
            })
            .collect())
    }

    async fn take_warm(&self, name: &str, build: &Build) -> Result<(), TakeError> {
        let unavailable = |reason: String| TakeError::Unavailable {
            pod: name.to_owned(),
            reason,
        };
        let Some(pod) = self.pods.latest(name) else {
            return Err(unavailable("it is gone".into()));
        };
        let ours = labels::key_of(&pod.metadata).as_ref() == Some(&build.key);
        if !ours {
            if !labels::is_untaken_warm(&pod.metadata) {
                return Err(unavailable("another build took it".into()));
            }
            if self.warm_state(&pod) != WarmState::Idle {
                return Err(unavailable("it is not idle".into()));
            }
        }
        let secrets: Api<Secret> = self.cluster.api();
        let secret = match self.cluster.call(|| secrets.get_opt(name)).await {
            Ok(Some(secret)) => secret,
            Ok(None) => return Err(unavailable("it is gone".into())),
            Err(e) => {
                return Err(unavailable(format!(
                    "its Secret cannot be read: {}",
                    describe(&e)
                )));
            }
        };
        let replica = self.config.replica.as_deref();
        let mut data: BTreeMap<String, Vec<u8>> = secret
            .data
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect();
        if labels::key_of(&secret.metadata).as_ref() != Some(&build.key) {
            if !labels::is_untaken_warm(&secret.metadata) {
                return Err(unavailable("another replica took it first".into()));
            }
            let mut patch = labels::take_patch(
                &self.config.coordinator,
                replica,
                build,
                secret.metadata.resource_version.as_deref(),
            );
            let added: BTreeMap<&String, ByteString> = build
                .secrets
                .iter()
                .filter(|(key, _)| key.as_str() != handoff::KEY_FILE)
                .map(|(key, value)| (key, ByteString(value.clone())))
                .collect();
            patch["data"] = serde_json::json!(added);
            data.extend(
                build
                    .secrets
                    .iter()
                    .filter(|(key, _)| key.as_str() != handoff::KEY_FILE)
                    .map(|(k, v)| (k.clone(), v.clone())),
            );
            let params = PatchParams::default();
            let merge = Patch::Merge(&patch);
            match self
                .cluster
                .call(|| secrets.patch(name, &params, &merge))
                .await
            {
                Ok(_) => {}
                Err(e) if is_status(&e, 409) => {
                    return Err(unavailable("another replica took it first".into()));
                }
                Err(e) if is_status(&e, 404) => return Err(unavailable("it is gone".into())),
                Err(e) => {
                    return Err(unavailable(format!(
                        "its Secret cannot be written: {}",
                        describe(&e)
                    )));
                }
            }
        }
        // The pod's labels mirror its Secret's: listing and following see the build.
        let mut patch = labels::taken_mirror_patch(&self.config.coordinator, replica, build);
        if let Some(annotations) = patch["metadata"]["annotations"].as_object_mut() {
            for (key, value) in &build.annotations {
                annotations.insert(key.clone(), serde_json::Value::String(value.clone()));
            }
        }
        let pods: Api<Pod> = self.cluster.api();
        let params = PatchParams::default();
        let merge = Patch::Merge(&patch);
        match self
            .cluster
            .call(|| pods.patch(name, &params, &merge))
            .await
        {
            Ok(pod) => {
                self.pods.written(pod);
                lock(&self.warm.memory).remove(name);
                if let Ok(body) = sealed(name, &build.key, &data) {
                    lock(&self.warm.taken).insert(name.to_owned(), (build.key.clone(), body));
                }
                tracing::info!(pod = name, build = %build.key, "warm pod taken");
                Ok(())
            }
            Err(e) => {
                // Half taken: the build starts cold, and the pod goes.
                self.remove(name).await;
                Err(TakeError::Failed(format!(
                    "warm pod {name} was taken but cannot be labelled for its build in namespace `{}`: {}",
                    self.cluster.namespace(),
                    describe(&e)
                )))
            }
        }
    }

    async fn retire_warm(&self, name: &str) {
        if let Some(pod) = self.pods.latest(name)
            && !labels::is_untaken_warm(&pod.metadata)
        {
            tracing::warn!(pod = name, "not retiring a warm pod that a build took");
            return;
        }
        lock(&self.warm.retired).insert(name.to_owned());
        lock(&self.warm.memory).remove(name);
        self.remove(name).await;
        tracing::info!(pod = name, "warm pod retired");
    }

    /// Hands taken warm pod `name` its job: the files its Secret got when it was taken,
    /// sealed with the pod's key, posted to the pod's agent. Done once a post is accepted
    /// (the same job again is accepted too) or the pod's handoff container ended well (it
    /// took the job from an earlier post).
    ///
    /// # Errors
    /// The pod was not taken, is gone, holds other work or never answered.
    pub(super) async fn hand_off(&self, name: &str) -> Result<(), LaunchError> {
        if lock(&self.warm.handed).contains(name) {
            return Ok(());
        }
        let failed = |why: String| LaunchError::Failed(format!("warm pod {name}: {why}"));
        if self
            .pods
            .latest(name)
            .is_some_and(|pod| handoff_exit(&pod) == Some(0))
        {
            // Its agent took the job from an earlier post (this or another coordinator's).
            lock(&self.warm.handed).insert(name.to_owned());
            return Ok(());
        }
        let taken = lock(&self.warm.taken).get(name).cloned();
        let (key, body) = match taken {
            Some(taken) => taken,
            None => {
                // Taken by another process (or before a restart): its Secret has it all.
                let secrets: Api<Secret> = self.cluster.api();
                let secret = match self.cluster.call(|| secrets.get_opt(name)).await {
                    Ok(Some(secret)) => secret,
                    Ok(None) => return Err(failed("its Secret is gone".into())),
                    Err(e) => {
                        return Err(failed(format!("cannot read its Secret: {}", describe(&e))));
                    }
                };
                let Some(key) = labels::key_of(&secret.metadata) else {
                    return Err(failed("no build took it".into()));
                };
                let data: BTreeMap<String, Vec<u8>> = secret
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0))
                    .collect();
                let body = sealed(name, &key, &data).map_err(failed)?;
                (key, body)
            }
        };
        let deadline = tokio::time::Instant::now() + HANDOFF_PATIENCE;
        let mut last_error = String::from("its IP is not known");
        loop {
            let pod = match self.pods.latest(name) {
                Some(pod) => Some(pod),
                None => {
                    let pods: Api<Pod> = self.cluster.api();
                    match self.cluster.call(|| pods.get_opt(name)).await {
                        Ok(Some(pod)) => Some(std::sync::Arc::new(pod)),
                        Ok(None) => return Err(failed("the pod is gone".into())),
                        Err(e) => {
                            last_error = describe(&e);
                            None
                        }
                    }
                }
            };
            if let Some(pod) = &pod {
                if let Some(code) = handoff_exit(pod) {
                    if code == 0 {
                        self.handed(name, &key);
                        return Ok(());
                    }
                    return Err(failed(format!(
                        "its handoff container ended with exit code {code}"
                    )));
                }
                if let Some(ip) = pod.status.as_ref().and_then(|s| s.pod_ip.as_deref()) {
                    match self.post(ip, &body).await {
                        Ok(()) => {
                            self.handed(name, &key);
                            return Ok(());
                        }
                        Err(Post::Refused(why)) => return Err(failed(why)),
                        Err(Post::Unreachable(why)) => last_error = why,
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(failed(format!(
                    "its agent did not take the job within {}s: {last_error}",
                    HANDOFF_PATIENCE.as_secs()
                )));
            }
            tokio::time::sleep(HANDOFF_RETRY).await;
        }
    }

    fn handed(&self, name: &str, key: &BuildKey) {
        lock(&self.warm.handed).insert(name.to_owned());
        lock(&self.warm.taken).remove(name);
        tracing::info!(pod = name, build = %key, "job handed to its warm pod");
    }

    /// Forgets a build's hand-off (its pod is deleted).
    pub(super) fn forget_hand_off(&self, name: &str) {
        lock(&self.warm.handed).remove(name);
        lock(&self.warm.taken).remove(name);
    }

    async fn post(&self, ip: &str, body: &[u8]) -> Result<(), Post> {
        let host = match ip.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V6(v6)) => format!("[{v6}]"),
            _ => ip.to_owned(),
        };
        let url = format!("http://{host}:{}{}", handoff::PORT, handoff::PATH);
        let response = self
            .warm
            .http
            .post(&url)
            .header("content-type", "application/octet-stream")
            .body(body.to_vec())
            .send()
            .await
            .map_err(|e| Post::Unreachable(format!("{url}: {e}")))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let text = response.text().await.unwrap_or_default();
        let text: String = text.chars().take(200).collect();
        let why = format!("its agent refused the job: HTTP {status}: {}", text.trim());
        if status.is_server_error() {
            Err(Post::Unreachable(why))
        } else {
            Err(Post::Refused(why))
        }
    }
}

/// The hand-off of `build`'s files in `data` (a warm pod's Secret's data: its key and the
/// build's secrets) to pod `pod`, sealed with the pod's key.
fn sealed(
    pod: &str,
    build: &BuildKey,
    data: &BTreeMap<String, Vec<u8>>,
) -> Result<Vec<u8>, String> {
    let pod_key = data
        .get(handoff::KEY_FILE)
        .ok_or_else(|| "its Secret holds no hand-off key".to_owned())?;
    let handoff = Handoff::new(
        &build.to_string(),
        data.iter()
            .filter(|(name, _)| name.as_str() != handoff::KEY_FILE)
            .map(|(name, value)| (name.as_str(), value.as_slice())),
    );
    handoff::seal(pod_key, pod, &handoff).map_err(|e| e.to_string())
}

/// Why a hand-off post did not go through.
enum Post {
    /// The agent answered no (another job, a bad seal): trying again does not help.
    Refused(String),
    /// Not reached, or not yet: try again.
    Unreachable(String),
}

/// The exit code of a pod's handoff container, once it has ended.
fn handoff_exit(pod: &Pod) -> Option<i32> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == HANDOFF_CONTAINER)?
        .state
        .as_ref()?
        .terminated
        .as_ref()
        .map(|t| t.exit_code)
}

impl WarmPods for KubernetesExecutor {
    fn fits(&self, build: &Build, shape: &WarmShape) -> Result<(), String> {
        self.fits_shape(build, shape)
    }

    fn start<'a>(&'a self, shape: &'a WarmShape) -> BoxFuture<'a, Result<String, LaunchError>> {
        Box::pin(self.start_warm(shape))
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<WarmPod>, ExecutorError>> {
        Box::pin(self.list_warm())
    }

    fn take<'a>(&'a self, pod: &'a str, build: &'a Build) -> BoxFuture<'a, Result<(), TakeError>> {
        Box::pin(self.take_warm(pod, build))
    }

    fn retire<'a>(&'a self, pod: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(self.retire_warm(pod))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warm_pod_names_hold_the_pool_as_far_as_a_name_can() {
        let name = new_name("Maven 3.9 / JDK21");
        assert!(name.starts_with("kiln-warm-maven-3-9---jdk21-"), "{name}");
        assert!(is_warm(&name));
        assert_eq!(new_name("").len(), WARM_PREFIX.len() + 8);
        assert!(new_name(&"x".repeat(100)).len() <= WARM_PREFIX.len() + 30 + 9);
        assert!(!is_warm("kiln-gl-12"));
    }
}
