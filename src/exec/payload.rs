//! Turns a pipeline job into the job JSON GitLab would hand a runner, so the agent runs it
//! exactly as it runs a job from GitLab.

use crate::gitlab::payload::{
    Artifact, ArtifactsFile, Cache, CachePolicy, Dependency, Image, ImageVariable, JobInfo,
    JobPayload, RunnerInfo, Step, Variable, When,
};
use crate::pipeline::{ArtifactsWhen, CacheKey, CacheSpec, PipelineJob};

/// GitLab's default job timeout, used when the job sets none.
const DEFAULT_TIMEOUT_SECS: u64 = 3600;

/// What a job's payload needs besides the pipeline job itself.
#[derive(Debug, Clone)]
pub(crate) struct JobContext<'a> {
    /// The job id the embedded server knows the job by.
    pub(crate) id: u64,
    /// The job token the embedded server checks.
    pub(crate) token: &'a str,
    /// The pipeline id.
    pub(crate) pipeline_id: u64,
    /// The project's name (its directory's name).
    pub(crate) project_name: &'a str,
    /// The project's directory (`cache:key:files` are read there).
    pub(crate) project_dir: &'a std::path::Path,
    /// Predefined variables (`CI_*`, from the checkout), lowest precedence.
    pub(crate) predefined: &'a [(String, String)],
    /// `--var` variables, highest precedence (like pipeline variables in GitLab).
    pub(crate) cli_vars: &'a [(String, String)],
    /// Archives to download first, in order: the working tree, then earlier jobs' artifacts.
    pub(crate) dependencies: Vec<DependencyRef>,
}

/// An archive the job downloads from the embedded server before its script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DependencyRef {
    /// The id it is served under.
    pub(crate) id: u64,
    /// The name shown in the trace.
    pub(crate) name: String,
    /// Its size in bytes.
    pub(crate) size: u64,
}

/// A `cache:` entry as GitLab sends it. GitLab names a `key:files` cache after the commits that
/// last changed the files; `kiln exec` runs uncommitted trees too, so it names it after the
/// files' contents (a missing file counts as empty).
fn cache(spec: &CacheSpec, project_dir: &std::path::Path) -> Cache {
    use sha2::{Digest, Sha256};
    let key = match &spec.key {
        CacheKey::Literal(key) => key.clone(),
        CacheKey::Files { files, prefix } => {
            let mut hash = Sha256::new();
            for file in files {
                hash.update(file.as_bytes());
                hash.update([0]);
                hash.update(std::fs::read(project_dir.join(file)).unwrap_or_default());
                hash.update([0]);
            }
            let digest = hex::encode(hash.finalize());
            match prefix {
                Some(prefix) => format!("{prefix}-{}", &digest[..40]),
                None => digest[..40].to_owned(),
            }
        }
    };
    Cache {
        key,
        untracked: spec.untracked,
        policy: match spec.policy.as_str() {
            "pull" => CachePolicy::Pull,
            "push" => CachePolicy::Push,
            _ => CachePolicy::PullPush,
        },
        paths: spec.paths.clone(),
        when: Some(match spec.when {
            ArtifactsWhen::OnSuccess => When::OnSuccess,
            ArtifactsWhen::OnFailure => When::OnFailure,
            ArtifactsWhen::Always => When::Always,
        }),
        fallback_keys: spec.fallback_keys.clone(),
    }
}

/// The job JSON for `job` (as GitLab's `POST jobs/request` returns it).
pub(crate) fn job_json(job: &PipelineJob, ctx: &JobContext<'_>) -> serde_json::Value {
    // Serializing plain data into a Value cannot fail.
    serde_json::to_value(job_payload(job, ctx)).unwrap_or_default()
}

fn job_payload(job: &PipelineJob, ctx: &JobContext<'_>) -> JobPayload {
    let var = |key: &str, value: &str| Variable {
        key: key.to_owned(),
        value: value.to_owned(),
        public: true,
        ..Default::default()
    };
    let mut variables: Vec<Variable> = ctx.predefined.iter().map(|(k, v)| var(k, v)).collect();
    let mut job_vars = vec![
        ("CI_JOB_ID", ctx.id.to_string()),
        ("CI_JOB_NAME", job.name.clone()),
        ("CI_JOB_STAGE", job.stage.clone()),
        ("CI_JOB_TOKEN", ctx.token.to_owned()),
        ("CI_PIPELINE_ID", ctx.pipeline_id.to_string()),
    ];
    if let Some((index, total)) = job.parallel_index {
        job_vars.push(("CI_NODE_INDEX", index.to_string()));
        job_vars.push(("CI_NODE_TOTAL", total.to_string()));
    }
    if let Some(image) = &job.image {
        job_vars.push(("CI_JOB_IMAGE", image.name.clone()));
    }
    for (key, value) in job_vars {
        let mut v = var(key, &value);
        if key == "CI_JOB_TOKEN" {
            v.public = false;
            v.masked = true;
        }
        variables.push(v);
    }
    // Ascending precedence, as GitLab sends them: the agent resolves each name to its last
    // definition before expanding anything.
    variables.extend(job.variables.iter().map(|(k, v)| Variable {
        raw: job.raw_variables.contains(k),
        ..var(k, v)
    }));
    variables.extend(ctx.cli_vars.iter().map(|(k, v)| var(k, v)));

    let timeout = job
        .timeout
        .map(|t| t.as_secs().max(1))
        .unwrap_or(DEFAULT_TIMEOUT_SECS);
    let mut steps = vec![Step {
        name: "script".into(),
        script: job
            .before_script
            .iter()
            .chain(&job.script)
            .cloned()
            .collect(),
        timeout: Some(timeout),
        when: When::OnSuccess,
        allow_failure: false,
    }];
    if !job.after_script.is_empty() {
        steps.push(Step {
            name: "after_script".into(),
            script: job.after_script.clone(),
            timeout: Some(timeout),
            when: When::Always,
            allow_failure: true,
        });
    }
    let artifacts = job
        .artifacts
        .iter()
        .filter(|a| !a.paths.is_empty() || a.untracked)
        .map(|a| Artifact {
            name: a.name.clone(),
            untracked: a.untracked,
            paths: a.paths.clone(),
            exclude: a.exclude.clone(),
            when: Some(match a.when {
                ArtifactsWhen::OnSuccess => When::OnSuccess,
                ArtifactsWhen::OnFailure => When::OnFailure,
                ArtifactsWhen::Always => When::Always,
            }),
            artifact_type: Some("archive".into()),
            artifact_format: Some("zip".into()),
            expire_in: a.expire_in.clone(),
        })
        .collect();
    let image = |spec: &crate::pipeline::ImageSpec| Image {
        name: spec.name.clone(),
        alias: spec.alias.clone(),
        command: spec.command.clone(),
        entrypoint: spec.entrypoint.clone(),
        variables: spec
            .variables
            .iter()
            .map(|(key, value)| ImageVariable {
                key: key.clone(),
                value: value.clone(),
            })
            .collect(),
        pull_policy: spec.pull_policy.clone(),
        executor_opts: Default::default(),
    };
    JobPayload {
        credentials: Vec::new(),
        id: ctx.id,
        token: ctx.token.to_owned(),
        allow_git_fetch: false,
        job_info: JobInfo {
            name: job.name.clone(),
            stage: job.stage.clone(),
            pipeline_id: Some(ctx.pipeline_id),
            project_id: None,
            project_name: ctx.project_name.to_owned(),
            project_full_path: Some(ctx.project_name.to_owned()),
            time_in_queue_seconds: None,
        },
        // No repository URL: the agent skips fetching, and the working tree arrives as the
        // first dependency archive instead (uncommitted changes included).
        git_info: Default::default(),
        runner_info: RunnerInfo {
            timeout: Some(timeout),
        },
        variables,
        steps,
        image: job.image.as_ref().map(image),
        services: job.services.iter().map(image).collect(),
        artifacts,
        cache: job
            .cache
            .iter()
            .map(|c| cache(c, ctx.project_dir))
            .collect(),
        dependencies: ctx
            .dependencies
            .iter()
            .map(|d| Dependency {
                id: d.id,
                token: ctx.token.to_owned(),
                name: d.name.clone(),
                artifacts_file: Some(ArtifactsFile {
                    filename: "artifacts.zip".into(),
                    size: d.size,
                }),
            })
            .collect(),
        hooks: Vec::new(),
        features: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::{ArtifactsSpec, JobWhen};
    use std::time::Duration;

    fn job() -> PipelineJob {
        PipelineJob {
            name: "test 2/3".into(),
            stage: "test".into(),
            image: Some(crate::pipeline::ImageSpec {
                name: "alpine:3".into(),
                ..Default::default()
            }),
            services: Vec::new(),
            variables: vec![
                ("GREETING".into(), "hi".into()),
                ("MODE".into(), "file".into()),
                ("LITERAL".into(), "$GREETING".into()),
            ],
            raw_variables: vec!["LITERAL".into()],
            before_script: vec!["echo before".into()],
            script: vec!["echo one".into(), "echo two".into()],
            after_script: vec!["echo after".into()],
            needs: None,
            dependencies: None,
            artifacts: Some(ArtifactsSpec {
                paths: vec!["out/".into()],
                exclude: vec!["out/*.tmp".into()],
                when: ArtifactsWhen::Always,
                expire_in: Some("1 week".into()),
                ..Default::default()
            }),
            cache: Vec::new(),
            allow_failure: false,
            when: JobWhen::OnSuccess,
            timeout: Some(Duration::from_secs(90)),
            parallel_index: Some((2, 3)),
        }
    }

    fn ctx<'a>(predefined: &'a [(String, String)], cli: &'a [(String, String)]) -> JobContext<'a> {
        JobContext {
            id: 4,
            token: "secret-token",
            pipeline_id: 77,
            project_name: "hello",
            project_dir: std::path::Path::new("/nonexistent"),
            predefined,
            cli_vars: cli,
            dependencies: vec![DependencyRef {
                id: 0,
                name: "sources".into(),
                size: 10,
            }],
        }
    }

    #[test]
    fn job_becomes_the_payload_the_agent_reads() {
        let predefined = vec![("CI".to_string(), "true".to_string())];
        let cli = vec![("MODE".to_string(), "cli".to_string())];
        let value = job_json(&job(), &ctx(&predefined, &cli));
        let payload: JobPayload = serde_json::from_value(value).unwrap();
        assert_eq!(payload.id, 4);
        assert_eq!(payload.token, "secret-token");
        assert_eq!(payload.job_info.name, "test 2/3");
        assert_eq!(payload.job_info.project_full_path.as_deref(), Some("hello"));
        assert_eq!(payload.timeout(), Duration::from_secs(90));
        assert!(payload.git_info.repo_url.is_empty());

        assert_eq!(payload.steps.len(), 2);
        assert_eq!(payload.steps[0].name, "script");
        assert_eq!(
            payload.steps[0].script,
            ["echo before", "echo one", "echo two"]
        );
        assert_eq!(payload.steps[1].name, "after_script");
        assert_eq!(payload.steps[1].when, When::Always);

        // Later definitions win: --var over the file over predefined.
        assert_eq!(payload.variable("MODE"), Some("cli"));
        assert_eq!(payload.variable("GREETING"), Some("hi"));
        assert_eq!(payload.variable("CI"), Some("true"));
        assert_eq!(payload.variable("CI_JOB_NAME"), Some("test 2/3"));
        assert_eq!(payload.variable("CI_JOB_STAGE"), Some("test"));
        assert_eq!(payload.variable("CI_NODE_INDEX"), Some("2"));
        assert_eq!(payload.variable("CI_NODE_TOTAL"), Some("3"));
        assert_eq!(payload.variable("CI_PIPELINE_ID"), Some("77"));
        let literal = payload.variables.iter().find(|v| v.key == "LITERAL");
        assert!(
            literal.is_some_and(|v| v.raw),
            "expand: false reaches the agent as raw"
        );
        assert!(
            payload
                .variables
                .iter()
                .filter(|v| v.key != "LITERAL")
                .all(|v| !v.raw)
        );
        let token = payload
            .variables
            .iter()
            .find(|v| v.key == "CI_JOB_TOKEN")
            .unwrap();
        assert!(token.masked && !token.public);

        assert_eq!(payload.artifacts.len(), 1);
        let artifact = &payload.artifacts[0];
        assert_eq!(artifact.paths, ["out/"]);
        assert_eq!(artifact.exclude, ["out/*.tmp"]);
        assert_eq!(artifact.when, Some(When::Always));
        assert_eq!(artifact.artifact_format.as_deref(), Some("zip"));

        assert_eq!(payload.dependencies.len(), 1);
        assert_eq!(payload.dependencies[0].id, 0);
        assert!(payload.dependencies[0].artifacts_file.is_some());
        assert_eq!(payload.image.unwrap().name, "alpine:3");
    }

    #[test]
    fn no_after_script_and_no_artifact_paths_give_no_step_and_no_upload() {
        let mut job = job();
        job.after_script.clear();
        job.artifacts = Some(ArtifactsSpec::default());
        job.timeout = None;
        job.parallel_index = None;
        let payload: JobPayload = serde_json::from_value(job_json(&job, &ctx(&[], &[]))).unwrap();
        assert_eq!(payload.steps.len(), 1);
        assert!(payload.artifacts.is_empty());
        assert_eq!(payload.timeout(), Duration::from_secs(3600));
        assert_eq!(payload.variable("CI_NODE_INDEX"), None);
    }
}
