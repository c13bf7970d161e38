//! The test API server's HTTP side: discovery, CRUD, list/watch, patches, logs, access reviews and 403s.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::kubelet;
use super::store::{
    Change, DeleteOptions, Key, Res, Selector, json_patch, merge_patch, strategic_merge_patch,
};
use super::{ApiError, Inner, RequestRecord};

type Query = HashMap<String, String>;

/// Query key marking a request that accepts a `meta.k8s.io/v1` Table.
const TABLE: &str = "\0table";

fn json_response(code: u16, body: &Value) -> Response {
    let mut response = (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        body.to_string(),
    )
        .into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn error_response(e: &ApiError) -> Response {
    json_response(e.code, &e.status())
}

pub(crate) async fn handle(State(inner): State<Arc<Inner>>, req: Request) -> Response {
    let at = std::time::Instant::now();
    let latency = inner.lock().latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let method = req.method().clone();
    let path_and_query = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let (req, name) = if method == Method::POST {
        let (parts, body) = req.into_parts();
        let bytes = axum::body::to_bytes(body, 64 << 20)
            .await
            .unwrap_or_default();
        let name = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| v["metadata"]["name"].as_str().map(str::to_owned));
        (Request::from_parts(parts, Body::from(bytes)), name)
    } else {
        (req, None)
    };
    let response = route(&inner, req).await;
    inner.with(|s| {
        s.requests.push(RequestRecord {
            method: method.to_string(),
            path: path_and_query,
            status: response.status().as_u16(),
            at,
            name,
        })
    });
    response
}

async fn route(inner: &Arc<Inner>, req: Request) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().trim_end_matches('/').to_owned();
    let mut query: Query = req
        .uri()
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let accept = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    // kubectl asks for server-side printing; the flag rides along with the query.
    if accept.contains("as=Table") {
        query.insert(TABLE.to_owned(), "1".to_owned());
    }
    if content_type.contains("protobuf") || content_type.contains("cbor") {
        return error_response(&ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml; got {content_type}"
            ),
        ));
    }
    let body = match axum::body::to_bytes(req.into_body(), 64 << 20).await {
        Ok(b) => b,
        Err(e) => return error_response(&ApiError::bad_request(format!("reading body: {e}"))),
    };
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let result = match (&method, segments.as_slice()) {
        (&Method::GET, ["version"]) => Ok(version()),
        (&Method::GET, ["api"]) => Ok(json_response(
            200,
            &json!({ "kind": "APIVersions", "versions": ["v1"],
                     "serverAddressByClientCIDRs": [{ "clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1:6443" }] }),
        )),
        (&Method::GET, ["api", "v1"]) => Ok(json_response(200, &core_resources())),
        (&Method::GET, ["apis"]) => Ok(json_response(200, &api_groups())),
        (&Method::GET, ["apis", "authorization.k8s.io"]) => {
            Ok(json_response(200, &api_groups()["groups"][0]))
        }
        (&Method::GET, ["apis", "authorization.k8s.io", "v1"]) => {
            Ok(json_response(200, &authorization_resources()))
        }
        (
            &Method::POST,
            [
                "apis",
                "authorization.k8s.io",
                "v1",
                "selfsubjectaccessreviews",
            ],
        ) => access_review(inner, &body),
        (&Method::GET, ["apis", "coordination.k8s.io"]) => {
            Ok(json_response(200, &api_groups()["groups"][1]))
        }
        (&Method::GET, ["apis", "coordination.k8s.io", "v1"]) => {
            Ok(json_response(200, &coordination_resources()))
        }
        (_, ["apis", "coordination.k8s.io", "v1", resource]) => {
            match Res::parse_coordination(resource) {
                Some(res) if method == Method::GET => {
                    collection_get(inner, res, None, &query).await
                }
                Some(_) => Err(method_not_allowed(&method)),
                None => Err(not_served()),
            }
        }
        (
            _,
            [
                "apis",
                "coordination.k8s.io",
                "v1",
                "namespaces",
                ns,
                resource,
            ],
        ) => match Res::parse_coordination(resource) {
            Some(res) => match method {
                Method::GET => collection_get(inner, res, Some(ns), &query).await,
                Method::POST => create(inner, res, ns, &body),
                Method::DELETE => delete_collection(inner, res, ns, &query, &body),
                _ => Err(method_not_allowed(&method)),
            },
            None => Err(not_served()),
        },
        (
            _,
            [
                "apis",
                "coordination.k8s.io",
                "v1",
                "namespaces",
                ns,
                resource,
                name,
            ],
        ) => match Res::parse_coordination(resource) {
            Some(res) => {
                let key: Key = (res, (*ns).to_owned(), (*name).to_owned());
                match method {
                    Method::GET => get(inner, &key, query.contains_key(TABLE)),
                    Method::PUT => update(inner, &key, &body, None),
                    Method::PATCH => update(inner, &key, &body, Some(&content_type)),
                    Method::DELETE => delete(inner, &key, &query, &body),
                    _ => Err(method_not_allowed(&method)),
                }
            }
            None => Err(not_served()),
        },
        (_, ["api", "v1", resource]) => match Res::parse(resource) {
            Some(res) if method == Method::GET => collection_get(inner, res, None, &query).await,
            Some(_) => Err(method_not_allowed(&method)),
            None => Err(not_served()),
        },
        (_, ["api", "v1", "namespaces", ns, resource]) => match Res::parse(resource) {
            Some(res) => match method {
                Method::GET => collection_get(inner, res, Some(ns), &query).await,
                Method::POST => create(inner, res, ns, &body),
                Method::DELETE => delete_collection(inner, res, ns, &query, &body),
                _ => Err(method_not_allowed(&method)),
            },
            None => Err(not_served()),
        },
        (_, ["api", "v1", "namespaces", ns, resource, name]) => match Res::parse(resource) {
            Some(res) => {
                let key: Key = (res, (*ns).to_owned(), (*name).to_owned());
                match method {
                    Method::GET => get(inner, &key, query.contains_key(TABLE)),
                    Method::PUT => update(inner, &key, &body, None),
                    Method::PATCH => update(inner, &key, &body, Some(&content_type)),
                    Method::DELETE => delete(inner, &key, &query, &body),
                    _ => Err(method_not_allowed(&method)),
                }
            }
            None => Err(not_served()),
        },
        (_, ["api", "v1", "namespaces", ns, "pods", name, "status"]) => {
            let key: Key = (Res::Pods, (*ns).to_owned(), (*name).to_owned());
            match method {
                Method::GET => authorize(inner, "get", "pods/status", ns, Some(name))
                    .and_then(|()| get_unchecked(inner, &key)),
                Method::PUT => status_update(inner, &key, &body, None),
                Method::PATCH => status_update(inner, &key, &body, Some(&content_type)),
                _ => Err(method_not_allowed(&method)),
            }
        }
        (&Method::GET, ["api", "v1", "namespaces", ns, "pods", name, "log"]) => {
            logs(inner, ns, name, &query).await
        }
        _ => Err(not_served()),
    };
    result.unwrap_or_else(|e| error_response(&e))
}

fn not_served() -> ApiError {
    ApiError::new(404, "NotFound", "the server could not find the requested resource")
        .details(json!({ "causes": [{ "reason": "UnexpectedServerResponse", "message": "404 page not found" }] }))
}

fn method_not_allowed(method: &Method) -> ApiError {
    ApiError::new(
        405,
        "MethodNotAllowed",
        format!("the server does not allow this method on the requested resource ({method})"),
    )
}

fn version() -> Response {
    json_response(
        200,
        &json!({
            "major": "1", "minor": "34", "gitVersion": "v1.34.0-kiln-test",
            "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
            "buildDate": "2025-08-27T00:00:00Z", "goVersion": "go1.24.6", "compiler": "gc",
            "platform": "linux/amd64",
        }),
    )
}

fn core_resources() -> Value {
    let verbs = json!([
        "create",
        "delete",
        "deletecollection",
        "get",
        "list",
        "patch",
        "update",
        "watch"
    ]);
    json!({
        "kind": "APIResourceList", "groupVersion": "v1",
        "resources": [
            { "name": "events", "singularName": "event", "namespaced": true, "kind": "Event",
              "verbs": verbs, "shortNames": ["ev"] },
            { "name": "pods", "singularName": "pod", "namespaced": true, "kind": "Pod",
              "verbs": verbs, "shortNames": ["po"], "categories": ["all"] },
            { "name": "pods/log", "singularName": "", "namespaced": true, "kind": "Pod", "verbs": ["get"] },
            { "name": "pods/status", "singularName": "", "namespaced": true, "kind": "Pod",
              "verbs": ["get", "patch", "update"] },
            { "name": "secrets", "singularName": "secret", "namespaced": true, "kind": "Secret",
              "verbs": verbs },
        ],
    })
}

fn api_groups() -> Value {
    let version = json!({ "groupVersion": "authorization.k8s.io/v1", "version": "v1" });
    let coordination = json!({ "groupVersion": "coordination.k8s.io/v1", "version": "v1" });
    json!({
        "kind": "APIGroupList", "apiVersion": "v1",
        "groups": [
            { "name": "authorization.k8s.io", "versions": [version], "preferredVersion": version },
            { "name": "coordination.k8s.io", "versions": [coordination], "preferredVersion": coordination },
        ],
    })
}

fn coordination_resources() -> Value {
    json!({
        "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "coordination.k8s.io/v1",
        "resources": [
            { "name": "leases", "singularName": "lease", "namespaced": true, "kind": "Lease",
              "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"] },
        ],
    })
}

fn authorization_resources() -> Value {
    json!({
        "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "authorization.k8s.io/v1",
        "resources": [
            { "name": "selfsubjectaccessreviews", "singularName": "selfsubjectaccessreview",
              "namespaced": false, "kind": "SelfSubjectAccessReview", "verbs": ["create"] },
            { "name": "selfsubjectrulesreviews", "singularName": "selfsubjectrulesreview",
              "namespaced": false, "kind": "SelfSubjectRulesReview", "verbs": ["create"] },
        ],
    })
}

fn denied(inner: &Inner, verb: &str, resource: &str) -> bool {
    let state = inner.lock();
    state.denied.iter().any(|(v, r)| {
        (v == verb || v == "*") && (r == resource || r == "*" || format!("{r}/*") == resource)
    })
}

/// Whether `ns` (empty: the cluster scope) is outside the one namespace the user's Role is
/// bound in, when it has only a Role.
fn outside_role(inner: &Inner, ns: &str) -> bool {
    inner
        .lock()
        .confined_to
        .as_deref()
        .is_some_and(|only| only != ns)
}

/// 403 with the API server's message when the test denied `verb` on `resource`.
fn authorize(
    inner: &Inner,
    verb: &str,
    resource: &str,
    ns: &str,
    name: Option<&str>,
) -> Result<(), ApiError> {
    if !denied(inner, verb, resource) && !outside_role(inner, ns) {
        return Ok(());
    }
    let user = inner.lock().user.clone();
    let (plural, _) = resource.split_once('/').unwrap_or((resource, ""));
    let group = Res::parse_coordination(plural).map_or("", Res::group);
    let subject = match name {
        Some(name) => format!("{plural} \"{name}\""),
        None => plural.to_owned(),
    };
    let scope = if ns.is_empty() {
        "at the cluster scope".to_owned()
    } else {
        format!("in the namespace \"{ns}\"")
    };
    let mut details = json!({ "kind": plural });
    if let Some(name) = name {
        details["name"] = json!(name);
    }
    Err(ApiError::new(
        403,
        "Forbidden",
        format!(
            "{subject} is forbidden: User \"{user}\" cannot {verb} resource \"{resource}\" in API group \"{group}\" {scope}"
        ),
    )
    .details(details))
}

fn access_review(inner: &Inner, body: &Bytes) -> Result<Response, ApiError> {
    let mut review: Value = parse_json(body)?;
    let attrs = &review["spec"]["resourceAttributes"];
    let verb = attrs["verb"].as_str().unwrap_or("");
    let mut resource = attrs["resource"].as_str().unwrap_or("").to_owned();
    if let Some(sub) = attrs["subresource"].as_str().filter(|s| !s.is_empty()) {
        resource = format!("{resource}/{sub}");
    }
    let group = attrs["group"].as_str().unwrap_or("");
    let plural = resource.split('/').next().unwrap_or("");
    let served = (group.is_empty() && Res::parse(plural).is_some())
        || Res::parse_coordination(plural).is_some_and(|r| r.group() == group);
    let namespace = attrs["namespace"].as_str().unwrap_or("");
    let allowed = !denied(inner, verb, &resource) && !outside_role(inner, namespace);
    review["kind"] = json!("SelfSubjectAccessReview");
    review["apiVersion"] = json!("authorization.k8s.io/v1");
    review["metadata"] = json!({ "creationTimestamp": null });
    review["status"] = if allowed {
        json!({ "allowed": true, "reason": if served { "RBAC: allowed by RoleBinding \"kiln/ci\" of Role \"kiln\" to ServiceAccount \"kiln/ci\"" } else { "" } })
    } else {
        json!({ "allowed": false })
    };
    Ok(json_response(201, &review))
}

fn parse_json(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "the request body could not be decoded as JSON: {e}"
        ))
    })
}

fn get(inner: &Inner, key: &Key, table: bool) -> Result<Response, ApiError> {
    authorize(inner, "get", key.0.plural(), &key.1, Some(&key.2))?;
    if table {
        let state = inner.lock();
        let obj = state
            .store
            .objects
            .get(key)
            .ok_or_else(|| ApiError::not_found(key.0, &key.2))?;
        return Ok(json_response(
            200,
            &as_table(key.0, std::slice::from_ref(obj), state.store.rv),
        ));
    }
    get_unchecked(inner, key)
}

fn get_unchecked(inner: &Inner, key: &Key) -> Result<Response, ApiError> {
    let state = inner.lock();
    let obj = state
        .store
        .objects
        .get(key)
        .ok_or_else(|| ApiError::not_found(key.0, &key.2))?;
    Ok(json_response(200, obj))
}

fn create(inner: &Arc<Inner>, res: Res, ns: &str, body: &Bytes) -> Result<Response, ApiError> {
    authorize(inner, "create", res.plural(), ns, None)?;
    let obj = parse_json(body)?;
    let created = if res == Res::Pods {
        // The pod and its kubelet runtime appear together: a test woken by the create (waiting
        // for the pod) may script the pod at once (evict, oom_kill), which needs the runtime.
        // `on_created` registers it and then wakes the waiters.
        let created = inner.lock().store.create(res, ns, obj)?;
        kubelet::on_created(inner, &created);
        created
    } else {
        inner.with(|s| s.store.create(res, ns, obj))?
    };
    after_write(inner, &created);
    Ok(json_response(201, &created))
}

/// An object whose owners are all gone is collected shortly after it is written.
fn after_write(inner: &Arc<Inner>, obj: &Value) {
    if inner.lock().store.orphaned(obj) {
        let inner = inner.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            inner.with(|s| s.collect_garbage());
        });
    }
}

fn update(
    inner: &Arc<Inner>,
    key: &Key,
    body: &Bytes,
    patch_type: Option<&str>,
) -> Result<Response, ApiError> {
    let verb = if patch_type.is_some() {
        "patch"
    } else {
        "update"
    };
    authorize(inner, verb, key.0.plural(), &key.1, Some(&key.2))?;
    write(inner, key, body, patch_type, false)
}

fn status_update(
    inner: &Arc<Inner>,
    key: &Key,
    body: &Bytes,
    patch_type: Option<&str>,
) -> Result<Response, ApiError> {
    let verb = if patch_type.is_some() {
        "patch"
    } else {
        "update"
    };
    authorize(inner, verb, "pods/status", &key.1, Some(&key.2))?;
    write(inner, key, body, patch_type, true)
}

fn write(
    inner: &Arc<Inner>,
    key: &Key,
    body: &Bytes,
    patch_type: Option<&str>,
    status_only: bool,
) -> Result<Response, ApiError> {
    let input = parse_json(body)?;
    let patch_type = patch_type.map(|t| t.split(';').next().unwrap_or("").trim().to_owned());
    let (code, result) = inner.with(|s| {
        let current = s.store.objects.get(key).cloned();
        let new = match (patch_type.as_deref(), current) {
            (None, None) => return (0, Err(ApiError::not_found(key.0, &key.2))),
            (None, Some(_)) => input,
            (Some("application/apply-patch+yaml"), None) => {
                return (201, s.store.create(key.0, &key.1, input));
            }
            (Some(_), None) => return (0, Err(ApiError::not_found(key.0, &key.2))),
            (Some(kind), Some(mut obj)) => {
                match kind {
                    "application/merge-patch+json" | "application/apply-patch+yaml" => {
                        merge_patch(&mut obj, &input)
                    }
                    "application/strategic-merge-patch+json" => {
                        strategic_merge_patch(&mut obj, &input)
                    }
                    "application/json-patch+json" => {
                        if let Err(e) = json_patch(&mut obj, &input) {
                            return (
                                0,
                                Err(ApiError::new(422, "Invalid", format!("the server rejected our request due to an error in our request: {e}"))),
                            );
                        }
                    }
                    other => {
                        return (
                            0,
                            Err(ApiError::new(
                                415,
                                "UnsupportedMediaType",
                                format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json; got {other}"),
                            )),
                        );
                    }
                }
                obj
            }
        };
        (200, s.store.update(key, new, status_only))
    });
    let obj = result?;
    if code == 201 && key.0 == Res::Pods {
        kubelet::on_created(inner, &obj);
    }
    after_write(inner, &obj);
    Ok(json_response(code.max(200), &obj))
}

fn delete_options(query: &Query, body: &Bytes) -> Result<DeleteOptions, ApiError> {
    let body: Value = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        parse_json(body)?
    };
    let grace = match query.get("gracePeriodSeconds") {
        Some(g) => Some(
            g.parse::<i64>()
                .map_err(|_| ApiError::bad_request(format!("invalid gracePeriodSeconds {g:?}")))?,
        ),
        None => body["gracePeriodSeconds"].as_i64(),
    };
    let orphan = query
        .get("orphanDependents")
        .map(|o| o == "true")
        .or(body["orphanDependents"].as_bool());
    let policy = query
        .get("propagationPolicy")
        .cloned()
        .or_else(|| body["propagationPolicy"].as_str().map(str::to_owned))
        .or_else(|| orphan.map(|o| if o { "Orphan" } else { "Background" }.to_owned()));
    Ok(DeleteOptions {
        grace,
        policy,
        uid: body["preconditions"]["uid"].as_str().map(str::to_owned),
        resource_version: body["preconditions"]["resourceVersion"]
            .as_str()
            .map(str::to_owned),
    })
}

fn delete(
    inner: &Arc<Inner>,
    key: &Key,
    query: &Query,
    body: &Bytes,
) -> Result<Response, ApiError> {
    authorize(inner, "delete", key.0.plural(), &key.1, Some(&key.2))?;
    let opts = delete_options(query, body)?;
    let obj = inner.with(|s| s.delete(key, &opts))?;
    Ok(json_response(200, &obj))
}

fn delete_collection(
    inner: &Arc<Inner>,
    res: Res,
    ns: &str,
    query: &Query,
    body: &Bytes,
) -> Result<Response, ApiError> {
    authorize(inner, "deletecollection", res.plural(), ns, None)?;
    let opts = delete_options(query, body)?;
    let selector = Selector::parse(
        res,
        query.get("labelSelector").map(String::as_str),
        query.get("fieldSelector").map(String::as_str),
    )?;
    let (items, rv) = inner.with(|s| {
        let keys: Vec<Key> = s
            .store
            .objects
            .iter()
            .filter(|((r, n, _), o)| *r == res && n == ns && selector.matches(o))
            .map(|(k, _)| k.clone())
            .collect();
        let items: Vec<Value> = keys
            .iter()
            .filter_map(|k| s.delete(k, &opts).ok())
            .collect();
        (items, s.store.rv)
    });
    Ok(json_response(
        200,
        &json!({ "kind": format!("{}List", res.kind()), "apiVersion": res.api_version(),
                 "metadata": { "resourceVersion": rv.to_string() }, "items": items }),
    ))
}

fn truthy(query: &Query, key: &str) -> bool {
    query.get(key).is_some_and(|v| v == "1" || v == "true")
}

async fn collection_get(
    inner: &Arc<Inner>,
    res: Res,
    ns: Option<&str>,
    query: &Query,
) -> Result<Response, ApiError> {
    let watch = truthy(query, "watch");
    authorize(
        inner,
        if watch { "watch" } else { "list" },
        res.plural(),
        ns.unwrap_or(""),
        None,
    )?;
    let selector = Selector::parse(
        res,
        query.get("labelSelector").map(String::as_str),
        query.get("fieldSelector").map(String::as_str),
    )?;
    if watch {
        return watch_stream(inner, res, ns.map(str::to_owned), selector, query);
    }
    let limit = query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0);
    let after = match query.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => Some(
            hex::decode(token)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|s| {
                    s.split_once('\0')
                        .map(|(a, b)| (a.to_owned(), b.to_owned()))
                })
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "continue key is not valid: incorrect encoded start resourceVersion",
                    )
                })?,
        ),
        None => None,
    };
    let state = inner.lock();
    let matching: Vec<(&Key, &Value)> = state
        .store
        .objects
        .iter()
        .filter(|((r, n, _), o)| *r == res && ns.is_none_or(|ns| ns == n) && selector.matches(o))
        .filter(|((_, n, name), _)| {
            after
                .as_ref()
                .is_none_or(|(an, aname)| (n, name) > (an, aname))
        })
        .collect();
    let take = limit.unwrap_or(usize::MAX).min(matching.len());
    let items: Vec<Value> = matching[..take].iter().map(|(_, o)| (*o).clone()).collect();
    if query.contains_key(TABLE) {
        return Ok(json_response(200, &as_table(res, &items, state.store.rv)));
    }
    let mut metadata = json!({ "resourceVersion": state.store.rv.to_string() });
    if take < matching.len()
        && let Some(((_, n, name), _)) = matching.get(take - 1)
    {
        metadata["continue"] = json!(hex::encode(format!("{n}\0{name}")));
        metadata["remainingItemCount"] = json!(matching.len() - take);
    }
    Ok(json_response(
        200,
        &json!({ "kind": format!("{}List", res.kind()), "apiVersion": res.api_version(),
                 "metadata": metadata, "items": items }),
    ))
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({ "type": kind, "object": object }).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn expired(rv: &str, oldest: u64) -> Value {
    ApiError::new(
        410,
        "Expired",
        format!("too old resource version: {rv} ({oldest})"),
    )
    .status()
}

fn bookmark(res: Res, rv: u64, initial_end: bool) -> Value {
    let mut meta = json!({ "resourceVersion": rv.to_string(), "creationTimestamp": null });
    if initial_end {
        meta["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
    }
    json!({ "kind": res.kind(), "apiVersion": res.api_version(), "metadata": meta })
}

/// `?watch=true`: replays the history after `resourceVersion` (or sends the current objects
/// as ADDED when none is given), then streams every change until the client leaves,
/// `timeoutSeconds` passes or the test ends watches.
fn watch_stream(
    inner: &Arc<Inner>,
    res: Res,
    ns: Option<String>,
    selector: Selector,
    query: &Query,
) -> Result<Response, ApiError> {
    let rv_param = query.get("resourceVersion").cloned().unwrap_or_default();
    let bookmarks = truthy(query, "allowWatchBookmarks");
    let initial_events = truthy(query, "sendInitialEvents");
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .filter(|t| *t > 0)
        .map(Duration::from_secs);
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let table = query.contains_key(TABLE);
    let event_line = move |kind: &str, object: &Value| {
        if table && matches!(kind, "ADDED" | "MODIFIED" | "DELETED") {
            let mut t = as_table(res, std::slice::from_ref(object), 0);
            t["metadata"] = json!({ "resourceVersion": object["metadata"]["resourceVersion"] });
            event_line(kind, &t)
        } else {
            event_line(kind, object)
        }
    };
    let matches = move |obj: &Value| {
        ns.as_deref()
            .is_none_or(|ns| obj["metadata"]["namespace"].as_str() == Some(ns))
            && selector.matches(obj)
    };
    let mut lines = Vec::new();
    let position = {
        let state = inner.lock();
        let store = &state.store;
        let legacy = rv_param.is_empty() || rv_param == "0";
        if legacy || initial_events {
            for ((r, _, _), obj) in &store.objects {
                if *r == res && matches(obj) {
                    lines.push(event_line("ADDED", obj));
                }
            }
            if initial_events && bookmarks {
                lines.push(event_line("BOOKMARK", &bookmark(res, store.rv, true)));
            }
            Some(store.rv)
        } else {
            match rv_param.parse::<u64>() {
                Ok(rv) if rv < store.compacted => {
                    lines.push(event_line("ERROR", &expired(&rv_param, store.compacted)));
                    None
                }
                Ok(rv) => Some(rv),
                Err(_) => {
                    return Err(ApiError::bad_request(format!(
                        "resourceVersion: Invalid value: \"{rv_param}\": must be a valid resourceVersion"
                    )));
                }
            }
        }
    };
    let inner = inner.clone();
    tokio::spawn(async move {
        for line in lines {
            if tx.send(line).await.is_err() {
                return;
            }
        }
        let Some(mut position) = position else {
            return;
        };
        let mut changed = inner.changed.subscribe();
        let mut generation = inner.watch_generation.subscribe();
        generation.mark_unchanged();
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut last_bookmark = tokio::time::Instant::now();
        loop {
            changed.mark_unchanged();
            let mut out = Vec::new();
            {
                let state = inner.lock();
                let store = &state.store;
                if position < store.compacted {
                    out.push(event_line(
                        "ERROR",
                        &expired(&position.to_string(), store.compacted),
                    ));
                    position = u64::MAX;
                } else {
                    for rec in store.history.iter().filter(|r| r.rv > position) {
                        if rec.res != res {
                            continue;
                        }
                        let now_matches = matches(&rec.object);
                        let was_matching = rec.previous.as_ref().is_some_and(&matches);
                        let kind = match rec.change {
                            Change::Modified if now_matches && !was_matching => "ADDED",
                            Change::Modified if !now_matches && was_matching => "DELETED",
                            _ if now_matches => rec.change.as_str(),
                            _ => continue,
                        };
                        out.push(event_line(kind, &rec.object));
                    }
                    position = store.rv;
                }
                if bookmarks && out.is_empty() && last_bookmark.elapsed() > Duration::from_secs(30)
                {
                    out.push(event_line("BOOKMARK", &bookmark(res, position, false)));
                    last_bookmark = tokio::time::Instant::now();
                }
            }
            for line in out {
                if tx.send(line).await.is_err() {
                    return;
                }
            }
            if position == u64::MAX {
                return;
            }
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = changed.changed() => if r.is_err() { return },
                _ = generation.changed() => return,
                () = sleep => return,
                () = tx.closed() => return,
                () = tokio::time::sleep(Duration::from_secs(31)) => {}
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|line| (Ok::<_, Infallible>(line), rx))
    });
    let mut response = Response::new(Body::from_stream(stream));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

async fn logs(
    inner: &Arc<Inner>,
    ns: &str,
    name: &str,
    query: &Query,
) -> Result<Response, ApiError> {
    authorize(inner, "get", "pods/log", ns, Some(name))?;
    let key: Key = (Res::Pods, ns.to_owned(), name.to_owned());
    let pod = inner
        .lock()
        .store
        .objects
        .get(&key)
        .cloned()
        .ok_or_else(|| ApiError::not_found(Res::Pods, name))?;
    let names: Vec<String> = pod["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(
            pod["spec"]["initContainers"]
                .as_array()
                .into_iter()
                .flatten(),
        )
        .filter_map(|c| c["name"].as_str().map(str::to_owned))
        .collect();
    let container = match query.get("container").filter(|c| !c.is_empty()) {
        Some(c) => {
            if !names.contains(c) {
                return Err(ApiError::bad_request(format!(
                    "container {c} is not valid for pod {name}"
                )));
            }
            c.clone()
        }
        None if names.len() == 1 => names[0].clone(),
        None => {
            return Err(ApiError::bad_request(format!(
                "a container name must be specified for pod {name}, choose one of: [{}]",
                names.join(" ")
            )));
        }
    };
    let uid = pod["metadata"]["uid"].as_str().unwrap_or("").to_owned();
    let started = {
        let state = inner.lock();
        state
            .runtimes
            .iter()
            .find(|rt| rt.uid == uid)
            .and_then(|rt| rt.containers.get(&container))
            .is_some_and(|c| c.started)
    };
    if !started {
        let reason = find_status(&pod, &container)["state"]["waiting"]["reason"]
            .as_str()
            .unwrap_or("ContainerCreating")
            .to_owned();
        return Err(ApiError::bad_request(format!(
            "container \"{container}\" in pod \"{name}\" is waiting to start: {reason}"
        )));
    }
    let read = move |inner: &Inner, from: usize| -> (Vec<u8>, bool) {
        let state = inner.lock();
        let c = state
            .runtimes
            .iter()
            .find(|rt| rt.uid == uid)
            .and_then(|rt| rt.containers.get(&container));
        match c {
            Some(c) => (c.log.get(from..).unwrap_or_default().to_vec(), c.finished),
            None => (Vec::new(), true),
        }
    };
    let text_response = |body: Body| {
        let mut response = Response::new(body);
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        response
    };
    if !truthy(query, "follow") {
        let (mut log, _) = read(inner, 0);
        if let Some(tail) = query.get("tailLines").and_then(|t| t.parse::<usize>().ok()) {
            let text = String::from_utf8_lossy(&log).into_owned();
            let lines: Vec<&str> = text.split_inclusive('\n').collect();
            log = lines[lines.len().saturating_sub(tail)..]
                .concat()
                .into_bytes();
        }
        return Ok(text_response(Body::from(log)));
    }
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let inner = inner.clone();
    tokio::spawn(async move {
        let mut changed = inner.changed.subscribe();
        let mut offset = 0;
        loop {
            changed.mark_unchanged();
            let (chunk, finished) = read(&inner, offset);
            offset += chunk.len();
            if !chunk.is_empty() && tx.send(Bytes::from(chunk)).await.is_err() {
                return;
            }
            if finished {
                return;
            }
            tokio::select! {
                r = changed.changed() => if r.is_err() { return },
                () = tx.closed() => return,
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    Ok(text_response(Body::from_stream(stream)))
}

fn find_status(pod: &Value, container: &str) -> Value {
    ["containerStatuses", "initContainerStatuses"]
        .iter()
        .flat_map(|f| pod["status"][f].as_array().cloned().unwrap_or_default())
        .find(|s| s["name"].as_str() == Some(container))
        .unwrap_or(Value::Null)
}

fn age(timestamp: &Value) -> String {
    let Some(at) = timestamp
        .as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
    else {
        return "<unknown>".into();
    };
    let secs = (chrono::Utc::now() - at.with_timezone(&chrono::Utc))
        .num_seconds()
        .max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 3 * 3600 => format!("{}m", s / 60),
        s if s < 48 * 3600 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// kubectl's STATUS column of a pod.
fn pod_status_text(pod: &Value) -> String {
    let status = &pod["status"];
    let mut reason = status["reason"]
        .as_str()
        .or(status["phase"].as_str())
        .unwrap_or("Pending")
        .to_owned();
    let inits = status["initContainerStatuses"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut initializing = false;
    for (i, c) in inits.iter().enumerate() {
        let state = &c["state"];
        if state["terminated"]["exitCode"] == 0 {
            continue;
        }
        initializing = true;
        reason = if let Some(r) = state["terminated"]["reason"].as_str() {
            format!("Init:{r}")
        } else if let Some(r) = state["waiting"]["reason"]
            .as_str()
            .filter(|r| *r != "PodInitializing")
        {
            format!("Init:{r}")
        } else {
            format!("Init:{i}/{}", inits.len())
        };
        break;
    }
    if !initializing {
        for c in status["containerStatuses"]
            .as_array()
            .into_iter()
            .flatten()
            .rev()
        {
            let state = &c["state"];
            if let Some(r) = state["waiting"]["reason"].as_str() {
                reason = r.to_owned();
            } else if let Some(r) = state["terminated"]["reason"].as_str() {
                reason = r.to_owned();
            }
        }
    }
    if pod["metadata"]["deletionTimestamp"].is_string() {
        reason = "Terminating".to_owned();
    }
    reason
}

/// Server-side printing for kubectl (`Accept: application/json;as=Table;g=meta.k8s.io;v=v1`).
fn as_table(res: Res, items: &[Value], rv: u64) -> Value {
    let column = |name: &str, kind: &str, priority: u8| {
        json!({ "name": name, "type": kind, "format": if name == "Name" { "name" } else { "" },
                "description": name, "priority": priority })
    };
    let (columns, rows): (Vec<Value>, Vec<Value>) = match res {
        Res::Pods => (
            vec![
                column("Name", "string", 0),
                column("Ready", "string", 0),
                column("Status", "string", 0),
                column("Restarts", "string", 0),
                column("Age", "string", 0),
                column("IP", "string", 1),
                column("Node", "string", 1),
            ],
            items
                .iter()
                .map(|p| {
                    let statuses = p["status"]["containerStatuses"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default();
                    let total = p["spec"]["containers"].as_array().map_or(0, Vec::len);
                    let ready = statuses.iter().filter(|c| c["ready"] == true).count();
                    json!([
                        p["metadata"]["name"],
                        format!("{ready}/{total}"),
                        pod_status_text(p),
                        "0",
                        age(&p["metadata"]["creationTimestamp"]),
                        p["status"]["podIP"].as_str().unwrap_or("<none>"),
                        p["spec"]["nodeName"].as_str().unwrap_or("<none>")
                    ])
                })
                .collect(),
        ),
        Res::Secrets => (
            vec![
                column("Name", "string", 0),
                column("Type", "string", 0),
                column("Data", "string", 0),
                column("Age", "string", 0),
            ],
            items
                .iter()
                .map(|s| {
                    json!([
                        s["metadata"]["name"],
                        s["type"],
                        s["data"]
                            .as_object()
                            .map_or(0, serde_json::Map::len)
                            .to_string(),
                        age(&s["metadata"]["creationTimestamp"])
                    ])
                })
                .collect(),
        ),
        Res::Events => (
            vec![
                column("Last Seen", "string", 0),
                column("Type", "string", 0),
                column("Reason", "string", 0),
                column("Object", "string", 0),
                column("Message", "string", 0),
                column("Name", "string", 1),
            ],
            items
                .iter()
                .map(|e| {
                    let object = format!(
                        "{}/{}",
                        e["involvedObject"]["kind"]
                            .as_str()
                            .unwrap_or("")
                            .to_lowercase(),
                        e["involvedObject"]["name"].as_str().unwrap_or("")
                    );
                    json!([
                        age(&e["lastTimestamp"]),
                        e["type"],
                        e["reason"],
                        object,
                        e["message"],
                        e["metadata"]["name"]
                    ])
                })
                .collect(),
        ),
        Res::ConfigMaps | Res::PersistentVolumeClaims => (
            vec![column("Name", "string", 0), column("Age", "string", 0)],
            items
                .iter()
                .map(|o| {
                    json!([
                        o["metadata"]["name"],
                        age(&o["metadata"]["creationTimestamp"])
                    ])
                })
                .collect(),
        ),
        Res::Leases => (
            vec![
                column("Name", "string", 0),
                column("Holder", "string", 0),
                column("Age", "string", 0),
            ],
            items
                .iter()
                .map(|l| {
                    json!([
                        l["metadata"]["name"],
                        l["spec"]["holderIdentity"].as_str().unwrap_or(""),
                        age(&l["metadata"]["creationTimestamp"])
                    ])
                })
                .collect(),
        ),
    };
    let rows: Vec<Value> = rows
        .into_iter()
        .zip(items)
        .map(|(cells, obj)| json!({ "cells": cells, "object": obj }))
        .collect();
    json!({
        "kind": "Table", "apiVersion": "meta.k8s.io/v1",
        "metadata": { "resourceVersion": rv.to_string() },
        "columnDefinitions": columns, "rows": rows,
    })
}
