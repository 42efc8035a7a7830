//! Kernel hand-off flows as conntrack reports them: the `UPDATE` events of ctnetlink
//! (multicast group `NFNLGRP_CONNTRACK_UPDATE`, what `conntrack -E -e UPDATE` reads).
//!
//! A kernel hand-off never passes through etp, so the story of the flow comes from the kernel:
//! etp's rule labelled the connection with its route in the conntrack mark (see
//! `plan_handoff`). When a labelled TCP connection enters TIME_WAIT or CLOSE (it finished),
//! the event names it (original tuple, mark, state) and one CT_GET of the entry adds the byte
//! counters (`nf_conntrack_acct`) and the start time (`nf_conntrack_timestamp`). Why not the
//! `DESTROY` event, which carries all of it: conntrack forgets a closed connection only after
//! its TIME_WAIT linger (120 s) and its garbage collector's next pass (up to a minute more).
//! Every connection of the namespace is reported; the others are skipped after a parse that
//! costs well under a microsecond.
//!
//! Layout: include/uapi/linux/netfilter/nfnetlink_conntrack.h.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use rtnetlink::sys::{protocols::NETLINK_NETFILTER, AsyncSocket, AsyncSocketExt, TokioSocket};

use super::conntrack::{find, tuple_addrs, CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, NFNL_SUBSYS_CTNETLINK};
use super::netlink::{Attrs, Msgs, NFGEN_HDRLEN};

/// `NFNLGRP_CONNTRACK_UPDATE`.
const NFNLGRP_CONNTRACK_UPDATE: u32 = 2;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const CTA_PROTOINFO: u16 = 4;
const CTA_PROTOINFO_TCP: u16 = 1;
const CTA_PROTOINFO_TCP_STATE: u16 = 1;
const CTA_ID: u16 = 12;
/// `TCP_CONNTRACK_TIME_WAIT`, `TCP_CONNTRACK_CLOSE`.
const TCP_TIME_WAIT: u8 = 7;
const TCP_CLOSE: u8 = 8;
const CTA_MARK: u16 = 8;
const CTA_COUNTERS_ORIG: u16 = 9;
const CTA_COUNTERS_REPLY: u16 = 10;
const CTA_TIMESTAMP: u16 = 20;
const CTA_COUNTERS_BYTES: u16 = 2;
const CTA_TIMESTAMP_START: u16 = 1;
const CTA_TIMESTAMP_STOP: u16 = 2;
const RCVBUF: usize = 4 << 20;
const RECV_CHUNK: usize = 256 * 1024;

/// The sysctls that make conntrack keep byte counters and times (per network namespace).
pub const SYSCTLS: [&str; 2] = [
    "/proc/sys/net/netfilter/nf_conntrack_acct",
    "/proc/sys/net/netfilter/nf_conntrack_timestamp",
];

/// A TCP connection conntrack forgot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    pub client: SocketAddr,
    pub orig_dst: SocketAddr,
    /// Where the connection went: the reply tuple's source (the hand-off address).
    pub upstream: SocketAddr,
    pub mark: u32,
    /// Bytes the client sent and received (`None` without `nf_conntrack_acct`).
    pub bytes_from_client: Option<u64>,
    pub bytes_to_client: Option<u64>,
    /// From the first packet until the close (`None` without `nf_conntrack_timestamp`).
    pub lifetime: Option<Duration>,
}

/// A labelled TCP connection that just finished (TIME_WAIT or CLOSE).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closing {
    /// conntrack's id of the entry (one line per entry).
    pub id: u32,
    pub client: SocketAddr,
    pub orig_dst: SocketAddr,
}

fn be32(v: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(v.try_into().ok()?))
}

/// The update events in `buf` that say a TCP connection whose mark `wanted` accepts entered
/// TIME_WAIT or CLOSE.
pub fn parse_closing(buf: &[u8], wanted: impl Fn(u32) -> bool) -> Vec<Closing> {
    let mut out = Vec::new();
    for m in Msgs(buf) {
        if m.ty != (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW {
            continue;
        }
        let Some(attrs) = m.payload().get(NFGEN_HDRLEN..) else {
            continue;
        };
        let mark = find(Attrs(attrs), CTA_MARK).and_then(be32).unwrap_or(0);
        if !wanted(mark) {
            continue;
        }
        let state = find(Attrs(attrs), CTA_PROTOINFO)
            .and_then(|p| find(Attrs(p), CTA_PROTOINFO_TCP))
            .and_then(|t| find(Attrs(t), CTA_PROTOINFO_TCP_STATE))
            .and_then(|v| v.first().copied());
        if !matches!(state, Some(TCP_TIME_WAIT | TCP_CLOSE)) {
            continue;
        }
        let orig = find(Attrs(attrs), CTA_TUPLE_ORIG).and_then(tuple_addrs);
        let id = find(Attrs(attrs), CTA_ID).and_then(be32);
        if let (Some((client, orig_dst, _)), Some(id)) = (orig, id) {
            out.push(Closing {
                id,
                client,
                orig_dst,
            });
        }
    }
    out
}

fn be64(v: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(v.try_into().ok()?))
}

fn bytes(attrs: &[u8], ty: u16) -> Option<u64> {
    be64(find(Attrs(find(Attrs(attrs), ty)?), CTA_COUNTERS_BYTES)?)
}

/// Every TCP entry in `buf` (a CT_GET answer, or `DELETE` events); a lifetime without a stop
/// time runs until `now` (nanoseconds since the epoch, conntrack's clock).
pub fn parse(buf: &[u8], now: u64) -> Vec<Ended> {
    let mut out = Vec::new();
    for m in Msgs(buf) {
        let ty = m.ty & 0xff;
        if m.ty >> 8 != NFNL_SUBSYS_CTNETLINK
            || (ty != IPCTNL_MSG_CT_NEW && ty != IPCTNL_MSG_CT_DELETE)
        {
            continue;
        }
        let Some(attrs) = m.payload().get(NFGEN_HDRLEN..) else {
            continue;
        };
        let orig = find(Attrs(attrs), CTA_TUPLE_ORIG).and_then(tuple_addrs);
        let reply = find(Attrs(attrs), CTA_TUPLE_REPLY).and_then(tuple_addrs);
        let (Some((client, orig_dst, proto)), Some((upstream, _, _))) = (orig, reply) else {
            continue;
        };
        if i32::from(proto) != libc::IPPROTO_TCP {
            continue;
        }
        let mark = find(Attrs(attrs), CTA_MARK).and_then(be32).unwrap_or(0);
        let lifetime = find(Attrs(attrs), CTA_TIMESTAMP).and_then(|ts| {
            let start = be64(find(Attrs(ts), CTA_TIMESTAMP_START)?)?;
            let stop = find(Attrs(ts), CTA_TIMESTAMP_STOP)
                .and_then(be64)
                .unwrap_or(now);
            Some(Duration::from_nanos(stop.checked_sub(start)?))
        });
        out.push(Ended {
            client,
            orig_dst,
            upstream,
            mark,
            bytes_from_client: bytes(attrs, CTA_COUNTERS_ORIG),
            bytes_to_client: bytes(attrs, CTA_COUNTERS_REPLY),
            lifetime,
        });
    }
    out
}

/// Turns on conntrack's byte counters and timestamps in this network namespace (they apply to
/// connections that start afterwards). Returns, per sysctl, whether it was changed.
pub fn enable_accounting() -> Vec<(&'static str, io::Result<bool>)> {
    SYSCTLS
        .iter()
        .map(|path| {
            let r = std::fs::read_to_string(path).and_then(|v| {
                if v.trim() == "1" {
                    Ok(false)
                } else {
                    std::fs::write(path, "1").map(|()| true)
                }
            });
            (*path, r)
        })
        .collect()
}

/// Writes 0 to each of `paths` (the sysctls [`enable_accounting`] turned on).
pub fn disable_accounting(paths: &[&'static str]) -> Vec<(&'static str, io::Result<()>)> {
    paths
        .iter()
        .map(|path| (*path, std::fs::write(path, "0")))
        .collect()
}

/// What [`CtEvents::next`] returns.
pub enum Event {
    Closing(Vec<Closing>),
    /// The socket's buffer overran: events were lost.
    Lost,
}

/// A ctnetlink socket subscribed to `UPDATE` events in the calling thread's namespace.
pub struct CtEvents {
    sock: TokioSocket,
    buf: Vec<u8>,
}

impl CtEvents {
    pub fn open() -> io::Result<CtEvents> {
        let mut sock = TokioSocket::new(NETLINK_NETFILTER)?;
        let s = sock.socket_mut();
        s.bind_auto()?;
        s.add_membership(NFNLGRP_CONNTRACK_UPDATE)?;
        // Best effort: a smaller buffer overruns sooner, which is counted.
        let _ = s.set_rx_buf_sz(RCVBUF);
        Ok(CtEvents {
            sock,
            buf: Vec::with_capacity(RECV_CHUNK),
        })
    }

    /// The next batch of events about connections `wanted` (by mark) that finished.
    pub async fn next(&mut self, wanted: impl Fn(u32) -> bool) -> io::Result<Event> {
        self.buf.clear();
        match self.sock.recv(&mut self.buf).await {
            Ok(()) => Ok(Event::Closing(parse_closing(&self.buf, wanted))),
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => Ok(Event::Lost),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::netlink::{begin_nfgen, end_msg, nest_end, nest_start, put_attr};

    fn tuple(b: &mut Vec<u8>, ty: u16, src: SocketAddr, dst: SocketAddr) {
        let t = nest_start(b, ty);
        let ip = nest_start(b, 1);
        match (src.ip(), dst.ip()) {
            (std::net::IpAddr::V4(s), std::net::IpAddr::V4(d)) => {
                put_attr(b, 1, &s.octets());
                put_attr(b, 2, &d.octets());
            }
            (std::net::IpAddr::V6(s), std::net::IpAddr::V6(d)) => {
                put_attr(b, 3, &s.octets());
                put_attr(b, 4, &d.octets());
            }
            _ => unreachable!(),
        }
        nest_end(b, ip);
        let p = nest_start(b, 2);
        put_attr(b, 1, &[6]);
        put_attr(b, 2, &src.port().to_be_bytes());
        put_attr(b, 3, &dst.port().to_be_bytes());
        nest_end(b, p);
        nest_end(b, t);
    }

    fn counters(b: &mut Vec<u8>, ty: u16, bytes: u64) {
        let c = nest_start(b, ty);
        put_attr(b, 1, &3u64.to_be_bytes());
        put_attr(b, CTA_COUNTERS_BYTES, &bytes.to_be_bytes());
        nest_end(b, c);
    }

    #[test]
    fn a_destroy_event_gives_tuples_mark_bytes_and_lifetime() {
        let client: SocketAddr = "10.10.1.2:40000".parse().unwrap();
        let dst: SocketAddr = "10.96.0.99:80".parse().unwrap();
        let handoff: SocketAddr = "169.254.15.1:4140".parse().unwrap();
        let mut b = Vec::new();
        let m = begin_nfgen(&mut b, (1 << 8) | IPCTNL_MSG_CT_DELETE, 0, 0, 2, 0);
        tuple(&mut b, CTA_TUPLE_ORIG, client, dst);
        tuple(&mut b, CTA_TUPLE_REPLY, handoff, client);
        put_attr(&mut b, CTA_MARK, &0x0002_0539u32.to_be_bytes());
        counters(&mut b, CTA_COUNTERS_ORIG, 120);
        counters(&mut b, CTA_COUNTERS_REPLY, 3400);
        let ts = nest_start(&mut b, CTA_TIMESTAMP);
        put_attr(&mut b, CTA_TIMESTAMP_START, &1_000_000_000u64.to_be_bytes());
        put_attr(&mut b, CTA_TIMESTAMP_STOP, &1_250_000_000u64.to_be_bytes());
        nest_end(&mut b, ts);
        end_msg(&mut b, m);
        let got = parse(&b, 0);
        assert_eq!(
            got,
            vec![Ended {
                client,
                orig_dst: dst,
                upstream: handoff,
                mark: 0x0002_0539,
                bytes_from_client: Some(120),
                bytes_to_client: Some(3400),
                lifetime: Some(Duration::from_millis(250)),
            }]
        );
        assert_eq!(crate::plan_handoff::route_of_ct_mark(got[0].mark), Some(1));
    }
}
