//! Variables too large for one environment entry. Linux caps each `KEY=value` string handed
//! to `execve` at 128 KiB (`MAX_ARG_STRLEN`); one larger entry makes every process start fail
//! with "Argument list too long" — git, the shell, anything. Such a value is written to a 0600
//! file instead and the step's script reads it into a shell variable of the same name (not
//! exported: no child process could be started with it in its environment).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Linux's `MAX_ARG_STRLEN` (32 pages of 4 KiB): the longest `KEY=value` string, NUL included.
const MAX_ENTRY: usize = 32 * 4096;

/// Moves every entry of `env` that `execve` would refuse into a file under `dir`, returning
/// `(name, file)` for each, in name order.
///
/// # Errors
/// A file cannot be written.
pub(crate) fn move_to_files(
    env: &mut BTreeMap<String, String>,
    dir: &Path,
) -> std::io::Result<Vec<(String, PathBuf)>> {
    use std::os::unix::fs::OpenOptionsExt;
    let large: Vec<String> = env
        .iter()
        .filter(|(k, v)| k.len() + 1 + v.len() + 1 > MAX_ENTRY)
        .map(|(k, _)| k.clone())
        .collect();
    let mut moved = Vec::new();
    for key in large {
        let Some(value) = env.remove(&key) else {
            continue;
        };
        // Only a shell name can be assigned; GitLab's keys are `[A-Za-z0-9_]+` anyway.
        if !is_shell_name(&key) {
            continue;
        }
        let path = dir.join(format!("{key}.value"));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)?;
        std::io::Write::write_all(&mut file, value.as_bytes())?;
        moved.push((key, path));
    }
    Ok(moved)
}

fn is_shell_name(key: &str) -> bool {
    !key.is_empty()
        && !key.starts_with(|c: char| c.is_ascii_digit())
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_entries_over_128_kib_move_and_their_files_hold_the_value() {
        let dir = tempfile::tempdir().unwrap();
        let fits = "f".repeat(MAX_ENTRY - "FITS=".len() - 1);
        let big = "b".repeat(200_000);
        let mut env: BTreeMap<String, String> = [
            ("FITS".to_owned(), fits.clone()),
            ("BIG".to_owned(), big.clone()),
            ("PATH".to_owned(), "/bin".to_owned()),
        ]
        .into();
        let moved = move_to_files(&mut env, dir.path()).unwrap();
        assert_eq!(moved.len(), 1);
        assert_eq!(moved[0].0, "BIG");
        assert_eq!(std::fs::read_to_string(&moved[0].1).unwrap(), big);
        assert_eq!(env.get("FITS"), Some(&fits));
        assert!(!env.contains_key("BIG"));
        // What stays starts a process.
        let status = std::process::Command::new("true")
            .env_clear()
            .envs(&env)
            .status()
            .unwrap();
        assert!(status.success());
    }
}
