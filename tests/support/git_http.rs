//! Git hosting for the test GitLab, as GitLab serves it to runners: smart HTTP for
//! `/<project path>.git/…` through `git http-backend` (the CGI git ships), and the Git LFS batch
//! API (`POST /<project>.git/info/lfs/objects/batch`, basic transfer, downloads from
//! `/<project>.git/gitlab-lfs/objects/<oid>`). Both take HTTP Basic `gitlab-ci-token:<job
//! token>` of a running job and answer 401 with a `WWW-Authenticate`/`LFS-Authenticate`
//! challenge otherwise, as GitLab does.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::{Value, json};
use sha2::Digest;
use tokio::io::AsyncWriteExt;

/// Repositories (bare, under `root`) and LFS objects (`root/lfs/<oid>`).
pub(crate) struct GitHosting {
    root: tempfile::TempDir,
    /// Upload-pack ref advertisements still to fail with 500 (a flaky GitLab).
    failures_left: Mutex<usize>,
}

/// One file of a project: its path and content; `lfs` stores it in LFS (the commit holds the
/// pointer).
pub(crate) struct ProjectFile<'a> {
    pub(crate) path: &'a str,
    pub(crate) content: &'a [u8],
    pub(crate) lfs: bool,
}

impl GitHosting {
    pub(crate) fn new() -> Self {
        Self {
            root: tempfile::tempdir().unwrap(),
            failures_left: Mutex::new(0),
        }
    }

    /// Makes the next `n` fetches (ref advertisements of `git-upload-pack`) fail with HTTP 500.
    pub(crate) fn fail_fetches(&self, n: usize) {
        *self.failures_left.lock().unwrap() = n;
    }

    /// Creates project `path` (`group/app`) with one commit on `main` holding `files` and
    /// `submodules` (`(path, url as in .gitmodules, commit)`); returns the commit.
    pub(crate) fn create_project(
        &self,
        path: &str,
        files: &[ProjectFile<'_>],
        submodules: &[(&str, &str, &str)],
    ) -> String {
        let bare = self.root.path().join(format!("{path}.git"));
        std::fs::create_dir_all(&bare).unwrap();
        git(&bare, &["init", "-q", "--bare", "-b", "main"]);
        // GitLab lets a shallow submodule update fetch the exact commit.
        git(&bare, &["config", "uploadpack.allowAnySHA1InWant", "true"]);
        git(&bare, &["config", "http.receivepack", "false"]);
        let work = tempfile::tempdir().unwrap();
        let dir = work.path();
        git(dir, &["init", "-q", "-b", "main"]);
        let mut attributes = String::new();
        for file in files {
            let target = dir.join(file.path);
            std::fs::create_dir_all(target.parent().unwrap()).unwrap();
            if file.lfs {
                let oid = hex::encode(sha2::Sha256::digest(file.content));
                let store = self.root.path().join("lfs");
                std::fs::create_dir_all(&store).unwrap();
                std::fs::write(store.join(&oid), file.content).unwrap();
                std::fs::write(
                    &target,
                    format!(
                        "version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {}\n",
                        file.content.len()
                    ),
                )
                .unwrap();
                attributes.push_str(&format!(
                    "{} filter=lfs diff=lfs merge=lfs -text\n",
                    file.path
                ));
            } else {
                std::fs::write(&target, file.content).unwrap();
            }
        }
        if !attributes.is_empty() {
            std::fs::write(dir.join(".gitattributes"), attributes).unwrap();
        }
        let mut modules = String::new();
        for (sub_path, url, _) in submodules {
            modules.push_str(&format!(
                "[submodule \"{sub_path}\"]\n\tpath = {sub_path}\n\turl = {url}\n"
            ));
        }
        if !modules.is_empty() {
            std::fs::write(dir.join(".gitmodules"), modules).unwrap();
        }
        git(dir, &["add", "-A"]);
        // Gitlinks after `add -A`, which would drop them: their directories are not there.
        for (sub_path, _, sha) in submodules {
            git(
                dir,
                &[
                    "update-index",
                    "--add",
                    "--cacheinfo",
                    &format!("160000,{sha},{sub_path}"),
                ],
            );
        }
        git(
            dir,
            &[
                "-c",
                "user.name=Test",
                "-c",
                "user.email=test@example.com",
                "commit",
                "-q",
                "-m",
                &format!("{path}: first commit"),
            ],
        );
        git(
            dir,
            &[
                "push",
                "-q",
                &bare.to_string_lossy(),
                "HEAD:refs/heads/main",
            ],
        );
        git(dir, &["rev-parse", "HEAD"]).trim().to_owned()
    }

    /// Answers a request for `/<project>.git/…`, or `None` when the path is no git path.
    /// `authorized` says whether a job token belongs to a running job.
    pub(crate) async fn serve(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: Bytes,
        authorized: impl Fn(&str) -> bool,
        base_url: &str,
    ) -> Option<Response> {
        let path = uri.path();
        let at = path.find(".git/")?;
        let project = &path[1..at];
        let rest = &path[at + 4..];
        if project.contains("..") {
            return Some(StatusCode::NOT_FOUND.into_response());
        }
        let auth = basic_auth(headers);
        let lfs = rest.starts_with("/info/lfs/") || rest.starts_with("/gitlab-lfs/");
        let allowed =
            matches!(&auth, Some((user, token)) if user == "gitlab-ci-token" && authorized(token));
        if !allowed {
            let mut answer = (
                StatusCode::UNAUTHORIZED,
                "HTTP Basic: Access denied. If a password was provided for Git authentication, the password was incorrect or you're required to use a token instead of a password.",
            )
                .into_response();
            let challenge = if lfs {
                "lfs-authenticate"
            } else {
                "www-authenticate"
            };
            answer
                .headers_mut()
                .insert(challenge, "Basic realm=\"GitLab\"".parse().unwrap());
            return Some(answer);
        }
        if lfs {
            return Some(self.lfs(method, project, rest, &body, headers, base_url));
        }
        if rest == "/info/refs" && uri.query() == Some("service=git-upload-pack") {
            let mut left = self.failures_left.lock().unwrap();
            if *left > 0 {
                *left -= 1;
                return Some(
                    (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "500 Internal Server Error",
                    )
                        .into_response(),
                );
            }
        }
        Some(self.http_backend(method, uri, headers, body).await)
    }

    /// The LFS batch API (download only, basic transfer) and object downloads.
    fn lfs(
        &self,
        method: &Method,
        project: &str,
        rest: &str,
        body: &[u8],
        headers: &HeaderMap,
        base_url: &str,
    ) -> Response {
        let store = self.root.path().join("lfs");
        if let Some(oid) = rest.strip_prefix("/gitlab-lfs/objects/") {
            if method != Method::GET || !oid.bytes().all(|b| b.is_ascii_hexdigit()) {
                return StatusCode::NOT_FOUND.into_response();
            }
            return match std::fs::read(store.join(oid)) {
                Ok(data) => (StatusCode::OK, data).into_response(),
                Err(_) => StatusCode::NOT_FOUND.into_response(),
            };
        }
        if rest != "/info/lfs/objects/batch" || method != Method::POST {
            return StatusCode::NOT_FOUND.into_response();
        }
        let Ok(request) = serde_json::from_slice::<Value>(body) else {
            return (StatusCode::UNPROCESSABLE_ENTITY, "invalid batch request").into_response();
        };
        if request["operation"] != "download" {
            return (StatusCode::FORBIDDEN, lfs_message("only downloads here")).into_response();
        }
        let authorization = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let objects: Vec<Value> = request["objects"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|object| {
                let oid = object["oid"].as_str().unwrap_or_default().to_owned();
                let stored = oid.bytes().all(|b| b.is_ascii_hexdigit())
                    && std::fs::metadata(store.join(&oid)).is_ok();
                if stored {
                    json!({
                        "oid": oid,
                        "size": object["size"],
                        "authenticated": true,
                        "actions": {"download": {
                            "href": format!("{base_url}{project}.git/gitlab-lfs/objects/{oid}"),
                            "header": {"Authorization": authorization},
                            "expires_in": 3600,
                        }},
                    })
                } else {
                    json!({"oid": oid, "size": object["size"], "error": {"code": 404, "message": "Object does not exist on the server"}})
                }
            })
            .collect();
        let mut answer = (
            StatusCode::OK,
            json!({"transfer": "basic", "objects": objects}).to_string(),
        )
            .into_response();
        answer.headers_mut().insert(
            "content-type",
            "application/vnd.git-lfs+json".parse().unwrap(),
        );
        answer
    }

    /// Runs `git http-backend` as a CGI for one request.
    async fn http_backend(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Response {
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        let mut child = tokio::process::Command::new("git")
            .arg("http-backend")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("GIT_PROJECT_ROOT", self.root.path())
            .env("GIT_HTTP_EXPORT_ALL", "1")
            .env("PATH_INFO", uri.path())
            .env("QUERY_STRING", uri.query().unwrap_or_default())
            .env("REQUEST_METHOD", method.as_str())
            .env("CONTENT_TYPE", header("content-type"))
            .env("CONTENT_LENGTH", body.len().to_string())
            .env("HTTP_CONTENT_ENCODING", header("content-encoding"))
            .env("GIT_PROTOCOL", header("git-protocol"))
            .env("REMOTE_USER", "gitlab-ci-token")
            .env("REMOTE_ADDR", "127.0.0.1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let writer = tokio::spawn(async move {
            let _ = stdin.write_all(&body).await;
        });
        let output = child.wait_with_output().await.unwrap();
        let _ = writer.await;
        cgi_response(&output.stdout)
    }

    pub(crate) fn root(&self) -> &Path {
        self.root.path()
    }
}

fn lfs_message(text: &str) -> String {
    json!({"message": text}).to_string()
}

/// A CGI's output (headers, blank line, body) as an HTTP response.
fn cgi_response(output: &[u8]) -> Response {
    let split = output
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4))
        .or_else(|| output.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2)));
    let Some((end, gap)) = split else {
        return (StatusCode::BAD_GATEWAY, "git http-backend gave no headers").into_response();
    };
    let head = String::from_utf8_lossy(&output[..end]).into_owned();
    let mut response = Bytes::copy_from_slice(&output[end + gap..]).into_response();
    for line in head.lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code = value.split_whitespace().next().and_then(|c| c.parse().ok());
            *response.status_mut() = code
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::OK);
        } else if let (Ok(name), Ok(value)) = (
            axum::http::HeaderName::from_bytes(name.as_bytes()),
            axum::http::HeaderValue::from_str(value),
        ) {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

fn basic_auth(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get("authorization")?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?} in {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Where a project's bare repository lives.
pub(crate) fn bare_path(hosting: &GitHosting, project: &str) -> PathBuf {
    hosting.root().join(format!("{project}.git"))
}
