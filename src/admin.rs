//! The admin endpoint: `/metrics` (Prometheus text), `/ready`, `/live`, `/status`.
//!
//! A deliberately small HTTP/1.1 responder: one request per connection. It must keep answering
//! liveness and readiness probes while a local process holds admin connections open or trickles
//! requests byte by byte (slowloris), because a failed liveness probe restarts etp and kills every
//! flow it carries. So:
//! - every connection has a deadline for its whole request head ([`HEAD_TIMEOUT`], however the
//!   bytes trickle in) and one for writing the answer ([`WRITE_TIMEOUT`]);
//! - at most [`MAX_CONNECTIONS`] are open; a new connection beyond that sheds the *oldest* open
//!   one instead of being refused. A probe sends its request at once and is answered within
//!   milliseconds, so it is never the oldest for long; whoever holds connections open loses
//!   them, newest kept, and cannot keep a probe out. (Refusing new connections, as before,
//!   let 32 idle connections starve every probe for the request timeout, again and again.)

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tracing::{debug, warn};

use crate::dataplane::fdlimit::{self, Spare};
use crate::metrics::{FlowLabels, Metrics};

const MAX_REQUEST: usize = 8 * 1024;
/// The whole request head must arrive within this (a kubelet probe's default timeout is 1 s;
/// its request arrives in one segment).
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// Writing the answer (a `/metrics` body to a client that does not read) is bounded too.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Open admin connections; the next one sheds the oldest.
pub const MAX_CONNECTIONS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("binding the admin endpoint on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What the admin endpoint serves; the daemon updates it.
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    /// Listeners bound and ruleset applied.
    pub ready: AtomicBool,
    /// The text `etp status` prints (without its counters), and the flow series whose
    /// counters it lists.
    status: Mutex<(String, Vec<FlowLabels>)>,
}

impl AdminState {
    pub fn new(metrics: Arc<Metrics>) -> Arc<AdminState> {
        Arc::new(AdminState {
            metrics,
            ready: AtomicBool::new(false),
            status: Mutex::new(("starting\n".to_string(), Vec::new())),
        })
    }

    pub fn set_status(&self, text: String, flows: Vec<FlowLabels>) {
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = (text, flows);
    }
}

/// Binds the admin listener (before the daemon reports ready, so a port clash stops start-up).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, AdminError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError::Bind { addr, source })
}

/// The open admin connections in accept order, each with the sender whose drop sheds it.
#[derive(Debug)]
struct Open {
    limit: usize,
    next: u64,
    conns: BTreeMap<u64, oneshot::Sender<()>>,
}

impl Open {
    fn new(limit: usize) -> Open {
        Open {
            limit,
            next: 0,
            conns: BTreeMap::new(),
        }
    }

    /// Registers a new connection; sheds the oldest ones while more than `limit` would be
    /// open. Returns the new connection's id, its shed signal and how many were shed.
    fn admit(&mut self) -> (u64, oneshot::Receiver<()>, usize) {
        let mut shed = 0;
        while self.conns.len() >= self.limit.max(1) {
            // Dropping the sender wakes the connection's task, which closes it.
            self.conns.pop_first();
            shed += 1;
        }
        let id = self.next;
        self.next += 1;
        let (tx, rx) = oneshot::channel();
        self.conns.insert(id, tx);
        (id, rx, shed)
    }

    fn remove(&mut self, id: u64) {
        self.conns.remove(&id);
    }
}

/// Serves until the task is dropped.
///
/// At the descriptor limit the endpoint still answers: it keeps one descriptor in reserve
/// (`fdlimit::Spare`), spends it on the connection that found the process out of descriptors, and
/// takes it back when that connection closes. Probes and scrapes go on while the data path
/// backs off.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    let open = Arc::new(Mutex::new(Open::new(MAX_CONNECTIONS)));
    let spare = Arc::new(Spare::new());
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) if fdlimit::is_exhaustion(&e) && spare.release() => {
                warn!(error = %e, "admin accept: out of file descriptors; using the reserved one");
                continue;
            }
            Err(e) => {
                warn!(error = %e, "admin accept failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                spare.restore();
                continue;
            }
        };
        let (id, shed_rx, shed) = open.lock().unwrap_or_else(|e| e.into_inner()).admit();
        if shed > 0 {
            debug!(%peer, shed, "admin connections at the limit: the oldest shed");
        }
        let state = state.clone();
        let spare = Arc::clone(&spare);
        let open = Arc::clone(&open);
        tokio::spawn(async move {
            tokio::select! {
                r = handle(stream, &state) => {
                    if let Err(e) = r {
                        debug!(%peer, error = %e, "admin connection ended");
                    }
                }
                _ = shed_rx => debug!(%peer, "admin connection shed for a newer one"),
            }
            open.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
            // The connection's descriptor is closed by now: take it back into reserve.
            spare.restore();
        });
        // Let the connection just spawned read and answer what it already has before the next
        // accept: in a burst of connections (a hog opening hundreds at once) the accept loop is
        // always ready and would otherwise admit MAX_CONNECTIONS newer ones, shedding a probe
        // whose request was waiting in its socket, before the probe's task ever ran (seen once in
        // CI: `probes_answer_while_admin_connections_are_hogged`).
        tokio::task::yield_now().await;
    }
}

/// Reads the request head: up to the blank line, at most [`MAX_REQUEST`] bytes. `None` when the
/// head is too large.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut len = 0;
    while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") && !buf[..len].ends_with(b"\n\n") {
        if len == buf.len() {
            return Ok(None);
        }
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            break;
        }
        len += n;
    }
    buf.truncate(len);
    Ok(Some(buf))
}

async fn handle(mut stream: TcpStream, state: &AdminState) -> std::io::Result<()> {
    let head = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream)).await {
        Err(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "request head not complete in time",
            ))
        }
        Ok(r) => r?,
    };
    let (code, ctype, body) = match head {
        None => (431, "text/plain", "request too large\n".to_string()),
        Some(head) => answer(&String::from_utf8_lossy(&head), state),
    };
    tokio::time::timeout(WRITE_TIMEOUT, respond(&mut stream, code, ctype, &body))
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "answer not written in time")
        })?
}

/// The answer to a request head: (status code, content type, body).
fn answer(head: &str, state: &AdminState) -> (u16, &'static str, String) {
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" {
        return (405, "text/plain", "only GET\n".to_string());
    }
    match path {
        "/metrics" => (
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            state.metrics.encode(),
        ),
        "/live" => (200, "text/plain", "ok\n".to_string()),
        "/ready" if state.ready.load(Ordering::SeqCst) => {
            (200, "text/plain", "ready\n".to_string())
        }
        "/ready" => (503, "text/plain", "not ready\n".to_string()),
        "/status" => {
            let (mut body, flows) = state
                .status
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            // Counters are read live, not from the daemon's last status snapshot.
            body.push_str("counters:\n");
            body.push_str(&state.metrics.status_counters(&flows));
            (200, "text/plain", body)
        }
        _ => (
            404,
            "text/plain",
            "not found: try /metrics /ready /live /status\n".to_string(),
        ),
    }
}

async fn respond(
    stream: &mut TcpStream,
    code: u16,
    ctype: &str,
    body: &str,
) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// A blocking GET for `etp status` (std only: the CLI has no runtime for this).
pub fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.take(16 * 1024 * 1024).read_to_string(&mut out)?;
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_connection_beyond_the_limit_sheds_the_oldest() {
        let mut open = Open::new(3);
        let mut rx: Vec<_> = (0..3)
            .map(|_| {
                let (_, rx, shed) = open.admit();
                assert_eq!(shed, 0);
                rx
            })
            .collect();
        let (id, mut newest, shed) = open.admit();
        assert_eq!((id, shed), (3, 1));
        assert!(rx[0]
            .try_recv()
            .is_err_and(|e| e == oneshot::error::TryRecvError::Closed));
        for r in &mut rx[1..] {
            assert_eq!(r.try_recv(), Err(oneshot::error::TryRecvError::Empty));
        }
        open.remove(1);
        let (_, _, shed) = open.admit();
        assert_eq!(shed, 0, "a closed connection frees its place");
        assert_eq!(newest.try_recv(), Err(oneshot::error::TryRecvError::Empty));
    }

    /// On loopback: with twice the limit of idle connections held open, and as many trickling
    /// a byte at a time, `/live` still answers at once, each time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn probes_answer_while_connections_are_hogged_and_trickled() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = AdminState::new(Arc::new(Metrics::new()));
        let server = tokio::spawn(serve(listener, state));
        let mut held = Vec::new();
        for _ in 0..2 * MAX_CONNECTIONS {
            held.push(TcpStream::connect(addr).await.unwrap());
        }
        for s in held.iter_mut().skip(MAX_CONNECTIONS) {
            s.write_all(b"G").await.unwrap();
        }
        for _ in 0..5 {
            let probe = async {
                let mut s = TcpStream::connect(addr).await?;
                s.write_all(b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n")
                    .await?;
                let mut out = String::new();
                s.read_to_string(&mut out).await?;
                std::io::Result::Ok(out)
            };
            let out = tokio::time::timeout(Duration::from_secs(1), probe)
                .await
                .expect("/live within 1 s")
                .unwrap();
            assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
            // More hogs arrive between probes.
            for _ in 0..MAX_CONNECTIONS / 2 {
                held.push(TcpStream::connect(addr).await.unwrap());
            }
        }
        server.abort();
    }
}
