//! Logging: `tracing` to stderr, as text (journald adds its own timestamps) or JSON. Audit
//! events (one per connection, later one per decision) use the `portcullis::audit` target
//! so they can be routed separately.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::config::LogFormat;

/// Target of audit events.
pub const AUDIT_TARGET: &str = "portcullis::audit";

/// Installs the global subscriber. `RUST_LOG` overrides `level`.
pub fn init(level: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Text => registry
            .with(fmt::layer().with_writer(std::io::stderr).with_target(true))
            .try_init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    if result.is_err() {
        eprintln!("warning: logging was already initialised");
    }
}
