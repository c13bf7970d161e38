//! The `workflow_job` webhook: its signature (`X-Hub-Signature-256`, HMAC-SHA256 of the raw
//! body, compared in constant time), its payload, and the delivery ids already seen (GitHub
//! redelivers; a redelivery must not start a second runner).

use std::collections::{HashSet, VecDeque};

use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

/// Delivery ids remembered to drop redeliveries.
const REMEMBERED_DELIVERIES: usize = 4096;

/// Whether `signature` (`sha256=<hex>`) is the HMAC of `body` under `secret`.
pub(crate) fn verify(secret: &str, body: &[u8], signature: &str) -> bool {
    let Some(hex_digest) = signature.trim().strip_prefix("sha256=") else {
        return false;
    };
    let Ok(expected) = hex::decode(hex_digest) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return false;
    };
    mac.update(body);
    // `verify_slice` compares in constant time.
    mac.verify_slice(&expected).is_ok()
}

/// The parts of a `workflow_job` event kiln uses.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct WorkflowJobEvent {
    /// What happened to the job.
    pub(crate) action: JobAction,
    /// The job.
    pub(crate) workflow_job: WorkflowJob,
    /// Its repository.
    pub(crate) repository: Repository,
    /// Its organization, for organization repositories.
    #[serde(default)]
    pub(crate) organization: Option<Organization>,
    /// Its enterprise, when the organization belongs to one.
    #[serde(default)]
    pub(crate) enterprise: Option<Enterprise>,
}

/// `enterprise`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Enterprise {
    pub(crate) slug: String,
}

/// What a `workflow_job` event says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum JobAction {
    /// It waits for a runner.
    Queued,
    /// It waits for a deployment protection rule.
    Waiting,
    /// A runner took it.
    InProgress,
    /// It ended.
    Completed,
    /// An action kiln does not act on.
    #[serde(other)]
    Other,
}

/// `workflow_job`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct WorkflowJob {
    /// The job id.
    pub(crate) id: u64,
    /// Its run, and the run's attempt (1 unless re-run).
    pub(crate) run_id: u64,
    #[serde(default = "first_attempt")]
    pub(crate) run_attempt: u32,
    /// Its `runs-on` labels, its runner once one took it, its name and page.
    #[serde(default)]
    pub(crate) labels: Vec<String>,
    pub(crate) runner_name: Option<String>,
    #[serde(default)]
    pub(crate) name: String,
    pub(crate) html_url: Option<String>,
}

fn first_attempt() -> u32 {
    1
}

/// `repository`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Repository {
    /// `owner/repo`.
    pub(crate) full_name: String,
}

/// `organization`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Organization {
    pub(crate) login: String,
}

/// The delivery ids seen lately.
#[derive(Debug, Default)]
pub(crate) struct Deliveries {
    order: VecDeque<String>,
    seen: HashSet<String>,
}

impl Deliveries {
    /// True the first time `id` is seen (then it is remembered); false for a redelivery.
    pub(crate) fn first(&mut self, id: &str) -> bool {
        if id.is_empty() {
            return true;
        }
        if !self.seen.insert(id.to_owned()) {
            return false;
        }
        self.order.push_back(id.to_owned());
        if self.order.len() > REMEMBERED_DELIVERIES
            && let Some(oldest) = self.order.pop_front()
        {
            self.seen.remove(&oldest);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_docs_test_vector_verifies_and_anything_else_does_not() {
        // From GitHub's "Validating webhook deliveries".
        let secret = "It's a Secret to Everybody";
        let signature = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert!(verify(secret, b"Hello, World!", signature));
        assert!(!verify(secret, b"Hello, World?", signature));
        assert!(!verify("another secret", b"Hello, World!", signature));
        assert!(!verify(secret, b"Hello, World!", "sha1=757107ea"));
        assert!(!verify(secret, b"Hello, World!", "sha256=zz"));
        assert!(!verify(secret, b"Hello, World!", ""));
    }

    proptest::proptest! {
        /// Any body with any signature header: a verdict, never a panic; a body signed with
        /// the secret verifies and parses or is refused with a reason.
        #[test]
        fn any_body_and_signature_get_a_verdict(
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..512),
            signature in "(sha256=)?[0-9a-fA-Fz\u{e9}]{0,70}",
        ) {
            let _ = verify("secret", &body, &signature);
            let mut mac = Hmac::<Sha256>::new_from_slice(b"secret").unwrap();
            mac.update(&body);
            let signed = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
            proptest::prop_assert!(verify("secret", &body, &signed));
            let _ = serde_json::from_slice::<WorkflowJobEvent>(&body);
        }
    }

    #[test]
    fn redeliveries_are_recognized_and_memory_stays_bounded() {
        let mut deliveries = Deliveries::default();
        assert!(deliveries.first("a"));
        assert!(!deliveries.first("a"));
        for i in 0..REMEMBERED_DELIVERIES + 10 {
            deliveries.first(&i.to_string());
        }
        assert!(deliveries.seen.len() <= REMEMBERED_DELIVERIES);
        assert!(deliveries.first("a"), "long forgotten");
    }

    #[test]
    fn a_workflow_job_payload_parses() {
        let event: WorkflowJobEvent = serde_json::from_value(serde_json::json!({
            "action": "queued",
            "workflow_job": {"id": 7, "run_id": 3, "run_attempt": 1, "labels": ["self-hosted", "linux"],
                             "status": "queued", "runner_name": null, "name": "build"},
            "repository": {"full_name": "acme/widgets"},
            "organization": {"login": "acme"},
            "sender": {"login": "someone"}
        }))
        .unwrap();
        assert_eq!(event.workflow_job.id, 7);
        assert_eq!(event.workflow_job.labels, ["self-hosted", "linux"]);
        assert_eq!(event.organization.unwrap().login, "acme");
    }
}
