//! The admin endpoint: `/metrics` (Prometheus text), `/ready`, `/live`, `/status`.
//!
//! A deliberately small HTTP/1.1 responder: one request per connection, bounded request size,
//! bounded time and a bounded number of connections, so a slow or hostile client on the admin
//! port cannot hold etp's resources.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::dataplane::fdlimit::{self, Spare};
use crate::metrics::{FlowLabels, Metrics};

const MAX_REQUEST: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CONNECTIONS: usize = 32;

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

/// Serves until the task is dropped.
///
/// At the descriptor limit the endpoint still answers: it keeps one descriptor in reserve
/// (`fdlimit::Spare`), spends it on the connection that found the process out of descriptors, and
/// takes it back when that connection closes. Probes and scrapes go on while the data path
/// backs off.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
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
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "admin connection refused: too many open");
            continue;
        };
        let state = state.clone();
        let spare = Arc::clone(&spare);
        tokio::spawn(async move {
            let _permit = permit;
            if tokio::time::timeout(REQUEST_TIMEOUT, handle(stream, &state))
                .await
                .is_err()
            {
                debug!(%peer, "admin request timed out");
            }
            // The connection's descriptor is closed by now: take it back into reserve.
            spare.restore();
        });
    }
}

async fn handle(mut stream: TcpStream, state: &AdminState) -> std::io::Result<()> {
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut len = 0;
    while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") && !buf[..len].ends_with(b"\n\n") {
        if len == buf.len() {
            return respond(&mut stream, 431, "text/plain", "request too large\n").await;
        }
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            break;
        }
        len += n;
    }
    let head = String::from_utf8_lossy(&buf[..len]);
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" {
        return respond(&mut stream, 405, "text/plain", "only GET\n").await;
    }
    match path {
        "/metrics" => {
            let body = state.metrics.encode();
            respond(
                &mut stream,
                200,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                &body,
            )
            .await
        }
        "/live" => respond(&mut stream, 200, "text/plain", "ok\n").await,
        "/ready" => {
            if state.ready.load(Ordering::SeqCst) {
                respond(&mut stream, 200, "text/plain", "ready\n").await
            } else {
                respond(&mut stream, 503, "text/plain", "not ready\n").await
            }
        }
        "/status" => {
            let (mut body, flows) = state
                .status
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            // Counters are read live, not from the daemon's last status snapshot.
            body.push_str("counters:\n");
            body.push_str(&state.metrics.status_counters(&flows));
            respond(&mut stream, 200, "text/plain", &body).await
        }
        _ => {
            respond(
                &mut stream,
                404,
                "text/plain",
                "not found: try /metrics /ready /live /status\n",
            )
            .await
        }
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
