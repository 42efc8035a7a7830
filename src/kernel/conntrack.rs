//! The destination a UDP client asked for, before kube-proxy's DNAT, from conntrack (ctnetlink).
//!
//! etp's tproxy rule runs in mangle prerouting (-150), before nat prerouting (-100) where
//! kube-proxy rewrites a ClusterIP to an endpoint. The datagram is still diverted to etp, but
//! `IP_ORIGDSTADDR` then reports the endpoint, and a UDP route written for the ClusterIP (a
//! node-local DNS cache for kube-dns, say) would not match. TCP asks the accepted socket
//! (`SO_ORIGINAL_DST`); UDP has no per-flow socket, so etp asks conntrack for the entry whose
//! *reply* tuple is (endpoint -> client) and reads its *original* destination. One exchange per
//! new UDP flow; the kernel answers inside `sendmsg`, so the read never waits.
//!
//! Layout: include/uapi/linux/netfilter/nfnetlink_conntrack.h (CTA_TUPLE_*, CTA_IP_*,
//! CTA_PROTO_*); ctnetlink parses nests without NLA_F_NESTED.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use std::time::Duration;

use rtnetlink::sys::protocols::NETLINK_NETFILTER;

use crate::kernel::netlink::{
    begin_nfgen, end_msg, is_timeout, nest_end, nest_start, put_attr, Attrs, Msgs, NlSocket,
    NLMSG_ERROR,
};

pub(crate) const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
pub(crate) const CTA_TUPLE_ORIG: u16 = 1;
pub(crate) const CTA_TUPLE_REPLY: u16 = 2;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;

fn put_ip(buf: &mut Vec<u8>, v4: u16, v6: u16, ip: IpAddr) {
    match ip {
        IpAddr::V4(a) => put_attr(buf, v4, &a.octets()),
        IpAddr::V6(a) => put_attr(buf, v6, &a.octets()),
    }
}

/// CT_GET of the UDP entry whose reply tuple is `from` -> `to`.
pub fn get_by_reply(seq: u32, from: SocketAddr, to: SocketAddr) -> Vec<u8> {
    get_by_tuple(seq, CTA_TUPLE_REPLY, libc::IPPROTO_UDP as u8, from, to)
}

/// CT_GET of the entry whose `which` tuple (`CTA_TUPLE_ORIG` / `_REPLY`) is `from` -> `to`.
pub fn get_by_tuple(
    seq: u32,
    which: u16,
    ipproto: u8,
    from: SocketAddr,
    to: SocketAddr,
) -> Vec<u8> {
    let family = if from.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    } as u8;
    let mut b = Vec::with_capacity(96);
    let m = begin_nfgen(
        &mut b,
        (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET,
        0,
        seq,
        family,
        0,
    );
    let tuple = nest_start(&mut b, which);
    let ip = nest_start(&mut b, CTA_TUPLE_IP);
    put_ip(&mut b, CTA_IP_V4_SRC, CTA_IP_V6_SRC, from.ip());
    put_ip(&mut b, CTA_IP_V4_DST, CTA_IP_V6_DST, to.ip());
    nest_end(&mut b, ip);
    let proto = nest_start(&mut b, CTA_TUPLE_PROTO);
    put_attr(&mut b, CTA_PROTO_NUM, &[ipproto]);
    put_attr(&mut b, CTA_PROTO_SRC_PORT, &from.port().to_be_bytes());
    put_attr(&mut b, CTA_PROTO_DST_PORT, &to.port().to_be_bytes());
    nest_end(&mut b, proto);
    nest_end(&mut b, tuple);
    end_msg(&mut b, m);
    b
}

pub(crate) fn find<'a>(attrs: Attrs<'a>, ty: u16) -> Option<&'a [u8]> {
    attrs.into_iter().find(|(t, _)| *t == ty).map(|(_, v)| v)
}

/// The original tuple's destination in a CT_NEW reply; `None` for anything else (an error:
/// no such entry, or conntrack unused).
pub fn parse_orig_dst(buf: &[u8]) -> Option<SocketAddr> {
    let m = Msgs(buf).find(|m| m.ty == (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW)?;
    let tuple = find(m.nfgen_attrs(), CTA_TUPLE_ORIG)?;
    tuple_addrs(tuple).map(|(_, dst, _)| dst)
}

/// A `CTA_TUPLE_*` nest: (source, destination, IP protocol).
pub(crate) fn tuple_addrs(tuple: &[u8]) -> Option<(SocketAddr, SocketAddr, u8)> {
    let ip = find(Attrs(tuple), CTA_TUPLE_IP)?;
    let addr = |v4: u16, v6: u16| -> Option<IpAddr> {
        match (find(Attrs(ip), v4), find(Attrs(ip), v6)) {
            (Some(a), _) => Some(Ipv4Addr::from(<[u8; 4]>::try_from(a).ok()?).into()),
            (_, Some(a)) => Some(Ipv6Addr::from(<[u8; 16]>::try_from(a).ok()?).into()),
            _ => None,
        }
    };
    let proto = find(Attrs(tuple), CTA_TUPLE_PROTO)?;
    let port = |ty: u16| -> Option<u16> {
        Some(u16::from_be_bytes(find(Attrs(proto), ty)?.try_into().ok()?))
    };
    let num = *find(Attrs(proto), CTA_PROTO_NUM)?.first()?;
    Some((
        SocketAddr::new(
            addr(CTA_IP_V4_SRC, CTA_IP_V6_SRC)?,
            port(CTA_PROTO_SRC_PORT)?,
        ),
        SocketAddr::new(
            addr(CTA_IP_V4_DST, CTA_IP_V6_DST)?,
            port(CTA_PROTO_DST_PORT)?,
        ),
        num,
    ))
}

/// A ctnetlink socket, owned by one UDP receive loop.
pub struct Conntrack {
    sock: NlSocket,
    seq: u32,
    buf: Vec<u8>,
}

impl Conntrack {
    pub fn open() -> io::Result<Conntrack> {
        let sock = NlSocket::open(NETLINK_NETFILTER)?;
        Ok(Conntrack {
            sock,
            seq: 0,
            buf: Vec::with_capacity(8192),
        })
    }

    /// The destination `client` addressed before any DNAT, for a UDP datagram that arrived
    /// addressed to `seen`; `None` when conntrack has no such entry (no NAT happened, or
    /// conntrack is not in use).
    pub fn udp_orig_dst(
        &mut self,
        client: SocketAddr,
        seen: SocketAddr,
    ) -> io::Result<Option<SocketAddr>> {
        self.seq = self.seq.wrapping_add(1);
        // The reply direction runs from the (translated) destination back to the client.
        let req = get_by_reply(self.seq, seen, client);
        Ok(self.get(&req)?.and_then(parse_orig_dst))
    }

    /// The next sequence number (for [`Conntrack::get`]).
    pub fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends a CT_GET built with the last sequence number; the answer, or `None` when
    /// conntrack has no such entry.
    pub fn get(&mut self, req: &[u8]) -> io::Result<Option<&[u8]>> {
        self.sock.send(req)?;
        loop {
            match self.sock.recv(&mut self.buf, Duration::ZERO) {
                Ok(_) => {}
                // nfnetlink answers inside sendmsg: nothing queued means no answer is coming.
                Err(e) if is_timeout(&e) => return Ok(None),
                Err(e) => return Err(e),
            }
            let seq = self.seq;
            let ours = Msgs(&self.buf).any(|m| m.seq == seq);
            if !ours {
                continue; // a stale answer to an earlier query
            }
            if Msgs(&self.buf).any(|m| m.ty == NLMSG_ERROR) {
                return Ok(None);
            }
            return Ok(Some(&self.buf));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CT_NEW reply with the original tuple `src -> dst` (what the kernel sends back).
    fn ct_new(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
        let mut b = Vec::new();
        let m = begin_nfgen(
            &mut b,
            (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW,
            0,
            1,
            libc::AF_INET as u8,
            0,
        );
        let t = nest_start(&mut b, CTA_TUPLE_ORIG);
        let ip = nest_start(&mut b, CTA_TUPLE_IP);
        put_ip(&mut b, CTA_IP_V4_SRC, CTA_IP_V6_SRC, src.ip());
        put_ip(&mut b, CTA_IP_V4_DST, CTA_IP_V6_DST, dst.ip());
        nest_end(&mut b, ip);
        let p = nest_start(&mut b, CTA_TUPLE_PROTO);
        put_attr(&mut b, CTA_PROTO_NUM, &[17]);
        put_attr(&mut b, CTA_PROTO_SRC_PORT, &src.port().to_be_bytes());
        put_attr(&mut b, CTA_PROTO_DST_PORT, &dst.port().to_be_bytes());
        nest_end(&mut b, p);
        nest_end(&mut b, t);
        end_msg(&mut b, m);
        b
    }

    #[test]
    fn the_original_destination_is_read_from_the_orig_tuple() {
        let client: SocketAddr = "10.10.1.2:40000".parse().unwrap();
        let cluster_ip: SocketAddr = "10.96.0.98:53".parse().unwrap();
        assert_eq!(
            parse_orig_dst(&ct_new(client, cluster_ip)),
            Some(cluster_ip)
        );
        let c6: SocketAddr = "[fd10:1::2]:40000".parse().unwrap();
        let v6: SocketAddr = "[fd00:10:96::62]:53".parse().unwrap();
        assert_eq!(parse_orig_dst(&ct_new(c6, v6)), Some(v6));
        assert_eq!(parse_orig_dst(&[]), None);
    }

    #[test]
    fn the_query_names_the_reply_tuple() {
        let endpoint: SocketAddr = "10.96.0.40:53".parse().unwrap();
        let client: SocketAddr = "10.10.1.2:40000".parse().unwrap();
        let q = get_by_reply(5, endpoint, client);
        assert_eq!(u16::from_ne_bytes([q[4], q[5]]), 0x101, "ctnetlink CT_GET");
        assert_eq!(q[16], libc::AF_INET as u8);
        let tuple = find(Attrs(&q[20..]), CTA_TUPLE_REPLY).expect("reply tuple");
        let ip = find(Attrs(tuple), CTA_TUPLE_IP).unwrap();
        assert_eq!(find(Attrs(ip), CTA_IP_V4_SRC), Some(&[10, 96, 0, 40][..]));
        assert_eq!(find(Attrs(ip), CTA_IP_V4_DST), Some(&[10, 10, 1, 2][..]));
        let proto = find(Attrs(tuple), CTA_TUPLE_PROTO).unwrap();
        assert_eq!(find(Attrs(proto), CTA_PROTO_NUM), Some(&[17][..]));
        assert_eq!(
            find(Attrs(proto), CTA_PROTO_SRC_PORT),
            Some(&53u16.to_be_bytes()[..])
        );
    }
}
