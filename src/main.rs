//! etp's entry point: argv -> command. The only place that picks exit codes:
//! 0 ok, 1 runtime failure or drift, 2 bad usage or config.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, Context};
use clap::Parser;
use tracing::{info, warn};

use etp::cli::{normalize_args, Cli, Command};
use etp::config::{Config, Source, DEFAULT_PATH};
use etp::daemon;
use etp::kernel::Kernel;
use etp::{admin, plan, telemetry};

const OK: u8 = 0;
const FAILURE: u8 = 1;
const USAGE: u8 = 2;

fn main() -> ExitCode {
    // SIGHUP's default action kills; until the daemon's handler is in, ignore it.
    daemon::ignore_early_hangups();
    let cli = match Cli::try_parse_from(normalize_args(std::env::args_os())) {
        Ok(c) => c,
        Err(e) => {
            // clap prints help/version to stdout (exit 0) and usage errors to stderr (exit 2).
            let _ = e.print();
            return ExitCode::from(e.exit_code().clamp(0, 255) as u8);
        }
    };
    telemetry::init(cli.global.verbosity, cli.global.log_format);
    let source = Source {
        path: config_path(cli.global.config.as_deref()),
        port: cli.global.port,
    };
    let command = cli.command.unwrap_or(Command::Run);
    // Config errors are usage errors (2) wherever they surface.
    let cfg = match (&command, source.load()) {
        (_, Ok(c)) => Some(c),
        (Command::Cleanup, Err(_)) => None,
        // An operator asks for status or a reload exactly when the file was just broken: reach
        // the daemon at the default admin address and pid file rather than refuse.
        (Command::Status | Command::Reload, Err(e)) => {
            eprintln!(
                "etp: warning: {}; using the default admin address and pid file",
                telemetry::chain(&e)
            );
            Some(Config::parse("", "<defaults>").expect("an empty config is valid"))
        }
        (_, Err(e)) => {
            eprintln!("etp: {}", telemetry::chain(&e));
            return ExitCode::from(USAGE);
        }
    };
    let code = match command {
        Command::Run => run(source, cfg.expect("loaded")),
        Command::Render => {
            print!("{}", plan::plan(cfg.as_ref().expect("loaded")));
            Ok(OK)
        }
        Command::Check => {
            print!("{}", summary(cfg.as_ref().expect("loaded")));
            Ok(OK)
        }
        Command::Apply => one_shot(apply(cfg.expect("loaded"))),
        Command::Audit => one_shot(audit(cfg.expect("loaded"))),
        Command::Cleanup => one_shot(cleanup()),
        Command::Status => status(cfg.as_ref().expect("loaded")),
        Command::Reload => reload(cfg.as_ref().expect("loaded")),
    };
    match code {
        Ok(c) => ExitCode::from(c),
        Err(e) => {
            eprintln!("etp: {e:#}");
            ExitCode::from(FAILURE)
        }
    }
}

/// `-c FILE`, else /etc/etp/etp.toml when it exists, else the embedded default (`None`).
fn config_path(flag: Option<&Path>) -> Option<PathBuf> {
    match flag {
        Some(p) => Some(p.to_path_buf()),
        None if Path::new(DEFAULT_PATH).exists() => Some(PathBuf::from(DEFAULT_PATH)),
        None => None,
    }
}

/// `Some(n)`: a multi-thread runtime with `n` workers (even with one, so that the daemon's
/// blocking netlink exchanges can `block_in_place` without stalling the data path);
/// `None`: a current-thread runtime for one-shot commands.
fn runtime(workers: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = match workers {
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_current_thread(),
    };
    b.enable_all().build().context("starting the tokio runtime")
}

fn one_shot(fut: impl std::future::Future<Output = anyhow::Result<u8>>) -> anyhow::Result<u8> {
    runtime(None)?.block_on(fut)
}

fn run(source: Source, cfg: Config) -> anyhow::Result<u8> {
    if source.path.is_none() {
        warn!(
            path = DEFAULT_PATH,
            "no config file; running on the embedded default config"
        );
    }
    let available = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = cfg.limits.worker_threads_auto(available);
    info!(threads, available_cpus = available, "data-path runtime");
    runtime(Some(threads))?
        .block_on(daemon::run(source, cfg))
        .map_err(|e| anyhow!(e))?;
    Ok(OK)
}

async fn apply(cfg: Config) -> anyhow::Result<u8> {
    let desired = plan::plan(&cfg);
    let mut kernel = Kernel::connect()
        .await
        .context("connecting to the kernel")?;
    let applied = kernel
        .apply(&desired, None)
        .await
        .context("applying the ruleset")?;
    println!(
        "applied table inet {}: {} messages, {} bytes, generation {}",
        desired.table.name, applied.messages, applied.bytes, applied.generation
    );
    if !applied.routes.is_empty() {
        println!("{}", applied.routes);
    }
    Ok(OK)
}

async fn audit(cfg: Config) -> anyhow::Result<u8> {
    // The running daemon's linkerd routes follow the proxy's health: audit against the plan
    // for the state the proxy is in now.
    let probe = etp::health::Probe::of(&cfg);
    let proxy = if probe.run(cfg.kernel.own_mark.0).await {
        etp::plan_handoff::ProxyState::Ready
    } else {
        etp::plan_handoff::ProxyState::Unavailable
    };
    let desired = plan::plan_for_proxy(&cfg, proxy);
    let mut kernel = Kernel::connect()
        .await
        .context("connecting to the kernel")?;
    let drift = kernel.audit(&desired).await.context("auditing")?;
    if proxy == etp::plan_handoff::ProxyState::Unavailable {
        println!(
            "linkerd proxy unavailable ({probe}): linkerd routes audited as {}",
            cfg.linkerd.when_unavailable
        );
    }
    if drift.is_empty() {
        println!("in sync");
        return Ok(OK);
    }
    for d in &drift {
        println!("{d}");
    }
    println!("{} difference(s)", drift.len());
    Ok(FAILURE)
}

async fn cleanup() -> anyhow::Result<u8> {
    let mut kernel = Kernel::connect()
        .await
        .context("connecting to the kernel")?;
    let r = kernel.cleanup().await.context("cleaning up")?;
    if !r.table && r.routing_entries == 0 {
        println!("nothing to remove");
    } else {
        println!(
            "removed: table {}, {} ip rules/routes",
            if r.table { "inet etp" } else { "(none)" },
            r.routing_entries
        );
    }
    Ok(OK)
}

fn status(cfg: &Config) -> anyhow::Result<u8> {
    let (code, body) = admin::get(cfg.admin.address, "/status").with_context(|| {
        format!(
            "asking the daemon at {} (is etp running?)",
            cfg.admin.address
        )
    })?;
    print!("{body}");
    Ok(if code == 200 { OK } else { FAILURE })
}

fn reload(cfg: &Config) -> anyhow::Result<u8> {
    let pid = etp::pidfile::signal_reload(&cfg.daemon.pid_file)?;
    println!("reload requested (SIGHUP to pid {pid})");
    Ok(OK)
}

/// `etp check`: what the config becomes, in a few lines.
fn summary(cfg: &Config) -> String {
    use std::fmt::Write;
    let d = plan::plan(cfg);
    let mut s = String::new();
    let _ = writeln!(s, "config {} is valid", cfg.source);
    let _ = writeln!(
        s,
        "listener :{} (ipv6 {}, local {}), linkerd outbound :{} uid {}, admin {}",
        cfg.listener.port,
        cfg.listener.ipv6,
        cfg.listener.local,
        cfg.linkerd.outbound_port,
        cfg.linkerd.proxy_uid,
        cfg.admin.address
    );
    let elements: usize = d.table.sets.iter().map(|s| s.elems.len()).sum();
    let rules: usize = d.table.chains.iter().map(|c| c.rules.len()).sum();
    let _ = writeln!(
        s,
        "table inet {}: {} chains, {} rules, {} sets, {} elements",
        d.table.name,
        d.table.chains.len(),
        rules,
        d.table.sets.len(),
        elements
    );
    for r in &d.ip_rules {
        let _ = writeln!(s, "{r}");
    }
    for (i, r) in cfg.routes.iter().enumerate() {
        let _ = writeln!(s, "route {i} {}", r.summary());
    }
    s
}
