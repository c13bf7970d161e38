//! `include:`: local files are read and merged before the including file's own keys.

use std::collections::HashSet;
use std::path::Component;

use serde_yaml_ng::{Mapping, Value};

use super::context::Context;
use super::rules::{RepoFiles, Scope, first_match, parse_rules};
use super::yaml::{deep_merge, describe, key_string};
use super::{JobWhen, PipelineError, Warning, yaml};

/// GitLab's cap on included files per pipeline.
const MAX_FILES: usize = 150;
/// GitLab's cap on include nesting.
const MAX_DEPTH: usize = 100;

/// The keys of an `include` entry.
const INCLUDE_KEYS: &[&str] = &[
    "local",
    "remote",
    "template",
    "project",
    "file",
    "ref",
    "component",
    "artifact",
    "job",
    "rules",
    "inputs",
    "cache",
    "integrity",
];

/// Reads includes while merging.
pub(crate) struct Includes<'a> {
    repo: &'a mut RepoFiles,
    scope: &'a Scope,
    warnings: &'a mut Vec<Warning>,
    seen: HashSet<String>,
    /// Every file read: its name and text.
    sources: Vec<(String, String)>,
}

impl<'a> Includes<'a> {
    pub(crate) fn new(
        repo: &'a mut RepoFiles,
        scope: &'a Scope,
        warnings: &'a mut Vec<Warning>,
    ) -> Self {
        Self {
            repo,
            scope,
            warnings,
            seen: HashSet::new(),
            sources: Vec::new(),
        }
    }

    /// The files read (name and text), in the order they were read.
    pub(crate) fn into_sources(self) -> Vec<(String, String)> {
        self.sources
    }

    /// Returns `config` with its includes (and theirs) merged in: each included file in order,
    /// deep-merged, then `config`'s own keys on top, as GitLab does.
    ///
    /// # Errors
    /// A missing or unreadable local file, a path leaving the repository, too many files, or
    /// an error inside an included file (naming that file).
    pub(crate) fn resolve(
        &mut self,
        mut config: Mapping,
        file: &str,
        depth: usize,
    ) -> Result<Mapping, PipelineError> {
        let Some(include) = config.shift_remove("include") else {
            return Ok(config);
        };
        if depth >= MAX_DEPTH {
            return Err(include_error(
                file,
                "include",
                format!("includes nest more than {MAX_DEPTH} levels deep"),
            ));
        }
        let entries = match include {
            Value::Sequence(items) => items,
            Value::Null => Vec::new(),
            single => vec![single],
        };
        let mut merged = Mapping::new();
        for entry in entries {
            for path in self.local_paths(&entry, file)? {
                if !self.seen.insert(path.clone()) {
                    continue;
                }
                if self.seen.len() > MAX_FILES {
                    return Err(include_error(
                        file,
                        &path,
                        format!("more than {MAX_FILES} files are included"),
                    ));
                }
                let full = self.repo.root().join(&path);
                let text = std::fs::read_to_string(&full).map_err(|e| {
                    include_error(
                        file,
                        &path,
                        format!(
                            "cannot read {}: {e}; the path is relative to the repository root",
                            full.display()
                        ),
                    )
                })?;
                let content = yaml::load(&text, &path, self.warnings);
                self.sources.push((path.clone(), text));
                let content = content?;
                let content = self.resolve(content, &path, depth + 1)?;
                deep_merge(&mut merged, content);
            }
        }
        deep_merge(&mut merged, config);
        Ok(merged)
    }

    /// The repository-relative files one `include` entry stands for; other kinds of include
    /// earn a warning and stand for none.
    fn local_paths(&mut self, entry: &Value, file: &str) -> Result<Vec<String>, PipelineError> {
        let (location, map) = match entry {
            Value::String(s) if s.starts_with("https://") || s.starts_with("http://") => {
                self.unsupported("remote", s);
                return Ok(Vec::new());
            }
            Value::String(s) => (s.clone(), None),
            Value::Mapping(map) => {
                let Some(local) = map.get("local") else {
                    let kind = ["remote", "template", "project", "component", "artifact"]
                        .into_iter()
                        .find(|k| map.contains_key(*k))
                        .unwrap_or("include");
                    let what = map
                        .get(kind)
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string();
                    self.unsupported(kind, &what);
                    return Ok(Vec::new());
                };
                let local = local.as_str().ok_or_else(|| {
                    include_error(
                        file,
                        "local",
                        format!("`local` must be a path, not {}", describe(local)),
                    )
                })?;
                (local.to_string(), Some(map))
            }
            other => {
                return Err(include_error(
                    file,
                    "include",
                    format!("entries must be paths or mappings, not {}", describe(other)),
                ));
            }
        };
        if let Some(map) = map {
            for key in map.keys().filter_map(key_string) {
                match key.as_str() {
                    "local" | "rules" => {}
                    "inputs" => self.warnings.push(Warning::global(
                        "include:inputs",
                        format!("`{location}`: inputs are not supported by kiln exec; `$[[ inputs.… ]]` stays as written"),
                    )),
                    "remote" | "template" | "project" | "file" | "ref" | "component"
                    | "artifact" | "job" | "cache" | "integrity" => {
                        self.warnings.push(Warning::global(
                            &format!("include:{key}"),
                            format!("`{location}`: ignored for a local include"),
                        ))
                    }
                    other => {
                        return Err(Context::Keyword("include").unknown(
                            &["*"],
                            other,
                            INCLUDE_KEYS,
                        ));
                    }
                }
            }
            if let Some(rules) = map.get("rules") {
                let ctx = Context::Keyword("include");
                let rules = parse_rules(rules, &ctx, self.warnings)?;
                let included = first_match(&rules, self.scope, self.repo)
                    .is_some_and(|r| r.when != Some(JobWhen::Never));
                if !included {
                    return Ok(Vec::new());
                }
            }
        }
        let expanded = self.scope.expand(&location);
        let path = normalize(&expanded).ok_or_else(|| {
            include_error(
                file,
                &location,
                "local includes must stay inside the repository (no `..`)".into(),
            )
        })?;
        let is_yaml = |p: &str| p.ends_with(".yml") || p.ends_with(".yaml");
        if path.contains('*') {
            let matches: Vec<String> = self
                .repo
                .matching(std::slice::from_ref(&path))
                .into_iter()
                .filter(|p| is_yaml(p))
                .collect();
            if matches.is_empty() {
                return Err(include_error(
                    file,
                    &location,
                    "no file matches the pattern".into(),
                ));
            }
            return Ok(matches);
        }
        if !is_yaml(&path) {
            return Err(include_error(
                file,
                &location,
                "included files must end in `.yml` or `.yaml`".into(),
            ));
        }
        Ok(vec![path])
    }

    fn unsupported(&mut self, kind: &str, what: &str) {
        self.warnings.push(Warning::global(
            &format!("include:{kind}"),
            format!("`{what}`: only `include:local` is supported by kiln exec; the jobs it would add are missing"),
        ));
    }
}

/// `/ci/a.yml`, `./ci/a.yml` → `ci/a.yml`; `None` when the path leaves the repository.
fn normalize(path: &str) -> Option<String> {
    let mut parts = Vec::new();
    for component in std::path::Path::new(path.trim_start_matches('/')).components() {
        match component {
            Component::Normal(part) => parts.push(part.to_string_lossy().into_owned()),
            Component::CurDir => {}
            _ => return None,
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

fn include_error(file: &str, include: &str, message: String) -> PipelineError {
    PipelineError::Include {
        file: file.to_string(),
        include: include.to_string(),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_keeps_paths_inside_the_repository() {
        assert_eq!(normalize("/ci/a.yml").as_deref(), Some("ci/a.yml"));
        assert_eq!(normalize("./ci/./a.yml").as_deref(), Some("ci/a.yml"));
        assert_eq!(normalize("../secrets.yml"), None);
        assert_eq!(normalize("ci/../../x.yml"), None);
    }

    fn resolve(
        dir: &std::path::Path,
        main: &str,
        vars: &[(&str, &str)],
    ) -> (Result<Mapping, PipelineError>, Vec<Warning>) {
        let mut repo = RepoFiles::new(dir);
        let mut scope = Scope::default();
        for (k, v) in vars {
            scope.set(k, v, false);
        }
        let mut warnings = Vec::new();
        let config: Mapping = serde_yaml_ng::from_str(main).unwrap();
        let result = Includes::new(&mut repo, &scope, &mut warnings).resolve(config, "main.yml", 0);
        (result, warnings)
    }

    #[test]
    fn includes_merge_first_then_the_main_file_wins() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("ci")).unwrap();
        std::fs::write(dir.path().join("ci/a.yml"), "include: ci/b.yml\na: {script: [a], stage: build}\nshared: {variables: {X: a, Y: a}}\n").unwrap();
        std::fs::write(dir.path().join("ci/b.yml"), "b: {script: [b]}\n").unwrap();
        std::fs::write(dir.path().join("ci/c.yml"), "c: {script: [c]}\n").unwrap();
        let (config, warnings) = resolve(
            dir.path(),
            "include:\n  - local: /ci/a.yml\n  - ci/$WHICH.yml\n  - remote: https://example.com/x.yml\n  - {local: ci/c.yml, rules: [{if: '$NOPE'}]}\nshared: {variables: {Y: main}}\nmain: {script: [m]}\n",
            &[("WHICH", "c")],
        );
        let config = config.unwrap();
        let keys: Vec<_> = config.keys().filter_map(Value::as_str).collect();
        assert_eq!(keys, ["b", "a", "shared", "c", "main"]);
        let shared: Mapping = serde_yaml_ng::from_str("{variables: {X: a, Y: main}}").unwrap();
        assert_eq!(config["shared"], Value::Mapping(shared));
        assert_eq!(warnings.len(), 1);
        assert_eq!(warnings[0].key, "include:remote");
    }

    #[test]
    fn missing_files_and_errors_inside_includes_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (result, _) = resolve(dir.path(), "include: missing.yml\n", &[]);
        let err = result.unwrap_err().to_string();
        assert!(
            err.contains("main.yml") && err.contains("missing.yml"),
            "{err}"
        );

        std::fs::write(dir.path().join("bad.yml"), "job:\n  script: [\n").unwrap();
        let (result, _) = resolve(dir.path(), "include: bad.yml\n", &[]);
        assert!(
            matches!(result.unwrap_err(), PipelineError::Yaml { file, .. } if file == "bad.yml")
        );
    }

    #[test]
    fn wildcards_match_sorted_yaml_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("ci/jobs")).unwrap();
        std::fs::write(dir.path().join("ci/jobs/b.yml"), "b: {script: [b]}\n").unwrap();
        std::fs::write(dir.path().join("ci/jobs/a.yml"), "a: {script: [a]}\n").unwrap();
        std::fs::write(dir.path().join("ci/jobs/notes.txt"), "").unwrap();
        let (config, _) = resolve(dir.path(), "include: 'ci/jobs/*.yml'\n", &[]);
        let keys: Vec<_> = config
            .unwrap()
            .keys()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect();
        assert_eq!(keys, ["a", "b"]);
    }
}
