//! GET requests that cost GitHub's rate limit only when something changed: each answer's
//! `ETag` is kept with its body and sent back as `If-None-Match`; a `304 Not Modified` (which
//! GitHub does not count against an authorized caller's primary rate limit) reuses the kept
//! body. Every answer's `x-ratelimit-*` headers are read, and a `retry-after` or an exhausted
//! limit holds further listings back until GitHub says they may resume.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use octocrab::Octocrab;
use serde::de::DeserializeOwned;

use super::api::GitHubError;

/// The most answers kept for revalidation (an organization of a few thousand repositories).
const MAX_CACHED: usize = 20_000;

/// What GitHub's last answer said about the rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RateView {
    pub(crate) limit: u64,
    pub(crate) remaining: u64,
    /// When the window resets.
    pub(crate) reset: SystemTime,
}

impl RateView {
    /// How much of the limit is used, 0 to 1.
    pub(crate) fn saturation(&self) -> f64 {
        if self.limit == 0 {
            return 0.0;
        }
        1.0 - self.remaining as f64 / self.limit as f64
    }

    fn from_headers(headers: &HeaderMap) -> Option<Self> {
        let number = |name: &str| headers.get(name)?.to_str().ok()?.trim().parse::<u64>().ok();
        Some(Self {
            limit: number("x-ratelimit-limit")?,
            remaining: number("x-ratelimit-remaining")?,
            reset: UNIX_EPOCH + Duration::from_secs(number("x-ratelimit-reset")?),
        })
    }
}

/// Requests of one listing pass, by how GitHub answered.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tally {
    /// Answered with a body (counted against the rate limit).
    pub(crate) fresh: u64,
    /// Answered 304 (free).
    pub(crate) not_modified: u64,
}

#[derive(Default)]
struct Inner {
    /// Route → (ETag, body).
    cache: HashMap<String, (HeaderValue, String)>,
    rate: Option<RateView>,
    /// No listing before this (a `retry-after`, or an exhausted limit's reset).
    hold_until: Option<SystemTime>,
    tally: Tally,
}

/// The ETag cache and rate-limit view of one GitHub client.
#[derive(Default)]
pub(crate) struct Conditional {
    inner: Mutex<Inner>,
}

impl Conditional {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The rate limit as GitHub last told.
    pub(crate) fn rate(&self) -> Option<RateView> {
        self.lock().rate
    }

    /// The requests since the last call, and starts counting afresh.
    pub(crate) fn take_tally(&self) -> Tally {
        std::mem::take(&mut self.lock().tally)
    }

    /// Refuses a listing while GitHub asked to wait, or while fewer than `reserve` requests
    /// are left in the window (kept for registering runners and removing them).
    ///
    /// # Errors
    /// [`GitHubError::RateLimited`] until when listings may resume.
    pub(crate) fn check(&self, reserve: u64) -> Result<(), GitHubError> {
        let inner = self.lock();
        let now = SystemTime::now();
        if let Some(until) = inner.hold_until
            && until > now
        {
            return Err(GitHubError::RateLimited {
                until: httpdate::fmt_http_date(until),
                why: "GitHub asked to wait (retry-after or an exhausted rate limit)".into(),
            });
        }
        if let Some(rate) = inner.rate
            && rate.remaining < reserve.min(rate.limit / 2)
            && rate.reset > now
        {
            return Err(GitHubError::RateLimited {
                until: httpdate::fmt_http_date(rate.reset),
                why: format!(
                    "{} of the installation's {} requests this hour are left, kept for registering and removing runners",
                    rate.remaining, rate.limit
                ),
            });
        }
        Ok(())
    }

    /// GETs `route` (a path with its query), conditionally when an earlier answer is kept,
    /// and parses the body as `T`.
    ///
    /// # Errors
    /// GitHub answered an error, or something that is not `T`.
    pub(crate) async fn get<T: DeserializeOwned>(
        &self,
        client: &Octocrab,
        route: &str,
        what: &str,
    ) -> Result<T, GitHubError> {
        let mut headers = HeaderMap::new();
        let kept = self.lock().cache.get(route).cloned();
        if let Some((etag, _)) = &kept {
            headers.insert(header::IF_NONE_MATCH, etag.clone());
        }
        let response = client
            ._get_with_headers(route, Some(headers))
            .await
            .map_err(|e| GitHubError::from(what, e))?;
        self.note(response.headers(), response.status());
        let body = if response.status() == StatusCode::NOT_MODIFIED
            && let Some((_, body)) = kept
        {
            self.lock().tally.not_modified += 1;
            body
        } else {
            let etag = response.headers().get(header::ETAG).cloned();
            let response = octocrab::map_github_error(response)
                .await
                .map_err(|e| GitHubError::from(what, e))?;
            let body = client
                .body_to_string(response)
                .await
                .map_err(|e| GitHubError::from(what, e))?;
            let mut inner = self.lock();
            inner.tally.fresh += 1;
            if let Some(etag) = etag {
                if inner.cache.len() >= MAX_CACHED {
                    inner.cache.clear();
                }
                inner.cache.insert(route.to_owned(), (etag, body.clone()));
            }
            body
        };
        serde_json::from_str(&body).map_err(|e| GitHubError::Other {
            what: what.to_owned(),
            message: format!("unexpected answer: {e}"),
        })
    }

    /// Reads the rate-limit headers of an answer: a `retry-after`, or a refusal with none left,
    /// holds listings back.
    fn note(&self, headers: &HeaderMap, status: StatusCode) {
        let mut inner = self.lock();
        let rate = RateView::from_headers(headers);
        if rate.is_some() {
            inner.rate = rate;
        }
        let refused = status == StatusCode::FORBIDDEN || status == StatusCode::TOO_MANY_REQUESTS;
        if !refused {
            return;
        }
        let retry_after = headers
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|secs| SystemTime::now() + Duration::from_secs(secs));
        let exhausted = rate.filter(|r| r.remaining == 0).map(|r| r.reset);
        if let Some(until) = retry_after.or(exhausted) {
            inner.hold_until = Some(until);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn a_nearly_used_limit_holds_listings_until_its_reset() {
        let conditional = Conditional::default();
        let reset = SystemTime::now() + Duration::from_secs(600);
        let reset_secs = reset
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            .to_string();
        let answer = headers(&[
            ("x-ratelimit-limit", "5000"),
            ("x-ratelimit-remaining", "40"),
            ("x-ratelimit-reset", &reset_secs),
        ]);
        conditional.note(&answer, StatusCode::OK);
        assert!((conditional.rate().unwrap().saturation() - 0.992).abs() < 1e-9);
        let refused = conditional.check(100).unwrap_err().to_string();
        assert!(
            refused.contains("40 of the installation's 5000"),
            "{refused}"
        );
        assert!(conditional.check(10).is_ok(), "above a smaller reserve");
    }

    #[test]
    fn retry_after_holds_listings_back() {
        let conditional = Conditional::default();
        conditional.note(&headers(&[("retry-after", "60")]), StatusCode::FORBIDDEN);
        assert!(matches!(
            conditional.check(0),
            Err(GitHubError::RateLimited { .. })
        ));
        // A retry-after on a success is no refusal.
        let other = Conditional::default();
        other.note(&headers(&[("retry-after", "60")]), StatusCode::OK);
        assert!(other.check(0).is_ok());
    }
}
