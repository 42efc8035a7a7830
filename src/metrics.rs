//! Prometheus metrics (`prometheus-client`): the data path's flow, byte and error counters, and
//! the daemon's reload/drift/generation metrics, in one registry encoded as text for `/metrics`.
//!
//! Counters are registered without the `_total` suffix: the text encoder appends it.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// `{route, action, proto}` on flow counts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FlowLabels {
    pub route: String,
    pub action: String,
    pub proto: String,
}

/// Which way bytes went.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    ClientToUpstream,
    UpstreamToClient,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByteLabels {
    pub route: String,
    /// [`Direction::as_str`]
    pub direction: &'static str,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::ClientToUpstream => "client_to_upstream",
            Direction::UpstreamToClient => "upstream_to_client",
        }
    }
}

/// Why an upstream connection failed.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ErrorKind {
    Refused,
    Timeout,
    Unreachable,
    Other,
}

impl ErrorKind {
    /// Sorts a connect error into the kinds operators alert on.
    pub fn of(e: &std::io::Error) -> ErrorKind {
        use std::io::ErrorKind as K;
        match e.kind() {
            K::ConnectionRefused => ErrorKind::Refused,
            K::TimedOut => ErrorKind::Timeout,
            K::HostUnreachable | K::NetworkUnreachable => ErrorKind::Unreachable,
            _ => match e.raw_os_error() {
                Some(libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EHOSTDOWN) => {
                    ErrorKind::Unreachable
                }
                _ => ErrorKind::Other,
            },
        }
    }
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Refused => "refused",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Unreachable => "unreachable",
            ErrorKind::Other => "other",
        }
    }
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 4] = [
        ErrorKind::Refused,
        ErrorKind::Timeout,
        ErrorKind::Unreachable,
        ErrorKind::Other,
    ];
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub route: String,
    /// [`ErrorKind::as_str`]
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// `{route, proto, reason}` on refusals: a new flow or a datagram etp would not relay.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub route: String,
    pub proto: &'static str,
    /// `dataplane::admission::Refusal::as_str`
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    pub version: String,
}

/// Why a UDP datagram was dropped (`etp_udp_dropped_total{reason}`).
pub const UDP_DROP_REASONS: [&str; 9] = [
    "truncated",
    "no_orig_dst",
    "queue_full",
    "reply_socket",
    "upstream",
    "send",
    "self_loop",
    "source_rate",
    "fair_share",
];

/// Every metric etp exports. Cheap to share (`Arc<Metrics>`); every handle is atomic.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub flows_total: Family<FlowLabels, Counter>,
    pub flows_active: Family<FlowLabels, Gauge>,
    pub bytes_total: Family<ByteLabels, Counter>,
    pub upstream_errors_total: Family<ErrorLabels, Counter>,
    /// Reasons: [`UDP_DROP_REASONS`].
    pub udp_dropped_total: Family<ReasonLabels, Counter>,
    pub udp_evictions_total: Counter,
    /// Every refusal and drop of a new flow or datagram, by route, protocol and reason.
    pub refused_total: Family<RefusalLabels, Counter>,
    pub accept_errors_total: Counter,
    /// The daemon's: result = "ok" | "error".
    pub reloads_total: Family<ResultLabels, Counter>,
    pub drift_repairs_total: Counter,
    pub ruleset_generation: Gauge,
    /// Packets the ruleset's guard and per-source limit rules refused, read from their
    /// counters at every resync; the counters restart when the table is replaced.
    pub kernel_refused: Family<RefusalLabels, Gauge>,
    /// Connections the ruleset handed to Linkerd in the kernel (`handoff = "kernel"`), by
    /// route: the packets its labelling rules counted (one per connection), read at every
    /// resync; they restart when the table is replaced.
    pub kernel_handoffs: Family<RouteLabels, Gauge>,
    pub build_info: Family<VersionLabels, Gauge>,
    /// 1 while the Linkerd proxy passes etp's health check.
    pub proxy_ready: Gauge,
    /// Switches of the `linkerd` routes, by the state switched to ("ready" | "unavailable").
    pub proxy_switches_total: Family<StateLabels, Counter>,
    /// conntrack events of kernel hand-offs lost (the socket's buffer overran).
    pub conntrack_events_lost_total: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("etp");
        let m = Metrics {
            registry: Registry::default(),
            flows_total: Family::default(),
            flows_active: Family::default(),
            bytes_total: Family::default(),
            upstream_errors_total: Family::default(),
            udp_dropped_total: Family::default(),
            udp_evictions_total: Counter::default(),
            refused_total: Family::default(),
            accept_errors_total: Counter::default(),
            reloads_total: Family::default(),
            drift_repairs_total: Counter::default(),
            ruleset_generation: Gauge::default(),
            kernel_refused: Family::default(),
            kernel_handoffs: Family::default(),
            build_info: Family::default(),
            proxy_ready: Gauge::default(),
            proxy_switches_total: Family::default(),
            conntrack_events_lost_total: Counter::default(),
        };
        // Metric handles are Arc-backed: the registry holds clones of the same atomics.
        registry.register(
            "flows",
            "Flows accepted, by route, action and protocol",
            m.flows_total.clone(),
        );
        registry.register("flows_active", "Flows open now", m.flows_active.clone());
        registry.register(
            "bytes",
            "Bytes relayed, by route and direction",
            m.bytes_total.clone(),
        );
        registry.register(
            "upstream_errors",
            "Upstream connections that failed, by route and kind",
            m.upstream_errors_total.clone(),
        );
        registry.register(
            "udp_dropped",
            "UDP datagrams dropped, by reason",
            m.udp_dropped_total.clone(),
        );
        registry.register(
            "udp_evictions",
            "UDP flows evicted to make room under limits.max_udp_flows",
            m.udp_evictions_total.clone(),
        );
        registry.register(
            "refused",
            "New flows refused (TCP reset) and datagrams dropped, by route, protocol and reason",
            m.refused_total.clone(),
        );
        registry.register(
            "accept_errors",
            "Errors accepting TCP connections (fd exhaustion included)",
            m.accept_errors_total.clone(),
        );
        registry.register(
            "reloads",
            "Config reloads, by result",
            m.reloads_total.clone(),
        );
        registry.register(
            "drift_repairs",
            "Times the kernel state had drifted and was re-applied",
            m.drift_repairs_total.clone(),
        );
        registry.register(
            "ruleset_generation",
            "nftables generation id of etp's last applied ruleset",
            m.ruleset_generation.clone(),
        );
        registry.register(
            "kernel_refused_packets",
            "Packets refused by etp's ruleset (guard, per-source limits) since it was last \
             replaced, by route, protocol and reason; read at every resync",
            m.kernel_refused.clone(),
        );
        registry.register(
            "kernel_handoffs",
            "Connections etp's ruleset handed to the Linkerd proxy in the kernel since it was \
             last replaced, by route; read at every resync",
            m.kernel_handoffs.clone(),
        );
        registry.register("build_info", "etp's version", m.build_info.clone());
        registry.register(
            "proxy_ready",
            "1 while the Linkerd proxy passes etp's health check",
            m.proxy_ready.clone(),
        );
        registry.register(
            "proxy_switches",
            "Switches of the linkerd routes on the proxy's health, by new state",
            m.proxy_switches_total.clone(),
        );
        registry.register(
            "conntrack_events_lost",
            "Overruns of the conntrack event socket (kernel hand-off flows not logged)",
            m.conntrack_events_lost_total.clone(),
        );
        m.build_info
            .get_or_create(&VersionLabels {
                version: env!("CARGO_PKG_VERSION").to_string(),
            })
            .set(1);
        Metrics { registry, ..m }
    }

    /// The counters `etp status` lists, read through the metric handles: per route (grouping
    /// `flows` by route, in order) the flows, open flows, bytes and upstream errors, then the
    /// totals of the rest. A series that does not exist yet reads 0 and is not created.
    pub fn status_counters(&self, flows: &[FlowLabels]) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let mut routes: Vec<&str> = Vec::new();
        for l in flows {
            if !routes.contains(&l.route.as_str()) {
                routes.push(&l.route);
            }
        }
        for route in routes {
            let mine = flows.iter().filter(|l| l.route == route);
            let total: u64 = mine
                .clone()
                .map(|l| self.flows_total.get(l).map_or(0, |c| c.get()))
                .sum();
            let open: i64 = mine
                .map(|l| self.flows_active.get(l).map_or(0, |g| g.get()))
                .sum();
            let bytes = |d: Direction| {
                self.bytes_total
                    .get(&ByteLabels {
                        route: route.to_string(),
                        direction: d.as_str(),
                    })
                    .map_or(0, |c| c.get())
            };
            let errors: u64 = ErrorKind::ALL
                .iter()
                .map(|k| {
                    self.upstream_errors_total
                        .get(&ErrorLabels {
                            route: route.to_string(),
                            kind: k.as_str(),
                        })
                        .map_or(0, |c| c.get())
                })
                .sum();
            let _ = writeln!(
                s,
                "  route {route}: {total} flows ({open} open), {} bytes to upstream, {} to clients, {errors} upstream errors",
                bytes(Direction::ClientToUpstream),
                bytes(Direction::UpstreamToClient),
            );
        }
        let dropped: u64 = UDP_DROP_REASONS
            .iter()
            .map(|&reason| {
                self.udp_dropped_total
                    .get(&ReasonLabels { reason })
                    .map_or(0, |c| c.get())
            })
            .sum();
        let reloads = |result| {
            self.reloads_total
                .get(&ResultLabels { result })
                .map_or(0, |c| c.get())
        };
        let _ = writeln!(s, "  udp datagrams dropped: {dropped}");
        let _ = writeln!(s, "  udp flows evicted: {}", self.udp_evictions_total.get());
        let _ = writeln!(s, "  accept errors: {}", self.accept_errors_total.get());
        let _ = writeln!(
            s,
            "  reloads: {} ok, {} failed",
            reloads("ok"),
            reloads("error")
        );
        let _ = writeln!(s, "  drift repairs: {}", self.drift_repairs_total.get());
        s
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_labels_in_the_text_format() {
        let m = Metrics::new();
        let fl = FlowLabels {
            route: "svc".into(),
            action: "linkerd".into(),
            proto: "tcp".into(),
        };
        m.flows_total.get_or_create(&fl).inc();
        m.bytes_total
            .get_or_create(&ByteLabels {
                route: "svc".into(),
                direction: Direction::UpstreamToClient.as_str(),
            })
            .inc_by(42);
        m.upstream_errors_total
            .get_or_create(&ErrorLabels {
                route: "svc".into(),
                kind: ErrorKind::Refused.as_str(),
            })
            .inc();
        m.reloads_total
            .get_or_create(&ResultLabels { result: "ok" })
            .inc();
        let t = m.encode();
        for want in [
            "etp_flows_total{route=\"svc\",action=\"linkerd\",proto=\"tcp\"} 1",
            "etp_bytes_total{route=\"svc\",direction=\"upstream_to_client\"} 42",
            "etp_upstream_errors_total{route=\"svc\",kind=\"refused\"} 1",
            "etp_reloads_total{result=\"ok\"} 1",
            "etp_udp_evictions_total 0",
            "etp_ruleset_generation 0",
            "etp_build_info{version=\"",
        ] {
            assert!(t.contains(want), "missing {want:?} in:\n{t}");
        }
    }

    #[test]
    fn status_counters_read_without_creating_series() {
        let m = Metrics::new();
        let l = |proto: &str| FlowLabels {
            route: "svc".into(),
            action: "direct".into(),
            proto: proto.into(),
        };
        m.flows_total.get_or_create(&l("tcp")).inc_by(2);
        m.flows_total.get_or_create(&l("udp")).inc();
        m.flows_active.get_or_create(&l("tcp")).inc();
        m.udp_dropped_total
            .get_or_create(&ReasonLabels { reason: "send" })
            .inc();
        let s = m.status_counters(&[l("tcp"), l("udp")]);
        assert!(
            s.contains(
                "route svc: 3 flows (1 open), 0 bytes to upstream, 0 to clients, 0 upstream errors"
            ),
            "{s}"
        );
        assert!(s.contains("udp datagrams dropped: 1"), "{s}");
        // Nothing was created by reading: no byte or error series appear in /metrics.
        let t = m.encode();
        assert!(!t.contains("etp_bytes_total{"), "{t}");
        assert!(!t.contains("etp_upstream_errors_total{"), "{t}");
    }

    #[test]
    fn connect_errors_are_sorted() {
        let e = |n| std::io::Error::from_raw_os_error(n);
        assert_eq!(ErrorKind::of(&e(libc::ECONNREFUSED)), ErrorKind::Refused);
        assert_eq!(ErrorKind::of(&e(libc::ETIMEDOUT)), ErrorKind::Timeout);
        assert_eq!(
            ErrorKind::of(&e(libc::EHOSTUNREACH)),
            ErrorKind::Unreachable
        );
        assert_eq!(ErrorKind::of(&e(libc::ENETUNREACH)), ErrorKind::Unreachable);
        assert_eq!(ErrorKind::of(&e(libc::EACCES)), ErrorKind::Other);
    }
}
