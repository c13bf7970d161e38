//! What the local executor puts between kiln and a build's process: a session of the build's
//! own, and — when kiln runs as root — an unprivileged user of the build's own.
//!
//! `kiln sandbox [--user UID:GID] -- PROGRAM ARGS…` (started by the local executor, never by
//! hand) becomes the leader of a new session, drops to the build user (no supplementary
//! groups), and replaces itself with the program. So:
//! - the build cannot read kiln's `/proc/<pid>/environ` or its config file, nor signal it
//!   (another uid);
//! - every process of the build is in the session whose id is the build's first pid, which
//!   kiln knows without asking the build: at the end it kills that session, never a process
//!   group a file written by the build names.

use std::ffi::CString;
use std::path::Path;

use nix::unistd::{Gid, Pid, Uid};

/// The file in the build's directory where `kiln sandbox` says why it could not start the
/// build (the exit code alone could be the program's).
pub const FAILURE_FILE: &str = "kiln-sandbox-failure";

/// Why `kiln sandbox` could not start a build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The program is not on the PATH.
    NotFound(String),
    /// Anything else, in words.
    Other(String),
}

impl Failure {
    /// The exit code of `kiln sandbox` for this failure (a shell's).
    pub fn code(&self) -> i32 {
        match self {
            Self::NotFound(_) => 127,
            Self::Other(_) => 126,
        }
    }

    /// Leaves the failure in [`FAILURE_FILE`] of the current directory (the build's) for the
    /// executor, and on stderr for kiln's log.
    pub fn report(&self) {
        let text = match self {
            Self::NotFound(program) => format!("not found: {program}"),
            Self::Other(why) => why.clone(),
        };
        eprintln!("kiln sandbox: {text}");
        let _ = std::fs::write(FAILURE_FILE, &text);
    }

    /// The failure left in `dir`, if any.
    pub fn left_in(dir: &Path) -> Option<Self> {
        let text = std::fs::read_to_string(dir.join(FAILURE_FILE)).ok()?;
        Some(match text.strip_prefix("not found: ") {
            Some(program) => Self::NotFound(program.to_owned()),
            None => Self::Other(text),
        })
    }
}

/// The user a build runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildUser {
    /// Its uid.
    pub uid: u32,
    /// Its primary gid.
    pub gid: u32,
}

impl BuildUser {
    /// `name`, `uid` or `uid:gid` as a user of this machine (a bare uid unknown to it gets the
    /// gid of the same number).
    ///
    /// # Errors
    /// A name this machine does not know, or a number that is not one.
    pub fn resolve(spec: &str) -> Result<Self, String> {
        let spec = spec.trim();
        if let Some((uid, gid)) = spec.split_once(':') {
            let number = |s: &str| {
                s.parse::<u32>()
                    .map_err(|_| format!("`{spec}` is not a user: use a name, a uid or uid:gid"))
            };
            return Ok(Self {
                uid: number(uid)?,
                gid: number(gid)?,
            });
        }
        if let Ok(uid) = spec.parse::<u32>() {
            let gid = nix::unistd::User::from_uid(Uid::from_raw(uid))
                .ok()
                .flatten()
                .map_or(uid, |u| u.gid.as_raw());
            return Ok(Self { uid, gid });
        }
        match nix::unistd::User::from_name(spec) {
            Ok(Some(user)) => Ok(Self {
                uid: user.uid.as_raw(),
                gid: user.gid.as_raw(),
            }),
            Ok(None) => Err(format!("this machine has no user `{spec}`")),
            Err(e) => Err(format!("cannot look up user `{spec}`: {e}")),
        }
    }

    /// `uid:gid`, as `kiln sandbox --user` takes it.
    pub fn arg(self) -> String {
        format!("{}:{}", self.uid, self.gid)
    }

    /// Whether this is kiln's own user.
    pub fn is_current(self) -> bool {
        self.uid == nix::unistd::geteuid().as_raw()
    }

    /// Gives `path` to this user.
    ///
    /// # Errors
    /// The `chown` failed.
    pub fn own(self, path: &Path) -> std::io::Result<()> {
        std::os::unix::fs::lchown(path, Some(self.uid), Some(self.gid))
    }
}

/// Becomes a session leader, drops to `user` (if any) and executes `program` with `args`.
/// Returns only when that fails, with why.
pub fn exec(user: Option<BuildUser>, program: &str, args: &[String]) -> Failure {
    Failure::Other(match start(user, program, args) {
        Err(Failure::Other(why)) => why,
        Err(not_found) => return not_found,
        Ok(never) => match never {},
    })
}

fn start(
    user: Option<BuildUser>,
    program: &str,
    args: &[String],
) -> Result<std::convert::Infallible, Failure> {
    // The program is opened before the user changes: the build user may not be able to
    // reach it through its path (a kiln binary under /root), only to execute the file.
    let Some(path) = find_program(program) else {
        return Err(Failure::NotFound(program.to_owned()));
    };
    let file = std::fs::File::open(&path)
        .map_err(|e| Failure::Other(format!("cannot open {}: {e}", path.display())))?;
    nix::unistd::setsid().map_err(|e| Failure::Other(format!("cannot start a session: {e}")))?;
    if let Some(user) = user {
        let gid = Gid::from_raw(user.gid);
        let uid = Uid::from_raw(user.uid);
        let dropped = nix::unistd::setgroups(&[])
            .and_then(|()| nix::unistd::setgid(gid))
            .and_then(|()| nix::unistd::setuid(uid));
        if let Err(e) = dropped {
            return Err(Failure::Other(format!(
                "cannot become uid {} gid {}: {e}",
                user.uid, user.gid
            )));
        }
        // Never go on as root by accident.
        if nix::unistd::getuid() != uid || nix::unistd::geteuid() != uid {
            return Err(Failure::Other(format!(
                "still not uid {} after setuid",
                user.uid
            )));
        }
    }
    let Ok(argv) = std::iter::once(program)
        .chain(args.iter().map(String::as_str))
        .map(CString::new)
        .collect::<Result<Vec<_>, _>>()
    else {
        return Err(Failure::Other("an argument holds a NUL byte".to_owned()));
    };
    let env: Vec<CString> = std::env::vars_os()
        .filter_map(|(k, v)| {
            use std::os::unix::ffi::OsStrExt;
            let mut entry = k.as_bytes().to_vec();
            entry.push(b'=');
            entry.extend_from_slice(v.as_bytes());
            CString::new(entry).ok()
        })
        .collect();
    // By path where the build user can reach it (so a script's interpreter can open it too);
    // else through the file opened above (the kiln binary in a directory only root can enter).
    if let Ok(c_path) = CString::new(path.as_os_str().as_encoded_bytes()) {
        match nix::unistd::execve(&c_path, &argv, &env) {
            Err(nix::errno::Errno::EACCES) => {}
            Err(e) => {
                return Err(Failure::Other(format!(
                    "cannot execute {}: {e}",
                    path.display()
                )));
            }
            Ok(never) => match never {},
        }
    }
    nix::unistd::fexecve(&file, &argv, &env)
        .map_err(|e| Failure::Other(format!("cannot execute {}: {e}", path.display())))
}

/// `program` as a path: itself when it has a `/`, else the first executable of that name
/// on the PATH.
fn find_program(program: &str) -> Option<std::path::PathBuf> {
    if program.contains('/') {
        return Some(program.into());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| {
            use std::os::unix::fs::PermissionsExt;
            candidate
                .metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Kills every process still in the session whose leader was `leader` (the build's first
/// process): what a build leaves running when it ends or is stopped. A process that left the
/// session on purpose (`setsid`) is not found; nothing outside the session is ever signalled.
pub fn kill_session(leader: Pid) {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if session_of(pid) == Some(leader.as_raw()) {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// The session id of process `pid`, from `/proc/<pid>/stat` (`pid (comm) state ppid pgrp
/// session …`; the command name may hold spaces and parentheses, so fields are counted from
/// the last `)`).
fn session_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_resolve_by_name_number_and_pair() {
        assert_eq!(
            BuildUser::resolve("0").unwrap(),
            BuildUser { uid: 0, gid: 0 }
        );
        assert_eq!(
            BuildUser::resolve("1234:5678").unwrap(),
            BuildUser {
                uid: 1234,
                gid: 5678
            }
        );
        assert_eq!(BuildUser::resolve("root").unwrap().uid, 0);
        let err = BuildUser::resolve("no-such-user-here").unwrap_err();
        assert!(err.contains("no user `no-such-user-here`"), "{err}");
        assert!(BuildUser::resolve("1:x").is_err());
    }

    #[test]
    fn the_session_of_this_process_is_read_from_proc() {
        let me = std::process::id() as i32;
        let session = nix::unistd::getsid(None).unwrap().as_raw();
        assert_eq!(session_of(me), Some(session));
    }
}
