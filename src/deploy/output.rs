//! What `kiln deploy` prints: one plain line per state change, a quiet upload progress, and the
//! `--dry-run` listing of requests with every secret redacted.

use std::fmt::Display;
use std::io::{IsTerminal, Write};

use url::Url;

/// Shown in place of anything secret.
pub(crate) const REDACTED: &str = "<redacted>";

/// Query parameters whose values are secrets (signatures and STS tokens of presigned URLs).
const SECRET_QUERY: &[&str] = &[
    "x-oss-signature",
    "x-oss-security-token",
    "signature",
    "security-token",
    "x-acs-security-token",
];

/// Prints one progress line to stdout and flushes it so a CI log shows it at once.
pub(crate) fn say(message: impl Display) {
    let mut out = std::io::stdout().lock();
    // A closed stdout must not fail the deploy; the exit code still tells the outcome.
    let _ = writeln!(out, "{message}");
    let _ = out.flush();
}

/// A request as it would go on the wire, for `--dry-run`.
#[derive(Debug, Clone)]
pub(crate) struct PreparedRequest {
    pub(crate) method: String,
    pub(crate) url: Url,
    pub(crate) headers: Vec<(String, String)>,
    /// The body as text, or a note such as `<12345 bytes of app.jar>`.
    pub(crate) body: String,
}

/// Prints a request for `--dry-run`: method and URL, one header per line, then the body, each
/// with secrets redacted.
pub(crate) fn print_request(request: &PreparedRequest) {
    let mut text = format!("> {} {}\n", request.method, redact_url(&request.url));
    for (name, value) in &request.headers {
        text.push_str(&format!("> {name}: {}\n", redact_header(name, value)));
    }
    if request.body.is_empty() {
        text.push_str(">\n");
    } else {
        text.push_str(&format!(">\n{}\n", request.body));
    }
    say(text.trim_end());
}

/// Redacts a header value: the signature part of `Authorization` and every security token.
pub(crate) fn redact_header(name: &str, value: &str) -> String {
    let lower = name.to_ascii_lowercase();
    if lower == "authorization" {
        match value.find("Signature=") {
            Some(at) => format!("{}Signature={REDACTED}", &value[..at]),
            None => REDACTED.to_owned(),
        }
    } else if lower.contains("security-token") {
        REDACTED.to_owned()
    } else {
        value.to_owned()
    }
}

/// Redacts secrets in a URL's query, including URLs nested in query values (a presigned
/// `PackageUrl`) and the values of `Envs`, which may hold passwords.
pub(crate) fn redact_url(url: &Url) -> String {
    if url.query().is_none() {
        return url.to_string();
    }
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| {
            let value = if SECRET_QUERY.contains(&k.to_ascii_lowercase().as_str()) {
                REDACTED.to_owned()
            } else if k == "Envs" {
                redact_envs(&v)
            } else if let Some(nested) = Url::parse(&v)
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https"))
            {
                redact_url(&nested)
            } else {
                v.into_owned()
            };
            (k.into_owned(), value)
        })
        .collect();
    let mut base = url.clone();
    base.set_query(None);
    let query = pairs
        .iter()
        .map(|(k, v)| {
            if v.is_empty() {
                k.clone()
            } else {
                format!("{k}={v}")
            }
        })
        .collect::<Vec<_>>()
        .join("&");
    format!("{base}?{query}")
}

fn redact_envs(value: &str) -> String {
    match serde_json::from_str::<Vec<serde_json::Value>>(value) {
        Ok(mut envs) => {
            for env in &mut envs {
                if let Some(v) = env.get_mut("value") {
                    *v = serde_json::Value::String(REDACTED.to_owned());
                }
            }
            serde_json::Value::Array(envs).to_string()
        }
        Err(_) => REDACTED.to_owned(),
    }
}

/// Upload progress: a live percentage on a terminal, and at most one line per quarter in a
/// CI log.
#[derive(Debug)]
pub(crate) struct UploadProgress {
    label: String,
    total: u64,
    sent: u64,
    tty: bool,
    last_quarter: u64,
    last_percent: u64,
}

impl UploadProgress {
    pub(crate) fn new(label: impl Into<String>, total: u64) -> Self {
        Self {
            label: label.into(),
            total,
            sent: 0,
            tty: std::io::stderr().is_terminal(),
            last_quarter: 0,
            last_percent: u64::MAX,
        }
    }

    pub(crate) fn advance(&mut self, bytes: u64) {
        self.sent = (self.sent + bytes).min(self.total);
        let percent = (self.sent * 100).checked_div(self.total).unwrap_or(100);
        if self.tty {
            if percent != self.last_percent {
                self.last_percent = percent;
                let mut err = std::io::stderr().lock();
                let _ = write!(
                    err,
                    "\r{}: {percent:>3}% ({} / {})",
                    self.label,
                    human_bytes(self.sent),
                    human_bytes(self.total)
                );
                if self.sent == self.total {
                    let _ = writeln!(err);
                }
                let _ = err.flush();
            }
        } else {
            let quarter = percent / 25;
            if quarter > self.last_quarter {
                self.last_quarter = quarter;
                say(format_args!(
                    "{}: {}% ({} / {})",
                    self.label,
                    quarter * 25,
                    human_bytes(self.sent),
                    human_bytes(self.total)
                ));
            }
        }
    }
}

/// `1.5 MiB`-style sizes.
pub(crate) fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_signatures_tokens_nested_urls_and_env_values() {
        let nested = "http://oss/b/k?x-oss-credential=AK%2F1&x-oss-signature=SIGVALUE&x-oss-security-token=TOKVALUE";
        let mut url = Url::parse("http://sae/pop/v1/sam/app/deployApplication").unwrap();
        url.query_pairs_mut()
            .append_pair("PackageUrl", nested)
            .append_pair("Envs", r#"[{"name":"DB_PASSWORD","value":"hunter2"}]"#);
        let shown = redact_url(&url);
        assert!(
            !shown.contains("SIGVALUE")
                && !shown.contains("TOKVALUE")
                && !shown.contains("hunter2"),
            "{shown}"
        );
        assert!(shown.contains("DB_PASSWORD") && shown.contains("x-oss-credential=AK/1"));
        assert_eq!(
            redact_header(
                "Authorization",
                "ACS3-HMAC-SHA256 Credential=id,SignedHeaders=host,Signature=ff"
            ),
            "ACS3-HMAC-SHA256 Credential=id,SignedHeaders=host,Signature=<redacted>"
        );
        assert_eq!(redact_header("x-acs-security-token", "t"), REDACTED);
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(human_bytes(10), "10 B");
        assert_eq!(human_bytes(3 * 1024 * 1024 / 2), "1.5 MiB");
    }
}
