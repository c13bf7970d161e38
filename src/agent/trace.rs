//! The job trace: masked output kept in order, and the uplink that streams it to GitLab with
//! `PATCH jobs/:id/trace` (Content-Range, ≤ 1 MiB per patch, 416 resume, server-set interval,
//! keep-alives) and reports what GitLab says about the job (`Job-Status`).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::mask::Masker;
use crate::gitlab::api::{ApiError, JobControl, JobUpdate, RunnerApi, TraceAck, UpdateAck};

/// Delay of the first trace update: just enough to catch the header lines.
const FIRST_UPDATE: Duration = Duration::from_millis(100);
/// At most this much trace per PATCH (GitLab's limit).
pub(crate) const MAX_PATCH: usize = 1024 * 1024;

/// What GitLab last said about the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Remote {
    /// Running normally.
    Running,
    /// `canceling`: stop the script, run `after_script`, then finish.
    Canceling,
    /// `canceled`/`failed`/403: stop now.
    Canceled,
}

/// The masked trace of one job.
#[derive(Debug)]
pub(crate) struct Trace {
    state: Mutex<TraceState>,
}

#[derive(Debug)]
struct TraceState {
    log: Vec<u8>,
    masker: Masker,
    limit: usize,
    truncated: bool,
    echo: bool,
    /// `FF_TIMESTAMPS`: whether lines get gitlab-runner's timestamp header.
    timestamps: bool,
    /// Whether the next byte starts a line (its header is written before it).
    at_line_start: bool,
}

impl Trace {
    /// A trace masking `masker`'s secrets and collecting at most `limit` bytes. With `echo`,
    /// everything is also written to stderr (for `kiln agent` run by hand).
    pub(crate) fn new(masker: Masker, limit: usize, echo: bool) -> Self {
        Self {
            state: Mutex::new(TraceState {
                log: Vec::new(),
                masker,
                limit,
                truncated: false,
                echo,
                timestamps: false,
                at_line_start: true,
            }),
        }
    }

    /// The same trace, starting each line with its time when `on` (`FF_TIMESTAMPS`), as
    /// gitlab-runner 17 does: see [`timestamp_header`].
    #[must_use]
    pub(crate) fn with_timestamps(self, on: bool) -> Self {
        let mut state = self.state.into_inner().unwrap_or_else(|e| e.into_inner());
        state.timestamps = on;
        Self {
            state: Mutex::new(state),
        }
    }

    fn lock(&self) -> MutexGuard<'_, TraceState> {
        // A panic while holding the lock leaves a consistent Vec; keep going with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends process output (masked).
    pub(crate) fn write(&self, bytes: &[u8]) {
        let mut state = self.lock();
        let masked = state.masker.push(bytes);
        state.append(&masked);
    }

    /// Appends a trace that already has its timestamp headers, if any (the init container's,
    /// stamped when its lines were written): masked, but not stamped again.
    pub(crate) fn write_stamped(&self, bytes: &[u8]) {
        let mut state = self.lock();
        let mut masked = state.masker.finish();
        masked.extend(state.masker.push(bytes));
        masked.extend(state.masker.finish());
        if let Some(&last) = masked.last() {
            state.append_raw(&masked);
            state.at_line_start = last == b'\n';
        }
    }

    /// Appends a line written by kiln itself (masked too: it may quote URLs or values).
    pub(crate) fn line(&self, text: &str) {
        let mut bytes = Vec::with_capacity(text.len() + 1);
        bytes.extend_from_slice(text.as_bytes());
        bytes.push(b'\n');
        self.write(&bytes);
    }

    /// A yellow warning line.
    pub(crate) fn warn(&self, text: &str) {
        self.line(&format!("\x1b[0;33mWARNING: {text}\x1b[0;m"));
    }

    /// A red error line.
    pub(crate) fn error(&self, text: &str) {
        self.line(&format!("\x1b[31;1mERROR: {text}\x1b[0;m"));
    }

    /// Starts a collapsible section GitLab folds.
    pub(crate) fn section_start(&self, name: &str, header: &str) {
        self.release_held();
        self.write(
            format!(
                "section_start:{}:{name}\r\x1b[0K\x1b[0;m\x1b[36;1m{header}\x1b[0;m\n",
                unix_now()
            )
            .as_bytes(),
        );
    }

    /// Ends a section.
    pub(crate) fn section_end(&self, name: &str) {
        self.release_held();
        self.write(format!("section_end:{}:{name}\r\x1b[0K\n", unix_now()).as_bytes());
    }

    /// Releases bytes the masker holds back (at the end of a step: no secret spans steps).
    pub(crate) fn release_held(&self) {
        let mut state = self.lock();
        let rest = state.masker.finish();
        state.append(&rest);
    }

    /// The current length.
    pub(crate) fn len(&self) -> u64 {
        self.lock().log.len() as u64
    }

    /// Everything so far.
    pub(crate) fn contents(&self) -> Vec<u8> {
        self.lock().log.clone()
    }

    /// Up to `max` bytes from `offset`.
    fn slice(&self, offset: u64, max: usize) -> Vec<u8> {
        let state = self.lock();
        let start = (offset as usize).min(state.log.len());
        let end = (start + max).min(state.log.len());
        state.log[start..end].to_vec()
    }

    /// `crc32:%08x` and length of the whole trace.
    pub(crate) fn checksum(&self) -> (String, u64) {
        let state = self.lock();
        (
            format!("crc32:{:08x}", crc32fast::hash(&state.log)),
            state.log.len() as u64,
        )
    }
}

impl TraceState {
    /// Appends masked bytes: timestamped line by line with `FF_TIMESTAMPS` (after masking, so
    /// a header never splits a secret; a line split across writes gets one header).
    fn append(&mut self, bytes: &[u8]) {
        if !self.timestamps {
            return self.append_raw(bytes);
        }
        let mut rest = bytes;
        while !rest.is_empty() {
            if self.at_line_start {
                self.append_raw(timestamp_header(SystemTime::now()).as_bytes());
            }
            let end = rest
                .iter()
                .position(|&b| b == b'\n')
                .map_or(rest.len(), |i| i + 1);
            self.append_raw(&rest[..end]);
            self.at_line_start = rest[end - 1] == b'\n';
            rest = &rest[end..];
        }
    }

    fn append_raw(&mut self, bytes: &[u8]) {
        if bytes.is_empty() || self.truncated {
            return;
        }
        let room = self.limit.saturating_sub(self.log.len());
        let take = bytes.len().min(room);
        self.log.extend_from_slice(&bytes[..take]);
        if self.echo {
            use std::io::Write;
            let _ = std::io::stderr().write_all(&bytes[..take]);
        }
        if take < bytes.len() {
            self.truncated = true;
            let notice = format!(
                "\n\x1b[31;1mJob's log exceeded limit of {} bytes.\nJob execution will continue but no more output will be collected.\x1b[0;m\n",
                self.limit
            );
            self.log.extend_from_slice(notice.as_bytes());
        }
    }
}

/// gitlab-runner's per-line header with `FF_TIMESTAMPS`: the time in UTC, RFC 3339 with
/// microseconds, then the stream (`00`: the job's one output stream), its type (`O`: output)
/// and a space, e.g. `2024-05-21T10:15:30.123456Z 00O `. GitLab (17.1+) parses and strips it to
/// show each line's time.
fn timestamp_header(at: SystemTime) -> String {
    format!("{} 00O ", humantime::format_rfc3339_micros(at))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Streams a [`Trace`] to GitLab.
#[derive(Debug)]
pub(crate) struct Uplink {
    api: RunnerApi,
    job_id: u64,
    token: String,
    trace: Arc<Trace>,
    sent: u64,
    interval: Duration,
    keepalive: Duration,
    last_contact: Instant,
    remote: watch::Sender<Remote>,
    /// GitLab said 404: stop sending.
    gone: bool,
}

impl Uplink {
    /// An uplink for job `job_id`; `remote` receives what GitLab says about the job.
    pub(crate) fn new(
        api: RunnerApi,
        job_id: u64,
        token: String,
        trace: Arc<Trace>,
        interval: Duration,
        keepalive: Duration,
        remote: watch::Sender<Remote>,
    ) -> Self {
        Self {
            api,
            job_id,
            token,
            trace,
            sent: 0,
            interval,
            keepalive,
            last_contact: Instant::now(),
            remote,
            gone: false,
        }
    }

    fn apply(&mut self, control: &JobControl) {
        if let Some(interval) = control.update_interval {
            // 0 means "as fast as you like": keep a floor so a loop cannot spin.
            self.interval = interval.max(Duration::from_millis(200));
        }
        let remote = match control.job_status.as_deref() {
            Some("canceling") => Remote::Canceling,
            Some("canceled" | "failed" | "success") => Remote::Canceled,
            _ => return,
        };
        self.remote.send_if_modified(|current| {
            // Never go back from canceled to canceling.
            if *current != remote && *current != Remote::Canceled {
                *current = remote;
                true
            } else {
                false
            }
        });
    }

    /// Sends everything not yet sent.
    ///
    /// # Errors
    /// A transport error or unexpected status; the unsent rest goes with the next flush.
    pub(crate) async fn flush(&mut self) -> Result<(), ApiError> {
        let mut resumes = 0;
        while !self.gone && self.sent < self.trace.len() {
            let chunk = self.trace.slice(self.sent, MAX_PATCH);
            let len = chunk.len() as u64;
            match self
                .api
                .patch_trace(self.job_id, &self.token, self.sent, chunk)
                .await?
            {
                TraceAck::Accepted(control) => {
                    self.sent += len;
                    self.last_contact = Instant::now();
                    self.apply(&control);
                }
                TraceAck::RangeMismatch { server_len } => {
                    resumes += 1;
                    if resumes > 5 {
                        tracing::warn!(
                            job = self.job_id,
                            "trace offsets keep disagreeing; retrying later"
                        );
                        return Ok(());
                    }
                    // Resend from what GitLab has; without a Range header, from the start.
                    let server_len = server_len.unwrap_or(0);
                    tracing::info!(
                        job = self.job_id,
                        from = self.sent,
                        to = server_len,
                        "GitLab asked to resume the trace (416)"
                    );
                    self.sent = server_len.min(self.trace.len());
                }
                TraceAck::Forbidden(control) => {
                    self.apply(&control);
                    self.remote.send_replace(Remote::Canceled);
                    self.gone = true;
                }
                TraceAck::NotFound => {
                    tracing::warn!(
                        job = self.job_id,
                        "GitLab no longer knows this job (404); trace updates stop"
                    );
                    self.gone = true;
                }
            }
        }
        Ok(())
    }

    /// Marks everything as unsent so the next flush resends the trace from offset 0 (after a
    /// 412 checksum mismatch).
    pub(crate) fn reset(&mut self) {
        self.sent = 0;
    }

    /// Tells GitLab the job is alive when no trace went out for the keep-alive interval.
    async fn keepalive(&mut self) -> Result<(), ApiError> {
        if self.gone || self.last_contact.elapsed() < self.keepalive {
            return Ok(());
        }
        let ack = self
            .api
            .update_job(
                self.job_id,
                &JobUpdate {
                    token: &self.token,
                    state: "running",
                    failure_reason: None,
                    exit_code: None,
                    output: None,
                },
            )
            .await?;
        self.last_contact = Instant::now();
        match ack {
            UpdateAck::Accepted(control) | UpdateAck::Pending(control) => self.apply(&control),
            UpdateAck::Gone(control) => {
                self.apply(&control);
                self.remote.send_replace(Remote::Canceled);
            }
            UpdateAck::ChecksumMismatch => {}
        }
        Ok(())
    }

    /// Flushes every interval until `stop`, then returns itself for the final flush.
    pub(crate) async fn run(mut self, stop: CancellationToken) -> Self {
        // The first update goes out at once, so the job page shows the build started (the
        // benchmark measured a whole interval, 3 s, of blank trace before).
        let mut wait = FIRST_UPDATE.min(self.interval);
        loop {
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = stop.cancelled() => return self,
            }
            wait = self.interval;
            if let Err(e) = self.flush().await {
                tracing::warn!(job = self.job_id, error = %e, "trace update failed; retrying at the next interval");
                continue;
            }
            if let Err(e) = self.keepalive().await {
                tracing::warn!(job = self.job_id, error = %e, "keep-alive failed");
            }
        }
    }

    /// The current interval (GitLab's, once it sent one).
    pub(crate) fn interval(&self) -> Duration {
        self.interval
    }

    /// The job's token.
    pub(crate) fn token(&self) -> &str {
        &self.token
    }

    /// The API client.
    pub(crate) fn api(&self) -> &RunnerApi {
        &self.api
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_past_the_limit_is_dropped_with_one_notice() {
        let trace = Trace::new(Masker::default(), 10, false);
        trace.write(b"0123456789abc");
        trace.write(b"more");
        let log = String::from_utf8(trace.slice(0, 1000)).unwrap();
        assert!(log.starts_with("0123456789\n"), "{log}");
        assert_eq!(log.matches("exceeded limit of 10 bytes").count(), 1);
    }

    #[test]
    fn timestamps_start_every_line_once_across_writes_and_masking_still_applies() {
        let masker = Masker::new(["s3cr3t-value".to_owned()], Vec::new());
        let trace = Trace::new(masker, 1 << 20, false).with_timestamps(true);
        trace.write(b"first line\nsecond ");
        trace.write(b"half s3cr");
        trace.write(b"3t-value done\n\nlast");
        trace.release_held();
        let text = String::from_utf8(trace.contents()).unwrap();
        let lines: Vec<&str> = text.split('\n').collect();
        assert_eq!(lines.len(), 4, "{text}");
        let expected = ["first line", "second half [MASKED] done", "", "last"];
        for (line, content) in lines.iter().zip(expected) {
            let (header, rest) = line.split_at(line.len() - content.len());
            assert_eq!(rest, content, "{text}");
            assert_eq!(
                header.len(),
                "2024-05-21T10:15:30.123456Z 00O ".len(),
                "{text}"
            );
            assert!(header.ends_with("Z 00O "), "{text}");
            assert!(
                humantime::parse_rfc3339(&header[..header.len() - 5]).is_ok(),
                "{header}"
            );
        }
        assert!(!text.contains("s3cr3t"), "{text}");
    }

    fn unmasked_trace() -> Trace {
        Trace::new(
            Masker::new(Vec::<String>::new(), Vec::new()),
            1 << 20,
            false,
        )
    }

    #[test]
    fn a_stamped_trace_is_not_stamped_again() {
        let trace = unmasked_trace().with_timestamps(true);
        trace.write_stamped(b"2024-05-21T10:15:30.123456Z 00O init\n");
        trace.write(b"main\n");
        let text = String::from_utf8(trace.contents()).unwrap();
        assert!(
            text.starts_with("2024-05-21T10:15:30.123456Z 00O init\n"),
            "{text}"
        );
        assert_eq!(text.matches(" 00O ").count(), 2, "{text}");
    }

    #[test]
    fn the_timestamp_header_is_gitlab_runners() {
        let at = UNIX_EPOCH + Duration::from_micros(1_716_286_530_123_456);
        assert_eq!(timestamp_header(at), "2024-05-21T10:15:30.123456Z 00O ");
    }

    #[test]
    fn without_ff_timestamps_the_trace_is_the_output() {
        let trace = unmasked_trace();
        trace.write(b"a\nb");
        assert_eq!(trace.contents(), b"a\nb");
    }

    #[test]
    fn checksum_is_crc32_ieee_of_the_whole_trace() {
        let trace = Trace::new(Masker::default(), 1000, false);
        trace.write(b"hello world");
        assert_eq!(trace.checksum(), ("crc32:0d4a1185".to_string(), 11));
    }
}
