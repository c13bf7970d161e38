//! An in-process Jenkins controller (crumbs, queue, agent nodes, inbound-agent secrets) for tests to drive and inspect.
//!
//! It follows Jenkins' REST behaviour, not kiln's client: Basic auth with API tokens or
//! passwords, crumbs tied to the session, `why` texts computed the way `Queue.BuildableItem`
//! does, `tree=` filtering, agents that only take builds once their inbound agent connected.
//! Agents connecting and builds finishing are driven by the test through [`JenkinsServer`].

// Refusals are whole HTTP responses, built at most once per request; boxing them buys nothing.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes, to_bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hmac::{Hmac, Mac};
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use rand::Rng;
use serde_json::{Map, Value, json};
use sha2::Sha256;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// The version Jenkins announces in `X-Jenkins`.
const JENKINS_VERSION: &str = "2.528.3";
/// How long `Queue.leftItems` keeps an item that left the queue.
const LEFT_ITEM_RETENTION: Duration = Duration::from_secs(5 * 60);
/// The URL segment of the built-in node, `/computer/(built-in)/`.
const BUILT_IN: &str = "(built-in)";
/// Characters `Jenkins.checkGoodName` refuses in a node name.
const UNSAFE_NAME_CHARS: &str = "?*/\\%!@#$^&|<>[]:;";
/// What Jenkins' `Util.rawEncode` escapes in a URL path segment.
const PATH_SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'?')
    .add(b'<')
    .add(b'>')
    .add(b'`')
    .add(b'{')
    .add(b'}')
    .add(b'[')
    .add(b']');

/// The language of the queue's `why` texts for requests without a usable `Accept-Language`
/// (Jenkins then answers in the controller's locale).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WhyLanguage {
    #[default]
    English,
    German,
}

/// How a request authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthKind {
    /// No `Authorization` header and no authenticated session.
    Anonymous,
    /// Basic auth with the user's API token (exempt from crumbs).
    ApiToken,
    /// Basic auth with the user's password (POSTs need a crumb).
    Password,
    /// Only the session cookie of an earlier password-authenticated request.
    Session,
    /// Basic auth that matched no user, token or password (answered 401).
    Invalid,
}

/// One HTTP request as the server answered it.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    pub method: String,
    /// The path with the query string, e.g. `/queue/api/json?tree=items[id]`.
    pub path: String,
    pub status: u16,
    /// The authenticated user, `None` for anonymous or refused credentials.
    pub user: Option<String>,
    pub auth: AuthKind,
    pub accept_language: Option<String>,
}

/// An agent node as Jenkins stores it, plus the state of its computer.
#[derive(Debug, Clone)]
pub struct NodeRecord {
    pub name: String,
    pub description: String,
    pub label_string: String,
    pub num_executors: u32,
    /// `NORMAL` or `EXCLUSIVE`.
    pub mode: String,
    pub remote_fs: String,
    /// The `launcher` object as submitted (`stapler-class`, `webSocket`, `workDirSettings`…).
    pub launcher: Value,
    /// The whole submitted `json` form field.
    pub submitted: Value,
    pub temporarily_offline: bool,
    /// The `offlineMessage` of the last `toggleOffline` that took the node offline.
    pub offline_message: Option<String>,
    /// Whether an inbound agent is connected.
    pub connected: bool,
    /// `(job, build number)` of the builds running on its executors.
    pub running: Vec<(String, u64)>,
}

/// One build started from the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildRecord {
    pub job: String,
    pub number: u64,
    pub queue_id: u64,
    pub node: String,
    /// `None` while running; `SUCCESS`, `FAILURE`, `ABORTED`… once finished.
    pub result: Option<String>,
}

struct User {
    api_token: String,
    password: String,
}

struct Node {
    rec: NodeRecord,
    /// The cause shown after the agent's connection closed.
    channel_broken: bool,
    offline_since_ms: u64,
    /// The user who took the node offline, named in its `OfflineCause$UserCause`.
    offline_by: String,
}

impl Node {
    fn offline(&self) -> bool {
        !self.rec.connected || self.rec.temporarily_offline
    }

    fn labels(&self) -> impl Iterator<Item = &str> {
        self.rec
            .label_string
            .split_whitespace()
            .chain(std::iter::once(self.rec.name.as_str()))
    }

    /// Whether this node's labels satisfy `expr`; `a && b`, `a || b` and plain atoms are understood.
    fn matches(&self, expr: &str) -> bool {
        expr.split("||").any(|alternative| {
            alternative
                .split("&&")
                .all(|atom| self.labels().any(|label| label == atom.trim()))
        })
    }

    fn free_executors(&self) -> usize {
        (self.rec.num_executors as usize).saturating_sub(self.rec.running.len())
    }
}

struct Left {
    at: Instant,
    /// The build number the item became, `None` when cancelled.
    build: Option<u64>,
}

struct QueueItem {
    id: u64,
    job: String,
    label: String,
    in_queue_since_ms: u64,
    left: Option<Left>,
}

#[derive(Default)]
struct Job {
    next_build: u64,
    label: String,
}

struct ServerState {
    /// `http://127.0.0.1:PORT/`, as Jenkins' root URL (with the slash).
    root: String,
    users: BTreeMap<String, User>,
    require_crumb: bool,
    language: WhyLanguage,
    /// Session id → user.
    sessions: HashMap<String, String>,
    next_queue_id: u64,
    /// Waiting queue ids, oldest first.
    waiting: Vec<u64>,
    items: BTreeMap<u64, QueueItem>,
    jobs: BTreeMap<String, Job>,
    nodes: BTreeMap<String, Node>,
    deleted: Vec<String>,
    builds: Vec<BuildRecord>,
    requests: Vec<RequestRecord>,
    /// While set, every authenticated request is answered with this status.
    failing: Option<StatusCode>,
}

struct Shared {
    state: Mutex<ServerState>,
    /// Jenkins' `JnlpAgentReceiver.SLAVE_SECRET` and crumb salt.
    key: [u8; 32],
    /// `JSESSIONID.` and eight hex digits, as Jetty names the cookie per instance.
    cookie_name: String,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, ServerState> {
        self.state.lock().unwrap()
    }

    fn mac(&self, message: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).unwrap();
        mac.update(message.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    fn node_secret(&self, node: &str) -> String {
        self.mac(node)
    }

    fn crumb(&self, user: &str, session: &str) -> String {
        self.mac(&format!("crumb;{user};{session}"))
    }
}

/// A Jenkins controller on `127.0.0.1`, serving until dropped.
pub struct JenkinsServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
}

/// Dropping stops accepting and closes idle keep-alive connections; requests in flight are answered.
impl Drop for JenkinsServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

impl JenkinsServer {
    /// Binds a free port and serves on the current tokio runtime, with no users and no agents.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut key = [0u8; 32];
        rand::rng().fill(&mut key);
        let cookie_name = format!("JSESSIONID.{:08x}", rand::rng().random::<u32>());
        let shared = Arc::new(Shared {
            state: Mutex::new(ServerState {
                root: format!("http://{addr}/"),
                users: BTreeMap::new(),
                require_crumb: true,
                language: WhyLanguage::English,
                sessions: HashMap::new(),
                next_queue_id: 1,
                waiting: Vec::new(),
                items: BTreeMap::new(),
                jobs: BTreeMap::new(),
                nodes: BTreeMap::new(),
                deleted: Vec::new(),
                builds: Vec::new(),
                requests: Vec::new(),
                failing: None,
            }),
            key,
            cookie_name,
        });
        let app = router(shared.clone());
        let (shutdown, stopped) = oneshot::channel();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
        });
        Self {
            shared,
            addr,
            shutdown: Some(shutdown),
        }
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn lock(&self) -> MutexGuard<'_, ServerState> {
        self.shared.lock()
    }

    /// Adds (or replaces) a user who may authenticate with `api_token` or `password`.
    pub fn add_user(&self, user: &str, api_token: &str, password: &str) {
        self.lock().users.insert(
            user.to_owned(),
            User {
                api_token: api_token.to_owned(),
                password: password.to_owned(),
            },
        );
    }

    /// Whether password-authenticated POSTs need a crumb (on by default, as in every Jenkins
    /// since 2.222). Off also makes `/crumbIssuer/api/json` answer 404, as without a crumb issuer.
    pub fn require_crumb_for_passwords(&self, on: bool) {
        self.lock().require_crumb = on;
    }

    /// The language of `why` for requests that do not ask for English or German.
    pub fn set_why_language(&self, language: WhyLanguage) {
        self.lock().language = language;
    }

    /// While `status` is set, every authenticated request is answered with it (a Jenkins
    /// behind an overloaded proxy); requests are still recorded.
    pub fn fail_with(&self, status: Option<u16>) {
        self.lock().failing = status.map(|s| StatusCode::from_u16(s).unwrap());
    }

    /// Queues a build of job `job` restricted to label expression `label` (empty: no
    /// restriction); returns the queue item id. As in Jenkins, a job already waiting in the
    /// queue is not queued twice: its existing item id is returned.
    pub fn enqueue(&self, job: &str, label: &str) -> u64 {
        let mut st = self.lock();
        if let Some(&id) = st.waiting.iter().find(|id| st.items[id].job == job) {
            return id;
        }
        let id = st.next_queue_id;
        st.next_queue_id += 1;
        let entry = st.jobs.entry(job.to_owned()).or_insert_with(|| Job {
            next_build: 1,
            label: String::new(),
        });
        entry.label = label.to_owned();
        st.items.insert(
            id,
            QueueItem {
                id,
                job: job.to_owned(),
                label: label.trim().to_owned(),
                in_queue_since_ms: now_ms(),
                left: None,
            },
        );
        st.waiting.push(id);
        st.schedule();
        id
    }

    /// The ids of the items waiting in the queue, oldest first.
    pub fn queue_ids(&self) -> Vec<u64> {
        self.lock().waiting.clone()
    }

    /// The agent nodes (not the built-in node), by name.
    pub fn nodes(&self) -> Vec<NodeRecord> {
        self.lock().nodes.values().map(|n| n.rec.clone()).collect()
    }

    /// The names of the nodes deleted with `doDelete`, in order.
    pub fn deleted_nodes(&self) -> Vec<String> {
        self.lock().deleted.clone()
    }

    /// The inbound-agent secret of an existing node (HMAC of its name, as Jenkins derives it).
    pub fn node_secret(&self, node: &str) -> Option<String> {
        let exists = self.lock().nodes.contains_key(node);
        exists.then(|| self.shared.node_secret(node))
    }

    /// What `jenkins/inbound-agent` does over WebSocket: the node comes online and may take a
    /// build at once. Refused (false) for an unknown node, a wrong secret or an agent already connected.
    pub fn connect_agent(&self, node: &str, secret: &str) -> bool {
        let expected = self.shared.node_secret(node);
        let mut st = self.lock();
        let Some(n) = st.nodes.get_mut(node) else {
            return false;
        };
        if n.rec.connected || secret != expected {
            return false;
        }
        n.rec.connected = true;
        n.channel_broken = false;
        st.schedule();
        true
    }

    /// The agent's connection closes (pod gone). Running builds stay on the node waiting for
    /// the agent, as Pipeline's `node` steps do, until the node is deleted.
    pub fn disconnect_agent(&self, node: &str) {
        let mut st = self.lock();
        if let Some(n) = st.nodes.get_mut(node)
            && n.rec.connected
        {
            n.rec.connected = false;
            n.channel_broken = true;
            n.offline_since_ms = now_ms();
        }
    }

    /// Finishes the oldest build running on `node` with `result` (`SUCCESS`, `FAILURE`…); the
    /// executor becomes idle and may take the next item.
    ///
    /// # Panics
    /// When no build runs on `node`: the test's script is wrong.
    pub fn finish_build(&self, node: &str, result: &str) {
        let mut st = self.lock();
        let n = st
            .nodes
            .get_mut(node)
            .unwrap_or_else(|| panic!("finish_build: no node {node}"));
        assert!(
            !n.rec.running.is_empty(),
            "finish_build: no build runs on {node}"
        );
        let (job, number) = n.rec.running.remove(0);
        st.set_result(&job, number, result);
        st.schedule();
    }

    /// Every build started, in start order.
    pub fn builds(&self) -> Vec<BuildRecord> {
        self.lock().builds.clone()
    }

    /// Every request answered, in order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.lock().requests.clone()
    }
}

impl ServerState {
    fn set_result(&mut self, job: &str, number: u64, result: &str) {
        if let Some(build) = self
            .builds
            .iter_mut()
            .find(|b| b.job == job && b.number == number)
        {
            build.result = Some(result.to_owned());
        }
    }

    /// The queue maintenance Jenkins runs on every state change: each waiting item, oldest
    /// first, starts on an online node with a free executor that its label allows.
    fn schedule(&mut self) {
        let mut index = 0;
        while index < self.waiting.len() {
            let id = self.waiting[index];
            let label = self.items[&id].label.clone();
            let node = self.nodes.values().find(|n| {
                !n.offline()
                    && n.free_executors() > 0
                    && if label.is_empty() {
                        n.rec.mode == "NORMAL"
                    } else {
                        n.matches(&label)
                    }
            });
            let Some(node) = node.map(|n| n.rec.name.clone()) else {
                index += 1;
                continue;
            };
            self.waiting.remove(index);
            let item = self.items.get_mut(&id).unwrap();
            let job = self.jobs.get_mut(&item.job).unwrap();
            let number = job.next_build;
            job.next_build += 1;
            item.left = Some(Left {
                at: Instant::now(),
                build: Some(number),
            });
            let job = item.job.clone();
            self.builds.push(BuildRecord {
                job: job.clone(),
                number,
                queue_id: id,
                node: node.clone(),
                result: None,
            });
            self.nodes
                .get_mut(&node)
                .unwrap()
                .rec
                .running
                .push((job, number));
        }
    }

    /// `Queue.BuildableItem.getCauseOfBlockage()`.
    fn why(&self, label: &str, language: WhyLanguage) -> String {
        // Jenkins stops naming labels when there are no agents at all.
        if label.is_empty() || self.nodes.is_empty() {
            return text(language, Why::NeedsExecutor);
        }
        let carriers: Vec<&Node> = self.nodes.values().filter(|n| n.matches(label)).collect();
        let offline = carriers.iter().all(|n| n.offline());
        let why = match (offline, carriers.as_slice()) {
            (true, []) => Why::NoNodes(label),
            (true, [one]) => Why::NodeOffline(&one.rec.name),
            (true, _) => Why::AllOffline(label),
            (false, [one]) => Why::Busy(&one.rec.name),
            (false, _) => Why::Busy(label),
        };
        text(language, why)
    }

    fn label_offline(&self, label: &str) -> bool {
        !label.is_empty()
            && self
                .nodes
                .values()
                .filter(|n| n.matches(label))
                .all(Node::offline)
    }

    fn job_url(&self, job: &str) -> String {
        format!("{}job/{}/", self.root, encode(job))
    }

    fn build_json(&self, job: &str, number: u64) -> Value {
        json!({
            "_class": "hudson.model.FreeStyleBuild",
            "number": number,
            "url": format!("{}{number}/", self.job_url(job)),
        })
    }

    fn item_json(&self, item: &QueueItem, language: WhyLanguage) -> Value {
        let mut v = json!({
            "actions": [{
                "_class": "hudson.model.CauseAction",
                "causes": [{
                    "_class": "hudson.model.Cause$UserIdCause",
                    "shortDescription": "Started by user admin",
                    "userId": "admin",
                    "userName": "admin",
                }],
            }],
            "blocked": false,
            "id": item.id,
            "inQueueSince": item.in_queue_since_ms,
            "params": "",
            "task": {
                "_class": "hudson.model.FreeStyleProject",
                "name": item.job,
                "url": self.job_url(&item.job),
                "color": "notbuilt",
            },
            "url": format!("queue/item/{}/", item.id),
        });
        let fields = v.as_object_mut().unwrap();
        match &item.left {
            None => {
                fields.insert("_class".into(), "hudson.model.Queue$BuildableItem".into());
                fields.insert("buildable".into(), true.into());
                fields.insert("stuck".into(), self.label_offline(&item.label).into());
                fields.insert("why".into(), self.why(&item.label, language).into());
                fields.insert(
                    "buildableStartMilliseconds".into(),
                    item.in_queue_since_ms.into(),
                );
                fields.insert("pending".into(), false.into());
            }
            Some(left) => {
                fields.insert("_class".into(), "hudson.model.Queue$LeftItem".into());
                fields.insert("buildable".into(), false.into());
                fields.insert("stuck".into(), false.into());
                fields.insert("why".into(), Value::Null);
                fields.insert("cancelled".into(), left.build.is_none().into());
                let executable = left
                    .build
                    .map_or(Value::Null, |n| self.build_json(&item.job, n));
                fields.insert("executable".into(), executable);
            }
        }
        v
    }

    fn computer_json(&self, node: &Node) -> Value {
        let rec = &node.rec;
        let executors: Vec<Value> = (0..rec.num_executors as usize)
            .map(|i| {
                let current = rec
                    .running
                    .get(i)
                    .map_or(Value::Null, |(job, n)| self.build_json(job, *n));
                json!({
                    "_class": "hudson.model.Executor",
                    "currentExecutable": current,
                    "idle": current.is_null(),
                    "likelyStuck": false,
                    "number": i,
                    "progress": if current.is_null() { -1 } else { 50 },
                })
            })
            .collect();
        let (cause, reason) = if rec.temporarily_offline {
            let message = rec.offline_message.clone().unwrap_or_default();
            let description = if message.is_empty() {
                format!("Disconnected by {}", node.offline_by)
            } else {
                format!("Disconnected by {} : {message}", node.offline_by)
            };
            (
                json!({"_class": "hudson.slaves.OfflineCause$UserCause", "description": description, "timestamp": node.offline_since_ms}),
                message,
            )
        } else if !rec.connected && node.channel_broken {
            (
                json!({"_class": "hudson.slaves.OfflineCause$ChannelTermination", "description": "Connection was broken", "timestamp": node.offline_since_ms}),
                "Connection was broken".to_owned(),
            )
        } else {
            (Value::Null, String::new())
        };
        let mut labels: Vec<Value> = rec
            .label_string
            .split_whitespace()
            .map(|l| json!({"name": l}))
            .collect();
        labels.push(json!({"name": rec.name}));
        let offline = node.offline();
        json!({
            "_class": "hudson.slaves.SlaveComputer",
            "actions": [],
            "assignedLabels": labels,
            "description": rec.description,
            "displayName": rec.name,
            "executors": executors,
            "icon": if offline { "symbol-computer-offline" } else { "symbol-computer" },
            "idle": rec.running.is_empty(),
            "jnlpAgent": true,
            "launchSupported": false,
            "manualLaunchAllowed": true,
            "numExecutors": rec.num_executors,
            "offline": offline,
            "offlineCause": cause,
            "offlineCauseReason": reason,
            "oneOffExecutors": [],
            "temporarilyOffline": rec.temporarily_offline,
            "absoluteRemotePath": if rec.connected { Value::from(rec.remote_fs.clone()) } else { Value::Null },
        })
    }
}

fn built_in_json() -> Value {
    json!({
        "_class": "hudson.model.Hudson$MasterComputer",
        "actions": [],
        "assignedLabels": [{"name": "built-in"}],
        "description": "the Jenkins controller's built-in node",
        "displayName": "Built-In Node",
        "executors": [],
        "icon": "symbol-computer",
        "idle": true,
        "jnlpAgent": false,
        "launchSupported": true,
        "manualLaunchAllowed": true,
        "numExecutors": 0,
        "offline": false,
        "offlineCause": null,
        "offlineCauseReason": "",
        "oneOffExecutors": [],
        "temporarilyOffline": false,
    })
}

enum Why<'a> {
    NeedsExecutor,
    NoNodes(&'a str),
    AllOffline(&'a str),
    NodeOffline(&'a str),
    Busy(&'a str),
}

/// Jenkins' `hudson/model/Messages.properties` and `Messages_de.properties`.
fn text(language: WhyLanguage, why: Why<'_>) -> String {
    match (language, why) {
        (WhyLanguage::English, Why::NeedsExecutor) => {
            "Waiting for next available executor".to_owned()
        }
        (WhyLanguage::English, Why::NoNodes(l)) => {
            format!("There are no nodes with the label \u{2018}{l}\u{2019}")
        }
        (WhyLanguage::English, Why::AllOffline(l)) => {
            format!("All nodes of label \u{2018}{l}\u{2019} are offline")
        }
        (WhyLanguage::English, Why::NodeOffline(n)) => format!("\u{2018}{n}\u{2019} is offline"),
        (WhyLanguage::English, Why::Busy(l)) => {
            format!("Waiting for next available executor on \u{2018}{l}\u{2019}")
        }
        (WhyLanguage::German, Why::NeedsExecutor) => {
            "Warte auf den nächsten freien Build-Prozessor".to_owned()
        }
        (WhyLanguage::German, Why::NoNodes(l)) => {
            format!("Es gibt keine Knoten mit dem Label \u{2018}{l}\u{2019}")
        }
        (WhyLanguage::German, Why::AllOffline(l)) => {
            format!("Alle Knoten des Labels \u{2018}{l}\u{2019} sind offline")
        }
        (WhyLanguage::German, Why::NodeOffline(n)) => format!("\u{2018}{n}\u{2019} ist offline"),
        (WhyLanguage::German, Why::Busy(l)) => {
            format!("Warte auf den nächsten freien Build-Prozessor auf \u{2018}{l}\u{2019}")
        }
    }
}

type Srv = State<Arc<Shared>>;

/// Who sent a request, as the handlers see it.
#[derive(Clone)]
struct Caller {
    user: String,
    language: WhyLanguage,
}

/// What `/jnlpJars/agent.jar` serves: a stand-in for Jenkins' remoting jar.
pub const AGENT_JAR: &[u8] = b"PK\x03\x04 kiln test stand-in for remoting's agent.jar";

fn router(shared: Arc<Shared>) -> Router {
    // As in Jenkins, the agent jar is served to anyone: agents fetch it before they have a
    // session.
    let open = Router::new().route(
        "/jnlpJars/agent.jar",
        get(|| async {
            (
                [(header::CONTENT_TYPE, "application/java-archive")],
                AGENT_JAR,
            )
        }),
    );
    let gated = Router::new()
        .route("/api/json", get(root_json))
        .route("/crumbIssuer/api/json", get(crumb_issuer))
        .route("/queue/api/json", get(queue_json))
        .route("/queue/item/{id}/api/json", get(queue_item_json))
        .route("/queue/cancelItem", post(cancel_item))
        .route("/computer/api/json", get(computers_json))
        .route("/computer/doCreateItem", post(create_node))
        .route("/computer/{name}/api/json", get(computer_json))
        .route("/computer/{name}/jenkins-agent.jnlp", get(agent_jnlp))
        .route("/computer/{name}/slave-agent.jnlp", get(agent_jnlp))
        .route("/computer/{name}/toggleOffline", post(toggle_offline))
        .route("/computer/{name}/doDelete", post(delete_node))
        .route("/job/{job}/api/json", get(job_json))
        .route("/job/{job}/{number}/api/json", get(build_json))
        .fallback(|| async { page(StatusCode::NOT_FOUND, "Not Found") })
        .method_not_allowed_fallback(|| async {
            page(StatusCode::METHOD_NOT_ALLOWED, "This URL requires POST")
        })
        .layer(middleware::from_fn_with_state(shared.clone(), gate))
        .with_state(shared);
    open.merge(gated)
}

/// Authenticates, checks the crumb of password-authenticated POSTs, records the request and
/// adds the headers every Jenkins response carries.
async fn gate(State(s): Srv, request: Request, next: Next) -> Response {
    let (mut parts, body) = request.into_parts();
    let method = parts.method.to_string();
    let path = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_owned(), |p| p.as_str().to_owned());
    let accept_language = header_str(&parts.headers, header::ACCEPT_LANGUAGE.as_str());
    let Ok(body) = to_bytes(body, 1 << 20).await else {
        return page(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
    };
    let (user, auth, refusal) = authenticate(&s, &parts, &body);
    let mut response = match (refusal, &user) {
        (Some(refusal), _) => refusal,
        (None, None) => page(StatusCode::FORBIDDEN, "Access Denied"),
        (None, Some(_)) if s.lock().failing.is_some() => {
            let status = s
                .lock()
                .failing
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            page(status, "Server Error")
        }
        (None, Some(user)) => {
            let language = {
                let default = s.lock().language;
                match accept_language.as_deref().map(primary_language) {
                    Some("en") => WhyLanguage::English,
                    Some("de") => WhyLanguage::German,
                    _ => default,
                }
            };
            parts.extensions.insert(Caller {
                user: user.clone(),
                language,
            });
            next.run(Request::from_parts(parts, Body::from(body))).await
        }
    };
    response
        .headers_mut()
        .insert("x-jenkins", HeaderValue::from_static(JENKINS_VERSION));
    s.lock().requests.push(RequestRecord {
        method,
        path,
        status: response.status().as_u16(),
        user,
        auth,
        accept_language,
    });
    response
}

fn authenticate(
    s: &Shared,
    parts: &axum::http::request::Parts,
    body: &Bytes,
) -> (Option<String>, AuthKind, Option<Response>) {
    let headers = &parts.headers;
    let session = session_id(s, headers);
    let st = s.lock();
    let (user, auth) = match header_str(headers, header::AUTHORIZATION.as_str()) {
        Some(value) => {
            let credentials = value
                .strip_prefix("Basic ")
                .and_then(|b| base64_decode(b.trim()))
                .and_then(|raw| String::from_utf8(raw).ok());
            let Some((name, secret)) = credentials.as_deref().and_then(|c| c.split_once(':'))
            else {
                return (None, AuthKind::Invalid, Some(unauthorized("")));
            };
            match st.users.get(name) {
                Some(u) if u.api_token == secret => (name.to_owned(), AuthKind::ApiToken),
                Some(u) if u.password == secret => (name.to_owned(), AuthKind::Password),
                _ => return (None, AuthKind::Invalid, Some(unauthorized(name))),
            }
        }
        None => match session.as_ref().and_then(|id| st.sessions.get(id)) {
            Some(user) => (user.clone(), AuthKind::Session),
            None => {
                let mut refusal = page(
                    StatusCode::FORBIDDEN,
                    "Authentication required: anonymous is missing the Overall/Read permission",
                );
                let h = refusal.headers_mut();
                h.insert(
                    "x-you-are-authenticated-as",
                    HeaderValue::from_static("anonymous"),
                );
                h.insert(
                    "x-required-permission",
                    HeaderValue::from_static("hudson.model.Hudson.Read"),
                );
                return (None, AuthKind::Anonymous, Some(refusal));
            }
        },
    };
    if parts.method == Method::POST && auth != AuthKind::ApiToken && st.require_crumb {
        let sent = header_str(headers, "jenkins-crumb")
            .or_else(|| param(parts.uri.query().unwrap_or(""), "Jenkins-Crumb"))
            .or_else(|| param(&String::from_utf8_lossy(body), "Jenkins-Crumb"));
        let valid = match (&session, sent) {
            (Some(session), Some(sent)) => {
                st.sessions.get(session) == Some(&user) && sent == s.crumb(&user, session)
            }
            _ => false,
        };
        if !valid {
            return (
                Some(user),
                auth,
                Some(page(
                    StatusCode::FORBIDDEN,
                    "No valid crumb was included in the request",
                )),
            );
        }
    }
    (Some(user), auth, None)
}

fn unauthorized(user: &str) -> Response {
    let mut response = page(
        StatusCode::UNAUTHORIZED,
        &format!("Invalid password/token for user: {user}"),
    );
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"Jenkins\""),
    );
    response
}

fn session_id(s: &Shared, headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == s.cookie_name)
        .map(|(_, value)| value.to_owned())
}

/// `GET /crumbIssuer/api/json`: a crumb for the caller's session, opening one when needed.
async fn crumb_issuer(
    State(s): Srv,
    headers: HeaderMap,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Response {
    if !s.lock().require_crumb {
        return page(StatusCode::NOT_FOUND, "Not Found");
    }
    let user = caller.user;
    let existing = session_id(&s, &headers).filter(|id| s.lock().sessions.get(id) == Some(&user));
    let (session, set_cookie) = match existing {
        Some(id) => (id, None),
        None => {
            let id = format!(
                "node0{}.node0",
                hex::encode(rand::rng().random::<[u8; 12]>())
            );
            s.lock().sessions.insert(id.clone(), user.clone());
            let cookie = format!("{}={id}; Path=/; HttpOnly", s.cookie_name);
            (id, Some(cookie))
        }
    };
    let body = json!({
        "_class": "hudson.security.csrf.DefaultCrumbIssuer",
        "crumb": s.crumb(&user, &session),
        "crumbRequestField": "Jenkins-Crumb",
    });
    let mut response = axum::Json(body).into_response();
    if let Some(cookie) = set_cookie {
        response
            .headers_mut()
            .insert(header::SET_COOKIE, HeaderValue::from_str(&cookie).unwrap());
    }
    response
}

#[derive(serde::Deserialize)]
struct ApiQuery {
    tree: Option<String>,
}

/// Answers `value` as Jenkins' `api/json` does, honouring `tree=`.
fn api(value: Value, query: &ApiQuery) -> Response {
    match &query.tree {
        None => axum::Json(value).into_response(),
        Some(tree) => match parse_tree(tree) {
            Ok(fields) => axum::Json(filter_tree(&value, &fields)).into_response(),
            Err(e) => page(StatusCode::BAD_REQUEST, &format!("invalid tree: {e}")),
        },
    }
}

async fn root_json(State(s): Srv, Query(q): Query<ApiQuery>) -> Response {
    let st = s.lock();
    let jobs: Vec<Value> = st
        .jobs
        .keys()
        .map(|j| json!({"_class": "hudson.model.FreeStyleProject", "name": j, "url": st.job_url(j), "color": "notbuilt"}))
        .collect();
    api(
        json!({
            "_class": "hudson.model.Hudson",
            "mode": "EXCLUSIVE",
            "nodeDescription": "the Jenkins controller's built-in node",
            "nodeName": "",
            "numExecutors": 0,
            "jobs": jobs,
            "quietingDown": false,
            "url": st.root,
            "useCrumbs": st.require_crumb,
            "useSecurity": true,
        }),
        &q,
    )
}

async fn queue_json(
    State(s): Srv,
    Query(q): Query<ApiQuery>,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Response {
    let st = s.lock();
    // Queue.getItems() lists the buildable items newest first.
    let items: Vec<Value> = st
        .waiting
        .iter()
        .rev()
        .map(|id| st.item_json(&st.items[id], caller.language))
        .collect();
    api(
        json!({"_class": "hudson.model.Queue", "discoverableItems": [], "items": items}),
        &q,
    )
}

async fn queue_item_json(
    State(s): Srv,
    Path(id): Path<String>,
    Query(q): Query<ApiQuery>,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Response {
    let st = s.lock();
    let item = id.parse::<u64>().ok().and_then(|id| st.items.get(&id));
    match item {
        Some(item)
            if item
                .left
                .as_ref()
                .is_none_or(|l| l.at.elapsed() < LEFT_ITEM_RETENTION) =>
        {
            api(st.item_json(item, caller.language), &q)
        }
        _ => page(StatusCode::NOT_FOUND, "Not Found"),
    }
}

/// `POST /queue/cancelItem?id=N`: 204 as in current Jenkins (not the older redirect).
async fn cancel_item(State(s): Srv, Query(q): Query<HashMap<String, String>>) -> Response {
    let id = q.get("id").cloned().unwrap_or_default();
    let mut st = s.lock();
    let Some(n) = id.parse::<u64>().ok().filter(|n| st.waiting.contains(n)) else {
        return page(
            StatusCode::NOT_FOUND,
            &format!("Provided id ({id}) not found"),
        );
    };
    st.waiting.retain(|w| *w != n);
    if let Some(item) = st.items.get_mut(&n) {
        item.left = Some(Left {
            at: Instant::now(),
            build: None,
        });
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn computers_json(State(s): Srv, Query(q): Query<ApiQuery>) -> Response {
    let st = s.lock();
    let mut computers = vec![built_in_json()];
    computers.extend(st.nodes.values().map(|n| st.computer_json(n)));
    let busy: usize = st.nodes.values().map(|n| n.rec.running.len()).sum();
    let total: u32 = st
        .nodes
        .values()
        .filter(|n| !n.offline())
        .map(|n| n.rec.num_executors)
        .sum();
    api(
        json!({
            "_class": "hudson.model.ComputerSet",
            "busyExecutors": busy,
            "computer": computers,
            "displayName": "Nodes",
            "totalExecutors": total,
        }),
        &q,
    )
}

async fn computer_json(
    State(s): Srv,
    Path(name): Path<String>,
    Query(q): Query<ApiQuery>,
) -> Response {
    if name == BUILT_IN {
        return api(built_in_json(), &q);
    }
    let st = s.lock();
    match st.nodes.get(&name) {
        Some(node) => api(st.computer_json(node), &q),
        None => page(StatusCode::NOT_FOUND, "Not Found"),
    }
}

/// `POST /computer/doCreateItem` (`ComputerSet.doDoCreateItem`): `name`, `type` and the
/// node's form as JSON in `json`; redirects to the node list.
async fn create_node(State(s): Srv, body: Bytes) -> Response {
    let form = String::from_utf8_lossy(&body).into_owned();
    let Some(name) = param(&form, "name").map(|n| n.trim().to_owned()) else {
        return page(
            StatusCode::BAD_REQUEST,
            "Query parameter 'name' is required",
        );
    };
    if let Err(message) = check_good_name(&name) {
        return page(StatusCode::BAD_REQUEST, &message);
    }
    let root = {
        let st = s.lock();
        if st.nodes.contains_key(&name) {
            return page(
                StatusCode::BAD_REQUEST,
                &format!("Agent called \u{2018}{name}\u{2019} already exists"),
            );
        }
        st.root.clone()
    };
    // NodeDescriptor.all().find(type) is null for any other type: Jenkins fails with an NPE.
    if param(&form, "type").as_deref() != Some("hudson.slaves.DumbSlave") {
        return page(
            StatusCode::INTERNAL_SERVER_ERROR,
            "java.lang.NullPointerException: no node descriptor for this type",
        );
    }
    let Some(submitted) = param(&form, "json") else {
        return page(
            StatusCode::BAD_REQUEST,
            "This page expects a form submission but had only {}",
        );
    };
    let mut submitted: Value = match serde_json::from_str(&submitted) {
        Ok(Value::Object(o)) => Value::Object(o),
        Ok(_) | Err(_) => {
            return page(
                StatusCode::BAD_REQUEST,
                "Failed to parse form data: the json field is not a JSON object",
            );
        }
    };
    submitted["name"] = name.clone().into();
    let rec = match node_from_form(&name, &submitted) {
        Ok(rec) => rec,
        Err(message) => return page(StatusCode::BAD_REQUEST, &message),
    };
    let mut st = s.lock();
    if st.nodes.contains_key(&name) {
        return page(
            StatusCode::BAD_REQUEST,
            &format!("Agent called \u{2018}{name}\u{2019} already exists"),
        );
    }
    st.nodes.insert(
        name,
        Node {
            rec,
            channel_broken: false,
            offline_since_ms: now_ms(),
            offline_by: String::new(),
        },
    );
    st.schedule();
    redirect(format!("{root}computer/"))
}

/// What Stapler binds into a `DumbSlave`; refuses what Jenkins' constructor refuses.
fn node_from_form(name: &str, form: &Value) -> Result<NodeRecord, String> {
    let invalid = |what: &str| format!("Invalid agent configuration for {name}. {what}");
    let num_executors = match form.get("numExecutors") {
        None => 1,
        Some(Value::Number(n)) => n
            .as_i64()
            .ok_or_else(|| invalid("Invalid # of executors."))?,
        Some(Value::String(t)) => t
            .trim()
            .parse::<i64>()
            .map_err(|_| invalid("Invalid # of executors."))?,
        Some(_) => return Err(invalid("Invalid # of executors.")),
    };
    if num_executors <= 0 {
        return Err(invalid("Invalid # of executors."));
    }
    let text = |key: &str| -> Result<String, String> {
        match form.get(key) {
            None | Some(Value::Null) => Ok(String::new()),
            Some(Value::String(t)) => Ok(t.trim().to_owned()),
            Some(_) => Err(format!("Failed to bind {key}: expected a string")),
        }
    };
    let mode = match text("mode")?.as_str() {
        "" | "NORMAL" => "NORMAL".to_owned(),
        "EXCLUSIVE" => "EXCLUSIVE".to_owned(),
        other => {
            return Err(format!("No enum constant hudson.model.Node.Mode.{other}"));
        }
    };
    let launcher = form.get("launcher").cloned().unwrap_or(Value::Null);
    let launcher_class = launcher
        .get("stapler-class")
        .or_else(|| launcher.get("$class"))
        .and_then(Value::as_str);
    if launcher_class.is_none() {
        return Err(format!(
            "Failed to instantiate the launcher of {name}: no stapler-class given"
        ));
    }
    Ok(NodeRecord {
        name: name.to_owned(),
        description: text("nodeDescription")?,
        label_string: text("labelString")?,
        num_executors: u32::try_from(num_executors)
            .map_err(|_| invalid("Invalid # of executors."))?,
        mode,
        remote_fs: text("remoteFS")?,
        launcher,
        submitted: form.clone(),
        temporarily_offline: false,
        offline_message: None,
        connected: false,
        running: Vec::new(),
    })
}

/// `Jenkins.checkGoodName`.
fn check_good_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("No name is specified".to_owned());
    }
    if let Some(c) = name
        .chars()
        .find(|c| c.is_control() || UNSAFE_NAME_CHARS.contains(*c))
    {
        return Err(format!("\u{2018}{c}\u{2019} is an unsafe character"));
    }
    if name == "." || name == ".." {
        return Err(format!("\u{201c}{name}\u{201d} is not an allowed name"));
    }
    Ok(())
}

/// `GET /computer/NAME/jenkins-agent.jnlp`: what `jenkins/inbound-agent` reads its arguments from.
async fn agent_jnlp(State(s): Srv, Path(name): Path<String>) -> Response {
    let st = s.lock();
    let Some(node) = st.nodes.get(&name) else {
        return page(StatusCode::NOT_FOUND, "Not Found");
    };
    let launcher = &node.rec.launcher;
    let class = launcher
        .get("stapler-class")
        .or_else(|| launcher.get("$class"))
        .and_then(Value::as_str)
        .unwrap_or("");
    if !class.ends_with("JNLPLauncher") {
        return page(StatusCode::NOT_FOUND, "Not Found");
    }
    let mut args = vec![s.node_secret(&name), name.clone()];
    if launcher.get("webSocket") == Some(&Value::Bool(true)) {
        args.push("-webSocket".to_owned());
    }
    args.extend(["-url".to_owned(), st.root.clone()]);
    let work_dir = launcher.get("workDirSettings");
    if work_dir.and_then(|w| w.get("disabled")) != Some(&Value::Bool(true)) {
        let path = work_dir
            .and_then(|w| w.get("workDirPath"))
            .and_then(Value::as_str)
            .filter(|p| !p.is_empty())
            .unwrap_or(&node.rec.remote_fs)
            .to_owned();
        let internal = work_dir
            .and_then(|w| w.get("internalDir"))
            .and_then(Value::as_str)
            .unwrap_or("remoting")
            .to_owned();
        args.extend([
            "-workDir".to_owned(),
            path,
            "-internalDir".to_owned(),
            internal,
        ]);
    }
    let arguments: String = args
        .iter()
        .map(|a| format!("<argument>{}</argument>", xml_escape(a)))
        .collect();
    let root = xml_escape(&st.root);
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<jnlp codebase=\"{root}computer/{n}/\" spec=\"1.0+\">\
<information><title>Agent for {title}</title><vendor>Jenkins project</vendor><homepage href=\"https://jenkins.io/\"/></information>\
<security><all-permissions/></security>\
<resources><j2se version=\"1.8+\"/><jar href=\"{root}jnlpJars/remoting.jar\"/></resources>\
<application-desc main-class=\"hudson.remoting.jnlp.Main\">{arguments}</application-desc></jnlp>",
        n = xml_escape(&encode(&name)),
        title = xml_escape(&name),
    );
    (
        [(header::CONTENT_TYPE, "application/x-java-jnlp-file")],
        body,
    )
        .into_response()
}

/// `POST /computer/NAME/toggleOffline?offlineMessage=…`; the running build goes on.
async fn toggle_offline(
    State(s): Srv,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Response {
    let mut st = s.lock();
    let root = st.root.clone();
    let Some(node) = st.nodes.get_mut(&name) else {
        return page(StatusCode::NOT_FOUND, "Not Found");
    };
    node.rec.temporarily_offline = !node.rec.temporarily_offline;
    if node.rec.temporarily_offline {
        node.rec.offline_message = Some(q.get("offlineMessage").cloned().unwrap_or_default());
        node.offline_since_ms = now_ms();
        node.offline_by = caller.user;
    } else {
        node.rec.offline_message = None;
    }
    st.schedule();
    redirect(format!("{root}computer/{}/", encode(&name)))
}

/// `POST /computer/NAME/doDelete`: removes the node; builds on it are aborted.
async fn delete_node(State(s): Srv, Path(name): Path<String>) -> Response {
    if name == BUILT_IN {
        return page(StatusCode::BAD_REQUEST, "Cannot delete the built-in node");
    }
    let mut st = s.lock();
    let Some(node) = st.nodes.remove(&name) else {
        return page(StatusCode::NOT_FOUND, "Not Found");
    };
    for (job, number) in &node.rec.running {
        st.set_result(job, *number, "ABORTED");
    }
    st.deleted.push(name);
    st.schedule();
    redirect(format!("{}computer/", st.root))
}

async fn job_json(
    State(s): Srv,
    Path(job): Path<String>,
    Query(q): Query<ApiQuery>,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Response {
    let st = s.lock();
    let Some(j) = st.jobs.get(&job) else {
        return page(StatusCode::NOT_FOUND, "Not Found");
    };
    let queued = st
        .waiting
        .iter()
        .map(|id| &st.items[id])
        .find(|i| i.job == job);
    let last = j.next_build.checked_sub(1).filter(|n| *n > 0);
    api(
        json!({
            "_class": "hudson.model.FreeStyleProject",
            "name": job,
            "url": st.job_url(&job),
            "assignedLabelString": if j.label.is_empty() { Value::Null } else { j.label.clone().into() },
            "buildable": true,
            "inQueue": queued.is_some(),
            "queueItem": queued.map_or(Value::Null, |i| st.item_json(i, caller.language)),
            "nextBuildNumber": j.next_build,
            "lastBuild": last.map_or(Value::Null, |n| st.build_json(&job, n)),
        }),
        &q,
    )
}

async fn build_json(
    State(s): Srv,
    Path((job, number)): Path<(String, String)>,
    Query(q): Query<ApiQuery>,
) -> Response {
    let st = s.lock();
    let build = number
        .parse::<u64>()
        .ok()
        .and_then(|n| st.builds.iter().find(|b| b.job == job && b.number == n));
    let Some(b) = build else {
        return page(StatusCode::NOT_FOUND, "Not Found");
    };
    let mut v = st.build_json(&b.job, b.number);
    let fields = v.as_object_mut().unwrap();
    fields.insert("building".into(), b.result.is_none().into());
    fields.insert(
        "result".into(),
        b.result.clone().map_or(Value::Null, Value::from),
    );
    fields.insert("builtOn".into(), b.node.clone().into());
    fields.insert("queueId".into(), b.queue_id.into());
    api(v, &q)
}

/// One field of a `tree=` spec: `name`, `name[children]`, optionally `{from,to}`.
#[derive(Debug)]
struct TreeField {
    name: String,
    children: Option<Vec<TreeField>>,
    range: Option<(Option<usize>, Option<usize>)>,
}

fn parse_tree(spec: &str) -> Result<Vec<TreeField>, String> {
    let chars: Vec<char> = spec.chars().collect();
    let mut pos = 0;
    let fields = parse_fields(&chars, &mut pos)?;
    if pos != chars.len() {
        return Err(format!("unexpected `{}` at {pos}", chars[pos]));
    }
    Ok(fields)
}

fn parse_fields(chars: &[char], pos: &mut usize) -> Result<Vec<TreeField>, String> {
    let mut fields = Vec::new();
    loop {
        let start = *pos;
        while *pos < chars.len() && !"[]{},".contains(chars[*pos]) {
            *pos += 1;
        }
        let name: String = chars[start..*pos]
            .iter()
            .collect::<String>()
            .trim()
            .to_owned();
        if name.is_empty() {
            return Err(format!("empty field name at {start}"));
        }
        let mut field = TreeField {
            name,
            children: None,
            range: None,
        };
        if chars.get(*pos) == Some(&'[') {
            *pos += 1;
            field.children = Some(parse_fields(chars, pos)?);
            if chars.get(*pos) != Some(&']') {
                return Err(format!("missing `]` at {pos}"));
            }
            *pos += 1;
        }
        if chars.get(*pos) == Some(&'{') {
            let close = chars[*pos..]
                .iter()
                .position(|c| *c == '}')
                .ok_or("missing `}`")?;
            let inner: String = chars[*pos + 1..*pos + close].iter().collect();
            field.range = Some(parse_range(&inner)?);
            *pos += close + 1;
        }
        fields.push(field);
        match chars.get(*pos) {
            Some(',') => *pos += 1,
            _ => return Ok(fields),
        }
    }
}

fn parse_range(inner: &str) -> Result<(Option<usize>, Option<usize>), String> {
    let number = |t: &str| -> Result<Option<usize>, String> {
        let t = t.trim();
        if t.is_empty() {
            Ok(None)
        } else {
            t.parse()
                .map(Some)
                .map_err(|_| format!("bad range `{inner}`"))
        }
    };
    match inner.split_once(',') {
        Some((from, to)) => Ok((number(from)?, number(to)?)),
        // `{N}` is the N-th element only.
        None => {
            let n = number(inner)?.ok_or(format!("bad range `{inner}`"))?;
            Ok((Some(n), Some(n + 1)))
        }
    }
}

/// Keeps what `fields` names, plus `_class`, as Jenkins' `tree` does; an object named without
/// children keeps only its `_class`.
fn filter_tree(value: &Value, fields: &[TreeField]) -> Value {
    match value {
        Value::Array(items) => Value::Array(items.iter().map(|v| filter_tree(v, fields)).collect()),
        Value::Object(object) => {
            let mut out = Map::new();
            if let Some(class) = object.get("_class") {
                out.insert("_class".to_owned(), class.clone());
            }
            for field in fields {
                let Some(v) = object.get(&field.name) else {
                    continue;
                };
                let v = match (v, field.range) {
                    (Value::Array(a), Some((from, to))) => {
                        let from = from.unwrap_or(0).min(a.len());
                        let to = to.unwrap_or(a.len()).clamp(from, a.len());
                        Value::Array(a[from..to].to_vec())
                    }
                    _ => v.clone(),
                };
                let children = field.children.as_deref().unwrap_or(&[]);
                out.insert(field.name.clone(), filter_tree(&v, children));
            }
            Value::Object(out)
        }
        other => other.clone(),
    }
}

/// Jenkins' error pages are HTML; clients see the message in the body.
fn page(status: StatusCode, message: &str) -> Response {
    let body = format!(
        "<html><head><title>Error {}</title></head><body><h1>{}</h1><p>{}</p></body></html>",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        xml_escape(message)
    );
    (
        status,
        [(header::CONTENT_TYPE, "text/html;charset=utf-8")],
        body,
    )
        .into_response()
}

fn redirect(location: String) -> Response {
    let mut response = StatusCode::FOUND.into_response();
    response
        .headers_mut()
        .insert(header::LOCATION, HeaderValue::from_str(&location).unwrap());
    response
}

fn header_str(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// The first value of `key` in a form-encoded string.
fn param(form: &str, key: &str) -> Option<String> {
    url::form_urlencoded::parse(form.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

/// `de-DE,de;q=0.9` → `de`.
fn primary_language(accept_language: &str) -> &str {
    let first = accept_language.split(',').next().unwrap_or("");
    let tag = first.split(';').next().unwrap_or("").trim();
    tag.split(['-', '_']).next().unwrap_or("")
}

fn encode(segment: &str) -> String {
    utf8_percent_encode(segment, PATH_SEGMENT).to_string()
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Standard base64 with padding, as in `Authorization: Basic` (no crate for it is a dependency).
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    fn sextet(c: u8) -> Option<u32> {
        match c {
            b'A'..=b'Z' => Some(u32::from(c - b'A')),
            b'a'..=b'z' => Some(u32::from(c - b'a') + 26),
            b'0'..=b'9' => Some(u32::from(c - b'0') + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    }
    let bytes = text.as_bytes();
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    let last = bytes.len() / 4;
    for (index, chunk) in bytes.chunks(4).enumerate() {
        let pad = chunk.iter().rev().take_while(|c| **c == b'=').count();
        if pad > 2 || (pad > 0 && index + 1 != last) {
            return None;
        }
        let mut n = 0u32;
        for &c in &chunk[..4 - pad] {
            n = (n << 6) | sextet(c)?;
        }
        n <<= 6 * pad as u32;
        let decoded = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&decoded[..3 - pad]);
    }
    Some(out)
}
