//! Test servers and clients for the data-path integration tests (run inside namespaces).
//!
//! Servers: `etp-testkit serve IP...` listens on every IP given, TCP and UDP:
//! - 7001 TCP echo (until EOF, then close); UDP echo (reply from the addressed IP)
//! - 7002 banner: writes `banner from LOCAL to PEER\n` on accept, before reading, then echoes
//! - 7003 hash: reads to EOF, then answers `len=N hash=H` (half-close: the answer follows EOF)
//! - 7004 source: reads `N\n`, then sends N bytes of the test stream
//! - 8080 HTTP: any request gets `200` with body `hello from LOCAL to PEER`
//!
//! Clients (every step bounded by a timeout; exit 1 on any failure):
//! `echo ADDR TEXT`, `banner ADDR`, `upload ADDR BYTES`, `download ADDR BYTES`,
//! `many ADDR N` (N connections open at once, then each exchanges a line),
//! `udp ADDR SIZE` (one datagram; the reply must come from ADDR and match).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

const T: Duration = Duration::from_secs(10);

/// The test stream: xorshift64 bytes, the same on both ends.
struct Stream(u64);

impl Stream {
    fn new() -> Stream {
        Stream(0x9E37_79B9_7F4A_7C15)
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            chunk.copy_from_slice(&self.0.to_le_bytes()[..chunk.len()]);
        }
    }
}

/// FNV-1a, 64 bits: an identity check for test data, not a cryptographic hash.
#[derive(Clone, Copy)]
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x100_0000_01b3);
        }
    }
}

fn fail(msg: String) -> ExitCode {
    eprintln!("etp-testkit: {msg}");
    ExitCode::FAILURE
}

fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, T)?;
    s.set_read_timeout(Some(T))?;
    s.set_write_timeout(Some(T))?;
    Ok(s)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let addr = |i: usize| -> SocketAddr { a[i].parse().expect("ADDR as IP:PORT or [IP6]:PORT") };
    let num = |i: usize| -> usize { a[i].parse().expect("a number") };
    let r = match a.first().copied() {
        Some("serve") => return serve(&a[1..]),
        Some("echo") => echo(addr(1), a[2]),
        Some("banner") => banner(addr(1)),
        Some("upload") => upload(addr(1), num(2)),
        Some("download") => download(addr(1), num(2)),
        Some("many") => many(addr(1), num(2)),
        Some("udp") => udp(addr(1), num(2)),
        _ => Err("usage: see the file's doc comment".to_string()),
    };
    match r {
        Ok(out) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

fn echo(addr: SocketAddr, text: &str) -> Result<String, String> {
    let mut s = connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.write_all(text.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    s.shutdown(std::net::Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    let mut back = String::new();
    s.read_to_string(&mut back)
        .map_err(|e| format!("read: {e}"))?;
    Ok(back)
}

fn banner(addr: SocketAddr) -> Result<String, String> {
    let mut s = connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    // Read without writing anything: the server must speak first.
    let mut got = Vec::new();
    let mut b = [0u8; 256];
    while !got.ends_with(b"\n") {
        let n = s.read(&mut b).map_err(|e| format!("read banner: {e}"))?;
        if n == 0 {
            return Err(format!("EOF before the banner ended: {got:?}"));
        }
        got.extend_from_slice(&b[..n]);
    }
    Ok(String::from_utf8_lossy(&got).trim_end().to_string())
}

fn upload(addr: SocketAddr, bytes: usize) -> Result<String, String> {
    let mut s = connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    let (mut gen, mut h) = (Stream::new(), Fnv::new());
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len());
        gen.fill(&mut buf[..n]);
        h.update(&buf[..n]);
        s.write_all(&buf[..n])
            .map_err(|e| format!("write after {} bytes: {e}", bytes - left))?;
        left -= n;
    }
    s.shutdown(std::net::Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)
        .map_err(|e| format!("read answer: {e}"))?;
    let want = format!("len={bytes} hash={:016x}", h.0);
    if answer.trim() == want {
        Ok(format!("ok {want}"))
    } else {
        Err(format!("server saw {answer:?}, sent {want}"))
    }
}

fn download(addr: SocketAddr, bytes: usize) -> Result<String, String> {
    let mut s = connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.write_all(format!("{bytes}\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let (mut gen, mut want, mut got) = (Stream::new(), Fnv::new(), Fnv::new());
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0usize;
    loop {
        let n = s
            .read(&mut buf)
            .map_err(|e| format!("read after {total} bytes: {e}"))?;
        if n == 0 {
            break;
        }
        got.update(&buf[..n]);
        total += n;
    }
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len());
        gen.fill(&mut buf[..n]);
        want.update(&buf[..n]);
        left -= n;
    }
    if total == bytes && got.0 == want.0 {
        Ok(format!("ok len={total} hash={:016x}", got.0))
    } else {
        Err(format!(
            "got {total} bytes hash {:016x}, want {bytes} hash {:016x}",
            got.0, want.0
        ))
    }
}

fn many(addr: SocketAddr, n: usize) -> Result<String, String> {
    let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    rt.block_on(async {
        // Open all connections first so they are all open at once through etp.
        let mut conns = Vec::with_capacity(n);
        for i in 0..n {
            let c = tokio::time::timeout(T, tokio::net::TcpStream::connect(addr))
                .await
                .map_err(|_| format!("connect #{i}: timeout"))?
                .map_err(|e| format!("connect #{i}: {e}"))?;
            conns.push(c);
        }
        let tasks: Vec<_> = conns
            .into_iter()
            .enumerate()
            .map(|(i, mut c)| {
                tokio::spawn(async move {
                    let msg = format!("connection {i}\n");
                    c.write_all(msg.as_bytes()).await?;
                    c.shutdown().await?;
                    let mut back = String::new();
                    c.read_to_string(&mut back).await?;
                    Ok::<bool, std::io::Error>(back == msg)
                })
            })
            .collect();
        let mut ok = 0;
        for (i, t) in tasks.into_iter().enumerate() {
            match tokio::time::timeout(T * 3, t).await {
                Ok(Ok(Ok(true))) => ok += 1,
                other => return Err(format!("connection {i}: {other:?}")),
            }
        }
        Ok(format!("ok {ok}"))
    })
}

fn udp(addr: SocketAddr, size: usize) -> Result<String, String> {
    let any: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .unwrap();
    let s = UdpSocket::bind(any).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let mut payload = vec![0u8; size];
    Stream::new().fill(&mut payload);
    s.send_to(&payload, addr)
        .map_err(|e| format!("send: {e}"))?;
    let mut buf = vec![0u8; 65536];
    let (n, from) = s
        .recv_from(&mut buf)
        .map_err(|e| format!("no reply: {e}"))?;
    if from != addr {
        return Err(format!("reply came from {from}, not {addr}"));
    }
    if buf[..n] != payload[..] {
        return Err(format!("reply differs: {n} bytes back for {size}"));
    }
    Ok(format!("ok from={from} len={n}"))
}

fn serve(ips: &[&str]) -> ExitCode {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut tasks = Vec::new();
        for ip in ips {
            let ip: std::net::IpAddr = ip.parse().expect("an IP");
            for port in [7001u16, 7002, 7003, 7004, 8080] {
                let l = TcpListener::bind((ip, port))
                    .await
                    .unwrap_or_else(|e| panic!("bind tcp {ip}:{port}: {e}"));
                tasks.push(tokio::spawn(tcp_server(l, port)));
            }
            let u = tokio::net::UdpSocket::bind((ip, 7001))
                .await
                .unwrap_or_else(|e| panic!("bind udp {ip}:7001: {e}"));
            tasks.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                loop {
                    if let Ok((n, from)) = u.recv_from(&mut buf).await {
                        let _ = u.send_to(&buf[..n], from).await;
                    }
                }
            }));
        }
        eprintln!("etp-testkit serving on {ips:?}");
        for t in tasks {
            let _ = t.await;
        }
    });
    ExitCode::SUCCESS
}

async fn tcp_server(l: TcpListener, port: u16) {
    loop {
        let Ok((mut s, peer)) = l.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let local = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
            let mut buf = vec![0u8; 64 * 1024];
            match port {
                7001 | 7002 => {
                    if port == 7002 {
                        let b = format!("banner from {local} to {peer}\n");
                        if s.write_all(b.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                }
                7003 => {
                    let (mut h, mut len) = (Fnv::new(), 0usize);
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) => break,
                            Ok(n) => {
                                h.update(&buf[..n]);
                                len += n;
                            }
                            Err(_) => return,
                        }
                    }
                    let _ = s
                        .write_all(format!("len={len} hash={:016x}\n", h.0).as_bytes())
                        .await;
                    let _ = s.shutdown().await;
                }
                7004 => {
                    let mut r = BufReader::new(&mut s);
                    let mut line = String::new();
                    if r.read_line(&mut line).await.is_err() {
                        return;
                    }
                    let mut left: usize = line.trim().parse().unwrap_or(0);
                    let mut gen = Stream::new();
                    while left > 0 {
                        let n = left.min(buf.len());
                        gen.fill(&mut buf[..n]);
                        if s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                        left -= n;
                    }
                    let _ = s.shutdown().await;
                }
                _ => {
                    // HTTP: read the request head, answer, close.
                    let mut head = Vec::new();
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let body = format!("hello from {local} to {peer}\n");
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                    let _ = s.shutdown().await;
                }
            }
        });
    }
}
