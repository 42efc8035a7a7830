//! The daemon: start order, SIGHUP reload, SIGTERM drain, periodic drift repair.
//!
//! Start order: signal handlers first (a SIGHUP or SIGTERM during start-up is queued, not fatal),
//! config, admin endpoint, listeners, *then* the ruleset (rules never point at a port with no
//! listener), then `READY=1`. Reload re-reads the same file with the same command-line
//! overrides and is all-or-nothing. Shutdown swaps in the drain table (new traffic goes direct,
//! established flows keep reaching etp), stops accepting, drains up to the deadline, then
//! removes etp's table, rules and routes (unless `fail_closed`).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{oneshot, watch};
use tracing::{debug, error, info, warn};

use crate::admin::{self, AdminState};
use crate::classify::Decision;
use crate::config::{Config, Source};
use crate::dataplane::{Dataplane, FlowPolicy, ListenError, Listeners, UNMATCHED};
use crate::handoff_flows::{self, FlowLog};
use crate::health::{self, Probe};
use crate::kernel::{Change, Kernel, KernelError, Monitor};
use crate::metrics::{FlowLabels, Metrics, RefusalLabels, ResultLabels, RouteLabels};
use crate::model::{Desired, Proto};
use crate::plan;
use crate::plan_handoff::ProxyState;
use crate::telemetry::chain;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("installing signal handlers")]
    Signals(#[source] std::io::Error),
    #[error("starting the admin endpoint")]
    Admin(#[source] admin::AdminError),
    #[error("binding the TPROXY listeners")]
    Listen(#[source] ListenError),
    #[error("connecting to the kernel")]
    Connect(#[source] KernelError),
    #[error("applying the ruleset at start-up")]
    Apply(#[source] KernelError),
}

struct Signals {
    hup: Signal,
    term: Signal,
    int: Signal,
}

impl Signals {
    fn install() -> Result<Signals, DaemonError> {
        let s = |k| signal(k).map_err(DaemonError::Signals);
        Ok(Signals {
            hup: s(SignalKind::hangup())?,
            term: s(SignalKind::terminate())?,
            int: s(SignalKind::interrupt())?,
        })
    }
}

/// One bound set of listeners and the handle that stops their accept loops.
struct Serving {
    port: u16,
    ipv6: bool,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Serving {
    fn start(dp: &Arc<Dataplane>, listeners: Listeners, port: u16, ipv6: bool) -> Serving {
        let (tx, rx) = oneshot::channel::<()>();
        let dp = Arc::clone(dp);
        let task = tokio::spawn(async move {
            dp.serve(listeners, async {
                let _ = rx.await;
            })
            .await;
        });
        Serving {
            port,
            ipv6,
            stop: Some(tx),
            task,
        }
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = self.task.await;
    }
}

/// How long after a change notification the drift check runs.
const NOTIFY_SETTLE: Duration = Duration::from_millis(100);
/// The least time between two notification-driven drift checks.
const NOTIFY_MIN_GAP: Duration = Duration::from_secs(1);

/// Sleeps until `at`; never resolves for `None`.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Everything the running daemon holds.
struct Daemon {
    source: Source,
    cfg: Config,
    desired: Desired,
    kernel: Kernel,
    /// Notifications of changes to etp's table, rules and routes (immediate drift repair).
    monitor: Monitor,
    /// The generation id after etp's own last commit; a different one means someone else
    /// committed (maybe to another table) and an audit is due.
    generation: u32,
    policy_tx: watch::Sender<Arc<FlowPolicy>>,
    dataplane: Arc<Dataplane>,
    serving: Serving,
    metrics: Arc<Metrics>,
    admin: Arc<AdminState>,
    last_reload: Option<(SystemTime, Result<(), String>)>,
    started: SystemTime,
    /// The proxy's health the installed ruleset follows.
    proxy: ProxyState,
    /// What the health task checks (follows reloads).
    probe_tx: watch::Sender<Probe>,
    /// The health task's verdicts.
    proxy_rx: watch::Receiver<ProxyState>,
    /// The per-flow log of kernel hand-offs from conntrack events: started with the first
    /// config that hands flows over in the kernel when the log level asks for flow lines
    /// (`handoff_flows::wanted`); it then runs until etp stops.
    flow_log: Option<FlowLog>,
}

/// Adds up the packets of each comment under its label, each comment counted once (several
/// planned rules share one), as a gauge value.
fn sum_per_label<'a, L: std::hash::Hash + Eq>(
    by_comment: &HashMap<&str, u64>,
    rules: impl Iterator<Item = (&'a str, L)>,
) -> HashMap<L, i64> {
    let mut seen = std::collections::HashSet::new();
    let mut sums: HashMap<L, u64> = HashMap::new();
    for (comment, label) in rules.filter(|(c, _)| seen.insert(*c)) {
        *sums.entry(label).or_default() += by_comment.get(comment).copied().unwrap_or(0);
    }
    sums.into_iter()
        .map(|(l, n)| (l, i64::try_from(n).unwrap_or(i64::MAX)))
        .collect()
}

/// One probe before the first apply, so that the first ruleset already follows the proxy.
async fn first_probe(cfg: &Config, probe: &Probe) -> ProxyState {
    if probe.run(cfg.kernel.own_mark.0).await {
        ProxyState::Ready
    } else {
        warn!(%probe, when_unavailable = %cfg.linkerd.when_unavailable,
            "the linkerd proxy is not ready at start-up");
        ProxyState::Unavailable
    }
}

/// Fail-open stop, after the ruleset is gone: destroys the TIME-WAIT remnants of etp's
/// client legs (client -> an original destination one of etp's routes selects), which
/// would otherwise capture new, now forwarded SYNs with the same 4-tuple for 60 s.
fn forget_client_legs(kernel: &mut Kernel, policy: &FlowPolicy) {
    let ours = |tw: &crate::kernel::sockdiag::TimeWait| {
        matches!(
            policy
                .classifier
                .classify(Proto::Tcp, tw.remote.ip(), tw.local),
            Decision::Route(_)
        )
    };
    match kernel.forget_time_wait(ours) {
        Ok(destroyed) => info!(destroyed, "TIME-WAIT remnants of client legs destroyed"),
        Err(e) => warn!(error = %chain(&e),
            "TIME-WAIT remnants stay: a client reusing a port may fail to connect for 60 s"),
    }
}

/// Ignores SIGHUP until [`run`] installs its handler. Call it first thing in `main`, before
/// parsing arguments: SIGHUP's default action is to terminate, and a `systemctl reload` or
/// `etp reload` racing with start-up would otherwise kill etp before it has a handler (this
/// was measured: a SIGHUP right after exec killed `etp` 20 times out of 20). Dropping these
/// early hang-ups loses nothing: the config is read after this point.
pub fn ignore_early_hangups() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    // SAFETY: SIG_IGN installs no handler code, so there is no async-signal-safety concern;
    // tokio's handler, installed later by `Signals::install`, replaces this disposition.
    if let Err(e) = unsafe { signal(Signal::SIGHUP, SigHandler::SigIgn) } {
        warn!(error = %e, "ignoring SIGHUP during start-up failed");
    }
}

/// Runs the daemon on `cfg` (loaded from `source`, which a reload reads again) until
/// SIGTERM/SIGINT, then drains and cleans up.
pub async fn run(source: Source, cfg: Config) -> Result<(), DaemonError> {
    let mut signals = Signals::install()?;
    raise_nofile_limit();
    let metrics = Arc::new(Metrics::new());
    let admin_state = AdminState::new(Arc::clone(&metrics));
    let admin_listener = admin::bind(cfg.admin.address)
        .await
        .map_err(DaemonError::Admin)?;
    tokio::spawn(admin::serve(admin_listener, Arc::clone(&admin_state)));

    let listeners =
        Listeners::bind(cfg.listener.port, cfg.listener.ipv6).map_err(DaemonError::Listen)?;
    let policy = Arc::new(FlowPolicy::new(&cfg));
    let mut kernel = Kernel::connect().await.map_err(DaemonError::Connect)?;
    // The hand-off address exists before the first health probe looks for a listener on it.
    kernel
        .apply_link(&plan::plan_with(&cfg, &policy.classifier))
        .await
        .map_err(DaemonError::Apply)?;
    let probe = Probe::of(&cfg);
    let proxy = first_probe(&cfg, &probe).await;
    metrics
        .proxy_ready
        .set(i64::from(proxy == ProxyState::Ready));
    let (probe_tx, probe_rx) = watch::channel(probe);
    let (proxy_tx, proxy_rx) = watch::channel(proxy);
    tokio::spawn(health::watch(probe_rx, cfg.kernel.own_mark.0, proxy_tx));
    // The one classifier: the ruleset is planned from the one the data path routes flows with.
    let desired = plan::plan_for(&cfg, &policy.classifier, proxy);
    let (policy_tx, policy_rx) = watch::channel(policy);
    let dataplane = Arc::new(Dataplane::new(policy_rx, Arc::clone(&metrics)));
    let serving = Serving::start(&dataplane, listeners, cfg.listener.port, cfg.listener.ipv6);

    // A stale table from a crashed run is replaced by this same single transaction.
    let applied = kernel
        .apply(&desired, None)
        .await
        .map_err(DaemonError::Apply)?;
    metrics
        .ruleset_generation
        .set(i64::from(applied.generation));
    info!(
        generation = applied.generation,
        messages = applied.messages,
        bytes = applied.bytes,
        routes = %applied.routes,
        "ruleset applied"
    );
    // After the apply: nothing returns early between here and the daemon that stops it.
    let flow_log = (crate::plan_handoff::kernel_handoff(&cfg) && handoff_flows::wanted())
        .then(|| FlowLog::start(policy_tx.subscribe(), Arc::clone(&metrics)));
    admin_state.ready.store(true, Ordering::SeqCst);
    write_pid_file(&cfg);
    notify_ready();
    info!(
        port = cfg.listener.port,
        ipv6 = cfg.listener.ipv6,
        local = cfg.listener.local,
        admin = %cfg.admin.address,
        outbound = cfg.linkerd.outbound_port,
        routes = cfg.routes.len(),
        "etp started"
    );

    let (monitor, failed) = if cfg.daemon.watch_kernel {
        Monitor::open(cfg.kernel.route_table)
    } else {
        (Monitor::none(), Vec::new())
    };
    for e in failed {
        warn!(error = %chain(&e), "change notifications unavailable: drift is repaired at the resync tick only");
    }
    let mut d = Daemon {
        monitor,
        source,
        generation: applied.generation,
        cfg,
        desired,
        kernel,
        policy_tx,
        dataplane,
        serving,
        metrics,
        admin: admin_state,
        last_reload: None,
        started: SystemTime::now(),
        proxy,
        probe_tx,
        proxy_rx,
        flow_log,
    };
    d.publish_status();
    d.serve(&mut signals).await;
    d.shutdown().await;
    Ok(())
}

impl Daemon {
    async fn serve(&mut self, signals: &mut Signals) {
        let mut resync = tokio::time::interval(self.cfg.daemon.resync_interval);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        resync.tick().await; // the first tick is immediate; the ruleset was just applied
        let mut status_tick = tokio::time::interval(Duration::from_secs(1));
        // A change notification schedules a resync shortly after, so that one transaction's
        // burst of notifications (or an agent's few quick commits) costs one check.
        let mut repair_at: Option<tokio::time::Instant> = None;
        // Notification-driven checks are at least NOTIFY_MIN_GAP apart, so that a stream of
        // notifications (or of overruns) cannot keep etp auditing a large table back to back.
        let mut last_check = tokio::time::Instant::now();
        loop {
            tokio::select! {
                change = self.monitor.changed() => match change {
                    Change::Lost { .. } => warn!(%change, "drift is repaired at the resync tick only"),
                    change => {
                        // etp's own commits are notified too; the check after them finds the
                        // generation id unchanged and costs two small routing dumps.
                        debug!(%change, "kernel change notified; checking for drift");
                        repair_at.get_or_insert_with(|| {
                            (tokio::time::Instant::now() + NOTIFY_SETTLE)
                                .max(last_check + NOTIFY_MIN_GAP)
                        });
                    }
                },
                _ = sleep_until_some(repair_at) => {
                    repair_at = None;
                    self.resync().await;
                    last_check = tokio::time::Instant::now();
                }
                _ = signals.hup.recv() => {
                    // Signals that arrive while a reload runs are coalesced by the stream into
                    // one more wake-up: a burst yields at most two reloads.
                    self.reload().await;
                }
                _ = signals.term.recv() => { info!("SIGTERM: shutting down"); return; }
                _ = signals.int.recv() => { info!("SIGINT: shutting down"); return; }
                _ = resync.tick() => self.resync().await,
                Ok(()) = self.proxy_rx.changed() => self.proxy_changed().await,
                _ = status_tick.tick() => self.publish_status(),
            }
            if resync.period() != self.cfg.daemon.resync_interval {
                resync = tokio::time::interval(self.cfg.daemon.resync_interval);
                resync.tick().await;
            }
        }
    }

    /// Parse, validate, plan, (re)bind if the port changed, apply in one transaction. Any
    /// failure leaves the running ruleset, listeners and routes exactly as they were.
    async fn reload(&mut self) {
        let started = Instant::now();
        let result = self.try_reload().await;
        // The log line goes out before the counter moves: whoever sees the counter (a test, an
        // alert) then also finds the line (stderr is written synchronously).
        match &result {
            Ok(()) => info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                generation = self.generation,
                "reloaded"
            ),
            Err(e) => error!(error = %e, "reload failed; the previous config stays in force"),
        }
        let label = if result.is_ok() { "ok" } else { "error" };
        self.metrics
            .reloads_total
            .get_or_create(&ResultLabels { result: label })
            .inc();
        self.last_reload = Some((SystemTime::now(), result));
        self.publish_status();
    }

    async fn try_reload(&mut self) -> Result<(), String> {
        let cfg = self
            .source
            .load()
            .map_err(|e| format!("config: {}", chain(&e)))?;
        let policy = Arc::new(FlowPolicy::new(&cfg));
        let desired = plan::plan_for(&cfg, &policy.classifier, self.proxy);
        let rebind =
            cfg.listener.port != self.serving.port || cfg.listener.ipv6 != self.serving.ipv6;
        let new_serving = if rebind {
            let l = Listeners::bind(cfg.listener.port, cfg.listener.ipv6).map_err(|e| {
                format!(
                    "binding listeners on port {}: {}",
                    cfg.listener.port,
                    chain(&e)
                )
            })?;
            Some(Serving::start(
                &self.dataplane,
                l,
                cfg.listener.port,
                cfg.listener.ipv6,
            ))
        } else {
            None
        };
        // Publish the new routes before the kernel sends flows under them.
        let old_policy = self.policy_tx.send_replace(policy);
        // Sized at start (the runtime's threads, the flow semaphore): say so instead of
        // silently keeping the old value.
        let (old, new) = (&old_policy.limits, &cfg.limits);
        if old.worker_threads != new.worker_threads || old.max_tcp_flows != new.max_tcp_flows {
            warn!(
                worker_threads = new.worker_threads,
                max_tcp_flows = new.max_tcp_flows,
                "limits.worker_threads and limits.max_tcp_flows take effect at the next restart"
            );
        }
        match self.kernel.apply(&desired, None).await {
            Ok(applied) => {
                self.generation = applied.generation;
                self.metrics
                    .ruleset_generation
                    .set(i64::from(applied.generation));
                if !applied.routes.is_empty() {
                    info!(changes = %applied.routes, "policy routing changed");
                }
            }
            Err(e) => {
                self.policy_tx.send_replace(old_policy);
                if let Some(s) = new_serving {
                    s.stop().await;
                }
                // The routing half may have changed before nftables refused the batch: put the
                // old routing back so that nothing is half-applied.
                if let Err(e2) = self.kernel.apply(&self.desired, None).await {
                    error!(error = %chain(&e2), "restoring the previous ruleset after a failed reload");
                }
                return Err(format!("applying the ruleset: {}", chain(&e)));
            }
        }
        if let Some(s) = new_serving {
            let old = std::mem::replace(&mut self.serving, s);
            old.stop().await;
            info!(port = cfg.listener.port, "listeners moved to the new port");
        }
        self.monitor.set_route_table(cfg.kernel.route_table);
        self.probe_tx.send_replace(Probe::of(&cfg));
        if self.flow_log.is_none()
            && crate::plan_handoff::kernel_handoff(&cfg)
            && handoff_flows::wanted()
        {
            self.flow_log = Some(FlowLog::start(
                self.policy_tx.subscribe(),
                Arc::clone(&self.metrics),
            ));
        }
        self.cfg = cfg;
        self.desired = desired;
        Ok(())
    }

    fn committed(&mut self, generation: u32) {
        self.generation = generation;
        self.metrics.ruleset_generation.set(i64::from(generation));
    }

    /// The health task saw the proxy change state: switch the `linkerd` routes in one
    /// transaction. Flows already established are untouched (the rules that change match
    /// only a connection's first packet).
    async fn proxy_changed(&mut self) {
        let state = *self.proxy_rx.borrow_and_update();
        if state == self.proxy {
            return;
        }
        self.metrics
            .proxy_ready
            .set(i64::from(state == ProxyState::Ready));
        let policy = Arc::clone(&self.policy_tx.borrow());
        let desired = plan::plan_for(&self.cfg, &policy.classifier, state);
        if desired == self.desired {
            // No linkerd route: nothing follows the proxy.
            self.proxy = state;
            return;
        }
        match self.kernel.apply(&desired, None).await {
            Ok(applied) => {
                self.committed(applied.generation);
                let label = match state {
                    ProxyState::Ready => "ready",
                    ProxyState::Unavailable => "unavailable",
                };
                self.metrics
                    .proxy_switches_total
                    .get_or_create(&crate::metrics::StateLabels { state: label })
                    .inc();
                let routes_now = match state {
                    ProxyState::Ready => format!("{} hand-off", self.cfg.linkerd.handoff),
                    ProxyState::Unavailable => self.cfg.linkerd.when_unavailable.to_string(),
                };
                warn!(proxy = %state, linkerd_routes = %routes_now,
                    probe = %*self.probe_tx.borrow(), generation = applied.generation,
                    "linkerd proxy health changed: linkerd routes switched");
                self.proxy = state;
                self.desired = desired;
            }
            Err(e) => error!(error = %chain(&e), proxy = %state,
                "switching the linkerd routes failed; retrying at the next health change or resync"),
        }
        self.publish_status();
    }

    /// Copies the counters of the ruleset's refusing rules (guard, per-source limits) into
    /// `etp_kernel_refused_packets`, and of its kernel hand-off rules into
    /// `etp_kernel_handoffs`; a route's rules for several families add up.
    fn read_rule_counters(&mut self) {
        let refusals = plan::refusals(&self.desired);
        let handoffs = crate::plan_handoff::handoff_counters(&self.desired);
        if refusals.is_empty() && handoffs.is_empty() {
            return;
        }
        let counters = match self.kernel.rule_packets() {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %chain(&e), "resync: reading rule counters failed");
                return;
            }
        };
        // Per comment, the packets of every rule that carries it (a route's IPv4 and IPv6 rules
        // share a comment).
        let mut by_comment: HashMap<&str, u64> = HashMap::new();
        for (comment, packets) in &counters {
            *by_comment.entry(comment.as_str()).or_default() += packets;
        }
        let refused = sum_per_label(
            &by_comment,
            refusals.iter().map(|r| {
                let proto = match r.proto {
                    Proto::Tcp => "tcp",
                    Proto::Udp => "udp",
                };
                let labels = RefusalLabels {
                    route: r.route.clone(),
                    proto,
                    reason: r.reason,
                };
                (r.comment.as_str(), labels)
            }),
        );
        for (labels, packets) in refused {
            self.metrics
                .kernel_refused
                .get_or_create(&labels)
                .set(packets);
        }
        let handed = sum_per_label(
            &by_comment,
            handoffs.iter().map(|(comment, route)| {
                (
                    comment.as_str(),
                    RouteLabels {
                        route: route.clone(),
                    },
                )
            }),
        );
        for (labels, packets) in handed {
            self.metrics
                .kernel_handoffs
                .get_or_create(&labels)
                .set(packets);
        }
    }

    /// Drift check: the generation id first (cheap); a full audit only when it moved; routing
    /// is checked on every tick (two small dumps). Drift is repaired in one transaction.
    async fn resync(&mut self) {
        self.read_rule_counters();
        let generation = match self.kernel.generation() {
            Ok(g) => g,
            Err(e) => {
                warn!(error = %chain(&e), "resync: reading the generation id failed");
                return;
            }
        };
        let drift = if generation != self.generation {
            self.kernel.audit(&self.desired).await
        } else {
            self.kernel.audit_routing(&self.desired).await
        };
        let drift = match drift {
            Ok(d) => d,
            Err(e) => {
                warn!(error = %chain(&e), "resync: audit failed");
                return;
            }
        };
        if drift.is_empty() {
            self.generation = generation;
            return;
        }
        for d in &drift {
            warn!(drift = %d, "drift found");
        }
        match self.kernel.apply(&self.desired, None).await {
            Ok(applied) => {
                self.generation = applied.generation;
                self.metrics
                    .ruleset_generation
                    .set(i64::from(applied.generation));
                self.metrics.drift_repairs_total.inc();
                info!(
                    repaired = drift.len(),
                    generation = applied.generation,
                    "drift repaired"
                );
            }
            Err(e) => {
                error!(error = %chain(&e), "drift repair failed; retrying at the next resync")
            }
        }
        self.publish_status();
    }

    async fn shutdown(mut self) {
        self.admin.ready.store(false, Ordering::SeqCst);
        let deadline = self.cfg.daemon.drain_timeout;
        if !self.cfg.daemon.fail_closed {
            let policy = Arc::clone(&self.policy_tx.borrow());
            let drain = plan::plan_drain_with(&self.cfg, &policy.classifier);
            match self.kernel.apply_table(&drain) {
                Ok(_) => info!("drain table installed: new traffic now goes direct"),
                Err(e) => error!(error = %chain(&e), "installing the drain table"),
            }
        }
        let active = self.dataplane.active_flows();
        self.serving.stop().await;
        info!(active, deadline_s = deadline.as_secs(), "draining flows");
        self.dataplane.drain(deadline).await;
        if self.cfg.daemon.fail_closed {
            info!("fail_closed: leaving the ruleset in place");
        } else {
            match self.kernel.cleanup().await {
                Ok(r) => {
                    info!(
                        table = r.table,
                        routing_entries = r.routing_entries,
                        "ruleset removed"
                    );
                    let policy = Arc::clone(&self.policy_tx.borrow());
                    forget_client_legs(&mut self.kernel, &policy);
                }
                Err(e) => error!(error = %chain(&e), "removing the ruleset"),
            }
        }
        if let Some(log) = self.flow_log.take() {
            log.stop();
        }
        crate::pidfile::remove_own(&self.cfg.daemon.pid_file);
        info!("etp stopped");
    }

    fn publish_status(&self) {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "etp {} (pid {})",
            env!("CARGO_PKG_VERSION"),
            std::process::id()
        );
        let _ = writeln!(s, "config: {}", self.cfg.source);
        let _ = writeln!(
            s,
            "uptime: {}s",
            self.started.elapsed().map(|d| d.as_secs()).unwrap_or(0)
        );
        let _ = writeln!(
            s,
            "listener: port {} ipv6 {} local {}",
            self.cfg.listener.port, self.cfg.listener.ipv6, self.cfg.listener.local
        );
        let _ = writeln!(s, "ruleset generation: {}", self.generation);
        let _ = writeln!(
            s,
            "linkerd proxy: {} (check: {}; handoff {}, when unavailable {})",
            self.proxy,
            *self.probe_tx.borrow(),
            self.cfg.linkerd.handoff,
            self.cfg.linkerd.when_unavailable
        );
        let _ = writeln!(s, "active flows: {}", self.dataplane.active_flows());
        match &self.last_reload {
            None => {
                let _ = writeln!(s, "last reload: none");
            }
            Some((t, r)) => {
                let ago = t.elapsed().map(|d| d.as_secs()).unwrap_or(0);
                let r = match r {
                    Ok(()) => "ok".to_string(),
                    Err(e) => format!("failed: {e}"),
                };
                let _ = writeln!(s, "last reload: {ago}s ago, {r}");
            }
        }
        let _ = writeln!(s, "routes:");
        for r in &self.cfg.routes {
            let _ = writeln!(s, "  {}", r.summary());
        }
        self.admin.set_status(s, status_series(&self.cfg));
    }
}

/// The flow series `etp status` reports counters for: every route's (action, protocol), and
/// the unmatched flows.
fn status_series(cfg: &Config) -> Vec<FlowLabels> {
    let labels = |route: &str, action: &str, proto: Proto| FlowLabels {
        route: route.to_string(),
        action: action.to_string(),
        proto: proto.to_string(),
    };
    let mut out = Vec::new();
    for r in &cfg.routes {
        for p in &r.protocols {
            out.push(labels(&r.name, r.action.label(), *p));
        }
    }
    for p in [Proto::Tcp, Proto::Udp] {
        out.push(labels(UNMATCHED, "direct", p));
    }
    out
}

/// Raises the soft RLIMIT_NOFILE to the hard limit. A spliced TCP flow holds up to six
/// descriptors (two sockets, two pipes of two ends each) and a UDP flow two sockets, so the
/// usual soft limit of 1024 would cap etp at ~170 busy flows, far below `limits.max_tcp_flows`.
/// Failing to raise it is not fatal: accept errors are counted and the relay falls back to
/// copying when no pipe can be had.
fn raise_nofile_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => info!(
                from = soft,
                to = hard,
                "raised the open-file limit (RLIMIT_NOFILE)"
            ),
            Err(e) => {
                warn!(soft, hard, error = %e, "raising the open-file limit (RLIMIT_NOFILE) failed")
            }
        },
        Ok((soft, _)) => info!(
            limit = soft,
            "open-file limit (RLIMIT_NOFILE) already at its hard limit"
        ),
        Err(e) => warn!(error = %e, "reading the open-file limit (RLIMIT_NOFILE) failed"),
    }
}

fn write_pid_file(cfg: &Config) {
    if let Err(e) = crate::pidfile::write(&cfg.daemon.pid_file) {
        warn!(error = %chain(&e), "writing the pid file failed; `etp reload` will need systemd or kill -HUP");
    }
}

/// `READY=1` to systemd when `NOTIFY_SOCKET` is set (Type=notify).
fn notify_ready() {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
            warn!(error = %e, "sd_notify READY=1 failed");
        }
    }
}
