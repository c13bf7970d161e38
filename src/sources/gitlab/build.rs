//! A GitLab job as a source-neutral [`Build`]: the kiln agent with the job file, the job's
//! image and services (with the host names GitLab derives for them), the resource class the job
//! or its runner names, and what the job's `KUBERNETES_*` variables ask of its pod.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use super::registry;
use crate::build::{
    About, Build, BuildKey, ClassChoice, Image, JOB_FILE, PullPolicy, Request, Requested,
    ResourceField, Service, SourceKind, Workload,
};
use crate::gitlab::payload::{Image as JobImage, JobPayload};
use crate::job_file::{AgentConfig, AgentJob, Fingerprint};
use crate::variables::{Definition, Variables};

/// The variable that picks a job's resource class.
pub(crate) const CLASS_VARIABLE: &str = "KILN_RESOURCE_CLASS";

/// The `KUBERNETES_*` variables of gitlab-runner's Kubernetes executor that size the build
/// container.
const RESOURCE_VARIABLES: &[(&str, ResourceField)] = &[
    ("KUBERNETES_CPU_REQUEST", ResourceField::CpuRequest),
    ("KUBERNETES_CPU_LIMIT", ResourceField::CpuLimit),
    ("KUBERNETES_MEMORY_REQUEST", ResourceField::MemoryRequest),
    ("KUBERNETES_MEMORY_LIMIT", ResourceField::MemoryLimit),
    (
        "KUBERNETES_EPHEMERAL_STORAGE_REQUEST",
        ResourceField::EphemeralStorageRequest,
    ),
    (
        "KUBERNETES_EPHEMERAL_STORAGE_LIMIT",
        ResourceField::EphemeralStorageLimit,
    ),
];

/// The variable families that add entries to the pod (`key=value`; a toleration
/// `key[=value][:effect]`).
const FAMILIES: &[(&str, Request)] = &[
    ("KUBERNETES_NODE_SELECTOR_", Request::NodeSelector),
    ("KUBERNETES_POD_ANNOTATIONS_", Request::PodAnnotation),
    ("KUBERNETES_POD_LABELS_", Request::PodLabel),
    ("KUBERNETES_NODE_TOLERATIONS_", Request::NodeToleration),
];

/// What a resource variable of the service or helper containers asks for.
type ContainerRequest = fn(ResourceField) -> Request;

/// Prefixes of gitlab-runner's service and helper container variants of
/// [`RESOURCE_VARIABLES`] (`KUBERNETES_SERVICE_CPU_LIMIT`, `KUBERNETES_HELPER_MEMORY_REQUEST`).
const CONTAINER_PREFIXES: &[(&str, ContainerRequest)] = &[
    ("KUBERNETES_SERVICE_", Request::ServiceResource),
    ("KUBERNETES_HELPER_", Request::HelperResource),
];

/// What a job's build is made of besides the job.
pub(crate) struct Context<'a> {
    /// The runner's name in kiln's config.
    pub(crate) runner: &'a str,
    /// GitLab's base URL, for the agent.
    pub(crate) gitlab_url: &'a str,
    /// The runner's resource class, if any.
    pub(crate) resource_class: Option<&'a str>,
    /// How the agent behaves.
    pub(crate) settings: &'a AgentConfig,
    /// The executor's name, shown in the trace.
    pub(crate) executor: &'a str,
    /// Fingerprints of the coordinator's credentials, for the agent to mask.
    pub(crate) masked: &'a [Fingerprint],
    /// The CA certificates (PEM) the runner trusts for GitLab (`tls_ca_file`).
    pub(crate) tls_ca: Option<&'a str>,
    /// The build cache, which grants each build access to its project's caches.
    pub(crate) cache: Option<&'a crate::cache::CacheService>,
}

/// The build of `job` (`raw`: the job JSON exactly as GitLab sent it, for the agent).
pub(crate) fn build(job: &JobPayload, raw: &serde_json::Value, context: &Context<'_>) -> Build {
    let key = BuildKey {
        source: SourceKind::GitLab,
        runner: context.runner.to_owned(),
        id: job.id,
    };
    let job_file = AgentJob {
        gitlab_url: context.gitlab_url.to_owned(),
        job: raw.clone(),
        settings: context.settings.clone(),
        executor: context.executor.to_owned(),
        runner: context.runner.to_owned(),
        masked: context.masked.to_vec(),
        tls_ca: context.tls_ca.map(str::to_owned),
        cache: context.cache.map(|service| {
            let project = job
                .job_info
                .project_id
                .map(|id| id.to_string())
                .unwrap_or_else(|| job.job_info.project_name.clone());
            service.grant(context.runner, &project, &key.to_string(), job.timeout())
        }),
    };
    Build {
        name: key.resource_name(),
        key,
        workload: Workload::KilnAgent {
            image: job
                .image
                .as_ref()
                .filter(|i| !i.name.trim().is_empty())
                .map(image),
            services: job
                .services
                .iter()
                .filter(|s| !s.name.trim().is_empty())
                .map(|s| Service {
                    image: image(s),
                    command: s.command.clone(),
                    env: service_variables(job, s),
                    aliases: service_aliases(s),
                })
                .collect(),
        },
        // Serializing plain data into a Vec cannot fail.
        secrets: BTreeMap::from([(
            JOB_FILE.to_owned(),
            serde_json::to_vec(&job_file).unwrap_or_default(),
        )]),
        class: class_choice(job, context.resource_class),
        requests: requests(job),
        timeout: Some(job.timeout()),
        labels: BTreeMap::new(),
        annotations: annotations(job),
        about: about(job, context.gitlab_url),
        // Anyone can run a public project's pipeline (a fork's merge request).
        untrusted: job.predefined_variable("CI_PROJECT_VISIBILITY") == Some("public"),
        registry_auths: registry::auths(job),
    }
}

/// The environment of a service container, as gitlab-runner's `getServiceVariables`: the
/// job's public variables (its `.gitlab-ci.yml` and predefined ones, never the project's
/// protected or masked secrets, which GitLab sends as not public) and then the service's own,
/// expanded against each other.
fn service_variables(job: &JobPayload, service: &JobImage) -> Vec<(String, String)> {
    let definitions = job
        .variables
        .iter()
        .filter(|v| v.public)
        .map(Definition::from)
        .chain(
            service
                .variables
                .iter()
                .map(|v| Definition::new(v.key.clone(), v.value.clone())),
        );
    Variables::resolve(definitions)
        .resolved()
        .into_iter()
        .map(|v| (v.key, v.value))
        .collect()
}

/// What people see about a job; its link is made from GitLab's URL (`gitlab_url`) and the
/// project, never from what the job's variables say.
pub(crate) fn about(job: &JobPayload, gitlab_url: &str) -> About {
    About {
        project: job
            .job_info
            .project_full_path
            .clone()
            .unwrap_or_else(|| job.job_info.project_name.clone()),
        job: job.job_info.name.clone(),
        pipeline: job.job_info.pipeline_id.map(|id| id.to_string()),
        url: job_url(job, gitlab_url),
        queued_at: job
            .job_info
            .time_in_queue_seconds
            .filter(|s| s.is_finite() && *s >= 0.0)
            // `try_`: GitLab's number is outside data; 1e20 seconds must not panic the poller.
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .and_then(|waited| SystemTime::now().checked_sub(waited)),
    }
}

/// The job's page in GitLab: `<gitlab>/<project path>/-/jobs/<id>`, or, when GitLab did not
/// send the project's path, the `CI_JOB_URL` GitLab defined (its first definition).
fn job_url(job: &JobPayload, gitlab_url: &str) -> Option<String> {
    match &job.job_info.project_full_path {
        Some(path) if !path.is_empty() => Some(format!(
            "{}/{}/-/jobs/{}",
            crate::net::redact_url(gitlab_url).trim_end_matches('/'),
            path.trim_matches('/'),
            job.id
        )),
        _ => job.predefined_variable("CI_JOB_URL").map(str::to_owned),
    }
}

fn image(job: &JobImage) -> Image {
    Image {
        name: job.name.clone(),
        entrypoint: job.entrypoint.clone(),
        // GitLab validates the names; one it adds later is left to the next in the list.
        pull_policies: job
            .pull_policy
            .iter()
            .filter_map(|p| match p.as_str() {
                "always" => Some(PullPolicy::Always),
                "if-not-present" => Some(PullPolicy::IfNotPresent),
                "never" => Some(PullPolicy::Never),
                _ => None,
            })
            .collect(),
        user: job
            .executor_opts
            .kubernetes
            .user
            .as_deref()
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned),
    }
}

/// The job's `KILN_RESOURCE_CLASS`, else the runner's class.
fn class_choice(job: &JobPayload, runner_class: Option<&str>) -> Option<ClassChoice> {
    let from_variable = job
        .variable(CLASS_VARIABLE)
        .map(str::trim)
        .filter(|s| !s.is_empty());
    match (from_variable, runner_class) {
        (Some(name), _) => Some(ClassChoice {
            name: name.to_owned(),
            origin: CLASS_VARIABLE.to_owned(),
        }),
        (None, Some(name)) => Some(ClassChoice {
            name: name.to_owned(),
            origin: "the runner's resource_class".to_owned(),
        }),
        (None, None) => None,
    }
}

/// What the job's `KUBERNETES_*` variables ask of its pod (the executor checks each against
/// its caps). The last definition of a variable wins, as in GitLab.
fn requests(job: &JobPayload) -> Vec<Requested> {
    let mut out = Vec::new();
    let nonempty = |name: &str| {
        job.variable(name)
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    };
    for (variable, field) in RESOURCE_VARIABLES {
        if let Some(value) = nonempty(variable) {
            out.push(Requested {
                what: Request::Resource(*field),
                value,
                origin: (*variable).to_owned(),
            });
        }
        let suffix = variable.trim_start_matches("KUBERNETES_");
        for (prefix, what) in CONTAINER_PREFIXES {
            let variable = format!("{prefix}{suffix}");
            if let Some(value) = nonempty(&variable) {
                out.push(Requested {
                    what: what(*field),
                    value,
                    origin: variable,
                });
            }
        }
    }
    if let Some(value) = nonempty("KUBERNETES_NAMESPACE_OVERWRITE") {
        out.push(Requested {
            what: Request::Namespace,
            value,
            origin: "KUBERNETES_NAMESPACE_OVERWRITE".to_owned(),
        });
    }
    if let Some(value) = nonempty("KUBERNETES_SERVICE_ACCOUNT_OVERWRITE") {
        out.push(Requested {
            what: Request::ServiceAccount,
            value,
            origin: "KUBERNETES_SERVICE_ACCOUNT_OVERWRITE".to_owned(),
        });
    }
    for (prefix, what) in FAMILIES {
        let mut seen = BTreeMap::new();
        for var in job.variables.iter().filter(|v| v.key.starts_with(prefix)) {
            seen.insert(var.key.clone(), var.value.clone());
        }
        for (variable, value) in seen {
            out.push(Requested {
                what: *what,
                value,
                origin: variable,
            });
        }
    }
    out
}

/// The host names a service is reachable by: its aliases and the two names GitLab derives
/// from its image (`registry.example.com/tools/postgres` → `registry.example.com__tools__postgres`
/// and `registry.example.com-tools-postgres`).
fn service_aliases(service: &JobImage) -> Vec<String> {
    let mut names: Vec<String> = service
        .alias
        .iter()
        .flat_map(|a| a.split([',', ' ']))
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
        .collect();
    let base = service.name.split('@').next().unwrap_or_default();
    let without_tag = match base.rfind(':') {
        Some(colon) if !base[colon..].contains('/') => &base[..colon],
        _ => base,
    };
    names.push(without_tag.replace('/', "__"));
    names.push(without_tag.replace('/', "-"));
    names.retain(|n| is_hostname(n));
    names
}

fn is_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|part| {
            !part.is_empty()
                && part.len() <= 63
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

/// The annotations gitlab-runner's Kubernetes executor puts on build pods.
fn annotations(job: &JobPayload) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut put = |key: &str, value: Option<String>| {
        if let Some(value) = value.filter(|v| !v.is_empty()) {
            out.insert(key.to_owned(), value);
        }
    };
    put("job.runner.gitlab.com/id", Some(job.id.to_string()));
    put(
        "job.runner.gitlab.com/url",
        job.variable("CI_JOB_URL").map(str::to_owned),
    );
    put(
        "job.runner.gitlab.com/name",
        Some(job.job_info.name.clone()),
    );
    put("job.runner.gitlab.com/sha", Some(job.git_info.sha.clone()));
    put(
        "job.runner.gitlab.com/before_sha",
        Some(job.git_info.before_sha.clone()),
    );
    put(
        "job.runner.gitlab.com/ref",
        Some(job.git_info.git_ref.clone()),
    );
    put(
        "project.runner.gitlab.com/id",
        job.job_info.project_id.map(|id| id.to_string()),
    );
    put(
        "project.runner.gitlab.com/path",
        job.job_info.project_full_path.clone(),
    );
    put(
        "pipeline.runner.gitlab.com/id",
        job.job_info.pipeline_id.map(|id| id.to_string()),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gitlab::payload::{ImageVariable, Variable};

    fn job(variables: &[(&str, &str)]) -> (JobPayload, serde_json::Value) {
        let raw = serde_json::json!({
            "id": 42, "token": "job-token",
            "job_info": {"name": "build", "stage": "build", "project_name": "demo",
                         "project_full_path": "group/demo", "project_id": 7},
            "git_info": {"repo_url": "https://gitlab.example.com/group/demo.git", "ref": "main",
                         "sha": "abc123", "before_sha": "000", "ref_type": "branch"},
            "runner_info": {"timeout": 600},
            "steps": [{"name": "script", "script": ["true"], "when": "on_success"}],
        });
        let mut job: JobPayload = serde_json::from_value(raw.clone()).unwrap();
        job.variables = variables
            .iter()
            .map(|(k, v)| Variable {
                key: (*k).into(),
                value: (*v).into(),
                public: true,
                ..Variable::default()
            })
            .collect();
        (job, raw)
    }

    fn context(class: Option<&str>) -> Context<'_> {
        static SETTINGS: std::sync::LazyLock<AgentConfig> =
            std::sync::LazyLock::new(AgentConfig::default);
        Context {
            runner: "gitlab.example.com-0",
            gitlab_url: "https://gitlab.example.com",
            resource_class: class,
            settings: &SETTINGS,
            cache: None,
            executor: "kubernetes",
            masked: &[],
            tls_ca: None,
        }
    }

    /// The Kubernetes path: a build's Secret (its job file) carries a capability scoped to its
    /// project's prefix and the coordinator's address, never the storage key; nothing else
    /// of the build (the pod is made from it) holds the key either.
    #[test]
    fn a_cached_build_holds_a_capability_and_never_the_storage_key() {
        use crate::cache::config::{CacheConfig, CacheType, S3Config};
        let secret = "storage-secret-key-0123456789abcdef";
        let config = CacheConfig {
            kind: CacheType::S3,
            path: "kiln".into(),
            coordinator_url: Some("http://kiln.ci.svc:9252".into()),
            s3: Some(S3Config {
                bucket_name: "ci-cache".into(),
                access_key: "access".into(),
                secret_key: secret.into(),
                ..S3Config::default()
            }),
            ..CacheConfig::default()
        };
        let service =
            crate::cache::CacheService::new(&config, "0.0.0.0:9252".parse().unwrap()).unwrap();
        let (job, raw) = job(&[]);
        let mut context = context(None);
        context.cache = Some(&service);
        let build = build(&job, &raw, &context);
        let file: AgentJob = serde_json::from_slice(&build.secrets[JOB_FILE]).unwrap();
        let Some(crate::cache::CacheGrant {
            access: crate::cache::CacheAccess::Signed { url, capability },
            ..
        }) = file.cache
        else {
            panic!("no signed cache access in {:?}", file.cache);
        };
        assert_eq!(url, "http://kiln.ci.svc:9252");
        assert!(!capability.contains(secret));
        let everything = format!(
            "{build:?}{}",
            String::from_utf8_lossy(&build.secrets[JOB_FILE])
        );
        assert!(!everything.contains(secret));
        let claims = crate::cache::capability::Capabilities::new(secret.as_bytes())
            .verify(&capability)
            .unwrap();
        assert_eq!(claims.prefix, "kiln/runner/gitlab_example_com-0/project/7/");
    }

    #[test]
    fn a_job_queued_for_1e20_seconds_is_built_without_a_panic() {
        let (mut job, raw) = job(&[]);
        for waited in [1e20, f64::MAX, f64::INFINITY, f64::NAN, -5.0] {
            job.job_info.time_in_queue_seconds = Some(waited);
            let build = build(&job, &raw, &context(None));
            assert_eq!(build.about.queued_at, None, "{waited}");
        }
    }

    #[test]
    fn the_status_link_is_gitlabs_not_a_job_variable() {
        let (first, _) = job(&[
            (
                "CI_JOB_URL",
                "https://gitlab.example.com/group/demo/-/jobs/42",
            ),
            ("CI_JOB_URL", "https://evil.example/phish"),
        ]);
        assert_eq!(
            about(&first, "https://gitlab.example.com/").url.as_deref(),
            Some("https://gitlab.example.com/group/demo/-/jobs/42")
        );
        let (mut pathless, _) = job(&[
            (
                "CI_JOB_URL",
                "https://gitlab.example.com/group/demo/-/jobs/42",
            ),
            ("CI_JOB_URL", "https://evil.example/phish"),
        ]);
        pathless.job_info.project_full_path = None;
        assert_eq!(
            about(&pathless, "https://gitlab.example.com")
                .url
                .as_deref(),
            Some("https://gitlab.example.com/group/demo/-/jobs/42")
        );
    }

    proptest::proptest! {
        /// Whatever numbers GitLab sends (ids, timeouts, queue times, step timeouts), a job is
        /// described as a build without a panic, and its timeout stays within GitLab's month.
        #[test]
        fn any_numbers_in_a_payload_make_a_build(
            id in proptest::num::u64::ANY,
            timeout in proptest::option::of(proptest::num::u64::ANY),
            queued in proptest::option::of(proptest::num::f64::ANY),
            step_timeout in proptest::option::of(proptest::num::u64::ANY),
            pipeline in proptest::option::of(proptest::num::u64::ANY),
        ) {
            let raw = serde_json::json!({
                "id": id, "token": "t",
                "job_info": {"name": "j", "stage": "s", "project_name": "p",
                             "pipeline_id": pipeline, "time_in_queue_seconds": queued},
                "git_info": {"repo_url": "https://gitlab.example.com/p.git", "sha": "abc"},
                "runner_info": {"timeout": timeout},
                "steps": [{"name": "script", "script": ["true"], "timeout": step_timeout}],
            });
            if let Ok(job) = serde_json::from_value::<JobPayload>(raw.clone()) {
                let build = build(&job, &raw, &context(None));
                let timeout = build.timeout.unwrap_or_default();
                proptest::prop_assert!(timeout <= Duration::from_secs(31 * 24 * 3600));
                proptest::prop_assert!(!timeout.is_zero());
            }
        }
    }

    #[test]
    fn a_job_becomes_a_kiln_agent_build_with_its_job_file_secret() {
        let (job, raw) = job(&[]);
        let build = build(&job, &raw, &context(None));
        assert_eq!(build.name, "kiln-gl-42");
        assert_eq!(build.key.source, SourceKind::GitLab);
        assert_eq!(build.timeout, Some(Duration::from_secs(600)));
        let file: AgentJob = serde_json::from_slice(&build.secrets[JOB_FILE]).unwrap();
        assert_eq!(file.job["token"], "job-token");
        assert_eq!(file.executor, "kubernetes");
        assert_eq!(build.annotations["job.runner.gitlab.com/sha"], "abc123");
        assert_eq!(
            build.annotations["project.runner.gitlab.com/path"],
            "group/demo"
        );
        assert_eq!(build.about.project, "group/demo");
    }

    #[test]
    fn services_get_their_alias_and_the_names_gitlab_derives() {
        let (mut job, raw) = job(&[]);
        job.services = vec![JobImage {
            name: "registry.example.com/tools/postgres:16".into(),
            alias: Some("db".into()),
            command: vec!["postgres".into()],
            variables: vec![ImageVariable {
                key: "POSTGRES_PASSWORD".into(),
                value: "pw".into(),
            }],
            pull_policy: vec!["if-not-present".into()],
            ..JobImage::default()
        }];
        let build = build(&job, &raw, &context(None));
        let Workload::KilnAgent { services, .. } = &build.workload else {
            panic!("a GitLab job runs the kiln agent");
        };
        assert_eq!(
            services[0].aliases,
            [
                "db",
                "registry.example.com__tools__postgres",
                "registry.example.com-tools-postgres"
            ]
        );
        assert_eq!(services[0].env, [("POSTGRES_PASSWORD".into(), "pw".into())]);
        assert_eq!(services[0].image.pull_policies, [PullPolicy::IfNotPresent]);
    }

    #[test]
    fn the_class_comes_from_the_variable_then_the_runner() {
        let (job_, raw) = job(&[("KILN_RESOURCE_CLASS", "big")]);
        let chosen = build(&job_, &raw, &context(Some("spot"))).class.unwrap();
        assert_eq!(chosen.name, "big");
        assert_eq!(chosen.origin, "KILN_RESOURCE_CLASS");
        let (plain, raw) = job(&[]);
        let chosen = build(&plain, &raw, &context(Some("spot"))).class.unwrap();
        assert_eq!(chosen.name, "spot");
        assert!(build(&plain, &raw, &context(None)).class.is_none());
    }

    #[test]
    fn kubernetes_variables_become_requests_naming_their_variable() {
        let (job, raw) = job(&[
            ("KUBERNETES_MEMORY_LIMIT", "4Gi"),
            ("KUBERNETES_NODE_SELECTOR_ARCH", "kubernetes.io/arch=arm64"),
            ("KUBERNETES_MEMORY_LIMIT", "6Gi"),
            ("UNRELATED", "x"),
        ]);
        let requests = build(&job, &raw, &context(None)).requests;
        assert_eq!(
            requests,
            [
                Requested {
                    what: Request::Resource(ResourceField::MemoryLimit),
                    value: "6Gi".into(),
                    origin: "KUBERNETES_MEMORY_LIMIT".into(),
                },
                Requested {
                    what: Request::NodeSelector,
                    value: "kubernetes.io/arch=arm64".into(),
                    origin: "KUBERNETES_NODE_SELECTOR_ARCH".into(),
                },
            ]
        );
    }
}
