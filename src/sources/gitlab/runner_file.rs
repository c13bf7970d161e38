//! The `[[sources.gitlab]]` entries of a config file, edited in place by `kiln register` and
//! `kiln unregister`: comments and layout are kept, and the file is rewritten readable only by
//! its owner (it holds runner tokens).

use std::path::Path;

use super::config::GitLabRunnerConfig;
use crate::problem::{ConfigError, Problem};

/// Adds or updates the `[[sources.gitlab]]` entry of `runner` in the config file at `path`
/// (created if missing). An entry with the same URL and name (or the same URL and token) is
/// updated.
///
/// # Errors
/// Unreadable or unparsable file, a `sources` that holds no runner list, or a failed write.
pub(crate) fn upsert(path: &Path, runner: &GitLabRunnerConfig) -> Result<(), ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => {
            return Err(ConfigError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    let mut doc = parse(path, &text)?;
    let sources = doc.entry("sources").or_insert_with(|| {
        let mut t = toml_edit::Table::new();
        t.set_implicit(true);
        toml_edit::Item::Table(t)
    });
    let shape = |message: &str| ConfigError::Invalid {
        origin: path.display().to_string(),
        problems: vec![Problem::new("sources.gitlab", message)],
    };
    let sources = sources
        .as_table_like_mut()
        .ok_or_else(|| shape("`sources` is not a table"))?;
    let gitlab = sources
        .entry("gitlab")
        .or_insert(toml_edit::Item::ArrayOfTables(
            toml_edit::ArrayOfTables::new(),
        ))
        .as_array_of_tables_mut()
        .ok_or_else(|| shape("must be an array of tables ([[sources.gitlab]])"))?;
    let same = |t: &toml_edit::Table| {
        let get = |k: &str| t.get(k).and_then(|v| v.as_str()).map(str::to_owned);
        get("url").as_deref() == Some(runner.url.as_str())
            && (get("name") == runner.name || get("token").as_deref() == Some(&runner.token))
    };
    let index = gitlab.iter().position(same);
    let table = match index {
        Some(i) => gitlab.get_mut(i).ok_or_else(|| shape("entry vanished"))?,
        None => {
            gitlab.push(toml_edit::Table::new());
            let last = gitlab.len() - 1;
            gitlab
                .get_mut(last)
                .ok_or_else(|| shape("entry vanished"))?
        }
    };
    if let Some(name) = &runner.name {
        table["name"] = toml_edit::value(name.as_str());
    }
    table["url"] = toml_edit::value(runner.url.as_str());
    table["token"] = toml_edit::value(runner.token.as_str());
    if let Some(id) = &runner.system_id {
        table["system_id"] = toml_edit::value(id.as_str());
    }
    write_private(path, &doc)
}

/// Removes the `[[sources.gitlab]]` entry with this URL and token from the config file at
/// `path`; false when there was none.
///
/// # Errors
/// Unreadable or unparsable file, or a failed write.
pub(crate) fn remove(path: &Path, url: &str, token: &str) -> Result<bool, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut doc = parse(path, &text)?;
    let Some(gitlab) = doc
        .get_mut("sources")
        .and_then(|s| s.get_mut("gitlab"))
        .and_then(|g| g.as_array_of_tables_mut())
    else {
        return Ok(false);
    };
    let before = gitlab.len();
    gitlab.retain(|t| {
        !(t.get("url").and_then(|v| v.as_str()) == Some(url)
            && t.get("token").and_then(|v| v.as_str()) == Some(token))
    });
    let removed = gitlab.len() != before;
    if removed {
        write_private(path, &doc)?;
    }
    Ok(removed)
}

fn parse(path: &Path, text: &str) -> Result<toml_edit::DocumentMut, ConfigError> {
    text.parse::<toml_edit::DocumentMut>()
        .map_err(|e| ConfigError::Syntax {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })
}

/// Writes the file readable only by its owner: it holds runner tokens.
fn write_private(path: &Path, doc: &toml_edit::DocumentMut) -> Result<(), ConfigError> {
    use std::io::Write;
    let write = || -> std::io::Result<()> {
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
        let mut tmp = tempfile::NamedTempFile::new_in(dir.unwrap_or(Path::new(".")))?;
        // NamedTempFile is created 0600 already; persist() renames it over the old file
        // atomically.
        tmp.write_all(doc.to_string().as_bytes())?;
        tmp.persist(path).map_err(|e| e.error)?;
        Ok(())
    };
    write().map_err(|source| ConfigError::Write {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runner_is_added_once_and_removed_with_the_rest_of_the_file_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.toml");
        std::fs::write(&path, "# my runners\nconcurrent = 2\n").unwrap();
        let mut runner = GitLabRunnerConfig::new("https://gitlab.example.com", "glrt-one");
        runner.name = Some("ci".into());
        upsert(&path, &runner).unwrap();
        runner.token = "glrt-two".into();
        upsert(&path, &runner).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.matches("[[sources.gitlab]]").count(), 1, "{text}");
        assert!(
            text.contains("glrt-two") && !text.contains("glrt-one"),
            "{text}"
        );
        assert!(!remove(&path, &runner.url, "glrt-one").unwrap());
        assert!(remove(&path, &runner.url, "glrt-two").unwrap());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# my runners\nconcurrent = 2\n"), "{text}");
        assert!(!text.contains("glrt-"), "{text}");
    }

    #[test]
    fn a_file_that_holds_no_runner_list_is_refused_by_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.toml");
        std::fs::write(&path, "sources = 3\n").unwrap();
        let runner = GitLabRunnerConfig::new("https://gitlab.example.com", "glrt-one");
        let error = upsert(&path, &runner).unwrap_err().to_string();
        assert_eq!(
            error,
            format!(
                "{} has 1 problem(s):\n  sources.gitlab: `sources` is not a table",
                path.display()
            )
        );
    }

    #[test]
    fn the_file_written_is_readable_only_by_its_owner() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.toml");
        let runner = GitLabRunnerConfig::new("https://gitlab.example.com", "glrt-one");
        upsert(&path, &runner).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
