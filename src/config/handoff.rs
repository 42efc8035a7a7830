//! `[linkerd] handoff`, `handoff_address`, `when_unavailable`, `ready_url`: how `linkerd`
//! routes reach the proxy, and what they do while it is not ready.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::validate::RawLinkerd;
use super::{ConfigError, Cx};

/// How a `linkerd` route's TCP connection reaches the proxy's outbound listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HandoffMode {
    /// etp accepts the connection (TPROXY) and opens a second one, marked, that the nat output
    /// rule redirects to the proxy (two user-space hops: etp's relay, then the proxy).
    #[default]
    Relay,
    /// The ruleset DNATs the client's own connection to the hand-off address; the proxy accepts
    /// it and reads `SO_ORIGINAL_DST`, as behind proxy-init (one hop, etp not in the path).
    Kernel,
}

impl fmt::Display for HandoffMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HandoffMode::Relay => "relay",
            HandoffMode::Kernel => "kernel",
        })
    }
}

/// What `linkerd` routes do while the proxy is not ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WhenUnavailable {
    /// New connections are reset at once: nothing leaves the node without mTLS.
    #[default]
    Refuse,
    /// New connections go straight to their destination, without the mesh.
    Direct,
}

impl fmt::Display for WhenUnavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WhenUnavailable::Refuse => "refuse",
            WhenUnavailable::Direct => "direct",
        })
    }
}

/// At most one hand-off address per family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandoffAddress {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

/// IPv4 link-local (not routed off the node, NodeLocal DNSCache uses 169.254.20.10).
pub const DEFAULT_HANDOFF_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 15, 1);
/// An IPv6 unique local address (fd00::/8).
pub const DEFAULT_HANDOFF_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x15, 0, 0, 0, 0, 0, 1);

impl Default for HandoffAddress {
    fn default() -> HandoffAddress {
        HandoffAddress {
            v4: Some(DEFAULT_HANDOFF_V4),
            v6: Some(DEFAULT_HANDOFF_V6),
        }
    }
}

impl HandoffAddress {
    pub fn addrs(&self) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = self.v4.iter().map(|a| IpAddr::V4(*a)).collect();
        v.extend(self.v6.iter().map(|a| IpAddr::V6(*a)));
        v
    }
}

/// `http://IP:PORT/PATH` (the proxy's admin `/ready`); no names, no TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyUrl {
    pub addr: SocketAddr,
    pub path: String,
}

impl fmt::Display for ReadyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}{}", self.addr, self.path)
    }
}

impl ReadyUrl {
    pub fn parse(text: &str) -> Result<ReadyUrl, String> {
        let rest = text
            .strip_prefix("http://")
            .ok_or("expected http://IP:PORT/PATH (the proxy's admin endpoint speaks plain HTTP)")?;
        let (host, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let addr: SocketAddr = host
            .parse()
            .map_err(|_| format!("{host:?} is not IP:PORT (names are not resolved)"))?;
        Ok(ReadyUrl {
            addr,
            path: path.to_string(),
        })
    }
}

/// The validated four keys.
pub(super) struct Handoff {
    pub mode: HandoffMode,
    pub address: HandoffAddress,
    pub when_unavailable: WhenUnavailable,
    pub ready_url: Option<ReadyUrl>,
}

/// One of `options` by its name; the first is the default.
fn choice<T: Copy>(
    cx: &Cx<'_>,
    raw: Option<toml::Spanned<String>>,
    key: &str,
    options: &[(&str, T)],
) -> Result<T, ConfigError> {
    let Some(s) = raw else {
        return Ok(options[0].1);
    };
    match options.iter().find(|(name, _)| name == s.get_ref()) {
        Some((_, v)) => Ok(*v),
        None => {
            let names: Vec<String> = options.iter().map(|(n, _)| format!("{n:?}")).collect();
            Err(cx.err(
                s.span(),
                key,
                format!("{:?}: expected {}", s.get_ref(), names.join(" or ")),
            ))
        }
    }
}

pub(super) fn validate(cx: &Cx<'_>, raw: &mut RawLinkerd) -> Result<Handoff, ConfigError> {
    let mode = choice(
        cx,
        raw.handoff.take(),
        "linkerd.handoff",
        &[
            ("relay", HandoffMode::Relay),
            ("kernel", HandoffMode::Kernel),
        ],
    )?;
    let when_unavailable = choice(
        cx,
        raw.when_unavailable.take(),
        "linkerd.when_unavailable",
        &[
            ("refuse", WhenUnavailable::Refuse),
            ("direct", WhenUnavailable::Direct),
        ],
    )?;
    let ready_url = match raw.ready_url.take() {
        None => None,
        Some(s) => Some(ReadyUrl::parse(s.get_ref()).map_err(|msg| {
            cx.err(
                s.span(),
                "linkerd.ready_url",
                format!("{:?}: {msg}", s.get_ref()),
            )
        })?),
    };
    let address = match raw.handoff_address.take() {
        None => HandoffAddress::default(),
        Some(list) => {
            let span = list.span();
            let mut a = HandoffAddress { v4: None, v6: None };
            for item in list.into_inner() {
                let key = "linkerd.handoff_address";
                let ip: IpAddr = item.get_ref().parse().map_err(|_| {
                    cx.err(
                        item.span(),
                        key,
                        format!("{:?} is not an IP address", item.get_ref()),
                    )
                })?;
                if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() {
                    // NAT to loopback from outside needs route_localnet, which exposes every
                    // loopback listener on the node (CVE-2020-8558).
                    return Err(cx.err(
                        item.span(),
                        key,
                        format!("{ip}: loopback, unspecified and multicast addresses cannot take a DNAT from outside the node; use a link-local (169.254.0.0/16) or unique local (fd00::/8) address"),
                    ));
                }
                let dup = match ip {
                    IpAddr::V4(v4) => a.v4.replace(v4).is_some(),
                    IpAddr::V6(v6) => a.v6.replace(v6).is_some(),
                };
                if dup {
                    return Err(cx.err(item.span(), key, "at most one IPv4 and one IPv6 address"));
                }
            }
            if a.v4.is_none() && a.v6.is_none() {
                return Err(cx.err(span, "linkerd.handoff_address", "at least one address"));
            }
            a
        }
    };
    Ok(Handoff {
        mode,
        address,
        when_unavailable,
        ready_url,
    })
}

/// With the kernel hand-off, every family a `linkerd` route intercepts needs a hand-off address
/// of that family (else its connections would be labelled and never handed over).
pub(super) fn check_families(
    cx: &Cx<'_>,
    listener: &super::Listener,
    linkerd: &super::Linkerd,
    routes: &[super::Route],
) -> Result<(), ConfigError> {
    if linkerd.handoff != HandoffMode::Kernel {
        return Ok(());
    }
    for r in routes.iter().filter(|r| r.action == super::Action::Linkerd) {
        let v6 = r.destinations.iter().any(|d| d.is_ipv6()) && listener.ipv6;
        let v4 = r.destinations.iter().any(|d| d.is_ipv4());
        let missing = match (v4, v6, linkerd.handoff_address) {
            (true, _, HandoffAddress { v4: None, .. }) => Some("IPv4"),
            (_, true, HandoffAddress { v6: None, .. }) => Some("IPv6"),
            _ => None,
        };
        if let Some(family) = missing {
            return Err(ConfigError::Invalid {
                file: cx.file.to_string(),
                line: 0,
                key: "linkerd.handoff_address".to_string(),
                msg: format!(
                    "route {:?} hands {family} connections to Linkerd in the kernel: add an {family} hand-off address",
                    r.name
                ),
            });
        }
    }
    Ok(())
}
