//! How a source stands with its CI server — whether its credentials were accepted, how its
//! latest requests went — kept in one place for every source, and shown as a [`Health`].

use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use super::Health;

/// Whether the CI server accepts kiln's credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// Not known yet (signing in, verifying a token).
    Checking,
    /// Accepted: the source can take work.
    Accepted,
    /// Rejected: the source takes no work until they are accepted again.
    Rejected,
}

/// How a source's failing requests show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failing {
    /// As `backing off`; the source stays ready.
    BacksOff,
    /// Not at all until `after` requests in a row got no answer; then as `state`, not ready.
    UnreachableAfter {
        /// Requests in a row without an answer.
        after: u32,
        /// The state shown then.
        state: &'static str,
    },
}

/// The words a source's states are shown with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Words {
    /// While its credentials are checked (`verifying`, `signing in`).
    pub(crate) checking: &'static str,
    /// While they are rejected (`paused: token rejected`).
    pub(crate) rejected: &'static str,
    /// How failing requests show.
    pub(crate) failing: Failing,
}

/// What the tracker has seen so far.
#[derive(Debug)]
struct Seen {
    access: Access,
    /// Requests in a row that got no answer.
    unanswered: u32,
    /// The last failed request, in plain words; cleared by the next success.
    last_error: Option<String>,
    /// When a request last succeeded.
    last_success: Option<SystemTime>,
}

/// The health of one source (or one GitLab runner), updated by its loops and read by the
/// status page and `/readyz`.
#[derive(Debug)]
pub(crate) struct HealthTracker {
    /// The CI server's URL, without credentials.
    url: String,
    words: Words,
    seen: Mutex<Seen>,
}

impl HealthTracker {
    /// A tracker for the CI server at `url`, starting at `access`.
    pub(crate) fn new(url: &str, words: Words, access: Access) -> Self {
        Self {
            url: crate::net::redact_url(url),
            words,
            seen: Mutex::new(Seen {
                access,
                unanswered: 0,
                last_error: None,
                last_success: None,
            }),
        }
    }

    fn seen(&self) -> MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A request succeeded.
    pub(crate) fn succeeded(&self) {
        self.answered(None);
    }

    /// The CI server answered a request: with `refusal` in plain words when it refused it (a
    /// rate limit), `None` when the request succeeded.
    pub(crate) fn answered(&self, refusal: Option<String>) {
        let mut seen = self.seen();
        seen.unanswered = 0;
        if refusal.is_none() {
            seen.last_success = Some(SystemTime::now());
        }
        seen.last_error = refusal;
    }

    /// A request got no answer (or one kiln cannot use), for `error`.
    pub(crate) fn failed(&self, error: String) {
        let mut seen = self.seen();
        seen.unanswered = seen.unanswered.saturating_add(1);
        seen.last_error = Some(error);
    }

    /// The credentials were accepted. Returns the access before.
    pub(crate) fn accept(&self) -> Access {
        std::mem::replace(&mut self.seen().access, Access::Accepted)
    }

    /// An answer shows the credentials work: accepted, unless they were rejected meanwhile
    /// (another request's answer said so; a check of the credentials settles it).
    pub(crate) fn accept_unless_rejected(&self) {
        let mut seen = self.seen();
        if seen.access != Access::Rejected {
            seen.access = Access::Accepted;
        }
    }

    /// The credentials were rejected. Returns the access before.
    pub(crate) fn reject(&self) -> Access {
        std::mem::replace(&mut self.seen().access, Access::Rejected)
    }

    /// Whether the credentials are accepted now.
    pub(crate) fn access(&self) -> Access {
        self.seen().access
    }

    /// The source's state now.
    pub(crate) fn health(&self) -> Health {
        let seen = self.seen();
        let unreachable = match self.words.failing {
            Failing::UnreachableAfter { after, state } if seen.unanswered >= after => Some(state),
            _ => None,
        };
        let (ready, state) = match (seen.access, unreachable) {
            (Access::Rejected, _) => (false, self.words.rejected),
            (_, Some(state)) => (false, state),
            (Access::Checking, None) => (false, self.words.checking),
            (Access::Accepted, None)
                if seen.last_error.is_some() && self.words.failing == Failing::BacksOff =>
            {
                (true, "backing off")
            }
            (Access::Accepted, None) => (true, "ready"),
        };
        Health {
            ready,
            state: state.to_owned(),
            url: self.url.clone(),
            last_error: seen.last_error.clone(),
            last_success: seen.last_success,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GITLAB: Words = Words {
        checking: "verifying",
        rejected: "paused: token rejected",
        failing: Failing::UnreachableAfter {
            after: 3,
            state: "GitLab unreachable",
        },
    };
    const BACKS_OFF: Words = Words {
        checking: "signing in",
        rejected: "rejected",
        failing: Failing::BacksOff,
    };

    fn state(tracker: &HealthTracker) -> (bool, String) {
        let health = tracker.health();
        (health.ready, health.state)
    }

    #[test]
    fn a_backing_off_source_stays_ready_and_says_so_until_a_success() {
        let tracker =
            HealthTracker::new("https://user:pw@ci.example/", BACKS_OFF, Access::Checking);
        assert_eq!(state(&tracker), (false, "signing in".into()));
        tracker.failed("no route".into());
        assert_eq!(state(&tracker), (false, "signing in".into()));
        assert_eq!(tracker.accept(), Access::Checking);
        assert_eq!(state(&tracker), (true, "backing off".into()));
        tracker.succeeded();
        let health = tracker.health();
        assert_eq!((health.ready, health.state.as_str()), (true, "ready"));
        assert!(health.last_error.is_none() && health.last_success.is_some());
        assert!(!health.url.contains("pw"), "{}", health.url);
    }

    #[test]
    fn unanswered_requests_in_a_row_make_a_source_unreachable_and_an_answer_ends_it() {
        let tracker = HealthTracker::new("https://gitlab.example", GITLAB, Access::Checking);
        tracker.accept_unless_rejected();
        for _ in 0..2 {
            tracker.failed("timed out".into());
        }
        assert_eq!(state(&tracker), (true, "ready".into()));
        tracker.failed("timed out".into());
        assert_eq!(state(&tracker), (false, "GitLab unreachable".into()));
        tracker.answered(Some("rate-limited (429)".into()));
        assert_eq!(state(&tracker), (true, "ready".into()));
        assert_eq!(
            tracker.health().last_error.as_deref(),
            Some("rate-limited (429)")
        );
    }

    #[test]
    fn a_rejection_holds_until_the_credentials_are_accepted_again() {
        let tracker = HealthTracker::new("https://gitlab.example", GITLAB, Access::Accepted);
        assert_eq!(tracker.reject(), Access::Accepted);
        tracker.accept_unless_rejected();
        assert_eq!(state(&tracker), (false, "paused: token rejected".into()));
        assert_eq!(tracker.accept(), Access::Rejected);
        assert_eq!(state(&tracker), (true, "ready".into()));
    }
}
