//! Alibaba Cloud request signature V3 (`ACS3-HMAC-SHA256`) for SAE's OpenAPI, and the
//! credentials it signs with.

use std::fmt;

use hmac::{Hmac, Mac};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use sha2::{Digest, Sha256};

/// The algorithm name that starts both the string to sign and the `Authorization` header.
pub const ALGORITHM: &str = "ACS3-HMAC-SHA256";

/// Environment variable holding the AccessKey ID.
pub const ENV_ACCESS_KEY_ID: &str = "ALIBABA_CLOUD_ACCESS_KEY_ID";
/// Environment variable holding the AccessKey secret.
pub const ENV_ACCESS_KEY_SECRET: &str = "ALIBABA_CLOUD_ACCESS_KEY_SECRET";
/// Environment variable holding an STS security token (optional).
pub const ENV_SECURITY_TOKEN: &str = "ALIBABA_CLOUD_SECURITY_TOKEN";

/// RFC 3986 unreserved characters stay as they are; everything else is `%XX` (so a space is
/// `%20`, `*` is `%2A` and `~` is kept), which is what both ACS3 and OSS V4 expect.
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Same as [`UNRESERVED`] but keeps `/`, for paths.
const PATH: &AsciiSet = &UNRESERVED.remove(b'/');

/// Errors while loading credentials.
#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    /// A required credential variable is unset or empty.
    #[error(
        "environment variable {name} is not set; export the RAM user's AccessKey pair as \
         ALIBABA_CLOUD_ACCESS_KEY_ID and ALIBABA_CLOUD_ACCESS_KEY_SECRET"
    )]
    MissingCredential {
        /// The variable's name.
        name: &'static str,
    },
}

/// An AccessKey pair with an optional STS token. `Debug` never shows the secret or the token.
#[derive(Clone)]
pub struct Credentials {
    access_key_id: String,
    access_key_secret: String,
    security_token: Option<String>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("access_key_secret", &"<redacted>")
            .field(
                "security_token",
                &self.security_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl Credentials {
    /// Builds credentials from their parts.
    pub fn new(
        access_key_id: impl Into<String>,
        access_key_secret: impl Into<String>,
        security_token: Option<String>,
    ) -> Self {
        Self {
            access_key_id: access_key_id.into(),
            access_key_secret: access_key_secret.into(),
            security_token: security_token.filter(|t| !t.is_empty()),
        }
    }

    /// Reads `ALIBABA_CLOUD_ACCESS_KEY_ID`, `ALIBABA_CLOUD_ACCESS_KEY_SECRET` and the optional
    /// `ALIBABA_CLOUD_SECURITY_TOKEN`.
    ///
    /// # Errors
    /// [`SignerError::MissingCredential`] when the ID or the secret is unset or empty.
    pub fn from_env() -> Result<Self, SignerError> {
        let get = |name: &'static str| {
            std::env::var(name)
                .ok()
                .filter(|v| !v.trim().is_empty())
                .ok_or(SignerError::MissingCredential { name })
        };
        Ok(Self::new(
            get(ENV_ACCESS_KEY_ID)?,
            get(ENV_ACCESS_KEY_SECRET)?,
            std::env::var(ENV_SECURITY_TOKEN).ok(),
        ))
    }

    /// The AccessKey ID (not a secret: it appears in every `Authorization` header).
    pub fn access_key_id(&self) -> &str {
        &self.access_key_id
    }

    /// The secret half of the pair.
    pub(crate) fn access_key_secret(&self) -> &str {
        &self.access_key_secret
    }

    /// The STS token, if any.
    pub(crate) fn security_token(&self) -> Option<&str> {
        self.security_token.as_deref()
    }
}

/// Percent-encodes a query name or value the RFC 3986 way.
pub fn encode(value: &str) -> String {
    utf8_percent_encode(value, UNRESERVED).to_string()
}

/// Percent-encodes a path, keeping `/`.
pub fn encode_path(value: &str) -> String {
    utf8_percent_encode(value, PATH).to_string()
}

/// The canonical query string: pairs encoded, sorted by encoded name (then value), joined with
/// `&`; an empty value still gets its `=`.
pub fn canonical_query(query: &[(String, String)]) -> String {
    let mut pairs: Vec<(String, String)> =
        query.iter().map(|(k, v)| (encode(k), encode(v))).collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// Whether ACS3 signs this (lower-case) header.
fn is_signed_header(name: &str) -> bool {
    name == "host" || name == "content-type" || name.starts_with("x-acs-")
}

/// Canonical headers and the signed-header list: names lower-cased, values trimmed, repeated
/// headers joined with `,` in the order they were given.
fn canonical_headers(headers: &[(String, String)]) -> (String, String) {
    let mut merged: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for (name, value) in headers {
        let name = name.trim().to_ascii_lowercase();
        if is_signed_header(&name) {
            merged
                .entry(name)
                .or_default()
                .push(value.trim().to_owned());
        }
    }
    let canonical = merged
        .iter()
        .map(|(k, v)| format!("{k}:{}\n", v.join(",")))
        .collect::<String>();
    let signed = merged.keys().cloned().collect::<Vec<_>>().join(";");
    (canonical, signed)
}

/// Lower-case hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

pub(crate) fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    #[allow(clippy::expect_used)]
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// The parts of a request that ACS3 signs.
#[derive(Debug, Clone, Copy)]
pub struct RequestParts<'a> {
    /// HTTP method, upper case.
    pub method: &'a str,
    /// The path, not yet encoded (`/pop/v1/sam/app/deployApplication`).
    pub path: &'a str,
    /// Query parameters, not yet encoded.
    pub query: &'a [(String, String)],
    /// All request headers; only `host`, `content-type` and `x-acs-*` are signed.
    pub headers: &'a [(String, String)],
    /// The hex SHA-256 of the body (the `x-acs-content-sha256` value).
    pub body_sha256: &'a str,
}

/// The canonical request and its signed-header list.
pub fn canonical_request(parts: &RequestParts<'_>) -> (String, String) {
    let (headers, signed) = canonical_headers(parts.headers);
    let canonical = format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        parts.method,
        encode_path(parts.path),
        canonical_query(parts.query),
        headers,
        signed,
        parts.body_sha256
    );
    (canonical, signed)
}

/// `ACS3-HMAC-SHA256\n` + hex(SHA-256(canonical request)).
pub fn string_to_sign(canonical_request: &str) -> String {
    format!("{ALGORITHM}\n{}", sha256_hex(canonical_request.as_bytes()))
}

/// The lower-case hex signature of a request.
pub fn signature(secret: &str, parts: &RequestParts<'_>) -> String {
    let (canonical, _) = canonical_request(parts);
    hex::encode(hmac_sha256(
        secret.as_bytes(),
        string_to_sign(&canonical).as_bytes(),
    ))
}

/// The `Authorization` header value for a request.
pub fn authorization(credentials: &Credentials, parts: &RequestParts<'_>) -> String {
    let (_, signed) = canonical_request(parts);
    format!(
        "{ALGORITHM} Credential={},SignedHeaders={signed},Signature={}",
        credentials.access_key_id,
        signature(&credentials.access_key_secret, parts)
    )
}

/// The fields of an ACS3 `Authorization` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedAuthorization {
    /// The AccessKey ID.
    pub access_key_id: String,
    /// The signed header names, `;`-separated.
    pub signed_headers: String,
    /// The hex signature.
    pub signature: String,
}

/// Parses an `ACS3-HMAC-SHA256 Credential=…,SignedHeaders=…,Signature=…` header; `None` when it
/// is not one.
pub fn parse_authorization(value: &str) -> Option<ParsedAuthorization> {
    let rest = value.strip_prefix(ALGORITHM)?.trim_start();
    let mut id = None;
    let mut signed = None;
    let mut sig = None;
    for field in rest.split(',') {
        let (k, v) = field.trim().split_once('=')?;
        match k {
            "Credential" => id = Some(v.to_owned()),
            "SignedHeaders" => signed = Some(v.to_owned()),
            "Signature" => sig = Some(v.to_owned()),
            _ => return None,
        }
    }
    Some(ParsedAuthorization {
        access_key_id: id?,
        signed_headers: signed?,
        signature: sig?,
    })
}

/// A fully signed SAE request: the headers to send, `Authorization` included.
#[derive(Debug, Clone)]
pub(crate) struct Signed {
    pub(crate) headers: Vec<(String, String)>,
}

/// What the caller supplies per request besides the credentials.
#[derive(Debug, Clone)]
pub(crate) struct SignInput<'a> {
    pub(crate) method: &'a str,
    pub(crate) host: &'a str,
    pub(crate) path: &'a str,
    pub(crate) query: &'a [(String, String)],
    pub(crate) action: &'a str,
    pub(crate) version: &'a str,
    pub(crate) body: &'a [u8],
    pub(crate) content_type: Option<&'a str>,
    /// `YYYY-MM-DDTHH:MM:SSZ`.
    pub(crate) date: &'a str,
    pub(crate) nonce: &'a str,
}

/// Builds every ACS3 header for a request and signs it.
pub(crate) fn sign(credentials: &Credentials, input: &SignInput<'_>) -> Signed {
    let body_sha256 = sha256_hex(input.body);
    let mut headers = vec![
        ("host".to_owned(), input.host.to_owned()),
        ("x-acs-action".to_owned(), input.action.to_owned()),
        ("x-acs-version".to_owned(), input.version.to_owned()),
        ("x-acs-date".to_owned(), input.date.to_owned()),
        ("x-acs-signature-nonce".to_owned(), input.nonce.to_owned()),
        ("x-acs-content-sha256".to_owned(), body_sha256.clone()),
    ];
    if let Some(ct) = input.content_type {
        headers.push(("content-type".to_owned(), ct.to_owned()));
    }
    if let Some(token) = credentials.security_token() {
        headers.push(("x-acs-security-token".to_owned(), token.to_owned()));
    }
    let auth = authorization(
        credentials,
        &RequestParts {
            method: input.method,
            path: input.path,
            query: input.query,
            headers: &headers,
            body_sha256: &body_sha256,
        },
    );
    headers.push(("authorization".to_owned(), auth));
    Signed { headers }
}

/// Checks a received request's `Authorization` against the secret for its AccessKey ID, the way
/// the server does: only the headers it names are signed, and they must include `host` and every
/// `x-acs-*` header present. Returns the AccessKey ID on success.
///
/// # Errors
/// A short reason (safe to send back to the client) when the request does not verify.
pub fn verify(
    lookup_secret: impl Fn(&str) -> Option<String>,
    method: &str,
    path: &str,
    query: &[(String, String)],
    headers: &[(String, String)],
    body: &[u8],
) -> Result<String, &'static str> {
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    let auth = header("authorization").ok_or("missing Authorization header")?;
    let parsed = parse_authorization(auth).ok_or("malformed Authorization header")?;
    let secret = lookup_secret(&parsed.access_key_id).ok_or("InvalidAccessKeyId.NotFound")?;
    let content_sha = header("x-acs-content-sha256").ok_or("missing x-acs-content-sha256")?;
    if content_sha != sha256_hex(body) {
        return Err("x-acs-content-sha256 does not match the body");
    }
    for required in ["x-acs-date", "x-acs-signature-nonce", "x-acs-action"] {
        if header(required).is_none() {
            return Err("missing a required x-acs header");
        }
    }
    let (_, expected_signed) = canonical_request(&RequestParts {
        method,
        path,
        query,
        headers,
        body_sha256: content_sha,
    });
    if expected_signed != parsed.signed_headers {
        return Err("SignedHeaders does not list host, content-type and every x-acs-* header");
    }
    let expected = signature(
        &secret,
        &RequestParts {
            method,
            path,
            query,
            headers,
            body_sha256: content_sha,
        },
    );
    if expected != parsed.signature {
        return Err("SignatureDoesNotMatch");
    }
    Ok(parsed.access_key_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// The official example from Alibaba Cloud's "request syntax and signature method V3".
    type Pairs = Vec<(String, String)>;

    /// The official vector's (query, headers).
    fn official() -> (Pairs, Pairs) {
        let query = owned(&[
            (
                "ImageId",
                "win2019_1809_x64_dtc_zh-cn_40G_alibase_20230811.vhd",
            ),
            ("RegionId", "cn-shanghai"),
        ]);
        let headers = owned(&[
            ("host", "ecs.cn-shanghai.aliyuncs.com"),
            ("x-acs-action", "RunInstances"),
            ("x-acs-version", "2014-05-26"),
            ("x-acs-date", "2023-10-26T10:22:32Z"),
            ("x-acs-signature-nonce", "3156853299f313e23d1673dc12e1703d"),
            (
                "x-acs-content-sha256",
                "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            ),
        ]);
        (query, headers)
    }

    #[test]
    fn reproduces_the_official_vector_byte_for_byte() {
        let (query, headers) = official();
        let parts = RequestParts {
            method: "POST",
            path: "/",
            query: &query,
            headers: &headers,
            body_sha256: &sha256_hex(b""),
        };
        let (canonical, signed) = canonical_request(&parts);
        assert_eq!(
            canonical,
            "POST\n/\nImageId=win2019_1809_x64_dtc_zh-cn_40G_alibase_20230811.vhd&RegionId=cn-shanghai\n\
             host:ecs.cn-shanghai.aliyuncs.com\n\
             x-acs-action:RunInstances\n\
             x-acs-content-sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\n\
             x-acs-date:2023-10-26T10:22:32Z\n\
             x-acs-signature-nonce:3156853299f313e23d1673dc12e1703d\n\
             x-acs-version:2014-05-26\n\n\
             host;x-acs-action;x-acs-content-sha256;x-acs-date;x-acs-signature-nonce;x-acs-version\n\
             e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            sha256_hex(canonical.as_bytes()),
            "7ea06492da5221eba5297e897ce16e55f964061054b7695beedaac1145b1e259"
        );
        assert_eq!(
            string_to_sign(&canonical),
            "ACS3-HMAC-SHA256\n7ea06492da5221eba5297e897ce16e55f964061054b7695beedaac1145b1e259"
        );
        let creds = Credentials::new("YourAccessKeyId", "YourAccessKeySecret", None);
        assert_eq!(
            authorization(&creds, &parts),
            format!(
                "ACS3-HMAC-SHA256 Credential=YourAccessKeyId,SignedHeaders={signed},\
                 Signature=06563a9e1b43f5dfe96b81484da74bceab24a1d853912eee15083a6f0f3283c0"
            )
        );
    }

    #[test]
    fn sign_builds_the_same_headers_as_the_official_vector() {
        let (query, _) = official();
        let creds = Credentials::new("YourAccessKeyId", "YourAccessKeySecret", None);
        let signed = sign(
            &creds,
            &SignInput {
                method: "POST",
                host: "ecs.cn-shanghai.aliyuncs.com",
                path: "/",
                query: &query,
                action: "RunInstances",
                version: "2014-05-26",
                body: b"",
                content_type: None,
                date: "2023-10-26T10:22:32Z",
                nonce: "3156853299f313e23d1673dc12e1703d",
            },
        );
        let auth = &signed
            .headers
            .iter()
            .find(|(k, _)| k == "authorization")
            .unwrap()
            .1;
        assert!(auth.ends_with(
            "Signature=06563a9e1b43f5dfe96b81484da74bceab24a1d853912eee15083a6f0f3283c0"
        ));
        let id = verify(
            |id| (id == "YourAccessKeyId").then(|| "YourAccessKeySecret".to_owned()),
            "POST",
            "/",
            &query,
            &signed.headers,
            b"",
        )
        .unwrap();
        assert_eq!(id, "YourAccessKeyId");
        let wrong = verify(
            |_| Some("another secret".to_owned()),
            "POST",
            "/",
            &query,
            &signed.headers,
            b"",
        );
        assert_eq!(wrong, Err("SignatureDoesNotMatch"));
    }

    #[test]
    fn query_encoding_follows_rfc_3986() {
        let q = owned(&[
            ("b", "a b"),
            ("a", "x*y~z"),
            ("empty", ""),
            ("Envs", "[{\"name\":\"K\",\"value\":\"v/1+2=3\"}]"),
            ("ü", "é"),
        ]);
        assert_eq!(
            canonical_query(&q),
            "%C3%BC=%C3%A9&Envs=%5B%7B%22name%22%3A%22K%22%2C%22value%22%3A%22v%2F1%2B2%3D3%22%7D%5D\
             &a=x%2Ay~z&b=a%20b&empty="
        );
    }

    #[test]
    fn repeated_headers_are_joined_and_values_trimmed() {
        let headers = owned(&[
            ("Host", "sae.cn-hangzhou.aliyuncs.com"),
            ("X-Acs-Meta", " one "),
            ("x-acs-meta", "two"),
            ("Content-Type", "application/json"),
            ("User-Agent", "kiln"),
        ]);
        let parts = RequestParts {
            method: "GET",
            path: "/pop/v1/sam/app/listApplications",
            query: &[],
            headers: &headers,
            body_sha256: "h",
        };
        let (canonical, signed) = canonical_request(&parts);
        assert_eq!(
            canonical,
            "GET\n/pop/v1/sam/app/listApplications\n\n\
             content-type:application/json\nhost:sae.cn-hangzhou.aliyuncs.com\nx-acs-meta:one,two\n\n\
             content-type;host;x-acs-meta\nh"
        );
        assert_eq!(signed, "content-type;host;x-acs-meta");
    }

    #[test]
    fn sts_token_is_signed_and_debug_hides_secrets() {
        let creds = Credentials::new("id", "the-secret", Some("the-token".into()));
        let signed = sign(
            &creds,
            &SignInput {
                method: "GET",
                host: "h",
                path: "/",
                query: &[],
                action: "A",
                version: "2019-05-06",
                body: b"",
                content_type: None,
                date: "2024-01-01T00:00:00Z",
                nonce: "n",
            },
        );
        let auth = &signed.headers.last().unwrap().1;
        assert!(auth.contains("x-acs-security-token"), "{auth}");
        let debug = format!("{creds:?}");
        assert!(!debug.contains("the-secret") && !debug.contains("the-token"));
    }
}
