//! etp's hand-off against a real linkerd2-proxy, not the stand-in: client ns -- router ns (etp,
//! linkerd2-proxy as uid 2102, a fake control plane on loopback) -- server ns.
//!
//! Needs `ETP_LINKERD2_PROXY` (a linkerd2-proxy binary) and `ETP_LINKERD_CONTROL` (the fake
//! control plane, `integration/linkerd-control`); `make test-linkerd` builds the second and
//! sets both. Without them each test prints why it was skipped and passes.
//!
//! The control plane answers `NotFound` to every outbound policy lookup, so the proxy forwards
//! each connection to its original destination (after protocol detection); the assertions
//! are the client's answers, the proxy's own metrics (`tcp_open_total` by `target_addr`) and
//! the policy lookups the control plane saw, both naming the client's original destination.

mod common;

use std::time::Duration;

use common::linkerd_proxy::{binaries, outbound_opens, RealProxy, PROXY_ADMIN};
use common::topo::{
    curl, handoff_exchanges, kit_ok, metric, spawn_etp, start_etp, stop_etp, topo, Opts, Topo,
    HANDOFF_DESTINATIONS,
};
use common::wait_for;

const CFG: &str = r#"
[listener]
port = 15001
ipv6 = true

[limits]
connect_timeout_ms = 2000

[[route]]
name = "mesh"
protocols = ["tcp"]
destinations = ["10.96.0.10/32", "fd00:10:96::a/128"]
ports = ["1-65535"]
action = "linkerd"
"#;

/// The binaries, or return from the test after saying why it was skipped.
macro_rules! require_real_proxy {
    () => {
        match binaries() {
            Ok(b) => b,
            Err(why) => {
                eprintln!("skipped: needs a real linkerd2-proxy: {why}");
                return;
            }
        }
    };
}

/// The hand-off exchanges through etp and the proxy, then what the proxy and its control
/// plane saw: one outbound connection per original destination, and a policy lookup for it.
fn exchanges_through_the_proxy(t: &Topo, proxy: &RealProxy) {
    handoff_exchanges(&t.client);

    let m = proxy.metrics();
    let lines = proxy.control_lines();
    for dst in HANDOFF_DESTINATIONS {
        let seen: Vec<&str> = m.lines().filter(|l| l.contains(dst)).collect();
        assert_eq!(
            outbound_opens(&m, dst),
            1,
            "the proxy's outbound listener did not count one connection to {dst}: {seen:#?}"
        );
        let asked = format!("policy target={dst} ");
        assert!(
            lines.iter().any(|l| l.starts_with(&asked)),
            "the proxy asked no policy for {dst}: {lines:#?}"
        );
    }
}

#[test]
fn relay_handoff_reaches_the_real_proxy_with_the_original_destination() {
    require_root!();
    let bins = require_real_proxy!();
    let t = topo();
    let proxy = RealProxy::start(&t.router, &bins);
    let etp = start_etp(&t.router, CFG);

    exchanges_through_the_proxy(&t, &proxy);

    let m = stop_etp(etp);
    assert_eq!(
        metric(
            &m,
            r#"etp_flows_total{route="mesh",action="linkerd",proto="tcp"}"#
        ),
        HANDOFF_DESTINATIONS.len() as u64,
        "{m}"
    );
    assert!(!m.contains("etp_upstream_errors_total{"), "{m}");
}

/// With `local = true` etp also intercepts connections that start on the node itself, and
/// the real proxy's own connections (uid 2102: its upstream legs and its control-plane
/// calls) must not be intercepted again; and a burst of concurrent hand-offs all arrive.
#[test]
fn local_traffic_and_a_burst_reach_the_real_proxy() {
    require_root!();
    let bins = require_real_proxy!();
    let t = topo();
    let proxy = RealProxy::start(&t.router, &bins);
    let etp = start_etp(
        &t.router,
        &CFG.replace("ipv6 = true", "ipv6 = true\nlocal = true"),
    );

    // From the router namespace itself (the node), IPv4 and IPv6.
    let body = curl(&t.router, "http://10.96.0.10:8080/");
    assert!(body.starts_with("hello from 10.96.0.10:8080"), "{body}");
    let raw = "\u{1}node\r\nnot http";
    assert_eq!(
        kit_ok(&t.router, &["echo", "[fd00:10:96::a]:7001", raw]),
        raw
    );
    // 200 connections open at once from the client, each echoing a line.
    kit_ok(&t.client, &["many", "10.96.0.10:7001", "200"]);

    let m = proxy.metrics();
    assert_eq!(outbound_opens(&m, "10.96.0.10:8080"), 1, "{m}");
    assert_eq!(outbound_opens(&m, "[fd00:10:96::a]:7001"), 1, "{m}");
    assert_eq!(outbound_opens(&m, "10.96.0.10:7001"), 200, "{m}");
    let em = stop_etp(etp);
    // Exactly the 202 client connections: none of the proxy's own was intercepted again.
    assert_eq!(
        metric(
            &em,
            r#"etp_flows_total{route="mesh",action="linkerd",proto="tcp"}"#
        ),
        202,
        "{em}"
    );
}

/// The `LINKERD2_PROXY_*` variables that deploy/kubernetes/linkerd-node-proxy.yaml gives the
/// node proxy as literal values, with Kubernetes' `$(VAR)` references expanded as for a pod
/// `linkerd-node-proxy-t` of service account `linkerd-node-proxy` in `etp-system`.
fn daemonset_proxy_env() -> Vec<(String, String)> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/kubernetes/linkerd-node-proxy.yaml");
    let text = std::fs::read_to_string(&path).expect("read the node proxy manifest");
    let mut vars = Vec::new();
    let mut name: Option<&str> = None;
    for line in text.lines().map(str::trim) {
        if let Some(n) = line.strip_prefix("- name: ") {
            name = Some(n);
            continue;
        }
        // `value:` right after its `name:`; `valueFrom:` entries are left out.
        if let (Some(n), Some(v)) = (name.take(), line.strip_prefix("value: ")) {
            if n.starts_with("LINKERD2_PROXY_") {
                let v = v.trim_matches(|c| c == '"' || c == '\'');
                let v = v
                    .replace("$(_pod_ns)", "etp-system")
                    .replace("$(_pod_name)", "linkerd-node-proxy-t")
                    .replace("$(_pod_nodeName)", "node-1")
                    .replace("$(_pod_sa)", "linkerd-node-proxy");
                vars.push((n.to_string(), v));
            }
        }
    }
    vars
}

/// The node proxy's environment as deploy/kubernetes ships it (cluster networks, profile
/// networks, a `deny` inbound default, its listen addresses) is accepted by the real proxy and
/// carries etp's hand-off; only the control plane's addresses and the identity documents are
/// the test's.
#[test]
fn the_shipped_node_proxy_environment_carries_the_handoff() {
    require_root!();
    let bins = require_real_proxy!();
    let env = daemonset_proxy_env();
    let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    // The manifest's identity is the one the fake control plane certifies.
    assert_eq!(
        get("LINKERD2_PROXY_IDENTITY_LOCAL_NAME"),
        Some(common::linkerd_proxy::LOCAL_NAME),
        "{env:#?}"
    );
    assert!(env.len() >= 15, "too few variables parsed: {env:#?}");
    let t = topo();
    // The kubelet's probes (and Prometheus) reach the admin server at the node's address.
    let proxy = RealProxy::start_with(&t.router, &bins, &env, "10.10.2.1:4191");
    let etp = start_etp(&t.router, CFG);

    exchanges_through_the_proxy(&t, &proxy);
    stop_etp(etp);
}

/// `[linkerd] handoff = "kernel"`: etp's ruleset DNATs the client's own connection to the
/// hand-off addresses, where the real proxy listens (instead of loopback: it takes two outbound
/// addresses at most); the proxy's `SO_ORIGINAL_DST` must still be the client's destination.
#[test]
fn kernel_handoff_reaches_the_real_proxy_with_the_original_destination() {
    require_root!();
    let bins = require_real_proxy!();
    let t = topo();
    let cfg = CFG.replace(
        "[limits]",
        &format!("[linkerd]\nhandoff = \"kernel\"\nready_url = \"http://{PROXY_ADMIN}/ready\"\n\n[limits]"),
    );
    // etp first: it creates the hand-off addresses, and the proxy exits when it cannot bind
    // its outbound listener.
    let etp = spawn_etp(&t.router, &cfg, Opts::default());
    let addrs = wait_for(Duration::from_secs(20), || {
        let out = t
            .router
            .try_exec("ip", &["addr", "show", "dev", "etp-handoff"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (text.contains("169.254.15.1/") && text.contains("fd00:15::1/")).then_some(())
    });
    assert!(
        addrs.is_some(),
        "no hand-off addresses; etp log:\n{}",
        etp.log_text()
    );
    let env = [(
        "LINKERD2_PROXY_OUTBOUND_LISTEN_ADDRS".to_string(),
        "169.254.15.1:4140,[fd00:15::1]:4140".to_string(),
    )];
    let proxy = RealProxy::start_with(&t.router, &bins, &env, PROXY_ADMIN);
    etp.wait_ready();
    // etp hands flows over only once it has seen the proxy ready (`ready_url`).
    let ready = wait_for(Duration::from_secs(20), || {
        (metric(&etp.metrics(), "etp_proxy_ready") == 1).then_some(())
    });
    assert!(
        ready.is_some(),
        "etp never saw the proxy ready:\n{}",
        etp.log_text()
    );

    exchanges_through_the_proxy(&t, &proxy);
    stop_etp(etp);
}
