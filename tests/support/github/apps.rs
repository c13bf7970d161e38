//! GitHub App auth (JWT → installation token), installation discovery, and the repository lists an organization scope needs.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use rand::Rng;
use rand::distr::Alphanumeric;
use serde_json::{Map, Value, json};

use super::keys::{self, JwtError, RsaKey};
use super::{
    Access, App, AuthKind, Caller, GitHubServer, Installation, Level, Pat, ServerState, Shared,
    Srv, Token, TokenRecord, account_json, error, not_found, paged, paginate, repo_json, ts,
    unauthorized,
};

pub(super) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/app", get(get_app))
        .route("/app/installations", get(list_installations))
        .route("/app/installations/{id}", get(get_installation))
        .route("/app/installations/{id}/access_tokens", post(create_token))
        .route("/repos/{owner}/{repo}/installation", get(repo_installation))
        .route("/orgs/{org}/installation", get(org_installation))
        .route("/users/{user}/installation", get(org_installation))
        .route("/installation/repositories", get(installation_repos))
        .route("/orgs/{org}/repos", get(org_repos))
        .route("/repos/{owner}/{repo}", get(get_repo))
        .route("/rate_limit", get(rate_limit))
}

/// The App a JWT authenticates: `iss` names it (id or client id), its key signed the token,
/// `iat`/`exp` are within GitHub's limits.
pub(super) fn verify_app_jwt(st: &ServerState, token: &str) -> Result<u64, JwtError> {
    let jwt = keys::parse_jwt(token)?;
    let issuer = jwt.issuer().ok_or(JwtError::Undecodable)?;
    let app = st
        .apps
        .values()
        .find(|a| a.id.to_string() == issuer || a.client_id == issuer)
        .ok_or(JwtError::Undecodable)?;
    jwt.verify(&app.key, keys::unix_now())?;
    Ok(app.id)
}

/// Only an App's JWT may call these; anything else fails to decode as one.
fn app_of(caller: &Caller) -> Result<u64, Response> {
    match (caller.kind, caller.app) {
        (AuthKind::AppJwt, Some(app)) => Ok(app),
        _ => Err(unauthorized(JwtError::Undecodable.message())),
    }
}

fn permissions_json(access: &Access) -> Value {
    Value::Object(
        access
            .permissions
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.clone())))
            .collect::<Map<_, _>>(),
    )
}

fn installation_json(st: &ServerState, inst: &Installation) -> Value {
    let account = st
        .find_account(&inst.account)
        .expect("installation account exists");
    json!({
        "id": inst.id,
        "account": account_json(&st.base, account),
        "repository_selection": if inst.access.repos.is_some() { "selected" } else { "all" },
        "access_tokens_url": format!("{}/app/installations/{}/access_tokens", st.base, inst.id),
        "repositories_url": format!("{}/installation/repositories", st.base),
        "html_url": format!("https://github.com/organizations/{}/settings/installations/{}", account.login, inst.id),
        "app_id": inst.app_id,
        "app_slug": st.apps[&inst.app_id].slug,
        "target_id": account.id,
        "target_type": if account.org { "Organization" } else { "User" },
        "permissions": permissions_json(&inst.access),
        "events": ["workflow_job"],
        "created_at": ts(inst.created_at),
        "updated_at": ts(inst.created_at),
        "single_file_name": null,
        "has_multiple_single_files": false,
        "single_file_paths": [],
        "suspended_by": null,
        "suspended_at": null,
    })
}

async fn get_app(s: Srv, axum::Extension(caller): axum::Extension<Caller>) -> Response {
    let app = match app_of(&caller) {
        Ok(app) => app,
        Err(refusal) => return refusal,
    };
    let st = s.lock();
    let app = &st.apps[&app];
    axum::Json(json!({
        "id": app.id,
        "client_id": app.client_id,
        "slug": app.slug,
        "node_id": format!("A_kwDO{:08}", app.id),
        "name": app.slug,
        "description": "",
        "external_url": "https://example.com",
        "html_url": format!("https://github.com/apps/{}", app.slug),
        "created_at": "2024-01-01T00:00:00Z",
        "updated_at": "2024-01-01T00:00:00Z",
        "permissions": {},
        "events": ["workflow_job"],
        "installations_count": st.installations.values().filter(|i| i.app_id == app.id).count(),
    }))
    .into_response()
}

async fn list_installations(
    s: Srv,
    Query(q): Query<HashMap<String, String>>,
    uri: Uri,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Response {
    let app = match app_of(&caller) {
        Ok(app) => app,
        Err(refusal) => return refusal,
    };
    let st = s.lock();
    let all: Vec<&Installation> = st
        .installations
        .values()
        .filter(|i| i.app_id == app)
        .collect();
    let (page, link) = paginate(&all, &st.base, &uri, &q);
    let items: Vec<Value> = page
        .into_iter()
        .map(|i| installation_json(&st, i))
        .collect();
    paged(StatusCode::OK, Value::Array(items), link)
}

fn own_installation<'a>(
    st: &'a ServerState,
    caller: &Caller,
    id: &str,
) -> Result<&'a Installation, Response> {
    let app = app_of(caller)?;
    id.parse::<u64>()
        .ok()
        .and_then(|id| st.installations.get(&id))
        .filter(|i| i.app_id == app)
        .ok_or_else(not_found)
}

async fn get_installation(
    s: Srv,
    Path(id): Path<String>,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Response {
    let st = s.lock();
    own_installation(&st, &caller, &id).map_or_else(
        |e| e,
        |i| axum::Json(installation_json(&st, i)).into_response(),
    )
}

/// `POST /app/installations/{id}/access_tokens` → 201 `{token, expires_at, permissions,
/// repository_selection}`; `repositories` / `repository_ids` / `permissions` narrow the token.
async fn create_token(
    s: Srv,
    Path(id): Path<String>,
    axum::Extension(caller): axum::Extension<Caller>,
    body: Bytes,
) -> Response {
    let mut st = s.lock();
    let (installation_id, mut access) = match own_installation(&st, &caller, &id) {
        Ok(i) => (i.id, i.access.clone()),
        Err(refusal) => return refusal,
    };
    let request: Value = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(_) => return error(StatusCode::BAD_REQUEST, "Problems parsing JSON"),
        }
    };
    let account = st.installations[&installation_id].account.clone();
    let mut narrowed: Option<Vec<String>> = None;
    let inaccessible = || {
        error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "There is at least one repository that does not exist or is not accessible to the parent installation.",
        )
    };
    if let Some(names) = request.get("repositories").and_then(Value::as_array) {
        for name in names {
            let name = name.as_str().unwrap_or("");
            match st.find_repo(&account, name) {
                Some(r) if access.covers(&r.name) => narrowed
                    .get_or_insert_with(Vec::new)
                    .push(r.name.to_ascii_lowercase()),
                _ => return inaccessible(),
            }
        }
    }
    if let Some(ids) = request.get("repository_ids").and_then(Value::as_array) {
        for id in ids {
            match id.as_u64().and_then(|id| st.repos.get(&id)) {
                Some(r) if r.owner.eq_ignore_ascii_case(&account) && access.covers(&r.name) => {
                    narrowed
                        .get_or_insert_with(Vec::new)
                        .push(r.name.to_ascii_lowercase());
                }
                _ => return inaccessible(),
            }
        }
    }
    if let Some(wanted) = request.get("permissions").and_then(Value::as_object) {
        let mut permissions = std::collections::BTreeMap::new();
        for (name, level) in wanted {
            let level = level.as_str().unwrap_or("");
            let needed = if level == "write" {
                Level::Write
            } else {
                Level::Read
            };
            if !access.allows(name, needed) {
                return error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "The permissions requested are not granted to this installation.",
                );
            }
            permissions.insert(name.clone(), level.to_owned());
        }
        access.permissions = permissions;
    }
    if narrowed.is_some() {
        access.repos = narrowed;
    }
    let token = format!(
        "ghs_{}",
        rand::rng()
            .sample_iter(Alphanumeric)
            .take(36)
            .map(char::from)
            .collect::<String>()
    );
    let expires_at = SystemTime::now() + st.token_lifetime;
    let mut body = json!({
        "token": token,
        "expires_at": ts(expires_at),
        "permissions": permissions_json(&access),
        "repository_selection": if access.repos.is_some() { "selected" } else { "all" },
    });
    if let Some(names) = &access.repos {
        let repos: Vec<Value> = st
            .repos
            .values()
            .filter(|r| {
                r.owner.eq_ignore_ascii_case(&account)
                    && names.contains(&r.name.to_ascii_lowercase())
            })
            .map(|r| repo_json(&st, r))
            .collect();
        body["repositories"] = Value::Array(repos);
    }
    st.tokens.insert(
        token.clone(),
        Token {
            installation_id,
            access,
            expires_at,
        },
    );
    st.minted.push(TokenRecord {
        token,
        installation_id,
        expires_at,
    });
    (StatusCode::CREATED, axum::Json(body)).into_response()
}

/// `GET /repos/{o}/{r}/installation` (JWT): this App's installation that reaches the repository.
async fn repo_installation(
    s: Srv,
    Path((owner, repo)): Path<(String, String)>,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Response {
    let app = match app_of(&caller) {
        Ok(app) => app,
        Err(refusal) => return refusal,
    };
    let st = s.lock();
    let Some(repo) = st.find_repo(&owner, &repo) else {
        return not_found();
    };
    st.installations
        .values()
        .find(|i| {
            i.app_id == app
                && i.account.eq_ignore_ascii_case(&repo.owner)
                && i.access.covers(&repo.name)
        })
        .map_or_else(not_found, |i| {
            axum::Json(installation_json(&st, i)).into_response()
        })
}

/// `GET /orgs/{org}/installation` and `/users/{user}/installation` (JWT).
async fn org_installation(
    s: Srv,
    Path(account): Path<String>,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Response {
    let app = match app_of(&caller) {
        Ok(app) => app,
        Err(refusal) => return refusal,
    };
    let st = s.lock();
    st.installations
        .values()
        .find(|i| i.app_id == app && i.account.eq_ignore_ascii_case(&account))
        .map_or_else(not_found, |i| {
            axum::Json(installation_json(&st, i)).into_response()
        })
}

/// `GET /installation/repositories` (installation token): `{total_count, repositories,
/// repository_selection}`.
async fn installation_repos(
    s: Srv,
    Query(q): Query<HashMap<String, String>>,
    uri: Uri,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Response {
    if caller.kind != AuthKind::Installation {
        return error(StatusCode::FORBIDDEN, caller.not_accessible());
    }
    let st = s.lock();
    let repos: Vec<&super::Repo> = st
        .repos
        .values()
        .filter(|r| r.owner.eq_ignore_ascii_case(&caller.owner) && caller.access.covers(&r.name))
        .collect();
    let (page, link) = paginate(&repos, &st.base, &uri, &q);
    let items: Vec<Value> = page.into_iter().map(|r| repo_json(&st, r)).collect();
    paged(
        StatusCode::OK,
        json!({
            "total_count": repos.len(),
            "repository_selection": if caller.access.repos.is_some() { "selected" } else { "all" },
            "repositories": items,
        }),
        link,
    )
}

/// `GET /orgs/{org}/repos`: the organization's repositories this credential reaches, by name.
async fn org_repos(
    s: Srv,
    Path(org): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    uri: Uri,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Response {
    let st = s.lock();
    let org = match caller.org(&st, &org, "metadata", Level::Read) {
        Ok(org) => org,
        Err(refusal) => return refusal,
    };
    let mut repos: Vec<&super::Repo> = st
        .repos
        .values()
        .filter(|r| r.owner.eq_ignore_ascii_case(&org) && caller.access.covers(&r.name))
        .collect();
    repos.sort_by_key(|r| r.name.to_ascii_lowercase());
    let (page, link) = paginate(&repos, &st.base, &uri, &q);
    let items: Vec<Value> = page.into_iter().map(|r| repo_json(&st, r)).collect();
    paged(StatusCode::OK, Value::Array(items), link)
}

async fn get_repo(
    s: Srv,
    Path((owner, repo)): Path<(String, String)>,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Response {
    let st = s.lock();
    match caller.repo(&st, &owner, &repo, "metadata", Level::Read) {
        Ok(id) => axum::Json(repo_json(&st, &st.repos[&id])).into_response(),
        Err(refusal) => refusal,
    }
}

/// `GET /rate_limit` (not counted): the caller's core bucket.
async fn rate_limit(s: Srv, axum::Extension(caller): axum::Extension<Caller>) -> Response {
    let mut response = StatusCode::OK.into_response();
    s.lock()
        .rate
        .headers(&caller.bucket(), caller.kind, response.headers_mut());
    let h = response.headers();
    let num = |name: &str| -> u64 {
        h.get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let core = json!({
        "limit": num("x-ratelimit-limit"),
        "remaining": num("x-ratelimit-remaining"),
        "reset": num("x-ratelimit-reset"),
        "used": num("x-ratelimit-used"),
        "resource": "core",
    });
    let search = json!({"limit": 30, "remaining": 30, "reset": num("x-ratelimit-reset"), "used": 0, "resource": "search"});
    let body = json!({"resources": {"core": core, "search": search}, "rate": core});
    (response.into_parts().0, axum::Json(body)).into_response()
}

impl GitHubServer {
    /// Adds a personal access token of account `owner` (created as a user if unknown).
    pub fn add_pat(&self, token: &str, owner: &str, access: Access) {
        let mut st = self.lock();
        st.account(owner, false);
        st.pats.insert(
            token.to_owned(),
            Pat {
                owner: owner.to_owned(),
                access,
            },
        );
    }

    /// Adds GitHub App `app_id` with the process-wide shared key; returns the key.
    pub fn add_app(&self, app_id: u64) -> RsaKey {
        self.add_app_with_key(app_id, RsaKey::shared())
    }

    /// Adds GitHub App `app_id` whose public key is `key`'s.
    pub fn add_app_with_key(&self, app_id: u64, key: RsaKey) -> RsaKey {
        let client_id = format!("Iv23li{:014x}", rand::rng().random::<u64>() >> 8);
        self.lock().apps.insert(
            app_id,
            App {
                id: app_id,
                client_id,
                slug: format!("kiln-test-{app_id}"),
                key: key.clone(),
            },
        );
        key
    }

    /// The App's client id (`Iv23…`), which GitHub also takes as a JWT's `iss`.
    pub fn app_client_id(&self, app_id: u64) -> String {
        self.lock().apps[&app_id].client_id.clone()
    }

    /// Installs App `app_id` on `account` (an organization or user, created as an organization
    /// if unknown) as installation `installation_id`.
    pub fn add_installation(
        &self,
        app_id: u64,
        installation_id: u64,
        account: &str,
        access: Access,
    ) {
        let mut st = self.lock();
        assert!(
            st.apps.contains_key(&app_id),
            "add_installation: no app {app_id}"
        );
        st.account(account, true);
        st.installations.insert(
            installation_id,
            Installation {
                id: installation_id,
                app_id,
                account: account.to_owned(),
                access,
                created_at: SystemTime::now(),
            },
        );
    }

    /// How long installation tokens minted from now on live (one hour by default).
    pub fn set_installation_token_lifetime(&self, lifetime: Duration) {
        self.lock().token_lifetime = lifetime;
    }

    /// Expires every installation token minted so far: they answer 401 from now on, while
    /// their holders still believe them valid (as after a revocation).
    pub fn expire_installation_tokens(&self) {
        let now = SystemTime::now();
        for token in self.lock().tokens.values_mut() {
            token.expires_at = now;
        }
    }

    /// Every installation token minted, in order.
    pub fn installation_tokens(&self) -> Vec<TokenRecord> {
        self.lock().minted.clone()
    }
}
