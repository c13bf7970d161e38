//! The status page and its API through the router, without a socket.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode, header};
use tower::ServiceExt as _;

use super::{AppState, StatusAccess, StatusPage, router};
use crate::build::{About, BuildKey, FailureReason, Outcome, SourceKind};
use crate::coordinator::{BuildRecord, End, Status};
use crate::executor::Footprint;
use crate::telemetry::Metrics;

fn record(id: u64, outcome: Outcome) -> BuildRecord {
    let launched = SystemTime::now() - Duration::from_secs(60);
    BuildRecord {
        key: BuildKey {
            source: SourceKind::GitLab,
            runner: "main".into(),
            id,
        },
        name: format!("kiln-gl-{id}"),
        about: About {
            project: "group/app".into(),
            job: format!("job {id}"),
            pipeline: Some("77".into()),
            url: Some(format!("https://gitlab.example.com/group/app/-/jobs/{id}")),
            queued_at: Some(launched - Duration::from_secs(5)),
        },
        footprint: Some(Footprint {
            class: Some("spot".into()),
            vcpu: 2.0,
            gib: 4.0,
            ..Footprint::default()
        }),
        launched,
        created: Some(launched + Duration::from_millis(300)),
        running: Some(launched + Duration::from_secs(4)),
        end: Some(End {
            at: launched + Duration::from_secs(50),
            outcome,
            detail: "the build agent reported the job".into(),
            exit_code: Some(1),
            cost: Some(0.25),
        }),
    }
}

fn state(finished: Vec<BuildRecord>, token: Option<&str>) -> AppState {
    AppState {
        metrics: Metrics::new(),
        status: Status::with_history(Vec::new(), finished, 1000, 4),
        jenkins_hooks: Vec::new(),
        github_hooks: Vec::new(),
        body_timeout: Duration::from_secs(1),
        status_page: StatusPage {
            access: StatusAccess {
                token: token.map(str::to_owned),
            },
            ..StatusPage::default()
        },
    }
}

async fn get(state: AppState, uri: &str, peer: Option<&str>) -> (StatusCode, String) {
    let mut request = Request::get(uri).body(Body::empty()).unwrap();
    if let Some(peer) = peer {
        let addr: SocketAddr = peer.parse().unwrap();
        request.extensions_mut().insert(ConnectInfo(addr));
    }
    let response = router(state).oneshot(request).await.unwrap();
    let status = response.status();
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test]
async fn without_a_token_only_loopback_clients_see_the_status_page() {
    for path in ["/", "/api/v1/builds", "/api/v1/sources", "/api/v1/costs"] {
        let (status, _) = get(state(Vec::new(), None), path, Some("127.0.0.1:5000")).await;
        assert_eq!(status, StatusCode::OK, "{path} from loopback");
        let (status, _) = get(state(Vec::new(), None), path, Some("[::1]:5000")).await;
        assert_eq!(status, StatusCode::OK, "{path} from ::1");
        let (status, body) = get(state(Vec::new(), None), path, Some("10.0.0.7:5000")).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path} from the network");
        assert!(body.contains("status.token"), "{body}");
        let (status, _) = get(state(Vec::new(), None), path, None).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path} from an unknown peer");
    }
    let (status, _) = get(state(Vec::new(), None), "/metrics", Some("10.0.0.7:5000")).await;
    assert_eq!(status, StatusCode::OK, "metrics stay open to Prometheus");
}

#[tokio::test]
async fn with_a_token_every_client_must_present_it() {
    let state = state(Vec::new(), Some("s3cret"));
    let (status, _) = get(state.clone(), "/", Some("127.0.0.1:5000")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "loopback needs it too");
    let request = |auth: &str| {
        Request::get("/api/v1/builds")
            .header(header::AUTHORIZATION, auth)
            .body(Body::empty())
            .unwrap()
    };
    for (auth, expected) in [
        ("Bearer s3cret", StatusCode::OK),
        ("Bearer s3cre", StatusCode::UNAUTHORIZED),
        // `kiln:s3cret` and `kiln:nope`.
        ("Basic a2lsbjpzM2NyZXQ=", StatusCode::OK),
        ("Basic a2lsbjpub3Bl", StatusCode::UNAUTHORIZED),
        ("Basic !!!", StatusCode::UNAUTHORIZED),
    ] {
        let response = router(state.clone()).oneshot(request(auth)).await.unwrap();
        assert_eq!(response.status(), expected, "{auth}");
    }
}

#[tokio::test]
async fn the_api_describes_each_build_in_plain_fields() {
    let finished = vec![
        record(1, Outcome::Succeeded),
        record(2, Outcome::Failed(FailureReason::ScriptFailure)),
    ];
    let (status, body) = get(
        state(finished.clone(), None),
        "/api/v1/builds?limit=1",
        Some("127.0.0.1:1"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    let builds = answer["builds"].as_array().unwrap();
    assert_eq!(builds.len(), 1, "?limit=1 gives the newest only");
    let build = &builds[0];
    assert_eq!(build["name"], "kiln-gl-2");
    assert_eq!(build["state"], "failed");
    assert_eq!(build["reason"], "script_failure");
    assert_eq!(build["class"], "spot");
    assert_eq!(build["cost"], 0.25);
    assert!(build["finished_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(answer["capacity"]["total"], 4);

    let (_, body) = get(state(finished, None), "/api/v1/costs", Some("127.0.0.1:1")).await;
    let costs: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(costs["projects"][0]["project"], "group/app");
    assert_eq!(costs["projects"][0]["builds"], 2);
    assert_eq!(costs["projects"][0]["cost"], 0.5);
    assert_eq!(costs["projects"][0]["pipelines"]["77"]["builds"], 2);
}

#[tokio::test]
async fn the_page_escapes_what_ci_servers_send_and_links_only_web_addresses() {
    let mut hostile = record(3, Outcome::Failed(FailureReason::ScriptFailure));
    hostile.about.project = "<script>alert(1)</script>".into();
    hostile.about.job = "\"><img src=x onerror=alert(1)>".into();
    hostile.about.url = Some("javascript:alert(1)".into());
    let (status, page) = get(state(vec![hostile], None), "/", Some("127.0.0.1:1")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(!page.contains("<script>"), "{page}");
    assert!(!page.contains("<img"), "{page}");
    assert!(
        page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{page}"
    );
    assert!(!page.contains("javascript:"), "{page}");
}

#[tokio::test]
async fn the_page_shows_the_latest_builds_and_offers_the_rest() {
    let finished: Vec<BuildRecord> = (1..=1000)
        .map(|id| record(id, Outcome::Succeeded))
        .collect();
    let state = state(finished, None);
    let (_, page) = get(state.clone(), "/", Some("127.0.0.1:1")).await;
    assert_eq!(page.matches("<g class=\"bar ").count(), 100);
    assert!(page.contains("900 more kept"), "a link to the rest");
    assert!(page.contains("0.2500 USD"), "costs are shown");
    let (_, page) = get(state, "/?show=1000", Some("127.0.0.1:1")).await;
    assert_eq!(page.matches("<g class=\"bar ").count(), 1000);
    assert!(page.contains("data-build=\"kiln-gl-1000\""));
}
