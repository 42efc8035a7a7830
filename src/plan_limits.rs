//! The rules that keep hostile traffic from costing etp anything: the self-loop guard and the
//! per-source limits, both enforced by the kernel before a packet reaches etp's listener.
//!
//! - Guard: a connection or datagram for one of the node's own addresses (`fib daddr type
//!   local`, loopback included) or a broadcast or multicast address, on the listener port, would
//!   reach etp's wildcard-bound transparent listener without a tproxy rule and be relayed back to
//!   that same listener, again and again. It is refused first: TCP with a reset, UDP dropped.
//! - Limits: before each route's tproxy rule, the same matches with a per-source meter: new flows
//!   per second (`limit rate` in a dynamic set, what `meter` did), concurrent TCP and UDP flows
//!   (`ct count` in a dynamic set, what `iptables -m connlimit` did). One meter per protocol and
//!   family is shared by all routes (a source's share is node-wide); each route's rule counts
//!   its own refusals. Excess TCP gets a reset, excess UDP is dropped. IPv6 sources are keyed by
//!   their /64 (one host owns one). Trusted sources skip the limit rules.

use super::addr_sets;
use crate::classify::AddrSets;
use crate::config::Config;
use crate::model::{
    AddrType, Desired, Family, Limit, Match, Meter, Proto, Rule, Set, SourceLimit, Verdict,
};

/// Keys per meter: a source that finds its meter full is not limited (the dynset `add`
/// fails and the rule does not match), so the size bounds memory, never service.
pub const METER_SIZE: u32 = 65535;
/// A rate key idle this long is forgotten; its token bucket is full again after one second of
/// idleness anyway, so any timeout above a second means the same.
pub const RATE_TIMEOUT_SECS: u32 = 10;
/// Comment suffixes of the limit rules (within `model::COMMENT_SUFFIX_LONGEST`).
pub const SUFFIX_RATE: &str = " (source rate)";
pub const SUFFIX_FLOWS: &str = " (source flows)";

/// The self-loop guard: one rule per protocol and address type.
pub fn guard_rules(cfg: &Config) -> Vec<Rule> {
    let mut rules = Vec::new();
    for proto in [Proto::Tcp, Proto::Udp] {
        for t in [AddrType::Local, AddrType::Broadcast, AddrType::Multicast] {
            rules.push(Rule {
                // The port first: every packet crosses this chain, and only those for the
                // listener port should pay for the fib lookup.
                matches: vec![
                    Match::DportIs {
                        proto,
                        port: cfg.listener.port,
                    },
                    Match::FibDaddrType(t),
                ],
                verdict: refusal(proto),
                comment: format!("etp: {proto} for the listener port at a {t} address refused"),
            });
        }
    }
    rules
}

fn refusal(proto: Proto) -> Verdict {
    match proto {
        Proto::Tcp => Verdict::RejectTcp,
        Proto::Udp => Verdict::Drop,
    }
}

/// The per-source limits of one config: their meters and trusted-source sets, and the rules
/// each route's tproxy rule gets in front of it.
pub struct SourceLimits {
    tcp_flows: u32,
    udp_flows: u32,
    rate: u32,
    /// The trusted-source set of each family that has entries.
    trusted: Vec<(Family, String)>,
}

impl SourceLimits {
    /// Adds the trusted-source sets to `sets` and returns the limits with their meters.
    pub fn new(cfg: &Config, sets: &mut Vec<Set>) -> (SourceLimits, Vec<Meter>) {
        let l = &cfg.limits;
        let clamp = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let limits = SourceLimits {
            tcp_flows: clamp(l.max_tcp_flows_per_source),
            udp_flows: clamp(l.max_udp_flows_per_source),
            rate: l.new_flows_per_source_per_second,
            trusted: Vec::new(),
        };
        if limits.tcp_flows == 0 && limits.udp_flows == 0 && limits.rate == 0 {
            return (limits, Vec::new());
        }
        let trusted = AddrSets::new(&l.trusted_sources, cfg.listener.ipv6);
        let limits = SourceLimits {
            trusted: addr_sets(sets, "trusted", &trusted, "src", cfg),
            ..limits
        };
        let families: &[Family] = if cfg.listener.ipv6 {
            &[Family::V4, Family::V6]
        } else {
            &[Family::V4]
        };
        let mut meters = Vec::new();
        for &family in families {
            for (kind, on, timeout) in [
                ("rate", limits.rate, Some(RATE_TIMEOUT_SECS)),
                ("tcp", limits.tcp_flows, None),
                ("udp", limits.udp_flows, None),
            ] {
                if on > 0 {
                    meters.push(Meter {
                        name: meter_name(kind, family),
                        family,
                        size: METER_SIZE,
                        timeout_secs: timeout,
                    });
                }
            }
        }
        (limits, meters)
    }

    /// The limit rules for a route's tproxy rule with `matches` and `comment`. The test for a
    /// flow's first packet comes first (SYN for TCP, not yet confirmed by conntrack for UDP):
    /// every packet of every intercepted flow crosses these rules, and the later ones should
    /// leave at the cheapest test, before the route's set lookups.
    pub fn rules(
        &self,
        family: Family,
        proto: Proto,
        matches: &[Match],
        comment: &str,
    ) -> Vec<Rule> {
        let mut base = vec![match proto {
            Proto::Tcp => Match::TcpSyn,
            // Every datagram of a UDP flow is TPROXY'd; only the first one opens a flow.
            Proto::Udp => Match::CtUnconfirmed,
        }];
        base.extend(matches.iter().filter(|m| **m != Match::TcpSyn).cloned());
        if let Some((_, set)) = self.trusted.iter().find(|(f, _)| *f == family) {
            base.push(Match::SaddrNotIn {
                family,
                set: set.clone(),
            });
        }
        let flows = match proto {
            Proto::Tcp => self.tcp_flows,
            Proto::Udp => self.udp_flows,
        };
        let mut rules = Vec::new();
        // Rate first: it is cheaper than a count (no conntrack walk) and stops a flood of new
        // flows before they are counted.
        for (kind, limit, suffix) in [
            (
                "rate",
                (self.rate > 0).then_some(Limit::RateOver {
                    per_second: self.rate,
                    burst: self.rate,
                }),
                SUFFIX_RATE,
            ),
            (
                match proto {
                    Proto::Tcp => "tcp",
                    Proto::Udp => "udp",
                },
                (flows > 0).then_some(Limit::CountOver(flows)),
                SUFFIX_FLOWS,
            ),
        ] {
            let Some(limit) = limit else { continue };
            let mut m = base.clone();
            m.push(Match::OverLimit(SourceLimit {
                meter: meter_name(kind, family),
                family,
                limit,
            }));
            rules.push(Rule {
                matches: m,
                verdict: refusal(proto),
                comment: format!("{comment}{suffix}"),
            });
        }
        rules
    }
}

fn meter_name(kind: &str, family: Family) -> String {
    match family {
        Family::V4 => format!("meter_{kind}4"),
        Family::V6 => format!("meter_{kind}6"),
    }
}

/// A refusing rule of the plan and what it refuses: its comment (how the kernel's copy is
/// found), the route it serves (empty for the guard), the protocol and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub comment: String,
    pub route: String,
    pub proto: Proto,
    pub reason: &'static str,
}

/// The guard and limit rules of `desired`, for reading their counters back.
pub fn refusals(desired: &Desired) -> Vec<Refusal> {
    let mut out = Vec::new();
    for r in desired.table.chains.iter().flat_map(|c| &c.rules) {
        let mut proto = None;
        let mut reason = None;
        for m in &r.matches {
            match m {
                Match::DportIs { proto: p, .. } => proto = Some(*p),
                Match::TcpSyn => proto = Some(Proto::Tcp),
                Match::CtUnconfirmed => proto = Some(Proto::Udp),
                Match::FibDaddrType(_) => reason = Some("self_loop"),
                Match::OverLimit(l) => {
                    reason = Some(match l.limit {
                        Limit::RateOver { .. } => "source_rate",
                        Limit::CountOver(_) => "source_flows",
                    })
                }
                _ => {}
            }
        }
        let (Some(proto), Some(reason)) = (proto, reason) else {
            continue;
        };
        let route = crate::config::Route::name_in_comment(&r.comment, proto)
            .unwrap_or_default()
            .to_string();
        out.push(Refusal {
            comment: r.comment.clone(),
            route,
            proto,
            reason,
        });
    }
    out
}

/// True for the rules that only serve new flows (tproxy, kernel hand-off, its refusal,
/// fail-closed drop and per-source limits): the drain table leaves them out, so new flows go
/// straight to their destination while etp drains. The guard stays.
pub fn serves_new_flows(r: &Rule) -> bool {
    if r.matches
        .iter()
        .any(|m| matches!(m, Match::FibDaddrType(_)))
    {
        return false;
    }
    r.matches.iter().any(|m| matches!(m, Match::OverLimit(_)))
        || matches!(
            r.verdict,
            Verdict::Tproxy { .. }
                | Verdict::Drop
                | Verdict::CtMarkAccept { .. }
                | Verdict::RejectTcp
        )
}
