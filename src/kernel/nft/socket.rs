//! The nf_tables netlink socket: requests, dumps, the generation id, and sending one batch
//! with its acks collected (`apply` and `audit` build on it).
//!
//! Kernel behaviour this code is built around (measured; NOTES.md, "Kernel facts measured here"):
//! - A batch commits only if BEGIN and END arrive in the same skb: the whole batch goes out as
//!   ONE datagram (BEGIN, body, END in one buffer, one libmnl send), with SO_SNDBUFFORCE raised
//!   to its size. (`mnl::Socket::send_all` would send each part as its own skb.)
//! - nfnetlink processes a batch synchronously inside the send: when it returns, every reply is
//!   already queued. Reads are still bounded by a timeout so that nothing can hang.
//! - Since 6.10 BEGIN and END are acked too, but END is never acked when the batch fails, so we
//!   never wait for it after an error. Success is "END acked" or "every body message acked".
//! - Every message asks for an ack; the receive buffer is raised (SO_RCVBUFFORCE) so that a few
//!   hundred acks fit. If acks are lost anyway (ENOBUFS) or time out, a fresh socket reads the
//!   generation id to decide whether the batch committed.
//! - The expected generation id on BEGIN makes the batch a compare-and-swap (ERESTART).

use std::io;
use std::time::{Duration, Instant};

use super::error::NftError;
use super::wire;
use crate::kernel::netlink::{self, Ack, Msgs, NlSocket, Replied, Replies};

/// How long to wait for replies before deciding by the generation id.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Receive buffer per acked message (an ack skb's truesize is well under this).
const RCVBUF_PER_MSG: usize = 2048;
const MIN_RCVBUF: usize = 1 << 20;
/// Dump replies come in skbs of at most 32 KiB; room for a few.
const RECV_CHUNK: usize = 256 * 1024;
/// How often an interrupted dump (`NLM_F_DUMP_INTR`) is retried before giving up.
const DUMP_ATTEMPTS: usize = 3;

/// An nf_tables netlink socket (NETLINK_NETFILTER, opened and sent through libmnl), bound to
/// the network namespace of the thread that opened it.
pub struct Nft {
    sock: NlSocket,
    seq: u32,
    timeout: Duration,
    buf: Vec<u8>,
}

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
        let mut sock = NlSocket::open_mnl(mnl::Bus::Netfilter).map_err(NftError::Open)?;
        sock.ensure_rcvbuf(MIN_RCVBUF)
            .map_err(|source| NftError::SockOpt {
                option: "SO_RCVBUFFORCE",
                source,
            })?;
        let seq = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as u32)
            .unwrap_or(1);
        Ok(Nft {
            sock,
            seq,
            timeout: DEFAULT_TIMEOUT,
            buf: Vec::with_capacity(RECV_CHUNK),
        })
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
        let s = netlink::begin_nfgen(
            &mut req,
            wire::nft_type(wire::NFT_MSG_GETGEN),
            netlink::NLM_F_ACK,
            seq,
            0,
            0,
        );
        netlink::end_msg(&mut req, s);
        let replies = self.request(&req, seq, "GETGEN", false)?;
        for r in &replies {
            if let Some(m) = Msgs(r).next() {
                if m.ty == wire::nft_type(wire::NFT_MSG_NEWGEN) {
                    for (ty, d) in m.nfgen_attrs() {
                        if ty == wire::NFTA_GEN_ID && d.len() == 4 {
                            return Ok(u32::from_be_bytes([d[0], d[1], d[2], d[3]]));
                        }
                    }
                }
            }
        }
        Err(NftError::Malformed { what: "GETGEN" })
    }

    /// Sends BEGIN..END as one datagram and collects the verdict from the acks.
    pub(super) fn send_batch(
        &mut self,
        parts: &[&[u8]],
        begin_seq: u32,
        end_seq: u32,
        bytes: usize,
    ) -> Result<BatchVerdict, NftError> {
        let msgs = (end_seq - begin_seq + 1) as usize;
        self.sock
            .ensure_sndbuf(bytes + 64 * 1024)
            .map_err(|source| NftError::SockOpt {
                option: "SO_SNDBUFFORCE",
                source,
            })?;
        self.sock
            .ensure_rcvbuf(MIN_RCVBUF.max(msgs * RCVBUF_PER_MSG))
            .map_err(|source| NftError::SockOpt {
                option: "SO_RCVBUFFORCE",
                source,
            })?;
        // One buffer, one datagram, one skb: the kernel commits a batch only if BEGIN and END
        // arrive together (one copy of the batch, small next to encoding it).
        let batch = parts.concat();
        let sent = self.sock.send(&batch).map_err(|source| NftError::Send {
            what: "batch",
            bytes,
            source,
        })?;
        if sent != bytes {
            return Err(NftError::Send {
                what: "batch",
                bytes,
                source: io::Error::other(format!("sent {sent} of {bytes} bytes")),
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
            // the send): drain without waiting, END will not come.
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
                Err(e) if netlink::is_timeout(&e) => {
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
                if m.ty != netlink::NLMSG_ERROR {
                    continue;
                }
                let Some(ack) = netlink::parse_ack(&m) else {
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

    /// One datagram from the kernel with a timeout (zero: don't wait); returns the byte count
    /// in `self.buf`.
    fn recv(&mut self, wait: Duration) -> io::Result<usize> {
        self.sock.recv(&mut self.buf, wait)
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
        self.sock.send(req).map_err(|source| NftError::Send {
            what,
            bytes: req.len(),
            source,
        })?;
        // An inactivity deadline: big dumps (300k set elements take the kernel ~10 s to walk)
        // keep it moving as long as replies arrive; a silent kernel still ends the wait.
        let mut deadline = Instant::now() + self.timeout;
        let mut replies = Replies::new(seq, dump);
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
                Err(e) if netlink::is_timeout(&e) => {
                    return Err(NftError::Timeout {
                        what,
                        waited_ms: self.timeout.as_millis() as u64,
                    })
                }
                Err(source) => return Err(NftError::Recv { what, source }),
            };
            deadline = Instant::now() + self.timeout;
            match replies.feed(&self.buf[..n]) {
                None => {}
                Some(Replied::Done(out)) => return Ok(out),
                Some(Replied::Error(errno)) => {
                    return Err(NftError::Request {
                        what: what.to_string(),
                        errno,
                    })
                }
                Some(Replied::Interrupted) => return Err(NftError::DumpInterrupted { what }),
            }
        }
    }

    /// A dump (`NLM_F_DUMP`) of nf_tables command `cmd` in the inet family, filtered by the
    /// given string attributes. A dump the kernel marks interrupted (the table changed while
    /// it ran) is run again, up to [`DUMP_ATTEMPTS`] times.
    pub(crate) fn dump(
        &mut self,
        cmd: u16,
        attrs: &[(u16, &str)],
        what: &'static str,
    ) -> Result<Vec<Vec<u8>>, NftError> {
        let mut attempt = 1;
        loop {
            match self.dump_once(cmd, attrs, what) {
                Err(NftError::DumpInterrupted { .. }) if attempt < DUMP_ATTEMPTS => {
                    tracing::debug!(what, attempt, "nf_tables dump interrupted; retrying");
                    attempt += 1;
                }
                r => return r,
            }
        }
    }

    fn dump_once(
        &mut self,
        cmd: u16,
        attrs: &[(u16, &str)],
        what: &'static str,
    ) -> Result<Vec<Vec<u8>>, NftError> {
        let seq = self.next_seq(1);
        let mut req = Vec::with_capacity(128);
        let s = netlink::begin_nfgen(
            &mut req,
            wire::nft_type(cmd),
            netlink::NLM_F_DUMP,
            seq,
            libc::NFPROTO_INET as u8,
            0,
        );
        for (ty, v) in attrs {
            netlink::put_strz(&mut req, *ty, v);
        }
        netlink::end_msg(&mut req, s);
        self.request(&req, seq, what, true)
    }

    /// Whether `table inet NAME` exists (NFT_MSG_GETTABLE).
    pub fn table_exists(&mut self, name: &str) -> Result<bool, NftError> {
        let seq = self.next_seq(1);
        let mut req = Vec::with_capacity(64);
        let s = netlink::begin_nfgen(
            &mut req,
            wire::nft_type(wire::NFT_MSG_GETTABLE),
            netlink::NLM_F_ACK,
            seq,
            libc::NFPROTO_INET as u8,
            0,
        );
        netlink::put_strz(&mut req, 1, name); // NFTA_TABLE_NAME
        netlink::end_msg(&mut req, s);
        match self.request(&req, seq, "GETTABLE", false) {
            Ok(_) => Ok(true),
            Err(NftError::Request { errno, .. }) if errno == libc::ENOENT => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn nft_can_move_to_a_blocking_thread() {
        fn send<T: Send>() {}
        send::<super::Nft>();
    }
}
