//! The Helm chart in `charts/kiln`, checked with real Helm: `helm lint --strict`, `helm template`
//! over the values files in `charts/kiln/ci/` (the matrix), every render validated by
//! `kubernetes-validate --strict` against Kubernetes 1.30 and 1.34, and the `kiln.toml` each
//! render puts in its ConfigMap run through `kiln check-config` with the environment the
//! Deployment gives kiln.
//!
//! The checks written here are the ones Helm and the schemas do not make: the config round
//! trip, the Role against docs/kubernetes.md, tokens only in Secrets, references between
//! objects (Secret keys, selectors, ports, namespaces), the values the chart must refuse with
//! kiln's own words, and the Grafana dashboard's queries. The tools come from
//! `support/tools.rs`, which installs them on first use.

use crate::support::tools;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value as Json;

const RELEASE: &str = "kiln";
const NAMESPACE: &str = "ci";
/// The Kubernetes versions every render is validated against: the oldest and the newest minor
/// this chart is tested for (kubernetes-validate 1.37 ships schemas for 1.25 to 1.37).
const KUBE_VERSIONS: [&str; 2] = ["1.30.0", "1.34.0"];
/// Kinds of the Prometheus Operator: not in Kubernetes' schemas, so kubernetes-validate only
/// warns about them; their references are checked here instead.
const CRD_KINDS: [&str; 2] = ["PodMonitor", "ServiceMonitor"];

// ---------------------------------------------------------------------------------------------
// Helm, kubernetes-validate and kiln
// ---------------------------------------------------------------------------------------------

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn chart_dir() -> PathBuf {
    repo().join("charts/kiln")
}

fn ci_values(file: &str) -> PathBuf {
    chart_dir().join("ci").join(file)
}

/// Values for one render: files of `charts/kiln/ci/` and inline YAML, later ones win.
#[derive(Clone, Default)]
struct Values {
    files: Vec<PathBuf>,
    inline: Vec<String>,
}

impl Values {
    fn file(file: &str) -> Self {
        Self::default().and_file(file)
    }

    fn yaml(yaml: &str) -> Self {
        Self::default().and(yaml)
    }

    fn and_file(mut self, file: &str) -> Self {
        self.files.push(ci_values(file));
        self
    }

    fn and(mut self, yaml: &str) -> Self {
        self.inline.push(yaml.to_owned());
        self
    }

    /// `-f` arguments; inline documents are written into `dir`.
    fn args(&self, dir: &Path) -> Vec<String> {
        let mut args = Vec::new();
        for file in &self.files {
            args.extend(["-f".to_owned(), file.display().to_string()]);
        }
        for (i, yaml) in self.inline.iter().enumerate() {
            let path = dir.join(format!("inline-{i}.yaml"));
            std::fs::write(&path, yaml).unwrap();
            args.extend(["-f".to_owned(), path.display().to_string()]);
        }
        args
    }

    /// Every string a values file gives as a token or secret: they may appear in Secrets only.
    fn secrets(&self) -> Vec<String> {
        let mut docs: Vec<serde_yaml_ng::Value> = self
            .files
            .iter()
            .map(|f| serde_yaml_ng::from_str(&std::fs::read_to_string(f).unwrap()).unwrap())
            .collect();
        docs.extend(
            self.inline
                .iter()
                .map(|y| serde_yaml_ng::from_str(y).unwrap()),
        );
        let mut out = Vec::new();
        for doc in docs {
            collect_secrets(&serde_json::to_value(doc).unwrap(), &mut out);
        }
        out
    }
}

fn collect_secrets(value: &Json, out: &mut Vec<String>) {
    match value {
        Json::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value.as_str()) {
                    (
                        "token" | "runnerToken" | "webhookSecret" | "password" | "privateKey"
                        | "docker_auth_config",
                        Some(s),
                    ) if !s.is_empty() => out.push(s.to_owned()),
                    _ => collect_secrets(value, out),
                }
            }
        }
        Json::Array(items) => items.iter().for_each(|v| collect_secrets(v, out)),
        _ => {}
    }
}

fn run(mut command: Command) -> (bool, String, String) {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// What `helm template` printed, as objects.
#[derive(Debug)]
struct Rendered {
    text: String,
    objects: Vec<Json>,
}

/// `helm template kiln charts/kiln -n ci --kube-version VERSION -f …`, or Helm's error output.
fn template_for(values: &Values, kube_version: &str) -> Result<Rendered, String> {
    template_in(values, kube_version, NAMESPACE)
}

fn template_in(values: &Values, kube_version: &str, namespace: &str) -> Result<Rendered, String> {
    let dir = tempfile::tempdir().unwrap();
    let mut helm = tools::tools().helm();
    helm.args(["template", RELEASE])
        .arg(chart_dir())
        .args(["--namespace", namespace, "--kube-version", kube_version])
        .args(values.args(dir.path()));
    let (ok, stdout, stderr) = run(helm);
    if !ok {
        return Err(stderr);
    }
    let mut objects = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&stdout) {
        let yaml = <serde_yaml_ng::Value as serde::Deserialize>::deserialize(doc)
            .unwrap_or_else(|e| panic!("helm printed invalid YAML: {e}\n{stdout}"));
        if !yaml.is_null() {
            objects.push(serde_json::to_value(yaml).unwrap());
        }
    }
    Ok(Rendered {
        text: stdout,
        objects,
    })
}

/// The render for the newest tested Kubernetes version; panics with Helm's message on failure.
fn template(values: &Values) -> Rendered {
    template_for(values, KUBE_VERSIONS[1]).unwrap_or_else(|e| panic!("helm template failed:\n{e}"))
}

/// Helm's error output for values it must refuse.
fn template_error(values: &Values) -> String {
    match template_for(values, KUBE_VERSIONS[1]) {
        Ok(out) => panic!("helm template accepted the values:\n{}", out.text),
        Err(e) => e,
    }
}

/// `kubernetes-validate --strict` of a render against one Kubernetes version: every object
/// passes, and only the Prometheus Operator kinds are unknown to the schemas.
fn validate(out: &Rendered, kube_version: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("render.yaml");
    std::fs::write(&path, &out.text).unwrap();
    let mut validate = tools::tools().kubernetes_validate();
    validate.args(["--strict", "-k", kube_version]).arg(&path);
    let (ok, stdout, stderr) = run(validate);
    assert!(ok, "kubernetes-validate {kube_version}:\n{stdout}{stderr}");
    let minor = &kube_version[..kube_version.rfind('.').unwrap()];
    for object in &out.objects {
        let kind = object["kind"].as_str().unwrap();
        let name = object["metadata"]["name"].as_str().unwrap();
        let passed = format!(
            "passed for resource {}/{name} against version {minor}",
            kind.to_lowercase()
        );
        if CRD_KINDS.contains(&kind) {
            assert!(
                stdout.contains(&format!("Couldn't find schema for kind {kind}")),
                "{stdout}"
            );
        } else {
            assert!(
                stdout.contains(&passed),
                "{kind}/{name} not validated:\n{stdout}"
            );
        }
    }
    for line in stdout.lines().filter(|l| !l.starts_with("INFO ")) {
        assert!(
            CRD_KINDS
                .iter()
                .any(|k| line.contains(&format!("Couldn't find schema for kind {k} "))),
            "kubernetes-validate {kube_version}: {line}"
        );
    }
}

impl Rendered {
    fn all(&self, kind: &str) -> Vec<&Json> {
        self.objects.iter().filter(|o| o["kind"] == kind).collect()
    }

    fn object(&self, kind: &str) -> &Json {
        let found = self.all(kind);
        assert_eq!(found.len(), 1, "one {kind} expected:\n{}", self.text);
        found[0]
    }

    fn kinds(&self) -> Vec<&str> {
        let mut kinds: Vec<&str> = self
            .objects
            .iter()
            .map(|o| o["kind"].as_str().unwrap())
            .collect();
        kinds.sort();
        kinds
    }

    /// The ConfigMap holding kiln.toml (the dashboard has one of its own).
    fn config_map(&self) -> &Json {
        let found: Vec<&Json> = self
            .all("ConfigMap")
            .into_iter()
            .filter(|c| c["data"].get("kiln.toml").is_some())
            .collect();
        assert_eq!(found.len(), 1, "one ConfigMap with kiln.toml");
        found[0]
    }

    fn config(&self) -> String {
        self.config_map()["data"]["kiln.toml"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    fn toml(&self) -> toml::Table {
        self.config()
            .parse()
            .unwrap_or_else(|e| panic!("kiln.toml is not TOML: {e}\n{}", self.config()))
    }

    fn deployment(&self) -> &Json {
        self.object("Deployment")
    }

    fn container(&self) -> &Json {
        &self.deployment()["spec"]["template"]["spec"]["containers"][0]
    }

    /// The names of the coordinator's variables but `POD_NAME` (which every pod has).
    fn env_names(&self) -> Vec<&str> {
        self.container()["env"]
            .as_array()
            .map(|env| {
                env.iter()
                    .map(|v| v["name"].as_str().unwrap())
                    .filter(|name| *name != "POD_NAME")
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The coordinator's environment with `secretKeyRef`s resolved against `secret` (the
    /// chart's Secret when `None`). A required key missing from the Secret fails the test.
    fn env(&self, secret: Option<&Json>) -> Vec<(String, String)> {
        let own;
        let secret = match secret {
            Some(s) => s,
            None => {
                own = self.object("Secret")["stringData"].clone();
                &own
            }
        };
        let mut env = Vec::new();
        for var in self.container()["env"].as_array().into_iter().flatten() {
            let name = var["name"].as_str().unwrap().to_owned();
            if let Some(value) = var["value"].as_str() {
                env.push((name, value.to_owned()));
                continue;
            }
            if var["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name" {
                env.push((name, "kiln-5d8f9c7b6-x2x9q".to_owned()));
                continue;
            }
            let r = &var["valueFrom"]["secretKeyRef"];
            match secret[r["key"].as_str().unwrap()].as_str() {
                Some(value) => env.push((name, value.to_owned())),
                None => assert_eq!(r["optional"], true, "{name}: key {} missing", r["key"]),
            }
        }
        env
    }
}

fn kiln() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
    command.env_clear();
    command
}

/// `kiln check-config` on `config` with `env`: (success, stdout + stderr).
fn check_config(config: &str, env: &[(String, String)]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.toml");
    std::fs::write(&path, config).unwrap();
    let mut command = kiln();
    command
        .arg("check-config")
        .arg(&path)
        .envs(env.iter().cloned());
    let (ok, stdout, stderr) = run(command);
    (ok, format!("{stdout}{stderr}"))
}

fn rules(role: &Json) -> Vec<(Vec<String>, Vec<String>, Vec<String>)> {
    let strings = |v: &Json| -> Vec<String> {
        let mut s: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().to_owned())
            .collect();
        s.sort();
        s
    };
    let mut out: Vec<_> = role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                strings(&r["apiGroups"]),
                strings(&r["resources"]),
                strings(&r["verbs"]),
            )
        })
        .collect();
    out.sort();
    out
}

/// The Role in docs/kubernetes.md's YAML block.
fn documented_role() -> Json {
    documented("Role")
}

/// The object of `kind` (`Role`, `ClusterRole`) in docs/kubernetes.md's YAML blocks.
fn documented(kind: &str) -> Json {
    let doc = std::fs::read_to_string(repo().join("docs/kubernetes.md")).unwrap();
    let block = doc
        .split("```yaml\n")
        .skip(1)
        .map(|rest| rest.split("```").next().unwrap())
        .find(|block| block.contains(&format!("kind: {kind}\n")))
        .unwrap_or_else(|| panic!("docs/kubernetes.md has a yaml block with the {kind}"));
    serde_yaml_ng::Deserializer::from_str(block)
        .map(|doc| {
            serde_json::to_value(
                <serde_yaml_ng::Value as serde::Deserialize>::deserialize(doc).unwrap(),
            )
            .unwrap()
        })
        .find(|o| o["kind"] == kind)
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// The matrix: every values file of charts/kiln/ci/
// ---------------------------------------------------------------------------------------------

/// The values files, each a case of the matrix (a new file must be added here and get a test).
const MATRIX: [&str; 9] = [
    "build-namespace-values.yaml",
    "dashboard-values.yaml",
    "existing-secret-values.yaml",
    "full-values.yaml",
    "github-values.yaml",
    "gitlab-values.yaml",
    "jenkins-values.yaml",
    "podmonitor-values.yaml",
    "replicas-values.yaml",
];

/// Values of the Secret an operator made for `existingSecret`, for `check-config`.
fn fake_existing_secret() -> Json {
    serde_json::json!({
        "gitlab-token-0": "fake-existing-token-0",
        "gitlab-token-1": "fake-existing-token-1",
        "jenkins-token": "fake-existing-jenkins-token",
        "jenkins-webhook-secret": "fake-existing-webhook-secret",
    })
}

/// Renders one matrix case for every tested Kubernetes version and checks what holds for every
/// render: the schemas, the config round trip, tokens, the Role and the references between
/// objects. Returns the render for the newest version.
fn check_case(values: &Values) -> Rendered {
    let mut last = None;
    for version in KUBE_VERSIONS {
        let out = template_for(values, version)
            .unwrap_or_else(|e| panic!("helm template --kube-version {version}:\n{e}"));
        validate(&out, version);
        check_invariants(&out, values);
        last = Some(out);
    }
    last.unwrap()
}

fn check_invariants(out: &Rendered, values: &Values) {
    let config = out.toml();
    let build_ns = config["kubernetes"]["namespace"].as_str().unwrap();

    for object in &out.objects {
        let meta = &object["metadata"];
        assert!(meta["name"].is_string(), "{object}");
        assert_eq!(meta["labels"]["app.kubernetes.io/instance"], RELEASE);
        assert_eq!(meta["labels"]["app.kubernetes.io/managed-by"], "Helm");
        match object["kind"].as_str().unwrap() {
            "Namespace" => {
                assert_eq!(meta["name"], build_ns, "the only Namespace is the builds'");
                assert!(meta.get("namespace").is_none());
                let level = &meta["labels"]["pod-security.kubernetes.io/enforce"];
                assert!(
                    ["baseline", "restricted", "privileged"].contains(&level.as_str().unwrap()),
                    "{object}"
                );
            }
            "Role" | "RoleBinding" => assert_eq!(meta["namespace"], build_ns, "{object}"),
            "ClusterRole" | "ClusterRoleBinding" => {
                assert!(meta.get("namespace").is_none(), "{object}");
            }
            "ConfigMap" if object["data"].get("kiln.json").is_some() => {}
            _ => assert_eq!(meta["namespace"], NAMESPACE, "{object}"),
        }
    }

    // Tokens are in the Secret only, never in the ConfigMap, the pod spec or anywhere else.
    for secret in values.secrets() {
        for object in &out.objects {
            if object["kind"] != "Secret" {
                assert!(
                    !object.to_string().contains(&secret),
                    "{} holds a token",
                    object["kind"]
                );
            }
        }
    }
    for source in ["gitlab", "jenkins", "github"] {
        for entry in config["sources"]
            .get(source)
            .and_then(|s| s.as_array())
            .into_iter()
            .flatten()
        {
            for key in ["token", "password", "webhook_secret", "private_key"] {
                assert!(entry.get(key).is_none(), "kiln.toml has {source} {key}");
            }
        }
    }

    // The Deployment mounts the rendered ConfigMap where `kiln run` reads it, and every
    // secretKeyRef names the Secret (the chart's, with that key, or the operator's).
    let pod = &out.deployment()["spec"]["template"];
    let container = out.container();
    assert_eq!(
        container["args"],
        serde_json::json!(["run", "--config", "/etc/kiln/kiln.toml"])
    );
    let volume = pod["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "config")
        .unwrap();
    assert_eq!(
        volume["configMap"]["name"],
        out.config_map()["metadata"]["name"]
    );
    let existing = out.all("Secret").is_empty();
    let secret = if existing {
        fake_existing_secret()
    } else {
        out.object("Secret")["stringData"].clone()
    };
    let secret_name = if existing {
        out.container()["env"][0]["valueFrom"]["secretKeyRef"]["name"].clone()
    } else {
        out.object("Secret")["metadata"]["name"].clone()
    };
    for var in container["env"].as_array().into_iter().flatten() {
        let r = &var["valueFrom"]["secretKeyRef"];
        if r.is_null() {
            continue;
        }
        assert_eq!(r["name"], secret_name, "{var}");
        assert!(
            secret[r["key"].as_str().unwrap()].is_string() || r["optional"] == true,
            "{var}"
        );
    }
    // Config or token changes roll the pod.
    let annotations = &pod["metadata"]["annotations"];
    assert!(annotations["checksum/config"].is_string());
    assert_eq!(annotations["checksum/secret"].is_string(), !existing);

    // The round trip: kiln accepts the config with the environment the pod gets.
    let (ok, output) = check_config(&out.config(), &out.env(Some(&secret)));
    assert!(
        ok,
        "kiln check-config refuses the render:\n{output}\n{}",
        out.config()
    );
    assert!(output.contains("ok"), "{output}");
    let runners = config["sources"]
        .get("gitlab")
        .and_then(|g| g.as_array())
        .map_or(0, Vec::len);
    let tokens = out
        .env_names()
        .iter()
        .filter(|n| n.starts_with("KILN_SOURCES__GITLAB__"))
        .count();
    assert_eq!(tokens, runners, "one token variable per GitLab runner");

    // RBAC: exactly docs/kubernetes.md's Role, bound to the coordinator's service account.
    let role = out.object("Role");
    assert_eq!(rules(role), rules(&documented_role()));
    let binding = out.object("RoleBinding");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(
        binding["subjects"][0]["name"],
        pod["spec"]["serviceAccountName"]
    );
    assert_eq!(binding["subjects"][0]["namespace"], NAMESPACE);

    // Selectors and ports between objects (the Prometheus Operator kinds have no schema here).
    let pod_labels = pod["metadata"]["labels"].as_object().unwrap();
    let selects_pod = |selector: &Json| {
        let selector = selector.as_object().unwrap();
        assert!(!selector.is_empty());
        selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v))
    };
    let ports: Vec<&Json> = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| &p["name"])
        .collect();
    let service = out.object("Service");
    assert!(selects_pod(&service["spec"]["selector"]));
    assert!(selects_pod(
        &out.deployment()["spec"]["selector"]["matchLabels"]
    ));
    for port in service["spec"]["ports"].as_array().unwrap() {
        assert!(ports.contains(&&port["targetPort"]), "{port}");
    }
    for monitor in out.all("PodMonitor") {
        assert!(selects_pod(&monitor["spec"]["selector"]["matchLabels"]));
        for endpoint in monitor["spec"]["podMetricsEndpoints"].as_array().unwrap() {
            assert!(ports.contains(&&endpoint["port"]));
            assert_eq!(endpoint["path"], "/metrics");
        }
    }
    for monitor in out.all("ServiceMonitor") {
        let labels = service["metadata"]["labels"].as_object().unwrap();
        for (k, v) in monitor["spec"]["selector"]["matchLabels"]
            .as_object()
            .unwrap()
        {
            assert_eq!(labels.get(k), Some(v), "ServiceMonitor selects the Service");
        }
        for endpoint in monitor["spec"]["endpoints"].as_array().unwrap() {
            let names: Vec<&Json> = service["spec"]["ports"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| &p["name"])
                .collect();
            assert!(names.contains(&&endpoint["port"]));
        }
    }
    for pdb in out.all("PodDisruptionBudget") {
        assert!(selects_pod(&pdb["spec"]["selector"]["matchLabels"]));
    }
    for policy in out.all("NetworkPolicy") {
        assert!(selects_pod(&policy["spec"]["podSelector"]["matchLabels"]));
    }
}

#[test]
fn the_matrix_is_every_values_file_of_ci() {
    let files: BTreeSet<String> = std::fs::read_dir(chart_dir().join("ci"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        files,
        MATRIX
            .iter()
            .map(|s| s.to_string())
            .collect::<BTreeSet<_>>()
    );
}

#[test]
fn helm_lint_strict_passes_for_every_values_file() {
    for file in MATRIX {
        let mut helm = tools::tools().helm();
        helm.args(["lint", "--strict"])
            .arg(chart_dir())
            .arg("-f")
            .arg(ci_values(file));
        let (ok, stdout, stderr) = run(helm);
        assert!(ok, "helm lint --strict -f {file}:\n{stdout}{stderr}");
        assert!(
            stdout.contains("1 chart(s) linted, 0 chart(s) failed"),
            "{stdout}"
        );
        // `--strict` turns warnings into failures; INFO lines (icon) are all that may remain.
        for line in stdout.lines().filter(|l| l.starts_with('[')) {
            assert!(line.starts_with("[INFO]"), "{file}: {line}");
        }
    }
}

#[test]
fn matrix_gitlab_only_is_a_hardened_coordinator_with_builds_in_their_own_namespace() {
    let out = check_case(&Values::file("gitlab-values.yaml"));
    assert_eq!(
        out.kinds(),
        [
            "ConfigMap",
            "Deployment",
            "Namespace",
            "PodDisruptionBudget",
            "Role",
            "RoleBinding",
            "Secret",
            "Service",
            "ServiceAccount"
        ]
    );
    let deployment = out.deployment();
    // Two replicas share the work through Leases: they roll one at a time, keep one up
    // through drains, and spread over nodes and zones.
    assert_eq!(deployment["spec"]["replicas"], 2);
    assert_eq!(deployment["spec"]["strategy"]["type"], "RollingUpdate");
    assert_eq!(
        deployment["spec"]["strategy"]["rollingUpdate"],
        serde_json::json!({"maxSurge": 1, "maxUnavailable": 0})
    );
    assert_eq!(out.object("PodDisruptionBudget")["spec"]["minAvailable"], 1);
    let pod = &deployment["spec"]["template"]["spec"];
    let spread = pod["topologySpreadConstraints"].as_array().unwrap();
    let keys: Vec<&str> = spread
        .iter()
        .map(|c| c["topologyKey"].as_str().unwrap())
        .collect();
    assert_eq!(
        keys,
        ["kubernetes.io/hostname", "topology.kubernetes.io/zone"]
    );
    for constraint in spread {
        assert_eq!(constraint["whenUnsatisfiable"], "ScheduleAnyway");
        assert_eq!(
            constraint["labelSelector"]["matchLabels"],
            deployment["spec"]["selector"]["matchLabels"]
        );
    }
    let pod_name = out.container()["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "POD_NAME")
        .expect("the replica's identity from the downward API");
    assert_eq!(
        pod_name["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );
    assert_eq!(pod["serviceAccountName"], "kiln");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let container = out.container();
    assert_eq!(container["image"], "ghcr.io/kiln-ci/kiln:0.1.0");
    let security = &container["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["ports"][0]["containerPort"], 9252);
    // The kubelet probes a port of their own, which strangers on 9252 cannot starve.
    assert_eq!(container["ports"][1]["containerPort"], 9253);
    assert_eq!(container["livenessProbe"]["httpGet"]["port"], "probe");
    assert_eq!(container["readinessProbe"]["httpGet"]["port"], "probe");
    assert_eq!(out.env_names(), ["KILN_SOURCES__GITLAB__0__TOKEN"]);
    assert_eq!(
        out.object("Secret")["stringData"]["gitlab-token-0"],
        "fake-minimal-runner-token"
    );

    // Builds get a namespace of their own, created with Pod Security at kiln's level.
    let namespace = out.object("Namespace");
    assert_eq!(namespace["metadata"]["name"], "ci-builds");
    assert_eq!(
        namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "baseline"
    );
    assert_eq!(
        namespace["metadata"]["annotations"]["helm.sh/resource-policy"],
        "keep"
    );
    let config = out.toml();
    assert_eq!(config["executor"].as_str(), Some("kubernetes"));
    assert_eq!(
        config["kubernetes"]["namespace"].as_str(),
        Some("ci-builds")
    );
    assert_eq!(
        config["kubernetes"]["helper_image"].as_str(),
        Some("ghcr.io/kiln-ci/kiln:0.1.0")
    );
    assert_eq!(config["kubernetes"]["coordinator"].as_str(), Some("kiln"));
    assert!(config["kubernetes"].get("resource_classes").is_none());
    let runner = &config["sources"]["gitlab"][0];
    assert_eq!(runner["url"].as_str(), Some("https://gitlab.example.com"));
    assert!(kiln::config::is_system_id(
        runner["system_id"].as_str().unwrap()
    ));

    // The environment is what carries the token: without it kiln refuses the config.
    let (ok, output) = check_config(&out.config(), &[]);
    assert!(
        !ok && output.contains("sources.gitlab[0].token"),
        "{output}"
    );
}

#[test]
fn matrix_jenkins_only_has_no_gitlab_runner() {
    let out = check_case(&Values::file("jenkins-values.yaml"));
    assert_eq!(
        out.env_names(),
        [
            "KILN_SOURCES__JENKINS__0__TOKEN",
            "KILN_SOURCES__JENKINS__0__WEBHOOK_SECRET"
        ]
    );
    let config = out.toml();
    assert!(config["sources"].get("gitlab").is_none());
    let jenkins = config["sources"]["jenkins"][0].as_table().unwrap();
    assert_eq!(
        jenkins.keys().collect::<Vec<_>>(),
        ["labels", "pod_templates", "url", "user"]
    );
    assert_eq!(
        jenkins["pod_templates"]["maven"]["resource_class"].as_str(),
        Some("no-evict")
    );
    assert_eq!(
        config["kubernetes"]["resource_classes"]["no-evict"]["preset"].as_str(),
        Some("no-evict")
    );
}

#[test]
fn matrix_github_app_runs_organization_runners_with_the_key_from_the_secret() {
    let out = check_case(&Values::file("github-values.yaml"));
    assert_eq!(
        out.env_names(),
        [
            "KILN_SOURCES__GITHUB__0__PRIVATE_KEY",
            "KILN_SOURCES__GITHUB__0__WEBHOOK_SECRET"
        ]
    );
    let config = out.toml();
    assert!(config["sources"].get("gitlab").is_none());
    let github = config["sources"]["github"][0].as_table().unwrap();
    assert_eq!(github["org"].as_str(), Some("acme"));
    assert!(github.get("owner").is_none());
    assert_eq!(github["app_id"].as_integer(), Some(123456));
    assert_eq!(github["installation_id"].as_integer(), Some(7890));
    assert_eq!(github["runner_group_id"].as_integer(), Some(3));
    assert_eq!(github["min_idle"].as_integer(), Some(1));
    assert_eq!(github["max_runners"].as_integer(), Some(20));
    assert_eq!(github["reconcile_interval"].as_str(), Some("30s"));
    assert_eq!(
        github["rerun_on_infrastructure_failure"].as_bool(),
        Some(true)
    );
    assert_eq!(github["label_classes"]["big"].as_str(), Some("no-evict"));
    let secret = &out.object("Secret")["stringData"];
    assert_eq!(
        secret["github-private-key"].as_str(),
        Some("fake-app-private-key-pem\n")
    );
    assert!(secret.get("github-token").is_none());

    // A token instead of an App; a repository instead of an organization.
    let out = check_case(&Values::yaml(
        "github: {enabled: true, owner: acme, repo: widgets, labels: [kiln], token: fake-github-token}",
    ));
    assert_eq!(out.env_names(), ["KILN_SOURCES__GITHUB__0__TOKEN"]);
    let github = out.toml()["sources"]["github"][0].clone();
    assert_eq!(github["owner"].as_str(), Some("acme"));
    assert_eq!(github["repo"].as_str(), Some("widgets"));

    // Enterprise runners, a group by name, dind with the privileged opt-in.
    let out = check_case(&Values::yaml(
        "{kubernetes: {privileged: true}, github: {enabled: true, enterprise: megacorp, labels: [kiln], token: fake-classic-enterprise-token, runnerGroup: ci, noDefaultLabels: true, runnerArch: ARM64, idleTimeout: 5m, containerMode: dind, dindImage: 'docker:27-dind'}}",
    ));
    let github = out.toml()["sources"]["github"][0].clone();
    assert_eq!(github["enterprise"].as_str(), Some("megacorp"));
    assert!(github.get("org").is_none() && github.get("owner").is_none());
    assert_eq!(github["runner_group"].as_str(), Some("ci"));
    assert_eq!(github["no_default_labels"].as_bool(), Some(true));
    assert_eq!(github["runner_arch"].as_str(), Some("ARM64"));
    assert_eq!(github["idle_timeout"].as_str(), Some("5m"));
    assert_eq!(github["container_mode"].as_str(), Some("dind"));
    assert_eq!(github["dind_image"].as_str(), Some("docker:27-dind"));
    // Pod Security admission would refuse the privileged sidecar in a baseline namespace.
    let namespace = out
        .objects
        .iter()
        .find(|o| o["kind"] == "Namespace")
        .unwrap();
    assert_eq!(
        namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "privileged"
    );

    // What kiln would refuse at start is refused at install, in kiln's words.
    for (values, message) in [
        (
            "github: {enabled: true, org: acme, owner: acme, repo: w, labels: [kiln], token: t}",
            "sources.github[0].org: set either",
        ),
        (
            "github: {enabled: true, org: acme, labels: [], token: t}",
            "sources.github[0].labels: list at least one label",
        ),
        (
            "github: {enabled: true, org: acme, labels: [kiln], appId: 1}",
            "github.privateKey (the App's PEM key) is required",
        ),
        (
            "github: {enabled: true, org: acme, labels: [kiln], token: t, webhookSecret: short}",
            "sources.github[0].webhook_secret: must be at least 16 characters",
        ),
        (
            "github: {enabled: true, org: acme, labels: [kiln], token: t, labelClasses: {gpu: nope}}",
            "sources.github[0].label_classes.gpu",
        ),
        (
            "github: {enabled: true, org: acme, labels: [kiln], token: t, containerMode: dind}",
            "sources.github[0].container_mode",
        ),
    ] {
        let error = template_error(&Values::yaml(values));
        assert!(error.contains(message), "{values}:\n{error}");
    }
}

#[test]
fn matrix_gitlab_and_jenkins_with_every_option() {
    let values = Values::file("full-values.yaml");
    let out = check_case(&values);
    assert_eq!(
        out.kinds(),
        [
            "ConfigMap",
            "ConfigMap",
            "Deployment",
            "Namespace",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "PodMonitor",
            "Role",
            "RoleBinding",
            "Secret",
            "Service",
            "ServiceAccount",
            "ServiceMonitor"
        ]
    );
    assert_eq!(out.object("Namespace")["metadata"]["name"], "ci-builds");
    assert_eq!(out.object("RoleBinding")["subjects"][0]["name"], "kiln-ci");

    let config = out.toml();
    let k8s = &config["kubernetes"];
    assert_eq!(k8s["namespace"].as_str(), Some("ci-builds"));
    assert_eq!(k8s["coordinator"].as_str(), Some("kiln-ci"));
    // #27's options reach kiln.toml (the round trip above has check-config accept them); the
    // registry logins reach kiln through the Secret only.
    assert_eq!(
        k8s["volumes"]["pvc"][0]["mount_path"].as_str(),
        Some("/root/.m2")
    );
    assert_eq!(k8s["pod_patch_type"].as_str(), Some("strategic"));
    assert_eq!(k8s["allowed_images"].as_array().map(Vec::len), Some(2));
    assert!(k8s.get("docker_auth_config").is_none(), "{k8s}");
    // Warm pools reach kiln.toml as [[warm_pools]] with their schedule windows, and the
    // coordinator's restricted egress lets the hand-off through to the build namespace.
    let pools = config["warm_pools"].as_array().unwrap();
    assert_eq!(pools.len(), 2);
    assert_eq!(
        pools[0]["schedule"][0]["timezone"].as_str(),
        Some("Europe/Berlin")
    );
    assert_eq!(pools[1]["label"].as_str(), Some("maven"));
    assert_eq!(config["max_idle_total"].as_integer(), Some(6));
    let egress = out.object("NetworkPolicy")["spec"]["egress"]
        .as_array()
        .unwrap();
    assert!(
        egress.iter().any(|rule| rule["ports"][0]["port"] == 9797
            && rule["to"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                == "ci-builds"),
        "{egress:?}"
    );
    assert!(
        out.object("Secret")["stringData"]["docker-auth-config"]
            .as_str()
            .is_some_and(|s| s.contains("auths"))
    );
    assert_eq!(
        k8s["helper_image"].as_str(),
        Some("registry.example.com/mirror/kiln:0.1.0")
    );
    assert_eq!(k8s["security"].as_str(), Some("restricted"));
    assert_eq!(k8s["run_as_user"].as_integer(), Some(1000));
    assert_eq!(k8s["tolerations"][0]["effect"].as_str(), Some("NoSchedule"));
    assert_eq!(
        k8s["node_selector"]["kubernetes.io/arch"].as_str(),
        Some("amd64")
    );
    assert_eq!(
        k8s["pod_patch"]["spec"]["dnsConfig"]["options"][0]["value"].as_str(),
        Some("2")
    );
    assert_eq!(
        k8s["node_selector_overwrite_allowed"].as_str(),
        Some(r"^kubernetes\.io/arch=(amd64|arm64)$")
    );
    let classes = k8s["resource_classes"].as_table().unwrap();
    assert_eq!(
        classes.keys().collect::<Vec<_>>(),
        ["eci-spot", "gpu", "no-evict"]
    );
    // values.yaml's preset class, switched on by `enabled: true` alone.
    assert_eq!(classes["eci-spot"]["preset"].as_str(), Some("eci-spot"));
    assert_eq!(classes["eci-spot"]["memory_limit"].as_str(), Some("4Gi"));
    assert!(classes["eci-spot"].get("enabled").is_none());
    assert_eq!(classes["gpu"]["runtime_class"].as_str(), Some("nvidia"));
    assert_eq!(config["agent"]["output_limit"].as_integer(), Some(8192));

    let runners = config["sources"]["gitlab"].as_array().unwrap();
    let names: Vec<_> = runners
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["default", "gpu", "other-instance"]);
    assert_eq!(
        runners[2]["url"].as_str(),
        Some("https://gitlab.other.example.com/sub/path")
    );
    assert_eq!(runners[1]["system_id"].as_str(), Some("s_0123456789ab"));
    assert_eq!(runners[1]["limit"].as_integer(), Some(2));
    assert_eq!(runners[1]["poll_timeout"].as_str(), Some("90s"));
    assert_eq!(runners[0]["request_concurrency"].as_integer(), Some(2));
    assert_eq!(runners[0]["resource_class"].as_str(), Some("eci-spot"));
    let ids: BTreeSet<_> = runners
        .iter()
        .map(|r| r["system_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 3, "each runner has its own system id");

    let jenkins = config["sources"]["jenkins"][0].as_table().unwrap();
    assert_eq!(
        jenkins.keys().collect::<Vec<_>>(),
        [
            "labels",
            "limit",
            "name",
            "pod_templates",
            "poll_interval",
            "url",
            "user"
        ]
    );
    assert_eq!(
        out.env_names(),
        [
            "KILN_SOURCES__GITLAB__0__TOKEN",
            "KILN_SOURCES__GITLAB__1__TOKEN",
            "KILN_SOURCES__GITLAB__2__TOKEN",
            "KILN_SOURCES__JENKINS__0__TOKEN",
            "KILN_SOURCES__JENKINS__0__WEBHOOK_SECRET",
            "KILN_KUBERNETES__DOCKER_AUTH_CONFIG",
            "RUST_BACKTRACE"
        ]
    );
    assert_eq!(
        out.object("NetworkPolicy")["spec"]["ingress"][0]["from"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        out.object("ServiceMonitor")["metadata"]["labels"]["release"],
        "prometheus"
    );
    assert_eq!(out.object("PodDisruptionBudget")["spec"]["minAvailable"], 1);
}

#[test]
fn matrix_existing_secret_replaces_the_charts_secret() {
    let out = check_case(&Values::file("existing-secret-values.yaml"));
    assert!(out.all("Secret").is_empty());
    let env = out.container()["env"].as_array().unwrap();
    let refs: Vec<(&str, &str, &str)> = env
        .iter()
        .filter(|v| v["name"] != "POD_NAME")
        .map(|v| {
            let r = &v["valueFrom"]["secretKeyRef"];
            (
                v["name"].as_str().unwrap(),
                r["name"].as_str().unwrap(),
                r["key"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        refs,
        [
            (
                "KILN_SOURCES__GITLAB__0__TOKEN",
                "ci-tokens",
                "gitlab-token-0"
            ),
            (
                "KILN_SOURCES__GITLAB__1__TOKEN",
                "ci-tokens",
                "gitlab-token-1"
            ),
            (
                "KILN_SOURCES__JENKINS__0__TOKEN",
                "ci-tokens",
                "jenkins-token"
            ),
            (
                "KILN_SOURCES__JENKINS__0__WEBHOOK_SECRET",
                "ci-tokens",
                "jenkins-webhook-secret"
            ),
            (
                "KILN_KUBERNETES__DOCKER_AUTH_CONFIG",
                "ci-tokens",
                "docker-auth-config"
            ),
        ]
    );
    // The webhook secret is optional in an operator's Secret: without it the webhook is off.
    assert_eq!(env[3]["valueFrom"]["secretKeyRef"]["optional"], true);
    let mut secret = fake_existing_secret();
    secret
        .as_object_mut()
        .unwrap()
        .remove("jenkins-webhook-secret");
    let (ok, output) = check_config(&out.config(), &out.env(Some(&secret)));
    assert!(ok, "{output}");
}

#[test]
fn a_namespace_overwrite_pattern_adds_the_documented_cluster_role_and_only_then() {
    let plain = template(&Values::file("gitlab-values.yaml"));
    assert!(plain.all("ClusterRole").is_empty() && plain.all("ClusterRoleBinding").is_empty());
    let out = check_case(
        &Values::file("gitlab-values.yaml")
            .and("kubernetes: {namespace_overwrite_allowed: '^ci-'}"),
    );
    assert_eq!(
        out.toml()["kubernetes"]["namespace_overwrite_allowed"].as_str(),
        Some("^ci-")
    );
    let role = out.object("ClusterRole");
    assert_eq!(rules(role), rules(&documented("ClusterRole")));
    let binding = out.object("ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["kind"], "ClusterRole");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(
        binding["subjects"][0]["name"],
        out.deployment()["spec"]["template"]["spec"]["serviceAccountName"]
    );
    assert_eq!(binding["subjects"][0]["namespace"], NAMESPACE);
    // The namespaced Role stays (Leases live in the build namespace).
    assert_eq!(rules(out.object("Role")), rules(&documented_role()));
}

#[test]
fn matrix_build_namespace_of_the_operator_gets_the_role_only() {
    let out = check_case(&Values::file("build-namespace-values.yaml"));
    assert!(out.all("Namespace").is_empty(), "the operator's namespace");
    assert_eq!(out.object("Role")["metadata"]["namespace"], "team-a-builds");
    assert_eq!(
        out.toml()["kubernetes"]["namespace"].as_str(),
        Some("team-a-builds")
    );
}

#[test]
fn matrix_podmonitor_scrapes_the_pod() {
    let out = check_case(&Values::file("podmonitor-values.yaml"));
    let monitor = out.object("PodMonitor");
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    assert_eq!(monitor["spec"]["podMetricsEndpoints"][0]["interval"], "15s");
    assert!(out.all("ServiceMonitor").is_empty());
}

#[test]
fn matrix_dashboard_is_a_configmap_for_grafanas_sidecar() {
    let out = check_case(&Values::file("dashboard-values.yaml"));
    let dashboards: Vec<&Json> = out
        .all("ConfigMap")
        .into_iter()
        .filter(|c| c["data"].get("kiln.json").is_some())
        .collect();
    assert_eq!(dashboards.len(), 1);
    let meta = &dashboards[0]["metadata"];
    assert_eq!(meta["namespace"], "monitoring");
    assert_eq!(meta["labels"]["grafana_dashboard"], "1");
    assert_eq!(meta["annotations"]["grafana_folder"], "CI");
    let shipped: Json = serde_json::from_str(
        &std::fs::read_to_string(chart_dir().join("dashboards/kiln.json")).unwrap(),
    )
    .unwrap();
    let rendered: Json =
        serde_json::from_str(dashboards[0]["data"]["kiln.json"].as_str().unwrap()).unwrap();
    assert_eq!(rendered, shipped);
    // Off by default.
    let plain = template(&Values::file("gitlab-values.yaml"));
    assert_eq!(plain.all("ConfigMap").len(), 1);
}

#[test]
fn matrix_replicas_zero_stops_taking_jobs() {
    let out = check_case(&Values::file("replicas-values.yaml"));
    assert_eq!(out.deployment()["spec"]["replicas"], 0);
    assert_eq!(out.deployment()["spec"]["strategy"]["type"], "Recreate");
    assert!(out.deployment()["spec"]["template"]["spec"]["topologySpreadConstraints"].is_null());
    assert_eq!(out.object("PodDisruptionBudget")["spec"]["minAvailable"], 1);
}

#[test]
fn one_replica_is_recreated_without_a_budget_unless_asked() {
    let gitlab = Values::file("gitlab-values.yaml");
    let out = check_case(&gitlab.clone().and("replicas: 1"));
    let deployment = out.deployment();
    assert_eq!(deployment["spec"]["strategy"]["type"], "Recreate");
    assert!(out.all("PodDisruptionBudget").is_empty());
    assert!(deployment["spec"]["template"]["spec"]["topologySpreadConstraints"].is_null());
    // Own constraints replace the default ones and get the pods' selector.
    let out = template(&gitlab.and(
        "topologySpread: {constraints: [{maxSkew: 2, topologyKey: topology.kubernetes.io/zone, whenUnsatisfiable: DoNotSchedule}]}\npodDisruptionBudget: {enabled: false}",
    ));
    assert!(out.all("PodDisruptionBudget").is_empty());
    let spread = &out.deployment()["spec"]["template"]["spec"]["topologySpreadConstraints"];
    assert_eq!(spread.as_array().unwrap().len(), 1);
    assert_eq!(spread[0]["maxSkew"], 2);
    assert_eq!(spread[0]["whenUnsatisfiable"], "DoNotSchedule");
    assert!(spread[0]["labelSelector"]["matchLabels"].is_object());
}

// ---------------------------------------------------------------------------------------------
// What kubernetes-validate, the build namespace and the checksums do
// ---------------------------------------------------------------------------------------------

#[test]
fn kubernetes_validate_strict_rejects_unknown_fields() {
    // The validator is not a no-op: a typo in a Deployment's spec is an error for both versions.
    let mut out = template(&Values::file("gitlab-values.yaml"));
    out.text = out.text.replace("  replicas: 2\n", "  replica: 2\n");
    assert!(out.text.contains("replica: 2"));
    for version in KUBE_VERSIONS {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.yaml");
        std::fs::write(&path, &out.text).unwrap();
        let mut validate = tools::tools().kubernetes_validate();
        validate.args(["--strict", "-k", version]).arg(&path);
        let (ok, stdout, _) = run(validate);
        assert!(!ok && stdout.contains("ERROR"), "{stdout}");
        assert!(stdout.contains("deployment/kiln"), "{stdout}");
    }
}

#[test]
fn build_namespace_defaults_to_one_of_its_own() {
    let base = Values::file("gitlab-values.yaml");
    let namespace_of = |out: &Rendered| {
        (
            out.all("Namespace")
                .first()
                .map(|n| n["metadata"]["name"].as_str().unwrap().to_owned()),
            out.object("Role")["metadata"]["namespace"]
                .as_str()
                .unwrap()
                .to_owned(),
            out.toml()["kubernetes"]["namespace"]
                .as_str()
                .unwrap()
                .to_owned(),
        )
    };
    let some = |s: &str| Some(s.to_owned());
    for (yaml, created, used) in [
        ("{}", some("ci-builds"), "ci-builds"),
        // The release namespace (the chart's former default) still works; it is never created.
        ("buildNamespace: {name: ci}", None, "ci"),
        ("buildNamespace: {name: ci, create: true}", None, "ci"),
        // A name you give is yours unless you ask the chart to create it.
        ("buildNamespace: {name: builds}", None, "builds"),
        (
            "buildNamespace: {name: builds, create: true}",
            some("builds"),
            "builds",
        ),
        ("buildNamespace: {create: false}", None, "ci-builds"),
    ] {
        let out = template(&base.clone().and(yaml));
        let (namespace, role, config) = namespace_of(&out);
        assert_eq!(namespace, created, "{yaml}");
        assert_eq!(role, used, "{yaml}");
        assert_eq!(config, used, "{yaml}");
    }

    // Pod Security follows kiln's profile unless the labels say otherwise.
    let level = |yaml: &str| {
        template(&base.clone().and(yaml)).object("Namespace")["metadata"]["labels"]
            ["pod-security.kubernetes.io/enforce"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(level("kubernetes: {security: restricted}"), "restricted");
    assert_eq!(
        level("buildNamespace: {labels: {pod-security.kubernetes.io/enforce: privileged}}"),
        "privileged"
    );

    // A long release namespace still gives a valid namespace name.
    let long = "a".repeat(60);
    let out = template_in(&base, KUBE_VERSIONS[1], &long).unwrap();
    let name = out.object("Namespace")["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(name.len() <= 63 && !name.ends_with('-'), "{name}");
}

#[test]
fn a_config_change_rolls_the_pod_and_the_system_id_is_stable() {
    let base = Values::file("gitlab-values.yaml");
    let checksum = |out: &Rendered| {
        out.deployment()["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let system_id = |out: &Rendered| {
        out.toml()["sources"]["gitlab"][0]["system_id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let before = template(&base);
    let after = template(&base.clone().and("concurrent: 9\n"));
    let unrelated = template(&base.clone().and("podLabels: {team: platform}\n"));
    assert_ne!(checksum(&before), checksum(&after));
    assert_eq!(checksum(&before), checksum(&unrelated));
    // GitLab shows one runner manager per system id: it must survive config changes.
    assert_eq!(system_id(&before), system_id(&after));
    // A token change rolls the pod too.
    let secret = |out: &Rendered| {
        out.deployment()["spec"]["template"]["metadata"]["annotations"]["checksum/secret"].clone()
    };
    let rotated = template(
        &base
            .clone()
            .and("gitlab: {runnerToken: fake-rotated-token}\n"),
    );
    assert_ne!(secret(&before), secret(&rotated));
}

#[test]
fn notes_say_how_to_check_the_runner_is_online() {
    let dir = tempfile::tempdir().unwrap();
    let mut helm = tools::tools().helm();
    helm.args(["install", RELEASE])
        .arg(chart_dir())
        .args(["--namespace", NAMESPACE, "--dry-run=client"])
        .args(Values::file("full-values.yaml").args(dir.path()));
    let (ok, stdout, stderr) = run(helm);
    assert!(ok, "{stderr}");
    let notes = stdout.split("NOTES:\n").nth(1).expect("helm prints NOTES");
    assert!(
        notes.contains("kubectl -n ci rollout status deployment/kiln-ci"),
        "{notes}"
    );
    assert!(notes.contains("/readyz"), "{notes}");
    assert!(notes.contains("online"), "{notes}");
    assert!(
        notes.contains("build pods run in namespace ci-builds"),
        "{notes}"
    );
    assert!(!notes.contains("fake-"), "NOTES never print a token");
}

// ---------------------------------------------------------------------------------------------
// Values kiln rejects are refused at install, in kiln's words
// ---------------------------------------------------------------------------------------------

/// kiln's own problem text for `config`: what `kiln check-config` prints.
fn kiln_says(config: &str, env: &[(String, String)]) -> String {
    let (ok, output) = check_config(config, env);
    assert!(!ok, "kiln accepts it:\n{config}");
    output
}

#[test]
fn a_short_jenkins_webhook_secret_is_refused_as_kiln_refuses_it() {
    let out = template(&Values::file("jenkins-values.yaml"));
    let mut env = out.env(None);
    for (name, value) in &mut env {
        if name.ends_with("__WEBHOOK_SECRET") {
            *value = "too-short".into();
        }
    }
    let kiln = kiln_says(&out.config(), &env);
    let message = "sources.jenkins[0].webhook_secret: must be at least 16 characters";
    assert!(kiln.contains(message), "{kiln}");

    let err = template_error(
        &Values::file("jenkins-values.yaml").and("jenkins: {webhookSecret: too-short}"),
    );
    assert!(
        err.contains(&format!("{message} (jenkins.webhookSecret has 9)")),
        "{err}"
    );
    // 16 characters are enough.
    template(
        &Values::file("jenkins-values.yaml").and("jenkins: {webhookSecret: 0123456789abcdef}"),
    );
}

#[test]
fn an_undefined_resource_class_is_refused_as_kiln_refuses_it() {
    let out = template(&Values::file("gitlab-values.yaml"));
    let config = out.config().replace(
        "[[sources.gitlab]]\n",
        "[[sources.gitlab]]\nresource_class = \"gpu\"\n",
    );
    let kiln = kiln_says(&config, &out.env(None));
    let message = "sources.gitlab[0].resource_class: `gpu` is not in [kubernetes.resource_classes]";
    assert!(kiln.contains(message), "{kiln}");

    let base = Values::file("gitlab-values.yaml");
    let err = template_error(&base.clone().and("gitlab: {resourceClass: gpu}"));
    assert!(err.contains(message), "{err}");
    assert!(
        err.contains("gitlab.resourceClass: add resourceClasses.gpu with enabled: true"),
        "{err}"
    );
    // A class of values.yaml that is not switched on is not in kiln.toml either.
    let err = template_error(&base.clone().and("gitlab: {resourceClass: eci-gpu}"));
    assert!(
        err.contains("`eci-gpu` is not in [kubernetes.resource_classes]")
            && err.contains("set resourceClasses.eci-gpu.enabled=true"),
        "{err}"
    );
    // Enabled, it is fine.
    template(
        &base.and("gitlab: {resourceClass: eci-gpu}\nresourceClasses: {eci-gpu: {enabled: true}}"),
    );
}

#[test]
fn the_chart_refuses_what_kiln_would_reject_with_a_message() {
    let gitlab = Values::file("gitlab-values.yaml");
    let jenkins = Values::file("jenkins-values.yaml");
    let cases: Vec<(Values, &str)> = vec![
        (Values::default(), "no CI server configured"),
        (
            Values::yaml("gitlab: {url: https://gitlab.example.com}"),
            "the token of GitLab runner 0 is required",
        ),
        (
            gitlab.clone().and("gitlab: {runners: [{token: fake}]}"),
            "gitlab.runnerToken belongs to the single runner",
        ),
        (
            Values::yaml("gitlab: {runners: [{token: fake}]}"),
            "gitlab.runners[0].url is required",
        ),
        (
            Values::yaml("gitlab: {url: gitlab.example.com, runnerToken: fake}"),
            "sources.gitlab[0].url: `gitlab.example.com` is not an http or https URL (gitlab.url)",
        ),
        (
            Values::yaml(
                "gitlab: {url: https://gitlab.example.com, runners: [{token: a}, {url: ftp://x, token: b}]}",
            ),
            "sources.gitlab[1].url: `ftp://x` is not an http or https URL (gitlab.runners[1].url)",
        ),
        (
            Values::yaml(
                "gitlab: {url: https://gitlab.example.com, runners: [{name: a, token: a}, {name: a, token: b}]}",
            ),
            "sources.gitlab[1].name: same name as sources.gitlab[0]; names must be unique (gitlab.runners[1].name)",
        ),
        (
            gitlab
                .clone()
                .and("kubernetes: {default_resource_class: spot}"),
            "kubernetes.default_resource_class: `spot` is not in [kubernetes.resource_classes]",
        ),
        (
            jenkins.clone().and("jenkins: {labels: []}"),
            "sources.jenkins[0].labels: list at least one label kiln serves (jenkins.labels)",
        ),
        (
            jenkins
                .clone()
                .and("jenkins: {labels: [maven, \"docker linux\"]}"),
            "sources.jenkins[0].labels: `docker linux` is not a single Jenkins label",
        ),
        (
            jenkins.clone().and("jenkins: {podTemplates: {node: {}}}"),
            "sources.jenkins[0].pod_templates.node: is not one of `labels` (jenkins.podTemplates.node; jenkins.labels: maven, docker)",
        ),
        (
            jenkins
                .clone()
                .and("jenkins: {podTemplates: {maven: {resource_class: gpu}}}"),
            "sources.jenkins[0].pod_templates.maven.resource_class: `gpu` is not in [kubernetes.resource_classes]",
        ),
        (
            jenkins
                .clone()
                .and("jenkins: {podTemplates: {maven: {containers: [{name: jnlp, image: x}]}}}"),
            "sources.jenkins[0].pod_templates.maven.containers[0].name: must be set and not `jnlp`",
        ),
        (
            jenkins
                .clone()
                .and("jenkins: {podTemplates: {maven: {containers: [{name: maven}]}}}"),
            "sources.jenkins[0].pod_templates.maven.containers[0].image: must be set",
        ),
        (
            jenkins.clone().and("jenkins: {url: jenkins.example.com}"),
            "sources.jenkins[0].url: `jenkins.example.com` is not an http or https URL (jenkins.url)",
        ),
        (
            jenkins.clone().and("jenkins: {token: \"\"}"),
            "jenkins.token is required when jenkins.enabled",
        ),
        (
            Values::yaml(
                "gitlab: {url: https://gitlab.example.com, runners: [{token: a, pollTimeout: 4s}]}",
            ),
            "sources.gitlab[0].poll_timeout: must be at least 5s (GitLab holds long polls for up to 50s) (gitlab.runners[0].pollTimeout is 4s)",
        ),
        (
            jenkins.clone().and("jenkins: {pollInterval: 500ms}"),
            "sources.jenkins[0].poll_interval: must be at least 1s (jenkins.pollInterval is 500ms)",
        ),
        (
            gitlab.clone().and("agent: {trace_interval: 0s}"),
            "agent.trace_interval: must be longer than 0s",
        ),
        (
            gitlab
                .clone()
                .and("kubernetes: {lease_duration: 10s, lease_renew: 10s}"),
            "kubernetes.lease_renew: must be above 0 and below kubernetes.lease_duration",
        ),
        // The schema: typos, types, enums, patterns (Helm's own wording).
        (
            gitlab.clone().and("gitlab: {runerToken: fake}"),
            "additional properties 'runerToken' not allowed",
        ),
        (
            gitlab.clone().and("concurency: 3"),
            "additional properties 'concurency' not allowed",
        ),
        (
            gitlab.clone().and("kubernetes: {defualt_image: alpine}"),
            "additional properties 'defualt_image' not allowed",
        ),
        (
            gitlab
                .clone()
                .and("resourceClasses: {eci-spot: {cpu_requets: \"2\"}}"),
            "additional properties 'cpu_requets' not allowed",
        ),
        (
            gitlab.clone().and("kubernetes: {build: {cpu_request: 2}}"),
            "at '/kubernetes/build/cpu_request': got number, want string",
        ),
        (
            gitlab
                .clone()
                .and("kubernetes: {build: {memory_limit: 2 GB}}"),
            "at '/kubernetes/build/memory_limit': '2 GB' does not match pattern",
        ),
        (
            gitlab
                .clone()
                .and("kubernetes: {pending_timeout: 5 minutes please}"),
            "at '/kubernetes/pending_timeout': '5 minutes please' does not match pattern",
        ),
        (
            gitlab.clone().and("concurrent: 0"),
            "at '/concurrent': minimum",
        ),
        (
            gitlab.clone().and("replicas: -1"),
            "at '/replicas': minimum",
        ),
        (
            gitlab.clone().and("kubernetes: {qps: 0}"),
            "at '/kubernetes/qps': exclusiveMinimum",
        ),
        (
            gitlab.clone().and("kubernetes: {security: strict}"),
            "at '/kubernetes/security': value must be one of",
        ),
        (
            Values::yaml(
                "gitlab: {url: https://gitlab.example.com, runners: [{token: a, systemId: abc}]}",
            ),
            "at '/gitlab/runners/0/systemId': 'abc' does not match pattern",
        ),
        (
            gitlab
                .clone()
                .and("resourceClasses: {\"gpu/large\": {enabled: true}}"),
            "invalid propertyName 'gpu/large'",
        ),
        (
            gitlab.clone().and("buildNamespace: {name: CI_Builds}"),
            "at '/buildNamespace/name': 'CI_Builds' does not match pattern",
        ),
    ];
    for (values, expected) in cases {
        let err = template_error(&values);
        assert!(
            err.contains(expected),
            "values {:?} {:?}: expected {expected:?} in:\n{err}",
            values.files,
            values.inline
        );
    }
}

/// Samples of one field: whether the schema accepts each must match whether kiln does.
fn schema_agrees_with_kiln(field: &str, toml_default: &str, samples: &[&str]) {
    let base = Values::file("gitlab-values.yaml");
    let out = template(&base);
    let env = out.env(None);
    let (section, key) = field.rsplit_once('.').unwrap();
    let line = format!("{key} = \"{toml_default}\"");
    assert!(out.config().contains(&line), "{line} is in kiln.toml");
    for sample in samples {
        let config = out.config().replace(
            &line,
            &format!("{key} = {}", serde_json::to_string(sample).unwrap()),
        );

        let (kiln_ok, kiln_out) = check_config(&config, &env);
        let mut yaml = format!("{key}: {}", serde_json::to_string(sample).unwrap());
        for part in section.rsplit('.') {
            yaml = format!("{part}: {{{yaml}}}");
        }
        let chart = template_for(&base.clone().and(&yaml), KUBE_VERSIONS[1]);
        assert_eq!(
            chart.is_ok(),
            kiln_ok,
            "{field} = {sample:?}: the chart {} it, kiln {} it ({kiln_out}{})",
            if chart.is_ok() { "accepts" } else { "refuses" },
            if kiln_ok { "accepts" } else { "refuses" },
            chart.as_ref().err().map_or("", String::as_str),
        );
    }
}

#[test]
fn schema_and_kiln_agree_on_durations() {
    schema_agrees_with_kiln(
        "kubernetes.pending_timeout",
        "5m",
        &[
            "30s",
            "5m",
            "1h 30m",
            "1h30m",
            "1.5h",
            "90sec",
            "2 min",
            "600000ms",
            "1 hour",
            "10s",
            "10000ms",
            "5",
            "5x",
            "1.h",
            "-5m",
            "five minutes",
            "5m,",
            "1h 30",
            // Well-formed, but under kiln's minimum of 10s.
            "5s",
            "9999ms",
            "0",
        ],
    );
}

#[test]
fn schema_and_kiln_agree_on_quantities() {
    schema_agrees_with_kiln(
        "kubernetes.build.memory_limit",
        "2Gi",
        &[
            "2Gi", "500Mi", "1.5Gi", "2", "1e9", "128M", "0.5", ".5", "+1Gi", "2 GB", "2GB",
            "1.2.3", "-1", "Gi", "abc", "1e", "2gi",
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// The Grafana dashboard
// ---------------------------------------------------------------------------------------------

/// kiln's metrics the dashboard may query, with their type and labels (each stage's
/// `metrics.rs`: `src/coordinator/`, `src/sources/*/`, `src/sources/job_metrics.rs`).
const METRICS: &[(&str, &str, &[&str])] = &[
    ("kiln_job_queue_time_seconds", "histogram", &["runner"]),
    (
        "kiln_jobs_finished_total",
        "counter",
        &["runner", "state", "reason"],
    ),
    ("kiln_jobs_running", "gauge", &[]),
    (
        "kiln_gitlab_job_requests_total",
        "counter",
        &["runner", "result"],
    ),
    ("kiln_runner_paused", "gauge", &["runner"]),
    ("kiln_jenkins_agents", "gauge", &["jenkins", "label"]),
    ("kiln_build_queue_wait_seconds", "histogram", &["source"]),
    (
        "kiln_build_duration_seconds",
        "histogram",
        &["source", "outcome"],
    ),
    (
        "kiln_builds_finished_total",
        "counter",
        &["source", "outcome", "reason"],
    ),
    ("kiln_builds", "gauge", &["source", "phase"]),
    (
        "kiln_build_cost_total",
        "counter",
        &["source", "project", "class"],
    ),
    ("kiln_api_rate_limit_saturation", "gauge", &["api"]),
];

/// Labels Prometheus adds to every scraped series.
const TARGET_LABELS: &[&str] = &[
    "job",
    "instance",
    "namespace",
    "pod",
    "container",
    "service",
];

fn dashboard() -> Json {
    let text = std::fs::read_to_string(chart_dir().join("dashboards/kiln.json")).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("dashboards/kiln.json: {e}"))
}

/// Every PromQL expression of the dashboard with its legend: panel targets and the queries of
/// variables.
fn dashboard_queries(dashboard: &Json) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap().to_owned();
        for target in panel["targets"].as_array().into_iter().flatten() {
            out.push((
                title.clone(),
                target["expr"].as_str().unwrap().to_owned(),
                target["legendFormat"].as_str().unwrap_or("").to_owned(),
            ));
        }
    }
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        if variable["type"] == "query" {
            let name = variable["name"].as_str().unwrap();
            out.push((
                format!("variable {name}"),
                variable["query"]["query"].as_str().unwrap().to_owned(),
                String::new(),
            ));
        }
    }
    out
}

/// The metric `name` refers to (a histogram's `_bucket`, `_sum` and `_count` series included).
fn metric_of(name: &str) -> Option<&'static (&'static str, &'static str, &'static [&'static str])> {
    METRICS.iter().find(|(metric, kind, _)| {
        *metric == name
            || (*kind == "histogram"
                && ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|suffix| name.strip_suffix(suffix) == Some(metric)))
    })
}

/// What is wrong with the dashboard's queries: names that are not kiln's metrics, label
/// matchers, groupings and legends that use labels the metrics do not have.
fn query_problems(dashboard: &Json) -> Vec<String> {
    let identifier = regex::Regex::new(r"[A-Za-z_:][A-Za-z0-9_:]*").unwrap();
    let string = regex::Regex::new(r#""[^"]*""#).unwrap();
    let selector = regex::Regex::new(r"(kiln_[a-z_]+)\{([^}]*)\}").unwrap();
    let matcher = regex::Regex::new(r#"([a-z_]+)\s*(=~|!~|!=|=)\s*"[^"]*""#).unwrap();
    let grouping = regex::Regex::new(r"\b(?:by|without)\s*\(([^)]*)\)").unwrap();
    let legend = regex::Regex::new(r"\{\{\s*([a-z_]+)\s*\}\}").unwrap();
    let mut problems = Vec::new();
    for (title, expr, legend_format) in dashboard_queries(dashboard) {
        let mut labels: BTreeSet<&str> = TARGET_LABELS.iter().copied().collect();
        let mut metrics = 0;
        // Strings (label values) are not names; `$__range` and friends are Grafana's.
        let bare = string.replace_all(&expr, "\"\"");
        for found in identifier.find_iter(&bare) {
            let name = found.as_str();
            let after_dollar = found.start() > 0 && bare.as_bytes()[found.start() - 1] == b'$';
            if after_dollar || !name.starts_with("kiln_") {
                if !after_dollar && name.contains('_') && !PROMQL_WORDS.contains(&name) {
                    problems.push(format!("{title}: `{name}` is not a kiln metric: {expr}"));
                }
                continue;
            }
            let Some((_, kind, metric_labels)) = metric_of(name) else {
                problems.push(format!("{title}: `{name}` is not a kiln metric: {expr}"));
                continue;
            };
            metrics += 1;
            labels.extend(metric_labels.iter());
            if *kind == "histogram" {
                labels.insert("le");
            }
        }
        if metrics == 0 {
            problems.push(format!("{title}: no kiln metric in {expr}"));
        }
        for captures in selector.captures_iter(&expr) {
            let Some((_, _, metric_labels)) = metric_of(&captures[1]) else {
                continue;
            };
            for m in matcher.captures_iter(&captures[2]) {
                if !metric_labels.contains(&&m[1]) && !TARGET_LABELS.contains(&&m[1]) {
                    problems.push(format!(
                        "{title}: {} has no label `{}`",
                        &captures[1], &m[1]
                    ));
                }
            }
        }
        let mut grouped = BTreeSet::new();
        for captures in grouping.captures_iter(&expr) {
            for label in captures[1].split(',').map(str::trim) {
                grouped.insert(label.to_owned());
                if !labels.contains(label) {
                    problems.push(format!("{title}: no label `{label}` to group by in {expr}"));
                }
            }
        }
        for captures in legend.captures_iter(&legend_format) {
            if !grouped.contains(&captures[1]) {
                problems.push(format!(
                    "{title}: legend {{{{{}}}}} is not a grouping label of {expr}",
                    &captures[1]
                ));
            }
        }
    }
    problems
}

/// PromQL and Grafana words with an underscore.
const PROMQL_WORDS: &[&str] = &["histogram_quantile", "label_values", "label_replace"];

#[test]
fn dashboard_has_the_panels_and_queries_only_kiln_metrics() {
    let dashboard = dashboard();
    assert_eq!(dashboard["uid"], "kiln");
    let titles: BTreeSet<&str> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    for required in [
        "Queue wait",
        "Build duration",
        "Outcomes by failure reason",
        "Builds by phase",
        "Cost by project",
        "API rate-limit saturation",
    ] {
        assert!(
            titles.contains(required),
            "no panel {required:?}: {titles:?}"
        );
    }
    // Panel ids are unique and every panel sits on the 24-column grid.
    let mut ids = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        assert!(ids.insert(panel["id"].as_i64().unwrap()), "{panel}");
        let grid = &panel["gridPos"];
        assert!(
            grid["x"].as_i64().unwrap() + grid["w"].as_i64().unwrap() <= 24,
            "{panel}"
        );
    }
    let problems = query_problems(&dashboard);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // Every build-level metric is on it.
    let queries: String = dashboard_queries(&dashboard)
        .into_iter()
        .map(|(_, expr, _)| expr)
        .collect();
    for metric in [
        "kiln_build_queue_wait_seconds_bucket",
        "kiln_build_duration_seconds_bucket",
        "kiln_builds_finished_total",
        "kiln_builds{",
        "kiln_build_cost_total",
        "kiln_api_rate_limit_saturation",
    ] {
        assert!(queries.contains(metric), "{metric} is not on the dashboard");
    }
}

#[test]
fn the_dashboard_check_catches_unknown_metrics_and_labels() {
    let mut dashboard = dashboard();
    for (expr, legend, expected) in [
        (
            "sum(kiln_build_pods)",
            "",
            "`kiln_build_pods` is not a kiln metric",
        ),
        (
            "sum(rate(kiln_builds_bucket[5m]))",
            "",
            "`kiln_builds_bucket` is not a kiln metric",
        ),
        (
            "sum(node_cpu_seconds_total)",
            "",
            "`node_cpu_seconds_total` is not a kiln metric",
        ),
        (
            "sum(kiln_builds{project=\"x\"})",
            "",
            "kiln_builds has no label `project`",
        ),
        (
            "sum by (runner) (kiln_builds)",
            "",
            "no label `runner` to group by",
        ),
        (
            "sum by (phase) (kiln_builds)",
            "{{source}}",
            "legend {{source}} is not a grouping label",
        ),
    ] {
        let target = &mut dashboard["panels"][1]["targets"][0];
        target["expr"] = expr.into();
        target["legendFormat"] = legend.into();
        let problems = query_problems(&dashboard).join("\n");
        assert!(problems.contains(expected), "{expr}: {problems}");
    }
}

/// `cache.enabled`: `[cache]` in the ConfigMap without the key, the key in the Secret and from
/// there in the coordinator's environment only; builds reach the coordinator at its Service
/// (also through the NetworkPolicy), and kiln accepts the rendered config.
#[test]
fn the_cache_key_goes_to_the_secret_and_builds_get_the_services_address() {
    let values = Values::file("gitlab-values.yaml").and(
        "cache:\n  enabled: true\n  s3:\n    serverAddress: oss-cn-hangzhou.aliyuncs.com\n    bucketName: ci-cache\n    bucketLocation: oss-cn-hangzhou\n    accessKey: fake-access-key\n    secretKey: fake-cache-secret-key-0123456789\nnetworkPolicy:\n  enabled: true\n",
    );
    let out = check_case(&values);
    let config = out.toml();
    let cache = &config["cache"];
    assert_eq!(cache["type"].as_str(), Some("s3"));
    assert_eq!(
        cache["coordinator_url"].as_str(),
        Some(format!("http://{RELEASE}.ci.svc:9252").as_str())
    );
    assert_eq!(cache["s3"]["bucket_name"].as_str(), Some("ci-cache"));
    assert!(cache["s3"].get("secret_key").is_none());
    assert!(!out.config().contains("fake-cache-secret-key"));
    assert_eq!(
        out.object("Secret")["stringData"]["cache-secret-key"],
        "fake-cache-secret-key-0123456789"
    );
    assert!(out.env_names().contains(&"KILN_CACHE__S3__SECRET_KEY"));
    let policy = out.object("NetworkPolicy");
    assert!(
        policy["spec"]["ingress"][0]["from"]
            .as_array()
            .unwrap()
            .iter()
            .any(
                |peer| peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                    == "ci-builds"
            ),
        "{policy}"
    );
    let (ok, output) = check_config(&out.config(), &out.env(None));
    assert!(ok, "{output}");
}
