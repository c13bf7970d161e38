//! The pipeline templates in `pipelines/` and the example configs in `examples/`: what users
//! copy must parse the way GitLab, Jenkins and GitHub will read it, and must call `kiln deploy`
//! with flags kiln accepts.

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln::pipeline::{JobWhen, Pipeline};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The pipeline as GitLab creates it for a push to `branch` of a project whose default
/// branch is `main`.
fn load(file: &str, branch: &str) -> Pipeline {
    let vars = [
        ("CI_COMMIT_BRANCH", branch),
        ("CI_DEFAULT_BRANCH", "main"),
        ("CI_PIPELINE_SOURCE", "push"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()));
    kiln::pipeline::load(&repo(file), &vars).unwrap_or_else(|e| panic!("{file}: {e}"))
}

fn job_names(pipeline: &Pipeline) -> Vec<(&str, &str, JobWhen)> {
    pipeline
        .jobs
        .iter()
        .map(|j| (j.name.as_str(), j.stage.as_str(), j.when))
        .collect()
}

fn script(pipeline: &Pipeline, job: &str) -> String {
    pipeline.job(job).unwrap().script.join("\n")
}

/// A kubeconfig naming a cluster nobody listens on: a Knative dry run reads it but sends nothing.
const KUBECONFIG: &str = "apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: 'https://127.0.0.1:1'}}]
users: [{name: u, user: {token: fake}}]
contexts: [{name: c, context: {cluster: c, user: u}}]
current-context: c
";

/// Runs `kiln deploy --dry-run …` with the words of a pipeline's deploy command after the
/// shell's substitutions (`vars`, replaced as written): clap is the judge of every flag, and a
/// dry run sends nothing. `files` are created in the working directory first.
fn dry_run(command: &str, vars: &[(&str, &str)], files: &[&str]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    for file in files {
        let path = dir.path().join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"PK\x03\x04 not really a jar").unwrap();
    }
    std::fs::write(dir.path().join("kubeconfig"), KUBECONFIG).unwrap();
    let mut command = command.to_owned();
    for (from, to) in vars {
        command = command.replace(from, to);
    }
    assert!(
        !command.contains('$'),
        "unsubstituted variable in {command}"
    );
    let mut words = command.split_whitespace().map(|w| w.trim_matches('"'));
    assert_eq!(words.next(), Some("kiln"), "{command}");
    assert_eq!(words.next(), Some("deploy"), "{command}");
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .current_dir(dir.path())
        .env_clear()
        .env("KUBECONFIG", dir.path().join("kubeconfig"))
        .arg("deploy")
        .arg("--dry-run")
        .args(words)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn java_jar_pipeline_builds_tests_and_deploys_the_jar_on_the_default_branch() {
    let main = load("pipelines/java-jar-to-sae.gitlab-ci.yml", "main");
    assert_eq!(main.stages, [".pre", "build", "test", "deploy", ".post"]);
    assert_eq!(
        job_names(&main),
        [
            ("build", "build", JobWhen::OnSuccess),
            ("test", "test", JobWhen::OnSuccess),
            ("deploy", "deploy", JobWhen::OnSuccess)
        ]
    );
    let build = main.job("build").unwrap();
    assert_eq!(
        build.image.as_ref().unwrap().name,
        "maven:3.9-eclipse-temurin-21"
    );
    assert_eq!(build.artifacts.as_ref().unwrap().paths, ["target/app.jar"]);
    assert!(
        build
            .variables
            .contains(&("KILN_RESOURCE_CLASS".into(), "eci-spot".into()))
    );
    let deploy = main.job("deploy").unwrap();
    assert_eq!(
        deploy.image.as_ref().unwrap().name,
        "ghcr.io/kiln-ci/kiln:0.1.0"
    );
    let needs: Vec<&str> = deploy
        .needs
        .as_ref()
        .unwrap()
        .iter()
        .map(|n| n.job.as_str())
        .collect();
    assert_eq!(needs, ["build", "test"]);

    // The deploy command is one kiln accepts, and deploys the jar the build job keeps.
    let command = script(&main, "deploy");
    assert!(command.contains("--jar target/app.jar"), "{command}");
    let (ok, out) = dry_run(
        &command,
        &[
            ("$SAE_REGION", "cn-hangzhou"),
            ("$SAE_APP_ID", "app-1"),
            ("$OSS_BUCKET", "acme-builds"),
        ],
        &["target/app.jar"],
    );
    assert!(ok, "{command}\n{out}");
    assert!(out.contains("deployApplication"), "{out}");

    // Feature branches build and test but never deploy.
    let feature = load("pipelines/java-jar-to-sae.gitlab-ci.yml", "feature/x");
    assert!(feature.job("build").is_some());
    assert!(
        feature.job("deploy").is_none(),
        "no rule matches: GitLab leaves it out"
    );
}

#[test]
fn the_example_java_service_builds_the_jar_the_pipelines_deploy() {
    let pom = std::fs::read_to_string(repo("examples/java-service/pom.xml")).unwrap();
    assert!(pom.contains("<finalName>app</finalName>"), "target/app.jar");
    assert!(pom.contains("<mainClass>com.example.hello.App</mainClass>"));
    assert!(repo("examples/java-service/src/main/java/com/example/hello/App.java").is_file());
    let dockerfile = std::fs::read_to_string(repo("examples/java-service/Dockerfile")).unwrap();
    assert!(dockerfile.contains("target/app.jar"));
}

#[test]
fn image_to_sae_pipeline_builds_with_kaniko_and_deploys_the_image() {
    let main = load("pipelines/image-to-sae.gitlab-ci.yml", "main");
    assert_eq!(
        job_names(&main),
        [
            ("build-image", "build", JobWhen::OnSuccess),
            ("deploy", "deploy", JobWhen::OnSuccess)
        ]
    );
    let build = main.job("build-image").unwrap();
    assert!(
        build
            .image
            .as_ref()
            .unwrap()
            .name
            .contains("kaniko-project/executor")
    );
    assert_eq!(build.image.as_ref().unwrap().entrypoint, [""]);
    assert!(script(&main, "build-image").contains("--destination \"$IMAGE\""));
    let command = script(&main, "deploy");
    assert!(command.contains("--image \"$IMAGE\""), "{command}");
    let (ok, out) = dry_run(
        &command,
        &[
            ("$SAE_REGION", "cn-hangzhou"),
            ("$SAE_APP_ID", "app-1"),
            (
                "$IMAGE",
                "registry.cn-hangzhou.aliyuncs.com/acme/app:abc123",
            ),
        ],
        &[],
    );
    assert!(ok, "{command}\n{out}");
}

#[test]
fn image_to_knative_pipeline_canaries_then_promotes_by_hand() {
    let main = load("pipelines/image-to-knative.gitlab-ci.yml", "main");
    assert_eq!(
        job_names(&main),
        [
            ("build-image", "build", JobWhen::OnSuccess),
            ("canary", "deploy", JobWhen::OnSuccess),
            ("promote", "deploy", JobWhen::Manual)
        ]
    );
    let build = main.job("build-image").unwrap();
    assert_eq!(build.artifacts.as_ref().unwrap().paths, ["image.digest"]);
    let canary = script(&main, "canary");
    assert!(canary.contains("kiln deploy knative") && canary.contains("--canary 10"));
    assert!(script(&main, "promote").contains("--promote"));
    let vars = [
        ("$KNATIVE_SERVICE", "orders"),
        ("$KNATIVE_NAMESPACE", "apps"),
        ("$REGISTRY_IMAGE", "registry.example.com/acme/orders"),
        ("$(cat image.digest)", "sha256:0123456789abcdef"),
    ];
    for job in ["canary", "promote"] {
        let (ok, out) = dry_run(&script(&main, job), &vars, &[]);
        assert!(ok, "{job}: {out}");
        assert!(out.contains("services/orders"), "{out}");
    }
    let (_, out) = dry_run(&script(&main, "canary"), &vars, &[]);
    assert!(
        out.contains("registry.example.com/acme/orders@sha256:0123456789abcdef"),
        "{out}"
    );
}

#[test]
fn the_jenkinsfile_runs_on_a_kiln_label_and_deploys_with_kiln() {
    let text = std::fs::read_to_string(repo("pipelines/Jenkinsfile")).unwrap();
    let label = regex::Regex::new(r"agent\s*\{\s*label\s+'([a-z0-9-]+)'\s*\}")
        .unwrap()
        .captures(&text)
        .expect("an agent label")[1]
        .to_owned();
    assert_eq!(label, "maven");
    // The label is one the example Jenkins config serves.
    let jenkins: toml::Table = std::fs::read_to_string(repo("examples/jenkins.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let labels = jenkins["sources"]["jenkins"][0]["labels"]
        .as_array()
        .unwrap();
    assert!(labels.iter().any(|l| l.as_str() == Some(&label)));
    assert!(text.contains("kiln deploy sae"));
    assert!(text.contains("--jar target/app.jar"));
    assert_eq!(text.matches('{').count(), text.matches('}').count());
}

#[test]
fn the_github_workflow_is_valid_yaml_with_runner_labels() {
    let text = std::fs::read_to_string(repo("pipelines/github/deploy.yml")).unwrap();
    let workflow: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    let jobs = workflow["jobs"].as_mapping().unwrap();
    assert_eq!(jobs.len(), 2);
    for (name, job) in jobs {
        let labels: Vec<&str> = job["runs-on"]
            .as_sequence()
            .unwrap_or_else(|| panic!("{name:?}: runs-on"))
            .iter()
            .map(|l| l.as_str().unwrap())
            .collect();
        assert!(
            labels.contains(&"self-hosted") && labels.contains(&"kiln"),
            "{labels:?}"
        );
        assert!(job["steps"].as_sequence().is_some_and(|s| !s.is_empty()));
    }
    assert_eq!(jobs["deploy"]["needs"].as_str(), Some("build"));
    let deploy = jobs["deploy"]["steps"]
        .as_sequence()
        .unwrap()
        .iter()
        .find_map(|s| s["run"].as_str())
        .unwrap();
    let (ok, out) = dry_run(deploy, &[("$SAE_APP_ID", "app-1")], &["target/app.jar"]);
    assert!(ok, "{deploy}\n{out}");
}

#[test]
fn the_github_image_workflow_builds_on_a_class_runner_and_deploys_the_image() {
    let text = std::fs::read_to_string(repo("pipelines/github/image-to-sae.yml")).unwrap();
    let workflow: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    let jobs = workflow["jobs"].as_mapping().unwrap();
    let labels = |job: &str| -> Vec<String> {
        jobs[job]["runs-on"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|l| l.as_str().unwrap().to_owned())
            .collect()
    };
    // The build asks for a resource class by label, as docs/github.md says kiln reads it.
    assert_eq!(
        labels("build-image"),
        ["self-hosted", "linux", "kiln", "kiln-class=image-build"]
    );
    assert_eq!(labels("deploy"), ["self-hosted", "linux", "kiln"]);
    assert_eq!(jobs["deploy"]["needs"].as_str(), Some("build-image"));
    let build = jobs["build-image"]["steps"][1]["run"].as_str().unwrap();
    assert!(build.contains("buildah push"), "{build}");
    assert!(
        build.contains("--password-stdin"),
        "the registry password stays off the command line"
    );
    let image = workflow["env"]["IMAGE"].as_str().unwrap();
    assert!(build.contains("\"$IMAGE\""));
    let deploy = jobs["deploy"]["steps"][0]["run"].as_str().unwrap();
    assert!(deploy.contains("--image \"$IMAGE\""), "{deploy}");
    let (ok, out) = dry_run(
        deploy,
        &[
            ("$SAE_APP_ID", "app-1"),
            ("$IMAGE", &image.replace("${{ github.sha }}", "abc123")),
        ],
        &[],
    );
    assert!(ok, "{deploy}\n{out}");
}

/// `kiln check-config FILE` with a clean environment: (success, output).
fn check_config(file: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .env_clear()
        .arg("check-config")
        .arg(file)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn every_example_config_passes_check_config() {
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(repo("examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let (ok, out) = check_config(&path);
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(ok, "{name}: {out}");
        checked.push(name);
    }
    checked.sort();
    for expected in ["ask-eci-spot.toml", "jenkins.toml", "laptop.toml"] {
        assert!(checked.iter().any(|c| c == expected), "{checked:?}");
    }
}
