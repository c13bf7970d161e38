//! Following one build's pod to its end: every change the watch shows is classified; a pod the
//! watch has not shown yet is read directly; a build that has not started is asked about
//! now and then (its CI server may have canceled it); a pod relabelled to another replica was
//! handed over.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::Api;

use super::classify::{self, Limits, Memory, PodEnd, Verdict};
use super::podspec::BUILD_CONTAINER;
use super::watch::{PodSeen, Subscription};
use super::{KubernetesExecutor, labels};
use crate::build::Ending;
use crate::executor::Watch;

/// How long a created pod may stay unseen by the watch before kiln reads it directly.
const UNSEEN_RECHECK: Duration = Duration::from_secs(10);
/// How often kiln asks the CI server about a build whose pod has not started yet (at most).
const WANTED_CHECK: Duration = Duration::from_secs(30);
/// How soon a pod made again with the next pull policy is read when the watch has not shown it.
const REPLACED_RECHECK: Duration = Duration::from_secs(1);
/// How often a build with no pending timeout is looked at even without changes.
const IDLE_RECHECK: Duration = Duration::from_secs(300);

impl KubernetesExecutor {
    fn limits<'a>(&self, main: &'a str) -> Limits<'a> {
        Limits {
            main,
            pending_timeout: self.config.pending_timeout,
            image_pull_grace: self.config.image_pull_grace,
        }
    }

    pub(super) async fn watch_build(&self, name: &str, watch: Watch) -> Ending {
        // A build on a warm pod whose job was not handed over yet (the coordinator that took
        // the pod died first): hand it over now, or its agent waits for ever.
        if super::warm::is_warm(name)
            && let Err(e) = self.hand_off(name).await
            && self.pods.latest(name).is_some()
        {
            return Ending::failed(
                crate::build::FailureReason::RunnerSystemFailure,
                e.to_string(),
            );
        }
        let mut subscription = self.pods.subscribe(name);
        let mut end = match self.follow(name, &mut subscription, &watch).await {
            Followed::Ended(end) => end,
            Followed::Canceled => {
                tracing::info!(
                    pod = name,
                    "coordinator stopping; the build pod keeps running and will be adopted"
                );
                return Ending::lost("the coordinator stopped following the build");
            }
            Followed::Claimed(replica) => {
                self.forget_namespace(name);
                tracing::info!(
                    pod = name,
                    %replica,
                    "another replica took the build over; no longer following it"
                );
                return Ending::lost(format!("replica {replica} follows the build now"));
            }
        };
        if end.stuck_pending {
            end.detail = format!("{}{}", end.detail, self.warning_events(name).await);
        }
        end.into_ending()
    }

    /// Follows the pod until its build ends, `watch.cancel` fires, or another replica claims
    /// it.
    async fn follow(&self, name: &str, subscription: &mut Subscription, watch: &Watch) -> Followed {
        let mut main = BUILD_CONTAINER.to_owned();
        let mut memory = Memory::default();
        let mut last: Option<Arc<Pod>> = None;
        let mut unseen_checks = 0u32;
        let mut running = false;
        // While the pod has not started, nothing in it can notice a cancel in the CI server:
        // ask now and then, so a canceled job does not keep a Pending pod for pending_timeout.
        let wanted_every = (self.config.pending_timeout / 4).min(WANTED_CHECK);
        let mut next_wanted_check = tokio::time::Instant::now() + wanted_every;
        // The uid of the pod kiln made again with the next pull policy, until the watch shows
        // it: meanwhile the watch may still show the failed pod, or its deletion.
        let mut replacement: Option<String> = None;
        loop {
            let mut seen = subscription.changes.borrow_and_update().clone();
            if let Some(uid) = &replacement {
                if matches!(&seen, PodSeen::Present(pod) if pod.metadata.uid.as_ref() == Some(uid))
                {
                    replacement = None;
                } else {
                    seen = PodSeen::Unknown;
                    unseen_checks = unseen_checks.max(1);
                }
            }
            let snapshot = match seen {
                PodSeen::Present(pod) => Some(pod),
                PodSeen::Gone(final_state) => {
                    let final_state = final_state.or_else(|| last.clone());
                    // Deleted by the replica that took it over: its end is that one's.
                    if let Some(replica) = final_state
                        .as_deref()
                        .and_then(|pod| self.claimed_by_other(pod))
                    {
                        return Followed::Claimed(replica);
                    }
                    if let Some(pod) = final_state.as_deref() {
                        let limits =
                            self.limits(labels::main_container(&pod.metadata).unwrap_or(&main));
                        if let Verdict::Ended(end) =
                            classify::classify(pod, Timestamp::now(), limits, &mut memory)
                            && end.result.as_ref().is_some_and(|r| r.reported)
                        {
                            return Followed::Ended(end);
                        }
                    }
                    return Followed::Ended(classify::deleted(final_state.as_deref()));
                }
                PodSeen::Unknown if unseen_checks > 0 => {
                    // The watch has not shown the pod yet (or is failing): read it directly.
                    let pods: Api<Pod> = self.api_of(name);
                    match self.cluster.call(|| pods.get_opt(name)).await {
                        Ok(Some(pod)) => Some(Arc::new(pod)),
                        Ok(None) => return Followed::Ended(classify::deleted(last.as_deref())),
                        Err(e) => {
                            tracing::warn!(pod = name, error = %e, "cannot read the build pod");
                            None
                        }
                    }
                }
                PodSeen::Unknown => None,
            };
            let mut recheck = match snapshot {
                Some(pod) => {
                    if let Some(replica) = self.claimed_by_other(&pod) {
                        return Followed::Claimed(replica);
                    }
                    if let Some(named) = labels::main_container(&pod.metadata) {
                        named.clone_into(&mut main);
                    }
                    let verdict =
                        classify::classify(&pod, Timestamp::now(), self.limits(&main), &mut memory);
                    if !running && started(&pod, &main) {
                        running = true;
                        if let Some(on_running) = &watch.on_running {
                            on_running.call();
                        }
                    }
                    match verdict {
                        Verdict::Ended(end) => return Followed::Ended(end),
                        Verdict::Wait { recheck } => {
                            last = Some(pod);
                            recheck.unwrap_or(IDLE_RECHECK)
                        }
                        Verdict::NextPullPolicy { container, failure } => {
                            match self.next_pull_policy(&pod, &container, &failure).await {
                                Ok(uid) => {
                                    replacement = Some(uid);
                                    memory = Memory::default();
                                    last = None;
                                    unseen_checks = 1;
                                    REPLACED_RECHECK
                                }
                                Err(e) => {
                                    return Followed::Ended(classify::pull_retry_failed(
                                        &pod, &container, &failure, &e,
                                    ));
                                }
                            }
                        }
                    }
                }
                None => {
                    unseen_checks += 1;
                    UNSEEN_RECHECK
                }
            };
            if let Some(still_wanted) = &watch.still_wanted
                && !last.as_deref().is_some_and(|pod| started(pod, &main))
            {
                let now = tokio::time::Instant::now();
                if now >= next_wanted_check {
                    if !still_wanted.ask().await {
                        return Followed::Ended(classify::canceled_before_start());
                    }
                    next_wanted_check = now + wanted_every;
                }
                recheck = recheck.min(next_wanted_check.saturating_duration_since(now));
            }
            tokio::select! {
                _ = subscription.changes.changed() => unseen_checks = 0,
                () = tokio::time::sleep(recheck) => {}
                () = watch.cancel.cancelled() => return Followed::Canceled,
            }
        }
    }

    /// The replica the pod is labelled with when that is not this one: another replica has
    /// taken the build over.
    fn claimed_by_other(&self, pod: &Pod) -> Option<String> {
        let mine = self.config.replica.as_deref()?;
        let labelled = labels::replica_of(&pod.metadata)?;
        (labelled != mine).then_some(labelled)
    }
}

/// How following a pod ended.
enum Followed {
    /// Its build ended.
    Ended(PodEnd),
    /// The coordinator stopped following (shutdown).
    Canceled,
    /// Another replica (named) took it over.
    Claimed(String),
}

/// Whether the pod's main container has started (then its agent notices cancels itself).
fn started(pod: &Pod, main: &str) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .is_some_and(|c| {
            c.iter()
                .any(|c| c.name == main && c.state.as_ref().is_some_and(|s| s.waiting.is_none()))
        })
}
