//! The variables through which a job steers its runner, read under gitlab-runner's names
//! (`GIT_SUBMODULE_STRATEGY`, `GET_SOURCES_ATTEMPTS`, `CI_DEBUG_TRACE`, `FF_TIMESTAMPS`, …): a
//! pure reading of the job's environment, so each rule is tested with plain maps.

use std::collections::BTreeMap;
use std::time::Duration;

/// `GIT_SUBMODULE_STRATEGY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Submodules {
    /// Leave submodules alone (the default).
    None,
    /// The top-level submodules only.
    Normal,
    /// Submodules of submodules too.
    Recursive,
}

/// What the job's variables ask of the runner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JobOptions {
    /// `GIT_SUBMODULE_STRATEGY`.
    pub(crate) submodules: Submodules,
    /// `GIT_SUBMODULE_DEPTH` (default: `GIT_DEPTH`'s value, as gitlab-runner does).
    pub(crate) submodule_depth: Option<u32>,
    /// `GIT_SUBMODULE_PATHS`: pathspecs given to `git submodule update` (`:(exclude)x` works).
    pub(crate) submodule_paths: Vec<String>,
    /// `GIT_SUBMODULE_UPDATE_FLAGS`: extra flags of `git submodule update`.
    pub(crate) submodule_update_flags: Vec<String>,
    /// `GIT_CLEAN_FLAGS`: `None` when `none` (no clean at all); default `-ffdx`.
    pub(crate) clean_flags: Option<Vec<String>>,
    /// `GIT_CHECKOUT=false` fetches without checking out.
    pub(crate) checkout: bool,
    /// `GIT_FETCH_EXTRA_FLAGS` (default `--prune --quiet`).
    pub(crate) fetch_flags: Vec<String>,
    /// `GIT_LFS_SKIP_SMUDGE=1` leaves LFS files as pointers.
    pub(crate) lfs_skip: bool,
    /// `GET_SOURCES_ATTEMPTS` (1–10).
    pub(crate) get_sources_attempts: u32,
    /// `ARTIFACT_DOWNLOAD_ATTEMPTS` (1–10).
    pub(crate) artifact_download_attempts: u32,
    /// `CI_DEBUG_TRACE=true`: shell xtrace, and `debug_trace=true` on trace updates.
    pub(crate) debug_trace: bool,
    /// `FF_TIMESTAMPS`: each trace line starts with its time.
    pub(crate) timestamps: bool,
    /// `FF_SCRIPT_SECTIONS`: each script command is a collapsible section.
    pub(crate) script_sections: bool,
    /// `RUNNER_SCRIPT_TIMEOUT`: time for the steps before after_script, leaving the rest of the
    /// job's timeout to after_script and artifacts.
    pub(crate) script_timeout: Option<Duration>,
    /// `RUNNER_AFTER_SCRIPT_TIMEOUT`.
    pub(crate) after_script_timeout: Option<Duration>,
    /// Values that could not be read, each a warning for the trace (the default is used).
    pub(crate) warnings: Vec<String>,
}

/// gitlab-runner's bounds for the `*_ATTEMPTS` variables.
const ATTEMPTS: std::ops::RangeInclusive<u32> = 1..=10;

impl JobOptions {
    /// Reads the options from the job's exported environment.
    pub(crate) fn read(env: &BTreeMap<String, String>) -> Self {
        let get = |key: &str| value(env, key);
        let mut warnings = Vec::new();
        let submodules = match get("GIT_SUBMODULE_STRATEGY") {
            None | Some("none") => Submodules::None,
            Some("normal") => Submodules::Normal,
            Some("recursive") => Submodules::Recursive,
            Some(other) => {
                warnings.push(format!(
                    "GIT_SUBMODULE_STRATEGY `{other}` is not one of none, normal, recursive; submodules are left alone"
                ));
                Submodules::None
            }
        };
        let submodule_depth = number(env, "GIT_SUBMODULE_DEPTH", &mut warnings)
            .or_else(|| number(env, "GIT_DEPTH", &mut warnings));
        let get_sources_attempts = attempts(env, "GET_SOURCES_ATTEMPTS", &mut warnings);
        let artifact_download_attempts = attempts(env, "ARTIFACT_DOWNLOAD_ATTEMPTS", &mut warnings);
        let script_timeout = duration(env, "RUNNER_SCRIPT_TIMEOUT", &mut warnings);
        let after_script_timeout = duration(env, "RUNNER_AFTER_SCRIPT_TIMEOUT", &mut warnings);
        let words = |key: &str| -> Option<Vec<String>> {
            get(key).map(|v| v.split_whitespace().map(str::to_owned).collect())
        };
        Self {
            submodules,
            submodule_depth,
            submodule_paths: words("GIT_SUBMODULE_PATHS").unwrap_or_default(),
            submodule_update_flags: words("GIT_SUBMODULE_UPDATE_FLAGS").unwrap_or_default(),
            clean_flags: match get("GIT_CLEAN_FLAGS") {
                Some("none") => None,
                Some(_) => words("GIT_CLEAN_FLAGS"),
                None => Some(vec!["-ffdx".to_owned()]),
            },
            checkout: !get("GIT_CHECKOUT").is_some_and(is_false),
            fetch_flags: words("GIT_FETCH_EXTRA_FLAGS")
                .unwrap_or_else(|| vec!["--prune".to_owned(), "--quiet".to_owned()]),
            lfs_skip: get("GIT_LFS_SKIP_SMUDGE").is_some_and(is_true),
            get_sources_attempts,
            artifact_download_attempts,
            debug_trace: get("CI_DEBUG_TRACE").is_some_and(is_true),
            timestamps: get("FF_TIMESTAMPS").is_some_and(is_true),
            script_sections: get("FF_SCRIPT_SECTIONS").is_some_and(is_true),
            script_timeout,
            after_script_timeout,
            warnings,
        }
    }
}

fn value<'a>(env: &'a BTreeMap<String, String>, key: &str) -> Option<&'a str> {
    env.get(key).map(|v| v.trim()).filter(|v| !v.is_empty())
}

fn number(env: &BTreeMap<String, String>, key: &str, warnings: &mut Vec<String>) -> Option<u32> {
    let value = value(env, key)?;
    match value.parse::<u32>() {
        Ok(n) => Some(n),
        Err(_) => {
            warnings.push(format!("{key} `{value}` is not a whole number; ignored"));
            None
        }
    }
}

fn attempts(env: &BTreeMap<String, String>, key: &str, warnings: &mut Vec<String>) -> u32 {
    match number(env, key, warnings) {
        Some(n) if ATTEMPTS.contains(&n) => n,
        Some(n) => {
            let clamped = n.clamp(*ATTEMPTS.start(), *ATTEMPTS.end());
            warnings.push(format!(
                "{key} must be between 1 and 10 (is {n}); using {clamped}"
            ));
            clamped
        }
        None => 1,
    }
}

fn duration(
    env: &BTreeMap<String, String>,
    key: &str,
    warnings: &mut Vec<String>,
) -> Option<Duration> {
    let text = value(env, key)?;
    let parsed = parse_duration(text);
    if parsed.is_none() {
        warnings.push(format!(
            "{key} `{text}` is not a duration (like `10m` or `1h30m`); ignored"
        ));
    }
    parsed
}

/// Go's `strconv.ParseBool` truths, which gitlab-runner uses for its flags.
fn is_true(value: &str) -> bool {
    matches!(value, "1" | "t" | "T" | "true" | "TRUE" | "True")
}

fn is_false(value: &str) -> bool {
    matches!(value, "0" | "f" | "F" | "false" | "FALSE" | "False")
}

/// A Go-style duration (`90s`, `10m`, `1h30m`), as gitlab-runner reads its timeouts; `humantime`
/// takes a superset of these.
fn parse_duration(value: &str) -> Option<Duration> {
    humantime::parse_duration(value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults_are_gitlab_runners() {
        let options = JobOptions::read(&BTreeMap::new());
        assert_eq!(options.submodules, Submodules::None);
        assert_eq!(options.clean_flags, Some(vec!["-ffdx".to_owned()]));
        assert_eq!(options.fetch_flags, ["--prune", "--quiet"]);
        assert!(options.checkout && !options.debug_trace && !options.lfs_skip);
        assert_eq!(
            (
                options.get_sources_attempts,
                options.artifact_download_attempts
            ),
            (1, 1)
        );
        assert!(options.warnings.is_empty());
    }

    #[test]
    fn git_variables_are_read_under_gitlab_runners_names() {
        let options = JobOptions::read(&env(&[
            ("GIT_SUBMODULE_STRATEGY", "recursive"),
            ("GIT_DEPTH", "5"),
            ("GIT_SUBMODULE_PATHS", "libs/a  :(exclude)libs/b"),
            ("GIT_SUBMODULE_UPDATE_FLAGS", "--remote --jobs 4"),
            ("GIT_CLEAN_FLAGS", "none"),
            ("GIT_CHECKOUT", "false"),
            ("GIT_FETCH_EXTRA_FLAGS", "--no-tags"),
            ("GET_SOURCES_ATTEMPTS", "3"),
            ("ARTIFACT_DOWNLOAD_ATTEMPTS", "12"),
            ("CI_DEBUG_TRACE", "true"),
            ("RUNNER_SCRIPT_TIMEOUT", "1h30m"),
        ]));
        assert_eq!(options.submodules, Submodules::Recursive);
        assert_eq!(options.submodule_depth, Some(5), "GIT_DEPTH when unset");
        assert_eq!(options.submodule_paths, ["libs/a", ":(exclude)libs/b"]);
        assert_eq!(options.submodule_update_flags, ["--remote", "--jobs", "4"]);
        assert_eq!(options.clean_flags, None);
        assert!(!options.checkout && options.debug_trace);
        assert_eq!(options.fetch_flags, ["--no-tags"]);
        assert_eq!(options.get_sources_attempts, 3);
        assert_eq!(options.artifact_download_attempts, 10);
        assert_eq!(options.script_timeout, Some(Duration::from_secs(5400)));
        assert_eq!(options.warnings.len(), 1, "{:?}", options.warnings);
        assert!(options.warnings[0].contains("ARTIFACT_DOWNLOAD_ATTEMPTS"));
    }

    #[test]
    fn unreadable_values_fall_back_with_a_warning_naming_the_variable() {
        let options = JobOptions::read(&env(&[
            ("GIT_SUBMODULE_STRATEGY", "all"),
            ("GET_SOURCES_ATTEMPTS", "three"),
            ("RUNNER_AFTER_SCRIPT_TIMEOUT", "soon"),
        ]));
        assert_eq!(options.submodules, Submodules::None);
        assert_eq!(options.get_sources_attempts, 1);
        assert_eq!(options.after_script_timeout, None);
        for name in [
            "GIT_SUBMODULE_STRATEGY",
            "GET_SOURCES_ATTEMPTS",
            "RUNNER_AFTER_SCRIPT_TIMEOUT",
        ] {
            assert!(
                options.warnings.iter().any(|w| w.contains(name)),
                "{name}: {:?}",
                options.warnings
            );
        }
    }
}
