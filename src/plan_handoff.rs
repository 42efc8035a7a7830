//! The kernel hand-off to Linkerd and the proxy's health, as rules: what `plan` emits for a
//! `linkerd` route when `[linkerd] handoff = "kernel"` or while the proxy is not ready.
//!
//! Kernel hand-off: the route's rule in chain `prerouting` (mangle, -150, in route order, so
//! first match still wins) labels the new connection with its route in the conntrack mark and
//! accepts; chain `handoff_in` (nat prerouting, -110) DNATs labelled connections to the
//! hand-off address and the proxy's outbound port. -110 is before kube-proxy's DNAT (-100):
//! only a connection's first NAT binding counts, so the proxy's `SO_ORIGINAL_DST` is the
//! ClusterIP the client dialled. Node-local connections (`[listener] local`) are labelled in the
//! output route chain and DNATed in nat output (chain `handoff`, -110). The hand-off address
//! lives on etp's dummy interface: NAT to 127.0.0.1 from outside would need `route_localnet`,
//! which exposes every loopback listener of the node (CVE-2020-8558).

use crate::config::{
    Config, HandoffMode, Route, WhenUnavailable, COMMENT_DIRECT, COMMENT_LOCAL, COMMENT_REFUSE,
};
use crate::model::{Chain, ChainType, Family, FwMark, HandoffLink, Hook, Match, Rule, Verdict};
use crate::plan::PRIO_HANDOFF;

/// Whether the proxy answers its health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProxyState {
    #[default]
    Ready,
    Unavailable,
}

impl std::fmt::Display for ProxyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProxyState::Ready => "ready",
            ProxyState::Unavailable => "unavailable",
        })
    }
}

/// The conntrack mark bits that carry a kernel hand-off's route: bits 16-27, clear of Istio's
/// connmark (0x539) and the low bits CNIs use; the route is `(value >> 16) - 1`.
pub const CT_ROUTE_MASK: FwMark = FwMark(0x0fff_0000);
const CT_ROUTE_SHIFT: u32 = 16;
/// The largest label; routes past it share it (flow logs then name the last of them).
const CT_ROUTE_MAX: u32 = 0xfff;

/// The nat prerouting chain of the kernel hand-off.
pub const CHAIN_HANDOFF_IN: &str = "handoff_in";
/// etp's dummy interface that holds the hand-off addresses.
pub const HANDOFF_LINK: &str = "etp-handoff";

/// The conntrack mark value for route `index`.
pub fn ct_route_value(index: usize) -> FwMark {
    let label = (index as u32).saturating_add(1).min(CT_ROUTE_MAX);
    FwMark(label << CT_ROUTE_SHIFT)
}

/// The route index a conntrack mark names, if it carries etp's label.
pub fn route_of_ct_mark(mark: u32) -> Option<usize> {
    match (mark & CT_ROUTE_MASK.0) >> CT_ROUTE_SHIFT {
        0 => None,
        label => Some(label as usize - 1),
    }
}

/// Whether `route`'s rules come from here rather than the TPROXY path.
pub fn takes(cfg: &Config, route: &Route, proxy: ProxyState) -> bool {
    route.action == crate::config::Action::Linkerd
        && (cfg.linkerd.handoff == HandoffMode::Kernel || proxy == ProxyState::Unavailable)
}

fn unavailable(cfg: &Config) -> (Verdict, &'static str) {
    match cfg.linkerd.when_unavailable {
        WhenUnavailable::Refuse => (Verdict::RejectTcp, COMMENT_REFUSE),
        WhenUnavailable::Direct => (Verdict::Return, COMMENT_DIRECT),
    }
}

/// The route's prerouting rule: `matches` are its address and port matches.
pub fn pre_rule_in(
    cfg: &Config,
    index: usize,
    mut matches: Vec<Match>,
    comment: String,
    proxy: ProxyState,
) -> Rule {
    // Only the first packet: later packets of a flow that started under another state (or of
    // a kernel hand-off, already translated by conntrack) must not be relabelled or reset.
    // First in the rule: one compare that later packets fail before any set lookup.
    matches.insert(0, Match::TcpSyn);
    pre_or_out(cfg, index, matches, comment, proxy)
}

/// The route's output rule (`[listener] local`). Output rules of TPROXY routes mark and go on,
/// so this one first checks that no earlier route marked the packet (first match wins).
pub fn out_rule_in(
    cfg: &Config,
    index: usize,
    matches: Vec<Match>,
    comment: String,
    proxy: ProxyState,
) -> Rule {
    let mut m = vec![Match::Mark {
        mask: cfg.kernel.mark_mask,
        value: FwMark(0),
    }];
    m.extend(matches);
    pre_or_out(cfg, index, m, format!("{comment}{COMMENT_LOCAL}"), proxy)
}

fn pre_or_out(
    cfg: &Config,
    index: usize,
    matches: Vec<Match>,
    comment: String,
    proxy: ProxyState,
) -> Rule {
    let (verdict, comment) = match proxy {
        ProxyState::Ready => (
            Verdict::CtMarkAccept {
                mask: CT_ROUTE_MASK,
                value: ct_route_value(index),
            },
            comment,
        ),
        ProxyState::Unavailable => {
            let (v, suffix) = unavailable(cfg);
            (v, format!("{comment}{suffix}"))
        }
    };
    Rule {
        matches,
        verdict,
        comment,
    }
}

/// The first rule after etp's own marks in prerouting, output and `established` with the
/// kernel hand-off: packets of a connection already labelled (handed off by its first packet)
/// leave etp's chains at once. Without it every packet of a hand-off would walk the route
/// rules' set lookups and `established`'s socket lookup, which kernel NAT alone does not pay.
/// A labelled connection needs nothing more from etp: conntrack applies its NAT binding.
pub fn handed_off_rule(cfg: &Config) -> Option<Rule> {
    kernel_handoff(cfg).then(|| Rule {
        matches: vec![Match::CtMarkAny {
            mask: CT_ROUTE_MASK,
        }],
        verdict: Verdict::Accept,
        comment: "etp: packets of connections already handed to linkerd in the kernel".to_string(),
    })
}

/// The rules that hand a route's new connections to Linkerd in the kernel, as (comment,
/// route name): their counters count the route's kernel hand-offs (the metric
/// `etp_kernel_handoffs`). A route's rules for several families and for node-local traffic
/// share the route name.
pub fn handoff_counters(desired: &crate::model::Desired) -> Vec<(String, String)> {
    desired
        .table
        .chains
        .iter()
        .flat_map(|c| &c.rules)
        .filter(|r| matches!(r.verdict, Verdict::CtMarkAccept { .. }))
        .map(|r| {
            let route = Route::name_in_comment(&r.comment, crate::model::Proto::Tcp);
            (r.comment.clone(), route.unwrap_or_default().to_string())
        })
        .collect()
}

/// Whether the ruleset needs the kernel hand-off's chains and interface.
pub fn kernel_handoff(cfg: &Config) -> bool {
    cfg.linkerd.handoff == HandoffMode::Kernel
        && cfg
            .routes
            .iter()
            .any(|r| r.action == crate::config::Action::Linkerd)
}

/// `dnat` to the hand-off address of each family etp intercepts, for labelled connections.
pub fn dnat_rules(cfg: &Config) -> Vec<Rule> {
    let mut rules = Vec::new();
    let port = cfg.linkerd.outbound_port;
    let mut targets: Vec<(Family, std::net::IpAddr)> = Vec::new();
    if let Some(a) = cfg.linkerd.handoff_address.v4 {
        targets.push((Family::V4, a.into()));
    }
    if let (true, Some(a)) = (cfg.listener.ipv6, cfg.linkerd.handoff_address.v6) {
        targets.push((Family::V6, a.into()));
    }
    for (family, addr) in targets {
        rules.push(Rule {
            matches: vec![
                Match::NfProto(family),
                Match::L4Proto(crate::model::Proto::Tcp),
                Match::CtMarkAny {
                    mask: CT_ROUTE_MASK,
                },
            ],
            verdict: Verdict::Dnat { addr, port },
            comment: format!(
                "etp: kernel hand-off to the linkerd proxy at the hand-off address, port {port}"
            ),
        });
    }
    rules
}

/// Chain `handoff_in` (nat prerouting, -110).
pub fn chain_in(cfg: &Config) -> Chain {
    Chain {
        name: CHAIN_HANDOFF_IN.to_string(),
        kind: ChainType::Nat,
        hook: Hook::Prerouting,
        priority: PRIO_HANDOFF,
        rules: dnat_rules(cfg),
    }
}

/// The dummy interface and its addresses, whenever a route hands flows to Linkerd, in both
/// modes: a reload from `kernel` to `relay` must not take the address away from connections
/// the kernel handed over (their NAT binding points there), and the proxy binds it either way.
pub fn link(cfg: &Config) -> Option<HandoffLink> {
    if !cfg
        .routes
        .iter()
        .any(|r| r.action == crate::config::Action::Linkerd)
    {
        return None;
    }
    let mut addrs: Vec<std::net::IpAddr> = Vec::new();
    addrs.extend(cfg.linkerd.handoff_address.v4.map(std::net::IpAddr::V4));
    if cfg.listener.ipv6 {
        addrs.extend(cfg.linkerd.handoff_address.v6.map(std::net::IpAddr::V6));
    }
    Some(HandoffLink {
        name: HANDOFF_LINK.to_string(),
        addrs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ct_mark_labels_round_trip_and_stay_in_their_bits() {
        for i in [0usize, 1, 41, 4093] {
            let v = ct_route_value(i);
            assert_eq!(v.0 & !CT_ROUTE_MASK.0, 0);
            assert_eq!(route_of_ct_mark(v.0 | 0x539), Some(i));
        }
        assert_eq!(route_of_ct_mark(0x539), None);
        assert_eq!(ct_route_value(100_000), FwMark(0x0fff_0000));
    }
}
