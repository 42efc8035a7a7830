//! TCP relay: copies both directions of a flow concurrently until both have ended.
//!
//! - A half-close is passed on: when one side sends FIN (read returns 0) etp shuts down the
//!   write side of the other leg and keeps copying the opposite direction, so a client that
//!   closes its write side first still gets its answer.
//! - Resets, broken pipes and "not connected" are ordinary ways for a flow to end; they end the
//!   whole flow (both legs) and are reported as [`End::Reset`], not as errors. A reset from one
//!   side is passed on as a reset (SO_LINGER 0) to the other.
//! - An idle timeout ends a flow in which neither direction moved a byte for that long.
//! - Keepalive on the upstream leg is armed once a flow has lived [`KEEPALIVE_ARM_AFTER`]:
//!   its first probe is due after 180 s of silence anyway, and the many short flows (one HTTP
//!   request per connection) are spared four setsockopt calls each.
//! - Per-flow system calls are kept few (BENCHMARKS.md counts them): a read shorter than the
//!   buffer ends the wait for readiness without a second, failing read; when the second
//!   direction ends, the caller's close(2) sends the last FIN instead of a shutdown(2).
//! - `[limits] relay` picks how bytes move (BENCHMARKS.md has the measurements):
//!   - `adaptive` (default): each direction starts with the buffered copy and moves to splice(2)
//!     once its reads keep filling the buffer. Request/response traffic never pays for pipes
//!     (splice's per-call cost hurt keep-alive p99 and two pipes per flow hurt the connection
//!     rate); bulk transfers get splice's throughput at half the CPU.
//!   - `splice`: socket -> pipe -> socket from the first byte, one pipe per direction.
//!   - `copy`: always through user space: no allocation per read, one buffer per direction
//!     allocated on the first readable event and grown 8 KiB -> 64 KiB -> 256 KiB while reads
//!     keep filling it. Also the fallback when no pipe can be made (EMFILE).

use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::dataplane::sockopt;
use crate::model::RelayMode;

const BUF_START: usize = 8 * 1024;
const BUF_MAX: usize = 256 * 1024;
/// Consecutive full reads before the buffer grows.
const GROW_AFTER: u32 = 4;
/// Consecutive full reads of the first buffer after which `adaptive` switches to splice.
const SPLICE_AFTER: u32 = 4;
/// How long a flow lives before keepalive is armed on its upstream leg.
pub const KEEPALIVE_ARM_AFTER: Duration = Duration::from_secs(1);

/// How a relayed flow ended.
#[derive(Debug)]
pub enum End {
    /// Both sides closed (FIN both ways).
    Closed,
    /// Nothing moved for the idle timeout.
    Idle,
    /// A side reset the connection (or a write hit a closed peer): a normal ending.
    Reset(io::ErrorKind),
    /// Anything else.
    Error(io::Error),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Closed => f.write_str("closed"),
            End::Idle => f.write_str("idle timeout"),
            End::Reset(k) => write!(f, "reset ({k})"),
            End::Error(e) => write!(f, "error: {e}"),
        }
    }
}

/// What a relay did.
#[derive(Debug)]
pub struct Outcome {
    pub client_to_upstream: u64,
    pub upstream_to_client: u64,
    pub end: End,
}

/// Byte counters a relay adds to as it goes (the flow's route's `etp_bytes_total`).
#[derive(Debug, Clone, Default)]
pub struct Counters {
    pub client_to_upstream: Counter,
    pub upstream_to_client: Counter,
}

/// Whether an I/O error is an ordinary end of a TCP conversation.
pub fn is_normal_end(e: &io::Error) -> bool {
    use io::ErrorKind as K;
    matches!(
        e.kind(),
        K::ConnectionReset
            | K::BrokenPipe
            | K::NotConnected
            | K::UnexpectedEof
            | K::ConnectionAborted
    )
}

/// Relays between `client` and `upstream` until both directions end, one fails, or nothing
/// moves for `idle`. Both sockets are left open; the caller must drop (close) them when this
/// returns: after a clean end that close sends the last direction's FIN.
pub async fn relay(
    client: &TcpStream,
    upstream: &TcpStream,
    idle: Duration,
    counters: &Counters,
    mode: RelayMode,
) -> Outcome {
    let start = Instant::now();
    // Milliseconds since `start` of the last byte moved, shared by both directions.
    let last = AtomicU64::new(0);
    let c2u = AtomicU64::new(0);
    let u2c = AtomicU64::new(0);
    let ended = AtomicU8::new(0);
    let both = async {
        let a = Dir {
            from: client,
            to: upstream,
            total: &c2u,
            counter: &counters.client_to_upstream,
            last: &last,
            ended: &ended,
            start,
        };
        let b = Dir {
            from: upstream,
            to: client,
            total: &u2c,
            counter: &counters.upstream_to_client,
            last: &last,
            ended: &ended,
            start,
        };
        match mode {
            RelayMode::Splice => tokio::try_join!(pump_splice(a), pump_splice(b)),
            RelayMode::Copy => tokio::try_join!(pump(a, false), pump(b, false)),
            RelayMode::Adaptive => tokio::try_join!(pump(a, true), pump(b, true)),
        }
    };
    let idle_watch = async {
        loop {
            let due = start + Duration::from_millis(last.load(Ordering::Relaxed)) + idle;
            if Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due.into()).await;
        }
    };
    let arm_keepalive = async {
        tokio::time::sleep(KEEPALIVE_ARM_AFTER).await;
        let _ = sockopt::set_keepalive(upstream.into());
        std::future::pending::<()>().await
    };
    let end = tokio::select! {
        r = both => match r {
            Ok(_) => End::Closed,
            Err(e) if is_normal_end(&e) => {
                if e.kind() == io::ErrorKind::ConnectionReset {
                    // Pass the reset on to whichever side is still there.
                    let _ = sockopt::set_reset_on_close(client.into());
                    let _ = sockopt::set_reset_on_close(upstream.into());
                }
                End::Reset(e.kind())
            }
            Err(e) => End::Error(e),
        },
        _ = idle_watch => End::Idle,
        _ = arm_keepalive => unreachable!("arming keepalive never completes"),
    };
    Outcome {
        client_to_upstream: c2u.load(Ordering::Relaxed),
        upstream_to_client: u2c.load(Ordering::Relaxed),
        end,
    }
}

/// One direction of a relay and where it reports progress.
struct Dir<'a> {
    from: &'a TcpStream,
    to: &'a TcpStream,
    total: &'a AtomicU64,
    counter: &'a Counter,
    last: &'a AtomicU64,
    /// Directions that have ended (0, 1 or 2), shared by both.
    ended: &'a AtomicU8,
    start: Instant,
}

impl Dir<'_> {
    fn moved(&self, n: usize) {
        self.total.fetch_add(n as u64, Ordering::Relaxed);
        self.counter.inc_by(n as u64);
        self.last
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// `from` sent FIN: pass the half-close on to `to`, unless the other direction has ended
    /// already. Then both receive queues have been read to EOF, so the caller's close(2) right
    /// after the relay sends a FIN (not a RST), and a shutdown(2) would be a wasted call.
    fn pass_fin(&self) -> io::Result<()> {
        if self.ended.fetch_add(1, Ordering::AcqRel) == 1 {
            return Ok(());
        }
        // The peer may be gone already.
        match socket2::SockRef::from(self.to).shutdown(std::net::Shutdown::Write) {
            Err(e) if !is_normal_end(&e) => Err(e),
            _ => Ok(()),
        }
    }
}

/// One read from a socket tokio reported readable. A read shorter than `buf` shows the socket's
/// receive queue was drained, so the readiness tokio observed *before* the read is cleared and
/// the next wait goes straight to epoll, without a read that would fail with EAGAIN. This is
/// tokio's own rule in `PollEvented::poll_read` (edge-triggered epoll: data arriving after the
/// read raises a new event, whose newer tick the clearing does not touch); `&TcpStream` has no
/// `AsyncRead`, so it is spelled out here with `try_io`.
fn read_drained(from: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let len = buf.len();
    let mut got = 0;
    let r = from.try_io(Interest::READABLE, || {
        let n = (&*socket2::SockRef::from(from)).read(buf)?;
        got = n;
        if n > 0 && n < len {
            // Reported as WouldBlock only so that try_io clears the readiness it observed.
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(n)
        }
    });
    match r {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => Ok(got),
        r => r,
    }
}

/// Copies `from` -> `to` until EOF (then shuts down `to`'s write side) or an error. With
/// `to_splice`, hands the direction to [`pump_splice`] once reads keep filling the buffer.
async fn pump(d: Dir<'_>, to_splice: bool) -> io::Result<()> {
    let (from, to) = (d.from, d.to);
    let mut buf: Vec<u8> = Vec::new();
    let mut full_reads = 0u32;
    loop {
        from.readable().await?;
        if buf.is_empty() {
            buf = vec![0; BUF_START];
        }
        let n = match read_drained(from, &mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            return d.pass_fin();
        }
        write_all(to, &buf[..n]).await?;
        d.moved(n);
        if to_splice && n == buf.len() {
            full_reads += 1;
            if full_reads >= SPLICE_AFTER {
                // Everything read so far is written: the pipe starts empty.
                return Box::pin(pump_splice(d)).await;
            }
            continue;
        }
        if n == buf.len() && buf.len() < BUF_MAX {
            full_reads += 1;
            if full_reads >= GROW_AFTER {
                buf = vec![0; (buf.len() * 8).min(BUF_MAX)];
                full_reads = 0;
            }
        } else {
            full_reads = 0;
        }
    }
}

/// Pipe size for splice: one pipe per direction, allocated on the first readable event.
/// 1 MiB measured fastest (vs 64 and 256 KiB). Beyond `fs.pipe-user-pages-soft` the kernel
/// refuses the resize and the pipe keeps its default size: slower, still correct.
const PIPE_SIZE: usize = 1 << 20;

/// Like [`pump`], but the bytes go socket -> pipe -> socket with splice(2), never copied
/// through user space.
async fn pump_splice(d: Dir<'_>) -> io::Result<()> {
    let (from, to) = (d.from, d.to);
    use std::os::fd::AsFd;
    let mut pipe: Option<sockopt::Pipe> = None;
    loop {
        from.readable().await?;
        let p = match &pipe {
            Some(p) => p,
            None => match sockopt::Pipe::new(PIPE_SIZE) {
                Ok(p) => pipe.insert(p),
                // Out of descriptors: copy through user space instead (nothing read yet).
                Err(_) => return pump(d, false).await,
            },
        };
        let n = match from.try_io(Interest::READABLE, || p.fill(from.as_fd(), PIPE_SIZE)) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            return d.pass_fin();
        }
        let mut left = n;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || p.drain(to.as_fd(), left)) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        d.moved(n);
    }
}

async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        to.writable().await?;
        match to.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair of loopback TCP streams.
    async fn pair(l: &TcpListener) -> (TcpStream, TcpStream) {
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn half_close_passes_and_answer_returns() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        // client <-> (c_far, etp side) ; (u_near, etp side) <-> server
        let (mut client, c_far) = pair(&l).await;
        let (u_near, mut server) = pair(&l).await;
        let counters = Counters::default();
        let relay = tokio::spawn(async move {
            relay(
                &c_far,
                &u_near,
                Duration::from_secs(10),
                &counters,
                RelayMode::Adaptive,
            )
            .await
        });
        client.write_all(b"question").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"question", "server saw the data and then EOF");
        server.write_all(b"answer after eof").await.unwrap();
        drop(server);
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"answer after eof");
        let out = relay.await.unwrap();
        assert!(matches!(out.end, End::Closed), "{}", out.end);
        assert_eq!(out.client_to_upstream, 8);
        assert_eq!(out.upstream_to_client, 16);
    }

    #[tokio::test]
    async fn idle_flow_ends() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (_client, c_far) = pair(&l).await;
        let (u_near, _server) = pair(&l).await;
        let out = tokio::time::timeout(
            Duration::from_secs(10),
            relay(
                &c_far,
                &u_near,
                Duration::from_millis(200),
                &Counters::default(),
                RelayMode::Adaptive,
            ),
        )
        .await
        .expect("idle timeout fires before the test's bound");
        assert!(matches!(out.end, End::Idle), "{}", out.end);
    }

    /// Request/response ping-pong, the keep-alive pattern: every read is short, so every read
    /// clears readiness (`read_drained`). A wakeup lost to that clearing would stall a round
    /// trip; the bound below would then fail the test.
    #[tokio::test]
    async fn ping_pong_with_short_reads_never_stalls() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (mut client, c_far) = pair(&l).await;
        let (u_near, mut server) = pair(&l).await;
        let relay = tokio::spawn(async move {
            relay(
                &c_far,
                &u_near,
                Duration::from_secs(10),
                &Counters::default(),
                RelayMode::Adaptive,
            )
            .await
        });
        let echo = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            loop {
                let n = server.read(&mut buf).await.unwrap();
                if n == 0 {
                    return;
                }
                server.write_all(&buf[..n]).await.unwrap();
            }
        });
        let rounds = tokio::time::timeout(Duration::from_secs(20), async {
            let mut buf = [0u8; 64];
            for i in 0..2000u32 {
                let msg = i.to_be_bytes();
                client.write_all(&msg).await.unwrap();
                client.read_exact(&mut buf[..4]).await.unwrap();
                assert_eq!(buf[..4], msg);
            }
            2000
        })
        .await
        .expect("2000 round trips finish");
        assert_eq!(rounds, 2000);
        drop(client);
        echo.await.unwrap();
        let out = relay.await.unwrap();
        assert!(matches!(out.end, End::Closed), "{}", out.end);
        assert_eq!(out.client_to_upstream, 8000);
        assert_eq!(out.upstream_to_client, 8000);
    }

    /// Keepalive is off on a fresh upstream socket and armed once the flow has lived
    /// `KEEPALIVE_ARM_AFTER`, with ztunnel's timings.
    #[tokio::test]
    async fn keepalive_is_armed_on_the_upstream_of_a_lasting_flow() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (_client, c_far) = pair(&l).await;
        let (u_near, _server) = pair(&l).await;
        let u_near = std::sync::Arc::new(u_near);
        let sock = |s: &TcpStream| socket2::SockRef::from(s).keepalive().unwrap();
        assert!(!sock(&u_near), "off before the relay");
        let up = std::sync::Arc::clone(&u_near);
        let relay = tokio::spawn(async move {
            relay(
                &c_far,
                &up,
                Duration::from_secs(30),
                &Counters::default(),
                RelayMode::Adaptive,
            )
            .await
        });
        tokio::time::sleep(KEEPALIVE_ARM_AFTER / 2).await;
        assert!(!sock(&u_near), "not armed for a young flow");
        let armed = async {
            while !sock(&u_near) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(KEEPALIVE_ARM_AFTER * 5, armed)
            .await
            .expect("keepalive armed");
        let r = socket2::SockRef::from(&*u_near);
        assert_eq!(r.tcp_keepalive_time().unwrap(), Duration::from_secs(180));
        assert_eq!(
            r.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(180)
        );
        assert_eq!(r.tcp_keepalive_retries().unwrap(), 9);
        relay.abort();
    }

    /// 5 MB through each mode: `adaptive` starts copying and switches to splice mid-stream.
    #[tokio::test]
    async fn bulk_bytes_arrive_in_order_and_are_counted() {
        for mode in [RelayMode::Adaptive, RelayMode::Copy, RelayMode::Splice] {
            bulk(mode).await;
        }
    }

    async fn bulk(mode: RelayMode) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (mut client, c_far) = pair(&l).await;
        let (u_near, mut server) = pair(&l).await;
        let counters = Counters::default();
        let c2 = counters.clone();
        let relay = tokio::spawn(async move {
            relay(&c_far, &u_near, Duration::from_secs(10), &c2, mode).await
        });
        let data: Vec<u8> = (0..5_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let sent = data.clone();
        let w = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert!(
            got == data,
            "{mode:?}: bytes differ (len {} vs {})",
            got.len(),
            data.len()
        );
        drop(server);
        drop(w.await.unwrap());
        let out = relay.await.unwrap();
        assert_eq!(out.client_to_upstream, data.len() as u64, "{mode:?}");
        assert_eq!(
            counters.client_to_upstream.get(),
            data.len() as u64,
            "{mode:?}"
        );
    }
}
