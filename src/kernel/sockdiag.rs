//! TIME-WAIT remnants of etp's client legs, found and destroyed over sock_diag (NETLINK_SOCK_DIAG,
//! what `ss -K` uses; see sock_diag(7)).
//!
//! Why: when the server closes first, etp passes the FIN on and its client leg closes first, so
//! that socket sits in TIME-WAIT in the node for 60 s, under the 4-tuple (client, original
//! destination). Once etp has stopped fail-open, a new SYN from the same client port to the same
//! destination is forwarded, not intercepted, but early demux attaches it to the remnant and the
//! forward path drops it: that client cannot connect for up to a minute (measured:
//! `integration/daemon.rs::a_reused_client_port_connects_right_after_a_stop`). Destroying the
//! remnants after the ruleset is gone ends that (`SOCK_DESTROY` on a TIME-WAIT socket simply
//! deschedules it; the kernel needs CAP_NET_ADMIN and CONFIG_INET_DIAG_DESTROY).
//!
//! Which remnants are etp's is the caller's decision (a filter on client and local address);
//! this module only dumps and destroys.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use rtnetlink::sys::protocols::NETLINK_SOCK_DIAG;

use crate::kernel::netlink::{
    begin_msg, dump_interrupted, end_msg, parse_ack, Msgs, NlSocket, NLMSG_DONE, NLMSG_ERROR,
    NLM_F_ACK, NLM_F_DUMP,
};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const TCP_TIME_WAIT: u32 = 6;
const TCP_LISTEN: u32 = 10;
/// `struct inet_diag_req_v2`: family, protocol, ext, pad, states, then `inet_diag_sockid`.
const REQ_LEN: usize = 8 + ID_LEN;
/// `struct inet_diag_sockid`: sport, dport (big-endian), src[4], dst[4], if, cookie[2].
const ID_LEN: usize = 48;
const TIMEOUT: Duration = Duration::from_secs(2);
/// How often an interrupted dump is run again before its result is taken as it is.
const DUMP_ATTEMPTS: usize = 3;

/// A TCP socket in TIME-WAIT as the dump reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimeWait {
    pub family: u8,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The raw `inet_diag_sockid` (cookie included), echoed back to destroy exactly this one.
    id: [u8; ID_LEN],
}

fn request(ty: u16, flags: u16, seq: u32, family: u8, id: &[u8; ID_LEN]) -> Vec<u8> {
    request_in(ty, flags, seq, family, TCP_TIME_WAIT, id)
}

fn request_in(ty: u16, flags: u16, seq: u32, family: u8, state: u32, id: &[u8; ID_LEN]) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + REQ_LEN);
    let m = begin_msg(&mut b, ty, flags, seq);
    b.extend_from_slice(&[family, libc::IPPROTO_TCP as u8, 0, 0]);
    b.extend_from_slice(&(1u32 << state).to_ne_bytes());
    b.extend_from_slice(id);
    end_msg(&mut b, m);
    b
}

/// A dump request for every TCP socket of `family` in TIME-WAIT.
#[cfg(test)]
pub fn dump_request(family: u8, seq: u32) -> Vec<u8> {
    request(SOCK_DIAG_BY_FAMILY, NLM_F_DUMP, seq, family, &[0; ID_LEN])
}

/// The request that destroys `tw`, acked.
pub fn destroy_request(tw: &TimeWait, seq: u32) -> Vec<u8> {
    request(SOCK_DESTROY, NLM_F_ACK, seq, tw.family, &tw.id)
}

fn addr(family: u8, raw: &[u8], port: [u8; 2]) -> Option<SocketAddr> {
    let ip = match i32::from(family) {
        libc::AF_INET => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(&raw[..4]).ok()?)),
        libc::AF_INET6 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(raw).ok()?)),
        _ => return None,
    };
    Some(SocketAddr::new(ip, u16::from_be_bytes(port)))
}

/// Reads the `inet_diag_msg` replies of a TIME-WAIT dump; `done` turns true at `NLMSG_DONE`.
#[cfg(test)]
pub fn parse_dump(buf: &[u8], out: &mut Vec<TimeWait>, done: &mut bool) -> io::Result<()> {
    parse_dump_in(buf, TCP_TIME_WAIT, out, done)
}

fn parse_dump_in(
    buf: &[u8],
    state: u32,
    out: &mut Vec<TimeWait>,
    done: &mut bool,
) -> io::Result<()> {
    for m in Msgs(buf) {
        match m.ty {
            NLMSG_DONE => *done = true,
            NLMSG_ERROR => match parse_ack(&m) {
                Some(a) if a.errno != 0 => return Err(io::Error::from_raw_os_error(a.errno)),
                _ => {}
            },
            SOCK_DIAG_BY_FAMILY => {
                let p = m.payload();
                if p.len() < 4 + ID_LEN || u32::from(p[1]) != state {
                    continue;
                }
                let id: [u8; ID_LEN] = p[4..4 + ID_LEN].try_into().expect("length checked");
                let (family, sport, dport) = (p[0], [id[0], id[1]], [id[2], id[3]]);
                if let (Some(local), Some(remote)) = (
                    addr(family, &id[4..20], sport),
                    addr(family, &id[20..36], dport),
                ) {
                    out.push(TimeWait {
                        family,
                        local,
                        remote,
                        id,
                    });
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// One dump of `family`'s TCP sockets in `state`, and whether the kernel marked it interrupted.
fn dump_state(
    sock: &NlSocket,
    buf: &mut Vec<u8>,
    family: u8,
    state: u32,
    seq: u32,
) -> io::Result<(Vec<TimeWait>, bool)> {
    let req = request_in(
        SOCK_DIAG_BY_FAMILY,
        NLM_F_DUMP,
        seq,
        family,
        state,
        &[0; ID_LEN],
    );
    sock.send(&req)?;
    let (mut out, mut done, mut interrupted) = (Vec::new(), false, false);
    while !done {
        sock.recv(buf, TIMEOUT)?;
        interrupted |= dump_interrupted(buf);
        parse_dump_in(buf, state, &mut out, &mut done)?;
    }
    Ok((out, interrupted))
}

/// Every TCP socket (IPv4 and IPv6) in `state`, and the socket that dumped them.
fn dump_all(state: u32) -> io::Result<(NlSocket, Vec<TimeWait>)> {
    let sock = NlSocket::open(NETLINK_SOCK_DIAG)?;
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut found = Vec::new();
    let mut seq = 0;
    for family in [libc::AF_INET, libc::AF_INET6] {
        // A dump interrupted by sockets coming and going may miss some: run it again.
        for attempt in 1..=DUMP_ATTEMPTS {
            seq += 1;
            let (mut part, interrupted) = dump_state(&sock, &mut buf, family as u8, state, seq)?;
            if !interrupted || attempt == DUMP_ATTEMPTS {
                found.append(&mut part);
                break;
            }
        }
    }
    Ok((sock, found))
}

/// Whether a TCP socket listens on `addr` (bound to its address or to the wildcard) in the
/// calling thread's network namespace. The Linkerd proxy's health check without a ready URL:
/// unlike a probe connection, it costs the proxy nothing (a probe connection would be accepted,
/// and its `SO_ORIGINAL_DST`, the listener's own address, proxied back to the proxy).
pub fn listening(addr: SocketAddr) -> io::Result<bool> {
    let (_, found) = dump_all(TCP_LISTEN)?;
    Ok(found.iter().any(|l| {
        l.local.port() == addr.port()
            && (l.local.ip() == addr.ip() || l.local.ip().is_unspecified())
    }))
}

/// Destroys the TIME-WAIT TCP sockets (IPv4 and IPv6) that `ours` selects, in the calling
/// thread's network namespace. Returns how many went; sockets that expired meanwhile (ENOENT)
/// are not errors.
pub fn destroy_time_wait(ours: impl Fn(&TimeWait) -> bool) -> io::Result<usize> {
    let (sock, found) = dump_all(TCP_TIME_WAIT)?;
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut destroyed = 0;
    for (i, tw) in found.iter().filter(|tw| ours(tw)).enumerate() {
        sock.send(&destroy_request(tw, 100 + i as u32))?;
        sock.recv(&mut buf, TIMEOUT)?;
        match Msgs(&buf)
            .filter(|m| m.ty == NLMSG_ERROR)
            .find_map(|m| parse_ack(&m))
            .map(|a| a.errno)
        {
            Some(0) => destroyed += 1,
            Some(libc::ENOENT) | None => {}
            Some(errno) => return Err(io::Error::from_raw_os_error(errno)),
        }
    }
    Ok(destroyed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dump reply as the kernel lays it out: nlmsghdr, then inet_diag_msg.
    fn reply(family: u8, state: u8, local: SocketAddr, remote: SocketAddr) -> Vec<u8> {
        let mut p = vec![family, state, 0, 0];
        let mut id = [0u8; ID_LEN];
        id[0..2].copy_from_slice(&local.port().to_be_bytes());
        id[2..4].copy_from_slice(&remote.port().to_be_bytes());
        let put = |dst: &mut [u8], ip: IpAddr| match ip {
            IpAddr::V4(a) => dst[..4].copy_from_slice(&a.octets()),
            IpAddr::V6(a) => dst.copy_from_slice(&a.octets()),
        };
        put(&mut id[4..20], local.ip());
        put(&mut id[20..36], remote.ip());
        id[40..48].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]); // cookie
        p.extend_from_slice(&id);
        p.extend_from_slice(&[0; 20]); // expires, rqueue, wqueue, uid, inode
        let mut b = Vec::new();
        b.extend_from_slice(&((16 + p.len()) as u32).to_ne_bytes());
        b.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        b.extend_from_slice(&[0; 10]);
        b.extend_from_slice(&p);
        b
    }

    #[test]
    fn requests_have_the_kernels_layout() {
        let d = dump_request(libc::AF_INET as u8, 7);
        assert_eq!(d.len(), 16 + 56, "nlmsghdr + inet_diag_req_v2");
        assert_eq!(u16::from_ne_bytes([d[4], d[5]]), SOCK_DIAG_BY_FAMILY);
        assert_eq!(u16::from_ne_bytes([d[6], d[7]]), 0x301, "request | dump");
        assert_eq!(&d[16..20], &[libc::AF_INET as u8, 6, 0, 0]);
        assert_eq!(u32::from_ne_bytes([d[20], d[21], d[22], d[23]]), 1 << 6);
    }

    #[test]
    fn time_wait_replies_parse_and_destroy_echoes_the_id() {
        let l: SocketAddr = "10.96.0.20:8080".parse().unwrap();
        let r: SocketAddr = "10.10.1.2:41234".parse().unwrap();
        let l6: SocketAddr = "[fd00:10:96::14]:80".parse().unwrap();
        let r6: SocketAddr = "[fd10:1::2]:5000".parse().unwrap();
        let mut buf = reply(libc::AF_INET as u8, 6, l, r);
        buf.extend(reply(libc::AF_INET6 as u8, 6, l6, r6));
        buf.extend(reply(libc::AF_INET as u8, 1, l, r)); // ESTABLISHED: ignored
        let (mut out, mut done) = (Vec::new(), false);
        parse_dump(&buf, &mut out, &mut done).unwrap();
        assert!(!done);
        assert_eq!(out.len(), 2);
        assert_eq!((out[0].local, out[0].remote), (l, r));
        assert_eq!((out[1].local, out[1].remote), (l6, r6));
        let d = destroy_request(&out[0], 9);
        assert_eq!(u16::from_ne_bytes([d[4], d[5]]), SOCK_DESTROY);
        assert_eq!(
            &d[24..],
            &buf[20..20 + ID_LEN],
            "the id and cookie go back as dumped"
        );
    }
}
