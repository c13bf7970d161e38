//! Unit tests of pipeline assembly: stages, defaults, variables, rules, needs, dependencies.

use super::*;

fn vars(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn parse(yaml: &str, v: &[(&str, &str)]) -> Result<Pipeline, PipelineError> {
    parse_str(yaml, ".gitlab-ci.yml", Path::new("/nonexistent"), &vars(v))
}

fn names(p: &Pipeline) -> Vec<&str> {
    p.jobs.iter().map(|j| j.name.as_str()).collect()
}

fn job_vars(p: &Pipeline, job: &str) -> Vec<(String, String)> {
    p.job(job).unwrap().variables.clone()
}

#[test]
fn default_stages_and_gitlab_order() {
    let p = parse(
        "
deploy: {stage: deploy, script: d}
.hidden: {script: h}
unit: {script: u}
compile: {stage: build, script: c}
lint: {stage: .pre, script: l}
",
        &[],
    )
    .unwrap();
    assert_eq!(p.stages, [".pre", "build", "test", "deploy", ".post"]);
    assert_eq!(names(&p), ["lint", "compile", "unit", "deploy"]);
    assert_eq!(
        p.job("unit").unwrap().stage,
        "test",
        "`test` is the default stage"
    );
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
}

#[test]
fn defaults_are_inherited_unless_the_job_says_otherwise() {
    let p = parse(
        "
before_script: [legacy]
default:
  image: ruby:3.3
  after_script: [cleanup]
  timeout: 90 minutes
  artifacts: {paths: [log/]}
a: {script: a}
b: {script: b, image: alpine, before_script: []}
c: {script: c, inherit: {default: false}}
d: {script: d, inherit: {default: [image]}}
",
        &[],
    )
    .unwrap();
    let a = p.job("a").unwrap();
    assert_eq!(a.image.as_ref().unwrap().name, "ruby:3.3");
    assert_eq!(
        (a.before_script.clone(), a.after_script.clone()),
        (vec!["legacy".to_string()], vec!["cleanup".to_string()])
    );
    assert_eq!(a.timeout, Some(Duration::from_secs(5400)));
    assert_eq!(a.artifacts.as_ref().unwrap().paths, ["log/"]);
    let b = p.job("b").unwrap();
    assert_eq!(b.image.as_ref().unwrap().name, "alpine");
    assert!(
        b.before_script.is_empty(),
        "an empty list overrides the default"
    );
    let c = p.job("c").unwrap();
    assert_eq!(
        (c.image.clone(), c.after_script.len(), c.timeout),
        (None, 0, None)
    );
    let d = p.job("d").unwrap();
    assert!(d.image.is_some() && d.after_script.is_empty());
}

#[test]
fn variables_global_job_matrix_and_rule_in_precedence_order() {
    let p = parse(
        "
variables: {A: global, B: global, DEPLOY: {value: 'no', description: Deploy?}}
job:
  script: x
  variables: {B: job, C: job}
  parallel: {matrix: [{C: [m1]}]}
  rules:
    - if: $B == 'job' && $C == 'm1'
      variables: {D: rule, A: rule}
no_globals: {script: x, inherit: {variables: false}, variables: {X: '1'}}
some_globals: {script: x, inherit: {variables: [B]}}
",
        &[],
    )
    .unwrap();
    let pairs = |list: &[(&str, &str)]| vars(list);
    assert_eq!(
        job_vars(&p, "job: [m1]"),
        pairs(&[
            ("A", "rule"),
            ("B", "job"),
            ("DEPLOY", "no"),
            ("C", "m1"),
            ("D", "rule")
        ])
    );
    assert_eq!(job_vars(&p, "no_globals"), pairs(&[("X", "1")]));
    assert_eq!(job_vars(&p, "some_globals"), pairs(&[("B", "global")]));
}

#[test]
fn rules_first_match_wins_and_no_match_drops_the_job() {
    let yaml = "
build:
  script: x
  rules:
    - if: $CI_COMMIT_BRANCH == $CI_DEFAULT_BRANCH
      when: always
    - if: $CI_COMMIT_TAG =~ /^v\\d+/
      when: manual
    - if: $CI_PIPELINE_SOURCE == 'schedule'
      when: never
manual_job: {script: x, when: manual}
";
    let main = parse(
        yaml,
        &[("CI_COMMIT_BRANCH", "main"), ("CI_DEFAULT_BRANCH", "main")],
    )
    .unwrap();
    assert_eq!(main.job("build").unwrap().when, JobWhen::Always);

    // Both branches undefined would be `null == null`, which holds, as in GitLab.
    let tag = parse(
        yaml,
        &[("CI_COMMIT_TAG", "v1.0"), ("CI_DEFAULT_BRANCH", "main")],
    )
    .unwrap();
    let build = tag.job("build").unwrap();
    assert_eq!(
        (build.when, build.allow_failure),
        (JobWhen::Manual, false),
        "rules:when manual is not allowed to fail"
    );
    let manual = tag.job("manual_job").unwrap();
    assert_eq!(
        (manual.when, manual.allow_failure),
        (JobWhen::Manual, true),
        "job-level manual may fail"
    );

    let scheduled = parse(
        yaml,
        &[
            ("CI_PIPELINE_SOURCE", "schedule"),
            ("CI_DEFAULT_BRANCH", "main"),
        ],
    )
    .unwrap();
    assert_eq!(scheduled.job("build").unwrap().when, JobWhen::Never);

    let feature = parse(
        yaml,
        &[
            ("CI_COMMIT_BRANCH", "feature"),
            ("CI_DEFAULT_BRANCH", "main"),
        ],
    )
    .unwrap();
    assert_eq!(names(&feature), ["manual_job"]);
}

#[test]
fn rules_see_file_variables_but_caller_variables_win() {
    let yaml = "
variables: {TARGET: staging}
deploy: {script: x, rules: [{if: $TARGET == 'production', allow_failure: true}]}
";
    assert!(parse(yaml, &[]).unwrap().jobs.is_empty());
    let p = parse(yaml, &[("TARGET", "production")]).unwrap();
    assert!(p.job("deploy").unwrap().allow_failure);
}

#[test]
fn rules_can_use_the_job_name_and_expanded_variables() {
    let yaml = "
variables: {ENV: prod, URL: https://$ENV.example.com}
a: {script: x, rules: [{if: $CI_JOB_NAME == 'a' && $URL == 'https://prod.example.com'}]}
b: {script: x, rules: [{if: $CI_JOB_NAME == 'a'}]}
";
    assert_eq!(names(&parse(yaml, &[]).unwrap()), ["a"]);
}

#[test]
fn bad_rule_names_the_job_and_the_expression() {
    let err = parse("job: {script: x, rules: [{if: '$A = \"x\"'}]}", &[]).unwrap_err();
    assert!(
        matches!(&err, PipelineError::BadRule { job, expression, .. } if job == "job" && expression == "$A = \"x\""),
        "{err}"
    );
}

#[test]
fn needs_expand_parallel_jobs_and_check_targets() {
    let p = parse(
        "
build: {stage: build, script: x, parallel: 2}
pkg: {stage: build, script: x, parallel: {matrix: [{OS: [linux, mac]}]}}
lint: {stage: test, script: x, needs: []}
test:
  stage: test
  script: x
  needs: [build, {job: pkg, artifacts: false, parallel: {matrix: [{OS: mac}]}}, lint]
plain: {stage: deploy, script: x}
",
        &[],
    )
    .unwrap();
    let test = p.job("test").unwrap();
    let needs: Vec<_> = test
        .needs
        .iter()
        .flatten()
        .map(|n| (n.job.as_str(), n.artifacts))
        .collect();
    assert_eq!(
        needs,
        [
            ("build 1/2", true),
            ("build 2/2", true),
            ("pkg: [mac]", false),
            ("lint", true)
        ]
    );
    assert_eq!(p.job("lint").unwrap().needs, Some(vec![]));
    assert_eq!(p.job("plain").unwrap().needs, None);
}

#[test]
fn need_errors_name_the_job() {
    let err = parse("a: {script: x, needs: [nope]}", &[]).unwrap_err();
    assert!(
        matches!(&err, PipelineError::UnknownNeed { job, target } if job == "a" && target == "nope"),
        "{err}"
    );

    let err = parse(
        "a: {stage: build, script: x, needs: [b]}\nb: {stage: test, script: x}",
        &[],
    )
    .unwrap_err();
    assert!(
        matches!(&err, PipelineError::NeedInLaterStage { job, target, .. } if job == "a" && target == "b"),
        "{err}"
    );

    let err = parse(
        "a: {script: x, needs: [b]}\nb: {script: x, needs: [a]}",
        &[],
    )
    .unwrap_err();
    assert!(matches!(&err, PipelineError::NeedsCycle { .. }), "{err}");
    assert!(err.to_string().contains("a → b → a"), "{err}");

    let gated = "
b: {stage: build, script: x, rules: [{if: $RUN_B}]}
a: {script: x, needs: [b]}
c: {script: x, needs: [{job: b, optional: true}]}
";
    let err = parse(gated, &[]).unwrap_err();
    assert!(
        matches!(&err, PipelineError::NeedNotInPipeline { job, target } if job == "a" && target == "b"),
        "{err}"
    );
    let p = parse(
        &gated.replace("needs: [b]", "needs: [{job: b, optional: true}]"),
        &[],
    )
    .unwrap();
    assert_eq!(
        p.job("a").unwrap().needs,
        Some(vec![]),
        "an optional need on an absent job is dropped"
    );
    assert_eq!(
        parse(gated, &[("RUN_B", "1")])
            .unwrap()
            .job("a")
            .unwrap()
            .needs
            .as_ref()
            .unwrap()[0]
            .job,
        "b"
    );
}

#[test]
fn dependencies_are_checked_and_expanded() {
    let p = parse(
        "
build: {stage: build, script: x, parallel: 2}
docs: {stage: build, script: x, rules: [{if: $DOCS}]}
test: {stage: test, script: x, dependencies: [build, docs]}
",
        &[],
    )
    .unwrap();
    assert_eq!(
        p.job("test").unwrap().dependencies,
        Some(vec!["build 1/2".to_string(), "build 2/2".to_string()])
    );
    assert_eq!(
        p.warnings.len(),
        1,
        "the absent dependency is reported: {:?}",
        p.warnings
    );

    let err = parse("a: {script: x, dependencies: [nope]}", &[]).unwrap_err();
    assert!(
        matches!(&err, PipelineError::UnknownDependency { job, target } if job == "a" && target == "nope"),
        "{err}"
    );
    let err = parse("a: {script: x}\nb: {script: x, dependencies: [a]}", &[]).unwrap_err();
    assert!(
        matches!(&err, PipelineError::DependencyNotEarlier { job, .. } if job == "b"),
        "{err}"
    );
    let err = parse("a: {stage: build, script: x}\nc: {stage: build, script: x}\nb: {script: x, needs: [c], dependencies: [a]}", &[]).unwrap_err();
    assert!(err.to_string().contains("not in `needs`"), "{err}");
}

#[test]
fn structural_errors_name_the_job() {
    let err = parse("a: {stage: publish, script: x}", &[]).unwrap_err();
    assert!(
        matches!(&err, PipelineError::UnknownStage { job, stage, .. } if job == "a" && stage == "publish"),
        "{err}"
    );
    let err = parse("stages: [one]\na: {stage: one, image: alpine}", &[]).unwrap_err();
    assert!(
        matches!(&err, PipelineError::NoScript { job } if job == "a"),
        "{err}"
    );
    let err = parse(".only_hidden: {script: x}\nvariables: {A: b}", &[]).unwrap_err();
    assert!(matches!(err, PipelineError::NoJobs { .. }), "{err}");
    let err = parse("a: just a string", &[]).unwrap_err();
    assert!(err.to_string().contains("a job is a mapping"), "{err}");
}

#[test]
fn unsupported_keywords_warn_and_never_vanish() {
    let p = parse(
        "
workflow: {rules: [{if: $CI_COMMIT_BRANCH, variables: {FROM_WORKFLOW: 'yes'}}]}
cache: {paths: [.m2/]}
downstream: {trigger: other/project}
a: {script: x, needs: [downstream], environment: production, only: [main]}
",
        &[("CI_COMMIT_BRANCH", "main")],
    )
    .unwrap();
    let got: Vec<_> = p
        .warnings
        .iter()
        .map(|w| (w.job.as_deref(), w.key.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (Some("downstream"), "trigger"),
            (Some("a"), "environment"),
            (Some("a"), "only"),
            (Some("a"), "needs")
        ]
    );
    assert_eq!(
        job_vars(&p, "a"),
        vars(&[("FROM_WORKFLOW", "yes")]),
        "workflow:rules variables apply"
    );
    assert_eq!(p.job("a").unwrap().needs, Some(vec![]));
    // The deprecated top-level `cache:` is a default, as in GitLab (kiln exec runs it).
    assert_eq!(p.job("a").unwrap().cache[0].paths, [".m2/"]);

    assert_eq!(p.no_pipeline, None);

    let tag = parse(
        "workflow: {rules: [{if: $CI_COMMIT_BRANCH}]}\na: {script: x}",
        &[],
    )
    .unwrap();
    assert_eq!(
        tag.no_pipeline.as_deref(),
        Some("none of the 1 workflow:rules matches")
    );
    assert_eq!(
        names(&tag),
        ["a"],
        "the jobs are listed for --ignore-workflow"
    );
}

#[test]
fn load_reads_includes_relative_to_the_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("ci")).unwrap();
    std::fs::write(
        dir.path().join("ci/build.yml"),
        "build: {stage: build, script: [make]}\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join(".gitlab-ci.yml"),
        "include: ci/build.yml\ntest: {script: [make test], needs: [build]}\n",
    )
    .unwrap();
    let p = load(&dir.path().join(".gitlab-ci.yml"), &[]).unwrap();
    assert_eq!(names(&p), ["build", "test"]);
    let err = load(&dir.path().join("missing.yml"), &[]).unwrap_err();
    assert!(matches!(err, PipelineError::Read { .. }), "{err}");
}
