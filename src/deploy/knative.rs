//! Deploys to Knative Serving: server-side apply of a `serving.knative.dev/v1` Service, then
//! waits until the new generation is Ready and its latest revision serves.

use std::path::PathBuf;
use std::time::Duration;

use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use serde_json::{Value, json};
use tokio::time::Instant;
use url::Url;

use crate::deploy::output::{self, PreparedRequest, say};

/// The field manager kiln applies as.
const FIELD_MANAGER: &str = "kiln";

/// Errors of a Knative deploy.
#[derive(Debug, thiserror::Error)]
pub enum KnativeError {
    /// The kubeconfig could not be loaded.
    #[error("cannot load the kubeconfig; check --kubeconfig, --context and KUBECONFIG")]
    Kubeconfig(#[source] kube::config::KubeconfigError),
    /// Neither a kubeconfig nor an in-cluster service account was found.
    #[error("no Kubernetes configuration found; pass --kubeconfig or run inside a cluster")]
    Infer(#[source] kube::config::InferConfigError),
    /// The Kubernetes client could not be built from the configuration.
    #[error("cannot build a Kubernetes client from the kubeconfig")]
    Client(#[source] kube::Error),
    /// A Kubernetes API call failed.
    #[error(
        "Kubernetes refused to {action} Knative Service {service}; check RBAC and that \
         Knative Serving is installed"
    )]
    Api {
        /// What kiln was doing.
        action: &'static str,
        /// `namespace/name`.
        service: String,
        /// Why.
        #[source]
        source: Box<kube::Error>,
    },
    /// `--promote` without `--image` needs an existing service.
    #[error("Knative Service {namespace}/{service} does not exist; deploy it with --image first")]
    NotFound {
        /// The namespace.
        namespace: String,
        /// The service.
        service: String,
    },
    /// A flag value is unusable.
    #[error("{message}")]
    Invalid {
        /// What is wrong.
        message: String,
    },
    /// The new revision failed.
    #[error("Knative Service {service} is not ready: {message}")]
    Failed {
        /// The service.
        service: String,
        /// The failing conditions of the service and its revision.
        message: String,
    },
    /// `--timeout` passed before the service was ready.
    #[error(
        "gave up after {timeout:?} waiting for Knative Service {service} to become ready ({last})"
    )]
    TimedOut {
        /// The service.
        service: String,
        /// The `--timeout`.
        timeout: Duration,
        /// The last state seen.
        last: String,
    },
}

impl KnativeError {
    /// The process exit code: 3 the revision failed, 4 timed out, 1 anything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Failed { .. } => 3,
            Self::TimedOut { .. } => 4,
            _ => 1,
        }
    }
}

/// A fully resolved Knative deploy.
#[derive(Debug, Clone)]
pub(crate) struct KnativePlan {
    pub(crate) service: String,
    pub(crate) image: Option<String>,
    pub(crate) namespace: Option<String>,
    pub(crate) kubeconfig: Option<PathBuf>,
    pub(crate) context: Option<String>,
    pub(crate) envs: Vec<(String, String)>,
    pub(crate) port: Option<u16>,
    pub(crate) min_scale: Option<u32>,
    pub(crate) max_scale: Option<u32>,
    pub(crate) canary: Option<u8>,
    pub(crate) promote: bool,
    pub(crate) timeout: Duration,
    pub(crate) poll_interval: Duration,
    pub(crate) dry_run: bool,
}

fn resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("serving.knative.dev", "v1", kind),
        plural,
    )
}

async fn load_config(plan: &KnativePlan) -> Result<Config, KnativeError> {
    let options = KubeConfigOptions {
        context: plan.context.clone(),
        ..KubeConfigOptions::default()
    };
    match &plan.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path).map_err(KnativeError::Kubeconfig)?;
            Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(KnativeError::Kubeconfig)
        }
        None if plan.context.is_some() => Config::from_kubeconfig(&options)
            .await
            .map_err(KnativeError::Kubeconfig),
        None => Config::infer().await.map_err(KnativeError::Infer),
    }
}

/// The template kiln applies: image, env, port and scale annotations.
fn template(plan: &KnativePlan, image: &str) -> Value {
    let mut annotations = serde_json::Map::new();
    if let Some(n) = plan.min_scale {
        annotations.insert(
            "autoscaling.knative.dev/min-scale".into(),
            n.to_string().into(),
        );
    }
    if let Some(n) = plan.max_scale {
        annotations.insert(
            "autoscaling.knative.dev/max-scale".into(),
            n.to_string().into(),
        );
    }
    let mut container = json!({ "image": image });
    if !plan.envs.is_empty() {
        container["env"] = plan
            .envs
            .iter()
            .map(|(k, v)| json!({ "name": k, "value": v }))
            .collect();
    }
    if let Some(port) = plan.port {
        container["ports"] = json!([{ "containerPort": port }]);
    }
    let mut template = json!({ "spec": { "containers": [container] } });
    if !annotations.is_empty() {
        template["metadata"] = json!({ "annotations": annotations });
    }
    template
}

/// The traffic block: all to the latest revision, or a canary split with the previous one.
fn traffic(canary: Option<u8>, previous: Option<&str>) -> Value {
    match (canary, previous) {
        (Some(p), Some(prev)) => json!([
            { "revisionName": prev, "percent": 100 - u32::from(p) },
            { "latestRevision": true, "percent": p, "tag": "canary" },
        ]),
        _ => json!([{ "latestRevision": true, "percent": 100 }]),
    }
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer).and_then(Value::as_str)
}

fn condition<'a>(status: &'a Value, kind: &str) -> Option<&'a Value> {
    status
        .get("conditions")?
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some(kind))
}

fn describe_condition(c: &Value) -> String {
    let kind = c.get("type").and_then(Value::as_str).unwrap_or("?");
    let status = c.get("status").and_then(Value::as_str).unwrap_or("Unknown");
    let mut text = format!("{kind}={status}");
    if let Some(reason) = c.get("reason").and_then(Value::as_str) {
        text.push_str(&format!(" {reason}"));
    }
    if let Some(message) = c.get("message").and_then(Value::as_str) {
        text.push_str(&format!(": {message}"));
    }
    text
}

/// Runs a Knative deploy.
///
/// # Errors
/// [`KnativeError`]; [`exit_code`](KnativeError::exit_code) is 3 when the revision failed and
/// 4 on timeout.
pub(crate) async fn run(plan: KnativePlan) -> Result<(), KnativeError> {
    let config = load_config(&plan).await?;
    let namespace = plan
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let cluster_url = config.cluster_url.to_string();
    let name = plan.service.clone();
    let path = format!("/apis/serving.knative.dev/v1/namespaces/{namespace}/services/{name}");
    let api_err = |action| {
        let service = format!("{namespace}/{name}");
        move |source| KnativeError::Api {
            action,
            service,
            source: Box::new(source),
        }
    };

    if plan.dry_run {
        return dry_run(&plan, &cluster_url, &path, &namespace);
    }

    let client = Client::try_from(config).map_err(KnativeError::Client)?;
    let services: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &namespace, &resource("Service", "services"));
    let revisions: Api<DynamicObject> =
        Api::namespaced_with(client, &namespace, &resource("Revision", "revisions"));

    let current = services.get_opt(&name).await.map_err(api_err("read"))?;
    let previous = current
        .as_ref()
        .and_then(|s| str_at(&s.data, "/status/latestReadyRevisionName"))
        .map(str::to_owned);

    let template = match &plan.image {
        Some(image) => template(&plan, image),
        None => current
            .as_ref()
            .and_then(|s| s.data.pointer("/spec/template").cloned())
            .ok_or_else(|| KnativeError::NotFound {
                namespace: namespace.clone(),
                service: name.clone(),
            })?,
    };
    if plan.canary.is_some() && previous.is_none() {
        say(format!(
            "service {name} has no ready revision yet; sending all traffic to the new one instead of a canary"
        ));
    }
    let canary = if plan.promote { None } else { plan.canary };
    let body = json!({
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "metadata": { "name": name, "namespace": namespace },
        "spec": { "template": template, "traffic": traffic(canary, previous.as_deref()) },
    });
    let applied = services
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .map_err(api_err("apply"))?;
    let generation = applied.metadata.generation.unwrap_or(0);
    say(format!(
        "applied Knative Service {namespace}/{name} (generation {generation}); waiting for it to become ready"
    ));

    let deadline = Instant::now() + plan.timeout;
    let mut last = String::new();
    loop {
        let svc = services.get(&name).await.map_err(api_err("read"))?;
        let generation = svc.metadata.generation.unwrap_or(generation);
        let status = svc.data.get("status").cloned().unwrap_or(Value::Null);
        let observed = status
            .get("observedGeneration")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        let ready = condition(&status, "Ready");
        let created = str_at(&status, "/latestCreatedRevisionName");
        let latest_ready = str_at(&status, "/latestReadyRevisionName");
        let state = format!(
            "generation {generation} observed {observed}, {}, latest created {}, latest ready {}",
            ready.map_or_else(|| "Ready=Unknown".to_owned(), describe_condition),
            created.unwrap_or("-"),
            latest_ready.unwrap_or("-"),
        );
        if state != last {
            say(format!("service {name}: {state}"));
            last = state;
        }
        if observed >= generation {
            let ready_status = ready.and_then(|c| c.get("status")).and_then(Value::as_str);
            if ready_status == Some("True") && created.is_some() && created == latest_ready {
                let url = str_at(&status, "/url").unwrap_or("(no URL)");
                let split = status
                    .get("traffic")
                    .and_then(Value::as_array)
                    .map(|t| {
                        t.iter()
                            .map(|e| {
                                format!(
                                    "{}% {}{}",
                                    e.get("percent").and_then(Value::as_i64).unwrap_or(0),
                                    str_at(e, "/revisionName").unwrap_or("latest"),
                                    str_at(e, "/tag")
                                        .map(|t| format!(" (tag {t})"))
                                        .unwrap_or_default()
                                )
                            })
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .unwrap_or_default();
                say(format!(
                    "service {name} is ready at {url}: revision {} serving [{split}]",
                    created.unwrap_or("-")
                ));
                return Ok(());
            }
            if ready_status == Some("False") {
                let mut messages = vec![ready.map(describe_condition).unwrap_or_default()];
                if let Some(rev) = created
                    && let Ok(Some(revision)) = revisions.get_opt(rev).await
                {
                    let rev_status = revision.data.get("status").cloned().unwrap_or(Value::Null);
                    if let Some(conds) = rev_status.get("conditions").and_then(Value::as_array) {
                        messages.extend(
                            conds
                                .iter()
                                .filter(|c| {
                                    c.get("status").and_then(Value::as_str) == Some("False")
                                })
                                .map(|c| format!("revision {rev}: {}", describe_condition(c))),
                        );
                    }
                }
                return Err(KnativeError::Failed {
                    service: name,
                    message: messages.join("; "),
                });
            }
        }
        if Instant::now() + plan.poll_interval > deadline {
            return Err(KnativeError::TimedOut {
                service: name,
                timeout: plan.timeout,
                last,
            });
        }
        tokio::time::sleep(plan.poll_interval).await;
    }
}

fn dry_run(
    plan: &KnativePlan,
    cluster_url: &str,
    path: &str,
    namespace: &str,
) -> Result<(), KnativeError> {
    let base = Url::parse(cluster_url).map_err(|e| KnativeError::Invalid {
        message: format!("cluster URL {cluster_url} in the kubeconfig: {e}"),
    })?;
    let mut url = base.clone();
    url.set_path(path);
    let headers = vec![
        ("accept".to_owned(), "application/json".to_owned()),
        ("authorization".to_owned(), output::REDACTED.to_owned()),
    ];
    output::print_request(&PreparedRequest {
        method: "GET".into(),
        url: url.clone(),
        headers: headers.clone(),
        body: String::new(),
    });
    let template = match &plan.image {
        Some(image) => template(plan, image),
        None => json!("<spec.template of the current service>"),
    };
    let previous = plan
        .canary
        .filter(|_| !plan.promote)
        .map(|_| "<status.latestReadyRevisionName of the current service>");
    let canary = if plan.promote { None } else { plan.canary };
    let body = json!({
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "metadata": { "name": plan.service, "namespace": namespace },
        "spec": { "template": template, "traffic": traffic(canary, previous) },
    });
    url.set_query(Some("fieldManager=kiln&force=true"));
    let mut patch_headers = headers;
    patch_headers.push((
        "content-type".to_owned(),
        "application/apply-patch+yaml".to_owned(),
    ));
    output::print_request(&PreparedRequest {
        method: "PATCH".into(),
        url,
        headers: patch_headers,
        body: serde_json::to_string_pretty(&body).unwrap_or_default(),
    });
    say(format!(
        "dry run: nothing was sent; kiln would now wait for {namespace}/{} to become ready",
        plan.service
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canary_splits_with_the_previous_revision() {
        assert_eq!(
            traffic(Some(10), Some("orders-00001")),
            json!([
                { "revisionName": "orders-00001", "percent": 90 },
                { "latestRevision": true, "percent": 10, "tag": "canary" },
            ])
        );
        assert_eq!(
            traffic(Some(10), None),
            json!([{ "latestRevision": true, "percent": 100 }])
        );
    }
}
