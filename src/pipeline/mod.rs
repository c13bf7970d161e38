//! The `.gitlab-ci.yml` reader behind `kiln exec`: a pipeline file in, GitLab's job list out.
//!
//! Reading follows GitLab's order of work: YAML (anchors, `<<`), `include: local`, `extends`,
//! `!reference`, then per job `default:` and global variables, `parallel` expansion and `rules`.
//! Nothing is executed here. Keywords kiln does not act on are reported as [`Warning`]s rather
//! than dropped silently.

mod build;
mod context;
mod duration;
mod expr;
mod extends;
mod include;
mod job;
mod needs;
mod parallel;
mod reference;
mod rules;
mod vars;
mod yaml;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use self::build::Builder;
use self::rules::{RepoFiles, Scope};

/// A pipeline as GitLab would create it from the file and the given variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pipeline {
    /// All stages in order, `.pre` first and `.post` last.
    pub stages: Vec<String>,
    /// The jobs, by stage order and then file order (includes first, as merged).
    pub jobs: Vec<PipelineJob>,
    /// What kiln will not do that the file asks for (unsupported keywords, includes, …).
    pub warnings: Vec<Warning>,
    /// `Some(why)` when `workflow:rules` say GitLab creates no pipeline for these variables;
    /// `why` names the rule that decided (or says that none matched).
    pub no_pipeline: Option<String>,
}

impl Pipeline {
    /// The job named `name` (`test 1/3`, `build: [linux, amd64]`, …).
    pub fn job(&self, name: &str) -> Option<&PipelineJob> {
        self.jobs.iter().find(|job| job.name == name)
    }
}

/// One job of the pipeline, with `extends`, `default:`, variables, `parallel` and `rules` applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineJob {
    /// GitLab's name, expanded for parallel jobs: `test 1/3`, `build: [linux, amd64]`.
    pub name: String,
    /// The stage.
    pub stage: String,
    /// The image, from the job or `default:`.
    pub image: Option<ImageSpec>,
    /// Service containers, from the job or `default:`.
    pub services: Vec<ImageSpec>,
    /// The file's variables for this job: global (as `inherit:variables` allows), then the
    /// job's, the matrix combination's and the matching rule's, a later definition replacing
    /// an earlier one in place. Predefined `CI_*` and `--var` variables are not included.
    pub variables: Vec<(String, String)>,
    /// The names among `variables` written with `expand: false`: their values are used as
    /// written.
    pub raw_variables: Vec<String>,
    /// `before_script`, from the job or `default:`.
    pub before_script: Vec<String>,
    /// `script`, nested lists flattened.
    pub script: Vec<String>,
    /// `after_script`, from the job or `default:`.
    pub after_script: Vec<String>,
    /// `None`: the job waits for the earlier stages. `Some(vec![])`: it starts at once.
    /// Otherwise the jobs it waits for, parallel base names expanded to every instance.
    pub needs: Option<Vec<Need>>,
    /// `None`: artifacts of all jobs of earlier stages (or of all `needs`). Otherwise only
    /// these jobs' artifacts.
    pub dependencies: Option<Vec<String>>,
    /// What the job uploads.
    pub artifacts: Option<ArtifactsSpec>,
    /// `cache:` entries.
    pub cache: Vec<CacheSpec>,
    /// A failure does not fail the pipeline.
    pub allow_failure: bool,
    /// When the job runs.
    pub when: JobWhen,
    /// The job's own timeout, from the job or `default:`.
    pub timeout: Option<Duration>,
    /// `(CI_NODE_INDEX, CI_NODE_TOTAL)` for instances of a `parallel` job.
    pub parallel_index: Option<(u32, u32)>,
}

/// A job another job waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need {
    /// The job's (expanded) name.
    pub job: String,
    /// Whether its artifacts are downloaded (`needs: [{job: x, artifacts: false}]` says no).
    pub artifacts: bool,
}

/// An `image` or one of `services`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ImageSpec {
    /// The image reference.
    pub name: String,
    /// Entrypoint override; empty keeps the image's.
    pub entrypoint: Vec<String>,
    /// Command override (services); empty keeps the image's.
    pub command: Vec<String>,
    /// Network alias (services).
    pub alias: Option<String>,
    /// `pull_policy` values in order of preference; empty leaves it to the executor.
    pub pull_policy: Vec<String>,
    /// Service variables.
    pub variables: Vec<(String, String)>,
}

/// One `cache:` entry of a job.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CacheSpec {
    /// `key:`.
    pub key: CacheKey,
    /// Glob patterns relative to the project directory.
    pub paths: Vec<String>,
    /// Include files git does not track.
    pub untracked: bool,
    /// `pull`, `push` or `pull-push`.
    pub policy: String,
    /// When to save it.
    pub when: ArtifactsWhen,
    /// Keys to restore from when `key` has none.
    pub fallback_keys: Vec<String>,
}

/// `cache:key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheKey {
    /// A key as written (may hold `$VARIABLES`).
    Literal(String),
    /// `key: {files: [...], prefix: ...}`: named after the files' contents.
    Files {
        /// The files (at most two, as GitLab allows).
        files: Vec<String>,
        /// Put before the hash.
        prefix: Option<String>,
    },
}

impl Default for CacheKey {
    fn default() -> Self {
        Self::Literal("default".into())
    }
}

/// `artifacts:` of a job.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ArtifactsSpec {
    /// Glob patterns relative to the project directory.
    pub paths: Vec<String>,
    /// Patterns left out.
    pub exclude: Vec<String>,
    /// Include files git does not track.
    pub untracked: bool,
    /// When to upload.
    pub when: ArtifactsWhen,
    /// How long GitLab would keep them (`1 week`), as written.
    pub expire_in: Option<String>,
    /// Archive name, as written (may hold `$VARIABLES`).
    pub name: Option<String>,
}

/// `artifacts:when`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ArtifactsWhen {
    /// Only when the job succeeds.
    #[default]
    OnSuccess,
    /// Only when it fails.
    OnFailure,
    /// Either way.
    Always,
}

/// When a job runs, after `rules`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum JobWhen {
    /// When all jobs it waits for succeeded (or were allowed to fail).
    #[default]
    OnSuccess,
    /// When a job it waits for failed.
    OnFailure,
    /// Whatever happened before.
    Always,
    /// Only when started by hand (`kiln exec --job NAME`).
    Manual,
    /// A rule said `when: never`: GitLab leaves the job out of the pipeline. It is listed so
    /// `kiln exec` can say why it does not run; nothing may need it.
    Never,
}

/// Something in the file that kiln exec does not do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// The job it concerns, or `None` for a global keyword.
    pub job: Option<String>,
    /// The keyword, with its parents for nested ones (`artifacts:reports`, `include:remote`).
    pub key: String,
    /// What happens instead.
    pub message: String,
}

impl Warning {
    pub(crate) fn global(key: &str, message: impl Into<String>) -> Self {
        Self {
            job: None,
            key: key.to_string(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.job {
            Some(job) => write!(f, "job `{job}`: `{}`: {}", self.key, self.message),
            None => write!(f, "`{}`: {}", self.key, self.message),
        }
    }
}

/// Why a pipeline file cannot be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineError {
    /// The pipeline file cannot be read.
    #[error("cannot read pipeline file {}; check the path", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid YAML.
    #[error("{file}:{line}:{column}: invalid YAML: {message}")]
    Yaml {
        /// The file (the main file or an included one).
        file: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// The parser's description.
        message: String,
    },
    /// A global keyword (or the file's shape) is wrong.
    #[error("`{key}`: {message}")]
    Config {
        /// The keyword, or the file when the whole file is wrong.
        key: String,
        /// What is wrong and what to write instead.
        message: String,
    },
    /// An `include` cannot be read.
    #[error("{file}: include `{include}`: {message}")]
    Include {
        /// The including file.
        file: String,
        /// The include as written.
        include: String,
        /// What is wrong.
        message: String,
    },
    /// The file defines no job that could run.
    #[error(
        "{file} defines no jobs; add a job with a `script` (names starting with `.` are hidden templates)"
    )]
    NoJobs {
        /// The pipeline file.
        file: String,
    },
    /// A job keyword has a value kiln cannot read.
    #[error("job `{job}`: `{key}`: {message}")]
    Job {
        /// The job.
        job: String,
        /// The keyword.
        key: String,
        /// What is wrong and what to write instead.
        message: String,
    },
    /// A key GitLab does not know, at any level of the file.
    #[error("{file}:{line}:{column}: {place}: unknown key `{key}`{}", did_you_mean(.suggestion))]
    UnknownKey {
        /// The file that holds it (the main file or an included one).
        file: String,
        /// 1-based line of the key.
        line: u32,
        /// 1-based column of the key.
        column: u32,
        /// Where it is: ``job `build` ``, `` `default` ``, `the top level`.
        place: String,
        /// The key, with its parents inside `place` (`artifacts:pathz`).
        key: String,
        /// The known key it is probably a typo of.
        suggestion: Option<String>,
        /// The keys from the top of the file down to it (`*`: any list item), to find it by.
        keys: Box<[String]>,
    },
    /// A key appears twice in one mapping.
    #[error("{file}:{line}:{column}: duplicate key `{key}`; a key may appear once in a mapping")]
    DuplicateKey {
        /// The file.
        file: String,
        /// 1-based line of the second occurrence.
        line: usize,
        /// 1-based column of the second occurrence.
        column: usize,
        /// The key.
        key: String,
    },
    /// A job has neither `script` nor `trigger`.
    #[error("job `{job}` has no `script`; add one (or `extends:` a template that has one)")]
    NoScript {
        /// The job.
        job: String,
    },
    /// A job's stage is not in `stages`.
    #[error(
        "job `{job}` uses stage `{stage}`, which is not defined; add it to `stages` (defined: {available})"
    )]
    UnknownStage {
        /// The job.
        job: String,
        /// The stage it names.
        stage: String,
        /// The defined stages, comma-separated.
        available: String,
    },
    /// `extends` names a job or template that does not exist.
    #[error(
        "job `{job}` extends `{target}`, which is not defined; check the name (templates start with `.`)"
    )]
    UnknownExtends {
        /// The extending job.
        job: String,
        /// The missing parent.
        target: String,
    },
    /// `extends` loops.
    #[error("`extends` forms a cycle: {chain}; remove one of these `extends`")]
    ExtendsCycle {
        /// The jobs in the cycle, joined by arrows.
        chain: String,
    },
    /// An `extends` chain is longer than GitLab allows.
    #[error(
        "job `{job}` inherits through more than {limit} levels of `extends`; flatten the chain"
    )]
    ExtendsTooDeep {
        /// The job.
        job: String,
        /// The limit.
        limit: usize,
    },
    /// A `!reference` points to nothing.
    #[error(
        "job `{job}`: `!reference [{reference}]` points to nothing; check the job and key names"
    )]
    UnknownReference {
        /// The job (or global keyword) holding the reference.
        job: String,
        /// The reference's path.
        reference: String,
    },
    /// `!reference`s loop.
    #[error("job `{job}`: `!reference [{reference}]` is part of a cycle of references")]
    ReferenceCycle {
        /// The job (or global keyword) holding the reference.
        job: String,
        /// The reference that closes the cycle.
        reference: String,
    },
    /// `!reference`s nest deeper than GitLab allows.
    #[error("job `{job}`: `!reference [{reference}]` nests more than {limit} references deep")]
    ReferenceTooDeep {
        /// The job (or global keyword) holding the reference.
        job: String,
        /// The innermost reference.
        reference: String,
        /// The limit.
        limit: usize,
    },
    /// `needs` names a job that does not exist.
    #[error("job `{job}` needs `{target}`, which is not defined; check the name")]
    UnknownNeed {
        /// The job.
        job: String,
        /// The missing job.
        target: String,
    },
    /// `needs` names a job of a later stage.
    #[error(
        "job `{job}` needs `{target}` of the later stage `{stage}`; a job can only need jobs of its own or earlier stages"
    )]
    NeedInLaterStage {
        /// The job.
        job: String,
        /// The needed job.
        target: String,
        /// The needed job's stage.
        stage: String,
    },
    /// `needs` names a job that `rules` leave out of this pipeline.
    #[error(
        "job `{job}` needs `{target}`, which its rules leave out of this pipeline; mark the need `optional: true` or change the rules"
    )]
    NeedNotInPipeline {
        /// The job.
        job: String,
        /// The absent job.
        target: String,
    },
    /// `needs` loop.
    #[error("`needs` form a cycle: {chain}; remove one of these needs")]
    NeedsCycle {
        /// The jobs in the cycle, joined by arrows.
        chain: String,
    },
    /// `dependencies` names a job that does not exist.
    #[error(
        "job `{job}` lists `{target}` in `dependencies`, but it is not defined; check the name"
    )]
    UnknownDependency {
        /// The job.
        job: String,
        /// The missing job.
        target: String,
    },
    /// `dependencies` names a job that does not run before this one.
    #[error(
        "job `{job}` lists `{target}` in `dependencies`, but it is not in an earlier stage{hint}"
    )]
    DependencyNotEarlier {
        /// The job.
        job: String,
        /// The named job.
        target: String,
        /// What to do instead.
        hint: &'static str,
    },
    /// A `rules:if` expression does not parse.
    #[error("job `{job}`: rules:if `{expression}` is not a valid expression: {reason}")]
    BadRule {
        /// The job.
        job: String,
        /// The expression as written.
        expression: String,
        /// What is wrong.
        reason: String,
    },
}

fn did_you_mean(suggestion: &Option<String>) -> String {
    suggestion
        .as_ref()
        .map(|s| format!("; did you mean `{s}`?"))
        .unwrap_or_default()
}

/// Reads the pipeline in the file at `path`, evaluating `rules` against `vars`.
///
/// Local includes and `rules:exists` are resolved relative to the file's directory; use
/// [`parse_str`] to name another repository root.
///
/// # Errors
/// The file cannot be read, or see [`parse_str`].
pub fn load(path: &Path, vars: &[(String, String)]) -> Result<Pipeline, PipelineError> {
    let text = std::fs::read_to_string(path).map_err(|source| PipelineError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let base_dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    parse_str(&text, &path.display().to_string(), base_dir, vars)
}

/// Reads the pipeline in `yaml` (named `file_name` in messages). Local includes and
/// `rules:exists` are resolved under `base_dir`, the repository root.
///
/// `vars` are the variables `rules:if` sees besides the file's own: the predefined `CI_*`
/// variables and `--var` overrides. They take precedence over the file's variables, as
/// pipeline variables do in GitLab. `include` paths may use them too.
///
/// # Errors
/// Invalid YAML (naming file, line and column); an unknown `extends`, `needs` or
/// `dependencies` target, a cycle, a job without `script`, a job in an undefined stage or an
/// invalid `rules:if` (each naming the job); an unreadable include.
///
/// # Caveats
/// Only `include: local` is read; `only`/`except` are not evaluated (the job runs);
/// `rules:changes` counts as changed. Each of these yields a [`Warning`].
pub fn parse_str(
    yaml: &str,
    file_name: &str,
    base_dir: &Path,
    vars: &[(String, String)],
) -> Result<Pipeline, PipelineError> {
    let mut sources = vec![(file_name.to_string(), yaml.to_string())];
    let mut merged = serde_yaml_ng::Mapping::new();
    read(yaml, file_name, base_dir, vars, &mut sources, &mut merged)
        .map_err(|e| position(e, &sources, &merged))
}

/// [`parse_str`]'s work; `sources` collects every file read (name and text) and `merged` the
/// configuration before `extends`, so that an error can be placed in the file afterwards.
fn read(
    yaml: &str,
    file_name: &str,
    base_dir: &Path,
    vars: &[(String, String)],
    sources: &mut Vec<(String, String)>,
    merged: &mut serde_yaml_ng::Mapping,
) -> Result<Pipeline, PipelineError> {
    let mut warnings = Vec::new();
    let mut repo = RepoFiles::new(base_dir);
    let mut caller = Scope::default();
    for (key, value) in vars {
        caller.set(key, value, false);
    }
    let root = yaml::load(yaml, file_name, &mut warnings)?;
    let mut includes = include::Includes::new(&mut repo, &caller, &mut warnings);
    let resolved = includes.resolve(root, file_name, 0);
    sources.extend(includes.into_sources());
    let mut config = resolved?;
    *merged = config.clone();
    extends::resolve(&mut config)?;
    reference::resolve(&mut config, &mut warnings)?;
    Builder {
        file: file_name,
        vars,
        repo,
        warnings,
    }
    .build(&config)
}

/// Fills in where an unknown key is: the first file (main file first) that has it under the
/// job itself or under one of the templates it `extends`; failing that, where the job is.
fn position(
    error: PipelineError,
    sources: &[(String, String)],
    merged: &serde_yaml_ng::Mapping,
) -> PipelineError {
    let PipelineError::UnknownKey {
        place,
        key,
        suggestion,
        keys,
        ..
    } = error
    else {
        return error;
    };
    let roots = match keys.first() {
        Some(first) => extends::lineage(merged, first),
        None => Vec::new(),
    };
    let candidates = roots
        .iter()
        .map(|root| {
            let mut path = keys.to_vec();
            path[0] = root.clone();
            path
        })
        .chain(keys.first().map(|first| vec![first.clone()]));
    let mut found = None;
    'search: for path in candidates {
        for (file, text) in sources {
            if let Some((line, column)) = yaml::locate(text, &path) {
                let number = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
                found = Some((file.clone(), number(line), number(column)));
                break 'search;
            }
        }
    }
    let (file, line, column) = found.unwrap_or_else(|| {
        (
            sources.first().map(|s| s.0.clone()).unwrap_or_default(),
            1,
            1,
        )
    });
    PipelineError::UnknownKey {
        file,
        line,
        column,
        place,
        key,
        suggestion,
        keys,
    }
}

#[cfg(test)]
mod tests;
