//! Logging: `tracing` to stderr, as text (journald adds its own timestamps) or JSON. Audit
//! events (one per connection, later one per decision) use the `portcullis::audit` target
//! so they can be routed separately.
//!
//! Lines are written by a background thread ([`batch`]): a slow reader of stderr (a pipe,
//! journald under pressure) delays logs, not connections, and lines are written in batches
//! (at most 10 ms late), so a busy daemon pays one write and one wake-up per batch, not per
//! line. Bounded: past `[log] queue_bytes` pending, lines are dropped and counted (or, with
//! `when_full = "wait"`, logging threads wait).

pub mod batch;
pub mod json;

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::config::LogFormat;

/// Target of audit events.
pub const AUDIT_TARGET: &str = "portcullis::audit";
/// Installs the global subscriber. `RUST_LOG` overrides `level`. Keep the guard until the
/// process ends: dropping it flushes the queue.
pub fn init(level: &str, format: LogFormat, limits: batch::Limits) -> batch::Guard {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = batch::start(std::io::stderr(), "portcullis-log", limits);
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
                    .event_format(json::JsonLine)
                    .with_writer(writer),
            )
            .try_init(),
    };
    if result.is_err() {
        eprintln!("warning: logging was already initialised");
    }
    guard
}
