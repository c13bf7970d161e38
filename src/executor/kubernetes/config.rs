//! `[kubernetes]`: where build pods go, what they look like by default, and what jobs may
//! change.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::Toleration;
use serde::Deserialize;

use super::labels::{as_label_value, is_label_value};
pub use super::patch::PatchType;
use super::quantity;
pub use super::volumes::Volumes;
use crate::problem::Problem;

/// The Kubernetes executor's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KubernetesConfig {
    /// Namespace of the build pods (default: the kubeconfig context's, or the coordinator's own
    /// namespace in a cluster).
    pub namespace: Option<String>,
    /// A kubeconfig file (default: in-cluster config, then `KUBECONFIG`, then `~/.kube/config`).
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context (default: its current context).
    pub context: Option<String>,
    /// Value of the `kiln.dev/coordinator` label on everything kiln creates. Replicas of one
    /// installation share it; a restarted coordinator adopts the pods carrying it.
    pub coordinator: String,
    /// This replica's identity, the `kiln.dev/replica` label of the builds it launches and the
    /// name of its Lease `kiln-<coordinator>-<replica>` (default: the `POD_NAME` environment
    /// variable, else the hostname).
    pub replica: Option<String>,
    /// How long a replica's Lease (and the leader Lease) holds without renewal: a replica that
    /// has not renewed for this long is dead, and the others take over its builds.
    #[serde(with = "humantime_serde")]
    pub lease_duration: Duration,
    /// How often each replica renews its Leases and looks at the others'.
    #[serde(with = "humantime_serde")]
    pub lease_renew: Duration,
    /// The kiln image of the init container that installs the agent and clones the sources.
    pub helper_image: String,
    /// Image of jobs that name none.
    pub default_image: String,
    /// Image pull secrets of every build pod.
    pub image_pull_secrets: Vec<String>,
    /// Service account of build pods (default: the namespace's `default`).
    pub service_account: Option<String>,
    /// Mount the service account token into build pods (off: builds rarely need the API).
    pub automount_service_account_token: bool,
    /// The containers' security context: `baseline` or `restricted`.
    pub security: SecurityProfile,
    /// User id the containers run as (`restricted` defaults to 1000).
    pub run_as_user: Option<i64>,
    /// Group id the containers run as.
    pub run_as_group: Option<i64>,
    /// `fsGroup` of the pod's volumes.
    pub fs_group: Option<i64>,
    /// A pod still Pending after this long fails its job (`runner_system_failure`), quoting the
    /// scheduler's reason.
    #[serde(with = "humantime_serde")]
    pub pending_timeout: Duration,
    /// How long an image pull may fail (`ErrImagePull`, `ImagePullBackOff`) before the job fails
    /// with `image_pull_failure`.
    #[serde(with = "humantime_serde")]
    pub image_pull_grace: Duration,
    /// Added to the job timeout for the pod's `activeDeadlineSeconds`.
    #[serde(with = "humantime_serde")]
    pub deadline_margin: Duration,
    /// `terminationGracePeriodSeconds` of build pods: how long the agent gets to report when
    /// the pod is stopped.
    #[serde(with = "humantime_serde")]
    pub termination_grace: Duration,
    /// Client-side limit of API requests per second (as client-go's QPS).
    pub qps: f64,
    /// Requests allowed in a burst above `qps`.
    pub burst: u32,
    /// `sizeLimit` of the builds volume, e.g. `20Gi` (default: none).
    pub builds_size_limit: Option<String>,
    /// Requests and limits of the build container.
    pub build: Resources,
    /// Requests and limits of each service container.
    pub service: Resources,
    /// Requests and limits of the init container.
    pub helper: Resources,
    /// Caps of the `KUBERNETES_*_REQUEST`/`_LIMIT` job variables; a variable whose cap is
    /// unset is refused.
    pub max: Resources,
    /// Regex a `KUBERNETES_SERVICE_ACCOUNT_OVERWRITE` value must match (unset: refused).
    pub service_account_overwrite_allowed: Option<String>,
    /// Regex each `KUBERNETES_NODE_SELECTOR_*` `key=value` must match (unset: refused).
    pub node_selector_overwrite_allowed: Option<String>,
    /// Regex each `KUBERNETES_POD_ANNOTATIONS_*` `key=value` must match (unset: refused).
    pub pod_annotations_overwrite_allowed: Option<String>,
    /// Regex each `KUBERNETES_POD_LABELS_*` `key=value` must match (unset: refused).
    pub pod_labels_overwrite_allowed: Option<String>,
    /// Node selector of every build pod.
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations of every build pod.
    pub tolerations: Vec<Toleration>,
    /// Annotations of every build pod.
    pub annotations: BTreeMap<String, String>,
    /// Labels of every build pod.
    pub labels: BTreeMap<String, String>,
    /// The resource class of jobs whose runner and variables name none.
    pub default_resource_class: Option<String>,
    /// Named presets of placement, size and annotations (`[kubernetes.resource_classes.NAME]`).
    pub resource_classes: BTreeMap<String, ResourceClass>,
    /// A patch applied to every build pod last, for anything else: a TOML table (a list for
    /// `pod_patch_type = "json"`), or a string of JSON.
    pub pod_patch: Option<toml::Value>,
    /// How `pod_patch` applies: `merge` (RFC 7386, lists replaced), `strategic` (lists of
    /// containers, volumes, env, mounts merge by name, so a patch can add one) or `json`
    /// (RFC 6902 operations).
    pub pod_patch_type: PatchType,
    /// Volumes mounted into the build and service containers of every build pod
    /// (`[[kubernetes.volumes.pvc]]`, `config_map`, `secret`, `host_path`, `empty_dir`, `csi`).
    pub volumes: Volumes,
    /// Run the build and service containers privileged (needed by `docker:dind`). Off: a
    /// privileged container is root on the node.
    pub privileged: bool,
    /// A Docker `config.json` (`{"auths": {...}}`) with registry logins for every build's
    /// images, after the job's own `DOCKER_AUTH_CONFIG` and before GitLab's job credentials.
    pub docker_auth_config: Option<String>,
    /// Glob patterns of the images jobs may use (`registry.example.com/**`); empty: any.
    pub allowed_images: Vec<String>,
    /// Glob patterns of the service images jobs may use; empty: any.
    pub allowed_services: Vec<String>,
    /// The uids a job's `image:kubernetes:user` may name; empty: any.
    pub allowed_users: Vec<String>,
    /// The gids a job's `image:kubernetes:user` may name; empty: any.
    pub allowed_groups: Vec<String>,
    /// The pull policies jobs may ask for (`always`, `if-not-present`, `never`); empty: any.
    pub allowed_pull_policies: Vec<String>,
    /// The pull policies, in order, of images whose job names none (empty: Kubernetes' own
    /// default, `Always` for `:latest` and `IfNotPresent` otherwise).
    pub pull_policy: Vec<String>,
    /// Caps of the `KUBERNETES_SERVICE_*_REQUEST`/`_LIMIT` job variables (service containers);
    /// a variable whose cap is unset is ignored with a warning in the job's trace.
    pub max_service: Resources,
    /// Caps of the `KUBERNETES_HELPER_*_REQUEST`/`_LIMIT` job variables (the init container).
    pub max_helper: Resources,
    /// Regex each `KUBERNETES_NODE_TOLERATIONS_*` toleration (`key[=value][:effect]`) must
    /// match (unset: ignored with a warning).
    pub node_tolerations_overwrite_allowed: Option<String>,
    /// Regex a `KUBERNETES_NAMESPACE_OVERWRITE` value must match (unset or empty: ignored with
    /// a warning). Set, kiln lists and watches its pods and Secrets in every namespace (a
    /// ClusterRole, docs/kubernetes.md).
    pub namespace_overwrite_allowed: Option<String>,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            namespace: None,
            kubeconfig: None,
            context: None,
            coordinator: "kiln".into(),
            replica: None,
            lease_duration: Duration::from_secs(15),
            lease_renew: Duration::from_secs(5),
            helper_image: format!("ghcr.io/kiln-ci/kiln:{}", crate::VERSION),
            default_image: "alpine:3".into(),
            image_pull_secrets: Vec::new(),
            service_account: None,
            automount_service_account_token: false,
            security: SecurityProfile::Baseline,
            run_as_user: None,
            run_as_group: None,
            fs_group: None,
            pending_timeout: Duration::from_secs(300),
            image_pull_grace: Duration::from_secs(60),
            deadline_margin: Duration::from_secs(600),
            termination_grace: Duration::from_secs(30),
            qps: 20.0,
            burst: 40,
            builds_size_limit: None,
            build: Resources {
                cpu_request: Some("1".into()),
                memory_request: Some("2Gi".into()),
                memory_limit: Some("2Gi".into()),
                ..Resources::default()
            },
            service: Resources {
                cpu_request: Some("250m".into()),
                memory_request: Some("256Mi".into()),
                memory_limit: Some("1Gi".into()),
                ..Resources::default()
            },
            helper: Resources {
                cpu_request: Some("100m".into()),
                memory_request: Some("64Mi".into()),
                memory_limit: Some("256Mi".into()),
                ..Resources::default()
            },
            max: Resources::default(),
            service_account_overwrite_allowed: None,
            node_selector_overwrite_allowed: None,
            pod_annotations_overwrite_allowed: None,
            pod_labels_overwrite_allowed: None,
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            annotations: BTreeMap::new(),
            labels: BTreeMap::new(),
            default_resource_class: None,
            resource_classes: BTreeMap::new(),
            pod_patch: None,
            pod_patch_type: PatchType::Merge,
            volumes: Volumes::default(),
            privileged: false,
            docker_auth_config: None,
            allowed_images: Vec::new(),
            allowed_services: Vec::new(),
            allowed_users: Vec::new(),
            allowed_groups: Vec::new(),
            allowed_pull_policies: Vec::new(),
            pull_policy: Vec::new(),
            max_service: Resources::default(),
            max_helper: Resources::default(),
            node_tolerations_overwrite_allowed: None,
            namespace_overwrite_allowed: None,
        }
    }
}

/// How locked down build containers are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SecurityProfile {
    /// No privilege escalation, no privileged mode, `RuntimeDefault` seccomp, every capability
    /// dropped but the five a root build needs to install packages (`CHOWN`, `DAC_OVERRIDE`,
    /// `FOWNER`, `SETGID`, `SETUID`). Runs the common CI images (which run as root) unchanged.
    #[default]
    Baseline,
    /// Pod Security "restricted": non-root (uid 1000 unless set), all capabilities dropped.
    Restricted,
}

/// CPU, memory, ephemeral storage and GPU quantities (`500m`, `2Gi`, …); unset ones are left out.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Resources {
    /// `requests.cpu`.
    pub cpu_request: Option<String>,
    /// `limits.cpu`.
    pub cpu_limit: Option<String>,
    /// `requests.memory`.
    pub memory_request: Option<String>,
    /// `limits.memory`.
    pub memory_limit: Option<String>,
    /// `requests.ephemeral-storage`.
    pub ephemeral_storage_request: Option<String>,
    /// `limits.ephemeral-storage`.
    pub ephemeral_storage_limit: Option<String>,
    /// `limits."nvidia.com/gpu"`.
    pub gpu: Option<String>,
}

/// The fields of [`Resources`]: name, `KUBERNETES_*` job variable, (requests|limits, key).
pub(crate) const RESOURCE_FIELDS: &[(&str, Option<&str>, bool, &str)] = &[
    ("cpu_request", Some("KUBERNETES_CPU_REQUEST"), false, "cpu"),
    ("cpu_limit", Some("KUBERNETES_CPU_LIMIT"), true, "cpu"),
    (
        "memory_request",
        Some("KUBERNETES_MEMORY_REQUEST"),
        false,
        "memory",
    ),
    (
        "memory_limit",
        Some("KUBERNETES_MEMORY_LIMIT"),
        true,
        "memory",
    ),
    (
        "ephemeral_storage_request",
        Some("KUBERNETES_EPHEMERAL_STORAGE_REQUEST"),
        false,
        "ephemeral-storage",
    ),
    (
        "ephemeral_storage_limit",
        Some("KUBERNETES_EPHEMERAL_STORAGE_LIMIT"),
        true,
        "ephemeral-storage",
    ),
    ("gpu", None, true, "nvidia.com/gpu"),
];

impl Resources {
    /// The field called `name` (one of [`RESOURCE_FIELDS`]).
    pub(crate) fn get(&self, name: &str) -> Option<&String> {
        match name {
            "cpu_request" => self.cpu_request.as_ref(),
            "cpu_limit" => self.cpu_limit.as_ref(),
            "memory_request" => self.memory_request.as_ref(),
            "memory_limit" => self.memory_limit.as_ref(),
            "ephemeral_storage_request" => self.ephemeral_storage_request.as_ref(),
            "ephemeral_storage_limit" => self.ephemeral_storage_limit.as_ref(),
            "gpu" => self.gpu.as_ref(),
            _ => None,
        }
    }

    /// Sets the field called `name`.
    pub(crate) fn set(&mut self, name: &str, value: String) {
        let slot = match name {
            "cpu_request" => &mut self.cpu_request,
            "cpu_limit" => &mut self.cpu_limit,
            "memory_request" => &mut self.memory_request,
            "memory_limit" => &mut self.memory_limit,
            "ephemeral_storage_request" => &mut self.ephemeral_storage_request,
            "ephemeral_storage_limit" => &mut self.ephemeral_storage_limit,
            "gpu" => &mut self.gpu,
            _ => return,
        };
        *slot = Some(value);
    }

    /// `self` with every field `over` sets replaced.
    pub(crate) fn overlaid(&self, over: &Resources) -> Resources {
        let mut out = self.clone();
        for (name, ..) in RESOURCE_FIELDS {
            if let Some(value) = over.get(name) {
                out.set(name, value.clone());
            }
        }
        out
    }
}

/// A named preset of placement and size, chosen per runner or by `KILN_RESOURCE_CLASS`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResourceClass {
    /// A built-in preset this class starts from (see [`Preset`]).
    pub preset: Option<Preset>,
    /// Requests and limits of the build container (over `kubernetes.build`).
    #[serde(flatten)]
    pub resources: Resources,
    /// Node selector entries added to the pod's.
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations added to the pod's.
    pub tolerations: Vec<Toleration>,
    /// Annotations added to the pod's.
    pub annotations: BTreeMap<String, String>,
    /// Labels added to the pod's.
    pub labels: BTreeMap<String, String>,
    /// `runtimeClassName` (e.g. `gvisor`, `nvidia`).
    pub runtime_class: Option<String>,
    /// `priorityClassName`.
    pub priority_class: Option<String>,
    /// What a vCPU-hour costs in this class (spot, GPU), over `[cost] price_per_vcpu_hour`.
    pub price_per_vcpu_hour: Option<f64>,
    /// What a GiB-hour of memory costs in this class, over `[cost] price_per_gib_hour`.
    pub price_per_gib_hour: Option<f64>,
}

/// Built-in resource class presets for serverless and autoscaled clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// Alibaba ECI spot instance at market price, falling back to on-demand when spot stock
    /// runs out (`SpotAsPriceGo` + `eci-spot-fallback`). Reclaims are retried as
    /// `runner_system_failure`.
    EciSpot,
    /// Alibaba ECI GPU instance (`eci-use-specs` with two GPU specs in order) and one GPU.
    EciGpu,
    /// Alibaba ECI with automatic image cache, for faster cold starts of big build images.
    EciImageCache,
    /// ACK with virtual nodes: schedule onto ECI through the virtual kubelet.
    EciVirtualNode,
    /// GKE Autopilot spot pods.
    GkeAutopilotSpot,
    /// Karpenter and cluster-autoscaler must not move a running build.
    NoEvict,
}

impl Preset {
    /// The class this preset stands for.
    pub(crate) fn class(self) -> ResourceClass {
        let map = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let eci = map(&[("alibabacloud.com/eci", "true")]);
        match self {
            Self::EciSpot => ResourceClass {
                annotations: map(&[
                    ("k8s.aliyun.com/eci-spot-strategy", "SpotAsPriceGo"),
                    ("k8s.aliyun.com/eci-spot-fallback", "true"),
                ]),
                labels: eci,
                ..ResourceClass::default()
            },
            Self::EciGpu => ResourceClass {
                annotations: map(&[(
                    "k8s.aliyun.com/eci-use-specs",
                    "ecs.gn6i-c4g1.xlarge,ecs.gn6i-c8g1.2xlarge",
                )]),
                labels: eci,
                resources: Resources {
                    gpu: Some("1".into()),
                    ..Resources::default()
                },
                ..ResourceClass::default()
            },
            Self::EciImageCache => ResourceClass {
                annotations: map(&[("k8s.aliyun.com/eci-auto-imc", "true")]),
                labels: eci,
                ..ResourceClass::default()
            },
            Self::EciVirtualNode => ResourceClass {
                node_selector: map(&[("type", "virtual-kubelet")]),
                tolerations: vec![Toleration {
                    key: Some("virtual-kubelet.io/provider".into()),
                    operator: Some("Equal".into()),
                    value: Some("alibabacloud".into()),
                    effect: Some("NoSchedule".into()),
                    ..Toleration::default()
                }],
                ..ResourceClass::default()
            },
            Self::GkeAutopilotSpot => ResourceClass {
                node_selector: map(&[("cloud.google.com/gke-spot", "true")]),
                ..ResourceClass::default()
            },
            Self::NoEvict => ResourceClass {
                annotations: map(&[
                    ("cluster-autoscaler.kubernetes.io/safe-to-evict", "false"),
                    ("karpenter.sh/do-not-disrupt", "true"),
                ]),
                ..ResourceClass::default()
            },
        }
    }
}

impl ResourceClass {
    /// The class with its preset applied underneath its own settings.
    pub(crate) fn resolved(&self) -> ResourceClass {
        let Some(preset) = self.preset else {
            return self.clone();
        };
        let mut out = preset.class();
        out.resources = out.resources.overlaid(&self.resources);
        out.node_selector.extend(self.node_selector.clone());
        out.tolerations.extend(self.tolerations.iter().cloned());
        out.annotations.extend(self.annotations.clone());
        out.labels.extend(self.labels.clone());
        out.runtime_class = self.runtime_class.clone().or(out.runtime_class);
        out.priority_class = self.priority_class.clone().or(out.priority_class);
        out.price_per_vcpu_hour = self.price_per_vcpu_hour.or(out.price_per_vcpu_hour);
        out.price_per_gib_hour = self.price_per_gib_hour.or(out.price_per_gib_hour);
        out.preset = None;
        out
    }
}

impl KubernetesConfig {
    /// This replica's identity: `replica`, else `POD_NAME`, else the hostname, as a label value.
    pub fn replica_id(&self) -> String {
        let named = self
            .replica
            .clone()
            .or_else(|| std::env::var("POD_NAME").ok().filter(|n| !n.is_empty()))
            .or_else(|| {
                nix::unistd::gethostname()
                    .ok()
                    .and_then(|h| h.into_string().ok())
            })
            .unwrap_or_default();
        as_label_value(&named)
    }

    /// The `namespace_overwrite_allowed` pattern when a job may move its pod to another
    /// namespace (set and not empty): the executor then works cluster-wide.
    pub(crate) fn namespace_overwrite(&self) -> Option<&str> {
        self.namespace_overwrite_allowed
            .as_deref()
            .filter(|p| !p.trim().is_empty())
    }

    /// The pod patch as JSON, or why it is not one.
    pub(crate) fn pod_patch_json(&self) -> Result<Option<serde_json::Value>, String> {
        match &self.pod_patch {
            None => Ok(None),
            Some(toml::Value::String(text)) => serde_json::from_str(text)
                .map(Some)
                .map_err(|e| format!("is not JSON: {e}")),
            Some(value @ (toml::Value::Table(_) | toml::Value::Array(_))) => {
                serde_json::to_value(value)
                    .map(Some)
                    .map_err(|e| e.to_string())
            }
            Some(_) => Err("must be a table, a list or a string of JSON".into()),
        }
    }

    /// Every problem of this section, with paths under `kubernetes.`.
    pub(crate) fn problems(&self, runner_classes: &[(String, Option<String>)]) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut problem = |path: String, message: String| problems.push(Problem { path, message });
        if self.coordinator.is_empty() || !is_label_value(&self.coordinator) {
            problem(
                "kubernetes.coordinator".into(),
                "must be a valid label value (letters, digits, `-_.`, at most 63)".into(),
            );
        }
        if let Some(replica) = &self.replica
            && (replica.is_empty() || !is_label_value(replica) || replica == "leader")
        {
            problem(
                "kubernetes.replica".into(),
                "must be a valid label value (letters, digits, `-_.`, at most 63) other than `leader`"
                    .into(),
            );
        }
        if self.lease_duration < Duration::from_secs(1) {
            problem(
                "kubernetes.lease_duration".into(),
                "must be at least 1s".into(),
            );
        }
        if self.lease_renew.is_zero() || self.lease_renew >= self.lease_duration {
            problem(
                "kubernetes.lease_renew".into(),
                "must be above 0 and below kubernetes.lease_duration".into(),
            );
        }
        if let Some(ns) = &self.namespace
            && !is_dns_label(ns)
        {
            problem(
                "kubernetes.namespace".into(),
                format!("`{ns}` is not a valid namespace name"),
            );
        }
        for (field, value) in [
            ("helper_image", &self.helper_image),
            ("default_image", &self.default_image),
        ] {
            if value.trim().is_empty() {
                problem(format!("kubernetes.{field}"), "must not be empty".into());
            }
        }
        if !(self.qps > 0.0 && self.qps.is_finite()) {
            problem("kubernetes.qps".into(), "must be above 0".into());
        }
        if self.burst == 0 {
            problem("kubernetes.burst".into(), "must be at least 1".into());
        }
        if self.pending_timeout < Duration::from_secs(10) {
            problem(
                "kubernetes.pending_timeout".into(),
                "must be at least 10s (pods need time to be scheduled and pull images)".into(),
            );
        }
        if let Some(limit) = &self.builds_size_limit
            && quantity::parse(limit).is_none()
        {
            problem(
                "kubernetes.builds_size_limit".into(),
                format!("`{limit}` is not a quantity like 20Gi"),
            );
        }
        let sets = [
            ("build", &self.build),
            ("service", &self.service),
            ("helper", &self.helper),
            ("max", &self.max),
            ("max_service", &self.max_service),
            ("max_helper", &self.max_helper),
        ];
        for (set, resources) in sets {
            for (path, message) in resource_problems(resources) {
                problem(format!("kubernetes.{set}.{path}"), message);
            }
        }
        for (field, value) in [
            (
                "service_account_overwrite_allowed",
                &self.service_account_overwrite_allowed,
            ),
            (
                "node_selector_overwrite_allowed",
                &self.node_selector_overwrite_allowed,
            ),
            (
                "pod_annotations_overwrite_allowed",
                &self.pod_annotations_overwrite_allowed,
            ),
            (
                "pod_labels_overwrite_allowed",
                &self.pod_labels_overwrite_allowed,
            ),
            (
                "node_tolerations_overwrite_allowed",
                &self.node_tolerations_overwrite_allowed,
            ),
            (
                "namespace_overwrite_allowed",
                &self.namespace_overwrite_allowed,
            ),
        ] {
            if let Some(pattern) = value
                && let Err(e) = regex::Regex::new(pattern)
            {
                problem(
                    format!("kubernetes.{field}"),
                    format!("is not a valid regex: {e}"),
                );
            }
        }
        for (name, class) in &self.resource_classes {
            if !is_label_value(name) {
                problem(
                    format!("kubernetes.resource_classes.{name}"),
                    "class names use letters, digits and `-_.`".into(),
                );
            }
            for (path, message) in resource_problems(&class.resources) {
                problem(
                    format!("kubernetes.resource_classes.{name}.{path}"),
                    message,
                );
            }
            for (field, price) in [
                ("price_per_vcpu_hour", class.price_per_vcpu_hour),
                ("price_per_gib_hour", class.price_per_gib_hour),
            ] {
                if let Some(price) = price
                    && !(price.is_finite() && price >= 0.0)
                {
                    problem(
                        format!("kubernetes.resource_classes.{name}.{field}"),
                        "must be a price of 0 or more".into(),
                    );
                }
            }
        }
        let known = |name: &str| self.resource_classes.contains_key(name);
        if let Some(name) = &self.default_resource_class
            && !known(name)
        {
            problem(
                "kubernetes.default_resource_class".into(),
                format!("`{name}` is not in [kubernetes.resource_classes]"),
            );
        }
        for (path, class) in runner_classes {
            if let Some(name) = class
                && !known(name)
            {
                problem(
                    path.clone(),
                    format!("`{name}` is not in [kubernetes.resource_classes]"),
                );
            }
        }
        match self.pod_patch_json() {
            Err(message) => problem("kubernetes.pod_patch".into(), message),
            Ok(Some(patch)) => {
                if let Err(message) = super::patch::check_shape(self.pod_patch_type, &patch) {
                    problem("kubernetes.pod_patch".into(), message);
                }
            }
            Ok(None) => {}
        }
        problems.extend(self.volumes.problems());
        problems.extend(super::images::problems(self));
        problems
    }
}

fn resource_problems(resources: &Resources) -> Vec<(String, String)> {
    RESOURCE_FIELDS
        .iter()
        .filter_map(|(name, ..)| {
            let value = resources.get(name)?;
            quantity::parse(value).is_none().then(|| {
                (
                    (*name).to_owned(),
                    format!("`{value}` is not a Kubernetes quantity (like 500m, 2, 4Gi)"),
                )
            })
        })
        .collect()
}

/// A DNS-1123 label (namespace names).
pub(super) fn is_dns_label(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !value.starts_with('-')
        && !value.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_preset_sits_under_the_class_settings() {
        let class = ResourceClass {
            preset: Some(Preset::EciSpot),
            annotations: BTreeMap::from([(
                "k8s.aliyun.com/eci-spot-fallback".to_owned(),
                "false".to_owned(),
            )]),
            resources: Resources {
                cpu_request: Some("2".into()),
                ..Resources::default()
            },
            ..ResourceClass::default()
        }
        .resolved();
        assert_eq!(
            class.annotations["k8s.aliyun.com/eci-spot-strategy"],
            "SpotAsPriceGo"
        );
        assert_eq!(
            class.annotations["k8s.aliyun.com/eci-spot-fallback"],
            "false"
        );
        assert_eq!(class.labels["alibabacloud.com/eci"], "true");
        assert_eq!(class.resources.cpu_request.as_deref(), Some("2"));
    }

    #[test]
    fn problems_name_the_field() {
        let config = KubernetesConfig {
            build: Resources {
                memory_limit: Some("2 GB".into()),
                ..Resources::default()
            },
            default_resource_class: Some("gpu".into()),
            pod_patch: Some(toml::Value::String("{not json".into())),
            node_selector_overwrite_allowed: Some("(".into()),
            namespace_overwrite_allowed: Some("ci-[".into()),
            ..KubernetesConfig::default()
        };
        let problems: Vec<String> = config
            .problems(&[(
                "sources.gitlab[0].resource_class".into(),
                Some("spot".into()),
            )])
            .into_iter()
            .map(|p| p.path)
            .collect();
        assert_eq!(
            problems,
            [
                "kubernetes.build.memory_limit",
                "kubernetes.node_selector_overwrite_allowed",
                "kubernetes.namespace_overwrite_allowed",
                "kubernetes.default_resource_class",
                "sources.gitlab[0].resource_class",
                "kubernetes.pod_patch",
            ]
        );
    }

    #[test]
    fn replica_ids_are_label_values() {
        assert_eq!(as_label_value("kiln-7d9f-abcde"), "kiln-7d9f-abcde");
        assert_eq!(as_label_value("host.example.com"), "host.example.com");
        assert_eq!(as_label_value("-my host/1-"), "my-host-1");
        assert_eq!(as_label_value("///"), "kiln");
        assert_eq!(as_label_value(&"a".repeat(80)).len(), 63);
        let config = KubernetesConfig {
            replica: Some("r1".into()),
            ..KubernetesConfig::default()
        };
        assert_eq!(config.replica_id(), "r1");
    }

    #[test]
    fn lease_timing_is_checked() {
        let config = KubernetesConfig {
            replica: Some("leader".into()),
            lease_duration: Duration::from_secs(5),
            lease_renew: Duration::from_secs(5),
            ..KubernetesConfig::default()
        };
        let problems: Vec<String> = config.problems(&[]).into_iter().map(|p| p.path).collect();
        assert_eq!(problems, ["kubernetes.replica", "kubernetes.lease_renew"]);
    }

    #[test]
    fn label_values() {
        assert!(is_label_value("kiln"));
        assert!(is_label_value(""));
        assert!(!is_label_value("-kiln"));
        assert!(!is_label_value("a/b"));
    }
}
