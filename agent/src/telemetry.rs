//! Logging: human-readable text or one JSON object per line, filtered by `RUST_LOG`.

use clap::ValueEnum;
use tracing_subscriber::{EnvFilter, fmt};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the global subscriber. Events go to stdout; `RUST_LOG` overrides the `info` default.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    match format {
        LogFormat::Text => fmt().with_env_filter(filter).with_target(false).init(),
        LogFormat::Json => fmt()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_env_filter(filter)
            .init(),
    }
}
