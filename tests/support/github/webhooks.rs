//! `workflow_job` webhooks: built on every job change, signed with `X-Hub-Signature-256`, delivered in order, and dropped, duplicated or mis-signed when a test asks.

use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use rand::Rng;
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::sync::mpsc;

use super::{GitHubServer, ServerState, Shared, account_json, repo_json};

/// GitHub gives a receiver 10 seconds to answer.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// `sha256=<hex HMAC-SHA256(secret, body)>`, the `X-Hub-Signature-256` header value.
pub fn sign_webhook(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// What goes wrong with one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryFault {
    /// Never sent (GitHub does not guarantee delivery).
    Drop,
    /// Sent twice with the same `X-GitHub-Delivery`.
    Duplicate,
    /// Signed with another secret.
    BadSignature,
}

/// One delivery (with its duplicate, if any).
#[derive(Debug, Clone)]
pub struct DeliveryRecord {
    /// The `X-GitHub-Delivery` GUID.
    pub delivery_id: String,
    /// `queued`, `in_progress`, `completed`.
    pub action: String,
    pub job_id: u64,
    pub fault: Option<DeliveryFault>,
    /// Sent again by [`GitHubServer::redeliver`] (same delivery id).
    pub redelivery: bool,
    /// The exact bytes sent.
    pub body: String,
    /// The `X-Hub-Signature-256` sent.
    pub signature: String,
    /// One entry per POST: the status, or why there was none.
    pub responses: Vec<Result<u16, String>>,
    /// When the event happened (the delivery is sent right after, unless faulted).
    pub queued_at: std::time::Instant,
    /// `X-GitHub-Hook-Installation-Target-Type` and `-ID`.
    target: (&'static str, u64),
}

#[derive(Default)]
pub(super) struct WebhookState {
    target: Option<(String, String)>,
    installation: Option<u64>,
    /// (only for this job and action, fault); `None` applies to the next delivery.
    faults: Vec<(Option<(u64, String)>, DeliveryFault)>,
    records: Vec<DeliveryRecord>,
    pending: usize,
    outbox: Option<mpsc::UnboundedSender<Outgoing>>,
}

impl WebhookState {
    pub(super) fn new(outbox: mpsc::UnboundedSender<Outgoing>) -> Self {
        Self {
            outbox: Some(outbox),
            ..Self::default()
        }
    }
}

pub(super) struct Outgoing {
    index: usize,
    url: String,
}

impl ServerState {
    /// Queues the `workflow_job` delivery for `action` of `job_id`, if a webhook is set.
    pub(super) fn emit(&mut self, job_id: u64, action: &str) {
        let Some((url, secret)) = self.webhooks.target.clone() else {
            return;
        };
        let job = &self.jobs[&job_id];
        let repo = &self.repos[&job.repo];
        let owner = self.find_account(&repo.owner).expect("repo owner exists");
        let mut payload = json!({
            "action": action,
            "workflow_job": self.job_json(job),
            "repository": repo_json(self, repo),
            "sender": account_json(&self.base, owner),
        });
        if owner.org {
            payload["organization"] = json!({
                "login": owner.login,
                "id": owner.id,
                "node_id": format!("O_kgDO{:08}", owner.id),
                "url": format!("{}/orgs/{}", self.base, owner.login),
                "description": null,
            });
        }
        if let Some(enterprise) = self.enterprise_of(&owner.login) {
            // GitHub adds the enterprise to the payloads of its organizations' events.
            payload["enterprise"] = json!({
                "id": enterprise.id,
                "slug": enterprise.slug,
                "name": enterprise.slug,
                "node_id": format!("E_kgDO{:08}", enterprise.id),
                "html_url": format!("https://github.com/enterprises/{}", enterprise.slug),
            });
        }
        if let Some(id) = self.webhooks.installation {
            payload["installation"] =
                json!({"id": id, "node_id": format!("MDIzOkludGVncmF0aW9uSW5zdGFsbGF0aW9u{id}")});
        }
        let target = match self.webhooks.installation {
            Some(_) => ("integration", 1),
            None if owner.org => ("organization", owner.id),
            None => ("repository", repo.id),
        };
        let w = &mut self.webhooks;
        let fault = w
            .faults
            .iter()
            .position(|(only, _)| {
                only.as_ref()
                    .is_some_and(|(j, a)| *j == job_id && a == action)
            })
            .or_else(|| w.faults.iter().position(|(only, _)| only.is_none()))
            .map(|i| w.faults.remove(i).1);
        let body = payload.to_string();
        let signature = match fault {
            Some(DeliveryFault::BadSignature) => sign_webhook("not the secret", body.as_bytes()),
            _ => sign_webhook(&secret, body.as_bytes()),
        };
        w.records.push(DeliveryRecord {
            delivery_id: uuid_v4(),
            action: action.to_owned(),
            job_id,
            fault,
            redelivery: false,
            body,
            signature,
            responses: Vec::new(),
            queued_at: std::time::Instant::now(),
            target,
        });
        let index = w.records.len() - 1;
        w.pending += 1;
        if let Some(outbox) = &w.outbox {
            let _ = outbox.send(Outgoing { index, url });
        }
    }
}

/// A random version-4 UUID, as GitHub's delivery GUIDs are.
fn uuid_v4() -> String {
    let mut b: [u8; 16] = rand::rng().random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Delivers queued webhooks one at a time, in order, until the server is gone.
pub(super) async fn deliver(shared: Arc<Shared>, mut outgoing: mpsc::UnboundedReceiver<Outgoing>) {
    let client = reqwest::Client::builder()
        .timeout(DELIVERY_TIMEOUT)
        .build()
        .unwrap();
    let weak = Arc::downgrade(&shared);
    drop(shared);
    while let Some(out) = outgoing.recv().await {
        let Some(shared) = weak.upgrade() else {
            return;
        };
        let record = shared.lock().webhooks.records[out.index].clone();
        let sends = match record.fault {
            Some(DeliveryFault::Drop) => 0,
            Some(DeliveryFault::Duplicate) => 2,
            _ => 1,
        };
        let mut responses = Vec::new();
        for _ in 0..sends {
            let sent = client
                .post(&out.url)
                .header("content-type", "application/json")
                .header("user-agent", "GitHub-Hookshot/4f9c3e1")
                .header("x-github-event", "workflow_job")
                .header("x-github-delivery", &record.delivery_id)
                .header("x-github-hook-id", "1")
                .header("x-github-hook-installation-target-type", record.target.0)
                .header(
                    "x-github-hook-installation-target-id",
                    record.target.1.to_string(),
                )
                .header("x-hub-signature-256", &record.signature)
                .body(record.body.clone())
                .send()
                .await;
            responses.push(match sent {
                Ok(response) => Ok(response.status().as_u16()),
                Err(e) => Err(format!("{e:#}")),
            });
        }
        let mut st = shared.lock();
        st.webhooks.records[out.index].responses = responses;
        st.webhooks.pending -= 1;
        drop(st);
        shared.bump();
    }
}

impl GitHubServer {
    /// Sends `workflow_job` webhooks to `url` signed with `secret` from now on (none before).
    pub fn set_webhook(&self, url: &str, secret: &str) {
        self.lock().webhooks.target = Some((url.to_owned(), secret.to_owned()));
    }

    /// Deliveries carry `installation{id}`, as an App's webhook does (`None`: a repository or
    /// organization webhook, without it).
    pub fn set_webhook_installation(&self, installation: Option<u64>) {
        self.lock().webhooks.installation = installation;
    }

    /// The next delivery goes wrong this way.
    pub fn fault_next_delivery(&self, fault: DeliveryFault) {
        self.lock().webhooks.faults.push((None, fault));
    }

    /// The delivery of `action` (`queued`, `in_progress`, `completed`) for `job_id` goes wrong
    /// this way (takes precedence over [`GitHubServer::fault_next_delivery`]).
    pub fn fault_delivery(&self, job_id: u64, action: &str, fault: DeliveryFault) {
        self.lock()
            .webhooks
            .faults
            .push((Some((job_id, action.to_owned())), fault));
    }

    /// Sends delivery `delivery_id` again, correctly signed, with the same delivery id (as
    /// "Redeliver" in GitHub's UI or `POST …/hooks/{id}/deliveries/{id}/attempts`).
    ///
    /// # Panics
    /// When no such delivery was made.
    pub fn redeliver(&self, delivery_id: &str) {
        let mut st = self.lock();
        let Some((url, secret)) = st.webhooks.target.clone() else {
            panic!("redeliver: no webhook set");
        };
        let w = &mut st.webhooks;
        let original = w
            .records
            .iter()
            .find(|r| r.delivery_id == delivery_id)
            .unwrap_or_else(|| panic!("redeliver: no delivery {delivery_id}"))
            .clone();
        w.records.push(DeliveryRecord {
            fault: None,
            redelivery: true,
            signature: sign_webhook(&secret, original.body.as_bytes()),
            responses: Vec::new(),
            ..original
        });
        let index = w.records.len() - 1;
        w.pending += 1;
        if let Some(outbox) = &w.outbox {
            let _ = outbox.send(Outgoing { index, url });
        }
    }

    /// Waits until every queued delivery was sent (or dropped).
    ///
    /// # Panics
    /// After 30 seconds.
    pub async fn settle_webhooks(&self) {
        let mut changed = self.shared.changed.subscribe();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.lock().webhooks.pending > 0 {
            tokio::select! {
                _ = changed.changed() => {}
                () = tokio::time::sleep_until(deadline) => panic!("webhook deliveries did not settle in 30 s"),
            }
        }
    }

    /// Every delivery made (or dropped), in order.
    pub fn deliveries(&self) -> Vec<DeliveryRecord> {
        self.lock().webhooks.records.clone()
    }

    /// The deliveries' payloads, parsed.
    pub fn delivery_payloads(&self) -> Vec<Value> {
        self.deliveries()
            .iter()
            .map(|d| serde_json::from_str(&d.body).unwrap())
            .collect()
    }
}
