//! `!reference [.job, key, …]` tags: replaced by the value they point to, after `extends`.

use serde_yaml_ng::{Mapping, Value};

use super::yaml::{describe, key_string};
use super::{PipelineError, Warning};

/// GitLab resolves references inside references up to ten levels deep.
pub(crate) const MAX_DEPTH: usize = 10;

/// Replaces every `!reference` in `config` with a copy of what it names in `config` (as it is
/// after `extends`). A reference may point to a value that holds references itself.
///
/// Other tags are not GitLab keywords: they earn a warning and their plain value is used.
///
/// # Errors
/// A reference to nothing, a cycle or nesting deeper than [`MAX_DEPTH`], naming the job.
pub(crate) fn resolve(
    config: &mut Mapping,
    warnings: &mut Vec<Warning>,
) -> Result<(), PipelineError> {
    if !config.values().any(contains_tag) {
        return Ok(());
    }
    let snapshot = config.clone();
    for (key, value) in config.iter_mut() {
        let owner = key_string(key).unwrap_or_default();
        resolve_value(value, &snapshot, &owner, &mut Vec::new(), warnings)?;
    }
    Ok(())
}

fn contains_tag(value: &Value) -> bool {
    match value {
        Value::Tagged(_) => true,
        Value::Sequence(items) => items.iter().any(contains_tag),
        Value::Mapping(map) => map.values().any(contains_tag),
        _ => false,
    }
}

fn resolve_value(
    value: &mut Value,
    root: &Mapping,
    owner: &str,
    stack: &mut Vec<Vec<String>>,
    warnings: &mut Vec<Warning>,
) -> Result<(), PipelineError> {
    match value {
        Value::Sequence(items) => {
            for item in items {
                resolve_value(item, root, owner, stack, warnings)?;
            }
        }
        Value::Mapping(map) => {
            for item in map.values_mut() {
                resolve_value(item, root, owner, stack, warnings)?;
            }
        }
        Value::Tagged(tagged) if tagged.tag == "reference" => {
            let path = reference_path(&tagged.value).map_err(|message| PipelineError::Job {
                job: owner.to_string(),
                key: "!reference".into(),
                message,
            })?;
            let shown = path.join(", ");
            if stack.contains(&path) {
                return Err(PipelineError::ReferenceCycle {
                    job: owner.to_string(),
                    reference: shown,
                });
            }
            if stack.len() >= MAX_DEPTH {
                return Err(PipelineError::ReferenceTooDeep {
                    job: owner.to_string(),
                    reference: shown,
                    limit: MAX_DEPTH,
                });
            }
            let mut target = lookup(root, &path)
                .ok_or_else(|| PipelineError::UnknownReference {
                    job: owner.to_string(),
                    reference: shown,
                })?
                .clone();
            stack.push(path);
            resolve_value(&mut target, root, owner, stack, warnings)?;
            stack.pop();
            *value = target;
        }
        Value::Tagged(tagged) => {
            warnings.push(Warning {
                job: (!owner.is_empty()).then(|| owner.to_string()),
                key: tagged.tag.to_string(),
                message:
                    "unknown YAML tag; GitLab only knows `!reference`; the untagged value is used"
                        .into(),
            });
            let mut inner = std::mem::replace(&mut tagged.value, Value::Null);
            resolve_value(&mut inner, root, owner, stack, warnings)?;
            *value = inner;
        }
        _ => {}
    }
    Ok(())
}

fn reference_path(value: &Value) -> Result<Vec<String>, String> {
    let Value::Sequence(items) = value else {
        return Err(format!(
            "`!reference` takes a list like [.job, script], not {}",
            describe(value)
        ));
    };
    if items.is_empty() {
        return Err("`!reference []` names nothing; give a job and a key".into());
    }
    items
        .iter()
        .map(|item| {
            key_string(item)
                .ok_or_else(|| format!("`!reference` lists names, not {}", describe(item)))
        })
        .collect()
}

fn lookup<'a>(root: &'a Mapping, path: &[String]) -> Option<&'a Value> {
    let (first, rest) = path.split_first()?;
    let mut current = root.get(first.as_str())?;
    for key in rest {
        current = current.as_mapping()?.get(key.as_str())?;
    }
    Some(current)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::yaml::test_support::{config, yaml};

    #[test]
    fn references_resolve_into_lists_and_nested_keys() {
        let mut c = config(
            "
.setup:
  script: [echo setup]
  variables: {URL: http://x}
.vars: {deep: {DB: postgres}}
job:
  script:
    - !reference [.setup, script]
    - echo own
  variables:
    URL: !reference [.setup, variables, URL]
    DB: !reference [.vars, deep, DB]
",
        );
        resolve(&mut c, &mut Vec::new()).unwrap();
        assert_eq!(c["job"]["script"], yaml("[[echo setup], echo own]"));
        assert_eq!(c["job"]["variables"], yaml("{URL: http://x, DB: postgres}"));
    }

    #[test]
    fn nested_references_resolve() {
        let mut c = config(
            ".a: {script: [a]}\n.b: {script: [!reference [.a, script], b]}\njob: {script: !reference [.b, script]}",
        );
        resolve(&mut c, &mut Vec::new()).unwrap();
        assert_eq!(c["job"]["script"], yaml("[[a], b]"));
    }

    #[test]
    fn missing_target_names_job_and_path() {
        let mut c = config("job: {script: !reference [.nope, script]}");
        let err = resolve(&mut c, &mut Vec::new()).unwrap_err();
        assert!(
            matches!(&err, PipelineError::UnknownReference { job, reference } if job == "job" && reference == ".nope, script"),
            "{err}"
        );
    }

    #[test]
    fn cycles_and_depth_are_errors() {
        let mut c = config(
            ".a: {s: !reference [.b, s]}\n.b: {s: !reference [.a, s]}\njob: {script: !reference [.a, s]}",
        );
        let err = resolve(&mut c, &mut Vec::new()).unwrap_err();
        assert!(matches!(err, PipelineError::ReferenceCycle { .. }), "{err}");

        let mut text = String::from(".r0: {v: [x]}\n");
        for i in 1..=11 {
            text.push_str(&format!(".r{i}: {{v: !reference [.r{}, v]}}\n", i - 1));
        }
        let mut deep = config(&text);
        let err = resolve(&mut deep, &mut Vec::new()).unwrap_err();
        assert!(
            matches!(err, PipelineError::ReferenceTooDeep { .. }),
            "{err}"
        );
    }

    #[test]
    fn unknown_tags_warn_and_unwrap() {
        let mut c = config("job: {script: !custom [x]}");
        let mut warnings = Vec::new();
        resolve(&mut c, &mut warnings).unwrap();
        assert_eq!(c["job"]["script"], yaml("[x]"));
        assert_eq!(warnings.len(), 1);
        assert_eq!(warnings[0].job.as_deref(), Some("job"));
    }
}
