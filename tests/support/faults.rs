//! A fault-injecting HTTP/1.1 proxy between kiln and one test server.
//!
//! Each request that passes is given a fate drawn from a seeded random generator: forwarded
//! untouched, or answered with `429` + `Retry-After`, `500`/`502`/`503`, the connection closed
//! before the request reached the server or after the server answered (so the server acted on
//! it but the client never heard), a stall longer than the client is expected to wait, or — for
//! streamed answers such as Kubernetes watches — the stream cut after a while. The same seed
//! gives the same sequence of fates (requests draw in the order they arrive; with concurrent
//! clients that order, and so which request gets which fate, can vary a little between runs).
//!
//! `KILN_CHAOS_SEED` overrides the seed a test asks for, to replay a failure; [`seed`] prints
//! the seed in use so a failing test's output always names it.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The seed a chaos test runs with: `KILN_CHAOS_SEED` when set (to replay), else `default`.
/// Printed, so the output of a failed test names it.
pub fn seed(default: u64) -> u64 {
    let seed = std::env::var("KILN_CHAOS_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(default);
    eprintln!("[chaos] seed {seed} (replay with KILN_CHAOS_SEED={seed})");
    seed
}

/// One thing the proxy can do to a request instead of (or on top of) forwarding it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fault {
    /// `429 Too Many Requests` with `Retry-After: 1`; the server never sees the request.
    TooManyRequests,
    /// `500 Internal Server Error`; the server never sees the request.
    Status500,
    /// `502 Bad Gateway`, as a load balancer in front of a restarting server answers.
    Status502,
    /// `503 Service Unavailable` with `Retry-After: 1`.
    Status503,
    /// The connection is closed before the request is forwarded.
    ResetBefore,
    /// The request is forwarded and answered, then the connection is closed instead of
    /// relaying the answer: the server acted, the client does not know.
    ResetAfter,
    /// No answer for [`FaultPlan::stall`], then the connection is closed; the server never
    /// sees the request.
    Stall,
    /// A streamed answer (a watch) is relayed for a while and then cut mid-stream.
    CutStream,
}

impl Fault {
    /// Every fault, for plans that allow all of them.
    pub const ALL: [Fault; 8] = [
        Fault::TooManyRequests,
        Fault::Status500,
        Fault::Status502,
        Fault::Status503,
        Fault::ResetBefore,
        Fault::ResetAfter,
        Fault::Stall,
        Fault::CutStream,
    ];

    /// Faults after which the server may have acted on the request.
    pub fn reached_server(self) -> bool {
        matches!(self, Fault::ResetAfter | Fault::CutStream)
    }
}

/// Which faults a request may get; the proxy asks it for every request.
pub type Allow = Arc<dyn Fn(&hyper::Method, &str) -> &'static [Fault] + Send + Sync>;

/// The schedule of a proxy.
#[derive(Clone)]
pub struct FaultPlan {
    pub seed: u64,
    /// Share of requests that get a fault, `0.0..=1.0`.
    pub rate: f64,
    /// How long a [`Fault::Stall`] holds the request.
    pub stall: Duration,
    /// How long a cut stream is relayed before the cut, at most.
    pub cut_after: Duration,
    /// The faults each request may get (by method and path with query).
    pub allow: Allow,
}

impl FaultPlan {
    /// Every fault on every request at `rate`.
    pub fn new(seed: u64, rate: f64) -> Self {
        Self {
            seed,
            rate,
            stall: Duration::from_secs(5),
            cut_after: Duration::from_secs(3),
            allow: Arc::new(|_, _| &Fault::ALL),
        }
    }

    pub fn allow(
        mut self,
        allow: impl Fn(&hyper::Method, &str) -> &'static [Fault] + Send + Sync + 'static,
    ) -> Self {
        self.allow = Arc::new(allow);
        self
    }

    pub fn stall(mut self, stall: Duration) -> Self {
        self.stall = stall;
        self
    }
}

/// What the proxy did to one request.
#[derive(Clone, Debug)]
pub struct Injected {
    pub at: Instant,
    pub method: String,
    pub path: String,
    pub fault: Option<Fault>,
}

struct State {
    rng: StdRng,
    plan: FaultPlan,
    log: Vec<Injected>,
}

/// A running proxy; dropping it stops accepting connections.
pub struct FaultProxy {
    url: String,
    state: Arc<Mutex<State>>,
    /// While set, every request is refused at the TCP level (the server is "down").
    down: Arc<AtomicBool>,
    /// When each connection or request refused while down arrived.
    refused: Arc<Mutex<Vec<Instant>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type ProxyBody = BoxBody<Bytes, std::io::Error>;

impl FaultProxy {
    /// Starts a proxy on 127.0.0.1 in front of `upstream` (`http://host:port`, no path).
    pub async fn start(upstream: &str, plan: FaultPlan) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State {
            rng: StdRng::seed_from_u64(plan.seed),
            plan,
            log: Vec::new(),
        }));
        let down = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(Mutex::new(Vec::new()));
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .unwrap();
        let upstream = upstream.trim_end_matches('/').to_owned();
        let (st, dn, rf) = (state.clone(), down.clone(), refused.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                if dn.load(Ordering::SeqCst) {
                    // Down: the connection is closed at once, as a host with nothing listening
                    // (or a dead load balancer) would.
                    rf.lock().unwrap().push(Instant::now());
                    drop(stream);
                    continue;
                }
                let (st, client, upstream) = (st.clone(), client.clone(), upstream.clone());
                let (dn, rf) = (dn.clone(), rf.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let (dn, rf) = (dn.clone(), rf.clone());
                        let forward = handle(st.clone(), client.clone(), upstream.clone(), req);
                        async move {
                            // A kept-alive connection from before the outage dies with it.
                            if dn.load(Ordering::SeqCst) {
                                rf.lock().unwrap().push(Instant::now());
                                return Err(Closed);
                            }
                            forward.await
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            url,
            state,
            down,
            refused,
            task,
        }
    }

    /// The proxy's base URL, `http://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Changes the share of requests that get a fault (0 turns faults off).
    pub fn set_rate(&self, rate: f64) {
        self.state.lock().unwrap().plan.rate = rate;
    }

    /// Takes the upstream "down" (every new connection is closed at once) or back up.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// When each connection or request refused while down arrived.
    pub fn refused(&self) -> Vec<Instant> {
        self.refused.lock().unwrap().clone()
    }

    /// Every request the proxy saw, with what it did to it.
    pub fn log(&self) -> Vec<Injected> {
        self.state.lock().unwrap().log.clone()
    }

    /// How many requests got each fault.
    pub fn summary(&self) -> std::collections::BTreeMap<String, usize> {
        let mut counts = std::collections::BTreeMap::new();
        for entry in self.log() {
            let key = entry
                .fault
                .map_or_else(|| "forwarded".to_owned(), |f| format!("{f:?}"));
            *counts.entry(key).or_insert(0) += 1;
        }
        counts
    }
}

fn draw(state: &Mutex<State>, method: &hyper::Method, path: &str) -> (Option<Fault>, FaultPlan) {
    let mut st = state.lock().unwrap();
    let allowed = (st.plan.allow)(method, path);
    // Two draws per request whatever the outcome, so one request's fate does not shift the
    // next request's draws.
    let hit: f64 = st.rng.random();
    let pick: usize = st.rng.random_range(0..usize::MAX);
    let streamed = path.contains("watch=true") || path.contains("watch=1");
    let candidates: Vec<Fault> = allowed
        .iter()
        .copied()
        .filter(|f| *f != Fault::CutStream || streamed)
        .collect();
    let fault =
        (hit < st.plan.rate && !candidates.is_empty()).then(|| candidates[pick % candidates.len()]);
    st.log.push(Injected {
        at: Instant::now(),
        method: method.to_string(),
        path: path.to_owned(),
        fault,
    });
    (fault, st.plan.clone())
}

/// An error from the service closes the connection without an answer.
#[derive(Debug)]
struct Closed;

impl std::fmt::Display for Closed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection closed by the fault proxy")
    }
}

impl std::error::Error for Closed {}

async fn handle(
    state: Arc<Mutex<State>>,
    client: reqwest::Client,
    upstream: String,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Closed> {
    let path = req
        .uri()
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
    let (fault, plan) = draw(&state, req.method(), &path);
    match fault {
        Some(Fault::TooManyRequests) => return Ok(refusal(429, Some(1))),
        Some(Fault::Status500) => return Ok(refusal(500, None)),
        Some(Fault::Status502) => return Ok(refusal(502, None)),
        Some(Fault::Status503) => return Ok(refusal(503, Some(1))),
        Some(Fault::ResetBefore) => return Err(Closed),
        Some(Fault::Stall) => {
            tokio::time::sleep(plan.stall).await;
            return Err(Closed);
        }
        _ => {}
    }
    let (parts, body) = req.into_parts();
    let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
        return Err(Closed);
    };
    let mut forward = client.request(parts.method.clone(), format!("{upstream}{path}"));
    for (name, value) in &parts.headers {
        if !is_hop_by_hop(name.as_str()) && name != hyper::header::HOST {
            forward = forward.header(name, value);
        }
    }
    let Ok(answer) = forward.body(body).send().await else {
        return Ok(refusal(502, None));
    };
    if fault == Some(Fault::ResetAfter) {
        // Read the whole answer first so the server has finished acting on the request.
        let _ = answer.bytes().await;
        return Err(Closed);
    }
    let mut response = Response::builder().status(answer.status().as_u16());
    for (name, value) in answer.headers() {
        if !is_hop_by_hop(name.as_str()) {
            response = response.header(name, value);
        }
    }
    let stream = answer
        .bytes_stream()
        .map(|chunk| chunk.map(Frame::data).map_err(std::io::Error::other));
    let body: ProxyBody = if fault == Some(Fault::CutStream) {
        let cut_after = plan
            .cut_after
            .mul_f64(state.lock().unwrap().rng.random::<f64>());
        let deadline = tokio::time::Instant::now() + cut_after;
        let cut = futures::stream::unfold(
            (Box::pin(stream), deadline, false),
            |(mut stream, deadline, done)| async move {
                if done {
                    return None;
                }
                tokio::select! {
                    item = stream.next() => item.map(|item| (item, (stream, deadline, false))),
                    () = tokio::time::sleep_until(deadline) => Some((
                        Err(std::io::Error::other("watch stream cut by the fault proxy")),
                        (stream, deadline, true),
                    )),
                }
            },
        );
        BodyExt::boxed(StreamBody::new(cut))
    } else {
        BodyExt::boxed(StreamBody::new(stream))
    };
    Ok(response.body(body).unwrap())
}

fn refusal(status: u16, retry_after: Option<u64>) -> Response<ProxyBody> {
    let mut response = Response::builder()
        .status(StatusCode::from_u16(status).unwrap())
        .header("content-type", "text/plain");
    if let Some(secs) = retry_after {
        response = response.header("retry-after", secs.to_string());
    }
    let body = Full::new(Bytes::from(format!(
        "{status} injected by the fault proxy\n"
    )))
    .map_err(|e: Infallible| match e {});
    response.body(BodyExt::boxed(body)).unwrap()
}

fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
    )
}
