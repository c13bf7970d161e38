//! `needs:` entries, in jobs and in rules.

use serde_yaml_ng::Value;

use super::context::Context;
use super::parallel;
use super::yaml::describe;
use super::{PipelineError, Warning};

/// One entry of `needs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NeedDef {
    pub(crate) job: String,
    pub(crate) artifacts: bool,
    pub(crate) optional: bool,
    /// `parallel:matrix`: only these combinations of a matrix job.
    pub(crate) matrix: Option<Vec<Vec<(String, String)>>>,
}

/// The keys of a `needs` entry.
const NEED_KEYS: &[&str] = &[
    "job",
    "artifacts",
    "optional",
    "parallel",
    "pipeline",
    "project",
    "ref",
];

/// `needs`: names or mappings; cross-pipeline and cross-project needs earn a warning. `at` is
/// where the keyword sits under `ctx` (`[]` or `["rules", "*"]`), for locating unknown keys.
pub(crate) fn parse_needs(
    value: &Value,
    ctx: &Context<'_>,
    at: &[&str],
    warnings: &mut Vec<Warning>,
) -> Result<Vec<NeedDef>, PipelineError> {
    let Value::Sequence(items) = value else {
        return Err(ctx.error(
            "needs",
            format!("must be a list of job names, not {}", describe(value)),
        ));
    };
    let mut needs = Vec::new();
    for item in items {
        let map = match item {
            Value::String(job) => {
                needs.push(NeedDef {
                    job: job.clone(),
                    artifacts: true,
                    optional: false,
                    matrix: None,
                });
                continue;
            }
            Value::Mapping(map) => map,
            other => {
                return Err(ctx.error(
                    "needs",
                    format!("lists job names or mappings, not {}", describe(other)),
                ));
            }
        };
        if map.contains_key("pipeline") || map.contains_key("project") {
            let kind = if map.contains_key("project") {
                "project"
            } else {
                "pipeline"
            };
            warnings.push(ctx.warning(
                &format!("needs:{kind}"),
                "needs from another pipeline or project are not supported by kiln exec; the need is left out",
            ));
            continue;
        }
        let job = map.get("job").and_then(Value::as_str).ok_or_else(|| {
            ctx.error(
                "needs",
                "a mapping in `needs` must have `job:` with a job name",
            )
        })?;
        let flag = |field: &str, default: bool| match map.get(field) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(ctx.error(
                &format!("needs:{field}"),
                format!("must be true or false, not {}", describe(other)),
            )),
        };
        let matrix = match map.get("parallel") {
            None => None,
            Some(Value::Mapping(p)) if p.contains_key("matrix") => Some(
                parallel::parse_matrix(&p["matrix"]).map_err(|m| ctx.error("needs:parallel", m))?,
            ),
            Some(_) => return Err(ctx.error("needs:parallel", "must be a mapping with `matrix`")),
        };
        for field in map.keys().filter_map(Value::as_str) {
            if !NEED_KEYS[..4].contains(&field) {
                let mut section = at.to_vec();
                section.extend(["needs", "*"]);
                return Err(ctx.unknown(&section, field, NEED_KEYS));
            }
        }
        needs.push(NeedDef {
            job: job.to_string(),
            artifacts: flag("artifacts", true)?,
            optional: flag("optional", false)?,
            matrix,
        });
    }
    Ok(needs)
}
