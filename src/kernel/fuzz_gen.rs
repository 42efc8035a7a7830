//! Input generators for the parser fuzz tests (proptest): netlink buffers the kernel could send,
//! or that a bug, a hostile peer on the same socket or a truncated read could produce.
//!
//! Random bytes alone rarely get past a parser's first length check, so inputs are built three
//! ways: raw bytes; well-framed messages (nlmsghdr + nfgenmsg + nested attributes of random
//! types, lengths and contents); and mutations of real messages (etp's own encodings, which
//! have the kernel's layout): bytes flipped, length fields rewritten, the buffer cut short.
//! `PROPTEST_CASES` sets the number of cases (`make fuzz` runs many more than `make test`).

use proptest::prelude::*;
use proptest::sample::Index;

/// One netlink attribute: `len`, `type`, payload, padding to 4 bytes.
pub fn attr(ty: u16, data: &[u8]) -> Vec<u8> {
    let len = 4 + data.len();
    let mut b = Vec::with_capacity(len + 3);
    b.extend_from_slice(&(len.min(u16::MAX as usize) as u16).to_ne_bytes());
    b.extend_from_slice(&ty.to_ne_bytes());
    b.extend_from_slice(data);
    b.resize(b.len().div_ceil(4) * 4, 0);
    b
}

/// A netlink message: nlmsghdr (length, type, flags, seq, port id 0) and `payload`.
pub fn message(ty: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
    let len = 16 + payload.len();
    let mut b = Vec::with_capacity(len + 3);
    b.extend_from_slice(&(len as u32).to_ne_bytes());
    b.extend_from_slice(&ty.to_ne_bytes());
    b.extend_from_slice(&flags.to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    b.extend_from_slice(payload);
    b.resize(b.len().div_ceil(4) * 4, 0);
    b
}

/// Attribute trees: leaves of 0..24 random bytes, nests up to 3 deep (with or without the
/// NLA_F_NESTED bit), types from a small range so that parsers see the ones they look for.
pub fn attrs() -> impl Strategy<Value = Vec<u8>> {
    let leaf = (0u16..12, prop::collection::vec(any::<u8>(), 0..24))
        .prop_map(|(t, d)| attr(t, &d))
        .boxed();
    let tree = leaf.prop_recursive(3, 48, 4, |inner| {
        (0u16..12, any::<bool>(), prop::collection::vec(inner, 0..4))
            .prop_map(|(t, nested, kids)| attr(t | if nested { 0x8000 } else { 0 }, &kids.concat()))
    });
    prop::collection::vec(tree, 0..6).prop_map(|v| v.concat())
}

/// Message types worth aiming at: netlink control, nf_tables objects, ctnetlink, sock_diag,
/// rtnetlink rules and routes, and any other.
pub fn msg_type() -> impl Strategy<Value = u16> {
    prop_oneof![
        Just(2u16),                             // NLMSG_ERROR
        Just(3u16),                             // NLMSG_DONE
        (0u16..24).prop_map(|c| (10 << 8) | c), // nf_tables
        (0u16..4).prop_map(|c| (1 << 8) | c),   // ctnetlink
        Just(20u16),                            // SOCK_DIAG_BY_FAMILY
        (24u16..34),                            // RTM_{NEW,DEL,GET}{ROUTE,RULE} and neighbours
        any::<u16>(),
    ]
}

/// Well-framed messages: nfgenmsg-style 4-byte family header + attributes, or a raw payload.
pub fn framed() -> impl Strategy<Value = Vec<u8>> {
    let payload = prop_oneof![
        (any::<[u8; 4]>(), attrs()).prop_map(|(h, a)| [h.to_vec(), a].concat()),
        prop::collection::vec(any::<u8>(), 0..96),
    ];
    let one = (msg_type(), any::<u16>(), any::<u32>(), payload)
        .prop_map(|(t, f, s, p)| message(t, f, s, &p));
    prop::collection::vec(one, 1..4).prop_map(|v| v.concat())
}

/// Damage to a buffer: flipped bytes, a rewritten 16-bit length field, a cut.
#[derive(Debug, Clone)]
pub struct Damage {
    flips: Vec<(Index, u8)>,
    len16: Option<(Index, u16)>,
    cut: Option<Index>,
}

pub fn damage() -> impl Strategy<Value = Damage> {
    (
        prop::collection::vec((any::<Index>(), any::<u8>()), 0..4),
        prop::option::of((any::<Index>(), any::<u16>())),
        prop::option::weighted(0.3, any::<Index>()),
    )
        .prop_map(|(flips, len16, cut)| Damage { flips, len16, cut })
}

impl Damage {
    pub fn apply(&self, mut b: Vec<u8>) -> Vec<u8> {
        if b.is_empty() {
            return b;
        }
        for (i, x) in &self.flips {
            let i = i.index(b.len());
            b[i] ^= x;
        }
        if let Some((i, v)) = self.len16 {
            // Attribute lengths sit at 4-byte boundaries.
            let i = i.index(b.len()) & !3;
            if i + 2 <= b.len() {
                b[i..i + 2].copy_from_slice(&v.to_ne_bytes());
            }
        }
        if let Some(c) = &self.cut {
            b.truncate(c.index(b.len() + 1));
        }
        b
    }
}

/// Buffers built from `seeds` (real messages) by damage, from scratch, or raw bytes.
pub fn netlink(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let seeded = (prop::sample::select(seeds), damage()).prop_map(|(s, d)| d.apply(s));
    prop_oneof![
        3 => seeded,
        2 => (framed(), damage()).prop_map(|(b, d)| d.apply(b)),
        1 => prop::collection::vec(any::<u8>(), 0..128),
    ]
}
