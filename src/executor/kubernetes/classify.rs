//! Reading a build pod's status: still going, finished by its agent, or failed in a way the
//! agent cannot report (image pull, Pending too long, OOM, eviction, spot reclaim, node loss),
//! with the reason users retry on and a message that says what happened.

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, ContainerStatus, Pod};
use k8s_openapi::jiff::Timestamp;

use super::podspec::{BUILD_CONTAINER, PREPARE_CONTAINER, memory_limit};
use crate::build::{AgentReport, Ending, FailureReason};

/// What to do about a pod.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Verdict {
    /// Still going; look again after `recheck` even if nothing changes.
    Wait {
        /// When a timeout would expire.
        recheck: Option<Duration>,
    },
    /// The build is over.
    Ended(PodEnd),
    /// A container's image could not be pulled with its pull policy and the job listed
    /// another: the pod is to be made again with that one.
    NextPullPolicy {
        /// The container whose image failed.
        container: String,
        /// Why, as the kubelet said (`ErrImagePull: …`).
        failure: String,
    },
}

/// How a build ended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PodEnd {
    /// What the agent reported, if it got that far.
    pub(crate) result: Option<AgentReport>,
    /// The reason to fail the job with if the agent did not report it.
    pub(crate) reason: FailureReason,
    /// What happened, for the trace.
    pub(crate) detail: String,
    /// The pod never started: the caller adds the pod's warning events to `detail`.
    pub(crate) stuck_pending: bool,
    /// The exit code of a foreign agent (not kiln's: a Jenkins agent, an Actions runner) that
    /// ended on its own; it reported its work to its CI server itself.
    pub(crate) agent_exit: Option<i32>,
}

impl PodEnd {
    /// The source-neutral ending: what the agent reported, or the failure kiln saw.
    pub(crate) fn into_ending(self) -> Ending {
        if let Some(code) = self.agent_exit {
            return Ending::agent_exited(Some(code), self.detail);
        }
        let unreported = Ending::failed(self.reason, self.detail);
        match self.result {
            Some(report) => report.ending(unreported),
            None => unreported,
        }
    }

    fn failed(reason: FailureReason, detail: String) -> Self {
        Self {
            result: None,
            reason,
            detail,
            stuck_pending: false,
            agent_exit: None,
        }
    }
}

/// What the classifier remembers between looks at one pod.
#[derive(Debug, Default)]
pub(crate) struct Memory {
    /// Since when each container's image pull has been failing.
    pull_failing_since: HashMap<String, Timestamp>,
}

/// Timeouts the classifier applies, and which container's end is the build's end.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits<'a> {
    /// The container whose end ends the build (`build`, or `jnlp` for Jenkins agents).
    pub(crate) main: &'a str,
    /// How long a pod may stay Pending.
    pub(crate) pending_timeout: Duration,
    /// How long an image pull may keep failing.
    pub(crate) image_pull_grace: Duration,
}

/// Pod-level reasons that mean the infrastructure, not the script, ended the build.
const INFRASTRUCTURE_REASONS: &[(&str, &str)] = &[
    ("Evicted", "the pod was evicted by the node"),
    (
        "DeadlineExceeded",
        "the pod ran past its activeDeadlineSeconds (job timeout + kubernetes.deadline_margin) and was stopped",
    ),
    (
        "BidFailed",
        "the spot instance running the pod was reclaimed",
    ),
    ("NodeLost", "the node running the pod was lost"),
    ("NodeShutdown", "the node running the pod shut down"),
    ("Shutdown", "the node running the pod shut down"),
    ("Terminated", "the node running the pod was terminated"),
    (
        "Preempting",
        "the pod was preempted by a higher-priority pod",
    ),
    (
        "UnexpectedAdmissionError",
        "the node could not admit the pod",
    ),
];

/// Looks at `pod` at time `now`.
pub(crate) fn classify(
    pod: &Pod,
    now: Timestamp,
    limits: Limits<'_>,
    memory: &mut Memory,
) -> Verdict {
    let Some(status) = pod.status.as_ref() else {
        return pending_or_wait(pod, now, limits);
    };
    let build = status
        .container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == limits.main);
    let build_end = build.and_then(|c| c.state.as_ref()?.terminated.as_ref());
    let result = build_end
        .and_then(|t| t.message.as_deref())
        .and_then(|m| serde_json::from_str::<AgentReport>(m.trim()).ok());
    if let Some(result) = result.as_ref().filter(|r| r.reported) {
        return Verdict::Ended(PodEnd {
            result: Some(result.clone()),
            reason: FailureReason::RunnerSystemFailure,
            detail: "the build agent reported the job".into(),
            stuck_pending: false,
            agent_exit: None,
        });
    }

    // The infrastructure ended the pod: say which way, whatever the container shows. While
    // the build container still runs, its agent gets SIGTERM and reports the job itself.
    let build_running = build
        .and_then(|c| c.state.as_ref())
        .is_some_and(|s| s.running.is_some());
    if !build_running && let Some(disruption) = disruption(pod) {
        return Verdict::Ended(PodEnd {
            result,
            ..PodEnd::failed(FailureReason::RunnerSystemFailure, disruption)
        });
    }

    if let Some(end) = build_end {
        let code = end.exit_code;
        let reason_text = end.reason.as_deref().unwrap_or("");
        let ending = match reason_text {
            "OOMKilled" => PodEnd::failed(
                FailureReason::ScriptFailure,
                format!(
                    "{} ran out of memory and was killed (OOMKilled, memory limit {}); {}",
                    describe_container(limits.main, limits.main),
                    memory_limit(pod, limits.main).unwrap_or_else(|| "none set".into()),
                    if limits.main == BUILD_CONTAINER {
                        "raise KUBERNETES_MEMORY_LIMIT (up to kubernetes.max.memory_limit) or pick a bigger resource class"
                    } else {
                        "pick a bigger resource class"
                    }
                ),
            ),
            "StartError" | "ContainerCannotRun" => PodEnd::failed(
                FailureReason::RunnerConfigurationError,
                format!(
                    "the build container could not start ({reason_text}): {}",
                    end.message.as_deref().unwrap_or("no message").trim()
                ),
            ),
            // A foreign agent's exit is its end: it reported its work itself.
            _ if limits.main != BUILD_CONTAINER => PodEnd {
                agent_exit: Some(code),
                ..PodEnd::failed(
                    FailureReason::RunnerSystemFailure,
                    format!(
                        "the agent (container {}) exited with code {code}{}",
                        limits.main,
                        if reason_text.is_empty() {
                            String::new()
                        } else {
                            format!(" ({reason_text})")
                        }
                    ),
                )
            },
            _ => PodEnd::failed(
                FailureReason::RunnerSystemFailure,
                format!(
                    "the build agent exited with code {code}{} before it reported the job",
                    if reason_text.is_empty() {
                        String::new()
                    } else {
                        format!(" ({reason_text})")
                    }
                ),
            ),
        };
        return Verdict::Ended(PodEnd { result, ..ending });
    }

    let prepare_end = status
        .init_container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == PREPARE_CONTAINER)
        .and_then(|c| c.state.as_ref()?.terminated.as_ref())
        .filter(|t| t.exit_code != 0);
    if let Some(end) = prepare_end {
        let message = end.message.as_deref().unwrap_or("").trim();
        let reason = if end.reason.as_deref() == Some("OOMKilled") {
            "it ran out of memory (raise kubernetes.helper.memory_limit)".to_owned()
        } else {
            format!("exit code {}", end.exit_code)
        };
        return Verdict::Ended(PodEnd::failed(
            FailureReason::RunnerSystemFailure,
            format!(
                "preparing the build (installing the agent, cloning the sources) failed: {reason}{}",
                if message.is_empty() {
                    String::new()
                } else {
                    format!(": {}", last_lines(message, 5))
                }
            ),
        ));
    }

    // Containers that cannot start: image problems and configuration errors.
    let waiting = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten());
    let mut recheck: Option<Duration> = None;
    for container in waiting {
        match waiting_verdict(pod, container, now, limits, memory) {
            Verdict::Ended(ending) => return Verdict::Ended(ending),
            next @ Verdict::NextPullPolicy { .. } => return next,
            Verdict::Wait {
                recheck: Some(after),
            } => {
                recheck = Some(recheck.map_or(after, |r| r.min(after)));
            }
            Verdict::Wait { recheck: None } => {}
        }
    }

    match status.phase.as_deref() {
        Some("Succeeded" | "Failed") => Verdict::Ended(PodEnd::failed(
            FailureReason::RunnerSystemFailure,
            format!(
                "the pod ended ({}{}) before the build container reported",
                status.phase.as_deref().unwrap_or_default(),
                status
                    .message
                    .as_deref()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default()
            ),
        )),
        Some("Running") => Verdict::Wait { recheck },
        _ => match pending_or_wait(pod, now, limits) {
            Verdict::Wait { recheck: pending } => Verdict::Wait {
                recheck: match (recheck, pending) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                },
            },
            ended => ended,
        },
    }
}

/// A job the CI server canceled (or finished) before its pod started: nothing to report.
pub(crate) fn canceled_before_start() -> PodEnd {
    PodEnd {
        result: Some(AgentReport {
            state: "failed".into(),
            failure_reason: None,
            exit_code: None,
            reported: true,
            canceled: true,
        }),
        reason: FailureReason::ScriptFailure,
        detail: "the job was canceled in the CI server before its pod started".into(),
        stuck_pending: false,
        agent_exit: None,
    }
}

/// Explains a pod deleted by someone other than kiln (preemption, a person, the node
/// controller), from the last state seen.
pub(crate) fn deleted(last_seen: Option<&Pod>) -> PodEnd {
    let cause = last_seen
        .and_then(disruption)
        .map(|d| format!(": {d}"))
        .unwrap_or_default();
    PodEnd::failed(
        FailureReason::RunnerSystemFailure,
        format!("the build pod was deleted before the build ended{cause}"),
    )
}

/// A pod whose image failed and could not be made again with the next pull policy.
pub(crate) fn pull_retry_failed(pod: &Pod, container: &str, failure: &str, why: &str) -> PodEnd {
    let image = image_of(pod, container).unwrap_or_default();
    PodEnd::failed(
        FailureReason::ImagePullFailure,
        format!(
            "the image `{image}` of {} could not be pulled ({failure}), and the pod could not be made again with the next pull policy: {why}",
            describe_container(
                container,
                super::labels::main_container(&pod.metadata).unwrap_or(BUILD_CONTAINER)
            )
        ),
    )
}

fn waiting_verdict(
    pod: &Pod,
    container: &ContainerStatus,
    now: Timestamp,
    limits: Limits<'_>,
    memory: &mut Memory,
) -> Verdict {
    let Some(waiting) = container.state.as_ref().and_then(|s| s.waiting.as_ref()) else {
        memory.pull_failing_since.remove(&container.name);
        return Verdict::Wait { recheck: None };
    };
    let reason = waiting.reason.as_deref().unwrap_or("");
    let message = waiting.message.as_deref().unwrap_or("").trim();
    let image = image_of(pod, &container.name).unwrap_or_else(|| container.image.clone());
    let which = describe_container(&container.name, limits.main);
    let pull_failed = matches!(
        reason,
        "ErrImagePull" | "ImagePullBackOff" | "ErrImageNeverPull"
    );
    if pull_failed
        && super::labels::pull_fallbacks(&pod.metadata)
            .get(&container.name)
            .is_some_and(|later| !later.is_empty())
    {
        // As gitlab-runner: the next policy at once, not after the grace period (a registry
        // that is down stays down; the node's copy is what the job listed it for).
        memory.pull_failing_since.remove(&container.name);
        return Verdict::NextPullPolicy {
            container: container.name.clone(),
            failure: format!("{reason}: {message}"),
        };
    }
    match reason {
        "ErrImagePull" | "ImagePullBackOff" => {
            let since = *memory
                .pull_failing_since
                .entry(container.name.clone())
                .or_insert(now);
            let failing = elapsed(since, now);
            if failing >= limits.image_pull_grace {
                Verdict::Ended(PodEnd::failed(
                    FailureReason::ImagePullFailure,
                    format!(
                        "the image `{image}` of {which} could not be pulled{} for {} ({reason}): {message}",
                        last_pull_policy(pod, &container.name),
                        humantime::format_duration(limits.image_pull_grace)
                    ),
                ))
            } else {
                Verdict::Wait {
                    recheck: Some(limits.image_pull_grace - failing),
                }
            }
        }
        "InvalidImageName" | "ErrImageNeverPull" => Verdict::Ended(PodEnd::failed(
            FailureReason::ImagePullFailure,
            format!("the image `{image}` of {which} cannot be used ({reason}): {message}"),
        )),
        "CreateContainerConfigError" | "CreateContainerError" | "RunContainerError" => {
            Verdict::Ended(PodEnd::failed(
                FailureReason::RunnerConfigurationError,
                format!("{which} cannot be created ({reason}): {message}"),
            ))
        }
        _ => {
            memory.pull_failing_since.remove(&container.name);
            Verdict::Wait { recheck: None }
        }
    }
}

fn pending_or_wait(pod: &Pod, now: Timestamp, limits: Limits<'_>) -> Verdict {
    let Some(created) = pod.metadata.creation_timestamp.as_ref() else {
        return Verdict::Wait { recheck: None };
    };
    let age = elapsed(created.0, now);
    if age < limits.pending_timeout {
        return Verdict::Wait {
            recheck: Some(limits.pending_timeout - age),
        };
    }
    let scheduling = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| {
            c.iter()
                .find(|c| c.type_ == "PodScheduled" && c.status == "False")
        })
        .map(|c| {
            format!(
                "not scheduled ({}): {}",
                c.reason.as_deref().unwrap_or("no reason given"),
                c.message.as_deref().unwrap_or("no message").trim()
            )
        });
    let detail = format!(
        "the pod was still Pending after {} (kubernetes.pending_timeout){}",
        humantime::format_duration(limits.pending_timeout),
        scheduling.map(|s| format!("; {s}")).unwrap_or_default()
    );
    Verdict::Ended(PodEnd {
        stuck_pending: true,
        ..PodEnd::failed(FailureReason::RunnerSystemFailure, detail)
    })
}

/// The infrastructure's reason for ending the pod, if it did.
fn disruption(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    let message = |m: Option<&String>| {
        m.map(|m| m.trim())
            .filter(|m| !m.is_empty())
            .map(|m| format!(" ({m})"))
            .unwrap_or_default()
    };
    if let Some(reason) = status.reason.as_deref()
        && let Some((_, text)) = INFRASTRUCTURE_REASONS.iter().find(|(r, _)| *r == reason)
    {
        return Some(format!("{text}{}", message(status.message.as_ref())));
    }
    let condition = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "DisruptionTarget" && c.status == "True")?;
    let what = match condition.reason.as_deref() {
        Some("PreemptionByScheduler" | "PreemptionByKubeScheduler") => {
            "the pod was preempted by a higher-priority pod"
        }
        Some("EvictionByEvictionAPI") => "the pod was evicted (drain or autoscaler scale-down)",
        Some("DeletionByTaintManager") => {
            "the pod's node was tainted NoExecute (node lost or drained)"
        }
        Some("TerminationByKubelet") => {
            "the node's kubelet stopped the pod (node pressure or shutdown)"
        }
        Some("DeletionByPodGC") => "the pod's node is gone",
        _ => "the cluster disrupted the pod",
    };
    Some(format!("{what}{}", message(condition.message.as_ref())))
}

/// The spec of the pod's (init) container `name`.
fn container_spec<'a>(pod: &'a Pod, name: &str) -> Option<&'a Container> {
    let spec = pod.spec.as_ref()?;
    spec.init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .find(|c| c.name == name)
}

fn image_of(pod: &Pod, container: &str) -> Option<String> {
    container_spec(pod, container)?.image.clone()
}

/// ` with pull policy "…"` (gitlab-runner's name) when the pod tried other policies before
/// this one, so the reason says the whole list failed; empty otherwise.
fn last_pull_policy(pod: &Pod, container: &str) -> String {
    if !super::labels::pull_retried(&pod.metadata, container) {
        return String::new();
    }
    container_spec(pod, container)
        .and_then(|c| c.image_pull_policy.as_deref())
        .map(|policy| {
            format!(
                " with pull policy \"{}\", the last the job listed",
                super::images::runner_policy_name(policy)
            )
        })
        .unwrap_or_default()
}

fn describe_container(name: &str, main: &str) -> String {
    match name {
        BUILD_CONTAINER => "the build container".into(),
        PREPARE_CONTAINER => "the kiln helper (kubernetes.helper_image)".into(),
        agent if agent == main => format!("the agent container `{agent}`"),
        service if service.starts_with("svc-") => format!("service container `{service}`"),
        other => format!("container `{other}`"),
    }
}

/// Time from `then` to `now`; zero if the clocks disagree.
fn elapsed(then: Timestamp, now: Timestamp) -> Duration {
    Duration::try_from(now.duration_since(then)).unwrap_or_default()
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" / ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const LIMITS: Limits = Limits {
        main: BUILD_CONTAINER,
        pending_timeout: Duration::from_secs(300),
        image_pull_grace: Duration::from_secs(60),
    };

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + seconds).unwrap()
    }

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "kiln-gl-1", "creationTimestamp": "2023-11-14T22:13:20Z"},
            "spec": {"containers": [{"name": "build", "image": "maven:3",
                "resources": {"limits": {"memory": "2Gi"}}}]},
            "status": status,
        }))
        .unwrap()
    }

    fn ended(verdict: Verdict) -> PodEnd {
        match verdict {
            Verdict::Ended(e) => e,
            other => panic!("expected an ending, got {other:?}"),
        }
    }

    fn terminated(reason: &str, code: i32, message: Option<&str>) -> serde_json::Value {
        json!({"phase": "Failed", "containerStatuses": [{
            "name": "build", "image": "maven:3", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": code, "reason": reason, "message": message}}}]})
    }

    #[test]
    fn a_reported_result_ends_the_build() {
        let result = r#"{"state":"failed","failure_reason":"script_failure","exit_code":1,"reported":true,"canceled":false}"#;
        let ending = ended(classify(
            &pod(terminated("Error", 1, Some(result))),
            at(10),
            LIMITS,
            &mut Memory::default(),
        ));
        assert!(ending.result.unwrap().reported);
    }

    #[test]
    fn a_foreign_agents_exit_code_is_its_ending() {
        let runner = |code: i32| {
            let mut pod = pod(
                json!({"phase": if code == 0 { "Succeeded" } else { "Failed" },
                "containerStatuses": [{
                    "name": "runner", "image": "actions-runner", "imageID": "", "ready": false,
                    "restartCount": 0,
                    "state": {"terminated": {"exitCode": code, "reason": if code == 0 { "Completed" } else { "Error" }}}}]}),
            );
            pod.spec.as_mut().unwrap().containers[0].name = "runner".into();
            let limits = Limits {
                main: "runner",
                ..LIMITS
            };
            ended(classify(&pod, at(10), limits, &mut Memory::default())).into_ending()
        };
        let clean = runner(0);
        assert_eq!(clean.outcome, crate::build::Outcome::Succeeded, "{clean:?}");
        let failed = runner(3);
        assert_eq!(
            failed.reason(),
            Some(FailureReason::RunnerSystemFailure),
            "{failed:?}"
        );
        assert!(
            failed.detail.contains("container runner") && failed.detail.contains("code 3"),
            "{}",
            failed.detail
        );
        // kiln's own agent exiting without a report is still a failure.
        let unreported = ended(classify(
            &pod(terminated("Completed", 0, None)),
            at(10),
            LIMITS,
            &mut Memory::default(),
        ))
        .into_ending();
        assert_eq!(
            unreported.reason(),
            Some(FailureReason::RunnerSystemFailure)
        );
    }

    #[test]
    fn oom_is_a_script_failure_naming_the_limit() {
        let ending = ended(classify(
            &pod(terminated("OOMKilled", 137, None)),
            at(10),
            LIMITS,
            &mut Memory::default(),
        ));
        assert_eq!(ending.reason, FailureReason::ScriptFailure);
        assert!(
            ending.detail.contains("OOMKilled") && ending.detail.contains("2Gi"),
            "{}",
            ending.detail
        );
    }

    #[test]
    fn eviction_is_a_runner_system_failure() {
        let mut status = terminated("Error", 137, None);
        status["reason"] = json!("Evicted");
        status["message"] = json!("The node was low on resource: memory.");
        let ending = ended(classify(
            &pod(status),
            at(10),
            LIMITS,
            &mut Memory::default(),
        ));
        assert_eq!(ending.reason, FailureReason::RunnerSystemFailure);
        assert!(ending.detail.contains("evicted") && ending.detail.contains("low on resource"));
    }

    #[test]
    fn spot_reclaim_and_preemption_are_runner_system_failures() {
        let mut status = terminated("Error", 137, None);
        status["reason"] = json!("BidFailed");
        let ending = ended(classify(
            &pod(status),
            at(10),
            LIMITS,
            &mut Memory::default(),
        ));
        assert_eq!(ending.reason, FailureReason::RunnerSystemFailure);
        assert!(ending.detail.contains("spot"));
        let preempted = pod(json!({"phase": "Running", "conditions": [
            {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}],
            "containerStatuses": [{"name": "build", "image": "maven:3", "imageID": "",
                "ready": true, "restartCount": 0,
                "state": {"running": {"startedAt": "2023-11-14T22:13:30Z"}}}]}));
        // The agent is still running: it gets SIGTERM and reports the job itself.
        assert_eq!(
            classify(&preempted, at(10), LIMITS, &mut Memory::default()),
            Verdict::Wait { recheck: None }
        );
        let ending = deleted(Some(&preempted));
        assert!(ending.detail.contains("preempted"), "{}", ending.detail);
    }

    #[test]
    fn an_agent_that_died_silently_is_a_runner_system_failure() {
        let ending = ended(classify(
            &pod(terminated("Error", 2, Some("not json"))),
            at(10),
            LIMITS,
            &mut Memory::default(),
        ));
        assert_eq!(ending.reason, FailureReason::RunnerSystemFailure);
        assert!(ending.detail.contains("code 2"));
    }

    #[test]
    fn a_pull_failure_with_a_policy_left_asks_for_the_next_one_at_once() {
        let status = json!({"phase": "Pending", "containerStatuses": [{
            "name": "build", "image": "maven:3", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ErrImagePull", "message": "connection refused"}}}]});
        let mut with_fallback = pod(status.clone());
        with_fallback.metadata.annotations = Some(
            [(
                "kiln.dev/pull-fallbacks".to_owned(),
                "build=IfNotPresent".to_owned(),
            )]
            .into(),
        );
        assert_eq!(
            classify(&with_fallback, at(0), LIMITS, &mut Memory::default()),
            Verdict::NextPullPolicy {
                container: "build".into(),
                failure: "ErrImagePull: connection refused".into()
            }
        );
        // Another container's fallbacks are not this one's.
        with_fallback.metadata.annotations = Some(
            [(
                "kiln.dev/pull-fallbacks".to_owned(),
                "svc-0=IfNotPresent".to_owned(),
            )]
            .into(),
        );
        assert!(matches!(
            classify(&with_fallback, at(0), LIMITS, &mut Memory::default()),
            Verdict::Wait { .. }
        ));
    }

    #[test]
    fn image_pull_failures_get_a_grace_period() {
        let status = json!({"phase": "Pending", "containerStatuses": [{
            "name": "build", "image": "maven:3", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image \"maven:3\""}}}]});
        let mut memory = Memory::default();
        let first = classify(&pod(status.clone()), at(0), LIMITS, &mut memory);
        assert_eq!(
            first,
            Verdict::Wait {
                recheck: Some(Duration::from_secs(60))
            }
        );
        let later = ended(classify(&pod(status), at(61), LIMITS, &mut memory));
        assert_eq!(later.reason, FailureReason::ImagePullFailure);
        assert!(later.detail.contains("maven:3"));
    }

    #[test]
    fn config_errors_fail_at_once() {
        let status = json!({"phase": "Pending", "containerStatuses": [{
            "name": "build", "image": "maven:3", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "CreateContainerConfigError", "message": "secret \"x\" not found"}}}]});
        let ending = ended(classify(
            &pod(status),
            at(0),
            LIMITS,
            &mut Memory::default(),
        ));
        assert_eq!(ending.reason, FailureReason::RunnerConfigurationError);
        assert!(ending.detail.contains("secret \"x\" not found"));
    }

    #[test]
    fn pending_past_the_timeout_quotes_the_scheduler() {
        let status = json!({"phase": "Pending", "conditions": [{"type": "PodScheduled",
            "status": "False", "reason": "Unschedulable",
            "message": "0/3 nodes are available: 3 Insufficient cpu."}]});
        let early = classify(
            &pod(status.clone()),
            at(100),
            LIMITS,
            &mut Memory::default(),
        );
        assert_eq!(
            early,
            Verdict::Wait {
                recheck: Some(Duration::from_secs(200))
            }
        );
        let ending = ended(classify(
            &pod(status),
            at(301),
            LIMITS,
            &mut Memory::default(),
        ));
        assert!(ending.stuck_pending);
        assert!(
            ending.detail.contains("Insufficient cpu"),
            "{}",
            ending.detail
        );
    }

    #[test]
    fn a_running_pod_waits() {
        let status = json!({"phase": "Running", "containerStatuses": [{
            "name": "build", "image": "maven:3", "imageID": "", "ready": true, "restartCount": 0,
            "state": {"running": {"startedAt": "2023-11-14T22:13:30Z"}}}]});
        assert_eq!(
            classify(&pod(status), at(4000), LIMITS, &mut Memory::default()),
            Verdict::Wait { recheck: None }
        );
    }
}
