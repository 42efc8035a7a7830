//! The transparent data path: listeners on the TPROXY port, flow classification, upstream
//! connections, and the lifecycle of flows (limits, reload, drain).
//!
//! - `listen`: creating the transparent TCP/UDP sockets ([`Listeners::bind`]).
//! - `upstream`: the flow decision (route, action, upstream address and mark) and the marked
//!   upstream sockets.
//! - `admission`: which new flows etp takes on (self-loop, per-source limits, UDP fairness).
//! - `flow_metrics`: one flow's counters and open gauge, released however the flow ends.
//! - `tcp`: the accept loop and one task per connection (relayed by `relay`).
//! - `udp`: the receive loop, the flows and the reply sockets; `flow_table`: the UDP flow table
//!   and its eviction order.
//! - `fdlimit`: back-off on descriptor exhaustion; `sockopt`: socket options and the only
//!   unsafe socket code.
//!
//! Reload: the daemon publishes a new [`FlowPolicy`] on a `watch` channel. Each new flow reads the
//! current one when it starts; established flows keep the routes they started with.

mod admission;
#[cfg(test)]
mod cmsg_tests;
pub(crate) mod fdlimit;
mod flow_metrics;
mod flow_table;
mod listen;
mod relay;
mod sockopt;
mod tcp;
mod udp;
mod upstream;

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify, Semaphore};
use tracing::{info, warn};

use crate::classify::Classifier;
use crate::config::{self, Config};
use crate::dataplane::admission::Admission;
use crate::dataplane::fdlimit::Pressure;
use crate::metrics::Metrics;

pub use listen::{ListenError, Listeners};
pub(crate) use upstream::UNMATCHED;

/// The destination a client addressed (TCP: the accepted socket's local address; UDP: the
/// `IP(V6)_ORIGDSTADDR` control message), v4-mapped addresses unmapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OrigDst(pub SocketAddr);

/// The client's address as etp saw it (unmapped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientAddr(pub SocketAddr);

impl fmt::Display for OrigDst {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// What the data path needs from a config. Built once per (re)load and shared read-only.
#[derive(Debug, Clone)]
pub struct FlowPolicy {
    pub classifier: Classifier,
    pub kernel: config::KernelIds,
    pub limits: config::Limits,
    /// The TPROXY port: a flow addressed to it on a local address is etp's own listener.
    pub listener_port: u16,
}

impl FlowPolicy {
    pub fn new(cfg: &Config) -> FlowPolicy {
        FlowPolicy {
            classifier: Classifier::new(cfg),
            kernel: cfg.kernel.clone(),
            limits: cfg.limits.clone(),
            listener_port: cfg.listener.port,
        }
    }
}

/// Counts live flows and can cancel them all (drain deadline).
#[derive(Debug)]
pub(crate) struct Flows {
    active: AtomicUsize,
    idle: Notify,
    cancel: watch::Sender<bool>,
}

/// Held by a flow task for its lifetime.
pub(crate) struct FlowGuard {
    flows: Arc<Flows>,
}

impl Flows {
    fn new() -> Flows {
        Flows {
            active: AtomicUsize::new(0),
            idle: Notify::new(),
            cancel: watch::channel(false).0,
        }
    }

    pub(crate) fn enter(self: &Arc<Self>) -> FlowGuard {
        self.active.fetch_add(1, Ordering::SeqCst);
        FlowGuard {
            flows: Arc::clone(self),
        }
    }

    /// Resolves when the drain deadline cancels flows.
    pub(crate) fn cancelled(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.cancel.subscribe();
        async move {
            let _ = rx.wait_for(|c| *c).await;
        }
    }
}

impl Drop for FlowGuard {
    fn drop(&mut self) {
        if self.flows.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.flows.idle.notify_waiters();
        }
    }
}

/// The running data path: accept loops, flow tasks, metrics.
pub struct Dataplane {
    pub(crate) policy: watch::Receiver<Arc<FlowPolicy>>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) flows: Arc<Flows>,
    /// `limits.max_tcp_flows` permits, sized from the policy at construction.
    pub(crate) tcp_slots: Arc<Semaphore>,
    /// Back-off shared by the accept loops and flows after descriptor exhaustion.
    pub(crate) pressure: Arc<Pressure>,
    /// Self-loop refusal, per-source limits, refusal metrics and log.
    pub(crate) admission: Arc<Admission>,
}

impl Dataplane {
    pub fn new(policy: watch::Receiver<Arc<FlowPolicy>>, metrics: Arc<Metrics>) -> Dataplane {
        let max = policy.borrow().limits.max_tcp_flows;
        Dataplane {
            policy,
            metrics,
            flows: Arc::new(Flows::new()),
            tcp_slots: Arc::new(Semaphore::new(max)),
            pressure: Arc::default(),
            admission: Arc::default(),
        }
    }

    /// The current routes and limits (new flows use these).
    pub(crate) fn current(&self) -> Arc<FlowPolicy> {
        Arc::clone(&self.policy.borrow())
    }

    /// Runs the accept loops (TCP) and receive loops (UDP) until `stop_accepting` resolves.
    /// Flows started before then keep running as tasks; see [`Dataplane::drain`].
    pub async fn serve(&self, listeners: Listeners, stop_accepting: impl Future<Output = ()>) {
        let ports = listeners.describe();
        info!(listeners = %ports, "data path serving");
        let Listeners {
            tcp4,
            tcp6,
            udp4,
            udp6,
        } = listeners;
        let loops = async {
            tokio::join!(
                tcp::accept_loop(self, tcp4),
                opt(tcp6.map(|l| tcp::accept_loop(self, l))),
                udp::recv_loop(self, udp4),
                opt(udp6.map(|l| udp::recv_loop(self, l))),
            )
        };
        tokio::select! {
            _ = loops => warn!("all accept loops ended on their own"),
            _ = stop_accepting => info!("stopped accepting new flows"),
        }
    }

    /// Flows (TCP connections and UDP flows) open now.
    pub fn active_flows(&self) -> usize {
        self.flows.active.load(Ordering::SeqCst)
    }

    /// Waits for flows to finish, up to `deadline`; then cancels the rest and waits (briefly,
    /// at most one second) for them to close.
    pub async fn drain(&self, deadline: Duration) {
        let wait_idle = async {
            loop {
                let notified = self.flows.idle.notified();
                if self.active_flows() == 0 {
                    return;
                }
                notified.await;
            }
        };
        if tokio::time::timeout(deadline, wait_idle).await.is_ok() {
            info!("drain complete: no flows left");
            return;
        }
        let left = self.active_flows();
        warn!(
            flows = left,
            "drain deadline reached: closing remaining flows"
        );
        let _ = self.flows.cancel.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while self.active_flows() > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    }
}

async fn opt<F: Future>(f: Option<F>) {
    if let Some(f) = f {
        f.await;
    }
}
