//! The desired kernel state: plain data, no kernel access.
//!
//! `plan::plan()` builds a [`Desired`] from a config; `nft::encode` turns its [`Table`] into one
//! netlink batch; `route` installs its [`IpRule`]s and [`LocalRoute`]s. Its `Display` prints the
//! table in nft syntax (what `nft list table inet etp` shows, minus counters and handles), followed
//! by the policy-routing entries as `#` comments, so that `nft -c -f` accepts the whole output.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::{Ipv4Network, Ipv6Network};

/// A packet mark value or mask (`meta mark`, `SO_MARK`, `ip rule fwmark`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FwMark(pub u32);

impl fmt::Display for FwMark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // nft prints marks as 8 hex digits.
        write!(f, "0x{:08x}", self.0)
    }
}

/// A policy-routing table id (`ip route ... table T`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TableId(pub u32);

impl fmt::Display for TableId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Address family of an address match, set or routing entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The nft keyword for this family's network header (`ip daddr`, `ip6 daddr`).
    pub fn nft_keyword(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }
}

/// Transport protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// IANA protocol number (`meta l4proto`).
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => libc::IPPROTO_TCP as u8,
            Proto::Udp => libc::IPPROTO_UDP as u8,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// An inclusive port range; `first == last` is a single port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// The elements of an interval set, already normalised by the planner: sorted, no duplicates,
/// no overlaps (the kernel refuses overlapping intervals with EEXIST). Adjacent entries are kept
/// apart, as `nft -f` keeps them, so that etp's batch and nft's agree element for element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetElems {
    V4(Vec<Ipv4Network>),
    V6(Vec<Ipv6Network>),
    Ports(Vec<PortRange>),
}

impl SetElems {
    pub fn len(&self) -> usize {
        match self {
            SetElems::V4(v) => v.len(),
            SetElems::V6(v) => v.len(),
            SetElems::Ports(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The nft key type (`type ipv4_addr`).
    pub fn nft_type(&self) -> &'static str {
        match self {
            SetElems::V4(_) => "ipv4_addr",
            SetElems::V6(_) => "ipv6_addr",
            SetElems::Ports(_) => "inet_service",
        }
    }

    /// Interval `i` as raw big-endian keys: `(start, end_exclusive)`; `None` as end means the
    /// interval runs to the top of the key space (the kernel then gets no end element).
    pub fn key_interval(&self, i: usize) -> (Vec<u8>, Option<Vec<u8>>) {
        match self {
            SetElems::V4(nets) => {
                let n = nets[i];
                let end = u32::from(v4_last(&n)).checked_add(1);
                (
                    u32::from(n.network()).to_be_bytes().to_vec(),
                    end.map(|e| e.to_be_bytes().to_vec()),
                )
            }
            SetElems::V6(nets) => {
                let n = nets[i];
                let end = u128::from(v6_last(&n)).checked_add(1);
                (
                    u128::from(n.network()).to_be_bytes().to_vec(),
                    end.map(|e| e.to_be_bytes().to_vec()),
                )
            }
            SetElems::Ports(ranges) => {
                let r = ranges[i];
                let end = r.last.checked_add(1);
                (
                    r.first.to_be_bytes().to_vec(),
                    end.map(|e| e.to_be_bytes().to_vec()),
                )
            }
        }
    }

    /// Every interval as raw keys ([`SetElems::key_interval`]).
    pub fn key_intervals(&self) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        (0..self.len()).map(|i| self.key_interval(i)).collect()
    }

    /// Element `i` as nft prints it (`#i` when there is none).
    pub fn elem_text(&self, i: usize) -> String {
        if i >= self.len() {
            return format!("#{i}");
        }
        let (start, end) = self.key_interval(i);
        interval_text(&start, end.as_deref())
    }
}

/// An interval of raw big-endian keys as nft shows it: `10.0.0.0/8`, `10.0.0.1`, `1-65535`,
/// or `a-b` when the range is not a prefix. `end` is exclusive; `None` runs to the top.
pub fn interval_text(start: &[u8], end: Option<&[u8]>) -> String {
    if let Some(e) = end.filter(|e| e.len() != start.len()) {
        // Only a malformed dump pairs keys of different lengths: show the bytes.
        return format!("{start:02x?}-{e:02x?}");
    }
    match start.len() {
        2 => {
            let s = u16::from_be_bytes([start[0], start[1]]);
            let last = end
                .map(|e| u16::from_be_bytes([e[0], e[1]]).wrapping_sub(1))
                .unwrap_or(u16::MAX);
            if s == last {
                s.to_string()
            } else {
                format!("{s}-{last}")
            }
        }
        4 | 16 => {
            let bits = start.len() as u32 * 8;
            let to_u128 = |b: &[u8]| b.iter().fold(0u128, |a, &x| (a << 8) | u128::from(x));
            let s = to_u128(start);
            let top = if bits == 128 {
                u128::MAX
            } else {
                (1u128 << bits) - 1
            };
            let last = end.map(|e| to_u128(e).wrapping_sub(1)).unwrap_or(top);
            let show = |v: u128| -> String {
                if bits == 32 {
                    Ipv4Addr::from(v as u32).to_string()
                } else {
                    Ipv6Addr::from(v).to_string()
                }
            };
            let size = last.wrapping_sub(s).wrapping_add(1);
            let host_bits = if size == 0 {
                bits
            } else {
                size.trailing_zeros()
            };
            let is_prefix = (size == 0 || size.is_power_of_two())
                && (host_bits >= 128 || s & ((1u128 << host_bits) - 1) == 0);
            if s == last {
                show(s)
            } else if is_prefix {
                format!("{}/{}", show(s), bits - host_bits.min(bits))
            } else {
                format!("{}-{}", show(s), show(last))
            }
        }
        _ => format!("{start:02x?}"),
    }
}

/// The last address of an IPv6 network.
pub fn v6_last(n: &Ipv6Network) -> Ipv6Addr {
    let host_bits = 128 - u32::from(n.prefix());
    let mask = if host_bits == 128 {
        u128::MAX
    } else {
        (1u128 << host_bits) - 1
    };
    Ipv6Addr::from(u128::from(n.network()) | mask)
}

/// The last address of an IPv4 network.
pub fn v4_last(n: &Ipv4Network) -> Ipv4Addr {
    n.broadcast()
}

/// A named interval set in etp's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Set {
    pub name: String,
    pub elems: SetElems,
}

/// Base chain hooks etp uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Prerouting,
    Output,
}

/// Base chain types etp uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainType {
    Filter,
    Route,
    Nat,
}

/// A base chain with its rules in evaluation order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    pub kind: ChainType,
    pub hook: Hook,
    pub priority: i32,
    pub rules: Vec<Rule>,
}

/// One match of a rule. Encoders add the implicit dependencies nft adds (`meta nfproto` before
/// an address match), so a rule prints back from the kernel exactly as `Display` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    /// `meta mark & MASK == VALUE`
    Mark { mask: FwMark, value: FwMark },
    /// `meta skuid UID`
    SkUid(u32),
    /// `ip daddr @SET` / `ip6 daddr @SET`
    Daddr { family: Family, set: String },
    /// `ip saddr @SET` / `ip6 saddr @SET`
    Saddr { family: Family, set: String },
    /// `meta l4proto tcp`
    L4Proto(Proto),
    /// `tcp dport @SET` (the rule holds `L4Proto` before it)
    Dport { proto: Proto, set: String },
    /// `socket transparent 1`
    SocketTransparent,
    /// `tcp flags & (fin | syn | rst | ack) == syn`: only a connection's first packet is
    /// TPROXY'd; later packets are matched by `socket transparent` after NAT (see plan.rs)
    TcpSyn,
    /// `ct state established` (the drain table's output chain: keep rerouting packets of
    /// local flows etp already holds, let new ones go direct)
    CtEstablished,
    /// `ct mark & MASK != 0`: a connection one of etp's kernel hand-off rules labelled
    CtMarkAny { mask: FwMark },
    /// `meta nfproto ipv4|ipv6` (before a family-specific statement such as `dnat ip`)
    NfProto(Family),
    /// `fib daddr type local` (or broadcast, multicast): the destination is one of the node's
    /// own addresses as the kernel's local routing table sees it (policy routing ignored)
    FibDaddrType(AddrType),
    /// `tcp dport 15001`: one port, no set
    DportIs { proto: Proto, port: u16 },
    /// `ip saddr != @SET` / `ip6 saddr != @SET`
    SaddrNotIn { family: Family, set: String },
    /// `ct direction reply`: the packet answers a connection someone else opened (never one
    /// etp must intercept: TPROXY and the hand-off act on a flow's original direction)
    CtReply,
    /// `ct status & confirmed == 0`: the packet opens a flow conntrack has not admitted yet
    /// (a UDP flow's first datagram; later ones of an unanswered flow are still `ct state new`)
    CtUnconfirmed,
    /// `add @METER { ip saddr ct count over N }` / `update @METER { ip saddr limit rate over ...}`:
    /// a per-source meter in a dynamic set; matches when the source is over its limit
    OverLimit(SourceLimit),
}

impl Match {
    /// Whether the kernel needs connection tracking to evaluate it (nf_tables takes a conntrack
    /// reference for the namespace when such an expression is added).
    pub fn uses_conntrack(&self) -> bool {
        match self {
            Match::CtEstablished | Match::CtMarkAny { .. } | Match::CtUnconfirmed => true,
            Match::CtReply => true,
            Match::OverLimit(l) => matches!(l.limit, Limit::CountOver(_)),
            Match::Mark { .. }
            | Match::SkUid(_)
            | Match::Daddr { .. }
            | Match::Saddr { .. }
            | Match::L4Proto(_)
            | Match::Dport { .. }
            | Match::SocketTransparent
            | Match::TcpSyn
            | Match::NfProto(_)
            | Match::FibDaddrType(_)
            | Match::DportIs { .. }
            | Match::SaddrNotIn { .. } => false,
        }
    }
}

/// `fib daddr type` values (the kernel's RTN_* route types).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrType {
    Local,
    Broadcast,
    Multicast,
}

impl AddrType {
    /// RTN_LOCAL, RTN_BROADCAST, RTN_MULTICAST.
    pub fn rtn(self) -> u32 {
        match self {
            AddrType::Local => 2,
            AddrType::Broadcast => 3,
            AddrType::Multicast => 5,
        }
    }
}

impl fmt::Display for AddrType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AddrType::Local => "local",
            AddrType::Broadcast => "broadcast",
            AddrType::Multicast => "multicast",
        })
    }
}

/// What a per-source meter limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `ct count over N`: concurrent conntrack entries (connlimit)
    CountOver(u32),
    /// `limit rate over N/second burst N packets`: a token bucket
    RateOver { per_second: u32, burst: u32 },
}

/// A per-source meter: the source address (IPv6 masked to its /64) is the key of the dynamic
/// set `meter`; the kernel keeps one [`Limit`] state per key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceLimit {
    pub meter: String,
    pub family: Family,
    pub limit: Limit,
}

/// The prefix IPv6 sources are counted by: one host owns a /64.
pub const V6_SOURCE_PREFIX: u8 = 64;

/// A dynamic set that per-source meters fill at run time (no elements in the model; etp never
/// compares or restores its contents).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meter {
    pub name: String,
    pub family: Family,
    /// Most keys it holds; a source that finds it full is not limited (nft: `size`).
    pub size: u32,
    /// Idle keys expire after this many seconds (`update` refreshes); `None`: a key lives as long
    /// as its state does (a `ct count` key is collected when its count drops to zero).
    pub timeout_secs: Option<u32>,
}

impl Meter {
    /// The nft key type.
    pub fn nft_type(&self) -> &'static str {
        match self.family {
            Family::V4 => "ipv4_addr",
            Family::V6 => "ipv6_addr",
        }
    }
}

/// What a rule does when all its matches hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// `return`
    Return,
    /// `accept` (this base chain is done with the packet; later hooks still see it)
    Accept,
    /// `meta mark set M accept`
    MarkAccept(FwMark),
    /// `tproxy ip to :PORT meta mark set M accept` (nft needs the family in an inet table once
    /// the rule matches an address)
    Tproxy {
        family: Family,
        port: u16,
        mark: FwMark,
    },
    /// `meta mark set M` (output route chain: the changed mark makes the kernel reroute)
    SetMark(FwMark),
    /// `redirect to :PORT`
    Redirect { port: u16 },
    /// `drop` (fail-closed: what the tproxy rule before it did not take while etp is down)
    Drop,
    /// `ct mark set ct mark & ~MASK | VALUE accept`: labels the connection with its route for
    /// the kernel hand-off (the nat chain DNATs labelled connections; conntrack events carry it)
    CtMarkAccept { mask: FwMark, value: FwMark },
    /// `reject with tcp reset` (the proxy is not ready and `when_unavailable = "refuse"`)
    RejectTcp,
    /// `dnat ip to ADDR:PORT` / `dnat ip6 to [ADDR]:PORT` (the kernel hand-off)
    Dnat { addr: IpAddr, port: u16 },
}

impl Verdict {
    /// Whether the kernel needs connection tracking for it (ct mark, NAT).
    pub fn uses_conntrack(&self) -> bool {
        match self {
            Verdict::CtMarkAccept { .. } | Verdict::Dnat { .. } | Verdict::Redirect { .. } => true,
            Verdict::Return
            | Verdict::Accept
            | Verdict::MarkAccept(_)
            | Verdict::Tproxy { .. }
            | Verdict::SetMark(_)
            | Verdict::Drop
            | Verdict::RejectTcp => false,
        }
    }
}

/// A rule: matches, a counter, a verdict and a comment naming what it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub matches: Vec<Match>,
    pub verdict: Verdict,
    /// At most [`COMMENT_MAX`] bytes (the kernel's userdata limit for comments).
    pub comment: String,
}

/// Longest rule comment nft stores (NFTNL_UDATA_COMMENT_MAXLEN, including the NUL).
pub const COMMENT_MAX: usize = 127;

/// etp's table name (`table inet etp`): what apply, audit, cleanup and the monitor look for.
pub const TABLE: &str = "etp";
/// The rtnetlink protocol number that tags etp's ip rules and routes (audit and cleanup find
/// exactly these).
pub const ROUTE_PROTOCOL: u8 = 231;

/// etp's one table (`table inet etp`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub name: String,
    pub sets: Vec<Set>,
    /// Dynamic sets of the per-source limits (empty when they are off).
    pub meters: Vec<Meter>,
    pub chains: Vec<Chain>,
}

/// `ip rule add fwmark MARK/MASK lookup TABLE priority PRIO proto PROTO`
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IpRule {
    pub family: Family,
    pub mark: FwMark,
    pub mask: FwMark,
    pub table: TableId,
    pub priority: u32,
    pub protocol: u8,
}

/// `ip route add local default dev lo table TABLE proto PROTO` (scope host for IPv4)
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LocalRoute {
    pub family: Family,
    pub table: TableId,
    pub protocol: u8,
}

/// etp's dummy interface holding the hand-off addresses (`ip link add NAME type dummy`,
/// `ip addr add ADDR dev NAME`, up), for `[linkerd] handoff = "kernel"`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HandoffLink {
    pub name: String,
    pub addrs: Vec<IpAddr>,
}

/// Everything etp wants the kernel to hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub table: Table,
    pub ip_rules: Vec<IpRule>,
    pub routes: Vec<LocalRoute>,
    /// The hand-off interface (kernel hand-off only).
    pub handoff_link: Option<HandoffLink>,
}

impl fmt::Display for Match {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Match::Mark { mask, value } => write!(f, "meta mark & {mask} == {value}"),
            Match::SkUid(uid) => write!(f, "meta skuid {uid}"),
            Match::Daddr { family, set } => write!(f, "{} daddr @{set}", family.nft_keyword()),
            Match::Saddr { family, set } => write!(f, "{} saddr @{set}", family.nft_keyword()),
            Match::L4Proto(p) => write!(f, "meta l4proto {p}"),
            Match::Dport { proto, set } => write!(f, "{proto} dport @{set}"),
            Match::SocketTransparent => f.write_str("socket transparent 1"),
            Match::CtEstablished => f.write_str("ct state established"),
            Match::TcpSyn => f.write_str("tcp flags & (fin | syn | rst | ack) == syn"),
            Match::CtMarkAny { mask } => write!(f, "ct mark & {mask} != 0x00000000"),
            Match::NfProto(Family::V4) => f.write_str("meta nfproto ipv4"),
            Match::NfProto(Family::V6) => f.write_str("meta nfproto ipv6"),
            Match::FibDaddrType(t) => write!(f, "fib daddr type {t}"),
            Match::DportIs { proto, port } => write!(f, "{proto} dport {port}"),
            Match::SaddrNotIn { family, set } => {
                write!(f, "{} saddr != @{set}", family.nft_keyword())
            }
            Match::CtUnconfirmed => f.write_str("ct status & confirmed == 0"),
            Match::CtReply => f.write_str("ct direction reply"),
            Match::OverLimit(l) => write!(f, "{l}"),
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Return => f.write_str("return"),
            Verdict::Accept => f.write_str("accept"),
            Verdict::MarkAccept(m) => write!(f, "meta mark set {m} accept"),
            Verdict::Tproxy { family, port, mark } => write!(
                f,
                "tproxy {} to :{port} meta mark set {mark} accept",
                family.nft_keyword()
            ),
            Verdict::SetMark(m) => write!(f, "meta mark set {m}"),
            Verdict::Redirect { port } => write!(f, "redirect to :{port}"),
            Verdict::Drop => f.write_str("drop"),
            Verdict::CtMarkAccept { mask, value } => write!(
                f,
                "ct mark set ct mark & {} | {value} accept",
                FwMark(!mask.0)
            ),
            Verdict::RejectTcp => f.write_str("reject with tcp reset"),
            Verdict::Dnat {
                addr: IpAddr::V4(a),
                port,
            } => write!(f, "dnat ip to {a}:{port}"),
            Verdict::Dnat {
                addr: IpAddr::V6(a),
                port,
            } => write!(f, "dnat ip6 to [{a}]:{port}"),
        }
    }
}

impl fmt::Display for SourceLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = match self.family {
            Family::V4 => "ip saddr".to_string(),
            Family::V6 => format!("ip6 saddr & {}", v6_prefix_mask(V6_SOURCE_PREFIX)),
        };
        match self.limit {
            Limit::CountOver(n) => write!(f, "add @{} {{ {key} ct count over {n} }}", self.meter),
            Limit::RateOver { per_second, burst } => write!(
                f,
                "update @{} {{ {key} limit rate over {per_second}/second burst {burst} packets }}",
                self.meter
            ),
        }
    }
}

/// The netmask of an IPv6 prefix length (`ffff:ffff:ffff:ffff::` for 64).
pub fn v6_prefix_mask(prefix: u8) -> Ipv6Addr {
    let bits = u32::from(prefix.min(128));
    Ipv6Addr::from(u128::MAX.checked_shl(128 - bits).unwrap_or(0))
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for m in &self.matches {
            write!(f, "{m} ")?;
        }
        write!(f, "counter {} comment \"{}\"", self.verdict, self.comment)
    }
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Hook::Prerouting => "prerouting",
            Hook::Output => "output",
        })
    }
}

impl fmt::Display for ChainType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ChainType::Filter => "filter",
            ChainType::Route => "route",
            ChainType::Nat => "nat",
        })
    }
}

impl fmt::Display for SetElems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for i in 0..self.len() {
            if i > 0 {
                f.write_str(",\n\t\t\t     ")?;
            }
            f.write_str(&self.elem_text(i))?;
        }
        Ok(())
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "table inet {} {{", self.name)?;
        for set in &self.sets {
            writeln!(f, "\tset {} {{", set.name)?;
            writeln!(f, "\t\ttype {}", set.elems.nft_type())?;
            writeln!(f, "\t\tflags interval")?;
            if !set.elems.is_empty() {
                writeln!(f, "\t\telements = {{ {} }}", set.elems)?;
            }
            writeln!(f, "\t}}\n")?;
        }
        for m in &self.meters {
            writeln!(f, "\tset {} {{", m.name)?;
            writeln!(f, "\t\ttype {}", m.nft_type())?;
            writeln!(f, "\t\tsize {}", m.size)?;
            match m.timeout_secs {
                Some(t) => {
                    writeln!(f, "\t\tflags dynamic,timeout")?;
                    writeln!(f, "\t\ttimeout {t}s")?;
                }
                None => writeln!(f, "\t\tflags dynamic")?,
            }
            writeln!(f, "\t}}\n")?;
        }
        for (i, chain) in self.chains.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            writeln!(f, "\tchain {} {{", chain.name)?;
            // nft prints -150 by its name in filter and route chains.
            let prio = match (chain.priority, chain.kind) {
                (-150, ChainType::Filter | ChainType::Route) => "mangle".to_string(),
                (p, _) => p.to_string(),
            };
            writeln!(
                f,
                "\t\ttype {} hook {} priority {prio}; policy accept;",
                chain.kind, chain.hook
            )?;
            for rule in &chain.rules {
                writeln!(f, "\t\t{rule}")?;
            }
            writeln!(f, "\t}}")?;
        }
        writeln!(f, "}}")
    }
}

impl fmt::Display for IpRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = match self.family {
            Family::V4 => "-4",
            Family::V6 => "-6",
        };
        write!(
            f,
            "ip {v} rule add priority {} fwmark {:#x}/{:#x} lookup {} proto {}",
            self.priority, self.mark.0, self.mask.0, self.table, self.protocol
        )
    }
}

impl fmt::Display for LocalRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.family {
            Family::V4 => write!(
                f,
                "ip -4 route add local 0.0.0.0/0 dev lo scope host table {} proto {}",
                self.table, self.protocol
            ),
            Family::V6 => write!(
                f,
                "ip -6 route add local ::/0 dev lo table {} proto {}",
                self.table, self.protocol
            ),
        }
    }
}

impl fmt::Display for Desired {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "# etp desired state. Load with `nft -f`; the policy routing below is installed by etp\n\
             # over rtnetlink and is shown here as the equivalent ip(8) commands."
        )?;
        for r in &self.ip_rules {
            writeln!(f, "# {r}")?;
        }
        for r in &self.routes {
            writeln!(f, "# {r}")?;
        }
        if let Some(link) = &self.handoff_link {
            writeln!(f, "# ip link add {} type dummy", link.name)?;
            for a in &link.addrs {
                let prefix = if a.is_ipv4() { 32 } else { 128 };
                // No duplicate address detection: a tentative IPv6 address cannot be bound.
                let nodad = if a.is_ipv6() { " nodad" } else { "" };
                writeln!(f, "# ip addr add {a}/{prefix} dev {}{nodad}", link.name)?;
            }
            writeln!(f, "# ip link set {} up", link.name)?;
        }
        write!(f, "{}", self.table)
    }
}

/// How the TCP relay moves bytes (`[limits] relay`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RelayMode {
    /// Buffered copy first; splice(2) once a direction keeps filling its buffer (bulk).
    #[default]
    Adaptive,
    /// Always the buffered copy through user space.
    Copy,
    /// Always splice(2) through a pipe per direction.
    Splice,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_text_prints_like_nft() {
        assert_eq!(
            interval_text(&[10, 0, 0, 0], Some(&[11, 0, 0, 0])),
            "10.0.0.0/8"
        );
        assert_eq!(
            interval_text(&[10, 0, 0, 1], Some(&[10, 0, 0, 2])),
            "10.0.0.1"
        );
        assert_eq!(interval_text(&[0, 0, 0, 0], None), "0.0.0.0/0");
        assert_eq!(
            interval_text(&[10, 0, 0, 1], Some(&[10, 0, 0, 4])),
            "10.0.0.1-10.0.0.3"
        );
        assert_eq!(interval_text(&[0, 1], None), "1-65535");
        assert_eq!(interval_text(&[0, 53], Some(&[0, 54])), "53");
        let mut v6 = [0u8; 16];
        v6[0] = 0xfd;
        let mut v6e = v6;
        v6e[15] = 1;
        assert_eq!(interval_text(&v6, Some(&v6e)), "fd00::");
        v6e[15] = 0;
        v6e[13] = 1;
        assert_eq!(interval_text(&v6, Some(&v6e)), "fd00::/112");
    }

    #[test]
    fn elem_text_is_interval_text_of_the_keys() {
        let v4 = SetElems::V4(vec![
            "10.0.0.0/8".parse().unwrap(),
            "10.0.0.1/32".parse().unwrap(),
        ]);
        assert_eq!(v4.elem_text(0), "10.0.0.0/8");
        assert_eq!(v4.elem_text(1), "10.0.0.1");
        assert_eq!(v4.elem_text(2), "#2");
        let ports = SetElems::Ports(vec![
            PortRange {
                first: 53,
                last: 53,
            },
            PortRange {
                first: 1,
                last: 65535,
            },
        ]);
        assert_eq!(ports.elem_text(0), "53");
        assert_eq!(ports.elem_text(1), "1-65535");
        assert_eq!(ports.key_interval(1), (vec![0, 1], None));
    }
}
