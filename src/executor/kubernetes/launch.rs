//! Starting and removing a build: its Secret first (ahead of the launch when it is persisted),
//! then its pod owned by the Secret, marked with the launch attempt that created it; removing
//! deletes both.

use std::collections::HashMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{KeyToPath, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions, PropagationPolicy};

use super::client::is_status;
use super::{KubernetesExecutor, describe, images, labels, podspec, sizing};
use crate::build::{Build, START_NOTES_FILE};
use crate::executor::LaunchError;

/// Grace period when kiln deletes a pod whose build container has ended: only sidecars are
/// left, and they must not keep the pod (and its bill) alive.
const DELETE_GRACE_SECONDS: u32 = 2;

impl KubernetesExecutor {
    pub(super) async fn launch_build(&self, build: &Build) -> Result<(), LaunchError> {
        if super::warm::is_warm(&build.name) {
            // A build on a warm pod it took: its pod is there and waits for the job.
            return self.hand_off(&build.name).await;
        }
        let namespace = self.build_namespace(build)?;
        let pod = podspec::pod(build, &self.config, &namespace)
            .map_err(|e| LaunchError::Rejected(e.0))?;
        let secret = podspec::secret(build, &self.config, &namespace);
        self.remember_namespace(&build.name, Some(&namespace));
        self.create(&pod, &secret).await
    }

    /// The namespace `build` goes to (its allowed `KUBERNETES_NAMESPACE_OVERWRITE`, else the
    /// configured one), decided before anything of it is created.
    fn build_namespace(&self, build: &Build) -> Result<String, LaunchError> {
        sizing::namespace(&build.requests, &self.config, self.cluster.namespace())
            .map_err(|e| LaunchError::Rejected(e.0))
    }

    /// Creates the Secret, then the pod, owned by the Secret: two API calls per build. The
    /// Secret comes first, so the pod never waits for its volume, and a coordinator that dies
    /// right after still leaves the build's secret data (a job token) for the next one to fail
    /// the job with. Owned by the Secret, the pod is collected with it if kiln's own delete
    /// never came. A pod of that name that exists already is never touched: another
    /// coordinator runs that build.
    pub(super) async fn create(&self, pod: &Pod, secret: &Secret) -> Result<(), LaunchError> {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let create = PostParams::default();
        let persisted = self.persisted_lock().remove(&name);
        let (secret_uid, secret_was_there) = match persisted {
            // Created by `persist` for this very launch: removed with it if the pod fails.
            Some(uid) => (uid, false),
            None => self.create_secret(secret).await?,
        };
        let mut pod = pod.clone();
        if let Some(uid) = secret_uid {
            pod.metadata.owner_references = Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Secret".into(),
                name: name.clone(),
                uid,
                block_owner_deletion: Some(false),
                controller: Some(false),
            }]);
        }
        let pods: Api<Pod> = self.api_of(&name);
        // A create whose answer was lost (connection reset after the API server stored the
        // pod) is retried and then gets 409 for kiln's own pod; without a mark of this attempt
        // kiln took it for another coordinator's and left it running unwatched. The mark tells
        // the two apart.
        let launch_id = format!("{:016x}", rand::random::<u64>());
        labels::annotate_launch(&mut pod.metadata, &launch_id);
        match self.cluster.call(|| pods.create(&create, &pod)).await {
            Ok(_) => {
                tracing::info!(pod = %name, namespace = self.namespace_of(&name), "pod created");
                Ok(())
            }
            Err(e) if is_status(&e, 409) => match self.cluster.call(|| pods.get(&name)).await {
                Ok(existing) if labels::launch_of(&existing.metadata) == Some(&launch_id) => {
                    tracing::info!(pod = %name, namespace = self.namespace_of(&name), "pod created (its create was retried after the first answer was lost)");
                    Ok(())
                }
                _ => Err(LaunchError::Exists(name)),
            },
            Err(kube::Error::Api(status)) if matches!(status.code, 400 | 422) => {
                if !secret_was_there {
                    self.remove(&name).await;
                }
                Err(LaunchError::Rejected(format!(
                    "the Kubernetes API rejected the pod ({}): {}",
                    status.reason, status.message
                )))
            }
            Err(e) => {
                if !secret_was_there {
                    self.remove(&name).await;
                }
                Err(self.failed("create the pod", &name, &e))
            }
        }
    }

    /// Creates the build's Secret: its uid, and whether it was there already (left by an
    /// earlier try).
    async fn create_secret(&self, secret: &Secret) -> Result<(Option<String>, bool), LaunchError> {
        let name = secret.metadata.name.clone().unwrap_or_default();
        let secrets: Api<Secret> = self.api_of(&name);
        let create = PostParams::default();
        match self.cluster.call(|| secrets.create(&create, secret)).await {
            Ok(created) => Ok((created.metadata.uid, false)),
            Err(e) if is_status(&e, 409) => {
                // Left by an earlier try: read its uid to own the pod (rare, one call).
                let uid = self
                    .cluster
                    .call(|| secrets.get(&name))
                    .await
                    .ok()
                    .and_then(|s| s.metadata.uid);
                Ok((uid, true))
            }
            Err(e) => Err(self.failed("create the build's Secret", &name, &e)),
        }
    }

    /// Creates `build`'s Secret ahead of its launch (see [`crate::executor::SharedBuilds::persist`]).
    pub(super) async fn persist_build(&self, build: &Build) -> Result<(), LaunchError> {
        // A refused image leaves nothing behind, not even the Secret.
        super::images::check_allowed(build, &self.config)
            .map_err(|e| LaunchError::Rejected(e.0))?;
        // So does a namespace the job may not move to.
        let namespace = self.build_namespace(build)?;
        let secret = podspec::secret(build, &self.config, &namespace);
        self.remember_namespace(&build.name, Some(&namespace));
        let (uid, _) = self.create_secret(&secret).await?;
        self.persisted_lock().insert(build.name.clone(), uid);
        Ok(())
    }

    pub(super) fn persisted_lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, Option<String>>> {
        self.persisted.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn failed(&self, what: &str, name: &str, error: &kube::Error) -> LaunchError {
        LaunchError::Failed(format!(
            "cannot {what} in namespace `{}`: {}",
            self.namespace_of(name),
            describe(error)
        ))
    }

    /// Deletes the pod and its Secret; missing ones are fine.
    pub(super) async fn remove(&self, name: &str) {
        self.persisted_lock().remove(name);
        self.forget_hand_off(name);
        let params = DeleteParams {
            grace_period_seconds: Some(DELETE_GRACE_SECONDS),
            propagation_policy: Some(PropagationPolicy::Background),
            ..DeleteParams::default()
        };
        let pods: Api<Pod> = self.api_of(name);
        match self.cluster.call(|| pods.delete(name, &params)).await {
            Ok(_) => {}
            Err(e) if is_status(&e, 404) => {}
            Err(e) => {
                tracing::error!(pod = name, error = %e, "cannot delete the build pod; the next start-up of kiln retries")
            }
        }
        let secrets: Api<Secret> = self.api_of(name);
        let plain = DeleteParams::default();
        match self.cluster.call(|| secrets.delete(name, &plain)).await {
            Ok(_) => {}
            Err(e) if is_status(&e, 404) => {}
            Err(e) => {
                tracing::warn!(secret = name, error = %e, "cannot delete the build's Secret; the next start-up of kiln retries")
            }
        }
        self.forget_namespace(name);
    }
}

/// How long kiln waits for a pod it deleted to be gone before it makes it again.
const REPLACE_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

impl KubernetesExecutor {
    /// Makes the build's pod again with `container`'s next pull policy, as gitlab-runner does
    /// when a pull fails and the job listed another policy: the failed pod is deleted, the
    /// build's Secret (the pod's owner) kept, and the note on the retry added to the Secret's
    /// start notes for the trace. The new pod's uid.
    ///
    /// # Errors
    /// Why the pod could not be made again (an API error, described).
    pub(super) async fn next_pull_policy(
        &self,
        old: &Pod,
        container: &str,
        failure: &str,
    ) -> Result<String, String> {
        let name = old.metadata.name.clone().unwrap_or_default();
        let mut fallbacks = labels::pull_fallbacks(&old.metadata);
        let Some(next) = fallbacks.get_mut(container).filter(|l| !l.is_empty()) else {
            return Err(format!("container {container} has no pull policy left"));
        };
        let next_policy = next.remove(0);
        let mut pod = fresh_copy(old);
        let mut failed_policy = String::new();
        let mut image = String::new();
        for c in pod
            .spec
            .iter_mut()
            .flat_map(|s| {
                s.init_containers
                    .iter_mut()
                    .flatten()
                    .chain(s.containers.iter_mut())
            })
            .filter(|c| c.name == container)
        {
            failed_policy = c.image_pull_policy.clone().unwrap_or_default();
            image = c.image.clone().unwrap_or_default();
            c.image_pull_policy = Some(next_policy.clone());
        }
        let annotations = pod
            .metadata
            .annotations
            .get_or_insert_with(Default::default);
        labels::annotate_pull_fallbacks(annotations, &fallbacks);
        labels::annotate_pull_retried(annotations, container);
        let launch_id = format!("{:016x}", rand::random::<u64>());
        labels::annotate_launch(&mut pod.metadata, &launch_id);
        let note = format!(
            "Failed to pull image \"{image}\" with policy \"{}\": {failure}; trying again with pull policy \"{}\"",
            images::runner_policy_name(&failed_policy),
            images::runner_policy_name(&next_policy),
        );
        tracing::warn!(pod = %name, container, %image, failed_policy = images::runner_policy_name(&failed_policy), next_policy = images::runner_policy_name(&next_policy), "{failure}; making the pod again with the next pull policy");
        self.add_start_note(&name, &note, &mut pod).await;

        let pods: Api<Pod> = self.api_of(&name);
        let delete = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: old.metadata.uid.clone().map(|uid| Preconditions {
                uid: Some(uid),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match self.cluster.call(|| pods.delete(&name, &delete)).await {
            Ok(_) => {}
            Err(e) if is_status(&e, 404) => {}
            Err(e) => return Err(format!("cannot delete the pod: {}", describe(&e))),
        }
        let deadline = tokio::time::Instant::now() + REPLACE_WAIT;
        let create = PostParams::default();
        loop {
            match self.cluster.call(|| pods.create(&create, &pod)).await {
                Ok(created) => {
                    tracing::info!(pod = %name, "pod created again with the next pull policy");
                    return Ok(created.metadata.uid.unwrap_or_default());
                }
                // The failed pod is still being deleted.
                Err(e) if is_status(&e, 409) && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                }
                Err(e) => return Err(format!("cannot create the pod again: {}", describe(&e))),
            }
        }
    }

    /// Adds `note` to the start notes in the build's Secret (which the agent writes into the
    /// trace) and makes sure `pod` mounts them. A Secret that cannot be updated only loses
    /// the note (kiln's log has it).
    async fn add_start_note(&self, name: &str, note: &str, pod: &mut Pod) {
        let secrets: Api<Secret> = self.api_of(name);
        let notes = match self.cluster.call(|| secrets.get(name)).await {
            Ok(secret) => secret
                .data
                .and_then(|mut d| d.remove(START_NOTES_FILE))
                .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                .unwrap_or_default(),
            Err(e) => {
                tracing::warn!(secret = name, error = %e, "cannot read the build's Secret to note the pull policy retry");
                return;
            }
        };
        let notes = if notes.trim().is_empty() {
            note.to_owned()
        } else {
            format!("{}\n{note}", notes.trim_end())
        };
        let patch = serde_json::json!({
            "data": { START_NOTES_FILE: ByteString(notes.into_bytes()) }
        });
        let params = PatchParams::default();
        let merge = Patch::Merge(&patch);
        if let Err(e) = self
            .cluster
            .call(|| secrets.patch(name, &params, &merge))
            .await
        {
            tracing::warn!(secret = name, error = %e, "cannot note the pull policy retry in the build's Secret");
            return;
        }
        // A Secret volume that lists its keys (one with registry logins) must list the notes.
        for volume in pod
            .spec
            .iter_mut()
            .flat_map(|s| s.volumes.iter_mut().flatten())
        {
            if let Some(source) = volume.secret.as_mut()
                && source.secret_name.as_deref() == Some(name)
                && let Some(items) = source.items.as_mut()
                && !items.iter().any(|i| i.key == START_NOTES_FILE)
            {
                items.push(KeyToPath {
                    key: START_NOTES_FILE.to_owned(),
                    path: START_NOTES_FILE.to_owned(),
                    mode: None,
                });
            }
        }
    }
}

/// `pod` as it can be created again: its spec, labels, annotations and owner, without what
/// the API server and scheduler set (its node too: the new pod is scheduled afresh).
fn fresh_copy(pod: &Pod) -> Pod {
    let mut spec = pod.spec.clone();
    if let Some(spec) = spec.as_mut() {
        spec.node_name = None;
    }
    Pod {
        metadata: ObjectMeta {
            name: pod.metadata.name.clone(),
            namespace: pod.metadata.namespace.clone(),
            labels: pod.metadata.labels.clone(),
            annotations: pod.metadata.annotations.clone(),
            owner_references: pod.metadata.owner_references.clone(),
            ..ObjectMeta::default()
        },
        spec,
        status: None,
    }
}
