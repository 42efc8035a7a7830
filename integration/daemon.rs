//! The daemon on a real kernel: `etp run` in the router namespace of the shared topology
//! (`common::topo`), driven by signals while real TCP and UDP traffic flows.
//!
//! Routes in every config here: `mesh` (10.96.0.10, fd00:10:96::a, TCP -> Linkerd stand-in),
//! `direct` (10.96.0.16/29, fd00:10:96::14, TCP direct) and `udp` (10.96.0.10 and
//! fd00:10:96::a ports 53 and 7001, UDP direct). Config B adds a bypass address and a route
//! `extra`; both keep the routes the traffic uses. Every loop is bounded in count and time;
//! results are checked by what arrived, never by how long it took.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::Output;
use std::time::{Duration, Instant};

use common::load::{Load, LoadReport};
use common::topo::{
    curl, dig, in_netns, kit_ok, metric, spawn_etp, standin_lines, start_etp, start_etp_with,
    start_standin, stop_etp, topo, Etp, Opts, Topo,
};
use common::{wait_for, TempFile};

const BASE: &str = r#"
[listener]
port = PORT
ipv6 = true

[bypass]
destinations = BYPASS

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
"#;

const EXTRA: &str = r#"
[[route]]
name = "extra"
protocols = ["tcp"]
destinations = ["10.96.0.40/32"]
ports = [80, 443]
action = "direct"
"#;

/// A Linkerd route for UDP: rejected by validation (Linkerd proxies no UDP).
const BAD: &str = r#"
[[route]]
name = "bad"
protocols = ["udp"]
destinations = ["10.96.0.50/32"]
ports = [53]
action = "linkerd"
"#;

fn cfg_a() -> String {
    BASE.replace("PORT", "15001")
        .replace("BYPASS", r#"["10.96.0.22/32"]"#)
}

fn cfg_b() -> String {
    BASE.replace("PORT", "15001")
        .replace("BYPASS", r#"["10.96.0.22/32", "10.96.0.23/32"]"#)
        + EXTRA
}

fn flows(m: &str, route: &str, action: &str, proto: &str) -> u64 {
    metric(
        m,
        &format!(r#"etp_flows_total{{route="{route}",action="{action}",proto="{proto}"}}"#),
    )
}

fn reloads(m: &str, result: &str) -> u64 {
    metric(m, &format!(r#"etp_reloads_total{{result="{result}"}}"#))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `etp audit -c FILE` with `body` (plus this instance's admin/daemon settings).
fn audit_against(etp: &Etp, body: &str) -> Output {
    let f = TempFile::new("audit.toml", &etp.config_text(body));
    etp.cli_with_config(&["audit"], f.as_str())
}

/// Polls `etp audit` (current config file) until it says in sync; at most `limit`.
fn wait_in_sync(etp: &Etp, limit: Duration) -> bool {
    wait_for(limit, || {
        let o = etp.cli(&["audit"]);
        (o.status.success() && String::from_utf8_lossy(&o.stdout).contains("in sync")).then_some(())
    })
    .is_some()
}

fn hup(etp: &Etp) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(etp.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .expect("SIGHUP to etp");
}

/// What the witnesses show of etp's kernel state in the router namespace.
fn kernel_state(t: &common::topo::Topo) -> (bool, usize, String) {
    let tables = t.router.nft(&["list", "tables"]);
    let table = tables.lines().any(|l| l.trim() == "table inet etp");
    let rules = t.router.ip(&["-4", "rule"]) + &t.router.ip(&["-6", "rule"]);
    let n_rules = rules.lines().filter(|l| l.contains("lookup 15001")).count();
    let routes = t.router.ip(&["-4", "route", "show", "table", "15001"])
        + &t.router.ip(&["-6", "route", "show", "table", "15001"]);
    (table, n_rules, routes.trim().to_string())
}

#[test]
fn reload_storm_under_load_breaks_nothing() {
    require_root!();
    let t = topo();
    let slog = TempFile::new("standin.log", "");
    let _standin = start_standin(&t.router, &slog);
    let etp = start_etp(&t.router, &cfg_a());

    let load = Load::start(&t.client.name);
    // Let every kind of traffic get going before the storm.
    assert!(
        load.wait_progress(Duration::from_secs(10)),
        "traffic did not start"
    );
    const SIGHUPS: usize = 120;
    for i in 0..SIGHUPS {
        // Odd reloads install B; the last one (i = 119) too, so B is the final config.
        etp.write_config(&if i % 2 == 1 { cfg_b() } else { cfg_a() });
        if i == SIGHUPS - 1 {
            // The last one through `etp reload` (the pid file), as an operator would.
            let o = etp.cli(&["reload"]);
            assert!(o.status.success(), "etp reload: {}", text(&o));
        } else {
            hup(&etp);
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    assert!(
        wait_in_sync(&etp, Duration::from_secs(15)),
        "final config B not in force: {}",
        text(&etp.cli(&["audit"]))
    );
    // And it really is B that is in force, not A.
    let a = audit_against(&etp, &cfg_a());
    assert_eq!(a.status.code(), Some(1), "A should differ: {}", text(&a));
    // Traffic keeps flowing for a moment after the storm, then stops.
    std::thread::sleep(Duration::from_millis(500));
    let r: LoadReport = load.finish();
    eprintln!("reload storm: {SIGHUPS} SIGHUPs; {r:?}");

    assert!(r.short_ok >= 100, "too little traffic to mean much: {r:?}");
    assert_eq!(r.short_failed, 0, "failed short connections: {r:?}");
    assert_eq!(r.long_broken, 0, "broken long-lived flows: {r:?}");
    assert!(r.long_bytes.iter().all(|&b| b > 0), "{r:?}");
    assert_eq!(r.udp_lost, 0, "UDP queries unanswered after retries: {r:?}");
    assert!(r.udp_ok >= 100, "{r:?}");

    let m = etp.settled_metrics();
    for l in m.lines().filter(|l| {
        l.starts_with("etp_udp_dropped_total") || l.starts_with("etp_upstream_errors_total")
    }) {
        eprintln!("reload storm: {l}");
    }
    let ok = reloads(&m, "ok");
    eprintln!(
        "reloads ok={ok} error={} generation={}",
        reloads(&m, "error"),
        metric(&m, "etp_ruleset_generation")
    );
    assert!(ok >= 1 && ok <= SIGHUPS as u64, "reloads ok = {ok}: {m}");
    assert_eq!(reloads(&m, "error"), 0, "{m}");
    // Every connection was intercepted, none slipped past during a swap: the counters equal
    // what the clients made (short ones + the long-lived ones).
    assert_eq!(
        flows(&m, "direct", "direct", "tcp"),
        r.short_ok_direct + r.long_direct,
        "{m}"
    );
    assert_eq!(
        flows(&m, "mesh", "linkerd", "tcp"),
        r.short_ok_mesh + r.long_mesh,
        "{m}"
    );
    assert_eq!(flows(&m, "udp", "direct", "udp"), r.udp_sockets, "{m}");
    let handoffs = standin_lines(&slog);
    assert_eq!(
        handoffs.len() as u64,
        r.short_ok_mesh + r.long_mesh,
        "one hand-off per mesh connection"
    );
    assert!(!handoffs.iter().any(|l| l.starts_with("dropped")));
    let m = stop_etp(etp);
    assert!(m.contains("etp_reloads_total"));
}

#[test]
fn a_bad_config_on_reload_keeps_the_old_ruleset() {
    require_root!();
    let t = topo();
    let etp = start_etp(&t.router, &cfg_a());
    let before = etp.metrics();
    assert_eq!(
        kit_ok(&t.client, &["echo", "10.96.0.20:7001", "before"]),
        "before"
    );

    etp.write_config(&(cfg_b() + BAD));
    hup(&etp);
    let failed = wait_for(Duration::from_secs(10), || {
        (reloads(&etp.metrics(), "error") == 1).then_some(())
    });
    assert!(failed.is_some(), "no failed reload counted");
    // The old ruleset is in force, unchanged (audit against the OLD config: in sync).
    let o = audit_against(&etp, &cfg_a());
    assert!(o.status.success(), "old config not in force: {}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("in sync"));
    // The error names file:line and key.
    let log = etp.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("reload failed"))
        .unwrap_or_else(|| panic!("no 'reload failed' line: {log}"));
    let want = format!("{}:", etp.cfg.as_str());
    let at = line.find(&want).unwrap_or_else(|| panic!("{line}"));
    let rest = &line[at + want.len()..];
    let lineno: String = rest.chars().take_while(char::is_ascii_digit).collect();
    assert!(!lineno.is_empty(), "no line number: {line}");
    assert!(
        rest.contains("route[4].action") && rest.contains("takes TCP only"),
        "{line}"
    );
    eprintln!("bad reload logged: {line}");
    // Traffic still flows, intercepted.
    assert_eq!(
        kit_ok(&t.client, &["echo", "10.96.0.20:7001", "after"]),
        "after"
    );
    let (code, _) = etp.get("/ready");
    assert_eq!(code, 200);
    // (`etp status -c FILE` itself refuses to run while FILE is invalid: ask the endpoint.)
    let (code, status) = etp.get("/status");
    assert_eq!(code, 200);
    assert!(
        status.contains("last reload: ") && status.contains("failed: config:"),
        "{status}"
    );
    let m = stop_etp(etp);
    assert_eq!(reloads(&m, "ok"), reloads(&before, "ok"));
    assert_eq!(flows(&m, "direct", "direct", "tcp"), 2, "{m}");
}

/// Connects from inside `ns` and hands the socket back (it stays in that namespace).
fn connect_in(ns: &str, addr: &str) -> TcpStream {
    let addr: SocketAddr = addr.parse().unwrap();
    let s = in_netns(ns, move || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(5))
    })
    .join()
    .expect("connect thread")
    .expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn echo_on(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).expect("write");
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).expect("read echo");
    assert_eq!(back, msg);
}

#[test]
fn sigterm_drains_then_removes_everything() {
    require_root!();
    let t = topo();
    let opts = Opts {
        drain_seconds: 4,
        ..Opts::default()
    };
    let mut etp = start_etp_with(&t.router, &cfg_a(), opts);
    let (table, rules, routes) = kernel_state(&t);
    assert!(table && rules == 2 && !routes.is_empty(), "{routes}");

    // One flow that will finish during the drain, one that stays idle until the deadline.
    let mut open = connect_in(&t.client.name, "10.96.0.20:7001");
    echo_on(&mut open, b"before SIGTERM\n");
    let mut idle = t
        .client
        .spawn("socat", &["-u", "TCP:10.96.0.20:7002", "STDOUT"]);
    let m = etp.metrics();
    let counted = wait_for(Duration::from_secs(5), || {
        let m = etp.metrics();
        (metric(
            &m,
            r#"etp_flows_active{route="direct",action="direct",proto="tcp"}"#,
        ) == 2)
            .then_some(())
    });
    assert!(counted.is_some(), "{m}");

    let t0 = Instant::now();
    etp.proc.signal("TERM");
    let draining = wait_for(Duration::from_secs(5), || {
        etp.log_text().contains("draining flows").then_some(())
    });
    assert!(draining.is_some(), "{}", etp.log_text());
    // A SIGHUP during shutdown is harmless.
    hup(&etp);
    // The open flow still works during the drain.
    echo_on(&mut open, b"during the drain\n");
    // New connections go straight to the server: it sees the client's own address.
    let body = curl(&t.client, "http://10.96.0.20:8080/");
    assert!(
        body.starts_with("hello from 10.96.0.20:8080 to 10.10.1.2:"),
        "{body}"
    );
    // The open flow ends normally.
    open.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    open.read_to_end(&mut rest).expect("clean EOF");
    assert!(rest.is_empty());
    // The idle one is closed at the deadline; etp then exits 0.
    let out = etp
        .proc
        .wait_timeout(Duration::from_secs(4 + 15))
        .expect("etp exits after the drain deadline");
    let took = t0.elapsed();
    assert!(out.status.success(), "{}: {}", out.status, etp.log_text());
    let held = idle
        .wait_timeout(Duration::from_secs(10))
        .expect("the idle client sees its connection closed");
    assert!(String::from_utf8_lossy(&held.stdout).starts_with("banner from 10.96.0.20:7002"));
    let log = etp.log_text();
    assert!(
        log.contains("drain deadline reached: closing remaining flows flows=1"),
        "{log}"
    );
    assert!(log.contains("ruleset removed"), "{log}");
    let (table, rules, routes) = kernel_state(&t);
    assert!(!table, "table inet etp left behind");
    assert_eq!(rules, 0, "ip rules left behind");
    assert_eq!(routes, "", "routes left in table 15001");
    assert!(!etp.pid_file.exists(), "pid file left behind");
    eprintln!("SIGTERM with drain_seconds=4: exit 0 after {took:?}");
}

#[test]
fn sigkill_fails_open_and_a_restart_recovers() {
    require_root!();
    let t = topo();
    let slog = TempFile::new("standin.log", "");
    let _standin = start_standin(&t.router, &slog);
    let mut etp = start_etp(&t.router, &cfg_a());
    let body = curl(&t.client, "http://10.96.0.10:8080/");
    assert!(body.contains(" to 10.10.2.1:"), "via the stand-in: {body}");
    assert_eq!(standin_lines(&slog).len(), 1);
    let g1 = metric(&etp.metrics(), "etp_ruleset_generation");

    // SIGKILL: no cleanup; the table, rules and routes stay.
    let killed = etp.proc.kill_output();
    assert!(!killed.status.success());
    let (table, rules, _) = kernel_state(&t);
    assert!(table && rules == 2, "stale state should remain");
    // With no socket on the tproxy port the tproxy rule does not match: traffic goes direct.
    let body = curl(&t.client, "http://10.96.0.10:8080/");
    assert!(body.contains(" to 10.10.1.2:"), "direct: {body}");
    let body = curl(&t.client, "http://10.96.0.20:8080/");
    assert!(body.contains(" to 10.10.1.2:"), "direct: {body}");
    assert_eq!(dig(&t.client, "10.96.0.10"), "10.1.2.3");
    assert_eq!(
        standin_lines(&slog).len(),
        1,
        "the stand-in saw nothing new"
    );
    drop(etp);

    // Restart: the stale table is replaced by one transaction (generation + 1).
    let etp = start_etp(&t.router, &cfg_a());
    let g2 = metric(&etp.metrics(), "etp_ruleset_generation");
    assert_eq!(g2, g1 + 1, "one commit replaces the stale table");
    let o = etp.cli(&["audit"]);
    assert!(o.status.success(), "{}", text(&o));
    let (table, rules, _) = kernel_state(&t);
    assert!(table && rules == 2, "no duplicate ip rules");
    let body = curl(&t.client, "http://10.96.0.10:8080/");
    assert!(body.contains(" to 10.10.2.1:"), "intercepted again: {body}");
    assert_eq!(standin_lines(&slog).len(), 2);
    let body = curl(&t.client, "http://10.96.0.20:8080/");
    assert!(body.contains(" to 10.10.2.1:"), "intercepted again: {body}");
    let m = stop_etp(etp);
    assert_eq!(flows(&m, "direct", "direct", "tcp"), 1, "{m}");
    eprintln!("SIGKILL/restart: generation {g1} -> {g2}");
}

/// After a fail-open stop no TIME-WAIT remnant of etp's client legs is left in the node: such a
/// remnant would capture a new, now forwarded SYN with the same 4-tuple (early demux) and the
/// client could not connect to that destination from that port for 60 s.
#[test]
fn a_reused_client_port_connects_right_after_a_stop() {
    require_root!();
    let t = topo();
    let mut etp = start_etp(&t.router, &cfg_a());
    // An HTTP GET from the fixed client port 41234 that reads until the server closes: the server
    // closes first (Connection: close), etp passes its FIN on, so etp's client leg closes first
    // and stays in TIME-WAIT in the router.
    const GET: &str = "import socket,sys\n\
        s = socket.socket()\n\
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
        s.settimeout(3)\n\
        s.bind(('10.10.1.2', 41234))\n\
        s.connect(('10.96.0.20', 8080))\n\
        s.sendall(b'GET / HTTP/1.1\\r\\nHost: t\\r\\n\\r\\n')\n\
        got = b''\n\
        while True:\n\
        \x20   b = s.recv(4096)\n\
        \x20   if not b: break\n\
        \x20   got += b\n\
        sys.stdout.write(got.decode())\n";
    let get = || {
        let out = t.client.try_exec("python3", &["-c", GET]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let body = get();
    assert!(body.contains(" to 10.10.2.1:"), "intercepted first: {body}");
    let tw = |t: &common::topo::Topo| {
        t.router
            .exec(
                "ss",
                &["-Htan", "state", "time-wait", "dst", "10.10.1.2:41234"],
            )
            .lines()
            .count()
    };
    assert!(
        wait_for(Duration::from_secs(5), || (tw(&t) == 1).then_some(())).is_some(),
        "etp's client leg is in TIME-WAIT while etp runs: {}",
        t.router.exec("ss", &["-tan"])
    );
    let (status, _) = etp.terminate();
    assert!(status.success(), "{}", etp.log_text());
    assert!(
        etp.log_text()
            .contains("TIME-WAIT remnants of client legs destroyed destroyed=1"),
        "{}",
        etp.log_text()
    );
    assert_eq!(tw(&t), 0, "TIME-WAIT remnants left after the stop");
    // Straight to the server now (fail-open), from the same port.
    let body = get();
    assert!(
        body.contains(" to 10.10.1.2:"),
        "the reused port connects directly: {body}"
    );
}

/// With change notifications (the default), drift is repaired as soon as the kernel reports it,
/// long before the resync tick (an hour here), and changes to other tables cost nothing.
#[test]
fn notified_changes_are_repaired_at_once() {
    require_root!();
    let t = topo();
    let opts = Opts {
        resync_seconds: 3600,
        ..Opts::default()
    };
    let etp = start_etp_with(&t.router, &cfg_a(), opts);
    let repairs = |etp: &Etp| metric(&etp.metrics(), "etp_drift_repairs_total");
    let notified = |etp: &Etp| etp.log_text().matches("kernel change notified").count();
    assert_eq!(repairs(&etp), 0);
    // Let the notifications of etp's own start-up commit pass.
    std::thread::sleep(Duration::from_millis(500));

    // Another program's table and chain: not etp's business, no check.
    let before = notified(&etp);
    t.router.nft(&["add", "table", "ip", "other"]);
    t.router
        .sh("nft add chain ip other c '{ type filter hook input priority 0 ; }'");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        notified(&etp),
        before,
        "a foreign table's changes were taken for etp's"
    );

    let outside = [
        ("nft", "flush table inet etp"),
        ("nft", "delete table inet etp"),
        ("ip", "-6 rule del priority 30100 fwmark 0x1000/0x3000"),
        ("ip", "-4 route del local 0.0.0.0/0 dev lo table 15001"),
    ];
    for (done, (tool, line)) in outside.into_iter().enumerate() {
        let args: Vec<&str> = line.split_whitespace().collect();
        match tool {
            "nft" => t.router.nft(&args),
            _ => t.router.ip(&args),
        };
        let expected = done as u64 + 1;
        let repaired = wait_for(Duration::from_secs(10), || {
            (repairs(&etp) >= expected).then_some(())
        });
        assert!(
            repaired.is_some(),
            "{tool} {line} not repaired without a resync tick:\n{}",
            etp.log_text()
        );
        assert!(
            wait_in_sync(&etp, Duration::from_secs(5)),
            "{}",
            text(&etp.cli(&["audit"]))
        );
        // Intercepting again.
        assert_eq!(kit_ok(&t.client, &["echo", "10.96.0.20:7001", "z"]), "z");
    }
    let log = etp.log_text();
    assert!(
        log.contains("drift found drift=missing ip rule: fwmark 0x1000/0x3000 lookup 15001"),
        "{log}"
    );
    assert!(!log.contains("notifications lost"), "{log}");
    drop(etp);
}

#[test]
fn outside_changes_are_repaired_at_the_next_resync() {
    require_root!();
    let t = topo();
    // Notifications off: this is the resync tick's test.
    let opts = Opts {
        resync_seconds: 1,
        watch_kernel: false,
        ..Opts::default()
    };
    let etp = start_etp_with(&t.router, &cfg_a(), opts);
    let repairs = |etp: &Etp| metric(&etp.metrics(), "etp_drift_repairs_total");
    assert_eq!(repairs(&etp), 0);

    // 1. Someone flushes etp's table: every rule is gone.
    t.router.nft(&["flush", "table", "inet", "etp"]);
    assert!(
        wait_in_sync(&etp, Duration::from_secs(15)),
        "flush not repaired: {}",
        text(&etp.cli(&["audit"]))
    );
    assert!(
        wait_for(Duration::from_secs(5), || (repairs(&etp) >= 1)
            .then_some(()))
        .is_some(),
        "repair not counted"
    );
    let log = etp.log_text();
    assert!(
        log.contains("drift found drift=missing rule in chain prerouting"),
        "{log}"
    );
    assert!(log.contains("drift repaired"), "{log}");
    // Intercepting again.
    assert_eq!(kit_ok(&t.client, &["echo", "10.96.0.20:7001", "x"]), "x");
    let after_flush = repairs(&etp);

    // 2. Someone deletes etp's IPv4 ip rule.
    t.router.ip(&[
        "-4",
        "rule",
        "del",
        "priority",
        "30100",
        "fwmark",
        "0x1000/0x3000",
    ]);
    assert!(
        wait_in_sync(&etp, Duration::from_secs(15)),
        "ip rule not repaired: {}",
        text(&etp.cli(&["audit"]))
    );
    assert!(
        wait_for(Duration::from_secs(5), || (repairs(&etp) > after_flush)
            .then_some(()))
        .is_some(),
        "repair not counted"
    );
    let log = etp.log_text();
    assert!(
        log.contains("drift found drift=missing ip rule: fwmark 0x1000/0x3000 lookup 15001"),
        "{log}"
    );
    assert_eq!(log.matches("drift repaired").count(), 2, "{log}");
    let (_, rules, _) = kernel_state(&t);
    assert_eq!(rules, 2);
    assert_eq!(kit_ok(&t.client, &["echo", "10.96.0.20:7001", "y"]), "y");
    let m = stop_etp(etp);
    assert_eq!(flows(&m, "direct", "direct", "tcp"), 2, "{m}");
    eprintln!(
        "drift: repairs after flush {after_flush}, after ip rule del {}",
        metric(&m, "etp_drift_repairs_total")
    );
}

#[test]
fn the_original_command_line_intercepts_and_counts_exactly() {
    require_root!();
    let t = topo();
    // The file says port 15009; the copied DaemonSet flag `-port=15001` overrides it. No
    // RUST_LOG: `-v=2` alone must give per-flow debug logs.
    let opts = Opts {
        args: ["-port=15001", "--logtostderr", "-v=2", "-c", "CFG"]
            .map(String::from)
            .to_vec(),
        rust_log: None,
        ..Opts::default()
    };
    let body = cfg_a().replace("port = 15001", "port = 15009");
    let etp = start_etp_with(&t.router, &body, opts);
    const N: usize = 20;
    let mut sent = 0u64;
    for i in 0..N {
        let msg = format!("{i:03}:{}", "x".repeat(50 * i));
        assert_eq!(kit_ok(&t.client, &["echo", "10.96.0.20:7001", &msg]), msg);
        sent += msg.len() as u64;
    }
    let mut udp_sent = 0u64;
    for size in [100usize, 1000, 1400, 9000, 30000] {
        let addr = if size % 2 == 0 {
            "10.96.0.10:7001"
        } else {
            "[fd00:10:96::a]:7001"
        };
        let out = kit_ok(&t.client, &["udp", addr, &size.to_string()]);
        assert_eq!(out, format!("ok from={addr} len={size}"));
        udp_sent += size as u64;
    }
    let m = stop_etp_checked(etp);
    let bytes = |route: &str, dir: &str| {
        metric(
            &m,
            &format!(r#"etp_bytes_total{{route="{route}",direction="{dir}"}}"#),
        )
    };
    assert_eq!(flows(&m, "direct", "direct", "tcp"), N as u64, "{m}");
    assert_eq!(bytes("direct", "client_to_upstream"), sent, "{m}");
    assert_eq!(bytes("direct", "upstream_to_client"), sent, "{m}");
    assert_eq!(flows(&m, "udp", "direct", "udp"), 5, "{m}");
    assert_eq!(bytes("udp", "client_to_upstream"), udp_sent, "{m}");
    assert_eq!(bytes("udp", "upstream_to_client"), udp_sent, "{m}");
    eprintln!("original command line: {N} TCP flows, {sent} bytes each way; 5 UDP flows, {udp_sent} bytes each way");
}

/// `stop_etp` that also checks the per-flow debug lines `-v=2` promises.
fn stop_etp_checked(etp: Etp) -> String {
    let log = etp.log_text();
    assert!(
        log.lines()
            .filter(|l| l.contains("DEBUG") && l.contains("accepted"))
            .count()
            >= 20,
        "-v=2 gives per-flow debug lines: {log}"
    );
    assert!(log.contains("port=15001"), "{log}");
    stop_etp(etp)
}

#[test]
fn status_ready_and_live() {
    require_root!();
    let t = topo();
    let etp = start_etp(&t.router, &cfg_a());
    assert_eq!(etp.get("/ready").0, 200);
    assert_eq!(etp.get("/live").0, 200);
    let mut open = connect_in(&t.client.name, "10.96.0.20:7001");
    echo_on(&mut open, b"hold\n");
    let gen = metric(&etp.metrics(), "etp_ruleset_generation");
    // The status text is refreshed every second.
    let status = wait_for(Duration::from_secs(10), || {
        let o = etp.cli(&["status"]);
        let s = String::from_utf8_lossy(&o.stdout).into_owned();
        (o.status.success() && s.contains("active flows: 1")).then_some(s)
    })
    .expect("etp status shows the open flow");
    for want in [
        "routes:".to_string(),
        "mesh".to_string(),
        "direct".to_string(),
        "udp".to_string(),
        format!("ruleset generation: {gen}"),
        "last reload: none".to_string(),
        "listener: port 15001".to_string(),
    ] {
        assert!(status.contains(&want), "missing {want:?} in:\n{status}");
    }
    etp.write_config(&cfg_b());
    let o = etp.cli(&["reload"]);
    assert!(o.status.success(), "{}", text(&o));
    let status = wait_for(Duration::from_secs(10), || {
        let s = String::from_utf8_lossy(&etp.cli(&["status"]).stdout).into_owned();
        (s.contains("last reload:") && s.contains(", ok") && s.contains("extra")).then_some(s)
    })
    .expect("etp status shows the reload");
    assert!(!status.contains(&format!("ruleset generation: {gen}\n")));
    echo_on(&mut open, b"still open after the reload\n");
    drop(open);
    stop_etp(etp);
}

/// Whether `pid` ignores or catches SIGHUP (bit 0 of SigIgn / SigCgt in /proc/PID/status).
fn handles_sighup(pid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status.lines().any(|l| {
        let mask = l
            .strip_prefix("SigIgn:")
            .or_else(|| l.strip_prefix("SigCgt:"));
        mask.and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
            .is_some_and(|m| m & 1 == 1)
    })
}

#[test]
fn sighup_burst_during_startup_is_harmless() {
    require_root!();
    let t = topo();
    let mut etp = spawn_etp(&t.router, &cfg_a(), Opts::default());
    let pid = etp.pid();
    // No program can survive a SIGHUP between its exec and its first instruction (the
    // dynamic loader runs with the default disposition, which terminates): start as soon as
    // etp has a disposition for SIGHUP (ignored or caught, /proc/PID/status), polled without
    // sleeping (bounded by time). From then on signal it continuously until it writes its
    // pid file (after READY), at most 20 s / 100k signals. `etp reload` itself only signals
    // the pid in the pid file, and systemd queues a reload until READY=1.
    let t0 = Instant::now();
    while !handles_sighup(pid) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "etp never handled SIGHUP: {}",
            etp.log_text()
        );
        std::hint::spin_loop();
    }
    let (mut sent, t0) = (0u32, Instant::now());
    while !etp.pid_file.exists() && sent < 100_000 && t0.elapsed() < Duration::from_secs(20) {
        // A dead, unreaped etp still accepts signals: look every 100 of them.
        if sent % 100 == 0 && etp.exited().is_some() {
            break;
        }
        if nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .is_err()
        {
            break;
        }
        sent += 1;
        std::thread::sleep(Duration::from_micros(200));
    }
    assert!(
        etp.exited().is_none(),
        "etp died from a SIGHUP during start-up after {sent} signals: {}",
        etp.log_text()
    );
    etp.wait_ready();
    let ok = wait_in_sync(&etp, Duration::from_secs(10));
    assert!(ok, "{}", text(&etp.cli(&["audit"])));
    // The queued SIGHUPs coalesce into (at least) one reload once etp serves.
    assert!(sent > 0, "no SIGHUP went out before READY");
    let m = wait_for(Duration::from_secs(10), || {
        let m = etp.metrics();
        (reloads(&m, "ok") >= 1).then_some(m)
    })
    .expect("the SIGHUPs sent during start-up lead to a reload");
    assert_eq!(reloads(&m, "error"), 0, "{m}");
    assert_eq!(kit_ok(&t.client, &["echo", "10.96.0.20:7001", "z"]), "z");
    eprintln!(
        "start-up: {sent} SIGHUPs before the pid file; reloads ok={}",
        reloads(&m, "ok")
    );
    stop_etp(etp);
}

#[test]
fn fail_closed_refuses_intercepted_traffic_while_etp_is_down() {
    require_root!();
    let t = topo();
    let opts = Opts {
        fail_closed: true,
        ..Opts::default()
    };
    let mut etp = start_etp_with(&t.router, &cfg_a(), opts.clone());
    let body = curl(&t.client, "http://10.96.0.20:8080/");
    assert!(body.contains(" to 10.10.2.1:"), "intercepted: {body}");

    // SIGKILL: the tproxy rules find no socket, and the fail-closed rules after them drop.
    let killed = etp.proc.kill_output();
    assert!(!killed.status.success());
    let out = t.client.try_exec(
        "curl",
        &["-sS", "--max-time", "2", "http://10.96.0.20:8080/"],
    );
    assert!(
        !out.status.success(),
        "a route's traffic must not pass while etp is down"
    );
    // Traffic no route selects still passes (the server's own address).
    let body = curl(&t.client, "http://10.10.2.2:8080/");
    assert!(
        body.contains(" to 10.10.1.2:"),
        "unrouted traffic is untouched: {body}"
    );
    let listed = t
        .router
        .nft(&["list", "chain", "inet", "etp", "prerouting"]);
    assert!(listed.contains("(fail-closed)"), "{listed}");
    drop(etp);

    // A clean SIGTERM with fail_closed keeps the table in place too.
    let mut etp = start_etp_with(&t.router, &cfg_a(), opts);
    let body = curl(&t.client, "http://10.96.0.20:8080/");
    assert!(body.contains(" to 10.10.2.1:"), "intercepted again: {body}");
    let (status, _) = etp.terminate();
    assert!(status.success());
    let (table, rules, _) = kernel_state(&t);
    assert!(
        table && rules == 2,
        "fail_closed keeps etp's kernel state on shutdown"
    );
    let out = t.client.try_exec(
        "curl",
        &["-sS", "--max-time", "2", "http://10.96.0.20:8080/"],
    );
    assert!(!out.status.success(), "still refused after a clean stop");
    let o = t
        .router
        .try_exec(common::etp_bin().to_str().unwrap(), &["cleanup"]);
    assert!(o.status.success());
    let body = curl(&t.client, "http://10.96.0.20:8080/");
    assert!(
        body.contains(" to 10.10.1.2:"),
        "direct after cleanup: {body}"
    );
}

/// Out of file descriptors: accept backs off (no spinning), the failures are counted and logged,
/// etp stays up, and once descriptors free up new connections are served again.
#[test]
fn fd_exhaustion_backs_off_and_recovers() {
    require_root!();
    let t = topo();
    let etp = start_etp(&t.router, &cfg_a());
    // Lower the running daemon's descriptor limit (soft and hard) to a few flows' worth.
    let pid = etp.pid().to_string();
    common::run(std::process::Command::new("prlimit").args(["--pid", &pid, "--nofile=48:48"]));

    // 80 connections held open through a `direct` route: far more than 48 descriptors allow.
    let held: Vec<std::io::Result<TcpStream>> = in_netns(&t.client.name, || {
        let addr: SocketAddr = "10.96.0.20:7001".parse().unwrap();
        (0..80)
            .map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(2)))
            .collect()
    })
    .join()
    .expect("connect thread");
    let exhausted = wait_for(Duration::from_secs(10), || {
        let m = etp.metrics();
        let errors = metric(&m, "etp_accept_errors_total")
            + common::topo::sum(&m, "etp_upstream_errors_total");
        (errors > 0).then_some(errors)
    });
    assert!(
        exhausted.is_some(),
        "no descriptor errors counted:\n{}",
        etp.log_text()
    );
    let log = etp.log_text();
    assert!(
        log.contains("out of file descriptors") || log.contains("Too many open files"),
        "the exhaustion is logged: {log}"
    );
    // Back-off, not a busy loop: etp's CPU time stays small while the backlog waits.
    let cpu = |pid: &str| -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let f: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    };
    let before = cpu(&pid);
    std::thread::sleep(Duration::from_secs(2));
    let spent = cpu(&pid) - before;
    assert!(
        spent < 100,
        "etp spun for {spent} ticks in 2 s while out of descriptors"
    );

    drop(held);
    // Descriptors free up: a new connection is served through etp again.
    assert_recovers(&t, &etp, Duration::from_secs(20));
    assert!(etp.get("/live").0 == 200, "etp is alive");
}

/// Waits (up to `within`) until a new intercepted connection is served through etp again.
fn assert_recovers(t: &Topo, etp: &Etp, within: Duration) {
    let ok = wait_for(within, || {
        let out = t.client.try_exec(
            "curl",
            &["-sS", "--max-time", "3", "http://10.96.0.20:8080/"],
        );
        let body = String::from_utf8_lossy(&out.stdout).to_string();
        body.contains(" to 10.10.2.1:").then_some(body)
    });
    assert!(ok.is_some(), "etp did not recover:\n{}", etp.log_text());
}

/// At the descriptor limit, with no flow churning descriptors, the admin endpoint still
/// answers (a liveness probe must not restart etp and kill its flows): it spends the one
/// descriptor it keeps in reserve, and keeps doing so request after request.
#[test]
fn admin_answers_at_the_descriptor_limit() {
    require_root!();
    let t = topo();
    let etp = start_etp(&t.router, &cfg_a());
    assert_eq!(etp.get("/live").0, 200);
    let pid = etp.pid().to_string();
    // Exactly as many descriptors as are open now: the next accept(2) fails with EMFILE.
    // (Counted once the count is steady: the probe's own connection closes asynchronously.)
    let count = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    let open = wait_for(Duration::from_secs(5), || {
        let a = count();
        std::thread::sleep(Duration::from_millis(200));
        (count() == a).then_some(a)
    })
    .expect("a steady descriptor count");
    // Only the soft limit moves (raising a hard limit again needs CAP_SYS_RESOURCE).
    let limit = format!("--nofile={open}:");
    common::run(std::process::Command::new("prlimit").args(["--pid", &pid, &limit]));
    // A data-path connection now fails for want of descriptors, which proves the limit bites.
    let out = t.client.try_exec(
        "curl",
        &["-sS", "--max-time", "2", "http://10.96.0.20:8080/"],
    );
    assert!(!out.status.success(), "no descriptor was free for a flow");
    assert!(
        etp.log_text().contains("out of file descriptors"),
        "the data path saw EMFILE: {}",
        etp.log_text()
    );
    for path in ["/live", "/ready", "/metrics", "/live", "/status"] {
        let (code, body) = etp.get(path);
        assert_eq!(code, 200, "GET {path} at the descriptor limit: {body}");
    }
    let log = etp.log_text();
    assert!(
        log.contains("using the reserved one"),
        "the admin accept hit the limit and used its reserve: {log}"
    );
    // Descriptors back: the data path recovers.
    let limit = format!("--nofile={}:", open + 64);
    common::run(std::process::Command::new("prlimit").args(["--pid", &pid, &limit]));
    assert_recovers(&t, &etp, Duration::from_secs(10));
}

/// A reload that changes the TPROXY port binds the new listeners before the ruleset points at
/// them, releases the old ones, and an established flow keeps working across the move.
#[test]
fn reload_to_a_new_port_moves_listeners_and_keeps_flows() {
    require_root!();
    let t = topo();
    let etp = start_etp(&t.router, &cfg_a());
    let mut held = connect_in(&t.client.name, "10.96.0.20:7001");
    echo_on(&mut held, b"before the move");

    etp.write_config(
        &BASE
            .replace("PORT", "15011")
            .replace("BYPASS", r#"["10.96.0.22/32"]"#),
    );
    hup(&etp);
    let moved = wait_for(Duration::from_secs(10), || {
        (reloads(&etp.metrics(), "ok") >= 1).then_some(())
    });
    assert!(moved.is_some(), "reload not applied:\n{}", etp.log_text());
    let listening = t.router.exec("ss", &["-Hltn"]);
    assert!(listening.contains(":15011"), "{listening}");
    assert!(
        !listening.contains(":15001 "),
        "old listener released: {listening}"
    );
    let rules = t
        .router
        .nft(&["list", "chain", "inet", "etp", "prerouting"]);
    assert!(
        rules.contains("tproxy ip to :15011") && !rules.contains(":15001"),
        "{rules}"
    );

    echo_on(
        &mut held,
        b"after the move: the established flow still works",
    );
    let body = curl(&t.client, "http://10.96.0.20:8080/");
    assert!(
        body.contains(" to 10.10.2.1:"),
        "new flows go through the new port: {body}"
    );
    drop(held);
    let m = stop_etp(etp);
    assert_eq!(flows(&m, "direct", "direct", "tcp"), 2, "{m}");
}
