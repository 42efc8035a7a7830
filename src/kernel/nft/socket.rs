//! The nf_tables netlink socket: requests, dumps, the generation id, and sending one batch
//! with its acks collected (`apply` and `audit` build on it).
//!
//! Kernel behaviour this code is built around (see /work/shared/notes/netlink-facts.md):
//! - A batch commits only if BEGIN and END arrive in the same skb: the whole batch goes out in
//!   ONE `sendmsg` (iovecs BEGIN, body, END), with SO_SNDBUFFORCE raised to its size.
//! - nfnetlink processes a batch synchronously inside `sendmsg`: when it returns, every reply is
//!   already queued. Reads are still bounded by a timeout so that nothing can hang.
//! - Since 6.10 BEGIN and END are acked too, but END is never acked when the batch fails, so we
//!   never wait for it after an error. Success is "END acked" or "every body message acked".
//! - Every message asks for an ack; the receive buffer is raised (SO_RCVBUFFORCE) so that a few
//!   hundred acks fit. If acks are lost anyway (ENOBUFS) or time out, a fresh socket reads the
//!   generation id to decide whether the batch committed.
//! - The expected generation id on BEGIN makes the batch a compare-and-swap (ERESTART).

use std::io::{self, IoSlice, Read};
use std::os::fd::{BorrowedFd, RawFd};
use std::time::{Duration, Instant};

use socket2::SockRef;

use super::error::NftError;
use super::wire::{self, Ack, Msgs};

/// How long to wait for replies before deciding by the generation id.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Receive buffer per acked message (an ack skb's truesize is well under this).
const RCVBUF_PER_MSG: usize = 2048;
const MIN_RCVBUF: usize = 1 << 20;
/// Dump replies come in skbs of at most 32 KiB; room for a few.
const RECV_CHUNK: usize = 256 * 1024;
/// `SOL_NETLINK` options.
const NETLINK_CAP_ACK: libc::c_int = 10;
const NETLINK_EXT_ACK: libc::c_int = 11;

/// An nf_tables netlink socket (NETLINK_NETFILTER), bound to the network namespace of the
/// thread that opened it.
pub struct Nft {
    /// Owns `fd` (closed when dropped).
    _sock: mnl::Socket,
    fd: RawFd,
    seq: u32,
    sndbuf: usize,
    rcvbuf: usize,
    timeout: Duration,
    buf: Vec<u8>,
}

// SAFETY: `mnl::Socket` is a heap struct holding a file descriptor and its bound address; it has
// no thread affinity (the network namespace is fixed when the socket is created), and `Nft`
// owns it exclusively, so moving an `Nft` to another thread (e.g. tokio's spawn_blocking) is
// sound. `Nft` stays !Sync: all methods take `&mut self`.
unsafe impl Send for Nft {}

/// How a sent batch ended.
pub(super) enum BatchVerdict {
    Committed,
    /// Errors in sequence order.
    Refused(Vec<Ack>),
    /// No verdict from the replies (lost to ENOBUFS, or timed out).
    Unknown(String),
}

impl Nft {
    /// Opens and configures the socket (extended acks, capped acks, a 1 MiB receive buffer).
    pub fn open() -> Result<Nft, NftError> {
        let sock = mnl::Socket::new(mnl::Bus::Netfilter).map_err(NftError::Open)?;
        // SAFETY: the mnl socket pointer is live; this only reads its file descriptor.
        let fd = unsafe { mnl::mnl_sys::mnl_socket_get_fd(sock.as_raw_socket()) };
        let seq = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as u32)
            .unwrap_or(1);
        let mut nft = Nft {
            _sock: sock,
            fd,
            seq,
            sndbuf: 0,
            rcvbuf: 0,
            timeout: DEFAULT_TIMEOUT,
            buf: vec![0; RECV_CHUNK],
        };
        nft.setsockopt(libc::SOL_NETLINK, NETLINK_EXT_ACK, 1, "NETLINK_EXT_ACK")?;
        nft.setsockopt(libc::SOL_NETLINK, NETLINK_CAP_ACK, 1, "NETLINK_CAP_ACK")?;
        nft.ensure_rcvbuf(MIN_RCVBUF)?;
        Ok(nft)
    }

    /// Runs `f` on a socket2 view of our descriptor (for sendmsg, timeouts, non-blocking reads).
    fn with_sock<R>(&self, f: impl FnOnce(SockRef<'_>) -> R) -> R {
        // SAFETY: `fd` belongs to `self.sock`, which outlives this call.
        let fd = unsafe { BorrowedFd::borrow_raw(self.fd) };
        f(SockRef::from(&fd))
    }

    fn setsockopt(
        &self,
        level: libc::c_int,
        name: libc::c_int,
        value: libc::c_int,
        option: &'static str,
    ) -> Result<(), NftError> {
        // SAFETY: `fd` is our open socket; the option value is a c_int on our stack whose size
        // is passed along.
        let rc = unsafe {
            libc::setsockopt(
                self.fd,
                level,
                name,
                &value as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(NftError::SockOpt {
                option,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    fn ensure_rcvbuf(&mut self, bytes: usize) -> Result<(), NftError> {
        if bytes > self.rcvbuf {
            let v = bytes.min(i32::MAX as usize) as libc::c_int;
            self.setsockopt(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, v, "SO_RCVBUFFORCE")?;
            self.rcvbuf = bytes;
        }
        Ok(())
    }

    fn ensure_sndbuf(&mut self, bytes: usize) -> Result<(), NftError> {
        if bytes > self.sndbuf {
            let v = bytes.min(i32::MAX as usize) as libc::c_int;
            self.setsockopt(libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, v, "SO_SNDBUFFORCE")?;
            self.sndbuf = bytes;
        }
        Ok(())
    }

    pub(super) fn next_seq(&mut self, n: u32) -> u32 {
        let s = self.seq;
        self.seq = self.seq.wrapping_add(n);
        s
    }

    /// The ruleset generation id (NFT_MSG_GETGEN): grows by one with every commit, system-wide
    /// (per network namespace).
    pub fn generation(&mut self) -> Result<u32, NftError> {
        let seq = self.next_seq(1);
        let mut req = Vec::with_capacity(20);
        let s = wire::begin_msg(
            &mut req,
            wire::nft_type(wire::NFT_MSG_GETGEN),
            wire::NLM_F_ACK,
            seq,
            0,
            0,
        );
        wire::end_msg(&mut req, s);
        let replies = self.request(&req, seq, "GETGEN", false)?;
        for r in &replies {
            if let Some(m) = Msgs(r).next() {
                if m.ty == wire::nft_type(wire::NFT_MSG_NEWGEN) {
                    for (ty, d) in m.nft_attrs() {
                        if ty == wire::NFTA_GEN_ID && d.len() == 4 {
                            return Ok(u32::from_be_bytes([d[0], d[1], d[2], d[3]]));
                        }
                    }
                }
            }
        }
        Err(NftError::Malformed { what: "GETGEN" })
    }

    /// Sends BEGIN..END in one sendmsg and collects the verdict from the acks.
    pub(super) fn send_batch(
        &mut self,
        parts: &[&[u8]],
        begin_seq: u32,
        end_seq: u32,
        bytes: usize,
    ) -> Result<BatchVerdict, NftError> {
        let msgs = (end_seq - begin_seq + 1) as usize;
        self.ensure_sndbuf(bytes + 64 * 1024)?;
        self.ensure_rcvbuf(MIN_RCVBUF.max(msgs * RCVBUF_PER_MSG))?;
        let iov: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
        let sent = self
            .with_sock(|s| s.send_vectored(&iov))
            .map_err(|source| NftError::Send {
                what: "batch",
                bytes,
                source,
            })?;
        if sent != bytes {
            return Err(NftError::Send {
                what: "batch",
                bytes,
                source: io::Error::other(format!("sendmsg sent {sent} of {bytes} bytes")),
            });
        }

        let body_first = begin_seq + 1;
        let body_count = msgs - 2;
        let mut body_acked = 0usize;
        let mut end_acked = false;
        let mut errors: Vec<Ack> = Vec::new();
        let deadline = Instant::now() + self.timeout;
        loop {
            // After an error every reply is already queued (batches are processed inside
            // sendmsg): drain without waiting, END will not come.
            let wait = if errors.is_empty() {
                deadline.saturating_duration_since(Instant::now())
            } else {
                Duration::ZERO
            };
            let n = match self.recv(wait) {
                Ok(n) => n,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    return Ok(BatchVerdict::Unknown(
                        "ENOBUFS: acks overflowed the receive buffer".into(),
                    ));
                }
                Err(e) if is_timeout(&e) => {
                    if !errors.is_empty() {
                        break;
                    }
                    return Ok(BatchVerdict::Unknown(format!(
                        "no END ack within {} ms",
                        self.timeout.as_millis()
                    )));
                }
                Err(source) => {
                    return Err(NftError::Recv {
                        what: "batch",
                        source,
                    })
                }
            };
            for m in Msgs(&self.buf[..n]) {
                if m.ty != wire::NLMSG_ERROR {
                    continue;
                }
                let Some(ack) = wire::parse_ack(&m) else {
                    continue;
                };
                if ack.seq < begin_seq || ack.seq > end_seq {
                    continue; // a stale reply to an earlier request
                }
                if ack.errno != 0 {
                    errors.push(ack);
                } else if ack.seq == end_seq {
                    end_acked = true;
                } else if ack.seq >= body_first {
                    body_acked += 1;
                }
            }
            if errors.is_empty() && (end_acked || body_acked == body_count) {
                return Ok(BatchVerdict::Committed);
            }
        }
        errors.sort_by_key(|a| a.seq);
        Ok(BatchVerdict::Refused(errors))
    }

    /// One recv with a timeout (zero: don't wait); returns the byte count in `self.buf`.
    fn recv(&mut self, wait: Duration) -> io::Result<usize> {
        // SAFETY: `fd` belongs to `self.sock`, which outlives this call.
        let fd = unsafe { BorrowedFd::borrow_raw(self.fd) };
        let sock = SockRef::from(&fd);
        if wait.is_zero() {
            sock.set_nonblocking(true)?;
        } else {
            sock.set_read_timeout(Some(wait))?;
        }
        let r = (&*sock).read(&mut self.buf);
        if wait.is_zero() {
            sock.set_nonblocking(false)?;
        }
        r
    }

    /// Sends one request and returns its reply messages (each as its own buffer) until its ack
    /// or, for a dump, NLMSG_DONE. A kernel error becomes [`NftError::Request`].
    pub(crate) fn request(
        &mut self,
        req: &[u8],
        seq: u32,
        what: &'static str,
        dump: bool,
    ) -> Result<Vec<Vec<u8>>, NftError> {
        self.with_sock(|s| s.send(req))
            .map_err(|source| NftError::Send {
                what,
                bytes: req.len(),
                source,
            })?;
        // An inactivity deadline: big dumps (300k set elements take the kernel ~10 s to walk)
        // keep it moving as long as replies arrive; a silent kernel still ends the wait.
        let mut deadline = Instant::now() + self.timeout;
        let mut out = Vec::new();
        loop {
            let wait = deadline.saturating_duration_since(Instant::now());
            if wait.is_zero() {
                return Err(NftError::Timeout {
                    what,
                    waited_ms: self.timeout.as_millis() as u64,
                });
            }
            let n = match self.recv(wait) {
                Ok(n) => n,
                Err(e) if is_timeout(&e) => {
                    return Err(NftError::Timeout {
                        what,
                        waited_ms: self.timeout.as_millis() as u64,
                    })
                }
                Err(source) => return Err(NftError::Recv { what, source }),
            };
            deadline = Instant::now() + self.timeout;
            for m in Msgs(&self.buf[..n]) {
                if m.seq != seq {
                    continue;
                }
                match m.ty {
                    wire::NLMSG_DONE if dump => return Ok(out),
                    wire::NLMSG_ERROR => {
                        let ack = wire::parse_ack(&m).ok_or(NftError::Malformed { what })?;
                        if ack.errno != 0 {
                            return Err(NftError::Request {
                                what: what.to_string(),
                                errno: ack.errno,
                            });
                        }
                        if !dump {
                            return Ok(out);
                        }
                    }
                    _ => out.push(m.bytes.to_vec()),
                }
            }
        }
    }

    /// A dump request (`NLM_F_DUMP`) of nf_tables command `cmd` in the inet family, filtered by
    /// the given string attributes.
    pub(crate) fn dump(
        &mut self,
        cmd: u16,
        attrs: &[(u16, &str)],
        what: &'static str,
    ) -> Result<Vec<Vec<u8>>, NftError> {
        let seq = self.next_seq(1);
        let mut req = Vec::with_capacity(128);
        let s = wire::begin_msg(
            &mut req,
            wire::nft_type(cmd),
            wire::NLM_F_DUMP,
            seq,
            libc::NFPROTO_INET as u8,
            0,
        );
        for (ty, v) in attrs {
            wire::put_strz(&mut req, *ty, v);
        }
        wire::end_msg(&mut req, s);
        self.request(&req, seq, what, true)
    }

    /// Whether `table inet NAME` exists (NFT_MSG_GETTABLE).
    pub fn table_exists(&mut self, name: &str) -> Result<bool, NftError> {
        let seq = self.next_seq(1);
        let mut req = Vec::with_capacity(64);
        let s = wire::begin_msg(
            &mut req,
            wire::nft_type(wire::NFT_MSG_GETTABLE),
            wire::NLM_F_ACK,
            seq,
            libc::NFPROTO_INET as u8,
            0,
        );
        wire::put_strz(&mut req, 1, name); // NFTA_TABLE_NAME
        wire::end_msg(&mut req, s);
        match self.request(&req, seq, "GETTABLE", false) {
            Ok(_) => Ok(true),
            Err(NftError::Request { errno, .. }) if errno == libc::ENOENT => Ok(false),
            Err(e) => Err(e),
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn nft_can_move_to_a_blocking_thread() {
        fn send<T: Send>() {}
        send::<super::Nft>();
    }
}
