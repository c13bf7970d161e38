//! Where each build lives. Without `namespace_overwrite_allowed` every build is in the
//! configured namespace and nothing is kept. With it a job may move its pod and Secret to
//! another namespace (`KUBERNETES_NAMESPACE_OVERWRITE`): kiln then lists and watches
//! cluster-wide by its label selector, and keeps each build's namespace from what it created,
//! listed or read. A restarted coordinator has no memory but lists before it follows anything
//! (adoption, take-over), so every build it acts on by name is known; one it is asked about
//! without having listed it (`exists`) is looked up cluster-wide by name.

use std::collections::HashMap;
use std::sync::Mutex;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::ListParams;

use super::KubernetesExecutor;

/// The namespace of each build kiln knows of, by build name (names are unique per
/// installation: `kiln-gl-<job id>`); empty when jobs cannot move their pods.
#[derive(Default)]
pub(super) struct BuildNamespaces(Mutex<HashMap<String, String>>);

impl BuildNamespaces {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl KubernetesExecutor {
    /// Whether builds may live outside the configured namespace (kiln works cluster-wide).
    pub(super) fn cluster_wide(&self) -> bool {
        self.config.namespace_overwrite().is_some()
    }

    /// The namespace of build `name`: the one kept for it, else the configured one.
    pub(super) fn namespace_of(&self, name: &str) -> String {
        self.namespaces
            .lock()
            .get(name)
            .cloned()
            .unwrap_or_else(|| self.cluster.namespace().to_owned())
    }

    /// A typed API in the namespace of build `name`.
    pub(super) fn api_of<K>(&self, name: &str) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        if self.cluster_wide() {
            self.cluster.api_in(&self.namespace_of(name))
        } else {
            self.cluster.api()
        }
    }

    /// A typed API that lists kiln's objects: every namespace when builds may live in any,
    /// else the configured one.
    pub(super) fn list_api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        if self.cluster_wide() {
            self.cluster.api_all()
        } else {
            self.cluster.api()
        }
    }

    /// Keeps `namespace` as build `name`'s (only when builds may live in any namespace).
    pub(super) fn remember_namespace(&self, name: &str, namespace: Option<&str>) {
        if let Some(namespace) = namespace
            && self.cluster_wide()
        {
            self.namespaces
                .lock()
                .insert(name.to_owned(), namespace.to_owned());
        }
    }

    /// Forgets build `name`'s namespace (it was removed, or another replica follows it).
    pub(super) fn forget_namespace(&self, name: &str) {
        if self.cluster_wide() {
            self.namespaces.lock().remove(name);
        }
    }

    /// Whether build `name`'s namespace is known (always, when builds cannot move).
    fn namespace_known(&self, name: &str) -> bool {
        !self.cluster_wide() || self.namespaces.lock().contains_key(name)
    }

    /// Pod `name` of this installation, wherever it is: read in its namespace when that is
    /// known, else looked up cluster-wide by name and label (and its namespace kept).
    ///
    /// # Errors
    /// The API call failed.
    pub(super) async fn find_pod(&self, name: &str) -> Result<Option<Pod>, kube::Error> {
        if self.namespace_known(name) {
            let pods: Api<Pod> = self.api_of(name);
            return self.cluster.call(|| pods.get_opt(name)).await;
        }
        let pods: Api<Pod> = self.cluster.api_all();
        let params = ListParams::default()
            .labels(&self.selector)
            .fields(&format!("metadata.name={name}"));
        let list = self.cluster.call(|| pods.list(&params)).await?;
        let pod = list.items.into_iter().next();
        if let Some(pod) = &pod {
            self.remember_namespace(name, pod.metadata.namespace.as_deref());
        }
        Ok(pod)
    }
}
