//! The transparent listeners on the TPROXY port.
//!
//! TPROXY delivers packets addressed to foreign addresses to a socket bound to the port only if
//! that socket has `IP_TRANSPARENT` (`IPV6_TRANSPARENT`), which must be set before `bind`. The
//! IPv6 sockets are `IPV6_V6ONLY` so that the IPv4 and IPv6 listeners share the port. UDP
//! sockets also ask for `IP(V6)_RECVORIGDSTADDR`: the original destination of each datagram.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, UdpSocket};

use crate::dataplane::sockopt;

/// TCP accept backlog (the kernel caps it at net.core.somaxconn).
const BACKLOG: i32 = 4096;
/// Receive buffer asked for on the UDP listeners (capped by net.core.rmem_max).
const UDP_RCVBUF: usize = 4 << 20;

/// A listener that could not be created; startup stops with this message.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("creating the {proto} socket for {addr}")]
    Socket {
        proto: &'static str,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error(
        "setting {option} on the {proto} listener {addr} \
         (etp needs CAP_NET_ADMIN or CAP_NET_RAW for transparent sockets)"
    )]
    Transparent {
        option: &'static str,
        proto: &'static str,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("setting {option} on the {proto} listener {addr}")]
    Option {
        option: &'static str,
        proto: &'static str,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("binding the {proto} listener to {addr}{hint}")]
    Bind {
        proto: &'static str,
        addr: SocketAddr,
        hint: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("listening on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("registering the {proto} listener {addr} with tokio (outside a runtime?)")]
    Register {
        proto: &'static str,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// The bound listeners. IPv6 ones are absent when `ipv6 = false`.
#[derive(Debug)]
pub struct Listeners {
    pub tcp4: TcpListener,
    pub tcp6: Option<TcpListener>,
    pub udp4: UdpSocket,
    pub udp6: Option<UdpSocket>,
}

impl Listeners {
    /// Binds TCP and UDP on `port` for IPv4 (0.0.0.0) and, if `ipv6`, IPv6 (`[::]`, v6-only).
    /// Synchronous; must run inside a tokio runtime (the sockets are registered with it).
    pub fn bind(port: u16, ipv6: bool) -> Result<Listeners, ListenError> {
        let any4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
        let any6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
        let tcp4 = tcp(any4)?;
        let udp4 = udp(any4)?;
        let (tcp6, udp6) = if ipv6 {
            (Some(tcp(any6)?), Some(udp(any6)?))
        } else {
            (None, None)
        };
        Ok(Listeners {
            tcp4,
            tcp6,
            udp4,
            udp6,
        })
    }

    /// "tcp 0.0.0.0:15001, udp 0.0.0.0:15001, ..." for the start log.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        for l in std::iter::once(&self.tcp4).chain(self.tcp6.as_ref()) {
            if let Ok(a) = l.local_addr() {
                parts.push(format!("tcp {a}"));
            }
        }
        for u in std::iter::once(&self.udp4).chain(self.udp6.as_ref()) {
            if let Ok(a) = u.local_addr() {
                parts.push(format!("udp {a}"));
            }
        }
        parts.join(", ")
    }
}

/// A socket with the options both protocols need, bound to `addr`.
fn transparent_socket(
    addr: SocketAddr,
    ty: Type,
    proto: &'static str,
) -> Result<Socket, ListenError> {
    let v6 = addr.is_ipv6();
    let p = if proto == "tcp" {
        Protocol::TCP
    } else {
        Protocol::UDP
    };
    let sock = Socket::new(Domain::for_address(addr), ty, Some(p)).map_err(|source| {
        ListenError::Socket {
            proto,
            addr,
            source,
        }
    })?;
    let opt = |option: &'static str, r: io::Result<()>| {
        r.map_err(|source| ListenError::Option {
            option,
            proto,
            addr,
            source,
        })
    };
    if v6 {
        opt("IPV6_V6ONLY", sock.set_only_v6(true))?;
    }
    opt("SO_REUSEADDR", sock.set_reuse_address(true))?;
    sockopt::set_transparent(&sock, v6).map_err(|source| ListenError::Transparent {
        option: if v6 {
            "IPV6_TRANSPARENT"
        } else {
            "IP_TRANSPARENT"
        },
        proto,
        addr,
        source,
    })?;
    if proto == "udp" {
        let name = if v6 {
            "IPV6_RECVORIGDSTADDR"
        } else {
            "IP_RECVORIGDSTADDR"
        };
        opt(name, sockopt::set_recv_orig_dst(&sock, v6))?;
        let name = if v6 {
            "IPV6_MULTICAST_ALL"
        } else {
            "IP_MULTICAST_ALL"
        };
        opt(name, sockopt::set_multicast_all_off(&sock, v6))?;
        // Best effort: bursts of DNS queries should not overflow the default buffer.
        let _ = sock.set_recv_buffer_size(UDP_RCVBUF);
    }
    opt("O_NONBLOCK", sock.set_nonblocking(true))?;
    sock.bind(&addr.into())
        .map_err(|source| ListenError::Bind {
            proto,
            addr,
            hint: match source.kind() {
                io::ErrorKind::AddrInUse => {
                    " (another process holds this port: change listener.port or stop it)"
                }
                io::ErrorKind::AddrNotAvailable if v6 => {
                    " (IPv6 disabled? set listener.ipv6 = false)"
                }
                _ => "",
            },
            source,
        })?;
    Ok(sock)
}

fn tcp(addr: SocketAddr) -> Result<TcpListener, ListenError> {
    let sock = transparent_socket(addr, Type::STREAM, "tcp")?;
    // Accepted sockets inherit TCP_NODELAY and the keepalive settings from the listener
    // (`sockopt::tests::accepted_sockets_inherit_tcp_tuning`): set once here, not per connection.
    sockopt::tcp_tuning(socket2::SockRef::from(&sock)).map_err(|source| ListenError::Option {
        option: "TCP_NODELAY/SO_KEEPALIVE",
        proto: "tcp",
        addr,
        source,
    })?;
    sock.listen(BACKLOG)
        .map_err(|source| ListenError::Listen { addr, source })?;
    TcpListener::from_std(sock.into()).map_err(|source| ListenError::Register {
        proto: "tcp",
        addr,
        source,
    })
}

fn udp(addr: SocketAddr) -> Result<UdpSocket, ListenError> {
    let sock = transparent_socket(addr, Type::DGRAM, "udp")?;
    UdpSocket::from_std(sock.into()).map_err(|source| ListenError::Register {
        proto: "udp",
        addr,
        source,
    })
}
