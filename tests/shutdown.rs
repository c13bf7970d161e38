//! End to end: stopping the coordinator loses no job. SIGTERM lets the `jobs/request` long
//! poll in flight finish; a job GitLab hands it in that moment is launched and run, and no new
//! request follows.

use crate::support;

use std::time::{Duration, Instant};

use support::gitlab::{GitLabServer, job_json};
use support::kiln::{KilnProcess, config, send_signal};

const TOKEN: &str = "glrt-fake-token";

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_long_poll_runs_the_job_it_brings() {
    let gitlab = GitLabServer::start().await;
    gitlab.add_runner_token(TOKEN);
    gitlab.set_long_poll_timeout(Duration::from_secs(20));
    gitlab.set_trace_interval(1);
    let mut kiln = KilnProcess::start(&config(&gitlab.url(), TOKEN, ""));

    // Wait for a request GitLab holds (one that carries the current X-GitLab-Last-Update),
    // young enough that its hold does not run out before the job comes.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let held = gitlab.polls().iter().any(|p| {
            p.status.is_none()
                && p.last_update.is_some()
                && p.at.elapsed() > Duration::from_millis(300)
        });
        if held {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no held long poll; log:\n{}",
            kiln.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let polls_before = gitlab.polls().len();
    send_signal(kiln.pid(), "TERM");
    tokio::time::sleep(Duration::from_millis(500)).await;
    // GitLab hands the job to the request kiln still waits on.
    let id = gitlab.enqueue(job_json("late", &["echo ran after SIGTERM"]));

    assert!(
        kiln.wait_exit(Duration::from_secs(40)),
        "kiln did not exit; log:\n{}",
        kiln.logs()
    );
    let job = gitlab.job(id);
    assert_eq!(job.state, "success", "{job:?}\n{}", kiln.logs());
    assert!(job.trace.contains("ran after SIGTERM"), "{}", job.trace);
    // The request in flight was the last one.
    assert_eq!(gitlab.polls().len(), polls_before, "{}", kiln.logs());
}
