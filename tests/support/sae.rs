//! An SAE OpenAPI + OSS test server: verifies every ACS3 and OSS V4 signature with kiln's
//! signer (proven against the official vectors in its unit tests), stores uploads, and walks
//! change orders through scripted states.
#![allow(dead_code, unreachable_pub)]

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use kiln::deploy::sae::{oss, signer};
use serde_json::{Value, json};

pub const ACCESS_KEY_ID: &str = "LTAI-test-id";
pub const ACCESS_KEY_SECRET: &str = "test-secret-never-printed";
pub const REGION: &str = "cn-hangzhou";
pub const BUCKET: &str = "builds";

/// How a change order started by DeployApplication unfolds; each DescribeChangeOrder moves it
/// one step on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// Two automatic batches, then success.
    Succeeds,
    /// The second batch fails with an error message.
    FailingBatch,
    /// The second batch waits for ConfirmPipelineBatch.
    ManualBatch,
    /// Status 1 with SubStatus 1 (failing while executing).
    SubStatusFailing,
}

/// One scripted state: order status, sub status, and each batch's status and message.
#[derive(Debug, Clone)]
struct Step {
    status: i64,
    sub_status: i64,
    batches: Vec<(i64, Option<&'static str>)>,
}

fn step(status: i64, sub_status: i64, batches: &[(i64, Option<&'static str>)]) -> Step {
    Step {
        status,
        sub_status,
        batches: batches.to_vec(),
    }
}

pub const FAILING_MESSAGE: &str =
    "instance orders-2 restarted 3 times: java.lang.IllegalStateException: no datasource";

fn script(scenario: Scenario) -> Vec<Step> {
    match scenario {
        Scenario::Succeeds => vec![
            step(0, 0, &[(0, None), (0, None)]),
            step(1, 0, &[(1, None), (0, None)]),
            step(9, 0, &[(2, None), (0, None)]),
            step(1, 0, &[(2, None), (1, None)]),
            step(2, 0, &[(2, None), (2, None)]),
        ],
        Scenario::FailingBatch => vec![
            step(0, 0, &[(0, None), (0, None)]),
            step(1, 0, &[(1, None), (0, None)]),
            step(1, 0, &[(2, None), (1, None)]),
            step(3, 0, &[(2, None), (3, Some(FAILING_MESSAGE))]),
        ],
        Scenario::ManualBatch => vec![
            step(1, 0, &[(1, None), (0, None)]),
            // Index 1 waits here until the batch is confirmed.
            step(8, 0, &[(2, None), (8, None)]),
            step(1, 0, &[(2, None), (1, None)]),
            step(2, 0, &[(2, None), (2, None)]),
        ],
        Scenario::SubStatusFailing => vec![
            step(1, 0, &[(1, None)]),
            step(1, 1, &[(1, Some("health check failed on port 8080"))]),
        ],
    }
}

#[derive(Debug)]
pub struct Order {
    pub id: String,
    pub app_id: String,
    pub description: String,
    steps: Vec<Step>,
    pub index: usize,
    pub confirmed: bool,
    pub describes: usize,
}

impl Order {
    fn current(&self) -> &Step {
        &self.steps[self.index.min(self.steps.len() - 1)]
    }

    fn pipeline_id(&self, i: usize) -> String {
        format!("{}-p{}", self.id, i + 1)
    }

    fn data(&self) -> Value {
        let step = self.current();
        let pipelines: Vec<Value> = step
            .batches
            .iter()
            .enumerate()
            .map(|(i, (status, err))| {
                json!({
                    "PipelineId": self.pipeline_id(i),
                    "PipelineName": format!("Batch {} change", i + 1),
                    "Status": status,
                    "ErrorMessage": err,
                })
            })
            .collect();
        json!({
            "ChangeOrderId": self.id,
            "Status": step.status,
            "SubStatus": step.sub_status,
            "Pipelines": pipelines,
            "BatchCount": step.batches.len(),
        })
    }
}

#[derive(Debug, Default)]
pub struct State {
    /// `(app id, app name)`.
    pub apps: Vec<(String, String)>,
    pub scenario: Option<Scenario>,
    pub objects: HashMap<String, Vec<u8>>,
    multipart: HashMap<String, (String, BTreeMap<u32, Vec<u8>>)>,
    /// Every request that reached a handler, signature verified or not: `METHOD path`.
    pub requests: Vec<String>,
    /// Requests rejected because their signature did not verify.
    pub rejected: Vec<String>,
    /// Query parameters of each accepted DeployApplication.
    pub deploys: Vec<HashMap<String, String>>,
    pub orders: Vec<Order>,
    pub versions: Vec<String>,
    pub confirmations: Vec<String>,
    /// Answer the next DeployApplication this late (the change order is still created).
    pub deploy_delay: Option<Duration>,
    /// PUT bodies received by OSS (single and part uploads), by key.
    pub uploads: Vec<String>,
}

#[derive(Clone)]
pub struct SaeServer {
    pub sae_url: String,
    pub oss_url: String,
    pub state: Arc<Mutex<State>>,
}

impl SaeServer {
    pub async fn start(scenario: Scenario) -> Self {
        let state = Arc::new(Mutex::new(State {
            apps: vec![
                ("app-1111".into(), "orders".into()),
                ("app-2222".into(), "billing".into()),
                ("app-3333".into(), "orders-legacy".into()),
            ],
            scenario: Some(scenario),
            ..State::default()
        }));
        let sae = Router::new()
            .fallback(sae_handler)
            .with_state(state.clone());
        let oss = Router::new()
            .fallback(oss_handler)
            .with_state(state.clone());
        let sae_url = serve(sae).await;
        let oss_url = serve(oss).await;
        Self {
            sae_url,
            oss_url,
            state,
        }
    }

    /// Adds a change order already running for `app_id`, finishing after `polls` describes.
    pub fn add_running_order(&self, app_id: &str, polls: usize) -> String {
        let mut s = self.state.lock().unwrap();
        let id = format!("co-running-{}", s.orders.len() + 1);
        let mut steps = vec![step(1, 0, &[(1, None)]); polls];
        steps.push(step(2, 0, &[(2, None)]));
        s.orders.push(Order {
            id: id.clone(),
            app_id: app_id.into(),
            description: "someone else's deploy".into(),
            steps,
            index: 0,
            confirmed: false,
            describes: 0,
        });
        id
    }

    pub fn sae_requests(&self, action_path: &str) -> usize {
        let s = self.state.lock().unwrap();
        s.requests
            .iter()
            .filter(|r| r.contains(action_path))
            .count()
    }
}

async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, router).await.unwrap();
    });
    format!("http://{addr}")
}

fn lookup(id: &str) -> Option<String> {
    (id == ACCESS_KEY_ID).then(|| ACCESS_KEY_SECRET.to_owned())
}

fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

fn query_pairs(raw: Option<&str>) -> Vec<(String, String)> {
    raw.unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

fn header_pairs(req: &Request<Body>) -> Vec<(String, String)> {
    req.headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
        .collect()
}

fn sae_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({
            "RequestId": "req-test",
            "Code": code,
            "Message": message,
            "Success": false,
        })),
    )
        .into_response()
}

fn sae_ok(data: Value) -> Response {
    axum::Json(json!({
        "RequestId": "req-test",
        "Code": "200",
        "Message": "success",
        "Success": true,
        "Data": data,
    }))
    .into_response()
}

fn is_final(status: i64) -> bool {
    matches!(status, 2 | 3 | 6 | 10)
}

async fn sae_handler(
    axum::extract::State(state): axum::extract::State<Arc<Mutex<State>>>,
    req: Request<Body>,
) -> Response {
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let query = query_pairs(req.uri().query());
    let headers = header_pairs(&req);
    let body = axum::body::to_bytes(req.into_body(), 1 << 20)
        .await
        .unwrap();
    state
        .lock()
        .unwrap()
        .requests
        .push(format!("{method} {path}"));

    let header = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    if let Err(reason) = signer::verify(lookup, &method, &path, &query, &headers, &body) {
        state
            .lock()
            .unwrap()
            .rejected
            .push(format!("{method} {path}: {reason}"));
        return if reason == "InvalidAccessKeyId.NotFound" {
            sae_error(
                StatusCode::NOT_FOUND,
                "InvalidAccessKeyId.NotFound",
                "Specified access key is not found.",
            )
        } else {
            sae_error(
                StatusCode::BAD_REQUEST,
                "SignatureDoesNotMatch",
                &format!("The request signature does not conform to Aliyun standards: {reason}"),
            )
        };
    }
    if header("x-acs-version") != "2019-05-06" {
        return sae_error(StatusCode::BAD_REQUEST, "InvalidVersion", "bad version");
    }
    let q: HashMap<String, String> = query.iter().cloned().collect();
    let expected_action = match path.as_str() {
        "/pop/v1/sam/app/deployApplication" => "DeployApplication",
        "/pop/v1/sam/app/listApplications" => "ListApplications",
        "/pop/v1/sam/changeorder/DescribeChangeOrder" => "DescribeChangeOrder",
        "/pop/v1/sam/changeorder/ListChangeOrders" => "ListChangeOrders",
        "/pop/v1/sam/changeorder/ConfirmPipelineBatch" => "ConfirmPipelineBatch",
        _ => {
            return sae_error(
                StatusCode::NOT_FOUND,
                "InvalidAction.NotFound",
                "no such API",
            );
        }
    };
    if header("x-acs-action") != expected_action {
        return sae_error(StatusCode::BAD_REQUEST, "InvalidAction", "action mismatch");
    }
    match expected_action {
        "ListApplications" => {
            let s = state.lock().unwrap();
            let value = q.get("FieldValue").cloned().unwrap_or_default();
            // Like SAE, FieldValue matches by substring.
            let apps: Vec<Value> = s
                .apps
                .iter()
                .filter(|(_, name)| name.contains(&value))
                .map(|(id, name)| json!({ "AppId": id, "AppName": name, "NamespaceId": "cn-hangzhou" }))
                .collect();
            sae_ok(json!({ "Applications": apps, "TotalSize": apps.len() }))
        }
        "DeployApplication" => deploy(&state, &q).await,
        "DescribeChangeOrder" => {
            let mut s = state.lock().unwrap();
            let id = q.get("ChangeOrderId").cloned().unwrap_or_default();
            let Some(order) = s.orders.iter_mut().find(|o| o.id == id) else {
                return sae_error(
                    StatusCode::NOT_FOUND,
                    "ChangeOrder.NotFound",
                    "no such order",
                );
            };
            order.describes += 1;
            let data = order.data();
            // Move one step on, except while a manual batch waits for its confirmation.
            let waiting = order.current().status == 8 && !order.confirmed;
            if !waiting && order.index + 1 < order.steps.len() {
                order.index += 1;
            }
            sae_ok(data)
        }
        "ListChangeOrders" => {
            let s = state.lock().unwrap();
            let app = q.get("AppId").cloned().unwrap_or_default();
            let list: Vec<Value> = s
                .orders
                .iter()
                .filter(|o| o.app_id == app)
                .map(|o| {
                    json!({
                        "ChangeOrderId": o.id,
                        "Status": o.current().status,
                        "Description": o.description,
                        "CreateTime": "2024-01-01 00:00:00",
                    })
                })
                .collect();
            sae_ok(json!({ "ChangeOrderList": list, "TotalSize": list.len() }))
        }
        "ConfirmPipelineBatch" => {
            let mut s = state.lock().unwrap();
            let pipeline = q.get("PipelineId").cloned().unwrap_or_default();
            if q.get("Confirm").map(String::as_str) != Some("true") {
                return sae_error(StatusCode::BAD_REQUEST, "InvalidParameter", "Confirm");
            }
            let Some(order) = s
                .orders
                .iter_mut()
                .find(|o| (0..4).any(|i| o.pipeline_id(i) == pipeline))
            else {
                return sae_error(
                    StatusCode::NOT_FOUND,
                    "Pipeline.NotFound",
                    "no such pipeline",
                );
            };
            if order.current().status != 8 {
                return sae_error(
                    StatusCode::BAD_REQUEST,
                    "Pipeline.NotWaiting",
                    "not waiting",
                );
            }
            order.confirmed = true;
            order.index += 1;
            s.confirmations.push(pipeline);
            sae_ok(Value::Null)
        }
        _ => unreachable!(),
    }
}

async fn deploy(state: &Arc<Mutex<State>>, q: &HashMap<String, String>) -> Response {
    let delay = {
        let mut s = state.lock().unwrap();
        let app = q.get("AppId").cloned().unwrap_or_default();
        if !s.apps.iter().any(|(id, _)| *id == app) {
            return sae_error(StatusCode::NOT_FOUND, "Application.NotFound", "no such app");
        }
        if s.orders
            .iter()
            .any(|o| o.app_id == app && !is_final(o.current().status))
        {
            return sae_error(
                StatusCode::BAD_REQUEST,
                "Application.ChangerOrderRunning",
                "Another change order is running for this application.",
            );
        }
        let package_type = q.get("PackageType").cloned().unwrap_or_default();
        match package_type.as_str() {
            "FatJar" | "War" => {
                let Some(version) = q.get("PackageVersion") else {
                    return sae_error(
                        StatusCode::BAD_REQUEST,
                        "InvalidParameter",
                        "PackageVersion",
                    );
                };
                if s.versions.contains(version) {
                    return sae_error(
                        StatusCode::BAD_REQUEST,
                        "App.Package.Version.Exists",
                        "The package version already exists.",
                    );
                }
                let url = q.get("PackageUrl").cloned().unwrap_or_default();
                if let Err(reason) = check_package_url(&s, &url) {
                    return sae_error(StatusCode::BAD_REQUEST, "InvalidPackageUrl", &reason);
                }
                s.versions.push(version.clone());
            }
            "Image" => {
                if q.get("ImageUrl").is_none_or(String::is_empty) {
                    return sae_error(StatusCode::BAD_REQUEST, "InvalidParameter", "ImageUrl");
                }
            }
            _ => {
                return sae_error(
                    StatusCode::BAD_REQUEST,
                    "InvalidPackageType.NotFound",
                    "unknown package type",
                );
            }
        }
        let id = format!("co-{}", s.orders.len() + 1);
        let scenario = s.scenario.unwrap_or(Scenario::Succeeds);
        s.orders.push(Order {
            id: id.clone(),
            app_id: app.clone(),
            description: q.get("ChangeOrderDesc").cloned().unwrap_or_default(),
            steps: script(scenario),
            index: 0,
            confirmed: false,
            describes: 0,
        });
        s.deploys.push(q.clone());
        let delay = s.deploy_delay.take();
        (delay, id, app)
    };
    let (delay, id, app) = delay;
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    sae_ok(json!({ "ChangeOrderId": id, "AppId": app }))
}

/// Does what SAE does with a PackageUrl: fetch it. Here: verify the presigned URL and that
/// the object exists.
fn check_package_url(s: &State, url: &str) -> Result<(), String> {
    let parsed = url::Url::parse(url).map_err(|e| e.to_string())?;
    let path = decode(parsed.path());
    let rest = path.trim_start_matches('/');
    let (bucket, key) = rest.split_once('/').ok_or("no bucket in PackageUrl")?;
    let query = query_pairs(parsed.query());
    oss::verify_presigned(
        lookup,
        REGION,
        "GET",
        bucket,
        key,
        &query,
        chrono::Utc::now(),
    )
    .map_err(str::to_owned)?;
    if !s.objects.contains_key(&format!("{bucket}/{key}")) {
        return Err(format!("object {bucket}/{key} does not exist"));
    }
    Ok(())
}

fn oss_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        [("content-type", "application/xml")],
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code>\
             <Message>{message}</Message><RequestId>oss-req</RequestId></Error>"
        ),
    )
        .into_response()
}

async fn oss_handler(
    axum::extract::State(state): axum::extract::State<Arc<Mutex<State>>>,
    req: Request<Body>,
) -> Response {
    let method = req.method().as_str().to_owned();
    let path = decode(req.uri().path());
    let query = query_pairs(req.uri().query());
    let headers = header_pairs(&req);
    let body = axum::body::to_bytes(req.into_body(), 1 << 28)
        .await
        .unwrap()
        .to_vec();
    state
        .lock()
        .unwrap()
        .requests
        .push(format!("OSS {method} {path}"));
    let rest = path.trim_start_matches('/');
    let Some((bucket, key)) = rest.split_once('/') else {
        return oss_error(StatusCode::BAD_REQUEST, "InvalidObjectName", "no key");
    };
    let request = oss::OssRequest {
        method: &method,
        bucket,
        key,
        query: &query,
        headers: &headers,
    };
    let verified = if query.iter().any(|(k, _)| k == "x-oss-signature") {
        oss::verify_presigned(
            lookup,
            REGION,
            &method,
            bucket,
            key,
            &query,
            chrono::Utc::now(),
        )
    } else {
        oss::verify_header(lookup, REGION, &request)
    };
    if let Err(reason) = verified {
        state
            .lock()
            .unwrap()
            .rejected
            .push(format!("OSS {method} {path}: {reason}"));
        let code = reason.split(':').next().unwrap_or(reason);
        return oss_error(StatusCode::FORBIDDEN, code, reason);
    }
    if bucket != BUCKET {
        return oss_error(
            StatusCode::NOT_FOUND,
            "NoSuchBucket",
            "The specified bucket does not exist.",
        );
    }
    let full = format!("{bucket}/{key}");
    let q: HashMap<String, String> = query.iter().cloned().collect();
    let mut s = state.lock().unwrap();
    match method.as_str() {
        "HEAD" => match s.objects.get(&full) {
            Some(data) => {
                (StatusCode::OK, [("content-length", data.len().to_string())]).into_response()
            }
            None => StatusCode::NOT_FOUND.into_response(),
        },
        "GET" => match s.objects.get(&full) {
            Some(data) => (StatusCode::OK, data.clone()).into_response(),
            None => oss_error(
                StatusCode::NOT_FOUND,
                "NoSuchKey",
                "The specified key does not exist.",
            ),
        },
        "PUT" if q.contains_key("uploadId") => {
            let id = &q["uploadId"];
            let number: u32 = q
                .get("partNumber")
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let etag = format!("\"{}\"", &signer::sha256_hex(&body)[..32]);
            let Some((_, parts)) = s.multipart.get_mut(id) else {
                return oss_error(StatusCode::NOT_FOUND, "NoSuchUpload", "no such upload");
            };
            parts.insert(number, body);
            s.uploads.push(format!("part {number} {full}"));
            (StatusCode::OK, [("etag", etag)]).into_response()
        }
        "PUT" => {
            let declared: usize = headers
                .iter()
                .find(|(k, _)| k == "content-length")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(usize::MAX);
            if declared != body.len() {
                return oss_error(StatusCode::BAD_REQUEST, "IncompleteBody", "length mismatch");
            }
            s.objects.insert(full.clone(), body);
            s.uploads.push(format!("put {full}"));
            (StatusCode::OK, [("etag", "\"x\"")]).into_response()
        }
        "POST" if q.contains_key("uploads") => {
            let id = format!("upload-{}", s.multipart.len() + 1);
            s.multipart
                .insert(id.clone(), (full.clone(), BTreeMap::new()));
            (
                StatusCode::OK,
                format!(
                    "<?xml version=\"1.0\" encoding=\"UTF-8\"?><InitiateMultipartUploadResult>\
                     <Bucket>{bucket}</Bucket><Key>{key}</Key><UploadId>{id}</UploadId>\
                     </InitiateMultipartUploadResult>"
                ),
            )
                .into_response()
        }
        "POST" if q.contains_key("uploadId") => {
            let id = q["uploadId"].clone();
            let Some((target, parts)) = s.multipart.remove(&id) else {
                return oss_error(StatusCode::NOT_FOUND, "NoSuchUpload", "no such upload");
            };
            let listed = String::from_utf8_lossy(&body).matches("<Part>").count();
            if listed != parts.len() || target != full {
                return oss_error(StatusCode::BAD_REQUEST, "InvalidPart", "parts do not match");
            }
            let data: Vec<u8> = parts.into_values().flatten().collect();
            s.objects.insert(full.clone(), data);
            s.uploads.push(format!("complete {full}"));
            (StatusCode::OK, "<CompleteMultipartUploadResult/>").into_response()
        }
        "DELETE" => {
            if let Some(id) = q.get("uploadId") {
                s.multipart.remove(id);
            }
            StatusCode::NO_CONTENT.into_response()
        }
        _ => oss_error(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", "method"),
    }
}
