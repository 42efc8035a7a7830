//! The raw TOML shape (serde, with spans) and its validation into [`Config`]: every check
//! that refuses a config lives here, each error pointing at the file, line and key.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use ipnetwork::IpNetwork;
use serde::Deserialize;
use toml::Spanned;

use super::*;
use crate::model::{FwMark, PortRange, Proto, RelayMode, TableId, COMMENT_MAX};

type S<T> = Spanned<T>;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    listener: RawListener,
    #[serde(default)]
    linkerd: RawLinkerd,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    bypass: RawBypass,
    #[serde(default)]
    kernel: RawKernel,
    #[serde(default)]
    daemon: RawDaemon,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    route: Vec<S<RawRoute>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawListener {
    port: Option<S<i64>>,
    ipv6: Option<bool>,
    local: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLinkerd {
    outbound_port: Option<S<i64>>,
    proxy_uid: Option<S<i64>>,
    pub(super) handoff: Option<S<String>>,
    pub(super) handoff_address: Option<S<Vec<S<String>>>>,
    pub(super) when_unavailable: Option<S<String>>,
    pub(super) ready_url: Option<S<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    address: Option<S<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawBypass {
    destinations: Option<Vec<S<String>>>,
    ports: Option<Vec<S<RawPort>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawKernel {
    mark_mask: Option<S<i64>>,
    tproxy_mark: Option<S<i64>>,
    own_mark: Option<S<i64>>,
    handoff_mark: Option<S<i64>>,
    route_table: Option<S<i64>>,
    rule_priority: Option<S<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    drain_seconds: Option<S<i64>>,
    resync_seconds: Option<S<i64>>,
    pid_file: Option<String>,
    fail_closed: Option<bool>,
    watch_kernel: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_tcp_flows: Option<S<i64>>,
    connect_timeout_ms: Option<S<i64>>,
    tcp_idle_seconds: Option<S<i64>>,
    udp_idle_seconds: Option<S<i64>>,
    max_udp_flows: Option<S<i64>>,
    udp_queue: Option<S<i64>>,
    relay: Option<S<String>>,
    worker_threads: Option<S<i64>>,
    max_tcp_flows_per_source: Option<S<i64>>,
    max_udp_flows_per_source: Option<S<i64>>,
    new_flows_per_source_per_second: Option<S<i64>>,
    trusted_sources: Option<Vec<S<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: S<String>,
    protocols: Option<S<Vec<S<String>>>>,
    destinations: Option<S<Vec<S<String>>>>,
    ports: Option<S<Vec<S<RawPort>>>>,
    sources: Option<Vec<S<String>>>,
    action: S<String>,
    forward_to: Option<S<String>>,
    preserve_source: Option<S<bool>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawPort {
    Num(i64),
    Range(String),
}

impl RawConfig {
    pub(super) fn validate(self, cx: &Cx<'_>) -> Result<Config, ConfigError> {
        let listener = self.listener.validate(cx)?;
        let linkerd = self.linkerd.validate(cx, &listener)?;
        let admin = self.admin.validate(cx, &listener, &linkerd)?;
        let bypass = self.bypass.validate(cx)?;
        let kernel = self.kernel.validate(cx)?;
        let daemon = self.daemon.validate(cx)?;
        let limits = self.limits.validate(cx)?;
        let routes = validate_routes(cx, self.route, &listener)?;
        super::handoff::check_families(cx, &listener, &linkerd, &routes)?;
        Ok(Config {
            source: cx.file.to_string(),
            listener,
            linkerd,
            admin,
            bypass,
            kernel,
            daemon,
            limits,
            routes,
        })
    }
}

impl RawListener {
    fn validate(self, cx: &Cx<'_>) -> Result<Listener, ConfigError> {
        let port = int(
            cx,
            self.port,
            "listener.port",
            DEFAULT_PORT as i64,
            1,
            65535,
        )? as u16;
        Ok(Listener {
            port,
            ipv6: self.ipv6.unwrap_or(true),
            local: self.local.unwrap_or(false),
        })
    }
}

impl RawLinkerd {
    fn validate(mut self, cx: &Cx<'_>, listener: &Listener) -> Result<Linkerd, ConfigError> {
        let outbound_span = self.outbound_port.as_ref().map(|s| s.span());
        let handoff = super::handoff::validate(cx, &mut self)?;
        let linkerd = Linkerd {
            outbound_port: int(
                cx,
                self.outbound_port,
                "linkerd.outbound_port",
                DEFAULT_OUTBOUND_PORT as i64,
                1,
                65535,
            )? as u16,
            proxy_uid: int(
                cx,
                self.proxy_uid,
                "linkerd.proxy_uid",
                DEFAULT_PROXY_UID as i64,
                0,
                u32::MAX as i64 - 1,
            )? as u32,
            handoff: handoff.mode,
            handoff_address: handoff.address,
            when_unavailable: handoff.when_unavailable,
            ready_url: handoff.ready_url,
        };
        if linkerd.outbound_port == listener.port {
            return Err(cx.err(
                outbound_span.unwrap_or(0..0),
                "linkerd.outbound_port",
                format!(
                    "{} is also listener.port: the hand-off would loop back into etp",
                    listener.port
                ),
            ));
        }
        Ok(linkerd)
    }
}

impl RawAdmin {
    /// `admin.address`: an IP:PORT that neither the listener nor Linkerd's outbound port uses.
    fn validate(
        self,
        cx: &Cx<'_>,
        listener: &Listener,
        linkerd: &Linkerd,
    ) -> Result<Admin, ConfigError> {
        let Some(a) = self.address else {
            return Ok(Admin {
                address: DEFAULT_ADMIN.parse().expect("valid default"),
            });
        };
        let span = a.span();
        let address: SocketAddr = a.into_inner().parse().map_err(|_| {
            cx.err(
                span.clone(),
                "admin.address",
                "expected IP:PORT, e.g. \"127.0.0.1:15002\"",
            )
        })?;
        if address.port() == listener.port || address.port() == linkerd.outbound_port {
            return Err(cx.err(
                span,
                "admin.address",
                format!(
                    "port {} is taken by the listener or Linkerd's outbound port",
                    address.port()
                ),
            ));
        }
        Ok(Admin { address })
    }
}

impl RawBypass {
    fn validate(self, cx: &Cx<'_>) -> Result<Bypass, ConfigError> {
        Ok(Bypass {
            destinations: cidrs(
                cx,
                self.destinations.unwrap_or_default(),
                "bypass.destinations",
            )?,
            ports: ports(cx, self.ports.unwrap_or_default(), "bypass.ports")?,
        })
    }
}

impl RawDaemon {
    fn validate(self, cx: &Cx<'_>) -> Result<DaemonOptions, ConfigError> {
        Ok(DaemonOptions {
            drain_timeout: Duration::from_secs(int(
                cx,
                self.drain_seconds,
                "daemon.drain_seconds",
                DEFAULT_DRAIN_SECONDS as i64,
                0,
                3600,
            )? as u64),
            resync_interval: Duration::from_secs(int(
                cx,
                self.resync_seconds,
                "daemon.resync_seconds",
                DEFAULT_RESYNC_SECONDS as i64,
                1,
                86400,
            )? as u64),
            pid_file: PathBuf::from(
                self.pid_file
                    .unwrap_or_else(|| DEFAULT_PID_FILE.to_string()),
            ),
            fail_closed: self.fail_closed.unwrap_or(false),
            watch_kernel: self.watch_kernel.unwrap_or(true),
        })
    }
}

impl RawLimits {
    fn validate(self, cx: &Cx<'_>) -> Result<Limits, ConfigError> {
        let l = self;
        Ok(Limits {
            max_tcp_flows: int(
                cx,
                l.max_tcp_flows,
                "limits.max_tcp_flows",
                DEFAULT_MAX_TCP_FLOWS as i64,
                1,
                10_000_000,
            )? as usize,
            connect_timeout: Duration::from_millis(int(
                cx,
                l.connect_timeout_ms,
                "limits.connect_timeout_ms",
                DEFAULT_CONNECT_TIMEOUT_MS as i64,
                1,
                600_000,
            )? as u64),
            tcp_idle_timeout: Duration::from_secs(int(
                cx,
                l.tcp_idle_seconds,
                "limits.tcp_idle_seconds",
                DEFAULT_TCP_IDLE_SECONDS as i64,
                1,
                7 * 86400,
            )? as u64),
            udp_idle_timeout: Duration::from_secs(int(
                cx,
                l.udp_idle_seconds,
                "limits.udp_idle_seconds",
                DEFAULT_UDP_IDLE_SECONDS as i64,
                1,
                86400,
            )? as u64),
            max_udp_flows: int(
                cx,
                l.max_udp_flows,
                "limits.max_udp_flows",
                DEFAULT_MAX_UDP_FLOWS as i64,
                1,
                10_000_000,
            )? as usize,
            udp_queue: int(
                cx,
                l.udp_queue,
                "limits.udp_queue",
                DEFAULT_UDP_QUEUE as i64,
                1,
                65536,
            )? as usize,
            worker_threads: int(cx, l.worker_threads, "limits.worker_threads", 0, 0, 1024)?
                as usize,
            max_tcp_flows_per_source: int(
                cx,
                l.max_tcp_flows_per_source,
                "limits.max_tcp_flows_per_source",
                DEFAULT_MAX_TCP_FLOWS_PER_SOURCE as i64,
                0,
                10_000_000,
            )? as usize,
            max_udp_flows_per_source: int(
                cx,
                l.max_udp_flows_per_source,
                "limits.max_udp_flows_per_source",
                DEFAULT_MAX_UDP_FLOWS_PER_SOURCE as i64,
                0,
                10_000_000,
            )? as usize,
            new_flows_per_source_per_second: int(
                cx,
                l.new_flows_per_source_per_second,
                "limits.new_flows_per_source_per_second",
                DEFAULT_NEW_FLOWS_PER_SOURCE_PER_SECOND as i64,
                0,
                10_000_000,
            )? as u32,
            trusted_sources: cidrs(
                cx,
                l.trusted_sources.unwrap_or_default(),
                "limits.trusted_sources",
            )?,
            relay: match l.relay {
                None => RelayMode::Adaptive,
                Some(r) => match r.get_ref().as_str() {
                    "adaptive" => RelayMode::Adaptive,
                    "copy" => RelayMode::Copy,
                    "splice" => RelayMode::Splice,
                    other => {
                        return Err(cx.err(
                            r.span(),
                            "limits.relay",
                            format!("{other:?}: expected \"adaptive\", \"copy\" or \"splice\""),
                        ))
                    }
                },
            },
        })
    }
}

/// Every `[[route]]`, each validated, names unique.
fn validate_routes(
    cx: &Cx<'_>,
    raw: Vec<S<RawRoute>>,
    listener: &Listener,
) -> Result<Vec<Route>, ConfigError> {
    let mut routes = Vec::new();
    let mut names = HashSet::new();
    for (i, r) in raw.into_iter().enumerate() {
        let span = r.span();
        let name_span = r.get_ref().name.span();
        let route = r.into_inner().validate(cx, i, span, listener)?;
        if !names.insert(route.name.clone()) {
            return Err(cx.err(
                name_span,
                format!("route[{i}].name"),
                format!(
                    "duplicate route name {:?}: names label rules and metrics and must be unique",
                    route.name
                ),
            ));
        }
        routes.push(route);
    }
    Ok(routes)
}

impl RawKernel {
    fn validate(self, cx: &Cx<'_>) -> Result<KernelIds, ConfigError> {
        let max = u32::MAX as i64;
        let span_of = |s: &Option<S<i64>>| s.as_ref().map(|s| s.span()).unwrap_or(0..0);
        let spans = [
            span_of(&self.tproxy_mark),
            span_of(&self.own_mark),
            span_of(&self.handoff_mark),
        ];
        let mask_span = span_of(&self.mark_mask);
        let mask = int(
            cx,
            self.mark_mask,
            "kernel.mark_mask",
            DEFAULT_MARK_MASK as i64,
            1,
            max,
        )? as u32;
        let tproxy = int(
            cx,
            self.tproxy_mark,
            "kernel.tproxy_mark",
            DEFAULT_TPROXY_MARK as i64,
            1,
            max,
        )? as u32;
        let own = int(
            cx,
            self.own_mark,
            "kernel.own_mark",
            DEFAULT_OWN_MARK as i64,
            1,
            max,
        )? as u32;
        let handoff = int(
            cx,
            self.handoff_mark,
            "kernel.handoff_mark",
            DEFAULT_HANDOFF_MARK as i64,
            1,
            max,
        )? as u32;
        let named = [
            ("kernel.tproxy_mark", tproxy),
            ("kernel.own_mark", own),
            ("kernel.handoff_mark", handoff),
        ];
        for (i, (key, v)) in named.iter().enumerate() {
            if v & !mask != 0 {
                return Err(cx.err(
                    spans[i].clone(),
                    *key,
                    format!("{v:#x} has bits outside kernel.mark_mask {mask:#x}"),
                ));
            }
            for (j, (other, w)) in named.iter().enumerate().take(i) {
                if v == w {
                    // Point at whichever of the two the file sets (a default has no span).
                    let (at, k, o) = if spans[i].is_empty() {
                        (j, *other, *key)
                    } else {
                        (i, *key, *other)
                    };
                    return Err(cx.err(
                        spans[at].clone(),
                        k,
                        format!(
                            "{v:#x} overlaps {o}: etp's marks must differ under kernel.mark_mask"
                        ),
                    ));
                }
            }
        }
        if mask.count_ones() < 2 {
            return Err(cx.err(
                mask_span,
                "kernel.mark_mask",
                "needs at least 2 bits to hold three distinct marks",
            ));
        }
        let table_span = span_of(&self.route_table);
        let table = int(
            cx,
            self.route_table,
            "kernel.route_table",
            DEFAULT_ROUTE_TABLE as i64,
            1,
            max - 1,
        )? as u32;
        if matches!(table, 253..=255) {
            return Err(cx.err(
                table_span,
                "kernel.route_table",
                format!("{table} is reserved by the kernel (253 default, 254 main, 255 local)"),
            ));
        }
        let prio = int(
            cx,
            self.rule_priority,
            "kernel.rule_priority",
            DEFAULT_RULE_PRIORITY as i64,
            1,
            32765,
        )? as u32;
        Ok(KernelIds {
            mark_mask: FwMark(mask),
            tproxy_mark: FwMark(tproxy),
            own_mark: FwMark(own),
            handoff_mark: FwMark(handoff),
            route_table: TableId(table),
            rule_priority: prio,
        })
    }
}

impl RawRoute {
    fn validate(
        self,
        cx: &Cx<'_>,
        i: usize,
        span: Range<usize>,
        listener: &Listener,
    ) -> Result<Route, ConfigError> {
        let rcx = RouteCx { cx, i, span };
        let name_span = self.name.span();
        let name = route_name(&rcx, self.name)?;
        let protocols = route_protocols(&rcx, self.protocols)?;
        let destinations = route_destinations(&rcx, self.destinations, listener)?;
        let ports = route_ports(&rcx, self.ports)?;
        let sources = route_sources(&rcx, self.sources.unwrap_or_default(), listener)?;
        let forward_to = route_forward_to(&rcx, self.forward_to, listener)?;
        let action = route_action(&rcx, self.action, &protocols, forward_to)?;
        let preserve_source = route_preserve_source(&rcx, self.preserve_source, action)?;
        let route = Route {
            name,
            protocols,
            destinations,
            ports,
            sources,
            action,
            preserve_source,
        };
        check_comment_length(&rcx, &route, name_span)?;
        Ok(route)
    }
}

/// What every check of `route[i]` needs: the context, the index (for keys) and the table's
/// span (for a missing key).
struct RouteCx<'a, 'b> {
    cx: &'a Cx<'b>,
    i: usize,
    span: Range<usize>,
}

impl RouteCx<'_, '_> {
    fn key(&self, k: &str) -> String {
        format!("route[{}].{k}", self.i)
    }

    /// A required key that is absent: points at the route's table.
    fn missing(&self, k: &str, msg: &str) -> ConfigError {
        self.cx.err(self.span.clone(), self.key(k), msg)
    }

    fn err(&self, span: Range<usize>, k: &str, msg: impl Into<String>) -> ConfigError {
        self.cx.err(span, self.key(k), msg)
    }
}

/// `name`: letters, digits, '_' and '-', starting with a letter.
fn route_name(rcx: &RouteCx<'_, '_>, raw: S<String>) -> Result<String, ConfigError> {
    let name_span = raw.span();
    let name = raw.into_inner();
    if name.is_empty()
        || !name.starts_with(|c: char| c.is_ascii_alphabetic())
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(rcx.err(
            name_span,
            "name",
            format!("{name:?}: use letters, digits, '_' and '-', starting with a letter"),
        ));
    }
    Ok(name)
}

/// `protocols`: required, "tcp" and/or "udp", deduplicated and sorted.
fn route_protocols(
    rcx: &RouteCx<'_, '_>,
    raw: Option<S<Vec<S<String>>>>,
) -> Result<Vec<Proto>, ConfigError> {
    let Some(p) = raw else {
        return Err(rcx.missing("protocols", "missing: list \"tcp\", \"udp\" or both"));
    };
    let pspan = p.span();
    let mut out = Vec::new();
    for s in p.into_inner() {
        let sp = s.span();
        let proto = match s.into_inner().as_str() {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            other => {
                return Err(rcx.err(
                    sp,
                    "protocols",
                    format!("{other:?}: expected \"tcp\" or \"udp\""),
                ))
            }
        };
        if !out.contains(&proto) {
            out.push(proto);
        }
    }
    if out.is_empty() {
        return Err(rcx.err(pspan, "protocols", "empty: list \"tcp\", \"udp\" or both"));
    }
    out.sort();
    Ok(out)
}

/// `destinations`: required, at least one CIDR, and at least one IPv4 CIDR when the
/// listener has no IPv6 side.
fn route_destinations(
    rcx: &RouteCx<'_, '_>,
    raw: Option<S<Vec<S<String>>>>,
    listener: &Listener,
) -> Result<Vec<IpNetwork>, ConfigError> {
    let Some(d) = raw else {
        return Err(rcx.missing("destinations", "missing: a route needs at least one CIDR"));
    };
    let dspan = d.span();
    let v = cidrs(rcx.cx, d.into_inner(), &rcx.key("destinations"))?;
    if v.is_empty() {
        return Err(rcx.err(
            dspan,
            "destinations",
            "empty: a route needs at least one CIDR",
        ));
    }
    if !listener.ipv6 && v.iter().all(|n| n.is_ipv6()) {
        return Err(rcx.err(
            dspan,
            "destinations",
            "only IPv6 destinations, but listener.ipv6 = false: the route would never match",
        ));
    }
    Ok(v)
}

/// `sources`: optional. Without IPv6 rules (`listener.ipv6 = false`) the IPv6 sources are
/// dropped; with none left the route would silently select every source instead of the ones
/// listed, so a list of IPv6 sources only is refused.
fn route_sources(
    rcx: &RouteCx<'_, '_>,
    raw: Vec<S<String>>,
    listener: &Listener,
) -> Result<Vec<IpNetwork>, ConfigError> {
    let first = raw.first().map(|s| s.span());
    let v = cidrs(rcx.cx, raw, &rcx.key("sources"))?;
    if let Some(span) = first {
        if !listener.ipv6 && v.iter().all(|n| n.is_ipv6()) {
            return Err(rcx.err(
                span,
                "sources",
                "only IPv6 sources, but listener.ipv6 = false: the route would select every source",
            ));
        }
    }
    Ok(v)
}

/// `ports`: required, at least one port or range.
fn route_ports(
    rcx: &RouteCx<'_, '_>,
    raw: Option<S<Vec<S<RawPort>>>>,
) -> Result<Vec<PortRange>, ConfigError> {
    let Some(p) = raw else {
        return Err(rcx.missing("ports", "missing: a route needs at least one port or range"));
    };
    let pspan = p.span();
    let v = ports(rcx.cx, p.into_inner(), &rcx.key("ports"))?;
    if v.is_empty() {
        return Err(rcx.err(
            pspan,
            "ports",
            "empty: a route needs at least one port or range",
        ));
    }
    Ok(v)
}

/// `forward_to`: an IP:PORT with a port other than 0, not etp's own listener, kept with its span
/// for the action check.
fn route_forward_to(
    rcx: &RouteCx<'_, '_>,
    raw: Option<S<String>>,
    listener: &Listener,
) -> Result<Option<(SocketAddr, Range<usize>)>, ConfigError> {
    let Some(f) = raw else {
        return Ok(None);
    };
    let fspan = f.span();
    let text = f.into_inner();
    let addr: SocketAddr = text.parse().map_err(|_| {
        rcx.err(
            fspan.clone(),
            "forward_to",
            format!("{text:?}: expected IP:PORT, e.g. \"10.0.0.10:53\" or \"[fd00::a]:53\""),
        )
    })?;
    if addr.port() == 0 {
        return Err(rcx.err(fspan, "forward_to", "port 0 is not a destination"));
    }
    // A loopback or unspecified address on the listener port is etp's own listener: every
    // forwarded flow would come back to etp, again and again. (A node address on that port is
    // only known at run time: the data path refuses those flows.)
    let ip = addr.ip().to_canonical();
    if addr.port() == listener.port && (ip.is_loopback() || ip.is_unspecified()) {
        return Err(rcx.err(
            fspan,
            "forward_to",
            format!(
                "{addr} is etp's own listener (listener.port {}): every flow would loop back into etp",
                listener.port
            ),
        ));
    }
    Ok(Some((addr, fspan)))
}

/// `action`: "linkerd" (TCP only), "direct" or "forward" (with `forward_to`, which no other
/// action takes).
fn route_action(
    rcx: &RouteCx<'_, '_>,
    raw: S<String>,
    protocols: &[Proto],
    forward_to: Option<(SocketAddr, Range<usize>)>,
) -> Result<Action, ConfigError> {
    let aspan = raw.span();
    let action_name = raw.into_inner();
    let action = match action_name.as_str() {
        "linkerd" => {
            if protocols.contains(&Proto::Udp) {
                return Err(rcx.err(
                    aspan,
                    "action",
                    "\"linkerd\" takes TCP only (Linkerd proxies no UDP): remove \"udp\" from protocols, or use \"direct\" or \"forward\" in a separate UDP route",
                ));
            }
            Action::Linkerd
        }
        "direct" => Action::Direct,
        "forward" => match &forward_to {
            Some((addr, _)) => Action::Forward(*addr),
            None => return Err(rcx.err(aspan, "forward_to", "required with action = \"forward\"")),
        },
        other => {
            return Err(rcx.err(
                aspan,
                "action",
                format!("{other:?}: expected \"linkerd\", \"direct\" or \"forward\""),
            ))
        }
    };
    if let (Some((_, fspan)), false) = (&forward_to, matches!(action, Action::Forward(_))) {
        return Err(rcx.err(
            fspan.clone(),
            "forward_to",
            format!("only used with action = \"forward\", not {action_name:?}"),
        ));
    }
    Ok(action)
}

/// `preserve_source`: only with action = "direct".
fn route_preserve_source(
    rcx: &RouteCx<'_, '_>,
    raw: Option<S<bool>>,
    action: Action,
) -> Result<bool, ConfigError> {
    let Some(p) = raw else {
        return Ok(false);
    };
    let v = *p.get_ref();
    if v && action != Action::Direct {
        return Err(rcx.err(
            p.span(),
            "preserve_source",
            "only applies to action = \"direct\"",
        ));
    }
    Ok(v)
}

/// Every rule comment the planner writes for this route fits what nft stores.
fn check_comment_length(
    rcx: &RouteCx<'_, '_>,
    route: &Route,
    name_span: Range<usize>,
) -> Result<(), ConfigError> {
    for proto in &route.protocols {
        let c = route.longest_comment(*proto);
        if c.len() > COMMENT_MAX {
            return Err(rcx.err(
                name_span.clone(),
                "name",
                format!(
                    "too long: the rule comment {c:?} is {} bytes, nft comments hold {COMMENT_MAX}",
                    c.len()
                ),
            ));
        }
    }
    Ok(())
}

/// An integer key with a default and inclusive bounds.
fn int(
    cx: &Cx<'_>,
    v: Option<S<i64>>,
    key: &str,
    default: i64,
    min: i64,
    max: i64,
) -> Result<i64, ConfigError> {
    match v {
        None => Ok(default),
        Some(s) => {
            let n = *s.get_ref();
            if n < min || n > max {
                Err(cx.err(s.span(), key, format!("{n} is out of range {min}..={max}")))
            } else {
                Ok(n)
            }
        }
    }
}

fn cidrs(cx: &Cx<'_>, v: Vec<S<String>>, key: &str) -> Result<Vec<IpNetwork>, ConfigError> {
    v.into_iter()
        .map(|s| {
            let span = s.span();
            let text = s.into_inner();
            parse_cidr(&text).map_err(|msg| cx.err(span, key, format!("{text:?}: {msg}")))
        })
        .collect()
}

/// Parses `A.B.C.D/N`, `X::/N` or a bare address (a /32 or /128). Host bits must be zero.
pub fn parse_cidr(text: &str) -> Result<IpNetwork, String> {
    let net: IpNetwork = if text.contains('/') {
        text.parse().map_err(|e| format!("not a CIDR ({e})"))?
    } else {
        let ip: IpAddr = text
            .parse()
            .map_err(|_| "not an IP address or CIDR".to_string())?;
        IpNetwork::from(ip)
    };
    if net.network() != net.ip() {
        return Err(format!(
            "host bits are set; did you mean {}/{}?",
            net.network(),
            net.prefix()
        ));
    }
    Ok(net)
}

fn ports(cx: &Cx<'_>, v: Vec<S<RawPort>>, key: &str) -> Result<Vec<PortRange>, ConfigError> {
    v.into_iter()
        .map(|s| {
            let span = s.span();
            parse_port(s.get_ref()).map_err(|msg| cx.err(span, key, msg))
        })
        .collect()
}

fn parse_port(p: &RawPort) -> Result<PortRange, String> {
    let one = |n: i64| -> Result<u16, String> {
        if (1..=65535).contains(&n) {
            Ok(n as u16)
        } else {
            Err(format!("port {n} is out of range 1..=65535"))
        }
    };
    match p {
        RawPort::Num(n) => one(*n).map(|p| PortRange { first: p, last: p }),
        RawPort::Range(s) => {
            let (a, b) = s.split_once('-').unwrap_or((s, s));
            let parse = |t: &str| {
                t.trim()
                    .parse::<i64>()
                    .map_err(|_| format!("{s:?}: expected a port or a range \"FIRST-LAST\""))
            };
            let (first, last) = (one(parse(a)?)?, one(parse(b)?)?);
            if first > last {
                return Err(format!(
                    "{s:?}: reversed range (first {first} > last {last})"
                ));
            }
            Ok(PortRange { first, last })
        }
    }
}
