//! Jenkins' REST API as kiln uses it: the queue, agent nodes (create, read, toggle offline,
//! delete) and the agent secret; API-token or password + crumb authentication.

use std::time::Duration;

use reqwest::{Method, RequestBuilder, StatusCode};
use serde::Deserialize;
use tokio::sync::Mutex;
use url::Url;

/// What can go wrong talking to Jenkins.
#[derive(Debug, thiserror::Error)]
pub enum JenkinsError {
    /// The configured URL is unusable.
    #[error("invalid Jenkins URL `{url}`: {reason}")]
    BadUrl {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// Jenkins could not be reached.
    #[error("cannot reach Jenkins at {url}")]
    Transport {
        /// The URL called.
        url: String,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },
    /// Jenkins rejected the credentials.
    #[error(
        "Jenkins answered {method} {url} with HTTP {status}: check sources.jenkins user and token (and that the user may manage agents)"
    )]
    Auth {
        /// The method.
        method: Method,
        /// The URL.
        url: String,
        /// 401 or 403.
        status: StatusCode,
    },
    /// Jenkins answered with an unexpected status.
    #[error("Jenkins answered {method} {url} with HTTP {status}: {body}")]
    Status {
        /// The method.
        method: Method,
        /// The URL.
        url: String,
        /// The status.
        status: StatusCode,
        /// The start of the body.
        body: String,
    },
    /// Jenkins answered with a body kiln cannot read.
    #[error("Jenkins answered {url} with a body kiln cannot read: {message}")]
    Body {
        /// The URL.
        url: String,
        /// What is wrong.
        message: String,
    },
}

/// How kiln authenticates.
#[derive(Clone)]
pub(crate) enum Credentials {
    /// An API token: plain Basic auth, no crumb.
    Token {
        /// The user.
        user: String,
        /// The token.
        token: String,
    },
    /// A password: Basic auth plus a CSRF crumb tied to a session cookie.
    Password {
        /// The user.
        user: String,
        /// The password.
        password: String,
    },
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Token { user, .. } => write!(f, "Token({user}, [redacted])"),
            Self::Password { user, .. } => write!(f, "Password({user}, [redacted])"),
        }
    }
}

/// One item of the build queue.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct QueueItem {
    /// The queue id.
    pub(crate) id: u64,
    /// Why it waits (English with `Accept-Language: en`).
    #[serde(default)]
    pub(crate) why: Option<String>,
    /// Whether it could run if an executor were free.
    #[serde(default)]
    pub(crate) buildable: bool,
    /// The job.
    #[serde(default)]
    pub(crate) task: Option<Task>,
}

/// The job of a queue item.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Task {
    /// Its name.
    #[serde(default)]
    pub(crate) name: String,
}

/// An agent's state.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Computer {
    /// The node name.
    #[serde(default)]
    pub(crate) display_name: String,
    /// Not connected (or temporarily offline).
    #[serde(default)]
    pub(crate) offline: bool,
    /// Marked offline by someone (kiln, after its one build started).
    #[serde(default)]
    pub(crate) temporarily_offline: bool,
    /// No executor busy.
    #[serde(default)]
    pub(crate) idle: bool,
    /// The node's description (kiln marks its nodes there).
    #[serde(default)]
    pub(crate) description: Option<String>,
}

#[derive(Deserialize)]
struct Queue {
    #[serde(default)]
    items: Vec<QueueItem>,
}

#[derive(Deserialize)]
struct Computers {
    #[serde(default)]
    computer: Vec<Computer>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Crumb {
    crumb: String,
    crumb_request_field: String,
}

/// A client of one Jenkins.
#[derive(Debug)]
pub(crate) struct JenkinsApi {
    http: reqwest::Client,
    base: Url,
    credentials: Credentials,
    /// `(header, crumb, session cookie)` once fetched (password auth only).
    crumb: Mutex<Option<(String, String, Option<String>)>>,
}

impl JenkinsApi {
    /// A client for Jenkins at `url`.
    ///
    /// # Errors
    /// An unusable URL.
    pub(crate) fn new(url: &str, credentials: Credentials) -> Result<Self, JenkinsError> {
        let bad = |reason: String| JenkinsError::BadUrl {
            url: crate::net::redact_url(url),
            reason,
        };
        let mut base = Url::parse(url).map_err(|e| bad(e.to_string()))?;
        // kiln authenticates with `user` and `token`/`password`; credentials in the URL would
        // otherwise reach every log line, error and agent pod (JENKINS_URL) built from it.
        if crate::net::take_credentials(&mut base).is_some() {
            tracing::warn!(url = %base, "the Jenkins URL carries credentials; kiln ignores them and signs in with `user` and `token`");
        }
        if !matches!(base.scheme(), "http" | "https") {
            return Err(bad("not http or https".into()));
        }
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        let http = reqwest::Client::builder()
            .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(30))
            // Jenkins answers form posts with 302; kiln reads the status, not the page.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| bad(e.to_string()))?;
        Ok(Self {
            http,
            base,
            credentials,
            crumb: Mutex::new(None),
        })
    }

    /// The base URL, with a trailing slash.
    pub(crate) fn url(&self) -> &Url {
        &self.base
    }

    fn endpoint(&self, path: &str) -> String {
        self.base
            .join(path)
            .map(String::from)
            .unwrap_or_else(|_| format!("{}{path}", self.base))
    }

    fn request(&self, method: Method, url: &str) -> RequestBuilder {
        let (user, secret) = match &self.credentials {
            Credentials::Token { user, token } => (user, token),
            Credentials::Password { user, password } => (user, password),
        };
        self.http
            .request(method, url)
            .basic_auth(user, Some(secret))
            // The `why` texts kiln reads are localized.
            .header("Accept-Language", "en")
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        form: Option<&[(&str, &str)]>,
    ) -> Result<reqwest::Response, JenkinsError> {
        let url = self.endpoint(path);
        for attempt in 0..2 {
            let mut builder = self.request(method.clone(), &url);
            if method == Method::POST {
                if let Some((header, crumb, cookie)) = self.crumb_for_post().await? {
                    builder = builder.header(header, crumb);
                    if let Some(cookie) = cookie {
                        builder = builder.header("Cookie", cookie);
                    }
                }
                let body = url::form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(form.unwrap_or(&[]))
                    .finish();
                builder = builder
                    .header("Content-Type", "application/x-www-form-urlencoded")
                    .body(body);
            }
            let response = builder.send().await.map_err(transport(&url))?;
            let status = response.status();
            if status == StatusCode::FORBIDDEN
                && method == Method::POST
                && attempt == 0
                && matches!(self.credentials, Credentials::Password { .. })
            {
                // An expired session invalidates its crumb: fetch a new one and retry once.
                *self.crumb.lock().await = None;
                continue;
            }
            if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                return Err(JenkinsError::Auth {
                    method,
                    url,
                    status,
                });
            }
            return Ok(response);
        }
        Err(JenkinsError::Auth {
            method,
            url,
            status: StatusCode::FORBIDDEN,
        })
    }

    async fn crumb_for_post(
        &self,
    ) -> Result<Option<(String, String, Option<String>)>, JenkinsError> {
        if matches!(self.credentials, Credentials::Token { .. }) {
            return Ok(None);
        }
        let mut cached = self.crumb.lock().await;
        if cached.is_none() {
            let url = self.endpoint("crumbIssuer/api/json");
            let response = self
                .request(Method::GET, &url)
                .send()
                .await
                .map_err(transport(&url))?;
            if response.status() == StatusCode::NOT_FOUND {
                // CSRF protection is off.
                return Ok(None);
            }
            let response = Self::check(Method::GET, &url, response).await?;
            let cookie = response
                .headers()
                .get_all("set-cookie")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .filter_map(|v| v.split(';').next())
                .map(str::to_owned)
                .collect::<Vec<_>>()
                .join("; ");
            let crumb: Crumb = Self::json(&url, response).await?;
            *cached = Some((
                crumb.crumb_request_field,
                crumb.crumb,
                (!cookie.is_empty()).then_some(cookie),
            ));
        }
        Ok(cached.clone())
    }

    async fn check(
        method: Method,
        url: &str,
        response: reqwest::Response,
    ) -> Result<reqwest::Response, JenkinsError> {
        let status = response.status();
        if status.is_success() || status.is_redirection() {
            return Ok(response);
        }
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(JenkinsError::Auth {
                method,
                url: url.to_owned(),
                status,
            });
        }
        let body = response.text().await.unwrap_or_default();
        Err(JenkinsError::Status {
            method,
            url: url.to_owned(),
            status,
            body: body.chars().take(300).collect(),
        })
    }

    async fn json<T: serde::de::DeserializeOwned>(
        url: &str,
        response: reqwest::Response,
    ) -> Result<T, JenkinsError> {
        let bytes = response.bytes().await.map_err(transport(url))?;
        serde_json::from_slice(&bytes).map_err(|e| JenkinsError::Body {
            url: url.to_owned(),
            message: e.to_string(),
        })
    }

    /// GETs `path` and reads its JSON.
    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<T, JenkinsError> {
        let response = self.send(Method::GET, path, None).await?;
        let url = self.endpoint(path);
        let response = Self::check(Method::GET, &url, response).await?;
        Self::json(&url, response).await
    }

    /// The build queue.
    pub(crate) async fn queue(&self) -> Result<Vec<QueueItem>, JenkinsError> {
        let queue: Queue = self
            .get_json("queue/api/json?tree=items[id,why,buildable,blocked,stuck,task[name]]")
            .await?;
        Ok(queue.items)
    }

    /// All agents' states, by node name.
    pub(crate) async fn computers_by_name(
        &self,
    ) -> Result<std::collections::HashMap<String, Computer>, JenkinsError> {
        let computers: Computers = self
            .get_json(
                "computer/api/json?tree=computer[displayName,description,offline,temporarilyOffline,idle]",
            )
            .await?;
        Ok(computers
            .computer
            .into_iter()
            .map(|c| (c.display_name.clone(), c))
            .collect())
    }

    /// Creates a permanent-style inbound (WebSocket) agent with one executor that only takes
    /// builds for `label`.
    pub(crate) async fn create_node(
        &self,
        name: &str,
        label: &str,
        description: &str,
    ) -> Result<(), JenkinsError> {
        let json = serde_json::json!({
            "name": name,
            "nodeDescription": description,
            "numExecutors": 1,
            "remoteFS": "/home/jenkins/agent",
            "labelString": label,
            "mode": "EXCLUSIVE",
            "retentionStrategy": {"stapler-class": "hudson.slaves.RetentionStrategy$Always"},
            "nodeProperties": {"stapler-class-bag": "true"},
            "launcher": {
                "stapler-class": "hudson.slaves.JNLPLauncher",
                "webSocket": true,
                "workDirSettings": {
                    "disabled": false,
                    "workDirPath": "",
                    "internalDir": "remoting",
                    "failIfWorkDirIsMissing": false
                }
            }
        })
        .to_string();
        let form = [
            ("name", name),
            ("type", "hudson.slaves.DumbSlave"),
            ("json", json.as_str()),
        ];
        let path = "computer/doCreateItem";
        let response = self.send(Method::POST, path, Some(&form)).await?;
        Self::check(Method::POST, &self.endpoint(path), response).await?;
        Ok(())
    }

    /// The secret an inbound agent named `name` connects with (from its JNLP file).
    pub(crate) async fn agent_secret(&self, name: &str) -> Result<String, JenkinsError> {
        let path = format!("computer/{}/jenkins-agent.jnlp", encode(name));
        let url = self.endpoint(&path);
        let response = self.send(Method::GET, &path, None).await?;
        let response = Self::check(Method::GET, &url, response).await?;
        let text = response.text().await.map_err(transport(&url))?;
        first_argument(&text).ok_or_else(|| JenkinsError::Body {
            url,
            message: "no <argument> in <application-desc>".into(),
        })
    }

    /// Marks an agent temporarily offline (its running build goes on; no new one lands).
    pub(crate) async fn toggle_offline(
        &self,
        name: &str,
        message: &str,
    ) -> Result<(), JenkinsError> {
        let path = format!(
            "computer/{}/toggleOffline?offlineMessage={}",
            encode(name),
            encode(message)
        );
        let response = self.send(Method::POST, &path, None).await?;
        Self::check(Method::POST, &self.endpoint(&path), response).await?;
        Ok(())
    }

    /// Deletes an agent node; a missing one is fine.
    pub(crate) async fn delete_node(&self, name: &str) -> Result<(), JenkinsError> {
        let path = format!("computer/{}/doDelete", encode(name));
        let response = self.send(Method::POST, &path, None).await?;
        if response.status() == StatusCode::NOT_FOUND {
            return Ok(());
        }
        Self::check(Method::POST, &self.endpoint(&path), response).await?;
        Ok(())
    }
}

/// Maps a transport error of a call to `url`.
fn transport(url: &str) -> impl FnOnce(reqwest::Error) -> JenkinsError + '_ {
    move |source| JenkinsError::Transport {
        url: url.to_owned(),
        source,
    }
}

fn encode(segment: &str) -> String {
    percent_encoding::utf8_percent_encode(segment, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// The first `<argument>` inside `<application-desc>` of a JNLP file.
fn first_argument(jnlp: &str) -> Option<String> {
    let desc = &jnlp[jnlp.find("<application-desc")?..];
    let start = desc.find("<argument>")? + "<argument>".len();
    let end = desc[start..].find("</argument>")? + start;
    let value = desc[start..end].trim();
    (!value.is_empty()).then(|| value.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Any JSON value, nested a few levels, of every JSON type.
    fn any_json() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<u64>().prop_map(serde_json::Value::from),
            any::<f64>().prop_map(serde_json::Value::from),
            "[a-zA-Z\u{2018}\u{2019}\u{0} ]{0,12}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(4, 64, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
                proptest::collection::btree_map(
                    prop_oneof![
                        Just("items".to_owned()),
                        Just("id".to_owned()),
                        Just("why".to_owned()),
                        Just("task".to_owned()),
                        Just("name".to_owned()),
                        Just("computer".to_owned()),
                        Just("displayName".to_owned()),
                        "[a-z]{1,6}",
                    ],
                    inner,
                    0..6
                )
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        /// Any queue or computer listing Jenkins (or whatever answers in its name) sends is
        /// read or refused, never a panic.
        #[test]
        fn any_queue_json_is_read_or_refused(value in any_json()) {
            let text = value.to_string();
            if let Ok(queue) = serde_json::from_str::<Queue>(&text) {
                for item in queue.items {
                    let _ = item.why.as_deref().map(super::super::queue::waiting_for);
                }
            }
            let _ = serde_json::from_str::<Computers>(&text);
        }
    }

    #[test]
    fn the_secret_is_the_first_application_argument() {
        let jnlp = r#"<?xml version="1.0" encoding="UTF-8"?>
<jnlp codebase="http://j/computer/a/" spec="1.0+"><information><title>Agent for a</title></information>
<application-desc main-class="hudson.remoting.jnlp.Main"><argument>0123abcd</argument><argument>a</argument>
<argument>-url</argument><argument>http://j/</argument></application-desc></jnlp>"#;
        assert_eq!(first_argument(jnlp).as_deref(), Some("0123abcd"));
        assert_eq!(first_argument("<jnlp></jnlp>"), None);
    }

    #[test]
    fn credentials_never_print() {
        let c = Credentials::Token {
            user: "kiln".into(),
            token: "very-secret".into(),
        };
        assert!(!format!("{c:?}").contains("very-secret"));
    }
}
