//! One one-shot Jenkins agent as a source-neutral build: the `jenkins/inbound-agent`
//! container (`jnlp`, WebSocket) with the label's extra containers and resource class, or, on
//! the local executor, `java -jar agent.jar` fetched from the controller. The agent secret
//! travels only in the build's secrets.

use std::collections::BTreeMap;

use super::config::PodTemplate;
use crate::build::{
    About, Build, BuildKey, ClassChoice, Download, EnvValue, EnvVar, ForeignAgent, Process,
    SourceKind, Workload,
};
use crate::sources::WarmFloor;

/// The agent container's name (as Jenkins' kubernetes-plugin calls it).
pub(crate) const AGENT_CONTAINER: &str = "jnlp";
/// The agent's work directory, shared with the extra containers.
const WORKDIR: &str = "/home/jenkins/agent";
/// Label with the Jenkins node name.
pub(crate) const LABEL_NODE: &str = "kiln.dev/jenkins-node";
/// Annotation with the exact Jenkins label (label values cannot hold every label).
pub(crate) const ANNOTATION_LABEL: &str = "kiln.dev/jenkins-label";
/// Annotation with the exact node name.
pub(crate) const ANNOTATION_NODE: &str = "kiln.dev/jenkins-node";
/// Annotation with the warm pool an agent was started for (it was started for no queue item).
pub(crate) const ANNOTATION_POOL: &str = "kiln.dev/warm-pool";
/// The key of the agent secret among the build's secrets (a file of that name for processes).
const SECRET_KEY: &str = "secret";
/// What the local executor's agent process needs.
const MISSING_JAVA: &str = "Jenkins agents on the local executor run `java -jar agent.jar`: install a Java runtime (17 or newer) on this machine, or use executor = \"kubernetes\"";

/// One agent to start.
pub(crate) struct AgentSpec<'a> {
    /// The Jenkins source's name.
    pub(crate) jenkins: &'a str,
    /// Jenkins' URL as the agent reaches it (without credentials), with a trailing slash.
    pub(crate) url: &'a str,
    /// The node name (random, never reused).
    pub(crate) node: &'a str,
    /// The label it serves.
    pub(crate) label: &'a str,
    /// The queue item it was started for (0 for a warm agent: Jenkins numbers items from 1).
    pub(crate) queue_id: u64,
    /// The warm pool it was started for, instead of a queue item.
    pub(crate) warm: Option<&'a WarmFloor>,
    /// The job of the queue item, for people.
    pub(crate) job: &'a str,
    /// The secret the agent connects with.
    pub(crate) secret: &'a str,
    /// The default agent image.
    pub(crate) agent_image: &'a str,
    /// The label's template.
    pub(crate) template: Option<&'a PodTemplate>,
}

impl AgentSpec<'_> {
    /// The build's name: `kiln-jk-<queue id>-<node suffix>`, or `kiln-jk-warm-<node suffix>`
    /// for a warm agent. Unique per agent: a queued build can get several agents over time
    /// (retries, restarts), and a new agent must never collide with its predecessor's pod while
    /// that one is still terminating. (Unlike GitLab jobs, Jenkins agents cannot be made
    /// idempotent by name: each is a new node with a new secret.)
    pub(crate) fn name(&self) -> String {
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
        match self.warm {
            Some(_) => format!("kiln-{}-warm-{suffix}", SourceKind::Jenkins.short()),
            None => format!("{}-{suffix}", self.key().resource_name()),
        }
    }

    fn key(&self) -> BuildKey {
        BuildKey {
            source: SourceKind::Jenkins,
            runner: self.jenkins.to_owned(),
            id: self.queue_id,
        }
    }

    /// The agent as a build.
    pub(crate) fn build(&self) -> Build {
        let template = self.template.cloned().unwrap_or_default();
        let plain = |name: &str, value: &str| EnvVar {
            name: name.into(),
            value: EnvValue::Plain(value.into()),
        };
        let agent = ForeignAgent {
            container: AGENT_CONTAINER.into(),
            image: template
                .agent_image
                .clone()
                .unwrap_or_else(|| self.agent_image.to_owned()),
            command: None,
            args: None,
            env: vec![
                plain("JENKINS_URL", self.url),
                plain("JENKINS_AGENT_NAME", self.node),
                EnvVar {
                    name: "JENKINS_SECRET".into(),
                    value: EnvValue::Secret(SECRET_KEY.into()),
                },
                plain("JENKINS_WEB_SOCKET", "true"),
                plain("JENKINS_AGENT_WORKDIR", WORKDIR),
            ],
            workdir: WORKDIR.into(),
            extra_containers: template.containers.clone(),
            // Remoting reads `-secret @file` from the work directory, where the secret is a
            // private file: it never shows on a command line.
            process: Some(Process {
                program: "java".into(),
                args: vec![
                    "-jar".into(),
                    "agent.jar".into(),
                    "-url".into(),
                    self.url.into(),
                    "-name".into(),
                    self.node.into(),
                    "-secret".into(),
                    format!("@{SECRET_KEY}"),
                    "-webSocket".into(),
                    "-workDir".into(),
                    ".".into(),
                ],
                downloads: vec![Download {
                    url: format!("{}jnlpJars/agent.jar", self.url),
                    file: "agent.jar".into(),
                }],
                missing_program: MISSING_JAVA.into(),
            }),
        };
        Build {
            key: self.key(),
            name: self.name(),
            workload: Workload::Foreign(agent),
            secrets: BTreeMap::from([(SECRET_KEY.to_owned(), self.secret.as_bytes().to_vec())]),
            class: match self.warm {
                Some(WarmFloor {
                    pool,
                    class: Some(class),
                    ..
                }) => Some(ClassChoice {
                    name: class.clone(),
                    origin: format!("warm pool {pool}"),
                }),
                _ => template.resource_class.as_ref().map(|name| ClassChoice {
                    name: name.clone(),
                    origin: format!("pod_templates.{}.resource_class", self.label),
                }),
            },
            requests: Vec::new(),
            timeout: None,
            labels: BTreeMap::from([(LABEL_NODE.to_owned(), self.node.to_owned())]),
            annotations: self.annotations(),
            about: About {
                project: self.job.to_owned(),
                job: match self.warm {
                    Some(floor) => format!(
                        "{} (warm agent {}, pool {})",
                        self.label, self.node, floor.pool
                    ),
                    None => format!("{} (agent {})", self.label, self.node),
                },
                pipeline: None,
                url: self
                    .warm
                    .is_none()
                    .then(|| format!("{}queue/item/{}/", self.url, self.queue_id)),
                queued_at: None,
            },
            untrusted: false,
            registry_auths: Vec::new(),
        }
    }

    /// What the agent's build carries for people and for adoption after a restart.
    fn annotations(&self) -> BTreeMap<String, String> {
        let mut annotations = BTreeMap::from([
            (ANNOTATION_LABEL.to_owned(), self.label.to_owned()),
            (ANNOTATION_NODE.to_owned(), self.node.to_owned()),
            ("kiln.dev/jenkins-url".to_owned(), self.url.to_owned()),
        ]);
        match self.warm {
            Some(floor) => annotations.insert(ANNOTATION_POOL.to_owned(), floor.pool.clone()),
            None => annotations.insert(
                "kiln.dev/jenkins-queue-id".to_owned(),
                self.queue_id.to_string(),
            ),
        };
        annotations
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_connects_over_websocket_with_its_secret_kept_secret() {
        let template = PodTemplate {
            containers: vec![crate::build::ExtraContainer {
                name: "maven".into(),
                fields: serde_json::Map::from_iter([("image".to_owned(), "maven:3.9".into())]),
            }],
            resource_class: Some("big".into()),
            ..PodTemplate::default()
        };
        let spec = AgentSpec {
            jenkins: "ci",
            url: "https://jenkins.example.com/",
            node: "kiln-maven-3f9a1c2e",
            label: "maven",
            queue_id: 17,
            job: "app",
            secret: "s3cr3t",
            agent_image: "jenkins/inbound-agent:latest-jdk21",
            template: Some(&template),
            warm: None,
        };
        let build = spec.build();
        assert_eq!(build.name, "kiln-jk-17-3f9a1c2e");
        assert_eq!(build.secrets["secret"], b"s3cr3t");
        assert_eq!(build.labels[LABEL_NODE], "kiln-maven-3f9a1c2e");
        assert_eq!(build.class.as_ref().unwrap().name, "big");
        let Workload::Foreign(agent) = &build.workload else {
            panic!("a Jenkins agent is a foreign agent");
        };
        assert_eq!(agent.container, "jnlp");
        assert_eq!(agent.extra_containers[0].name, "maven");
        assert!(agent.env.contains(&EnvVar {
            name: "JENKINS_WEB_SOCKET".into(),
            value: EnvValue::Plain("true".into())
        }));
        let process = agent.process.as_ref().unwrap();
        assert_eq!(process.program, "java");
        assert!(
            !process.args.iter().any(|a| a.contains("s3cr3t")),
            "the secret is not on the command line"
        );
        assert_eq!(
            process.downloads[0].url,
            "https://jenkins.example.com/jnlpJars/agent.jar"
        );
    }

    #[test]
    fn a_warm_agent_is_named_for_its_node_carries_its_pool_and_its_class() {
        let template = PodTemplate {
            resource_class: Some("big".into()),
            ..PodTemplate::default()
        };
        let floor = WarmFloor {
            pool: "maven-warm".into(),
            class: Some("huge".into()),
            label: Some("maven".into()),
            min_idle: 1,
            max_idle_age: None,
        };
        let spec = AgentSpec {
            jenkins: "ci",
            url: "https://jenkins.example.com/",
            node: "kiln-maven-00003f9a1c2e",
            label: "maven",
            queue_id: 0,
            job: "",
            secret: "s3cr3t",
            agent_image: "jenkins/inbound-agent:latest-jdk21",
            template: Some(&template),
            warm: Some(&floor),
        };
        let build = spec.build();
        assert_eq!(build.name, "kiln-jk-warm-00003f9a1c2e");
        assert_eq!(build.annotations[ANNOTATION_POOL], "maven-warm");
        assert!(!build.annotations.contains_key("kiln.dev/jenkins-queue-id"));
        let class = build.class.unwrap();
        assert_eq!(
            (class.name.as_str(), class.origin.as_str()),
            ("huge", "warm pool maven-warm")
        );
        assert_eq!(build.about.url, None);
        let without_class = WarmFloor {
            class: None,
            ..floor.clone()
        };
        let spec = AgentSpec {
            warm: Some(&without_class),
            ..spec
        };
        assert_eq!(
            spec.build().class.unwrap().name,
            "big",
            "the label's template sizes it"
        );
    }
}
