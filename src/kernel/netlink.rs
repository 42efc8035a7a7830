//! Generic netlink framing and the socket every kernel conversation of etp goes through
//! (nf_tables, its notifications, conntrack, sock_diag; rtnetlink goes through the
//! `rtnetlink` crate, whose messages carry the same headers).
//!
//! - writing: `nlmsghdr` (+ `nfgenmsg` for nfnetlink), attributes, nests;
//! - reading: messages ([`Msgs`]), attributes ([`Attrs`]), acks and errors with the
//!   extended-ack offset ([`parse_ack`]), interrupted dumps ([`NLM_F_DUMP_INTR`]);
//! - [`NlSocket`]: bound to a kernel-chosen port id, extended and capped acks on, receive and
//!   send buffers sized on demand (the `*BUFFORCE` options), reads with a deadline, and only
//!   what the kernel (port id 0) sent: a datagram from any other sender is skipped and logged.
//!   A netlink-sys socket for most conversations; for nf_tables requests a libmnl socket (the
//!   `mnl` crate, beside `nftnl`) that opens, binds and sends, read through netlink-sys
//!   ([`NlSocket::open_mnl`]).
//!
//! Layout reminders (all native endian unless noted): `nlmsghdr` {len u32, type u16, flags u16,
//! seq u32, pid u32}, for nfnetlink then `nfgenmsg` {family u8, version u8, res_id be16}, then
//! attributes {len u16, type u16, payload, padding to 4}.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd};
use std::time::Duration;

use nix::sys::socket::{setsockopt, sockopt};
use rtnetlink::sys::{Socket, SocketAddr};
use socket2::SockRef;
use tracing::warn;

/// `NLMSG_ERROR`: an ack (error 0) or an error for one request.
pub const NLMSG_ERROR: u16 = 2;
/// `NLMSG_DONE`: end of a dump.
pub const NLMSG_DONE: u16 = 3;

pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
/// `NLM_F_ROOT | NLM_F_MATCH`
pub const NLM_F_DUMP: u16 = 0x300;
/// Set on an error message when it carries extended-ack attributes.
pub const NLM_F_ACK_TLVS: u16 = 0x200;

/// Extended ack attribute: offset of the offending attribute in the failing request.
pub const NLMSGERR_ATTR_OFFS: u16 = 2;

/// Set on an error message when only the request's header is echoed (`NETLINK_CAP_ACK`).
pub const NLM_F_CAPPED: u16 = 0x100;
/// Set on a dump part when the dumped state changed while the dump ran: the dump is
/// inconsistent and must be retried.
pub const NLM_F_DUMP_INTR: u16 = 0x10;

pub const NLMSG_HDRLEN: usize = 16;
pub const NFGEN_HDRLEN: usize = 4;

pub fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Starts a message (`nlmsghdr`, `NLM_F_REQUEST` added) at the end of `buf`; returns its
/// offset for [`end_msg`].
pub fn begin_msg(buf: &mut Vec<u8>, ty: u16, flags: u16, seq: u32) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&0u32.to_ne_bytes()); // length, patched by end_msg
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
    start
}

/// Starts an nfnetlink message (nf_tables, ctnetlink): `nlmsghdr` then `nfgenmsg`
/// {family, version 0, res_id big endian}.
pub fn begin_nfgen(
    buf: &mut Vec<u8>,
    ty: u16,
    flags: u16,
    seq: u32,
    family: u8,
    res_id: u16,
) -> usize {
    let start = begin_msg(buf, ty, flags, seq);
    buf.push(family);
    buf.push(0); // NFNETLINK_V0
    buf.extend_from_slice(&res_id.to_be_bytes());
    start
}

/// Patches the length of the message started at `start`.
pub fn end_msg(buf: &mut [u8], start: usize) {
    let len = (buf.len() - start) as u32;
    buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

/// A big-endian u32 attribute payload (0 when shorter).
pub fn be32(d: &[u8]) -> u32 {
    d.get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .unwrap_or(0)
}

/// A NUL-terminated string attribute payload.
pub fn strz(d: &[u8]) -> String {
    let end = d.iter().position(|&b| b == 0).unwrap_or(d.len());
    String::from_utf8_lossy(&d[..end]).into_owned()
}

/// Appends one attribute (padded).
pub fn put_attr(buf: &mut Vec<u8>, ty: u16, data: &[u8]) {
    let len = 4 + data.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(data);
    buf.resize(buf.len() + align4(len) - len, 0);
}

/// Appends a NUL-terminated string attribute.
pub fn put_strz(buf: &mut Vec<u8>, ty: u16, s: &str) {
    let len = 4 + s.len() + 1;
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(s.as_bytes());
    buf.push(0);
    buf.resize(buf.len() + align4(len) - len, 0);
}

/// Opens a nested attribute; close it with [`nest_end`]. libnftnl does not set NLA_F_NESTED and
/// nf_tables parses nests without it, so neither do we (the bytes then match nft's).
pub fn nest_start(buf: &mut Vec<u8>, ty: u16) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&0u16.to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    start
}

pub fn nest_end(buf: &mut [u8], start: usize) {
    let len = (buf.len() - start) as u16;
    buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
}

/// One netlink message of a received (or encoded) buffer.
#[derive(Debug, Clone, Copy)]
pub struct Msg<'a> {
    pub ty: u16,
    pub flags: u16,
    pub seq: u32,
    /// The whole message, header included.
    pub bytes: &'a [u8],
}

impl<'a> Msg<'a> {
    /// Bytes after the nlmsghdr.
    pub fn payload(&self) -> &'a [u8] {
        &self.bytes[NLMSG_HDRLEN.min(self.bytes.len())..]
    }

    /// Attributes after the nfgenmsg header (nfnetlink messages: nf_tables, ctnetlink).
    pub fn nfgen_attrs(&self) -> Attrs<'a> {
        Attrs(self.payload().get(NFGEN_HDRLEN..).unwrap_or(&[]))
    }
}

/// Iterates the messages in a buffer; stops at a truncated one.
pub struct Msgs<'a>(pub &'a [u8]);

impl<'a> Iterator for Msgs<'a> {
    type Item = Msg<'a>;
    fn next(&mut self) -> Option<Msg<'a>> {
        let b = self.0;
        if b.len() < NLMSG_HDRLEN {
            return None;
        }
        let len = u32::from_ne_bytes(b[0..4].try_into().ok()?) as usize;
        if len < NLMSG_HDRLEN || len > b.len() {
            return None;
        }
        let msg = Msg {
            ty: u16::from_ne_bytes([b[4], b[5]]),
            flags: u16::from_ne_bytes([b[6], b[7]]),
            seq: u32::from_ne_bytes(b[8..12].try_into().ok()?),
            bytes: &b[..len],
        };
        self.0 = &b[align4(len).min(b.len())..];
        Some(msg)
    }
}

/// Iterates attributes: `(type without flag bits, payload)`.
pub struct Attrs<'a>(pub &'a [u8]);

impl<'a> Iterator for Attrs<'a> {
    type Item = (u16, &'a [u8]);
    fn next(&mut self) -> Option<(u16, &'a [u8])> {
        let b = self.0;
        if b.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        if len < 4 || len > b.len() {
            return None;
        }
        let ty = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
        self.0 = &b[align4(len).min(b.len())..];
        Some((ty, &b[4..len]))
    }
}

/// A reply to one request: an ack (errno 0) or an error, with the extended-ack offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// Sequence number of the request it answers.
    pub seq: u32,
    /// 0 for an ack, else a positive errno.
    pub errno: i32,
    /// Offset of the offending attribute in the request (from its nlmsghdr), when the kernel
    /// said which one.
    pub offset: Option<u32>,
}

/// Parses an `NLMSG_ERROR` message.
pub fn parse_ack(m: &Msg<'_>) -> Option<Ack> {
    let p = m.payload();
    if p.len() < 4 + NLMSG_HDRLEN {
        return None;
    }
    let err = i32::from_ne_bytes(p[0..4].try_into().ok()?);
    // The echoed request header: its seq identifies the request.
    let seq = u32::from_ne_bytes(p[12..16].try_into().ok()?);
    let orig_len = u32::from_ne_bytes(p[4..8].try_into().ok()?) as usize;
    // With NETLINK_CAP_ACK only the header is echoed; else the whole request (errors only).
    let echoed = if m.flags & NLM_F_CAPPED != 0 || err == 0 {
        NLMSG_HDRLEN
    } else {
        align4(orig_len)
    };
    let mut offset = None;
    if m.flags & NLM_F_ACK_TLVS != 0 {
        if let Some(tlvs) = p.get(4 + echoed..) {
            for (ty, data) in Attrs(tlvs) {
                if ty == NLMSGERR_ATTR_OFFS && data.len() >= 4 {
                    offset = Some(u32::from_ne_bytes(data[0..4].try_into().ok()?));
                }
            }
        }
    }
    Some(Ack {
        seq,
        errno: -err,
        offset,
    })
}

/// Whether any message in `buf` is a part of an interrupted dump ([`NLM_F_DUMP_INTR`]).
pub fn dump_interrupted(buf: &[u8]) -> bool {
    Msgs(buf).any(|m| m.flags & NLM_F_DUMP_INTR != 0)
}

/// What one request's replies came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replied {
    /// The reply messages (each its own buffer): up to the ack, or for a dump up to DONE.
    Done(Vec<Vec<u8>>),
    /// The kernel refused the request with this errno.
    Error(i32),
    /// The dump ran while the dumped state changed (`NLM_F_DUMP_INTR`): what it returned may
    /// mix two states, so it must be retried, not compared.
    Interrupted,
}

/// Collects the replies to one request (sequence number `seq`) from received buffers;
/// replies to other requests (stale ones) are ignored.
#[derive(Debug)]
pub struct Replies {
    seq: u32,
    dump: bool,
    out: Vec<Vec<u8>>,
    interrupted: bool,
}

impl Replies {
    pub fn new(seq: u32, dump: bool) -> Replies {
        Replies {
            seq,
            dump,
            out: Vec::new(),
            interrupted: false,
        }
    }

    /// Reads one received buffer; `Some` once the request is answered.
    pub fn feed(&mut self, buf: &[u8]) -> Option<Replied> {
        for m in Msgs(buf) {
            if m.seq != self.seq {
                continue;
            }
            if m.flags & NLM_F_DUMP_INTR != 0 {
                self.interrupted = true;
            }
            match m.ty {
                NLMSG_DONE if self.dump => return Some(self.finish()),
                NLMSG_ERROR => match parse_ack(&m) {
                    Some(a) if a.errno != 0 => return Some(Replied::Error(a.errno)),
                    // An ack without its header: nothing to tell which request it answers.
                    None => return Some(Replied::Error(libc::EBADMSG)),
                    Some(_) if !self.dump => return Some(self.finish()),
                    Some(_) => {}
                },
                _ => self.out.push(m.bytes.to_vec()),
            }
        }
        None
    }

    fn finish(&mut self) -> Replied {
        if self.interrupted {
            Replied::Interrupted
        } else {
            Replied::Done(std::mem::take(&mut self.out))
        }
    }
}

/// A netlink socket of one protocol in the calling thread's network namespace, bound to a
/// kernel-chosen port id, with extended acks (the offending attribute's offset) and capped
/// acks (errors echo only the request's header) turned on.
pub struct NlSocket {
    /// Options and reads (with the sender's port id) go through netlink-sys.
    sock: Socket,
    /// For nf_tables: libmnl's socket, which opened the kernel socket that `sock` reads through
    /// a duplicate descriptor of; requests are sent with it.
    mnl: Option<Mnl>,
    rcvbuf: usize,
    sndbuf: usize,
}

/// libmnl's socket (`mnl::Socket`), owned by one [`NlSocket`].
struct Mnl(mnl::Socket);

// SAFETY: `mnl::Socket` is !Send only because it holds a raw pointer to libmnl's
// `struct mnl_socket` (a descriptor and the bound address, allocated by mnl_socket_open and
// freed by mnl_socket_close on drop). libmnl keeps no per-thread or global state for it and
// its calls are plain syscalls on the descriptor, so it may be used and dropped on any thread.
// `Mnl` owns it exclusively: the pointer is never copied out or shared, and `Mnl` is not Sync.
unsafe impl Send for Mnl {}

impl NlSocket {
    pub fn open(protocol: isize) -> io::Result<NlSocket> {
        let mut sock = Socket::new(protocol)?;
        sock.bind_auto()?;
        NlSocket::configure(sock, None)
    }

    /// A socket on `bus` opened and bound (kernel-chosen port id) by libmnl, which also sends
    /// every request; options and reads go through netlink-sys on a duplicate of its
    /// descriptor (the same kernel socket), so acks, buffers, deadlines and the kernel-only
    /// sender check are the same as for [`NlSocket::open`]. (libmnl's own recvfrom reports no
    /// sender and cannot skip the wait.)
    pub fn open_mnl(bus: mnl::Bus) -> io::Result<NlSocket> {
        let mnl = mnl::Socket::new(bus)?;
        // SAFETY: the descriptor is the mnl socket's, open while `mnl` lives (this function);
        // it is only duplicated here.
        let dup = unsafe { BorrowedFd::borrow_raw(mnl.as_raw_fd()) }.try_clone_to_owned()?;
        // SAFETY: `dup` is an open netlink socket descriptor owned by no one else (a fresh
        // F_DUPFD_CLOEXEC duplicate); netlink-sys takes it over and closes it on drop.
        let sock = unsafe { Socket::from_raw_fd(dup.into_raw_fd()) };
        NlSocket::configure(sock, Some(Mnl(mnl)))
    }

    fn configure(sock: Socket, mnl: Option<Mnl>) -> io::Result<NlSocket> {
        sock.set_ext_ack(true)?;
        sock.set_cap_ack(true)?;
        Ok(NlSocket {
            sock,
            mnl,
            rcvbuf: 0,
            sndbuf: 0,
        })
    }

    /// Raises the receive buffer to at least `bytes` (`SO_RCVBUFFORCE`: past `rmem_max`, as
    /// root), so that the acks of a large batch fit; never lowers it.
    pub fn ensure_rcvbuf(&mut self, bytes: usize) -> io::Result<()> {
        if bytes > self.rcvbuf {
            setsockopt(
                &self.sock,
                sockopt::RcvBufForce,
                &bytes.min(i32::MAX as usize),
            )?;
            self.rcvbuf = bytes;
        }
        Ok(())
    }

    /// Raises the send buffer to at least `bytes` (`SO_SNDBUFFORCE`): a batch goes out in one
    /// datagram, whose send fails with EMSGSIZE beyond the buffer.
    pub fn ensure_sndbuf(&mut self, bytes: usize) -> io::Result<()> {
        if bytes > self.sndbuf {
            setsockopt(
                &self.sock,
                sockopt::SndBufForce,
                &bytes.min(i32::MAX as usize),
            )?;
            self.sndbuf = bytes;
        }
        Ok(())
    }

    /// Sends one datagram (one skb: an nf_tables batch must arrive whole) to the kernel.
    pub fn send(&self, buf: &[u8]) -> io::Result<usize> {
        match &self.mnl {
            Some(Mnl(mnl)) => mnl.send(buf),
            None => self.sock.send(buf, 0),
        }
    }

    /// Receives one datagram the kernel sent into `buf` (replacing its contents), waiting at
    /// most `wait` (zero: only what is queued already; `WouldBlock` when nothing is).
    /// Datagrams from any other sender (port id not 0: another process on this host) are
    /// skipped and logged: only the kernel answers etp's requests.
    pub fn recv(&self, buf: &mut Vec<u8>, wait: Duration) -> io::Result<usize> {
        let flags = if wait.is_zero() {
            libc::MSG_DONTWAIT
        } else {
            SockRef::from(&self.sock).set_read_timeout(Some(wait))?;
            0
        };
        loop {
            buf.clear();
            let (n, from) = self.sock.recv_from(buf, flags)?;
            if from_kernel(&from, "reply") {
                return Ok(n);
            }
        }
    }
}

/// Whether a datagram came from the kernel (port id 0). Only the kernel answers etp's
/// requests and reports changes; another process that sends to etp's port (possible as root,
/// or where a protocol lets anyone send) is logged and its datagram skipped.
pub fn from_kernel(from: &SocketAddr, what: &'static str) -> bool {
    if from.port_number() == 0 {
        return true;
    }
    warn!(
        sender = from.port_number(),
        what, "netlink message from a process, not the kernel: skipped"
    );
    false
}

/// Whether an I/O error means the wait ended without a datagram.
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attrs_are_padded_and_nests_sized() {
        let mut b = Vec::new();
        let s = begin_nfgen(&mut b, 0x0a0c, 0, 1, 1, 0);
        put_strz(&mut b, 1, "etp");
        let n = nest_start(&mut b, 3);
        put_attr(&mut b, 1, &[1, 2]);
        nest_end(&mut b, n);
        end_msg(&mut b, s);
        assert_eq!(b.len() % 4, 0);
        let m = Msgs(&b).next().unwrap();
        let attrs: Vec<_> = m.nfgen_attrs().collect();
        assert_eq!(attrs[0], (1, &b"etp\0"[..]));
        assert_eq!(attrs[1].0, 3);
        let inner: Vec<_> = Attrs(attrs[1].1).collect();
        assert_eq!(inner, vec![(1, &[1u8, 2][..])]);
    }

    /// A dump part flagged `NLM_F_DUMP_INTR`, then DONE: the dump is reported interrupted,
    /// not as a complete (and possibly mixed) state that audit would take for drift.
    #[test]
    fn an_interrupted_dump_is_not_a_complete_one() {
        let part = |flags: u16| {
            let mut b = Vec::new();
            let m = begin_msg(&mut b, 0x0a06, flags, 5);
            put_strz(&mut b, 1, "etp");
            end_msg(&mut b, m);
            let d = begin_msg(&mut b, NLMSG_DONE, 0, 5);
            end_msg(&mut b, d);
            b
        };
        const NLM_F_MULTI: u16 = 0x2;
        let mut clean = Replies::new(5, true);
        assert!(matches!(clean.feed(&part(NLM_F_MULTI)), Some(Replied::Done(v)) if v.len() == 1));
        let mut torn = Replies::new(5, true);
        assert_eq!(
            torn.feed(&part(NLM_F_MULTI | NLM_F_DUMP_INTR)),
            Some(Replied::Interrupted)
        );
        assert!(dump_interrupted(&part(NLM_F_DUMP_INTR)));
        assert!(!dump_interrupted(&part(NLM_F_MULTI)));
    }

    /// Another process can send to etp's netlink port (as root, or where the protocol lets
    /// anyone send): its datagram must not be read as the kernel's answer, whichever socket
    /// (netlink-sys's, or libmnl's for nf_tables) etp reads from.
    #[test]
    fn a_datagram_from_another_process_is_skipped() {
        use rtnetlink::sys::protocols::NETLINK_NETFILTER;
        skips_other_senders(NlSocket::open(NETLINK_NETFILTER).expect("netlink socket"));
        skips_other_senders(NlSocket::open_mnl(mnl::Bus::Netfilter).expect("mnl socket"));
    }

    fn skips_other_senders(ours: NlSocket) {
        use rtnetlink::sys::protocols::NETLINK_NETFILTER;
        let mut addr = SocketAddr::new(0, 0);
        ours.sock.get_address(&mut addr).expect("our address");
        let mut other = Socket::new(NETLINK_NETFILTER).expect("netlink socket");
        other.bind_auto().expect("bind");
        let mut fake = Vec::new();
        let m = begin_msg(&mut fake, NLMSG_ERROR, 0, 1);
        fake.extend_from_slice(&0i32.to_ne_bytes());
        fake.extend_from_slice(&[0; NLMSG_HDRLEN]);
        end_msg(&mut fake, m);
        match other.send_to(&fake, &addr, 0) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                eprintln!("skipped: sending to another netlink port needs CAP_NET_ADMIN");
                return;
            }
            Err(e) => panic!("send_to: {e}"),
        }
        let mut buf = Vec::with_capacity(4096);
        let r = ours.recv(&mut buf, Duration::from_millis(200));
        assert!(
            matches!(&r, Err(e) if is_timeout(e)),
            "a process's datagram was read as the kernel's: {r:?} {buf:?}"
        );
    }

    /// libmnl sends, netlink-sys reads the same kernel socket: a request sent with mnl is
    /// answered and its reply and ack are read back.
    #[test]
    fn an_mnl_socket_sends_and_reads_its_ack() {
        let sock = NlSocket::open_mnl(mnl::Bus::Netfilter).expect("mnl socket");
        // NFT_MSG_GETGEN (subsystem nf_tables 10, message 16) with an ack.
        let mut req = Vec::new();
        let m = begin_nfgen(&mut req, (10 << 8) | 16, NLM_F_ACK, 7, 0, 0);
        end_msg(&mut req, m);
        assert_eq!(sock.send(&req).expect("send"), req.len());
        let mut replies = Replies::new(7, false);
        let mut buf = Vec::with_capacity(4096);
        for _ in 0..4 {
            sock.recv(&mut buf, Duration::from_secs(2)).expect("reply");
            if let Some(r) = replies.feed(&buf) {
                assert!(matches!(&r, Replied::Done(v) if v.len() == 1), "{r:?}");
                return;
            }
        }
        panic!("no ack for GETGEN");
    }
}
