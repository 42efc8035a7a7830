//! The data path on a real kernel: client ns -- router ns (etp, Linkerd stand-in) -- server ns,
//! IPv4 and IPv6 on every link. The topology, servers and etp start-up live in
//! `common::topo`; etp runs as the real daemon (`etp run -c CFG`) and the tests read its
//! counters from the admin endpoint. Every client call has a timeout; no assertion depends on
//! timing.

mod common;

use std::time::Duration;

use common::topo::{
    curl, dig, handoff_exchanges, kit, kit_ok, metric, standin_lines, start_etp, start_standin,
    stop_etp, sum, topo, wait_listening, HANDOFF_DESTINATIONS,
};
use common::{Netns, TempFile};

const CFG: &str = r#"
[listener]
port = 15001
ipv6 = true
local = LOCAL

[bypass]
destinations = ["10.96.0.22/32"]

[limits]
connect_timeout_ms = 1000

[[route]]
name = "mesh"
protocols = ["tcp"]
destinations = ["10.96.0.10/32", "fd00:10:96::a/128"]
ports = ["1-65535"]
action = "linkerd"

[[route]]
name = "keep"
protocols = ["tcp"]
destinations = ["10.96.0.21/32", "fd00:10:96::15/128"]
ports = [8080]
action = "direct"
preserve_source = true

[[route]]
name = "direct"
protocols = ["tcp"]
destinations = ["10.96.0.16/29", "fd00:10:96::14/128"]
ports = ["1-65535"]
action = "direct"

[[route]]
name = "fwd4"
protocols = ["tcp", "udp"]
destinations = ["10.96.0.30/32"]
ports = [7001]
action = "forward"
forward_to = "10.10.2.2:7001"

[[route]]
name = "fwd6"
protocols = ["tcp", "udp"]
destinations = ["fd00:10:96::1e/128"]
ports = [7001]
action = "forward"
forward_to = "[fd10:2::2]:7001"

[[route]]
name = "dnsfwd4"
protocols = ["udp"]
destinations = ["10.96.0.30/32"]
ports = [53]
action = "forward"
forward_to = "10.10.2.2:53"

[[route]]
name = "dnsfwd6"
protocols = ["udp"]
destinations = ["fd00:10:96::1e/128"]
ports = [53]
action = "forward"
forward_to = "[fd10:2::2]:53"

[[route]]
name = "udp"
protocols = ["udp"]
destinations = ["10.96.0.10/32", "fd00:10:96::a/128"]
ports = [53, 7001]
action = "direct"
"#;

fn cfg(local: bool) -> String {
    CFG.replace("LOCAL", if local { "true" } else { "false" })
}

#[test]
fn linkerd_handoff_keeps_the_original_destination() {
    require_root!();
    let t = topo();
    let log = TempFile::new("standin.log", "");
    let _standin = start_standin(&t.router, &log);
    let etp = start_etp(&t.router, &cfg(false));

    handoff_exchanges(&t.client);

    let m = stop_etp(etp);
    let lines = standin_lines(&log);
    for dst in HANDOFF_DESTINATIONS {
        let want = format!("orig_dst={dst} ");
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&want) && l.ends_with("uid=2102")),
            "stand-in did not see {want}: {lines:?}"
        );
    }
    // No loop: one hand-off per client connection, none dropped; the stand-in's own
    // upstream connections were not intercepted again.
    let n = HANDOFF_DESTINATIONS.len() as u64;
    assert_eq!(lines.len() as u64, n, "{lines:?}");
    assert!(!lines.iter().any(|l| l.starts_with("dropped")), "{lines:?}");
    assert_eq!(
        metric(
            &m,
            r#"etp_flows_total{route="mesh",action="linkerd",proto="tcp"}"#
        ),
        n,
        "{m}"
    );
    assert_eq!(sum(&m, "etp_flows_total{"), n, "no other flows: {m}");
    assert!(!m.contains("etp_upstream_errors_total{"), "{m}");
}

#[test]
fn direct_forward_bypass_and_bulk() {
    require_root!();
    let t = topo();
    // 10.96.0.23 is silently dropped by the server: connects to it time out.
    t.server.nft(&["add", "table", "inet", "t"]);
    t.server.nft(&[
        "add",
        "chain",
        "inet",
        "t",
        "in",
        "{ type filter hook prerouting priority 0; }",
    ]);
    t.server.nft(&[
        "add",
        "rule",
        "inet",
        "t",
        "in",
        "ip",
        "daddr",
        "10.96.0.23",
        "drop",
    ]);
    let etp = start_etp(&t.router, &cfg(false));

    // direct: the server sees etp's connection from the router.
    let body = curl(&t.client, "http://10.96.0.20:8080/");
    assert!(
        body.starts_with("hello from 10.96.0.20:8080 to 10.10.2.1:"),
        "{body}"
    );
    let body = curl(&t.client, "http://[fd00:10:96::14]:8080/");
    assert!(
        body.starts_with("hello from [fd00:10:96::14]:8080 to [fd10:2::1]:"),
        "{body}"
    );
    // direct with preserve_source: the server sees the client's own address (its replies
    // route back through the router, where `socket transparent` hands them to etp).
    let body = curl(&t.client, "http://10.96.0.21:8080/");
    assert!(
        body.starts_with("hello from 10.96.0.21:8080 to 10.10.1.2:"),
        "{body}"
    );
    let body = curl(&t.client, "http://[fd00:10:96::15]:8080/");
    assert!(
        body.starts_with("hello from [fd00:10:96::15]:8080 to [fd10:1::2]:"),
        "{body}"
    );
    // bypass: not intercepted, so the server sees the client and etp counts nothing for it.
    let body = curl(&t.client, "http://10.96.0.22:8080/");
    assert!(
        body.starts_with("hello from 10.96.0.22:8080 to 10.10.1.2:"),
        "{body}"
    );

    // forward: 10.96.0.30 exists nowhere; etp forwards to the server's 7001 (echo), and the
    // client's socket still talks to 10.96.0.30.
    assert_eq!(
        kit_ok(&t.client, &["echo", "10.96.0.30:7001", "fwd4"]),
        "fwd4"
    );
    assert_eq!(
        kit_ok(&t.client, &["echo", "[fd00:10:96::1e]:7001", "fwd6"]),
        "fwd6"
    );
    let b = kit_ok(&t.client, &["banner", "10.96.0.20:7002"]);
    assert!(
        b.starts_with("banner from 10.96.0.20:7002 to 10.10.2.1:"),
        "{b}"
    );

    // 100 MB each way, byte-identical (the hash is compared on the receiving side).
    let up = kit_ok(&t.client, &["upload", "10.96.0.20:7003", "104857600"]);
    assert!(up.starts_with("ok len=104857600"), "{up}");
    let down = kit_ok(
        &t.client,
        &["download", "[fd00:10:96::14]:7004", "104857600"],
    );
    assert!(down.starts_with("ok len=104857600"), "{down}");

    // Refused upstream (nothing on port 9): the client gets a reset, not a hang or a FIN.
    let out = kit(&t.client, &["echo", "10.96.0.20:9", "x"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("reset"), "{err}");
    // Unanswered upstream: after limits.connect_timeout the client gets a reset.
    let out = kit(&t.client, &["echo", "10.96.0.23:7001", "x"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("reset"), "{err}");

    let m = stop_etp(etp);
    let flows = |route: &str, action: &str| {
        metric(
            &m,
            &format!(r#"etp_flows_total{{route="{route}",action="{action}",proto="tcp"}}"#),
        )
    };
    assert_eq!(flows("direct", "direct"), 7, "{m}");
    assert_eq!(flows("keep", "direct"), 2, "{m}");
    assert_eq!(flows("fwd4", "forward"), 1, "{m}");
    assert_eq!(flows("fwd6", "forward"), 1, "{m}");
    let errors = |kind: &str| {
        metric(
            &m,
            &format!(r#"etp_upstream_errors_total{{route="direct",kind="{kind}"}}"#),
        )
    };
    assert_eq!((errors("refused"), errors("timeout")), (1, 1), "{m}");
    assert!(
        metric(
            &m,
            r#"etp_bytes_total{route="direct",direction="client_to_upstream"}"#
        ) >= 104_857_600
    );
    assert!(
        metric(
            &m,
            r#"etp_bytes_total{route="direct",direction="upstream_to_client"}"#
        ) >= 104_857_600
    );
}

#[test]
fn a_thousand_concurrent_connections_complete() {
    require_root!();
    let t = topo();
    let etp = start_etp(&t.router, &cfg(false));
    let out = kit_ok(&t.client, &["many", "10.96.0.20:7001", "1000"]);
    assert_eq!(out, "ok 1000");
    let m = stop_etp(etp);
    assert_eq!(
        metric(
            &m,
            r#"etp_flows_total{route="direct",action="direct",proto="tcp"}"#
        ),
        1000,
        "{m}"
    );
    assert_eq!(metric(&m, "etp_accept_errors_total"), 0);
}

#[test]
fn udp_direct_and_forward_dns_and_big_datagrams() {
    require_root!();
    let t = topo();
    let etp = start_etp(&t.router, &cfg(false));
    // direct: dnsmasq listens on the service addresses themselves.
    assert_eq!(dig(&t.client, "10.96.0.10"), "10.1.2.3");
    assert_eq!(dig(&t.client, "fd00:10:96::a"), "10.1.2.3");
    // forward: 10.96.0.30 exists nowhere; the answer still comes from it.
    assert_eq!(dig(&t.client, "10.96.0.30"), "10.1.2.3");
    assert_eq!(dig(&t.client, "fd00:10:96::1e"), "10.1.2.3");
    // A raw client checks the reply source itself; 60 KiB datagrams arrive whole.
    for addr in [
        "10.96.0.10:7001",
        "[fd00:10:96::a]:7001",
        "10.96.0.30:7001",
        "[fd00:10:96::1e]:7001",
    ] {
        let out = kit_ok(&t.client, &["udp", addr, "61440"]);
        assert_eq!(out, format!("ok from={addr} len=61440"));
    }
    let m = stop_etp(etp);
    let udp = |route: &str, action: &str| {
        metric(
            &m,
            &format!(r#"etp_flows_total{{route="{route}",action="{action}",proto="udp"}}"#),
        )
    };
    assert_eq!(udp("udp", "direct"), 4, "{m}");
    assert_eq!(
        udp("dnsfwd4", "forward") + udp("dnsfwd6", "forward"),
        2,
        "{m}"
    );
    assert_eq!(udp("fwd4", "forward") + udp("fwd6", "forward"), 2, "{m}");
    assert!(!m.contains("etp_udp_dropped_total{"), "{m}");
}

#[test]
fn local_true_intercepts_the_router_itself() {
    require_root!();
    let t = topo();
    let log = TempFile::new("standin.log", "");
    let _standin = start_standin(&t.router, &log);
    let etp = start_etp(&t.router, &cfg(true));
    // A client in the router namespace: direct route.
    assert_eq!(
        kit_ok(&t.router, &["echo", "10.96.0.20:7001", "local"]),
        "local"
    );
    assert_eq!(
        kit_ok(&t.router, &["echo", "[fd00:10:96::14]:7001", "local6"]),
        "local6"
    );
    // Linkerd route from the router itself: handed to the stand-in, whose own connections
    // (uid 2102) are not intercepted again.
    let body = curl(&t.router, "http://10.96.0.10:8080/");
    assert!(body.starts_with("hello from 10.96.0.10:8080"), "{body}");
    // Routed clients still work with local = true.
    let body = curl(&t.client, "http://[fd00:10:96::a]:8080/");
    assert!(
        body.starts_with("hello from [fd00:10:96::a]:8080"),
        "{body}"
    );
    let m = stop_etp(etp);
    let lines = standin_lines(&log);
    assert_eq!(
        lines.len(),
        2,
        "one hand-off per client connection: {lines:?}"
    );
    assert!(
        lines[0].starts_with("orig_dst=10.96.0.10:8080"),
        "{lines:?}"
    );
    assert_eq!(
        metric(
            &m,
            r#"etp_flows_total{route="direct",action="direct",proto="tcp"}"#
        ),
        2,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            r#"etp_flows_total{route="mesh",action="linkerd",proto="tcp"}"#
        ),
        2,
        "{m}"
    );
    drop(t.server);
}

#[test]
fn listener_errors_name_the_cause() {
    require_root!();
    let ns = Netns::new("lst");
    let cfg = TempFile::new("etp.toml", &cfg(false));
    // Without capabilities (nobody, no caps), IP_TRANSPARENT is refused.
    let out = ns.try_exec(
        "setpriv",
        &[
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            common::etp_bin().to_str().unwrap(),
            "run",
            "-c",
            cfg.as_str(),
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("IP_TRANSPARENT") && err.contains("CAP_NET_ADMIN"),
        "{err}"
    );
    // Port taken.
    let _holder = ns.spawn("socat", &["TCP-LISTEN:15001,bind=0.0.0.0,reuseaddr", "-"]);
    wait_listening(&ns, "-Hltn", "sport = :15001", 1);
    let out = ns.try_exec(
        common::etp_bin().to_str().unwrap(),
        &["run", "-c", cfg.as_str()],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("binding the tcp listener to 0.0.0.0:15001"),
        "{err}"
    );
}

#[test]
fn drain_deadline_closes_open_flows() {
    require_root!();
    let t = topo();
    // drain_seconds = 1 (the default in `common::topo::Opts`).
    let mut etp = start_etp(&t.router, &cfg(false));
    // A flow that stays open: the banner arrives, then the client just waits.
    let mut held = t
        .client
        .spawn("socat", &["-u", "TCP:10.96.0.20:7002", "STDOUT"]);
    wait_listening(&t.server, "-Htn", "sport = :7002", 1);
    let m = etp.metrics();
    let flows = |m: &str, what: &str| {
        metric(
            m,
            &format!(r#"etp_flows_{what}{{route="direct",action="direct",proto="tcp"}}"#),
        )
    };
    assert_eq!((flows(&m, "total"), flows(&m, "active")), (1, 1), "{m}");
    let (status, _) = etp.terminate();
    assert!(status.success(), "{status}: {}", etp.log_text());
    let out = held
        .wait_timeout(Duration::from_secs(10))
        .expect("the client sees its connection closed by the drain");
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("banner from 10.96.0.20:7002"),
        "{out:?}"
    );
    let log = etp.log_text();
    assert!(
        log.contains("drain deadline reached: closing remaining flows flows=1"),
        "{log}"
    );
}

/// `limits.max_udp_flows` bounds the UDP flow table: a new flow beyond it evicts the oldest,
/// every query is still answered (a new flow starts for the evicted client if it sends again),
/// and the evictions are counted.
#[test]
fn udp_flow_limit_evicts_the_oldest_and_keeps_answering() {
    require_root!();
    let t = topo();
    let body = cfg(false).replace(
        "connect_timeout_ms = 1000",
        "connect_timeout_ms = 1000\nmax_udp_flows = 2\nudp_idle_seconds = 30",
    );
    let etp = start_etp(&t.router, &body);
    // Each dig uses a fresh source port: 5 flows through a table of 2.
    for _ in 0..5 {
        assert_eq!(dig(&t.client, "10.96.0.10"), "10.1.2.3");
    }
    let m = stop_etp(etp);
    assert!(metric(&m, "etp_udp_evictions_total") >= 3, "{m}");
    assert_eq!(
        metric(
            &m,
            r#"etp_flows_total{route="udp",action="direct",proto="udp"}"#
        ),
        5,
        "{m}"
    );
}
