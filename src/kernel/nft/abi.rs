//! What libnftnl's rule parser accepts without ending the process.
//!
//! libnftnl (1.2.4) validates each attribute it knows with `mnl_attr_validate` and, when one
//! has the wrong size, prints "nf_tables kernel ABI is broken, contact your vendor" and calls
//! `exit(1)` (`abi_breakage()`): one malformed rule in a dump would end etp, at once, with every
//! flow it carries. It also dereferences a missing expression name and `strdup`s string
//! attributes that the kernel NUL-terminates but a malformed message need not. The fuzz tests
//! found the exit within seconds. So every rule message is checked here first, attribute by
//! attribute, against the sizes libnftnl's callbacks demand (the table below lists them per
//! expression, from libnftnl's `src/expr/*.c`, `src/expr.c`, `src/rule.c` and
//! `src/expr/data_reg.c`); a message that fails is skipped and logged, never handed to C.
//! Stricter than libnftnl in two places: strings must hold a NUL, and nesting is bounded.

use crate::kernel::netlink::Attrs;

/// How libnftnl validates one attribute (`mnl_attr_validate` with this type).
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// Fixed sizes: exactly 1, 2, 4 or 8 bytes (libmnl refuses shorter and longer).
    U8,
    U16,
    U32,
    U64,
    /// Non-empty; libnftnl then `strdup`s it, so it must hold a NUL.
    Str,
    /// Non-empty and ending in NUL.
    NulStr,
    Binary,
    /// A data register (`nftnl_parse_data`): value or verdict.
    Data,
    /// One nested expression (dynset).
    Expr,
    /// A list of nested expressions (dynset).
    ExprList,
}
use Kind::*;

/// Per expression: (attribute number, kind), for the attributes libnftnl validates.
const EXPRS: &[(&str, &[(u16, Kind)])] = &[
    (
        "bitwise",
        &[
            (1, U32),
            (2, U32),
            (6, U32),
            (3, U32),
            (4, Data),
            (5, Data),
            (7, Data),
        ],
    ),
    (
        "byteorder",
        &[(1, U32), (2, U32), (3, U32), (4, U32), (5, U32)],
    ),
    ("cmp", &[(1, U32), (2, U32), (3, Data)]),
    ("connlimit", &[(1, U32), (2, U32)]),
    ("counter", &[(1, U64), (2, U64)]),
    ("ct", &[(2, U32), (1, U32), (4, U32), (3, U8)]),
    ("dup", &[(1, U32), (2, U32)]),
    (
        "dynset",
        &[
            (4, U32),
            (5, U32),
            (2, U32),
            (3, U32),
            (9, U32),
            (6, U64),
            (1, Str),
            (7, Expr),
            (10, ExprList),
        ],
    ),
    (
        "exthdr",
        &[
            (2, U8),
            (1, U32),
            (7, U32),
            (3, U32),
            (4, U32),
            (6, U32),
            (5, U32),
        ],
    ),
    ("fib", &[(2, U32), (1, U32), (3, U32)]),
    ("flow_offload", &[(1, Str)]),
    ("fwd", &[(1, U32), (2, U32), (3, U32)]),
    (
        "hash",
        &[
            (1, U32),
            (2, U32),
            (3, U32),
            (4, U32),
            (5, U32),
            (6, U32),
            (7, U32),
        ],
    ),
    ("immediate", &[(1, U32), (2, Data)]),
    ("last", &[(2, U64), (1, U32)]),
    ("limit", &[(1, U64), (2, U64), (3, U32), (4, U32), (5, U32)]),
    (
        "log",
        &[(2, Str), (1, U16), (4, U16), (3, U32), (5, U32), (6, U32)],
    ),
    (
        "lookup",
        &[(2, U32), (3, U32), (4, U32), (5, U32), (1, Str)],
    ),
    ("masq", &[(2, U32), (3, U32), (1, U32)]),
    ("match", &[(1, NulStr), (2, U32), (3, Binary)]),
    ("meta", &[(2, U32), (1, U32), (3, U32)]),
    (
        "nat",
        &[
            (1, U32),
            (2, U32),
            (3, U32),
            (4, U32),
            (5, U32),
            (6, U32),
            (7, U32),
        ],
    ),
    ("numgen", &[(1, U32), (2, U32), (3, U32), (4, U32)]),
    (
        "objref",
        &[(1, U32), (2, Str), (4, Str), (3, U32), (5, U32)],
    ),
    ("osf", &[(2, U32), (3, U8)]),
    (
        "payload",
        &[
            (5, U32),
            (1, U32),
            (2, U32),
            (3, U32),
            (4, U32),
            (6, U32),
            (7, U32),
            (8, U32),
        ],
    ),
    ("queue", &[(1, U16), (2, U16), (3, U16), (4, U32)]),
    ("quota", &[(1, U64), (4, U64), (2, U32)]),
    ("range", &[(1, U32), (2, U32), (3, Data), (4, Data)]),
    ("redir", &[(1, U32), (2, U32), (3, U32)]),
    ("reject", &[(1, U32), (2, U8)]),
    ("rt", &[(2, U32), (1, U32)]),
    ("socket", &[(1, U32), (2, U32), (3, U32)]),
    ("synproxy", &[(2, U16), (3, U8)]),
    ("target", &[(1, NulStr), (2, U32), (3, Binary)]),
    ("tproxy", &[(1, U32), (2, U32), (3, U32)]),
    ("tunnel", &[(1, U32), (2, U32)]),
    ("xfrm", &[(1, U32), (2, U32), (4, U32), (3, U8)]),
];

/// Nested expressions deeper than this are refused (dynset inside dynset ...).
const MAX_DEPTH: usize = 4;

fn fixed(d: &[u8], n: usize) -> bool {
    d.len() == n
}

fn string(d: &[u8]) -> bool {
    !d.is_empty() && d.contains(&0)
}

fn nested(d: &[u8]) -> bool {
    d.is_empty() || d.len() >= 4
}

/// A whole NEWRULE message (nlmsghdr included) that libnftnl can parse without exiting or
/// reading past it. (Whether it then parses is libnftnl's call: it may still say no.)
pub fn rule_is_safe_for_libnftnl(msg: &[u8]) -> bool {
    // nlmsghdr (16) + nfgenmsg (4); libnftnl trusts nlmsg_len, so it must not exceed the bytes,
    // and libmnl reads attributes up to nlmsg_len rounded up to 4: an unaligned length would
    // make padding bytes an attribute. nf_tables messages are always aligned.
    let Some(len) = msg
        .get(..4)
        .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize)
    else {
        return false;
    };
    if len < 20 || len > msg.len() || len % 4 != 0 {
        return false;
    }
    Attrs(&msg[20..len]).all(|(ty, d)| match ty {
        1 | 2 => string(d),   // TABLE, CHAIN
        3 | 6 => fixed(d, 8), // HANDLE, POSITION
        4 => expr_list(d, 0), // EXPRESSIONS
        5 => nested(d) && Attrs(d).all(|(t, v)| !(1..=2).contains(&t) || fixed(v, 4)), // COMPAT
        9 | 10 => fixed(d, 4), // ID, POSITION_ID (8 is PAD)
        _ => true,
    })
}

/// NFTA_RULE_EXPRESSIONS: NFTA_LIST_ELEM entries, each an expression.
fn expr_list(d: &[u8], depth: usize) -> bool {
    Attrs(d).all(|(ty, e)| ty == 1 && expr(e, depth))
}

/// One expression: NFTA_EXPR_NAME (required: libnftnl dereferences it) and NFTA_EXPR_DATA.
fn expr(e: &[u8], depth: usize) -> bool {
    if depth > MAX_DEPTH {
        return false;
    }
    let mut name: Option<&[u8]> = None;
    let mut data: Vec<&[u8]> = Vec::new();
    for (ty, v) in Attrs(e) {
        match ty {
            1 if string(v) => name = Some(v),
            1 => return false,
            2 if nested(v) => data.push(v),
            2 => return false,
            _ => {}
        }
    }
    let Some(name) = name else { return false };
    let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
    let Some((_, table)) = EXPRS.iter().find(|(n, _)| n.as_bytes() == name) else {
        // libnftnl knows no such expression: it refuses the rule (no exit).
        return true;
    };
    data.iter().all(|d| {
        Attrs(d).all(|(ty, v)| match table.iter().find(|(t, _)| *t == ty) {
            None => true,
            Some((_, kind)) => attribute(*kind, v, depth),
        })
    })
}

fn attribute(kind: Kind, v: &[u8], depth: usize) -> bool {
    match kind {
        U8 => fixed(v, 1),
        U16 => fixed(v, 2),
        U32 => fixed(v, 4),
        U64 => fixed(v, 8),
        Str => string(v),
        NulStr => v.last() == Some(&0),
        Binary => true,
        Data => nested(v) && data_register(v),
        Expr => nested(v) && expr(v, depth + 1),
        ExprList => nested(v) && Attrs(v).all(|(_, e)| expr(e, depth + 1)),
    }
}

/// `nftnl_parse_data`: NFTA_DATA_VALUE (binary) or NFTA_DATA_VERDICT (code u32, chain string,
/// chain id u32).
fn data_register(v: &[u8]) -> bool {
    Attrs(v).all(|(ty, d)| match ty {
        2 => {
            nested(d)
                && Attrs(d).all(|(t, x)| match t {
                    1 | 3 => fixed(x, 4),
                    2 => string(x),
                    _ => true,
                })
        }
        _ => true,
    })
}
