//! The pod and Secret of one build: for the kiln agent, an init container installing the agent
//! and cloning the sources, the build container in the job's image and one container per
//! service; for a foreign agent (Jenkins, GitHub), its container plus the user's extra
//! containers sharing its workspace. Sizes come from `sizing.rs`, the labels and annotations
//! from `labels.rs`.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvVar, EnvVarSource, HostAlias, KeyToPath,
    LocalObjectReference, Pod, PodSecurityContext, PodSpec, SeccompProfile, Secret,
    SecretKeySelector, SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::config::{KubernetesConfig, ResourceClass, Resources, SecurityProfile};
use super::sizing::{Overrides, SpecError, requirements, resource_class};
use super::{images, labels, patch};
use crate::build::{
    Build, EnvValue, ExtraContainer, ForeignAgent, Image, JOB_FILE, START_NOTES_FILE, Service,
    Workload,
};

/// Where the init container puts the agent binary.
const BIN_DIR: &str = "/kiln/bin";
/// Where the build's Secret is mounted for the kiln agent.
const JOB_DIR: &str = "/kiln/job";
/// The builds volume: projects are checked out below it (`/builds/<group>/<project>`).
const BUILDS_DIR: &str = "/builds";
/// The agent's scratch directory, on the builds volume (shared by init and build container).
const WORK_DIR: &str = "/builds/.kiln";
/// The kiln binary in the kiln (helper) image.
const HELPER_BINARY: &str = "/usr/local/bin/kiln";
/// The build container's name.
pub(super) const BUILD_CONTAINER: &str = "build";
/// The init container's name.
pub(super) const PREPARE_CONTAINER: &str = "prepare";
/// Where the build container leaves the agent's result (the default termination message path).
const TERMINATION_LOG: &str = "/dev/termination-log";

/// The labels that identify the objects of `build` (pod and Secret).
fn identity_labels(config: &KubernetesConfig, build: &Build) -> BTreeMap<String, String> {
    labels::identity_labels(&config.coordinator, config.replica.as_deref(), build)
}

/// The build's Secret, holding its secret data (the job file with the job token, an agent
/// secret) and the notes on its start for the trace. With registry logins it is a
/// `kubernetes.io/dockerconfigjson` Secret that also holds them, so the pod pulls with it and
/// it goes with the build at no extra API call; the containers never see that key.
pub(super) fn secret(build: &Build, config: &KubernetesConfig, namespace: &str) -> Secret {
    let mut annotations = BTreeMap::new();
    labels::annotate_runner(&mut annotations, &build.key);
    let mut data: BTreeMap<String, ByteString> = build
        .secrets
        .iter()
        .map(|(key, value)| (key.clone(), ByteString(value.clone())))
        .collect();
    let notes = start_notes(build, config);
    if !notes.is_empty() {
        data.insert(START_NOTES_FILE.to_owned(), ByteString(notes.into_bytes()));
    }
    let docker_config = images::docker_config(build, config);
    let type_ = if docker_config.is_some() {
        images::DOCKER_CONFIG_TYPE
    } else {
        "Opaque"
    };
    if let Some(docker_config) = docker_config {
        data.insert(
            images::DOCKER_CONFIG_KEY.to_owned(),
            ByteString(docker_config),
        );
    }
    Secret {
        metadata: ObjectMeta {
            name: Some(build.name.clone()),
            namespace: Some(namespace.to_owned()),
            labels: Some(identity_labels(config, build)),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        type_: Some(type_.into()),
        data: Some(data),
        ..Secret::default()
    }
}

/// What the agent writes into the job's trace as warnings before the job starts: the job's
/// requests this runner ignored, one a line (empty: none).
fn start_notes(build: &Build, config: &KubernetesConfig) -> String {
    Overrides::from_requests(&build.requests, config)
        .map(|overrides| overrides.warnings.join("\n"))
        .unwrap_or_default()
}

/// The pod of a build.
///
/// # Errors
/// The build asks for more than the configuration allows (a request over its cap, an unknown
/// resource class), or a value is malformed; the message names where the request came from and
/// the limit.
pub(super) fn pod(
    build: &Build,
    config: &KubernetesConfig,
    namespace: &str,
) -> Result<Pod, SpecError> {
    images::check_allowed(build, config)?;
    let (class_name, class) = resource_class(build.class.as_ref(), config)?;
    let overrides = Overrides::from_requests(&build.requests, config)?;
    let mut labels = identity_labels(config, build);
    for extra in [&config.labels, &class.labels, &overrides.labels] {
        labels.extend(extra.clone());
    }
    if let Some(name) = &class_name {
        labels::label_class(&mut labels, name);
    }
    let mut annotations = build.annotations.clone();
    for extra in [
        &config.annotations,
        &class.annotations,
        &overrides.annotations,
    ] {
        annotations.extend(extra.clone());
    }
    labels::annotate_runner(&mut annotations, &build.key);
    let (mut node_selector, mut tolerations) = placement(config, &class);
    node_selector.extend(overrides.node_selector.clone());
    tolerations.extend(overrides.tolerations.iter().cloned());
    let security = container_security(config);
    let main_resources = config
        .build
        .overlaid(&class.resources)
        .overlaid(&overrides.resources);

    let mut spec = match &build.workload {
        Workload::KilnAgent { image, services } => {
            labels::annotate_main(&mut annotations, BUILD_CONTAINER);
            labels::annotate_pull_fallbacks(
                &mut annotations,
                &pull_fallbacks(image.as_ref(), services, config)?,
            );
            kiln_agent_spec(
                build,
                image.as_ref(),
                services,
                &main_resources,
                &overrides,
                config,
            )?
        }
        Workload::Foreign(agent) => {
            labels::annotate_main(&mut annotations, &agent.container);
            foreign_spec(build, agent, &main_resources, config)?
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
    let mut pull_secrets: Vec<LocalObjectReference> = config
        .image_pull_secrets
        .iter()
        .map(|name| LocalObjectReference { name: name.clone() })
        .collect();
    if images::docker_config(build, config).is_some() {
        // The build's own Secret carries its registry logins.
        pull_secrets.push(LocalObjectReference {
            name: build.name.clone(),
        });
    }
    spec.image_pull_secrets = (!pull_secrets.is_empty()).then_some(pull_secrets);
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

/// The pod of the kiln agent: `prepare` installs the agent and fetches the sources, `build`
/// runs it in the job's image, one `svc-N` container per service (with the builds volume and
/// the configured volumes, as gitlab-runner mounts them).
///
/// # Errors
/// A pull policy or a user the configuration does not allow.
fn kiln_agent_spec(
    build: &Build,
    image: Option<&Image>,
    services: &[Service],
    resources: &Resources,
    overrides: &Overrides,
    config: &KubernetesConfig,
) -> Result<PodSpec, SpecError> {
    let job_mount = mount("job", JOB_DIR, true);
    let bin_mount = |read_only: bool| mount("kiln-bin", BIN_DIR, read_only);
    let builds_mount = mount("builds", BUILDS_DIR, false);
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
        resources: Some(requirements(
            &config.helper.overlaid(&overrides.helper_resources),
        )),
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
    let user = match image.and_then(|i| i.user.as_deref()) {
        Some(user) => Some(images::user(user, config)?),
        None => None,
    };
    let extra_mounts = config.volumes.mounts();
    let mut build_mounts = vec![bin_mount(true), builds_mount.clone(), job_mount];
    build_mounts.extend(extra_mounts.iter().cloned());
    let build_container = Container {
        name: BUILD_CONTAINER.into(),
        image: Some(
            image
                .map(|i| i.name.clone())
                .unwrap_or_else(|| config.default_image.clone()),
        ),
        image_pull_policy: images::pull_policy(
            image
                .map(|i| i.pull_policies.as_slice())
                .unwrap_or_default(),
            config,
        )?
        .map(str::to_owned),
        command: Some(command),
        args,
        working_dir: Some(BUILDS_DIR.into()),
        resources: Some(requirements(resources)),
        volume_mounts: Some(build_mounts),
        termination_message_path: Some(TERMINATION_LOG.into()),
        termination_message_policy: Some("File".into()),
        security_context: workload_security(config, user),
        ..Container::default()
    };
    let service_resources = config.service.overlaid(&overrides.service_resources);
    let mut service_mounts = vec![builds_mount];
    service_mounts.extend(extra_mounts);

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
            image_pull_policy: images::pull_policy(&service.image.pull_policies, config)?
                .map(str::to_owned),
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
            resources: Some(requirements(&service_resources)),
            volume_mounts: Some(service_mounts.clone()),
            security_context: workload_security(config, None),
            ..Container::default()
        });
    }
    host_names.sort();
    host_names.dedup();
    let mut volumes = vec![
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
                items: job_items(build, config),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        },
    ];
    volumes.extend(config.volumes.volumes());
    Ok(PodSpec {
        host_aliases: (!host_names.is_empty()).then(|| {
            vec![HostAlias {
                ip: "127.0.0.1".into(),
                hostnames: Some(host_names),
            }]
        }),
        init_containers: Some(vec![prepare]),
        containers,
        volumes: Some(volumes),
        ..PodSpec::default()
    })
}

/// The pull policies after the first that each container's image is tried with, by
/// container: the build container and its services (`svc-N`, as [`kiln_agent_spec`] names them).
fn pull_fallbacks(
    image: Option<&Image>,
    services: &[Service],
    config: &KubernetesConfig,
) -> Result<BTreeMap<String, Vec<String>>, SpecError> {
    let later = |asked: &[crate::build::PullPolicy]| -> Result<Vec<String>, SpecError> {
        Ok(images::pull_policies(asked, config)?
            .iter()
            .skip(1)
            .map(|p| (*p).to_owned())
            .collect())
    };
    let mut fallbacks = BTreeMap::new();
    fallbacks.insert(
        BUILD_CONTAINER.to_owned(),
        later(
            image
                .map(|i| i.pull_policies.as_slice())
                .unwrap_or_default(),
        )?,
    );
    for (index, service) in services.iter().enumerate() {
        fallbacks.insert(format!("svc-{index}"), later(&service.image.pull_policies)?);
    }
    Ok(fallbacks)
}

/// The keys of the build's Secret its containers see, when it also holds registry logins
/// (`None`: every key, the common case).
fn job_items(build: &Build, config: &KubernetesConfig) -> Option<Vec<KeyToPath>> {
    images::docker_config(build, config)?;
    let mut keys: Vec<String> = build.secrets.keys().cloned().collect();
    if !start_notes(build, config).is_empty() {
        keys.push(START_NOTES_FILE.to_owned());
    }
    Some(
        keys.into_iter()
            .map(|key| KeyToPath {
                path: key.clone(),
                key,
                mode: None,
            })
            .collect(),
    )
}

/// The security context of the build and service containers: privileged when the
/// administrator opted in, and the job's `image:kubernetes:user`; `None` leaves the profile's.
fn workload_security(
    config: &KubernetesConfig,
    user: Option<(i64, Option<i64>)>,
) -> Option<SecurityContext> {
    if !config.privileged && user.is_none() {
        return None;
    }
    let mut security = container_security(config);
    if config.privileged {
        security.privileged = Some(true);
        security.allow_privilege_escalation = Some(true);
        security.capabilities = None;
    }
    if let Some((uid, gid)) = user {
        security.run_as_user = Some(uid);
        security.run_as_group = gid;
    }
    Some(security)
}

/// The pod of a foreign agent: its container, with secret values from the build's Secret, and
/// the user's extra containers, all sharing the agent's work directory.
///
/// # Errors
/// An extra container that is not a Kubernetes container.
fn foreign_spec(
    build: &Build,
    agent: &ForeignAgent,
    resources: &Resources,
    config: &KubernetesConfig,
) -> Result<PodSpec, SpecError> {
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
        let mut container = container_of(extra)?;
        let mounts = container.volume_mounts.get_or_insert_with(Vec::new);
        if !mounts.iter().any(|m| m.mount_path == agent.workdir) {
            mounts.push(workspace.clone());
        }
        if container.resources.is_none() {
            container.resources = Some(requirements(&config.service));
        }
        containers.push(container);
    }
    Ok(PodSpec {
        containers,
        volumes: Some(vec![Volume {
            name: "workspace".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        }]),
        ..PodSpec::default()
    })
}

/// The Kubernetes container the user configured as `extra`.
fn container_of(extra: &ExtraContainer) -> Result<Container, SpecError> {
    let mut fields = extra.fields.clone();
    fields.insert("name".to_owned(), extra.name.clone().into());
    serde_json::from_value(serde_json::Value::Object(fields)).map_err(|e| {
        SpecError(format!(
            "extra container `{}` is not a Kubernetes container: {e}",
            extra.name
        ))
    })
}

/// The memory limit of container `container`, for messages about OOM kills.
pub(super) fn memory_limit(pod: &Pod, container: &str) -> Option<String> {
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

fn apply_patch(pod: Pod, config: &KubernetesConfig) -> Result<Pod, SpecError> {
    let Ok(Some(patch)) = config.pod_patch_json() else {
        return Ok(pod);
    };
    let mut value = serde_json::to_value(&pod)
        .map_err(|e| SpecError(format!("cannot apply kubernetes.pod_patch: {e}")))?;
    patch::apply(config.pod_patch_type, &mut value, &patch)
        .map_err(|e| SpecError(format!("cannot apply kubernetes.pod_patch: {e}")))?;
    serde_json::from_value(value).map_err(|e| {
        SpecError(format!(
            "kubernetes.pod_patch makes an invalid pod: {e}; fix the patch in the config"
        ))
    })
}

/// Node selector and tolerations of the config and a resource class together.
fn placement(
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

fn container_security(config: &KubernetesConfig) -> SecurityContext {
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

fn pod_security(config: &KubernetesConfig) -> PodSecurityContext {
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

/// Environment variable `name` holding the pod's field `path` (the downward API).
/// Volume `name` mounted at `path`.
fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        // Kubernetes' default is writable: only a read-only mount says so.
        read_only: read_only.then_some(true),
        ..VolumeMount::default()
    }
}

fn downward(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(k8s_openapi::api::core::v1::ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// The handoff container of a warm pod: it takes the pod's job, then fetches its sources.
pub(super) const HANDOFF_CONTAINER: &str = "handoff";
/// Where a warm pod's handoff container finds the pod's hand-off key.
const KEY_DIR: &str = "/kiln/key";

/// A warm pod of `shape` named `name` and its Secret (holding `key`, the pod's hand-off key,
/// and nothing else): the build pod a job of that shape would get, made before the job. The
/// init container only installs the agent; the `handoff` container (helper image) waits for
/// the sealed job at the pod's IP, writes the job file into an in-memory volume shared with
/// the build container, fetches the sources and exits; the build container's agent waits for
/// both and then runs as in any build pod. No job token is in it until its job is handed over.
///
/// # Errors
/// As [`pod`]: an unknown class, an image or pull policy the configuration does not allow.
pub(super) fn warm_pod(
    shape: &crate::executor::WarmShape,
    name: &str,
    key: &[u8],
    config: &KubernetesConfig,
    namespace: &str,
) -> Result<(Pod, Secret), SpecError> {
    use crate::build::{BuildKey, ClassChoice, SourceKind};
    // The build a job of this shape makes, without the job.
    let build = Build {
        key: BuildKey {
            source: SourceKind::GitLab,
            runner: String::new(),
            id: 0,
        },
        name: name.to_owned(),
        workload: Workload::KilnAgent {
            image: Some(Image {
                name: shape.image.clone(),
                ..Image::default()
            }),
            services: Vec::new(),
        },
        secrets: BTreeMap::new(),
        class: shape.class.as_ref().map(|class| ClassChoice {
            name: class.clone(),
            origin: format!("warm pool `{}`", shape.pool),
        }),
        requests: Vec::new(),
        timeout: None,
        labels: BTreeMap::new(),
        annotations: BTreeMap::new(),
        about: crate::build::About::default(),
        untrusted: false,
        registry_auths: Vec::new(),
    };
    let mut pod = pod(&build, config, namespace)?;
    labels::make_warm(&mut pod.metadata, &shape.pool);
    let mut secret = secret(&build, config, namespace);
    labels::make_warm(&mut secret.metadata, &shape.pool);
    secret.data = Some(BTreeMap::from([(
        crate::handoff::KEY_FILE.to_owned(),
        ByteString(key.to_vec()),
    )]));

    let Some(spec) = pod.spec.as_mut() else {
        return Ok((pod, secret));
    };
    let bin_mount = mount("kiln-bin", BIN_DIR, false);
    for init in spec.init_containers.iter_mut().flatten() {
        if init.name == PREPARE_CONTAINER {
            init.command = Some(vec![
                HELPER_BINARY.into(),
                "agent".into(),
                "install".into(),
                "--bin-dir".into(),
                BIN_DIR.into(),
            ]);
            init.volume_mounts = Some(vec![bin_mount.clone()]);
        }
    }
    for container in &mut spec.containers {
        if container.name == BUILD_CONTAINER {
            // The agent waits for the job file and the fetched sources.
            let agent = container.args.as_mut().or(container.command.as_mut());
            if let Some(agent) = agent {
                agent.push("--wait".into());
            }
        }
    }
    // The job's files arrive later, into memory shared by the handoff and build containers,
    // where the build container's agent looks for them as it would in the Secret's volume.
    for volume in spec.volumes.iter_mut().flatten() {
        if volume.name == "job" {
            *volume = Volume {
                name: "job".into(),
                empty_dir: Some(EmptyDirVolumeSource {
                    medium: Some("Memory".into()),
                    size_limit: Some(Quantity("16Mi".into())),
                }),
                ..Volume::default()
            };
        }
    }
    spec.volumes.get_or_insert_with(Vec::new).push(Volume {
        name: "handoff-key".into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(name.to_owned()),
            default_mode: Some(0o400),
            // Only the key: what the Secret gets when the pod is taken never lands here.
            items: Some(vec![KeyToPath {
                key: crate::handoff::KEY_FILE.to_owned(),
                path: crate::handoff::KEY_FILE.to_owned(),
                mode: None,
            }]),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    });
    let handoff = Container {
        name: HANDOFF_CONTAINER.into(),
        image: Some(config.helper_image.clone()),
        image_pull_policy: Some("IfNotPresent".into()),
        command: Some(vec![
            HELPER_BINARY.into(),
            "agent".into(),
            "receive".into(),
            "--key".into(),
            format!("{KEY_DIR}/{}", crate::handoff::KEY_FILE),
            "--job-dir".into(),
            JOB_DIR.into(),
            "--work-dir".into(),
            WORK_DIR.into(),
            "--builds-dir".into(),
            BUILDS_DIR.into(),
        ]),
        env: Some(vec![
            downward("POD_IP", "status.podIP"),
            downward("POD_NAME", "metadata.name"),
        ]),
        ports: Some(vec![k8s_openapi::api::core::v1::ContainerPort {
            name: Some("kiln-handoff".into()),
            container_port: i32::from(crate::handoff::PORT),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        resources: Some(requirements(&config.helper)),
        volume_mounts: Some(vec![
            mount("job", JOB_DIR, false),
            mount("builds", BUILDS_DIR, false),
            mount("handoff-key", KEY_DIR, true),
        ]),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        security_context: Some(container_security(config)),
        ..Container::default()
    };
    spec.containers.push(handoff);
    Ok((pod, secret))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::build::{
        About, BuildKey, ClassChoice, EnvVar as BuildEnv, Request, Requested, ResourceField,
        SourceKind,
    };
    use crate::executor::Footprint;

    /// The wire names of kiln's labels, pinned apart from `labels.rs`.
    const LABEL_SOURCE: &str = "kiln.dev/source";
    const LABEL_JOB_ID: &str = "kiln.dev/job-id";
    const ANNOTATION_MAIN: &str = "kiln.dev/main-container";

    /// What the pod of `build` occupies, as the executor reports it.
    fn footprint_of(build: &Build, config: &KubernetesConfig) -> Option<Footprint> {
        let pod = pod(build, config, "default").ok()?;
        Some(super::super::sizing::footprint(&pod, config))
    }

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
            registry_auths: Vec::new(),
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
                    pull_policies: vec![crate::build::PullPolicy::IfNotPresent],
                    user: None,
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
    fn the_first_pull_policy_is_the_containers_and_the_rest_are_annotated() {
        use crate::build::PullPolicy::{Always, IfNotPresent};
        let build = Build {
            workload: Workload::KilnAgent {
                image: Some(Image {
                    name: "maven:3".into(),
                    pull_policies: vec![Always, IfNotPresent],
                    ..Image::default()
                }),
                services: vec![Service {
                    image: Image {
                        name: "postgres:16".into(),
                        pull_policies: vec![IfNotPresent],
                        ..Image::default()
                    },
                    command: Vec::new(),
                    env: Vec::new(),
                    aliases: Vec::new(),
                }],
            },
            ..build()
        };
        let pod = pod(&build, &KubernetesConfig::default(), "ci").unwrap();
        assert_eq!(
            container(&pod, BUILD_CONTAINER)
                .image_pull_policy
                .as_deref(),
            Some("Always")
        );
        assert_eq!(
            container(&pod, "svc-0").image_pull_policy.as_deref(),
            Some("IfNotPresent")
        );
        let fallbacks = labels::pull_fallbacks(&pod.metadata);
        assert_eq!(fallbacks[BUILD_CONTAINER], ["IfNotPresent"]);
        assert!(!fallbacks.contains_key("svc-0"), "{fallbacks:?}");
        // The common case has no annotation at all.
        let plain = super::pod(&super::tests::build(), &KubernetesConfig::default(), "ci").unwrap();
        assert!(labels::pull_fallbacks(&plain.metadata).is_empty());
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
        let mounts: Vec<&str> = svc
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| m.name.as_str())
            .collect();
        assert_eq!(
            mounts,
            ["builds"],
            "services get the builds volume and never see the job Secret"
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
        let err = pod(&memory("lots"), &config, "ci").unwrap_err();
        assert!(err.0.contains("not a Kubernetes quantity"), "{err}");
    }

    #[test]
    fn a_request_without_a_cap_is_ignored_with_a_note_for_the_trace() {
        let cpu = requesting(
            Request::Resource(ResourceField::CpuLimit),
            "2",
            "KUBERNETES_CPU_LIMIT",
        );
        let config = KubernetesConfig::default();
        let pod_ = pod(&cpu, &config, "ci").unwrap();
        assert_eq!(limit(&pod_, "cpu"), None);
        let secret = secret(&cpu, &config, "ci");
        let notes = &secret.data.as_ref().unwrap()[START_NOTES_FILE].0;
        assert_eq!(
            String::from_utf8_lossy(notes),
            "KUBERNETES_CPU_LIMIT=2 is ignored: this runner sets no kubernetes.max.cpu_limit"
        );
        let plain = secret_keys(&build(), &config);
        assert_eq!(plain, [JOB_FILE], "no notes file without notes");
    }

    fn secret_keys(build: &Build, config: &KubernetesConfig) -> Vec<String> {
        secret(build, config, "ci")
            .data
            .unwrap_or_default()
            .into_keys()
            .collect()
    }

    #[test]
    fn service_and_helper_requests_have_their_own_caps() {
        let config = KubernetesConfig {
            max_service: Resources {
                memory_limit: Some("2Gi".into()),
                ..Resources::default()
            },
            ..KubernetesConfig::default()
        };
        let mut build = requesting(
            Request::ServiceResource(ResourceField::MemoryLimit),
            "1536Mi",
            "KUBERNETES_SERVICE_MEMORY_LIMIT",
        );
        build.workload = Workload::KilnAgent {
            image: None,
            services: vec![Service {
                image: Image {
                    name: "postgres:16".into(),
                    ..Image::default()
                },
                ..Service::default()
            }],
        };
        let pod_ = pod(&build, &config, "ci").unwrap();
        let limits = container(&pod_, "svc-0")
            .resources
            .as_ref()
            .unwrap()
            .limits
            .as_ref()
            .unwrap();
        assert_eq!(limits["memory"].0, "1536Mi");
        build.requests[0].value = "4Gi".into();
        let err = pod(&build, &config, "ci").unwrap_err();
        assert!(
            err.0.contains("kubernetes.max_service.memory_limit"),
            "{err}"
        );
        let helper = requesting(
            Request::HelperResource(ResourceField::CpuRequest),
            "1",
            "KUBERNETES_HELPER_CPU_REQUEST",
        );
        assert!(
            pod(&helper, &config, "ci").is_ok(),
            "ignored without max_helper"
        );
    }

    #[test]
    fn tolerations_from_the_job_need_their_allow_pattern() {
        let build = requesting(
            Request::NodeToleration,
            "gpu=true:NoSchedule",
            "KUBERNETES_NODE_TOLERATIONS_1",
        );
        let config = KubernetesConfig {
            node_tolerations_overwrite_allowed: Some("gpu=.*".into()),
            ..KubernetesConfig::default()
        };
        let pod_ = pod(&build, &config, "ci").unwrap();
        let tolerations = pod_.spec.as_ref().unwrap().tolerations.as_ref().unwrap();
        assert_eq!(tolerations[0].key.as_deref(), Some("gpu"));
        assert_eq!(tolerations[0].operator.as_deref(), Some("Equal"));
        assert_eq!(tolerations[0].effect.as_deref(), Some("NoSchedule"));
        let strict = KubernetesConfig {
            node_tolerations_overwrite_allowed: Some("spot=.*".into()),
            ..KubernetesConfig::default()
        };
        assert!(pod(&build, &strict, "ci").is_err());
    }

    #[test]
    fn a_namespace_from_the_job_needs_its_pattern_searched_as_gitlab_runner_does() {
        use super::super::sizing::namespace;
        let build = requesting(
            Request::Namespace,
            "ci-team-a",
            "KUBERNETES_NAMESPACE_OVERWRITE",
        );
        // No pattern (or an empty one): ignored, with a warning for the trace.
        for unset in [None, Some(String::new())] {
            let config = KubernetesConfig {
                namespace_overwrite_allowed: unset,
                ..KubernetesConfig::default()
            };
            assert_eq!(namespace(&build.requests, &config, "ci").unwrap(), "ci");
            let notes = secret(&build, &config, "ci").data.unwrap()[START_NOTES_FILE].clone();
            assert_eq!(
                String::from_utf8(notes.0).unwrap(),
                "KUBERNETES_NAMESPACE_OVERWRITE=`ci-team-a` is ignored: this runner sets no kubernetes.namespace_overwrite_allowed"
            );
        }
        let config = KubernetesConfig {
            namespace_overwrite_allowed: Some("^ci-".into()),
            ..KubernetesConfig::default()
        };
        assert_eq!(
            namespace(&build.requests, &config, "ci").unwrap(),
            "ci-team-a"
        );
        let pod_ = pod(&build, &config, "ci-team-a").unwrap();
        assert_eq!(pod_.metadata.namespace.as_deref(), Some("ci-team-a"));
        assert!(
            !secret(&build, &config, "ci-team-a")
                .data
                .unwrap()
                .contains_key(START_NOTES_FILE)
        );
        let elsewhere = requesting(
            Request::Namespace,
            "other-ns",
            "KUBERNETES_NAMESPACE_OVERWRITE",
        );
        assert_eq!(
            namespace(&elsewhere.requests, &config, "ci").unwrap_err().0,
            "KUBERNETES_NAMESPACE_OVERWRITE=`other-ns` does not match kubernetes.namespace_overwrite_allowed (`^ci-`)"
        );
        let invalid = requesting(
            Request::Namespace,
            "ci-Team_A",
            "KUBERNETES_NAMESPACE_OVERWRITE",
        );
        assert!(
            namespace(&invalid.requests, &config, "ci")
                .unwrap_err()
                .0
                .contains("is not a valid namespace name")
        );
    }

    #[test]
    fn registry_logins_ride_in_the_build_secret_the_containers_do_not_see() {
        let mut build = build();
        build.registry_auths = vec![crate::build::RegistryAuth {
            registry: "registry.example.com".into(),
            username: "gitlab-ci-token".into(),
            password: "job-token".into(),
            issued: true,
        }];
        let config = KubernetesConfig {
            image_pull_secrets: vec!["static".into()],
            ..KubernetesConfig::default()
        };
        let secret = secret(&build, &config, "ci");
        assert_eq!(
            secret.type_.as_deref(),
            Some("kubernetes.io/dockerconfigjson")
        );
        let docker: serde_json::Value =
            serde_json::from_slice(&secret.data.as_ref().unwrap()[".dockerconfigjson"].0).unwrap();
        assert_eq!(
            docker["auths"]["registry.example.com"]["username"],
            "gitlab-ci-token"
        );
        let pod_ = pod(&build, &config, "ci").unwrap();
        let spec = pod_.spec.as_ref().unwrap();
        let pulls: Vec<&str> = spec
            .image_pull_secrets
            .iter()
            .flatten()
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(pulls, ["static", "kiln-gl-42"]);
        let job = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "job")
            .unwrap();
        let items: Vec<&str> = job
            .secret
            .as_ref()
            .unwrap()
            .items
            .iter()
            .flatten()
            .map(|i| i.key.as_str())
            .collect();
        assert_eq!(items, [JOB_FILE]);
        let plain = pod(&super::tests::build(), &config, "ci").unwrap();
        let plain_secret = super::secret(&super::tests::build(), &config, "ci");
        assert_eq!(plain_secret.type_.as_deref(), Some("Opaque"));
        assert_eq!(
            plain
                .spec
                .as_ref()
                .unwrap()
                .image_pull_secrets
                .as_ref()
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn privileged_is_opt_in_for_build_and_services_never_the_helper() {
        let config = KubernetesConfig {
            privileged: true,
            ..KubernetesConfig::default()
        };
        let default_pod = pod(&build(), &KubernetesConfig::default(), "ci").unwrap();
        let security = container(&default_pod, BUILD_CONTAINER)
            .security_context
            .as_ref()
            .unwrap();
        assert_eq!(security.privileged, Some(false));
        let pod_ = pod(&build(), &config, "ci").unwrap();
        let security = container(&pod_, BUILD_CONTAINER)
            .security_context
            .as_ref()
            .unwrap();
        assert_eq!(security.privileged, Some(true));
        let prepare = &pod_
            .spec
            .as_ref()
            .unwrap()
            .init_containers
            .as_ref()
            .unwrap()[0];
        assert_eq!(
            prepare.security_context.as_ref().unwrap().privileged,
            Some(false)
        );
    }

    #[test]
    fn node_selector_requests_need_a_matching_allow_pattern() {
        let arch = requesting(
            Request::NodeSelector,
            "kubernetes.io/arch=arm64",
            "KUBERNETES_NODE_SELECTOR_ARCH",
        );
        let ignored = pod(&arch, &KubernetesConfig::default(), "ci").unwrap();
        assert!(ignored.spec.as_ref().unwrap().node_selector.is_none());
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
        let footprint = footprint_of(&with_service, &config).unwrap();
        assert_eq!(footprint.class.as_deref(), Some("gpu"));
        // The build container (4 vCPU, 16 GiB) and the service (250m, 256Mi); not the init
        // container, which runs before them.
        assert!((footprint.vcpu - 4.25).abs() < 1e-9, "{footprint:?}");
        assert!((footprint.gib - 16.25).abs() < 1e-9, "{footprint:?}");
        assert_eq!(footprint.price_per_vcpu_hour, Some(0.5));
        assert_eq!(footprint.price_per_gib_hour, None);
        // The default class: the `[kubernetes.build]` requests, no class prices.
        let plain = footprint_of(&build(), &KubernetesConfig::default()).unwrap();
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
                extra_containers: vec![ExtraContainer {
                    name: "maven".into(),
                    fields: serde_json::Map::from_iter([
                        ("image".to_owned(), "maven:3.9".into()),
                        (
                            "command".to_owned(),
                            serde_json::json!(["sleep", "infinity"]),
                        ),
                    ]),
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
    #[test]
    fn a_warm_pod_waits_for_its_job_with_only_its_key_and_no_job_labels() {
        let config = KubernetesConfig::default();
        let shape = crate::executor::WarmShape {
            pool: "maven".into(),
            image: "maven:3.9".into(),
            class: None,
        };
        let (pod, secret) = warm_pod(
            &shape,
            "kiln-warm-maven-1",
            b"k".repeat(32).as_slice(),
            &config,
            "ci",
        )
        .unwrap();
        let labels = pod.metadata.labels.as_ref().unwrap();
        assert_eq!(labels["kiln.dev/warm-pool"], "maven");
        for key in [LABEL_JOB_ID, LABEL_SOURCE, "kiln.dev/runner"] {
            assert!(!labels.contains_key(key), "{key}");
        }
        assert_eq!(
            secret.data.as_ref().unwrap().keys().collect::<Vec<_>>(),
            [crate::handoff::KEY_FILE]
        );
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(
            spec.active_deadline_seconds, None,
            "it waits for as long as its pool keeps it"
        );
        let init = &spec.init_containers.as_ref().unwrap()[0];
        assert_eq!(init.command.as_ref().unwrap()[2], "install");
        let build = container(&pod, BUILD_CONTAINER);
        assert_eq!(build.image.as_deref(), Some("maven:3.9"));
        assert_eq!(
            build.command.as_ref().unwrap().last().map(String::as_str),
            Some("--wait")
        );
        let handoff = container(&pod, HANDOFF_CONTAINER);
        assert_eq!(handoff.command.as_ref().unwrap()[2], "receive");
        assert_eq!(
            handoff.env.as_ref().unwrap()[0]
                .value_from
                .as_ref()
                .unwrap()
                .field_ref
                .as_ref()
                .unwrap()
                .field_path,
            "status.podIP"
        );
        let volumes = spec.volumes.as_ref().unwrap();
        let job = volumes.iter().find(|v| v.name == "job").unwrap();
        assert_eq!(
            job.empty_dir.as_ref().unwrap().medium.as_deref(),
            Some("Memory")
        );
        let key = volumes.iter().find(|v| v.name == "handoff-key").unwrap();
        let items = key.secret.as_ref().unwrap().items.as_ref().unwrap();
        assert_eq!(
            items.len(),
            1,
            "only the key is projected, never the job's files"
        );
        let mounts_key = |c: &Container| {
            c.volume_mounts
                .iter()
                .flatten()
                .any(|m| m.name == "handoff-key")
        };
        assert!(mounts_key(handoff));
        assert!(!mounts_key(build), "the job's code never sees the key");
    }
}
