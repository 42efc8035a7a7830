//! A stand-in for linkerd2-proxy's outbound side, for the integration tests.
//!
//! Like the real proxy it listens on 127.0.0.1:PORT and [::1]:PORT (default 4140), reads
//! `SO_ORIGINAL_DST` (IPv6: `IP6T_SO_ORIGINAL_DST`) on every accepted connection and DROPS the
//! connection when that fails; otherwise it records what it saw and forwards to that original
//! destination. Run it as the proxy's uid (`setpriv --reuid 2102 ...`): its own upstream
//! connections must not be intercepted.
//!
//! Usage: `linkerd-standin [--port N] [--log FILE] [--listen IP]... [--no-loopback]`.
//! `--ready-port P --ready-file F` serves an admin `/ready` on 127.0.0.1:P like the proxy's:
//! 200 while F exists, 503 otherwise (a test makes the proxy "not ready" without stopping it).
//! `--listen` adds an address (etp's kernel hand-off address; bound with IP_FREEBIND so that it
//! may start before etp creates the address, as the real proxy may); `--no-loopback` leaves out
//! 127.0.0.1 and [::1]. One line per connection goes to FILE
//! (opened for append, never created: create it writable first) or to stdout:
//! `orig_dst=ADDR peer=ADDR uid=UID` or `dropped peer=ADDR error=...`.

use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use socket2::{Domain, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpStream};

type Log = Arc<Mutex<Box<dyn Write + Send>>>;

fn record(log: &Log, line: String) {
    let mut w = log.lock().expect("log lock");
    let _ = writeln!(w, "{line}");
    let _ = w.flush();
}

fn listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        s.set_freebind_v6(true)?;
    } else {
        s.set_freebind_v4(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    TcpListener::from_std(s.into())
}

/// The proxy's way: SO_ORIGINAL_DST for the accepted socket's family.
fn original_dst(s: &TcpStream) -> std::io::Result<SocketAddr> {
    let sock = SockRef::from(s);
    let a = if s.local_addr()?.is_ipv6() {
        sock.original_dst_v6()?
    } else {
        sock.original_dst_v4()?
    };
    a.as_socket()
        .ok_or_else(|| std::io::Error::other("original destination is not an IP address"))
}

async fn serve(l: TcpListener, log: Log, uid: String) {
    loop {
        let Ok((s, peer)) = l.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let log = log.clone();
        let uid = uid.clone();
        tokio::spawn(async move {
            let dst = match original_dst(&s) {
                Ok(d) => d,
                Err(e) => {
                    record(&log, format!("dropped peer={peer} error={e}"));
                    return;
                }
            };
            record(&log, format!("orig_dst={dst} peer={peer} uid={uid}"));
            let up = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(dst)).await;
            let Ok(Ok(mut up)) = up else {
                record(&log, format!("upstream_failed orig_dst={dst}"));
                return;
            };
            let mut s = s;
            let _ = tokio::io::copy_bidirectional(&mut s, &mut up).await;
        });
    }
}

/// The proxy's admin `/ready`: 200 while `file` exists, else 503; one request per connection.
async fn ready(l: TcpListener, file: String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok((mut s, _)) = l.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let mut buf = [0u8; 1024];
        let _ = tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await;
        let status = if std::path::Path::new(&file).exists() {
            "200 OK"
        } else {
            "503 Service Unavailable"
        };
        let _ = s
            .write_all(
                format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await;
    }
}

#[tokio::main]
async fn main() {
    let mut port: u16 = 4140;
    let mut log_path: Option<String> = None;
    let mut extra: Vec<std::net::IpAddr> = Vec::new();
    let mut loopback = true;
    let mut ready_port: Option<u16> = None;
    let mut ready_file = String::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--port" => port = args.next().and_then(|p| p.parse().ok()).expect("--port N"),
            "--log" => log_path = args.next(),
            "--listen" => extra.push(
                args.next()
                    .and_then(|p| p.parse().ok())
                    .expect("--listen IP"),
            ),
            "--no-loopback" => loopback = false,
            "--ready-port" => ready_port = args.next().and_then(|p| p.parse().ok()),
            "--ready-file" => ready_file = args.next().expect("--ready-file PATH"),
            other => panic!("unknown argument {other}"),
        }
    }
    let log: Box<dyn Write + Send> = match log_path {
        Some(p) => Box::new(
            std::fs::OpenOptions::new()
                .append(true)
                .open(&p)
                .unwrap_or_else(|e| panic!("open {p}: {e}")),
        ),
        None => Box::new(std::io::stdout()),
    };
    let log: Log = Arc::new(Mutex::new(log));
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .unwrap_or_default();
    let mut addrs: Vec<std::net::IpAddr> = Vec::new();
    if loopback {
        addrs.push(Ipv4Addr::LOCALHOST.into());
        addrs.push(Ipv6Addr::LOCALHOST.into());
    }
    addrs.extend(extra);
    let mut tasks = Vec::new();
    if let Some(p) = ready_port {
        let l = listener((Ipv4Addr::LOCALHOST, p).into()).expect("bind the ready port");
        tasks.push(tokio::spawn(ready(l, ready_file.clone())));
    }
    for ip in addrs {
        let l = listener((ip, port).into()).unwrap_or_else(|e| panic!("bind {ip}:{port}: {e}"));
        eprintln!("linkerd-standin listening on {ip} port {port} as uid {uid}");
        tasks.push(tokio::spawn(serve(l, log.clone(), uid.clone())));
    }
    for t in tasks {
        let _ = t.await;
    }
}
