//! The metrics of one flow, shared by the TCP and UDP paths: counted in `etp_flows_total`
//! when it starts, open in `etp_flows_active` until its guard drops (however the flow ends:
//! closed, idle, failed, or its task cancelled by the drain deadline), bytes in
//! `etp_bytes_total` under its route.

use std::io;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use super::relay::Counters;
use super::upstream::FlowDecision;
use crate::metrics::{ByteLabels, Direction, ErrorKind, ErrorLabels, FlowLabels, Metrics};
use crate::model::Proto;

/// Held by a flow for its lifetime; dropping it closes the flow in `etp_flows_active`.
pub(crate) struct FlowMetrics {
    active: Gauge,
    /// The route's byte counters (the relay and the UDP flow add to them as bytes move).
    pub(crate) bytes: Counters,
}

impl FlowMetrics {
    /// Counts a new flow of `decision`'s route and opens it.
    pub(crate) fn start(m: &Metrics, decision: &FlowDecision, proto: Proto) -> FlowMetrics {
        let labels = FlowLabels {
            route: decision.route.clone(),
            action: decision.action.to_string(),
            proto: proto.to_string(),
        };
        m.flows_total.get_or_create(&labels).inc();
        let active = Gauge::clone(&m.flows_active.get_or_create(&labels));
        active.inc();
        let bytes = |direction: Direction| {
            Counter::clone(&m.bytes_total.get_or_create(&ByteLabels {
                route: decision.route.clone(),
                direction: direction.as_str(),
            }))
        };
        FlowMetrics {
            active,
            bytes: Counters {
                client_to_upstream: bytes(Direction::ClientToUpstream),
                upstream_to_client: bytes(Direction::UpstreamToClient),
            },
        }
    }
}

impl Drop for FlowMetrics {
    fn drop(&mut self) {
        self.active.dec();
    }
}

/// Counts a failed upstream socket or connection under `route`; returns its kind.
pub(crate) fn count_upstream_error(m: &Metrics, route: &str, e: &io::Error) -> ErrorKind {
    let kind = ErrorKind::of(e);
    m.upstream_errors_total
        .get_or_create(&ErrorLabels {
            route: route.to_string(),
            kind: kind.as_str(),
        })
        .inc();
    kind
}
