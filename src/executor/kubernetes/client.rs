//! The connection to the cluster: kubeconfig or in-cluster config, client-side QPS/burst
//! limiting, retries of transient failures, and the start-up permission check.

use std::sync::Mutex;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use kube::api::PostParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};
use tokio::time::Instant;

use super::config::KubernetesConfig;

/// What kiln needs to do in its namespace, as `(verb, resource)`; `docs/kubernetes.md` lists
/// the same as a Role, and Leases besides: without those kiln runs as a single replica (the
/// coordinator says so) instead of refusing to start.
pub(crate) const PERMISSIONS: &[(&str, &str)] = &[
    ("create", "pods"),
    ("get", "pods"),
    ("list", "pods"),
    ("watch", "pods"),
    // Claiming a build of a replica that died: its pod's `kiln.dev/replica` label follows.
    ("patch", "pods"),
    ("delete", "pods"),
    ("create", "secrets"),
    ("get", "secrets"),
    ("list", "secrets"),
    // Claiming a build: its Secret's `kiln.dev/replica` label says whose the build is.
    ("patch", "secrets"),
    ("delete", "secrets"),
    ("list", "events"),
];

/// Errors connecting to the cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The kubeconfig file named in the config could not be read.
    #[error("cannot read kubeconfig {path} (kubernetes.kubeconfig)")]
    Kubeconfig {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// No usable cluster configuration was found.
    #[error(
        "cannot find a Kubernetes configuration (not in a cluster, no KUBECONFIG, no ~/.kube/config, no kubernetes.kubeconfig)"
    )]
    Infer(#[source] kube::config::InferConfigError),
    /// The client could not be built from the configuration.
    #[error("cannot create a Kubernetes client")]
    Client(#[source] kube::Error),
    /// The API server could not be asked about permissions.
    #[error("cannot reach the Kubernetes API server to check kiln's permissions")]
    Unreachable(#[source] kube::Error),
    /// kiln's service account lacks cluster-wide permissions that
    /// `namespace_overwrite_allowed` needs (builds in any namespace).
    #[error(
        "kiln's service account may not {} cluster-wide (in every namespace), which kubernetes.namespace_overwrite_allowed needs; grant the ClusterRole in docs/kubernetes.md or unset namespace_overwrite_allowed",
        missing.join(", ")
    )]
    ForbiddenClusterWide {
        /// `verb resource` pairs that were denied.
        missing: Vec<String>,
    },
    /// kiln's service account lacks permissions it needs.
    #[error(
        "kiln's service account may not {} in namespace `{namespace}`; grant the Role in docs/kubernetes.md",
        missing.join(", ")
    )]
    Forbidden {
        /// The namespace.
        namespace: String,
        /// `verb resource` pairs that were denied.
        missing: Vec<String>,
    },
}

/// How long one Kubernetes API call (not a watch) may take before it is retried: the API
/// server's own limit for a non-long-running request is 60 s; kiln's calls are small.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A rate-limited, retrying handle on one namespace of the cluster.
pub(crate) struct Cluster {
    client: Client,
    namespace: String,
    bucket: TokenBucket,
}

impl Cluster {
    /// Connects as the configuration says.
    ///
    /// # Errors
    /// No or unreadable configuration.
    pub(crate) async fn connect(config: &KubernetesConfig) -> Result<Self, ClusterError> {
        let kube_config = match &config.kubeconfig {
            Some(path) => {
                let file =
                    Kubeconfig::read_from(path).map_err(|source| ClusterError::Kubeconfig {
                        path: path.display().to_string(),
                        source,
                    })?;
                let options = KubeConfigOptions {
                    context: config.context.clone(),
                    ..KubeConfigOptions::default()
                };
                kube::Config::from_custom_kubeconfig(file, &options)
                    .await
                    .map_err(|source| ClusterError::Kubeconfig {
                        path: path.display().to_string(),
                        source,
                    })?
            }
            None => kube::Config::infer().await.map_err(ClusterError::Infer)?,
        };
        let namespace = config
            .namespace
            .clone()
            .unwrap_or_else(|| kube_config.default_namespace.clone());
        let client = Client::try_from(kube_config).map_err(ClusterError::Client)?;
        Ok(Self {
            client,
            namespace,
            bucket: TokenBucket::new(config.qps, config.burst),
        })
    }

    /// The namespace of the build pods.
    pub(crate) fn namespace(&self) -> &str {
        &self.namespace
    }

    /// A typed API for a namespaced resource.
    pub(crate) fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// A typed API for a namespaced resource in `namespace` (a build's overwritten one).
    pub(crate) fn api_in<K>(&self, namespace: &str) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), namespace)
    }

    /// A typed API for a namespaced resource across every namespace (list and watch only).
    pub(crate) fn api_all<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::all(self.client.clone())
    }

    /// Runs one API call under the QPS limit, retrying connection errors, 429 and 5xx with
    /// jittered exponential backoff (a handful of times, up to ~10 s apart).
    ///
    /// # Errors
    /// The call's last error.
    pub(crate) async fn call<T, F, Fut>(&self, mut op: F) -> Result<T, kube::Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, kube::Error>>,
    {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(10))
            .with_max_times(6)
            .with_jitter();
        (|| {
            let call = op();
            async move {
                self.bucket.acquire().await;
                // kube's own read timeout is 295 s (sized for watches), so an API server (or a
                // proxy in front of it) that accepts a request and never answers would hold
                // this build's launch, delete or list for five minutes. One call gets
                // CALL_TIMEOUT, then counts as a transient failure and is retried.
                tokio::time::timeout(CALL_TIMEOUT, call)
                    .await
                    .unwrap_or_else(|elapsed| Err(kube::Error::Service(Box::new(elapsed))))
            }
        })
        .retry(backoff)
        .when(is_transient)
        .notify(|e, after| tracing::warn!(error = %e, "Kubernetes API call failed; retrying in {after:?}"))
        .await
    }

    /// Runs one API call outside the QPS limit, with the retries of [`Cluster::call`]: for
    /// the Leases, a few calls a renew period that must not queue behind a burst of pod
    /// creates or deletes (a Lease renewed late makes the other replicas take this one for
    /// dead).
    ///
    /// # Errors
    /// The call's last error.
    pub(crate) async fn call_unthrottled<T, F, Fut>(&self, op: F) -> Result<T, kube::Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, kube::Error>>,
    {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(2))
            .with_max_times(3)
            .with_jitter();
        op.retry(backoff)
            .when(is_transient)
            .notify(|e, after| tracing::warn!(error = %e, "Kubernetes API call failed; retrying in {after:?}"))
            .await
    }

    /// Waits until `calls` API calls could go out at once under the QPS limit (without taking
    /// them).
    pub(crate) async fn until_free(&self, calls: f64) {
        self.bucket.until_free(calls).await;
    }

    /// Checks with SelfSubjectAccessReview that kiln may do everything it needs: in its
    /// namespace, and, when `cluster_wide` (jobs may move their pods to other namespaces), the
    /// same in every namespace.
    ///
    /// # Errors
    /// A permission is missing (every missing one is named), or the API server cannot be
    /// reached.
    pub(crate) async fn check_permissions(&self, cluster_wide: bool) -> Result<(), ClusterError> {
        let Some(missing) = self.missing_permissions(Some(&self.namespace)).await? else {
            return Ok(());
        };
        if !missing.is_empty() {
            return Err(ClusterError::Forbidden {
                namespace: self.namespace.clone(),
                missing,
            });
        }
        if !cluster_wide {
            return Ok(());
        }
        match self.missing_permissions(None).await? {
            Some(missing) if !missing.is_empty() => {
                Err(ClusterError::ForbiddenClusterWide { missing })
            }
            _ => Ok(()),
        }
    }

    /// The `verb resource` pairs of [`PERMISSIONS`] kiln may not do in `namespace` (`None`:
    /// in every namespace); `None` when the API server cannot tell (no authorization API).
    async fn missing_permissions(
        &self,
        namespace: Option<&str>,
    ) -> Result<Option<Vec<String>>, ClusterError> {
        let reviews: Api<SelfSubjectAccessReview> = Api::all(self.client.clone());
        let mut missing = Vec::new();
        for (verb, resource) in PERMISSIONS {
            let review = SelfSubjectAccessReview {
                spec: SelfSubjectAccessReviewSpec {
                    resource_attributes: Some(ResourceAttributes {
                        namespace: namespace.map(str::to_owned),
                        verb: Some((*verb).into()),
                        resource: Some((*resource).into()),
                        ..ResourceAttributes::default()
                    }),
                    ..SelfSubjectAccessReviewSpec::default()
                },
                ..SelfSubjectAccessReview::default()
            };
            let create = PostParams::default();
            let answer = match self.call(|| reviews.create(&create, &review)).await {
                Ok(answer) => answer,
                Err(e) if is_status(&e, 404) => {
                    // No authorization API (some proxies and test clusters): the first
                    // 403 of a real call will name what is missing instead.
                    tracing::warn!(
                        "SelfSubjectAccessReview is not available; permissions are not checked at start-up"
                    );
                    return Ok(None);
                }
                Err(e) => return Err(ClusterError::Unreachable(e)),
            };
            if !answer.status.is_some_and(|s| s.allowed) {
                missing.push(format!("{verb} {resource}"));
            }
        }
        Ok(Some(missing))
    }
}

/// Whether a failed call may succeed when repeated.
pub(crate) fn is_transient(error: &kube::Error) -> bool {
    match error {
        kube::Error::Api(status) => status.code == 429 || status.code >= 500,
        kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    }
}

/// Whether `error` is the API's answer `code`.
pub(crate) fn is_status(error: &kube::Error, code: u16) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == code)
}

/// client-go's token bucket: `qps` tokens a second, at most `burst` saved up. Each caller
/// reserves its token and sleeps once until it is due, so a thousand waiting calls cost a
/// thousand wake-ups, not a thundering herd.
struct TokenBucket {
    qps: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    fn new(qps: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            qps: if qps > 0.0 { qps } else { f64::MAX },
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    async fn acquire(&self) {
        let wait = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let (tokens, last) = *state;
            let refilled =
                (tokens + now.duration_since(last).as_secs_f64() * self.qps).min(self.burst);
            let left = refilled - 1.0;
            *state = (left, now);
            if left >= 0.0 {
                Duration::ZERO
            } else {
                Duration::from_secs_f64(-left / self.qps)
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// Waits until `n` tokens (at most `burst`) are saved up, taking none.
    async fn until_free(&self, n: f64) {
        let n = n.min(self.burst);
        loop {
            let wait = {
                let (tokens, last) = *self.state.lock().unwrap_or_else(|e| e.into_inner());
                let refilled = (tokens + last.elapsed().as_secs_f64() * self.qps).min(self.burst);
                if refilled >= n {
                    return;
                }
                Duration::from_secs_f64((n - refilled) / self.qps)
            };
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_bucket_allows_a_burst_then_the_rate() {
        let bucket = TokenBucket::new(10.0, 5);
        let start = Instant::now();
        for _ in 0..5 {
            bucket.acquire().await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO, "the burst is free");
        for _ in 0..10 {
            bucket.acquire().await;
        }
        let elapsed = start.elapsed().as_secs_f64();
        assert!(
            (0.95..=1.05).contains(&elapsed),
            "10 more at 10/s take 1s, took {elapsed}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_for_free_tokens_takes_none() {
        let bucket = TokenBucket::new(10.0, 5);
        let start = Instant::now();
        bucket.until_free(3.0).await;
        bucket.until_free(3.0).await;
        assert_eq!(start.elapsed(), Duration::ZERO, "the burst is saved up");
        for _ in 0..5 {
            bucket.acquire().await;
        }
        bucket.until_free(3.0).await;
        let elapsed = start.elapsed().as_secs_f64();
        assert!(
            (0.25..=0.35).contains(&elapsed),
            "3 tokens at 10/s take 0.3s, took {elapsed}"
        );
        bucket.acquire().await;
        bucket.acquire().await;
        bucket.acquire().await;
        assert!(
            start.elapsed().as_secs_f64() - elapsed < 0.001,
            "the waited-for tokens are still there"
        );
        // More than the burst can never be saved up: wait for the burst instead.
        bucket.until_free(50.0).await;
    }
}
