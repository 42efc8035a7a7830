//! Test-only runner of etp's data path: `dataplane-runner CONFIG`.
//!
//! Binds the transparent listeners from the config's `[listener]`, serves until SIGTERM, drains
//! for one second, then prints the metrics (text format) on stdout. Logs (debug by default,
//! `RUST_LOG` overrides) go to stderr. The kernel state (ruleset, policy routing) is the
//! test's job; `etp run` replaces this once the daemon exists.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use etp::config::Config;
use etp::metrics::Metrics;
use etp::tproxy::{Dataplane, Listeners, Runtime};
use tokio::signal::unix::{signal, SignalKind};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("etp=debug")),
        )
        .with_writer(std::io::stderr)
        .init();
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: dataplane-runner CONFIG");
        return ExitCode::from(2);
    };
    let cfg = match Config::load(path.as_ref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dataplane-runner: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    rt.block_on(async {
        let listeners = match Listeners::bind(cfg.listener.port, cfg.listener.ipv6) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("dataplane-runner: {e}");
                return ExitCode::FAILURE;
            }
        };
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let (_tx, rx) = tokio::sync::watch::channel(Arc::new(Runtime::new(&cfg)));
        let metrics = Arc::new(Metrics::new());
        let dp = Dataplane::new(rx, Arc::clone(&metrics));
        dp.serve(listeners, async {
            term.recv().await;
        })
        .await;
        dp.drain(Duration::from_secs(1)).await;
        print!("{}", metrics.encode());
        ExitCode::SUCCESS
    })
}
