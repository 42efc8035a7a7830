//! Background traffic from the client namespace of `common::topo`, for tests that change etp
//! under load: short TCP connections in a loop, a few long-lived TCP connections that carry
//! data the whole time, and UDP queries with a client-side retry. Threads join the namespace
//! with setns(2) and open sockets there directly. Every loop is bounded in count and time.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::topo::in_netns;
use super::wait_for;

/// Short connections go to these in turn: (address, route in the daemon tests' configs).
const SHORT: [(&str, &str); 3] = [
    ("10.96.0.20:7001", "direct"),
    ("10.96.0.10:7001", "mesh"),
    ("[fd00:10:96::14]:7001", "direct"),
];
/// Long-lived connections.
const LONG: [(&str, &str); 3] = [
    ("10.96.0.20:7001", "direct"),
    ("[fd00:10:96::14]:7001", "direct"),
    ("10.96.0.10:7001", "mesh"),
];
const UDP: [&str; 2] = ["10.96.0.10:7001", "[fd00:10:96::a]:7001"];

/// Hard bounds for every loop, whatever the test does.
const MAX_RUN: Duration = Duration::from_secs(120);
const MAX_ITERATIONS: u64 = 50_000;
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const UDP_TRIES: u32 = 3;
/// UDP queries use local ports from here on, one each (below the ephemeral range).
const UDP_FIRST_PORT: u16 = 10_000;
const UDP_MAX_QUERIES: u64 = 20_000;
const CHUNK: usize = 4096;

#[derive(Debug, Default)]
pub struct LoadReport {
    pub short_ok: u64,
    pub short_ok_direct: u64,
    pub short_ok_mesh: u64,
    pub short_failed: u64,
    pub short_errors: Vec<String>,
    pub long_direct: u64,
    pub long_mesh: u64,
    /// Bytes each long-lived connection sent and got back identical.
    pub long_bytes: Vec<u64>,
    pub long_broken: u64,
    pub long_errors: Vec<String>,
    pub udp_ok: u64,
    /// Queries that needed a second or third try.
    pub udp_retried: u64,
    /// The first few of those: (query number, address, tries).
    pub udp_retries: Vec<(u64, &'static str, u32)>,
    /// Queries unanswered after every try.
    pub udp_lost: u64,
    /// UDP sockets used (one per query): each is one flow for etp.
    pub udp_sockets: u64,
}

pub struct Load {
    stop: Arc<AtomicBool>,
    progress: Arc<AtomicU64>,
    short: JoinHandle<(u64, u64, u64, Vec<String>)>,
    long: Vec<(&'static str, JoinHandle<Result<u64, String>>)>,
    udp: JoinHandle<UdpTally>,
}

impl Load {
    /// Starts every kind of traffic from namespace `ns`.
    pub fn start(ns: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(AtomicU64::new(0));
        let (s, p) = (stop.clone(), progress.clone());
        let short = in_netns(ns, move || short_loop(&s, &p));
        let long = LONG
            .iter()
            .enumerate()
            .map(|(i, &(addr, route))| {
                let (s, p) = (stop.clone(), progress.clone());
                (
                    route,
                    in_netns(ns, move || long_flow(addr, i as u64, &s, &p)),
                )
            })
            .collect();
        let (s, p) = (stop.clone(), progress.clone());
        let udp = in_netns(ns, move || udp_loop(&s, &p));
        Load {
            stop,
            progress,
            short,
            long,
            udp,
        }
    }

    /// Waits until a fair amount of traffic has completed (at most `limit`).
    pub fn wait_progress(&self, limit: Duration) -> bool {
        wait_for(limit, || {
            (self.progress.load(Ordering::SeqCst) >= 50).then_some(())
        })
        .is_some()
    }

    /// Stops every loop, lets each finish its exchange, and reports.
    pub fn finish(self) -> LoadReport {
        self.stop.store(true, Ordering::SeqCst);
        let mut r = LoadReport::default();
        let (direct, mesh, failed, errors) = self.short.join().expect("short thread");
        r.short_ok_direct = direct;
        r.short_ok_mesh = mesh;
        r.short_ok = direct + mesh;
        r.short_failed = failed;
        r.short_errors = errors;
        for (route, h) in self.long {
            match route {
                "mesh" => r.long_mesh += 1,
                _ => r.long_direct += 1,
            }
            match h.join().expect("long thread") {
                Ok(bytes) => r.long_bytes.push(bytes),
                Err(e) => {
                    r.long_broken += 1;
                    r.long_errors.push(e);
                }
            }
        }
        let u = self.udp.join().expect("udp thread");
        (r.udp_ok, r.udp_retried, r.udp_lost, r.udp_sockets) = (u.ok, u.retried, u.lost, u.sockets);
        r.udp_retries = u.retries;
        r
    }
}

fn running(stop: &AtomicBool, t0: Instant, i: u64) -> bool {
    !stop.load(Ordering::SeqCst) && t0.elapsed() < MAX_RUN && i < MAX_ITERATIONS
}

fn connect(addr: &str) -> std::io::Result<TcpStream> {
    let addr: SocketAddr = addr.parse().expect("address");
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// One short exchange: connect, send a line, half-close, read the echo to EOF.
fn short_once(addr: &str, i: u64) -> Result<(), String> {
    let mut s = connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    let msg = format!("short connection {i} to {addr}\n");
    s.write_all(msg.as_bytes())
        .map_err(|e| format!("write {addr}: {e}"))?;
    s.shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown {addr}: {e}"))?;
    let mut back = String::new();
    s.read_to_string(&mut back)
        .map_err(|e| format!("read {addr}: {e}"))?;
    if back != msg {
        return Err(format!("{addr}: echo {back:?} for {msg:?}"));
    }
    Ok(())
}

fn short_loop(stop: &AtomicBool, progress: &AtomicU64) -> (u64, u64, u64, Vec<String>) {
    let (t0, mut i) = (Instant::now(), 0u64);
    let (mut direct, mut mesh, mut failed, mut errors) = (0, 0, 0, Vec::new());
    while running(stop, t0, i) {
        let (addr, route) = SHORT[(i % SHORT.len() as u64) as usize];
        match short_once(addr, i) {
            Ok(()) if route == "mesh" => mesh += 1,
            Ok(()) => direct += 1,
            Err(e) => {
                failed += 1;
                if errors.len() < 10 {
                    errors.push(e);
                }
            }
        }
        progress.fetch_add(1, Ordering::SeqCst);
        i += 1;
        std::thread::sleep(Duration::from_millis(2));
    }
    (direct, mesh, failed, errors)
}

/// The bytes of chunk `n` of long-lived connection `id`: distinct per connection and chunk.
fn chunk(id: u64, n: u64, buf: &mut [u8]) {
    let mut x =
        (id + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ n.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    for b in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
    }
}

/// A long-lived echo connection: a chunk every 10 ms, each echo compared, until stopped; then
/// a half-close and a clean EOF. Returns the bytes that made the round trip.
fn long_flow(addr: &str, id: u64, stop: &AtomicBool, progress: &AtomicU64) -> Result<u64, String> {
    let mut s = connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    let (mut out, mut back) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let (t0, mut n, mut bytes) = (Instant::now(), 0u64, 0u64);
    while running(stop, t0, n) {
        chunk(id, n, &mut out);
        s.write_all(&out)
            .map_err(|e| format!("{addr}: write after {bytes} bytes: {e}"))?;
        s.read_exact(&mut back)
            .map_err(|e| format!("{addr}: read after {bytes} bytes: {e}"))?;
        if back != out {
            return Err(format!("{addr}: chunk {n} came back different"));
        }
        bytes += CHUNK as u64;
        n += 1;
        progress.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(10));
    }
    s.shutdown(Shutdown::Write)
        .map_err(|e| format!("{addr}: shutdown: {e}"))?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
        .map_err(|e| format!("{addr}: read to EOF: {e}"))?;
    if !rest.is_empty() {
        return Err(format!("{addr}: {} stray bytes before EOF", rest.len()));
    }
    Ok(bytes)
}

/// One query on a fresh socket (a new flow), with up to `UDP_TRIES` tries. The reply must
/// come from the address queried and match. Returns the tries used, or `None` when lost.
fn udp_once(addr: &str, i: u64) -> Option<u32> {
    let addr: SocketAddr = addr.parse().expect("address");
    // A port of its own for every query: with ephemeral ports the kernel may reuse the port
    // of an earlier query whose flow etp still holds, and the two would count as one flow.
    let port = UDP_FIRST_PORT + i as u16;
    let any: SocketAddr = if addr.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, port).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, port).into()
    };
    let s = UdpSocket::bind(any).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    let msg = format!("query {i}");
    let mut buf = [0u8; 512];
    for attempt in 1..=UDP_TRIES {
        s.send_to(msg.as_bytes(), addr).ok()?;
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            match s.recv_from(&mut buf) {
                Ok((n, from)) if from == addr && &buf[..n] == msg.as_bytes() => {
                    return Some(attempt)
                }
                Ok(_) => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
                Err(_) => break,
            }
        }
    }
    None
}

#[derive(Default)]
struct UdpTally {
    ok: u64,
    retried: u64,
    lost: u64,
    sockets: u64,
    retries: Vec<(u64, &'static str, u32)>,
}

fn udp_loop(stop: &AtomicBool, progress: &AtomicU64) -> UdpTally {
    let (t0, mut i) = (Instant::now(), 0u64);
    let mut u = UdpTally::default();
    while running(stop, t0, i) && i < UDP_MAX_QUERIES {
        let addr = UDP[(i % UDP.len() as u64) as usize];
        match udp_once(addr, i) {
            Some(1) => u.ok += 1,
            Some(tries) => {
                u.ok += 1;
                u.retried += 1;
                if u.retries.len() < 10 {
                    u.retries.push((i, addr, tries));
                }
            }
            None => u.lost += 1,
        }
        progress.fetch_add(1, Ordering::SeqCst);
        i += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
    u.sockets = i;
    u
}
