//! (protocol, source, original destination) -> route, in the order the ruleset encodes.
//!
//! The planner builds its sets and rules from the same [`Classifier`] (`plan::plan` iterates
//! [`Classifier::selectors`]), so the kernel's match order and etp's can never disagree: bypass
//! first, then routes in config order, first match wins.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};

use crate::config::{Config, Route};
use crate::model::{v6_last, PortRange, Proto};

/// A sorted list of disjoint IPv4 networks (contained networks removed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct V4Set(pub Vec<Ipv4Network>);
/// A sorted list of disjoint IPv6 networks (contained networks removed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct V6Set(pub Vec<Ipv6Network>);
/// A sorted list of disjoint port ranges (overlaps merged, adjacent kept apart).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortSet(pub Vec<PortRange>);

impl V4Set {
    pub fn new(nets: impl IntoIterator<Item = Ipv4Network>) -> V4Set {
        let mut v: Vec<(u32, u32, Ipv4Network)> = nets
            .into_iter()
            .map(|n| (u32::from(n.network()), u32::from(n.broadcast()), n))
            .collect();
        V4Set(disjoint(&mut v))
    }

    pub fn contains(&self, a: Ipv4Addr) -> bool {
        let a = u32::from(a);
        let i = self.0.partition_point(|n| u32::from(n.network()) <= a);
        i > 0 && a <= u32::from(self.0[i - 1].broadcast())
    }
}

impl V6Set {
    pub fn new(nets: impl IntoIterator<Item = Ipv6Network>) -> V6Set {
        let mut v: Vec<(u128, u128, Ipv6Network)> = nets
            .into_iter()
            .map(|n| (u128::from(n.network()), u128::from(v6_last(&n)), n))
            .collect();
        V6Set(disjoint(&mut v))
    }

    pub fn contains(&self, a: Ipv6Addr) -> bool {
        let a = u128::from(a);
        let i = self.0.partition_point(|n| u128::from(n.network()) <= a);
        i > 0 && a <= u128::from(v6_last(&self.0[i - 1]))
    }
}

/// Sorts networks by (start, widest first) and drops every network inside an earlier one.
/// Two CIDRs are either nested or disjoint, so what remains is disjoint.
fn disjoint<K: Ord + Copy, N: Copy>(v: &mut [(K, K, N)]) -> Vec<N> {
    v.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    let mut out: Vec<N> = Vec::with_capacity(v.len());
    let mut last_end: Option<K> = None;
    for &(start, end, n) in v.iter() {
        if last_end.is_some_and(|e| start <= e) {
            continue;
        }
        out.push(n);
        last_end = Some(end);
    }
    out
}

impl PortSet {
    pub fn new(ranges: impl IntoIterator<Item = PortRange>) -> PortSet {
        let mut v: Vec<PortRange> = ranges.into_iter().collect();
        v.sort();
        let mut out: Vec<PortRange> = Vec::with_capacity(v.len());
        for r in v {
            match out.last_mut() {
                Some(last) if r.first <= last.last => last.last = last.last.max(r.last),
                _ => out.push(r),
            }
        }
        PortSet(out)
    }

    pub fn contains(&self, port: u16) -> bool {
        let i = self.0.partition_point(|r| r.first <= port);
        i > 0 && self.0[i - 1].contains(port)
    }
}

/// Address sets of one family pair.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddrSets {
    pub v4: V4Set,
    pub v6: V6Set,
}

impl AddrSets {
    pub fn new(nets: &[IpNetwork], ipv6: bool) -> AddrSets {
        AddrSets {
            v4: V4Set::new(nets.iter().filter_map(|n| match n {
                IpNetwork::V4(n) => Some(*n),
                IpNetwork::V6(_) => None,
            })),
            v6: V6Set::new(nets.iter().filter_map(|n| match n {
                IpNetwork::V6(n) if ipv6 => Some(*n),
                _ => None,
            })),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.v4.0.is_empty() && self.v6.0.is_empty()
    }

    pub fn contains(&self, a: IpAddr) -> bool {
        match a {
            IpAddr::V4(a) => self.v4.contains(a),
            IpAddr::V6(a) => self.v6.contains(a),
        }
    }
}

/// One route, normalised the way the ruleset holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Selector {
    /// Index into `Config::routes`.
    pub index: usize,
    pub route: Route,
    pub destinations: AddrSets,
    /// Empty means any source.
    pub sources: AddrSets,
    pub ports: PortSet,
}

impl Selector {
    fn matches(&self, proto: Proto, src: IpAddr, dst: SocketAddr) -> bool {
        self.route.protocols.contains(&proto)
            && self.destinations.contains(dst.ip())
            && self.ports.contains(dst.port())
            && (self.sources.is_empty() || self.sources.contains(src))
    }
}

/// What the classifier decided for one flow.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision<'a> {
    /// Bypass list: not etp's (the kernel never sends these; seen only on a race with a reload).
    Bypass,
    Route(&'a Selector),
    /// No route matches (a flow accepted under an older ruleset).
    NoRoute,
}

/// The bypass list and the routes in match order.
#[derive(Debug, Clone, PartialEq)]
pub struct Classifier {
    pub bypass_destinations: AddrSets,
    pub bypass_ports: PortSet,
    pub selectors: Vec<Selector>,
}

impl Classifier {
    pub fn new(cfg: &Config) -> Classifier {
        let ipv6 = cfg.listener.ipv6;
        Classifier {
            bypass_destinations: AddrSets::new(&cfg.bypass.destinations, ipv6),
            bypass_ports: PortSet::new(cfg.bypass.ports.iter().copied()),
            selectors: cfg
                .routes
                .iter()
                .enumerate()
                .map(|(index, r)| Selector {
                    index,
                    route: r.clone(),
                    destinations: AddrSets::new(&r.destinations, ipv6),
                    sources: AddrSets::new(&r.sources, ipv6),
                    ports: PortSet::new(r.ports.iter().copied()),
                })
                .collect(),
        }
    }

    /// Classifies a flow by its protocol, client address and original destination.
    /// v4-mapped IPv6 addresses are compared as IPv4.
    pub fn classify(&self, proto: Proto, src: IpAddr, dst: SocketAddr) -> Decision<'_> {
        let src = src.to_canonical();
        let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
        if self.bypass_destinations.contains(dst.ip()) || self.bypass_ports.contains(dst.port()) {
            return Decision::Bypass;
        }
        self.selectors
            .iter()
            .find(|s| s.matches(proto, src, dst))
            .map_or(Decision::NoRoute, Decision::Route)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pr(a: u16, b: u16) -> PortRange {
        PortRange { first: a, last: b }
    }

    #[test]
    fn cidrs_drop_contained_and_duplicates_keep_adjacent() {
        let s = V4Set::new(
            [
                "10.0.0.0/8",
                "10.1.0.0/16",
                "10.0.0.0/8",
                "11.0.0.0/8",
                "9.255.255.255/32",
            ]
            .iter()
            .map(|t| t.parse().unwrap()),
        );
        let got: Vec<String> = s.0.iter().map(|n| n.to_string()).collect();
        assert_eq!(got, ["9.255.255.255/32", "10.0.0.0/8", "11.0.0.0/8"]);
        assert!(s.contains("10.200.0.1".parse().unwrap()));
        assert!(s.contains("9.255.255.255".parse().unwrap()));
        assert!(!s.contains("12.0.0.0".parse().unwrap()));
        assert!(!s.contains("9.255.255.254".parse().unwrap()));
    }

    #[test]
    fn v6_contains_uses_last_address() {
        let s = V6Set::new(["fd00::/112", "::/0"].iter().map(|t| t.parse().unwrap()));
        assert_eq!(s.0.len(), 1, "::/0 contains fd00::/112");
        assert!(s.contains("2001:db8::1".parse().unwrap()));
        let s = V6Set::new(["fd00::/112".parse().unwrap()]);
        assert!(s.contains("fd00::ffff".parse().unwrap()));
        assert!(!s.contains("fd00::1:0".parse().unwrap()));
    }

    #[test]
    fn ports_merge_overlaps_not_adjacency() {
        let s = PortSet::new([
            pr(80, 90),
            pr(85, 100),
            pr(101, 101),
            pr(22, 22),
            pr(80, 80),
        ]);
        assert_eq!(s.0, vec![pr(22, 22), pr(80, 100), pr(101, 101)]);
        assert!(s.contains(100) && s.contains(101) && s.contains(22));
        assert!(!s.contains(21) && !s.contains(102));
    }

    #[test]
    fn first_match_wins_and_bypass_comes_first() {
        let cfg = Config::parse(
            r#"
[bypass]
destinations = ["10.96.0.1/32"]
ports = [22]
[[route]]
name = "a"
protocols = ["tcp"]
destinations = ["10.96.0.0/12"]
ports = [80]
action = "linkerd"
[[route]]
name = "b"
protocols = ["tcp", "udp"]
destinations = ["10.0.0.0/8", "fd00::/8"]
ports = ["1-65535"]
sources = ["192.168.0.0/16", "fd00::/8"]
action = "direct"
"#,
            "t.toml",
        )
        .unwrap();
        let c = Classifier::new(&cfg);
        let client: IpAddr = "192.168.1.2".parse().unwrap();
        let name = |d: Decision<'_>| match d {
            Decision::Route(s) => s.route.name.clone(),
            other => format!("{other:?}"),
        };
        assert_eq!(
            name(c.classify(Proto::Tcp, client, "10.96.0.5:80".parse().unwrap())),
            "a"
        );
        assert_eq!(
            name(c.classify(Proto::Udp, client, "10.96.0.5:80".parse().unwrap())),
            "b"
        );
        assert_eq!(
            name(c.classify(Proto::Tcp, client, "10.96.0.1:80".parse().unwrap())),
            "Bypass"
        );
        assert_eq!(
            name(c.classify(Proto::Tcp, client, "10.1.0.1:22".parse().unwrap())),
            "Bypass"
        );
        let other: IpAddr = "172.16.0.1".parse().unwrap();
        assert_eq!(
            name(c.classify(Proto::Tcp, other, "10.1.0.1:81".parse().unwrap())),
            "NoRoute"
        );
        // v4-mapped addresses (an IPv6 listener accepting IPv4) are unmapped first.
        let mapped: IpAddr = "::ffff:192.168.1.2".parse().unwrap();
        assert_eq!(
            name(c.classify(Proto::Tcp, mapped, "[::ffff:10.96.0.5]:80".parse().unwrap())),
            "a"
        );
        assert_eq!(
            name(c.classify(
                Proto::Tcp,
                "fd00::1".parse().unwrap(),
                "[fd00::2]:443".parse().unwrap()
            )),
            "b"
        );
    }
}
