//! `rules`: which jobs (and includes) a pipeline gets, decided from variables and repo files.

use std::cell::OnceCell;
use std::path::{Path, PathBuf};

use globset::{GlobBuilder, GlobSetBuilder};
use serde_yaml_ng::Value;

use super::context::Context;
use super::expr::Expr;
use super::needs::{NeedDef, parse_needs};
use super::vars::{Var, parse_variables};
use super::yaml::{describe, key_string, scalar_string};
use super::{JobWhen, PipelineError, Warning};
use crate::variables::{Definition, Undefined, Variables};

/// The keys of a rule.
const RULE_KEYS: &[&str] = &[
    "if",
    "exists",
    "changes",
    "when",
    "allow_failure",
    "variables",
    "needs",
    "start_in",
    "interruptible",
];

/// How many files of the checkout `exists` looks at, as a guard against huge trees.
const MAX_FILES: usize = 100_000;

/// One entry of a `rules` list.
#[derive(Debug, Clone, Default)]
pub(crate) struct Rule {
    /// `if:` as written and parsed.
    pub(crate) condition: Option<(String, Expr)>,
    /// `exists:` glob patterns, relative to the repository root.
    pub(crate) exists: Option<Vec<String>>,
    pub(crate) when: Option<JobWhen>,
    pub(crate) allow_failure: Option<bool>,
    pub(crate) variables: Vec<Var>,
    pub(crate) needs: Option<Vec<NeedDef>>,
}

/// Reads a `rules` list (nested lists, as `!reference` leaves them, are flattened).
///
/// # Errors
/// A rule that is not a mapping, a key of the wrong type, or an `if:` that does not parse.
pub(crate) fn parse_rules(
    value: &Value,
    ctx: &Context<'_>,
    warnings: &mut Vec<Warning>,
) -> Result<Vec<Rule>, PipelineError> {
    let mut entries = Vec::new();
    flatten(value, &mut entries, 0).map_err(|m| ctx.error("rules", m))?;
    let mut rules = Vec::new();
    let mut warned_changes = false;
    for entry in entries {
        let Value::Mapping(map) = entry else {
            return Err(ctx.error(
                "rules",
                format!("each rule must be a mapping, not {}", describe(entry)),
            ));
        };
        let mut rule = Rule::default();
        for (key, value) in map {
            let key = key_string(key).unwrap_or_default();
            match key.as_str() {
                "if" => {
                    let source = value.as_str().ok_or_else(|| {
                        ctx.error(
                            "rules:if",
                            format!("must be a string, not {}", describe(value)),
                        )
                    })?;
                    let expr =
                        Expr::parse(source).map_err(|reason| ctx.bad_rule(source, reason))?;
                    rule.condition = Some((source.to_string(), expr));
                }
                "exists" => {
                    rule.exists =
                        Some(exists_patterns(value).map_err(|m| ctx.error("rules:exists", m))?)
                }
                "changes" => {
                    if !warned_changes {
                        warned_changes = true;
                        warnings.push(ctx.warning(
                            "rules:changes",
                            "counts as changed: kiln exec has no pushed commits to compare, as in GitLab pipelines without a push",
                        ));
                    }
                }
                "when" => {
                    if value.as_str() == Some("delayed") {
                        warnings.push(ctx.warning(
                            "rules:when",
                            "`delayed` jobs start without delay in kiln exec",
                        ));
                    }
                    rule.when =
                        Some(parse_when(value, true).map_err(|m| ctx.error("rules:when", m))?)
                }
                "allow_failure" => match value {
                    Value::Bool(b) => rule.allow_failure = Some(*b),
                    other => {
                        return Err(ctx.error(
                            "rules:allow_failure",
                            format!("must be true or false, not {}", describe(other)),
                        ));
                    }
                },
                "variables" => {
                    rule.variables = parse_variables(value, ctx, &["rules", "*"], false, warnings)?
                }
                "needs" => rule.needs = Some(parse_needs(value, ctx, &["rules", "*"], warnings)?),
                "start_in" | "interruptible" => {
                    warnings.push(ctx.warning(&format!("rules:{key}"), "ignored by kiln exec"));
                }
                _ => return Err(ctx.unknown(&["rules", "*"], &key, RULE_KEYS)),
            }
        }
        rules.push(rule);
    }
    Ok(rules)
}

fn flatten<'a>(value: &'a Value, out: &mut Vec<&'a Value>, depth: usize) -> Result<(), String> {
    match value {
        Value::Sequence(items) if depth < 10 => {
            for item in items {
                flatten(item, out, depth + 1)?;
            }
            Ok(())
        }
        Value::Sequence(_) => Err("lists are nested more than 10 levels deep".into()),
        Value::Null if depth == 0 => Ok(()),
        other if depth == 0 => Err(format!("must be a list of rules, not {}", describe(other))),
        other => {
            out.push(other);
            Ok(())
        }
    }
}

fn exists_patterns(value: &Value) -> Result<Vec<String>, String> {
    let list = match value {
        Value::Mapping(map) => {
            if map.contains_key("project") {
                return Err(
                    "`exists:project` (another project's files) is not supported by kiln exec"
                        .into(),
                );
            }
            map.get("paths").ok_or("a mapping needs `paths`")?
        }
        other => other,
    };
    match list {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Sequence(items) => items
            .iter()
            .map(|v| {
                scalar_string(v).ok_or_else(|| format!("lists file patterns, not {}", describe(v)))
            })
            .collect(),
        other => Err(format!(
            "must be a list of file patterns, not {}",
            describe(other)
        )),
    }
}

/// Reads a `when` value; `never` is only valid inside rules.
pub(crate) fn parse_when(value: &Value, in_rules: bool) -> Result<JobWhen, String> {
    let text = value
        .as_str()
        .ok_or_else(|| format!("must be a string, not {}", describe(value)))?;
    Ok(match text {
        "on_success" | "delayed" => JobWhen::OnSuccess,
        "on_failure" => JobWhen::OnFailure,
        "always" => JobWhen::Always,
        "manual" => JobWhen::Manual,
        "never" if in_rules => JobWhen::Never,
        "never" => return Err("`never` is only valid inside `rules` or `workflow:rules`".into()),
        other => {
            return Err(format!(
                "unknown value `{other}`; use on_success, on_failure, always, manual or delayed"
            ));
        }
    })
}

/// The first rule whose clauses all hold, if any.
pub(crate) fn first_match<'r>(
    rules: &'r [Rule],
    scope: &Scope,
    repo: &mut RepoFiles,
) -> Option<&'r Rule> {
    rules.iter().find(|rule| {
        let condition = rule
            .condition
            .as_ref()
            .is_none_or(|(_, expr)| expr.eval(&|name| scope.lookup(name)));
        condition
            && rule
                .exists
                .as_ref()
                .is_none_or(|patterns| repo.any_match(patterns))
    })
}

/// Variables visible to `rules:if` and `include` paths, later definitions overriding earlier
/// ones, expanded as GitLab expands them there (see [`crate::variables`]): references to
/// undefined names stay as written.
#[derive(Debug, Clone, Default)]
pub(crate) struct Scope {
    definitions: Vec<Definition>,
    resolved: OnceCell<Variables>,
}

impl Scope {
    /// Defines (or redefines) `key`; a `raw` value is never expanded.
    pub(crate) fn set(&mut self, key: &str, value: &str, raw: bool) {
        self.definitions.push(Definition {
            raw,
            ..Definition::new(key, value)
        });
        self.resolved = OnceCell::new();
    }

    fn variables(&self) -> &Variables {
        self.resolved.get_or_init(|| {
            Variables::resolve(self.definitions.iter().cloned()).with_undefined(Undefined::Keep)
        })
    }

    /// The value of `name` with the references in it expanded.
    pub(crate) fn lookup(&self, name: &str) -> Option<String> {
        self.variables().value(name)
    }

    /// Expands `$VAR`, `${VAR}` and `$$` in `text`.
    pub(crate) fn expand(&self, text: &str) -> String {
        self.variables().expand(text)
    }
}

/// The files of the checkout, listed once and only when a rule or include needs them.
#[derive(Debug)]
pub(crate) struct RepoFiles {
    root: PathBuf,
    files: Option<Vec<String>>,
}

impl RepoFiles {
    pub(crate) fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            files: None,
        }
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    /// Repository-relative paths (with `/`) of all files, `.git` left out, sorted.
    pub(crate) fn list(&mut self) -> &[String] {
        let root = &self.root;
        self.files.get_or_insert_with(|| {
            let mut files: Vec<String> = walkdir::WalkDir::new(root)
                .into_iter()
                .filter_entry(|e| e.file_name() != ".git")
                .filter_map(Result::ok)
                .filter(|e| e.file_type().is_file())
                .take(MAX_FILES)
                .filter_map(|e| {
                    let relative = e.path().strip_prefix(root).ok()?;
                    Some(relative.to_string_lossy().replace('\\', "/"))
                })
                .collect();
            files.sort();
            files
        })
    }

    /// The files matching any of `patterns` (GitLab's `fnmatch` with `FNM_PATHNAME`: `*` stays
    /// inside one directory, `**` crosses them, dotfiles match). Bad patterns match nothing.
    pub(crate) fn matching(&mut self, patterns: &[String]) -> Vec<String> {
        let mut set = GlobSetBuilder::new();
        for pattern in patterns {
            let pattern = pattern.trim_start_matches('/');
            if let Ok(glob) = GlobBuilder::new(pattern).literal_separator(true).build() {
                set.add(glob);
            }
        }
        let Ok(set) = set.build() else {
            return Vec::new();
        };
        self.list()
            .iter()
            .filter(|f| set.is_match(f.as_str()))
            .cloned()
            .collect()
    }

    fn any_match(&mut self, patterns: &[String]) -> bool {
        !self.matching(patterns).is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_expands_references_and_keeps_raw_values() {
        let mut scope = Scope::default();
        scope.set("HOST", "db", false);
        scope.set("URL", "postgres://${HOST}:5432/$NAME", false);
        scope.set("RAW", "$HOST", true);
        scope.set("PRICE", "$$5", false);
        assert_eq!(
            scope.lookup("URL").as_deref(),
            Some("postgres://db:5432/$NAME")
        );
        assert_eq!(scope.lookup("RAW").as_deref(), Some("$HOST"));
        assert_eq!(scope.lookup("PRICE").as_deref(), Some("$5"));
        assert_eq!(scope.lookup("MISSING"), None);
        scope.set("LOOP", "x$LOOP", false);
        assert_eq!(
            scope.lookup("LOOP").as_deref(),
            Some("x$LOOP"),
            "a self-reference stays as written"
        );
        scope.set("HOST", "cache", false);
        assert_eq!(
            scope.lookup("URL").as_deref(),
            Some("postgres://cache:5432/$NAME"),
            "a reference takes the last definition"
        );
    }

    #[test]
    fn exists_globs_match_like_fnmatch_pathname() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("app/src")).unwrap();
        std::fs::create_dir_all(dir.path().join(".git")).unwrap();
        std::fs::write(dir.path().join("Dockerfile"), "").unwrap();
        std::fs::write(dir.path().join("app/src/main.rs"), "").unwrap();
        std::fs::write(dir.path().join(".git/HEAD"), "").unwrap();
        let mut repo = RepoFiles::new(dir.path());
        assert!(repo.any_match(&["Dockerfile".into()]));
        assert!(repo.any_match(&["/Dockerfile".into()]));
        assert!(repo.any_match(&["app/**/*.rs".into()]));
        assert!(
            !repo.any_match(&["*.rs".into()]),
            "`*` does not cross directories"
        );
        assert!(!repo.any_match(&[".git/*".into()]));
        assert_eq!(
            repo.matching(&["**/*.{rs,toml}".into()]),
            ["app/src/main.rs"]
        );
    }
}
