//! The admin endpoint under pressure, on a real kernel: etp runs in a network namespace while
//! one local process holds admin connections open (hogging) or trickles requests a byte at a
//! time (slowloris); `/live` and `/ready` must keep answering within 1 s, which is a kubelet
//! probe's default timeout (a failed liveness probe restarts etp and kills every flow).
//!
//! Every loop is bounded in count and time; the attack stops (and its sockets close) through a
//! Drop guard even when an assertion fails.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::topo::{in_netns, start_etp, Etp, ADMIN};
use common::Netns;

const CFG: &str = r#"
[listener]
port = 15001

[[route]]
name = "direct"
protocols = ["tcp"]
destinations = ["10.96.0.0/12"]
ports = ["1-65535"]
action = "direct"
"#;

/// An attack running on its own thread in the router namespace; stopped and joined on drop.
struct Attack {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<usize>>,
}

impl Attack {
    /// Runs `step` (given the admin address) every `every` until stopped or `bound` elapsed.
    fn start(
        ns: &Netns,
        every: Duration,
        bound: Duration,
        mut step: impl FnMut(SocketAddr) + Send + 'static,
    ) -> Attack {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = in_netns(&ns.name, move || {
            let addr: SocketAddr = ADMIN.parse().unwrap();
            let t0 = Instant::now();
            let mut rounds = 0;
            while !flag.load(Ordering::Relaxed) && t0.elapsed() < bound {
                step(addr);
                rounds += 1;
                std::thread::sleep(every);
            }
            rounds
        });
        Attack {
            stop,
            thread: Some(thread),
        }
    }

    /// After a second of attack, probes `/live` and `/ready` 15 times each; then stops the
    /// attack and asserts that it really ran and that every probe answered 200 within 1 s.
    fn assert_probes_answer(mut self, etp: &Etp, what: &str) {
        std::thread::sleep(Duration::from_secs(1));
        let failed = probe_rounds(etp, 15);
        self.stop.store(true, Ordering::Relaxed);
        let rounds = self.thread.take().unwrap().join().expect("attack thread");
        assert!(rounds >= 3, "the attack ran {rounds} rounds only");
        assert!(
            failed.is_empty(),
            "probes failed {what}: {failed:?}\n{}",
            etp.log_text()
        );
    }
}

impl Drop for Attack {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn connect(addr: SocketAddr) -> Option<TcpStream> {
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()
}

/// `GET path` with curl and a 1 s deadline for the whole exchange: the HTTP code, 0 if none.
fn probe(etp: &Etp, path: &str) -> u16 {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &etp.ns, "curl", "-s", "-o", "/dev/null"])
        .args(["--max-time", "1", "-w", "%{http_code}"])
        .arg(format!("http://{ADMIN}{path}"))
        .output()
        .expect("spawn curl");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// Probes `/live` and `/ready` `rounds` times, 200 ms apart; returns the failures.
fn probe_rounds(etp: &Etp, rounds: usize) -> Vec<String> {
    let mut failed = Vec::new();
    for i in 0..rounds {
        for path in ["/live", "/ready"] {
            let code = probe(etp, path);
            if code != 200 {
                failed.push(format!("round {i} {path}: {code}"));
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    failed
}

/// One process holds hundreds of idle admin connections and keeps opening more: every probe
/// still answers within 1 s.
#[test]
fn probes_answer_while_admin_connections_are_hogged() {
    require_root!();
    let router = Netns::new("admhog");
    let etp = start_etp(&router, CFG);
    // 100 new idle connections every 300 ms, the newest 600 kept open (bounded descriptors).
    let mut held: std::collections::VecDeque<TcpStream> = Default::default();
    let attack = Attack::start(
        &router,
        Duration::from_millis(300),
        Duration::from_secs(30),
        move |addr| {
            for _ in 0..100 {
                if let Some(s) = connect(addr) {
                    held.push_back(s);
                }
            }
            while held.len() > 600 {
                held.pop_front();
            }
        },
    );
    attack.assert_probes_answer(&etp, "while hogged");
}

/// Slowloris: 200 connections each send one byte of a request every 300 ms (and reconnect
/// when etp closes them): every probe still answers within 1 s.
#[test]
fn probes_answer_under_slowloris() {
    require_root!();
    let router = Netns::new("admslow");
    let etp = start_etp(&router, CFG);
    let request = b"GET /metrics HTTP/1.1\r\nHost: etp\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut conns: Vec<(Option<TcpStream>, usize)> = (0..200).map(|_| (None, 0)).collect();
    let attack = Attack::start(
        &router,
        Duration::from_millis(300),
        Duration::from_secs(30),
        move |addr| {
            for (conn, sent) in conns.iter_mut() {
                if conn.is_none() {
                    *conn = connect(addr);
                    *sent = 0;
                }
                let Some(s) = conn.as_mut() else { continue };
                // One byte, never the last: the request head is never complete.
                let byte = &request[*sent % (request.len() - 1)..][..1];
                if s.write_all(byte).is_err() {
                    *conn = None;
                } else {
                    *sent += 1;
                }
            }
        },
    );
    attack.assert_probes_answer(&etp, "under slowloris");
}
