//! Calls to SAE's OpenAPI (version 2019-05-06, ROA style: parameters in the query), signed
//! with ACS3, and the few response shapes `kiln deploy` reads.

use std::time::Duration;

use chrono::Utc;
use reqwest::Method;
use serde::Deserialize;
use url::Url;

use super::signer::{self, Credentials, SignInput, encode};
use crate::deploy::output::PreparedRequest;

/// The OpenAPI version every SAE call names.
pub(crate) const VERSION: &str = "2019-05-06";

/// Errors from an SAE call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// SAE could not be reached.
    #[error("cannot reach SAE at {endpoint} for {action}; check --endpoint and the network")]
    Http {
        /// The call.
        action: &'static str,
        /// The endpoint.
        endpoint: String,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
    /// No answer within the request timeout. The call may still have taken effect.
    #[error("SAE did not answer {action} within {timeout:?}")]
    Timeout {
        /// The call.
        action: &'static str,
        /// The request timeout.
        timeout: Duration,
    },
    /// SAE answered with an error code.
    #[error(
        "SAE rejected {action}: HTTP {status} {code}: {message} (request id {request_id}){hint}"
    )]
    Api {
        /// The call.
        action: &'static str,
        /// HTTP status.
        status: u16,
        /// SAE's error code, e.g. `Application.ChangerOrderRunning`.
        code: String,
        /// SAE's message.
        message: String,
        /// SAE's request id, for a support ticket.
        request_id: String,
        /// What to check.
        hint: &'static str,
    },
    /// The answer was not the JSON SAE sends.
    #[error("SAE answered {action} with something kiln cannot read; is --endpoint really SAE?")]
    Decode {
        /// The call.
        action: &'static str,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

impl ClientError {
    /// SAE's error code, when SAE answered with one.
    pub(crate) fn code(&self) -> Option<&str> {
        match self {
            Self::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// The envelope of every SAE answer.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Envelope {
    #[serde(default)]
    request_id: Option<String>,
    #[serde(default)]
    code: Option<serde_json::Value>,
    #[serde(default)]
    error_code: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    success: Option<bool>,
    #[serde(default)]
    data: Option<serde_json::Value>,
}

/// One SAE call, before signing.
#[derive(Debug, Clone)]
pub(crate) struct Call {
    pub(crate) method: Method,
    pub(crate) path: &'static str,
    pub(crate) action: &'static str,
    pub(crate) query: Vec<(String, String)>,
}

impl Call {
    pub(crate) fn get(path: &'static str, action: &'static str) -> Self {
        Self {
            method: Method::GET,
            path,
            action,
            query: Vec::new(),
        }
    }

    pub(crate) fn post(path: &'static str, action: &'static str) -> Self {
        Self {
            method: Method::POST,
            path,
            action,
            query: Vec::new(),
        }
    }

    pub(crate) fn param(mut self, name: &str, value: impl Into<String>) -> Self {
        self.query.push((name.to_owned(), value.into()));
        self
    }

    pub(crate) fn param_opt(self, name: &str, value: Option<impl Into<String>>) -> Self {
        match value {
            Some(v) => self.param(name, v),
            None => self,
        }
    }
}

/// An SAE OpenAPI client for one endpoint.
#[derive(Debug, Clone)]
pub(crate) struct SaeClient {
    http: reqwest::Client,
    endpoint: Url,
    credentials: Credentials,
    request_timeout: Duration,
}

impl SaeClient {
    pub(crate) fn new(
        http: reqwest::Client,
        endpoint: Url,
        credentials: Credentials,
        request_timeout: Duration,
    ) -> Self {
        Self {
            http,
            endpoint,
            credentials,
            request_timeout,
        }
    }

    /// Signs a call; the result can be printed (`--dry-run`) or sent.
    pub(crate) fn prepare(&self, call: &Call) -> PreparedRequest {
        let mut url = self.endpoint.clone();
        url.set_path(call.path);
        if !call.query.is_empty() {
            let q = call
                .query
                .iter()
                .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
                .collect::<Vec<_>>()
                .join("&");
            url.set_query(Some(&q));
        }
        let host = match (url.host_str(), url.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_owned(),
            (None, _) => String::new(),
        };
        let date = Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
        let nonce = format!("{:032x}", rand::random::<u128>());
        let signed = signer::sign(
            &self.credentials,
            &SignInput {
                method: call.method.as_str(),
                host: &host,
                path: call.path,
                query: &call.query,
                action: call.action,
                version: VERSION,
                body: b"",
                content_type: None,
                date: &date,
                nonce: &nonce,
            },
        );
        PreparedRequest {
            method: call.method.to_string(),
            url,
            headers: signed.headers,
            body: String::new(),
        }
    }

    /// Sends a call and returns its `Data`.
    ///
    /// # Errors
    /// [`ClientError::Timeout`] when SAE does not answer in time (the call may have taken
    /// effect), [`ClientError::Api`] when SAE answers with an error.
    pub(crate) async fn send(&self, call: &Call) -> Result<serde_json::Value, ClientError> {
        let prepared = self.prepare(call);
        let mut request = self
            .http
            .request(call.method.clone(), prepared.url.clone())
            .timeout(self.request_timeout);
        for (name, value) in &prepared.headers {
            // reqwest derives Host from the URL; it is signed with the same value.
            if name != "host" {
                request = request.header(name.as_str(), value.as_str());
            }
        }
        let response = request.send().await.map_err(|e| self.http_error(call, e))?;
        let status = response.status().as_u16();
        let body = response
            .bytes()
            .await
            .map_err(|e| self.http_error(call, e))?;
        let envelope: Envelope = match serde_json::from_slice(&body) {
            Ok(envelope) => envelope,
            Err(source) => {
                if (200..300).contains(&status) {
                    return Err(ClientError::Decode {
                        action: call.action,
                        source,
                    });
                }
                return Err(ClientError::Api {
                    action: call.action,
                    status,
                    code: format!("HTTP{status}"),
                    message: String::from_utf8_lossy(&body).chars().take(300).collect(),
                    request_id: "none".to_owned(),
                    hint: hint_for(status, ""),
                });
            }
        };
        let code = match &envelope.code {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Number(n)) => Some(n.to_string()),
            _ => None,
        }
        .or(envelope.error_code.clone());
        let failed = !(200..300).contains(&status)
            || envelope.success == Some(false)
            || code.as_deref().is_some_and(|c| c != "200" && c != "OK");
        if failed {
            let code = code.unwrap_or_else(|| format!("HTTP{status}"));
            return Err(ClientError::Api {
                action: call.action,
                status,
                hint: hint_for(status, &code),
                code,
                message: envelope
                    .message
                    .unwrap_or_else(|| "(no message)".to_owned()),
                request_id: envelope.request_id.unwrap_or_else(|| "none".to_owned()),
            });
        }
        Ok(envelope.data.unwrap_or(serde_json::Value::Null))
    }

    fn http_error(&self, call: &Call, source: reqwest::Error) -> ClientError {
        if source.is_timeout() {
            ClientError::Timeout {
                action: call.action,
                timeout: self.request_timeout,
            }
        } else {
            ClientError::Http {
                action: call.action,
                endpoint: self.endpoint.to_string(),
                source,
            }
        }
    }
}

fn hint_for(status: u16, code: &str) -> &'static str {
    if status == 401
        || status == 403
        || code.contains("AccessKey")
        || code.contains("Signature")
        || code.contains("Forbidden")
    {
        "; check ALIBABA_CLOUD_ACCESS_KEY_ID / ALIBABA_CLOUD_ACCESS_KEY_SECRET (and \
         ALIBABA_CLOUD_SECURITY_TOKEN for STS) and that the RAM user may use SAE"
    } else if code == "App.Package.Version.Exists" {
        "; every deploy needs a new --version (the default, commit + timestamp, always is)"
    } else if code == "InvalidPackageType.NotFound" {
        "; the application was created for another package type: use --jar, --war or --image \
         accordingly"
    } else {
        ""
    }
}

/// `listApplications` → `Data.Applications[]`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub(crate) struct ApplicationList {
    pub(crate) applications: Vec<ApplicationSummary>,
}

/// One application in a list.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub(crate) struct ApplicationSummary {
    pub(crate) app_id: String,
    pub(crate) app_name: String,
    pub(crate) namespace_id: Option<String>,
}

/// `DescribeChangeOrder` → `Data`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub(crate) struct ChangeOrder {
    pub(crate) change_order_id: String,
    pub(crate) status: i64,
    pub(crate) sub_status: Option<i64>,
    pub(crate) error_message: Option<String>,
    pub(crate) pipelines: Vec<Pipeline>,
    pub(crate) current_pipeline_id: Option<String>,
}

/// One batch of a change order.
#[derive(Debug, Default, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase", default)]
pub(crate) struct Pipeline {
    pub(crate) pipeline_id: String,
    pub(crate) pipeline_name: String,
    pub(crate) status: i64,
    pub(crate) error_message: Option<String>,
}

/// `ListChangeOrders` → `Data.ChangeOrderList[]`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub(crate) struct ChangeOrderList {
    pub(crate) change_order_list: Vec<ChangeOrderSummary>,
}

/// One change order in a list.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub(crate) struct ChangeOrderSummary {
    pub(crate) change_order_id: String,
    pub(crate) status: i64,
    pub(crate) description: Option<String>,
    pub(crate) create_time: Option<String>,
}

/// Reads `Data` into one of the shapes above.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    action: &'static str,
    data: serde_json::Value,
) -> Result<T, ClientError> {
    serde_json::from_value(data).map_err(|source| ClientError::Decode { action, source })
}

/// Human names of change-order and batch states.
pub(crate) fn status_name(status: i64) -> &'static str {
    match status {
        0 => "preparing",
        1 => "executing",
        2 => "succeeded",
        3 => "failed",
        6 => "terminated",
        8 => "waiting for manual confirmation",
        9 => "waiting for the next automatic batch",
        10 => "system exception",
        11 => "pending approval",
        12 => "approved",
        _ => "unknown state",
    }
}
