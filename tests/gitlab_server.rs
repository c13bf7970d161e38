//! Self-test of the test GitLab in `support::gitlab`, driven with plain HTTP; doubles as its usage guide.

use crate::support;

use std::time::{Duration, Instant};

use reqwest::header::CONTENT_TYPE;
use reqwest::{Client, Response, StatusCode};
use serde_json::{Value, json};
use support::gitlab::{GitLabServer, RUNNER_FAILURE_REASONS, job_json};

const RUNNER: &str = "glrt-fake-token";

fn api(server: &GitLabServer, path: &str) -> String {
    format!("{}api/v4/{path}", server.url())
}

fn header(response: &Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
}

fn form(
    client: &Client,
    method: reqwest::Method,
    url: String,
    body: &str,
) -> reqwest::RequestBuilder {
    client
        .request(method, url)
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(body.to_owned())
}

async fn poll(client: &Client, server: &GitLabServer, token: &str, last_update: &str) -> Response {
    client
        .post(api(server, "jobs/request"))
        .header("X-Request-Id", "req-1")
        .json(&json!({
            "token": token,
            "system_id": "s_0123456789ab",
            "last_update": last_update,
            "info": {"name": "kiln", "features": {"trace_reset": true, "trace_checksum": true, "cancelable": true}},
        }))
        .send()
        .await
        .unwrap()
}

/// Starts a server with one runner and one job already handed to it; returns the job payload.
async fn running_job(script: &[&str]) -> (GitLabServer, Client, Value) {
    let server = GitLabServer::start().await;
    server.add_runner_token(RUNNER);
    server.enqueue(job_json("build", script));
    let client = Client::new();
    let response = poll(&client, &server, RUNNER, "").await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let job = response.json().await.unwrap();
    (server, client, job)
}

fn job_id(job: &Value) -> u64 {
    job["id"].as_u64().unwrap()
}

fn job_token(job: &Value) -> String {
    job["token"].as_str().unwrap().to_owned()
}

async fn patch_trace(
    client: &Client,
    server: &GitLabServer,
    job: &Value,
    range: &str,
    body: &[u8],
) -> Response {
    client
        .patch(api(server, &format!("jobs/{}/trace", job_id(job))))
        .header("JOB-TOKEN", job_token(job))
        .header(CONTENT_TYPE, "text/plain")
        .header("Content-Range", range)
        .body(body.to_vec())
        .send()
        .await
        .unwrap()
}

async fn update(client: &Client, server: &GitLabServer, job: &Value, body: Value) -> Response {
    client
        .put(api(server, &format!("jobs/{}", job_id(job))))
        .json(&body)
        .send()
        .await
        .unwrap()
}

fn crc(trace: &[u8]) -> String {
    format!("crc32:{:08x}", crc32fast::hash(trace))
}

#[tokio::test]
async fn verify_accepts_known_tokens_in_json_or_form_and_records_system_ids() {
    let server = GitLabServer::start().await;
    let id = server.add_runner_token(RUNNER);
    let client = Client::new();

    let response = client
        .post(api(&server, "runners/verify"))
        .json(&json!({"token": RUNNER, "system_id": "s_0123456789ab"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["id"], json!(id));
    assert_eq!(body["token"], json!(RUNNER));
    assert!(body.get("token_expires_at").is_some());

    let response = form(
        &client,
        reqwest::Method::POST,
        api(&server, "runners/verify"),
        &format!("token={RUNNER}&system_id=r_abcdefghijkl"),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        server.runner(RUNNER).unwrap().system_ids,
        ["s_0123456789ab", "r_abcdefghijkl"]
    );

    let response = client
        .post(api(&server, "runners/verify"))
        .json(&json!({"token": "glrt-unknown", "system_id": "s_0123456789ab"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);

    server.revoke(RUNNER);
    let response = client
        .post(api(&server, "runners/verify"))
        .json(&json!({"token": RUNNER}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn legacy_registration_creates_a_glrt_runner_and_records_its_params() {
    let server = GitLabServer::start().await;
    server.set_registration_token("GR1348941-legacy");
    let client = Client::new();

    // Form-encoded, exactly as the `gitlab` crate sends it.
    let response = form(
        &client,
        reqwest::Method::POST,
        api(&server, "runners"),
        "token=GR1348941-legacy&description=kiln&run_untagged=true&tag_list=k8s%2Cspot&locked=false&access_level=ref_protected&info%5Bname%5D=kiln",
    )
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let body: Value = response.json().await.unwrap();
    let token = body["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("glrt-"), "{token}");
    assert!(body["id"].as_u64().is_some());
    let runner = server.runner(&token).unwrap();
    assert_eq!(runner.description.as_deref(), Some("kiln"));

    let response = client
        .post(api(&server, "jobs/request"))
        .json(&json!({"token": token}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::NO_CONTENT,
        "the new token is known"
    );

    let response = client
        .post(api(&server, "runners"))
        .json(&json!({"token": "GR1348941-legacy", "run_untagged": true, "tag_list": "a,b", "locked": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);

    let response = client
        .post(api(&server, "runners"))
        .json(&json!({"token": "GR-wrong"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);

    server.disable_registration();
    let response = client
        .post(api(&server, "runners"))
        .json(&json!({"token": "GR1348941-legacy"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::GONE);

    let registrations = server.registrations();
    let statuses: Vec<u16> = registrations.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [201, 201, 403, 410]);
    assert!(registrations[0].form_encoded);
    assert_eq!(
        registrations[0].param("tag_list").as_deref(),
        Some("k8s,spot")
    );
    assert_eq!(
        registrations[0].param("info[name]").as_deref(),
        Some("kiln")
    );
    // Booleans compare as text whichever encoding carried them.
    assert_eq!(
        registrations[0].param("run_untagged").as_deref(),
        Some("true")
    );
    assert!(!registrations[1].form_encoded);
    assert_eq!(
        registrations[1].param("run_untagged").as_deref(),
        Some("true")
    );
    assert_eq!(registrations[1].param("locked").as_deref(), Some("true"));
}

#[tokio::test]
async fn unregistering_removes_the_runner_or_one_manager() {
    let server = GitLabServer::start().await;
    server.add_runner_token(RUNNER);
    let client = Client::new();
    client
        .post(api(&server, "runners/verify"))
        .json(&json!({"token": RUNNER, "system_id": "s_0123456789ab"}))
        .send()
        .await
        .unwrap();

    let response = form(
        &client,
        reqwest::Method::DELETE,
        api(&server, "runners/managers"),
        &format!("token={RUNNER}&system_id=s_0123456789ab"),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let runner = server.runner(RUNNER).unwrap();
    assert_eq!(runner.deleted_managers, ["s_0123456789ab"]);
    assert!(runner.system_ids.is_empty());
    assert!(!runner.removed, "deleting a manager keeps the runner");

    let response = client
        .delete(api(&server, "runners"))
        .json(&json!({"token": RUNNER}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert!(server.runner(RUNNER).unwrap().removed);

    for path in ["runners", "runners/verify"] {
        let response = client
            .request(
                if path == "runners" {
                    reqwest::Method::DELETE
                } else {
                    reqwest::Method::POST
                },
                api(&server, path),
            )
            .json(&json!({"token": RUNNER}))
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            StatusCode::FORBIDDEN,
            "{path} after removal"
        );
    }
}

#[tokio::test]
async fn personal_access_token_reads_the_user_and_creates_runners() {
    let server = GitLabServer::start().await;
    server.set_pat("glpat-test-pat");
    let client = Client::new();

    let response = client.get(api(&server, "user")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let response = client
        .get(api(&server, "user"))
        .header("PRIVATE-TOKEN", "glpat-wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let response = client
        .get(api(&server, "user"))
        .header("PRIVATE-TOKEN", "glpat-test-pat")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let user: Value = response.json().await.unwrap();
    assert!(user["id"].as_u64().is_some());
    assert!(user["username"].as_str().is_some());

    let create = |body: &str| {
        form(
            &client,
            reqwest::Method::POST,
            api(&server, "user/runners"),
            body,
        )
        .header("PRIVATE-TOKEN", "glpat-test-pat")
    };
    let response = create(
        "runner_type=group_type&group_id=7&tag_list=k8s&run_untagged=false&description=kiln",
    )
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let body: Value = response.json().await.unwrap();
    let token = body["token"].as_str().unwrap();
    assert!(token.starts_with("glrt-"));
    assert!(body["id"].as_u64().is_some());
    let response = client
        .post(api(&server, "runners/verify"))
        .json(&json!({"token": token, "system_id": "s_0123456789ab"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    let response = create("runner_type=group_type").send().await.unwrap();
    assert_eq!(
        response.status(),
        StatusCode::BAD_REQUEST,
        "group_type needs group_id"
    );
    let response = form(
        &client,
        reqwest::Method::POST,
        api(&server, "user/runners"),
        "runner_type=instance_type",
    )
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

    let registrations = server.registrations();
    assert_eq!(registrations[0].path, "user/runners");
    assert_eq!(registrations[0].param("group_id").as_deref(), Some("7"));
    assert_eq!(
        registrations[0].param("run_untagged").as_deref(),
        Some("false")
    );
}

#[tokio::test]
async fn jobs_are_handed_out_oldest_first_exactly_once() {
    let server = GitLabServer::start().await;
    server.add_runner_token(RUNNER);
    let first = server.enqueue(job_json("first", &["echo one"]));
    let second = server.enqueue(job_json("second", &["echo two"]));
    assert_ne!(first, second);
    assert_eq!(server.queued_jobs(), 2);
    let client = Client::new();

    let response = poll(&client, &server, RUNNER, "").await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let job: Value = response.json().await.unwrap();
    assert_eq!(job_id(&job), first);
    let token = job_token(&job);
    assert!(token.starts_with("glcbt-"));
    assert_eq!(job["job_info"]["name"], "first");
    assert_eq!(job["steps"][0]["script"], json!(["echo one"]));
    assert!(
        job["x_future_gitlab_field"].is_object(),
        "unknown keys pass through"
    );
    assert_eq!(
        job["features"]["failure_reasons"],
        json!(RUNNER_FAILURE_REASONS)
    );
    let variable = |key: &str| {
        job["variables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["key"] == key)
            .unwrap()["value"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(variable("CI_JOB_ID"), first.to_string());
    assert_eq!(variable("CI_JOB_TOKEN"), token);
    assert_eq!(
        variable("CI_API_V4_URL"),
        api(&server, "").trim_end_matches('/')
    );

    let record = server.job(first);
    assert_eq!(record.state, "running");
    assert_eq!(record.runner_token.as_deref(), Some(RUNNER));
    assert_eq!(server.job(second).state, "pending");

    let response = poll(&client, &server, RUNNER, "").await;
    let job: Value = response.json().await.unwrap();
    assert_eq!(job_id(&job), second);

    let response = poll(&client, &server, RUNNER, "").await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert!(header(&response, "x-gitlab-last-update").is_some());
    assert_eq!(server.running_jobs(), 2);
    assert_eq!(server.max_running_observed(), 2);

    let polls = server.polls();
    assert_eq!(polls.len(), 3);
    assert!(
        polls
            .iter()
            .all(|p| p.declares("trace_reset") && !p.declares("terminal"))
    );
    assert_eq!(polls[0].token.as_deref(), Some(RUNNER));
    assert_eq!(polls[0].system_id.as_deref(), Some("s_0123456789ab"));
    assert_eq!(
        polls.iter().map(|p| p.status).collect::<Vec<_>>(),
        [Some(201), Some(201), Some(204)]
    );
    assert_eq!(
        server.runner(RUNNER).unwrap().system_ids,
        ["s_0123456789ab"]
    );
}

#[tokio::test]
async fn job_requests_refuse_unknown_and_revoked_runners() {
    let server = GitLabServer::start().await;
    server.add_runner_token(RUNNER);
    server.enqueue(job_json("kept", &["true"]));
    let client = Client::new();
    assert_eq!(
        poll(&client, &server, "glrt-unknown", "").await.status(),
        StatusCode::FORBIDDEN
    );
    server.revoke(RUNNER);
    assert_eq!(
        poll(&client, &server, RUNNER, "").await.status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(server.queued_jobs(), 1, "a refused runner gets no job");
}

#[tokio::test]
async fn injected_request_statuses_come_first_with_retry_after() {
    let server = GitLabServer::start().await;
    server.add_runner_token(RUNNER);
    let client = Client::new();
    server.inject_request_status(429, 2, Some(7));
    for _ in 0..2 {
        let response = poll(&client, &server, RUNNER, "").await;
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(header(&response, "retry-after").as_deref(), Some("7"));
    }
    assert_eq!(
        poll(&client, &server, RUNNER, "").await.status(),
        StatusCode::NO_CONTENT
    );
    server.inject_request_status(502, 1, None);
    let response = poll(&client, &server, RUNNER, "").await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert!(header(&response, "retry-after").is_none());
    assert_eq!(
        poll(&client, &server, RUNNER, "").await.status(),
        StatusCode::NO_CONTENT
    );
}

#[tokio::test]
async fn long_poll_is_held_until_a_job_is_queued() {
    let server = GitLabServer::start().await;
    server.add_runner_token(RUNNER);
    server.set_long_poll_timeout(Duration::from_secs(5));
    let client = Client::new();

    let started = Instant::now();
    let response = poll(&client, &server, RUNNER, "").await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "no last_update: answered at once"
    );
    let last_update = header(&response, "x-gitlab-last-update").unwrap();

    let started = Instant::now();
    let (response, id) = tokio::join!(poll(&client, &server, RUNNER, &last_update), async {
        tokio::time::sleep(Duration::from_millis(400)).await;
        server.enqueue(job_json("late", &["true"]))
    });
    assert_eq!(response.status(), StatusCode::CREATED);
    let job: Value = response.json().await.unwrap();
    assert_eq!(job_id(&job), id);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
    assert!(server.polls()[1].answered_after.unwrap() >= Duration::from_millis(400));
}

#[tokio::test]
async fn long_poll_times_out_with_204_and_a_stale_last_update_is_answered_at_once() {
    let server = GitLabServer::start().await;
    server.add_runner_token(RUNNER);
    server.set_long_poll_timeout(Duration::from_secs(1));
    let client = Client::new();
    let first = header(
        &poll(&client, &server, RUNNER, "").await,
        "x-gitlab-last-update",
    )
    .unwrap();

    let started = Instant::now();
    let response = poll(&client, &server, RUNNER, &first).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    assert_eq!(
        header(&response, "x-gitlab-last-update").as_deref(),
        Some(first.as_str())
    );

    // The queue changes (a job comes and goes), so `first` is stale.
    let id = server.enqueue(job_json("gone", &["true"]));
    server.cancel(id, false);
    let started = Instant::now();
    let response = poll(&client, &server, RUNNER, &first).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert!(started.elapsed() < Duration::from_millis(800));
    let second = header(&response, "x-gitlab-last-update").unwrap();
    assert_ne!(first, second);
}

#[tokio::test]
async fn trace_patches_append_and_resume_from_the_range_on_416() {
    let (server, client, job) = running_job(&["echo hi"]).await;
    let id = job_id(&job);

    let response = patch_trace(&client, &server, &job, "0-4", b"hello").await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_eq!(header(&response, "range").as_deref(), Some("0-5"));
    assert_eq!(header(&response, "job-status").as_deref(), Some("running"));
    assert_eq!(
        header(&response, "x-gitlab-trace-update-interval").as_deref(),
        Some("3")
    );

    // Wrong offset: told where to resume.
    let response = patch_trace(&client, &server, &job, "3-5", b" wo").await;
    assert_eq!(response.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(header(&response, "range").as_deref(), Some("0-5"));

    // Injected 416 refuses a correct patch once.
    server.inject_trace_416(id);
    let response = patch_trace(&client, &server, &job, "5-10", b" world").await;
    assert_eq!(response.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(header(&response, "range").as_deref(), Some("0-5"));
    server.set_trace_interval(1);
    let response = patch_trace(&client, &server, &job, "5-10", b" world").await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_eq!(header(&response, "range").as_deref(), Some("0-11"));
    assert_eq!(
        header(&response, "x-gitlab-trace-update-interval").as_deref(),
        Some("1")
    );

    let record = server.job(id);
    assert_eq!(record.trace, "hello world");
    let patches: Vec<_> = record
        .patches
        .iter()
        .map(|p| (p.start, p.end, p.len, p.status))
        .collect();
    assert_eq!(
        patches,
        [
            (0, 4, 5, 202),
            (3, 5, 3, 416),
            (5, 10, 6, 416),
            (5, 10, 6, 202)
        ]
    );
    assert!(server.violations().is_empty(), "{:?}", server.violations());

    let response = client
        .patch(api(&server, &format!("jobs/{id}/trace")))
        .header("JOB-TOKEN", "glcbt-wrong")
        .header("Content-Range", "11-11")
        .body("!")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(server.job(id).trace, "hello world");
}

#[tokio::test]
async fn malformed_or_oversized_trace_patches_are_refused_and_recorded() {
    let (server, client, job) = running_job(&["echo hi"]).await;
    let id = job_id(&job);

    let response = patch_trace(&client, &server, &job, "bytes 0-4", b"hello").await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let response = patch_trace(&client, &server, &job, "0-9", b"hello").await;
    assert_eq!(
        response.status(),
        StatusCode::RANGE_NOT_SATISFIABLE,
        "end does not match the body"
    );
    let big = vec![b'x'; 1024 * 1024 + 1];
    let response = patch_trace(
        &client,
        &server,
        &job,
        &format!("0-{}", big.len() - 1),
        &big,
    )
    .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let response = patch_trace(&client, &server, &job, "0-18446744073709551615", b"x").await;
    assert_eq!(
        response.status(),
        StatusCode::RANGE_NOT_SATISFIABLE,
        "overflowing ranges are refused, not a panic"
    );

    assert!(server.job(id).trace.is_empty());
    let violations = server.violations();
    assert_eq!(violations.len(), 4, "{violations:?}");
    assert!(violations[0].contains("Content-Range"));
    assert!(violations[2].contains("exceeds 1 MiB"));

    // The full 1 MiB is allowed.
    let max = vec![b'y'; 1024 * 1024];
    let response = patch_trace(
        &client,
        &server,
        &job,
        &format!("0-{}", max.len() - 1),
        &max,
    )
    .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
}

#[tokio::test]
async fn cancel_reaches_the_runner_through_job_status() {
    let (server, client, job) = running_job(&["sleep 60"]).await;
    let id = job_id(&job);
    server.cancel(id, true);

    let response = patch_trace(&client, &server, &job, "0-2", b"abc").await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_eq!(
        header(&response, "job-status").as_deref(),
        Some("canceling")
    );
    let response = update(
        &client,
        &server,
        &job,
        json!({"token": job_token(&job), "state": "running"}),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        header(&response, "job-status").as_deref(),
        Some("canceling")
    );
    assert_eq!(server.running_jobs(), 1, "canceling is still running");

    let response = update(
        &client,
        &server,
        &job,
        json!({"token": job_token(&job), "state": "failed", "failure_reason": "script_failure", "exit_code": 143, "output": {"checksum": crc(b"abc"), "bytesize": 3}}),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(&response, "job-status").as_deref(), Some("canceled"));
    assert_eq!(server.job(id).state, "canceled");
    assert_eq!(server.running_jobs(), 0);
    let response = patch_trace(&client, &server, &job, "3-3", b"d").await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(header(&response, "job-status").as_deref(), Some("canceled"));

    let (server, client, job) = running_job(&["sleep 60"]).await;
    server.cancel(job_id(&job), false);
    let response = patch_trace(&client, &server, &job, "0-2", b"abc").await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(header(&response, "job-status").as_deref(), Some("canceled"));
    let response = update(
        &client,
        &server,
        &job,
        json!({"token": job_token(&job), "state": "success"}),
    )
    .await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(header(&response, "job-status").as_deref(), Some("canceled"));
}

#[tokio::test]
async fn finishing_goes_through_injected_202_and_412_then_checks_the_checksum() {
    let (server, client, job) = running_job(&["echo hi"]).await;
    let id = job_id(&job);
    let token = job_token(&job);
    assert_eq!(
        patch_trace(&client, &server, &job, "0-2", b"abc")
            .await
            .status(),
        StatusCode::ACCEPTED
    );

    let response = update(
        &client,
        &server,
        &job,
        json!({"token": token, "state": "running"}),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(&response, "job-status").as_deref(), Some("running"));
    assert_eq!(server.job(id).keepalives.len(), 1);

    let response = update(
        &client,
        &server,
        &job,
        json!({"token": "glcbt-wrong", "state": "success"}),
    )
    .await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);

    server.inject_update_202(id, 2);
    server.inject_update_412_once(id);
    let done = json!({"token": token, "state": "success", "exit_code": 0, "output": {"checksum": crc(b"abc"), "bytesize": 3}});
    for _ in 0..2 {
        let response = update(&client, &server, &job, done.clone()).await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        assert_eq!(
            header(&response, "x-gitlab-trace-update-interval").as_deref(),
            Some("1")
        );
    }
    assert_eq!(
        update(&client, &server, &job, done.clone()).await.status(),
        StatusCode::PRECONDITION_FAILED
    );
    assert_eq!(server.job(id).state, "running");

    // After a 412 the trace is sent again from 0 and replaces what was there.
    let response = patch_trace(&client, &server, &job, "0-2", b"abc").await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_eq!(header(&response, "range").as_deref(), Some("0-3"));
    let response = update(&client, &server, &job, done.clone()).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(&response, "job-status").as_deref(), Some("success"));

    let record = server
        .wait_for_state(id, &["success"], Duration::from_secs(1))
        .await;
    assert_eq!(record.trace, "abc");
    assert_eq!(record.exit_code, Some(0));
    assert_eq!(record.final_updates.len(), 4);
    assert!(record.finished_at.is_some());
    assert!(server.violations().is_empty(), "{:?}", server.violations());
    assert_eq!(
        update(&client, &server, &job, done).await.status(),
        StatusCode::FORBIDDEN,
        "finished"
    );
}

#[tokio::test]
async fn a_wrong_checksum_or_unlisted_failure_reason_is_refused() {
    let server = GitLabServer::start().await;
    server.add_runner_token(RUNNER);
    let mut payload = job_json("narrow", &["false"]);
    payload["features"]["failure_reasons"] = json!(["script_failure", "runner_system_failure"]);
    let id = server.enqueue(payload);
    let client = Client::new();
    let job: Value = poll(&client, &server, RUNNER, "")
        .await
        .json()
        .await
        .unwrap();
    let token = job_token(&job);
    patch_trace(&client, &server, &job, "0-2", b"abc").await;

    let response = update(&client, &server, &job, json!({"token": token, "state": "failed", "failure_reason": "script_failure", "output": {"checksum": crc(b"abd"), "bytesize": 3}})).await;
    assert_eq!(response.status(), StatusCode::PRECONDITION_FAILED);
    let response = update(&client, &server, &job, json!({"token": token, "state": "failed", "failure_reason": "script_failure", "output": {"checksum": crc(b"abc"), "bytesize": 4}})).await;
    assert_eq!(response.status(), StatusCode::PRECONDITION_FAILED);
    let response = update(
        &client,
        &server,
        &job,
        json!({"token": token, "state": "failed", "failure_reason": "image_pull_failure"}),
    )
    .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(server.violations().len(), 3, "{:?}", server.violations());

    let response = update(&client, &server, &job, json!({"token": token, "state": "failed", "failure_reason": "script_failure", "exit_code": 1, "output": {"checksum": crc(b"abc"), "bytesize": 3}})).await;
    assert_eq!(response.status(), StatusCode::OK);
    let record = server.job(id);
    assert_eq!(record.state, "failed");
    assert_eq!(record.failure_reason.as_deref(), Some("script_failure"));
    assert_eq!(record.exit_code, Some(1));
}

#[tokio::test]
async fn artifacts_upload_with_injected_413_and_307() {
    let (server, client, job) = running_job(&["make"]).await;
    let id = job_id(&job);
    let url = api(
        &server,
        &format!(
            "jobs/{id}/artifacts?artifact_format=zip&artifact_type=archive&expire_in=1%20week"
        ),
    );
    let upload = |url: String, token: String| {
        let form = reqwest::multipart::Form::new()
            .text("artifact_format", "zip")
            .part(
                "file",
                reqwest::multipart::Part::bytes(b"PK-zip".to_vec()).file_name("artifacts.zip"),
            );
        client
            .post(url)
            .header("JOB-TOKEN", token)
            .multipart(form)
            .send()
    };

    assert_eq!(
        upload(url.clone(), "glcbt-wrong".into())
            .await
            .unwrap()
            .status(),
        StatusCode::FORBIDDEN
    );
    server.inject_upload_status(id, 413);
    server.inject_upload_status(id, 307);
    assert_eq!(
        upload(url.clone(), job_token(&job)).await.unwrap().status(),
        StatusCode::PAYLOAD_TOO_LARGE
    );
    let no_redirects = Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(b"PK-zip".to_vec()).file_name("artifacts.zip"),
    );
    let response = no_redirects
        .post(url.clone())
        .header("JOB-TOKEN", job_token(&job))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TEMPORARY_REDIRECT);
    let location = header(&response, "location").unwrap();
    assert!(
        location.starts_with(&server.url()) && location.contains("artifact_type=archive"),
        "{location}"
    );
    assert_eq!(
        upload(location, job_token(&job)).await.unwrap().status(),
        StatusCode::CREATED
    );
    assert_eq!(
        upload(url, job_token(&job)).await.unwrap().status(),
        StatusCode::CREATED
    );

    let artifacts = server.job(id).artifacts;
    assert_eq!(artifacts.len(), 2);
    assert!(artifacts[0].via_redirect && !artifacts[1].via_redirect);
    assert_eq!(artifacts[1].filename.as_deref(), Some("artifacts.zip"));
    assert_eq!(artifacts[1].bytes, b"PK-zip");
    assert_eq!(artifacts[1].query["expire_in"], "1 week");
    assert_eq!(artifacts[1].query["artifact_type"], "archive");
    assert_eq!(artifacts[1].fields["artifact_format"], "zip");
}

#[tokio::test]
async fn dependency_artifacts_download_with_their_own_token_and_via_object_storage() {
    let (server, client, job) = running_job(&["make"]).await;
    let dependency = server.store_artifact(77, b"PK-dependency".to_vec());
    assert_eq!(dependency["id"], 77);
    assert_eq!(dependency["artifacts_file"]["size"], 13);
    let dep_token = dependency["token"].as_str().unwrap().to_owned();
    assert_eq!(server.job(77).state, "success");
    let url = api(&server, "jobs/77/artifacts");

    let response = client
        .get(&url)
        .header("JOB-TOKEN", &dep_token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.bytes().await.unwrap().as_ref(), b"PK-dependency");
    let response = client
        .get(&url)
        .header("JOB-TOKEN", job_token(&job))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::FORBIDDEN,
        "another job's token"
    );
    let response = client
        .get(api(&server, &format!("jobs/{}/artifacts", job_id(&job))))
        .header("JOB-TOKEN", job_token(&job))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND, "no archive yet");

    server.set_artifact_redirect(true);
    let no_redirects = Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let response = no_redirects
        .get(&url)
        .header("JOB-TOKEN", &dep_token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FOUND);
    let location = header(&response, "location").unwrap();
    assert!(
        location.starts_with(&format!("{}storage/", server.url())),
        "{location}"
    );
    let response = client.get(&location).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.bytes().await.unwrap().as_ref(), b"PK-dependency");
    assert!(server.violations().is_empty());

    // reqwest keeps custom headers on a same-host redirect: the leak is recorded.
    let response = client
        .get(&url)
        .header("JOB-TOKEN", &dep_token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let storage: Vec<_> = server
        .storage_requests()
        .iter()
        .map(|r| (r.job_id, r.had_job_token))
        .collect();
    assert_eq!(storage, [(77, false), (77, true)]);
    assert_eq!(server.violations().len(), 1);

    let tampered = format!("{}/wrong-key", location.rsplit_once('/').unwrap().0);
    assert_eq!(
        client.get(tampered).send().await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
}

#[tokio::test]
async fn every_request_is_recorded_and_unknown_endpoints_are_violations() {
    let server = GitLabServer::start().await;
    let client = Client::new();
    let response = client
        .post(api(&server, "runners/verify"))
        .header("X-Request-Id", "abc")
        .json(&json!({"token": "glrt-nope"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert!(header(&response, "x-request-id").is_some());
    let response = client
        .get(api(&server, "jobs/1/nothing"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let response = client
        .post(api(&server, "jobs/request"))
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);

    let requests = server.requests();
    let seen: Vec<_> = requests
        .iter()
        .map(|r| {
            (
                r.method.as_str(),
                r.path.as_str(),
                r.has_request_id,
                r.status,
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("POST", "/api/v4/runners/verify", true, Some(403)),
            ("GET", "/api/v4/jobs/1/nothing", false, Some(404)),
            ("POST", "/api/v4/jobs/request", false, Some(400)),
        ]
    );
    assert!(requests.windows(2).all(|w| w[0].at <= w[1].at));
    let violations = server.violations();
    assert_eq!(violations.len(), 2, "{violations:?}");
    assert!(violations[0].contains("unknown endpoint GET /api/v4/jobs/1/nothing"));
}

#[tokio::test]
async fn dropping_the_server_takes_gitlab_away_even_for_pooled_connections() {
    let server = GitLabServer::start().await;
    let client = Client::new();
    let url = api(&server, "user");
    assert_eq!(
        client.get(&url).send().await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    drop(server);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(client.get(&url).send().await.is_err());
}
