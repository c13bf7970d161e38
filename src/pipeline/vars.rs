//! `variables:` as a pipeline file writes them (top level, jobs, rules, services).

use serde_yaml_ng::Value;

use super::context::Context;
use super::yaml::{describe, key_string, scalar_string};
use super::{PipelineError, Warning};

/// A CI/CD variable from the file; `raw` is `expand: false`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Var {
    pub(crate) key: String,
    pub(crate) value: String,
    pub(crate) raw: bool,
}

/// The keys a variable's mapping form may have.
const VARIABLE_KEYS: &[&str] = &["value", "description", "options", "expand"];

/// `variables:` at the top level (`description` allowed) or in a job or rule; `at` is where
/// the keyword sits under `ctx` (`[]`, `["rules", "*"]`, …), for locating unknown keys.
pub(crate) fn parse_variables(
    value: &Value,
    ctx: &Context<'_>,
    at: &[&str],
    global: bool,
    warnings: &mut Vec<Warning>,
) -> Result<Vec<Var>, PipelineError> {
    let map = match value {
        Value::Null => return Ok(Vec::new()),
        Value::Mapping(map) => map,
        other => {
            return Err(ctx.error(
                "variables",
                format!(
                    "must be a mapping of names to values, not {}",
                    describe(other)
                ),
            ));
        }
    };
    let mut vars: Vec<Var> = Vec::with_capacity(map.len());
    for (key, value) in map {
        let key = key_string(key)
            .ok_or_else(|| ctx.error("variables", "variable names must be strings"))?;
        let (value, raw) = match value {
            Value::Null => (String::new(), false),
            Value::Mapping(spec) => {
                let mut raw = false;
                for (field, _) in spec {
                    match field.as_str() {
                        Some("value" | "description" | "options") => {}
                        Some("expand") => raw = spec.get("expand") == Some(&Value::Bool(false)),
                        other => {
                            let mut section = at.to_vec();
                            section.extend(["variables", key.as_str()]);
                            let field = other.map(str::to_string).unwrap_or_else(|| {
                                key_string(field).unwrap_or_else(|| describe(field).into())
                            });
                            return Err(ctx.unknown(&section, &field, VARIABLE_KEYS));
                        }
                    }
                }
                if !global && spec.contains_key("description") {
                    warnings.push(ctx.warning(
                        "variables",
                        format!("`{key}`: `description` only has meaning in global variables"),
                    ));
                }
                let value = match spec.get("value") {
                    None | Some(Value::Null) => String::new(),
                    Some(v) => scalar_string(v).ok_or_else(|| {
                        ctx.error(
                            "variables",
                            format!("`{key}`: `value` must be a string, not {}", describe(v)),
                        )
                    })?,
                };
                (value, raw)
            }
            other => (
                scalar_string(other).ok_or_else(|| {
                    ctx.error(
                        "variables",
                        format!(
                            "`{key}` must be a string or number, not {}",
                            describe(other)
                        ),
                    )
                })?,
                false,
            ),
        };
        if raw && value.contains('$') {
            warnings.push(ctx.warning(
                "variables",
                format!("`{key}` has `expand: false`; the job receives it as a plain variable, which the runner expands"),
            ));
        }
        vars.push(Var { key, value, raw });
    }
    Ok(vars)
}
