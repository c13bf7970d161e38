//! End-to-end tests of `kiln exec`: the real binary runs pipelines through the real agent and
//! local executor against its embedded job server.

use std::path::Path;
use std::process::{Command, Output};

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The summary row of `job`: [job, stage, status, duration, exit].
    fn row(&self, job: &str) -> Option<Vec<String>> {
        let table = self.stdout.split("\nJOB ").nth(1)?;
        table
            .lines()
            .skip(1)
            .map(|line| {
                line.split("  ")
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .find(|cells| cells.first().map(String::as_str) == Some(job))
    }

    fn status(&self, job: &str) -> String {
        self.row(job)
            .map(|r| r[2].clone())
            .unwrap_or_else(|| panic!("no summary row for `{job}` in:\n{}", self.stdout))
    }

    fn exit(&self, job: &str) -> String {
        self.row(job).unwrap()[4].clone()
    }

    fn has_line(&self, job: &str, text: &str) -> bool {
        self.position(job, text).is_some()
    }

    fn position(&self, job: &str, text: &str) -> Option<usize> {
        self.stdout.lines().position(|l| {
            l.split_once(" | ")
                .is_some_and(|(name, rest)| name.trim() == job && rest == text)
        })
    }
}

fn kiln_exec(dir: &Path, args: &[&str]) -> Run {
    let Output {
        status,
        stdout,
        stderr,
    } = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("exec")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    let run = Run {
        code: status.code(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    };
    eprintln!("--- stdout\n{}--- stderr\n{}", run.stdout, run.stderr);
    run
}

fn project(pipeline: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(".gitlab-ci.yml"), pipeline).unwrap();
    dir
}

fn example_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/hello")
}

#[test]
fn the_example_runs_its_three_stages_and_passes_artifacts() {
    let run = kiln_exec(&example_dir(), &[]);
    assert_eq!(run.code, Some(0));
    assert_eq!(run.status("build"), "success");
    assert_eq!(run.status("test"), "success");
    assert_eq!(run.status("lint"), "failed (allowed)");
    assert_eq!(run.exit("lint"), "1");
    assert_eq!(run.status("package"), "success");
    assert_eq!(run.row("package").unwrap()[1], "package");
    assert_eq!(run.exit("package"), "0");
    // The build's artifact reached the next stages.
    assert!(run.has_line("test", "build/app.txt says: Hello from kiln"));
    assert!(run.has_line("package", "app.txt"));
    // Output is plain when not a terminal: no colours, no section markers.
    assert!(!run.stdout.contains('\x1b'));
    assert!(!run.stdout.contains("section_start"));
}

#[test]
fn the_example_rule_job_runs_on_main_only() {
    let run = kiln_exec(&example_dir(), &["--var", "CI_COMMIT_BRANCH=feature"]);
    assert_eq!(run.code, Some(0));
    assert_eq!(run.status("announce"), "skipped (rules)");
    let run = kiln_exec(
        &example_dir(),
        &[".gitlab-ci.yml", "--var", "CI_COMMIT_BRANCH=main"],
    );
    assert_eq!(run.code, Some(0));
    assert_eq!(run.status("announce"), "success");
    assert!(run.has_line("announce", "Hello from kiln, released from main"));
}

#[test]
fn a_failing_job_fails_the_pipeline_and_skips_what_follows() {
    let dir = project(
        r#"
stages: [build, test, cleanup]
compile:
  stage: build
  script:
    - echo compiling
    - exit 3
report:
  stage: test
  when: on_failure
  script: [echo "reporting the failure"]
unit:
  stage: test
  script: [echo unit]
tidy:
  stage: cleanup
  when: always
  script: [echo tidy]
"#,
    );
    let run = kiln_exec(dir.path(), &[]);
    assert_eq!(run.code, Some(1));
    assert_eq!(run.status("compile"), "failed");
    assert_eq!(run.exit("compile"), "3");
    assert_eq!(run.status("report"), "success");
    assert!(run.has_line("report", "reporting the failure"));
    assert_eq!(run.status("unit"), "skipped (an earlier job failed)");
    assert_eq!(run.status("tidy"), "success");
    // The reader's warning and the non-git note come first, on stderr.
    assert!(run.stderr.contains("not a git checkout"), "{}", run.stderr);
}

#[test]
fn manual_jobs_run_only_when_named() {
    let dir = project(
        r#"
build:
  stage: build
  script: [echo build]
deploy:
  stage: deploy
  when: manual
  script: [echo "deploying $TARGET"]
"#,
    );
    let run = kiln_exec(dir.path(), &[]);
    assert_eq!(run.code, Some(0));
    assert_eq!(run.status("build"), "success");
    assert_eq!(run.status("deploy"), "skipped (manual)");

    let run = kiln_exec(dir.path(), &["--job", "deploy", "--var", "TARGET=prod"]);
    assert_eq!(run.code, Some(0));
    assert_eq!(run.status("deploy"), "success");
    assert!(run.has_line("deploy", "deploying prod"));
    assert!(run.row("build").is_none(), "only the named job runs");
}

#[test]
fn rules_if_sees_var_and_the_job_gets_it() {
    let dir = project(
        r#"
always:
  script: [echo always]
release:
  script: [echo "releasing $CHANNEL"]
  rules:
    - if: '$CHANNEL == "stable" || $FORCE'
"#,
    );
    let run = kiln_exec(dir.path(), &[]);
    assert_eq!(run.code, Some(0));
    assert!(
        run.row("release").is_none(),
        "no rule matches: not in the pipeline"
    );
    let run = kiln_exec(dir.path(), &["--var", "CHANNEL=stable"]);
    assert_eq!(run.status("release"), "success");
    assert!(run.has_line("release", "releasing stable"));
}

#[test]
fn needs_order_jobs_and_choose_artifacts() {
    let dir = project(
        r#"
stages: [build, test]
fast:
  stage: build
  script: [echo a > a.txt]
  artifacts: {paths: [a.txt]}
slow:
  stage: build
  script: [sleep 2, echo c > c.txt]
  artifacts: {paths: [c.txt]}
early:
  stage: test
  needs: [fast]
  script:
    - test -f a.txt
    - test ! -f c.txt
    - echo "early sees only fast"
late:
  stage: test
  script: [test -f a.txt, test -f c.txt, echo "late sees both"]
isolated:
  stage: test
  dependencies: []
  script: [test ! -f a.txt, test ! -f c.txt, test -f input.txt, echo "isolated sees none"]
"#,
    );
    std::fs::write(dir.path().join("input.txt"), "working tree file").unwrap();
    let run = kiln_exec(dir.path(), &["--concurrency", "3"]);
    assert_eq!(run.code, Some(0));
    for job in ["fast", "slow", "early", "late", "isolated"] {
        assert_eq!(run.status(job), "success", "{job}");
    }
    assert!(run.has_line("early", "early sees only fast"));
    assert!(run.has_line("late", "late sees both"));
    assert!(run.has_line("isolated", "isolated sees none"));
    // `early` needs only `fast`, so it ends before `slow` does; `late` waits for the stage.
    let early = run.position("early", "Job succeeded").unwrap();
    let slow = run.position("slow", "Job succeeded").unwrap();
    let late = run.position("late", "Job succeeded").unwrap();
    assert!(early < slow, "early should finish before slow");
    assert!(slow < late, "late waits for the whole build stage");
}

#[test]
fn stage_filter_and_parallel_jobs() {
    let dir = project(
        r#"
build:
  stage: build
  script: [exit 1]
shard:
  stage: test
  parallel: 2
  script: [echo "shard $CI_NODE_INDEX of $CI_NODE_TOTAL in $CI_JOB_STAGE"]
"#,
    );
    let run = kiln_exec(dir.path(), &["--stage", "test"]);
    assert_eq!(run.code, Some(0));
    assert!(run.row("build").is_none());
    assert!(run.has_line("shard 1/2", "shard 1 of 2 in test"));
    assert!(run.has_line("shard 2/2", "shard 2 of 2 in test"));
}

#[test]
fn bad_input_is_reported_without_running_anything() {
    let dir = project("build:\n  script: [echo hi]\n  stage: [oops\n");
    let run = kiln_exec(dir.path(), &[]);
    assert_eq!(run.code, Some(1));
    assert!(run.stderr.contains(".gitlab-ci.yml:"), "{}", run.stderr);

    let dir = project("build:\n  script: [echo hi]\n");
    let run = kiln_exec(dir.path(), &["--job", "nope"]);
    assert_eq!(run.code, Some(1));
    assert!(run.stderr.contains("no job `nope`"), "{}", run.stderr);
    assert!(run.stderr.contains("build"), "{}", run.stderr);

    let run = kiln_exec(dir.path(), &["--executor", "kubernetes"]);
    assert_eq!(run.code, Some(1));
    assert!(
        run.stderr.contains("cannot use the Kubernetes executor")
            && run.stderr.contains("--executor local"),
        "{}",
        run.stderr
    );
}

#[test]
fn variables_resolve_to_their_winner_before_anything_expands() {
    let dir = project(
        r#"
variables:
  G: global
  REF: "ref-${G}"
  FWD: "f-$LATER"
  LATER: later
  LIT:
    value: "$G stays"
    expand: false
show:
  variables:
    J1: "$J2-x"
    J2: j2
    SELF: "x$SELF"
    CYC_A: "a$CYC_B"
    CYC_B: "b${CYC_A}"
    URL: "https://ci:${CI_JOB_TOKEN}@example.com/"
  script:
    - echo "REF=$REF FWD=$FWD J1=$J1"
    - echo "LIT=$LIT SELF=$SELF"
    - echo "CYC_A=$CYC_A CYC_B=$CYC_B PCT=%G%"
    - echo "URL=$URL"
"#,
    );
    let run = kiln_exec(dir.path(), &["--var", "G=cli"]);
    assert_eq!(run.code, Some(0));
    assert!(run.has_line("show", "REF=ref-cli FWD=f-later J1=j2-x"));
    assert!(run.has_line("show", "LIT=$G stays SELF=x$SELF"));
    assert!(run.has_line("show", "CYC_A=ab${CYC_A} CYC_B=ba$CYC_B PCT=%G%"));
    assert!(run.has_line("show", "URL=https://ci:[MASKED]@example.com/"));
}

#[test]
fn workflow_rules_that_create_no_pipeline_run_nothing_and_say_which_rule() {
    let dir = project(
        r#"
workflow:
  rules:
    - if: $CI_COMMIT_BRANCH == "main"
      when: never
    - when: always
build:
  script: [echo built]
"#,
    );
    let run = kiln_exec(dir.path(), &["--var", "CI_COMMIT_BRANCH=main"]);
    assert_eq!(run.code, Some(0));
    assert_eq!(
        run.stdout,
        "No pipeline: workflow:rules rule 1 (`if: $CI_COMMIT_BRANCH == \"main\"`) matches with `when: never`, so GitLab creates none (--ignore-workflow runs the jobs anyway)\n"
    );

    let run = kiln_exec(
        dir.path(),
        &["--var", "CI_COMMIT_BRANCH=main", "--ignore-workflow"],
    );
    assert_eq!(run.code, Some(0));
    assert_eq!(run.status("build"), "success");
    assert!(
        run.stderr
            .contains("--ignore-workflow runs the jobs anyway")
    );

    let run = kiln_exec(dir.path(), &["--var", "CI_COMMIT_BRANCH=feature"]);
    assert_eq!(
        run.status("build"),
        "success",
        "rule 2 creates the pipeline"
    );
}

#[test]
fn job_runs_the_jobs_it_needs_first_and_no_needs_runs_it_alone() {
    let dir = project(
        r#"
stages: [prepare, build, deploy]
prepare:
  stage: prepare
  script: [echo prepared > prepared.txt]
  artifacts: {paths: [prepared.txt]}
build:
  stage: build
  needs: [prepare]
  script: [cat prepared.txt, echo built > out.txt]
  artifacts: {paths: [out.txt]}
lint:
  stage: build
  script: [echo linting]
deploy:
  stage: deploy
  needs: [build]
  script: ['cat out.txt || echo "no artifact"']
"#,
    );
    let run = kiln_exec(dir.path(), &["--job", "deploy"]);
    assert_eq!(run.code, Some(0));
    for job in ["prepare", "build", "deploy"] {
        assert_eq!(run.status(job), "success", "{job}");
    }
    assert!(run.has_line("build", "prepared"));
    assert!(run.has_line("deploy", "built"));
    assert!(run.row("lint").is_none(), "lint is not needed");

    let run = kiln_exec(dir.path(), &["--job", "deploy", "--no-needs"]);
    assert_eq!(run.code, Some(0));
    assert_eq!(run.status("deploy"), "success");
    assert!(run.has_line("deploy", "no artifact"));
    assert!(run.row("build").is_none() && run.row("prepare").is_none());
}

#[test]
fn a_typo_in_a_key_stops_before_running_and_names_file_line_and_key() {
    let dir = project("build:\n  stage: build\n  scrpit: [echo hi]\n");
    let run = kiln_exec(dir.path(), &[]);
    assert_eq!(run.code, Some(1));
    assert!(
        run.stderr.contains(
            ".gitlab-ci.yml:3:3: job `build`: unknown key `scrpit`; did you mean `script`?"
        ),
        "{}",
        run.stderr
    );
    assert!(!run.stdout.contains("Running"), "{}", run.stdout);
}

/// A FIFO in the project (a dev server's control pipe, a `mkfifo` left behind) is left out of
/// what jobs see instead of hanging `kiln exec` forever; a symlink stays a symlink.
#[test]
fn a_fifo_in_the_project_is_left_out_not_waited_for() {
    let dir = project(
        "job:\n  script:\n    - test -L link && test \"$(cat link)\" = hello && test ! -e pipe\n",
    );
    std::fs::write(dir.path().join("file.txt"), "hello").unwrap();
    std::os::unix::fs::symlink("file.txt", dir.path().join("link")).unwrap();
    let made = Command::new("mkfifo")
        .arg(dir.path().join("pipe"))
        .status()
        .unwrap();
    assert!(made.success());
    let (tx, rx) = std::sync::mpsc::channel();
    let path = dir.path().to_path_buf();
    std::thread::spawn(move || tx.send(kiln_exec(&path, &[])));
    let run = rx
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("kiln exec finishes instead of blocking on the FIFO");
    assert_eq!(
        run.status("job"),
        "success",
        "{}\n{}",
        run.stdout,
        run.stderr
    );
    assert!(
        run.stderr.contains("pipe"),
        "the FIFO is named: {}",
        run.stderr
    );
}
