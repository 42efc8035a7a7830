//! UDP: one receive loop per listener, a table of flows keyed by (client, original destination),
//! one task and one connected upstream socket per flow.
//!
//! Replies must reach the client *from the original destination* (DNS clients check the reply's
//! source). They are sent from a transparent socket bound to that address, shared by all flows
//! to the same destination: the table holds it weakly, so it closes when its last flow ends.
//!
//! Bounds: `limits.max_udp_flows` (a flow of the source that holds the most is evicted to make
//! room, see `flow_table`), `limits.max_udp_flows_per_source` (a source at its limit gives up
//! its own oldest flow), `limits.new_flows_per_source_per_second` and no flow to etp's own
//! listener (`admission`: checked before any conntrack lookup or socket), a fair share of new
//! flows per source while the loop is behind ([`recv_loop`]), `limits.udp_queue`
//! datagrams queued per flow (beyond that they are dropped and counted), `limits.udp_idle_timeout`
//! per flow. Datagrams up to 64 KiB are delivered whole; a truncated one is dropped.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::admission::{is_own_listener, limited_source, source_key, Admission, Refusal};
use super::flow_metrics::{count_upstream_error, FlowMetrics};
use super::flow_table::{FlowTable, Room};
use super::upstream::{decide_flow, reply_socket, udp_upstream, FlowDecision};
use super::{ClientAddr, Dataplane, FlowGuard, FlowPolicy, OrigDst};
use crate::config::Limits;
use crate::dataplane::sockopt;
use crate::kernel::conntrack::Conntrack;
use crate::metrics::Metrics;
use crate::model::Proto;

/// How often the receive loop forgets finished flows and unused reply sockets.
const PRUNE_EVERY: Duration = Duration::from_secs(5);

thread_local! {
    /// One 64 KiB reply buffer per worker thread: flows read a reply and send it on without
    /// awaiting in between, so a per-flow buffer is not needed.
    static REPLY_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; sockopt::MAX_DATAGRAM]);
}

type Key = (ClientAddr, OrigDst);

/// A flow in the receive loop's table: its queue (closed once the flow's task has ended) and
/// its route (the label on its drops).
struct Entry {
    tx: mpsc::Sender<Vec<u8>>,
    route: Arc<str>,
}

/// Flows by (client, original destination), evicted per source ([`source_key`]).
type Table = FlowTable<Key, IpAddr, Entry>;

/// The route label of datagrams dropped before they have a flow or a destination.
const UNKNOWN_ROUTE: &str = "unknown";

/// Datagrams read in one go before the new flows among them are started.
const BATCH: usize = 256;
/// New flows one source may start per batch while the loop is behind (a full batch read
/// without emptying the socket).
const FAIR_SHARE: usize = 2;

/// The receive loop of one UDP listener. Per batch of up to [`BATCH`] datagrams: receive each
/// with its original destination, now and then forget finished flows, drop what cannot be
/// relayed or is refused (`admission`), hand it to its flow's queue, or set it aside; then
/// start the new flows set aside.
///
/// Fairness: starting a flow costs far more than relaying a datagram of an existing one (a
/// conntrack lookup, sockets, a task), and a datagram the loop is too slow to read is dropped
/// by the kernel whoever sent it. So while the loop is behind (a batch did not empty the
/// socket) a source starts at most [`FAIR_SHARE`] new flows per batch: one source's flood of
/// new flows cannot keep the loop from reading everyone else's datagrams.
pub(super) async fn recv_loop(dp: &Dataplane, sock: UdpSocket) {
    let mut rl = RecvLoop::new(dp);
    loop {
        let mut read = 0;
        let mut next = rl.receive(&sock).await;
        while let Some(r) = next {
            read += 1;
            rl.prune();
            rl.take(&r);
            if read >= BATCH {
                break;
            }
            next = rl.try_receive(&sock);
        }
        rl.start_pending(read >= BATCH);
        // Let the flows on this worker relay their replies between batches: under a flood the
        // socket is always readable, and the loop would otherwise keep the thread.
        tokio::task::yield_now().await;
    }
}

/// The state of one listener's receive loop.
struct RecvLoop<'a> {
    dp: &'a Dataplane,
    buf: Vec<u8>,
    /// Each flow's queue and route; a closed queue means the flow's task has ended.
    flows: Table,
    replies: HashMap<OrigDst, Weak<UdpSocket>>,
    pruned: Instant,
    /// This loop's own ctnetlink socket: the pre-DNAT destination of each new flow.
    conntrack: Option<Conntrack>,
    /// Datagrams of this batch that would start a new flow.
    pending: Vec<(Key, Vec<u8>)>,
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
            pending: Vec::new(),
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

    /// The next datagram if one is queued already (the rest of a batch); `None` when the
    /// socket is empty or the receive failed.
    fn try_receive(&mut self, sock: &UdpSocket) -> Option<sockopt::Received> {
        let buf = &mut self.buf;
        match sock.try_io(Interest::READABLE, || {
            sockopt::recv_with_orig_dst(sock.as_fd(), buf)
        }) {
            Ok(r) => Some(r),
            Err(e) => {
                if e.kind() != std::io::ErrorKind::WouldBlock {
                    debug!(error = %e, "udp receive failed");
                }
                None
            }
        }
    }

    /// One datagram: relayed to its flow, refused, or set aside to start a flow.
    fn take(&mut self, r: &sockopt::Received) {
        let Some((key, data)) = self.relayable(r) else {
            return;
        };
        let Some(data) = self.deliver(&key, data) else {
            return;
        };
        let rt = self.dp.current();
        let limited = limited_source(&rt.limits, key.0 .0.ip());
        if let Err(reason) = admit_new(&self.dp.admission, &rt, key, limited) {
            // Classified only for the label: refusals cost no conntrack lookup and no socket.
            let decision = decide_flow(&rt, Proto::Udp, key.0, key.1);
            self.refused(reason, &decision.route, &key);
            return;
        }
        self.pending.push((key, data));
    }

    /// Starts the flows set aside by `take`; `behind`: at most [`FAIR_SHARE`] per source.
    fn start_pending(&mut self, behind: bool) {
        let mut started: HashMap<IpAddr, usize> = HashMap::new();
        for (key, data) in std::mem::take(&mut self.pending) {
            // A second datagram of a flow started earlier in this batch.
            let Some(data) = self.deliver(&key, data) else {
                continue;
            };
            let n = started.entry(source_key(key.0 .0.ip())).or_insert(0);
            if behind && *n >= FAIR_SHARE {
                let decision = decide_flow(&self.dp.current(), Proto::Udp, key.0, key.1);
                self.refused(Refusal::FairShare, &decision.route, &key);
                continue;
            }
            *n += 1;
            self.start_flow(key, data);
        }
    }

    /// Counts and logs (rate-limited) a dropped datagram of `key`.
    fn refused(&self, reason: Refusal, route: &str, key: &Key) {
        let dp = self.dp;
        dp.admission
            .refused(&dp.metrics, reason, route, "udp", key.0 .0, key.1 .0);
    }

    /// Every [`PRUNE_EVERY`]: forget finished flows and unused reply sockets.
    fn prune(&mut self) {
        if self.pruned.elapsed() > PRUNE_EVERY {
            self.flows.retain(|e| !e.tx.is_closed());
            self.replies.retain(|_, w| w.strong_count() > 0);
            self.pruned = Instant::now();
        }
    }

    /// The flow key and a copy of the datagram, unless it was truncated or came without its
    /// original destination (dropped and counted).
    fn relayable(&self, r: &sockopt::Received) -> Option<(Key, Vec<u8>)> {
        let orig = match (r.truncated, r.orig_dst) {
            (false, Some(orig)) => orig,
            (truncated, dst) => {
                let reason = if truncated {
                    Refusal::Truncated
                } else {
                    Refusal::NoOrigDst
                };
                let dst = dst.unwrap_or(r.src);
                self.refused(reason, UNKNOWN_ROUTE, &(ClientAddr(r.src), OrigDst(dst)));
                return None;
            }
        };
        let key = (ClientAddr(r.src), OrigDst(orig));
        Some((key, self.buf[..r.len].to_vec()))
    }

    /// Queues the datagram on its flow. Gives it back when there is no live flow for it.
    fn deliver(&mut self, key: &Key, data: Vec<u8>) -> Option<Vec<u8>> {
        let Some(e) = self.flows.get_mut(key, Instant::now()) else {
            return Some(data);
        };
        match e.tx.try_send(data) {
            Ok(()) => None,
            Err(mpsc::error::TrySendError::Full(_)) => {
                let route = Arc::clone(&e.route);
                self.refused(Refusal::QueueFull, &route, key);
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
        let limited = limited_source(&rt.limits, key.0 .0.ip()).is_some();
        self.make_room(&rt.limits, key.0, limited);
        let asked = self.asked_destination(&key);
        let decision = decide_flow(&rt, Proto::Udp, key.0, asked);
        if decision.target != key.1 .0 && is_own_listener(decision.target, rt.listener_port) {
            self.refused(Refusal::SelfLoop, &decision.route, &key);
            return;
        }
        let Some(reply) = self.reply_socket(&key, &decision.route, rt.kernel.own_mark.0) else {
            return;
        };
        let up = match udp_upstream(decision.target, decision.mark) {
            Ok(u) => u,
            Err(e) => {
                count_upstream_error(m, &decision.route, &e);
                debug!(client = %key.0, orig_dst = %key.1, upstream = %decision.target, error = %e,
                    "udp upstream socket failed");
                self.refused(Refusal::Upstream, &decision.route, &key);
                return;
            }
        };
        let (tx, rx) = mpsc::channel(rt.limits.udp_queue);
        tx.try_send(data).expect("a new queue has room");
        let route = Arc::from(decision.route.as_str());
        self.flows.insert(
            key,
            source_key(key.0 .0.ip()),
            Entry { tx, route },
            Instant::now(),
        );
        let f = Flow {
            client: key.0,
            orig: asked,
            decision,
            up,
            reply,
            idle: rt.limits.udp_idle_timeout,
            metrics: Arc::clone(&dp.metrics),
            admission: Arc::clone(&dp.admission),
            _guard: dp.flows.enter(),
        };
        spawn_flow(f, rx, dp.flows.cancelled());
    }

    /// Room for one more flow of `client`: a limited source at
    /// `limits.max_udp_flows_per_source` gives up its own least recently used flow; a full
    /// table gives up one of the source that holds the most (`flow_table`). Finished flows go
    /// first; dropping an evicted flow's sender ends that flow's task.
    fn make_room(&mut self, limits: &Limits, client: ClientAddr, limited: bool) {
        let source = source_key(client.0.ip());
        let per_source = limits.max_udp_flows_per_source;
        let mut evicted = 0;
        while limited && per_source > 0 && self.flows.source_len(&source) >= per_source {
            match self.flows.make_room_from(source, |e| e.tx.is_closed()) {
                Room::Freed => {}
                Room::Evicted => evicted += 1,
                Room::Empty => break,
            }
        }
        while self.flows.len() >= limits.max_udp_flows {
            match self.flows.make_room(|e| e.tx.is_closed()) {
                Room::Freed => {}
                Room::Evicted => evicted += 1,
                Room::Empty => break,
            }
        }
        self.dp.metrics.udp_evictions_total.inc_by(evicted);
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

    /// The transparent socket bound to `key.1` that replies leave from, shared by every flow
    /// to it; `None` (dropped and counted under `route`) when it cannot be bound.
    fn reply_socket(&mut self, key: &Key, route: &str, own_mark: u32) -> Option<Arc<UdpSocket>> {
        let orig = key.1;
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
                // EACCES for a port below 1024: etp lacks CAP_NET_BIND_SERVICE.
                warn!(orig_dst = %orig, error = %e,
                    "cannot bind a transparent reply socket to the original destination \
                     (ports below 1024 need CAP_NET_BIND_SERVICE)");
                self.refused(Refusal::ReplySocket, route, key);
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

/// Whether a datagram that would start a new flow may: never to etp's own listener (see
/// `admission`), and within its source's new-flow rate.
fn admit_new(
    ad: &Admission,
    rt: &FlowPolicy,
    key: Key,
    limited: Option<IpAddr>,
) -> Result<(), Refusal> {
    if is_own_listener(key.1 .0, rt.listener_port) {
        return Err(Refusal::SelfLoop);
    }
    match limited {
        Some(s) => ad.new_flow_rate(s, rt.limits.new_flows_per_source_per_second),
        None => Ok(()),
    }
}

struct Flow {
    client: ClientAddr,
    orig: OrigDst,
    decision: FlowDecision,
    up: UdpSocket,
    reply: Arc<UdpSocket>,
    idle: Duration,
    metrics: Arc<Metrics>,
    admission: Arc<Admission>,
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
                    self.admission.refused(
                        &self.metrics,
                        Refusal::Send,
                        &self.decision.route,
                        "udp",
                        self.client.0,
                        self.orig.0,
                    );
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
            admission: Arc::default(),
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
