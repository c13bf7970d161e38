//! End to end against `gitlab-runner-mock`, an independent implementation of GitLab's job API:
//! a real `kiln run` takes a job, the agent runs it as a child process, and GitLab ends up with
//! the trace, the artifacts and the state.

use crate::support;

use std::time::{Duration, Instant};

use gitlab_runner_mock::{GitlabRunnerMock, MockJobState, MockJobStepName, MockJobStepWhen};
use support::kiln::{KilnProcess, config};

async fn wait_finished(job: &gitlab_runner_mock::MockJob, within: Duration, kiln: &KilnProcess) {
    let deadline = Instant::now() + within;
    while !job.finished() && job.state() != MockJobState::Cancelled {
        assert!(
            Instant::now() < deadline,
            "job did not finish; state {:?}; kiln log:\n{}",
            job.state(),
            kiln.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn passing_job_uploads_artifacts_and_succeeds() {
    let mock = GitlabRunnerMock::start().await;
    let mut builder = mock.job_builder("build".into());
    builder.add_step(
        MockJobStepName::Script,
        vec![
            "mkdir -p out".into(),
            "echo built > out/app.txt".into(),
            "echo hello from $CI_JOB_NAME".into(),
        ],
        600,
        MockJobStepWhen::OnSuccess,
        false,
    );
    builder.add_artifact_paths(vec!["out/".into()]);
    // The mock's repository URL is fictional.
    builder.add_variable("GIT_STRATEGY".into(), "none".into(), true, false);
    builder.add_variable("CI_JOB_NAME".into(), "build".into(), true, false);
    let job = builder.build();
    mock.enqueue_job(job.clone());

    let kiln = KilnProcess::start(&config(mock.uri().as_str(), mock.runner_token(), ""));
    wait_finished(&job, Duration::from_secs(60), &kiln).await;

    assert_eq!(
        job.state(),
        MockJobState::Success,
        "trace:\n{}\nkiln log:\n{}",
        String::from_utf8_lossy(&job.log()),
        kiln.logs()
    );
    let log = String::from_utf8_lossy(&job.log()).into_owned();
    assert!(log.contains("hello from build"), "{log}");
    assert!(log.contains("Job succeeded"), "{log}");
    let artifact = job
        .uploaded_artifacts()
        .next()
        .expect("an artifact was uploaded");
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(artifact.data.to_vec())).unwrap();
    let mut content = String::new();
    std::io::Read::read_to_string(&mut zip.by_name("out/app.txt").unwrap(), &mut content).unwrap();
    assert_eq!(content, "built\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn canceled_job_stops_its_script() {
    let mock = GitlabRunnerMock::start().await;
    mock.set_update_interval(1);
    let mut builder = mock.job_builder("long".into());
    builder.add_step(
        MockJobStepName::Script,
        vec![
            "echo started".into(),
            "sleep 120".into(),
            "echo never".into(),
        ],
        600,
        MockJobStepWhen::OnSuccess,
        false,
    );
    builder.add_variable("GIT_STRATEGY".into(), "none".into(), true, false);
    let job = builder.build();
    mock.enqueue_job(job.clone());
    let kiln = KilnProcess::start(&config(mock.uri().as_str(), mock.runner_token(), ""));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !String::from_utf8_lossy(&job.log()).contains("started") {
        assert!(
            Instant::now() < deadline,
            "job did not start; kiln log:\n{}",
            kiln.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    job.cancel();
    // The agent learns of the cancel from the next trace patch and stops the script.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !support::kiln::agent_pids(&kiln.work_dir()).is_empty() {
        assert!(
            Instant::now() < deadline,
            "agent still running; kiln log:\n{}",
            kiln.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!String::from_utf8_lossy(&job.log()).contains("never"));
}
