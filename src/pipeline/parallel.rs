//! `parallel: N` and `parallel: matrix`: one job definition becomes several named instances.

use serde_yaml_ng::Value;

use super::yaml::{describe, key_string, scalar_string};

/// GitLab's cap on instances of one job.
const MAX_INSTANCES: usize = 200;

/// How a job fans out.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) enum Parallel {
    /// One instance, named as the job.
    #[default]
    Single,
    /// `parallel: N`: instances `name 1/N` … `name N/N`.
    Count(u32),
    /// `parallel: matrix`: one instance per combination, each with its variables.
    Matrix(Vec<Vec<(String, String)>>),
}

/// One instance of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Instance {
    pub(crate) name: String,
    /// `CI_NODE_INDEX`, `CI_NODE_TOTAL`.
    pub(crate) index: Option<(u32, u32)>,
    /// The matrix variables of this combination.
    pub(crate) variables: Vec<(String, String)>,
}

/// Reads the `parallel` keyword; the error text is for the `parallel` key of the job.
pub(crate) fn parse(value: &Value) -> Result<Parallel, String> {
    match value {
        Value::Null => Ok(Parallel::Single),
        Value::Number(n) => match n.as_u64() {
            Some(count @ 1..=200) => Ok(Parallel::Count(count as u32)),
            _ => Err(format!(
                "must be a whole number from 1 to {MAX_INSTANCES}, not {n}"
            )),
        },
        Value::Mapping(map) => {
            if let Some(key) = map.keys().find(|k| k.as_str() != Some("matrix")) {
                let key = key_string(key).unwrap_or_default();
                return Err(format!("unknown key `{key}`; only `matrix` is allowed"));
            }
            let matrix = map.get("matrix").ok_or("a mapping must have `matrix`")?;
            let combinations = parse_matrix(matrix)?;
            if combinations.len() > MAX_INSTANCES {
                return Err(format!(
                    "the matrix makes {} jobs; GitLab allows at most {MAX_INSTANCES}",
                    combinations.len()
                ));
            }
            Ok(Parallel::Matrix(combinations))
        }
        other => Err(format!(
            "must be a number or `matrix:`, not {}",
            describe(other)
        )),
    }
}

/// Expands a `matrix:` list into its combinations, in GitLab's order: entry by entry, and in
/// each entry the first variable varies slowest (Ruby's `Array#product`).
pub(crate) fn parse_matrix(value: &Value) -> Result<Vec<Vec<(String, String)>>, String> {
    let Value::Sequence(entries) = value else {
        return Err(format!(
            "`matrix` must be a list of mappings, not {}",
            describe(value)
        ));
    };
    let mut combinations = Vec::new();
    for entry in entries {
        let Value::Mapping(entry) = entry else {
            return Err(format!(
                "a `matrix` entry must be a mapping, not {}",
                describe(entry)
            ));
        };
        let mut axes: Vec<(String, Vec<String>)> = Vec::new();
        for (key, values) in entry {
            let key = key_string(key).ok_or("matrix variable names must be strings")?;
            let values = match values {
                Value::Sequence(items) => items
                    .iter()
                    .map(|v| scalar_string(v).ok_or_else(|| bad_value(&key, v)))
                    .collect::<Result<Vec<_>, _>>()?,
                scalar => vec![scalar_string(scalar).ok_or_else(|| bad_value(&key, scalar))?],
            };
            if values.is_empty() {
                return Err(format!("matrix variable `{key}` has no values"));
            }
            axes.push((key, values));
        }
        let mut partial: Vec<Vec<(String, String)>> = vec![Vec::new()];
        for (key, values) in &axes {
            partial = partial
                .into_iter()
                .flat_map(|prefix| {
                    values.iter().map(move |v| {
                        let mut next = prefix.clone();
                        next.push((key.clone(), v.clone()));
                        next
                    })
                })
                .collect();
            if partial.len() > MAX_INSTANCES {
                return Err(format!("the matrix makes more than {MAX_INSTANCES} jobs"));
            }
        }
        if !axes.is_empty() {
            combinations.extend(partial);
        }
    }
    if combinations.is_empty() {
        return Err("`matrix` is empty".into());
    }
    Ok(combinations)
}

fn bad_value(key: &str, value: &Value) -> String {
    format!(
        "matrix variable `{key}` must be a string, number or list of them, not {}",
        describe(value)
    )
}

/// GitLab's name of one matrix combination: `build: [linux, amd64]`.
pub(crate) fn matrix_name(job: &str, combination: &[(String, String)]) -> String {
    let values: Vec<&str> = combination.iter().map(|(_, v)| v.as_str()).collect();
    format!("{job}: [{}]", values.join(", "))
}

/// The instances of `job`, in order.
pub(crate) fn instances(job: &str, parallel: &Parallel) -> Vec<Instance> {
    match parallel {
        Parallel::Single => vec![Instance {
            name: job.to_string(),
            index: None,
            variables: Vec::new(),
        }],
        Parallel::Count(total) => (1..=*total)
            .map(|i| Instance {
                name: format!("{job} {i}/{total}"),
                index: Some((i, *total)),
                variables: Vec::new(),
            })
            .collect(),
        Parallel::Matrix(combinations) => {
            let total = combinations.len() as u32;
            combinations
                .iter()
                .zip(1..)
                .map(|(combination, i)| Instance {
                    name: matrix_name(job, combination),
                    index: Some((i, total)),
                    variables: combination.clone(),
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(yaml: &str) -> Parallel {
        parse(&serde_yaml_ng::from_str(yaml).unwrap()).unwrap()
    }

    #[test]
    fn count_names_instances_n_of_total() {
        let names: Vec<_> = instances("test", &Parallel::Count(3))
            .into_iter()
            .map(|i| (i.name, i.index))
            .collect();
        assert_eq!(
            names,
            [
                ("test 1/3".to_string(), Some((1, 3))),
                ("test 2/3".into(), Some((2, 3))),
                ("test 3/3".into(), Some((3, 3)))
            ]
        );
    }

    #[test]
    fn matrix_product_order_and_names_match_gitlab() {
        let p = matrix(
            "matrix:
  - PROVIDER: aws
    STACK: [monitoring, app1]
  - PROVIDER: [gcp, vultr]
    STACK: data
    VERSION: 3",
        );
        let all = instances("deploy", &p);
        let names: Vec<_> = all.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "deploy: [aws, monitoring]",
                "deploy: [aws, app1]",
                "deploy: [gcp, data, 3]",
                "deploy: [vultr, data, 3]",
            ]
        );
        assert_eq!(all[3].index, Some((4, 4)));
        assert_eq!(
            all[2].variables,
            [
                ("PROVIDER".into(), "gcp".into()),
                ("STACK".into(), "data".into()),
                ("VERSION".into(), "3".into())
            ]
        );
    }

    #[test]
    fn first_variable_varies_slowest() {
        let p = matrix("matrix: [{OS: [linux, mac], ARCH: [amd64, arm64]}]");
        let names: Vec<_> = instances("b", &p).into_iter().map(|i| i.name).collect();
        assert_eq!(
            names,
            [
                "b: [linux, amd64]",
                "b: [linux, arm64]",
                "b: [mac, amd64]",
                "b: [mac, arm64]"
            ]
        );
    }

    #[test]
    fn bad_values_are_rejected() {
        let err = |y: &str| parse(&serde_yaml_ng::from_str(y).unwrap()).unwrap_err();
        assert!(err("0").contains("from 1 to 200"));
        assert!(err("201").contains("from 1 to 200"));
        assert!(err("matrix: [{A: {x: 1}}]").contains("must be a string"));
        let many: Vec<String> = (1..=15).map(|i| i.to_string()).collect();
        let big = format!("matrix: [{{A: [{0}], B: [{0}]}}]", many.join(", "));
        assert!(err(&big).contains("more than 200"));
        let entries = format!(
            "matrix: [{}]",
            vec!["{A: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]}"; 21].join(", ")
        );
        assert!(err(&entries).contains("at most 200"));
        assert!(err("matrix: []").contains("empty"));
    }
}
