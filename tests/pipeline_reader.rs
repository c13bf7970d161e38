//! The `.gitlab-ci.yml` reader on realistic pipelines: each fixture's job list is checked
//! against what GitLab creates from it (names, stages, order, merged scripts and variables).

use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln::pipeline::{
    ArtifactsWhen, CacheKey, JobWhen, Need, Pipeline, PipelineError, PipelineJob, load, parse_str,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pipelines")
}

fn vars(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn fixture(name: &str, v: &[(&str, &str)]) -> Pipeline {
    load(&fixtures().join(name), &vars(v)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// `(name, stage)` of every job, in pipeline order.
fn order(p: &Pipeline) -> Vec<(&str, &str)> {
    p.jobs
        .iter()
        .map(|j| (j.name.as_str(), j.stage.as_str()))
        .collect()
}

fn job<'a>(p: &'a Pipeline, name: &str) -> &'a PipelineJob {
    p.job(name)
        .unwrap_or_else(|| panic!("no job `{name}` in {:?}", order(p)))
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn warning_keys(p: &Pipeline) -> Vec<(Option<&str>, &str)> {
    p.warnings
        .iter()
        .map(|w| (w.job.as_deref(), w.key.as_str()))
        .collect()
}

fn need(job: &str, artifacts: bool) -> Need {
    Need {
        job: job.into(),
        artifacts,
    }
}

const MAIN: &[(&str, &str)] = &[
    ("CI_COMMIT_BRANCH", "main"),
    ("CI_DEFAULT_BRANCH", "main"),
    ("CI_PIPELINE_SOURCE", "push"),
];
const FEATURE: &[(&str, &str)] = &[
    ("CI_COMMIT_BRANCH", "feature/x"),
    ("CI_DEFAULT_BRANCH", "main"),
    ("CI_PIPELINE_SOURCE", "push"),
];

#[test]
fn maven_pipeline() {
    let p = fixture("maven.gitlab-ci.yml", MAIN);
    assert_eq!(
        p.stages,
        [".pre", "build", "test", "package", "deploy", ".post"]
    );
    assert_eq!(
        order(&p),
        [
            ("compile", "build"),
            ("unit-test", "test"),
            ("integration-test", "test"),
            ("package", "package"),
            ("deploy", "deploy")
        ]
    );
    let compile = job(&p, "compile");
    assert_eq!(
        compile.image.as_ref().unwrap().name,
        "maven:3.9-eclipse-temurin-21"
    );
    assert_eq!(compile.script, ["mvn $MAVEN_CLI_OPTS compile"]);
    assert_eq!(
        compile.variables,
        vars(&[
            (
                "MAVEN_OPTS",
                "-Dhttps.protocols=TLSv1.2 -Dmaven.repo.local=$CI_PROJECT_DIR/.m2/repository"
            ),
            (
                "MAVEN_CLI_OPTS",
                "--batch-mode --errors --fail-at-end --show-version"
            ),
        ])
    );
    assert_eq!(
        (compile.when, compile.allow_failure, compile.needs.clone()),
        (JobWhen::OnSuccess, false, None)
    );

    let it = job(&p, "integration-test");
    assert!(it.allow_failure);
    assert_eq!(it.timeout, Some(Duration::from_secs(30 * 60)));
    assert_eq!(
        (
            it.services[0].name.as_str(),
            it.services[0].alias.as_deref()
        ),
        ("postgres:16", Some("db"))
    );
    assert_eq!(it.variables.len(), 5);
    assert_eq!(
        it.variables[4],
        (
            "SPRING_DATASOURCE_URL".into(),
            "jdbc:postgresql://db:5432/app".into()
        )
    );

    let unit = job(&p, "unit-test").artifacts.clone().unwrap();
    assert_eq!((unit.when, unit.paths.len()), (ArtifactsWhen::Always, 0));

    let package = job(&p, "package").artifacts.clone().unwrap();
    assert_eq!(package.paths, ["target/*.jar"]);
    assert_eq!(
        package.name.as_deref(),
        Some("$CI_PROJECT_NAME-$CI_COMMIT_SHORT_SHA")
    );
    assert_eq!(package.expire_in.as_deref(), Some("1 week"));

    let deploy = job(&p, "deploy");
    assert_eq!(deploy.image.as_ref().unwrap().name, "alpine:3.20");
    assert_eq!(deploy.dependencies, Some(strings(&["package"])));
    assert_eq!(
        (deploy.when, deploy.allow_failure),
        (JobWhen::Manual, false)
    );

    // The top-level `cache:` is every job's (issue #26), not a warning.
    for name in ["unit-test", "package"] {
        let cache = &job(&p, name).cache;
        assert_eq!(cache.len(), 1, "{name}: {cache:?}");
        assert_eq!(cache[0].key, CacheKey::Literal("maven".into()));
        assert_eq!(cache[0].paths, [".m2/repository"]);
    }
    assert_eq!(
        warning_keys(&p),
        [
            (Some("unit-test"), "artifacts:reports"),
            (Some("deploy"), "environment")
        ]
    );
    assert!(p.warnings[0].message.contains("junit"), "{}", p.warnings[0]);

    let feature = fixture("maven.gitlab-ci.yml", FEATURE);
    assert!(
        feature.job("deploy").is_none(),
        "no rule matches off the default branch"
    );
    assert_eq!(feature.jobs.len(), 4);
}

#[test]
fn node_pipeline() {
    let p = fixture("node.gitlab-ci.yml", MAIN);
    assert_eq!(
        order(&p),
        [
            ("lint", "check"),
            ("test 1/3", "test"),
            ("test 2/3", "test"),
            ("test 3/3", "test"),
            ("e2e", "test"),
            ("build", "build"),
            ("pages", "deploy"),
        ]
    );
    let lint = job(&p, "lint");
    assert_eq!(lint.before_script, ["npm ci --cache .npm --prefer-offline"]);
    assert_eq!(lint.script, ["npm run lint", "npm run typecheck"]);
    assert_eq!(lint.image.as_ref().unwrap().name, "node:20-alpine");
    // `default: cache:` with `key:files` is every job's (issue #26), not a warning.
    assert_eq!(
        lint.cache[0].key,
        CacheKey::Files {
            files: vec!["package-lock.json".into()],
            prefix: None
        }
    );
    assert_eq!(lint.cache[0].paths, [".npm/"]);

    for (i, name) in ["test 1/3", "test 2/3", "test 3/3"].iter().enumerate() {
        let test = job(&p, name);
        assert_eq!(test.parallel_index, Some((i as u32 + 1, 3)));
        assert_eq!(
            test.script,
            ["npx jest --ci --shard=$CI_NODE_INDEX/$CI_NODE_TOTAL"]
        );
        assert_eq!(test.artifacts.as_ref().unwrap().paths, ["coverage/"]);
    }

    let e2e = job(&p, "e2e");
    assert_eq!(e2e.script, ["npx playwright test"]);
    assert!(e2e.allow_failure);
    assert_eq!(
        e2e.image.as_ref().unwrap().name,
        "mcr.microsoft.com/playwright:v1.45.0-jammy"
    );

    let build = job(&p, "build");
    assert_eq!(
        build.variables,
        vars(&[("NODE_ENV", "production"), ("npm_config_loglevel", "warn")])
    );
    assert_eq!(build.artifacts.as_ref().unwrap().exclude, ["dist/**/*.map"]);

    let pages = job(&p, "pages");
    assert!(
        pages.before_script.is_empty(),
        "`before_script: []` overrides the default"
    );
    assert_eq!(pages.script, ["mv dist public"]);

    assert_eq!(
        warning_keys(&p),
        [
            (None, "default:interruptible"),
            (Some("test"), "artifacts:reports"),
            (Some("e2e"), "allow_failure:exit_codes"),
            (Some("e2e"), "retry"),
            (Some("pages"), "pages"),
        ]
    );
    assert!(
        fixture("node.gitlab-ci.yml", FEATURE)
            .job("pages")
            .is_none()
    );
}

#[test]
fn docker_build_pipeline() {
    let p = fixture("docker.gitlab-ci.yml", MAIN);
    assert_eq!(
        order(&p),
        [
            ("build", "build"),
            ("scan", "test"),
            ("push-latest", "deploy")
        ]
    );
    let login = r#"echo "$CI_REGISTRY_PASSWORD" | docker login -u "$CI_REGISTRY_USER" --password-stdin $CI_REGISTRY"#;
    let build = job(&p, "build");
    assert_eq!(build.image.as_ref().unwrap().name, "docker:27");
    assert_eq!(
        build
            .services
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>(),
        ["docker:27-dind"]
    );
    assert_eq!(build.before_script, [login]);
    assert_eq!(
        build.variables,
        vars(&[
            ("DOCKER_TLS_CERTDIR", "/certs"),
            ("IMAGE", "$CI_REGISTRY_IMAGE:$CI_COMMIT_SHORT_SHA")
        ])
    );

    let scan = job(&p, "scan");
    let image = scan.image.as_ref().unwrap();
    assert_eq!(
        (image.name.as_str(), image.entrypoint.clone()),
        ("aquasec/trivy:0.53.0", strings(&[""]))
    );
    assert!(scan.services.is_empty() && scan.before_script.is_empty());
    assert!(scan.allow_failure);
    assert_eq!(
        scan.variables.last().unwrap(),
        &("TRIVY_NO_PROGRESS".to_string(), "true".to_string())
    );

    let push = job(&p, "push-latest");
    assert_eq!(push.script.len(), 3);
    assert_eq!(push.variables[2], ("GIT_STRATEGY".into(), "none".into()));
    assert_eq!(warning_keys(&p), [(Some("build"), "tags")]);

    let tag = fixture(
        "docker.gitlab-ci.yml",
        &[("CI_COMMIT_TAG", "v1.4.0"), ("CI_DEFAULT_BRANCH", "main")],
    );
    assert_eq!(
        order(&tag),
        [("build", "build"), ("scan", "test"), ("push-tag", "deploy")]
    );
    let not_semver = fixture(
        "docker.gitlab-ci.yml",
        &[("CI_COMMIT_TAG", "nightly"), ("CI_DEFAULT_BRANCH", "main")],
    );
    assert_eq!(not_semver.jobs.len(), 2);
}

#[test]
fn monorepo_with_needs() {
    let text = std::fs::read_to_string(fixtures().join("monorepo.gitlab-ci.yml")).unwrap();
    let repo = tempfile::tempdir().unwrap();
    let p = parse_str(&text, "monorepo.gitlab-ci.yml", repo.path(), &vars(MAIN)).unwrap();
    assert_eq!(
        order(&p),
        [
            ("frontend:build", "build"),
            ("backend:build", "build"),
            ("lint", "test"),
            ("frontend:test", "test"),
            ("backend:test", "test"),
            ("backend:integration", "test"),
            ("deploy", "deploy"),
        ]
    );
    assert_eq!(job(&p, "lint").needs, Some(vec![]));
    assert_eq!(
        job(&p, "frontend:test").needs,
        Some(vec![need("frontend:build", true)])
    );
    assert_eq!(
        job(&p, "backend:test").needs,
        Some(vec![need("backend:build", false)])
    );
    assert_eq!(
        job(&p, "backend:integration").needs,
        Some(vec![
            need("backend:build", true),
            need("backend:test", true)
        ])
    );
    let deploy = job(&p, "deploy");
    assert_eq!(
        deploy.needs,
        Some(vec![
            need("frontend:build", true),
            need("backend:build", true),
            need("frontend:test", false),
            need("backend:integration", false),
        ]),
        "the optional need on `docs` (absent: no mkdocs.yml) is dropped"
    );
    assert_eq!(
        (deploy.when, deploy.allow_failure),
        (JobWhen::OnSuccess, false)
    );
    assert_eq!(
        warning_keys(&p),
        [(Some("frontend:build"), "rules:changes")]
    );

    std::fs::write(repo.path().join("mkdocs.yml"), "site_name: x\n").unwrap();
    let feature = parse_str(&text, "monorepo.gitlab-ci.yml", repo.path(), &vars(FEATURE)).unwrap();
    assert_eq!(
        job(&feature, "docs").stage,
        "build",
        "rules:exists finds mkdocs.yml"
    );
    let deploy = job(&feature, "deploy");
    assert_eq!((deploy.when, deploy.allow_failure), (JobWhen::Manual, true));
    assert!(deploy.needs.as_ref().unwrap().contains(&need("docs", true)));

    let tag_only = parse_str(
        &text,
        "monorepo.gitlab-ci.yml",
        repo.path(),
        &vars(&[("CI_COMMIT_TAG", "v1")]),
    )
    .unwrap();
    assert_eq!(
        tag_only.no_pipeline.as_deref(),
        Some("none of the 2 workflow:rules matches"),
        "a tag pipeline matches neither workflow rule"
    );
    assert_eq!(p.no_pipeline, None);
}

#[test]
fn extends_anchors_and_references() {
    let p = fixture("templates.gitlab-ci.yml", MAIN);
    assert_eq!(
        order(&p),
        [
            ("build", "build"),
            ("unit", "test"),
            ("db-tests", "test"),
            ("release", "release")
        ]
    );
    let pip = [
        "python -m venv .venv",
        ". .venv/bin/activate",
        "pip install -r requirements.txt",
    ];

    let build = job(&p, "build");
    assert_eq!(build.image.as_ref().unwrap().name, "python:3.12-slim");
    assert_eq!(build.before_script, pip);
    assert_eq!(build.script, ["python -m build"]);
    assert_eq!(build.after_script, ["echo done"]);
    assert_eq!(
        build.variables,
        vars(&[
            ("APP", "shop"),
            ("LOG_LEVEL", "info"),
            ("PIP_CACHE_DIR", ".cache/pip")
        ])
    );

    let unit = job(&p, "unit");
    assert_eq!(unit.script, ["pytest -q"]);
    assert_eq!(unit.before_script, pip);
    assert_eq!(
        unit.variables,
        vars(&[
            ("APP", "shop"),
            ("LOG_LEVEL", "info"),
            ("PIP_CACHE_DIR", ".cache/pip"),
            ("PYTEST_ADDOPTS", r#"-m "not db""#)
        ])
    );
    assert_eq!(unit.artifacts.as_ref().unwrap().when, ArtifactsWhen::Always);
    assert!(unit.services.is_empty());

    let db = job(&p, "db-tests");
    assert_eq!(db.services[0].name, "postgres:16");
    assert_eq!(
        db.variables,
        vars(&[
            ("APP", "shop"),
            ("LOG_LEVEL", "debug"),
            ("PIP_CACHE_DIR", ".cache/pip"),
            ("DATABASE_URL", "postgres://postgres@postgres/test"),
            ("PYTEST_ADDOPTS", "-m db"),
        ])
    );
    let artifacts = db.artifacts.as_ref().unwrap();
    assert_eq!(
        artifacts.paths,
        ["report.xml", "db.log"],
        "lists are replaced, not appended"
    );
    assert_eq!(artifacts.when, ArtifactsWhen::Always, "maps are merged");

    let release = job(&p, "release");
    assert_eq!(release.image.as_ref().unwrap().name, "python:3.12-slim");
    assert_eq!(
        release.before_script,
        [&pip[..], &["pip install twine"]].concat()
    );
    assert_eq!(
        release.script,
        ["twine upload dist/*", r#"./notify.sh "$CI_JOB_NAME""#]
    );
    assert_eq!(
        release.variables,
        vars(&[
            ("APP", "shop"),
            ("LOG_LEVEL", "info"),
            ("TWINE_USERNAME", "__token__")
        ])
    );
    assert!(release.after_script.is_empty());

    let interruptible: Vec<_> = p
        .warnings
        .iter()
        .filter(|w| w.key == "interruptible")
        .filter_map(|w| w.job.as_deref())
        .collect();
    assert_eq!(interruptible, ["build", "unit", "db-tests", "release"]);
}

#[test]
fn matrix_and_parallel_jobs() {
    let p = fixture("matrix.gitlab-ci.yml", MAIN);
    let x86 = "x86_64-unknown-linux-gnu";
    let arm = "aarch64-unknown-linux-gnu";
    assert_eq!(
        order(&p),
        [
            ("build: [x86_64-unknown-linux-gnu, debug]", "build"),
            ("build: [x86_64-unknown-linux-gnu, release]", "build"),
            ("build: [aarch64-unknown-linux-gnu, debug]", "build"),
            ("build: [aarch64-unknown-linux-gnu, release]", "build"),
            ("build: [wasm32-unknown-unknown, release]", "build"),
            ("test: [x86_64-unknown-linux-gnu]", "test"),
            ("test: [aarch64-unknown-linux-gnu]", "test"),
            ("shards 1/2", "test"),
            ("shards 2/2", "test"),
        ]
    );
    let wasm = job(&p, "build: [wasm32-unknown-unknown, release]");
    assert_eq!(wasm.parallel_index, Some((5, 5)));
    assert_eq!(
        wasm.variables,
        vars(&[
            ("RUST_BACKTRACE", "1"),
            ("TARGET", "wasm32-unknown-unknown"),
            ("PROFILE", "release")
        ])
    );
    assert_eq!(wasm.artifacts.as_ref().unwrap().paths, ["target/$TARGET/"]);

    let test_x86 = job(&p, &format!("test: [{x86}]"));
    let test_arm = job(&p, &format!("test: [{arm}]"));
    assert!(
        !test_x86.allow_failure && test_arm.allow_failure,
        "rules see the matrix variables"
    );
    assert_eq!(
        test_arm.needs,
        Some(vec![need(&format!("build: [{x86}, debug]"), true)])
    );
    assert_eq!(
        test_arm.variables,
        vars(&[("RUST_BACKTRACE", "1"), ("TARGET", arm)])
    );
    assert_eq!(job(&p, "shards 2/2").parallel_index, Some((2, 2)));

    let tagged = fixture("matrix.gitlab-ci.yml", &[("CI_COMMIT_TAG", "v2.0.0")]);
    let publish = job(&tagged, "publish");
    assert_eq!(
        publish.needs.as_ref().unwrap().len(),
        5,
        "a base name needs every instance"
    );
    assert_eq!(
        publish.needs.as_ref().unwrap()[4],
        need("build: [wasm32-unknown-unknown, release]", true)
    );
}

#[test]
fn local_includes_merge_before_the_main_file() {
    let p = fixture("includes/.gitlab-ci.yml", MAIN);
    assert_eq!(
        order(&p),
        [("build", "build"), ("test", "test"), ("release", "deploy")]
    );
    let test = job(&p, "test");
    assert_eq!(test.script, ["make test EXTRA=$EXTRA"]);
    assert_eq!(
        test.variables,
        vars(&[
            ("REGISTRY", "registry.example.com"),
            ("CC", "gcc"),
            ("EXTRA", "from-main"),
            ("VERBOSE", "1")
        ])
    );
    assert_eq!(test.image.as_ref().unwrap().name, "gcc:14");
    assert_eq!(test.before_script, ["make deps"]);
    let release = job(&p, "release");
    assert_eq!(release.after_script, ["make clean"]);
    assert_eq!(
        release.variables.last().unwrap(),
        &("TEMPLATE".to_string(), "yes".to_string())
    );
    assert_eq!(job(&p, "build").artifacts.as_ref().unwrap().paths, ["bin/"]);
    assert_eq!(
        warning_keys(&p),
        [(None, "include:remote"), (None, "include:template")]
    );
}

#[test]
fn hello_example_job_list() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/hello/.gitlab-ci.yml");
    let p = load(&path, &vars(MAIN)).unwrap();
    assert_eq!(p.stages, [".pre", "build", "test", "package", ".post"]);
    assert_eq!(
        order(&p),
        [
            ("build", "build"),
            ("test", "test"),
            ("lint", "test"),
            ("package", "package"),
            ("announce", "package")
        ]
    );
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    assert_eq!(
        job(&p, "build").artifacts.as_ref().unwrap().paths,
        ["build/"]
    );
    assert_eq!(
        job(&p, "package").artifacts.as_ref().unwrap().paths,
        ["dist/"]
    );
    assert!(job(&p, "lint").allow_failure);
    assert!(
        p.jobs
            .iter()
            .filter(|j| j.name != "lint")
            .all(|j| !j.allow_failure)
    );
    let announce = job(&p, "announce");
    assert_eq!(
        (announce.when, announce.needs.clone()),
        (JobWhen::OnSuccess, Some(vec![need("build", true)]))
    );
    assert_eq!(
        job(&p, "test").variables,
        vars(&[("GREETING", "Hello from kiln")])
    );

    let feature = load(&path, &vars(FEATURE)).unwrap();
    assert_eq!(
        job(&feature, "announce").when,
        JobWhen::Never,
        "rules say never off main"
    );
}

#[test]
fn errors_name_the_file_position_and_job() {
    let base = Path::new(".");
    let parse = |yaml: &str| parse_str(yaml, "ci.yml", base, &[]).unwrap_err();

    let err = parse("build:\n  script:\n    - make\n  - oops\n");
    assert!(
        matches!(err, PipelineError::Yaml { line: 4, .. }),
        "{err:?}"
    );
    assert!(err.to_string().starts_with("ci.yml:4:"), "{err}");

    let err = parse("build: {extends: .nope, script: x}");
    assert_eq!(
        err.to_string(),
        "job `build` extends `.nope`, which is not defined; check the name (templates start with `.`)"
    );
    let err = parse("test: {script: x, needs: [biuld]}\nbuild: {stage: build, script: x}");
    assert_eq!(
        err.to_string(),
        "job `test` needs `biuld`, which is not defined; check the name"
    );
    let err = parse(".a: {extends: .b}\n.b: {extends: .a}\njob: {extends: .a, script: x}");
    assert!(err.to_string().contains(".a → .b → .a"), "{err}");
    let err = parse("job: {stage: test}");
    assert_eq!(
        err.to_string(),
        "job `job` has no `script`; add one (or `extends:` a template that has one)"
    );
    let err = parse("job: {script: x, rules: [{if: '$A == main'}]}");
    assert!(
        err.to_string()
            .starts_with("job `job`: rules:if `$A == main` is not a valid expression"),
        "{err}"
    );
}

/// The error `parse_str` gives for `yaml`, as the user reads it.
fn error_of(yaml: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    parse_str(yaml, ".gitlab-ci.yml", dir.path(), &vars(MAIN))
        .unwrap_err()
        .to_string()
}

#[test]
fn a_typo_of_script_is_an_unknown_key_at_its_line_not_a_missing_script() {
    let yaml = "\
stages: [build]
build:
  stage: build
  scrpit:
    - make
";
    assert_eq!(
        error_of(yaml),
        ".gitlab-ci.yml:4:3: job `build`: unknown key `scrpit`; did you mean `script`?"
    );
}

#[test]
fn unknown_keys_at_every_level_name_file_line_and_the_nearest_key() {
    let cases = [
        (
            "build:\n  script: make\n  artifacts:\n    pathz: [out/]\n",
            ".gitlab-ci.yml:4:5: job `build`: unknown key `artifacts:pathz`; did you mean `paths`?",
        ),
        (
            "build:\n  script: make\n  rules:\n    - if: $CI\n    - iff: $CI_COMMIT_TAG\n",
            ".gitlab-ci.yml:5:7: job `build`: unknown key `rules:iff`; did you mean `if`?",
        ),
        (
            "default:\n  imgae: alpine\nbuild: {script: make}\n",
            ".gitlab-ci.yml:2:3: `default`: unknown key `imgae`; did you mean `image`?",
        ),
        (
            "workflow:\n  rulez: []\nbuild: {script: make}\n",
            ".gitlab-ci.yml:2:3: `workflow`: unknown key `rulez`; did you mean `rules`?",
        ),
        (
            "a: {script: x}\nb:\n  script: y\n  needs:\n    - job: a\n      artifact: false\n",
            ".gitlab-ci.yml:6:7: job `b`: unknown key `needs:artifact`; did you mean `artifacts`?",
        ),
        (
            "variables:\n  V:\n    value: x\n    expnad: false\nb: {script: y}\n",
            ".gitlab-ci.yml:4:5: the top level: unknown key `variables:V:expnad`; did you mean `expand`?",
        ),
        (
            "b:\n  script: y\n  services:\n    - name: redis\n      alais: cache\n",
            ".gitlab-ci.yml:5:7: job `b`: unknown key `services:alais`; did you mean `alias`?",
        ),
        (
            "stagse: [build, test]\nb: {script: y}\n",
            ".gitlab-ci.yml:1:1: the top level: unknown key `stagse`; did you mean `stages`?",
        ),
        (
            "b:\n  script: y\n  frobnicate: true\n",
            ".gitlab-ci.yml:3:3: job `b`: unknown key `frobnicate`",
        ),
    ];
    for (yaml, expected) in cases {
        assert_eq!(error_of(yaml), expected, "for:\n{yaml}");
    }
}

#[test]
fn an_unknown_key_inherited_from_an_included_template_is_shown_where_it_is_written() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("ci")).unwrap();
    std::fs::write(
        dir.path().join("ci/templates.yml"),
        "# shared templates\n.build:\n  image: rust\n  befor_script: [cargo --version]\n",
    )
    .unwrap();
    let yaml = "include: ci/templates.yml\nbuild:\n  extends: .build\n  script: cargo build\n";
    let err = parse_str(yaml, ".gitlab-ci.yml", dir.path(), &vars(MAIN))
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "ci/templates.yml:4:3: job `build`: unknown key `befor_script`; did you mean `before_script`?"
    );
}

#[test]
fn a_duplicate_job_is_reported_at_the_duplicate_not_at_line_1() {
    let yaml = "\
build:
  script: make
test:
  script: make test
build:
  script: make again
";
    assert_eq!(
        error_of(yaml),
        ".gitlab-ci.yml:5:1: duplicate key `build`; a key may appear once in a mapping"
    );
    let nested = "build:\n  script: make\n  stage: build\n  stage: test\n";
    assert_eq!(
        error_of(nested),
        ".gitlab-ci.yml:4:3: duplicate key `stage`; a key may appear once in a mapping"
    );
}

#[test]
fn a_tab_in_the_indentation_says_so() {
    let yaml = "build:\n  script: make\n\tstage: build\n";
    assert_eq!(
        error_of(yaml),
        ".gitlab-ci.yml:3:1: invalid YAML: a tab in the indentation; YAML indents with spaces only, so replace the tab with spaces"
    );
    let list = "build:\n  script:\n  \t- make\n";
    assert!(
        error_of(list).starts_with(".gitlab-ci.yml:3:3: invalid YAML: a tab in the indentation"),
        "{}",
        error_of(list)
    );
}
