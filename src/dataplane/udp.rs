//! UDP: one receive loop per listener, a table of flows keyed by (client, original destination),
//! one task and one connected upstream socket per flow.
//!
//! Replies must reach the client *from the original destination* (DNS clients check the reply's
//! source). They are sent from a transparent socket bound to that address, shared by all flows
//! to the same destination: the table holds it weakly, so it closes when its last flow ends.
//!
//! Bounds: `limits.max_udp_flows` (the least recently used flow is evicted to make room, see
//! `flow_table`), `limits.udp_queue`
//! datagrams queued per flow (beyond that they are dropped and counted), `limits.udp_idle_timeout`
//! per flow. Datagrams up to 64 KiB are delivered whole; a truncated one is dropped.

use std::cell::RefCell;
use std::collections::HashMap;
use std::os::fd::AsFd;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::flow_metrics::{count_upstream_error, FlowMetrics};
use super::flow_table::{FlowTable, Room};
use super::upstream::{decide_flow, reply_socket, udp_upstream, FlowDecision};
use super::{ClientAddr, Dataplane, FlowGuard, OrigDst};
use crate::dataplane::sockopt;
use crate::kernel::conntrack::Conntrack;
use crate::metrics::{Metrics, ReasonLabels};
use crate::model::Proto;

/// How often the receive loop forgets finished flows and unused reply sockets.
const PRUNE_EVERY: Duration = Duration::from_secs(5);

thread_local! {
    /// One 64 KiB reply buffer per worker thread: flows read a reply and send it on without
    /// awaiting in between, so a per-flow buffer is not needed.
    static REPLY_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; sockopt::MAX_DATAGRAM]);
}

type Key = (ClientAddr, OrigDst);

fn drop_count(m: &Metrics, reason: &'static str) {
    debug_assert!(
        crate::metrics::UDP_DROP_REASONS.contains(&reason),
        "{reason}"
    );
    m.udp_dropped_total
        .get_or_create(&ReasonLabels { reason })
        .inc();
}

/// The receive loop of one UDP listener. Per datagram: receive it with its original
/// destination, now and then forget finished flows, drop what cannot be relayed, hand it to
/// its flow's queue, or start a new flow with it.
pub(super) async fn recv_loop(dp: &Dataplane, sock: UdpSocket) {
    let mut rl = RecvLoop::new(dp);
    loop {
        let Some(r) = rl.receive(&sock).await else {
            continue;
        };
        rl.prune();
        let Some((key, data)) = rl.relayable(&r) else {
            continue;
        };
        let Some(data) = rl.deliver(&key, data) else {
            continue;
        };
        rl.start_flow(key, data);
    }
}

/// The state of one listener's receive loop.
struct RecvLoop<'a> {
    dp: &'a Dataplane,
    buf: Vec<u8>,
    /// Each flow's queue; a closed one means the flow's task has ended.
    flows: FlowTable<Key, mpsc::Sender<Vec<u8>>>,
    replies: HashMap<OrigDst, Weak<UdpSocket>>,
    pruned: Instant,
    /// This loop's own ctnetlink socket: the pre-DNAT destination of each new flow.
    conntrack: Option<Conntrack>,
}

impl<'a> RecvLoop<'a> {
    fn new(dp: &'a Dataplane) -> RecvLoop<'a> {
        let conntrack = match Conntrack::open() {
            Ok(c) => Some(c),
            Err(e) => {
                warn!(error = %e, "no conntrack socket: UDP flows behind a DNAT are classified by \
                    their translated destination");
                None
            }
        };
        RecvLoop {
            dp,
            buf: vec![0u8; sockopt::MAX_DATAGRAM],
            flows: FlowTable::default(),
            replies: HashMap::new(),
            pruned: Instant::now(),
            conntrack,
        }
    }

    /// One datagram with its original destination; `None` after a failed receive.
    async fn receive(&mut self, sock: &UdpSocket) -> Option<sockopt::Received> {
        let buf = &mut self.buf;
        let r = sock
            .async_io(Interest::READABLE, || {
                sockopt::recv_with_orig_dst(sock.as_fd(), buf)
            })
            .await;
        match r {
            Ok(r) => Some(r),
            Err(e) => {
                // ICMP errors queued on the listener, or fd/memory pressure: never spin.
                debug!(error = %e, "udp receive failed");
                tokio::time::sleep(Duration::from_millis(1)).await;
                None
            }
        }
    }

    /// Every [`PRUNE_EVERY`]: forget finished flows and unused reply sockets.
    fn prune(&mut self) {
        if self.pruned.elapsed() > PRUNE_EVERY {
            self.flows.retain(|tx| !tx.is_closed());
            self.replies.retain(|_, w| w.strong_count() > 0);
            self.pruned = Instant::now();
        }
    }

    /// The flow key and a copy of the datagram, unless it was truncated or came without its
    /// original destination (dropped and counted).
    fn relayable(&self, r: &sockopt::Received) -> Option<(Key, Vec<u8>)> {
        let m = &self.dp.metrics;
        if r.truncated {
            drop_count(m, "truncated");
            return None;
        }
        let Some(orig) = r.orig_dst else {
            drop_count(m, "no_orig_dst");
            return None;
        };
        let key = (ClientAddr(r.src), OrigDst(orig));
        Some((key, self.buf[..r.len].to_vec()))
    }

    /// Queues the datagram on its flow. Gives it back when there is no live flow for it.
    fn deliver(&mut self, key: &Key, data: Vec<u8>) -> Option<Vec<u8>> {
        let Some(tx) = self.flows.get_mut(key, Instant::now()) else {
            return Some(data);
        };
        match tx.try_send(data) {
            Ok(()) => None,
            Err(mpsc::error::TrySendError::Full(_)) => {
                drop_count(&self.dp.metrics, "queue_full");
                None
            }
            // The flow ended (idle or evicted): start a new one with this datagram.
            Err(mpsc::error::TrySendError::Closed(d)) => {
                self.flows.remove(key);
                Some(d)
            }
        }
    }

    /// A new flow for `key`, with `data` as its first datagram: room in the table, the
    /// destination the client asked for, the route's decision, the reply socket, the
    /// upstream socket and the flow's task.
    fn start_flow(&mut self, key: Key, data: Vec<u8>) {
        let dp = self.dp;
        let m = &dp.metrics;
        let rt = dp.current();
        self.make_room(rt.limits.max_udp_flows);
        let asked = self.asked_destination(&key);
        let decision = decide_flow(&rt, Proto::Udp, key.0, asked);
        let Some(reply) = self.reply_socket(key.1, rt.kernel.own_mark.0) else {
            return;
        };
        let up = match udp_upstream(decision.target, decision.mark) {
            Ok(u) => u,
            Err(e) => {
                count_upstream_error(m, &decision.route, &e);
                debug!(client = %key.0, orig_dst = %key.1, upstream = %decision.target, error = %e,
                    "udp upstream socket failed");
                drop_count(m, "upstream");
                return;
            }
        };
        let (tx, rx) = mpsc::channel(rt.limits.udp_queue);
        tx.try_send(data).expect("a new queue has room");
        self.flows.insert(key, tx, Instant::now());
        let f = Flow {
            client: key.0,
            orig: asked,
            decision,
            up,
            reply,
            idle: rt.limits.udp_idle_timeout,
            metrics: Arc::clone(&dp.metrics),
            _guard: dp.flows.enter(),
        };
        spawn_flow(f, rx, dp.flows.cancelled());
    }

    /// Below `max` flows: finished flows go first, then the least recently used (dropping an
    /// evicted flow's sender ends that flow's task).
    fn make_room(&mut self, max: usize) {
        while self.flows.len() >= max {
            match self.flows.make_room(|tx| tx.is_closed()) {
                Room::Freed => {}
                Room::Evicted => {
                    self.dp.metrics.udp_evictions_total.inc();
                }
                Room::Empty => break,
            }
        }
    }

    /// What the client asked for: before a DNAT (kube-proxy's ClusterIP -> endpoint) that
    /// ran after the tproxy rule, else the destination the datagram arrived with. Replies
    /// still leave from `key.1`: conntrack translates them back to what the client asked.
    fn asked_destination(&mut self, key: &Key) -> OrigDst {
        match self
            .conntrack
            .as_mut()
            .map(|c| c.udp_orig_dst(key.0 .0, key.1 .0))
        {
            Some(Ok(Some(a))) => OrigDst(sockopt::unmap(a)),
            Some(Err(e)) => {
                debug!(client = %key.0, orig_dst = %key.1, error = %e, "conntrack lookup failed");
                key.1
            }
            _ => key.1,
        }
    }

    /// The transparent socket bound to `orig` that replies leave from, shared by every flow
    /// to `orig`; `None` (dropped and counted) when it cannot be bound.
    fn reply_socket(&mut self, orig: OrigDst, own_mark: u32) -> Option<Arc<UdpSocket>> {
        if let Some(s) = self.replies.get(&orig).and_then(Weak::upgrade) {
            return Some(s);
        }
        match reply_socket(orig, own_mark) {
            Ok(s) => {
                let s = Arc::new(s);
                self.replies.insert(orig, Arc::downgrade(&s));
                Some(s)
            }
            Err(e) => {
                warn!(orig_dst = %orig, error = %e,
                    "cannot bind a transparent reply socket to the original destination");
                drop_count(&self.dp.metrics, "reply_socket");
                None
            }
        }
    }
}

/// Runs a flow's task until it ends or the drain deadline cancels it.
fn spawn_flow(
    f: Flow,
    rx: mpsc::Receiver<Vec<u8>>,
    cancelled: impl std::future::Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        tokio::select! {
            _ = f.run(rx) => {}
            _ = cancelled => {}
        }
    })
}

struct Flow {
    client: ClientAddr,
    orig: OrigDst,
    decision: FlowDecision,
    up: UdpSocket,
    reply: Arc<UdpSocket>,
    idle: Duration,
    metrics: Arc<Metrics>,
    _guard: FlowGuard,
}

impl Flow {
    async fn run(self, mut rx: mpsc::Receiver<Vec<u8>>) {
        let start = Instant::now();
        // Dropped with this future, also when the drain deadline cancels it.
        let flow_metrics = FlowMetrics::start(&self.metrics, &self.decision, Proto::Udp);
        let (c2u, u2c) = (
            &flow_metrics.bytes.client_to_upstream,
            &flow_metrics.bytes.upstream_to_client,
        );
        debug!(client = %self.client, orig_dst = %self.orig, route = %self.decision.route,
            action = %self.decision.action, upstream = %self.decision.target, "udp flow started");
        let (mut sent, mut received) = (0u64, 0u64);
        let idle = tokio::time::sleep(self.idle);
        tokio::pin!(idle);
        let end = loop {
            tokio::select! {
                d = rx.recv() => {
                    let Some(d) = d else { break "evicted" };
                    match self.up.send(&d).await {
                        Ok(n) => {
                            sent += n as u64;
                            c2u.inc_by(n as u64);
                        }
                        Err(e) => debug!(client = %self.client, error = %e, "udp send upstream failed"),
                    }
                }
                r = self.up.readable() => {
                    if let Err(e) = r {
                        debug!(error = %e, "udp upstream socket failed");
                        break "error";
                    }
                    match self.forward_reply() {
                        Ok(Some(n)) => {
                            received += n as u64;
                            u2c.inc_by(n as u64);
                        }
                        Ok(None) => continue,
                        Err(e) => {
                            // An ICMP error (port unreachable) on the connected socket.
                            debug!(client = %self.client, orig_dst = %self.orig, error = %e,
                                "udp upstream error");
                            continue;
                        }
                    }
                }
                _ = &mut idle => break "idle",
            }
            idle.as_mut().reset(tokio::time::Instant::now() + self.idle);
        };
        drop(flow_metrics);
        debug!(client = %self.client, orig_dst = %self.orig, route = %self.decision.route,
            bytes_to_upstream = sent, bytes_to_client = received,
            duration_ms = start.elapsed().as_millis() as u64, end, "udp flow closed");
    }

    /// Reads one reply (if any is ready) and sends it to the client from the original
    /// destination. `Ok(None)`: nothing was ready after all. A reply that cannot be sent at
    /// once is dropped and counted (UDP is lossy; blocking here would stall the flow).
    fn forward_reply(&self) -> std::io::Result<Option<usize>> {
        REPLY_BUF.with(|b| {
            let mut buf = b.borrow_mut();
            let n = match self.up.try_recv(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(e),
            };
            match self.reply.try_send_to(&buf[..n], self.client.0) {
                Ok(_) => Ok(Some(n)),
                Err(e) => {
                    debug!(client = %self.client, orig_dst = %self.orig, error = %e,
                        "udp reply to client dropped");
                    drop_count(&self.metrics, "send");
                    Ok(Some(0))
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::Flows;
    use crate::metrics::FlowLabels;

    /// A flow the drain deadline cancels is no longer counted open (its task is dropped
    /// mid-flow, so the decrement must not depend on the task running to its end).
    #[tokio::test]
    async fn a_cancelled_flow_is_no_longer_counted_open() {
        let metrics = Arc::new(Metrics::new());
        let flows = Arc::new(Flows::new());
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let target = server.local_addr().unwrap();
        let up = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        up.connect(target).await.unwrap();
        let reply = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let client = ClientAddr(reply.local_addr().unwrap());
        let f = Flow {
            client,
            orig: OrigDst(target),
            decision: FlowDecision {
                route: "r".into(),
                action: "direct",
                target,
                mark: 0,
                bind_client: false,
            },
            up,
            reply,
            idle: Duration::from_secs(60),
            metrics: Arc::clone(&metrics),
            _guard: flows.enter(),
        };
        let labels = FlowLabels {
            route: "r".into(),
            action: "direct".into(),
            proto: "udp".into(),
        };
        let open = || metrics.flows_active.get(&labels).map_or(0, |g| g.get());
        let (tx, rx) = mpsc::channel(1);
        let task = spawn_flow(f, rx, flows.cancelled());
        for _ in 0..200 {
            if open() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(open(), 1, "the flow is counted open while it runs");
        let _ = flows.cancel.send(true);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the cancelled task ends")
            .unwrap();
        assert_eq!(open(), 0, "a cancelled flow still counted open");
        drop(tx);
    }
}
