//! Planner tests: golden renderings under rulesets/ and the decisions behind them.

use super::*;
use crate::config::Config;
use crate::model::FwMark;

/// Compares `got` with the golden file; `ETP_UPDATE_GOLDEN=1` rewrites it instead.
fn golden(name: &str, got: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("rulesets")
        .join(name);
    if std::env::var_os("ETP_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (ETP_UPDATE_GOLDEN=1 creates it)", path.display()));
    assert!(
        want == got,
        "render differs from {} (ETP_UPDATE_GOLDEN=1 rewrites it after review):\n{got}",
        path.display()
    );
}

fn parse(text: &str) -> Config {
    Config::parse(text, "t.toml").unwrap()
}

#[test]
fn default_config_matches_golden() {
    golden("default.nft", &plan(&Config::embedded()).to_string());
}

#[test]
fn example_config_matches_golden() {
    let cfg = parse(include_str!("../deploy/etp.example.toml"));
    golden("example.nft", &plan(&cfg).to_string());
}

#[test]
fn local_adds_a_route_output_chain_with_uid_and_own_mark_returns() {
    let cfg = parse(
        "[listener]\nlocal = true\n[[route]]\nname = \"a\"\nprotocols = [\"tcp\"]\n\
         destinations = [\"10.0.0.0/8\"]\nports = [80]\naction = \"linkerd\"\n",
    );
    let d = plan(&cfg);
    let out = d
        .table
        .chains
        .iter()
        .find(|c| c.name == CHAIN_OUTPUT)
        .expect("output chain");
    assert_eq!(out.kind, ChainType::Route);
    assert_eq!(out.hook, Hook::Output);
    let text: Vec<String> = out.rules.iter().map(|r| r.to_string()).collect();
    assert!(text[0].starts_with("meta mark & 0x00003000 == 0x00002000 counter return"));
    assert!(text[1].starts_with("meta mark & 0x00003000 == 0x00003000 counter return"));
    // Conntrack is on (nat chains): replies leave first, then the proxy's own traffic.
    assert!(text[2].starts_with("ct direction reply counter accept"));
    assert!(text[3].starts_with("meta skuid 2102 counter return"));
    assert!(text.last().unwrap().contains(
        "counter meta mark set 0x00001000 comment \"etp route a: tcp -> linkerd (local)\""
    ));
    // Without local, no output chain: etp then never touches locally generated traffic.
    let d = plan(&parse(""));
    assert!(d.table.chains.iter().all(|c| c.name != CHAIN_OUTPUT));
}

#[test]
fn ipv6_off_drops_v6_sets_rules_and_routing() {
    let cfg = parse(
        "[listener]\nipv6 = false\n[[route]]\nname = \"a\"\nprotocols = [\"tcp\"]\n\
         destinations = [\"10.0.0.0/8\", \"fd00::/8\"]\nports = [80]\naction = \"linkerd\"\n",
    );
    let d = plan(&cfg);
    assert!(d
        .table
        .sets
        .iter()
        .all(|s| !matches!(s.elems, SetElems::V6(_))));
    assert!(d.ip_rules.iter().all(|r| r.family == Family::V4));
    assert_eq!(d.routes.len(), 1);
    assert!(!d.to_string().contains("ip6 "));
}

#[test]
fn sources_limit_families_and_rules_follow_config_order() {
    let cfg = parse(
        "[[route]]\nname = \"first\"\nprotocols = [\"udp\", \"tcp\"]\ndestinations = [\"10.0.0.0/8\", \"fd00::/8\"]\n\
         ports = [53]\nsources = [\"192.168.0.0/16\"]\naction = \"direct\"\n\
         [[route]]\nname = \"second\"\nprotocols = [\"tcp\"]\ndestinations = [\"0.0.0.0/0\"]\nports = [\"1-65535\"]\naction = \"linkerd\"\n",
    );
    let d = plan(&cfg);
    let pre = &d.table.chains[0];
    let routed: Vec<&Rule> = pre
        .rules
        .iter()
        .filter(|r| matches!(r.verdict, Verdict::Tproxy { .. }))
        .collect();
    // "first": IPv4 only (its sources are IPv4), tcp before udp; then "second".
    let comments: Vec<&str> = routed.iter().map(|r| r.comment.as_str()).collect();
    assert_eq!(
        comments,
        [
            "etp route first: tcp -> direct",
            "etp route first: udp -> direct",
            "etp route second: tcp -> linkerd"
        ]
    );
    assert_eq!(
        routed[0].to_string(),
        "tcp flags & (fin | syn | rst | ack) == syn ip saddr @r0_first_src4 ip daddr @r0_first_dst4 \
         tcp dport @r0_first_ports counter tproxy ip to :15001 meta mark set 0x00001000 accept comment \"etp route first: tcp -> direct\""
    );
    // Established transparent flows are recognised after NAT, in their own chain.
    let est = d
        .table
        .chains
        .iter()
        .find(|c| c.name == CHAIN_ESTABLISHED)
        .unwrap();
    assert_eq!(est.priority, PRIO_AFTER_DNAT);
    // Replies too: those of a `preserve_source` upstream leg find etp's socket here.
    assert!(est.rules[0].matches.contains(&Match::SocketTransparent));
    // UDP rules have no SYN test; TCP rules do.
    assert!(!routed[1].matches.contains(&Match::TcpSyn));
    assert!(routed[0].matches.contains(&Match::TcpSyn));
}

#[test]
fn sets_are_merged_and_deduplicated() {
    let cfg = parse(
        "[[route]]\nname = \"a\"\nprotocols = [\"tcp\"]\n\
         destinations = [\"10.0.0.0/8\", \"10.1.0.0/16\", \"10.0.0.0/8\", \"11.0.0.0/8\"]\n\
         ports = [80, \"79-81\", 82]\naction = \"direct\"\n",
    );
    let d = plan(&cfg);
    let set = |n: &str| {
        d.table
            .sets
            .iter()
            .find(|s| s.name == n)
            .unwrap()
            .elems
            .to_string()
    };
    assert_eq!(set("r0_a_dst4"), "10.0.0.0/8,\n\t\t\t     11.0.0.0/8");
    assert_eq!(set("r0_a_ports"), "79-81,\n\t\t\t     82");
}

#[test]
fn handoff_redirects_to_the_configured_outbound_port() {
    // No linkerd route, no nat chain (a nat chain would turn conntrack on for nothing).
    let d = plan(&parse("[linkerd]\noutbound_port = 4999\n"));
    assert!(d.table.chains.iter().all(|c| c.name != CHAIN_HANDOFF));
    let d = plan(&parse(
        "[linkerd]\noutbound_port = 4999\n[[route]]\nname = \"a\"\nprotocols = [\"tcp\"]\n\
         destinations = [\"10.0.0.0/8\"]\nports = [80]\naction = \"linkerd\"\n",
    ));
    let h = d
        .table
        .chains
        .iter()
        .find(|c| c.name == CHAIN_HANDOFF)
        .unwrap();
    assert_eq!(h.kind, ChainType::Nat);
    assert_eq!(h.priority, PRIO_HANDOFF);
    assert_eq!(
        h.rules[0].to_string(),
        "meta mark & 0x00003000 == 0x00003000 meta l4proto tcp counter redirect to :4999 \
         comment \"etp: hand-off to the linkerd proxy's outbound port 4999\""
    );
}

#[test]
fn drain_table_keeps_established_flows_and_drops_tproxy() {
    let cfg = parse(
        "[listener]\nlocal = true\n[[route]]\nname = \"a\"\nprotocols = [\"tcp\"]\n\
         destinations = [\"10.0.0.0/8\"]\nports = [80]\naction = \"linkerd\"\n",
    );
    let full = plan(&cfg);
    let drain = plan_drain(&cfg);
    let text = drain.to_string();
    assert!(!text.contains("tproxy"), "{text}");
    assert!(text.contains("socket transparent 1"));
    assert!(text.contains("ct state established ip daddr @r0_a_dst4 tcp dport @r0_a_ports counter meta mark set 0x00001000"));
    // Same sets, same routing: the drain table only loses rules.
    assert_eq!(drain.table.sets, full.table.sets);
    assert_eq!(drain.ip_rules, full.ip_rules);
    assert!(full.to_string().contains("tproxy"));
}

#[test]
fn fail_closed_drops_after_each_tproxy_rule_and_not_in_the_drain_table() {
    let cfg = parse(
        "[daemon]\nfail_closed = true\n[limits]\nmax_tcp_flows_per_source = 0\n\
         max_udp_flows_per_source = 0\nnew_flows_per_source_per_second = 0\n\
         [[route]]\nname = \"a\"\nprotocols = [\"tcp\", \"udp\"]\n\
         destinations = [\"10.0.0.0/8\"]\nports = [80]\naction = \"direct\"\n",
    );
    let d = plan(&cfg);
    let pre = &d.table.chains[0].rules;
    let n = pre.len();
    // tcp tproxy, tcp drop, udp tproxy, udp drop: each drop right after its tproxy rule.
    assert!(matches!(pre[n - 4].verdict, Verdict::Tproxy { .. }));
    assert_eq!(pre[n - 3].verdict, Verdict::Drop);
    assert_eq!(pre[n - 3].matches, pre[n - 4].matches);
    assert_eq!(
        pre[n - 3].comment,
        "etp route a: tcp -> direct (fail-closed)"
    );
    assert!(pre[n - 1]
        .to_string()
        .starts_with("ip daddr @r0_a_dst4 udp dport @r0_a_ports counter drop"));
    assert!(!plan_drain(&cfg).to_string().contains("(fail-closed)"));
    assert!(!plan(&parse("")).to_string().contains("(fail-closed)"));
}

fn kernel_cfg() -> Config {
    parse(include_str!("../rulesets/kernel.toml"))
}

#[test]
fn kernel_handoff_matches_golden() {
    golden("kernel.nft", &plan(&kernel_cfg()).to_string());
}

#[test]
fn labelled_connections_leave_every_filter_chain_first_and_only_with_the_kernel_handoff() {
    let d = plan(&kernel_cfg());
    let fast = "ct mark & 0x0fff0000 != 0x00000000 counter accept";
    for (chain, at) in [("prerouting", 3), ("output", 3), ("established", 0)] {
        let c = d.table.chains.iter().find(|c| c.name == chain).unwrap();
        assert!(
            c.rules[at].to_string().starts_with(fast),
            "{chain}: {}",
            c.rules[at]
        );
        // Only there: the route rules below it stay as they were.
        let n = c
            .rules
            .iter()
            .filter(|r| r.to_string().starts_with(fast))
            .count();
        assert_eq!(n, 1, "{chain}");
    }
    let mut relay = kernel_cfg();
    relay.linkerd.handoff = crate::config::HandoffMode::Relay;
    assert!(!plan(&relay).to_string().contains(fast));
}

#[test]
fn replies_leave_first_only_where_connections_are_tracked_anyway() {
    let reply = "ct direction reply counter accept";
    // The default config has the per-source limits (ct count, ct status): conntrack is on.
    let d = plan(&crate::config::Config::embedded());
    let pre = d.table.chains.iter().find(|c| c.name == "prerouting");
    assert!(pre.unwrap().rules[2].to_string().starts_with(reply));
    let est = d.table.chains.iter().find(|c| c.name == "established");
    assert!(!est
        .unwrap()
        .rules
        .iter()
        .any(|r| r.matches == [Match::CtReply]));
    // No limits, no linkerd route: nothing tracks connections, and etp does not start to.
    let route = "[[route]]\nname = \"a\"\nprotocols = [\"tcp\", \"udp\"]\n\
                 destinations = [\"10.0.0.0/8\"]\nports = [53]\naction = \"direct\"\n";
    let cfg = parse(&format!(
        "[limits]\nmax_tcp_flows_per_source = 0\nmax_udp_flows_per_source = 0\n\
         new_flows_per_source_per_second = 0\n{route}"
    ));
    let text = plan(&cfg).to_string();
    for ct in [
        "ct direction",
        "ct status",
        "ct count",
        "ct mark",
        "ct state",
    ] {
        assert!(!text.contains(ct), "{ct}: {text}");
    }
    // A rate limit alone needs no conntrack on TCP; on UDP its `ct status` test turns it on.
    let tcp_only = route.replace("[\"tcp\", \"udp\"]", "[\"tcp\"]");
    let cfg = parse(&format!(
        "[limits]\nmax_tcp_flows_per_source = 0\nmax_udp_flows_per_source = 0\n{tcp_only}"
    ));
    assert!(!plan(&cfg).to_string().contains(reply));
    let cfg = parse(&format!(
        "[limits]\nmax_tcp_flows_per_source = 0\nmax_udp_flows_per_source = 0\n{route}"
    ));
    assert!(plan(&cfg).to_string().contains(reply));
}

#[test]
fn kernel_handoffs_are_counted_by_route_from_the_labelling_rules() {
    let d = plan(&kernel_cfg());
    let c = crate::plan_handoff::handoff_counters(&d);
    // IPv4 and IPv6 in prerouting, both again in output (local): one route.
    assert_eq!(c.len(), 4, "{c:?}");
    assert!(c.iter().all(|(_, route)| route == "mesh"), "{c:?}");
    assert!(c
        .iter()
        .any(|(comment, _)| comment == "etp route mesh: tcp -> linkerd"));
    assert!(c
        .iter()
        .any(|(comment, _)| comment == "etp route mesh: tcp -> linkerd (local)"));
    // Unavailable proxy: no labelling rule, nothing counted as handed off.
    let cls = Classifier::new(&kernel_cfg());
    let down = plan_for(&kernel_cfg(), &cls, ProxyState::Unavailable);
    assert!(crate::plan_handoff::handoff_counters(&down).is_empty());
}

#[test]
fn kernel_handoff_labels_in_route_order_and_dnats_labelled_connections() {
    let d = plan(&kernel_cfg());
    let text = d.to_string();
    let pre = &d.table.chains[0].rules;
    // dns (udp tproxy), mesh v4 + v6 (label), rest (tproxy): config order kept (the guard,
    // bypass and per-source limit rules left out).
    let verdicts: Vec<&Verdict> = pre
        .iter()
        .map(|r| &r.verdict)
        .filter(|v| matches!(v, Verdict::Tproxy { .. } | Verdict::CtMarkAccept { .. }))
        .collect();
    assert!(matches!(verdicts[0], Verdict::Tproxy { .. }), "{text}");
    assert!(
        matches!(verdicts[1], Verdict::CtMarkAccept { .. }),
        "{text}"
    );
    assert!(
        matches!(verdicts[2], Verdict::CtMarkAccept { .. }),
        "{text}"
    );
    assert!(matches!(verdicts[3], Verdict::Tproxy { .. }), "{text}");
    // The mesh route is route 1: label 2 in bits 16-27.
    assert!(text.contains("ct mark set ct mark & 0xf000ffff | 0x00020000 accept"));
    assert!(text.contains("dnat ip to 169.254.15.1:4140"), "{text}");
    assert!(text.contains("dnat ip6 to [fd00:15::1]:4140"), "{text}");
    let chain = |n: &str| d.table.chains.iter().find(|c| c.name == n).unwrap();
    assert_eq!(chain("handoff_in").priority, PRIO_HANDOFF);
    assert_eq!(chain("handoff_in").hook, crate::model::Hook::Prerouting);
    // Node-local connections are labelled only when no earlier route marked them.
    let out = &chain("output").rules;
    let local = out
        .iter()
        .find(|r| matches!(r.verdict, Verdict::CtMarkAccept { .. }))
        .unwrap();
    assert_eq!(
        local.matches[0],
        Match::Mark {
            mask: FwMark(0x3000),
            value: FwMark(0)
        }
    );
    let link = d.handoff_link.as_ref().unwrap();
    assert_eq!(link.addrs.len(), 2);
    // The drain table labels no new connection.
    let drain = plan_drain(&kernel_cfg()).to_string();
    assert!(!drain.contains("ct mark set"), "{drain}");
}

#[test]
fn proxy_unavailable_refuses_or_goes_direct_in_both_modes() {
    for handoff in ["kernel", "relay"] {
        for (when, verdict, suffix) in [
            ("refuse", "reject with tcp reset", "(refuse)"),
            ("direct", "return", "(direct)"),
        ] {
            let cfg = parse(&format!(
                "[listener]\nlocal = true\n[linkerd]\nhandoff = \"{handoff}\"\n\
                 when_unavailable = \"{when}\"\n[[route]]\nname = \"a\"\nprotocols = [\"tcp\"]\n\
                 destinations = [\"10.0.0.0/8\"]\nports = [80]\naction = \"linkerd\"\n"
            ));
            let cls = Classifier::new(&cfg);
            let text = plan_for(&cfg, &cls, ProxyState::Unavailable).to_string();
            assert!(!text.contains("tproxy"), "{text}");
            assert!(!text.contains("ct mark set"), "{text}");
            assert!(
                text.contains(&format!(
                    "tcp flags & (fin | syn | rst | ack) == syn ip daddr @r0_a_dst4 tcp dport @r0_a_ports counter {verdict} comment \"etp route a: tcp -> linkerd {suffix}\""
                )),
                "{text}"
            );
            assert!(
                text.contains(&format!(
                    "counter {verdict} comment \"etp route a: tcp -> linkerd (local) {suffix}\""
                )),
                "{text}"
            );
        }
    }
}

#[test]
fn refusals_name_route_protocol_and_reason_of_every_guard_and_limit_rule() {
    let cfg = parse(
        "[[route]]\nname = \"dns-a\"\nprotocols = [\"udp\", \"tcp\"]\n\
         destinations = [\"10.0.0.0/8\", \"fd00::/64\"]\nports = [53]\naction = \"direct\"\n",
    );
    let r = crate::plan::refusals(&plan(&cfg));
    let has = |route: &str, proto: Proto, reason: &str| {
        r.iter()
            .any(|x| x.route == route && x.proto == proto && x.reason == reason)
    };
    assert!(has("", Proto::Tcp, "self_loop"));
    assert!(has("", Proto::Udp, "self_loop"));
    for proto in [Proto::Tcp, Proto::Udp] {
        assert!(has("dns-a", proto, "source_rate"));
        assert!(has("dns-a", proto, "source_flows"));
    }
    // 6 guard rules, 2 limit rules per protocol and family.
    assert_eq!(r.len(), 6 + 2 * 2 * 2);
}
