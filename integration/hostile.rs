//! Hostile traffic against etp's data path alone (issue 8): each test removes the kernel's
//! self-loop guard and per-source limit rules from the ruleset (`start_etp_alone`; drift
//! repair is off), so what these tests see is etp's second line. `integration/limits.rs` tests
//! the kernel's first line.
//!
//! Topology from `common::topo`, plus extra client addresses (10.10.1.3 ...) so that one
//! client namespace plays several sources. Every client call is bounded by a timeout; the only
//! time bounds asserted are the functional ones of the issue (an answer within 1 or 1.5 s).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::topo::{connect_from, dig, in_netns, metric, start_etp_with, sum, topo, Etp, Opts};
use socket2::{Domain, Socket, Type};

/// A direct TCP route to the echo server and a direct UDP route to the DNS server.
const ROUTES: &str = r#"
[[route]]
name = "echo"
protocols = ["tcp"]
destinations = ["10.96.0.20/32"]
ports = [7001]
action = "direct"

[[route]]
name = "dns"
protocols = ["udp"]
destinations = ["10.96.0.10/32"]
ports = [53]
action = "direct"
"#;

const ECHO: &str = "10.96.0.20:7001";

/// A route whose `forward_to` is the router's own address on the listener port: `etp check`
/// cannot know node addresses, so the data path must refuse each flow.
const FORWARD_TO_SELF: &str = r#"
[[route]]
name = "toself"
protocols = ["tcp", "udp"]
destinations = ["10.96.0.21/32"]
ports = [7001]
action = "forward"
forward_to = "10.10.2.1:15001"
"#;

/// etp with its ruleset minus the kernel's guard and per-source limit rules, and without drift
/// repair (which would put them back): only etp's own checks stand between a client and etp.
fn start_etp_alone(router: &common::Netns, body: &str) -> Etp {
    let opts = Opts {
        watch_kernel: false,
        resync_seconds: 3600,
        ..Opts::default()
    };
    let etp = start_etp_with(router, body, opts);
    let listing = router.nft(&["-a", "list", "chain", "inet", "etp", "prerouting"]);
    let kernel_line = [
        "(source rate)",
        "(source flows)",
        "for the listener port at a",
    ];
    for line in listing.lines() {
        if kernel_line.iter().any(|k| line.contains(k)) {
            let handle = line.rsplit("# handle ").next().expect("handle").trim();
            router.nft(&[
                "delete",
                "rule",
                "inet",
                "etp",
                "prerouting",
                "handle",
                handle,
            ]);
        }
    }
    let left = router.nft(&["list", "chain", "inet", "etp", "prerouting"]);
    assert!(
        !kernel_line.iter().any(|k| left.contains(k)),
        "kernel rules left:\n{left}"
    );
    etp
}

fn config(limits: &str) -> String {
    format!("[listener]\nport = 15001\n\n[limits]\n{limits}\n{ROUTES}")
}

/// What a client saw from one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// The echo came back: etp relayed it.
    Served,
    /// Reset, refused or closed: a definite "no".
    Refused,
    /// Nothing within the bound: the connection hangs.
    Hang,
}

/// Sends a line on an open connection and waits up to `bound` for its echo.
fn probe(s: &mut TcpStream, bound: Duration) -> Answer {
    s.set_read_timeout(Some(bound)).unwrap();
    if s.write_all(b"ping\n").is_err() {
        return Answer::Refused;
    }
    let mut buf = [0u8; 16];
    match s.read(&mut buf) {
        Ok(0) => Answer::Refused,
        Ok(_) => Answer::Served,
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Answer::Hang,
        Err(_) => Answer::Refused,
    }
}

/// Opens `n` connections from `src` one after the other, probes each, keeps the open ones.
fn open_many(src: &str, n: usize, bound: Duration) -> (Vec<Answer>, Vec<TcpStream>) {
    let mut answers = Vec::new();
    let mut kept = Vec::new();
    for _ in 0..n {
        match connect_from(src, ECHO, bound).ok() {
            None => answers.push(Answer::Refused),
            Some(mut s) => {
                answers.push(probe(&mut s, bound));
                kept.push(s);
            }
        }
    }
    (answers, kept)
}

fn count(answers: &[Answer], a: Answer) -> usize {
    answers.iter().filter(|&&x| x == a).count()
}

/// A new connection from `src` and how it was answered, with the time to the answer.
fn one_answer(src: &str, bound: Duration) -> (Answer, Duration) {
    let t0 = Instant::now();
    let a = match connect_from(src, ECHO, bound).ok() {
        None => Answer::Refused,
        Some(mut s) => probe(&mut s, bound),
    };
    (a, t0.elapsed())
}

#[test]
fn a_connection_to_the_routers_own_listener_is_refused_without_a_loop() {
    require_root!();
    let t = topo();
    let etp = start_etp_alone(&t.router, &format!("{}{FORWARD_TO_SELF}", config("")));
    // The router's own address on the TPROXY port: no tproxy rule sends it to etp, the
    // wildcard listener takes it directly.
    let out = t.client.try_exec(
        "timeout",
        &[
            "3",
            "bash",
            "-c",
            "exec 3<>/dev/tcp/10.10.1.1/15001; sleep 2",
        ],
    );
    let m = etp.metrics();
    let flows = sum(&m, "etp_flows_total{");
    let refused = sum(&m, "etp_refused_total{");
    assert!(
        flows <= 1,
        "{flows} flows from one connection (a loop); bash: {:?}\n{m}",
        out.status
    );
    assert!(
        metric(
            &m,
            "etp_refused_total{route=\"unmatched\",proto=\"tcp\",reason=\"self_loop\"}"
        ) >= 1,
        "refused {refused}:\n{m}"
    );
    assert!(
        etp.log_text()
            .lines()
            .any(|l| l.contains("WARN") && l.contains("refused") && l.contains("self_loop")),
        "the refusal is logged:\n{}",
        etp.log_text()
    );
    // The same over IPv6 and on loopback inside the router.
    let _ = t.client.try_exec(
        "timeout",
        &["3", "bash", "-c", "exec 3<>/dev/tcp/fd10:1::1/15001"],
    );
    let _ = t.router.try_exec(
        "timeout",
        &["3", "bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/15001"],
    );
    // An intercepted flow whose route forwards to etp's own listener.
    let _ = t.client.try_exec(
        "timeout",
        &[
            "3",
            "bash",
            "-c",
            "exec 3<>/dev/tcp/10.96.0.21/7001; sleep 1",
        ],
    );
    let m = etp.metrics();
    assert!(sum(&m, "etp_flows_total{") <= 1, "{m}");
    assert!(
        metric(
            &m,
            "etp_refused_total{route=\"unmatched\",proto=\"tcp\",reason=\"self_loop\"}"
        ) >= 3,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "etp_refused_total{route=\"toself\",proto=\"tcp\",reason=\"self_loop\"}"
        ) >= 1,
        "{m}"
    );
}

#[test]
fn a_datagram_to_the_routers_own_listener_leaves_no_local_socket() {
    require_root!();
    let t = topo();
    let etp = start_etp_alone(&t.router, &format!("{}{FORWARD_TO_SELF}", config("")));
    // Two to the router's addresses, one intercepted for a route that forwards to etp.
    for dst in ["10.10.1.1/15001", "fd10:1::1/15001", "10.96.0.21/7001"] {
        t.client
            .exec("bash", &["-c", &format!("echo hello > /dev/udp/{dst}")]);
    }
    // Witness: every UDP socket on port 15001 in the router is a wildcard listener.
    let bound = common::wait_for(Duration::from_secs(5), || {
        let m = etp.metrics();
        let own = "etp_refused_total{route=\"unmatched\",proto=\"udp\",reason=\"self_loop\"}";
        let fwd = "etp_refused_total{route=\"toself\",proto=\"udp\",reason=\"self_loop\"}";
        (metric(&m, own) >= 2 && metric(&m, fwd) >= 1).then_some(())
    });
    let ss = t.router.exec("ss", &["-Huan", "sport = :15001"]);
    let locals: Vec<&str> = ss
        .lines()
        .filter(|l| {
            !(l.contains("0.0.0.0:15001") || l.contains("[::]:15001") || l.contains("*:15001"))
        })
        .collect();
    assert!(
        locals.is_empty(),
        "sockets bound to a local address on the listener port:\n{ss}"
    );
    assert!(bound.is_some(), "refusals counted:\n{}", etp.metrics());
    // Intercepted DNS keeps working.
    for _ in 0..3 {
        assert_eq!(dig(&t.client, "10.96.0.10"), "10.1.2.3");
    }
    let m = etp.metrics();
    assert!(
        metric(
            &m,
            "etp_flows_total{route=\"dns\",action=\"direct\",proto=\"udp\"}"
        ) >= 1,
        "{m}"
    );
    assert_eq!(sum(&m, "etp_flows_total{route=\"unmatched\""), 0, "{m}");
}

/// With `IP_MULTICAST_ALL` on (the kernel's default), a wildcard-bound socket receives the
/// datagrams of every multicast group any socket of the host joined, on its port. etp's UDP
/// listener must not: here another program on the router joined 239.1.1.1 on port 15001.
#[test]
fn a_multicast_group_someone_else_joined_does_not_reach_etp() {
    require_root!();
    let t = topo();
    let etp = start_etp_alone(&t.router, &config(""));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let member = in_netns(&t.router.name, move || {
        let s = Socket::new(Domain::IPV4, Type::DGRAM, None).expect("socket");
        // etp's listener holds 0.0.0.0:15001 with SO_REUSEADDR; so does this one.
        s.set_reuse_address(true).unwrap();
        let group: SocketAddr = "239.1.1.1:15001".parse().unwrap();
        s.bind(&group.into()).expect("bind the group address");
        s.join_multicast_v4(&"239.1.1.1".parse().unwrap(), &"10.10.1.1".parse().unwrap())
            .expect("join");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let u: UdpSocket = s.into();
        ready_tx.send(()).unwrap();
        let mut buf = [0u8; 64];
        u.recv_from(&mut buf).is_ok()
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("member ready");
    t.client
        .exec("bash", &["-c", "echo hello > /dev/udp/239.1.1.1/15001"]);
    assert!(
        member.join().expect("member thread"),
        "the group member got the datagram"
    );
    // Give etp's loop time to see it, if it was delivered to it.
    std::thread::sleep(Duration::from_millis(300));
    let m = etp.metrics();
    assert_eq!(sum(&m, "etp_flows_total{"), 0, "{m}");
    assert_eq!(
        sum(&m, "etp_refused_total{"),
        0,
        "etp's listener received the group's datagram:\n{m}"
    );
}

#[test]
fn one_source_over_its_share_is_refused_and_others_are_served() {
    require_root!();
    let t = topo();
    t.add_client_addrs(&[3, 4]);
    let etp = start_etp_alone(&t.router, &config("max_tcp_flows_per_source = 20"));
    let ns = t.client.name.clone();
    let (noisy, other, kept) = in_netns(&ns, || {
        let bound = Duration::from_secs(1);
        let (noisy, kept) = open_many("10.10.1.3", 30, bound);
        let other = one_answer("10.10.1.4", bound);
        (noisy, other, kept)
    })
    .join()
    .expect("client thread");
    assert_eq!(
        (
            count(&noisy, Answer::Served),
            count(&noisy, Answer::Refused),
            count(&noisy, Answer::Hang)
        ),
        (20, 10, 0),
        "the noisy source: 20 served, 10 refused at once, none hanging: {noisy:?}"
    );
    assert_eq!(
        other.0,
        Answer::Served,
        "another source is served within 1 s: {other:?}"
    );
    let m = etp.metrics();
    assert_eq!(
        metric(
            &m,
            "etp_refused_total{route=\"echo\",proto=\"tcp\",reason=\"source_flows\"}"
        ),
        10,
        "{m}"
    );
    drop(kept);
}

#[test]
fn a_saturated_etp_answers_a_new_source_at_once() {
    require_root!();
    let t = topo();
    t.add_client_addrs(&[3, 4, 5, 6]);
    let etp = start_etp_alone(
        &t.router,
        &config("max_tcp_flows = 20\nmax_tcp_flows_per_source = 0"),
    );
    let ns = t.client.name.clone();
    let (held, fresh, kept) = in_netns(&ns, || {
        let bound = Duration::from_millis(1500);
        let mut held = Vec::new();
        let mut kept = Vec::new();
        for src in ["10.10.1.3", "10.10.1.4", "10.10.1.5"] {
            let (a, k) = open_many(src, 8, bound);
            held.extend(a);
            kept.extend(k);
        }
        let fresh = one_answer("10.10.1.6", bound);
        (held, fresh, kept)
    })
    .join()
    .expect("client thread");
    assert_eq!(count(&held, Answer::Served), 20, "{held:?}");
    assert_eq!(
        count(&held, Answer::Hang),
        0,
        "no hang at saturation: {held:?}"
    );
    assert_ne!(
        fresh.0,
        Answer::Hang,
        "a new source gets an answer within 1.5 s: {fresh:?}"
    );
    let m = etp.metrics();
    assert!(
        metric(
            &m,
            "etp_refused_total{route=\"echo\",proto=\"tcp\",reason=\"global_flows\"}"
        ) >= 5,
        "{m}"
    );
    drop(kept);
}

#[test]
fn a_udp_flood_from_one_source_does_not_starve_another() {
    require_root!();
    let t = topo();
    t.add_client_addrs(&[3, 4]);
    let etp = start_etp_alone(
        &t.router,
        &config(&std::env::var("FLOODCFG").unwrap_or_default()),
    );
    assert_eq!(dig(&t.client, "10.96.0.10"), "10.1.2.3", "DNS works first");
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let (s, n) = (Arc::clone(&stop), Arc::clone(&sent));
    // A new source port per datagram, as fast as this thread can send, for at most 20 s.
    let flood = in_netns(&t.client.name, move || {
        let t0 = Instant::now();
        let to: SocketAddr = "10.96.0.10:53".parse().unwrap();
        while !s.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(20) {
            if let Ok(u) = UdpSocket::bind("10.10.1.3:0") {
                if u.send_to(b"flood", to).is_ok() {
                    n.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });
    // Let the flood build up before asking.
    std::thread::sleep(Duration::from_millis(500));
    let mut answered = 0;
    for _ in 0..20 {
        let out = t.client.try_exec(
            "dig",
            &[
                "+short",
                "+time=1",
                "+tries=1",
                "-b",
                "10.10.1.4",
                "@10.96.0.10",
                "etp.test",
                "A",
            ],
        );
        if String::from_utf8_lossy(&out.stdout).trim() == "10.1.2.3" {
            answered += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    flood.join().expect("flood thread");
    let m = etp.metrics();
    let flooded = sent.load(Ordering::Relaxed);
    let snmp = t.router.exec("sh", &["-c", "grep Udp: /proc/net/snmp; cat /proc/sys/net/netfilter/nf_conntrack_count /proc/sys/net/netfilter/nf_conntrack_max"]);
    assert!(
        answered >= 19,
        "{answered} of 20 DNS answers beside a flood of {flooded} datagrams\n{snmp}\n{m}"
    );
    assert!(
        sum(
            &m,
            "etp_refused_total{route=\"dns\",proto=\"udp\",reason=\"source_rate\"}"
        ) > 0,
        "the flood met the per-source rate ({flooded} datagrams):\n{m}"
    );
}
