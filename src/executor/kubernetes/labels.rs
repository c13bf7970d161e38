//! kiln's contract with the cluster: the labels and annotations it writes on every pod, Secret
//! and Lease, and reads back to know a build again after a restart. Written and read here
//! only, so the two cannot drift apart.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::build::{Build, BuildKey, SourceKind};

/// The installation (shared by all its replicas): on every object kiln creates.
const LABEL_COORDINATOR: &str = "kiln.dev/coordinator";
/// The replica of the installation that follows the build.
const LABEL_REPLICA: &str = "kiln.dev/replica";
/// The CI server (`gitlab`, `jenkins`, `github`).
const LABEL_SOURCE: &str = "kiln.dev/source";
/// The CI server's id of the work.
const LABEL_JOB_ID: &str = "kiln.dev/job-id";
/// The source entry that took the work (as a label value).
const LABEL_RUNNER: &str = "kiln.dev/runner";
/// The resource class of the pod.
const LABEL_CLASS: &str = "kiln.dev/resource-class";
/// The warm pool a warm pod (made before its job) belongs to; it keeps the label once taken.
const LABEL_WARM_POOL: &str = "kiln.dev/warm-pool";
/// Marks kiln's Leases (beside the coordinator label).
const LABEL_LEASE: &str = "kiln.dev/lease";
/// Who manages the object.
const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// The exact source entry name (label values cannot hold every name).
const ANNOTATION_RUNNER: &str = "kiln.dev/runner";
/// The container whose end is the build's end.
const ANNOTATION_MAIN: &str = "kiln.dev/main-container";
/// The id of the launch attempt that created a pod.
const ANNOTATION_LAUNCH: &str = "kiln.dev/launch";
/// kiln's own labels, which [`foreign_labels`] leaves out.
/// The pull policies a pod's containers are still to be tried with after their current one
/// (`build=IfNotPresent;svc-0=IfNotPresent,Never`): on the pod, so a coordinator that adopts
/// the build goes on where the last one stopped.
const ANNOTATION_PULL_FALLBACKS: &str = "kiln.dev/pull-fallbacks";
/// The containers a pod was made again for with a later pull policy (`build,svc-0`).
const ANNOTATION_PULL_RETRIED: &str = "kiln.dev/pull-retried";
const OWN_LABELS: &[&str] = &[
    LABEL_MANAGED_BY,
    LABEL_COORDINATOR,
    LABEL_REPLICA,
    LABEL_SOURCE,
    LABEL_JOB_ID,
    LABEL_RUNNER,
    LABEL_CLASS,
    LABEL_WARM_POOL,
];

/// The label selector of every build of installation `coordinator` (its pods and Secrets).
pub(super) fn builds_selector(coordinator: &str) -> String {
    format!("{LABEL_COORDINATOR}={coordinator}")
}

/// `selector` narrowed to builds labelled with none of `replicas`; `notin` also selects
/// objects without the label (builds of an older kiln).
pub(super) fn except_replicas(selector: &str, replicas: &[String]) -> String {
    if replicas.is_empty() {
        return selector.to_owned();
    }
    format!("{selector},{LABEL_REPLICA} notin ({})", replicas.join(","))
}

/// The label selector of the Leases of installation `coordinator`.
pub(super) fn leases_selector(coordinator: &str) -> String {
    format!("{LABEL_COORDINATOR}={coordinator},{LABEL_LEASE}=true")
}

/// The labels of a Lease of installation `coordinator`.
pub(super) fn lease_labels(coordinator: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_COORDINATOR.to_owned(), coordinator.to_owned()),
        (LABEL_LEASE.to_owned(), "true".to_owned()),
    ])
}

/// The labels that identify the objects of `build` (pod and Secret) of installation
/// `coordinator`, followed by `replica`, with the build's own labels.
pub(super) fn identity_labels(
    coordinator: &str,
    replica: Option<&str>,
    build: &Build,
) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([
        (LABEL_MANAGED_BY.to_owned(), "kiln".to_owned()),
        (LABEL_COORDINATOR.to_owned(), coordinator.to_owned()),
        (LABEL_SOURCE.to_owned(), build.key.source.name().to_owned()),
        (LABEL_JOB_ID.to_owned(), build.key.id.to_string()),
        (LABEL_RUNNER.to_owned(), label_value(&build.key.runner)),
    ]);
    if let Some(replica) = replica {
        labels.insert(LABEL_REPLICA.to_owned(), label_value(replica));
    }
    for (key, value) in &build.labels {
        labels.insert(key.clone(), label_value(value));
    }
    labels
}

/// Annotates the exact name of the source entry of `key` (the label holds it cleaned).
pub(super) fn annotate_runner(annotations: &mut BTreeMap<String, String>, key: &BuildKey) {
    annotations.insert(ANNOTATION_RUNNER.to_owned(), key.runner.clone());
}

/// Labels a pod with its resource class.
pub(super) fn label_class(labels: &mut BTreeMap<String, String>, class: &str) {
    labels.insert(LABEL_CLASS.to_owned(), class.to_owned());
}

/// Annotates the container whose end is the build's end.
pub(super) fn annotate_main(annotations: &mut BTreeMap<String, String>, container: &str) {
    annotations.insert(ANNOTATION_MAIN.to_owned(), container.to_owned());
}

/// Annotates the launch attempt that creates a pod.
pub(super) fn annotate_launch(metadata: &mut ObjectMeta, launch: &str) {
    metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(ANNOTATION_LAUNCH.to_owned(), launch.to_owned());
}

/// Annotates the pull policies each container is tried with after its current one (nothing
/// when none has any).
pub(super) fn annotate_pull_fallbacks(
    annotations: &mut BTreeMap<String, String>,
    fallbacks: &BTreeMap<String, Vec<String>>,
) {
    let value: Vec<String> = fallbacks
        .iter()
        .filter(|(_, policies)| !policies.is_empty())
        .map(|(container, policies)| format!("{container}={}", policies.join(",")))
        .collect();
    if value.is_empty() {
        annotations.remove(ANNOTATION_PULL_FALLBACKS);
    } else {
        annotations.insert(ANNOTATION_PULL_FALLBACKS.to_owned(), value.join(";"));
    }
}

/// Annotates that the pod is made again for `container` with a later pull policy.
pub(super) fn annotate_pull_retried(annotations: &mut BTreeMap<String, String>, container: &str) {
    let entry = annotations
        .entry(ANNOTATION_PULL_RETRIED.to_owned())
        .or_default();
    if !entry.split(',').any(|c| c == container) {
        if !entry.is_empty() {
            entry.push(',');
        }
        entry.push_str(container);
    }
}

/// Whether the pod was made again for `container` with a later pull policy.
pub(super) fn pull_retried(metadata: &ObjectMeta, container: &str) -> bool {
    metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_PULL_RETRIED))
        .is_some_and(|v| v.split(',').any(|c| c == container))
}

/// The pull policies each container of a pod is still to be tried with, by container.
pub(super) fn pull_fallbacks(metadata: &ObjectMeta) -> BTreeMap<String, Vec<String>> {
    let Some(value) = metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_PULL_FALLBACKS))
    else {
        return BTreeMap::new();
    };
    value
        .split(';')
        .filter_map(|entry| entry.split_once('='))
        .map(|(container, policies)| {
            (
                container.trim().to_owned(),
                policies
                    .split(',')
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .map(str::to_owned)
                    .collect(),
            )
        })
        .collect()
}

/// The work a kiln object is for, from its labels (and the exact source name annotated).
pub(super) fn key_of(metadata: &ObjectMeta) -> Option<BuildKey> {
    let labels = metadata.labels.as_ref()?;
    let source = SourceKind::from_name(labels.get(LABEL_SOURCE)?)?;
    let id = labels.get(LABEL_JOB_ID)?.parse().ok()?;
    let runner = metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_RUNNER))
        .or_else(|| labels.get(LABEL_RUNNER))?
        .clone();
    Some(BuildKey { source, runner, id })
}

/// The replica a kiln object is labelled with.
pub(super) fn replica_of(metadata: &ObjectMeta) -> Option<String> {
    metadata.labels.as_ref()?.get(LABEL_REPLICA).cloned()
}

/// The resource class a pod is labelled with.
pub(super) fn class_of(metadata: &ObjectMeta) -> Option<String> {
    metadata.labels.as_ref()?.get(LABEL_CLASS).cloned()
}

/// The container whose end is the build's end, as the pod names it.
pub(super) fn main_container(metadata: &ObjectMeta) -> Option<&str> {
    metadata
        .annotations
        .as_ref()?
        .get(ANNOTATION_MAIN)
        .map(String::as_str)
}

/// The launch attempt that created a pod.
pub(super) fn launch_of(metadata: &ObjectMeta) -> Option<&str> {
    metadata
        .annotations
        .as_ref()?
        .get(ANNOTATION_LAUNCH)
        .map(String::as_str)
}

/// The labels a source put on a build, without kiln's own.
pub(super) fn foreign_labels(metadata: &ObjectMeta) -> BTreeMap<String, String> {
    let mut labels = metadata.labels.clone().unwrap_or_default();
    labels.retain(|key, _| !OWN_LABELS.contains(&key.as_str()));
    labels
}

/// Turns the metadata of a build pod or Secret made for no work yet into a warm pod's of pool
/// `pool`: no source, job id or runner, the pool's label.
pub(super) fn make_warm(metadata: &mut ObjectMeta, pool: &str) {
    let labels = metadata.labels.get_or_insert_with(BTreeMap::new);
    for key in [LABEL_SOURCE, LABEL_JOB_ID, LABEL_RUNNER] {
        labels.remove(key);
    }
    labels.insert(LABEL_WARM_POOL.to_owned(), label_value(pool));
    if let Some(annotations) = metadata.annotations.as_mut() {
        annotations.remove(ANNOTATION_RUNNER);
    }
}

/// The warm pool a pod or Secret was made for (taken or not).
pub(super) fn warm_pool_of(metadata: &ObjectMeta) -> Option<String> {
    metadata.labels.as_ref()?.get(LABEL_WARM_POOL).cloned()
}

/// Whether a pod or Secret is a warm pod's that no build has taken (its pool's, not a build's).
pub(super) fn is_untaken_warm(metadata: &ObjectMeta) -> bool {
    metadata.labels.as_ref().is_some_and(|labels| {
        labels.contains_key(LABEL_WARM_POOL) && !labels.contains_key(LABEL_JOB_ID)
    })
}

/// A merge patch making a warm pod's Secret `build`'s, followed by `replica`, on the
/// condition that it is still at `version`: the labels and annotation a build's Secret
/// carries (the caller adds the build's data).
pub(super) fn take_patch(
    coordinator: &str,
    replica: Option<&str>,
    build: &Build,
    version: Option<&str>,
) -> serde_json::Value {
    let mut annotations = BTreeMap::new();
    annotate_runner(&mut annotations, &build.key);
    serde_json::json!({
        "metadata": {
            "resourceVersion": version,
            "labels": identity_labels(coordinator, replica, build),
            "annotations": annotations,
        }
    })
}

/// A merge patch mirroring onto a taken warm pod the labels its Secret got from
/// [`take_patch`] (unconditionally: only the replica that took it writes them).
pub(super) fn taken_mirror_patch(
    coordinator: &str,
    replica: Option<&str>,
    build: &Build,
) -> serde_json::Value {
    let mut patch = take_patch(coordinator, replica, build, None);
    if let Some(metadata) = patch["metadata"].as_object_mut() {
        metadata.remove("resourceVersion");
    }
    patch
}

/// A merge patch making `replica` the owner, on the condition that the object is still at
/// `version`.
pub(super) fn owner_patch(replica: &str, version: Option<&str>) -> serde_json::Value {
    serde_json::json!({
        "metadata": {
            "resourceVersion": version,
            "labels": {LABEL_REPLICA: replica},
        }
    })
}

/// A merge patch making a pod's owner label mirror `replica` (unconditionally: only the
/// owner writes it).
pub(super) fn mirror_patch(replica: &str) -> serde_json::Value {
    serde_json::json!({ "metadata": { "labels": {LABEL_REPLICA: replica} } })
}

/// A Kubernetes label value: at most 63 characters, alphanumerics and `-_.` inside.
pub(crate) fn is_label_value(value: &str) -> bool {
    value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && value
            .chars()
            .next()
            .is_none_or(|c| c.is_ascii_alphanumeric())
        && value
            .chars()
            .last()
            .is_none_or(|c| c.is_ascii_alphanumeric())
}

/// `value` made into a valid label value for a build's labels (runner names may hold any
/// character): others than alphanumerics and `-_.` become `_`.
pub(super) fn label_value(value: &str) -> String {
    cleaned(value, '_')
}

/// `value` made a valid label value for a replica's identity: characters other than
/// alphanumerics and `-_.` become `-` (`kiln` when nothing is left).
pub(crate) fn as_label_value(value: &str) -> String {
    let cleaned = cleaned(value, '-');
    if cleaned.is_empty() {
        "kiln".into()
    } else {
        cleaned
    }
}

/// `value` with characters a label value cannot hold replaced by `replacement`, at most 63
/// characters, alphanumeric at both ends.
fn cleaned(value: &str, replacement: char) -> String {
    let mapped: String = value
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                replacement
            }
        })
        .take(63)
        .collect();
    mapped
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_owned()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::build::{About, Workload};

    #[test]
    fn pull_fallbacks_read_back_as_written() {
        let fallbacks: BTreeMap<String, Vec<String>> = [
            (
                "build".to_owned(),
                vec!["IfNotPresent".to_owned(), "Never".to_owned()],
            ),
            ("svc-0".to_owned(), vec![]),
            ("svc-1".to_owned(), vec!["IfNotPresent".to_owned()]),
        ]
        .into();
        let mut annotations = BTreeMap::new();
        annotate_pull_fallbacks(&mut annotations, &fallbacks);
        assert_eq!(
            annotations[ANNOTATION_PULL_FALLBACKS],
            "build=IfNotPresent,Never;svc-1=IfNotPresent"
        );
        let metadata = ObjectMeta {
            annotations: Some(annotations.clone()),
            ..ObjectMeta::default()
        };
        let read = pull_fallbacks(&metadata);
        assert_eq!(read["build"], ["IfNotPresent", "Never"]);
        assert_eq!(read["svc-1"], ["IfNotPresent"]);
        assert!(!read.contains_key("svc-0"));
        // Nothing left: the annotation goes.
        annotate_pull_fallbacks(&mut annotations, &BTreeMap::new());
        assert!(annotations.is_empty());
    }

    fn build(runner: &str, labels: &[(&str, &str)]) -> Build {
        Build {
            key: BuildKey {
                source: SourceKind::Jenkins,
                runner: runner.into(),
                id: 17,
            },
            name: "kiln-jk-17-3f9a1c2e".into(),
            workload: Workload::KilnAgent {
                image: None,
                services: Vec::new(),
            },
            secrets: BTreeMap::new(),
            class: None,
            requests: Vec::new(),
            timeout: None,
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            annotations: BTreeMap::new(),
            about: About::default(),
            untrusted: false,
            registry_auths: Vec::new(),
        }
    }

    /// What kiln writes on a build's objects, it reads back as the same build: the key (with
    /// a runner name no label value can hold), the replica, the source's own labels.
    #[test]
    fn what_is_written_reads_back_as_the_same_build() {
        let build = build(
            "ci.example.com / main",
            &[("kiln.dev/jenkins-node", "kiln-maven-3f9a1c2e")],
        );
        let mut labels = identity_labels("kiln", Some("replica-1"), &build);
        label_class(&mut labels, "spot");
        let mut annotations = BTreeMap::new();
        annotate_runner(&mut annotations, &build.key);
        annotate_main(&mut annotations, "jnlp");
        let mut metadata = ObjectMeta {
            labels: Some(labels),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        };
        annotate_launch(&mut metadata, "0123456789abcdef");

        assert_eq!(key_of(&metadata), Some(build.key.clone()));
        assert_eq!(replica_of(&metadata).as_deref(), Some("replica-1"));
        assert_eq!(class_of(&metadata).as_deref(), Some("spot"));
        assert_eq!(main_container(&metadata), Some("jnlp"));
        assert_eq!(launch_of(&metadata), Some("0123456789abcdef"));
        assert_eq!(foreign_labels(&metadata), build.labels);
        let selected = metadata.labels.as_ref().unwrap();
        assert_eq!(builds_selector("kiln"), "kiln.dev/coordinator=kiln");
        assert_eq!(selected["kiln.dev/coordinator"], "kiln");
    }

    /// Without the annotation (a label-only object) the cleaned label names the runner.
    #[test]
    fn the_runner_label_stands_in_for_a_missing_annotation() {
        let build = build("ci", &[]);
        let metadata = ObjectMeta {
            labels: Some(identity_labels("kiln", None, &build)),
            ..ObjectMeta::default()
        };
        assert_eq!(key_of(&metadata), Some(build.key));
        assert_eq!(replica_of(&metadata), None);
    }

    #[test]
    fn patches_write_the_label_replicas_are_read_from() {
        let mut metadata = ObjectMeta::default();
        let patch = owner_patch("me", Some("42"));
        metadata.labels = serde_json::from_value(patch["metadata"]["labels"].clone()).ok();
        assert_eq!(replica_of(&metadata).as_deref(), Some("me"));
        assert_eq!(patch["metadata"]["resourceVersion"], "42");
        assert_eq!(
            mirror_patch("me")["metadata"]["labels"],
            patch["metadata"]["labels"]
        );
        assert_eq!(
            except_replicas("kiln.dev/coordinator=kiln", &["a".into(), "b".into()]),
            "kiln.dev/coordinator=kiln,kiln.dev/replica notin (a,b)"
        );
        assert_eq!(except_replicas("x=y", &[]), "x=y");
    }

    #[test]
    fn label_values_are_cleaned() {
        assert_eq!(
            label_value("ci.example.com / main"),
            "ci.example.com___main"
        );
        assert_eq!(label_value("///"), "");
        assert!(is_label_value(&label_value(&"a/".repeat(80))));
    }
    #[test]
    fn a_warm_pod_is_untaken_until_its_take_patch_names_a_build() {
        let build = build("runner one", &[]);
        let mut metadata = ObjectMeta {
            labels: Some(identity_labels("kiln", Some("a"), &build)),
            ..ObjectMeta::default()
        };
        make_warm(&mut metadata, "maven 3");
        assert!(is_untaken_warm(&metadata));
        assert_eq!(warm_pool_of(&metadata).as_deref(), Some("maven_3"));
        assert_eq!(key_of(&metadata), None);
        let patch = take_patch("kiln", Some("b"), &build, Some("12"));
        assert_eq!(patch["metadata"]["resourceVersion"], "12");
        let labels = metadata.labels.as_mut().unwrap();
        for (key, value) in patch["metadata"]["labels"].as_object().unwrap() {
            labels.insert(key.clone(), value.as_str().unwrap().to_owned());
        }
        metadata.annotations = Some(
            patch["metadata"]["annotations"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                .collect(),
        );
        assert!(!is_untaken_warm(&metadata));
        assert_eq!(key_of(&metadata), Some(build.key.clone()));
        assert_eq!(replica_of(&metadata).as_deref(), Some("b"));
        assert_eq!(
            warm_pool_of(&metadata).as_deref(),
            Some("maven_3"),
            "it keeps its pool"
        );
        assert!(foreign_labels(&metadata).is_empty());
        assert!(
            taken_mirror_patch("kiln", Some("b"), &build)["metadata"]
                .get("resourceVersion")
                .is_none()
        );
    }
}
