//! TCP: the accept loop and one task per accepted connection.
//!
//! Under TPROXY the accepted socket's local address *is* the client's original destination
//! (`SO_ORIGINAL_DST` fails here, which is normal: no NAT happened).

use std::sync::Arc;
use std::time::Instant;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tracing::{debug, info, warn};

use super::admission::{is_own_listener, limited_source, Refusal, SourceSlot};
use super::flow_metrics::{count_upstream_error, FlowMetrics};
use super::upstream::{connect_tcp, decide_flow, FlowDecision};
use super::{ClientAddr, Dataplane, FlowPolicy, OrigDst};
use crate::dataplane::fdlimit::{self, Pressure};
use crate::dataplane::relay::{self, End};
use crate::dataplane::sockopt;
use crate::metrics::Metrics;
use crate::model::Proto;

pub(super) async fn accept_loop(dp: &Dataplane, listener: TcpListener) {
    loop {
        // Out of descriptors (here or in a flow's upstream socket): leave new connections in
        // the backlog for a while instead of accepting them only to reset them.
        if let Some(wait) = dp.pressure.wait_left() {
            tokio::time::sleep(wait).await;
            continue;
        }
        // Accepting even at `limits.max_tcp_flows` (the slot is taken after): a connection
        // etp cannot take gets a reset at once instead of waiting in the backlog (`admit`).
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                dp.metrics.accept_errors_total.inc();
                if fdlimit::is_exhaustion(&e) {
                    let backoff = dp.pressure.hit();
                    warn!(error = %e, backoff_ms = backoff.as_millis() as u64,
                        "accept: out of file descriptors or memory, backing off");
                } else {
                    debug!(error = %e, "accept failed");
                }
                continue;
            }
        };
        let orig = match stream.local_addr() {
            Ok(a) => OrigDst(sockopt::accepted_orig_dst(
                socket2::SockRef::from(&stream),
                a,
            )),
            Err(e) => {
                debug!(error = %e, "getsockname on an accepted connection failed");
                continue;
            }
        };
        let client = ClientAddr(sockopt::unmap(peer));
        let rt = dp.current();
        let decision = decide_flow(&rt, Proto::Tcp, client, orig);
        let slots = match admit(dp, &rt, &decision, client, orig) {
            Ok(s) => s,
            Err(reason) => {
                refuse(dp, reason, &decision, stream, client, orig);
                continue;
            }
        };
        let guard = dp.flows.enter();
        let cancelled = dp.flows.cancelled();
        let metrics = Arc::clone(&dp.metrics);
        let pressure = Arc::clone(&dp.pressure);
        tokio::spawn(async move {
            let _slots = slots;
            let _guard = guard;
            tokio::select! {
                _ = handle(rt, decision, metrics, &pressure, stream, client, orig) => {}
                _ = cancelled => debug!(%client, orig_dst = %orig, "closed by drain deadline"),
            }
        });
    }
}

/// What an admitted connection holds until it closes: one of `limits.max_tcp_flows` and, for
/// a limited source, one of its `limits.max_tcp_flows_per_source`.
struct Slots {
    _global: OwnedSemaphorePermit,
    _source: Option<SourceSlot>,
}

/// Whether etp takes this connection on (`admission` explains each refusal).
fn admit(
    dp: &Dataplane,
    rt: &FlowPolicy,
    decision: &FlowDecision,
    c: ClientAddr,
    d: OrigDst,
) -> Result<Slots, Refusal> {
    let port = rt.listener_port;
    if is_own_listener(d.0, port)
        || (decision.target != d.0 && is_own_listener(decision.target, port))
    {
        return Err(Refusal::SelfLoop);
    }
    let global = Arc::clone(&dp.tcp_slots)
        .try_acquire_owned()
        .map_err(|_| Refusal::GlobalFlows)?;
    let source = match limited_source(&rt.limits, c.0.ip()) {
        Some(s) => {
            let slot = dp
                .admission
                .tcp_source_slot(s, rt.limits.max_tcp_flows_per_source)?;
            dp.admission
                .new_flow_rate(s, rt.limits.new_flows_per_source_per_second)?;
            slot
        }
        None => None,
    };
    Ok(Slots {
        _global: global,
        _source: source,
    })
}

/// Resets a refused connection at once (SO_LINGER 0: the close sends a RST, a definite answer
/// the client cannot mistake for a reply), counts and logs it.
fn refuse(
    dp: &Dataplane,
    reason: Refusal,
    decision: &FlowDecision,
    stream: TcpStream,
    c: ClientAddr,
    d: OrigDst,
) {
    let _ = sockopt::set_reset_on_close((&stream).into());
    drop(stream);
    dp.admission
        .refused(&dp.metrics, reason, &decision.route, "tcp", c.0, d.0);
}

async fn handle(
    rt: Arc<FlowPolicy>,
    decision: FlowDecision,
    metrics: Arc<Metrics>,
    pressure: &Pressure,
    client: TcpStream,
    c: ClientAddr,
    d: OrigDst,
) {
    let start = Instant::now();
    let flow_metrics = FlowMetrics::start(&metrics, &decision, Proto::Tcp);
    debug!(client = %c, orig_dst = %d, route = %decision.route, action = %decision.action, "accepted");
    // The client leg inherited TCP_NODELAY and keepalive from the listener (listen.rs); the
    // upstream leg gets TCP_NODELAY at connect and keepalive from the relay.

    let upstream = match connect_tcp(&decision, c, rt.limits.connect_timeout).await {
        Ok(u) => {
            pressure.clear();
            u
        }
        Err(e) => {
            if fdlimit::is_exhaustion(&e) {
                let backoff = pressure.hit();
                warn!(client = %c, orig_dst = %d, error = %e,
                    backoff_ms = backoff.as_millis() as u64,
                    "upstream socket: out of file descriptors or memory, accepts back off");
            }
            let kind = count_upstream_error(&metrics, &decision.route, &e);
            debug!(client = %c, orig_dst = %d, route = %decision.route, upstream = %decision.target,
                %kind, error = %e, "upstream connect failed, resetting the client");
            // SO_LINGER 0: the close below sends a RST, so the client fails at once instead of
            // seeing an orderly close it could mistake for an answer.
            let _ = sockopt::set_reset_on_close((&client).into());
            return;
        }
    };
    debug!(client = %c, orig_dst = %d, upstream = %decision.target,
        local = %upstream.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        mark = %format_args!("{:#x}", decision.mark), "upstream connected");

    let out = relay::relay(
        &client,
        &upstream,
        rt.limits.tcp_idle_timeout,
        &flow_metrics.bytes,
        rt.limits.relay,
    )
    .await;
    let duration_ms = start.elapsed().as_millis() as u64;
    match &out.end {
        End::Error(e) => info!(client = %c, orig_dst = %d, route = %decision.route,
            bytes_to_upstream = out.client_to_upstream, bytes_to_client = out.upstream_to_client,
            duration_ms, error = %e, "closed with an error"),
        end => debug!(client = %c, orig_dst = %d, route = %decision.route,
            bytes_to_upstream = out.client_to_upstream, bytes_to_client = out.upstream_to_client,
            duration_ms, %end, "closed"),
    }
    drop(flow_metrics);
}
