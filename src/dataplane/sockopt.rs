//! The socket options and system calls etp needs that the standard library and tokio lack.
//!
//! This is the only module with `unsafe` for sockets: `IP(V6)_RECVORIGDSTADDR` with `recvmsg`
//! control messages (UDP original destination) and `splice(2)`. Everything else goes through
//! `socket2`, which wraps the plain options safely.
//!
//! Kernel semantics worth knowing:
//! - `IP_TRANSPARENT` / `IPV6_TRANSPARENT` need CAP_NET_ADMIN or CAP_NET_RAW. On a listener they
//!   let TPROXY hand it packets for foreign addresses; on an outgoing socket they allow binding
//!   to a non-local address (the client's, or the original destination for UDP replies).
//! - `SO_MARK` needs CAP_NET_ADMIN (or CAP_NET_RAW since 5.17). etp marks every socket it opens
//!   so its own ruleset returns early on its traffic.

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg, OFlag, SpliceFFlags};
use nix::sys::socket::{setsockopt, sockopt};
use nix::unistd::pipe2;
use socket2::{Socket, TcpKeepalive};

/// The size of a UDP receive buffer that holds any datagram whole (IPv6 payloads reach 65527).
pub const MAX_DATAGRAM: usize = 65536;

/// Maps `::ffff:a.b.c.d` to `a.b.c.d`; other addresses are returned unchanged.
pub fn unmap(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// The destination the client addressed, for an accepted TPROXY'd TCP connection.
///
/// Normally that is the socket's local address: TPROXY delivers without rewriting the
/// destination. But the tproxy rule runs at mangle priority, before nat prerouting, so a DNAT
/// that runs later (kube-proxy translating a ClusterIP to an endpoint) rewrites the packet and
/// the accepted socket's local address becomes the endpoint. conntrack's original tuple still
/// holds what the client sent to: `SO_ORIGINAL_DST` (IPv6: `IP6T_SO_ORIGINAL_DST`) returns it.
/// Without a conntrack entry it fails (ENOENT), and the local address is the answer.
pub fn accepted_orig_dst(sock: socket2::SockRef<'_>, local: SocketAddr) -> SocketAddr {
    let local = unmap(local);
    let nat = if local.is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    };
    nat.ok()
        .and_then(|a| a.as_socket())
        .map(unmap)
        .unwrap_or(local)
}

/// Sets `IP_TRANSPARENT` or `IPV6_TRANSPARENT` (CAP_NET_ADMIN or CAP_NET_RAW), matching the
/// socket's family.
pub fn set_transparent(sock: &Socket, v6: bool) -> io::Result<()> {
    if v6 {
        sock.set_ip_transparent_v6(true)
    } else {
        sock.set_ip_transparent_v4(true)
    }
}

/// Sets `SO_MARK` (CAP_NET_ADMIN).
pub fn set_mark(sock: &Socket, mark: u32) -> io::Result<()> {
    sock.set_mark(mark)
}

/// TCP_NODELAY and keepalive ([`set_keepalive`]): what both legs of a relayed flow carry.
pub fn tcp_tuning(sock: socket2::SockRef<'_>) -> io::Result<()> {
    sock.set_tcp_nodelay(true)?;
    set_keepalive(sock)
}

/// Keepalive as ztunnel sets it: first probe after 180 s idle, then every 180 s, 9 probes
/// (four setsockopt calls: SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT).
pub fn set_keepalive(sock: socket2::SockRef<'_>) -> io::Result<()> {
    let ka = TcpKeepalive::new()
        .with_time(Duration::from_secs(180))
        .with_interval(Duration::from_secs(180))
        .with_retries(9);
    sock.set_tcp_keepalive(&ka)
}

/// Makes the next close send a RST instead of a FIN (`SO_LINGER` with a zero timeout).
pub fn set_reset_on_close(sock: socket2::SockRef<'_>) -> io::Result<()> {
    sock.set_linger(Some(Duration::ZERO))
}

/// Turns `IP_MULTICAST_ALL` (IPv6: `IPV6_MULTICAST_ALL`, Linux 4.20) off. Both default to on:
/// a socket bound to the wildcard address then receives datagrams for every multicast group any
/// socket of the host joined, on its port. etp's UDP listener wants only what tproxy hands it.
pub fn set_multicast_all_off(sock: &Socket, v6: bool) -> io::Result<()> {
    if v6 {
        match sock.set_multicast_all_v6(false) {
            // Kernels before 4.20 lack the IPv6 option: nothing to turn off there.
            Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => Ok(()),
            r => r,
        }
    } else {
        sock.set_multicast_all_v4(false)
    }
}

/// Asks the kernel to attach the original destination of each datagram
/// (`IP_RECVORIGDSTADDR` / `IPV6_RECVORIGDSTADDR`) as a control message to `recvmsg`.
pub fn set_recv_orig_dst(sock: &Socket, v6: bool) -> io::Result<()> {
    let r = if v6 {
        setsockopt(sock, sockopt::Ipv6OrigDstAddr, &true)
    } else {
        setsockopt(sock, sockopt::Ipv4OrigDstAddr, &true)
    };
    r.map_err(io::Error::from)
}

/// One datagram received by [`recv_with_orig_dst`].
#[derive(Debug, Clone, Copy)]
pub struct Received {
    pub len: usize,
    /// The sender (unmapped).
    pub src: SocketAddr,
    /// The destination the sender addressed (unmapped); `None` if the kernel attached none.
    pub orig_dst: Option<SocketAddr>,
    /// The datagram was longer than the buffer and was cut (`MSG_TRUNC`).
    pub truncated: bool,
}

/// `recvmsg` on a non-blocking UDP socket, returning the sender and the original destination
/// from the `IP_ORIGDSTADDR` / `IPV6_ORIGDSTADDR` control message. `WouldBlock` when empty.
pub fn recv_with_orig_dst(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    // Room for one sockaddr_in6 control message and slack for any other the kernel adds.
    let mut control = [0u64; 16];
    let mut src = MaybeUninit::<libc::sockaddr_storage>::zeroed();
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain old data; all-zero is a valid empty value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = src.as_mut_ptr().cast();
    msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of_val(&control);
    // SAFETY: every pointer in `msg` refers to a live local buffer of the stated length
    // (`buf`, `src`, `control`) that outlives the call; the kernel writes within those lengths.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel filled `src` with msg_namelen bytes of a sockaddr of the socket's family.
    let src = unsafe { sockaddr_to_std(src.as_ptr(), msg.msg_namelen) }
        .ok_or_else(|| io::Error::other("recvmsg returned no IPv4/IPv6 source address"))?;
    let controllen = (msg.msg_controllen as usize).min(size_of_val(&control));
    // SAFETY: `control` is a live local array; the kernel wrote `msg_controllen` bytes of it
    // (clamped to its size), and u64 -> u8 reinterpretation is always valid.
    let control_bytes =
        unsafe { std::slice::from_raw_parts(control.as_ptr().cast::<u8>(), controllen) };
    let orig_dst = orig_dst_from_control(control_bytes, msg.msg_flags);
    Ok(Received {
        len: n as usize,
        src: unmap(src),
        orig_dst: orig_dst.map(unmap),
        truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
    })
}

/// The original destination from a `recvmsg` control buffer (`IP_ORIGDSTADDR` /
/// `IPV6_ORIGDSTADDR`), or `None` when there is none that can be trusted.
///
/// `control` is exactly the `msg_controllen` bytes the kernel filled and `flags` is
/// `msg_flags`. Nothing is read past what a header declares: a control message whose
/// `cmsg_len` is shorter than its header or runs past the buffer ends the walk, a payload
/// shorter than the sockaddr or of the wrong family is ignored, and with `MSG_CTRUNC` (the
/// buffer was too small, so the kernel dropped or cut messages) nothing is trusted.
pub fn orig_dst_from_control(control: &[u8], flags: libc::c_int) -> Option<SocketAddr> {
    if flags & libc::MSG_CTRUNC != 0 {
        return None;
    }
    let header = cmsg_align(size_of::<libc::cmsghdr>());
    let mut orig_dst = None;
    let mut off = 0usize;
    while control.len().saturating_sub(off) >= size_of::<libc::cmsghdr>() {
        // SAFETY: at least size_of::<cmsghdr>() bytes remain at `off` (checked above); the
        // header is plain old data, read unaligned because a byte slice promises no alignment.
        let h: libc::cmsghdr = unsafe { std::ptr::read_unaligned(control[off..].as_ptr().cast()) };
        let len = h.cmsg_len as usize;
        if len < header || len > control.len() - off {
            break;
        }
        let data = &control[off + header..off + len];
        match (h.cmsg_level, h.cmsg_type) {
            (libc::SOL_IP, libc::IP_ORIGDSTADDR) => {
                orig_dst = sockaddr_from_bytes(data, libc::AF_INET).or(orig_dst);
            }
            (libc::SOL_IPV6, libc::IPV6_ORIGDSTADDR) => {
                orig_dst = sockaddr_from_bytes(data, libc::AF_INET6).or(orig_dst);
            }
            _ => {}
        }
        off = off.saturating_add(cmsg_align(len));
    }
    orig_dst
}

/// `CMSG_ALIGN`: control messages are padded to the alignment of `size_t`.
fn cmsg_align(n: usize) -> usize {
    let a = size_of::<usize>();
    n.saturating_add(a - 1) & !(a - 1)
}

/// A `sockaddr_in` / `sockaddr_in6` of the expected family from raw bytes; `None` when the
/// bytes are too few or of another family.
fn sockaddr_from_bytes(data: &[u8], family: libc::c_int) -> Option<SocketAddr> {
    let fam = u16::from_ne_bytes(data.get(..2)?.try_into().ok()?);
    if libc::c_int::from(fam) != family {
        return None;
    }
    if family == libc::AF_INET && data.len() >= size_of::<libc::sockaddr_in>() {
        // SAFETY: the length check covers a whole sockaddr_in; read unaligned (byte slice).
        let sin: libc::sockaddr_in = unsafe { std::ptr::read_unaligned(data.as_ptr().cast()) };
        Some(SocketAddr::V4(v4_from(&sin)))
    } else if family == libc::AF_INET6 && data.len() >= size_of::<libc::sockaddr_in6>() {
        // SAFETY: the length check covers a whole sockaddr_in6; read unaligned (byte slice).
        let sin6: libc::sockaddr_in6 = unsafe { std::ptr::read_unaligned(data.as_ptr().cast()) };
        Some(SocketAddr::V6(v6_from(&sin6)))
    } else {
        None
    }
}

fn v4_from(sin: &libc::sockaddr_in) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
        u16::from_be(sin.sin_port),
    )
}

fn v6_from(sin6: &libc::sockaddr_in6) -> SocketAddrV6 {
    SocketAddrV6::new(
        Ipv6Addr::from(sin6.sin6_addr.s6_addr),
        u16::from_be(sin6.sin6_port),
        sin6.sin6_flowinfo,
        sin6.sin6_scope_id,
    )
}

/// # Safety
/// `p` must point to at least `len` initialised bytes of a sockaddr.
unsafe fn sockaddr_to_std(
    p: *const libc::sockaddr_storage,
    len: libc::socklen_t,
) -> Option<SocketAddr> {
    let len = len as usize;
    // SAFETY: the caller guarantees `p` is valid; ss_family is at the same offset in every
    // sockaddr and the length checks keep the casts within what the kernel wrote.
    unsafe {
        match (*p).ss_family as libc::c_int {
            libc::AF_INET if len >= size_of::<libc::sockaddr_in>() => {
                Some(SocketAddr::V4(v4_from(&*(p.cast::<libc::sockaddr_in>()))))
            }
            libc::AF_INET6 if len >= size_of::<libc::sockaddr_in6>() => {
                Some(SocketAddr::V6(v6_from(&*(p.cast::<libc::sockaddr_in6>()))))
            }
            _ => None,
        }
    }
}

/// A pipe for `splice(2)`: bytes move socket -> pipe -> socket without entering user space.
pub struct Pipe {
    read: std::os::fd::OwnedFd,
    write: std::os::fd::OwnedFd,
}

impl Pipe {
    /// A non-blocking pipe, enlarged to `size` bytes if the kernel allows (`F_SETPIPE_SZ`).
    pub fn new(size: usize) -> io::Result<Pipe> {
        let (read, write) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // Failure (a size over pipe-max-size) keeps the default size, which is fine.
        let _ = fcntl(
            write.as_raw_fd(),
            FcntlArg::F_SETPIPE_SZ(size as libc::c_int),
        );
        Ok(Pipe { read, write })
    }

    /// Moves up to `len` bytes from socket `from` into the pipe. `Ok(0)` is end of stream.
    pub fn fill(&self, from: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
        splice(from, self.write.as_fd(), len)
    }

    /// Moves up to `len` bytes from the pipe into socket `to`.
    pub fn drain(&self, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
        splice(self.read.as_fd(), to, len)
    }
}

/// `splice(2)` between a socket and a pipe, non-blocking; no offsets (sockets and pipes
/// have no file position).
fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    Ok(nix::fcntl::splice(from, None, to, None, len, flags)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unmap_v4_mapped_only() {
        let m: SocketAddr = "[::ffff:10.1.2.3]:80".parse().unwrap();
        assert_eq!(unmap(m), "10.1.2.3:80".parse::<SocketAddr>().unwrap());
        let v6: SocketAddr = "[fd00::1]:80".parse().unwrap();
        assert_eq!(unmap(v6), v6);
    }

    #[test]
    fn recvmsg_reports_source_without_tproxy() {
        // Without TPROXY the original destination of a datagram is the socket's own address.
        let rx = Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
        set_recv_orig_dst(&rx, false).unwrap();
        rx.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        let at = rx.local_addr().unwrap().as_socket().unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.send_to(b"hello", at).unwrap();
        let mut buf = [0u8; 3];
        use std::os::fd::AsFd;
        let r = (0..100)
            .find_map(|_| match recv_with_orig_dst(rx.as_fd(), &mut buf) {
                Ok(r) => Some(r),
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(10));
                    None
                }
            })
            .expect("datagram within 1 s");
        assert_eq!(r.src, tx.local_addr().unwrap());
        assert_eq!(r.orig_dst, Some(at));
        assert!(r.truncated, "5 bytes into a 3-byte buffer");
        assert_eq!(&buf, b"hel");
    }

    #[test]
    fn multicast_all_is_turned_off() {
        use socket2::Domain;
        for (domain, v6) in [(Domain::IPV4, false), (Domain::IPV6, true)] {
            let s = Socket::new(domain, socket2::Type::DGRAM, None).unwrap();
            let before = if v6 {
                s.multicast_all_v6()
            } else {
                s.multicast_all_v4()
            };
            assert!(before.unwrap(), "on by default");
            set_multicast_all_off(&s, v6).unwrap();
            let after = if v6 {
                s.multicast_all_v6()
            } else {
                s.multicast_all_v4()
            };
            assert!(!after.unwrap(), "v6 = {v6}");
        }
    }

    /// The listener's TCP_NODELAY and keepalive settings carry over to accepted sockets, so
    /// the accept path sets them once on the listener instead of per connection.
    #[test]
    fn accepted_sockets_inherit_tcp_tuning() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        tcp_tuning(socket2::SockRef::from(&l)).unwrap();
        let _c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (a, _) = l.accept().unwrap();
        let a = socket2::SockRef::from(&a);
        assert!(a.tcp_nodelay().unwrap());
        assert!(a.keepalive().unwrap());
        assert_eq!(a.tcp_keepalive_time().unwrap(), Duration::from_secs(180));
        assert_eq!(
            a.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(180)
        );
        assert_eq!(a.tcp_keepalive_retries().unwrap(), 9);
    }
}
