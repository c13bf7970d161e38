//! The warm pools' runners, one pass at a time: the source against a fake chain (floors as
//! the test sets them) and a fake REST API that registers JIT runners and refuses to delete
//! a runner it calls busy, as GitHub does.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State as Axum};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use serde_json::{Value, json};

use super::*;
use crate::sources::MemberState::{Idle, Retired, Taken};
use crate::sources::warm::fake::{self, FakeChain};

/// What the fake API saw: JIT registrations (id, name, labels) and deletes.
#[derive(Default)]
struct Api {
    registered: Vec<(u64, String, Vec<String>)>,
    deleted: Vec<u64>,
    /// Runners a delete is refused for (they run a job).
    busy: HashSet<u64>,
}

type Shared = Arc<Mutex<Api>>;

async fn register(Axum(api): Axum<Shared>, Json(body): Json<Value>) -> Response {
    let mut api = api.lock().unwrap();
    let id = 100 + api.registered.len() as u64;
    let name = body["name"].as_str().unwrap_or_default().to_owned();
    let labels: Vec<String> = body["labels"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l.as_str().map(str::to_owned))
        .collect();
    let runner = json!({
        "id": id, "name": name, "os": "unknown", "status": "offline", "busy": false,
        "runner_group_id": 1,
        "labels": labels.iter().map(|l| json!({"id": 1, "name": l, "type": "custom"})).collect::<Vec<_>>(),
    });
    api.registered.push((id, name, labels));
    let body = json!({"runner": runner, "encoded_jit_config": "e30="});
    (StatusCode::CREATED, Json(body)).into_response()
}

async fn unregister(Axum(api): Axum<Shared>, Path(id): Path<u64>) -> Response {
    let mut api = api.lock().unwrap();
    if api.busy.contains(&id) {
        let body = json!({
            "message": format!("Bad request - Runner {id} is still running a job\""),
            "documentation_url": "https://docs.github.com/rest/actions/self-hosted-runners",
        });
        return (StatusCode::UNPROCESSABLE_ENTITY, Json(body)).into_response();
    }
    api.deleted.push(id);
    StatusCode::NO_CONTENT.into_response()
}

struct Harness {
    source: GitHubSource,
    state: State,
    chain: Arc<FakeChain>,
    api: Shared,
}

async fn harness() -> Harness {
    let api: Shared = Arc::default();
    let router = axum::Router::new()
        .route(
            "/repos/acme/widgets/actions/runners/generate-jitconfig",
            post(register),
        )
        .route(
            "/repos/acme/widgets/actions/runners/{id}",
            delete(unregister),
        )
        .with_state(Arc::clone(&api));
    let address = fake::serve(router).await;
    let config: GitHubConfig = toml::from_str(&format!(
        r#"
api_url = "http://{address}"
owner = "acme"
repo = "widgets"
token = "a-test-token"
labels = ["kiln"]
label_classes = {{ gpu = "big" }}
"#
    ))
    .unwrap();
    let source = GitHubSource::new(&config, 0, Metrics::new());
    let chain = Arc::new(FakeChain::default());
    let (mut state, _, _) = source.start(Arc::clone(&chain) as Arc<dyn Chain>);
    state.api = Some(GitHubApi::connect(&config).await.unwrap());
    Harness {
        source,
        state,
        chain,
        api,
    }
}

fn floor(pool: &str, class: Option<&str>, min_idle: usize) -> WarmFloor {
    WarmFloor {
        pool: pool.into(),
        class: class.map(str::to_owned),
        label: None,
        min_idle,
        max_idle_age: None,
    }
}

impl Harness {
    async fn pass(&mut self) {
        self.source.settle(&mut self.state).await;
    }

    fn idle_runners(&self) -> Vec<String> {
        self.state
            .runners
            .iter()
            .filter(|(_, r)| r.phase == Phase::Idle)
            .map(|(name, _)| name.clone())
            .collect()
    }

    fn registered(&self) -> Vec<(u64, String, Vec<String>)> {
        self.api.lock().unwrap().registered.clone()
    }

    async fn job(&mut self, action: &str, id: u64, runner: Option<&str>) {
        let event: WorkflowJobEvent = serde_json::from_value(json!({
            "action": action,
            "workflow_job": {
                "id": id, "run_id": id * 10, "labels": ["self-hosted", "kiln"],
                "runner_name": runner, "name": "build", "html_url": null,
            },
            "repository": {"full_name": "acme/widgets"},
        }))
        .unwrap();
        self.source
            .handle(&mut self.state, Event::Webhook(Box::new(event)))
            .await;
    }
}

#[tokio::test]
async fn each_class_gets_its_floor_and_a_label_floor_is_ignored() {
    let mut h = harness().await;
    h.chain.set_floors(vec![
        floor("small", None, 2),
        floor("big", Some("big"), 1),
        WarmFloor {
            label: Some("maven".into()),
            ..floor("maven", None, 3)
        },
    ]);
    h.pass().await;
    let launched = h.chain.launched.lock().unwrap().clone();
    assert_eq!(launched.len(), 3, "2 small + 1 big, no label pool");
    let big: Vec<&Build> = launched.iter().filter(|b| b.class.is_some()).collect();
    assert_eq!(big.len(), 1);
    let class = big[0].class.as_ref().unwrap();
    assert_eq!(
        (class.name.as_str(), class.origin.as_str()),
        ("big", "warm pool big")
    );
    assert_eq!(big[0].annotations[ANNOTATION_POOL], "big");
    // A warm runner of a class carries the labels a job names that class with.
    let (_, _, labels) = h
        .registered()
        .into_iter()
        .find(|(_, name, _)| *name == big[0].name)
        .unwrap();
    assert!(labels.contains(&"kiln-class=big".to_owned()), "{labels:?}");
    assert!(labels.contains(&"gpu".to_owned()), "{labels:?}");
    for build in &launched {
        assert!(build.name.starts_with("kiln-gh-idle-"), "{}", build.name);
    }
    let members = h.chain.take_members();
    let pools: Vec<(&str, MemberState)> =
        members.iter().map(|(_, p, s)| (p.as_str(), *s)).collect();
    assert_eq!(pools, [("small", Idle), ("small", Idle), ("big", Idle)]);
    // Kept, not added to, at the next passes.
    h.pass().await;
    h.pass().await;
    assert_eq!(h.chain.launched.lock().unwrap().len(), 3);
    assert!(h.chain.take_members().is_empty());
}

#[tokio::test]
async fn a_floor_raised_then_lowered_retires_the_surplus_at_the_second_look() {
    let mut h = harness().await;
    h.chain.set_floors(vec![floor("warm", None, 1)]);
    h.pass().await;
    h.chain.set_floors(vec![floor("warm", None, 3)]);
    h.pass().await;
    assert_eq!(h.idle_runners().len(), 3);
    let first = h.chain.launched_names()[0].clone();
    assert_eq!(h.chain.take_members().len(), 3);
    h.chain.set_floors(vec![floor("warm", None, 1)]);
    h.pass().await;
    assert_eq!(
        h.idle_runners().len(),
        3,
        "one look only: GitHub may be handing one a job"
    );
    h.pass().await;
    let left = h.idle_runners();
    assert_eq!(left.len(), 1);
    assert_ne!(left[0], first, "the oldest go first");
    let members = h.chain.take_members();
    assert_eq!(members.len(), 2);
    assert!(
        members
            .iter()
            .all(|(_, pool, state)| pool == "warm" && *state == Retired)
    );
    assert_eq!(
        h.api.lock().unwrap().deleted.len(),
        2,
        "registrations removed"
    );
    assert_eq!(h.chain.stopped.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn a_runner_idle_past_max_idle_age_is_replaced() {
    let mut h = harness().await;
    h.chain.set_floors(vec![WarmFloor {
        max_idle_age: Some(Duration::from_millis(300)),
        ..floor("warm", None, 1)
    }]);
    h.pass().await;
    let old = h.idle_runners();
    tokio::time::sleep(Duration::from_millis(400)).await;
    h.pass().await;
    assert_eq!(h.idle_runners(), old, "one look only");
    h.pass().await;
    let new = h.idle_runners();
    assert_eq!(new.len(), 1);
    assert_ne!(new, old);
    assert_eq!(
        h.chain.take_members(),
        [
            (old[0].clone(), "warm".to_owned(), Idle),
            (old[0].clone(), "warm".to_owned(), Retired),
            (new[0].clone(), "warm".to_owned(), Idle),
        ]
    );
}

#[tokio::test]
async fn busy_runners_are_never_retired_and_members_are_reported_in_order() {
    let mut h = harness().await;
    h.chain.set_floors(vec![floor("warm", None, 2)]);
    h.pass().await;
    let [a, b] = <[String; 2]>::try_from(h.chain.launched_names()).unwrap();
    // A job goes to `a`: taken; the pool refills behind it.
    h.job("queued", 7, None).await;
    h.job("in_progress", 7, Some(&a)).await;
    h.pass().await;
    let c = h.chain.launched_names()[2].clone();
    // GitHub hands `b` a job just as the floor drops: the delete is refused, `b` is busy.
    let b_id = h.state.runners.get(&b).unwrap().detail.id.unwrap();
    h.api.lock().unwrap().busy.insert(b_id);
    h.chain.set_floors(Vec::new());
    h.pass().await;
    h.pass().await;
    h.pass().await;
    assert_eq!(h.state.runners.get(&a).unwrap().phase, Phase::Busy);
    assert_eq!(h.state.runners.get(&b).unwrap().phase, Phase::Busy);
    assert!(h.state.runners.get(&c).is_none(), "the idle one is retired");
    let stopped = h.chain.stopped.lock().unwrap().clone();
    assert_eq!(stopped, std::slice::from_ref(&c), "never a busy runner");
    let pool = |name: &String, state| (name.clone(), "warm".to_owned(), state);
    assert_eq!(
        h.chain.take_members(),
        [
            pool(&a, Idle),
            pool(&b, Idle),
            pool(&a, Taken),
            pool(&c, Idle),
            pool(&b, Taken),
            pool(&c, Retired),
        ]
    );
    // A warm runner that ended before it took a job was removed unused.
    h.chain.set_floors(vec![floor("warm", None, 1)]);
    h.pass().await;
    let d = h.chain.launched_names()[3].clone();
    let ending = Ending::failed(FailureReason::RunnerSystemFailure, "the pod was evicted");
    h.source
        .handle(&mut h.state, GitHubSource::ended_event(&d, &ending))
        .await;
    assert_eq!(h.chain.take_members(), [pool(&d, Idle), pool(&d, Retired)]);
}

#[tokio::test]
async fn a_runner_whose_job_went_elsewhere_stands_in_for_the_floor() {
    let mut h = harness().await;
    h.chain.set_floors(vec![floor("warm", None, 1)]);
    h.job("queued", 7, None).await;
    h.pass().await;
    let names = h.chain.launched_names();
    assert_eq!(
        names.len(),
        2,
        "one for the job, one for the floor: {names:?}"
    );
    let warm = names
        .iter()
        .find(|n| n.starts_with("kiln-gh-idle-"))
        .unwrap()
        .clone();
    // The warm runner takes the job; the job's own runner is left idle.
    h.job("in_progress", 7, Some(&warm)).await;
    h.pass().await;
    assert_eq!(
        h.chain.launched_names().len(),
        2,
        "no new runner: the idle one joins"
    );
    let pool = |name: &str, state| (name.to_owned(), "warm".to_owned(), state);
    assert_eq!(
        h.chain.take_members(),
        [
            pool(&warm, Idle),
            pool(&warm, Taken),
            pool("kiln-gh-7", Idle)
        ]
    );
    // A member now, it is exempt from idle_timeout and counts for the floor.
    assert_eq!(
        h.state.runners.get("kiln-gh-7").unwrap().warm.as_deref(),
        Some("warm")
    );
}
