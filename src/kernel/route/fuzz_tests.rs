//! Fuzz tests (proptest) of the rtnetlink path: notification and dump bytes are decoded by
//! netlink-packet-route, then filtered (`concerns`) and read (`RuleView` / `RouteView`) by
//! etp. No input may panic; undecodable messages are errors, not guesses.

use netlink_packet_route::RouteNetlinkMessage;
use proptest::prelude::*;
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};

use super::message::{route_message, rule_message, RouteView, RuleView};
use super::monitor::concerns;

use crate::kernel::fuzz_gen;
use crate::model::{Family, FwMark, IpRule, LocalRoute, TableId, ROUTE_PROTOCOL};

fn bytes(m: RouteNetlinkMessage) -> Vec<u8> {
    let mut msg = NetlinkMessage::from(m);
    msg.finalize();
    let mut buf = vec![0; msg.buffer_len()];
    msg.serialize(&mut buf);
    buf
}

/// etp's own rule and route messages, both families, as new and deleted.
fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for family in [Family::V4, Family::V6] {
        let rule = IpRule {
            family,
            priority: 30100,
            mark: FwMark(0x1000),
            mask: FwMark(0x3000),
            table: TableId(15001),
            protocol: ROUTE_PROTOCOL,
        };
        let route = LocalRoute {
            family,
            table: TableId(15001),
            protocol: ROUTE_PROTOCOL,
        };
        out.push(bytes(RouteNetlinkMessage::NewRule(rule_message(&rule))));
        out.push(bytes(RouteNetlinkMessage::DelRule(rule_message(&rule))));
        out.push(bytes(RouteNetlinkMessage::NewRoute(route_message(
            &route, 1,
        ))));
        out.push(bytes(RouteNetlinkMessage::DelRoute(route_message(
            &route, 1,
        ))));
    }
    out
}

proptest! {
    #[test]
    fn rtnetlink_messages_never_panic(buf in fuzz_gen::netlink(seeds())) {
        let Ok(msg) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf) else {
            return Ok(());
        };
        let _ = concerns(&msg, 15001, ROUTE_PROTOCOL);
        if let NetlinkPayload::InnerMessage(m) = &msg.payload {
            match m {
                RouteNetlinkMessage::NewRule(r) | RouteNetlinkMessage::DelRule(r) => {
                    if let Some(v) = RuleView::from_message(r) {
                        let _ = v.to_string();
                    }
                }
                RouteNetlinkMessage::NewRoute(r) | RouteNetlinkMessage::DelRoute(r) => {
                    if let Some(v) = RouteView::from_message(r, 1) {
                        let _ = v.to_string();
                    }
                }
                _ => {}
            }
        }
    }
}
