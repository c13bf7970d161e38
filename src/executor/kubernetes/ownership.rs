//! Whose a build is, and the builds there are. A build's owner is one fact for its whole life:
//! the `kiln.dev/replica` label of its Secret, which exists from before the pod until after it
//! (the pod's label only mirrors it, for the replica following the build to notice a
//! hand-over); a pod without its Secret holds its own. Listing pairs pods and Secrets by name,
//! and reads the missing half of a pair by name before anything is judged from a filtered list.

use std::collections::{BTreeMap, HashSet};

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};

use super::client::is_status;
use super::podspec::LABEL_REPLICA;
use super::{CLAIM_ATTEMPTS, KubernetesExecutor, describe, foreign_labels, key_of, replica_of};
use crate::build::{Found, Recorded};
use crate::executor::{Claim, ExecutorError};

impl KubernetesExecutor {
    /// Makes `found` this replica's: its owner label (on its Secret, or on its pod when the
    /// Secret is gone) is set to this replica on the condition that it is still as it was
    /// listed (its resourceVersion), so of replicas claiming it at once exactly one wins; then
    /// the pod's label follows, which tells a replica still following it that it was handed
    /// over. A conflict is read again: when the owner label is still the listed one, only
    /// something else moved on, and the claim is made again.
    pub(super) async fn claim_build(&self, found: &Found) -> Claim {
        let Some(replica) = self.config.replica.as_deref() else {
            return Claim::Won;
        };
        if found.replica.as_deref() != Some(replica) {
            match self.claim_owner(found, replica).await {
                Claim::Won => {}
                other => return other,
            }
        }
        if let Recorded::OnSecrets { build } = &found.recorded
            && found.exists
            && build.as_deref() != Some(replica)
            && let Err(e) = self.mark_pod(&found.name, replica).await
            && !is_status(&e, 404)
        {
            // The build is this replica's (its Secret says so) but its pod still names the
            // replica it came from: following it now would take that for a hand-over. The next
            // claim (a take-over pass, or this replica's next start) brings the pod in line.
            tracing::warn!(build = %found.name, error = %describe(&e), "claimed the build but cannot relabel its pod");
            return self.claim_failed(found, replica, &e);
        }
        Claim::Won
    }

    /// The conditional write of the owner label, retried while only something other than the
    /// owner changed.
    async fn claim_owner(&self, found: &Found, replica: &str) -> Claim {
        let mut version = found.version.clone();
        for _ in 0..CLAIM_ATTEMPTS {
            match self.try_claim(found, replica, version.as_deref()).await {
                Ok(()) => return Claim::Won,
                Err(e) if is_status(&e, 404) => return Claim::Lost,
                Err(e) if is_status(&e, 409) => match self.current(found).await {
                    Ok(Some((labelled, current))) if labelled == found.replica => {
                        version = current;
                    }
                    Ok(_) => return Claim::Lost,
                    Err(e) => return self.claim_failed(found, replica, &e),
                },
                Err(e) => return self.claim_failed(found, replica, &e),
            }
        }
        Claim::Failed(format!(
            "build {} kept changing while replica {replica} claimed it",
            found.name
        ))
    }

    /// One conditional write of `found`'s owner label as of `version`.
    async fn try_claim(
        &self,
        found: &Found,
        replica: &str,
        version: Option<&str>,
    ) -> Result<(), kube::Error> {
        let patch = serde_json::json!({
            "metadata": {
                "resourceVersion": version,
                "labels": {LABEL_REPLICA: replica},
            }
        });
        let params = PatchParams::default();
        let patch = Patch::Merge(&patch);
        match found.recorded {
            Recorded::OnSecrets { .. } => {
                let secrets: Api<Secret> = self.cluster.api();
                self.cluster
                    .call(|| secrets.patch(&found.name, &params, &patch))
                    .await?;
            }
            Recorded::OnBuild => {
                let pods: Api<Pod> = self.cluster.api();
                let pod = self
                    .cluster
                    .call(|| pods.patch(&found.name, &params, &patch))
                    .await?;
                // Following starts from the claimed state, not from the listed one (which
                // names the replica the build is taken from).
                self.pods.written(pod);
            }
        }
        Ok(())
    }

    /// Labels pod `name` with `replica`, the owner its Secret names now (unconditionally:
    /// only the owner writes it).
    async fn mark_pod(&self, name: &str, replica: &str) -> Result<(), kube::Error> {
        let patch = serde_json::json!({ "metadata": { "labels": {LABEL_REPLICA: replica} } });
        let pods: Api<Pod> = self.cluster.api();
        let params = PatchParams::default();
        let patch = Patch::Merge(&patch);
        let pod = self
            .cluster
            .call(|| pods.patch(name, &params, &patch))
            .await?;
        self.pods.written(pod);
        Ok(())
    }

    /// The owner label and resourceVersion of `found`'s owner object now (`None`: it is gone).
    async fn current(
        &self,
        found: &Found,
    ) -> Result<Option<(Option<String>, Option<String>)>, kube::Error> {
        let metadata = match found.recorded {
            Recorded::OnBuild => {
                let pods: Api<Pod> = self.cluster.api();
                self.cluster
                    .call(|| pods.get_opt(&found.name))
                    .await?
                    .map(|p| p.metadata)
            }
            Recorded::OnSecrets { .. } => {
                let secrets: Api<Secret> = self.cluster.api();
                self.cluster
                    .call(|| secrets.get_opt(&found.name))
                    .await?
                    .map(|s| s.metadata)
            }
        };
        Ok(metadata.map(|m| (replica_of(&m), m.resource_version)))
    }

    fn claim_failed(&self, found: &Found, replica: &str, error: &kube::Error) -> Claim {
        Claim::Failed(format!(
            "cannot label build {} with replica {replica} in namespace `{}`: {}",
            found.name,
            self.cluster.namespace(),
            describe(error)
        ))
    }

    /// Reads by name the `kind` (pod or Secret) of each build in `names`, whose other half a
    /// list held without it, into `found`; a build whose half cannot be read goes to `unsure`
    /// (looked at again later, never judged from half a pair).
    async fn read_other_halves<K>(
        &self,
        api: &Api<K>,
        names: Vec<String>,
        found: &mut BTreeMap<String, K>,
        unsure: &mut HashSet<String>,
        kind: &str,
    ) where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        for name in names {
            match self.cluster.call(|| api.get_opt(&name)).await {
                Ok(Some(object)) => {
                    found.insert(name, object);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(build = %name, error = %describe(&e), "cannot read the {kind} of a build; looking at the build again later");
                    unsure.insert(name);
                }
            }
        }
    }

    /// kiln's pods and Secrets selected by `selector`, as builds: one list of each, paired by
    /// name. A pod or Secret whose other half is not in the other list is never judged from
    /// the lists alone: a filtered list can hold one of a pair and not the other (an older
    /// kiln relabelled only pods), and the two lists are read at different moments. Its other
    /// half is read by name first; only a half that is really alone is a "Secret without its
    /// pod" or a "pod without its job file".
    pub(super) async fn list_builds(&self, selector: &str) -> Result<Vec<Found>, ExecutorError> {
        let params = ListParams::default().labels(selector);
        let secrets_api: Api<Secret> = self.cluster.api();
        let pods_api: Api<Pod> = self.cluster.api();
        let list_error = |what: &str, e: kube::Error| ExecutorError::List {
            message: format!(
                "cannot list {what} in namespace `{}`: {}",
                self.cluster.namespace(),
                describe(&e)
            ),
        };
        let secrets = self
            .cluster
            .call(|| secrets_api.list(&params))
            .await
            .map_err(|e| list_error("the builds' Secrets", e))?;
        let pods = self
            .cluster
            .call(|| pods_api.list(&params))
            .await
            .map_err(|e| list_error("the build pods", e))?;
        let mut secrets: BTreeMap<String, Secret> = secrets
            .items
            .into_iter()
            .map(|s| (s.metadata.name.clone().unwrap_or_default(), s))
            .collect();
        let mut pods: BTreeMap<String, Pod> = pods
            .items
            .into_iter()
            .map(|p| (p.metadata.name.clone().unwrap_or_default(), p))
            .collect();
        let mut unsure = HashSet::new();
        let lonely_secrets: Vec<String> = secrets
            .keys()
            .filter(|name| !pods.contains_key(*name))
            .cloned()
            .collect();
        self.read_other_halves(&pods_api, lonely_secrets, &mut pods, &mut unsure, "pod")
            .await;
        let lonely_pods: Vec<String> = pods
            .keys()
            .filter(|name| !secrets.contains_key(*name) && !unsure.contains(*name))
            .cloned()
            .collect();
        self.read_other_halves(
            &secrets_api,
            lonely_pods,
            &mut secrets,
            &mut unsure,
            "Secret",
        )
        .await;
        let mut found = Vec::new();
        for (name, pod) in pods {
            if unsure.contains(&name) {
                continue;
            }
            let secret = secrets.remove(&name);
            let Some(key) = key_of(&pod.metadata) else {
                tracing::warn!(pod = %name, "a kiln pod without a readable source and job id; deleting it");
                self.remove(&name).await;
                continue;
            };
            // The Secret, when there is one, says whose the build is; the pod's label mirrors it.
            let (replica, version, recorded) = match &secret {
                Some(secret) => (
                    replica_of(&secret.metadata),
                    secret.metadata.resource_version.clone(),
                    Recorded::OnSecrets {
                        build: replica_of(&pod.metadata),
                    },
                ),
                None => (
                    replica_of(&pod.metadata),
                    pod.metadata.resource_version.clone(),
                    Recorded::OnBuild,
                ),
            };
            found.push(Found {
                key,
                name,
                exists: true,
                ran: None,
                secrets: secret.map(secret_data).unwrap_or_default(),
                labels: foreign_labels(&pod.metadata),
                annotations: pod.metadata.annotations.clone().unwrap_or_default(),
                replica,
                version,
                recorded,
            });
            // The coordinator follows it next: let it start from this state.
            self.pods.seed(pod);
        }
        for (name, secret) in secrets {
            if unsure.contains(&name) {
                continue;
            }
            let metadata = secret.metadata.clone();
            let Some(key) = key_of(&metadata) else {
                tracing::warn!(secret = %name, "a kiln Secret without a readable source and job id; deleting it");
                self.remove(&name).await;
                continue;
            };
            let ran = self.pod_had_events(&name).await;
            found.push(Found {
                key,
                replica: replica_of(&metadata),
                version: metadata.resource_version.clone(),
                recorded: Recorded::OnSecrets { build: None },
                labels: foreign_labels(&metadata),
                annotations: metadata.annotations.unwrap_or_default(),
                secrets: secret_data(secret),
                name,
                exists: false,
                ran,
            });
        }
        Ok(found)
    }
}

/// A Secret's data as bytes.
fn secret_data(secret: Secret) -> BTreeMap<String, Vec<u8>> {
    secret
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(key, value)| (key, value.0))
        .collect()
}
