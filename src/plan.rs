//! Config -> [`Desired`]: every policy decision about the kernel state lives here.
//!
//! The rule order is the classifier's order (`classify::Classifier`): own marks, established
//! transparent flows, bypass, then routes in config order. Each route gets one rule per protocol
//! and address family it has destinations for.

use crate::classify::{AddrSets, Classifier, PortSet, Selector};
use crate::config::{Action, Config, COMMENT_DRAIN, COMMENT_FAIL_CLOSED, COMMENT_LOCAL};
use crate::model::{
    Chain, ChainType, Desired, Family, FwMark, Hook, IpRule, LocalRoute, Match, Proto, Rule, Set,
    SetElems, Table, Verdict, ROUTE_PROTOCOL, TABLE,
};
use crate::plan_handoff::{self, out_rule_in, pre_rule_in, ProxyState};

#[path = "plan_limits.rs"]
mod limits;
use limits::{guard_rules, serves_new_flows, SourceLimits};
pub use limits::{refusals, Refusal, METER_SIZE, RATE_TIMEOUT_SECS};

/// Chain names as `nft list` shows them.
pub const CHAIN_PREROUTING: &str = "prerouting";
pub const CHAIN_OUTPUT: &str = "output";
pub const CHAIN_HANDOFF: &str = "handoff";
pub const CHAIN_ESTABLISHED: &str = "established";
/// NF_IP_PRI_MANGLE: before conntrack's NAT and before routing decisions are final.
pub const PRIO_MANGLE: i32 = -150;
/// Just after NF_IP_PRI_NAT_DST (-100): the `socket transparent` check must see a packet's
/// addresses after any DNAT (kube-proxy's ClusterIP -> endpoint), because the socket etp
/// accepted is keyed by the translated addresses. Routing happens after every prerouting hook,
/// so a mark set here still decides the route.
pub const PRIO_AFTER_DNAT: i32 = -99;
/// Just before NF_IP_PRI_NAT_DST (-100), where kube-proxy's nat OUTPUT DNAT sits: only a
/// connection's first NAT binding counts, so the hand-off redirect must run before a ClusterIP
/// is translated to an endpoint, or the connection would skip Linkerd.
pub const PRIO_HANDOFF: i32 = -110;

/// Plans the kernel state for `cfg`.
pub fn plan(cfg: &Config) -> Desired {
    plan_with(cfg, &Classifier::new(cfg))
}

/// Plans from an already-built classifier (the daemon keeps the one it routes flows with).
pub fn plan_with(cfg: &Config, cls: &Classifier) -> Desired {
    plan_for(cfg, cls, ProxyState::Ready)
}

/// [`plan_for`] with a classifier of its own (`etp audit`).
pub fn plan_for_proxy(cfg: &Config, proxy: ProxyState) -> Desired {
    plan_for(cfg, &Classifier::new(cfg), proxy)
}

/// Plans for the Linkerd proxy's current health (`linkerd` routes follow it, see
/// `plan_handoff`).
pub fn plan_for(cfg: &Config, cls: &Classifier, proxy: ProxyState) -> Desired {
    let mut sets = Vec::new();
    let bypass = addr_sets(&mut sets, "bypass", &cls.bypass_destinations, "dst", cfg);
    let bypass_ports = port_set(&mut sets, "bypass_ports", &cls.bypass_ports);
    let own_rules = own_rules(cfg);
    let bypass_rules = bypass_rules(&bypass, bypass_ports.as_deref());
    let (limits, meters) = SourceLimits::new(cfg, &mut sets);

    let handed = plan_handoff::handed_off_rule(cfg);
    let mut pre = own_rules.to_vec();
    pre.extend(handed.clone());
    pre.extend(guard_rules(cfg));
    pre.extend(bypass_rules.iter().cloned());

    let mut out = own_rules.to_vec();
    out.extend(handed);
    out.push(Rule {
        matches: vec![Match::SkUid(cfg.linkerd.proxy_uid)],
        verdict: Verdict::Return,
        comment: "etp: the linkerd proxy's own traffic".to_string(),
    });
    out.extend(bypass_rules);

    for sel in &cls.selectors {
        route_rules(cfg, sel, proxy, &limits, &mut sets, &mut pre, &mut out);
    }

    let mut chains = chains(cfg, pre, out);
    replies_leave_first(cfg, &mut chains);
    let families: &[Family] = if cfg.listener.ipv6 {
        &[Family::V4, Family::V6]
    } else {
        &[Family::V4]
    };
    Desired {
        table: Table {
            name: TABLE.to_string(),
            sets,
            meters,
            chains,
        },
        ip_rules: ip_rules(cfg, families),
        routes: local_routes(cfg, families),
        handoff_link: plan_handoff::link(cfg),
    }
}

/// The first rules of both hooks: packets of etp's own sockets and of its hand-off
/// connections are never intercepted.
fn own_rules(cfg: &Config) -> [Rule; 2] {
    let k = &cfg.kernel;
    let own = |comment: &str, value: FwMark| Rule {
        matches: vec![Match::Mark {
            mask: k.mark_mask,
            value,
        }],
        verdict: Verdict::Return,
        comment: comment.to_string(),
    };
    [
        own("etp: etp's own sockets are never intercepted", k.own_mark),
        own("etp: etp's hand-off connections to linkerd", k.handoff_mark),
    ]
}

/// One route's sets, and its rules per protocol and address family: a tproxy rule (plus a
/// drop with `fail_closed`) in prerouting, a mark rule in output.
fn route_rules(
    cfg: &Config,
    sel: &Selector,
    proxy: ProxyState,
    limits: &SourceLimits,
    sets: &mut Vec<Set>,
    pre: &mut Vec<Rule>,
    out: &mut Vec<Rule>,
) {
    let k = &cfg.kernel;
    let r = &sel.route;
    let base = set_base(sel);
    let dst = addr_sets(sets, &base, &sel.destinations, "dst", cfg);
    let src = addr_sets(sets, &base, &sel.sources, "src", cfg);
    let ports =
        port_set(sets, &format!("{base}_ports"), &sel.ports).expect("validated routes have ports");
    for proto in &r.protocols {
        for (family, dset) in &dst {
            let mut matches = Vec::new();
            if let Some((_, sset)) = src.iter().find(|(f, _)| f == family) {
                matches.push(Match::Saddr {
                    family: *family,
                    set: sset.clone(),
                });
            } else if !src.is_empty() {
                // Sources given, none of this family: the route cannot match it.
                continue;
            }
            matches.push(Match::Daddr {
                family: *family,
                set: dset.clone(),
            });
            matches.push(Match::Dport {
                proto: *proto,
                set: ports.clone(),
            });
            // The per-source limits go in front of whatever takes the route's new flows.
            pre.extend(limits.rules(*family, *proto, &matches, &r.comment(*proto)));
            if plan_handoff::takes(cfg, r, proxy) {
                let comment = r.comment(*proto);
                let i = sel.index;
                pre.push(pre_rule_in(cfg, i, matches.clone(), comment.clone(), proxy));
                out.push(out_rule_in(cfg, i, matches, comment, proxy));
                continue;
            }
            let mut pre_matches = matches.clone();
            if *proto == Proto::Tcp {
                // Only the SYN is TPROXY'd: later packets of the flow must find the socket
                // by their post-NAT addresses (chain `established`), which a tproxy lookup
                // here, before any DNAT, cannot. The flag test goes first: it is one compare
                // that every later packet fails before the set lookups.
                pre_matches.insert(0, Match::TcpSyn);
            }
            pre.push(Rule {
                matches: pre_matches.clone(),
                verdict: Verdict::Tproxy {
                    family: *family,
                    port: cfg.listener.port,
                    mark: k.tproxy_mark,
                },
                comment: r.comment(*proto),
            });
            if cfg.daemon.fail_closed {
                // A tproxy statement that finds no socket (etp is down) does not match and
                // evaluation goes on: this rule then drops what the route selects.
                pre.push(Rule {
                    matches: pre_matches.clone(),
                    verdict: Verdict::Drop,
                    comment: format!("{}{COMMENT_FAIL_CLOSED}", r.comment(*proto)),
                });
            }
            out.push(Rule {
                matches,
                verdict: Verdict::SetMark(k.tproxy_mark),
                comment: format!("{}{COMMENT_LOCAL}", r.comment(*proto)),
            });
        }
    }
}

/// The chains: prerouting and established always, output with `listener.local`, the nat
/// hand-off chain when a route hands flows to Linkerd.
fn chains(cfg: &Config, pre: Vec<Rule>, out: Vec<Rule>) -> Vec<Chain> {
    let k = &cfg.kernel;
    let mut chains = vec![
        Chain {
            name: CHAIN_PREROUTING.to_string(),
            kind: ChainType::Filter,
            hook: Hook::Prerouting,
            priority: PRIO_MANGLE,
            rules: pre,
        },
        Chain {
            name: CHAIN_ESTABLISHED.to_string(),
            kind: ChainType::Filter,
            hook: Hook::Prerouting,
            priority: PRIO_AFTER_DNAT,
            rules: plan_handoff::handed_off_rule(cfg)
                .into_iter()
                .chain([Rule {
                    matches: vec![Match::L4Proto(Proto::Tcp), Match::SocketTransparent],
                    verdict: Verdict::MarkAccept(k.tproxy_mark),
                    comment: "etp: packets of flows etp already accepted".to_string(),
                }])
                .collect(),
        },
    ];
    if cfg.listener.local {
        chains.push(Chain {
            name: CHAIN_OUTPUT.to_string(),
            kind: ChainType::Route,
            hook: Hook::Output,
            priority: PRIO_MANGLE,
            rules: out,
        });
    }
    // A nat chain turns on connection tracking for the whole namespace: only when a route
    // hands flows to Linkerd does etp need one.
    let handoff = cfg.routes.iter().any(|r| r.action == Action::Linkerd);
    if plan_handoff::kernel_handoff(cfg) {
        chains.push(plan_handoff::chain_in(cfg));
    }
    if handoff {
        let mut rules = vec![Rule {
            matches: vec![
                Match::Mark {
                    mask: k.mark_mask,
                    value: k.handoff_mark,
                },
                Match::L4Proto(Proto::Tcp),
            ],
            verdict: Verdict::Redirect {
                port: cfg.linkerd.outbound_port,
            },
            comment: format!(
                "etp: hand-off to the linkerd proxy's outbound port {}",
                cfg.linkerd.outbound_port
            ),
        }];
        if cfg.listener.local && plan_handoff::kernel_handoff(cfg) {
            rules.extend(plan_handoff::dnat_rules(cfg));
        }
        chains.push(Chain {
            name: CHAIN_HANDOFF.to_string(),
            kind: ChainType::Nat,
            hook: Hook::Output,
            priority: PRIO_HANDOFF,
            rules,
        });
    }
    chains
}

/// When the ruleset already tracks connections (a nat chain, a `ct` match: the per-source
/// limits or the kernel hand-off), packets that answer a connection leave `prerouting` and
/// `output` at once (`ct direction reply accept`, after etp's own marks): their rules only act
/// on a flow's first packet in its original direction (a SYN, an unconfirmed datagram), so
/// without this rule the replies of every connection on the node (etp's and the proxy's
/// upstream legs included) walked every route rule for nothing. Not in `established`: the
/// replies to a `preserve_source` upstream leg (bound to the client's address) find etp's
/// transparent socket there. Without conntrack the rule is left out: a `ct` expression would
/// turn connection tracking on for the namespace.
fn replies_leave_first(cfg: &Config, chains: &mut [Chain]) {
    if !chains.iter().any(tracks_connections) {
        return;
    }
    let reply = Rule {
        matches: vec![Match::CtReply],
        verdict: Verdict::Accept,
        comment: "etp: packets that answer a connection are never intercepted".to_string(),
    };
    let own = own_rules(cfg).len();
    for c in chains.iter_mut() {
        match c.name.as_str() {
            CHAIN_PREROUTING | CHAIN_OUTPUT => c.rules.insert(own, reply.clone()),
            _ => {}
        }
    }
}

/// Whether the chain makes the kernel track connections (nf_tables takes a conntrack reference
/// for nat chains and for every `ct` expression).
fn tracks_connections(c: &Chain) -> bool {
    c.kind == ChainType::Nat
        || c.rules
            .iter()
            .any(|r| r.verdict.uses_conntrack() || r.matches.iter().any(Match::uses_conntrack))
}

/// One ip rule per family: tproxy-marked packets look up etp's route table.
fn ip_rules(cfg: &Config, families: &[Family]) -> Vec<IpRule> {
    let k = &cfg.kernel;
    families
        .iter()
        .map(|&family| IpRule {
            family,
            mark: k.tproxy_mark,
            mask: k.mark_mask,
            table: k.route_table,
            priority: k.rule_priority,
            protocol: ROUTE_PROTOCOL,
        })
        .collect()
}

/// One `local default dev lo` route per family in etp's route table.
fn local_routes(cfg: &Config, families: &[Family]) -> Vec<LocalRoute> {
    families
        .iter()
        .map(|&family| LocalRoute {
            family,
            table: cfg.kernel.route_table,
            protocol: ROUTE_PROTOCOL,
        })
        .collect()
}

/// The drain table, installed on SIGTERM in place of the full one: no tproxy rules (new
/// connections go straight to their destination) but packets of flows etp already holds keep
/// reaching it (`socket transparent 1` in prerouting; with `local`, packets of established local
/// flows are still rerouted through lo), so they can finish before the deadline.
pub fn plan_drain(cfg: &Config) -> Desired {
    plan_drain_with(cfg, &Classifier::new(cfg))
}

/// [`plan_drain`] from an already-built classifier.
pub fn plan_drain_with(cfg: &Config, cls: &Classifier) -> Desired {
    let mut d = plan_with(cfg, cls);
    for chain in &mut d.table.chains {
        match chain.name.as_str() {
            CHAIN_PREROUTING => chain.rules.retain(|r| !serves_new_flows(r)),
            CHAIN_OUTPUT => {
                // Kernel hand-offs already made keep their NAT binding in conntrack.
                chain
                    .rules
                    .retain(|r| !matches!(r.verdict, Verdict::CtMarkAccept { .. }));
                for rule in &mut chain.rules {
                    if matches!(rule.verdict, Verdict::SetMark(_)) {
                        rule.matches.insert(0, Match::CtEstablished);
                        rule.comment = format!("{}{COMMENT_DRAIN}", rule.comment);
                    }
                }
            }
            _ => {}
        }
    }
    d
}

/// Set names are `r<index>_<name>` so that names which differ only in '-' vs '_' stay apart.
fn set_base(sel: &Selector) -> String {
    format!("r{}_{}", sel.index, sel.route.name.replace('-', "_"))
}

/// Adds `<base>_<what>4` / `<base>_<what>6` for the non-empty families; returns (family, name).
fn addr_sets(
    sets: &mut Vec<Set>,
    base: &str,
    a: &AddrSets,
    what: &str,
    cfg: &Config,
) -> Vec<(Family, String)> {
    let mut names = Vec::new();
    if !a.v4.0.is_empty() {
        let name = format!("{base}_{what}4");
        sets.push(Set {
            name: name.clone(),
            elems: SetElems::V4(a.v4.0.clone()),
        });
        names.push((Family::V4, name));
    }
    if cfg.listener.ipv6 && !a.v6.0.is_empty() {
        let name = format!("{base}_{what}6");
        sets.push(Set {
            name: name.clone(),
            elems: SetElems::V6(a.v6.0.clone()),
        });
        names.push((Family::V6, name));
    }
    names
}

fn port_set(sets: &mut Vec<Set>, name: &str, p: &PortSet) -> Option<String> {
    if p.0.is_empty() {
        return None;
    }
    sets.push(Set {
        name: name.to_string(),
        elems: SetElems::Ports(p.0.clone()),
    });
    Some(name.to_string())
}

fn bypass_rules(dst: &[(Family, String)], ports: Option<&str>) -> Vec<Rule> {
    let mut rules: Vec<Rule> = dst
        .iter()
        .map(|(family, set)| Rule {
            matches: vec![Match::Daddr {
                family: *family,
                set: set.clone(),
            }],
            verdict: Verdict::Return,
            comment: "etp bypass: destinations".to_string(),
        })
        .collect();
    if let Some(set) = ports {
        for proto in [Proto::Tcp, Proto::Udp] {
            rules.push(Rule {
                matches: vec![Match::Dport {
                    proto,
                    set: set.to_string(),
                }],
                verdict: Verdict::Return,
                comment: "etp bypass: ports".to_string(),
            });
        }
    }
    rules
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
