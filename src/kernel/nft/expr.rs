//! nf_tables expressions that the `nftnl` crate lacks, built against `nftnl-sys` through nftnl's
//! public [`Expression`] trait, so that they go into an `nftnl::Rule` like its own expressions.
//!
//! Each one mirrors what `nft --debug=netlink` shows nft 1.0.6 generating for the same statement
//! (see `rulesets/*.netlink.txt`): the golden tests in `encode.rs` compare expression for
//! expression.

use std::ffi::CString;
use std::ptr::{self, NonNull};

use nftnl::expr::Expression;
use nftnl::nftnl_sys as sys;
use nftnl::Rule;

/// `NF_NAT_RANGE_PROTO_SPECIFIED`: the redir/nat expression carries a port (range).
const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 0x2;
/// Register 1 (32-bit register numbering: `NFT_REG_1`).
const REG1: u32 = libc::NFT_REG_1 as u32;

/// Allocates an expression by its kernel name; libnftnl only fails for unknown names or OOM.
fn alloc(name: &'static std::ffi::CStr) -> NonNull<sys::nftnl_expr> {
    // SAFETY: `name` is a valid NUL-terminated string; the returned pointer is owned by the
    // caller (nftnl's `Rule::add_expr` hands it to the rule, which frees it).
    let expr = unsafe { sys::nftnl_expr_alloc(name.as_ptr()) };
    match NonNull::new(expr) {
        Some(e) => e,
        // Same policy as nftnl: a failed tiny allocation means the process is out of memory.
        None => std::process::abort(),
    }
}

/// `tproxy ip|ip6 to :PORT` in an inet table: the port is read from register 1, where an
/// immediate expression put it in network byte order; no address register means "the address
/// the packet came in on" (the listener binds the wildcard address).
pub struct Tproxy {
    /// `NFPROTO_IPV4` or `NFPROTO_IPV6`.
    pub nfproto: u32,
}

impl Expression for Tproxy {
    fn to_expr(&self, _rule: &Rule) -> ptr::NonNull<sys::nftnl_expr> {
        let e = alloc(c"tproxy");
        // SAFETY: `e` is a live tproxy expression; both attributes are u32 for this type.
        unsafe {
            sys::nftnl_expr_set_u32(
                e.as_ptr(),
                sys::NFTNL_EXPR_TPROXY_FAMILY as u16,
                self.nfproto,
            );
            sys::nftnl_expr_set_u32(e.as_ptr(), sys::NFTNL_EXPR_TPROXY_REG_PORT as u16, REG1);
        }
        e
    }
}

/// `redirect to :PORT`: redir with the port (network byte order) in register 1.
pub struct Redir;

impl Expression for Redir {
    fn to_expr(&self, _rule: &Rule) -> ptr::NonNull<sys::nftnl_expr> {
        let e = alloc(c"redir");
        // SAFETY: `e` is a live redir expression; both attributes are u32 for this type.
        unsafe {
            sys::nftnl_expr_set_u32(e.as_ptr(), sys::NFTNL_EXPR_REDIR_REG_PROTO_MIN as u16, REG1);
            sys::nftnl_expr_set_u32(
                e.as_ptr(),
                sys::NFTNL_EXPR_REDIR_FLAGS as u16,
                NF_NAT_RANGE_PROTO_SPECIFIED,
            );
        }
        e
    }
}

/// `ct direction` loaded into register 1 (one byte: `IP_CT_DIR_ORIGINAL` 0, `IP_CT_DIR_REPLY`
/// 1); the `nftnl` crate's `Conntrack` has no direction key.
pub struct CtDirection;

impl Expression for CtDirection {
    fn to_expr(&self, _rule: &Rule) -> ptr::NonNull<sys::nftnl_expr> {
        let e = alloc(c"ct");
        // SAFETY: `e` is a live ct expression; its key and destination register are u32.
        unsafe {
            sys::nftnl_expr_set_u32(
                e.as_ptr(),
                sys::NFTNL_EXPR_CT_KEY as u16,
                libc::NFT_CT_DIRECTION as u32,
            );
            sys::nftnl_expr_set_u32(e.as_ptr(), sys::NFTNL_EXPR_CT_DREG as u16, REG1);
        }
        e
    }
}

/// `NF_NAT_RANGE_MAP_IPS`: the nat expression carries an address (range).
const NF_NAT_RANGE_MAP_IPS: u32 = 0x1;
/// Register 2 (`NFT_REG_2`): after a 16-byte address in register 1.
const REG2: u32 = libc::NFT_REG_2 as u32;

/// `dnat ip|ip6 to ADDR:PORT`: the address in register 1, the port (network byte order) in
/// register 2, min = max and both flags: what the kernel dumps back (nft 1.0.6 sends min only
/// and PROTO_SPECIFIED; the kernel fills max = min and MAP_IPS), so that audit compares equal.
pub struct Dnat {
    /// `NFPROTO_IPV4` or `NFPROTO_IPV6`.
    pub nfproto: u32,
}

impl Expression for Dnat {
    fn to_expr(&self, _rule: &Rule) -> ptr::NonNull<sys::nftnl_expr> {
        let e = alloc(c"nat");
        // SAFETY: `e` is a live nat expression; every attribute set here is a u32.
        unsafe {
            let p = e.as_ptr();
            sys::nftnl_expr_set_u32(
                p,
                sys::NFTNL_EXPR_NAT_TYPE as u16,
                libc::NFT_NAT_DNAT as u32,
            );
            sys::nftnl_expr_set_u32(p, sys::NFTNL_EXPR_NAT_FAMILY as u16, self.nfproto);
            sys::nftnl_expr_set_u32(p, sys::NFTNL_EXPR_NAT_REG_ADDR_MIN as u16, REG1);
            sys::nftnl_expr_set_u32(p, sys::NFTNL_EXPR_NAT_REG_ADDR_MAX as u16, REG1);
            sys::nftnl_expr_set_u32(p, sys::NFTNL_EXPR_NAT_REG_PROTO_MIN as u16, REG2);
            sys::nftnl_expr_set_u32(p, sys::NFTNL_EXPR_NAT_REG_PROTO_MAX as u16, REG2);
            sys::nftnl_expr_set_u32(
                p,
                sys::NFTNL_EXPR_NAT_FLAGS as u16,
                NF_NAT_RANGE_MAP_IPS | NF_NAT_RANGE_PROTO_SPECIFIED,
            );
        }
        e
    }
}

/// `lookup reg 1 set NAME`: a named set created in the same batch, referenced by name and by
/// the batch-local set id (nftnl's own `Lookup` needs an `nftnl::set::Set` value).
pub struct LookupSet {
    pub name: CString,
    pub id: u32,
    /// `!= @SET`: matches when the key is *not* in the set (`NFT_LOOKUP_F_INV`).
    pub invert: bool,
}

impl Expression for LookupSet {
    fn to_expr(&self, _rule: &Rule) -> ptr::NonNull<sys::nftnl_expr> {
        let e = alloc(c"lookup");
        // SAFETY: `e` is a live lookup expression; libnftnl copies the string.
        unsafe {
            sys::nftnl_expr_set_u32(e.as_ptr(), sys::NFTNL_EXPR_LOOKUP_SREG as u16, REG1);
            sys::nftnl_expr_set_str(
                e.as_ptr(),
                sys::NFTNL_EXPR_LOOKUP_SET as u16,
                self.name.as_ptr(),
            );
            sys::nftnl_expr_set_u32(e.as_ptr(), sys::NFTNL_EXPR_LOOKUP_SET_ID as u16, self.id);
            if self.invert {
                sys::nftnl_expr_set_u32(
                    e.as_ptr(),
                    sys::NFTNL_EXPR_LOOKUP_FLAGS as u16,
                    libc::NFT_LOOKUP_F_INV as u32,
                );
            }
        }
        e
    }
}

/// Where a payload load starts.
#[derive(Debug, Clone, Copy)]
pub enum Base {
    Network,
    Transport,
}

/// `payload load LENb @ BASE header + OFFSET => reg 1`.
pub struct Payload {
    pub base: Base,
    pub offset: u32,
    pub len: u32,
}

impl Payload {
    /// IPv4 source (12) / destination (16) address, IPv6 source (8) / destination (24).
    pub fn addr(v6: bool, dst: bool) -> Payload {
        let (offset, len) = match (v6, dst) {
            (false, false) => (12, 4),
            (false, true) => (16, 4),
            (true, false) => (8, 16),
            (true, true) => (24, 16),
        };
        Payload {
            base: Base::Network,
            offset,
            len,
        }
    }

    /// TCP/UDP destination port.
    pub fn dport() -> Payload {
        Payload {
            base: Base::Transport,
            offset: 2,
            len: 2,
        }
    }
}

impl Expression for Payload {
    fn to_expr(&self, _rule: &Rule) -> ptr::NonNull<sys::nftnl_expr> {
        let e = alloc(c"payload");
        let base = match self.base {
            Base::Network => libc::NFT_PAYLOAD_NETWORK_HEADER,
            Base::Transport => libc::NFT_PAYLOAD_TRANSPORT_HEADER,
        } as u32;
        // SAFETY: `e` is a live payload expression; all four attributes are u32.
        unsafe {
            let p = e.as_ptr();
            sys::nftnl_expr_set_u32(p, sys::NFTNL_EXPR_PAYLOAD_DREG as u16, REG1);
            sys::nftnl_expr_set_u32(p, sys::NFTNL_EXPR_PAYLOAD_BASE as u16, base);
            sys::nftnl_expr_set_u32(p, sys::NFTNL_EXPR_PAYLOAD_OFFSET as u16, self.offset);
            sys::nftnl_expr_set_u32(p, sys::NFTNL_EXPR_PAYLOAD_LEN as u16, self.len);
        }
        e
    }
}

/// `NFT_FIB_RESULT_ADDRTYPE`: the fib expression yields the route type (RTN_*).
const NFT_FIB_RESULT_ADDRTYPE: u32 = 3;
/// `NFTA_FIB_F_DADDR`: look up the destination address.
const NFTA_FIB_F_DADDR: u32 = 1 << 1;

/// `fib daddr type => reg 1`: the type of the packet's destination address in the kernel's
/// local table (RTN_LOCAL for the node's own and loopback addresses), host byte order u32.
pub struct FibDaddrType;

impl Expression for FibDaddrType {
    fn to_expr(&self, _rule: &Rule) -> ptr::NonNull<sys::nftnl_expr> {
        let e = alloc(c"fib");
        // SAFETY: `e` is a live fib expression; all three attributes are u32.
        unsafe {
            let p = e.as_ptr();
            sys::nftnl_expr_set_u32(p, sys::NFTNL_EXPR_FIB_DREG as u16, REG1);
            sys::nftnl_expr_set_u32(
                p,
                sys::NFTNL_EXPR_FIB_RESULT as u16,
                NFT_FIB_RESULT_ADDRTYPE,
            );
            sys::nftnl_expr_set_u32(p, sys::NFTNL_EXPR_FIB_FLAGS as u16, NFTA_FIB_F_DADDR);
        }
        e
    }
}

/// `NFT_DYNSET_OP_UPDATE`: add the key or refresh its timeout.
const NFT_DYNSET_OP_UPDATE: u32 = 1;
/// `NFT_CONNLIMIT_F_INV`: `ct count over N` (match above the limit).
const NFT_CONNLIMIT_F_INV: u32 = 1;
/// `NFT_LIMIT_F_INV`: `limit rate over` (match above the rate).
const NFT_LIMIT_F_INV: u32 = 1;

/// The state a per-source meter keeps for each key.
#[derive(Debug, Clone, Copy)]
pub enum MeterExpr {
    /// `ct count over N`: connlimit, inverted.
    CountOver(u32),
    /// `limit rate over N/second burst B packets`: limit, packets, inverted.
    RateOver { per_second: u32, burst: u32 },
}

/// `add @SET { reg 1 EXPR }` (count) / `update @SET { reg 1 EXPR }` (rate): dynset with the key
/// in register 1 and one stateful expression that the kernel clones into each new element and
/// evaluates on every packet; the rule goes on only when that expression matches.
pub struct DynsetMeter {
    pub set: CString,
    pub id: u32,
    pub expr: MeterExpr,
}

impl Expression for DynsetMeter {
    fn to_expr(&self, _rule: &Rule) -> ptr::NonNull<sys::nftnl_expr> {
        let (inner, op) = match self.expr {
            MeterExpr::CountOver(n) => {
                let c = alloc(c"connlimit");
                // SAFETY: `c` is a live connlimit expression; both attributes are u32.
                unsafe {
                    sys::nftnl_expr_set_u32(c.as_ptr(), sys::NFTNL_EXPR_CONNLIMIT_COUNT as u16, n);
                    sys::nftnl_expr_set_u32(
                        c.as_ptr(),
                        sys::NFTNL_EXPR_CONNLIMIT_FLAGS as u16,
                        NFT_CONNLIMIT_F_INV,
                    );
                }
                (c, libc::NFT_DYNSET_OP_ADD as u32)
            }
            MeterExpr::RateOver { per_second, burst } => {
                let l = alloc(c"limit");
                // SAFETY: `l` is a live limit expression; rate and unit are u64, the rest u32.
                unsafe {
                    let p = l.as_ptr();
                    sys::nftnl_expr_set_u64(
                        p,
                        sys::NFTNL_EXPR_LIMIT_RATE as u16,
                        per_second.into(),
                    );
                    sys::nftnl_expr_set_u64(p, sys::NFTNL_EXPR_LIMIT_UNIT as u16, 1);
                    sys::nftnl_expr_set_u32(p, sys::NFTNL_EXPR_LIMIT_BURST as u16, burst);
                    sys::nftnl_expr_set_u32(
                        p,
                        sys::NFTNL_EXPR_LIMIT_TYPE as u16,
                        libc::NFT_LIMIT_PKTS as u32,
                    );
                    sys::nftnl_expr_set_u32(p, sys::NFTNL_EXPR_LIMIT_FLAGS as u16, NFT_LIMIT_F_INV);
                }
                (l, NFT_DYNSET_OP_UPDATE)
            }
        };
        let e = alloc(c"dynset");
        // SAFETY: `e` is a live dynset expression; libnftnl copies the set name; `inner` is a
        // live expression whose ownership passes to `e` (freed with it), used nowhere else.
        unsafe {
            let p = e.as_ptr();
            sys::nftnl_expr_set_u32(p, sys::NFTNL_EXPR_DYNSET_SREG_KEY as u16, REG1);
            sys::nftnl_expr_set_u32(p, sys::NFTNL_EXPR_DYNSET_OP as u16, op);
            sys::nftnl_expr_set_str(p, sys::NFTNL_EXPR_DYNSET_SET_NAME as u16, self.set.as_ptr());
            sys::nftnl_expr_set_u32(p, sys::NFTNL_EXPR_DYNSET_SET_ID as u16, self.id);
            sys::nftnl_expr_add_expr(p, sys::NFTNL_EXPR_DYNSET_EXPRESSIONS, inner.as_ptr());
        }
        e
    }
}
