//! Notifications of ip rule and route changes: the rtnetlink multicast groups for IPv4/IPv6
//! rules and routes (what `ip monitor rule route` reads), filtered down to etp's own entries:
//! rules tagged with etp's protocol or pointing at its table, and routes in its table. A node
//! changes routes all the time (a CNI adds one per pod); only changes to etp's entries count.

use futures::channel::mpsc::UnboundedReceiver;
use futures::StreamExt;
use netlink_packet_route::RouteNetlinkMessage;
use rtnetlink::constants::{RTMGRP_IPV4_ROUTE, RTMGRP_IPV4_RULE, RTMGRP_IPV6_ROUTE};
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::sys::{AsyncSocket, SocketAddr};
use tokio::task::JoinHandle;

use super::message::{RouteView, RuleView};
use super::RouteError;
use crate::kernel::netlink::from_kernel;

/// `RTNLGRP_IPV6_RULE` (19) as a legacy group bit; rtnetlink's constants stop short of it.
const RTMGRP_IPV6_RULE: u32 = 1 << (19 - 1);

/// Whether a notification is about one of etp's rules (its `protocol` or its `table`) or a
/// route in its table.
pub fn concerns(msg: &NetlinkMessage<RouteNetlinkMessage>, table: u32, protocol: u8) -> bool {
    let NetlinkPayload::InnerMessage(m) = &msg.payload else {
        return false;
    };
    match m {
        RouteNetlinkMessage::NewRule(r) | RouteNetlinkMessage::DelRule(r) => {
            RuleView::from_message(r).is_some_and(|v| v.table == table || v.protocol == protocol)
        }
        // The loopback index only names the device in the view; any value does here.
        RouteNetlinkMessage::NewRoute(r) | RouteNetlinkMessage::DelRoute(r) => {
            RouteView::from_message(r, 0).is_some_and(|v| v.table == table)
        }
        _ => false,
    }
}

/// Whether a message the monitor received means that etp's entries may have changed: an
/// overrun (the receive buffer filled up, ENOBUFS, and notifications were lost: anything may
/// have changed, as the nf_tables monitor also assumes) or a notification about one of etp's
/// entries. Only the kernel (port id 0) notifies; a message from any other sender is skipped.
pub fn counts(
    msg: &NetlinkMessage<RouteNetlinkMessage>,
    from: &SocketAddr,
    table: u32,
    protocol: u8,
) -> bool {
    from_kernel(from, "rtnetlink notification")
        && (matches!(msg.payload, NetlinkPayload::Overrun(_)) || concerns(msg, table, protocol))
}

/// An rtnetlink socket subscribed to rule and route changes in the calling thread's namespace.
pub struct RouteMonitor {
    messages: UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>,
    connection: JoinHandle<()>,
    table: u32,
    protocol: u8,
}

impl Drop for RouteMonitor {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl RouteMonitor {
    pub fn open(table: u32, protocol: u8) -> Result<RouteMonitor, RouteError> {
        let (mut conn, _handle, messages) =
            rtnetlink::new_connection().map_err(|source| RouteError::Connect { source })?;
        let groups = RTMGRP_IPV4_RULE | RTMGRP_IPV6_RULE | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE;
        conn.socket_mut()
            .socket_mut()
            .bind(&SocketAddr::new(0, groups))
            .map_err(|source| RouteError::Connect { source })?;
        // The connection lives as long as `messages` does, with or without request handles.
        let connection = tokio::spawn(conn);
        Ok(RouteMonitor {
            messages,
            connection,
            table,
            protocol,
        })
    }

    /// Follows a reload that moved etp's route table.
    pub fn set_table(&mut self, table: u32) {
        self.table = table;
    }

    /// Waits for a change to etp's rules or routes; `None` once the connection has ended.
    pub async fn changed(&mut self) -> Option<()> {
        while let Some((msg, from)) = self.messages.next().await {
            if counts(&msg, &from, self.table, self.protocol) {
                return Some(());
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::route::message::{route_message, rule_message};
    use crate::model::ROUTE_PROTOCOL;
    use crate::model::{Family, FwMark, IpRule, LocalRoute, TableId};

    fn wrap(m: RouteNetlinkMessage) -> NetlinkMessage<RouteNetlinkMessage> {
        NetlinkMessage::from(m)
    }

    #[test]
    fn etps_rules_and_table_routes_count_others_do_not() {
        let rule = IpRule {
            family: Family::V4,
            priority: 30100,
            mark: FwMark(0x1000),
            mask: FwMark(0x3000),
            table: TableId(15001),
            protocol: ROUTE_PROTOCOL,
        };
        let del = wrap(RouteNetlinkMessage::DelRule(rule_message(&rule)));
        assert!(concerns(&del, 15001, ROUTE_PROTOCOL));
        let foreign = IpRule {
            table: TableId(100),
            protocol: 4,
            ..rule.clone()
        };
        let foreign = wrap(RouteNetlinkMessage::NewRule(rule_message(&foreign)));
        assert!(!concerns(&foreign, 15001, ROUTE_PROTOCOL));

        let local = LocalRoute {
            family: Family::V6,
            table: TableId(15001),
            protocol: ROUTE_PROTOCOL,
        };
        let ours = wrap(RouteNetlinkMessage::DelRoute(route_message(&local, 1)));
        assert!(concerns(&ours, 15001, ROUTE_PROTOCOL));
        let pod_route = LocalRoute {
            table: TableId(254),
            ..local.clone()
        };
        let pod_route = wrap(RouteNetlinkMessage::NewRoute(route_message(&pod_route, 1)));
        assert!(!concerns(&pod_route, 15001, ROUTE_PROTOCOL));
    }

    /// The rtnetlink connection turns ENOBUFS into an overrun message (from port 0): lost
    /// notifications must count as a change, or drift waits for the resync tick.
    #[test]
    fn an_overrun_counts_as_a_change() {
        let mut hdr = rtnetlink::packet_core::NetlinkHeader::default();
        hdr.message_type = rtnetlink::packet_core::NLMSG_OVERRUN;
        let overrun = NetlinkMessage::new(hdr, NetlinkPayload::Overrun(Vec::new()));
        assert!(counts(
            &overrun,
            &SocketAddr::new(0, 0),
            15001,
            ROUTE_PROTOCOL
        ));
    }

    /// A notification about etp's own rule counts when the kernel sent it, not when another
    /// process did.
    #[test]
    fn only_the_kernel_is_heard() {
        let ours = NetlinkMessage::from(RouteNetlinkMessage::DelRule(rule_message(&IpRule {
            family: Family::V4,
            mark: FwMark(0x1000),
            mask: FwMark(0x3000),
            table: TableId(15001),
            priority: 30100,
            protocol: ROUTE_PROTOCOL,
        })));
        assert!(counts(&ours, &SocketAddr::new(0, 0), 15001, ROUTE_PROTOCOL));
        assert!(!counts(
            &ours,
            &SocketAddr::new(4242, 0),
            15001,
            ROUTE_PROTOCOL
        ));
    }
}
