//! The log lines and per-route metrics of kernel hand-offs (`[linkerd] handoff = "kernel"`):
//! etp is not in the flow's path, so they come from conntrack (`kernel::ct_events`): one line
//! per connection carrying etp's route label that finished (TIME_WAIT or CLOSE), with the
//! counters read from its entry right then.
//!
//! What is lost compared with the relay: bytes are IP bytes (headers included) rather than
//! payload and miss the last packets of the close; a connection that never closes (it times
//! out in conntrack) is not logged; there is no `etp_flows_active` for these flows and
//! `etp_flows_total` counts them when they end; events lost to a receive-buffer overrun are
//! counted (`etp_conntrack_events_lost_total`), not logged.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::dataplane::FlowPolicy;
use crate::kernel::conntrack::{get_by_tuple, Conntrack, CTA_TUPLE_ORIG};
use crate::kernel::ct_events::{self, Closing, CtEvents, Ended, Event};
use crate::metrics::{ByteLabels, Direction, FlowLabels, Metrics};
use crate::plan_handoff::route_of_ct_mark;
use crate::telemetry::chain;

/// Whether the log asks for a line per finished flow (`-v=1` and up, or `RUST_LOG` with
/// `etp::handoff_flows=debug`). Only then does etp read conntrack events: a listener makes the
/// kernel build an event for every TCP state change of every connection in the namespace, and
/// reading them cost about 30% of the kernel hand-off's connection rate in the benchmark
/// (BENCHMARKS.md). The per-route count of hand-offs comes from rule counters either way.
pub fn wanted() -> bool {
    tracing::enabled!(tracing::Level::DEBUG)
}

/// The flow log's reader, and the sysctls it turned on (put back when etp stops: they are
/// the namespace's, not etp's).
pub struct FlowLog {
    turned_on: Vec<&'static str>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl FlowLog {
    /// Turns on conntrack accounting in this namespace, says what it did, and spawns the
    /// reader.
    pub fn start(runtime: watch::Receiver<Arc<FlowPolicy>>, metrics: Arc<Metrics>) -> FlowLog {
        let mut turned_on = Vec::new();
        for (path, r) in ct_events::enable_accounting() {
            match r {
                Ok(true) => {
                    info!(
                        sysctl = path,
                        "turned on for kernel hand-off flow logs (until etp stops)"
                    );
                    turned_on.push(path);
                }
                Ok(false) => {}
                Err(e) => warn!(sysctl = path, error = %e,
                    "cannot turn on: kernel hand-off flows are logged without bytes or duration"),
            }
        }
        let events = CtEvents::open().and_then(|ev| Ok((ev, Conntrack::open()?)));
        let task = match events {
            Ok((events, ct)) => Some(tokio::spawn(run(events, ct, runtime, metrics))),
            Err(e) => {
                warn!(error = %chain(&e), "conntrack events unavailable: kernel hand-off flows are not logged");
                None
            }
        };
        FlowLog { turned_on, task }
    }

    /// Stops reading events and turns off what `start` turned on.
    pub fn stop(self) {
        if let Some(t) = self.task {
            t.abort();
        }
        for (path, r) in ct_events::disable_accounting(&self.turned_on) {
            match r {
                Ok(()) => info!(sysctl = path, "turned off again"),
                Err(e) => warn!(sysctl = path, error = %e, "cannot turn off again"),
            }
        }
    }
}

/// Entries already logged (a connection may report TIME_WAIT, then CLOSE on a late reset).
const REMEMBERED: usize = 4096;

async fn run(
    mut events: CtEvents,
    mut ct: Conntrack,
    runtime: watch::Receiver<Arc<FlowPolicy>>,
    metrics: Arc<Metrics>,
) {
    let mut seen: (VecDeque<u32>, HashSet<u32>) = (VecDeque::new(), HashSet::new());
    let ours = |mark: u32| route_of_ct_mark(mark).is_some();
    loop {
        match events.next(ours).await {
            Ok(Event::Closing(closing)) => {
                let rt = Arc::clone(&runtime.borrow());
                for c in closing {
                    if !seen.1.insert(c.id) {
                        continue;
                    }
                    seen.0.push_back(c.id);
                    if seen.0.len() > REMEMBERED {
                        if let Some(old) = seen.0.pop_front() {
                            seen.1.remove(&old);
                        }
                    }
                    match read_entry(&mut ct, &c) {
                        Some(e) => finished(&rt, &metrics, &e),
                        None => debug!(client = %c.client, orig_dst = %c.orig_dst,
                            "kernel hand-off ended; its conntrack entry is already gone"),
                    }
                }
            }
            Ok(Event::Lost) => {
                metrics.conntrack_events_lost_total.inc();
            }
            Err(e) => {
                warn!(error = %chain(&e), "reading conntrack events failed; kernel hand-off flows are no longer logged");
                return;
            }
        }
    }
}

/// The entry of a connection that just finished, counters and start time included.
fn read_entry(ct: &mut Conntrack, c: &Closing) -> Option<Ended> {
    let seq = ct.next_seq();
    let req = get_by_tuple(
        seq,
        CTA_TUPLE_ORIG,
        libc::IPPROTO_TCP as u8,
        c.client,
        c.orig_dst,
    );
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let answer = ct.get(&req).ok()??;
    ct_events::parse(answer, now).into_iter().next()
}

fn finished(rt: &FlowPolicy, metrics: &Metrics, e: &Ended) {
    let Some(index) = route_of_ct_mark(e.mark) else {
        return;
    };
    let route = rt
        .classifier
        .selectors
        .iter()
        .find(|s| s.index == index)
        .map(|s| s.route.name.clone())
        .unwrap_or_else(|| format!("#{index}"));
    metrics
        .flows_total
        .get_or_create(&FlowLabels {
            route: route.clone(),
            action: "linkerd".to_string(),
            proto: "tcp".to_string(),
        })
        .inc();
    for (dir, n) in [
        (Direction::ClientToUpstream, e.bytes_from_client),
        (Direction::UpstreamToClient, e.bytes_to_client),
    ] {
        if let Some(n) = n {
            metrics
                .bytes_total
                .get_or_create(&ByteLabels {
                    route: route.clone(),
                    direction: dir.as_str(),
                })
                .inc_by(n);
        }
    }
    let show = |v: Option<u64>| v.map_or("unknown".to_string(), |n| n.to_string());
    debug!(client = %e.client, orig_dst = %e.orig_dst, %route, action = %"linkerd",
        handoff = %"kernel", upstream = %e.upstream,
        bytes_to_upstream = %show(e.bytes_from_client), bytes_to_client = %show(e.bytes_to_client),
        duration_ms = %show(e.lifetime.map(|d| d.as_millis() as u64)),
        "closed (kernel hand-off)");
}
