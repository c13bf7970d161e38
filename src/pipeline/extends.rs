//! `extends`: a job inherits from one or more templates, deep-merged as GitLab merges them.

use std::collections::HashMap;

use serde_yaml_ng::{Mapping, Value};

use super::PipelineError;
use super::yaml::{deep_merge, describe, key_string};

/// GitLab allows eleven levels of inheritance along one `extends` chain.
pub(crate) const MAX_DEPTH: usize = 11;

/// Top-level keys that are keywords, never jobs or templates.
pub(crate) const GLOBAL_KEYWORDS: &[&str] = &[
    "default",
    "include",
    "stages",
    "types",
    "variables",
    "workflow",
    "image",
    "services",
    "cache",
    "before_script",
    "after_script",
];

/// Replaces every job and template that has `extends` with its merged form, parents first:
/// the parents are merged in order (a later parent wins), then the job's own keys on top.
/// Mappings merge recursively; lists and scalars are replaced whole.
///
/// # Errors
/// An unknown parent, a cycle or a chain deeper than [`MAX_DEPTH`], each naming the jobs.
pub(crate) fn resolve(config: &mut Mapping) -> Result<(), PipelineError> {
    let names: Vec<String> = config
        .iter()
        .filter_map(|(k, v)| Some((key_string(k)?, v)))
        .filter(|(k, v)| {
            !GLOBAL_KEYWORDS.contains(&k.as_str())
                && v.as_mapping().is_some_and(|m| m.contains_key("extends"))
        })
        .map(|(k, _)| k)
        .collect();
    let mut done = HashMap::new();
    for name in names {
        resolve_one(config, &name, &mut Vec::new(), &mut done)?;
    }
    Ok(())
}

fn resolve_one(
    config: &mut Mapping,
    name: &str,
    chain: &mut Vec<String>,
    done: &mut HashMap<String, usize>,
) -> Result<usize, PipelineError> {
    if let Some(height) = done.get(name) {
        return Ok(*height);
    }
    if let Some(start) = chain.iter().position(|n| n == name) {
        let mut cycle = chain[start..].to_vec();
        cycle.push(name.to_string());
        return Err(PipelineError::ExtendsCycle {
            chain: cycle.join(" → "),
        });
    }
    let Some(Value::Mapping(job)) = config.get(name) else {
        done.insert(name.to_string(), 0);
        return Ok(0);
    };
    let Some(extends) = job.get("extends") else {
        done.insert(name.to_string(), 0);
        return Ok(0);
    };
    let parents = parent_names(extends).map_err(|message| PipelineError::Job {
        job: name.to_string(),
        key: "extends".into(),
        message,
    })?;
    chain.push(name.to_string());
    let mut height = 0;
    for parent in &parents {
        match config.get(parent.as_str()) {
            None => {
                return Err(PipelineError::UnknownExtends {
                    job: name.to_string(),
                    target: parent.clone(),
                });
            }
            Some(Value::Mapping(_)) => {
                height = height.max(1 + resolve_one(config, parent, chain, done)?);
            }
            Some(other) => {
                return Err(PipelineError::Job {
                    job: name.to_string(),
                    key: "extends".into(),
                    message: format!(
                        "`{parent}` is {}, not a job or template to extend",
                        describe(other)
                    ),
                });
            }
        }
    }
    chain.pop();
    if height > MAX_DEPTH {
        return Err(PipelineError::ExtendsTooDeep {
            job: name.to_string(),
            limit: MAX_DEPTH,
        });
    }
    let mut merged = Mapping::new();
    for parent in &parents {
        if let Some(Value::Mapping(parent)) = config.get(parent.as_str()) {
            deep_merge(&mut merged, parent.clone());
        }
    }
    if let Some(Value::Mapping(own)) = config.get(name) {
        deep_merge(&mut merged, own.clone());
    }
    merged.shift_remove("extends");
    config.insert(Value::String(name.to_string()), Value::Mapping(merged));
    done.insert(name.to_string(), height);
    Ok(height)
}

/// `name` and every job or template it inherits from, nearest first (a later parent before an
/// earlier one, as it wins the merge): where to look for a key `name` has after `extends`.
pub(crate) fn lineage(config: &Mapping, name: &str) -> Vec<String> {
    let mut lineage = vec![name.to_string()];
    let mut next = 0;
    while next < lineage.len() && lineage.len() <= 8 * MAX_DEPTH {
        let parents = config
            .get(lineage[next].as_str())
            .and_then(Value::as_mapping)
            .and_then(|job| job.get("extends"))
            .and_then(|extends| parent_names(extends).ok())
            .unwrap_or_default();
        for parent in parents.into_iter().rev() {
            if !lineage.contains(&parent) {
                lineage.push(parent);
            }
        }
        next += 1;
    }
    lineage
}

fn parent_names(value: &Value) -> Result<Vec<String>, String> {
    match value {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Sequence(items) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("lists job names, not {}", describe(v)))
            })
            .collect(),
        other => Err(format!(
            "must be a job name or a list of them, not {}",
            describe(other)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::yaml::test_support::{config, yaml};

    #[test]
    fn chains_and_multiple_parents_merge_like_gitlab() {
        let mut c = config(
            "
.base:
  image: alpine
  variables: {A: base, B: base}
  script: [base]
  rules: [{if: '$X'}]
.tests:
  extends: .base
  variables: {B: tests}
  before_script: [setup]
.linux:
  variables: {A: linux, OS: linux}
  script: [linux]
job:
  extends: [.tests, .linux]
  variables: {C: job}
",
        );
        resolve(&mut c).unwrap();
        assert_eq!(
            c["job"],
            yaml(
                "
image: alpine
variables: {A: linux, B: tests, C: job, OS: linux}
script: [linux]
rules: [{if: '$X'}]
before_script: [setup]
"
            )
        );
        assert_eq!(c[".tests"]["variables"], yaml("{A: base, B: tests}"));
    }

    #[test]
    fn unknown_parent_names_the_job() {
        let mut c = config("job: {extends: .missing, script: x}");
        let err = resolve(&mut c).unwrap_err();
        assert!(
            matches!(&err, PipelineError::UnknownExtends { job, target } if job == "job" && target == ".missing"),
            "{err}"
        );
    }

    #[test]
    fn cycle_names_every_job_in_it() {
        let mut c = config(
            ".a: {extends: .b}\n.b: {extends: .c}\n.c: {extends: .a}\njob: {extends: .a, script: x}",
        );
        let err = resolve(&mut c).unwrap_err().to_string();
        assert!(err.contains(".a → .b → .c → .a"), "{err}");
    }

    #[test]
    fn eleven_levels_are_allowed_and_twelve_are_not() {
        let chain = |levels: usize| {
            let mut text = String::from(".t0: {script: x}\n");
            for i in 1..=levels {
                text.push_str(&format!(".t{i}: {{extends: .t{}}}\n", i - 1));
            }
            text.push_str(&format!("job: {{extends: .t{levels}}}\n"));
            config(&text)
        };
        let mut ok = chain(10);
        resolve(&mut ok).unwrap();
        assert_eq!(ok["job"]["script"], yaml("x"));
        let mut deep = chain(11);
        let err = resolve(&mut deep).unwrap_err();
        assert!(
            matches!(&err, PipelineError::ExtendsTooDeep { job, .. } if job == "job"),
            "{err}"
        );
    }
}
