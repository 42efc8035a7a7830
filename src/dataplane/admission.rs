//! Which new flows etp takes on: the second line behind the kernel's rules.
//!
//! - **Self-loop.** etp's listener is bound to the wildcard address, so a connection or datagram
//!   sent straight to one of the node's own addresses on the listener port reaches etp without
//!   any tproxy rule. Its original destination is then etp itself: relaying it "direct" dials
//!   etp again, which relays again (thousands of flows a second from one connection), and a UDP
//!   reply socket bound to that local address can win the kernel's socket lookup for tproxied
//!   datagrams and swallow them. Such flows are refused before anything is opened for them.
//! - **Per-source limits** (`[limits]`, 0 = off, `trusted_sources` exempt; IPv6 sources count
//!   per /64, what one host owns): concurrent TCP flows per source and new flows per second per
//!   source (a token bucket, burst = rate). UDP flows per source are bounded by the flow table
//!   (`flow_table`): a source at its limit recycles its own oldest flow.
//! - **Global limit**: at `limits.max_tcp_flows` a new connection is reset at once (a definite
//!   answer) instead of waiting in the kernel's backlog.
//!
//! Every refusal is counted (`etp_refused_total{route, proto, reason}`) and logged, at most one
//! line per reason per second with the number of lines suppressed since, so that a flood
//! cannot flood the log as well.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::warn;

use crate::config::Limits;
use crate::metrics::{Metrics, ReasonLabels, RefusalLabels};

/// Why etp refused a new flow or dropped a datagram (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Addressed to etp's own listener (a local address on the listener port), or routed to it.
    SelfLoop,
    /// etp is at `limits.max_tcp_flows`.
    GlobalFlows,
    /// The source is at `limits.max_tcp_flows_per_source`.
    SourceFlows,
    /// The source exceeded `limits.new_flows_per_source_per_second`.
    SourceRate,
    /// A UDP flow's queue (`limits.udp_queue`) is full.
    QueueFull,
    /// The UDP receive loop is behind and the source already started its share of new flows
    /// in this batch.
    FairShare,
    /// A UDP datagram longer than the receive buffer.
    Truncated,
    /// A UDP datagram without its original destination.
    NoOrigDst,
    /// The transparent reply socket could not be bound.
    ReplySocket,
    /// The upstream socket could not be opened.
    Upstream,
    /// A reply could not be sent to the client at once.
    Send,
}

const REASONS: usize = 11;

impl Refusal {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Refusal::SelfLoop => "self_loop",
            Refusal::GlobalFlows => "global_flows",
            Refusal::SourceFlows => "source_flows",
            Refusal::SourceRate => "source_rate",
            Refusal::QueueFull => "queue_full",
            Refusal::FairShare => "fair_share",
            Refusal::Truncated => "truncated",
            Refusal::NoOrigDst => "no_orig_dst",
            Refusal::ReplySocket => "reply_socket",
            Refusal::Upstream => "upstream",
            Refusal::Send => "send",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The address per-source limits count by: an IPv4 address, or the /64 of an IPv6 one.
pub(crate) fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

/// Whether `dst` is etp's own listener: the listener port on a loopback, unspecified,
/// multicast, broadcast or IPv6 link-local address, or on an address of this node. Whether an
/// address is the node's is asked of the kernel by binding a plain UDP socket to it (port 0):
/// only local (and broadcast) addresses can be bound without `IP_TRANSPARENT`/`IP_FREEBIND`.
/// The bind runs only for flows to the listener port, which legitimate intercepted traffic
/// rarely uses. A link-local address cannot be bound without its interface, which the flow
/// does not name, so every link-local address on the listener port counts as etp's own. (With
/// `net.ipv4.ip_nonlocal_bind = 1` every address binds, and flows to remote addresses on the
/// listener port are refused too: the safe side, as for link-local.)
pub(crate) fn is_own_listener(dst: SocketAddr, listener_port: u16) -> bool {
    if dst.port() != listener_port {
        return false;
    }
    let ip = dst.ip().to_canonical();
    let special = match ip {
        IpAddr::V4(v4) => v4.is_broadcast(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    };
    special
        || ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// A source's token bucket for new flows.
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// New flows per second per source, burst of one second's worth.
#[derive(Default)]
struct Rate {
    buckets: HashMap<IpAddr, Bucket>,
    pruned: Option<Instant>,
}

/// Buckets kept before pruning full ones (a bucket refills within a second).
const RATE_PRUNE_ABOVE: usize = 1024;

impl Rate {
    fn allow(&mut self, source: IpAddr, rate: u32, now: Instant) -> bool {
        let per_sec = f64::from(rate);
        if self.buckets.len() > RATE_PRUNE_ABOVE
            && self
                .pruned
                .is_none_or(|p| now.duration_since(p) >= Duration::from_secs(1))
        {
            // A bucket untouched for a second is full again: forgetting it changes nothing.
            self.buckets
                .retain(|_, b| now.duration_since(b.at) < Duration::from_secs(1));
            self.pruned = Some(now);
        }
        let b = self.buckets.entry(source).or_insert(Bucket {
            tokens: per_sec,
            at: now,
        });
        let refill = now.duration_since(b.at).as_secs_f64() * per_sec;
        b.tokens = (b.tokens + refill).min(per_sec);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// At most one log line per reason per second; counts what it held back.
#[derive(Default)]
struct LogLimit {
    last: [Option<Instant>; REASONS],
    suppressed: [u64; REASONS],
}

impl LogLimit {
    /// `Some(suppressed since the last line)` when a line may be written now.
    fn admit(&mut self, r: Refusal, now: Instant) -> Option<u64> {
        let i = r.index();
        match self.last[i] {
            Some(t) if now.duration_since(t) < Duration::from_secs(1) => {
                self.suppressed[i] += 1;
                None
            }
            _ => {
                self.last[i] = Some(now);
                Some(std::mem::take(&mut self.suppressed[i]))
            }
        }
    }
}

/// Shared by the accept loops, the UDP receive loops and the flows.
#[derive(Default)]
pub(crate) struct Admission {
    tcp_per_source: Mutex<HashMap<IpAddr, usize>>,
    rate: Mutex<Rate>,
    log: Mutex<LogLimit>,
}

/// One of a source's concurrent TCP flows; given back on drop.
pub(crate) struct SourceSlot {
    admission: Arc<Admission>,
    key: IpAddr,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut m = lock(&self.admission.tcp_per_source);
        if let Some(n) = m.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

/// A poisoned lock only means another flow panicked mid-update of plain counters.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The source whose per-source limits apply, or `None` when they do not (trusted, or all off).
pub(crate) fn limited_source(limits: &Limits, client: IpAddr) -> Option<IpAddr> {
    let any = limits.max_tcp_flows_per_source > 0
        || limits.max_udp_flows_per_source > 0
        || limits.new_flows_per_source_per_second > 0;
    let ip = client.to_canonical();
    (any && !limits.trusted_sources.iter().any(|n| n.contains(ip))).then(|| source_key(ip))
}

impl Admission {
    /// Takes one of `source`'s concurrent TCP flows; refused at `limit` (0 = no limit: `None`).
    pub(crate) fn tcp_source_slot(
        self: &Arc<Self>,
        source: IpAddr,
        limit: usize,
    ) -> Result<Option<SourceSlot>, Refusal> {
        if limit == 0 {
            return Ok(None);
        }
        let mut m = lock(&self.tcp_per_source);
        let n = m.entry(source).or_insert(0);
        if *n >= limit {
            return Err(Refusal::SourceFlows);
        }
        *n += 1;
        Ok(Some(SourceSlot {
            admission: Arc::clone(self),
            key: source,
        }))
    }

    /// Spends one of `source`'s new-flow tokens (`rate` 0 = no limit).
    pub(crate) fn new_flow_rate(&self, source: IpAddr, rate: u32) -> Result<(), Refusal> {
        if rate == 0 || lock(&self.rate).allow(source, rate, Instant::now()) {
            Ok(())
        } else {
            Err(Refusal::SourceRate)
        }
    }

    /// Counts a refusal (and, for UDP, the datagram drop) and logs it, rate-limited.
    pub(crate) fn refused(
        &self,
        m: &Metrics,
        reason: Refusal,
        route: &str,
        proto: &'static str,
        client: SocketAddr,
        orig_dst: SocketAddr,
    ) {
        m.refused_total
            .get_or_create(&RefusalLabels {
                route: route.to_string(),
                proto,
                reason: reason.as_str(),
            })
            .inc();
        if proto == "udp" {
            debug_assert!(
                crate::metrics::UDP_DROP_REASONS.contains(&reason.as_str()),
                "{reason:?}"
            );
            m.udp_dropped_total
                .get_or_create(&ReasonLabels {
                    reason: reason.as_str(),
                })
                .inc();
        }
        let admitted = lock(&self.log).admit(reason, Instant::now());
        if let Some(suppressed) = admitted {
            warn!(reason = %reason.as_str(), route, proto, %client, %orig_dst, suppressed,
                "refused (at most one line per reason per second; `suppressed` were not logged)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn ipv6_sources_count_per_64_and_v4_mapped_as_v4() {
        let a: IpAddr = "fd00:1:2:3:aaaa::1".parse().unwrap();
        let b: IpAddr = "fd00:1:2:3:bbbb::2".parse().unwrap();
        let c: IpAddr = "fd00:1:2:4::1".parse().unwrap();
        assert_eq!(source_key(a), source_key(b));
        assert_ne!(source_key(a), source_key(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(source_key(mapped), IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)));
    }

    #[test]
    fn the_own_listener_is_recognised_only_on_the_listener_port() {
        let on = |s: &str| is_own_listener(s.parse().unwrap(), 15001);
        assert!(on("127.0.0.1:15001"));
        assert!(on("[::1]:15001"));
        assert!(on("0.0.0.0:15001"));
        assert!(on("255.255.255.255:15001"));
        assert!(on("224.0.0.251:15001"));
        assert!(on("[ff02::fb]:15001"));
        assert!(on("[::ffff:127.0.0.1]:15001"));
        assert!(
            on("[fe80::1]:15001"),
            "link-local: its interface is unknown"
        );
        assert!(!on("127.0.0.1:53"), "another port is not the listener");
        // TEST-NET-3 is never a local address.
        assert!(!on("203.0.113.9:15001"), "a remote address is not etp");
    }

    #[test]
    fn the_rate_allows_a_burst_then_refills() {
        let t0 = Instant::now();
        let mut r = Rate::default();
        let s = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let other = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));
        let allowed = (0..15).filter(|_| r.allow(s, 10, t0)).count();
        assert_eq!(allowed, 10, "a burst of one second's worth");
        assert!(r.allow(other, 10, t0), "another source has its own bucket");
        assert!(!r.allow(s, 10, t0 + Duration::from_millis(50)));
        assert!(r.allow(s, 10, t0 + Duration::from_millis(150)));
        // Buckets idle for a second are forgotten once there are many.
        for i in 0..2000u32 {
            r.allow(IpAddr::V4(Ipv4Addr::from(i)), 10, t0);
        }
        r.allow(s, 10, t0 + Duration::from_secs(2));
        assert_eq!(r.buckets.len(), 1);
    }

    #[test]
    fn tcp_source_slots_are_bounded_and_given_back() {
        let a = Arc::new(Admission::default());
        let s = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let one = a.tcp_source_slot(s, 2).unwrap();
        let two = a.tcp_source_slot(s, 2).unwrap();
        assert_eq!(a.tcp_source_slot(s, 2).err(), Some(Refusal::SourceFlows));
        drop(one);
        let three = a.tcp_source_slot(s, 2).unwrap();
        drop((two, three));
        assert!(lock(&a.tcp_per_source).is_empty(), "nothing left behind");
        assert!(a.tcp_source_slot(s, 0).unwrap().is_none(), "0 = off");
    }

    #[test]
    fn the_log_takes_one_line_per_reason_per_second() {
        let t0 = Instant::now();
        let mut l = LogLimit::default();
        assert_eq!(l.admit(Refusal::SelfLoop, t0), Some(0));
        for i in 1..=5 {
            assert_eq!(
                l.admit(Refusal::SelfLoop, t0 + Duration::from_millis(i)),
                None
            );
        }
        assert_eq!(
            l.admit(Refusal::SourceRate, t0),
            Some(0),
            "reasons are separate"
        );
        assert_eq!(
            l.admit(Refusal::SelfLoop, t0 + Duration::from_secs(1)),
            Some(5)
        );
    }

    #[test]
    fn every_udp_refusal_is_a_known_drop_reason() {
        use Refusal::*;
        let udp = [
            SelfLoop,
            SourceRate,
            QueueFull,
            FairShare,
            Truncated,
            NoOrigDst,
            ReplySocket,
            Upstream,
            Send,
        ];
        assert_eq!(
            udp.len() + 2,
            REASONS,
            "all but the TCP-only GlobalFlows, SourceFlows"
        );
        for r in udp {
            assert!(
                crate::metrics::UDP_DROP_REASONS.contains(&r.as_str()),
                "{r:?}"
            );
        }
    }

    #[test]
    fn trusted_sources_and_all_off_are_not_limited() {
        let mut l = crate::config::Config::embedded().limits;
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(limited_source(&l, ip), Some(ip));
        l.trusted_sources = vec!["10.1.0.0/16".parse().unwrap()];
        assert_eq!(limited_source(&l, ip), None);
        l.trusted_sources.clear();
        l.max_tcp_flows_per_source = 0;
        l.max_udp_flows_per_source = 0;
        l.new_flows_per_source_per_second = 0;
        assert_eq!(limited_source(&l, ip), None);
    }
}
