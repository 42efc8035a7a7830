//! TOML -> validated [`Config`].
//!
//! Every value is checked here, before anything touches the kernel. Errors name the file, the
//! line and the key, and say what is wrong (`etp.toml:14: route[0].ports: ...`).

use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnetwork::IpNetwork;

use crate::model::{FwMark, PortRange, Proto, RelayMode, TableId};

/// Where etp looks for its config when `-c` is not given.
pub const DEFAULT_PATH: &str = "/etc/etp/etp.toml";
/// The embedded default config (the demo runs on it).
pub const EMBEDDED_DEFAULT: &str = include_str!("../../deploy/etp.default.toml");

pub const DEFAULT_PORT: u16 = 15001;
pub const DEFAULT_OUTBOUND_PORT: u16 = 4140;
pub const DEFAULT_PROXY_UID: u32 = 2102;
pub const DEFAULT_ADMIN: &str = "127.0.0.1:15002";
/// Marks live in bits 12-13, clear of kube-proxy (0x4000, 0x8000), Calico (0xffff0000),
/// Cilium (0x0f00) and Istio (0x111, 0x539).
pub const DEFAULT_MARK_MASK: u32 = 0x3000;
pub const DEFAULT_TPROXY_MARK: u32 = 0x1000;
pub const DEFAULT_OWN_MARK: u32 = 0x2000;
pub const DEFAULT_HANDOFF_MARK: u32 = 0x3000;
/// Outside Calico's default route table range (1-250) and the kernel's reserved ids.
pub const DEFAULT_ROUTE_TABLE: u32 = 15001;
/// Before the `main` table's rule (32766).
pub const DEFAULT_RULE_PRIORITY: u32 = 30100;
pub const DEFAULT_DRAIN_SECONDS: u64 = 20;
pub const DEFAULT_RESYNC_SECONDS: u64 = 30;
pub const DEFAULT_PID_FILE: &str = "/run/etp/etp.pid";
pub const DEFAULT_MAX_TCP_FLOWS: usize = 65536;
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 5000;
pub const DEFAULT_TCP_IDLE_SECONDS: u64 = 3600;
pub const DEFAULT_UDP_IDLE_SECONDS: u64 = 30;
pub const DEFAULT_MAX_UDP_FLOWS: usize = 16384;
pub const DEFAULT_UDP_QUEUE: usize = 128;
/// Concurrent TCP flows one source (an IPv4 address or an IPv6 /64) may hold: one eighth of
/// `DEFAULT_MAX_TCP_FLOWS`, so that at least eight sources are needed to fill etp, and far above
/// what one pod's connection pools hold on a busy node (hundreds).
pub const DEFAULT_MAX_TCP_FLOWS_PER_SOURCE: usize = 8192;
/// Concurrent UDP flows one source may hold: one eighth of `DEFAULT_MAX_UDP_FLOWS`.
pub const DEFAULT_MAX_UDP_FLOWS_PER_SOURCE: usize = 2048;
/// New intercepted flows (TCP connections and UDP flows) one source may open per second, with a
/// burst of the same size: a resolver that opens a new source port per query at 2,000 queries/s
/// stays under it; a flood or a scanner does not.
pub const DEFAULT_NEW_FLOWS_PER_SOURCE_PER_SECOND: u32 = 2000;

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where it came from (a path or `<embedded default>`), for messages.
    pub source: String,
    pub listener: Listener,
    pub linkerd: Linkerd,
    pub admin: Admin,
    pub bypass: Bypass,
    pub kernel: KernelIds,
    pub daemon: DaemonOptions,
    pub limits: Limits,
    pub routes: Vec<Route>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Listener {
    pub port: u16,
    pub ipv6: bool,
    pub local: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Linkerd {
    pub outbound_port: u16,
    pub proxy_uid: u32,
    /// How TCP flows of `linkerd` routes reach the proxy (`[linkerd] handoff`).
    pub handoff: HandoffMode,
    /// The hand-off addresses on etp's dummy interface (`[linkerd] handoff_address`); the
    /// kernel hand-off DNATs to them, the proxy's outbound listener binds them too.
    pub handoff_address: HandoffAddress,
    /// What `linkerd` routes do while the proxy is not ready (`[linkerd] when_unavailable`).
    pub when_unavailable: WhenUnavailable,
    /// The proxy's readiness URL (`[linkerd] ready_url`); without it etp's health check is a
    /// TCP connect to the outbound port.
    pub ready_url: Option<ReadyUrl>,
}

pub use handoff::{HandoffAddress, HandoffMode, ReadyUrl, WhenUnavailable};

#[derive(Debug, Clone, PartialEq)]
pub struct Admin {
    pub address: SocketAddr,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Bypass {
    pub destinations: Vec<IpNetwork>,
    pub ports: Vec<PortRange>,
}

/// `[kernel]`: the marks, route table and rule priority etp claims in the kernel.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelIds {
    pub mark_mask: FwMark,
    pub tproxy_mark: FwMark,
    pub own_mark: FwMark,
    pub handoff_mark: FwMark,
    pub route_table: TableId,
    pub rule_priority: u32,
}

/// `[daemon]`: drain, resync, pid file, fail-closed and change notifications.
#[derive(Debug, Clone, PartialEq)]
pub struct DaemonOptions {
    pub drain_timeout: Duration,
    pub resync_interval: Duration,
    pub pid_file: PathBuf,
    /// Keep the ruleset in place on shutdown so that intercepted traffic is refused while etp is
    /// down (fail-closed); the default removes it so traffic flows directly (fail-open).
    pub fail_closed: bool,
    /// Repair drift as soon as netlink notifications report a change to etp's table, rules or
    /// routes, not only at the resync tick. Read at start.
    pub watch_kernel: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub max_tcp_flows: usize,
    pub connect_timeout: Duration,
    pub tcp_idle_timeout: Duration,
    pub udp_idle_timeout: Duration,
    pub max_udp_flows: usize,
    pub udp_queue: usize,
    /// How TCP bytes are moved (`limits.relay`).
    pub relay: RelayMode,
    /// Threads of the data path's runtime (`limits.worker_threads`); 0 picks
    /// [`Limits::worker_threads_auto`]. Read at start only.
    pub worker_threads: usize,
    /// Concurrent TCP flows per source address (IPv6: per /64); 0 = no per-source limit.
    pub max_tcp_flows_per_source: usize,
    /// Concurrent UDP flows per source address (IPv6: per /64); 0 = no per-source limit.
    pub max_udp_flows_per_source: usize,
    /// New flows per second per source address (IPv6: per /64), burst of the same size;
    /// 0 = no rate limit.
    pub new_flows_per_source_per_second: u32,
    /// Sources exempt from the per-source limits (e.g. the node's own addresses).
    pub trusted_sources: Vec<IpNetwork>,
}

impl Limits {
    /// The number of runtime threads etp starts with: `worker_threads`, or with 0 half the
    /// CPUs this process may use (cgroup quota and affinity included), at least one. etp
    /// shares the node with the workloads and the Linkerd proxy whose traffic it relays; on
    /// the 2-CPU benchmark machine one thread gave a lower p99 and a higher rate than two
    /// (BENCHMARKS.md).
    pub fn worker_threads_auto(&self, available: usize) -> usize {
        match self.worker_threads {
            0 => (available / 2).max(1),
            n => n,
        }
    }
}

/// What happens to a flow a route selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Hand the TCP flow to the Linkerd proxy's outbound listener, original destination intact.
    Linkerd,
    /// Connect to the original destination.
    Direct,
    /// Connect to a fixed address.
    Forward(SocketAddr),
}

impl Action {
    /// The metrics label: "linkerd", "direct" or "forward".
    pub fn label(&self) -> &'static str {
        match self {
            Action::Linkerd => "linkerd",
            Action::Direct => "direct",
            Action::Forward(_) => "forward",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Linkerd => f.write_str("linkerd"),
            Action::Direct => f.write_str("direct"),
            Action::Forward(a) => write!(f, "forward {a}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub name: String,
    pub protocols: Vec<Proto>,
    pub destinations: Vec<IpNetwork>,
    pub ports: Vec<PortRange>,
    pub sources: Vec<IpNetwork>,
    pub action: Action,
    /// `direct` only: connect upstream from the client's own address (transparent bind).
    pub preserve_source: bool,
}

/// Suffixes the planner appends to [`Route::comment`] on a route's other rules.
pub const COMMENT_FAIL_CLOSED: &str = " (fail-closed)";
pub const COMMENT_LOCAL: &str = " (local)";
pub const COMMENT_DRAIN: &str = " (drain)";
/// A `linkerd` route's rules while the proxy is not ready (`[linkerd] when_unavailable`).
pub const COMMENT_REFUSE: &str = " (refuse)";
pub const COMMENT_DIRECT: &str = " (direct)";

impl Route {
    /// The comment on this route's rules; `nft list ruleset` shows it.
    pub fn comment(&self, proto: Proto) -> String {
        format!("etp route {}: {} -> {}", self.name, proto, self.action)
    }

    /// The route name in a comment [`Route::comment`] wrote for `proto` (suffixes after the
    /// action included), or `None` for etp's fixed rules.
    pub fn name_in_comment(comment: &str, proto: Proto) -> Option<&str> {
        comment
            .strip_prefix("etp route ")?
            .rsplit_once(&format!(": {proto} -> "))
            .map(|(name, _)| name)
    }

    /// One line for `etp check` and `etp status`:
    /// `NAME: tcp+udp -> ACTION (N destinations, M port ranges[, K sources])`.
    pub fn summary(&self) -> String {
        let protos: Vec<String> = self.protocols.iter().map(|p| p.to_string()).collect();
        let sources = if self.sources.is_empty() {
            String::new()
        } else {
            format!(", {} sources", self.sources.len())
        };
        format!(
            "{}: {} -> {} ({} destinations, {} port ranges{sources})",
            self.name,
            protos.join("+"),
            self.action,
            self.destinations.len(),
            self.ports.len()
        )
    }

    /// The longest comment the planner writes for this route: a local rule while the proxy is
    /// not ready (`" (local) (drain)"` and `" (fail-closed)"` are shorter). Validation keeps it
    /// within what nft stores.
    pub fn longest_comment(&self, proto: Proto) -> String {
        format!("{}{COMMENT_LOCAL}{COMMENT_REFUSE}", self.comment(proto))
    }
}

/// A config that cannot be used; `Display` gives `FILE:LINE: KEY: PROBLEM`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}:{line}: {key}: {msg}")]
    Invalid {
        file: String,
        line: usize,
        key: String,
        msg: String,
    },
}

impl Config {
    /// Loads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// The embedded default config.
    pub fn embedded() -> Config {
        Config::parse(EMBEDDED_DEFAULT, "<embedded default>")
            .expect("the embedded default config is valid (unit-tested)")
    }

    /// Parses and validates `text`; `source` names it in errors.
    pub fn parse(text: &str, source: &str) -> Result<Config, ConfigError> {
        let cx = Cx { text, file: source };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| cx.line(s.start)).unwrap_or(0);
            let msg = e.message().trim().to_string();
            ConfigError::Invalid {
                file: source.to_string(),
                line,
                key: key_from_message(&msg),
                msg,
            }
        })?;
        raw.validate(&cx)
    }
}

/// Where the config comes from, and the command-line values that override the file.
#[derive(Debug, Clone)]
pub struct Source {
    /// `None`: the embedded default.
    pub path: Option<PathBuf>,
    pub port: Option<u16>,
}

impl Source {
    /// Loads, validates and applies overrides (a flag overrides the file).
    pub fn load(&self) -> Result<Config, ConfigError> {
        let mut cfg = match &self.path {
            Some(p) => Config::load(p)?,
            None => Config::embedded(),
        };
        if let Some(port) = self.port {
            cfg.listener.port = port;
        }
        Ok(cfg)
    }
}

/// serde's messages for unknown keys name the key; everything else is "toml".
fn key_from_message(msg: &str) -> String {
    msg.split('`')
        .nth(1)
        .filter(|_| msg.starts_with("unknown field"))
        .unwrap_or("toml")
        .to_string()
}

struct Cx<'a> {
    text: &'a str,
    file: &'a str,
}

impl Cx<'_> {
    fn line(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())]
            .bytes()
            .filter(|&b| b == b'\n')
            .count()
            + 1
    }

    fn err(
        &self,
        span: Range<usize>,
        key: impl Into<String>,
        msg: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_string(),
            line: self.line(span.start),
            key: key.into(),
            msg: msg.into(),
        }
    }
}

mod handoff;
mod validate;

pub use validate::parse_cidr;
use validate::RawConfig;

#[cfg(test)]
mod fuzz_tests;
#[cfg(test)]
mod tests;
