//! How big a build's pod is and what it may ask for: its resource class, the job's own
//! requests (each checked against the configured caps and allow patterns), the containers'
//! resource requirements, and what the finished pod occupies (its [`Footprint`]).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::config::{KubernetesConfig, RESOURCE_FIELDS, ResourceClass, Resources};
use super::labels;
use super::quantity;
use crate::build::{ClassChoice, Request, Requested};
use crate::executor::Footprint;

/// A build asks for something the configuration does not allow: it fails with
/// `runner_configuration_error` and this message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(super) struct SpecError(pub(super) String);

/// The resource class a build uses: the one its source chose, else the configured default.
pub(super) fn resource_class(
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

/// What a build's own requests change in its pod, each checked against its cap. As in
/// gitlab-runner, a request no cap or allow pattern is configured for is ignored (with a
/// warning for the job's trace), one above its cap or outside its pattern fails the build.
#[derive(Debug, Default)]
pub(super) struct Overrides {
    /// Resources of the main container.
    pub(super) resources: Resources,
    /// Resources of each service container.
    pub(super) service_resources: Resources,
    /// Resources of the init (helper) container.
    pub(super) helper_resources: Resources,
    /// The pod's service account.
    pub(super) service_account: Option<String>,
    /// Node selector entries.
    pub(super) node_selector: BTreeMap<String, String>,
    /// Pod annotations.
    pub(super) annotations: BTreeMap<String, String>,
    /// Pod labels.
    pub(super) labels: BTreeMap<String, String>,
    /// Tolerations added to the pod's.
    pub(super) tolerations: Vec<Toleration>,
    /// The namespace the job moves its pod and Secret to.
    pub(super) namespace: Option<String>,
    /// The requests that were ignored and why, for the job's trace.
    pub(super) warnings: Vec<String>,
}

impl Overrides {
    /// The overrides `requests` ask for.
    ///
    /// # Errors
    /// A request over its cap, one its allow pattern does not admit, or a malformed value; the
    /// message names where the request came from and the limit.
    pub(super) fn from_requests(
        requests: &[Requested],
        config: &KubernetesConfig,
    ) -> Result<Self, SpecError> {
        let mut out = Self::default();
        for request in requests {
            let (origin, value) = (request.origin.as_str(), request.value.trim());
            let (field, caps, caps_name, target) = match request.what {
                Request::Resource(field) => (field, &config.max, "max", &mut out.resources),
                Request::ServiceResource(field) => (
                    field,
                    &config.max_service,
                    "max_service",
                    &mut out.service_resources,
                ),
                Request::HelperResource(field) => (
                    field,
                    &config.max_helper,
                    "max_helper",
                    &mut out.helper_resources,
                ),
                Request::ServiceAccount => {
                    if out.allowed(
                        config.service_account_overwrite_allowed.as_deref(),
                        origin,
                        value,
                        "service_account_overwrite_allowed",
                    )? {
                        out.service_account = Some(value.to_owned());
                    }
                    continue;
                }
                Request::Namespace => {
                    out.namespace = namespace_allowed(config, origin, value, &mut out.warnings)?;
                    continue;
                }
                Request::NodeToleration => {
                    let toleration = toleration(value).ok_or_else(|| {
                        SpecError(format!(
                            "{origin}=`{value}` must have the form key[=value][:effect]"
                        ))
                    })?;
                    if out.allowed(
                        config.node_tolerations_overwrite_allowed.as_deref(),
                        origin,
                        value,
                        "node_tolerations_overwrite_allowed",
                    )? {
                        out.tolerations.push(toleration);
                    }
                    continue;
                }
                Request::NodeSelector | Request::PodAnnotation | Request::PodLabel => {
                    let (allowed, setting) = match request.what {
                        Request::NodeSelector => (
                            config.node_selector_overwrite_allowed.as_deref(),
                            "node_selector_overwrite_allowed",
                        ),
                        Request::PodAnnotation => (
                            config.pod_annotations_overwrite_allowed.as_deref(),
                            "pod_annotations_overwrite_allowed",
                        ),
                        _ => (
                            config.pod_labels_overwrite_allowed.as_deref(),
                            "pod_labels_overwrite_allowed",
                        ),
                    };
                    let Some((key, entry_value)) = value.split_once('=') else {
                        return Err(SpecError(format!(
                            "{origin}=`{value}` must have the form key=value"
                        )));
                    };
                    if out.allowed(allowed, origin, value, setting)? {
                        let target = match request.what {
                            Request::NodeSelector => &mut out.node_selector,
                            Request::PodAnnotation => &mut out.annotations,
                            _ => &mut out.labels,
                        };
                        target.insert(key.trim().to_owned(), entry_value.trim().to_owned());
                    }
                    continue;
                }
            };
            let field = field.as_str();
            let requested = quantity::parse(value).ok_or_else(|| {
                SpecError(format!(
                    "{origin}=`{value}` is not a Kubernetes quantity (like 500m, 2, 4Gi)"
                ))
            })?;
            let Some(cap) = caps.get(field) else {
                out.warnings.push(format!(
                    "{origin}={value} is ignored: this runner sets no kubernetes.{caps_name}.{field}"
                ));
                continue;
            };
            let cap_value = quantity::parse(cap).unwrap_or(0.0);
            if requested > cap_value {
                return Err(SpecError(format!(
                    "{origin}={value} is above this runner's maximum of {cap} (kubernetes.{caps_name}.{field})"
                )));
            }
            target.set(field, value.to_owned());
        }
        Ok(out)
    }

    /// Whether `value` of `variable` matches the whole of the allow pattern of `setting`;
    /// without a pattern the request is ignored with a warning.
    ///
    /// # Errors
    /// The value does not match the pattern.
    fn allowed(
        &mut self,
        pattern: Option<&str>,
        variable: &str,
        value: &str,
        setting: &str,
    ) -> Result<bool, SpecError> {
        let Some(pattern) = pattern else {
            self.warnings.push(format!(
                "{variable}=`{value}` is ignored: this runner sets no kubernetes.{setting}"
            ));
            return Ok(false);
        };
        // Anchored: the whole value must match, not a part of it.
        let anchored = format!("^(?:{pattern})$");
        if regex::Regex::new(&anchored).is_ok_and(|re| re.is_match(value)) {
            Ok(true)
        } else {
            Err(SpecError(format!(
                "{variable}=`{value}` does not match kubernetes.{setting} (`{pattern}`)"
            )))
        }
    }
}

/// The namespace `variable` asks for when `namespace_overwrite_allowed` admits it; without a
/// pattern the request is ignored with a warning. As in gitlab-runner (whose patterns users
/// bring), the pattern is searched in the name, not anchored: `^ci-` admits `ci-team-a`.
///
/// # Errors
/// The name does not match the pattern, or is not a namespace name.
fn namespace_allowed(
    config: &KubernetesConfig,
    variable: &str,
    value: &str,
    warnings: &mut Vec<String>,
) -> Result<Option<String>, SpecError> {
    let Some(pattern) = config.namespace_overwrite() else {
        warnings.push(format!(
            "{variable}=`{value}` is ignored: this runner sets no kubernetes.namespace_overwrite_allowed"
        ));
        return Ok(None);
    };
    if !regex::Regex::new(pattern).is_ok_and(|re| re.is_match(value)) {
        return Err(SpecError(format!(
            "{variable}=`{value}` does not match kubernetes.namespace_overwrite_allowed (`{pattern}`)"
        )));
    }
    if !super::config::is_dns_label(value) {
        return Err(SpecError(format!(
            "{variable}=`{value}` is not a valid namespace name"
        )));
    }
    Ok(Some(value.to_owned()))
}

/// The namespace of `build`'s pod and Secret: its `KUBERNETES_NAMESPACE_OVERWRITE` when
/// `namespace_overwrite_allowed` admits it, else `default` (the configured namespace). Asked
/// before anything of the build is created.
///
/// # Errors
/// The job's namespace does not match the pattern, or is not a namespace name.
pub(super) fn namespace(
    requests: &[Requested],
    config: &KubernetesConfig,
    default: &str,
) -> Result<String, SpecError> {
    let asked: Vec<Requested> = requests
        .iter()
        .filter(|r| matches!(r.what, Request::Namespace))
        .cloned()
        .collect();
    let overrides = Overrides::from_requests(&asked, config)?;
    Ok(overrides.namespace.unwrap_or_else(|| default.to_owned()))
}

/// A toleration written as gitlab-runner's `KUBERNETES_NODE_TOLERATIONS_*` values:
/// `key=value:Effect` (operator `Equal`), `key:Effect` or `key` (operator `Exists`).
fn toleration(text: &str) -> Option<Toleration> {
    let (rest, effect) = match text.rsplit_once(':') {
        Some((rest, effect)) => (rest, Some(effect.trim())),
        None => (text, None),
    };
    if let Some(effect) = effect
        && !["NoSchedule", "PreferNoSchedule", "NoExecute", ""].contains(&effect)
    {
        return None;
    }
    let (key, value) = match rest.split_once('=') {
        Some((key, value)) => (key.trim(), Some(value.trim())),
        None => (rest.trim(), None),
    };
    if key.is_empty() {
        return None;
    }
    Some(Toleration {
        key: Some(key.to_owned()),
        operator: Some(if value.is_some() { "Equal" } else { "Exists" }.to_owned()),
        value: value.map(str::to_owned),
        effect: effect.filter(|e| !e.is_empty()).map(str::to_owned),
        ..Toleration::default()
    })
}

/// The requests and limits of a container sized `resources`.
pub(super) fn requirements(resources: &Resources) -> ResourceRequirements {
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

/// What `pod` occupies: the requests of the containers that run together (the init
/// container runs before them and is not counted), a container's limit where it requests
/// nothing, and the prices of its resource class.
pub(super) fn footprint(pod: &Pod, config: &KubernetesConfig) -> Footprint {
    let class = labels::class_of(&pod.metadata);
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
    Footprint {
        class,
        vcpu: cpu,
        gib: memory / 1024f64.powi(3),
        price_per_vcpu_hour: prices.price_per_vcpu_hour,
        price_per_gib_hour: prices.price_per_gib_hour,
    }
}
