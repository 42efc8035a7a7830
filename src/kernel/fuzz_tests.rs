//! Fuzz tests (proptest) of the generic netlink reply collection (`netlink::Replies`, the
//! dump-interrupted check) and of the conntrack (lookups and events) and sock_diag parsers: no input panics,
//! and what they return comes from the input (a reply that is not a conntrack entry yields no
//! address; sock_diag keeps only TIME-WAIT entries of a known family; replies to another
//! sequence number are never collected).

use std::net::SocketAddr;

use proptest::prelude::*;

use super::conntrack::{get_by_reply, parse_orig_dst};
use super::ct_events;
use super::fuzz_gen::{self, message};
use super::netlink::{dump_interrupted, Msgs, Replied, Replies};
use super::sockdiag::parse_dump;

/// Conntrack seeds: etp's own queries, retyped as CT_NEW replies (same tuple nesting).
fn ct_seeds() -> Vec<Vec<u8>> {
    let pairs: [(SocketAddr, SocketAddr); 2] = [
        (
            "10.96.0.10:53".parse().unwrap(),
            "10.10.1.2:40000".parse().unwrap(),
        ),
        (
            "[fd00::a]:53".parse().unwrap(),
            "[fd10:1::2]:40000".parse().unwrap(),
        ),
    ];
    let mut out = Vec::new();
    for (from, to) in pairs {
        let mut q = get_by_reply(7, from, to);
        q[4..6].copy_from_slice(&(1u16 << 8).to_ne_bytes());
        out.push(q.clone());
        // Tuple attribute 2 (reply) renamed 1 (orig) where it starts, after nfgenmsg.
        if q.len() > 23 {
            q[22] = 1;
        }
        out.push(q);
    }
    out
}

/// sock_diag seeds: inet_diag_msg replies (family, state, timer, retrans, 48-byte id, ...).
fn diag_seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (family, state) in [
        (libc::AF_INET as u8, 6u8),
        (libc::AF_INET6 as u8, 6),
        (2, 1),
    ] {
        let mut p = vec![family, state, 0, 0];
        p.extend((0..48u8).map(|i| i.wrapping_mul(37)));
        p.resize(72, 0);
        out.push(message(20, 2, 9, &p));
    }
    out.push(message(3, 2, 9, &0i32.to_ne_bytes()));
    out
}

proptest! {
    #[test]
    fn reply_collection_keeps_only_its_own_sequence(
        bufs in prop::collection::vec(fuzz_gen::netlink(diag_seeds()), 1..4),
        dump in any::<bool>(),
    ) {
        let mut r = Replies::new(9, dump);
        for b in &bufs {
            let _ = dump_interrupted(b);
            if let Some(Replied::Done(msgs)) = r.feed(b) {
                for m in &msgs {
                    prop_assert!(Msgs(m).next().is_some_and(|m| m.seq == 9));
                }
                break;
            }
        }
    }

    #[test]
    fn conntrack_replies_never_panic(buf in fuzz_gen::netlink(ct_seeds())) {
        let _ = parse_orig_dst(&buf);
    }

    #[test]
    fn conntrack_events_never_panic(buf in fuzz_gen::netlink(ct_seeds()), now in any::<u64>()) {
        let _ = ct_events::parse(&buf, now);
        let _ = ct_events::parse_closing(&buf, |_| true);
    }

    #[test]
    fn sock_diag_replies_never_panic(buf in fuzz_gen::netlink(diag_seeds())) {
        let mut out = Vec::new();
        let mut done = false;
        let _ = parse_dump(&buf, &mut out, &mut done);
        for tw in &out {
            prop_assert!(matches!(i32::from(tw.family), libc::AF_INET | libc::AF_INET6));
        }
    }
}
