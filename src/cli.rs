//! Command-line surface: clap definitions and the argv rewrite that accepts the flags users
//! copy from the original DaemonSet (`etp -port=15001 --logtostderr -v=2`).

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::telemetry::LogFormat;

#[derive(Debug, Parser)]
#[command(
    name = "etp",
    version,
    about = "Node-level TPROXY traffic router for the Linkerd service mesh",
    long_about = "etp intercepts the traffic its routes select with nftables TPROXY rules and hands \
                  TCP flows to the node's Linkerd proxy (or relays TCP/UDP directly or to a fixed \
                  upstream).\n\nWith no subcommand, etp runs the daemon.\n\n\
                  Exit status: 0 ok, 1 runtime failure or drift, 2 bad usage or config."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Clone, Args)]
pub struct Global {
    /// Config file [default: /etc/etp/etp.toml; `render`, `check` fall back to the embedded default]
    #[arg(short, long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Override `[listener] port` (also accepted as `-port=N`)
    #[arg(long, global = true, value_name = "PORT")]
    pub port: Option<u16>,
    /// Log verbosity: 0 info, 1-2 debug (per flow), 3 trace (also `-v=N`; RUST_LOG wins)
    #[arg(short = 'v', long = "verbosity", global = true, value_name = "N", default_value_t = 0,
          num_args = 0..=1, default_missing_value = "1")]
    pub verbosity: u8,
    /// Log format
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Accepted for compatibility with glog-style command lines; etp always logs to stderr
    #[arg(long, global = true, hide = true)]
    pub logtostderr: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: bind listeners, apply the ruleset, serve; SIGHUP reloads, SIGTERM drains
    Run,
    /// Validate a config and print a summary of the plan (exit 2 when invalid)
    Check,
    /// Print the desired nftables table (nft syntax) and policy routing
    Render,
    /// Install the ruleset and policy routing once, in one transaction, and exit
    Apply,
    /// Compare the kernel with the desired state: exit 0 "in sync", or 1 with a diff
    Audit,
    /// Remove etp's table, ip rules and routes (a no-op when there is nothing)
    Cleanup,
    /// Print what the running daemon reports (routes, flows, counters, generation, last reload)
    Status,
    /// Ask the running daemon to reload its config (SIGHUP via the pid file)
    Reload,
}

/// Long flags that users write with a single dash (`-port=15001`, `-logtostderr`).
const SINGLE_DASH_LONG: &[&str] = &["port", "config", "logtostderr", "log-format", "verbosity"];

/// Rewrites glog-style single-dash long flags to clap's `--flag` form.
pub fn normalize_args(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    args.into_iter()
        .map(|a| {
            let Some(s) = a.to_str() else { return a };
            let Some(rest) = s.strip_prefix('-') else {
                return a;
            };
            if rest.starts_with('-') {
                return a;
            }
            let name = rest.split('=').next().unwrap_or("");
            if SINGLE_DASH_LONG.contains(&name) {
                OsString::from(format!("-{s}"))
            } else {
                a
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(normalize_args(args.iter().map(OsString::from))).unwrap()
    }

    #[test]
    fn original_daemonset_flags_work() {
        let cli = parse(&["etp", "-port=15001", "--logtostderr", "-v=2"]);
        assert_eq!(cli.global.port, Some(15001));
        assert_eq!(cli.global.verbosity, 2);
        assert!(cli.global.logtostderr);
        assert!(cli.command.is_none());
    }

    #[test]
    fn modern_flags_and_subcommands() {
        let cli = parse(&[
            "etp",
            "run",
            "--port",
            "16000",
            "-c",
            "/x.toml",
            "--log-format",
            "json",
            "-v",
        ]);
        assert_eq!(cli.global.port, Some(16000));
        assert_eq!(
            cli.global.config.as_deref(),
            Some(std::path::Path::new("/x.toml"))
        );
        assert_eq!(cli.global.log_format, LogFormat::Json);
        assert_eq!(cli.global.verbosity, 1);
        assert!(matches!(cli.command, Some(Command::Run)));
        let cli = parse(&["etp", "-config=/y.toml", "audit"]);
        assert!(matches!(cli.command, Some(Command::Audit)));
        assert_eq!(
            cli.global.config.as_deref(),
            Some(std::path::Path::new("/y.toml"))
        );
    }

    #[test]
    fn unknown_flags_are_usage_errors() {
        let e = Cli::try_parse_from(["etp", "--bogus"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        // Short flags that are not ours are left alone, so clap reports them.
        assert_eq!(
            normalize_args([OsString::from("-x=1")]),
            [OsString::from("-x=1")]
        );
    }
}
