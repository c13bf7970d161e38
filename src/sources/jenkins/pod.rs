//! The pod of one one-shot Jenkins agent: the `jenkins/inbound-agent` container (`jnlp`,
//! WebSocket) plus the label's extra containers sharing its workspace, sized and placed by the
//! label's resource class; the agent secret comes from a per-pod Secret.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{
    Container, EmptyDirVolumeSource, EnvVar, EnvVarSource, Pod, PodSpec, Secret, SecretKeySelector,
    Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::config::PodTemplate;
use crate::executor::kubernetes::config::KubernetesConfig;
use crate::executor::kubernetes::podspec::{
    self, SpecError, apply_patch, container_security, identity_labels, label_value, pod_security,
    requirements,
};
use crate::job::{JobKey, SourceKind};

/// The agent container's name (as Jenkins' kubernetes-plugin calls it).
pub(crate) const AGENT_CONTAINER: &str = "jnlp";
/// The agent's work directory, shared with the extra containers.
const WORKDIR: &str = "/home/jenkins/agent";
/// Label with the Jenkins node name.
pub(crate) const LABEL_NODE: &str = "kiln.dev/jenkins-node";
/// Annotation with the exact Jenkins label (label values cannot hold every label).
pub(crate) const ANNOTATION_LABEL: &str = "kiln.dev/jenkins-label";
/// The key of the agent secret in the pod's Secret.
const SECRET_KEY: &str = "secret";

/// One agent to start.
pub(crate) struct AgentSpec<'a> {
    /// The Jenkins source's name.
    pub(crate) jenkins: &'a str,
    /// Jenkins' URL as the agent reaches it.
    pub(crate) url: &'a str,
    /// The node name (random, never reused).
    pub(crate) node: &'a str,
    /// The label it serves.
    pub(crate) label: &'a str,
    /// The queue item it was started for.
    pub(crate) queue_id: u64,
    /// The secret the agent connects with.
    pub(crate) secret: &'a str,
    /// The default agent image.
    pub(crate) agent_image: &'a str,
    /// The label's template.
    pub(crate) template: Option<&'a PodTemplate>,
}

impl AgentSpec<'_> {
    /// The pod's name: `kiln-jk-<queue id>-<node suffix>`. Unique per agent: a build can get
    /// several agents over time (retries, restarts), and a new agent must never collide with
    /// its predecessor's pod while that one is still terminating. (Unlike GitLab jobs, Jenkins
    /// agents cannot be made idempotent by name: each is a new node with a new secret.)
    pub(crate) fn pod_name(&self) -> String {
        let suffix: String = self
            .node
            .rsplit('-')
            .next()
            .unwrap_or_default()
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .map(|c| c.to_ascii_lowercase())
            .take(12)
            .collect();
        format!("{}-{suffix}", self.key().resource_name())
    }

    fn key(&self) -> JobKey {
        JobKey {
            source: SourceKind::Jenkins,
            runner: self.jenkins.to_owned(),
            id: self.queue_id,
        }
    }
}

/// The agent's pod and Secret.
///
/// # Errors
/// The template names an unknown resource class, or the pod patch breaks the pod.
pub(crate) fn agent_pod(
    spec: &AgentSpec<'_>,
    config: &KubernetesConfig,
    namespace: &str,
) -> Result<(Pod, Secret), SpecError> {
    let name = spec.pod_name();
    let template = spec.template.cloned().unwrap_or_default();
    let class = podspec::named_class(config, template.resource_class.as_deref())?;
    let mut labels = identity_labels(config, &spec.key());
    labels.insert(LABEL_NODE.into(), label_value(spec.node));
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels.clone()),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            SECRET_KEY.to_owned(),
            ByteString(spec.secret.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    };
    for extra in [&config.labels, &class.labels] {
        labels.extend(extra.clone());
    }
    let mut annotations = BTreeMap::from([
        (ANNOTATION_LABEL.to_owned(), spec.label.to_owned()),
        ("kiln.dev/jenkins-url".to_owned(), spec.url.to_owned()),
        (
            "kiln.dev/jenkins-queue-id".to_owned(),
            spec.queue_id.to_string(),
        ),
    ]);
    for extra in [&config.annotations, &class.annotations] {
        annotations.extend(extra.clone());
    }
    let workspace = VolumeMount {
        name: "workspace".into(),
        mount_path: WORKDIR.into(),
        ..VolumeMount::default()
    };
    let env = |name: &str, value: &str| EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    };
    let security = container_security(config);
    let agent = Container {
        name: AGENT_CONTAINER.into(),
        image: Some(
            template
                .agent_image
                .clone()
                .unwrap_or_else(|| spec.agent_image.to_owned()),
        ),
        env: Some(vec![
            env("JENKINS_URL", spec.url),
            env("JENKINS_AGENT_NAME", spec.node),
            EnvVar {
                name: "JENKINS_SECRET".into(),
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: name.clone(),
                        key: SECRET_KEY.into(),
                        optional: Some(false),
                    }),
                    ..EnvVarSource::default()
                }),
                ..EnvVar::default()
            },
            env("JENKINS_WEB_SOCKET", "true"),
            env("JENKINS_AGENT_WORKDIR", WORKDIR),
        ]),
        resources: Some(requirements(&config.build.overlaid(&class.resources))),
        volume_mounts: Some(vec![workspace.clone()]),
        security_context: Some(security.clone()),
        working_dir: Some(WORKDIR.into()),
        ..Container::default()
    };
    let mut containers = vec![agent];
    for extra in &template.containers {
        let mut container = extra.clone();
        let mounts = container.volume_mounts.get_or_insert_with(Vec::new);
        if !mounts.iter().any(|m| m.mount_path == WORKDIR) {
            mounts.push(workspace.clone());
        }
        if container.resources.is_none() {
            container.resources = Some(requirements(&config.service));
        }
        if container.security_context.is_none() {
            container.security_context = Some(security.clone());
        }
        containers.push(container);
    }
    let (node_selector, tolerations) = podspec::placement(config, &class);
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            restart_policy: Some("Never".into()),
            automount_service_account_token: Some(config.automount_service_account_token),
            service_account_name: config.service_account.clone(),
            enable_service_links: Some(false),
            termination_grace_period_seconds: Some(
                i64::try_from(config.termination_grace.as_secs()).unwrap_or(30),
            ),
            node_selector: (!node_selector.is_empty()).then_some(node_selector),
            tolerations: (!tolerations.is_empty()).then_some(tolerations),
            runtime_class_name: class.runtime_class.clone(),
            priority_class_name: class.priority_class.clone(),
            security_context: Some(pod_security(config)),
            containers,
            volumes: Some(vec![Volume {
                name: "workspace".into(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Volume::default()
            }]),
            ..PodSpec::default()
        }),
        ..Pod::default()
    };
    Ok((apply_patch(pod, config)?, secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_connects_over_websocket_with_its_secret_from_a_secret() {
        let template = PodTemplate {
            containers: vec![Container {
                name: "maven".into(),
                image: Some("maven:3.9".into()),
                command: Some(vec!["sleep".into(), "infinity".into()]),
                ..Container::default()
            }],
            ..PodTemplate::default()
        };
        let spec = AgentSpec {
            jenkins: "ci",
            url: "https://jenkins.example.com/",
            node: "kiln-maven-3f9a1c2e",
            label: "maven",
            queue_id: 17,
            secret: "s3cr3t",
            agent_image: "jenkins/inbound-agent:latest-jdk21",
            template: Some(&template),
        };
        let (pod, secret) = agent_pod(&spec, &KubernetesConfig::default(), "ci").unwrap();
        assert_eq!(pod.metadata.name.as_deref(), Some("kiln-jk-17-3f9a1c2e"));
        let json = serde_json::to_string(&pod).unwrap();
        assert!(
            !json.contains("s3cr3t"),
            "the agent secret is not in the pod spec"
        );
        let spec_ = pod.spec.unwrap();
        assert_eq!(spec_.restart_policy.as_deref(), Some("Never"));
        let agent = &spec_.containers[0];
        assert_eq!(agent.name, "jnlp");
        let env: BTreeMap<_, _> = agent
            .env
            .iter()
            .flatten()
            .map(|e| (e.name.as_str(), e))
            .collect();
        assert_eq!(env["JENKINS_WEB_SOCKET"].value.as_deref(), Some("true"));
        assert_eq!(
            env["JENKINS_AGENT_NAME"].value.as_deref(),
            Some("kiln-maven-3f9a1c2e")
        );
        assert!(env["JENKINS_SECRET"].value_from.is_some());
        let maven = &spec_.containers[1];
        assert_eq!(
            maven.volume_mounts.as_ref().unwrap()[0].mount_path,
            "/home/jenkins/agent"
        );
        assert_eq!(
            secret.data.unwrap()["secret"].0,
            b"s3cr3t".to_vec(),
            "the secret lives in the Secret"
        );
        let labels = pod.metadata.labels.unwrap();
        assert_eq!(labels["kiln.dev/source"], "jenkins");
        assert_eq!(labels["kiln.dev/job-id"], "17");
    }
}
