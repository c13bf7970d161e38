//! HTTP client for GitLab's runner job protocol: `jobs/request`, job updates, trace patches and
//! artifacts (the part of the API the `gitlab` crate does not cover).
//!
//! Tokens travel only in headers and JSON bodies, never in URLs, so no error message built from
//! a URL can leak one.

use std::time::Duration;

use reqwest::{Method, StatusCode, header::HeaderMap};
use serde::Serialize;
use url::Url;

use super::payload::JobPayload;
use crate::build::FailureReason;

/// What can go wrong talking to GitLab.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The GitLab URL in the configuration is unusable.
    #[error("invalid GitLab URL `{url}`: {reason}")]
    BadUrl {
        /// The configured URL.
        url: String,
        /// Why it is unusable.
        reason: String,
    },
    /// GitLab could not be reached or the connection broke.
    #[error("cannot reach GitLab at {url}")]
    Transport {
        /// The URL called.
        url: String,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },
    /// GitLab answered with a status the caller does not handle.
    #[error("GitLab answered {method} {url} with HTTP {status}: {body}")]
    Status {
        /// The method.
        method: Method,
        /// The URL called.
        url: String,
        /// The status code.
        status: StatusCode,
        /// The start of the response body.
        body: String,
    },
    /// The CA certificates to trust for GitLab (`tls_ca_file`) are unusable.
    #[error("cannot use the CA file {path} for GitLab's TLS: {reason}")]
    TlsCa {
        /// Where the certificates came from.
        path: String,
        /// What is wrong with them.
        reason: String,
    },
    /// GitLab answered with a body that is not the JSON it documents.
    #[error("GitLab answered {url} with a body kiln cannot read: {message}")]
    Body {
        /// The URL called.
        url: String,
        /// What is wrong.
        message: String,
    },
}

impl ApiError {
    /// Whether retrying later may help (network trouble, 5xx, 409, 429).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Transport { .. } => true,
            Self::Status { status, .. } => {
                status.is_server_error()
                    || *status == StatusCode::CONFLICT
                    || *status == StatusCode::TOO_MANY_REQUESTS
            }
            Self::BadUrl { .. } | Self::TlsCa { .. } | Self::Body { .. } => false,
        }
    }
}

/// Features kiln declares in every `jobs/request` and that it implements; `features_served`
/// holds what serves each (a feature is added there, here and in docs/gitlab.md).
#[derive(Debug, Clone, Serialize)]
pub struct Features {
    variables: bool,
    image: bool,
    services: bool,
    artifacts: bool,
    cache: bool,
    shared: bool,
    upload_multiple_artifacts: bool,
    upload_raw_artifacts: bool,
    session: bool,
    terminal: bool,
    refspecs: bool,
    masking: bool,
    proxy: bool,
    raw_variables: bool,
    artifacts_exclude: bool,
    multi_build_steps: bool,
    trace_reset: bool,
    trace_checksum: bool,
    trace_size: bool,
    vault_secrets: bool,
    cancelable: bool,
    return_exit_code: bool,
    service_variables: bool,
    service_multiple_aliases: bool,
    cancel_gracefully: bool,
    two_phase_job_commit: bool,
    fallback_cache_keys: bool,
}

impl Features {
    /// The features of the agent; `images` is true only when the executor honours `image` and
    /// `services` (the local executor runs on the host and does not).
    pub fn for_executor(images: bool) -> Self {
        Self {
            variables: true,
            image: images,
            services: images,
            artifacts: true,
            cache: false,
            shared: false,
            upload_multiple_artifacts: true,
            upload_raw_artifacts: true,
            session: false,
            terminal: false,
            refspecs: true,
            masking: true,
            proxy: false,
            raw_variables: true,
            artifacts_exclude: true,
            multi_build_steps: true,
            trace_reset: true,
            trace_checksum: true,
            trace_size: true,
            vault_secrets: false,
            cancelable: true,
            return_exit_code: true,
            // Services get the job's public variables and their own (the Kubernetes executor;
            // the local executor starts none), and every alias of a comma-separated list.
            service_variables: images,
            service_multiple_aliases: images,
            cancel_gracefully: true,
            two_phase_job_commit: true,
            fallback_cache_keys: false,
        }
    }

    /// Declares `cache` and `fallback_cache_keys` when builds have a cache (`[cache]`), so
    /// GitLab sends `cache:` and no longer drops jobs with `fallback_keys`.
    #[must_use]
    pub fn with_cache(mut self, cache: bool) -> Self {
        self.cache = cache;
        self.fallback_cache_keys = cache;
        self
    }
}

/// The `info` object of `jobs/request`.
#[derive(Debug, Clone, Serialize)]
pub struct RunnerInfo {
    name: &'static str,
    version: &'static str,
    revision: &'static str,
    platform: &'static str,
    architecture: &'static str,
    executor: String,
    shell: &'static str,
    features: Features,
}

impl RunnerInfo {
    /// Describes this kiln build and its executor.
    pub fn new(executor: &str, images: bool, cache: bool) -> Self {
        Self {
            name: "kiln",
            version: crate::VERSION,
            revision: "unknown",
            platform: std::env::consts::OS,
            architecture: std::env::consts::ARCH,
            executor: executor.to_owned(),
            shell: "bash",
            features: Features::for_executor(images).with_cache(cache),
        }
    }
}

/// The answer to `jobs/request`.
#[derive(Debug)]
pub enum JobRequest {
    /// A job was assigned to this runner.
    Job {
        /// The typed fields kiln uses.
        job: Box<JobPayload>,
        /// The job JSON as GitLab sent it, unknown keys included, handed on to the agent.
        raw: serde_json::Value,
    },
    /// No job; send `last_update` back on the next request to long-poll.
    NoJob {
        /// The `X-GitLab-Last-Update` header.
        last_update: Option<String>,
    },
    /// 403: the runner token is invalid or the runner was removed.
    Forbidden,
    /// 429: wait before asking again.
    RateLimited {
        /// From `Retry-After`, if given.
        retry_after: Option<Duration>,
    },
    /// A job was assigned, but kiln cannot run it (too big, or not a job GitLab documents): it
    /// must be failed with `reason`, or it would hang "running" until GitLab times it out.
    Unusable {
        /// What kiln could read of it: at least its id and token, to fail it with.
        job: Box<JobPayload>,
        /// The failure reason to send.
        reason: crate::build::FailureReason,
        /// What is wrong, for the job's trace.
        problem: String,
    },
}

/// The answer to a trace patch.
#[derive(Debug, PartialEq, Eq)]
pub enum TraceAck {
    /// 202: appended.
    Accepted(JobControl),
    /// 416: GitLab has `server_len` bytes; resend from there.
    RangeMismatch {
        /// The length GitLab has.
        server_len: Option<u64>,
    },
    /// 403: the job must stop (canceled, finished, or token revoked).
    Forbidden(JobControl),
    /// 404: the job is gone; stop sending.
    NotFound,
}

/// What GitLab tells a running job in its response headers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobControl {
    /// `Job-Status`: `running`, `canceling`, `canceled`, `failed`, `success`.
    pub job_status: Option<String>,
    /// `X-GitLab-Trace-Update-Interval`.
    pub update_interval: Option<Duration>,
}

impl JobControl {
    fn from_headers(headers: &HeaderMap) -> Self {
        let text = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .map(str::to_owned)
        };
        Self {
            job_status: text("job-status"),
            update_interval: text("x-gitlab-trace-update-interval")
                .and_then(|s| s.parse::<u64>().ok())
                .map(Duration::from_secs),
        }
    }
}

/// The answer to `PUT jobs/:id`.
#[derive(Debug, PartialEq, Eq)]
pub enum UpdateAck {
    /// 200: accepted.
    Accepted(JobControl),
    /// 202: GitLab is still persisting the trace; ask again after the interval.
    Pending(JobControl),
    /// 412: the trace checksum did not match; resend the trace from offset 0.
    ChecksumMismatch,
    /// 403 or 404: the job is no longer this runner's to update (canceled, finished, gone).
    Gone(JobControl),
}

/// The body of `PUT jobs/:id`.
#[derive(Debug, Clone, Serialize)]
pub struct JobUpdate<'a> {
    /// The job token.
    pub token: &'a str,
    /// `running`, `success` or `failed`.
    pub state: &'a str,
    /// The reason when failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<&'a str>,
    /// The script's exit code.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Checksum and size of the whole trace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<TraceOutput>,
}

/// `output` of a final update.
#[derive(Debug, Clone, Serialize)]
pub struct TraceOutput {
    /// `crc32:%08x` of the whole trace.
    pub checksum: String,
    /// Length of the whole trace.
    pub bytesize: u64,
}

/// One artifact upload.
#[derive(Debug, Clone)]
pub struct ArtifactUpload {
    /// File name sent in the multipart part.
    pub filename: String,
    /// `zip`, `gzip` or `raw`.
    pub format: String,
    /// `archive`, `junit`, …
    pub artifact_type: String,
    /// `expire_in`, if set.
    pub expire_in: Option<String>,
    /// The file holding the bytes: streamed from disk, opened again for each attempt, so an
    /// artifact of any size costs the uploader a buffer, not its size in memory.
    pub path: std::path::PathBuf,
}

/// Result of an artifact upload.
#[derive(Debug, PartialEq, Eq)]
pub enum UploadAck {
    /// 201.
    Created,
    /// 413: too large for the instance's limit.
    TooLarge,
}

/// A client for one GitLab instance's runner API.
#[derive(Debug, Clone)]
pub struct RunnerApi {
    http: reqwest::Client,
    /// Without userinfo: every error message is built from it.
    base: Url,
    /// Userinfo of the configured URL (a proxy's basic auth), sent as a header instead.
    proxy_auth: Option<crate::net::UrlCredentials>,
    /// `CI_DEBUG_TRACE`: trace patches carry `debug_trace=true`, as gitlab-runner's do.
    debug_trace: bool,
}

impl RunnerApi {
    /// A client for the GitLab at `gitlab_url` (`https://gitlab.example.com`, sub-path allowed).
    ///
    /// # Errors
    /// An unparsable URL, or a TLS backend that cannot start.
    pub fn new(gitlab_url: &str) -> Result<Self, ApiError> {
        Self::trusting(gitlab_url, None)
    }

    /// A client for the GitLab at `gitlab_url` that also trusts the CA certificates of `ca`
    /// (`tls_ca_file`: a PEM bundle, and where it came from for errors) besides the system's.
    ///
    /// # Errors
    /// An unparsable URL, a bundle without a usable certificate, or a TLS backend that cannot
    /// start.
    pub fn trusting(gitlab_url: &str, ca: Option<(&str, &[u8])>) -> Result<Self, ApiError> {
        let bad = |reason: String| ApiError::BadUrl {
            url: crate::net::redact_url(gitlab_url),
            reason,
        };
        let mut base = Url::parse(gitlab_url).map_err(|e| bad(e.to_string()))?;
        let proxy_auth = crate::net::take_credentials(&mut base);
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        let base = base.join("api/v4/").map_err(|e| bad(e.to_string()))?;
        let http = reqwest::Client::builder()
            .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(15))
            // Artifact downloads may redirect to object storage; those are followed by hand so
            // the JOB-TOKEN header is not sent along.
            .redirect(reqwest::redirect::Policy::none());
        let http = match ca {
            Some((path, pem)) => {
                let bad_ca = |reason: String| ApiError::TlsCa {
                    path: path.to_owned(),
                    reason,
                };
                let certs = reqwest::Certificate::from_pem_bundle(pem)
                    .map_err(|e| bad_ca(crate::net::error_chain(&e)))?;
                if certs.is_empty() {
                    return Err(bad_ca("no PEM certificate in it".into()));
                }
                http.tls_certs_merge(certs)
                    .build()
                    .map_err(|e| bad_ca(crate::net::error_chain(&e)))?
            }
            None => http.build().map_err(|e| ApiError::Transport {
                url: base.to_string(),
                source: e,
            })?,
        };
        Ok(Self {
            http,
            base,
            proxy_auth,
            debug_trace: false,
        })
    }

    fn url(&self, path: &str) -> Url {
        // `path` is built by this module from numbers and fixed segments, so join cannot fail
        // for a base that parsed; fall back to the base to keep this infallible.
        self.base.join(path).unwrap_or_else(|_| self.base.clone())
    }

    /// The same client, marking trace patches as a debug trace (`CI_DEBUG_TRACE`) when `on`.
    #[must_use]
    pub fn with_debug_trace(mut self, on: bool) -> Self {
        self.debug_trace = on;
        self
    }

    fn request(&self, method: Method, path: &str) -> (reqwest::RequestBuilder, String) {
        let url = self.url(path);
        let shown = url.to_string();
        let mut builder = self
            .http
            .request(method, url)
            .header("X-Request-Id", request_id());
        if let Some(auth) = &self.proxy_auth {
            builder = builder.basic_auth(&auth.user, auth.password.as_deref());
        }
        (builder, shown)
    }

    async fn send(
        builder: reqwest::RequestBuilder,
        url: &str,
    ) -> Result<reqwest::Response, ApiError> {
        builder.send().await.map_err(|source| ApiError::Transport {
            url: url.to_owned(),
            source,
        })
    }

    async fn unexpected(method: Method, url: String, response: reqwest::Response) -> ApiError {
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        ApiError::Status {
            method,
            url,
            status,
            body: body.chars().take(300).collect(),
        }
    }

    /// `POST jobs/request`: asks for one job, long-polling when `last_update` is given. A job
    /// body over `max_payload` bytes is not read past that: it comes back as
    /// [`JobRequest::Unusable`], as does one that is not a job GitLab documents.
    ///
    /// # Errors
    /// Transport errors, 5xx, 409 and any other unexpected status ([`ApiError::is_transient`]
    /// tells which are worth a retry), and a job body so broken it does not even name its id
    /// and token. 403 and 429 are answers, not errors.
    pub async fn request_job(
        &self,
        token: &str,
        system_id: &str,
        last_update: Option<&str>,
        info: &RunnerInfo,
        timeout: Duration,
        max_payload: usize,
    ) -> Result<JobRequest, ApiError> {
        #[derive(Serialize)]
        struct Body<'a> {
            token: &'a str,
            system_id: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            last_update: Option<&'a str>,
            info: &'a RunnerInfo,
        }
        let (builder, url) = self.request(Method::POST, "jobs/request");
        let builder = builder
            .header("RUNNER-TOKEN", token)
            .header("Accept", "application/json")
            .timeout(timeout)
            .json(&Body {
                token,
                system_id,
                last_update,
                info,
            });
        let response = Self::send(builder, &url).await?;
        match response.status() {
            StatusCode::CREATED => {
                let body = match crate::net::read_limited(response, max_payload).await {
                    Ok(body) => body,
                    Err(Ok(source)) => return Err(ApiError::Transport { url, source }),
                    Err(Err(oversized)) => {
                        let problem = format!(
                            "the job's payload is {} KiB, more than this runner accepts ({} KiB); raise max_job_payload of the runner in kiln's config if such jobs are expected",
                            oversized.size.div_ceil(1024),
                            max_payload / 1024
                        );
                        return unusable(
                            &url,
                            &oversized.prefix,
                            problem,
                            FailureReason::RunnerConfigurationError,
                        );
                    }
                };
                let raw: serde_json::Value = match serde_json::from_slice(&body) {
                    Ok(raw) => raw,
                    Err(e) => {
                        let problem = format!("the job's payload is not valid JSON ({e})");
                        return unusable(&url, &body, problem, FailureReason::DataIntegrityFailure);
                    }
                };
                let job: JobPayload = match serde_json::from_value(raw.clone()) {
                    Ok(job) => job,
                    Err(e) => {
                        let problem =
                            format!("the job's payload does not have the documented shape ({e})");
                        return unusable(&url, &body, problem, FailureReason::DataIntegrityFailure);
                    }
                };
                if let Some(problem) = super::payload::malformed(&raw)
                    && job.id > 0
                    && !job.token.is_empty()
                {
                    return Ok(JobRequest::Unusable {
                        job: Box::new(job),
                        reason: FailureReason::DataIntegrityFailure,
                        problem,
                    });
                }
                Ok(JobRequest::Job {
                    job: Box::new(job),
                    raw,
                })
            }
            StatusCode::NO_CONTENT => Ok(JobRequest::NoJob {
                last_update: response
                    .headers()
                    .get("x-gitlab-last-update")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
            }),
            StatusCode::FORBIDDEN => Ok(JobRequest::Forbidden),
            StatusCode::TOO_MANY_REQUESTS => Ok(JobRequest::RateLimited {
                retry_after: response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(crate::net::retry_after),
            }),
            _ => Err(Self::unexpected(Method::POST, url, response).await),
        }
    }

    /// `PUT jobs/:id`: a state update (keep-alive `running`, or the final state).
    ///
    /// # Errors
    /// Transport errors and statuses other than 200, 202, 403, 404 and 412.
    pub async fn update_job(&self, id: u64, update: &JobUpdate<'_>) -> Result<UpdateAck, ApiError> {
        let (builder, url) = self.request(Method::PUT, &format!("jobs/{id}"));
        let builder = builder
            .header("JOB-TOKEN", update.token)
            .header("Accept", "application/json")
            .timeout(Duration::from_secs(60))
            .json(update);
        let response = Self::send(builder, &url).await?;
        let control = JobControl::from_headers(response.headers());
        match response.status() {
            StatusCode::OK => Ok(UpdateAck::Accepted(control)),
            StatusCode::ACCEPTED => Ok(UpdateAck::Pending(control)),
            StatusCode::PRECONDITION_FAILED => Ok(UpdateAck::ChecksumMismatch),
            StatusCode::FORBIDDEN | StatusCode::NOT_FOUND => Ok(UpdateAck::Gone(control)),
            _ => Err(Self::unexpected(Method::PUT, url, response).await),
        }
    }

    /// `PATCH jobs/:id/trace`: appends `bytes` at offset `start`.
    ///
    /// # Errors
    /// Transport errors and statuses other than 202, 403, 404 and 416.
    pub async fn patch_trace(
        &self,
        id: u64,
        token: &str,
        start: u64,
        bytes: Vec<u8>,
    ) -> Result<TraceAck, ApiError> {
        let end = (start + bytes.len() as u64).saturating_sub(1);
        let path = if self.debug_trace {
            format!("jobs/{id}/trace?debug_trace=true")
        } else {
            format!("jobs/{id}/trace")
        };
        let (builder, url) = self.request(Method::PATCH, &path);
        let builder = builder
            .header("JOB-TOKEN", token)
            .header("Content-Type", "text/plain")
            .header("Content-Range", format!("{start}-{end}"))
            .timeout(Duration::from_secs(60))
            .body(bytes);
        let response = Self::send(builder, &url).await?;
        let control = JobControl::from_headers(response.headers());
        match response.status() {
            StatusCode::ACCEPTED => Ok(TraceAck::Accepted(control)),
            StatusCode::RANGE_NOT_SATISFIABLE => Ok(TraceAck::RangeMismatch {
                server_len: range_end(response.headers()),
            }),
            StatusCode::FORBIDDEN => Ok(TraceAck::Forbidden(control)),
            StatusCode::NOT_FOUND => Ok(TraceAck::NotFound),
            _ => Err(Self::unexpected(Method::PATCH, url, response).await),
        }
    }

    /// Appends `text` to the end of a job's trace, whatever its current length: the first
    /// patch learns the length from GitLab's 416 `Range` header.
    ///
    /// Used by the coordinator to explain a failure the agent could not report itself.
    ///
    /// # Errors
    /// As [`RunnerApi::patch_trace`].
    pub async fn append_trace(&self, id: u64, token: &str, text: &str) -> Result<(), ApiError> {
        let mut offset = 0;
        for _ in 0..3 {
            match self
                .patch_trace(id, token, offset, text.as_bytes().to_vec())
                .await?
            {
                TraceAck::RangeMismatch {
                    server_len: Some(len),
                } if len != offset => offset = len,
                _ => return Ok(()),
            }
        }
        Ok(())
    }

    /// `POST jobs/:id/artifacts`: uploads one artifact, following a 307 once.
    ///
    /// # Errors
    /// Transport errors and statuses other than 201 and 413.
    pub async fn upload_artifact(
        &self,
        id: u64,
        token: &str,
        artifact: &ArtifactUpload,
    ) -> Result<UploadAck, ApiError> {
        let mut target = self.url(&format!("jobs/{id}/artifacts"));
        {
            let mut query = target.query_pairs_mut();
            query
                .append_pair("artifact_format", &artifact.format)
                .append_pair("artifact_type", &artifact.artifact_type);
            if let Some(expire_in) = &artifact.expire_in {
                query.append_pair("expire_in", expire_in);
            }
        }
        for _ in 0..3 {
            // The format and type also go as form fields: GitLab reads either, and some
            // servers only the form.
            let file = tokio::fs::File::open(&artifact.path)
                .await
                .map_err(|e| ApiError::Body {
                    url: strip_query(&target),
                    message: format!("cannot read {}: {e}", artifact.path.display()),
                })?;
            let len = file
                .metadata()
                .await
                .map_err(|e| ApiError::Body {
                    url: strip_query(&target),
                    message: format!("cannot read {}: {e}", artifact.path.display()),
                })?
                .len();
            let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(
                file,
                64 * 1024,
            ));
            let part = reqwest::multipart::Part::stream_with_length(body, len)
                .file_name(artifact.filename.clone());
            let form = reqwest::multipart::Form::new()
                .part("file", part)
                .text("artifact_format", artifact.format.clone())
                .text("artifact_type", artifact.artifact_type.clone());
            let shown = strip_query(&target);
            let builder = self
                .http
                .post(target.clone())
                .header("X-Request-Id", request_id())
                .header("JOB-TOKEN", token)
                .timeout(Duration::from_secs(3600))
                .multipart(form);
            let response = Self::send(builder, &shown).await?;
            match response.status() {
                StatusCode::CREATED => return Ok(UploadAck::Created),
                StatusCode::PAYLOAD_TOO_LARGE => return Ok(UploadAck::TooLarge),
                StatusCode::TEMPORARY_REDIRECT => {
                    let location = response
                        .headers()
                        .get("location")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|l| target.join(l).ok());
                    match location {
                        Some(next) => target = next,
                        None => return Err(Self::unexpected(Method::POST, shown, response).await),
                    }
                }
                _ => return Err(Self::unexpected(Method::POST, shown, response).await),
            }
        }
        Err(ApiError::Body {
            url: strip_query(&target),
            message: "too many redirects".into(),
        })
    }

    /// `GET jobs/:id/artifacts` with that job's own token; a redirect to object storage is
    /// followed without the token.
    ///
    /// # Errors
    /// Transport errors and any status but 200 (after redirects).
    pub async fn download_artifacts(&self, id: u64, token: &str) -> Result<Vec<u8>, ApiError> {
        let (builder, url) = self.request(Method::GET, &format!("jobs/{id}/artifacts"));
        let builder = builder
            .header("JOB-TOKEN", token)
            .timeout(Duration::from_secs(3600));
        let mut response = Self::send(builder, &url).await?;
        let mut hops = 0;
        while response.status().is_redirection() && hops < 5 {
            hops += 1;
            let Some(next) = response
                .headers()
                .get("location")
                .and_then(|v| v.to_str().ok())
                .and_then(|l| response.url().join(l).ok())
            else {
                break;
            };
            let shown = strip_query(&next);
            response = Self::send(
                self.http.get(next).timeout(Duration::from_secs(3600)),
                &shown,
            )
            .await?;
        }
        if response.status() != StatusCode::OK {
            let shown = strip_query(response.url());
            return Err(Self::unexpected(Method::GET, shown, response).await);
        }
        let bytes = response
            .bytes()
            .await
            .map_err(|source| ApiError::Transport {
                url: url.clone(),
                source,
            })?;
        Ok(bytes.to_vec())
    }
}

/// Object-storage URLs carry signatures in their query; never show those.
/// A job kiln cannot run, named by the id and token at the start of its body; without those
/// nobody can tell GitLab, and the error says so.
fn unusable(
    url: &str,
    body: &[u8],
    problem: String,
    reason: FailureReason,
) -> Result<JobRequest, ApiError> {
    match super::payload::identity(body) {
        Some((id, token)) => Ok(JobRequest::Unusable {
            job: Box::new(JobPayload {
                id,
                token,
                ..JobPayload::default()
            }),
            reason,
            problem,
        }),
        None => Err(ApiError::Body {
            url: url.to_owned(),
            message: format!(
                "{problem}; it does not even name the job's id and token, so kiln cannot fail the job (GitLab times it out)"
            ),
        }),
    }
}

fn strip_query(url: &Url) -> String {
    let mut url = url.clone();
    url.set_query(None);
    url.to_string()
}

/// `Range: 0-<len>` → `len`.
fn range_end(headers: &HeaderMap) -> Option<u64> {
    headers
        .get("range")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().trim_start_matches("bytes=").rsplit('-').next())
        .and_then(|s| s.trim().parse().ok())
}

fn request_id() -> String {
    use rand::Rng;
    let bytes: [u8; 16] = rand::rng().random();
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_keeps_sub_path() {
        let api = RunnerApi::new("https://example.com/gitlab").unwrap();
        assert_eq!(
            api.url("jobs/request").as_str(),
            "https://example.com/gitlab/api/v4/jobs/request"
        );
        let api = RunnerApi::new("https://example.com/").unwrap();
        assert_eq!(
            api.url("jobs/1").as_str(),
            "https://example.com/api/v4/jobs/1"
        );
    }

    #[test]
    fn range_header_is_read() {
        let mut headers = HeaderMap::new();
        headers.insert("range", "0-1234".parse().unwrap());
        assert_eq!(range_end(&headers), Some(1234));
    }
}
