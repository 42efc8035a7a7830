//! Pure half of the routing module: model entries -> rtnetlink messages, dumped messages ->
//! comparable views, and the diff between desired and observed. No socket here.
//!
//! Kernel semantics encoded here (measured on 6.18, NOTES.md, "Kernel facts measured here"):
//! - A rule's action must be FR_ACT_TO_TBL. With FR_ACT_UNSPEC the kernel stores a rule that
//!   makes every lookup hitting it fail with EINVAL (`ip route get ... mark M`).
//! - Table ids above 255 do not fit the u8 table field of `fib_rule_hdr` / `rtmsg`. The kernel
//!   reads FRA_TABLE / RTA_TABLE when present, so the real id always goes in the attribute and
//!   the header carries the id only when it fits (else RT_TABLE_UNSPEC), as iproute2 does.
//! - IPv4 `local` routes must have scope host (scope universe gets EINVAL). IPv6 ignores the
//!   scope on add and reports universe in dumps, so IPv6 routes are built with universe.
//! - Dumps report FRA_FWMASK only when the mask is not 0xffffffff and FRA_PRIORITY only when
//!   the priority is not 0: views normalise both so a built rule and its dump compare equal.

use std::fmt;
use std::net::IpAddr;

use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::AddressFamily;

use crate::model::{Family, IpRule, LocalRoute};

/// The name of the loopback device that etp's local routes point at.
pub const LOOPBACK: &str = "lo";

fn address_family(family: Family) -> AddressFamily {
    match family {
        Family::V4 => AddressFamily::Inet,
        Family::V6 => AddressFamily::Inet6,
    }
}

fn model_family(family: AddressFamily) -> Option<Family> {
    match family {
        AddressFamily::Inet => Some(Family::V4),
        AddressFamily::Inet6 => Some(Family::V6),
        _ => None,
    }
}

/// The table id for the u8 header field: the id itself when it fits, else RT_TABLE_UNSPEC (the
/// kernel then takes the FRA_TABLE / RTA_TABLE attribute).
fn header_table(id: u32) -> u8 {
    u8::try_from(id).unwrap_or(RouteHeader::RT_TABLE_UNSPEC)
}

/// `ip rule add fwmark MARK/MASK lookup TABLE priority PRIO proto PROTO` as an RTM_NEWRULE body.
pub fn rule_message(rule: &IpRule) -> RuleMessage {
    let mut msg = RuleMessage::default();
    msg.header.family = address_family(rule.family);
    msg.header.table = header_table(rule.table.0);
    msg.header.action = RuleAction::ToTable;
    msg.attributes = vec![
        RuleAttribute::Table(rule.table.0),
        RuleAttribute::Priority(rule.priority),
        RuleAttribute::FwMark(rule.mark.0),
        RuleAttribute::FwMask(rule.mask.0),
        RuleAttribute::Protocol(RouteProtocol::from(rule.protocol)),
    ];
    msg
}

/// `ip route add local default dev lo table TABLE proto PROTO` (scope host for IPv4) as an
/// RTM_NEWROUTE body. `lo_index` is the loopback's ifindex in the socket's namespace.
pub fn route_message(route: &LocalRoute, lo_index: u32) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = address_family(route.family);
    msg.header.destination_prefix_length = 0;
    msg.header.table = header_table(route.table.0);
    msg.header.protocol = RouteProtocol::from(route.protocol);
    msg.header.scope = local_scope(route.family);
    msg.header.kind = RouteType::Local;
    msg.attributes = vec![
        RouteAttribute::Table(route.table.0),
        RouteAttribute::Oif(lo_index),
    ];
    msg
}

fn local_scope(family: Family) -> RouteScope {
    match family {
        Family::V4 => RouteScope::Host,
        Family::V6 => RouteScope::Universe,
    }
}

/// The body of an RTM_GETROUTE dump for one family (all tables: filtering is done here, not by
/// the kernel, which ignores dump filters unless strict checking is on).
pub fn route_dump_request(family: Family) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = address_family(family);
    msg
}

/// What identifies an ip rule, read from an RTM_NEWRULE message (built or dumped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleView {
    pub family: Family,
    pub priority: u32,
    /// `None`: the rule has no fwmark selector.
    pub mark: Option<(u32, u32)>,
    pub table: u32,
    pub action: RuleAction,
    pub protocol: u8,
    /// The rule also selects on something etp never sets (iif, source prefix, uid range, ...).
    pub other_selectors: bool,
}

impl RuleView {
    /// Reads a rule message; `None` for families other than IPv4 / IPv6.
    pub fn from_message(msg: &RuleMessage) -> Option<RuleView> {
        let family = model_family(msg.header.family)?;
        let (mut priority, mut mark, mut mask, mut table, mut protocol) = (0, None, None, None, 0);
        let mut other = msg.header.src_len != 0 || msg.header.dst_len != 0 || msg.header.tos != 0;
        for attr in &msg.attributes {
            match attr {
                RuleAttribute::Priority(p) => priority = *p,
                RuleAttribute::FwMark(m) => mark = Some(*m),
                RuleAttribute::FwMask(m) => mask = Some(*m),
                RuleAttribute::Table(t) => table = Some(*t),
                RuleAttribute::Protocol(p) => protocol = u8::from(*p),
                // The kernel reports FRA_SUPPRESS_PREFIXLEN (and on some versions
                // FRA_SUPPRESS_IFGROUP) on every rule, with -1 meaning "not set".
                RuleAttribute::SuppressPrefixLen(u32::MAX)
                | RuleAttribute::SuppressIfGroup(u32::MAX) => {}
                _ => other = true,
            }
        }
        // The kernel stores a mask without a mark as a match on mark 0.
        let mark = match (mark, mask) {
            (None, None) => None,
            (m, k) => Some((m.unwrap_or(0), k.unwrap_or(u32::MAX))),
        };
        Some(RuleView {
            family,
            priority,
            mark,
            table: table.unwrap_or(u32::from(msg.header.table)),
            action: msg.header.action,
            protocol,
            other_selectors: other,
        })
    }
}

impl From<&IpRule> for RuleView {
    fn from(rule: &IpRule) -> RuleView {
        RuleView::from_message(&rule_message(rule)).expect("built rules are IPv4 or IPv6")
    }
}

fn family_name(family: Family) -> &'static str {
    match family {
        Family::V4 => "IPv4",
        Family::V6 => "IPv6",
    }
}

/// `fwmark 0x1000/0x3000 lookup 15001 priority 30100 (IPv4)`
impl fmt::Display for RuleView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some((mark, mask)) = self.mark {
            write!(f, "fwmark {mark:#x}/{mask:#x} ")?;
        }
        match self.action {
            RuleAction::ToTable => write!(f, "lookup {}", self.table)?,
            RuleAction::Goto => f.write_str("goto")?,
            RuleAction::Nop => f.write_str("nop")?,
            RuleAction::Blackhole => f.write_str("blackhole")?,
            RuleAction::Unreachable => f.write_str("unreachable")?,
            RuleAction::Prohibit => f.write_str("prohibit")?,
            RuleAction::Unspec => write!(f, "lookup {} (action unspec)", self.table)?,
            other => write!(f, "action {}", u8::from(other))?,
        }
        write!(f, " priority {}", self.priority)?;
        if self.other_selectors {
            f.write_str(" with other selectors")?;
        }
        write!(f, " ({})", family_name(self.family))
    }
}

/// What identifies a route, read from an RTM_NEWROUTE message (built or dumped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteView {
    pub family: Family,
    pub kind: RouteType,
    /// `None` with `prefix_len == 0`: the default route.
    pub destination: Option<IpAddr>,
    pub prefix_len: u8,
    /// `lo` for the loopback, else `ifindex N`; `None` without an output device.
    pub dev: Option<String>,
    pub table: u32,
    pub scope: RouteScope,
    pub protocol: u8,
}

impl RouteView {
    /// Reads a route message; `lo_index` names the loopback. `None` for other families.
    pub fn from_message(msg: &RouteMessage, lo_index: u32) -> Option<RouteView> {
        let family = model_family(msg.header.address_family)?;
        let (mut destination, mut dev, mut table) = (None, None, None);
        for attr in &msg.attributes {
            match attr {
                RouteAttribute::Destination(RouteAddress::Inet(a)) => {
                    destination = Some(IpAddr::V4(*a))
                }
                RouteAttribute::Destination(RouteAddress::Inet6(a)) => {
                    destination = Some(IpAddr::V6(*a))
                }
                RouteAttribute::Oif(i) if *i == lo_index => dev = Some(LOOPBACK.to_string()),
                RouteAttribute::Oif(i) => dev = Some(format!("ifindex {i}")),
                RouteAttribute::Table(t) => table = Some(*t),
                _ => {}
            }
        }
        // `default` and `0.0.0.0/0` are the same route; only the prefix length says so.
        if msg.header.destination_prefix_length == 0 {
            destination = None;
        }
        Some(RouteView {
            family,
            kind: msg.header.kind,
            destination,
            prefix_len: msg.header.destination_prefix_length,
            dev,
            table: table.unwrap_or(u32::from(msg.header.table)),
            scope: msg.header.scope,
            protocol: u8::from(msg.header.protocol),
        })
    }

    pub fn from_local_route(route: &LocalRoute, lo_index: u32) -> RouteView {
        RouteView::from_message(&route_message(route, lo_index), lo_index)
            .expect("built routes are IPv4 or IPv6")
    }
}

fn route_type_name(kind: RouteType) -> String {
    match kind {
        RouteType::Unicast => "unicast".into(),
        RouteType::Local => "local".into(),
        RouteType::Broadcast => "broadcast".into(),
        RouteType::Anycast => "anycast".into(),
        RouteType::Multicast => "multicast".into(),
        RouteType::BlackHole => "blackhole".into(),
        RouteType::Unreachable => "unreachable".into(),
        RouteType::Prohibit => "prohibit".into(),
        RouteType::Throw => "throw".into(),
        other => format!("type {}", u8::from(other)),
    }
}

/// `local default dev lo table 15001 (IPv4)`
impl fmt::Display for RouteView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ", route_type_name(self.kind))?;
        match self.destination {
            Some(dst) => write!(f, "{dst}/{}", self.prefix_len)?,
            None => f.write_str("default")?,
        }
        if let Some(dev) = &self.dev {
            write!(f, " dev {dev}")?;
        }
        write!(f, " table {} ({})", self.table, family_name(self.family))
    }
}

/// One policy-routing entry: an ip rule or a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Rule(RuleView),
    Route(RouteView),
}

impl Entry {
    /// `ip rule` or `route`.
    pub fn kind(&self) -> &'static str {
        match self {
            Entry::Rule(_) => "ip rule",
            Entry::Route(_) => "route",
        }
    }

    /// The entry without its kind (`fwmark 0x1000/0x3000 lookup 15001 priority 30100 (IPv4)`).
    pub fn detail(&self) -> &dyn fmt::Display {
        match self {
            Entry::Rule(r) => r,
            Entry::Route(r) => r,
        }
    }

    pub fn protocol(&self) -> u8 {
        match self {
            Entry::Rule(r) => r.protocol,
            Entry::Route(r) => r.protocol,
        }
    }
}

/// `ip rule fwmark ... (IPv4)` / `route local default dev lo table 15001 (IPv4)`
impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind(), self.detail())
    }
}

/// What reconciling `observed` (a dump of everything) to `desired` takes, looking only at
/// observed entries tagged with one of `protocols`: the desired entries not present (in
/// desired order), and the observed tagged entries not desired (in dump order, paired with
/// whatever the caller keeps to delete them, e.g. the dumped message).
pub fn diff<'a, T>(
    desired: &'a [Entry],
    observed: &'a [(Entry, T)],
    protocols: &[u8],
) -> (Vec<&'a Entry>, Vec<&'a (Entry, T)>) {
    let ours = || {
        observed
            .iter()
            .filter(|(e, _)| protocols.contains(&e.protocol()))
    };
    let missing = desired
        .iter()
        .enumerate()
        .filter(|(i, d)| !desired[..*i].contains(d) && !ours().any(|(e, _)| e == *d))
        .map(|(_, d)| d)
        .collect();
    // A second copy of a desired entry is extra too: rules added without NLM_F_EXCL (by hand,
    // `ip rule add` twice) duplicate, and one copy is enough.
    let mut kept: Vec<&Entry> = Vec::new();
    let extra = ours()
        .filter(|(e, _)| {
            if desired.contains(e) && !kept.contains(&e) {
                kept.push(e);
                false
            } else {
                true
            }
        })
        .collect();
    (missing, extra)
}

#[cfg(test)]
#[path = "message_tests.rs"]
mod tests;
