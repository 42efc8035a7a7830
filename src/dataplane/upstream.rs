//! Where a flow goes and the sockets etp opens towards it.
//!
//! Every socket opened here carries a mark, so that etp's ruleset returns on etp's own traffic
//! (no loop):
//! - `linkerd`: connect to the original destination with the hand-off mark; the ruleset's nat
//!   output rule redirects that connection to the Linkerd proxy's outbound port, so the proxy's
//!   `SO_ORIGINAL_DST` is the client's original destination, as behind proxy-init.
//! - `direct`: connect to the original destination with the own mark.
//! - `forward`: connect to the route's fixed address with the own mark.
//!
//! `preserve_source` (direct, TCP only): the upstream socket is made transparent and bound to the
//! client's IP (a kernel-chosen port), so the server sees the client's address. This works only
//! where the server's replies to the client's address are routed back through this node (this
//! node is the client's router or gateway, no NAT between); there the `socket transparent 1`
//! rule in the ruleset's `established` chain delivers them to etp's socket. Anywhere else the server answers
//! the client directly and the connection never completes. UDP flows ignore it.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};

use super::{ClientAddr, FlowPolicy, OrigDst};
use crate::classify::Decision;
use crate::config::Action;
use crate::dataplane::sockopt;
use crate::model::Proto;

/// Route name used for flows no route matches (accepted under an older ruleset, or bypassed
/// in a reload race): they go directly to their original destination (fail-open).
pub const UNMATCHED: &str = "unmatched";

/// Where one flow goes: its route, the action (metrics label), the upstream address and mark.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowDecision {
    pub route: String,
    /// "linkerd", "direct" or "forward" (the metrics label).
    pub action: &'static str,
    /// Where etp connects.
    pub target: SocketAddr,
    /// The `SO_MARK` of the upstream socket.
    pub mark: u32,
    /// Bind the upstream socket to the client's IP (transparent).
    pub bind_client: bool,
}

/// Classifies a flow and decides its upstream address and mark.
pub fn decide_flow(
    rt: &FlowPolicy,
    proto: Proto,
    client: ClientAddr,
    orig: OrigDst,
) -> FlowDecision {
    let own = rt.kernel.own_mark.0;
    let direct = |route: String, bind_client: bool| FlowDecision {
        route,
        action: "direct",
        target: orig.0,
        mark: own,
        bind_client,
    };
    match rt.classifier.classify(proto, client.0.ip(), orig.0) {
        Decision::Route(sel) => {
            let name = sel.route.name.clone();
            match sel.route.action {
                // Config refuses udp on linkerd routes (Linkerd proxies no UDP); kept total.
                Action::Linkerd if proto == Proto::Tcp => FlowDecision {
                    route: name,
                    action: "linkerd",
                    target: orig.0,
                    mark: rt.kernel.handoff_mark.0,
                    bind_client: false,
                },
                Action::Linkerd => direct(name, false),
                Action::Direct => direct(
                    name,
                    sel.route.preserve_source
                        && proto == Proto::Tcp
                        && client.0.is_ipv4() == orig.0.is_ipv4(),
                ),
                Action::Forward(to) => FlowDecision {
                    route: name,
                    action: "forward",
                    target: to,
                    mark: own,
                    bind_client: false,
                },
            }
        }
        Decision::Bypass | Decision::NoRoute => direct(UNMATCHED.to_string(), false),
    }
}

/// Connects a marked TCP socket to `decision.target` within `timeout` (`TimedOut` after it).
pub async fn connect_tcp(
    decision: &FlowDecision,
    client: ClientAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    // Non-blocking from socket(2) on (SOCK_NONBLOCK): two fcntl calls fewer per flow.
    let sock = Socket::new(
        Domain::for_address(decision.target),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    sockopt::set_mark(&sock, decision.mark)?;
    // Latency matters from the first byte; keepalive is armed by the relay once the flow has
    // lived a while (`relay::KEEPALIVE_ARM_AFTER`).
    sock.set_tcp_nodelay(true)?;
    if decision.bind_client {
        sockopt::set_transparent(&sock, decision.target.is_ipv6())?;
        sock.bind(&SocketAddr::new(client.0.ip(), 0).into())?;
    }
    let sock = TcpSocket::from_std_stream(std::net::TcpStream::from(sock));
    match tokio::time::timeout(timeout, sock.connect(decision.target)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {timeout:?}"),
        )),
    }
}

/// A marked UDP socket connected to `target` (one per UDP flow).
pub fn udp_upstream(target: SocketAddr, mark: u32) -> io::Result<UdpSocket> {
    let sock = Socket::new(
        Domain::for_address(target),
        Type::DGRAM.nonblocking(),
        Some(Protocol::UDP),
    )?;
    sockopt::set_mark(&sock, mark)?;
    let any: IpAddr = if target.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    sock.bind(&SocketAddr::new(any, 0).into())?;
    sock.connect(&target.into())?;
    UdpSocket::from_std(sock.into())
}

/// A marked transparent UDP socket bound to the original destination, from which replies go
/// back to clients so that they come *from* the address the client asked. `SO_REUSEADDR` lets
/// it coexist with other sockets on that address; it is never read.
pub fn reply_socket(orig: OrigDst, mark: u32) -> io::Result<UdpSocket> {
    let v6 = orig.0.is_ipv6();
    let sock = Socket::new(
        Domain::for_address(orig.0),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    if v6 {
        sock.set_only_v6(true)?;
    }
    sock.set_reuse_address(true)?;
    sockopt::set_transparent(&sock, v6)?;
    sockopt::set_mark(&sock, mark)?;
    sock.set_nonblocking(true)?;
    sock.bind(&orig.0.into())?;
    UdpSocket::from_std(sock.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn rt() -> FlowPolicy {
        FlowPolicy::new(
            &Config::parse(
                r#"
[[route]]
name = "svc"
protocols = ["tcp"]
destinations = ["10.96.0.0/12"]
ports = ["1-65535"]
action = "linkerd"
[[route]]
name = "keep"
protocols = ["tcp"]
destinations = ["10.20.0.0/16"]
ports = [80]
action = "direct"
preserve_source = true
[[route]]
name = "dns"
protocols = ["udp"]
destinations = ["10.30.0.10/32"]
ports = [53]
action = "forward"
forward_to = "169.254.20.10:53"
"#,
                "t.toml",
            )
            .unwrap(),
        )
    }

    #[test]
    fn actions_pick_target_and_mark() {
        let rt = rt();
        let c = ClientAddr("10.1.0.2:40000".parse().unwrap());
        let p = decide_flow(
            &rt,
            Proto::Tcp,
            c,
            OrigDst("10.96.0.1:443".parse().unwrap()),
        );
        assert_eq!((p.action, p.mark), ("linkerd", 0x3000));
        assert_eq!(p.target, "10.96.0.1:443".parse().unwrap());
        let p = decide_flow(
            &rt,
            Proto::Udp,
            c,
            OrigDst("10.96.0.1:443".parse().unwrap()),
        );
        assert_eq!(
            (p.route.as_str(), p.mark),
            (UNMATCHED, 0x2000),
            "udp: no route"
        );
        let p = decide_flow(&rt, Proto::Tcp, c, OrigDst("10.20.1.1:80".parse().unwrap()));
        assert_eq!((p.route.as_str(), p.bind_client), ("keep", true));
        let p = decide_flow(
            &rt,
            Proto::Udp,
            c,
            OrigDst("10.30.0.10:53".parse().unwrap()),
        );
        assert_eq!(p.action, "forward");
        assert_eq!(p.target, "169.254.20.10:53".parse().unwrap());
        let p = decide_flow(&rt, Proto::Tcp, c, OrigDst("192.0.2.1:80".parse().unwrap()));
        assert_eq!((p.route.as_str(), p.action), (UNMATCHED, "direct"));
        assert_eq!(p.target, "192.0.2.1:80".parse().unwrap());
    }
}
