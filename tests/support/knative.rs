//! A minimal Kubernetes API server for `serving.knative.dev/v1` Services and Revisions:
//! GET, list and server-side apply with resourceVersion and generation, plus a controller
//! `tick` the test drives to create revisions and set status conditions.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

pub const TOKEN: &str = "test-token";
const PREFIX: &str = "/apis/serving.knative.dev/v1/namespaces/";

#[derive(Debug, Default)]
pub struct State {
    /// `(namespace, name)` → Service.
    pub services: BTreeMap<(String, String), Value>,
    /// `(namespace, name)` → Revision.
    pub revisions: BTreeMap<(String, String), Value>,
    /// `METHOD path?query` of every request.
    pub requests: Vec<String>,
    resource_version: u64,
}

#[derive(Clone)]
pub struct KnativeServer {
    pub url: String,
    pub state: Arc<Mutex<State>>,
}

fn status(code: u16, reason: &str, message: String) -> Response {
    (
        StatusCode::from_u16(code).unwrap(),
        axum::Json(json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code,
        })),
    )
        .into_response()
}

impl KnativeServer {
    pub async fn start() -> Self {
        let state = Arc::new(Mutex::new(State::default()));
        let router = Router::new().fallback(handler).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        Self { url, state }
    }

    /// A kubeconfig pointing at this server, with `namespace` as the context's namespace.
    pub fn kubeconfig(&self, namespace: &str) -> String {
        json!({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{ "name": "test", "cluster": { "server": self.url } }],
            "users": [{ "name": "ci", "user": { "token": TOKEN } }],
            "contexts": [{ "name": "test", "context": { "cluster": "test", "user": "ci", "namespace": namespace } }],
        })
        .to_string()
    }

    pub fn service(&self, namespace: &str, name: &str) -> Option<Value> {
        let s = self.state.lock().unwrap();
        s.services
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// One pass of the Knative controller: for each service whose generation is not yet
    /// observed, create a revision when the template changed, then mark it ready, or failed
    /// when its image contains `broken`.
    pub fn tick(&self) {
        let mut guard = self.state.lock().unwrap();
        let s = &mut *guard;
        let keys: Vec<_> = s.services.keys().cloned().collect();
        for (ns, name) in keys {
            let svc = s.services.get(&(ns.clone(), name.clone())).unwrap().clone();
            let generation = svc["metadata"]["generation"].as_i64().unwrap();
            if svc["status"]["observedGeneration"].as_i64() == Some(generation) {
                continue;
            }
            let template = svc["spec"]["template"].clone();
            let latest_created = svc["status"]["latestCreatedRevisionName"]
                .as_str()
                .map(str::to_owned);
            let same_template = latest_created.as_ref().is_some_and(|rev| {
                s.revisions
                    .get(&(ns.clone(), rev.clone()))
                    .is_some_and(|r| r["spec"] == template["spec"])
            });
            let revision = if same_template {
                latest_created.unwrap()
            } else {
                let count = s.revisions.keys().filter(|(n, _)| *n == ns).count() + 1;
                let rev = format!("{name}-{count:05}");
                let image = template["spec"]["containers"][0]["image"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned();
                let conditions = if image.contains("broken") {
                    json!([{ "type": "Ready", "status": "False", "reason": "ContainerMissing",
                             "message": format!("Unable to fetch image \"{image}\": manifest unknown") },
                           { "type": "ContainerHealthy", "status": "Unknown" }])
                } else {
                    json!([{ "type": "Ready", "status": "True" }])
                };
                s.revisions.insert(
                    (ns.clone(), rev.clone()),
                    json!({
                        "apiVersion": "serving.knative.dev/v1", "kind": "Revision",
                        "metadata": { "name": rev, "namespace": ns },
                        "spec": template["spec"],
                        "status": { "conditions": conditions },
                    }),
                );
                rev
            };
            let rev_ready = s.revisions[&(ns.clone(), revision.clone())]["status"]["conditions"][0]
                ["status"]
                == "True";
            let svc = s.services.get_mut(&(ns.clone(), name.clone())).unwrap();
            let previous_ready = svc["status"]["latestReadyRevisionName"].clone();
            let mut status = json!({
                "observedGeneration": generation,
                "latestCreatedRevisionName": revision,
                "url": format!("http://{name}.{ns}.example.com"),
            });
            if rev_ready {
                status["latestReadyRevisionName"] = json!(revision);
                status["conditions"] = json!([
                    { "type": "ConfigurationsReady", "status": "True" },
                    { "type": "Ready", "status": "True" },
                    { "type": "RoutesReady", "status": "True" },
                ]);
                let traffic: Vec<Value> = svc["spec"]["traffic"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|mut t| {
                        if t["latestRevision"] == true {
                            t["revisionName"] = json!(revision);
                        }
                        t
                    })
                    .collect();
                status["traffic"] = json!(traffic);
            } else {
                status["latestReadyRevisionName"] = previous_ready;
                status["conditions"] = json!([
                    { "type": "ConfigurationsReady", "status": "False", "reason": "RevisionFailed",
                      "message": format!("Revision \"{revision}\" failed with message: Unable to fetch image.") },
                    { "type": "Ready", "status": "False", "reason": "RevisionMissing",
                      "message": format!("Configuration \"{name}\" does not have any ready Revision.") },
                ]);
            }
            svc["status"] = status;
        }
    }
}

async fn handler(
    axum::extract::State(state): axum::extract::State<Arc<Mutex<State>>>,
    req: Request<Body>,
) -> Response {
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = axum::body::to_bytes(req.into_body(), 1 << 20)
        .await
        .unwrap();
    let mut guard = state.lock().unwrap();
    let s = &mut *guard;
    s.requests.push(format!("{method} {path}?{query}"));
    if auth != format!("Bearer {TOKEN}") {
        return status(401, "Unauthorized", "Unauthorized".into());
    }
    let Some(rest) = path.strip_prefix(PREFIX) else {
        return status(404, "NotFound", format!("the server could not find {path}"));
    };
    let parts: Vec<&str> = rest.split('/').collect();
    match (method.as_str(), parts.as_slice()) {
        ("GET", [ns, "services"]) => {
            let items: Vec<Value> = s
                .services
                .iter()
                .filter(|((n, _), _)| n == ns)
                .map(|(_, v)| v.clone())
                .collect();
            axum::Json(json!({
                "apiVersion": "serving.knative.dev/v1", "kind": "ServiceList",
                "metadata": { "resourceVersion": s.resource_version.to_string() }, "items": items,
            }))
            .into_response()
        }
        ("GET", [ns, kind @ ("services" | "revisions"), name]) => {
            let map = if *kind == "services" {
                &s.services
            } else {
                &s.revisions
            };
            match map.get(&((*ns).to_owned(), (*name).to_owned())) {
                Some(v) => axum::Json(v.clone()).into_response(),
                None => status(
                    404,
                    "NotFound",
                    format!("{kind}.serving.knative.dev \"{name}\" not found"),
                ),
            }
        }
        ("PATCH", [ns, "services", name]) => {
            if content_type != "application/apply-patch+yaml" {
                return status(
                    415,
                    "UnsupportedMediaType",
                    format!("not an apply patch: {content_type}"),
                );
            }
            if !query.contains("fieldManager=kiln") || !query.contains("force=true") {
                return status(
                    400,
                    "BadRequest",
                    format!("apply needs fieldManager and force: {query}"),
                );
            }
            let Ok(applied) = serde_json::from_slice::<Value>(&body) else {
                return status(400, "BadRequest", "body is not JSON/YAML".into());
            };
            if applied["metadata"]["name"] != *name || applied["kind"] != "Service" {
                return status(400, "BadRequest", "name or kind mismatch".into());
            }
            s.resource_version += 1;
            let rv = s.resource_version.to_string();
            let key = ((*ns).to_owned(), (*name).to_owned());
            let svc = s.services.entry(key).or_insert_with(|| {
                json!({
                    "apiVersion": "serving.knative.dev/v1", "kind": "Service",
                    "metadata": { "name": name, "namespace": ns, "generation": 0 },
                    "spec": null, "status": {},
                })
            });
            if svc["spec"] != applied["spec"] {
                let generation = svc["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
                svc["metadata"]["generation"] = json!(generation);
                svc["spec"] = applied["spec"].clone();
            }
            svc["metadata"]["resourceVersion"] = json!(rv);
            axum::Json(svc.clone()).into_response()
        }
        _ => status(405, "MethodNotAllowed", format!("{method} {path}")),
    }
}
