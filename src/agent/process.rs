//! Runs one build process (a step's shell, git) with its output merged into the trace, a
//! deadline, and interruption by cancel or shutdown; the whole process group is killed when the
//! step ends so no background process outlives it.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::trace::{Remote, Trace};

/// How long a process gets between SIGTERM and SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(5);

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exit {
    /// It exited with this code (128 + n for a signal).
    Code(i32),
    /// It ran past its deadline and was killed.
    TimedOut,
    /// GitLab said `canceling`: it was stopped; after_script still runs.
    Canceling,
    /// GitLab said `canceled` (or the job is gone): it was stopped.
    Canceled,
    /// The agent was told to stop (SIGTERM: coordinator shutdown).
    Aborted,
}

/// What may interrupt a running process.
#[derive(Debug, Clone)]
pub(crate) struct Interrupts {
    /// What GitLab says about the job.
    pub(crate) remote: watch::Receiver<Remote>,
    /// Cancelled when the agent must stop (SIGTERM).
    pub(crate) abort: CancellationToken,
    /// Whether `canceling` interrupts (not during after_script, which canceling runs).
    pub(crate) stop_on_canceling: bool,
}

impl Interrupts {
    fn pending(&self) -> Option<Exit> {
        if self.abort.is_cancelled() {
            return Some(Exit::Aborted);
        }
        match *self.remote.borrow() {
            Remote::Canceled => Some(Exit::Canceled),
            Remote::Canceling if self.stop_on_canceling => Some(Exit::Canceling),
            _ => None,
        }
    }

    async fn wait(&mut self) -> Exit {
        loop {
            if let Some(exit) = self.pending() {
                return exit;
            }
            tokio::select! {
                () = self.abort.cancelled() => return Exit::Aborted,
                changed = self.remote.changed() => {
                    if changed.is_err() {
                        // The uplink is gone; only abort can interrupt now.
                        self.abort.cancelled().await;
                        return Exit::Aborted;
                    }
                }
            }
        }
    }
}

/// Runs `command` until it exits, `deadline` passes or an interrupt arrives. Its stdout and
/// stderr go to `trace`. The step runs in a process group of its own, killed whole when it
/// ends; should the agent die, its executor cleans up (the local executor kills the build's
/// session, a pod dies whole).
///
/// # Errors
/// The process could not be started.
pub(crate) async fn run(
    mut command: tokio::process::Command,
    trace: &Arc<Trace>,
    deadline: Instant,
    interrupts: &mut Interrupts,
) -> std::io::Result<Exit> {
    if let Some(exit) = interrupts.pending() {
        return Ok(exit);
    }
    let (mut reader, writer) = std::io::pipe()?;
    command
        .stdin(std::process::Stdio::null())
        .stdout(writer.try_clone()?)
        .stderr(writer)
        .process_group(0)
        .kill_on_drop(true);
    let mut child = command.spawn()?;
    // The Command holds our copies of the pipe's write end; drop them so the reader sees EOF.
    drop(command);
    let pid = child.id().map(|id| Pid::from_raw(id as i32));
    let sink = Arc::clone(trace);
    let reader_task = tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => sink.write(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
    });

    let exit = tokio::select! {
        status = child.wait() => Some(status?),
        () = tokio::time::sleep_until(deadline) => None,
        interrupted = interrupts.wait() => {
            stop(&mut child, pid).await;
            finish_reader(reader_task).await;
            return Ok(interrupted);
        }
    };
    let exit = match exit {
        Some(status) => {
            // Background processes the step left behind die with it.
            if let Some(pid) = pid {
                let _ = killpg(pid, Signal::SIGKILL);
            }
            Exit::Code(code_of(status))
        }
        None => {
            stop(&mut child, pid).await;
            Exit::TimedOut
        }
    };
    finish_reader(reader_task).await;
    Ok(exit)
}

async fn finish_reader(task: tokio::task::JoinHandle<()>) {
    // A process that escaped the group may still hold the pipe; don't wait for it forever.
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
}

/// SIGTERM to the group, then SIGKILL after the grace period.
async fn stop(child: &mut tokio::process::Child, pid: Option<Pid>) {
    let Some(pid) = pid else { return };
    let _ = killpg(pid, Signal::SIGTERM);
    if tokio::time::timeout(TERM_GRACE, child.wait())
        .await
        .is_err()
    {
        let _ = killpg(pid, Signal::SIGKILL);
        let _ = child.wait().await;
    } else {
        let _ = killpg(pid, Signal::SIGKILL);
    }
}

fn code_of(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

/// The shell scripts run in: `bash` when it is on PATH, else `sh`.
pub(crate) fn default_shell(path_var: Option<&str>) -> String {
    let found = path_var
        .unwrap_or("/usr/local/bin:/usr/bin:/bin")
        .split(':')
        .any(|dir| Path::new(dir).join("bash").is_file());
    if found { "bash".into() } else { "sh".into() }
}

/// How a step's script is written, beyond its commands.
#[derive(Debug, Clone, Default)]
pub(crate) struct ScriptOptions {
    /// Shell variables read from files before anything runs: values too large for one
    /// environment entry (see [`super::oversized`]), as `(name, file)`.
    pub(crate) from_files: Vec<(String, PathBuf)>,
    /// `CI_DEBUG_TRACE`: shell xtrace (`set -x`) for the commands.
    pub(crate) xtrace: bool,
    /// `FF_SCRIPT_SECTIONS`: each command in a collapsed section of its own.
    pub(crate) sections: bool,
}

/// Writes a step's script: each command echoed (green, like GitLab's runner) then run, in one
/// shell so `cd` and variables carry over, stopping at the first failure.
pub(crate) fn write_script(
    dir: &Path,
    step: &str,
    shell: &str,
    project_dir: &Path,
    lines: &[String],
    options: &ScriptOptions,
) -> std::io::Result<PathBuf> {
    let mut text = String::new();
    if shell.ends_with("bash") {
        text.push_str("set -eo pipefail\nset +o noclobber\n");
    } else {
        text.push_str("set -e\n");
    }
    // Read whole (a trailing newline too: the `x` guard keeps `$(...)` from eating it), and
    // not exported: the kernel could not pass such a value on to any child process.
    for (name, file) in &options.from_files {
        text.push_str(&format!(
            "{name}=\"$(cat {file}; printf x)\"; {name}=\"${{{name}%x}}\"\n",
            file = quote(&file.to_string_lossy())
        ));
    }
    text.push_str(&format!("cd {}\n", quote(&project_dir.to_string_lossy())));
    // xtrace (`CI_DEBUG_TRACE`) covers the job's commands only, not kiln's `printf` echoes and
    // section markers around them: `{ set +x; } 2>/dev/null` turns it off untraced.
    let (trace_on, trace_off) = if options.xtrace {
        ("set -x\n", "{ set +x; } 2>/dev/null\n")
    } else {
        ("", "")
    };
    for (i, line) in lines.iter().enumerate() {
        let mut shown = line.lines().next().unwrap_or("").to_owned();
        if line.trim_end().contains('\n') {
            shown.push_str(" # collapsed multi-line command");
        }
        let section = format!("section_script_step_{i}");
        if options.sections {
            text.push_str(&format!(
                "printf '\\033[0Ksection_start:%s:{section}[hide_duration=true,collapsed=true]\\r\\033[0K' \"$(date +%s)\"\n"
            ));
        }
        text.push_str(&format!(
            "printf '\\033[32;1m$ %s\\033[0;m\\n' {}\n",
            quote(&shown)
        ));
        text.push_str(trace_on);
        text.push_str(line);
        text.push('\n');
        text.push_str(trace_off);
        if options.sections {
            text.push_str(&format!(
                "printf '\\033[0Ksection_end:%s:{section}\\r\\033[0K' \"$(date +%s)\"\n"
            ));
        }
    }
    let path = dir.join(format!("script_{step}.sh"));
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Single-quotes `s` for a POSIX shell.
pub(crate) fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xtrace_shows_the_commands_but_not_kilns_echoes() {
        let dir = tempfile::tempdir().unwrap();
        let options = ScriptOptions {
            from_files: Vec::new(),
            xtrace: true,
            sections: true,
        };
        let script = write_script(
            dir.path(),
            "script",
            "sh",
            dir.path(),
            &["echo one".to_owned(), "echo two".to_owned()],
            &options,
        )
        .unwrap();
        let output = std::process::Command::new("sh")
            .arg(&script)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        let traced: Vec<&str> = stderr.lines().filter(|l| l.starts_with('+')).collect();
        assert_eq!(traced, ["+ echo one", "+ echo two"], "{stderr}");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            stdout.contains("one\n") && stdout.contains("two\n"),
            "{stdout}"
        );
    }

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(quote("it's"), r"'it'\''s'");
    }

    fn run_script(options: &ScriptOptions, lines: &[&str]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let lines: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
        let path = write_script(dir.path(), "s", "sh", dir.path(), &lines, options).unwrap();
        let out = std::process::Command::new("sh")
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    /// Linux refuses one environment entry over 128 KiB (E2BIG): such a value reaches the
    /// script as a shell variable read from a file, whole, trailing newline included, and
    /// child processes still start.
    #[test]
    fn a_value_read_from_a_file_is_whole_and_children_still_start() {
        let dir = tempfile::tempdir().unwrap();
        let big = format!("{}\n", "v".repeat(200_000));
        let file = dir.path().join("BIG.value");
        std::fs::write(&file, &big).unwrap();
        let options = ScriptOptions {
            from_files: vec![("BIG".into(), file)],
            ..ScriptOptions::default()
        };
        let out = run_script(
            &options,
            &["echo len=${#BIG}", "env | grep -c ^BIG= || true"],
        );
        assert!(out.contains("len=200001"), "{out}");
        assert!(out.ends_with("0\n"), "not exported: {out}");
    }

    #[test]
    fn script_sections_wrap_each_command() {
        let options = ScriptOptions {
            sections: true,
            ..ScriptOptions::default()
        };
        let out = run_script(&options, &["echo one", "echo two"]);
        assert!(
            out.contains("section_start:") && out.contains("section_end:"),
            "{out}"
        );
        for i in 0..2 {
            assert!(out.contains(&format!(":section_script_step_{i}")), "{out}");
        }
    }
}
