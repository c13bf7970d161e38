//! How a build reaches its cache: a directory it can write (the local executor, `kiln exec`), or
//! URLs the coordinator pre-signs on request for the build's capability. Either way the build
//! names objects relative to its project's prefix and never holds a storage key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// The job file's `cache`: where the build's cache is and how large a saved cache may be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheGrant {
    /// How the build reaches it.
    pub access: CacheAccess,
    /// A cache larger than this (bytes, before compression) is not saved.
    pub max_size: u64,
}

/// How a build reaches its cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum CacheAccess {
    /// The project's directory of a local cache.
    Directory {
        /// The directory.
        dir: PathBuf,
    },
    /// Pre-signed URLs from the coordinator.
    Signed {
        /// The coordinator's base URL.
        url: String,
        /// The build's capability (see [`super::capability`]): its prefix and expiry, signed.
        capability: String,
    },
}

/// The body of `POST /cache/v1/urls`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UrlsRequest {
    /// `GET`, `HEAD` or `PUT`.
    pub(crate) method: String,
    /// Object names relative to the build's prefix.
    pub(crate) names: Vec<String>,
}

/// The answer: one URL per name, in order.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct UrlsResponse {
    /// The pre-signed URLs.
    pub(crate) urls: Vec<String>,
}

/// The most names one signing request carries.
pub(crate) const MAX_NAMES: usize = 1000;

/// What went wrong talking to the cache.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// A request did not get through.
    #[error("{action} {what}: {source}")]
    Http {
        /// `GET`, `PUT`, `sign`.
        action: &'static str,
        /// The object or endpoint (never a signed URL: its query is a credential).
        what: String,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },
    /// An answer other than success.
    #[error("{action} {what}: HTTP {status}: {body}")]
    Status {
        /// `GET`, `PUT`, `sign`.
        action: &'static str,
        /// The object or endpoint.
        what: String,
        /// The status.
        status: u16,
        /// The start of the body.
        body: String,
    },
    /// A local file operation failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was tried.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The coordinator answered something else than URLs.
    #[error("the coordinator's cache signing answer is not valid: {0}")]
    Answer(String),
}

/// Where one object is.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    /// A file of a local cache.
    File(PathBuf),
    /// A pre-signed URL, and the object's name for messages.
    Url(String, String),
}

/// A build's cache connection.
#[derive(Debug, Clone)]
pub struct Remote {
    access: CacheAccess,
    client: reqwest::Client,
}

impl Remote {
    /// A connection for `access`.
    pub fn new(access: CacheAccess) -> Self {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(300))
            .pool_max_idle_per_host(64)
            .build()
            .unwrap_or_default();
        Self { access, client }
    }

    /// Where `names` are, for `method` (`GET`, `HEAD`, `PUT`).
    ///
    /// # Errors
    /// The coordinator cannot be reached or refuses.
    pub(crate) async fn targets(
        &self,
        method: &str,
        names: &[String],
    ) -> Result<Vec<Target>, RemoteError> {
        match &self.access {
            CacheAccess::Directory { dir } => {
                Ok(names.iter().map(|n| Target::File(dir.join(n))).collect())
            }
            CacheAccess::Signed { url, capability } => {
                let mut targets = Vec::with_capacity(names.len());
                let endpoint = format!("{}/cache/v1/urls", url.trim_end_matches('/'));
                for batch in names.chunks(MAX_NAMES) {
                    let response = self
                        .client
                        .post(&endpoint)
                        .bearer_auth(capability)
                        .json(&UrlsRequest {
                            method: method.to_owned(),
                            names: batch.to_vec(),
                        })
                        .send()
                        .await
                        .map_err(|source| RemoteError::Http {
                            action: "sign",
                            what: endpoint.clone(),
                            source,
                        })?;
                    let response = check(response, "sign", &endpoint).await?;
                    let answer: UrlsResponse =
                        response.json().await.map_err(|source| RemoteError::Http {
                            action: "sign",
                            what: endpoint.clone(),
                            source,
                        })?;
                    if answer.urls.len() != batch.len() {
                        return Err(RemoteError::Answer(format!(
                            "{} URLs for {} names",
                            answer.urls.len(),
                            batch.len()
                        )));
                    }
                    targets.extend(
                        answer
                            .urls
                            .into_iter()
                            .zip(batch)
                            .map(|(u, n)| Target::Url(u, n.clone())),
                    );
                }
                Ok(targets)
            }
        }
    }

    /// The object's bytes; `None` when it does not exist.
    ///
    /// # Errors
    /// Anything but success or not-found.
    pub(crate) async fn get(&self, target: &Target) -> Result<Option<Bytes>, RemoteError> {
        match target {
            Target::File(path) => match tokio::fs::read(path).await {
                Ok(data) => Ok(Some(data.into())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(source) => Err(RemoteError::Io {
                    action: "read",
                    path: path.clone(),
                    source,
                }),
            },
            Target::Url(url, name) => Ok(self
                .get_url(self.client.get(url), name)
                .await?
                .map(|(_, data)| data)),
        }
    }

    /// Sends a GET: `None` on not-found, else the status and body.
    async fn get_url(
        &self,
        request: reqwest::RequestBuilder,
        name: &str,
    ) -> Result<Option<(reqwest::StatusCode, Bytes)>, RemoteError> {
        let http = |source| RemoteError::Http {
            action: "GET",
            what: name.to_owned(),
            source,
        };
        let response = request.send().await.map_err(http)?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let data = check(response, "GET", name)
            .await?
            .bytes()
            .await
            .map_err(http)?;
        Ok(Some((status, data)))
    }

    /// `length` bytes of the object from `start` (fewer when it is shorter); `None` when it does
    /// not exist. Over HTTP a `Range` header on the pre-signed GET: S3, GCS and Azure sign
    /// neither it nor its absence, so the same URL serves whole and ranged reads.
    ///
    /// # Errors
    /// Anything but success or not-found.
    pub(crate) async fn get_range(
        &self,
        target: &Target,
        start: u64,
        length: u64,
    ) -> Result<Option<Bytes>, RemoteError> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        if length == 0 {
            return Ok(Some(Bytes::new()));
        }
        match target {
            Target::File(path) => {
                let io = |source| RemoteError::Io {
                    action: "read",
                    path: path.clone(),
                    source,
                };
                let mut file = match tokio::fs::File::open(path).await {
                    Ok(file) => file,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(io(e)),
                };
                file.seek(std::io::SeekFrom::Start(start))
                    .await
                    .map_err(io)?;
                let mut data = Vec::with_capacity(usize::try_from(length).unwrap_or(0));
                file.take(length).read_to_end(&mut data).await.map_err(io)?;
                Ok(Some(data.into()))
            }
            Target::Url(url, name) => {
                let last = start.saturating_add(length - 1);
                let request = self
                    .client
                    .get(url)
                    .header(reqwest::header::RANGE, format!("bytes={start}-{last}"));
                let Some((status, data)) = self.get_url(request, name).await? else {
                    return Ok(None);
                };
                if status == reqwest::StatusCode::PARTIAL_CONTENT {
                    return Ok(Some(data));
                }
                // A server that ignores `Range` sends the whole object.
                let from = usize::try_from(start).unwrap_or(usize::MAX).min(data.len());
                let to = usize::try_from(last.saturating_add(1))
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                Ok(Some(data.slice(from..to)))
            }
        }
    }

    /// Stores the object (replacing it whole: readers never see half of it).
    ///
    /// # Errors
    /// The write or upload failed.
    pub(crate) async fn put(&self, target: &Target, body: Bytes) -> Result<(), RemoteError> {
        match target {
            Target::File(path) => write_atomically(path, &body).await,
            Target::Url(url, name) => {
                let response = self
                    .client
                    .put(url)
                    // Azure needs it on a SAS upload; S3 and GCS ignore an unsigned header.
                    .header("x-ms-blob-type", "BlockBlob")
                    .body(body)
                    .send()
                    .await
                    .map_err(|source| RemoteError::Http {
                        action: "PUT",
                        what: name.clone(),
                        source,
                    })?;
                check(response, "PUT", name).await.map(|_| ())
            }
        }
    }
}

async fn write_atomically(path: &Path, body: &[u8]) -> Result<(), RemoteError> {
    let io = |action, source| RemoteError::Io {
        action,
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| io("create the directory of", e))?;
    }
    let temporary = path.with_extension(format!("tmp{}", rand::random::<u32>()));
    tokio::fs::write(&temporary, body)
        .await
        .map_err(|e| io("write", e))?;
    tokio::fs::rename(&temporary, path)
        .await
        .map_err(|e| io("rename into", e))
}

async fn check(
    response: reqwest::Response,
    action: &'static str,
    what: &str,
) -> Result<reqwest::Response, RemoteError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = response.text().await.unwrap_or_default();
    Err(RemoteError::Status {
        action,
        what: what.to_owned(),
        status: status.as_u16(),
        body: body.chars().take(300).collect(),
    })
}
