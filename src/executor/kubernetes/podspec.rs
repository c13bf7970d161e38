//! The pod and Secret of one build: for the kiln agent, an init container installing the agent
//! and cloning the sources, the build container in the job's image and one container per
//! service; for a foreign agent (Jenkins, GitHub), its container plus the user's extra
//! containers sharing its workspace. Sizes come from the config, the resource class and the
//! job's own requests, each checked against the configured caps.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvVar, EnvVarSource, HostAlias,
    LocalObjectReference, Pod, PodSecurityContext, PodSpec, ResourceRequirements, SeccompProfile,
    Secret, SecretKeySelector, SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::config::{KubernetesConfig, RESOURCE_FIELDS, ResourceClass, Resources, SecurityProfile};
use super::quantity;
use crate::build::{
    Build, ClassChoice, EnvValue, ForeignAgent, Image, JOB_FILE, PullPolicy, Request, Requested,
    Service, Workload,
};
use crate::executor::Footprint;

/// Where the init container puts the agent binary.
pub(crate) const BIN_DIR: &str = "/kiln/bin";
/// Where the build's Secret is mounted for the kiln agent.
pub(crate) const JOB_DIR: &str = "/kiln/job";
/// The builds volume: projects are checked out below it (`/builds/<group>/<project>`).
pub(crate) const BUILDS_DIR: &str = "/builds";
/// The agent's scratch directory, on the builds volume (shared by init and build container).
pub(crate) const WORK_DIR: &str = "/builds/.kiln";
/// The kiln binary in the kiln (helper) image.
pub(crate) const HELPER_BINARY: &str = "/usr/local/bin/kiln";
/// The build container's name.
pub(crate) const BUILD_CONTAINER: &str = "build";
/// The init container's name.
pub(crate) const PREPARE_CONTAINER: &str = "prepare";
/// Where the build container leaves the agent's result (the default termination message path).
pub(crate) const TERMINATION_LOG: &str = "/dev/termination-log";

/// Labels every object kiln creates carries.
pub(crate) const LABEL_COORDINATOR: &str = "kiln.dev/coordinator";
/// The replica of the installation that follows the build (the coordinator label names the
/// installation, which all its replicas share).
pub(crate) const LABEL_REPLICA: &str = "kiln.dev/replica";
/// The CI server (`gitlab`, `jenkins`, `github`).
pub(crate) const LABEL_SOURCE: &str = "kiln.dev/source";
/// The CI server's id of the work.
pub(crate) const LABEL_JOB_ID: &str = "kiln.dev/job-id";
/// The source entry that took the work.
pub(crate) const LABEL_RUNNER: &str = "kiln.dev/runner";
/// The resource class of the pod.
pub(crate) const LABEL_CLASS: &str = "kiln.dev/resource-class";
/// The exact source entry name (label values cannot hold every name).
pub(crate) const ANNOTATION_RUNNER: &str = "kiln.dev/runner";
/// The container whose end is the build's end.
pub(crate) const ANNOTATION_MAIN: &str = "kiln.dev/main-container";
/// kiln's own labels, which [`crate::build::Found::labels`] leaves out.
pub(crate) const OWN_LABELS: &[&str] = &[
    "app.kubernetes.io/managed-by",
    LABEL_COORDINATOR,
    LABEL_REPLICA,
    LABEL_SOURCE,
    LABEL_JOB_ID,
    LABEL_RUNNER,
    LABEL_CLASS,
];

/// A build asks for something the configuration does not allow: it fails with
/// `runner_configuration_error` and this message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct SpecError(pub(crate) String);

/// The labels that identify the objects of `build` (pod and Secret).
pub(crate) fn identity_labels(
    config: &KubernetesConfig,
    build: &Build,
) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([
        ("app.kubernetes.io/managed-by".to_owned(), "kiln".to_owned()),
        (LABEL_COORDINATOR.to_owned(), config.coordinator.clone()),
        (LABEL_SOURCE.to_owned(), build.key.source.name().to_owned()),
        (LABEL_JOB_ID.to_owned(), build.key.id.to_string()),
        (LABEL_RUNNER.to_owned(), label_value(&build.key.runner)),
    ]);
    if let Some(replica) = &config.replica {
        labels.insert(LABEL_REPLICA.to_owned(), label_value(replica));
    }
    for (key, value) in &build.labels {
        labels.insert(key.clone(), label_value(value));
    }
    labels
}

/// The build's Secret, holding its secret data (the job file with the job token, an agent
/// secret). Its owner reference to the pod is added once the pod exists.
pub(crate) fn secret(build: &Build, config: &KubernetesConfig, namespace: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(build.name.clone()),
            namespace: Some(namespace.to_owned()),
            labels: Some(identity_labels(config, build)),
            annotations: Some(BTreeMap::from([(
                ANNOTATION_RUNNER.to_owned(),
                build.key.runner.clone(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(
            build
                .secrets
                .iter()
                .map(|(key, value)| (key.clone(), ByteString(value.clone())))
                .collect(),
        ),
        ..Secret::default()
    }
}

/// The pod of a build.
///
/// # Errors
/// The build asks for more than the configuration allows (a request over its cap, an unknown
/// resource class), or a value is malformed; the message names where the request came from and
/// the limit.
pub(crate) fn pod(
    build: &Build,
    config: &KubernetesConfig,
    namespace: &str,
) -> Result<Pod, SpecError> {
    let (class_name, class) = resource_class(build.class.as_ref(), config)?;
    let overrides = Overrides::from_requests(&build.requests, config)?;
    let mut labels = identity_labels(config, build);
    for extra in [&config.labels, &class.labels, &overrides.labels] {
        labels.extend(extra.clone());
    }
    if let Some(name) = &class_name {
        labels.insert(LABEL_CLASS.into(), name.clone());
    }
    let mut annotations = build.annotations.clone();
    for extra in [
        &config.annotations,
        &class.annotations,
        &overrides.annotations,
    ] {
        annotations.extend(extra.clone());
    }
    annotations.insert(ANNOTATION_RUNNER.into(), build.key.runner.clone());
    let (mut node_selector, tolerations) = placement(config, &class);
    node_selector.extend(overrides.node_selector.clone());
    let security = container_security(config);
    let main_resources = config
        .build
        .overlaid(&class.resources)
        .overlaid(&overrides.resources);

    let mut spec = match &build.workload {
        Workload::KilnAgent { image, services } => {
            annotations.insert(ANNOTATION_MAIN.into(), BUILD_CONTAINER.into());
            kiln_agent_spec(build, image.as_ref(), services, &main_resources, config)
        }
        Workload::Foreign(agent) => {
            annotations.insert(ANNOTATION_MAIN.into(), agent.container.clone());
            foreign_spec(build, agent, &main_resources, config)
        }
    };
    for container in spec
        .init_containers
        .iter_mut()
        .flatten()
        .chain(spec.containers.iter_mut())
    {
        if container.security_context.is_none() {
            container.security_context = Some(security.clone());
        }
    }
    spec.restart_policy = Some("Never".into());
    spec.active_deadline_seconds = build.timeout.map(|timeout| {
        i64::try_from(timeout.saturating_add(config.deadline_margin).as_secs()).unwrap_or(i64::MAX)
    });
    spec.termination_grace_period_seconds =
        Some(i64::try_from(config.termination_grace.as_secs()).unwrap_or(30));
    spec.automount_service_account_token = Some(config.automount_service_account_token);
    spec.service_account_name = overrides
        .service_account
        .clone()
        .or_else(|| config.service_account.clone());
    spec.enable_service_links = Some(false);
    spec.image_pull_secrets = (!config.image_pull_secrets.is_empty()).then(|| {
        config
            .image_pull_secrets
            .iter()
            .map(|name| LocalObjectReference { name: name.clone() })
            .collect()
    });
    spec.node_selector = (!node_selector.is_empty()).then_some(node_selector);
    spec.tolerations = (!tolerations.is_empty()).then_some(tolerations);
    spec.runtime_class_name = class.runtime_class.clone();
    spec.priority_class_name = class.priority_class.clone();
    spec.security_context = Some(pod_security(config));
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some(build.name.clone()),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        spec: Some(spec),
        ..Pod::default()
    };
    apply_patch(pod, config)
}

/// What the pod of `build` occupies: the requests of the containers that run together (the
/// init container runs before them and is not counted), a container's limit where it requests
/// nothing, and the prices of its resource class. `None` when the build cannot get a pod.
pub(crate) fn footprint(build: &Build, config: &KubernetesConfig) -> Option<Footprint> {
    let pod = pod(build, config, "default").ok()?;
    let class = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(LABEL_CLASS))
        .cloned();
    let prices = class
        .as_deref()
        .and_then(|name| config.resource_classes.get(name))
        .map(ResourceClass::resolved)
        .unwrap_or_default();
    let (mut cpu, mut memory) = (0.0, 0.0);
    for container in pod.spec.iter().flat_map(|spec| spec.containers.iter()) {
        let Some(resources) = &container.resources else {
            continue;
        };
        let amount = |key: &str| {
            [&resources.requests, &resources.limits]
                .into_iter()
                .find_map(|set| set.as_ref()?.get(key))
                .and_then(|q| quantity::parse(&q.0))
                .unwrap_or(0.0)
        };
        cpu += amount("cpu");
        memory += amount("memory");
    }
    Some(Footprint {
        class,
        vcpu: cpu,
        gib: memory / 1024f64.powi(3),
        price_per_vcpu_hour: prices.price_per_vcpu_hour,
        price_per_gib_hour: prices.price_per_gib_hour,
    })
}

/// The pod of the kiln agent: `prepare` installs the agent and fetches the sources, `build`
/// runs it in the job's image, one `svc-N` container per service.
fn kiln_agent_spec(
    build: &Build,
    image: Option<&Image>,
    services: &[Service],
    resources: &Resources,
    config: &KubernetesConfig,
) -> PodSpec {
    let job_mount = VolumeMount {
        name: "job".into(),
        mount_path: JOB_DIR.into(),
        read_only: Some(true),
        ..VolumeMount::default()
    };
    let bin_mount = |read_only: bool| VolumeMount {
        name: "kiln-bin".into(),
        mount_path: BIN_DIR.into(),
        read_only: Some(read_only),
        ..VolumeMount::default()
    };
    let builds_mount = VolumeMount {
        name: "builds".into(),
        mount_path: BUILDS_DIR.into(),
        ..VolumeMount::default()
    };
    let job_file = format!("{JOB_DIR}/{JOB_FILE}");

    let prepare = Container {
        name: PREPARE_CONTAINER.into(),
        image: Some(config.helper_image.clone()),
        image_pull_policy: Some("IfNotPresent".into()),
        command: Some(vec![
            HELPER_BINARY.into(),
            "agent".into(),
            "prepare".into(),
            "--job".into(),
            job_file.clone(),
            "--work-dir".into(),
            WORK_DIR.into(),
            "--builds-dir".into(),
            BUILDS_DIR.into(),
            "--bin-dir".into(),
            BIN_DIR.into(),
        ]),
        resources: Some(requirements(&config.helper)),
        volume_mounts: Some(vec![
            bin_mount(false),
            builds_mount.clone(),
            job_mount.clone(),
        ]),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Container::default()
    };

    let image = image.filter(|i| !i.name.trim().is_empty());
    let agent_args = vec![
        format!("{BIN_DIR}/kiln"),
        "agent".into(),
        "--job".into(),
        job_file,
        "--work-dir".into(),
        WORK_DIR.into(),
        "--builds-dir".into(),
        BUILDS_DIR.into(),
        "--result".into(),
        TERMINATION_LOG.into(),
    ];
    let entrypoint = image
        .map(|i| i.entrypoint.clone())
        .filter(|e| e.iter().any(|part| !part.is_empty()));
    let (command, args) = match entrypoint {
        // A wrapper entrypoint (`dockerd-entrypoint.sh "$@"`) sets up, then runs the agent.
        Some(entrypoint) => (entrypoint, Some(agent_args)),
        None => (agent_args, None),
    };
    let build_container = Container {
        name: BUILD_CONTAINER.into(),
        image: Some(
            image
                .map(|i| i.name.clone())
                .unwrap_or_else(|| config.default_image.clone()),
        ),
        image_pull_policy: image.and_then(|i| i.pull_policy).map(pull_policy),
        command: Some(command),
        args,
        working_dir: Some(BUILDS_DIR.into()),
        resources: Some(requirements(resources)),
        volume_mounts: Some(vec![bin_mount(true), builds_mount, job_mount]),
        termination_message_path: Some(TERMINATION_LOG.into()),
        termination_message_policy: Some("File".into()),
        ..Container::default()
    };

    let mut containers = vec![build_container];
    let mut host_names = Vec::new();
    for (index, service) in services.iter().enumerate() {
        if service.image.name.trim().is_empty() {
            continue;
        }
        host_names.extend(service.aliases.iter().cloned());
        containers.push(Container {
            name: format!("svc-{index}"),
            image: Some(service.image.name.clone()),
            image_pull_policy: service.image.pull_policy.map(pull_policy),
            command: (!service.image.entrypoint.is_empty())
                .then(|| service.image.entrypoint.clone()),
            args: (!service.command.is_empty()).then(|| service.command.clone()),
            env: Some(
                service
                    .env
                    .iter()
                    .map(|(name, value)| EnvVar {
                        name: name.clone(),
                        value: Some(value.clone()),
                        ..EnvVar::default()
                    })
                    .collect(),
            ),
            resources: Some(requirements(&config.service)),
            ..Container::default()
        });
    }
    host_names.sort();
    host_names.dedup();
    PodSpec {
        host_aliases: (!host_names.is_empty()).then(|| {
            vec![HostAlias {
                ip: "127.0.0.1".into(),
                hostnames: Some(host_names),
            }]
        }),
        init_containers: Some(vec![prepare]),
        containers,
        volumes: Some(vec![
            Volume {
                name: "kiln-bin".into(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Volume::default()
            },
            Volume {
                name: "builds".into(),
                empty_dir: Some(EmptyDirVolumeSource {
                    size_limit: config.builds_size_limit.clone().map(Quantity),
                    ..EmptyDirVolumeSource::default()
                }),
                ..Volume::default()
            },
            Volume {
                name: "job".into(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(build.name.clone()),
                    // Readable by whatever user the job's image runs as; only the init and
                    // build containers mount it.
                    default_mode: Some(0o444),
                    ..SecretVolumeSource::default()
                }),
                ..Volume::default()
            },
        ]),
        ..PodSpec::default()
    }
}

/// The pod of a foreign agent: its container, with secret values from the build's Secret, and
/// the user's extra containers, all sharing the agent's work directory.
fn foreign_spec(
    build: &Build,
    agent: &ForeignAgent,
    resources: &Resources,
    config: &KubernetesConfig,
) -> PodSpec {
    let workspace = VolumeMount {
        name: "workspace".into(),
        mount_path: agent.workdir.clone(),
        ..VolumeMount::default()
    };
    let env = agent
        .env
        .iter()
        .map(|var| match &var.value {
            EnvValue::Plain(value) => EnvVar {
                name: var.name.clone(),
                value: Some(value.clone()),
                ..EnvVar::default()
            },
            EnvValue::Secret(key) => EnvVar {
                name: var.name.clone(),
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: build.name.clone(),
                        key: key.clone(),
                        optional: Some(false),
                    }),
                    ..EnvVarSource::default()
                }),
                ..EnvVar::default()
            },
        })
        .collect();
    let main = Container {
        name: agent.container.clone(),
        image: Some(agent.image.clone()),
        command: agent.command.clone(),
        args: agent.args.clone(),
        env: Some(env),
        resources: Some(requirements(resources)),
        volume_mounts: Some(vec![workspace.clone()]),
        working_dir: Some(agent.workdir.clone()),
        ..Container::default()
    };
    let mut containers = vec![main];
    for extra in &agent.extra_containers {
        let mut container = extra.clone();
        let mounts = container.volume_mounts.get_or_insert_with(Vec::new);
        if !mounts.iter().any(|m| m.mount_path == agent.workdir) {
            mounts.push(workspace.clone());
        }
        if container.resources.is_none() {
            container.resources = Some(requirements(&config.service));
        }
        containers.push(container);
    }
    PodSpec {
        containers,
        volumes: Some(vec![Volume {
            name: "workspace".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        }]),
        ..PodSpec::default()
    }
}

fn pull_policy(policy: PullPolicy) -> String {
    match policy {
        PullPolicy::Always => "Always",
        PullPolicy::IfNotPresent => "IfNotPresent",
        PullPolicy::Never => "Never",
    }
    .to_owned()
}

/// The memory limit of container `container`, for messages about OOM kills.
pub(crate) fn memory_limit(pod: &Pod, container: &str) -> Option<String> {
    pod.spec
        .as_ref()?
        .containers
        .iter()
        .find(|c| c.name == container)?
        .resources
        .as_ref()?
        .limits
        .as_ref()?
        .get("memory")
        .map(|q| q.0.clone())
}

pub(crate) fn apply_patch(pod: Pod, config: &KubernetesConfig) -> Result<Pod, SpecError> {
    let Ok(Some(patch)) = config.pod_patch_json() else {
        return Ok(pod);
    };
    let mut value = serde_json::to_value(&pod)
        .map_err(|e| SpecError(format!("cannot apply kubernetes.pod_patch: {e}")))?;
    merge_patch(&mut value, &patch);
    serde_json::from_value(value).map_err(|e| {
        SpecError(format!(
            "kubernetes.pod_patch makes an invalid pod: {e}; fix the patch in the config"
        ))
    })
}

/// RFC 7386 JSON merge patch: objects merge, `null` removes, anything else replaces.
fn merge_patch(target: &mut serde_json::Value, patch: &serde_json::Value) {
    let serde_json::Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = serde_json::Value::Object(serde_json::Map::new());
    }
    if let serde_json::Value::Object(map) = target {
        for (key, value) in patch {
            if value.is_null() {
                map.remove(key);
            } else {
                merge_patch(
                    map.entry(key.clone()).or_insert(serde_json::Value::Null),
                    value,
                );
            }
        }
    }
}

/// Node selector and tolerations of the config and a resource class together.
pub(crate) fn placement(
    config: &KubernetesConfig,
    class: &ResourceClass,
) -> (
    BTreeMap<String, String>,
    Vec<k8s_openapi::api::core::v1::Toleration>,
) {
    let mut node_selector = config.node_selector.clone();
    node_selector.extend(class.node_selector.clone());
    let tolerations = config
        .tolerations
        .iter()
        .chain(class.tolerations.iter())
        .cloned()
        .collect();
    (node_selector, tolerations)
}

/// The resource class a build uses: the one its source chose, else the configured default.
fn resource_class(
    choice: Option<&ClassChoice>,
    config: &KubernetesConfig,
) -> Result<(Option<String>, ResourceClass), SpecError> {
    let (name, origin) = match (choice, config.default_resource_class.as_deref()) {
        (Some(choice), _) => (choice.name.as_str(), choice.origin.as_str()),
        (None, Some(default)) => (default, "kubernetes.default_resource_class"),
        (None, None) => return Ok((None, ResourceClass::default())),
    };
    match config.resource_classes.get(name) {
        Some(class) => Ok((Some(name.to_owned()), class.resolved())),
        None => {
            let known: Vec<&str> = config.resource_classes.keys().map(String::as_str).collect();
            Err(SpecError(format!(
                "{origin} names resource class `{name}`, which this runner does not have (configured: {})",
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            )))
        }
    }
}

/// What a build's own requests change in its pod, each checked against its cap.
#[derive(Debug, Default)]
struct Overrides {
    resources: Resources,
    service_account: Option<String>,
    node_selector: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    labels: BTreeMap<String, String>,
}

impl Overrides {
    fn from_requests(requests: &[Requested], config: &KubernetesConfig) -> Result<Self, SpecError> {
        let mut out = Self::default();
        for request in requests {
            let (origin, value) = (request.origin.as_str(), request.value.trim());
            match request.what {
                Request::Resource(field) => {
                    let field = field.as_str();
                    let requested = quantity::parse(value).ok_or_else(|| {
                        SpecError(format!(
                            "{origin}=`{value}` is not a Kubernetes quantity (like 500m, 2, 4Gi)"
                        ))
                    })?;
                    let Some(cap) = config.max.get(field) else {
                        return Err(SpecError(format!(
                            "{origin} is not allowed on this runner: set kubernetes.max.{field} to allow it"
                        )));
                    };
                    let cap_value = quantity::parse(cap).unwrap_or(0.0);
                    if requested > cap_value {
                        return Err(SpecError(format!(
                            "{origin}={value} is above this runner's maximum of {cap} (kubernetes.max.{field})"
                        )));
                    }
                    out.resources.set(field, value.to_owned());
                }
                Request::ServiceAccount => {
                    check_allowed(
                        config.service_account_overwrite_allowed.as_deref(),
                        origin,
                        value,
                        "service_account_overwrite_allowed",
                    )?;
                    out.service_account = Some(value.to_owned());
                }
                Request::NodeSelector | Request::PodAnnotation | Request::PodLabel => {
                    let (allowed, setting, target) = match request.what {
                        Request::NodeSelector => (
                            config.node_selector_overwrite_allowed.as_deref(),
                            "node_selector_overwrite_allowed",
                            &mut out.node_selector,
                        ),
                        Request::PodAnnotation => (
                            config.pod_annotations_overwrite_allowed.as_deref(),
                            "pod_annotations_overwrite_allowed",
                            &mut out.annotations,
                        ),
                        _ => (
                            config.pod_labels_overwrite_allowed.as_deref(),
                            "pod_labels_overwrite_allowed",
                            &mut out.labels,
                        ),
                    };
                    let Some((key, entry_value)) = value.split_once('=') else {
                        return Err(SpecError(format!(
                            "{origin}=`{value}` must have the form key=value"
                        )));
                    };
                    check_allowed(allowed, origin, value, setting)?;
                    target.insert(key.trim().to_owned(), entry_value.trim().to_owned());
                }
            }
        }
        Ok(out)
    }
}

fn check_allowed(
    pattern: Option<&str>,
    variable: &str,
    value: &str,
    setting: &str,
) -> Result<(), SpecError> {
    let Some(pattern) = pattern else {
        return Err(SpecError(format!(
            "{variable} is not allowed on this runner: set kubernetes.{setting} to allow it"
        )));
    };
    // Anchored: the whole value must match, not a part of it.
    let anchored = format!("^(?:{pattern})$");
    let allowed = regex::Regex::new(&anchored).is_ok_and(|re| re.is_match(value));
    if allowed {
        Ok(())
    } else {
        Err(SpecError(format!(
            "{variable}=`{value}` does not match kubernetes.{setting} (`{pattern}`)"
        )))
    }
}

pub(crate) fn requirements(resources: &Resources) -> ResourceRequirements {
    let mut requests = BTreeMap::new();
    let mut limits = BTreeMap::new();
    for (field, _, is_limit, key) in RESOURCE_FIELDS {
        if let Some(value) = resources.get(field) {
            let target = if *is_limit {
                &mut limits
            } else {
                &mut requests
            };
            target.insert((*key).to_owned(), Quantity(value.clone()));
        }
    }
    ResourceRequirements {
        requests: (!requests.is_empty()).then_some(requests),
        limits: (!limits.is_empty()).then_some(limits),
        ..ResourceRequirements::default()
    }
}

pub(crate) fn container_security(config: &KubernetesConfig) -> SecurityContext {
    let caps = |add: &[&str]| Capabilities {
        drop: Some(vec!["ALL".into()]),
        add: (!add.is_empty()).then(|| add.iter().map(|s| (*s).to_owned()).collect()),
    };
    match config.security {
        SecurityProfile::Baseline => SecurityContext {
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(caps(&[
                "CHOWN",
                "DAC_OVERRIDE",
                "FOWNER",
                "SETGID",
                "SETUID",
            ])),
            ..SecurityContext::default()
        },
        SecurityProfile::Restricted => SecurityContext {
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            run_as_non_root: Some(true),
            capabilities: Some(caps(&[])),
            ..SecurityContext::default()
        },
    }
}

pub(crate) fn pod_security(config: &KubernetesConfig) -> PodSecurityContext {
    let run_as_user = match config.security {
        SecurityProfile::Restricted => Some(config.run_as_user.unwrap_or(1000)),
        SecurityProfile::Baseline => config.run_as_user,
    };
    PodSecurityContext {
        run_as_user,
        run_as_group: config.run_as_group,
        fs_group: config.fs_group,
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..SeccompProfile::default()
        }),
        ..PodSecurityContext::default()
    }
}

/// `value` made into a valid label value (runner names may hold any character).
pub(crate) fn label_value(value: &str) -> String {
    let cleaned: String = value
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .take(63)
        .collect();
    cleaned
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_owned()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::build::{About, BuildKey, EnvVar as BuildEnv, ResourceField, SourceKind};

    fn build() -> Build {
        Build {
            key: BuildKey {
                source: SourceKind::GitLab,
                runner: "gitlab.example.com-0".into(),
                id: 42,
            },
            name: "kiln-gl-42".into(),
            workload: Workload::KilnAgent {
                image: None,
                services: Vec::new(),
            },
            secrets: BTreeMap::from([(JOB_FILE.to_owned(), b"{\"token\":\"job-token\"}".to_vec())]),
            class: None,
            requests: Vec::new(),
            timeout: Some(Duration::from_secs(600)),
            labels: BTreeMap::new(),
            annotations: BTreeMap::from([(
                "job.runner.gitlab.com/sha".to_owned(),
                "abc123".to_owned(),
            )]),
            about: About::default(),
            untrusted: false,
        }
    }

    fn requesting(what: Request, value: &str, origin: &str) -> Build {
        Build {
            requests: vec![Requested {
                what,
                value: value.into(),
                origin: origin.into(),
            }],
            ..build()
        }
    }

    fn container<'a>(pod: &'a Pod, name: &str) -> &'a Container {
        pod.spec
            .as_ref()
            .unwrap()
            .containers
            .iter()
            .find(|c| c.name == name)
            .unwrap()
    }

    fn limit(pod: &Pod, key: &str) -> Option<String> {
        container(pod, BUILD_CONTAINER)
            .resources
            .as_ref()?
            .limits
            .as_ref()?
            .get(key)
            .map(|q| q.0.clone())
    }

    #[test]
    fn the_pod_runs_the_agent_and_never_restarts() {
        let config = KubernetesConfig::default();
        let build = build();
        let pod = pod(&build, &config, "ci").unwrap();
        assert_eq!(pod.metadata.name.as_deref(), Some("kiln-gl-42"));
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        assert_eq!(spec.active_deadline_seconds, Some(600 + 600));
        assert_eq!(spec.automount_service_account_token, Some(false));
        let main = container(&pod, BUILD_CONTAINER);
        assert_eq!(main.image.as_deref(), Some("alpine:3"));
        assert_eq!(main.command.as_ref().unwrap()[0], "/kiln/bin/kiln");
        assert!(
            main.env.is_none(),
            "the job reaches the pod only through its Secret"
        );
        let json = serde_json::to_string(&pod).unwrap();
        assert!(!json.contains("job-token"), "no token in the pod spec");
        let labels = pod.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[LABEL_JOB_ID], "42");
        assert_eq!(labels[LABEL_SOURCE], "gitlab");
        let annotations = pod.metadata.annotations.as_ref().unwrap();
        assert_eq!(annotations["job.runner.gitlab.com/sha"], "abc123");
        assert_eq!(annotations[ANNOTATION_MAIN], BUILD_CONTAINER);
        let secret = secret(&build, &config, "ci");
        assert!(secret.data.unwrap().contains_key(JOB_FILE));
    }

    #[test]
    fn an_image_entrypoint_wraps_the_agent() {
        let build = Build {
            workload: Workload::KilnAgent {
                image: Some(Image {
                    name: "docker:27".into(),
                    entrypoint: vec!["dockerd-entrypoint.sh".into()],
                    pull_policy: Some(PullPolicy::IfNotPresent),
                }),
                services: Vec::new(),
            },
            ..build()
        };
        let pod = pod(&build, &KubernetesConfig::default(), "ci").unwrap();
        let main = container(&pod, BUILD_CONTAINER);
        assert_eq!(main.command.as_deref().unwrap(), ["dockerd-entrypoint.sh"]);
        assert_eq!(main.args.as_ref().unwrap()[0], "/kiln/bin/kiln");
        assert_eq!(main.image_pull_policy.as_deref(), Some("IfNotPresent"));
    }

    #[test]
    fn services_are_sidecars_reachable_by_alias() {
        let build = Build {
            workload: Workload::KilnAgent {
                image: None,
                services: vec![Service {
                    image: Image {
                        name: "postgres:16".into(),
                        ..Image::default()
                    },
                    command: vec!["postgres".into(), "-c".into(), "fsync=off".into()],
                    env: vec![("POSTGRES_PASSWORD".into(), "pw".into())],
                    aliases: vec!["db".into(), "postgres".into()],
                }],
            },
            ..build()
        };
        let pod = pod(&build, &KubernetesConfig::default(), "ci").unwrap();
        let svc = container(&pod, "svc-0");
        assert_eq!(svc.args.as_ref().unwrap()[0], "postgres");
        assert!(svc.command.is_none());
        assert_eq!(svc.env.as_ref().unwrap()[0].name, "POSTGRES_PASSWORD");
        assert!(
            svc.volume_mounts.is_none(),
            "services never see the job Secret"
        );
        let aliases = pod.spec.as_ref().unwrap().host_aliases.as_ref().unwrap();
        let names = aliases[0].hostnames.as_ref().unwrap();
        assert_eq!(names, &["db".to_owned(), "postgres".to_owned()]);
    }

    #[test]
    fn requests_within_the_cap_apply() {
        let config = KubernetesConfig {
            max: Resources {
                memory_limit: Some("8Gi".into()),
                ..Resources::default()
            },
            ..KubernetesConfig::default()
        };
        let build = requesting(
            Request::Resource(ResourceField::MemoryLimit),
            "4Gi",
            "KUBERNETES_MEMORY_LIMIT",
        );
        let pod = pod(&build, &config, "ci").unwrap();
        assert_eq!(limit(&pod, "memory").as_deref(), Some("4Gi"));
    }

    #[test]
    fn requests_above_the_cap_name_their_origin_and_the_cap() {
        let config = KubernetesConfig {
            max: Resources {
                memory_limit: Some("8Gi".into()),
                ..Resources::default()
            },
            ..KubernetesConfig::default()
        };
        let memory = |value| {
            requesting(
                Request::Resource(ResourceField::MemoryLimit),
                value,
                "KUBERNETES_MEMORY_LIMIT",
            )
        };
        let err = pod(&memory("16Gi"), &config, "ci").unwrap_err();
        assert!(err.0.contains("KUBERNETES_MEMORY_LIMIT=16Gi"), "{err}");
        assert!(err.0.contains("8Gi"), "{err}");
        let cpu = requesting(
            Request::Resource(ResourceField::CpuLimit),
            "2",
            "KUBERNETES_CPU_LIMIT",
        );
        let err = pod(&cpu, &config, "ci").unwrap_err();
        assert!(err.0.contains("kubernetes.max.cpu_limit"), "{err}");
        let err = pod(&memory("lots"), &config, "ci").unwrap_err();
        assert!(err.0.contains("not a Kubernetes quantity"), "{err}");
    }

    #[test]
    fn node_selector_requests_need_a_matching_allow_pattern() {
        let arch = requesting(
            Request::NodeSelector,
            "kubernetes.io/arch=arm64",
            "KUBERNETES_NODE_SELECTOR_ARCH",
        );
        let err = pod(&arch, &KubernetesConfig::default(), "ci").unwrap_err();
        assert!(err.0.contains("node_selector_overwrite_allowed"), "{err}");
        let config = KubernetesConfig {
            node_selector_overwrite_allowed: Some("kubernetes.io/arch=.*".into()),
            ..KubernetesConfig::default()
        };
        let pod_ = pod(&arch, &config, "ci").unwrap();
        let selector = pod_.spec.as_ref().unwrap().node_selector.as_ref().unwrap();
        assert_eq!(selector["kubernetes.io/arch"], "arm64");
        let evil = requesting(
            Request::NodeSelector,
            "evil=1",
            "KUBERNETES_NODE_SELECTOR_X",
        );
        let err = pod(&evil, &config, "ci").unwrap_err();
        assert!(err.0.contains("does not match"), "{err}");
    }

    #[test]
    fn the_footprint_sums_what_the_running_containers_request_and_carries_class_prices() {
        let mut config = KubernetesConfig::default();
        config.resource_classes.insert(
            "gpu".into(),
            ResourceClass {
                resources: Resources {
                    cpu_request: Some("4".into()),
                    memory_request: Some("16Gi".into()),
                    memory_limit: Some("16Gi".into()),
                    ..Resources::default()
                },
                price_per_vcpu_hour: Some(0.5),
                ..ResourceClass::default()
            },
        );
        let with_service = Build {
            workload: Workload::KilnAgent {
                image: None,
                services: vec![Service {
                    image: Image {
                        name: "postgres:16".into(),
                        ..Image::default()
                    },
                    ..Service::default()
                }],
            },
            class: Some(ClassChoice {
                name: "gpu".into(),
                origin: "KILN_RESOURCE_CLASS".into(),
            }),
            ..build()
        };
        let footprint = footprint(&with_service, &config).unwrap();
        assert_eq!(footprint.class.as_deref(), Some("gpu"));
        // The build container (4 vCPU, 16 GiB) and the service (250m, 256Mi); not the init
        // container, which runs before them.
        assert!((footprint.vcpu - 4.25).abs() < 1e-9, "{footprint:?}");
        assert!((footprint.gib - 16.25).abs() < 1e-9, "{footprint:?}");
        assert_eq!(footprint.price_per_vcpu_hour, Some(0.5));
        assert_eq!(footprint.price_per_gib_hour, None);
        // The default class: the `[kubernetes.build]` requests, no class prices.
        let plain = super::footprint(&build(), &KubernetesConfig::default()).unwrap();
        assert_eq!((plain.class, plain.vcpu, plain.gib), (None, 1.0, 2.0));
    }

    #[test]
    fn the_chosen_resource_class_sizes_and_places_the_pod() {
        let mut config = KubernetesConfig::default();
        config.resource_classes.insert(
            "spot".into(),
            ResourceClass {
                preset: Some(super::super::config::Preset::EciSpot),
                ..ResourceClass::default()
            },
        );
        config.resource_classes.insert(
            "big".into(),
            ResourceClass {
                resources: Resources {
                    memory_limit: Some("16Gi".into()),
                    ..Resources::default()
                },
                priority_class: Some("ci-high".into()),
                ..ResourceClass::default()
            },
        );
        let choose = |name: &str, origin: &str| Build {
            class: Some(ClassChoice {
                name: name.into(),
                origin: origin.into(),
            }),
            ..build()
        };
        let big = pod(&choose("big", "KILN_RESOURCE_CLASS"), &config, "ci").unwrap();
        assert_eq!(limit(&big, "memory").as_deref(), Some("16Gi"));
        assert_eq!(
            big.spec.as_ref().unwrap().priority_class_name.as_deref(),
            Some("ci-high")
        );
        let spot = pod(
            &choose("spot", "the runner's resource_class"),
            &config,
            "ci",
        )
        .unwrap();
        let annotations = spot.metadata.annotations.as_ref().unwrap();
        assert_eq!(
            annotations["k8s.aliyun.com/eci-spot-strategy"],
            "SpotAsPriceGo"
        );
        let err = pod(&choose("gpu", "KILN_RESOURCE_CLASS"), &config, "ci").unwrap_err();
        assert!(
            err.0
                .contains("KILN_RESOURCE_CLASS names resource class `gpu`")
                && err.0.contains("big, spot"),
            "{err}"
        );
    }

    #[test]
    fn the_pod_patch_applies_last() {
        let config = KubernetesConfig {
            pod_patch: Some(toml::Value::String(
                r#"{"spec": {"dnsPolicy": "None", "enableServiceLinks": null}}"#.into(),
            )),
            ..KubernetesConfig::default()
        };
        let pod = pod(&build(), &config, "ci").unwrap();
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.dns_policy.as_deref(), Some("None"));
        assert_eq!(spec.enable_service_links, None);
    }

    #[test]
    fn restricted_runs_as_non_root_without_capabilities() {
        let config = KubernetesConfig {
            security: SecurityProfile::Restricted,
            ..KubernetesConfig::default()
        };
        let pod = pod(&build(), &config, "ci").unwrap();
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(
            spec.security_context.as_ref().unwrap().run_as_user,
            Some(1000)
        );
        let ctx = container(&pod, BUILD_CONTAINER)
            .security_context
            .as_ref()
            .unwrap();
        assert_eq!(ctx.run_as_non_root, Some(true));
        assert!(ctx.capabilities.as_ref().unwrap().add.is_none());
    }

    #[test]
    fn a_foreign_agent_gets_its_secret_from_the_secret_and_shares_its_workspace() {
        let build = Build {
            key: BuildKey {
                source: SourceKind::Jenkins,
                runner: "ci".into(),
                id: 17,
            },
            name: "kiln-jk-17-3f9a1c2e".into(),
            workload: Workload::Foreign(ForeignAgent {
                container: "jnlp".into(),
                image: "jenkins/inbound-agent:latest-jdk21".into(),
                command: None,
                args: None,
                env: vec![
                    BuildEnv {
                        name: "JENKINS_AGENT_NAME".into(),
                        value: EnvValue::Plain("kiln-maven-3f9a1c2e".into()),
                    },
                    BuildEnv {
                        name: "JENKINS_SECRET".into(),
                        value: EnvValue::Secret("secret".into()),
                    },
                ],
                workdir: "/home/jenkins/agent".into(),
                extra_containers: vec![Container {
                    name: "maven".into(),
                    image: Some("maven:3.9".into()),
                    command: Some(vec!["sleep".into(), "infinity".into()]),
                    ..Container::default()
                }],
                process: None,
            }),
            secrets: BTreeMap::from([("secret".to_owned(), b"s3cr3t".to_vec())]),
            timeout: None,
            labels: BTreeMap::from([(
                "kiln.dev/jenkins-node".to_owned(),
                "kiln-maven-3f9a1c2e".to_owned(),
            )]),
            annotations: BTreeMap::new(),
            ..build()
        };
        let config = KubernetesConfig::default();
        let pod = pod(&build, &config, "ci").unwrap();
        assert_eq!(pod.metadata.name.as_deref(), Some("kiln-jk-17-3f9a1c2e"));
        let json = serde_json::to_string(&pod).unwrap();
        assert!(
            !json.contains("s3cr3t"),
            "the agent secret is not in the pod spec"
        );
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        assert_eq!(spec.active_deadline_seconds, None);
        let agent = container(&pod, "jnlp");
        let env: BTreeMap<_, _> = agent
            .env
            .iter()
            .flatten()
            .map(|e| (e.name.as_str(), e))
            .collect();
        assert_eq!(
            env["JENKINS_AGENT_NAME"].value.as_deref(),
            Some("kiln-maven-3f9a1c2e")
        );
        let from = env["JENKINS_SECRET"].value_from.as_ref().unwrap();
        assert_eq!(from.secret_key_ref.as_ref().unwrap().name, build.name);
        let maven = container(&pod, "maven");
        assert_eq!(
            maven.volume_mounts.as_ref().unwrap()[0].mount_path,
            "/home/jenkins/agent"
        );
        assert!(maven.security_context.is_some());
        let secret = secret(&build, &config, "ci");
        assert_eq!(secret.data.unwrap()["secret"].0, b"s3cr3t".to_vec());
        let labels = pod.metadata.labels.unwrap();
        assert_eq!(labels["kiln.dev/source"], "jenkins");
        assert_eq!(labels["kiln.dev/job-id"], "17");
        assert_eq!(labels["kiln.dev/jenkins-node"], "kiln-maven-3f9a1c2e");
        assert_eq!(pod.metadata.annotations.unwrap()[ANNOTATION_MAIN], "jnlp");
    }
}
