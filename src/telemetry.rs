//! Logging setup: tracing to stderr, text or JSON, level from `-v` unless `RUST_LOG` is set.

use tracing_subscriber::EnvFilter;

/// Log line format (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The filter for a glog-style verbosity: 0 info, 1-2 debug (per-flow logs), 3+ trace.
pub fn level_for(verbosity: u8) -> &'static str {
    match verbosity {
        0 => "info",
        1 | 2 => "debug",
        _ => "trace",
    }
}

/// Installs the global subscriber. `RUST_LOG` wins over `-v` when set.
pub fn init(verbosity: u8, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("etp={}", level_for(verbosity))));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // No colour escapes into journald, files or pipes.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // A second init (tests) is harmless: keep the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// An error and its causes on one line: `applying the ruleset: policy routing: adding ...: File exists`.
/// Error types keep causes as `#[source]` and leave them out of their own message.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn verbosity_maps_to_levels() {
        assert_eq!(super::level_for(0), "info");
        assert_eq!(super::level_for(2), "debug");
        assert_eq!(super::level_for(9), "trace");
    }
}
