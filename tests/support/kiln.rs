//! Runs the real `kiln` binary as a child process for end-to-end tests.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `kiln run` process with its config in a temporary directory.
pub struct KilnProcess {
    child: Option<Child>,
    /// Holds the config file and the work directories.
    pub dir: tempfile::TempDir,
    /// The HTTP address it listens on.
    pub http: String,
    log: PathBuf,
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The path of the built `kiln` binary: Cargo's for integration tests; for the examples that
/// reuse these helpers (which Cargo gives no binary path), `KILN_BIN` or `target/debug/kiln`.
pub fn kiln_bin() -> &'static str {
    match option_env!("CARGO_BIN_EXE_kiln") {
        Some(path) => path,
        None => {
            static PATH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
            PATH.get_or_init(|| {
                std::env::var("KILN_BIN").unwrap_or_else(|_| {
                    concat!(env!("CARGO_MANIFEST_DIR"), "/target/debug/kiln").to_owned()
                })
            })
        }
    }
}

/// A config for one GitLab runner at `url` with `token`; `extra` is appended at the top level.
pub fn config(url: &str, token: &str, extra: &str) -> String {
    format!(
        r#"{extra}

[agent]
trace_interval = "1s"
keepalive_interval = "2s"

[[sources.gitlab]]
name = "test"
url = "{url}"
token = "{token}"
system_id = "s_0123456789ab"
poll_timeout = "10s"
"#
    )
}

impl KilnProcess {
    /// Starts `kiln run` with `config` (an `[http]` listen address and a work dir are added).
    pub fn start(config: &str) -> Self {
        Self::start_with_env(config, &[])
    }

    /// [`Self::start`] with extra environment variables (`KILN_…` overrides).
    pub fn start_with_env(config: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let http = format!("127.0.0.1:{port}");
        let work = dir.path().join("work");
        let text = format!(
            "[http]\nlisten = \"{http}\"\n[local]\nwork_dir = \"{}\"\n{config}",
            work.display()
        );
        // [http] and [local] must come before the top-level keys of `config`: TOML tables run
        // to the next header, so put the given text's top-level keys first.
        let (top, tables) = split_top_level(&text, config);
        let path = dir.path().join("kiln.toml");
        std::fs::write(&path, format!("{top}\n{tables}")).unwrap();
        // It holds tokens: readable by kiln's user only, as docs/security.md asks.
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let log = dir.path().join("kiln.log");
        let child = Command::new(kiln_bin())
            .arg("run")
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "kiln=debug,info")
            // The chaos tests' replay seed is for the tests; kiln reads every `KILN_…`
            // variable as a config override and would refuse it.
            .env_remove("KILN_CHAOS_SEED")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.path().join("kiln.err")).unwrap())
            .spawn()
            .unwrap();
        let mut process = Self {
            child: Some(child),
            dir,
            http,
            log,
        };
        process.wait_http();
        process
    }

    fn wait_http(&mut self) {
        // Generous: behind a fault proxy kiln's start-up checks (permissions, first list)
        // retry through injected faults before it listens.
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(&self.http).is_ok() {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "kiln exited ({status}) before it listened; log:\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("kiln did not start listening; log:\n{}", self.logs());
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Everything kiln logged so far.
    pub fn logs(&self) -> String {
        let mut text = String::new();
        for name in ["kiln.log", "kiln.err"] {
            if let Ok(mut f) = std::fs::File::open(self.dir.path().join(name)) {
                let _ = f.read_to_string(&mut text);
            }
        }
        let _ = &self.log;
        text
    }

    /// GET a path of its HTTP server: (status, body).
    pub async fn get(&self, path: &str) -> (u16, String) {
        let response = reqwest::get(format!("http://{}{path}", self.http))
            .await
            .unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    /// SIGTERM, then wait up to `within` for it to exit; returns whether it exited.
    pub fn terminate(&mut self, within: Duration) -> bool {
        send_signal(self.pid(), "TERM");
        self.wait_exit(within)
    }

    /// Waits up to `within` for the process to exit (after a signal); returns whether it did.
    pub fn wait_exit(&mut self, within: Duration) -> bool {
        let child = self.child.as_mut().unwrap();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if child.try_wait().unwrap().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// The work directory root.
    pub fn work_dir(&self) -> PathBuf {
        self.dir.path().join("work")
    }
}

impl Drop for KilnProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `git ARGS` in `dir` as the tests' committer; its output, trimmed.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Gives the git repository at `dir` to the user local builds run as when the tests run as
/// root (`nobody`): git clones only repositories of the user it runs as, as a GitLab's are,
/// seen through its HTTP server. Nothing to do for a non-root run.
pub fn give_repository_to_builds(dir: &Path) {
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    let chowned = Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(dir)
        .status()
        .unwrap();
    assert!(chowned.success(), "chown {}", dir.display());
}

/// Sends `signal` (`"TERM"`, `"KILL"`) to process `pid`.
pub fn send_signal(pid: u32, signal: &str) {
    let signal = match signal {
        "TERM" => nix::sys::signal::Signal::SIGTERM,
        "KILL" => nix::sys::signal::Signal::SIGKILL,
        other => panic!("unsupported signal {other}"),
    };
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
}

/// Pids of running `kiln agent` processes whose job file lies under `dir`.
pub fn agent_pids(dir: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect();
        if args.get(1).map(String::as_str) == Some("agent")
            && args.iter().any(|a| a.starts_with(&*dir.to_string_lossy()))
        {
            pids.push(pid);
        }
    }
    pids
}

/// Splits `text` so the top-level keys of `config` come before any table header.
fn split_top_level(text: &str, config: &str) -> (String, String) {
    let mut top = String::new();
    let mut rest = String::new();
    let mut in_table = false;
    for line in config.lines() {
        if line.trim_start().starts_with('[') {
            in_table = true;
        }
        if in_table {
            rest.push_str(line);
            rest.push('\n');
        } else {
            top.push_str(line);
            top.push('\n');
        }
    }
    let prefix = text.strip_suffix(config).unwrap_or(text);
    (top, format!("{prefix}\n{rest}"))
}
