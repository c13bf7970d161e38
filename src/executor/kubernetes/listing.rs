//! The builds there are. Listing pairs pods and Secrets by name, and reads the missing half of
//! a pair by name before anything is judged from a filtered list; the Secret, when there is
//! one, says whose the build is (see `claim.rs`).

use std::collections::{BTreeMap, HashSet};

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::Api;
use kube::api::ListParams;

use super::{KubernetesExecutor, describe, labels};
use crate::build::{Found, Recorded};
use crate::executor::ExecutorError;

impl KubernetesExecutor {
    /// Reads by name the `kind` (pod or Secret) of each build in `names`, whose other half a
    /// list held without it, into `found`; a build whose half cannot be read goes to `unsure`
    /// (looked at again later, never judged from half a pair).
    async fn read_other_halves<K>(
        &self,
        names: Vec<String>,
        found: &mut BTreeMap<String, K>,
        unsure: &mut HashSet<String>,
        kind: &str,
    ) where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        <K as kube::Resource>::DynamicType: Default,
    {
        for name in names {
            // In the namespace its listed half is in.
            let api: Api<K> = self.api_of(&name);
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
        // Every namespace when jobs may move their pods there (`namespaces.rs`).
        let secrets_api: Api<Secret> = self.list_api();
        let pods_api: Api<Pod> = self.list_api();
        let scope = if self.cluster_wide() {
            "any namespace".to_owned()
        } else {
            format!("namespace `{}`", self.cluster.namespace())
        };
        let list_error = |what: &str, e: kube::Error| ExecutorError::List {
            message: format!("cannot list {what} in {scope}: {}", describe(&e)),
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
        for (name, metadata) in secrets
            .iter()
            .map(|(name, s)| (name, &s.metadata))
            .chain(pods.iter().map(|(name, p)| (name, &p.metadata)))
        {
            self.remember_namespace(name, metadata.namespace.as_deref());
        }
        let mut unsure = HashSet::new();
        let lonely_secrets: Vec<String> = secrets
            .keys()
            .filter(|name| !pods.contains_key(*name))
            .cloned()
            .collect();
        self.read_other_halves(lonely_secrets, &mut pods, &mut unsure, "pod")
            .await;
        let lonely_pods: Vec<String> = pods
            .keys()
            .filter(|name| !secrets.contains_key(*name) && !unsure.contains(*name))
            .cloned()
            .collect();
        self.read_other_halves(lonely_pods, &mut secrets, &mut unsure, "Secret")
            .await;
        let mut found = Vec::new();
        for (name, pod) in pods {
            if unsure.contains(&name) {
                continue;
            }
            let secret = secrets.remove(&name);
            // A taken warm pod whose labels do not mirror its Secret's yet is its build's.
            let key = labels::key_of(&pod.metadata)
                .or_else(|| secret.as_ref().and_then(|s| labels::key_of(&s.metadata)));
            if key.is_none() && labels::warm_pool_of(&pod.metadata).is_some() {
                // An untaken warm pod: its pool's, not a build to adopt or clean up.
                continue;
            }
            let Some(key) = key else {
                tracing::warn!(pod = %name, "a kiln pod without a readable source and job id; deleting it");
                self.remove(&name).await;
                continue;
            };
            // The Secret, when there is one, says whose the build is; the pod's label mirrors it.
            let (replica, version, recorded) = match &secret {
                Some(secret) => (
                    labels::replica_of(&secret.metadata),
                    secret.metadata.resource_version.clone(),
                    Recorded::OnSecrets {
                        build: labels::replica_of(&pod.metadata),
                    },
                ),
                None => (
                    labels::replica_of(&pod.metadata),
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
                labels: labels::foreign_labels(&pod.metadata),
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
            if labels::is_untaken_warm(&metadata) {
                // An untaken warm pod's Secret: its pool retires it (see `warm.rs`).
                continue;
            }
            let Some(key) = labels::key_of(&metadata) else {
                tracing::warn!(secret = %name, "a kiln Secret without a readable source and job id; deleting it");
                self.remove(&name).await;
                continue;
            };
            let ran = self.pod_had_events(&name).await;
            found.push(Found {
                key,
                replica: labels::replica_of(&metadata),
                version: metadata.resource_version.clone(),
                recorded: Recorded::OnSecrets { build: None },
                labels: labels::foreign_labels(&metadata),
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
