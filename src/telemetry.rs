//! Logging (tracing subscriber) and the Prometheus metrics registry.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex, OnceLock, mpsc};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tracing_subscriber::EnvFilter;

use serde::{Deserialize, Serialize};

/// `[log]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `auto` (pretty on a terminal, JSON otherwise), `json` or `pretty`.
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `kiln=debug,info`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Auto,
            level: "info".into(),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Pretty on a terminal, JSON otherwise.
    #[default]
    Auto,
    /// One JSON object per line.
    Json,
    /// Human-readable.
    Pretty,
}

/// Installs the global tracing subscriber: JSON when not on a terminal (production), pretty
/// otherwise, unless `format` says which. Logs go to stderr so stdout stays for command output.
///
/// `RUST_LOG`, when set, wins over `level`.
///
/// # Caveats
/// Lines are written by a thread of their own, so a slow or dead reader of stderr (a pipe whose
/// reader exited, a stalled log shipper) never blocks or crashes kiln: when the queue is full,
/// lines are dropped. Call [`flush_logs`] before exiting to write what is queued.
pub fn init_logging(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let Some(pipe) = LogPipe::global() else {
        return;
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(pipe);
    // A second init (tests, `kiln exec` inside `kiln run`) is harmless: keep the first.
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init()
    };
}

/// Waits (up to a second) until the log lines queued so far are written.
pub fn flush_logs() {
    if let Some(pipe) = LOG_PIPE.get() {
        let (done, wait) = mpsc::sync_channel(1);
        if pipe.queue.try_send(LogMessage::Flush(done)).is_ok() {
            let _ = wait.recv_timeout(std::time::Duration::from_secs(1));
        }
    }
}

static LOG_PIPE: OnceLock<LogPipe> = OnceLock::new();
/// Log lines queued for the writer thread before new ones are dropped.
const LOG_QUEUE: usize = 8192;

enum LogMessage {
    Line(Vec<u8>),
    Flush(mpsc::SyncSender<()>),
}

/// Hands formatted log lines to a thread that writes them to stderr and ignores write errors.
#[derive(Clone)]
struct LogPipe {
    queue: mpsc::SyncSender<LogMessage>,
}

impl LogPipe {
    fn global() -> Option<&'static Self> {
        if let Some(pipe) = LOG_PIPE.get() {
            return Some(pipe);
        }
        let (queue, lines) = mpsc::sync_channel::<LogMessage>(LOG_QUEUE);
        std::thread::Builder::new()
            .name("kiln-log".into())
            .spawn(move || {
                use std::io::Write;
                let mut stderr = std::io::stderr();
                for message in lines {
                    match message {
                        // A broken stderr loses the line, nothing else.
                        LogMessage::Line(line) => {
                            let _ = stderr.write_all(&line);
                        }
                        LogMessage::Flush(done) => {
                            let _ = stderr.flush();
                            let _ = done.try_send(());
                        }
                    }
                }
            })
            .ok()?;
        let _ = LOG_PIPE.set(Self { queue });
        LOG_PIPE.get()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for &'static LogPipe {
    type Writer = LogLine;

    fn make_writer(&'a self) -> Self::Writer {
        LogLine {
            bytes: Vec::new(),
            queue: self.queue.clone(),
        }
    }
}

/// One event being formatted; queued whole when dropped.
struct LogLine {
    bytes: Vec<u8>,
    queue: mpsc::SyncSender<LogMessage>,
}

impl std::io::Write for LogLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LogLine {
    fn drop(&mut self) {
        if !self.bytes.is_empty() {
            // A full queue (stderr is not read) drops the line instead of blocking kiln.
            let _ = self
                .queue
                .try_send(LogMessage::Line(std::mem::take(&mut self.bytes)));
        }
    }
}

/// The metrics of one stage (a source kind, the coordinator, an executor): a struct of metric
/// families that registers itself, so adding a metric touches only the stage that owns it.
///
/// A stage gets its metrics with [`Metrics::stage`]; every caller in the process shares one
/// instance, registered on first use (two Jenkins sources count into one family, labelled by
/// their names).
pub trait StageMetrics: Send + Sync + 'static {
    /// Creates the stage's metric families and registers them (names without the `kiln_` prefix).
    fn register(registry: &mut Registry) -> Self;
}

/// A metric registered under `name` (after the `kiln_` prefix) with `help`, for a
/// [`StageMetrics::register`].
pub(crate) fn registered<M>(registry: &mut Registry, name: &str, help: &str) -> M
where
    M: prometheus_client::registry::Metric + Default + Clone,
{
    let metric = M::default();
    registry.register(name, help, metric.clone());
    metric
}

/// A family of histograms with `count` buckets from `start`, each `factor` times the one
/// before, registered like [`registered`].
pub(crate) fn registered_histograms<L>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    (start, factor, count): (f64, f64, u16),
) -> Histograms<L>
where
    L: EncodeLabelSet + Clone + Eq + std::hash::Hash + std::fmt::Debug + Send + Sync + 'static,
{
    let family = Family::new_with_constructor(HistogramMaker {
        start,
        factor,
        count,
    });
    registry.register(name, help, family.clone());
    family
}

/// A family of histograms made by [`registered_histograms`].
pub(crate) type Histograms<L> = Family<L, Histogram, HistogramMaker>;

/// Makes the histograms of a [`registered_histograms`] family.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HistogramMaker {
    start: f64,
    factor: f64,
    count: u16,
}

impl MetricConstructor<Histogram> for HistogramMaker {
    fn new_metric(&self) -> Histogram {
        Histogram::new(exponential_buckets(self.start, self.factor, self.count))
    }
}

/// The process's metrics: the registry `/metrics` encodes and every stage's metrics in it.
pub struct Metrics {
    /// The registry `/metrics` encodes; stages register into it on first use.
    registry: Mutex<Registry>,
    /// One instance per [`StageMetrics`] type.
    stages: Mutex<HashMap<TypeId, Arc<dyn Any + Send + Sync>>>,
}

impl Metrics {
    /// Creates and registers every metric under the `kiln_` prefix.
    pub fn new() -> Arc<Self> {
        let registry = Registry::with_prefix("kiln");
        Arc::new(Self {
            registry: Mutex::new(registry),
            stages: Mutex::new(HashMap::new()),
        })
    }

    /// The metrics of stage `T`, registered on the first call.
    pub fn stage<T: StageMetrics>(&self) -> Arc<T> {
        let mut stages = self.stages.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(found) = stages.get(&TypeId::of::<T>())
            && let Ok(stage) = Arc::clone(found).downcast::<T>()
        {
            return stage;
        }
        let mut registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        let stage = Arc::new(T::register(&mut registry));
        stages.insert(
            TypeId::of::<T>(),
            Arc::clone(&stage) as Arc<dyn Any + Send + Sync>,
        );
        stage
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    struct Probe {
        calls: Counter,
    }

    impl StageMetrics for Probe {
        fn register(registry: &mut Registry) -> Self {
            let calls = Counter::default();
            registry.register("probe_calls", "Calls of the probe", calls.clone());
            Self { calls }
        }
    }

    #[test]
    fn a_stage_registers_once_and_every_caller_counts_into_it() {
        let metrics = Metrics::new();
        metrics.stage::<Probe>().calls.inc();
        metrics.stage::<Probe>().calls.inc();
        let text = metrics.encode();
        assert!(text.contains("kiln_probe_calls_total 2"), "{text}");
        assert_eq!(
            text.matches("# TYPE kiln_probe_calls counter").count(),
            1,
            "{text}"
        );
    }
}
