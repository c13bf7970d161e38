//! Runner registration: verify a `glrt-` token, register with a legacy registration token,
//! create a runner with a personal access token, and unregister.
//!
//! The calls go through the `gitlab` crate (Kitware's client) except `DELETE runners/managers`,
//! which it does not model.

use std::time::Duration;

use gitlab::api::{self, AsyncQuery};
use gitlab::{AsyncGitlab, GitlabBuilder};
use reqwest::StatusCode;
use serde::Deserialize;

/// Why a registration call failed.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// The URL is not a usable GitLab URL.
    #[error("invalid GitLab URL `{url}`: {reason}")]
    BadUrl {
        /// The URL given.
        url: String,
        /// Why.
        reason: String,
    },
    /// 403 (or 401): the token is wrong, expired, or the runner was deleted.
    #[error(
        "GitLab at {url} rejected the {what} (HTTP {status}); check that it is current and belongs to this GitLab"
    )]
    Rejected {
        /// The server.
        url: String,
        /// Which token.
        what: &'static str,
        /// 401 or 403.
        status: u16,
    },
    /// 410: the instance disabled registration tokens.
    #[error(
        "GitLab at {url} has registration tokens disabled (HTTP 410); create the runner in the UI or with `--pat` and use its glrt- token"
    )]
    RegistrationDisabled {
        /// The server.
        url: String,
    },
    /// The server could not be reached.
    #[error("cannot reach GitLab at {url}: {reason}")]
    Unreachable {
        /// The server.
        url: String,
        /// The transport error.
        reason: String,
    },
    /// Any other error answer.
    #[error("GitLab at {url} answered {what} with HTTP {status}: {message}")]
    Failed {
        /// The server.
        url: String,
        /// The call.
        what: &'static str,
        /// The status.
        status: u16,
        /// GitLab's message.
        message: String,
    },
    /// A call could not even be built or its answer read.
    #[error("{what} against GitLab at {url} failed: {message}")]
    Other {
        /// The server.
        url: String,
        /// The call.
        what: &'static str,
        /// What went wrong.
        message: String,
    },
}

/// A runner token GitLab issued or confirmed.
#[derive(Debug, Clone, Deserialize)]
pub struct RunnerToken {
    /// The runner's id.
    pub id: u64,
    /// The runner authentication token (`glrt-…`, or a legacy token).
    #[serde(default)]
    pub token: String,
    /// When the token expires, if it does.
    #[serde(default)]
    pub token_expires_at: Option<String>,
}

/// Options of a legacy registration (`--registration-token`).
#[derive(Debug, Clone, Default)]
pub struct LegacyOptions {
    /// Shown in GitLab's runner list.
    pub description: String,
    /// Job tags this runner takes.
    pub tags: Vec<String>,
    /// Take untagged jobs too.
    pub run_untagged: bool,
    /// Lock the runner to its project.
    pub locked: bool,
    /// `not_protected` or `ref_protected`.
    pub protected_only: bool,
    /// The maximum job timeout, in seconds.
    pub maximum_timeout: Option<u64>,
    /// Register paused.
    pub paused: bool,
}

/// Where a runner created with a personal access token is scoped.
#[derive(Debug, Clone, Copy)]
pub enum RunnerScope {
    /// The whole instance (admin token).
    Instance,
    /// A group.
    Group(u64),
    /// A project.
    Project(u64),
}

/// Options of `kiln register --pat`.
#[derive(Debug, Clone)]
pub struct PatOptions {
    /// Instance, group or project.
    pub scope: RunnerScope,
    /// Shown in GitLab's runner list.
    pub description: String,
    /// Job tags this runner takes.
    pub tags: Vec<String>,
    /// Take untagged jobs too.
    pub run_untagged: bool,
}

/// A fresh system id: `s_` + 12 hex chars derived from the machine id when there is one,
/// else `r_` + 12 random letters and digits. Callers store it so it stays stable.
pub fn new_system_id() -> String {
    use sha2::Digest;
    let machine_id = ["/etc/machine-id", "/var/lib/dbus/machine-id"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty());
    match machine_id {
        Some(id) => {
            let digest = sha2::Sha256::digest(format!("kiln-runner:{id}").as_bytes());
            format!("s_{}", &hex::encode(digest)[..12])
        }
        None => {
            use rand::distr::{Alphanumeric, SampleString};
            format!("r_{}", Alphanumeric.sample_string(&mut rand::rng(), 12))
        }
    }
}

/// Whether `id` looks like a GitLab runner system id.
pub fn is_system_id(id: &str) -> bool {
    let (prefix, rest) = id.split_at(id.len().min(2));
    matches!(prefix, "s_" | "r_")
        && rest.len() == 12
        && rest.chars().all(|c| c.is_ascii_alphanumeric())
}

async fn client(
    url: &str,
    token: Option<&str>,
    ca: Option<&str>,
) -> Result<AsyncGitlab, RegisterError> {
    let parsed = url::Url::parse(url).map_err(|e| RegisterError::BadUrl {
        url: crate::net::redact_url(url),
        reason: e.to_string(),
    })?;
    let host = parsed.host_str().ok_or_else(|| RegisterError::BadUrl {
        url: crate::net::redact_url(url),
        reason: "no host".into(),
    })?;
    let mut host = match parsed.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    };
    host.push_str(parsed.path().trim_end_matches('/'));
    let mut builder = match token {
        Some(token) => GitlabBuilder::new(host, token),
        None => GitlabBuilder::new_unauthenticated(host),
    };
    if parsed.scheme() == "http" {
        builder.insecure();
    }
    // `tls_ca_file`: trusted besides the system's roots (checked by `kiln check-config`).
    if let Some(ca) = ca {
        let bundle = gitlab::CertificateBundle::pem_bundle(ca.as_bytes()).map_err(|e| {
            RegisterError::BadUrl {
                url: crate::net::redact_url(url),
                reason: format!("unusable tls_ca_file: {}", chain(&e)),
            }
        })?;
        builder.cert_custom(bundle);
    }
    builder.user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")));
    builder.build_async().await.map_err(|e| {
        gitlab_error(
            url,
            "the personal access token check",
            "personal access token",
            e,
        )
    })
}

fn status_of<E: std::error::Error + Send + Sync + 'static>(
    e: &api::ApiError<E>,
) -> Option<(StatusCode, String)> {
    match e {
        api::ApiError::GitlabWithStatus { status, msg } => Some((*status, msg.clone())),
        api::ApiError::GitlabObjectWithStatus { status, obj }
        | api::ApiError::GitlabUnrecognizedWithStatus { status, obj } => {
            Some((*status, obj.to_string()))
        }
        api::ApiError::GitlabService { status, data } => Some((
            *status,
            String::from_utf8_lossy(data).chars().take(200).collect(),
        )),
        _ => None,
    }
}

fn api_error<E: std::error::Error + Send + Sync + 'static>(
    url: &str,
    what: &'static str,
    token_kind: &'static str,
    e: api::ApiError<E>,
) -> RegisterError {
    if let Some((status, message)) = status_of(&e) {
        return match status.as_u16() {
            401 | 403 => RegisterError::Rejected {
                url: crate::net::redact_url(url),
                what: token_kind,
                status: status.as_u16(),
            },
            410 => RegisterError::RegistrationDisabled {
                url: crate::net::redact_url(url),
            },
            code => RegisterError::Failed {
                url: crate::net::redact_url(url),
                what,
                status: code,
                message,
            },
        };
    }
    match e {
        api::ApiError::Client { source } => RegisterError::Unreachable {
            url: crate::net::redact_url(url),
            reason: chain(&source),
        },
        other => RegisterError::Other {
            url: crate::net::redact_url(url),
            what,
            message: other.to_string(),
        },
    }
}

fn gitlab_error(
    url: &str,
    what: &'static str,
    token_kind: &'static str,
    e: gitlab::GitlabError,
) -> RegisterError {
    match e {
        gitlab::GitlabError::Api { source } => api_error(url, what, token_kind, source),
        gitlab::GitlabError::Communication { source } => RegisterError::Unreachable {
            url: crate::net::redact_url(url),
            reason: chain(&source),
        },
        other => RegisterError::Other {
            url: crate::net::redact_url(url),
            what,
            message: other.to_string(),
        },
    }
}

/// An endpoint that could not be built from the given options.
fn invalid_call(url: &str, what: &'static str, e: impl std::fmt::Display) -> RegisterError {
    RegisterError::Other {
        url: crate::net::redact_url(url),
        what,
        message: e.to_string(),
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// `POST runners/verify`: checks that `token` is a live runner token for this `system_id`,
/// trusting the CA certificates `ca` (PEM) besides the system's.
///
/// # Errors
/// [`RegisterError::Rejected`] for 403, [`RegisterError::Unreachable`] when GitLab cannot be
/// reached, [`RegisterError::Failed`] for other answers.
pub async fn verify(
    url: &str,
    token: &str,
    system_id: &str,
    ca: Option<&str>,
) -> Result<RunnerToken, RegisterError> {
    let client = client(url, None, ca).await?;
    let endpoint = api::runners::VerifyRunner::builder()
        .token(token)
        .system_id(system_id)
        .build()
        .map_err(|e| invalid_call(url, "runners/verify", e))?;
    let mut verified: RunnerToken = endpoint
        .query_async(&client)
        .await
        .map_err(|e| api_error(url, "runners/verify", "runner token", e))?;
    if verified.token.is_empty() {
        verified.token = token.to_owned();
    }
    Ok(verified)
}

/// `POST runners` with a legacy registration token.
///
/// # Errors
/// 403 (wrong token), 410 (registration disabled), unreachable, other answers.
pub async fn register_legacy(
    url: &str,
    registration_token: &str,
    options: &LegacyOptions,
) -> Result<RunnerToken, RegisterError> {
    let client = client(url, None, None).await?;
    let info = api::runners::RunnerMetadata::builder()
        .name("kiln")
        .version(crate::VERSION)
        .platform(std::env::consts::OS)
        .architecture(std::env::consts::ARCH)
        .build()
        .map_err(|e| invalid_call(url, "runners", e))?;
    let mut builder = api::runners::CreateRunner::builder();
    builder
        .token(registration_token)
        .description(options.description.as_str())
        .info(info)
        .run_untagged(options.run_untagged)
        .locked(options.locked)
        .paused(options.paused)
        .access_level(if options.protected_only {
            api::runners::RunnerAccessLevel::RefProtected
        } else {
            api::runners::RunnerAccessLevel::NotProtected
        })
        .tags(options.tags.iter().map(String::as_str));
    if let Some(timeout) = options.maximum_timeout {
        builder.maximum_timeout(timeout);
    }
    let endpoint = builder
        .build()
        .map_err(|e| invalid_call(url, "runners", e))?;
    endpoint
        .query_async(&client)
        .await
        .map_err(|e| api_error(url, "runners", "registration token", e))
}

/// `POST user/runners` with a personal access token: creates the runner and returns its
/// `glrt-` token.
///
/// # Errors
/// 401/403 (token lacks `create_runner` scope or access), unreachable, other answers.
pub async fn create_with_pat(
    url: &str,
    pat: &str,
    options: &PatOptions,
) -> Result<RunnerToken, RegisterError> {
    let client = client(url, Some(pat), None).await?;
    let mut builder = api::users::CreateRunner::builder();
    match options.scope {
        RunnerScope::Instance => builder.instance(),
        RunnerScope::Group(id) => builder.group(id),
        RunnerScope::Project(id) => builder.project(id),
    };
    builder
        .description(options.description.as_str())
        .run_untagged(options.run_untagged)
        .tags(options.tags.iter().map(String::as_str));
    let endpoint = builder
        .build()
        .map_err(|e| invalid_call(url, "user/runners", e))?;
    endpoint
        .query_async(&client)
        .await
        .map_err(|e| api_error(url, "user/runners", "personal access token", e))
}

/// Removes this runner manager (`DELETE runners/managers`), or the whole runner with `all`
/// (`DELETE runners`).
///
/// # Errors
/// 403 (unknown token), unreachable, other answers.
pub async fn unregister(
    url: &str,
    token: &str,
    system_id: &str,
    all: bool,
) -> Result<(), RegisterError> {
    if all {
        let client = client(url, None, None).await?;
        let endpoint = api::runners::DeleteRunnerByToken::builder()
            .token(token)
            .build()
            .map_err(|e| invalid_call(url, "DELETE runners", e))?;
        return api::ignore(endpoint)
            .query_async(&client)
            .await
            .map_err(|e| api_error(url, "DELETE runners", "runner token", e));
    }
    let mut target = url::Url::parse(url).map_err(|e| RegisterError::BadUrl {
        url: crate::net::redact_url(url),
        reason: e.to_string(),
    })?;
    let path = format!(
        "{}/api/v4/runners/managers",
        target.path().trim_end_matches('/')
    );
    target.set_path(&path);
    let response = reqwest::Client::new()
        .delete(target)
        .timeout(Duration::from_secs(30))
        .json(&serde_json::json!({ "token": token, "system_id": system_id }))
        .send()
        .await
        .map_err(|e| RegisterError::Unreachable {
            url: crate::net::redact_url(url),
            reason: chain(&e),
        })?;
    match response.status().as_u16() {
        200..=299 => Ok(()),
        401 | 403 => Err(RegisterError::Rejected {
            url: crate::net::redact_url(url),
            what: "runner token",
            status: response.status().as_u16(),
        }),
        status => Err(RegisterError::Failed {
            url: crate::net::redact_url(url),
            what: "DELETE runners/managers",
            status,
            message: response
                .text()
                .await
                .unwrap_or_default()
                .chars()
                .take(200)
                .collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_id_shape() {
        assert!(is_system_id("s_0123456789ab"));
        assert!(is_system_id("r_AbCdEf123456"));
        assert!(!is_system_id("s_0123"));
        assert!(!is_system_id("x_0123456789ab"));
    }

    #[test]
    fn a_new_system_id_has_the_shape_gitlab_accepts() {
        assert!(is_system_id(&new_system_id()));
    }
}
