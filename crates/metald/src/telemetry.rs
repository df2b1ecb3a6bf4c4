//! Structured logging to stdout: JSON lines for log pipelines and alert rules, or text for people.
//! Messages are stable strings (`orphaned vm detected`, `vm state changed`, ...) and context goes
//! in fields (`vm_id`, `pid`, `reason`), so alert rules can match on them.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. `RUST_LOG` overrides the default level (`info`).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout);
    let res = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
    // A subscriber is already set (tests that start several daemons in one process): keep it.
    let _ = res;
}
