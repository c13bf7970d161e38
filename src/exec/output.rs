//! What `kiln exec` prints: trace lines prefixed by the job's name, a progress line on a
//! terminal, and the summary table at the end.

use std::collections::HashMap;
use std::io::Write;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use regex::Regex;

/// GitLab's collapsible-section markers (`section_start:<ts>:<name>\r\e[0K`).
static SECTION: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"section_(?:start|end):\d+:[A-Za-z0-9_.\-\[\]=,]*\r(?:\x1b\[0K)?")
        .unwrap_or_else(|_| unreachable!("the section pattern is valid"))
});
/// ANSI escape sequences (colours, erase-line, …).
static ANSI: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\x1b\[[0-9;?]*[A-Za-z]")
        .unwrap_or_else(|_| unreachable!("the ANSI pattern is valid"))
});

/// Colours for job names, cycled in pipeline order.
const COLOURS: [&str; 6] = ["36", "35", "33", "34", "32", "96"];

/// Makes one trace line printable after a prefix: section markers and carriage returns go;
/// with `plain`, colours go too.
pub(crate) fn clean_line(line: &str, plain: bool) -> String {
    let line = SECTION.replace_all(line, "");
    // A carriage return (progress bars) would overwrite the prefix: keep what shows last.
    let line = line.rsplit('\r').find(|s| !s.is_empty()).unwrap_or("");
    if plain {
        ANSI.replace_all(line, "").into_owned()
    } else {
        line.to_owned()
    }
}

/// One row of the summary.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub(crate) job: String,
    pub(crate) stage: String,
    pub(crate) status: String,
    pub(crate) duration: Option<Duration>,
    pub(crate) exit_code: Option<i32>,
}

/// The summary table, one line per job (no trailing colour codes when `plain`).
pub(crate) fn summary(rows: &[Row], plain: bool) -> String {
    let header = ["JOB", "STAGE", "STATUS", "DURATION", "EXIT"];
    let cells: Vec<[String; 5]> = rows
        .iter()
        .map(|r| {
            [
                r.job.clone(),
                r.stage.clone(),
                r.status.clone(),
                r.duration
                    .map(|d| format!("{:.1}s", d.as_secs_f64()))
                    .unwrap_or_else(|| "-".into()),
                r.exit_code
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &cells {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut push_row = |row: [&str; 5], colour: Option<&str>| {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            let padded = format!("{cell:<w$}");
            match (i, colour) {
                (2, Some(c)) if !plain => line.push_str(&format!("\x1b[{c}m{padded}\x1b[0m")),
                _ => line.push_str(&padded),
            }
            if i + 1 < row.len() {
                line.push_str("  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    };
    push_row(header, None);
    for row in &cells {
        let colour = match row[2].as_str() {
            "success" => "32",
            s if s.starts_with("failed (allowed)") => "33",
            s if s.starts_with("failed") => "31",
            _ => "90",
        };
        push_row([&row[0], &row[1], &row[2], &row[3], &row[4]], Some(colour));
    }
    out
}

#[derive(Debug, Default)]
struct State {
    /// Bytes of each job not yet ended by a newline.
    partial: HashMap<String, Vec<u8>>,
    running: Vec<String>,
    finished: usize,
    total: usize,
    progress_shown: bool,
}

/// Writes job output to stdout as it arrives.
#[derive(Debug)]
pub(crate) struct Printer {
    tty: bool,
    width: usize,
    colours: HashMap<String, &'static str>,
    state: Mutex<State>,
}

impl Printer {
    /// A printer for `jobs` (in pipeline order); `tty` enables colours and the progress line.
    pub(crate) fn new(jobs: &[String], tty: bool) -> Self {
        let colours = jobs
            .iter()
            .enumerate()
            .map(|(i, j)| (j.clone(), COLOURS[i % COLOURS.len()]))
            .collect();
        Self {
            tty,
            width: jobs.iter().map(|j| j.chars().count()).max().unwrap_or(0),
            colours,
            state: Mutex::new(State {
                total: jobs.len(),
                ..Default::default()
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn prefix(&self, job: &str) -> String {
        let padded = format!("{job:<w$}", w = self.width);
        match self.colours.get(job) {
            Some(c) if self.tty => format!("\x1b[{c}m{padded}\x1b[0m │ "),
            _ => format!("{padded} | "),
        }
    }

    /// Prints the complete lines in `bytes` of `job`'s trace.
    pub(crate) fn trace(&self, job: &str, bytes: &[u8]) {
        let mut state = self.lock();
        let buffer = state.partial.entry(job.to_owned()).or_default();
        buffer.extend_from_slice(bytes);
        let Some(last) = buffer.iter().rposition(|b| *b == b'\n') else {
            return;
        };
        let complete: Vec<u8> = buffer.drain(..=last).collect();
        let text = String::from_utf8_lossy(&complete);
        let mut out = String::new();
        for raw in text.split_terminator('\n') {
            let line = clean_line(raw, !self.tty);
            // A section end leaves an empty line; it carries nothing.
            if SECTION.is_match(raw) && ANSI.replace_all(&line, "").trim().is_empty() {
                continue;
            }
            out.push_str(&self.prefix(job));
            out.push_str(&line);
            out.push('\n');
        }
        self.emit(&mut state, &out);
    }

    /// Prints a line of kiln's own about `job` (started, skipped, …).
    pub(crate) fn note(&self, job: &str, text: &str) {
        let mut state = self.lock();
        let line = if self.tty {
            format!("{}\x1b[1m{text}\x1b[0m\n", self.prefix(job))
        } else {
            format!("{}{text}\n", self.prefix(job))
        };
        self.emit(&mut state, &line);
    }

    /// Flushes what is left of `job`'s trace and marks it finished.
    pub(crate) fn finished(&self, job: &str) {
        let rest = self.lock().partial.remove(job).unwrap_or_default();
        if !rest.is_empty() {
            let mut rest = rest;
            rest.push(b'\n');
            self.trace(job, &rest);
        }
        let mut state = self.lock();
        state.running.retain(|j| j != job);
        state.finished += 1;
        self.emit(&mut state, "");
    }

    /// Marks `job` as running.
    pub(crate) fn started(&self, job: &str) {
        let mut state = self.lock();
        state.running.push(job.to_owned());
        self.emit(&mut state, "");
    }

    /// Marks `job` as settled without running (skipped).
    pub(crate) fn settled(&self) {
        let mut state = self.lock();
        state.finished += 1;
        self.emit(&mut state, "");
    }

    /// Removes the progress line (before the summary).
    pub(crate) fn clear_progress(&self) {
        let mut state = self.lock();
        if state.progress_shown {
            print!("\r\x1b[2K");
            let _ = std::io::stdout().flush();
            state.progress_shown = false;
        }
    }

    fn emit(&self, state: &mut State, text: &str) {
        let mut stdout = std::io::stdout().lock();
        if self.tty && state.progress_shown {
            let _ = write!(stdout, "\r\x1b[2K");
        }
        let _ = write!(stdout, "{text}");
        if self.tty {
            let running = if state.running.is_empty() {
                "-".to_owned()
            } else {
                state.running.join(", ")
            };
            let _ = write!(
                stdout,
                "\x1b[2m[{}/{} done] running: {running}\x1b[0m",
                state.finished, state.total
            );
            state.progress_shown = true;
        }
        let _ = stdout.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lines_lose_sections_and_colours() {
        let line = "section_start:1700000000:step_script\r\x1b[0K\x1b[0;m\x1b[36;1mExecuting \"step_script\"\x1b[0;m";
        assert_eq!(clean_line(line, true), "Executing \"step_script\"");
        assert_eq!(
            clean_line("\x1b[32;1mJob succeeded\x1b[0;m", true),
            "Job succeeded"
        );
        assert_eq!(clean_line("10%\r50%\r100%", true), "100%");
        assert_eq!(
            clean_line("\x1b[32;1mJob succeeded\x1b[0;m", false),
            "\x1b[32;1mJob succeeded\x1b[0;m"
        );
    }

    #[test]
    fn summary_aligns_columns() {
        let rows = vec![
            Row {
                job: "build".into(),
                stage: "build".into(),
                status: "success".into(),
                duration: Some(Duration::from_millis(1500)),
                exit_code: Some(0),
            },
            Row {
                job: "deploy-prod".into(),
                stage: "deploy".into(),
                status: "skipped (manual)".into(),
                duration: None,
                exit_code: None,
            },
        ];
        let table = summary(&rows, true);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0],
            "JOB          STAGE   STATUS            DURATION  EXIT"
        );
        assert_eq!(
            lines[1],
            "build        build   success           1.5s      0"
        );
        assert_eq!(
            lines[2],
            "deploy-prod  deploy  skipped (manual)  -         -"
        );
    }
}
