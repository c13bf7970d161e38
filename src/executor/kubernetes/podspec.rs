//! The build pod and its Secret for one job: init container installing the agent and cloning
//! the sources, the build container in the job's image, one container per service, sizes from
//! the config, the resource class and the job's `KUBERNETES_*` variables.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvVar, HostAlias, LocalObjectReference, Pod,
    PodSecurityContext, PodSpec, ResourceRequirements, SeccompProfile, Secret, SecretVolumeSource,
    SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::config::{KubernetesConfig, RESOURCE_FIELDS, ResourceClass, Resources, SecurityProfile};
use super::quantity;
use crate::job::JobKey;
use crate::sources::gitlab::payload::{Image, JobPayload};

/// Where the init container puts the agent binary.
pub(crate) const BIN_DIR: &str = "/kiln/bin";
/// Where the job Secret is mounted.
pub(crate) const JOB_DIR: &str = "/kiln/job";
/// The job file's key in the Secret.
pub(crate) const JOB_KEY: &str = "job.json";
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
/// The CI server (`gitlab`).
pub(crate) const LABEL_SOURCE: &str = "kiln.dev/source";
/// The CI server's job id.
pub(crate) const LABEL_JOB_ID: &str = "kiln.dev/job-id";
/// The runner that took the job.
pub(crate) const LABEL_RUNNER: &str = "kiln.dev/runner";
/// The resource class of the pod.
pub(crate) const LABEL_CLASS: &str = "kiln.dev/resource-class";

/// A job asks for something the configuration does not allow: it fails with
/// `runner_configuration_error` and this message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct SpecError(pub(crate) String);

/// Everything the pod of one job depends on.
pub(crate) struct PodInput<'a> {
    /// The job.
    pub(crate) key: &'a JobKey,
    /// The job as GitLab sent it.
    pub(crate) job: &'a JobPayload,
    /// The resource class the job's runner names, if any.
    pub(crate) runner_class: Option<&'a str>,
    /// The executor's settings.
    pub(crate) config: &'a KubernetesConfig,
    /// The namespace.
    pub(crate) namespace: &'a str,
}

/// The labels that identify the objects of `key` (pod and Secret).
pub(crate) fn identity_labels(config: &KubernetesConfig, key: &JobKey) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/managed-by".to_owned(), "kiln".to_owned()),
        (LABEL_COORDINATOR.to_owned(), config.coordinator.clone()),
        (LABEL_SOURCE.to_owned(), key.source.name().to_owned()),
        (LABEL_JOB_ID.to_owned(), key.id.to_string()),
        (LABEL_RUNNER.to_owned(), label_value(&key.runner)),
    ])
}

/// The per-job Secret holding the agent's job file (it carries the job token). Its owner
/// reference to the pod is added once the pod exists.
pub(crate) fn secret(input: &PodInput<'_>, job_file: &[u8]) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(input.key.resource_name()),
            namespace: Some(input.namespace.to_owned()),
            labels: Some(identity_labels(input.config, input.key)),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            JOB_KEY.to_owned(),
            ByteString(job_file.to_vec()),
        )])),
        ..Secret::default()
    }
}

/// The build pod of a job.
///
/// # Errors
/// A `KUBERNETES_*` variable or `KILN_RESOURCE_CLASS` asks for more than the configuration
/// allows, or a value is malformed; the message names the variable and the limit.
pub(crate) fn pod(input: &PodInput<'_>) -> Result<Pod, SpecError> {
    let config = input.config;
    let job = input.job;
    let (class_name, class) = resource_class(input)?;
    let overrides = Overrides::from_job(job, config)?;

    let build_resources = config
        .build
        .overlaid(&class.resources)
        .overlaid(&overrides.resources);

    let mut labels = identity_labels(config, input.key);
    for extra in [&config.labels, &class.labels, &overrides.labels] {
        labels.extend(extra.clone());
    }
    if let Some(name) = &class_name {
        labels.insert(LABEL_CLASS.into(), name.clone());
    }
    let mut annotations = gitlab_annotations(job);
    for extra in [
        &config.annotations,
        &class.annotations,
        &overrides.annotations,
    ] {
        annotations.extend(extra.clone());
    }
    let (mut node_selector, tolerations) = placement(config, &class);
    node_selector.extend(overrides.node_selector.clone());

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
    let job_file = format!("{JOB_DIR}/{JOB_KEY}");
    let security = container_security(config);

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
        security_context: Some(security.clone()),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Container::default()
    };

    let image = job.image.as_ref().filter(|i| !i.name.trim().is_empty());
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
    let build = Container {
        name: BUILD_CONTAINER.into(),
        image: Some(
            image
                .map(|i| i.name.clone())
                .unwrap_or_else(|| config.default_image.clone()),
        ),
        image_pull_policy: image.and_then(pull_policy),
        command: Some(command),
        args,
        working_dir: Some(BUILDS_DIR.into()),
        resources: Some(requirements(&build_resources)),
        volume_mounts: Some(vec![bin_mount(true), builds_mount, job_mount]),
        security_context: Some(security.clone()),
        termination_message_path: Some(TERMINATION_LOG.into()),
        termination_message_policy: Some("File".into()),
        ..Container::default()
    };

    let mut containers = vec![build];
    let mut host_names = Vec::new();
    for (index, service) in job.services.iter().enumerate() {
        if service.name.trim().is_empty() {
            continue;
        }
        host_names.extend(service_aliases(service));
        containers.push(Container {
            name: format!("svc-{index}"),
            image: Some(service.name.clone()),
            image_pull_policy: pull_policy(service),
            command: (!service.entrypoint.is_empty()).then(|| service.entrypoint.clone()),
            args: (!service.command.is_empty()).then(|| service.command.clone()),
            env: Some(
                service
                    .variables
                    .iter()
                    .map(|v| EnvVar {
                        name: v.key.clone(),
                        value: Some(v.value.clone()),
                        ..EnvVar::default()
                    })
                    .collect(),
            ),
            resources: Some(requirements(&config.service)),
            security_context: Some(security.clone()),
            ..Container::default()
        });
    }
    host_names.sort();
    host_names.dedup();

    let deadline = job.timeout() + config.deadline_margin;
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some(input.key.resource_name()),
            namespace: Some(input.namespace.to_owned()),
            labels: Some(labels),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            restart_policy: Some("Never".into()),
            active_deadline_seconds: Some(i64::try_from(deadline.as_secs()).unwrap_or(i64::MAX)),
            termination_grace_period_seconds: Some(
                i64::try_from(config.termination_grace.as_secs()).unwrap_or(30),
            ),
            automount_service_account_token: Some(config.automount_service_account_token),
            service_account_name: overrides
                .service_account
                .clone()
                .or_else(|| config.service_account.clone()),
            enable_service_links: Some(false),
            image_pull_secrets: (!config.image_pull_secrets.is_empty()).then(|| {
                config
                    .image_pull_secrets
                    .iter()
                    .map(|name| LocalObjectReference { name: name.clone() })
                    .collect()
            }),
            node_selector: (!node_selector.is_empty()).then_some(node_selector),
            tolerations: (!tolerations.is_empty()).then_some(tolerations),
            runtime_class_name: class.runtime_class.clone(),
            priority_class_name: class.priority_class.clone(),
            host_aliases: (!host_names.is_empty()).then(|| {
                vec![HostAlias {
                    ip: "127.0.0.1".into(),
                    hostnames: Some(host_names),
                }]
            }),
            security_context: Some(pod_security(config)),
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
                        secret_name: Some(input.key.resource_name()),
                        // Readable by whatever user the job's image runs as; only the init and
                        // build containers mount it.
                        default_mode: Some(0o444),
                        ..SecretVolumeSource::default()
                    }),
                    ..Volume::default()
                },
            ]),
            ..PodSpec::default()
        }),
        ..Pod::default()
    };
    apply_patch(pod, config)
}

/// The memory limit of the build container, for messages about OOM kills.
pub(crate) fn memory_limit(pod: &Pod) -> Option<String> {
    pod.spec
        .as_ref()?
        .containers
        .iter()
        .find(|c| c.name == BUILD_CONTAINER)?
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

/// The resolved resource class called `name`, or why there is none.
pub(crate) fn named_class(
    config: &KubernetesConfig,
    name: Option<&str>,
) -> Result<ResourceClass, SpecError> {
    let Some(name) = name else {
        return Ok(ResourceClass::default());
    };
    config
        .resource_classes
        .get(name)
        .map(ResourceClass::resolved)
        .ok_or_else(|| SpecError(format!("resource class `{name}` is not configured")))
}

fn resource_class(input: &PodInput<'_>) -> Result<(Option<String>, ResourceClass), SpecError> {
    let config = input.config;
    let from_variable = input
        .job
        .variable("KILN_RESOURCE_CLASS")
        .map(str::trim)
        .filter(|s| !s.is_empty());
    let name = from_variable
        .or(input.runner_class)
        .or(config.default_resource_class.as_deref());
    let Some(name) = name else {
        return Ok((None, ResourceClass::default()));
    };
    match config.resource_classes.get(name) {
        Some(class) => Ok((Some(name.to_owned()), class.resolved())),
        None => {
            let known: Vec<&str> = config.resource_classes.keys().map(String::as_str).collect();
            let source = if from_variable.is_some() {
                "KILN_RESOURCE_CLASS"
            } else {
                "the runner's resource_class"
            };
            Err(SpecError(format!(
                "{source} names resource class `{name}`, which this runner does not have (configured: {})",
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            )))
        }
    }
}

/// What a job's `KUBERNETES_*` variables change, after checking them against the caps.
#[derive(Debug, Default)]
struct Overrides {
    resources: Resources,
    service_account: Option<String>,
    node_selector: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    labels: BTreeMap<String, String>,
}

impl Overrides {
    fn from_job(job: &JobPayload, config: &KubernetesConfig) -> Result<Self, SpecError> {
        let mut out = Self::default();
        for (field, variable, _, _) in RESOURCE_FIELDS {
            let Some(variable) = variable else { continue };
            let Some(value) = job
                .variable(variable)
                .map(str::trim)
                .filter(|v| !v.is_empty())
            else {
                continue;
            };
            let requested = quantity::parse(value).ok_or_else(|| {
                SpecError(format!(
                    "{variable}=`{value}` is not a Kubernetes quantity (like 500m, 2, 4Gi)"
                ))
            })?;
            let Some(cap) = config.max.get(field) else {
                return Err(SpecError(format!(
                    "{variable} is not allowed on this runner: set kubernetes.max.{field} to allow it"
                )));
            };
            let cap_value = quantity::parse(cap).unwrap_or(0.0);
            if requested > cap_value {
                return Err(SpecError(format!(
                    "{variable}={value} is above this runner's maximum of {cap} (kubernetes.max.{field})"
                )));
            }
            out.resources.set(field, value.to_owned());
        }
        if let Some(account) = job
            .variable("KUBERNETES_SERVICE_ACCOUNT_OVERWRITE")
            .map(str::trim)
            .filter(|v| !v.is_empty())
        {
            check_allowed(
                config.service_account_overwrite_allowed.as_deref(),
                "KUBERNETES_SERVICE_ACCOUNT_OVERWRITE",
                account,
                "service_account_overwrite_allowed",
            )?;
            out.service_account = Some(account.to_owned());
        }
        let families = [
            (
                "KUBERNETES_NODE_SELECTOR_",
                config.node_selector_overwrite_allowed.as_deref(),
                "node_selector_overwrite_allowed",
            ),
            (
                "KUBERNETES_POD_ANNOTATIONS_",
                config.pod_annotations_overwrite_allowed.as_deref(),
                "pod_annotations_overwrite_allowed",
            ),
            (
                "KUBERNETES_POD_LABELS_",
                config.pod_labels_overwrite_allowed.as_deref(),
                "pod_labels_overwrite_allowed",
            ),
        ];
        for (prefix, allowed, setting) in families {
            let mut seen = BTreeMap::new();
            for var in job.variables.iter().filter(|v| v.key.starts_with(prefix)) {
                seen.insert(var.key.clone(), var.value.clone());
            }
            for (variable, entry) in seen {
                let Some((key, value)) = entry.split_once('=') else {
                    return Err(SpecError(format!(
                        "{variable}=`{entry}` must have the form key=value"
                    )));
                };
                check_allowed(allowed, &variable, &entry, setting)?;
                let (key, value) = (key.trim().to_owned(), value.trim().to_owned());
                match prefix {
                    "KUBERNETES_NODE_SELECTOR_" => out.node_selector.insert(key, value),
                    "KUBERNETES_POD_ANNOTATIONS_" => out.annotations.insert(key, value),
                    _ => out.labels.insert(key, value),
                };
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

fn pull_policy(image: &Image) -> Option<String> {
    image.pull_policy.first().and_then(|p| {
        Some(
            match p.as_str() {
                "always" => "Always",
                "if-not-present" => "IfNotPresent",
                "never" => "Never",
                _ => return None,
            }
            .to_owned(),
        )
    })
}

/// Host names a service answers to: its aliases and GitLab's two names derived from the image
/// (`registry.example.com/group/image:tag` → `registry.example.com__group__image` and
/// `registry.example.com-group-image`).
fn service_aliases(service: &Image) -> Vec<String> {
    let mut names: Vec<String> = service
        .alias
        .iter()
        .flat_map(|a| a.split([',', ' ']))
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
        .collect();
    let base = service.name.split('@').next().unwrap_or_default();
    let without_tag = match base.rfind(':') {
        Some(colon) if !base[colon..].contains('/') => &base[..colon],
        _ => base,
    };
    names.push(without_tag.replace('/', "__"));
    names.push(without_tag.replace('/', "-"));
    names.retain(|n| is_hostname(n));
    names
}

fn is_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|part| {
            !part.is_empty()
                && part.len() <= 63
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

fn gitlab_annotations(job: &JobPayload) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut put = |key: &str, value: Option<String>| {
        if let Some(value) = value.filter(|v| !v.is_empty()) {
            out.insert(key.to_owned(), value);
        }
    };
    put("job.runner.gitlab.com/id", Some(job.id.to_string()));
    put(
        "job.runner.gitlab.com/url",
        job.variable("CI_JOB_URL").map(str::to_owned),
    );
    put(
        "job.runner.gitlab.com/name",
        Some(job.job_info.name.clone()),
    );
    put("job.runner.gitlab.com/sha", Some(job.git_info.sha.clone()));
    put(
        "job.runner.gitlab.com/before_sha",
        Some(job.git_info.before_sha.clone()),
    );
    put(
        "job.runner.gitlab.com/ref",
        Some(job.git_info.git_ref.clone()),
    );
    put(
        "project.runner.gitlab.com/id",
        job.job_info.project_id.map(|id| id.to_string()),
    );
    put(
        "project.runner.gitlab.com/path",
        job.job_info.project_full_path.clone(),
    );
    put(
        "pipeline.runner.gitlab.com/id",
        job.job_info.pipeline_id.map(|id| id.to_string()),
    );
    out
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
    use super::*;
    use crate::job::SourceKind;
    use crate::sources::gitlab::payload::{ImageVariable, Variable};

    fn job(variables: &[(&str, &str)]) -> JobPayload {
        let mut job: JobPayload = serde_json::from_value(serde_json::json!({
            "id": 42, "token": "job-token",
            "job_info": {"name": "build", "stage": "build", "project_name": "demo",
                         "project_full_path": "group/demo", "project_id": 7},
            "git_info": {"repo_url": "https://gitlab.example.com/group/demo.git", "ref": "main",
                         "sha": "abc123", "before_sha": "000", "ref_type": "branch"},
            "runner_info": {"timeout": 600},
            "steps": [{"name": "script", "script": ["true"], "when": "on_success"}],
        }))
        .unwrap();
        job.variables = variables
            .iter()
            .map(|(k, v)| Variable {
                key: (*k).into(),
                value: (*v).into(),
                public: true,
                ..Variable::default()
            })
            .collect();
        job
    }

    fn key() -> JobKey {
        JobKey {
            source: SourceKind::GitLab,
            runner: "gitlab.example.com-0".into(),
            id: 42,
        }
    }

    fn build(job: &JobPayload, config: &KubernetesConfig) -> Result<Pod, SpecError> {
        pod(&PodInput {
            key: &key(),
            job,
            runner_class: None,
            config,
            namespace: "ci",
        })
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
        let pod = build(&job(&[]), &config).unwrap();
        assert_eq!(pod.metadata.name.as_deref(), Some("kiln-gl-42"));
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        assert_eq!(spec.active_deadline_seconds, Some(600 + 600));
        assert_eq!(spec.automount_service_account_token, Some(false));
        let build = container(&pod, BUILD_CONTAINER);
        assert_eq!(build.image.as_deref(), Some("alpine:3"));
        assert_eq!(build.command.as_ref().unwrap()[0], "/kiln/bin/kiln");
        assert!(
            build.env.is_none(),
            "the job reaches the pod only through its Secret"
        );
        let json = serde_json::to_string(&pod).unwrap();
        assert!(!json.contains("job-token"), "no token in the pod spec");
        let labels = pod.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[LABEL_JOB_ID], "42");
        assert_eq!(labels[LABEL_SOURCE], "gitlab");
        let annotations = pod.metadata.annotations.as_ref().unwrap();
        assert_eq!(annotations["job.runner.gitlab.com/sha"], "abc123");
        assert_eq!(annotations["project.runner.gitlab.com/path"], "group/demo");
    }

    #[test]
    fn an_image_entrypoint_wraps_the_agent() {
        let mut job = job(&[]);
        job.image = Some(Image {
            name: "docker:27".into(),
            entrypoint: vec!["dockerd-entrypoint.sh".into()],
            pull_policy: vec!["if-not-present".into()],
            ..Image::default()
        });
        let pod = build(&job, &KubernetesConfig::default()).unwrap();
        let build = container(&pod, BUILD_CONTAINER);
        assert_eq!(build.command.as_deref().unwrap(), ["dockerd-entrypoint.sh"]);
        assert_eq!(build.args.as_ref().unwrap()[0], "/kiln/bin/kiln");
        assert_eq!(build.image_pull_policy.as_deref(), Some("IfNotPresent"));
    }

    #[test]
    fn services_are_sidecars_reachable_by_alias() {
        let mut job = job(&[]);
        job.services = vec![Image {
            name: "registry.example.com/tools/postgres:16".into(),
            alias: Some("db".into()),
            command: vec!["postgres".into(), "-c".into(), "fsync=off".into()],
            variables: vec![ImageVariable {
                key: "POSTGRES_PASSWORD".into(),
                value: "pw".into(),
            }],
            ..Image::default()
        }];
        let pod = build(&job, &KubernetesConfig::default()).unwrap();
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
        assert!(names.contains(&"db".to_owned()));
        assert!(names.contains(&"registry.example.com__tools__postgres".to_owned()));
        assert!(names.contains(&"registry.example.com-tools-postgres".to_owned()));
    }

    #[test]
    fn overrides_within_the_cap_apply() {
        let config = KubernetesConfig {
            max: Resources {
                memory_limit: Some("8Gi".into()),
                ..Resources::default()
            },
            ..KubernetesConfig::default()
        };
        let pod = build(&job(&[("KUBERNETES_MEMORY_LIMIT", "4Gi")]), &config).unwrap();
        assert_eq!(limit(&pod, "memory").as_deref(), Some("4Gi"));
    }

    #[test]
    fn overrides_above_the_cap_name_variable_and_cap() {
        let config = KubernetesConfig {
            max: Resources {
                memory_limit: Some("8Gi".into()),
                ..Resources::default()
            },
            ..KubernetesConfig::default()
        };
        let err = build(&job(&[("KUBERNETES_MEMORY_LIMIT", "16Gi")]), &config).unwrap_err();
        assert!(err.0.contains("KUBERNETES_MEMORY_LIMIT=16Gi"), "{err}");
        assert!(err.0.contains("8Gi"), "{err}");
        let err = build(&job(&[("KUBERNETES_CPU_LIMIT", "2")]), &config).unwrap_err();
        assert!(err.0.contains("kubernetes.max.cpu_limit"), "{err}");
        let err = build(&job(&[("KUBERNETES_MEMORY_LIMIT", "lots")]), &config).unwrap_err();
        assert!(err.0.contains("not a Kubernetes quantity"), "{err}");
    }

    #[test]
    fn node_selector_overrides_need_a_matching_allow_pattern() {
        let vars = [("KUBERNETES_NODE_SELECTOR_ARCH", "kubernetes.io/arch=arm64")];
        let err = build(&job(&vars), &KubernetesConfig::default()).unwrap_err();
        assert!(err.0.contains("node_selector_overwrite_allowed"), "{err}");
        let config = KubernetesConfig {
            node_selector_overwrite_allowed: Some("kubernetes.io/arch=.*".into()),
            ..KubernetesConfig::default()
        };
        let pod = build(&job(&vars), &config).unwrap();
        let selector = pod.spec.as_ref().unwrap().node_selector.as_ref().unwrap();
        assert_eq!(selector["kubernetes.io/arch"], "arm64");
        let err = build(&job(&[("KUBERNETES_NODE_SELECTOR_X", "evil=1")]), &config).unwrap_err();
        assert!(err.0.contains("does not match"), "{err}");
    }

    #[test]
    fn the_resource_class_comes_from_the_variable_then_the_runner() {
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
        let job_vars = job(&[("KILN_RESOURCE_CLASS", "big")]);
        let pod = pod(&PodInput {
            key: &key(),
            job: &job_vars,
            runner_class: Some("spot"),
            config: &config,
            namespace: "ci",
        })
        .unwrap();
        assert_eq!(limit(&pod, "memory").as_deref(), Some("16Gi"));
        assert_eq!(
            pod.spec.as_ref().unwrap().priority_class_name.as_deref(),
            Some("ci-high")
        );
        let plain = job(&[]);
        let spot = super::pod(&PodInput {
            key: &key(),
            job: &plain,
            runner_class: Some("spot"),
            config: &config,
            namespace: "ci",
        })
        .unwrap();
        let annotations = spot.metadata.annotations.as_ref().unwrap();
        assert_eq!(
            annotations["k8s.aliyun.com/eci-spot-strategy"],
            "SpotAsPriceGo"
        );
        let err = build(&job(&[("KILN_RESOURCE_CLASS", "gpu")]), &config).unwrap_err();
        assert!(
            err.0.contains("`gpu`") && err.0.contains("big, spot"),
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
        let pod = build(&job(&[]), &config).unwrap();
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
        let pod = build(&job(&[]), &config).unwrap();
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
}
