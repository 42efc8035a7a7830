//! Unit tests of the pure message builders, views and diff.

use super::*;
use crate::model::{FwMark, TableId};
use netlink_packet_route::rule::RuleHeader;
use rtnetlink::packet_core::{Emitable, Parseable};

fn rule(family: Family, table: u32) -> IpRule {
    IpRule {
        family,
        mark: FwMark(0x1000),
        mask: FwMark(0x3000),
        table: TableId(table),
        priority: 30100,
        protocol: 231,
    }
}

fn route(family: Family, table: u32) -> LocalRoute {
    LocalRoute {
        family,
        table: TableId(table),
        protocol: 231,
    }
}

#[test]
fn rule_message_is_fwmark_to_table_with_table_attribute() {
    let msg = rule_message(&rule(Family::V4, 15001));
    assert_eq!(msg.header.family, AddressFamily::Inet);
    // FR_ACT_TO_TBL, not the default unspec (which makes lookups fail with EINVAL).
    assert_eq!(msg.header.action, RuleAction::ToTable);
    assert_eq!(u8::from(msg.header.action), 1);
    // 15001 does not fit the u8 header field: unspec there, the id in FRA_TABLE.
    assert_eq!(msg.header.table, RouteHeader::RT_TABLE_UNSPEC);
    assert_eq!(
        msg.attributes,
        vec![
            RuleAttribute::Table(15001),
            RuleAttribute::Priority(30100),
            RuleAttribute::FwMark(0x1000),
            RuleAttribute::FwMask(0x3000),
            RuleAttribute::Protocol(RouteProtocol::Other(231)),
        ]
    );
    assert_eq!(
        rule_message(&rule(Family::V6, 15001)).header.family,
        AddressFamily::Inet6
    );
}

#[test]
fn small_table_ids_go_in_the_header_too() {
    let msg = rule_message(&rule(Family::V4, 100));
    assert_eq!(msg.header.table, 100);
    assert!(msg.attributes.contains(&RuleAttribute::Table(100)));
    let msg = route_message(&route(Family::V4, 255), 1);
    assert_eq!(msg.header.table, 255);
    let msg = route_message(&route(Family::V4, 256), 1);
    assert_eq!(msg.header.table, RouteHeader::RT_TABLE_UNSPEC);
    assert!(msg.attributes.contains(&RouteAttribute::Table(256)));
}

#[test]
fn rule_message_bytes() {
    // fib_rule_hdr: family, dst_len, src_len, tos, table, res1, res2, action, flags (u32).
    let msg = rule_message(&rule(Family::V4, 15001));
    let mut buf = vec![0u8; msg.buffer_len()];
    msg.emit(&mut buf);
    assert_eq!(&buf[..12], &[2, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]);
    // FRA_TABLE (15): len 8, type 15, 15001 little-endian.
    assert_eq!(&buf[12..20], &[8, 0, 15, 0, 0x99, 0x3a, 0, 0]);
    // FRA_PROTOCOL (21) is one byte, padded to 8.
    assert_eq!(&buf[buf.len() - 8..], &[5, 0, 21, 0, 231, 0, 0, 0]);
    // And it parses back to the same message.
    let parsed = RuleMessage::parse(&buf[..]).expect("parse own rule message");
    assert_eq!(parsed, msg);
}

#[test]
fn route_message_v4_is_local_scope_host_via_lo() {
    let msg = route_message(&route(Family::V4, 15001), 1);
    assert_eq!(msg.header.address_family, AddressFamily::Inet);
    assert_eq!(msg.header.kind, RouteType::Local);
    // Scope universe makes the kernel refuse an IPv4 local route with EINVAL.
    assert_eq!(msg.header.scope, RouteScope::Host);
    assert_eq!(msg.header.destination_prefix_length, 0);
    assert_eq!(msg.header.protocol, RouteProtocol::Other(231));
    assert_eq!(msg.header.table, RouteHeader::RT_TABLE_UNSPEC);
    assert_eq!(
        msg.attributes,
        vec![RouteAttribute::Table(15001), RouteAttribute::Oif(1)]
    );
    let mut buf = vec![0u8; msg.buffer_len()];
    msg.emit(&mut buf);
    // rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags (u32).
    assert_eq!(&buf[..12], &[2, 0, 0, 0, 0, 231, 254, 2, 0, 0, 0, 0]);
}

#[test]
fn route_message_v6_is_local_via_lo() {
    let msg = route_message(&route(Family::V6, 15001), 7);
    assert_eq!(msg.header.address_family, AddressFamily::Inet6);
    assert_eq!(msg.header.kind, RouteType::Local);
    assert_eq!(msg.header.scope, RouteScope::Universe);
    assert!(msg.attributes.contains(&RouteAttribute::Oif(7)));
    assert!(!msg
        .attributes
        .iter()
        .any(|a| matches!(a, RouteAttribute::Destination(_))));
}

/// A rule as the kernel dumps it: header table 0 for ids > 255 (the kernel writes
/// RT_TABLE_COMPAT, 252), FRA_TABLE always, no FRA_FWMASK for a full mask.
fn dumped_rule(table_hdr: u8, attrs: Vec<RuleAttribute>) -> RuleMessage {
    let mut msg = RuleMessage::default();
    msg.header = RuleHeader {
        family: AddressFamily::Inet,
        table: table_hdr,
        action: RuleAction::ToTable,
        ..Default::default()
    };
    msg.attributes = attrs;
    msg
}

#[test]
fn rule_view_of_a_dump_equals_the_view_of_the_model() {
    let dumped = dumped_rule(
        252,
        vec![
            RuleAttribute::Table(15001),
            RuleAttribute::Priority(30100),
            RuleAttribute::FwMark(0x1000),
            RuleAttribute::FwMask(0x3000),
            RuleAttribute::Protocol(RouteProtocol::Other(231)),
            // Reported on every rule by 6.18, -1 = unset.
            RuleAttribute::SuppressPrefixLen(u32::MAX),
        ],
    );
    let view = RuleView::from_message(&dumped).unwrap();
    assert_eq!(view, RuleView::from(&rule(Family::V4, 15001)));
    assert_eq!(
        view.to_string(),
        "fwmark 0x1000/0x3000 lookup 15001 priority 30100 (IPv4)"
    );
    // A different table is a different rule.
    assert_ne!(view, RuleView::from(&rule(Family::V4, 15002)));
}

#[test]
fn rule_view_normalises_full_mask_and_flags_other_selectors() {
    let full = dumped_rule(
        200,
        vec![
            RuleAttribute::Priority(1000),
            RuleAttribute::FwMark(0x40),
            RuleAttribute::Protocol(RouteProtocol::Boot),
        ],
    );
    let view = RuleView::from_message(&full).unwrap();
    assert_eq!(view.mark, Some((0x40, u32::MAX)));
    assert_eq!(view.table, 200);
    assert_eq!(view.protocol, 3);
    assert!(!view.other_selectors);

    let with_iif = dumped_rule(
        200,
        vec![
            RuleAttribute::Priority(1000),
            RuleAttribute::FwMark(0x40),
            RuleAttribute::Iifname("eth0".into()),
        ],
    );
    let view = RuleView::from_message(&with_iif).unwrap();
    assert!(view.other_selectors);
    let suppress = dumped_rule(200, vec![RuleAttribute::SuppressPrefixLen(0)]);
    assert!(RuleView::from_message(&suppress).unwrap().other_selectors);
    assert!(view.to_string().contains("with other selectors"));
}

#[test]
fn route_view_of_a_dump_equals_the_view_of_the_model() {
    let mut dumped = RouteMessage::default();
    dumped.header.address_family = AddressFamily::Inet;
    dumped.header.table = 252;
    dumped.header.protocol = RouteProtocol::Other(231);
    dumped.header.scope = RouteScope::Host;
    dumped.header.kind = RouteType::Local;
    dumped.attributes = vec![RouteAttribute::Table(15001), RouteAttribute::Oif(1)];
    let view = RouteView::from_message(&dumped, 1).unwrap();
    assert_eq!(
        view,
        RouteView::from_local_route(&route(Family::V4, 15001), 1)
    );
    assert_eq!(view.to_string(), "local default dev lo table 15001 (IPv4)");
    // Seen with another loopback index, the device is named by index and differs.
    let other = RouteView::from_message(&dumped, 9).unwrap();
    assert_eq!(other.dev.as_deref(), Some("ifindex 1"));
    assert_ne!(other, view);
}

fn e_rule(table: u32, protocol: u8) -> Entry {
    let mut r = rule(Family::V4, table);
    r.protocol = protocol;
    Entry::Rule(RuleView::from(&r))
}

#[test]
fn diff_adds_missing_removes_stale_and_ignores_foreign() {
    let desired = vec![e_rule(15001, 231)];
    let observed = vec![
        (e_rule(15002, 231), "stale etp rule"),
        (e_rule(15001, 4), "foreign rule, same selectors"),
        (e_rule(200, 3), "foreign rule"),
    ];
    let (missing, extra) = diff(&desired, &observed, &[231]);
    assert_eq!(missing, vec![&desired[0]]);
    assert_eq!(extra.len(), 1);
    assert_eq!(extra[0].1, "stale etp rule");
}

#[test]
fn diff_is_empty_when_in_sync_and_drops_duplicates() {
    let desired = vec![e_rule(15001, 231), e_rule(15001, 231)];
    let observed = vec![(e_rule(15001, 231), 1), (e_rule(15001, 231), 2)];
    let (missing, extra) = diff(&desired, &observed[..1], &[231]);
    assert!(missing.is_empty());
    assert!(extra.is_empty());
    // Two identical etp rules in the kernel: one is kept, the second is extra.
    let (missing, extra) = diff(&desired, &observed, &[231]);
    assert!(missing.is_empty());
    assert_eq!(extra.iter().map(|(_, n)| *n).collect::<Vec<_>>(), vec![2]);
    // Desired listed twice but absent: added once.
    let (missing, _) = diff(&desired, &observed[..0], &[231]);
    assert_eq!(missing.len(), 1);
}

#[test]
fn entry_display() {
    let e = e_rule(15001, 231);
    assert_eq!(
        e.to_string(),
        "ip rule fwmark 0x1000/0x3000 lookup 15001 priority 30100 (IPv4)"
    );
    assert_eq!(e.kind(), "ip rule");
    let r = Entry::Route(RouteView::from_local_route(&route(Family::V6, 15001), 1));
    assert_eq!(
        r.to_string(),
        "route local default dev lo table 15001 (IPv6)"
    );
}
