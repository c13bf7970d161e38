//! The warm pools' agents, one look at a time: the source against a fake chain (floors as the
//! test sets them) and a fake Jenkins whose nodes the test connects and hands builds to.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State as Axum};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::*;
use crate::build::Build;
use crate::sources::MemberState::{Idle, Retired, Taken};
use crate::sources::warm::fake::{self, FakeChain};

/// One node of the fake Jenkins.
#[derive(Debug, Default, Clone)]
struct Node {
    description: String,
    label: String,
    connected: bool,
    busy: bool,
    temporarily_offline: bool,
}

type Nodes = Arc<Mutex<BTreeMap<String, Node>>>;

async fn computers(Axum(nodes): Axum<Nodes>) -> Response {
    let nodes = nodes.lock().unwrap();
    let computer: Vec<Value> = nodes
        .iter()
        .map(|(name, n)| {
            json!({
                "displayName": name, "description": n.description,
                "offline": !n.connected || n.temporarily_offline,
                "temporarilyOffline": n.temporarily_offline, "idle": !n.busy,
            })
        })
        .collect();
    axum::Json(json!({ "computer": computer })).into_response()
}

async fn queue() -> Response {
    axum::Json(json!({"items": []})).into_response()
}

async fn create(Axum(nodes): Axum<Nodes>, body: String) -> Response {
    let form: BTreeMap<String, String> = url::form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    let spec: Value = serde_json::from_str(&form["json"]).unwrap();
    let node = Node {
        description: spec["nodeDescription"].as_str().unwrap().to_owned(),
        label: spec["labelString"].as_str().unwrap().to_owned(),
        ..Node::default()
    };
    nodes.lock().unwrap().insert(form["name"].clone(), node);
    StatusCode::FOUND.into_response()
}

async fn jnlp(Path(name): Path<String>) -> Response {
    format!(
        "<jnlp><application-desc><argument>secret-of-{name}</argument></application-desc></jnlp>"
    )
    .into_response()
}

async fn toggle_offline(Axum(nodes): Axum<Nodes>, Path(name): Path<String>) -> Response {
    if let Some(node) = nodes.lock().unwrap().get_mut(&name) {
        node.temporarily_offline = !node.temporarily_offline;
    }
    StatusCode::FOUND.into_response()
}

async fn delete_node(Axum(nodes): Axum<Nodes>, Path(name): Path<String>) -> Response {
    match nodes.lock().unwrap().remove(&name) {
        Some(_) => StatusCode::FOUND.into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

struct Harness {
    source: JenkinsSource,
    state: State,
    chain: Arc<FakeChain>,
    nodes: Nodes,
}

async fn harness() -> Harness {
    harness_on(Arc::default()).await
}

/// A coordinator whose Jenkins has `nodes`.
async fn harness_on(nodes: Nodes) -> Harness {
    let router = axum::Router::new()
        .route("/computer/api/json", get(computers))
        .route("/queue/api/json", get(queue))
        .route("/computer/doCreateItem", post(create))
        .route("/computer/{name}/jenkins-agent.jnlp", get(jnlp))
        .route("/computer/{name}/toggleOffline", post(toggle_offline))
        .route("/computer/{name}/doDelete", post(delete_node))
        .with_state(Arc::clone(&nodes));
    let address = fake::serve(router).await;
    let config: JenkinsConfig = toml::from_str(&format!(
        r#"
name = "ci"
url = "http://{address}/"
user = "kiln"
token = "a-test-token"
labels = ["maven", "node"]
pod_templates = {{ maven = {{ resource_class = "big" }} }}
"#
    ))
    .unwrap();
    let source = JenkinsSource::new(&config, 0, Metrics::new()).unwrap();
    let chain = Arc::new(FakeChain::default());
    let (state, _, _) = source.start(Arc::clone(&chain) as Arc<dyn Chain>);
    Harness {
        source,
        state,
        chain,
        nodes,
    }
}

fn floor(pool: &str, label: &str, min_idle: usize) -> WarmFloor {
    WarmFloor {
        pool: pool.into(),
        class: None,
        label: Some(label.into()),
        min_idle,
        max_idle_age: None,
    }
}

impl Harness {
    async fn look(&mut self) {
        self.source.look(&mut self.state).await.unwrap();
    }

    /// Every agent connects, as its `jnlp` container would.
    fn connect_all(&self) {
        for node in self.nodes.lock().unwrap().values_mut() {
            node.connected = true;
        }
    }

    fn node_names(&self) -> Vec<String> {
        self.nodes.lock().unwrap().keys().cloned().collect()
    }

    fn launched(&self) -> Vec<Build> {
        self.chain.launched.lock().unwrap().clone()
    }

    /// The node of agent build `build`.
    fn node_of(&self, build: &Build) -> String {
        build.annotations[agent::ANNOTATION_NODE].clone()
    }
}

#[tokio::test]
async fn a_label_keeps_its_idle_agents_one_taken_is_replaced_and_the_surplus_retires() {
    let mut h = harness().await;
    h.chain.set_floors(vec![floor("maven-warm", "maven", 2)]);
    h.look().await;
    let launched = h.launched();
    assert_eq!(launched.len(), 2);
    for build in &launched {
        assert!(build.name.starts_with("kiln-jk-warm-"), "{}", build.name);
        assert_eq!(build.annotations[agent::ANNOTATION_POOL], "maven-warm");
        assert_eq!(
            build.class.as_ref().unwrap().name,
            "big",
            "the label's template"
        );
    }
    let (a, b) = (h.node_of(&launched[0]), h.node_of(&launched[1]));
    for (name, node) in h.nodes.lock().unwrap().iter() {
        assert_eq!(node.label, "maven");
        assert!(node.description.contains("warm pool maven-warm"), "{name}");
    }
    // Connected and waiting: kept, nothing added.
    h.connect_all();
    h.look().await;
    h.look().await;
    assert_eq!(h.launched().len(), 2);
    // Jenkins hands a queued build to `a`: taken, taken offline, and the pool refills.
    h.nodes.lock().unwrap().get_mut(&a).unwrap().busy = true;
    h.look().await;
    assert!(h.nodes.lock().unwrap()[&a].temporarily_offline);
    assert_eq!(h.launched().len(), 3);
    let c = h.node_of(&h.launched()[2]);
    h.connect_all();
    // The floor drops: the idle ones go at the second look; the busy one stays.
    h.chain.set_floors(Vec::new());
    h.look().await;
    assert_eq!(h.node_names().len(), 3, "one look only");
    h.look().await;
    assert_eq!(h.node_names(), std::slice::from_ref(&a));
    let stopped = h.chain.stopped.lock().unwrap().clone();
    assert_eq!(stopped.len(), 2);
    assert!(!stopped.contains(&launched[0].name), "never the busy agent");
    let pool = |node: &String, state| (node.clone(), "maven-warm".to_owned(), state);
    let members = h.chain.take_members();
    assert_eq!(
        members[..4],
        [
            pool(&a, Idle),
            pool(&b, Idle),
            pool(&a, Taken),
            pool(&c, Idle)
        ]
    );
    let mut retired = members[4..].to_vec();
    retired.sort_by(|x, y| x.0.cmp(&y.0));
    let mut want = vec![pool(&b, Retired), pool(&c, Retired)];
    want.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(retired, want);
    // Its build ends: the node goes, and nothing more is reported (it was taken).
    h.nodes.lock().unwrap().get_mut(&a).unwrap().busy = false;
    h.look().await;
    assert!(h.node_names().is_empty());
    assert!(h.chain.take_members().is_empty());
}

#[tokio::test]
async fn a_pool_sizes_its_agents_by_its_class_and_a_pool_of_an_unserved_label_is_ignored() {
    let mut h = harness().await;
    h.chain.set_floors(vec![
        WarmFloor {
            class: Some("huge".into()),
            ..floor("node-warm", "node", 1)
        },
        floor("gradle-warm", "gradle", 1),
        WarmFloor {
            label: None,
            ..floor("unlabelled", "", 1)
        },
    ]);
    h.look().await;
    let launched = h.launched();
    assert_eq!(
        launched.len(),
        1,
        "only the pool of a label the source serves"
    );
    let class = launched[0].class.as_ref().unwrap();
    assert_eq!(
        (class.name.as_str(), class.origin.as_str()),
        ("huge", "warm pool node-warm")
    );
    assert!(
        h.state.ignored_pools.contains("gradle-warm")
            && h.state.ignored_pools.contains("unlabelled")
    );
}

#[tokio::test]
async fn a_warm_agent_adopted_after_a_restart_is_a_member_again() {
    let mut h = harness().await;
    h.chain.set_floors(vec![floor("maven-warm", "maven", 1)]);
    h.look().await;
    h.connect_all();
    let build = h.launched()[0].clone();
    let node = h.node_of(&build);
    // A new coordinator: the pod is found and adopted, its node matched.
    let mut next = harness_on(Arc::clone(&h.nodes)).await;
    next.chain.set_floors(vec![floor("maven-warm", "maven", 1)]);
    let found = Found {
        key: build.key.clone(),
        name: build.name.clone(),
        exists: true,
        ran: None,
        secrets: BTreeMap::new(),
        labels: build.labels.clone(),
        annotations: build.annotations.clone(),
        replica: None,
        version: None,
        recorded: crate::build::Recorded::OnBuild,
    };
    assert!(matches!(
        next.source.adopt_found(&found),
        Adoption::Follow(_)
    ));
    let mut inbox = next.source.core.inbox.take().unwrap();
    let event = inbox.try_recv().unwrap();
    next.source.handle(&mut next.state, event).await;
    next.look().await;
    assert!(
        next.launched().is_empty(),
        "the adopted agent keeps the floor"
    );
    assert_eq!(
        next.chain.take_members(),
        [(node, "maven-warm".to_owned(), Idle)]
    );
}
