//! Hostile traffic against the kernel side of etp (issue 8): the self-loop guard and the
//! per-source limits in etp's table, on the real kernel in the client -- router -- server
//! topology (`common::topo`). The client namespace gets a second address so that a noisy source
//! and a quiet one can be told apart. Every loop is bounded in count and time; no assertion is
//! a performance threshold: "served" means answered before a client timeout, "refused" means a
//! reset (ECONNREFUSED), which a hang in a backlog can never produce.

mod common;

use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use common::topo::{dig, in_netns, metric, start_etp, start_etp_with, sum, topo, Opts};
use common::Netns;

/// The quiet client keeps the topology's address; the noisy one gets a second address.
const QUIET: &str = "10.10.1.2";
const NOISY: &str = "10.10.1.3";
const ROUTER: &str = "10.10.1.1";

fn cfg(limits: &str) -> String {
    format!(
        r#"
[listener]
port = 15001
ipv6 = true

[limits]
connect_timeout_ms = 1000
{limits}

[[route]]
name = "echo"
protocols = ["tcp"]
destinations = ["10.96.0.20/32"]
ports = [7001]
action = "direct"

[[route]]
name = "dns"
protocols = ["udp", "tcp"]
destinations = ["10.96.0.10/32"]
ports = [53]
action = "direct"
"#
    )
}

/// The packet counter of the first rule of etp's prerouting chain whose comment is `comment`
/// (0 when there is no such rule, so that a run without the rules fails on the behaviour).
fn rule_packets(ns: &Netns, comment: &str) -> u64 {
    let text = ns.nft(&["list", "chain", "inet", "etp", "prerouting"]);
    let Some(line) = text
        .lines()
        .find(|l| l.contains(&format!("comment \"{comment}\"")))
    else {
        eprintln!("no rule {comment:?} in:\n{text}");
        return 0;
    };
    let after = line.split("counter packets ").nth(1).expect("counter");
    after
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("packet count")
}

/// `dig` for etp.test at the service address through etp, with `extra` flags: its answer, or ""
/// when the query timed out (3 s; dig then exits non-zero, an unanswered query).
fn try_dig(ns: &Netns, extra: &[&str]) -> String {
    let mut args = extra.to_vec();
    args.extend([
        "+short",
        "+time=3",
        "+tries=1",
        "@10.96.0.10",
        "etp.test",
        "A",
    ]);
    let out = ns.try_exec("dig", &args);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A TCP connection from `src` to `dst` made inside `ns` (read timeout `timeout`), or the
/// connect error.
fn connect_in(ns: &Netns, src: &str, dst: &str, timeout: Duration) -> std::io::Result<TcpStream> {
    let (src, dst) = (src.to_string(), dst.to_string());
    in_netns(&ns.name, move || {
        let s = common::topo::connect_from(&src, &dst, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        Ok(s)
    })
    .join()
    .expect("connect thread")
}

fn echo(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    s.write_all(msg)?;
    let mut buf = vec![0; msg.len()];
    s.read_exact(&mut buf)?;
    Ok(buf)
}

#[test]
fn flows_addressed_to_the_node_itself_on_the_listener_port_are_refused() {
    require_root!();
    let t = topo();
    let etp = start_etp(&t.router, &cfg(""));
    let listener = format!("{ROUTER}:15001");

    // TCP from the client to the router's own address on the listener port: a reset.
    let started = Instant::now();
    let err = connect_in(&t.client, QUIET, &listener, Duration::from_secs(3))
        .expect_err("a connection to the router's listener port must be refused");
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{err} after {:?}",
        started.elapsed()
    );
    // IPv6, and from the router itself, over loopback and its own addresses.
    let err = connect_in(
        &t.client,
        "fd10:1::2",
        "[fd10:1::1]:15001",
        Duration::from_secs(3),
    )
    .expect_err("an IPv6 connection to the router's listener port must be refused");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    for (src, dst) in [
        ("0.0.0.0", "127.0.0.1:15001"),
        ("0.0.0.0", "10.10.2.1:15001"),
        ("::", "[::1]:15001"),
    ] {
        let err = connect_in(&t.router, src, dst, Duration::from_secs(3))
            .expect_err("a local connection to the listener port must be refused");
        assert_eq!(
            err.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "{dst}: {err}"
        );
    }
    assert!(
        rule_packets(
            &t.router,
            "etp: tcp for the listener port at a local address refused"
        ) >= 5
    );

    // UDP: a datagram to the router's own address on the listener port is dropped before it
    // reaches etp, so no reply socket is ever bound to a local address.
    let sock = in_netns(&t.client.name, || {
        let s = UdpSocket::bind(format!("{QUIET}:0")).unwrap();
        s.send_to(b"hello etp", format!("{ROUTER}:15001")).unwrap();
    });
    sock.join().unwrap();
    let counted = common::wait_for(Duration::from_secs(5), || {
        (rule_packets(
            &t.router,
            "etp: udp for the listener port at a local address refused",
        ) >= 1)
            .then_some(())
    });
    assert!(counted.is_some(), "the guard did not count the datagram");
    let bound = t.router.exec("ss", &["-Hanu", "sport = :15001"]);
    assert!(
        !bound.contains(&format!("{ROUTER}:15001")),
        "a socket is bound to the router's own address:\n{bound}"
    );

    // Intercepted DNS keeps working, and etp saw exactly that one flow.
    assert_eq!(dig(&t.client, "10.96.0.10"), "10.1.2.3");
    let m = etp.metrics();
    assert_eq!(
        sum(&m, "etp_flows_total{"),
        1,
        "etp relayed something besides the DNS query:\n{m}"
    );
}

#[test]
fn a_source_over_its_share_is_reset_and_another_source_is_served() {
    require_root!();
    let t = topo();
    t.add_client_addrs(&[3]); // NOISY
                              // Resync every second: it also copies the limit rules' counters into the metrics.
    let opts = Opts {
        resync_seconds: 1,
        ..Opts::default()
    };
    let etp = start_etp_with(&t.router, &cfg("max_tcp_flows_per_source = 4"), opts);
    let echo_addr = "10.96.0.20:7001";

    // The noisy source holds its share...
    let mut held = Vec::new();
    for i in 0..4 {
        let mut s = connect_in(&t.client, NOISY, echo_addr, Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("connection {i} within the share: {e}"));
        assert_eq!(echo(&mut s, b"mine").expect("echo"), b"mine");
        held.push(s);
    }
    // ...and every connection beyond it is reset at once, not left hanging.
    for i in 0..6 {
        let started = Instant::now();
        match connect_in(&t.client, NOISY, echo_addr, Duration::from_secs(3)) {
            Err(e) => assert_eq!(
                e.kind(),
                std::io::ErrorKind::ConnectionRefused,
                "extra connection {i}: {e} after {:?}",
                started.elapsed()
            ),
            Ok(_) => panic!("extra connection {i} beyond the share was accepted"),
        }
    }
    // Another source is served.
    let mut s = connect_in(&t.client, QUIET, echo_addr, Duration::from_secs(1))
        .expect("the quiet source connects");
    assert_eq!(echo(&mut s, b"quiet").expect("quiet echo"), b"quiet");
    assert!(rule_packets(&t.router, "etp route echo: tcp -> direct (source flows)") >= 6);

    let exported = common::wait_for(Duration::from_secs(5), || {
        let m = etp.metrics();
        (metric(
            &m,
            r#"etp_kernel_refused_packets{route="echo",proto="tcp",reason="source_flows"}"#,
        ) >= 6)
            .then_some(())
    });
    assert!(
        exported.is_some(),
        "refusals not in the metrics:\n{}",
        etp.metrics()
    );

    // A closed connection frees its slot.
    held.pop();
    let freed = common::wait_for(Duration::from_secs(5), || {
        connect_in(&t.client, NOISY, echo_addr, Duration::from_secs(2)).ok()
    });
    assert!(freed.is_some(), "a closed connection never freed its slot");
    let m = etp.metrics();
    assert!(
        metric(
            &m,
            r#"etp_flows_total{route="echo",action="direct",proto="tcp"}"#
        ) >= 6
    );

    // The limit rule is etp's like every other: removed from outside, it is put back.
    let limit_rules = || {
        let text = t
            .router
            .nft(&["-a", "list", "chain", "inet", "etp", "prerouting"]);
        text.lines()
            .filter(|l| l.contains("etp route echo: tcp -> direct (source flows)"))
            .filter_map(|l| Some(l.rsplit("# handle ").next()?.trim().to_string()))
            .collect::<Vec<_>>()
    };
    let handles = limit_rules();
    assert_eq!(handles.len(), 1, "{handles:?}");
    t.router.nft(&[
        "delete",
        "rule",
        "inet",
        "etp",
        "prerouting",
        "handle",
        &handles[0],
    ]);
    let repaired = common::wait_for(Duration::from_secs(10), || {
        limit_rules().iter().any(|h| *h != handles[0]).then_some(())
    });
    assert!(
        repaired.is_some(),
        "the deleted limit rule was not repaired"
    );
}

/// A DNS query for etp.test (id 0x1234, recursion desired).
const QUERY: &[u8] =
    b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03etp\x04test\x00\x00\x01\x00\x01";

#[test]
fn a_udp_flood_from_one_source_leaves_dns_working_for_another() {
    require_root!();
    let t = topo();
    t.add_client_addrs(&[3]); // NOISY
    let _etp = start_etp(&t.router, &cfg(""));
    assert_eq!(dig(&t.client, "10.96.0.10"), "10.1.2.3");

    // The flood: one new source port per datagram from the noisy address, as fast as one
    // thread can send, for at most 15 s or until the queries below are done.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let flood = in_netns(&t.client.name, move || {
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut sent = 0u64;
        while !flag.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
            for _ in 0..100 {
                if let Ok(s) = UdpSocket::bind(format!("{NOISY}:0")) {
                    if s.send_to(QUERY, "10.96.0.10:53").is_ok() {
                        sent += 1;
                    }
                }
            }
        }
        sent
    });
    std::thread::sleep(Duration::from_secs(2));
    let mut answered = 0;
    for _ in 0..20 {
        if try_dig(&t.client, &[]) == "10.1.2.3" {
            answered += 1;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = flood.join().expect("flood thread");
    let limited = rule_packets(&t.router, "etp route dns: udp -> direct (source rate)");
    eprintln!("flood sent {sent} datagrams, {limited} dropped by the rate limit");
    assert!(
        answered >= 19,
        "only {answered} of 20 DNS queries answered during a flood of {sent} new flows"
    );
    assert!(limited > 0, "the flood never met the per-source rate limit");
}

/// With the limits on, the table tracks connections, and packets that answer a connection leave
/// prerouting at `ct direction reply accept`: the server's answers to etp's upstream legs are
/// counted there and never reach a route rule. A DNS query over UDP and one over TCP through the
/// `dns` route (etp relays both) must both work and move that rule's counter.
#[test]
fn replies_leave_prerouting_at_the_reply_rule() {
    require_root!();
    let t = topo();
    let _etp = start_etp(&t.router, &cfg(""));
    let reply = "etp: packets that answer a connection are never intercepted";
    let before = rule_packets(&t.router, reply);
    assert_eq!(dig(&t.client, "10.96.0.10"), "10.1.2.3");
    assert_eq!(try_dig(&t.client, &["+tcp"]), "10.1.2.3", "dig +tcp");
    let after = rule_packets(&t.router, reply);
    // At least the UDP answer, and the TCP leg's SYN-ACK and answer.
    assert!(
        after >= before + 3,
        "reply rule counted {before} then {after}"
    );
}
