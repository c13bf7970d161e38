//! Shared pieces of kiln's HTTP clients: `Retry-After`, bounded body reads, and URLs that are
//! safe to print.

use std::time::{Duration, SystemTime};

use url::Url;

/// A URL for logs, errors and the status page: credentials in its userinfo
/// (`https://admin:secret@host/`) are replaced by `***`. Text that is not a URL is returned with
/// anything before an `@` in its authority masked the same way, so nothing secret slips through
/// a typo either.
pub fn redact_url(text: &str) -> String {
    match Url::parse(text) {
        Ok(mut url) if !url.username().is_empty() || url.password().is_some() => {
            // Both setters only fail for URLs that cannot have credentials at all.
            let _ = url.set_password(None);
            let _ = url.set_username("***");
            url.to_string()
        }
        Ok(url) if !url.cannot_be_a_base() => text.to_owned(),
        _ => {
            let (scheme, rest) = text.split_once("://").unwrap_or(("", text));
            let authority_end = rest.find('/').unwrap_or(rest.len());
            match rest[..authority_end].rfind('@') {
                Some(at) if scheme.is_empty() => format!("***{}", &rest[at..]),
                Some(at) => format!("{scheme}://***{}", &rest[at..]),
                None => text.to_owned(),
            }
        }
    }
}

/// Credentials that came in a URL's userinfo, taken out of it.
#[derive(Clone, PartialEq, Eq)]
pub struct UrlCredentials {
    /// The user name (percent-decoded).
    pub user: String,
    /// The password, if one was given (percent-decoded).
    pub password: Option<String>,
}

impl std::fmt::Debug for UrlCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UrlCredentials({}, [redacted])", self.user)
    }
}

/// Removes userinfo from `url`, returning it: clients keep a credential-free base URL (which
/// every error message is built from) and send the credentials as a header instead.
pub fn take_credentials(url: &mut Url) -> Option<UrlCredentials> {
    if url.username().is_empty() && url.password().is_none() {
        return None;
    }
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let credentials = UrlCredentials {
        user: decode(url.username()),
        password: url.password().map(decode),
    };
    let _ = url.set_password(None);
    let _ = url.set_username("");
    Some(credentials)
}

/// The wait a `Retry-After` header asks for: delay-seconds or an HTTP-date (RFC 9110 §10.2.3).
/// A date in the past means "now"; anything unreadable is `None`.
///
/// At most [`MAX_RETRY_AFTER`]: a server (or whatever answers in its name) asking for an hour
/// or a year must not stop kiln from asking again for good.
pub fn retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    let wait = if let Ok(seconds) = value.parse::<u64>() {
        Duration::from_secs(seconds)
    } else {
        let when = httpdate::parse_http_date(value).ok()?;
        when.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// The longest wait a `Retry-After` can impose.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// An error and its causes as one line (`cannot reach GitLab at …: connection refused`), for
/// places that show errors to people (the status page).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        let line = inner.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        cause = inner.source();
    }
    text
}

/// A response body that was cut off at a size limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Oversized {
    /// The first bytes of the body (at most the limit).
    pub prefix: Vec<u8>,
    /// The size the server declared (`Content-Length`), or at least how much kiln saw.
    pub size: u64,
}

/// Reads a response body of at most `limit` bytes. A bigger body is not read past the limit:
/// its first bytes come back in [`Oversized`] so the caller can say what it was.
///
/// # Errors
/// The connection broke while reading (`Err(Ok(reqwest::Error))`), or the body is too big
/// (`Err(Err(Oversized))`).
pub async fn read_limited(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, Result<reqwest::Error, Oversized>> {
    if let Some(length) = response.content_length()
        && length > limit as u64
    {
        let mut prefix = Vec::new();
        while prefix.len() < limit {
            match response.chunk().await {
                Ok(Some(chunk)) => prefix.extend_from_slice(&chunk),
                Ok(None) | Err(_) => break,
            }
        }
        prefix.truncate(limit);
        return Err(Err(Oversized {
            prefix,
            size: length,
        }));
    }
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > limit {
                    let seen = (body.len() + chunk.len()) as u64;
                    body.extend_from_slice(&chunk[..limit - body.len()]);
                    return Err(Err(Oversized {
                        prefix: body,
                        size: seen,
                    }));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) => return Err(Ok(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_is_redacted() {
        assert_eq!(
            redact_url("http://admin:P4ssw0rd@jenkins.example.com:8080/ci/"),
            "http://***@jenkins.example.com:8080/ci/"
        );
        assert_eq!(
            redact_url("https://token@gitlab.example.com"),
            "https://***@gitlab.example.com/"
        );
        assert_eq!(
            redact_url("https://gitlab.example.com/x"),
            "https://gitlab.example.com/x"
        );
        // Not a URL (a typo), still no password shown.
        assert_eq!(redact_url("http://a:b@ho st/"), "http://***@ho st/");
        assert!(!redact_url("a:secret@host").contains("secret"));
    }

    #[test]
    fn credentials_are_taken_out_of_the_url() {
        let mut url = Url::parse("http://ad%40min:p%2Fss@host/jenkins/").unwrap();
        let credentials = take_credentials(&mut url).unwrap();
        assert_eq!(credentials.user, "ad@min");
        assert_eq!(credentials.password.as_deref(), Some("p/ss"));
        assert_eq!(url.as_str(), "http://host/jenkins/");
        assert!(!format!("{credentials:?}").contains("p/ss"));
        assert_eq!(take_credentials(&mut url), None);
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        assert_eq!(retry_after(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(retry_after("18446744073709551615"), Some(MAX_RETRY_AFTER));
        let next_year = SystemTime::now() + Duration::from_secs(365 * 24 * 3600);
        assert_eq!(
            retry_after(&httpdate::fmt_http_date(next_year)),
            Some(MAX_RETRY_AFTER)
        );
        let soon = SystemTime::now() + Duration::from_secs(30);
        let wait = retry_after(&httpdate::fmt_http_date(soon)).unwrap();
        assert!(
            wait > Duration::from_secs(27) && wait <= Duration::from_secs(30),
            "{wait:?}"
        );
        assert_eq!(
            retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after("soon"), None);
    }
}
