//! Config validation: every kind of bad value is refused with file, line, key and reason.

use super::*;

const GOOD_ROUTE: &str = r#"
[[route]]
name = "frontend"
protocols = ["tcp"]
destinations = ["10.96.0.0/12", "fd00:10:96::/112"]
ports = [80, "8000-8100"]
action = "linkerd"
"#;

fn err(text: &str) -> String {
    match Config::parse(text, "t.toml") {
        Ok(_) => panic!("accepted a bad config:\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn embedded_and_example_configs_are_valid() {
    let d = Config::embedded();
    assert_eq!(d.listener.port, DEFAULT_PORT);
    assert_eq!(d.routes.len(), 2);
    let ex = Config::parse(include_str!("../../deploy/etp.example.toml"), "example").unwrap();
    assert_eq!(ex.routes.len(), 3);
    assert_eq!(
        ex.routes[2].action,
        Action::Forward("169.254.20.10:53".parse().unwrap())
    );
    assert_eq!(
        ex.routes[0].ports[1],
        PortRange {
            first: 8000,
            last: 8100
        }
    );
}

#[test]
fn defaults_apply_to_an_empty_file() {
    let c = Config::parse("", "empty.toml").unwrap();
    assert_eq!(c.linkerd.outbound_port, 4140);
    assert_eq!(c.linkerd.proxy_uid, 2102);
    assert_eq!(c.admin.address.to_string(), "127.0.0.1:15002");
    assert_eq!(c.kernel.mark_mask, FwMark(0x3000));
    assert!(c.routes.is_empty());
    assert!(c.listener.ipv6 && !c.listener.local);
}

#[test]
fn bad_configs_are_refused_with_file_line_key_and_reason() {
    // (config text, expected substring of the message). Line numbers count from the text's
    // first line, which is empty in these raw strings.
    let cases: &[(&str, &str)] = &[
        ("[listener]\nprot = 1\n", "t.toml:2: prot: unknown field `prot`"),
        ("[nope]\n", "unknown field `nope`"),
        ("[listener]\nport = 0\n", "t.toml:2: listener.port: 0 is out of range 1..=65535"),
        ("[listener]\nport = 70000\n", "listener.port: 70000 is out of range"),
        ("[listener]\nport = \"x\"\n", "t.toml:2: toml: invalid type"),
        ("[linkerd]\noutbound_port = 15001\n", "t.toml:2: linkerd.outbound_port: 15001 is also listener.port"),
        ("[admin]\naddress = \"localhost\"\n", "t.toml:2: admin.address: expected IP:PORT"),
        ("[admin]\naddress = \"127.0.0.1:4140\"\n", "admin.address: port 4140 is taken"),
        ("[bypass]\ndestinations = [\"10.0.0.0/33\"]\n", "t.toml:2: bypass.destinations: \"10.0.0.0/33\": not a CIDR"),
        ("[bypass]\ndestinations = [\"10.0.0.1/8\"]\n", "host bits are set; did you mean 10.0.0.0/8?"),
        ("[bypass]\nports = [\"90-80\"]\n", "t.toml:2: bypass.ports: \"90-80\": reversed range (first 90 > last 80)"),
        ("[bypass]\nports = [0]\n", "bypass.ports: port 0 is out of range 1..=65535"),
        ("[bypass]\nports = [\"1-70000\"]\n", "port 70000 is out of range"),
        ("[bypass]\nports = [\"http\"]\n", "expected a port or a range"),
        ("[kernel]\ntproxy_mark = 0x2000\n", "t.toml:2: kernel.tproxy_mark: 0x2000 overlaps kernel.own_mark"),
        ("[kernel]\ntproxy_mark = 0x4000\n", "kernel.tproxy_mark: 0x4000 has bits outside kernel.mark_mask 0x3000"),
        ("[kernel]\nroute_table = 254\n", "t.toml:2: kernel.route_table: 254 is reserved"),
        ("[kernel]\nroute_table = 0\n", "kernel.route_table: 0 is out of range"),
        ("[kernel]\nrule_priority = 32766\n", "kernel.rule_priority: 32766 is out of range 1..=32765"),
        ("[kernel]\nmark_mask = 0x1000\ntproxy_mark = 0x1000\nown_mark = 0x1000\n", "overlaps"),
        (
            "[[route]]\nname = \"a\"\nprotocols = [\"tcp\"]\nports = [80]\naction = \"direct\"\n",
            "t.toml:1: route[0].destinations: missing",
        ),
        (
            "[[route]]\nname = \"a\"\nprotocols = [\"tcp\"]\ndestinations = []\nports = [80]\naction = \"direct\"\n",
            "t.toml:4: route[0].destinations: empty",
        ),
        (
            "[[route]]\nname = \"a\"\nprotocols = [\"tcp\"]\ndestinations = [\"10.0.0.0/8\"]\naction = \"direct\"\n",
            "route[0].ports: missing",
        ),
        (
            "[[route]]\nname = \"a\"\nprotocols = [\"tcp\"]\ndestinations = [\"10.0.0.0/8\"]\nports = []\naction = \"direct\"\n",
            "t.toml:5: route[0].ports: empty",
        ),
        (
            "[[route]]\nname = \"a\"\nprotocols = [\"sctp\"]\ndestinations = [\"10.0.0.0/8\"]\nports = [1]\naction = \"direct\"\n",
            "t.toml:3: route[0].protocols: \"sctp\": expected \"tcp\" or \"udp\"",
        ),
        (
            "[[route]]\nname = \"dns\"\nprotocols = [\"udp\"]\ndestinations = [\"10.0.0.0/8\"]\nports = [53]\naction = \"linkerd\"\n",
            "t.toml:6: route[0].action: \"linkerd\" takes TCP only (Linkerd proxies no UDP)",
        ),
        (
            "[[route]]\nname = \"f\"\nprotocols = [\"udp\"]\ndestinations = [\"10.0.0.0/8\"]\nports = [53]\naction = \"forward\"\n",
            "t.toml:6: route[0].forward_to: required with action = \"forward\"",
        ),
        (
            "[[route]]\nname = \"f\"\nprotocols = [\"udp\"]\ndestinations = [\"10.0.0.0/8\"]\nports = [53]\naction = \"direct\"\nforward_to = \"1.2.3.4:53\"\n",
            "t.toml:7: route[0].forward_to: only used with action = \"forward\"",
        ),
        (
            "[[route]]\nname = \"f\"\nprotocols = [\"udp\"]\ndestinations = [\"10.0.0.0/8\"]\nports = [53]\naction = \"forward\"\nforward_to = \"dns:53\"\n",
            "route[0].forward_to: \"dns:53\": expected IP:PORT",
        ),
        (
            "[[route]]\nname = \"f\"\nprotocols = [\"tcp\"]\ndestinations = [\"10.0.0.0/8\"]\nports = [53]\naction = \"forward\"\nforward_to = \"127.0.0.1:15001\"\n",
            "t.toml:7: route[0].forward_to: 127.0.0.1:15001 is etp's own listener",
        ),
        (
            "[listener]\nport = 16000\n[[route]]\nname = \"f\"\nprotocols = [\"udp\"]\ndestinations = [\"10.0.0.0/8\"]\nports = [53]\naction = \"forward\"\nforward_to = \"[::]:16000\"\n",
            "t.toml:9: route[0].forward_to: [::]:16000 is etp's own listener",
        ),
        (
            "[[route]]\nname = \"f\"\nprotocols = [\"tcp\"]\ndestinations = [\"10.0.0.0/8\"]\nports = [53]\naction = \"forward\"\nforward_to = \"[::ffff:127.0.0.2]:15001\"\n",
            "route[0].forward_to: [::ffff:127.0.0.2]:15001 is etp's own listener",
        ),
        (
            "[[route]]\nname = \"f\"\nprotocols = [\"tcp\"]\ndestinations = [\"10.0.0.0/8\"]\nports = [53]\naction = \"bounce\"\n",
            "route[0].action: \"bounce\": expected \"linkerd\", \"direct\" or \"forward\"",
        ),
        (
            "[[route]]\nname = \"a b\"\nprotocols = [\"tcp\"]\ndestinations = [\"10.0.0.0/8\"]\nports = [1]\naction = \"direct\"\n",
            "t.toml:2: route[0].name: \"a b\": use letters",
        ),
        (
            "[[route]]\nname = \"f\"\nprotocols = [\"tcp\"]\ndestinations = [\"10.0.0.0/8\"]\nports = [1]\naction = \"linkerd\"\npreserve_source = true\n",
            "t.toml:7: route[0].preserve_source: only applies to action = \"direct\"",
        ),
        (
            "[listener]\nipv6 = false\n[[route]]\nname = \"v6\"\nprotocols = [\"tcp\"]\ndestinations = [\"fd00::/8\"]\nports = [1]\naction = \"direct\"\n",
            "t.toml:6: route[0].destinations: only IPv6 destinations, but listener.ipv6 = false",
        ),
        (
            "[listener]\nipv6 = false\n[[route]]\nname = \"v6src\"\nprotocols = [\"tcp\"]\ndestinations = [\"10.0.0.0/8\"]\nsources = [\"fd00::/8\", \"fd01::/16\"]\nports = [1]\naction = \"direct\"\n",
            "t.toml:7: route[0].sources: only IPv6 sources, but listener.ipv6 = false",
        ),
        (
            "[[route]]\nname = \"x\"\nprotocols = [\"tcp\"]\ndestinations = [\"10.0.0.0/8\"]\nports = [1]\naction = \"direct\"\nsurprise = 1\n",
            "t.toml:7: surprise: unknown field `surprise`",
        ),
    ];
    for (text, want) in cases {
        let got = err(text);
        assert!(
            got.contains(want),
            "config:\n{text}\nwant substring: {want}\ngot: {got}"
        );
    }
}

#[test]
fn duplicate_route_names_point_at_the_second() {
    let text = format!("{GOOD_ROUTE}{GOOD_ROUTE}");
    let got = err(&text);
    assert!(
        got.starts_with("t.toml:10: route[1].name: duplicate route name \"frontend\""),
        "{got}"
    );
}

#[test]
fn names_too_long_for_an_nft_comment_are_refused() {
    let long = "n".repeat(120);
    let text = GOOD_ROUTE.replace("\"frontend\"", &format!("\"{long}\""));
    let got = err(&text);
    assert!(
        got.contains("route[0].name: too long: the rule comment"),
        "{got}"
    );
    assert!(got.contains("nft comments hold 127"), "{got}");
}

#[test]
fn load_reports_a_missing_file_by_path() {
    let e = Config::load(std::path::Path::new("/nonexistent/etp.toml")).unwrap_err();
    assert_eq!(e.to_string(), "reading config /nonexistent/etp.toml");
    let full = crate::telemetry::chain(&e);
    assert!(
        full.starts_with("reading config /nonexistent/etp.toml: No such file"),
        "{full}"
    );
}

#[test]
fn worker_threads_default_to_half_the_cpus_and_are_bounded() {
    let d = Config::embedded();
    assert_eq!(d.limits.worker_threads, 0, "auto by default");
    assert_eq!(d.limits.worker_threads_auto(1), 1);
    assert_eq!(d.limits.worker_threads_auto(2), 1);
    assert_eq!(d.limits.worker_threads_auto(16), 8);
    let set = Config::parse(
        &format!("[limits]\nworker_threads = 3\n{GOOD_ROUTE}"),
        "t.toml",
    )
    .unwrap();
    assert_eq!(
        set.limits.worker_threads_auto(64),
        3,
        "an explicit count wins"
    );
    let got = err(&format!("[limits]\nworker_threads = -1\n{GOOD_ROUTE}"));
    assert!(got.starts_with("t.toml:2: limits.worker_threads:"), "{got}");
}

#[test]
fn per_source_limits_have_defaults_accept_zero_and_refuse_bad_values() {
    let d = Config::embedded();
    assert_eq!(
        d.limits.max_tcp_flows_per_source,
        DEFAULT_MAX_TCP_FLOWS_PER_SOURCE
    );
    assert_eq!(
        d.limits.max_udp_flows_per_source,
        DEFAULT_MAX_UDP_FLOWS_PER_SOURCE
    );
    assert_eq!(
        d.limits.new_flows_per_source_per_second,
        DEFAULT_NEW_FLOWS_PER_SOURCE_PER_SECOND
    );
    assert!(d.limits.trusted_sources.is_empty());
    let set = Config::parse(
        &format!(
            "[limits]\nmax_tcp_flows_per_source = 0\nmax_udp_flows_per_source = 7\n\
             new_flows_per_source_per_second = 0\n\
             trusted_sources = [\"10.0.0.1\", \"fd00::/64\"]\n{GOOD_ROUTE}"
        ),
        "t.toml",
    )
    .unwrap();
    assert_eq!(set.limits.max_tcp_flows_per_source, 0, "0 turns it off");
    assert_eq!(set.limits.max_udp_flows_per_source, 7);
    assert_eq!(set.limits.new_flows_per_source_per_second, 0);
    assert_eq!(
        set.limits.trusted_sources,
        vec![
            "10.0.0.1/32".parse::<IpNetwork>().unwrap(),
            "fd00::/64".parse().unwrap()
        ]
    );
    let got = err(&format!(
        "[limits]\nmax_udp_flows_per_source = -3\n{GOOD_ROUTE}"
    ));
    assert!(
        got.starts_with("t.toml:2: limits.max_udp_flows_per_source:"),
        "{got}"
    );
    let got = err(&format!(
        "[limits]\ntrusted_sources = [\"10.0.0.1/8\"]\n{GOOD_ROUTE}"
    ));
    assert!(
        got.starts_with("t.toml:2: limits.trusted_sources:"),
        "{got}"
    );
}

#[test]
fn handoff_keys_are_validated() {
    let kernel = |extra: &str| format!("[linkerd]\nhandoff = \"kernel\"\n{extra}\n{GOOD_ROUTE}");
    let c = Config::parse(&kernel(""), "t.toml").unwrap();
    assert_eq!(c.linkerd.handoff, HandoffMode::Kernel);
    assert_eq!(c.linkerd.when_unavailable, WhenUnavailable::Refuse);
    assert!(err("[linkerd]\nhandoff = \"ebpf\"\n")
        .contains("linkerd.handoff: \"ebpf\": expected \"relay\" or \"kernel\""));
    assert!(err("[linkerd]\nwhen_unavailable = \"drop\"\n").contains("linkerd.when_unavailable"));
    assert!(
        err("[linkerd]\nready_url = \"https://127.0.0.1:4191/ready\"\n")
            .contains("linkerd.ready_url")
    );
    assert!(err(&kernel("handoff_address = [\"127.0.0.1\"]")).contains("loopback"));
    assert!(err(&kernel(
        "handoff_address = [\"169.254.1.1\", \"169.254.1.2\"]"
    ))
    .contains("at most one IPv4"));
    // The route has IPv6 destinations: an IPv6 hand-off address is needed.
    assert!(err(&kernel("handoff_address = [\"169.254.1.1\"]"))
        .contains("add an IPv6 hand-off address"));
    let v4only = kernel("handoff_address = [\"169.254.1.1\"]")
        .replace("[linkerd]", "[listener]\nipv6 = false\n[linkerd]");
    assert!(Config::parse(&v4only, "t.toml").is_ok());
}
