//! `[linkerd] handoff = "kernel"` and the proxy's health, on a real kernel: etp in the router
//! namespace of the shared topology (`common::topo`), the Linkerd stand-in (which reads
//! `SO_ORIGINAL_DST` and drops what it cannot) listening on the hand-off addresses.
//!
//! Routes: `mesh` (10.96.0.10, fd00:10:96::a, TCP -> Linkerd) and `direct` (10.96.0.16/29,
//! fd00:10:96::14). Waits are bounded; the 3 s bounds are the issue's acceptance bar for the
//! health switch, not performance assertions.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Output;
use std::time::Duration;

use common::load::Load;
use common::topo::{
    curl, in_netns, metric, standin_lines, start_etp_with, start_standin_with, stop_etp, topo, Etp,
    Opts,
};
use common::{wait_for, Netns, TempFile};

const V4: &str = "169.254.15.1";
const V6: &str = "fd00:15::1";
const HANDOFF_LISTEN: [&str; 4] = ["--listen", V4, "--listen", V6];
/// The stand-in's admin port (`/ready`).
const READY_PORT: &str = "4191";

fn cfg(handoff: &str, local: bool, extra_linkerd: &str) -> String {
    format!(
        r#"
[listener]
port = 15001
local = {local}

[linkerd]
handoff = "{handoff}"
{extra_linkerd}

[limits]
connect_timeout_ms = 1000

[[route]]
name = "mesh"
protocols = ["tcp"]
destinations = ["10.96.0.10/32", "fd00:10:96::a/128"]
ports = ["1-65535"]
action = "linkerd"

[[route]]
name = "direct"
protocols = ["tcp"]
destinations = ["10.96.0.16/29", "fd00:10:96::14/128"]
ports = ["1-65535"]
action = "direct"

[[route]]
name = "udp"
protocols = ["udp"]
destinations = ["10.96.0.10/32", "fd00:10:96::a/128"]
ports = [53, 7001]
action = "direct"
"#
    )
}

fn opts() -> Opts {
    Opts {
        resync_seconds: 1,
        ..Opts::default()
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// curl's exit code and body (7: could not connect, i.e. reset or refused at the SYN).
fn curl_code(ns: &Netns, url: &str) -> (i32, String) {
    let o = ns.try_exec("curl", &["-sS", "-g", "--max-time", "3", url]);
    (o.status.code().unwrap_or(-1), text(&o))
}

/// The stand-in listening on the hand-off addresses (and loopback), with its `/ready`.
fn standin_with_ready(t: &common::topo::Topo, log: &TempFile, ready: &TempFile) -> common::Proc {
    let mut args = HANDOFF_LISTEN.to_vec();
    args.extend(["--ready-port", READY_PORT, "--ready-file", ready.as_str()]);
    start_standin_with(&t.router, log, &args, 4)
}

fn ready_url() -> String {
    format!("ready_url = \"http://127.0.0.1:{READY_PORT}/ready\"")
}

/// An echo exchange on an open connection.
fn echo(s: &mut TcpStream, msg: &[u8]) -> Result<(), String> {
    s.write_all(msg).map_err(|e| format!("write: {e}"))?;
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf).map_err(|e| format!("read: {e}"))?;
    if buf == msg {
        Ok(())
    } else {
        Err(format!("echoed {buf:?}"))
    }
}

/// A connection from the client namespace to `addr` (the echo server on 7001).
fn open(ns: &str, addr: &'static str) -> TcpStream {
    in_netns(ns, move || {
        let a: SocketAddr = addr.parse().unwrap();
        let s = TcpStream::connect_timeout(&a, Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    })
    .join()
    .expect("connect thread")
}

fn mesh_flows(m: &str) -> u64 {
    metric(
        m,
        r#"etp_flows_total{route="mesh",action="linkerd",proto="tcp"}"#,
    )
}

/// Three HTTP requests through route `mesh` from `ns`: IPv4, IPv6, IPv4 again; each answered.
fn three_mesh_requests(ns: &Netns) {
    for url in [
        "http://10.96.0.10:8080/",
        "http://[fd00:10:96::a]:8080/",
        "http://10.96.0.10:8080/",
    ] {
        let body = curl(ns, url);
        assert!(body.starts_with("hello from"), "{body}");
    }
}

fn status(etp: &Etp) -> String {
    etp.get("/status").1
}

#[test]
fn kernel_handoff_reaches_the_proxy_with_the_original_destination_v4_and_v6() {
    require_root!();
    let t = topo();
    let log = TempFile::new("standin.log", "");
    let _standin = start_standin_with(&t.router, &log, &HANDOFF_LISTEN, 4);
    let etp = start_etp_with(&t.router, &cfg("kernel", false, ""), opts());

    let body = curl(&t.client, "http://10.96.0.10:8080/");
    assert!(body.starts_with("hello from 10.96.0.10:8080"), "{body}");
    let body = curl(&t.client, "http://[fd00:10:96::a]:8080/");
    assert!(
        body.starts_with("hello from [fd00:10:96::a]:8080"),
        "{body}"
    );
    // A direct route is still etp's relay.
    let body = curl(&t.client, "http://10.96.0.20:8080/");
    assert!(body.starts_with("hello from 10.96.0.20:8080"), "{body}");

    let lines = standin_lines(&log);
    assert_eq!(lines.len(), 2, "{lines:?}");
    // The proxy accepted the client's own connection: its peer is the client.
    assert!(
        lines[0].starts_with("orig_dst=10.96.0.10:8080 peer=10.10.1.2:"),
        "{lines:?}"
    );
    assert!(
        lines[1].starts_with("orig_dst=[fd00:10:96::a]:8080 peer=[fd10:1::2]:"),
        "{lines:?}"
    );
    // etp relayed none of them.
    let log_text = etp.log_text();
    assert!(
        !log_text
            .lines()
            .any(|l| l.contains("accepted") && l.contains("route=mesh")),
        "{log_text}"
    );

    // The hand-off interface: audited, and repaired when someone removes it.
    let link = t.router.ip(&["-br", "addr", "show", "dev", "etp-handoff"]);
    assert!(link.contains(V4) && link.contains(V6), "{link}");
    let o = etp.cli(&["audit"]);
    assert!(o.status.success(), "audit: {}", text(&o));
    t.router.ip(&["link", "del", "etp-handoff"]);
    let back = wait_for(Duration::from_secs(10), || {
        let o = t
            .router
            .try_exec("ip", &["-br", "addr", "show", "dev", "etp-handoff"]);
        let s = String::from_utf8_lossy(&o.stdout).to_string();
        (s.contains(V4) && s.contains(V6)).then_some(())
    });
    assert!(
        back.is_some(),
        "hand-off interface not repaired: {}",
        etp.log_text()
    );
    let body = curl(&t.client, "http://10.96.0.10:8080/");
    assert!(body.starts_with("hello from 10.96.0.10:8080"), "{body}");

    let _ = stop_etp(etp);
    let o = t.router.try_exec("ip", &["link", "show", "etp-handoff"]);
    assert!(!o.status.success(), "hand-off interface left behind");
}

#[test]
fn kernel_handoff_of_node_local_connections() {
    require_root!();
    let t = topo();
    let log = TempFile::new("standin.log", "");
    let _standin = start_standin_with(&t.router, &log, &HANDOFF_LISTEN, 4);
    let etp = start_etp_with(&t.router, &cfg("kernel", true, ""), opts());
    let body = curl(&t.router, "http://10.96.0.10:8080/");
    assert!(body.starts_with("hello from 10.96.0.10:8080"), "{body}");
    let body = curl(&t.router, "http://[fd00:10:96::a]:8080/");
    assert!(
        body.starts_with("hello from [fd00:10:96::a]:8080"),
        "{body}"
    );
    let _ = stop_etp(etp);
    let lines = standin_lines(&log);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(
        lines[0].starts_with("orig_dst=10.96.0.10:8080 "),
        "{lines:?}"
    );
    assert!(
        lines[1].starts_with("orig_dst=[fd00:10:96::a]:8080 "),
        "{lines:?}"
    );
}

/// The hand-off never reaches a loopback-only listener: the "proxy" here listens on 127.0.0.1
/// and [::1] only (and says it is ready), so the DNAT to the hand-off address finds nothing,
/// and etp turned on no `route_localnet`.
#[test]
fn a_loopback_only_service_stays_unreachable_from_a_client() {
    require_root!();
    let t = topo();
    let log = TempFile::new("standin.log", "");
    let ready = TempFile::new("ready", "");
    let _standin = start_standin_with(
        &t.router,
        &log,
        &["--ready-port", READY_PORT, "--ready-file", ready.as_str()],
        2,
    );
    let etp = start_etp_with(&t.router, &cfg("kernel", false, &ready_url()), opts());
    assert!(
        status(&etp).contains("linkerd proxy: ready"),
        "{}",
        status(&etp)
    );
    for url in ["http://10.96.0.10:8080/", "http://[fd00:10:96::a]:8080/"] {
        let (code, out) = curl_code(&t.client, url);
        assert_ne!(code, 0, "{url} reached something: {out}");
    }
    assert_eq!(standin_lines(&log), Vec::<String>::new());
    let localnet = t
        .router
        .sh("cat /proc/sys/net/ipv4/conf/*/route_localnet | sort -u");
    assert_eq!(localnet.trim(), "0", "route_localnet was turned on");
    let _ = stop_etp(etp);
}

/// The proxy stops being ready (its /ready says 503, it keeps running): within 3 s new
/// connections of the linkerd route are reset at the SYN; the established one carries on; back
/// to ready, within 3 s new connections reach the proxy again.
fn refuse_and_back(handoff: &str) {
    let t = topo();
    let log = TempFile::new("standin.log", "");
    let ready = TempFile::new("ready", "");
    let _standin = standin_with_ready(&t, &log, &ready);
    let etp = start_etp_with(&t.router, &cfg(handoff, false, &ready_url()), opts());
    let mut held = open(&t.client.name, "10.96.0.10:7001");
    echo(&mut held, b"before").expect("established flow");

    std::fs::remove_file(&ready.path).unwrap();
    let refused = wait_for(Duration::from_secs(3), || {
        (curl_code(&t.client, "http://10.96.0.10:8080/").0 == 7).then_some(())
    });
    assert!(
        refused.is_some(),
        "not refused within 3 s: {}",
        etp.log_text()
    );
    let (code, out) = curl_code(&t.client, "http://[fd00:10:96::a]:8080/");
    assert_eq!(code, 7, "IPv6 not refused: {out}");
    echo(&mut held, b"during").expect("the established flow survives the switch");
    assert!(
        status(&etp).contains("linkerd proxy: unavailable"),
        "{}",
        status(&etp)
    );
    let m = etp.metrics();
    assert_eq!(
        metric(&m, r#"etp_proxy_switches_total{state="unavailable"}"#),
        1,
        "{m}"
    );
    assert_eq!(metric(&m, "etp_proxy_ready"), 0, "{m}");
    assert!(etp.log_text().contains("linkerd routes switched"));

    let before = standin_lines(&log).len();
    std::fs::write(&ready.path, "").unwrap();
    let back = wait_for(Duration::from_secs(3), || {
        let (_, body) = curl_code(&t.client, "http://10.96.0.10:8080/");
        (body.starts_with("hello from 10.96.0.10:8080") && standin_lines(&log).len() > before)
            .then_some(())
    });
    assert!(back.is_some(), "not back within 3 s: {}", etp.log_text());
    echo(&mut held, b"after").expect("the established flow survives the switch back");
    let m = stop_etp(etp);
    assert_eq!(
        metric(&m, r#"etp_proxy_switches_total{state="ready"}"#),
        1,
        "{m}"
    );
}

#[test]
fn kernel_handoff_refuses_while_the_proxy_is_not_ready() {
    require_root!();
    refuse_and_back("kernel");
}

#[test]
fn relay_handoff_refuses_while_the_proxy_is_not_ready() {
    require_root!();
    refuse_and_back("relay");
}

/// `when_unavailable = "direct"`: the proxy is killed; within 3 s the route's connections go
/// straight to their destination; it comes back; within 3 s they reach it again.
#[test]
fn kernel_handoff_goes_direct_while_the_proxy_is_down() {
    require_root!();
    let t = topo();
    let log = TempFile::new("standin.log", "");
    let mut standin = start_standin_with(&t.router, &log, &HANDOFF_LISTEN, 4);
    let etp = start_etp_with(
        &t.router,
        &cfg("kernel", false, "when_unavailable = \"direct\""),
        opts(),
    );
    let body = curl(&t.client, "http://10.96.0.10:8080/");
    assert!(body.starts_with("hello from 10.96.0.10:8080"), "{body}");
    assert_eq!(standin_lines(&log).len(), 1);

    let _ = standin.kill_output();
    let direct = wait_for(Duration::from_secs(3), || {
        let (code, body) = curl_code(&t.client, "http://10.96.0.10:8080/");
        (code == 0 && body.starts_with("hello from 10.96.0.10:8080")).then_some(())
    });
    assert!(
        direct.is_some(),
        "not direct within 3 s: {}",
        etp.log_text()
    );
    let (code, body) = curl_code(&t.client, "http://[fd00:10:96::a]:8080/");
    assert_eq!(code, 0, "{body}");
    // Held while direct: it must survive the switch back.
    let mut held = open(&t.client.name, "10.96.0.10:7001");
    echo(&mut held, b"direct").expect("direct flow");
    assert_eq!(standin_lines(&log).len(), 1, "went through no proxy");

    let _standin = start_standin_with(&t.router, &log, &HANDOFF_LISTEN, 4);
    let back = wait_for(Duration::from_secs(3), || {
        let _ = curl_code(&t.client, "http://10.96.0.10:8080/");
        (standin_lines(&log).len() > 1).then_some(())
    });
    assert!(back.is_some(), "not back within 3 s: {}", etp.log_text());
    echo(&mut held, b"still").expect("the direct flow survives the switch back");
    let _ = stop_etp(etp);
}

/// Reloads between `relay` and `kernel` while short and long-lived connections flow through
/// the linkerd route (and others): nothing fails, nothing breaks.
#[test]
fn reload_between_handoff_modes_under_load_fails_nothing() {
    require_root!();
    let t = topo();
    let log = TempFile::new("standin.log", "");
    let _standin = start_standin_with(&t.router, &log, &HANDOFF_LISTEN, 4);
    let etp = start_etp_with(&t.router, &cfg("relay", false, ""), opts());
    let load = Load::start(&t.client.name);
    assert!(
        load.wait_progress(Duration::from_secs(10)),
        "traffic did not start"
    );
    for i in 0..10 {
        let mode = if i % 2 == 0 { "kernel" } else { "relay" };
        etp.write_config(&cfg(mode, false, ""));
        etp.proc.signal("HUP");
        std::thread::sleep(Duration::from_millis(400));
    }
    std::thread::sleep(Duration::from_millis(500));
    let r = load.finish();
    eprintln!("mode reloads: {r:?}");
    assert!(r.short_ok >= 50, "too little traffic: {r:?}");
    assert!(r.short_ok_mesh >= 10, "too little mesh traffic: {r:?}");
    assert_eq!(r.short_failed, 0, "failed short connections: {r:?}");
    assert_eq!(r.long_broken, 0, "broken long-lived flows: {r:?}");
    assert_eq!(r.udp_lost, 0, "{r:?}");
    let m = stop_etp(etp);
    assert_eq!(metric(&m, r#"etp_reloads_total{result="error"}"#), 0, "{m}");
    assert!(metric(&m, r#"etp_reloads_total{result="ok"}"#) >= 1, "{m}");
    // Every stand-in line is a connection with its original destination intact.
    let lines = standin_lines(&log);
    assert!(
        lines.iter().all(|l| l.starts_with("orig_dst=")),
        "{lines:?}"
    );
}

/// `-v=2` logs one line per finished kernel hand-off, from conntrack's events, with the route
/// and the bytes; the per-route metrics count them.
#[test]
fn kernel_handoff_flows_are_logged_with_route_and_bytes() {
    require_root!();
    let t = topo();
    let log = TempFile::new("standin.log", "");
    let _standin = start_standin_with(&t.router, &log, &HANDOFF_LISTEN, 4);
    let o = Opts {
        args: ["run", "-c", "CFG", "-v=2"].map(String::from).to_vec(),
        rust_log: None,
        ..opts()
    };
    assert_eq!(acct(&t.router), "0", "a new namespace counts no bytes");
    let etp = start_etp_with(&t.router, &cfg("kernel", false, ""), o);
    assert_eq!(
        acct(&t.router),
        "1",
        "etp turns on conntrack accounting for the flow log"
    );
    three_mesh_requests(&t.client);
    let lines = wait_for(Duration::from_secs(20), || {
        let l: Vec<String> = etp
            .log_text()
            .lines()
            .filter(|l| l.contains("closed (kernel hand-off)"))
            .map(str::to_string)
            .collect();
        (l.len() >= 3).then_some(l)
    })
    .unwrap_or_else(|| panic!("no flow lines: {}", etp.log_text()));
    eprintln!("flow lines: {lines:#?}");
    assert_eq!(lines.len(), 3, "one line per flow: {lines:?}");
    for l in &lines {
        assert!(l.contains("route=mesh"), "{l}");
        assert!(
            l.contains("client=10.10.1.2:") || l.contains("client=[fd10:1::2]:"),
            "{l}"
        );
        assert!(
            l.contains("orig_dst=10.96.0.10:8080") || l.contains("orig_dst=[fd00:10:96::a]:8080"),
            "{l}"
        );
        let bytes = |k: &str| -> u64 {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{k} in {l}"))
        };
        assert!(bytes("bytes_to_upstream=") > 0, "{l}");
        assert!(bytes("bytes_to_client=") > 0, "{l}");
    }
    let m = etp.metrics();
    assert_eq!(mesh_flows(&m), 3, "{m}");
    assert!(
        metric(
            &m,
            r#"etp_bytes_total{route="mesh",direction="upstream_to_client"}"#
        ) > 0,
        "{m}"
    );
    let _ = stop_etp(etp);
    assert_eq!(
        acct(&t.router),
        "0",
        "etp puts the namespace's sysctl back when it stops"
    );
}

fn acct(ns: &Netns) -> String {
    ns.sh("cat /proc/sys/net/netfilter/nf_conntrack_acct")
        .trim()
        .to_string()
}

/// Without flow lines in the log (`info`), etp reads no conntrack events (they cost a third of
/// the connection rate) and turns nothing on; `etp_kernel_handoffs` still counts the route's
/// hand-offs, from the counters of its labelling rules.
#[test]
fn kernel_handoffs_without_flow_log_are_counted_by_the_ruleset() {
    require_root!();
    let t = topo();
    let log = TempFile::new("standin.log", "");
    let _standin = start_standin_with(&t.router, &log, &HANDOFF_LISTEN, 4);
    let o = Opts {
        rust_log: Some("etp=info".to_string()),
        ..opts()
    };
    let etp = start_etp_with(&t.router, &cfg("kernel", false, ""), o);
    three_mesh_requests(&t.client);
    assert_eq!(standin_lines(&log).len(), 3);
    let want = r#"etp_kernel_handoffs{route="mesh"}"#;
    let counted = wait_for(Duration::from_secs(10), || {
        let m = etp.metrics();
        (metric(&m, want) == 3).then_some(())
    });
    assert!(counted.is_some(), "{}", etp.metrics());
    assert_eq!(acct(&t.router), "0", "no flow log, no accounting");
    let log_text = etp.log_text();
    assert!(
        !log_text.contains("conntrack") && !log_text.contains("closed (kernel hand-off)"),
        "{log_text}"
    );
    let _ = stop_etp(etp);
}
