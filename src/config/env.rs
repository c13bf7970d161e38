//! Environment overrides of the configuration: `KILN_…` variables name a field's path with `__`
//! between segments and array indices as segments: `KILN_CONCURRENT=8`,
//! `KILN_HTTP__LISTEN=0.0.0.0:9252`, `KILN_SOURCES__GITLAB__0__TOKEN=glrt-…`. A value is read as
//! a TOML literal when it is one (`8`, `true`, `["a","b"]`) and as a plain string otherwise;
//! quote it (`'"123"'`) to force a string that looks like a number.

use std::collections::BTreeMap;

use crate::problem::Problem;

const PREFIX: &str = "KILN_";

/// The `KILN_…` variables of an environment that set configuration fields, by name.
pub(super) struct Overrides(BTreeMap<String, String>);

impl Overrides {
    /// The overrides among `env` (command-line flag fallbacks such as `KILN_CONFIG` are not).
    pub(super) fn from_env(env: impl IntoIterator<Item = (String, String)>) -> Self {
        Self(
            env.into_iter()
                .filter(|(k, _)| k.starts_with(PREFIX) && !is_command_variable(k))
                .collect(),
        )
    }

    /// Sets every overridden field in the raw `table`; a problem, named by its variable, for
    /// each that names no place a value can go.
    pub(super) fn apply(&self, table: &mut toml::Table) -> Vec<Problem> {
        let mut problems = Vec::new();
        for (name, value) in &self.0 {
            if let Err(message) = apply_override(table, &name[PREFIX.len()..], value) {
                problems.push(Problem {
                    path: name.clone(),
                    message,
                });
            }
        }
        problems
    }

    /// `path` (`sources.gitlab[0].token`), naming the variable that set it when one did.
    pub(super) fn hint(&self, path: &str) -> String {
        let env_name = format!(
            "{PREFIX}{}",
            path.replace(['[', '.'], "__")
                .replace(']', "")
                .to_uppercase()
        );
        if self.0.contains_key(&env_name) {
            format!("{path} (set by {env_name})")
        } else {
            path.to_owned()
        }
    }
}

/// `KILN_` names that are command-line flag fallbacks, not config fields: `KILN_CONFIG`, and
/// the single-underscore families of `kiln deploy` (`KILN_DEPLOY_REGION`) and `kiln register`
/// (`KILN_REGISTER_TOKEN`, `KILN_REGISTRATION_TOKEN`). Config overrides of the `[deploy]`
/// table use `__` (`KILN_DEPLOY__REGION`) and stay overrides.
fn is_command_variable(name: &str) -> bool {
    name == super::CONFIG_ENV
        || (name.starts_with("KILN_DEPLOY_") && !name.starts_with("KILN_DEPLOY__"))
        || name.starts_with("KILN_REGISTER_")
        || name.starts_with("KILN_REGISTRATION_")
}

/// Sets the field named by an environment variable (without prefix) in the raw TOML table.
fn apply_override(table: &mut toml::Table, name: &str, raw: &str) -> Result<(), String> {
    let segments: Vec<String> = name.split("__").map(str::to_lowercase).collect();
    if segments.iter().any(String::is_empty) {
        return Err("malformed name; separate path segments with `__`".into());
    }
    let value = parse_env_value(raw);
    let mut slot = Slot::Table(table);
    for (i, segment) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        let next_is_index = segments
            .get(i + 1)
            .is_some_and(|s| s.parse::<usize>().is_ok());
        let fresh = || {
            if next_is_index {
                toml::Value::Array(Vec::new())
            } else {
                toml::Value::Table(toml::Table::new())
            }
        };
        slot = match slot {
            Slot::Table(t) => {
                if last {
                    t.insert(segment.clone(), value);
                    return Ok(());
                }
                Slot::Value(t.entry(segment.clone()).or_insert_with(fresh))
            }
            Slot::Value(v) => match v {
                toml::Value::Table(t) => {
                    if last {
                        t.insert(segment.clone(), value);
                        return Ok(());
                    }
                    Slot::Value(t.entry(segment.clone()).or_insert_with(fresh))
                }
                toml::Value::Array(items) => {
                    let index: usize = segment
                        .parse()
                        .map_err(|_| format!("`{segment}` is not an array index"))?;
                    if index > items.len() {
                        return Err(format!(
                            "index {index} skips entries; the list has {} so far",
                            items.len()
                        ));
                    }
                    if index == items.len() {
                        items.push(fresh());
                    }
                    if last {
                        items[index] = value;
                        return Ok(());
                    }
                    Slot::Value(&mut items[index])
                }
                _ => return Err(format!("`{segment}` is inside a value that is not a table")),
            },
        };
    }
    Ok(())
}

enum Slot<'a> {
    Table(&'a mut toml::Table),
    Value(&'a mut toml::Value),
}

fn parse_env_value(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_override_makes_the_path_it_names_and_refuses_a_gap_in_a_list() {
        let overrides = Overrides::from_env([
            ("KILN_SOURCES__GITLAB__0__LIMIT".to_owned(), "2".to_owned()),
            ("KILN_SOURCES__GITLAB__2__URL".to_owned(), "x".to_owned()),
            ("KILN_CONFIG".to_owned(), "kiln.toml".to_owned()),
            ("PATH".to_owned(), "/bin".to_owned()),
        ]);
        let mut table = toml::Table::new();
        let problems = overrides.apply(&mut table);
        assert_eq!(table["sources"]["gitlab"][0]["limit"].as_integer(), Some(2));
        assert_eq!(
            problems,
            [Problem::new(
                "KILN_SOURCES__GITLAB__2__URL",
                "index 2 skips entries; the list has 1 so far"
            )]
        );
        assert_eq!(
            overrides.hint("sources.gitlab[0].limit"),
            "sources.gitlab[0].limit (set by KILN_SOURCES__GITLAB__0__LIMIT)"
        );
        assert_eq!(overrides.hint("concurrent"), "concurrent");
    }
}
