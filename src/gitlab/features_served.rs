//! The features kiln declares in `jobs/request` against the code that serves each and the table
//! in docs/gitlab.md: GitLab routes jobs by these flags (and drops a job needing an undeclared
//! one as `runner_unsupported`), so a flag declared without its code path — or a served one left
//! undeclared — misroutes jobs silently.
//!
//! [`SERVED`] is the one place a feature is added: its name, the file and the item that serve
//! it. The tests fail until `Features::for_executor` declares it and docs/gitlab.md lists it.

use std::collections::BTreeSet;

use super::api::Features;

/// Where it is declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Declared {
    /// By every executor.
    Always,
    /// Only by executors that run images (Kubernetes); the local executor runs on the host.
    WithImages,
    /// Only when a build cache is configured (`[cache]`), by every executor.
    WithCache,
}

/// Every feature kiln declares `true`: `(name, when, file, item that serves it)`.
const SERVED: &[(&str, Declared, &str, &str)] = &[
    (
        "variables",
        Declared::Always,
        "src/agent/mod.rs",
        "fn exported_env(",
    ),
    (
        "image",
        Declared::WithImages,
        "src/executor/kubernetes/podspec.rs",
        "fn kiln_agent_spec(",
    ),
    (
        "services",
        Declared::WithImages,
        "src/agent/mod.rs",
        "async fn wait_for_services(",
    ),
    (
        "artifacts",
        Declared::Always,
        "src/agent/mod.rs",
        "async fn upload_artifacts(",
    ),
    (
        "upload_multiple_artifacts",
        Declared::Always,
        "src/agent/mod.rs",
        "async fn upload_one(",
    ),
    (
        "upload_raw_artifacts",
        Declared::Always,
        "src/agent/artifacts.rs",
        "fn copy_raw(",
    ),
    (
        "refspecs",
        Declared::Always,
        "src/agent/git.rs",
        "pub(crate) fn commands(",
    ),
    (
        "masking",
        Declared::Always,
        "src/agent/mask.rs",
        "struct Masker",
    ),
    (
        "raw_variables",
        Declared::Always,
        "src/variables.rs",
        "if def.raw",
    ),
    (
        "artifacts_exclude",
        Declared::Always,
        "src/agent/artifacts.rs",
        "pub(crate) fn collect(",
    ),
    (
        "multi_build_steps",
        Declared::Always,
        "src/agent/mod.rs",
        "async fn run_step(",
    ),
    (
        "trace_reset",
        Declared::Always,
        "src/agent/trace.rs",
        "pub(crate) fn reset(",
    ),
    (
        "trace_checksum",
        Declared::Always,
        "src/agent/trace.rs",
        "pub(crate) fn checksum(",
    ),
    (
        "trace_size",
        Declared::Always,
        "src/gitlab/api.rs",
        "pub struct TraceOutput",
    ),
    (
        "cancelable",
        Declared::Always,
        "src/agent/process.rs",
        "Remote::Canceled => Some(Exit::Canceled)",
    ),
    (
        "return_exit_code",
        Declared::Always,
        "src/agent/mod.rs",
        "exit_code: end.exit_code",
    ),
    (
        "cancel_gracefully",
        Declared::Always,
        "src/agent/process.rs",
        "Remote::Canceling if self.stop_on_canceling",
    ),
    (
        "service_variables",
        Declared::WithImages,
        "src/sources/gitlab/build.rs",
        "fn service_variables(",
    ),
    (
        "service_multiple_aliases",
        Declared::WithImages,
        "src/sources/gitlab/build.rs",
        "fn service_aliases(",
    ),
    (
        "cache",
        Declared::WithCache,
        "src/agent/cache.rs",
        "pub(super) async fn restore(",
    ),
    (
        "fallback_cache_keys",
        Declared::WithCache,
        "src/agent/cache.rs",
        ".get(FALLBACK_VARIABLE)",
    ),
    (
        "two_phase_job_commit",
        Declared::Always,
        "src/sources/gitlab/poller.rs",
        "state: \"running\"",
    ),
];

fn declared(images: bool, cache: bool) -> BTreeSet<String> {
    let json =
        serde_json::to_value(Features::for_executor(images).with_cache(cache)).unwrap_or_default();
    json.as_object()
        .map(|o| {
            o.iter()
                .filter(|(_, v)| v.as_bool() == Some(true))
                .map(|(k, _)| k.clone())
                .collect()
        })
        .unwrap_or_default()
}

fn served(images: bool, cache: bool) -> BTreeSet<String> {
    SERVED
        .iter()
        .filter(|(_, when, _, _)| match when {
            Declared::Always => true,
            Declared::WithImages => images,
            Declared::WithCache => cache,
        })
        .map(|(name, ..)| (*name).to_owned())
        .collect()
}

fn repo_file(path: &str) -> String {
    let full = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

#[test]
fn kiln_declares_exactly_the_features_it_serves() {
    for images in [false, true] {
        for cache in [false, true] {
            assert_eq!(
                declared(images, cache),
                served(images, cache),
                "declared (left) vs served (right), images: {images}, cache: {cache}"
            );
        }
    }
}

#[test]
fn every_served_feature_names_code_that_exists() {
    for (name, _, file, item) in SERVED {
        assert!(
            repo_file(file).contains(item),
            "feature `{name}`: {file} has no `{item}`; point SERVED at the code that serves it"
        );
    }
}

/// docs/gitlab.md's "Features declared" table has one row per field of `features`, saying
/// `yes`, `Kubernetes` (images only), `with \`[cache]\`` or `no` as kiln declares it.
#[test]
fn the_feature_table_in_the_docs_matches_what_is_declared() {
    let docs = repo_file("docs/gitlab.md");
    let section = docs
        .split("## Features declared")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .unwrap_or_default();
    let rows: Vec<(String, String)> = section
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let name = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            Some((name.to_owned(), (*cells.get(2)?).to_owned()))
        })
        .collect();
    let all = serde_json::to_value(Features::for_executor(true)).unwrap_or_default();
    let fields: BTreeSet<String> = all
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    let documented: BTreeSet<String> = rows.iter().map(|(n, _)| n.clone()).collect();
    assert!(
        fields.is_subset(&documented),
        "undocumented: {:?}",
        fields.difference(&documented).collect::<Vec<_>>()
    );
    let (local, kube) = (declared(false, false), declared(true, false));
    let cached = declared(true, true);
    for (name, status) in rows {
        let expected = match (
            local.contains(&name),
            kube.contains(&name),
            cached.contains(&name),
        ) {
            (true, _, _) => "yes",
            (false, true, _) => "Kubernetes",
            (false, false, true) => "with `[cache]`",
            (false, false, false) => "no",
        };
        assert_eq!(status, expected, "docs/gitlab.md row `{name}`");
    }
}
