//! One job's keywords (and `default:`'s), read from the resolved YAML into typed definitions.

use std::time::Duration;

use serde_yaml_ng::{Mapping, Value};

use super::context::Context;
use super::needs::{NeedDef, parse_needs};
use super::parallel::{self, Parallel};
use super::rules::{Rule, parse_rules, parse_when};
use super::vars::{Var, parse_variables};
use super::yaml::{describe, key_string, scalar_string};
use super::{
    ArtifactsSpec, ArtifactsWhen, CacheKey, CacheSpec, ImageSpec, JobWhen, PipelineError, Warning,
    duration,
};

/// Scripts may nest lists (from anchors and `!reference`) this deep.
const MAX_SCRIPT_NESTING: usize = 10;

/// `inherit:default` or `inherit:variables`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) enum Inherit {
    #[default]
    All,
    Nothing,
    Only(Vec<String>),
}

impl Inherit {
    pub(crate) fn allows(&self, key: &str) -> bool {
        match self {
            Inherit::All => true,
            Inherit::Nothing => false,
            Inherit::Only(keys) => keys.iter().any(|k| k == key),
        }
    }
}

/// The `default:` keywords kiln uses (plus the deprecated top-level forms).
#[derive(Debug, Clone, Default)]
pub(crate) struct Defaults {
    pub(crate) image: Option<ImageSpec>,
    pub(crate) services: Option<Vec<ImageSpec>>,
    pub(crate) before_script: Option<Vec<String>>,
    pub(crate) after_script: Option<Vec<String>>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) artifacts: Option<ArtifactsSpec>,
    pub(crate) cache: Option<Vec<CacheSpec>>,
}

/// A job as written (after `extends` and `!reference`), before defaults, `parallel` and rules.
#[derive(Debug, Clone, Default)]
pub(crate) struct JobDef {
    pub(crate) name: String,
    pub(crate) stage: String,
    pub(crate) image: Option<ImageSpec>,
    pub(crate) services: Option<Vec<ImageSpec>>,
    pub(crate) variables: Vec<Var>,
    pub(crate) before_script: Option<Vec<String>>,
    pub(crate) script: Vec<String>,
    pub(crate) after_script: Option<Vec<String>>,
    pub(crate) needs: Option<Vec<NeedDef>>,
    pub(crate) dependencies: Option<Vec<String>>,
    pub(crate) artifacts: Option<ArtifactsSpec>,
    pub(crate) cache: Option<Vec<CacheSpec>>,
    pub(crate) allow_failure: Option<bool>,
    pub(crate) when: Option<JobWhen>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) parallel: Parallel,
    pub(crate) rules: Option<Vec<Rule>>,
    pub(crate) inherit_default: Inherit,
    pub(crate) inherit_variables: Inherit,
}

/// Every job keyword GitLab knows, for suggestions when a key is not one of them.
pub(crate) const JOB_KEYWORDS: &[&str] = &[
    "after_script",
    "allow_failure",
    "artifacts",
    "before_script",
    "cache",
    "coverage",
    "dast_configuration",
    "dependencies",
    "environment",
    "except",
    "extends",
    "hooks",
    "id_tokens",
    "identity",
    "image",
    "inherit",
    "interruptible",
    "manual_confirmation",
    "needs",
    "only",
    "pages",
    "parallel",
    "release",
    "resource_group",
    "retry",
    "rules",
    "run",
    "script",
    "secrets",
    "services",
    "stage",
    "start_in",
    "tags",
    "timeout",
    "trigger",
    "variables",
    "when",
];

/// Reads job `name` from its mapping. Keywords kiln does not run are reported in `warnings`.
///
/// # Errors
/// A keyword of the wrong shape, or no `script`.
pub(crate) fn parse_job(
    name: &str,
    map: &Mapping,
    warnings: &mut Vec<Warning>,
) -> Result<JobDef, PipelineError> {
    let ctx = Context::Job(name);
    let mut job = JobDef {
        name: name.to_string(),
        stage: "test".into(),
        ..JobDef::default()
    };
    let mut script = None;
    for (key, value) in map {
        let Some(key) = key_string(key) else {
            return Err(ctx.error("?", format!("keys must be keywords, not {}", describe(key))));
        };
        if value.is_null() {
            continue;
        }
        let lines = |key: &str| script_lines(value).map(Some).map_err(|m| ctx.error(key, m));
        match key.as_str() {
            "stage" => {
                job.stage =
                    string(value).ok_or_else(|| ctx.error("stage", "must be a stage name"))?;
            }
            "script" => script = lines("script")?,
            "before_script" => job.before_script = lines("before_script")?,
            "after_script" => job.after_script = lines("after_script")?,
            "image" => job.image = Some(parse_image(value, &ctx, "image", false, warnings)?),
            "services" => job.services = Some(parse_services(value, &ctx, warnings)?),
            "variables" => job.variables = parse_variables(value, &ctx, &[], false, warnings)?,
            "needs" => job.needs = Some(parse_needs(value, &ctx, &[], warnings)?),
            "dependencies" => {
                let names = string_list(value).map_err(|m| ctx.error("dependencies", m))?;
                job.dependencies = Some(names);
            }
            "artifacts" => job.artifacts = Some(parse_artifacts(value, &ctx, warnings)?),
            "cache" => job.cache = Some(parse_cache(value, &ctx)?),
            "allow_failure" => {
                job.allow_failure = Some(parse_allow_failure(value, &ctx, warnings)?);
            }
            "when" => {
                if value.as_str() == Some("delayed") {
                    warnings.push(ctx.warning("when", "`delayed` jobs start without delay"));
                }
                job.when = Some(parse_when(value, false).map_err(|m| ctx.error("when", m))?);
            }
            "timeout" => {
                job.timeout = Some(parse_timeout(value).map_err(|m| ctx.error("timeout", m))?);
            }
            "parallel" => {
                job.parallel = parallel::parse(value).map_err(|m| ctx.error("parallel", m))?;
            }
            "rules" => job.rules = Some(parse_rules(value, &ctx, warnings)?),
            "inherit" => {
                (job.inherit_default, job.inherit_variables) = parse_inherit(value, &ctx)?;
            }
            "extends" | "trigger" => {}
            other if JOB_KEYWORDS.contains(&other) => {
                warnings.push(ctx.warning(other, unsupported(other)))
            }
            other => return Err(ctx.unknown(&[], other, JOB_KEYWORDS)),
        }
    }
    job.script = match script {
        Some(lines) if !lines.is_empty() => lines,
        _ => {
            return Err(PipelineError::NoScript {
                job: name.to_string(),
            });
        }
    };
    Ok(job)
}

/// What kiln exec does instead of job keyword `key`, which it does not act on.
fn unsupported(key: &str) -> &'static str {
    match key {
        "only" | "except" => {
            "not supported by kiln exec: the job runs as if it matched; use `rules` instead"
        }
        "start_in" => "kiln exec does not delay jobs",
        "secrets" => "secrets are not fetched by kiln exec; the job gets no such variables",
        "id_tokens" => "kiln exec issues no ID tokens; the job gets no such variables",
        "identity" => "kiln exec sets up no identity federation",
        "hooks" => "hooks (pre_get_sources_script) are not run by kiln exec",
        "release" => "kiln exec creates no release",
        "pages" => "kiln exec publishes no Pages site",
        "run" => "CI steps (`run`) are not supported by kiln exec",
        _ => "ignored by kiln exec",
    }
}

/// The keywords `default:` may hold.
const DEFAULT_KEYWORDS: &[&str] = &[
    "after_script",
    "artifacts",
    "before_script",
    "cache",
    "hooks",
    "id_tokens",
    "identity",
    "image",
    "interruptible",
    "retry",
    "services",
    "tags",
    "timeout",
];

/// The keys of an `image` (the last three only for `services`).
const IMAGE_KEYS: &[&str] = &[
    "name",
    "entrypoint",
    "pull_policy",
    "docker",
    "kubernetes",
    "command",
    "alias",
    "variables",
];

/// The keys of `artifacts`.
const ARTIFACTS_KEYS: &[&str] = &[
    "paths",
    "exclude",
    "untracked",
    "when",
    "expire_in",
    "name",
    "reports",
    "expose_as",
    "public",
    "access",
];

/// Reads `default:` (and the deprecated top-level `image`, `services`, `before_script`,
/// `after_script`, `cache`, passed in `legacy`, which `default:` overrides).
pub(crate) fn parse_defaults(
    default: Option<&Mapping>,
    legacy: &Mapping,
    warnings: &mut Vec<Warning>,
) -> Result<Defaults, PipelineError> {
    let mut defaults = Defaults::default();
    let sources = [
        (Context::Global, Some(legacy)),
        (Context::Keyword("default"), default),
    ];
    for (ctx, map) in sources {
        for (key, value) in map.into_iter().flatten() {
            let key = key_string(key).unwrap_or_default();
            if value.is_null() {
                continue;
            }
            match key.as_str() {
                "image" => {
                    defaults.image = Some(parse_image(value, &ctx, "image", false, warnings)?)
                }
                "services" => defaults.services = Some(parse_services(value, &ctx, warnings)?),
                "before_script" => {
                    defaults.before_script =
                        Some(script_lines(value).map_err(|m| ctx.error("before_script", m))?);
                }
                "after_script" => {
                    defaults.after_script =
                        Some(script_lines(value).map_err(|m| ctx.error("after_script", m))?);
                }
                "timeout" => {
                    defaults.timeout =
                        Some(parse_timeout(value).map_err(|m| ctx.error("timeout", m))?)
                }
                "artifacts" => defaults.artifacts = Some(parse_artifacts(value, &ctx, warnings)?),
                "cache" => defaults.cache = Some(parse_cache(value, &ctx)?),
                "interruptible" | "retry" | "tags" => {
                    warnings.push(ctx.warning(&key, "ignored by kiln exec"))
                }
                "hooks" => warnings.push(ctx.warning(
                    &key,
                    "hooks (pre_get_sources_script) are not run by kiln exec",
                )),
                "id_tokens" => warnings.push(ctx.warning(
                    &key,
                    "kiln exec issues no ID tokens; jobs get no such variables",
                )),
                "identity" => {
                    warnings.push(ctx.warning(&key, "kiln exec sets up no identity federation"))
                }
                other => return Err(ctx.unknown(&[], other, DEFAULT_KEYWORDS)),
            }
        }
    }
    Ok(defaults)
}

fn string(value: &Value) -> Option<String> {
    scalar_string(value)
}

fn string_list(value: &Value) -> Result<Vec<String>, String> {
    match value {
        Value::Sequence(items) => items
            .iter()
            .map(|v| {
                scalar_string(v).ok_or_else(|| format!("must list names, not {}", describe(v)))
            })
            .collect(),
        other => Err(format!("must be a list, not {}", describe(other))),
    }
}

/// `string_list`, also accepting a single string.
fn one_or_list(value: &Value) -> Result<Vec<String>, String> {
    match value {
        Value::String(s) => Ok(vec![s.clone()]),
        other => string_list(other),
    }
}

/// A script: a string or a list of strings, nested lists flattened (GitLab allows ten levels).
pub(crate) fn script_lines(value: &Value) -> Result<Vec<String>, String> {
    fn walk(value: &Value, out: &mut Vec<String>, depth: usize) -> Result<(), String> {
        match value {
            Value::String(s) => out.push(s.clone()),
            Value::Sequence(items) if depth < MAX_SCRIPT_NESTING => {
                for item in items {
                    walk(item, out, depth + 1)?;
                }
            }
            Value::Sequence(_) => {
                return Err(format!(
                    "lists are nested more than {MAX_SCRIPT_NESTING} levels deep"
                ));
            }
            Value::Mapping(map) => {
                let first = map.keys().next().and_then(key_string).unwrap_or_default();
                return Err(format!(
                    "line {} is a mapping (`{first}: …`); quote lines that contain `: `",
                    out.len() + 1
                ));
            }
            other => {
                return Err(format!(
                    "line {} is {}; script lines must be strings (quote it)",
                    out.len() + 1,
                    describe(other)
                ));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(value, &mut out, 0)?;
    Ok(out)
}

fn parse_image(
    value: &Value,
    ctx: &Context<'_>,
    key: &str,
    service: bool,
    warnings: &mut Vec<Warning>,
) -> Result<ImageSpec, PipelineError> {
    let map = match value {
        Value::String(name) => {
            return Ok(ImageSpec {
                name: name.clone(),
                ..ImageSpec::default()
            });
        }
        Value::Mapping(map) => map,
        other => {
            return Err(ctx.error(
                key,
                format!(
                    "must be an image name or a mapping with `name`, not {}",
                    describe(other)
                ),
            ));
        }
    };
    // Where this image sits, for locating unknown keys: `image`, or any of `services`.
    let at: Vec<&str> = if service { vec![key, "*"] } else { vec![key] };
    let mut image = ImageSpec::default();
    for (field, value) in map {
        let field = key_string(field).unwrap_or_default();
        let list = |v: &Value| one_or_list(v).map_err(|m| ctx.error(&format!("{key}:{field}"), m));
        match field.as_str() {
            "name" => {
                image.name = string(value)
                    .ok_or_else(|| ctx.error(&format!("{key}:name"), "must be a string"))?;
            }
            "entrypoint" => image.entrypoint = list(value)?,
            "pull_policy" => image.pull_policy = list(value)?,
            "command" if service => image.command = list(value)?,
            "alias" if service => {
                image.alias = Some(
                    string(value)
                        .ok_or_else(|| ctx.error(&format!("{key}:alias"), "must be a string"))?,
                );
            }
            "variables" if service => {
                image.variables = parse_variables(value, ctx, &at, false, warnings)?
                    .into_iter()
                    .map(|v| (v.key, v.value))
                    .collect();
            }
            "docker" | "kubernetes" => {
                warnings.push(ctx.warning(&format!("{key}:{field}"), "ignored by kiln exec"))
            }
            other => {
                let known = if service {
                    IMAGE_KEYS
                } else {
                    &IMAGE_KEYS[..5]
                };
                return Err(ctx.unknown(&at, other, known));
            }
        }
    }
    if image.name.is_empty() {
        return Err(ctx.error(key, "the mapping form needs a `name`"));
    }
    Ok(image)
}

fn parse_services(
    value: &Value,
    ctx: &Context<'_>,
    warnings: &mut Vec<Warning>,
) -> Result<Vec<ImageSpec>, PipelineError> {
    match value {
        Value::Sequence(items) => items
            .iter()
            .map(|item| parse_image(item, ctx, "services", true, warnings))
            .collect(),
        other => Err(ctx.error(
            "services",
            format!("must be a list, not {}", describe(other)),
        )),
    }
}

fn parse_artifacts(
    value: &Value,
    ctx: &Context<'_>,
    warnings: &mut Vec<Warning>,
) -> Result<ArtifactsSpec, PipelineError> {
    let Value::Mapping(map) = value else {
        return Err(ctx.error(
            "artifacts",
            format!("must be a mapping, not {}", describe(value)),
        ));
    };
    let mut spec = ArtifactsSpec::default();
    for (field, value) in map {
        let field = key_string(field).unwrap_or_default();
        let err = |m: String| ctx.error(&format!("artifacts:{field}"), m);
        if value.is_null() {
            continue;
        }
        match field.as_str() {
            "paths" => spec.paths = one_or_list(value).map_err(err)?,
            "exclude" => spec.exclude = one_or_list(value).map_err(err)?,
            "untracked" => spec.untracked = flag(value).map_err(err)?,
            "when" => spec.when = upload_when(value).map_err(err)?,
            "expire_in" => {
                spec.expire_in = Some(
                    string(value).ok_or_else(|| err("must be a duration like `1 week`".into()))?,
                )
            }
            "name" => {
                spec.name = Some(string(value).ok_or_else(|| err("must be a string".into()))?)
            }
            "reports" => {
                let kinds: Vec<String> = value
                    .as_mapping()
                    .into_iter()
                    .flatten()
                    .filter_map(|(k, _)| key_string(k))
                    .collect();
                warnings.push(ctx.warning(
                    "artifacts:reports",
                    format!("reports ({}) are not collected by kiln exec; list the files in `paths` to keep them", kinds.join(", ")),
                ));
            }
            "expose_as" | "public" | "access" => {
                warnings.push(ctx.warning(&format!("artifacts:{field}"), "ignored by kiln exec"))
            }
            other => return Err(ctx.unknown(&["artifacts"], other, ARTIFACTS_KEYS)),
        }
    }
    Ok(spec)
}

/// `untracked:` of artifacts and caches.
fn flag(value: &Value) -> Result<bool, String> {
    value
        .as_bool()
        .ok_or_else(|| format!("must be true or false, not {}", describe(value)))
}

/// `when:` of artifacts and caches.
fn upload_when(value: &Value) -> Result<ArtifactsWhen, String> {
    match value.as_str() {
        Some("on_success") => Ok(ArtifactsWhen::OnSuccess),
        Some("on_failure") => Ok(ArtifactsWhen::OnFailure),
        Some("always") => Ok(ArtifactsWhen::Always),
        _ => Err("must be on_success, on_failure or always".into()),
    }
}

/// The keys of a `cache` entry.
const CACHE_KEYS: &[&str] = &[
    "key",
    "paths",
    "untracked",
    "policy",
    "when",
    "fallback_keys",
    "unprotect",
];

/// `cache:`: one entry or a list of them.
fn parse_cache(value: &Value, ctx: &Context<'_>) -> Result<Vec<CacheSpec>, PipelineError> {
    match value {
        Value::Sequence(items) => items.iter().map(|v| parse_cache_entry(v, ctx)).collect(),
        other => Ok(vec![parse_cache_entry(other, ctx)?]),
    }
}

fn parse_cache_entry(value: &Value, ctx: &Context<'_>) -> Result<CacheSpec, PipelineError> {
    let Value::Mapping(map) = value else {
        return Err(ctx.error(
            "cache",
            format!("must be a mapping, not {}", describe(value)),
        ));
    };
    let mut spec = CacheSpec {
        policy: "pull-push".into(),
        ..CacheSpec::default()
    };
    for (field, value) in map {
        let field = key_string(field).unwrap_or_default();
        let err = |m: String| ctx.error(&format!("cache:{field}"), m);
        if value.is_null() {
            continue;
        }
        match field.as_str() {
            "key" => {
                spec.key = match value {
                    Value::Mapping(key) => {
                        let mut files = Vec::new();
                        let mut prefix = None;
                        for (k, v) in key {
                            match key_string(k).as_deref() {
                                Some("files") => files = one_or_list(v).map_err(&err)?,
                                Some("prefix") => prefix = string(v),
                                _ => return Err(err("takes `files` and `prefix`".into())),
                            }
                        }
                        if files.is_empty() || files.len() > 2 {
                            return Err(err("`files` must list one or two files".into()));
                        }
                        CacheKey::Files { files, prefix }
                    }
                    other => CacheKey::Literal(
                        string(other).ok_or_else(|| err("must be a string".into()))?,
                    ),
                }
            }
            "paths" => spec.paths = one_or_list(value).map_err(err)?,
            "fallback_keys" => spec.fallback_keys = one_or_list(value).map_err(err)?,
            "untracked" => spec.untracked = flag(value).map_err(err)?,
            "policy" => {
                spec.policy = match value.as_str() {
                    Some(p @ ("pull" | "push" | "pull-push")) => p.to_owned(),
                    _ => return Err(err("must be pull, push or pull-push".into())),
                };
            }
            "when" => spec.when = upload_when(value).map_err(err)?,
            // Protected-branch separation is GitLab's; kiln exec has one user.
            "unprotect" => {}
            other => return Err(ctx.unknown(&["cache"], other, CACHE_KEYS)),
        }
    }
    Ok(spec)
}

fn parse_allow_failure(
    value: &Value,
    ctx: &Context<'_>,
    warnings: &mut Vec<Warning>,
) -> Result<bool, PipelineError> {
    match value {
        Value::Bool(b) => Ok(*b),
        Value::Mapping(map) if map.contains_key("exit_codes") => {
            warnings.push(ctx.warning(
                "allow_failure:exit_codes",
                "kiln exec allows the job to fail with any exit code, not only the listed ones",
            ));
            Ok(true)
        }
        other => Err(ctx.error(
            "allow_failure",
            format!(
                "must be true, false or `exit_codes:`, not {}",
                describe(other)
            ),
        )),
    }
}

fn parse_timeout(value: &Value) -> Result<Duration, String> {
    let text = scalar_string(value)
        .ok_or_else(|| format!("must be a duration like `1h 30m`, not {}", describe(value)))?;
    duration::parse(&text).ok_or_else(|| {
        format!("`{text}` is not a duration; write it like `1h 30m` or `90 minutes`")
    })
}

fn parse_inherit(value: &Value, ctx: &Context<'_>) -> Result<(Inherit, Inherit), PipelineError> {
    let Value::Mapping(map) = value else {
        return Err(ctx.error(
            "inherit",
            format!(
                "must be a mapping with `default` and/or `variables`, not {}",
                describe(value)
            ),
        ));
    };
    let mut result = (Inherit::All, Inherit::All);
    for (key, value) in map {
        let key = key_string(key).unwrap_or_default();
        let inherit = match value {
            Value::Bool(true) | Value::Null => Inherit::All,
            Value::Bool(false) => Inherit::Nothing,
            list => Inherit::Only(
                string_list(list).map_err(|m| ctx.error(&format!("inherit:{key}"), m))?,
            ),
        };
        match key.as_str() {
            "default" => result.0 = inherit,
            "variables" => result.1 = inherit,
            other => return Err(ctx.unknown(&["inherit"], other, &["default", "variables"])),
        }
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(yaml: &str) -> Result<(JobDef, Vec<Warning>), PipelineError> {
        let map: Mapping = serde_yaml_ng::from_str(yaml).unwrap();
        let mut warnings = Vec::new();
        parse_job("j", &map, &mut warnings).map(|j| (j, warnings))
    }

    #[test]
    fn scripts_accept_strings_and_nested_lists() {
        let (j, _) = job("script: [a, [b, [c]], d]\nbefore_script: single\n").unwrap();
        assert_eq!(j.script, ["a", "b", "c", "d"]);
        assert_eq!(j.before_script, Some(vec!["single".to_string()]));
    }

    #[test]
    fn a_script_line_with_a_colon_gets_a_hint() {
        let err = job("script:\n  - echo ok\n  - echo key: value\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2 is a mapping"), "{err}");
        assert!(err.contains("job `j`"), "{err}");
    }

    #[test]
    fn missing_or_empty_script_is_an_error() {
        assert!(
            matches!(job("stage: build").unwrap_err(), PipelineError::NoScript { job } if job == "j")
        );
        assert!(matches!(
            job("script: []").unwrap_err(),
            PipelineError::NoScript { .. }
        ));
    }

    #[test]
    fn variables_in_both_forms() {
        let (j, _) = job("script: x\nvariables: {A: 1, B: {value: two, description: d}, C: true, D: {value: $A, expand: false}}").unwrap();
        let got: Vec<_> = j
            .variables
            .iter()
            .map(|v| (v.key.as_str(), v.value.as_str(), v.raw))
            .collect();
        assert_eq!(
            got,
            [
                ("A", "1", false),
                ("B", "two", false),
                ("C", "true", false),
                ("D", "$A", true)
            ]
        );
    }

    #[test]
    fn images_services_needs_and_artifacts() {
        let (j, w) = job(
            "
script: x
image: {name: 'node:20', entrypoint: ['']}
services: [postgres:16, {name: redis:7, alias: cache, command: [redis-server, --save, '']}]
needs: [a, {job: b, artifacts: false}, {job: c, optional: true}, {pipeline: other, job: d}]
artifacts: {paths: [dist/], exclude: ['dist/**/*.map'], when: always, expire_in: 1 week, reports: {junit: r.xml}}
",
        )
        .unwrap();
        assert_eq!(
            j.image
                .as_ref()
                .map(|i| (i.name.as_str(), i.entrypoint.clone())),
            Some(("node:20", vec![String::new()]))
        );
        let services = j.services.unwrap();
        assert_eq!(services[0].name, "postgres:16");
        assert_eq!(services[1].alias.as_deref(), Some("cache"));
        assert_eq!(services[1].command, ["redis-server", "--save", ""]);
        let needs = j.needs.unwrap();
        assert_eq!(needs.len(), 3, "the cross-pipeline need is left out");
        assert!(!needs[1].artifacts && needs[2].optional);
        let a = j.artifacts.unwrap();
        assert_eq!(
            (a.paths, a.exclude, a.when),
            (
                vec!["dist/".to_string()],
                vec!["dist/**/*.map".to_string()],
                ArtifactsWhen::Always
            )
        );
        let keys: Vec<_> = w.iter().map(|w| w.key.as_str()).collect();
        assert_eq!(keys, ["needs:pipeline", "artifacts:reports"]);
    }

    #[test]
    fn ignored_keywords_warn_and_unknown_ones_are_errors() {
        let (_, w) = job("script: x\ntags: [docker]\nonly: [main]\n").unwrap();
        let got: Vec<_> = w
            .iter()
            .map(|w| (w.job.as_deref(), w.key.as_str()))
            .collect();
        assert_eq!(got, [(Some("j"), "tags"), (Some("j"), "only")]);
        let err = job("scirpt: typo\nstage: test\n").unwrap_err();
        let PipelineError::UnknownKey {
            place,
            key,
            suggestion,
            keys,
            ..
        } = &err
        else {
            panic!("expected an unknown key, got {err:?}");
        };
        assert_eq!(
            (place.as_str(), key.as_str(), suggestion.as_deref()),
            ("job `j`", "scirpt", Some("script"))
        );
        assert_eq!(&keys[..], ["j", "scirpt"]);
        let err = job("script: x\nartifacts: {pathz: [a]}\n").unwrap_err();
        assert!(
            matches!(&err, PipelineError::UnknownKey { key, suggestion, .. }
                if key == "artifacts:pathz" && suggestion.as_deref() == Some("paths")),
            "{err:?}"
        );
    }

    #[test]
    fn cache_takes_one_entry_or_a_list_and_key_files() {
        let (j, w) =
            job("script: x\ncache: {key: deps, paths: [node_modules/], policy: pull}").unwrap();
        let caches = j.cache.unwrap();
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(caches[0].key, CacheKey::Literal("deps".into()));
        assert_eq!(caches[0].policy, "pull");
        let (j, _) = job("script: x\ncache: [{key: {files: [Gemfile.lock], prefix: gems}, paths: [vendor/], when: always, fallback_keys: [main]}, {paths: [.m2/]}]").unwrap();
        let caches = j.cache.unwrap();
        assert_eq!(
            caches[0].key,
            CacheKey::Files {
                files: vec!["Gemfile.lock".into()],
                prefix: Some("gems".into())
            }
        );
        assert_eq!(caches[0].when, ArtifactsWhen::Always);
        assert_eq!(caches[0].fallback_keys, ["main"]);
        assert_eq!(caches[1].policy, "pull-push");
        let err = job("script: x\ncache: {policy: sometimes}").unwrap_err();
        assert!(err.to_string().contains("cache:policy"), "{err}");
    }

    #[test]
    fn allow_failure_when_timeout_and_inherit() {
        let (j, w) = job("script: x\nallow_failure: {exit_codes: [3]}\nwhen: manual\ntimeout: 1h 30m\ninherit: {default: [image], variables: false}").unwrap();
        assert_eq!(j.allow_failure, Some(true));
        assert_eq!(w[0].key, "allow_failure:exit_codes");
        assert_eq!(j.when, Some(JobWhen::Manual));
        assert_eq!(j.timeout, Some(Duration::from_secs(5400)));
        assert!(j.inherit_default.allows("image") && !j.inherit_default.allows("services"));
        assert_eq!(j.inherit_variables, Inherit::Nothing);
        assert!(
            job("script: x\nwhen: never")
                .unwrap_err()
                .to_string()
                .contains("only valid inside `rules`")
        );
        assert!(
            job("script: x\ntimeout: soon")
                .unwrap_err()
                .to_string()
                .contains("not a duration")
        );
    }
}
