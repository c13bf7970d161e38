//! Self-test of the test GitHub in `support::github` and its runner stand-in; doubles as their usage guide.

use crate::support;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::http::HeaderMap;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use reqwest::header::{AUTHORIZATION, LINK, RETRY_AFTER};
use reqwest::{Client, Method, StatusCode};
use serde_json::{Value, json};
use support::github::{
    Access, AuthKind, DeliveryFault, FakeRunner, GitHubServer, JobSpec, Removal, RsaKey, RunSpec,
    app_jwt, sign_webhook,
};

const ORG: &str = "acme";
const REPO: &str = "acme/widgets";
const PAT: &str = "github_pat_11AAAAAAA0kilnTestToken";
const APP_ID: u64 = 4242;
const INSTALLATION: u64 = 77;

/// An organization `acme` with repositories `widgets` and `gadgets` and a PAT for all of it.
async fn server() -> GitHubServer {
    let server = GitHubServer::start().await;
    server.add_org(ORG);
    server.add_repo(REPO);
    server.add_repo("acme/gadgets");
    server.add_pat(PAT, ORG, Access::all());
    server
}

/// One answer: status, headers, JSON body (`Null` when empty).
struct Answer {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

async fn call(
    server: &GitHubServer,
    method: Method,
    path: &str,
    auth: Option<&str>,
    body: Option<Value>,
) -> Answer {
    let url = if path.starts_with("http") {
        path.to_owned()
    } else {
        format!("{}{path}", server.url())
    };
    let mut request = Client::new()
        .request(method, url)
        .header("accept", "application/vnd.github+json");
    if let Some(auth) = auth {
        request = request.header(AUTHORIZATION, auth);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.unwrap();
    Answer {
        status,
        headers,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    }
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

async fn get(server: &GitHubServer, path: &str) -> Answer {
    call(server, Method::GET, path, Some(&bearer(PAT)), None).await
}

async fn post(server: &GitHubServer, path: &str, body: Value) -> Answer {
    call(server, Method::POST, path, Some(&bearer(PAT)), Some(body)).await
}

async fn delete(server: &GitHubServer, path: &str) -> Answer {
    call(server, Method::DELETE, path, Some(&bearer(PAT)), None).await
}

fn jit_body(name: &str, labels: &[&str]) -> Value {
    json!({"name": name, "runner_group_id": 1, "labels": labels, "work_folder": "_work"})
}

/// Registers a repository runner; returns (runner id, encoded JIT config).
async fn jit(server: &GitHubServer, name: &str, labels: &[&str]) -> (u64, String) {
    let answer = post(
        server,
        &format!("/repos/{REPO}/actions/runners/generate-jitconfig"),
        jit_body(name, labels),
    )
    .await;
    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
    (
        answer.body["runner"]["id"].as_u64().unwrap(),
        answer.body["encoded_jit_config"]
            .as_str()
            .unwrap()
            .to_owned(),
    )
}

/// Polls `check` every 20 ms until it holds.
///
/// # Panics
/// After `within`.
async fn wait_until(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One webhook POST as received: headers and raw body.
type Hook = (HeaderMap, Vec<u8>);

/// A webhook receiver on 127.0.0.1 that answers `status` and keeps (headers, body) of each POST.
struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<Hook>>>,
}

impl Receiver {
    async fn start() -> Self {
        let got: Arc<Mutex<Vec<Hook>>> = Arc::default();
        let keep = got.clone();
        let app = axum::Router::new().route(
            "/hooks/github",
            axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
                let keep = keep.clone();
                async move {
                    keep.lock().unwrap().push((headers, body.to_vec()));
                    StatusCode::ACCEPTED
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hooks/github", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { url, got }
    }

    fn received(&self) -> Vec<Hook> {
        self.got.lock().unwrap().clone()
    }
}

#[test]
fn webhook_signature_matches_the_docs_test_vector() {
    assert_eq!(
        sign_webhook("It's a Secret to Everybody", b"Hello, World!"),
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    );
}

#[tokio::test]
async fn pat_authenticates_with_either_scheme_and_bad_credentials_get_401() {
    let server = server().await;
    let runs = format!("/repos/{REPO}/actions/runs");
    let ok = get(&server, &runs).await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(ok.body, json!({"total_count": 0, "workflow_runs": []}));
    let token_scheme = call(
        &server,
        Method::GET,
        &runs,
        Some(&format!("token {PAT}")),
        None,
    )
    .await;
    assert_eq!(token_scheme.status, StatusCode::OK);

    let wrong = call(
        &server,
        Method::GET,
        &runs,
        Some("Bearer github_pat_wrong"),
        None,
    )
    .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert_eq!(wrong.body["message"], "Bad credentials");
    let anonymous = call(&server, Method::GET, &runs, None, None).await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    assert_eq!(anonymous.body["message"], "Requires authentication");
    // Rate-limit headers on every answer, refusals included.
    for answer in [&ok, &wrong, &anonymous] {
        for name in [
            "x-ratelimit-limit",
            "x-ratelimit-remaining",
            "x-ratelimit-reset",
            "x-ratelimit-used",
            "x-ratelimit-resource",
        ] {
            assert!(answer.header(name).is_some(), "{name} missing");
        }
    }
    assert_eq!(ok.header("x-ratelimit-limit"), Some("5000"));
    assert_eq!(anonymous.header("x-ratelimit-limit"), Some("60"));

    let auths: Vec<(AuthKind, u16)> = server
        .requests()
        .iter()
        .map(|r| (r.auth, r.status))
        .collect();
    assert_eq!(
        auths,
        [
            (AuthKind::Pat, 200),
            (AuthKind::Pat, 200),
            (AuthKind::Invalid, 401),
            (AuthKind::Anonymous, 401),
        ]
    );
}

#[tokio::test]
async fn fine_grained_permissions_and_repository_access_are_enforced() {
    let server = server().await;
    let reader = "github_pat_reader";
    server.add_pat(
        reader,
        ORG,
        Access::repos(&["widgets"]).permission("administration", "read"),
    );
    let auth = bearer(reader);
    let refused = call(
        &server,
        Method::POST,
        &format!("/repos/{REPO}/actions/runners/generate-jitconfig"),
        Some(&auth),
        Some(jit_body("r1", &["linux"])),
    )
    .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert_eq!(
        refused.body["message"],
        "Resource not accessible by personal access token"
    );
    assert_eq!(
        refused.header("x-accepted-github-permissions"),
        Some("administration=write")
    );
    let listed = call(
        &server,
        Method::GET,
        &format!("/repos/{REPO}/actions/runners"),
        Some(&auth),
        None,
    )
    .await;
    assert_eq!(listed.status, StatusCode::OK);
    // A repository outside the token's selection does not exist for it.
    let other = call(
        &server,
        Method::GET,
        "/repos/acme/gadgets/actions/runs",
        Some(&auth),
        None,
    )
    .await;
    assert_eq!(other.status, StatusCode::NOT_FOUND);
    let repos = call(&server, Method::GET, "/orgs/acme/repos", Some(&auth), None).await;
    let names: Vec<&str> = repos
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["widgets"]);
    let all = get(&server, "/orgs/acme/repos").await;
    let names: Vec<&str> = all
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["full_name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["acme/gadgets", "acme/widgets"]);
}

#[tokio::test]
async fn app_jwt_mints_installation_tokens_that_expire_and_are_refreshed() {
    let server = server().await;
    let key = server.add_app(APP_ID);
    server.add_installation(APP_ID, INSTALLATION, ORG, Access::all());
    let jwt = bearer(&app_jwt(&key, APP_ID));

    let installation = call(
        &server,
        Method::GET,
        &format!("/app/installations/{INSTALLATION}"),
        Some(&jwt),
        None,
    )
    .await;
    assert_eq!(installation.status, StatusCode::OK);
    assert_eq!(installation.body["account"]["login"], ORG);
    assert_eq!(installation.body["app_id"], APP_ID);
    let by_repo = call(
        &server,
        Method::GET,
        &format!("/repos/{REPO}/installation"),
        Some(&jwt),
        None,
    )
    .await;
    assert_eq!(by_repo.body["id"], INSTALLATION);
    let by_org = call(
        &server,
        Method::GET,
        "/orgs/acme/installation",
        Some(&jwt),
        None,
    )
    .await;
    assert_eq!(by_org.body["id"], INSTALLATION);

    let tokens = format!("/app/installations/{INSTALLATION}/access_tokens");
    let minted = call(&server, Method::POST, &tokens, Some(&jwt), None).await;
    assert_eq!(minted.status, StatusCode::CREATED);
    let token = minted.body["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("ghs_") && token.len() == 40, "{token}");
    assert_eq!(minted.body["permissions"]["administration"], "write");
    assert_eq!(minted.body["repository_selection"], "all");
    let expires: chrono::DateTime<chrono::Utc> =
        minted.body["expires_at"].as_str().unwrap().parse().unwrap();
    let left = expires - chrono::Utc::now();
    assert!(
        left > chrono::Duration::minutes(59) && left <= chrono::Duration::minutes(60),
        "{left}"
    );

    let runs = format!("/repos/{REPO}/actions/runs");
    let used = call(&server, Method::GET, &runs, Some(&bearer(&token)), None).await;
    assert_eq!(used.status, StatusCode::OK);
    // The installation's token lists its repositories; the App's JWT may not.
    let repos = call(
        &server,
        Method::GET,
        "/installation/repositories?per_page=1",
        Some(&bearer(&token)),
        None,
    )
    .await;
    assert_eq!(repos.body["total_count"], 2);
    assert_eq!(repos.body["repositories"].as_array().unwrap().len(), 1);
    assert!(repos.header("link").unwrap().contains("rel=\"next\""));
    let jwt_on_repo = call(&server, Method::GET, &runs, Some(&jwt), None).await;
    assert_eq!(jwt_on_repo.status, StatusCode::FORBIDDEN);

    server.expire_installation_tokens();
    let expired = call(&server, Method::GET, &runs, Some(&bearer(&token)), None).await;
    assert_eq!(expired.status, StatusCode::UNAUTHORIZED);
    assert_eq!(expired.body["message"], "Bad credentials");
    let again = call(&server, Method::POST, &tokens, Some(&jwt), None).await;
    let fresh = again.body["token"].as_str().unwrap();
    assert_ne!(fresh, token);
    assert_eq!(
        call(&server, Method::GET, &runs, Some(&bearer(fresh)), None)
            .await
            .status,
        StatusCode::OK
    );

    // A zero lifetime: the token is dead on arrival.
    server.set_installation_token_lifetime(Duration::ZERO);
    let short = call(&server, Method::POST, &tokens, Some(&jwt), None).await;
    let short = short.body["token"].as_str().unwrap();
    assert_eq!(
        call(&server, Method::GET, &runs, Some(&bearer(short)), None)
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );

    let minted: Vec<u64> = server
        .installation_tokens()
        .iter()
        .map(|t| t.installation_id)
        .collect();
    assert_eq!(minted, [INSTALLATION; 3]);
    let kinds: Vec<(AuthKind, Option<u64>)> = server
        .requests()
        .iter()
        .filter(|r| r.path == runs)
        .map(|r| (r.auth, r.installation))
        .collect();
    assert_eq!(
        kinds,
        [
            (AuthKind::Installation, Some(INSTALLATION)),
            (AuthKind::AppJwt, None),
            (AuthKind::Invalid, None),
            (AuthKind::Installation, Some(INSTALLATION)),
            (AuthKind::Invalid, None),
        ]
    );
}

#[tokio::test]
async fn app_jwts_are_checked_like_github_does() {
    let server = server().await;
    let key = server.add_app(APP_ID);
    server.add_installation(APP_ID, INSTALLATION, ORG, Access::all());
    let tokens = format!("/app/installations/{INSTALLATION}/access_tokens");
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let try_jwt = |jwt: String| {
        let server = &server;
        let tokens = tokens.clone();
        async move { call(server, Method::POST, &tokens, Some(&bearer(&jwt)), None).await }
    };

    let by_client_id = try_jwt(key.sign_jwt(
        &json!({"iat": now - 60, "exp": now + 540, "iss": server.app_client_id(APP_ID)}),
    ))
    .await;
    assert_eq!(by_client_id.status, StatusCode::CREATED);
    let as_string = try_jwt(
        key.sign_jwt(&json!({"iat": now - 60, "exp": now + 540, "iss": APP_ID.to_string()})),
    )
    .await;
    assert_eq!(as_string.status, StatusCode::CREATED);

    let cases = [
        (
            json!({"iat": now - 60, "exp": now + 11 * 60, "iss": APP_ID}),
            "'Expiration time' claim ('exp') is too far in the future",
        ),
        (
            json!({"iat": now - 700, "exp": now - 100, "iss": APP_ID}),
            "'Expiration time' claim ('exp') must be a numeric value representing the future time at which the assertion expires",
        ),
        (
            json!({"iat": now + 120, "exp": now + 500, "iss": APP_ID}),
            "'Issued at' claim ('iat') must be an Integer representing the time that the assertion was issued",
        ),
        (
            json!({"iat": now - 60, "exp": now + 540, "iss": 999}),
            "A JSON web token could not be decoded",
        ),
    ];
    for (claims, message) in cases {
        let refused = try_jwt(key.sign_jwt(&claims)).await;
        assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{claims}");
        assert_eq!(refused.body["message"], message, "{claims}");
    }
    // Signed with a key that is not the App's.
    let stranger = RsaKey::generate();
    let forged = try_jwt(app_jwt(&stranger, APP_ID)).await;
    assert_eq!(forged.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        forged.body["message"],
        "A JSON web token could not be decoded"
    );
    // A PAT where a JWT is needed.
    let pat = post(&server, &tokens, json!({})).await;
    assert_eq!(pat.status, StatusCode::UNAUTHORIZED);
    assert_eq!(pat.body["message"], "A JSON web token could not be decoded");
    // Another App's installation does not exist for this one.
    server.add_app(APP_ID + 1);
    let other = try_jwt(app_jwt(&key, APP_ID + 1)).await;
    assert_eq!(other.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn installation_tokens_can_be_narrowed_to_repositories() {
    let server = server().await;
    let key = server.add_app(APP_ID);
    server.add_installation(APP_ID, INSTALLATION, ORG, Access::all());
    let jwt = bearer(&app_jwt(&key, APP_ID));
    let tokens = format!("/app/installations/{INSTALLATION}/access_tokens");
    let narrowed = call(
        &server,
        Method::POST,
        &tokens,
        Some(&jwt),
        Some(json!({"repositories": ["widgets"]})),
    )
    .await;
    assert_eq!(narrowed.status, StatusCode::CREATED);
    assert_eq!(narrowed.body["repository_selection"], "selected");
    assert_eq!(narrowed.body["repositories"][0]["full_name"], REPO);
    let token = bearer(narrowed.body["token"].as_str().unwrap());
    assert_eq!(
        call(
            &server,
            Method::GET,
            "/repos/acme/widgets/actions/runs",
            Some(&token),
            None
        )
        .await
        .status,
        StatusCode::OK
    );
    assert_eq!(
        call(
            &server,
            Method::GET,
            "/repos/acme/gadgets/actions/runs",
            Some(&token),
            None
        )
        .await
        .status,
        StatusCode::NOT_FOUND
    );
    let unknown = call(
        &server,
        Method::POST,
        &tokens,
        Some(&jwt),
        Some(json!({"repositories": ["nope"]})),
    )
    .await;
    assert_eq!(unknown.status, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn runs_and_jobs_paginate_with_link_headers() {
    let server = server().await;
    let mut run_ids = Vec::new();
    for n in 0..5 {
        let run = server.enqueue_run(
            REPO,
            RunSpec::new("CI").job(JobSpec::new(
                &format!("build-{n}"),
                &["self-hosted", "linux"],
            )),
        );
        run_ids.push(run.run_id);
    }
    let first = get(
        &server,
        &format!("/repos/{REPO}/actions/runs?status=queued&per_page=2"),
    )
    .await;
    assert_eq!(first.body["total_count"], 5);
    let link = first.header("link").unwrap().to_owned();
    assert!(link.contains("page=2>; rel=\"next\""), "{link}");
    assert!(link.contains("page=3>; rel=\"last\""), "{link}");
    assert!(link.contains("status=queued"), "{link}");
    // Follow `next` to the end: every run once, newest first.
    let mut seen = Vec::new();
    let mut page = Some(first);
    while let Some(answer) = page {
        seen.extend(
            answer.body["workflow_runs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["id"].as_u64().unwrap()),
        );
        page = match next_link(&answer) {
            Some(next) => Some(get(&server, &next).await),
            None => None,
        };
    }
    run_ids.reverse();
    assert_eq!(seen, run_ids);
    let last = get(
        &server,
        &format!("/repos/{REPO}/actions/runs?per_page=2&page=3"),
    )
    .await;
    let link = last.header("link").unwrap();
    assert!(
        link.contains("rel=\"prev\"")
            && link.contains("rel=\"first\"")
            && !link.contains("rel=\"next\""),
        "{link}"
    );
    let beyond = get(
        &server,
        &format!("/repos/{REPO}/actions/runs?per_page=2&page=9"),
    )
    .await;
    assert_eq!(beyond.body["workflow_runs"], json!([]));
    assert_eq!(
        get(
            &server,
            &format!("/repos/{REPO}/actions/runs?status=in_progress")
        )
        .await
        .body["total_count"],
        0
    );

    let big = server.enqueue_run(
        REPO,
        RunSpec::new("Matrix")
            .job(JobSpec::new("a", &["linux"]))
            .job(JobSpec::new("b", &["linux"]))
            .job(JobSpec::new("c", &["linux"])),
    );
    let jobs = get(
        &server,
        &format!("/repos/{REPO}/actions/runs/{}/jobs?per_page=2", big.run_id),
    )
    .await;
    assert_eq!(jobs.body["total_count"], 3);
    assert_eq!(jobs.body["jobs"].as_array().unwrap().len(), 2);
    let rest = get(&server, &next_link(&jobs).unwrap()).await;
    let ids: Vec<u64> = jobs.body["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .chain(rest.body["jobs"].as_array().unwrap())
        .map(|j| j["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, big.job_ids);
    let job = &rest.body["jobs"][0];
    assert_eq!(job["status"], "queued");
    assert_eq!(job["labels"], json!(["linux"]));
    assert_eq!(job["runner_id"], Value::Null);
    assert_eq!(job["run_attempt"], 1);
    let one = get(
        &server,
        &format!("/repos/{REPO}/actions/jobs/{}", big.job_ids[2]),
    )
    .await;
    assert_eq!(one.body, *job);
    assert_eq!(
        get(
            &server,
            &format!("/repos/acme/gadgets/actions/jobs/{}", big.job_ids[2])
        )
        .await
        .status,
        StatusCode::NOT_FOUND
    );
}

fn next_link(answer: &Answer) -> Option<String> {
    let link = answer.header("link")?;
    link.split(',')
        .find(|l| l.contains("rel=\"next\""))
        .map(|l| {
            l.split(';')
                .next()
                .unwrap()
                .trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_owned()
        })
}

#[tokio::test]
async fn generate_jitconfig_answers_as_github_does() {
    let server = server().await;
    server.add_hosted_runner_group(ORG, 2, "GitHub-hosted");
    server.add_runner_group(ORG, 3, "kiln", None);
    let repo_path = format!("/repos/{REPO}/actions/runners/generate-jitconfig");
    let created = post(
        &server,
        &repo_path,
        jit_body("kiln-gh-1", &["linux", "X64"]),
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let runner = &created.body["runner"];
    assert_eq!(runner["name"], "kiln-gh-1");
    assert_eq!(runner["status"], "offline");
    assert_eq!(runner["busy"], false);
    assert_eq!(runner["os"], "unknown");
    let labels: Vec<(&str, &str)> = runner["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["name"].as_str().unwrap(), l["type"].as_str().unwrap()))
        .collect();
    assert_eq!(
        labels,
        [("linux", "custom"), ("X64", "custom")],
        "exactly the labels of the JIT call: GitHub adds no `self-hosted` to a JIT runner"
    );
    assert!(runner["labels"][0]["id"].is_u64());
    // The config is opaque base64 that carries a per-runner secret, never the caller's credentials.
    let encoded = created.body["encoded_jit_config"].as_str().unwrap();
    let decoded = String::from_utf8(STANDARD.decode(encoded).unwrap()).unwrap();
    assert!(decoded.contains(".runner") && decoded.contains(".credentials"));
    let files: Value = serde_json::from_str(&decoded).unwrap();
    let credentials = String::from_utf8(
        STANDARD
            .decode(files[".credentials"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert!(!credentials.contains(PAT) && !decoded.contains(PAT));

    let mut missing = jit_body("kiln-gh-2", &["linux"]);
    missing.as_object_mut().unwrap().remove("runner_group_id");
    let unprocessable = post(&server, &repo_path, missing).await;
    assert_eq!(unprocessable.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        unprocessable.body["message"],
        "Invalid input: object is missing required key: runner_group_id"
    );
    let no_labels = post(
        &server,
        &repo_path,
        json!({"name": "kiln-gh-2", "runner_group_id": 1, "labels": []}),
    )
    .await;
    assert_eq!(no_labels.status, StatusCode::UNPROCESSABLE_ENTITY);
    let not_json = call(&server, Method::POST, &repo_path, Some(&bearer(PAT)), None).await;
    assert_eq!(not_json.status, StatusCode::BAD_REQUEST);

    let org_path = "/orgs/acme/actions/runners/generate-jitconfig";
    let hosted = post(
        &server,
        org_path,
        json!({"name": "kiln-gh-2", "runner_group_id": 2, "labels": ["linux"]}),
    )
    .await;
    assert_eq!(hosted.status, StatusCode::FORBIDDEN);
    assert_eq!(
        hosted.body["message"],
        "GitHub hosted runner groups cannot be modified"
    );
    let unknown = post(
        &server,
        org_path,
        json!({"name": "kiln-gh-2", "runner_group_id": 99999, "labels": ["linux"]}),
    )
    .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    let custom = post(
        &server,
        org_path,
        json!({"name": "kiln-gh-2", "runner_group_id": 3, "labels": ["linux"]}),
    )
    .await;
    assert_eq!(custom.status, StatusCode::CREATED);
    assert_eq!(custom.body["runner"]["runner_group_id"], 3);

    let duplicate = post(&server, &repo_path, jit_body("KILN-GH-1", &["linux"])).await;
    assert_eq!(duplicate.status, StatusCode::CONFLICT);
    assert_eq!(
        duplicate.body["message"],
        "Already exists - A runner with the name KILN-GH-1 already exists."
    );
    assert_eq!(server.registered_runners().len(), 2);
}

#[tokio::test]
async fn runners_list_paginates_and_delete_removes_registrations() {
    let server = server().await;
    let mut ids = Vec::new();
    for n in 1..=3 {
        ids.push(jit(&server, &format!("kiln-gh-{n}"), &["linux"]).await.0);
    }
    let runners = format!("/repos/{REPO}/actions/runners");
    let first = get(&server, &format!("{runners}?per_page=2")).await;
    assert_eq!(first.body["total_count"], 3);
    assert_eq!(first.body["runners"].as_array().unwrap().len(), 2);
    let rest = get(&server, &next_link(&first).unwrap()).await;
    assert_eq!(rest.body["runners"][0]["id"], ids[2]);
    let named = get(&server, &format!("{runners}?name=kiln-gh-2")).await;
    assert_eq!(named.body["total_count"], 1);
    assert_eq!(named.body["runners"][0]["id"], ids[1]);
    assert_eq!(
        get(&server, &format!("{runners}/{}", ids[0])).await.body["name"],
        "kiln-gh-1"
    );
    // Repository runners are not the organization's.
    assert_eq!(
        get(&server, "/orgs/acme/actions/runners").await.body["total_count"],
        0
    );

    assert_eq!(
        delete(&server, &format!("{runners}/{}", ids[0]))
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        delete(&server, &format!("{runners}/{}", ids[0]))
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(&server, &format!("{runners}/{}", ids[0])).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        delete(&server, &format!("{runners}/424242")).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(get(&server, &runners).await.body["total_count"], 2);
    let records = server.runners();
    assert_eq!(records[0].removed, Some(Removal::Deleted));
    assert_eq!(records[1].removed, None);
    // A deleted runner's name may be registered again.
    jit(&server, "kiln-gh-1", &["linux"]).await;
}

#[tokio::test]
async fn fake_runner_runs_one_job_and_is_gone() {
    let server = server().await;
    let hooks = Receiver::start().await;
    server.set_webhook(&hooks.url, "hook-secret");
    let job_id = server
        .enqueue_run(
            REPO,
            RunSpec::new("CI").job(
                JobSpec::new("build", &["self-hosted", "Linux"])
                    .runs_for(Duration::from_millis(300)),
            ),
        )
        .job_ids[0];
    let (runner_id, config) = jit(
        &server,
        &format!("kiln-gh-{job_id}"),
        &["self-hosted", "linux"],
    )
    .await;

    let mut runner = FakeRunner::start(&config);
    let status = runner
        .wait(Duration::from_secs(30))
        .await
        .expect("the runner exits after its job");
    assert!(status.success(), "{status}; stderr: {}", runner.stderr());
    let stdout = runner.stdout();
    assert!(
        stdout.contains("Listening for Jobs")
            && stdout.contains("Job build completed with result: Succeeded"),
        "{stdout}"
    );

    let job = server.job(job_id).unwrap();
    assert_eq!(job.status, "completed");
    assert_eq!(job.conclusion.as_deref(), Some("success"));
    assert_eq!(job.runner_id, Some(runner_id));
    let listed = get(&server, &format!("/repos/{REPO}/actions/runners")).await;
    assert_eq!(listed.body["total_count"], 0);
    let record = &server.runners()[0];
    assert_eq!(
        (record.connected, record.job_id, record.removed),
        (true, Some(job_id), Some(Removal::AfterJob))
    );
    let rest = get(&server, &format!("/repos/{REPO}/actions/jobs/{job_id}")).await;
    assert_eq!(rest.body["runner_name"], format!("kiln-gh-{job_id}"));
    assert_eq!(rest.body["runner_group_id"], 1);
    assert!(rest.body["completed_at"].is_string());
    let run = get(
        &server,
        &format!("/repos/{REPO}/actions/runs?status=completed"),
    )
    .await;
    assert_eq!(run.body["workflow_runs"][0]["conclusion"], "success");

    server.settle_webhooks().await;
    let actions: Vec<String> = server
        .delivery_payloads()
        .iter()
        .map(|p| p["action"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(actions, ["queued", "in_progress", "completed"]);
    let received = hooks.received();
    assert_eq!(received.len(), 3);
    for (headers, body) in &received {
        assert_eq!(
            headers["x-hub-signature-256"].to_str().unwrap(),
            sign_webhook("hook-secret", body)
        );
        assert_eq!(headers["x-github-event"], "workflow_job");
        assert!(
            headers["user-agent"]
                .to_str()
                .unwrap()
                .starts_with("GitHub-Hookshot/")
        );
        assert_eq!(headers["content-type"], "application/json");
    }
    let completed: Value = serde_json::from_slice(&received[2].1).unwrap();
    let wj = &completed["workflow_job"];
    assert_eq!(wj["id"], job_id);
    assert_eq!(wj["conclusion"], "success");
    assert_eq!(wj["runner_id"], runner_id);
    assert_eq!(wj["runner_name"], format!("kiln-gh-{job_id}"));
    assert_eq!(wj["runner_group_id"], 1);
    assert_eq!(wj["labels"], json!(["self-hosted", "Linux"]));
    assert_eq!(wj["workflow_name"], "CI");
    assert!(wj["head_sha"].as_str().unwrap().len() == 40);
    assert_eq!(completed["repository"]["full_name"], REPO);
    assert_eq!(completed["repository"]["name"], "widgets");
    assert_eq!(completed["repository"]["owner"]["login"], ORG);
    assert_eq!(completed["organization"]["login"], ORG);
    assert!(completed.get("installation").is_none());
    let queued: Value = serde_json::from_slice(&received[0].1).unwrap();
    assert_eq!(queued["workflow_job"]["status"], "queued");
    assert_eq!(queued["workflow_job"]["runner_id"], Value::Null);
}

#[tokio::test]
async fn fake_runner_reads_its_env_variable_and_a_held_job_waits_for_the_test() {
    let server = server().await;
    let job_id = server
        .enqueue_run(
            REPO,
            RunSpec::new("CI").job(JobSpec::new("deploy", &["gpu"]).held()),
        )
        .job_ids[0];
    let other = server.enqueue_job(REPO, &["arm64"]);
    let (runner_id, config) = jit(&server, "kiln-gh-gpu", &["GPU", "linux"]).await;
    let mut runner = FakeRunner::start_with_env(&config);
    wait_until("the held job to start", Duration::from_secs(20), || {
        server
            .job(job_id)
            .is_some_and(|j| j.status == "in_progress")
    })
    .await;
    let listed = get(
        &server,
        &format!("/repos/{REPO}/actions/runners/{runner_id}"),
    )
    .await;
    assert_eq!(
        (
            listed.body["status"].as_str(),
            listed.body["busy"].as_bool()
        ),
        (Some("online"), Some(true))
    );
    assert_eq!(listed.body["os"], "Linux");
    let busy = delete(
        &server,
        &format!("/repos/{REPO}/actions/runners/{runner_id}"),
    )
    .await;
    assert_eq!(busy.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        busy.body["message"],
        "Bad request - Runner \"kiln-gh-gpu\" is still running a job"
    );
    // A job whose labels the runner lacks is not its.
    assert_eq!(server.job(other).unwrap().status, "queued");
    assert!(
        runner.wait(Duration::from_millis(300)).await.is_none(),
        "a held job keeps its runner"
    );

    server.finish_job(job_id, "failure");
    let status = runner
        .wait(Duration::from_secs(20))
        .await
        .expect("exits after the job");
    assert!(status.success(), "stderr: {}", runner.stderr());
    assert!(
        runner
            .stdout()
            .contains("Job deploy completed with result: Failed")
    );
    assert_eq!(
        server.job(job_id).unwrap().conclusion.as_deref(),
        Some("failure")
    );
}

#[tokio::test]
async fn a_runner_that_never_connects_stays_registered_offline_until_deleted() {
    let server = server().await;
    let job_id = server.enqueue_job(REPO, &["linux"]);
    let (runner_id, _config) = jit(&server, &format!("kiln-gh-{job_id}"), &["linux"]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let runner = get(
        &server,
        &format!("/repos/{REPO}/actions/runners/{runner_id}"),
    )
    .await;
    assert_eq!(
        (
            runner.body["status"].as_str(),
            runner.body["busy"].as_bool()
        ),
        (Some("offline"), Some(false))
    );
    assert_eq!(server.job(job_id).unwrap().status, "queued");
    let zombie = &server.registered_runners()[0];
    assert!(!zombie.connected && zombie.job_id.is_none());
    assert_eq!(
        delete(
            &server,
            &format!("/repos/{REPO}/actions/runners/{runner_id}")
        )
        .await
        .status,
        StatusCode::NO_CONTENT
    );
    assert!(server.registered_runners().is_empty());
}

#[tokio::test]
async fn a_jit_runner_has_exactly_the_labels_of_its_jit_call() {
    let server = server().await;
    let job = server.enqueue_job(REPO, &["self-hosted", "linux", "x64", "kiln"]);
    // `config.sh` would add self-hosted, Linux and X64; a JIT runner gets none of them.
    let (bare_id, bare) = jit(&server, "kiln-gh-bare", &["kiln"]).await;
    let mut bare_runner = FakeRunner::start(&bare);
    wait_until("the bare runner online", Duration::from_secs(20), || {
        server
            .runners()
            .iter()
            .any(|r| r.id == bare_id && r.status == "online")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        server.job(job).unwrap().status,
        "queued",
        "a runner without `self-hosted`, `Linux`, `X64` does not take the job"
    );
    let listed = get(&server, &format!("/repos/{REPO}/actions/runners/{bare_id}")).await;
    assert_eq!(listed.body["labels"].as_array().unwrap().len(), 1);
    assert_eq!(listed.body["labels"][0]["name"], "kiln");
    let (full_id, full) = jit(
        &server,
        "kiln-gh-full",
        &["self-hosted", "Linux", "X64", "kiln"],
    )
    .await;
    let mut full_runner = FakeRunner::start(&full);
    full_runner
        .wait(Duration::from_secs(30))
        .await
        .expect("the runner with every label takes the job and exits");
    let done = server.job(job).unwrap();
    assert_eq!(
        (done.status.as_str(), done.runner_id),
        ("completed", Some(full_id)),
        "labels match case-insensitively"
    );
    delete(&server, &format!("/repos/{REPO}/actions/runners/{bare_id}")).await;
    bare_runner
        .wait(Duration::from_secs(20))
        .await
        .expect("exits");
}

#[tokio::test]
async fn runner_groups_are_listed_with_their_visibility_and_repositories() {
    let server = server().await;
    server.add_runner_group(ORG, 7, "kiln-runners", Some(&["widgets"]));
    server.add_runner_group(ORG, 8, "everyone", None);
    let listed = get(&server, &format!("/orgs/{ORG}/actions/runner-groups")).await;
    assert_eq!(listed.status, StatusCode::OK);
    assert_eq!(listed.body["total_count"], 3);
    let groups: Vec<(u64, &str, &str, bool)> = listed.body["runner_groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["id"].as_u64().unwrap(),
                g["name"].as_str().unwrap(),
                g["visibility"].as_str().unwrap(),
                g["default"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        groups,
        [
            (1, "Default", "all", true),
            (7, "kiln-runners", "selected", false),
            (8, "everyone", "all", false)
        ]
    );
    let repos = get(
        &server,
        &format!("/orgs/{ORG}/actions/runner-groups/7/repositories"),
    )
    .await;
    assert_eq!(repos.body["total_count"], 1);
    assert_eq!(repos.body["repositories"][0]["full_name"], REPO);
    assert_eq!(
        get(
            &server,
            &format!("/orgs/{ORG}/actions/runner-groups/99/repositories")
        )
        .await
        .status,
        StatusCode::NOT_FOUND
    );
    // Reading groups takes organization self-hosted runners (read).
    server.add_pat(
        "github_pat_11AAAAAAA0noRunnersPerm",
        ORG,
        Access::all().permission("organization_self_hosted_runners", "none"),
    );
    let refused = call(
        &server,
        Method::GET,
        &format!("/orgs/{ORG}/actions/runner-groups"),
        Some(&bearer("github_pat_11AAAAAAA0noRunnersPerm")),
        None,
    )
    .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn conditional_requests_answer_304_without_costing_the_rate_limit() {
    let server = server().await;
    server.enqueue_job(REPO, &["linux"]);
    let path = format!("/repos/{REPO}/actions/runs?status=queued");
    let first = get(&server, &path).await;
    let etag = first.header("etag").expect("an ETag").to_owned();
    let remaining = |a: &Answer| {
        a.header("x-ratelimit-remaining")
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    let before = remaining(&first);
    let conditional = |tag: String| {
        let server = &server;
        let path = &path;
        async move {
            let response = Client::new()
                .get(format!("{}{path}", server.url()))
                .header(AUTHORIZATION, bearer(PAT))
                .header("if-none-match", tag)
                .send()
                .await
                .unwrap();
            (
                response.status(),
                response.headers().clone(),
                response.bytes().await.unwrap(),
            )
        }
    };
    let (status, headers, body) = conditional(etag.clone()).await;
    assert_eq!(status, StatusCode::NOT_MODIFIED);
    assert!(body.is_empty());
    let after: u64 = headers["x-ratelimit-remaining"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(after, before, "a 304 costs nothing");
    // A change answers afresh, with a new ETag, and costs one request.
    server.enqueue_job(REPO, &["linux"]);
    let (status, headers, _) = conditional(etag.clone()).await;
    assert_eq!(status, StatusCode::OK);
    assert_ne!(headers["etag"].to_str().unwrap(), etag);
    let charged: u64 = headers["x-ratelimit-remaining"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(charged, before - 1);
}

#[tokio::test]
async fn fake_runner_exits_when_its_registration_is_deleted() {
    let server = server().await;
    let (runner_id, config) = jit(&server, "kiln-gh-idle", &["linux"]).await;
    let mut runner = FakeRunner::start(&config);
    wait_until("the runner to come online", Duration::from_secs(20), || {
        server.runners()[0].status == "online"
    })
    .await;
    assert_eq!(
        delete(
            &server,
            &format!("/repos/{REPO}/actions/runners/{runner_id}")
        )
        .await
        .status,
        StatusCode::NO_CONTENT
    );
    let status = runner.wait(Duration::from_secs(20)).await.expect("exits");
    assert_eq!(status.code(), Some(4));
    assert!(
        runner
            .stderr()
            .contains("The runner registration has been deleted from the server"),
        "{}",
        runner.stderr()
    );
    // A job queued now finds no runner.
    let job = server.enqueue_job(REPO, &["linux"]);
    assert_eq!(server.job(job).unwrap().status, "queued");
}

#[tokio::test]
async fn fake_runner_refuses_bad_expired_and_used_configs() {
    let server = server().await;
    let mut garbage = FakeRunner::start("not-a-jit-config");
    assert_eq!(
        garbage.wait(Duration::from_secs(10)).await.unwrap().code(),
        Some(2)
    );
    assert!(
        garbage
            .stderr()
            .contains("the JIT configuration could not be decoded"),
        "{}",
        garbage.stderr()
    );
    let mut none = FakeRunner::spawn(&[], &[]);
    assert_eq!(
        none.wait(Duration::from_secs(10)).await.unwrap().code(),
        Some(2)
    );
    assert!(
        none.stderr().contains("ACTIONS_RUNNER_INPUT_JITCONFIG"),
        "{}",
        none.stderr()
    );

    server.set_jit_config_ttl(Some(Duration::ZERO));
    let (_, stale) = jit(&server, "kiln-gh-stale", &["linux"]).await;
    let mut expired = FakeRunner::start(&stale);
    assert_eq!(
        expired.wait(Duration::from_secs(10)).await.unwrap().code(),
        Some(3)
    );
    assert!(expired.stderr().contains("expired"), "{}", expired.stderr());
    server.set_jit_config_ttl(None);

    let job = server.enqueue_job(REPO, &["linux"]);
    let (_, config) = jit(&server, "kiln-gh-once", &["linux"]).await;
    let mut first = FakeRunner::start(&config);
    assert!(
        first.wait(Duration::from_secs(20)).await.unwrap().success(),
        "{}",
        first.stderr()
    );
    assert_eq!(
        server.job(job).unwrap().conclusion.as_deref(),
        Some("success")
    );
    let mut again = FakeRunner::start(&config);
    assert_eq!(
        again.wait(Duration::from_secs(10)).await.unwrap().code(),
        Some(3)
    );
    assert!(
        again.stderr().contains("already used"),
        "{}",
        again.stderr()
    );
}

#[tokio::test]
async fn sigterm_before_a_job_exits_promptly_and_leaves_an_offline_registration() {
    let server = server().await;
    let (_, config) = jit(&server, "kiln-gh-term", &["linux"]).await;
    let mut runner = FakeRunner::start(&config);
    wait_until("the runner to come online", Duration::from_secs(20), || {
        server.runners()[0].status == "online"
    })
    .await;
    let asked = Instant::now();
    runner.terminate();
    let status = runner
        .wait(Duration::from_secs(5))
        .await
        .expect("exits promptly on SIGTERM");
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(status.code(), Some(143));
    let record = &server.registered_runners()[0];
    assert_eq!(
        (record.status.as_str(), record.connected),
        ("offline", true)
    );
}

#[tokio::test]
async fn sigterm_during_a_job_reports_it_failed() {
    let server = server().await;
    let job = server
        .enqueue_run(
            REPO,
            RunSpec::new("CI")
                .job(JobSpec::new("long", &["linux"]).runs_for(Duration::from_secs(600))),
        )
        .job_ids[0];
    let (_, config) = jit(&server, "kiln-gh-long", &["linux"]).await;
    let mut runner = FakeRunner::start(&config);
    wait_until("the job to start", Duration::from_secs(20), || {
        server.job(job).unwrap().status == "in_progress"
    })
    .await;
    runner.terminate();
    let status = runner
        .wait(Duration::from_secs(5))
        .await
        .expect("exits promptly on SIGTERM");
    assert_eq!(status.code(), Some(143));
    assert_eq!(
        server.job(job).unwrap().conclusion.as_deref(),
        Some("failure")
    );
    assert_eq!(server.runners()[0].removed, Some(Removal::AfterJob));
}

#[tokio::test]
async fn a_lost_runner_fails_its_job_and_rerun_failed_jobs_queues_a_new_attempt() {
    let server = server().await;
    let run = server.enqueue_run(
        REPO,
        RunSpec::new("CI")
            .job(JobSpec::new("build", &["linux"]).held())
            .job(JobSpec::new("lint", &["lint"])),
    );
    let (build, lint) = (run.job_ids[0], run.job_ids[1]);
    let rerun = format!(
        "/repos/{REPO}/actions/runs/{}/rerun-failed-jobs",
        run.run_id
    );
    let (runner_id, config) = jit(&server, "kiln-gh-build", &["linux"]).await;
    let mut runner = FakeRunner::start(&config);
    wait_until("build to start", Duration::from_secs(20), || {
        server.job(build).unwrap().status == "in_progress"
    })
    .await;
    // One job running, one queued: the run is in progress, not queued.
    assert_eq!(
        get(
            &server,
            &format!("/repos/{REPO}/actions/runs?status=queued")
        )
        .await
        .body["total_count"],
        0
    );
    assert_eq!(
        get(
            &server,
            &format!("/repos/{REPO}/actions/runs?status=in_progress")
        )
        .await
        .body["total_count"],
        1
    );
    assert_eq!(
        post(&server, &rerun, json!({})).await.status,
        StatusCode::FORBIDDEN
    );

    // The pod is evicted mid-job: GitHub fails the job.
    runner.kill().await;
    server.lose_runner(runner_id);
    assert_eq!(
        server.job(build).unwrap().conclusion.as_deref(),
        Some("failure")
    );
    let (lint_runner, lint_config) = jit(&server, "kiln-gh-lint", &["lint"]).await;
    let mut linter = FakeRunner::start(&lint_config);
    assert!(
        linter
            .wait(Duration::from_secs(20))
            .await
            .unwrap()
            .success()
    );
    assert_eq!(server.job(lint).unwrap().runner_id, Some(lint_runner));
    let runs = get(
        &server,
        &format!("/repos/{REPO}/actions/runs/{}", run.run_id),
    )
    .await;
    assert_eq!(
        (
            runs.body["status"].as_str(),
            runs.body["conclusion"].as_str()
        ),
        (Some("completed"), Some("failure"))
    );

    let again = post(&server, &rerun, json!({"enable_debug_logging": false})).await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert_eq!(again.body, json!({}));
    assert_eq!(server.run_attempt(run.run_id), Some(2));
    let latest = get(
        &server,
        &format!("/repos/{REPO}/actions/runs/{}/jobs", run.run_id),
    )
    .await;
    let jobs: Vec<(u64, &str, u64)> = latest.body["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| {
            (
                j["id"].as_u64().unwrap(),
                j["status"].as_str().unwrap(),
                j["run_attempt"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(jobs.len(), 2);
    assert_eq!(jobs[0], (lint, "completed", 1));
    let (new_build, status, attempt) = jobs[1];
    assert!(
        new_build != build && status == "queued" && attempt == 2,
        "{jobs:?}"
    );
    let all = get(
        &server,
        &format!("/repos/{REPO}/actions/runs/{}/jobs?filter=all", run.run_id),
    )
    .await;
    assert_eq!(all.body["total_count"], 3);
    let first = get(
        &server,
        &format!("/repos/{REPO}/actions/runs/{}/attempts/1/jobs", run.run_id),
    )
    .await;
    let ids: Vec<u64> = first.body["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [build, lint]);
    assert_eq!(
        get(
            &server,
            &format!("/repos/{REPO}/actions/runs?status=queued")
        )
        .await
        .body["workflow_runs"][0]["run_attempt"],
        2
    );
    let runner_gone = server
        .runners()
        .into_iter()
        .find(|r| r.id == runner_id)
        .unwrap();
    assert_eq!(runner_gone.removed, Some(Removal::AfterJob));
}

#[tokio::test]
async fn webhook_deliveries_can_be_duplicated_dropped_missigned_and_redelivered() {
    let server = server().await;
    let hooks = Receiver::start().await;
    server.set_webhook(&hooks.url, "s3cret");
    server.set_webhook_installation(Some(INSTALLATION));
    server.fault_next_delivery(DeliveryFault::Duplicate);
    let first = server.enqueue_job(REPO, &["linux"]);
    server.fault_next_delivery(DeliveryFault::Drop);
    let second = server.enqueue_job(REPO, &["linux"]);
    let third = server.enqueue_job(REPO, &["linux"]);
    server.fault_delivery(third, "in_progress", DeliveryFault::BadSignature);
    let (_, config) = jit(&server, "kiln-gh-x", &["linux"]).await;
    let mut runner = FakeRunner::start(&config);
    assert!(
        runner
            .wait(Duration::from_secs(20))
            .await
            .unwrap()
            .success()
    );
    // The runner took the oldest job.
    assert_eq!(server.job(first).unwrap().status, "completed");
    let (_, config) = jit(&server, "kiln-gh-y", &["linux"]).await;
    let mut runner = FakeRunner::start(&config);
    assert!(
        runner
            .wait(Duration::from_secs(20))
            .await
            .unwrap()
            .success()
    );
    let (_, config) = jit(&server, "kiln-gh-z", &["linux"]).await;
    let mut runner = FakeRunner::start(&config);
    assert!(
        runner
            .wait(Duration::from_secs(20))
            .await
            .unwrap()
            .success()
    );
    server.settle_webhooks().await;

    let records = server.deliveries();
    let faults: Vec<(u64, &str, Option<DeliveryFault>)> = records
        .iter()
        .map(|d| (d.job_id, d.action.as_str(), d.fault))
        .collect();
    assert_eq!(
        &faults[..3],
        [
            (first, "queued", Some(DeliveryFault::Duplicate)),
            (second, "queued", Some(DeliveryFault::Drop)),
            (third, "queued", None)
        ]
    );
    assert!(faults.contains(&(third, "in_progress", Some(DeliveryFault::BadSignature))));
    assert_eq!(records.len(), 9);
    let received = hooks.received();
    // 9 deliveries, one dropped, one sent twice.
    assert_eq!(received.len(), 9);
    let ids: Vec<&str> = received
        .iter()
        .map(|(h, _)| h["x-github-delivery"].to_str().unwrap())
        .collect();
    assert_eq!(ids[0], ids[1]);
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 8);
    assert!(!ids.contains(&records[1].delivery_id.as_str()));
    let uuid = ids[0];
    assert!(uuid.len() == 36 && uuid.as_bytes()[14] == b'4', "{uuid}");
    let bad: Vec<&(HeaderMap, Vec<u8>)> = received
        .iter()
        .filter(|(h, b)| h["x-hub-signature-256"].to_str().unwrap() != sign_webhook("s3cret", b))
        .collect();
    assert_eq!(bad.len(), 1);
    let bad_payload: Value = serde_json::from_slice(&bad[0].1).unwrap();
    assert_eq!(
        (
            bad_payload["action"].as_str(),
            bad_payload["workflow_job"]["id"].as_u64()
        ),
        (Some("in_progress"), Some(third))
    );
    assert_eq!(bad_payload["installation"]["id"], INSTALLATION);
    assert_eq!(records[0].responses, [Ok(202), Ok(202)]);
    assert!(records[1].responses.is_empty());

    server.redeliver(&records[1].delivery_id);
    server.settle_webhooks().await;
    let received = hooks.received();
    let (headers, body) = received.last().unwrap();
    assert_eq!(
        headers["x-github-delivery"].to_str().unwrap(),
        records[1].delivery_id
    );
    assert_eq!(
        headers["x-hub-signature-256"].to_str().unwrap(),
        sign_webhook("s3cret", body)
    );
    assert!(server.deliveries().last().unwrap().redelivery);
}

#[tokio::test]
async fn rate_limits_count_down_and_can_be_forced() {
    let server = server().await;
    let runs = format!("/repos/{REPO}/actions/runs");
    let first = get(&server, &runs).await;
    assert_eq!(
        (
            first.header("x-ratelimit-remaining"),
            first.header("x-ratelimit-used"),
            first.header("x-ratelimit-resource")
        ),
        (Some("4999"), Some("1"), Some("core"))
    );
    let reset: u64 = first.header("x-ratelimit-reset").unwrap().parse().unwrap();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        reset > now + 3500 && reset <= now + 3600,
        "{reset} vs {now}"
    );

    server.set_rate_limit(2, Duration::from_millis(600));
    assert_eq!(get(&server, &runs).await.status, StatusCode::OK);
    assert_eq!(
        get(&server, &runs).await.header("x-ratelimit-remaining"),
        Some("0")
    );
    let over = get(&server, &runs).await;
    assert_eq!(over.status, StatusCode::FORBIDDEN);
    assert_eq!(over.header("x-ratelimit-remaining"), Some("0"));
    assert!(
        over.body["message"]
            .as_str()
            .unwrap()
            .starts_with("API rate limit exceeded")
    );
    // Not counted: /rate_limit.
    let limit = get(&server, "/rate_limit").await;
    assert_eq!(limit.body["resources"]["core"]["remaining"], 0);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(get(&server, &runs).await.status, StatusCode::OK);

    server.set_rate_limit(5000, Duration::from_secs(3600));
    server.secondary_rate_limit(Duration::from_millis(400), 429, Duration::from_secs(7));
    let secondary = get(&server, &runs).await;
    assert_eq!(secondary.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(secondary.headers.get(RETRY_AFTER).unwrap(), "7");
    assert!(
        secondary.body["message"]
            .as_str()
            .unwrap()
            .contains("secondary rate limit")
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(get(&server, &runs).await.status, StatusCode::OK);

    server.exhaust_rate_limit(Duration::from_millis(400), 403);
    let exhausted = get(&server, &runs).await;
    assert_eq!(exhausted.status, StatusCode::FORBIDDEN);
    assert_eq!(exhausted.header("x-ratelimit-remaining"), Some("0"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let back = get(&server, &runs).await;
    assert_eq!(back.status, StatusCode::OK);
    assert!(back.headers.get(LINK).is_none());
}

/// octocrab, kiln's GitHub client, against the server: its App flow and its typed models.
mod octocrab_client {
    use super::*;
    use octocrab::Octocrab;
    use octocrab::models::{AppId, InstallationId, RunId, RunnerGroupId, RunnerId};

    fn pat_client(server: &GitHubServer) -> Octocrab {
        Octocrab::builder()
            .base_uri(server.url())
            .unwrap()
            .personal_token(PAT.to_owned())
            .build()
            .unwrap()
    }

    #[tokio::test]
    async fn app_auth_mints_an_installation_token_and_refreshes_it_after_a_401() {
        let server = server().await;
        let key = server.add_app(APP_ID);
        server.add_installation(APP_ID, INSTALLATION, ORG, Access::all());
        server.enqueue_job(REPO, &["linux"]);
        // kiln reads the key from the file a user downloaded from GitHub.
        let dir = tempfile::tempdir().unwrap();
        let path = key.write_private_key(dir.path(), "app.pem");
        let pem = std::fs::read(&path).unwrap();
        assert!(
            String::from_utf8_lossy(&pem)
                .starts_with(&format!("-----BEGIN {}-----\n", "RSA PRIVATE KEY"))
        );
        let app = Octocrab::builder()
            .base_uri(server.url())
            .unwrap()
            .app(
                AppId(APP_ID),
                octocrab::auth::EncodingKey::from_rsa_pem(&pem).unwrap(),
            )
            .build()
            .unwrap();
        let installation = app
            .apps()
            .get_repository_installation(ORG, "widgets")
            .await
            .unwrap();
        assert_eq!(installation.id, InstallationId(INSTALLATION));
        let client = app.installation(installation.id).unwrap();

        let runs = client
            .workflows(ORG, "widgets")
            .list_all_runs()
            .status("queued")
            .send()
            .await
            .unwrap();
        assert_eq!(runs.total_count, Some(1));
        client
            .workflows(ORG, "widgets")
            .list_all_runs()
            .send()
            .await
            .unwrap();
        assert_eq!(server.installation_tokens().len(), 1, "the token is cached");

        // The token is revoked server-side; octocrab still thinks it valid, gets 401, mints anew.
        server.expire_installation_tokens();
        let again = client
            .workflows(ORG, "widgets")
            .list_all_runs()
            .send()
            .await
            .unwrap();
        assert_eq!(again.items.len(), 1);
        assert_eq!(server.installation_tokens().len(), 2);
        let statuses: Vec<(String, u16, AuthKind)> = server
            .requests()
            .iter()
            .map(|r| {
                (
                    r.path.split('?').next().unwrap().to_owned(),
                    r.status,
                    r.auth,
                )
            })
            .collect();
        let runs_path = format!("/repos/{REPO}/actions/runs");
        let tokens_path = format!("/app/installations/{INSTALLATION}/access_tokens");
        assert_eq!(
            statuses,
            [
                (format!("/repos/{REPO}/installation"), 200, AuthKind::AppJwt),
                (tokens_path.clone(), 201, AuthKind::AppJwt),
                (runs_path.clone(), 200, AuthKind::Installation),
                (runs_path.clone(), 200, AuthKind::Installation),
                (runs_path.clone(), 401, AuthKind::Invalid),
                (tokens_path, 201, AuthKind::AppJwt),
                (runs_path, 200, AuthKind::Installation),
            ]
        );
    }

    #[tokio::test]
    async fn typed_calls_parse_the_servers_json() {
        let server = server().await;
        server.add_runner_group(ORG, 3, "kiln", Some(&["widgets"]));
        let run = server.enqueue_run(
            REPO,
            RunSpec::new("CI")
                .job(JobSpec::new("build", &["self-hosted", "linux"]))
                .job(JobSpec::new("test", &["self-hosted", "linux"])),
        );
        let crab = pat_client(&server);
        let workflows = crab.workflows(ORG, "widgets");
        let runs = workflows
            .list_all_runs()
            .status("queued")
            .per_page(1u8)
            .send()
            .await
            .unwrap();
        assert_eq!(runs.items[0].id, RunId(run.run_id));
        assert_eq!(runs.items[0].status, "queued");
        let jobs = workflows
            .list_jobs(RunId(run.run_id))
            .per_page(1u8)
            .send()
            .await
            .unwrap();
        assert_eq!((jobs.total_count, jobs.items.len()), (Some(2), 1));
        assert!(jobs.next.is_some());
        // A PAT client follows `Link` URLs with its credentials.
        let rest: octocrab::Page<octocrab::models::workflows::Job> =
            crab.get_page(&jobs.next).await.unwrap().unwrap();
        assert_eq!(*rest.items[0].id, run.job_ids[1]);
        let job = workflows
            .get_job(octocrab::models::JobId(run.job_ids[0]))
            .await
            .unwrap();
        assert_eq!(job.labels, ["self-hosted", "linux"]);
        assert_eq!(job.status, octocrab::models::workflows::Status::Queued);
        assert!(job.runner_id.is_none());

        let actions = crab.actions();
        let jit = actions
            .create_repo_jit_runner_config(
                ORG,
                "widgets",
                "kiln-gh-1",
                RunnerGroupId(1),
                vec!["linux".to_owned()],
            )
            .work_folder("_work")
            .send()
            .await
            .unwrap();
        assert_eq!(jit.runner.name, "kiln-gh-1");
        let org_jit = actions
            .create_org_jit_runner_config(
                ORG,
                "kiln-gh-2",
                RunnerGroupId(3),
                vec!["self-hosted".to_owned(), "linux".to_owned()],
            )
            .send()
            .await
            .unwrap();
        assert_eq!(org_jit.runner.runner_group_id, Some(RunnerGroupId(3)));
        let listed = actions
            .list_repo_self_hosted_runners(ORG, "widgets")
            .send()
            .await
            .unwrap();
        assert_eq!(listed.items, std::slice::from_ref(&jit.runner));
        let org_listed = actions
            .list_org_self_hosted_runners(ORG)
            .send()
            .await
            .unwrap();
        assert_eq!(org_listed.total_count, Some(1));
        let one = actions
            .get_repo_runner(ORG, "widgets", jit.runner.id)
            .await
            .unwrap();
        assert_eq!(one.status, "offline");

        // An org runner in group 3 runs a widgets job.
        let mut runner = FakeRunner::start(&org_jit.encoded_jit_config);
        assert!(
            runner
                .wait(Duration::from_secs(20))
                .await
                .unwrap()
                .success(),
            "{}",
            runner.stderr()
        );
        let done = workflows
            .get_job(octocrab::models::JobId(run.job_ids[0]))
            .await
            .unwrap();
        assert_eq!(
            done.conclusion,
            Some(octocrab::models::workflows::Conclusion::Success)
        );
        assert_eq!(done.runner_group_id, Some(3));
        assert_eq!(done.runner_name.as_deref(), Some("kiln-gh-2"));

        actions
            .delete_repo_runner(ORG, "widgets", jit.runner.id)
            .await
            .unwrap();
        let missing = actions
            .delete_repo_runner(ORG, "widgets", RunnerId(*jit.runner.id))
            .await;
        assert!(
            matches!(missing, Err(octocrab::Error::GitHub { ref source, .. }) if source.status_code == StatusCode::NOT_FOUND),
            "{missing:?}"
        );
        let conflict = actions
            .create_org_jit_runner_config(
                ORG,
                "kiln-gh-new",
                RunnerGroupId(99999),
                vec!["linux".to_owned()],
            )
            .send()
            .await;
        assert!(
            matches!(conflict, Err(octocrab::Error::GitHub { ref source, .. }) if source.status_code == StatusCode::NOT_FOUND),
            "{conflict:?}"
        );

        // Nothing failed: there is nothing to re-run.
        let (_, config) = super::jit(&server, "kiln-gh-3", &["self-hosted", "linux"]).await;
        let mut runner = FakeRunner::start(&config);
        assert!(
            runner
                .wait(Duration::from_secs(20))
                .await
                .unwrap()
                .success()
        );
        let refused = workflows.rerun_failed_jobs(RunId(run.run_id)).await;
        assert!(refused.is_err(), "nothing failed");
        let repos = crab.orgs(ORG).list_repos().send().await.unwrap();
        assert_eq!(repos.items.len(), 2);
    }

    /// octocrab 0.54 sends an installation token only to `api.github.com` or to a relative URI:
    /// following an absolute `Link` URL of any other host (GHES, this server) goes out without
    /// credentials, gets 401, mints a new token and fails again. Paging with a path-only URI (or
    /// `.page(n)`) works. If the first half of this fails, octocrab fixed it.
    #[tokio::test]
    async fn octocrab_installation_client_needs_path_only_link_urls() {
        let server = server().await;
        let key = server.add_app(APP_ID);
        server.add_installation(APP_ID, INSTALLATION, ORG, Access::all());
        for _ in 0..3 {
            server.enqueue_job(REPO, &["linux"]);
        }
        let app = Octocrab::builder()
            .base_uri(server.url())
            .unwrap()
            .app(
                AppId(APP_ID),
                octocrab::auth::EncodingKey::from_rsa_pem(key.private_key_pem().as_bytes())
                    .unwrap(),
            )
            .build()
            .unwrap();
        let client = app.installation(InstallationId(INSTALLATION)).unwrap();
        let first = client
            .workflows(ORG, "widgets")
            .list_all_runs()
            .per_page(1u8)
            .send()
            .await
            .unwrap();
        let next = first.next.clone().unwrap();
        assert_eq!(
            next.authority().map(|a| a.as_str().to_owned()),
            Some(server.url().trim_start_matches("http://").to_owned())
        );
        let absolute = client
            .get_page::<octocrab::models::workflows::Run>(&first.next)
            .await;
        assert!(
            matches!(absolute, Err(octocrab::Error::GitHub { ref source, .. }) if source.status_code == StatusCode::UNAUTHORIZED),
            "{absolute:?}"
        );
        let anonymous = server
            .requests()
            .iter()
            .filter(|r| r.auth == AuthKind::Anonymous)
            .count();
        assert_eq!(anonymous, 2, "sent twice without credentials");

        let relative: axum::http::Uri = next.path_and_query().unwrap().as_str().parse().unwrap();
        let second = client
            .get_page::<octocrab::models::workflows::Run>(&Some(relative))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(second.items.len(), 1);
        let third = client
            .workflows(ORG, "widgets")
            .list_all_runs()
            .per_page(1u8)
            .page(3u32)
            .send()
            .await
            .unwrap();
        assert_eq!(third.items.len(), 1);
        assert!(third.next.is_none());
    }
}

/// The enterprise runner endpoints take only a personal access token (classic) of an
/// enterprise owner with `manage_runners:enterprise`, as GitHub documents for each of them:
/// fine-grained tokens and installation tokens are refused, a classic token without the scope
/// is told which scopes it needs, and runners registered there take the jobs of the
/// enterprise's organizations.
#[tokio::test]
async fn enterprise_runner_endpoints_want_a_classic_token_with_manage_runners() {
    let server = server().await;
    server.add_enterprise("megacorp", &[ORG], &["ent-admin"]);
    let classic = "classic_kiln_test_token_full";
    let unscoped = "classic_kiln_test_token_repo";
    server.add_pat(
        classic,
        "ent-admin",
        Access::classic(&["manage_runners:enterprise", "repo"]),
    );
    server.add_pat(unscoped, "ent-admin", Access::classic(&["repo"]));
    let runners = "/enterprises/megacorp/actions/runners";
    let fine_grained = get(&server, runners).await;
    assert_eq!(
        fine_grained.status,
        StatusCode::FORBIDDEN,
        "{:?}",
        fine_grained.body
    );
    let no_scope = call(&server, Method::GET, runners, Some(&bearer(unscoped)), None).await;
    assert_eq!(no_scope.status, StatusCode::FORBIDDEN);
    assert!(
        no_scope
            .header("x-accepted-oauth-scopes")
            .is_some_and(|s| s.contains("manage_runners:enterprise")),
        "{:?}",
        no_scope.headers
    );
    let jit = call(
        &server,
        Method::POST,
        &format!("{runners}/generate-jitconfig"),
        Some(&bearer(classic)),
        Some(jit_body("ent-1", &["kiln"])),
    )
    .await;
    assert_eq!(jit.status, StatusCode::CREATED, "{:?}", jit.body);
    let listed = call(&server, Method::GET, runners, Some(&bearer(classic)), None).await;
    assert_eq!(listed.status, StatusCode::OK);
    assert_eq!(listed.body["runners"][0]["name"], "ent-1");
    assert_eq!(server.registered_runners()[0].scope, "enterprise megacorp");
    // The same token lists the runs of the enterprise's repositories (scope `repo`).
    let runs = call(
        &server,
        Method::GET,
        &format!("/repos/{REPO}/actions/runs"),
        Some(&bearer(classic)),
        None,
    )
    .await;
    assert_eq!(runs.status, StatusCode::OK, "{:?}", runs.body);
    let id = jit.body["runner"]["id"].as_u64().unwrap();
    let gone = call(
        &server,
        Method::DELETE,
        &format!("{runners}/{id}"),
        Some(&bearer(classic)),
        None,
    )
    .await;
    assert_eq!(gone.status, StatusCode::NO_CONTENT);
}
