//! Logging: `tracing` to stderr, as text (journald adds its own timestamps) or JSON. Audit
//! events (one per connection, later one per decision) use the `portcullis::audit` target
//! so they can be routed separately.
//!
//! Lines are written by a background thread (tracing-appender): a slow reader of stderr (a
//! pipe, journald under pressure) delays logs, not connections. The queue is bounded and
//! lossless: past [`QUEUE_LINES`] pending lines, logging threads wait rather than drop.
//! The writer buffers what is queued and writes it out whenever the queue is empty, so a
//! burst of lines costs a few writes, not one each.

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::config::LogFormat;

/// Target of audit events.
pub const AUDIT_TARGET: &str = "portcullis::audit";
/// Lines that may wait for the writer thread.
pub const QUEUE_LINES: usize = 65_536;

/// Installs the global subscriber. `RUST_LOG` overrides `level`. Keep the guard until the
/// process ends: dropping it flushes the queue.
pub fn init(level: &str, format: LogFormat) -> WorkerGuard {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(QUEUE_LINES)
        .thread_name("portcullis-log")
        .finish(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stderr(),
        ));
    let registry = tracing_subscriber::registry().with(filter);
    // Colours only for a terminal; under journald (which sets JOURNAL_STREAM) no timestamp
    // either: the journal has its own.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let result = match format {
        LogFormat::Text if journald => registry
            .with(
                fmt::layer()
                    .with_writer(writer)
                    .with_target(true)
                    .with_ansi(false)
                    .without_time(),
            )
            .try_init(),
        LogFormat::Text => registry
            .with(
                fmt::layer()
                    .with_writer(writer)
                    .with_target(true)
                    .with_ansi(ansi),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_writer(writer),
            )
            .try_init(),
    };
    if result.is_err() {
        eprintln!("warning: logging was already initialised");
    }
    guard
}
