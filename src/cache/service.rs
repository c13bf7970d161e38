//! The coordinator's side of the cache: grants each build access to its project's cache (a
//! directory, or a capability) and, at `POST /cache/v1/urls`, exchanges a capability for
//! pre-signed URLs of exactly the objects the build names. Data never flows through the
//! coordinator; the storage key never leaves it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use object_store::path::Path as ObjectPath;
use object_store::signer::Method;

use super::capability::Capabilities;
use super::config::{CacheConfig, CacheType, Storage, StorageError};
use super::format::valid_name;
use super::remote::{CacheAccess, CacheGrant, MAX_NAMES, UrlsRequest, UrlsResponse};

/// The longest a signed URL lives (a build asks again for later objects).
const URL_LIFETIME: Duration = Duration::from_secs(3600);
/// The shortest.
const URL_MIN_LIFETIME: Duration = Duration::from_secs(60);
/// The largest signing request body.
const BODY_LIMIT: usize = 256 << 10;

/// Grants and signs; one per coordinator. `Debug` shows no client (its credentials).
#[derive(Clone)]
pub struct CacheService {
    config: CacheConfig,
    storage: Option<Storage>,
    capabilities: Option<Capabilities>,
    coordinator_url: String,
}

impl std::fmt::Debug for CacheService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheService")
            .field("config", &self.config)
            .field("coordinator_url", &self.coordinator_url)
            .finish_non_exhaustive()
    }
}

impl CacheService {
    /// The service of `config`; builds reach it at `config.coordinator_url`, else at `listen`
    /// on the loopback interface.
    ///
    /// # Errors
    /// The object store cannot be set up from the config.
    pub fn new(config: &CacheConfig, listen: SocketAddr) -> Result<Self, StorageError> {
        let (storage, capabilities) = match config.kind {
            CacheType::Local => (None, None),
            _ => (
                Some(config.storage()?),
                Some(Capabilities::new(&config.secret().unwrap_or_default())),
            ),
        };
        let coordinator_url = config.coordinator_url.clone().unwrap_or_else(|| {
            let port = listen.port();
            if listen.ip().is_unspecified() || listen.ip().is_loopback() {
                format!("http://127.0.0.1:{port}")
            } else {
                format!("http://{listen}")
            }
        });
        Ok(Self {
            config: config.clone(),
            storage,
            capabilities,
            coordinator_url,
        })
    }

    /// The object-name prefix of a project's cache: `<path>/[runner/<runner>/]project/<id>/`.
    pub(crate) fn prefix(&self, runner: &str, project: &str) -> String {
        let mut prefix = String::new();
        let path = self.config.path.trim_matches('/');
        if !path.is_empty() {
            prefix.push_str(path);
            prefix.push('/');
        }
        if !self.config.shared {
            prefix.push_str(&format!("runner/{}/", sanitize(runner)));
        }
        prefix.push_str(&format!("project/{}/", sanitize(project)));
        prefix
    }

    /// What build `build` of `project` on `runner` gets, valid for `lifetime` (its timeout).
    pub fn grant(
        &self,
        runner: &str,
        project: &str,
        build: &str,
        lifetime: Duration,
    ) -> CacheGrant {
        let prefix = self.prefix(runner, project);
        let access = match (&self.capabilities, &self.config.local) {
            (Some(capabilities), _) => CacheAccess::Signed {
                url: self.coordinator_url.clone(),
                // Ten minutes past the timeout: saving runs after the script.
                capability: capabilities.issue(
                    build,
                    &prefix,
                    lifetime.saturating_add(Duration::from_secs(600)),
                ),
            },
            (None, local) => CacheAccess::Directory {
                dir: local
                    .as_ref()
                    .map(|l| l.dir.clone())
                    .unwrap_or_default()
                    .join(prefix),
            },
        };
        CacheGrant {
            access,
            max_size: self.config.max_size_bytes(),
        }
    }

    /// The object store, for `kiln cache gc`; `None` for a local directory.
    pub fn storage(&self) -> Option<&Storage> {
        self.storage.as_ref()
    }
}

/// Keeps a runner name or project path to one safe object-name segment.
fn sanitize(text: &str) -> String {
    let cleaned: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if cleaned.is_empty() {
        "_".into()
    } else {
        cleaned
    }
}

/// `POST /cache/v1/urls`; merged into the coordinator's HTTP router.
pub fn router(service: Arc<CacheService>) -> Router {
    Router::new()
        .route("/cache/v1/urls", post(sign))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(service)
}

/// A refusal: status and a short reason (never a URL or key).
struct Refusal(StatusCode, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (self.0, format!("{}\n", self.1)).into_response()
    }
}

async fn sign(
    State(service): State<Arc<CacheService>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<axum::Json<UrlsResponse>, Refusal> {
    let (Some(capabilities), Some(storage)) = (&service.capabilities, &service.storage) else {
        return Err(Refusal(
            StatusCode::NOT_FOUND,
            "this kiln's cache is a local directory; nothing to sign".into(),
        ));
    };
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| Refusal(StatusCode::UNAUTHORIZED, "missing cache capability".into()))?;
    let claims = capabilities
        .verify(token)
        .map_err(|e| Refusal(StatusCode::UNAUTHORIZED, e.to_string()))?;
    let request: UrlsRequest = serde_json::from_slice(&body).map_err(|e| {
        Refusal(
            StatusCode::BAD_REQUEST,
            format!("not a signing request: {e}"),
        )
    })?;
    let method = match request.method.as_str() {
        // A save writes packs and a manifest; a restore reads them. Nothing else is signed.
        "GET" => Method::GET,
        "PUT" => Method::PUT,
        other => {
            return Err(Refusal(
                StatusCode::BAD_REQUEST,
                format!("method {other:?} is not GET or PUT"),
            ));
        }
    };
    if request.names.len() > MAX_NAMES {
        return Err(Refusal(
            StatusCode::BAD_REQUEST,
            format!("at most {MAX_NAMES} names per request"),
        ));
    }
    if let Some(bad) = request.names.iter().find(|n| !valid_name(n)) {
        return Err(Refusal(
            StatusCode::BAD_REQUEST,
            format!("{bad:?} is not a cache object name (packs/<hash> or manifests/<key>)"),
        ));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let lifetime = Duration::from_secs(claims.expires.saturating_sub(now))
        .clamp(URL_MIN_LIFETIME, URL_LIFETIME);
    let paths: Vec<ObjectPath> = request
        .names
        .iter()
        .map(|n| ObjectPath::from(format!("{}{n}", claims.prefix)))
        .collect();
    let urls = storage
        .signer
        .signed_urls(method, &paths, lifetime)
        .await
        .map_err(|e| {
            tracing::error!(build = %claims.build, error = %e, "cannot sign cache URLs");
            Refusal(
                StatusCode::BAD_GATEWAY,
                "the coordinator cannot sign cache URLs (see its log)".into(),
            )
        })?;
    Ok(axum::Json(UrlsResponse {
        urls: urls.into_iter().map(String::from).collect(),
    }))
}
