//! `[[sources.jenkins]]`: a Jenkins kiln provisions one-shot inbound agents for.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Container;
use serde::{Deserialize, Deserializer};

use crate::build::ExtraContainer;
use crate::problem::Problem;

/// One Jenkins controller.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JenkinsConfig {
    /// A name for logs, metrics and node descriptions (default: the URL's host).
    #[serde(default)]
    pub name: Option<String>,
    /// Jenkins' URL, e.g. `https://jenkins.example.com/` (a sub-path is fine).
    pub url: String,
    /// The user kiln acts as (needs Agent/Create, Agent/Delete, Agent/Disconnect,
    /// Agent/Connect and Overall/Read).
    pub user: String,
    /// An API token of `user` (preferred: no CSRF crumb needed).
    #[serde(default)]
    pub token: Option<String>,
    /// The password of `user`, if no API token is given (then kiln fetches a crumb and keeps
    /// the session cookie).
    #[serde(default)]
    pub password: Option<String>,
    /// The labels kiln serves: queued builds waiting for one of these get an agent.
    pub labels: Vec<String>,
    /// Shared secret of `POST /hooks/jenkins`, which makes kiln look at the queue at once.
    #[serde(default)]
    pub webhook_secret: Option<String>,
    /// How often the queue is polled.
    #[serde(default = "default_poll_interval", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Agents this Jenkins may have at once (0: only `concurrent` limits).
    #[serde(default)]
    pub limit: usize,
    /// Agents per label at once (labels not listed: no own limit).
    #[serde(default)]
    pub label_limits: BTreeMap<String, usize>,
    /// An agent that has not connected after this long is deleted (with the reason logged)
    /// and its build gets a fresh one.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Agents tried per queued build before kiln gives up on it (and says why in the log).
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// Image of the agent container (`jnlp`).
    #[serde(default = "default_agent_image")]
    pub agent_image: String,
    /// Pod templates by label: resource class and extra containers.
    #[serde(default)]
    pub pod_templates: BTreeMap<String, PodTemplate>,
}

/// The pod of agents for one label.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PodTemplate {
    /// Image of the `jnlp` container (default: the source's `agent_image`).
    pub agent_image: Option<String>,
    /// A resource class of `[kubernetes.resource_classes]` (sizes the `jnlp` container and
    /// places the pod).
    pub resource_class: Option<String>,
    /// Extra containers, in Kubernetes' own field names, e.g.
    /// `{ name = "maven", image = "maven:3.9", command = ["sleep", "infinity"] }`; a
    /// Jenkinsfile uses them with `container('maven') { … }`.
    #[serde(deserialize_with = "kubernetes_containers")]
    pub containers: Vec<ExtraContainer>,
}

/// Reads extra containers as Kubernetes containers, so a field of the wrong type is an error
/// where it is written, and keeps each as the name and fields the build model carries.
fn kubernetes_containers<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<ExtraContainer>, D::Error> {
    Vec::<Container>::deserialize(deserializer)?
        .into_iter()
        .map(|container| match serde_json::to_value(&container) {
            Ok(serde_json::Value::Object(mut fields)) => {
                fields.remove("name");
                Ok(ExtraContainer {
                    name: container.name,
                    fields,
                })
            }
            Ok(_) => Err(serde::de::Error::custom("a container must be a table")),
            Err(e) => Err(serde::de::Error::custom(e)),
        })
        .collect()
}

fn default_poll_interval() -> Duration {
    Duration::from_secs(5)
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(180)
}

fn default_attempts() -> u32 {
    3
}

fn default_agent_image() -> String {
    "jenkins/inbound-agent:latest-jdk21".into()
}

impl JenkinsConfig {
    /// The name used in logs, metrics, labels and node descriptions.
    pub fn display_name(&self, index: usize) -> String {
        crate::sources::entry_name(self.name.as_deref(), &self.url, "jenkins", index)
    }

    /// Every problem of entry `index`.
    pub(crate) fn problems(&self, index: usize, classes: &[String]) -> Vec<Problem> {
        let mut problems = Vec::new();
        let at = |field: &str| format!("sources.jenkins[{index}].{field}");
        let mut problem = |path: String, message: String| problems.push(Problem { path, message });
        if let Some(message) = crate::sources::url_problem(&self.url) {
            problem(at("url"), message);
        }
        if self.user.trim().is_empty() {
            problem(at("user"), "must not be empty".into());
        }
        let has = |v: &Option<String>| v.as_deref().is_some_and(|s| !s.trim().is_empty());
        if !has(&self.token) && !has(&self.password) {
            problem(
                at("token"),
                format!(
                    "set an API token (or a password); e.g. KILN_SOURCES__JENKINS__{index}__TOKEN"
                ),
            );
        }
        if self.labels.is_empty() {
            problem(at("labels"), "list at least one label kiln serves".into());
        }
        for label in &self.labels {
            if label.trim().is_empty() || label.contains(char::is_whitespace) {
                problem(
                    at("labels"),
                    format!("`{label}` is not a single Jenkins label"),
                );
            }
        }
        if self.poll_interval < Duration::from_secs(1) {
            problem(at("poll_interval"), "must be at least 1s".into());
        }
        if self.max_attempts == 0 {
            problem(at("max_attempts"), "must be at least 1".into());
        }
        if self.webhook_secret.as_deref().is_some_and(|s| s.len() < 16) {
            problem(
                at("webhook_secret"),
                "must be at least 16 characters".into(),
            );
        }
        for (label, template) in &self.pod_templates {
            if !self.labels.contains(label) {
                problem(
                    at(&format!("pod_templates.{label}")),
                    "is not one of `labels`".into(),
                );
            }
            if let Some(class) = &template.resource_class
                && !classes.contains(class)
            {
                problem(
                    at(&format!("pod_templates.{label}.resource_class")),
                    format!("`{class}` is not in [kubernetes.resource_classes]"),
                );
            }
            for (i, container) in template.containers.iter().enumerate() {
                if container.name.is_empty() || container.name == "jnlp" {
                    problem(
                        at(&format!("pod_templates.{label}.containers[{i}].name")),
                        "must be set and not `jnlp` (the agent container)".into(),
                    );
                }
                let image = container.fields.get("image").and_then(|i| i.as_str());
                if image.is_none_or(str::is_empty) {
                    problem(
                        at(&format!("pod_templates.{label}.containers[{i}].image")),
                        "must be set".into(),
                    );
                }
            }
        }
        for label in self.label_limits.keys() {
            if !self.labels.contains(label) {
                problem(
                    at(&format!("label_limits.{label}")),
                    "is not one of `labels`".into(),
                );
            }
        }
        problems
    }
}

// By hand, not derived: `Debug` output ends up in logs and panic messages, and the API token,
// password and webhook secret must not (a derived `Debug` printed them whole).
impl std::fmt::Debug for JenkinsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |set: bool| if set { "[redacted]" } else { "None" };
        f.debug_struct("JenkinsConfig")
            .field("name", &self.name)
            .field("url", &crate::net::redact_url(&self.url))
            .field("user", &self.user)
            .field("token", &redacted(self.token.is_some()))
            .field("password", &redacted(self.password.is_some()))
            .field("labels", &self.labels)
            .field("webhook_secret", &redacted(self.webhook_secret.is_some()))
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_containers_read_as_kubernetes_containers_and_keep_every_field() {
        let template: PodTemplate = toml::from_str(
            r#"containers = [{ name = "maven", image = "maven:3.9", command = ["sleep", "infinity"], volumeMounts = [{ name = "m2", mountPath = "/root/.m2" }] }]"#,
        )
        .unwrap();
        let maven = &template.containers[0];
        assert_eq!(maven.name, "maven");
        assert_eq!(maven.fields["image"], "maven:3.9");
        assert_eq!(maven.fields["command"][1], "infinity");
        assert_eq!(maven.fields["volumeMounts"][0]["mountPath"], "/root/.m2");
        assert!(!maven.fields.contains_key("name"));
        let mistyped = toml::from_str::<PodTemplate>(
            r#"containers = [{ name = "maven", command = "sleep" }]"#,
        )
        .unwrap_err();
        assert!(mistyped.to_string().contains("invalid type"), "{mistyped}");
    }
}
