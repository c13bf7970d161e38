//! Who is calling and what they may do: the `Authorization` header (PAT, App JWT, installation token), GitHub's rate limits with their headers, conditional requests (`ETag`, `If-None-Match` → 304, which GitHub does not count against the primary rate limit), and the request log.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use rand::Rng;

use super::{
    ANONYMOUS_RATE_LIMIT, Access, AuthKind, DEFAULT_RATE_LIMIT, GitHubServer, Level, RequestRecord,
    ServerState, Shared, Srv, apps, error, keys, not_found, unauthorized, unix,
};

/// Who sent a request, as the handlers see it.
#[derive(Clone)]
pub(super) struct Caller {
    pub(super) kind: AuthKind,
    /// The account the credential belongs to (PAT owner, installation account).
    pub(super) owner: String,
    pub(super) access: Access,
    pub(super) installation: Option<u64>,
    pub(super) app: Option<u64>,
}

impl Caller {
    /// The rate-limit bucket: per installation, App, user, or all anonymous callers.
    pub(super) fn bucket(&self) -> String {
        match (self.kind, self.installation, self.app) {
            (AuthKind::Installation, Some(id), _) => format!("installation {id}"),
            (AuthKind::AppJwt, _, Some(app)) => format!("app {app}"),
            (AuthKind::Anonymous, _, _) => "anonymous".to_owned(),
            _ => format!("user {}", self.owner.to_ascii_lowercase()),
        }
    }

    pub(super) fn not_accessible(&self) -> &'static str {
        match self.kind {
            AuthKind::Pat => "Resource not accessible by personal access token",
            _ => "Resource not accessible by integration",
        }
    }

    /// The repository `owner/name` if this caller may use it with `permission` at `level`.
    pub(super) fn repo(
        &self,
        st: &ServerState,
        owner: &str,
        name: &str,
        permission: &str,
        level: Level,
    ) -> Result<u64, Response> {
        if self.kind == AuthKind::AppJwt {
            return Err(error(StatusCode::FORBIDDEN, self.not_accessible()));
        }
        if self.access.classic_scopes.is_some() {
            // A classic token reaches the user's own repositories and those of the
            // organizations of enterprises the user administers, with the `repo` scope.
            let user = self.owner.to_ascii_lowercase();
            let repo = st
                .find_repo(owner, name)
                .filter(|r| {
                    r.owner.eq_ignore_ascii_case(&user)
                        || st
                            .enterprise_of(&r.owner)
                            .is_some_and(|e| e.admins.contains(&user))
                })
                .filter(|_| self.access.has_scope("repo"))
                .ok_or_else(not_found)?;
            return Ok(repo.id);
        }
        let repo = st
            .find_repo(owner, name)
            .filter(|r| r.owner.eq_ignore_ascii_case(&self.owner) && self.access.covers(&r.name))
            .ok_or_else(not_found)?;
        self.permitted(permission, level)?;
        Ok(repo.id)
    }

    /// The organization `org` (lower-case login) if this caller may use it with `permission`.
    pub(super) fn org(
        &self,
        st: &ServerState,
        org: &str,
        permission: &str,
        level: Level,
    ) -> Result<String, Response> {
        if self.kind == AuthKind::AppJwt {
            return Err(error(StatusCode::FORBIDDEN, self.not_accessible()));
        }
        let account = st
            .find_account(org)
            .filter(|a| a.org && a.login.eq_ignore_ascii_case(&self.owner))
            .ok_or_else(not_found)?;
        self.permitted(permission, level)?;
        Ok(account.login.to_ascii_lowercase())
    }

    /// The enterprise `slug` (lower-case) if this caller may manage its runners. As GitHub
    /// documents for every enterprise runner endpoint: only a personal access token (classic)
    /// or OAuth token with `manage_runners:enterprise` (or `admin:enterprise`) of an enterprise
    /// owner; not GitHub App installation tokens, not fine-grained tokens.
    pub(super) fn enterprise(&self, st: &ServerState, slug: &str) -> Result<String, Response> {
        if self.kind != AuthKind::Pat || self.access.classic_scopes.is_none() {
            return Err(error(StatusCode::FORBIDDEN, self.not_accessible()));
        }
        let enterprise = st
            .enterprises
            .get(&slug.to_ascii_lowercase())
            .filter(|e| e.admins.contains(&self.owner.to_ascii_lowercase()))
            .ok_or_else(not_found)?;
        if !self.access.has_scope("manage_runners:enterprise")
            && !self.access.has_scope("admin:enterprise")
        {
            let mut refusal = error(
                StatusCode::FORBIDDEN,
                "Must have admin rights to Repository.",
            );
            refusal.headers_mut().insert(
                "x-accepted-oauth-scopes",
                HeaderValue::from_static("admin:enterprise, manage_runners:enterprise"),
            );
            return Err(refusal);
        }
        Ok(enterprise.slug.to_ascii_lowercase())
    }

    fn permitted(&self, permission: &str, level: Level) -> Result<(), Response> {
        if self.access.allows(permission, level) {
            return Ok(());
        }
        let mut refusal = error(StatusCode::FORBIDDEN, self.not_accessible());
        refusal.headers_mut().insert(
            "x-accepted-github-permissions",
            HeaderValue::from_str(&format!("{permission}={}", level.as_str())).unwrap(),
        );
        Err(refusal)
    }
}
/// Authenticates, applies the rate limits, records the request and adds the headers every
/// GitHub answer carries. The `/_test/` runner endpoints pass straight through.
pub(super) async fn gate(
    axum::extract::State(s): Srv,
    mut request: Request,
    next: Next,
) -> Response {
    if request.uri().path().starts_with("/_test/") {
        return next.run(request).await;
    }
    let method = request.method().to_string();
    let path = request.uri().path_and_query().map_or_else(
        || request.uri().path().to_owned(),
        |p| p.as_str().to_owned(),
    );
    let is_app_route = request.uri().path().starts_with("/app");
    let if_none_match = (request.method() == axum::http::Method::GET)
        .then(|| request.headers().get(header::IF_NONE_MATCH).cloned())
        .flatten();
    let is_get = request.method() == axum::http::Method::GET;
    let (caller, refusal) = authenticate(&s, request.headers(), is_app_route);
    let installation = caller.as_ref().and_then(|c| c.installation);
    let kind = caller.as_ref().map_or(AuthKind::Invalid, |c| c.kind);
    let bucket = caller
        .as_ref()
        .map_or_else(|| "anonymous".to_owned(), Caller::bucket);
    let counted = request.uri().path() != "/rate_limit" && refusal.is_none();
    let limit_refusal = if counted {
        s.lock().rate.take(&bucket, kind, installation)
    } else {
        None
    };
    let mut response = match (refusal, limit_refusal, caller) {
        (Some(refusal), _, _) => refusal,
        (None, Some(refusal), _) => refusal,
        (None, None, Some(caller)) => {
            if caller.kind == AuthKind::Anonymous && request.uri().path() != "/rate_limit" {
                error(StatusCode::UNAUTHORIZED, "Requires authentication")
            } else {
                request.extensions_mut().insert(caller);
                next.run(request).await
            }
        }
        (None, None, None) => unauthorized("Bad credentials"),
    };
    let delay = s.lock().listing_delay;
    let listing = path.split('?').next().is_some_and(|p| {
        p.ends_with("/actions/runs") || (p.contains("/actions/runs/") && p.ends_with("/jobs"))
    });
    if is_get && listing && !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if is_get && response.status() == StatusCode::OK {
        response = conditional(
            &s,
            response,
            if_none_match,
            counted.then_some((&bucket, kind)),
        )
        .await;
    }
    let mut st = s.lock();
    let headers = response.headers_mut();
    if !headers.contains_key("x-ratelimit-limit") {
        st.rate.headers(&bucket, kind, headers);
    }
    headers.insert(
        "x-github-api-version-selected",
        HeaderValue::from_static("2022-11-28"),
    );
    headers.insert(
        "x-github-request-id",
        HeaderValue::from_str(&format!(
            "{:04X}:{:06X}:{:08X}",
            rand::rng().random::<u16>(),
            rand::rng().random::<u32>() >> 8,
            rand::rng().random::<u32>()
        ))
        .unwrap(),
    );
    st.requests.push(RequestRecord {
        method,
        path,
        status: response.status().as_u16(),
        auth: kind,
        installation,
        at: SystemTime::now(),
    });
    response
}

/// A 200 answer to a GET gets an `ETag` (a hash of its body); when the request's
/// `If-None-Match` names it, the answer is `304 Not Modified` without a body, and — as GitHub
/// documents for authorized conditional requests — it does not count against the rate limit.
async fn conditional(
    s: &Shared,
    response: Response,
    if_none_match: Option<HeaderValue>,
    counted: Option<(&str, AuthKind)>,
) -> Response {
    use sha2::Digest;
    let (mut parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return Response::from_parts(parts, axum::body::Body::empty());
    };
    let etag = format!("W/\"{}\"", hex::encode(sha2::Sha256::digest(&bytes)));
    let matches = if_none_match
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|tag| tag.trim() == etag || tag.trim() == "*")
        });
    parts
        .headers
        .insert(header::ETAG, HeaderValue::from_str(&etag).unwrap());
    if !matches {
        return Response::from_parts(parts, axum::body::Body::from(bytes));
    }
    if let Some((bucket, kind)) = counted {
        let mut st = s.lock();
        let bucket = st.rate.bucket(bucket, kind);
        bucket.used = bucket.used.saturating_sub(1);
    }
    parts.status = StatusCode::NOT_MODIFIED;
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.remove(header::CONTENT_TYPE);
    parts.headers.remove(header::LINK);
    Response::from_parts(parts, axum::body::Body::empty())
}

/// Who the `Authorization` header names; `Err`-like refusals come back as the second value.
fn authenticate(
    s: &Shared,
    headers: &HeaderMap,
    is_app_route: bool,
) -> (Option<Caller>, Option<Response>) {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        let anonymous = Caller {
            kind: AuthKind::Anonymous,
            owner: String::new(),
            access: Access {
                repos: Some(Vec::new()),
                permissions: BTreeMap::new(),
                classic_scopes: None,
            },
            installation: None,
            app: None,
        };
        return (Some(anonymous), None);
    };
    let token = match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("token") =>
        {
            token.trim()
        }
        _ => return (None, Some(unauthorized("Bad credentials"))),
    };
    let st = s.lock();
    if keys::looks_like_jwt(token) {
        return match apps::verify_app_jwt(&st, token) {
            Ok(app) => (
                Some(Caller {
                    kind: AuthKind::AppJwt,
                    owner: String::new(),
                    access: Access {
                        repos: Some(Vec::new()),
                        permissions: BTreeMap::new(),
                        classic_scopes: None,
                    },
                    installation: None,
                    app: Some(app),
                }),
                None,
            ),
            Err(e) => (None, Some(unauthorized(e.message()))),
        };
    }
    // Anything but a JWT on /app routes is read as a JWT and fails to decode.
    if is_app_route {
        return (
            None,
            Some(unauthorized(keys::JwtError::Undecodable.message())),
        );
    }
    if let Some(pat) = st.pats.get(token) {
        return (
            Some(Caller {
                kind: AuthKind::Pat,
                owner: pat.owner.clone(),
                access: pat.access.clone(),
                installation: None,
                app: None,
            }),
            None,
        );
    }
    match st.tokens.get(token) {
        Some(t) if t.expires_at > SystemTime::now() => {
            let inst = &st.installations[&t.installation_id];
            (
                Some(Caller {
                    kind: AuthKind::Installation,
                    owner: inst.account.clone(),
                    access: t.access.clone(),
                    installation: Some(inst.id),
                    app: Some(inst.app_id),
                }),
                None,
            )
        }
        _ => (None, Some(unauthorized("Bad credentials"))),
    }
}

impl RateState {
    fn limit_for(&self, kind: AuthKind) -> u64 {
        self.limit.unwrap_or(match kind {
            AuthKind::Anonymous | AuthKind::Invalid => ANONYMOUS_RATE_LIMIT,
            _ => DEFAULT_RATE_LIMIT,
        })
    }

    fn bucket(&mut self, key: &str, kind: AuthKind) -> &mut Bucket {
        let now = SystemTime::now();
        let limit = self.limit_for(kind);
        let window = self.window.unwrap_or(Duration::from_secs(3600));
        let bucket = self.buckets.entry(key.to_owned()).or_insert(Bucket {
            limit,
            used: 0,
            reset: now + window,
        });
        if bucket.reset <= now {
            bucket.used = 0;
            bucket.reset = now + window;
        }
        bucket
    }

    /// Counts one request against `key`; a refusal when a limit is in force.
    fn take(&mut self, key: &str, kind: AuthKind, installation: Option<u64>) -> Option<Response> {
        let now = SystemTime::now();
        if let Some((until, status, retry_after)) = self.secondary {
            if until > now {
                let mut refusal = error(
                    status,
                    "You have exceeded a secondary rate limit. Please wait a few minutes before you try again. If you reach out to GitHub Support for help, please include the request ID.",
                );
                refusal
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
                self.headers(key, kind, refusal.headers_mut());
                return Some(refusal);
            }
            self.secondary = None;
        }
        let who = match (kind, installation) {
            (AuthKind::Installation, Some(id)) => format!("installation ID {id}"),
            _ => key.to_owned(),
        };
        let message = format!(
            "API rate limit exceeded for {who}. If you reach out to GitHub Support for help, please include the request ID."
        );
        if let Some((until, status)) = self.exhausted {
            if until > now {
                let mut refusal = error(status, &message);
                let limit = self.limit_for(kind);
                let h = refusal.headers_mut();
                h.insert("x-ratelimit-limit", HeaderValue::from(limit));
                h.insert("x-ratelimit-remaining", HeaderValue::from(0));
                h.insert("x-ratelimit-reset", HeaderValue::from(unix(until)));
                h.insert("x-ratelimit-used", HeaderValue::from(limit));
                h.insert("x-ratelimit-resource", HeaderValue::from_static("core"));
                return Some(refusal);
            }
            self.exhausted = None;
        }
        let bucket = self.bucket(key, kind);
        if bucket.used >= bucket.limit {
            let mut refusal = error(StatusCode::FORBIDDEN, &message);
            self.headers(key, kind, refusal.headers_mut());
            return Some(refusal);
        }
        bucket.used += 1;
        None
    }

    /// `x-ratelimit-*` of bucket `key`.
    pub(super) fn headers(&mut self, key: &str, kind: AuthKind, headers: &mut HeaderMap) {
        let bucket = self.bucket(key, kind);
        headers.insert("x-ratelimit-limit", HeaderValue::from(bucket.limit));
        headers.insert(
            "x-ratelimit-remaining",
            HeaderValue::from(bucket.limit.saturating_sub(bucket.used)),
        );
        headers.insert("x-ratelimit-reset", HeaderValue::from(unix(bucket.reset)));
        headers.insert("x-ratelimit-used", HeaderValue::from(bucket.used));
        headers.insert("x-ratelimit-resource", HeaderValue::from_static("core"));
    }
}
struct Bucket {
    limit: u64,
    used: u64,
    reset: SystemTime,
}

#[derive(Default)]
pub(super) struct RateState {
    /// Overrides the limit of every bucket.
    limit: Option<u64>,
    window: Option<Duration>,
    buckets: HashMap<String, Bucket>,
    /// Until when, and with which status, every bucket is exhausted.
    exhausted: Option<(SystemTime, StatusCode)>,
    /// Until when, with which status and `retry-after`, a secondary limit answers.
    secondary: Option<(SystemTime, StatusCode, u64)>,
}

impl GitHubServer {
    /// Every bucket's primary limit is `limit` from now on (5000 by default), its window
    /// `window` (an hour).
    pub fn set_rate_limit(&self, limit: u64, window: Duration) {
        let mut st = self.lock();
        st.rate.limit = Some(limit);
        st.rate.window = Some(window);
        st.rate.buckets.clear();
    }

    /// For `duration`, every request is refused as over its primary rate limit: `status` (403
    /// or 429) with `x-ratelimit-remaining: 0` and `x-ratelimit-reset` at the end.
    pub fn exhaust_rate_limit(&self, duration: Duration, status: u16) {
        let status = StatusCode::from_u16(status).unwrap();
        self.lock().rate.exhausted = Some((SystemTime::now() + duration, status));
    }

    /// For `duration`, every request is refused by a secondary rate limit: `status` (403 or
    /// 429) with `retry-after: retry_after` (whole seconds).
    pub fn secondary_rate_limit(&self, duration: Duration, status: u16, retry_after: Duration) {
        let status = StatusCode::from_u16(status).unwrap();
        self.lock().rate.secondary =
            Some((SystemTime::now() + duration, status, retry_after.as_secs()));
    }
}
