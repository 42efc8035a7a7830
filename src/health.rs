//! The Linkerd proxy's health, as etp sees it: a probe every second (a listening socket on the
//! outbound port where etp hands flows over, read over sock_diag, or an HTTP GET of
//! `[linkerd] ready_url`), turned
//! into a [`ProxyState`] with a little hysteresis. The daemon re-plans the `linkerd` routes on
//! every change (one nftables transaction, see `plan_handoff`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use socket2::{Domain, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::config::{Action, Config, HandoffMode, ReadyUrl};
use crate::plan_handoff::ProxyState;

/// Time between probes.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// One probe's deadline (connect, or the whole HTTP exchange).
const TIMEOUT: Duration = Duration::from_millis(900);
/// Failed probes in a row before the proxy counts as unavailable: one lost probe (a full
/// accept queue under load) does not switch the mesh off; two keep the switch within 3 s.
const FAILURES_TO_SWITCH: u32 = 2;

/// What to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// No `linkerd` route: nothing to check, always ready.
    None,
    /// A socket listens on the proxy's outbound address (sock_diag; no connection is made).
    Listening(SocketAddr),
    /// `GET` returning 200.
    Http(ReadyUrl),
}

impl std::fmt::Display for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Probe::None => f.write_str("none (no linkerd route)"),
            Probe::Listening(a) => write!(f, "tcp listener on {a}"),
            Probe::Http(u) => write!(f, "GET {u}"),
        }
    }
}

impl Probe {
    /// The check `cfg` asks for: the ready URL when set, else a connect to where etp hands
    /// flows over (the hand-off address in kernel mode, 127.0.0.1 in relay mode).
    pub fn of(cfg: &Config) -> Probe {
        if !cfg.routes.iter().any(|r| r.action == Action::Linkerd) {
            return Probe::None;
        }
        if let Some(u) = &cfg.linkerd.ready_url {
            return Probe::Http(u.clone());
        }
        let a = &cfg.linkerd.handoff_address;
        let ip: IpAddr = match (cfg.linkerd.handoff, a.v4, a.v6) {
            (HandoffMode::Kernel, Some(v4), _) => v4.into(),
            (HandoffMode::Kernel, None, Some(v6)) => v6.into(),
            _ => Ipv4Addr::LOCALHOST.into(),
        };
        Probe::Listening(SocketAddr::new(ip, cfg.linkerd.outbound_port))
    }

    /// One check; true when the proxy is ready. The probe's socket carries etp's own mark, so
    /// that no route of etp's ever intercepts it.
    pub async fn run(&self, own_mark: u32) -> bool {
        match self {
            Probe::None => true,
            Probe::Listening(a) => {
                let a = *a;
                tokio::task::spawn_blocking(move || crate::kernel::sockdiag::listening(a))
                    .await
                    .is_ok_and(|r| r.unwrap_or(false))
            }
            Probe::Http(u) => tokio::time::timeout(TIMEOUT, get(u, own_mark))
                .await
                .is_ok_and(|r| r.unwrap_or(false)),
        }
    }
}

async fn connect(a: SocketAddr, mark: u32) -> std::io::Result<TcpStream> {
    let s = Socket::new(Domain::for_address(a), Type::STREAM, None)?;
    s.set_mark(mark)?;
    s.set_nonblocking(true)?;
    let s = tokio::net::TcpSocket::from_std_stream(s.into());
    s.connect(a).await
}

async fn get(u: &ReadyUrl, mark: u32) -> std::io::Result<bool> {
    let mut s = connect(u.addr, mark).await?;
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nUser-Agent: etp\r\n\r\n",
        u.path, u.addr
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        let k = s.read(&mut buf[n..]).await?;
        if k == 0 {
            break;
        }
        n += k;
    }
    // "HTTP/1.1 200"
    Ok(buf[..n].starts_with(b"HTTP/1.") && buf[..n].get(9..12) == Some(b"200"))
}

/// Probes every [`INTERVAL`] with the probe `probe` holds now and publishes the state on
/// `state` when it changes. Runs until the daemon drops the receivers.
pub async fn watch(probe: watch::Receiver<Probe>, own_mark: u32, state: watch::Sender<ProxyState>) {
    let mut failures = 0u32;
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let p = probe.borrow().clone();
        let ok = p.run(own_mark).await;
        failures = if ok { 0 } else { failures + 1 };
        let next = next_state(*state.borrow(), ok, failures);
        if state.send_if_modified(|s| std::mem::replace(s, next) != next) {
            tracing::debug!(probe = %p, state = %next, "proxy health changed");
        }
        if state.is_closed() {
            return;
        }
    }
}

/// One success makes the proxy ready; [`FAILURES_TO_SWITCH`] failures in a row unavailable.
pub fn next_state(now: ProxyState, ok: bool, failures: u32) -> ProxyState {
    match (now, ok) {
        (_, true) => ProxyState::Ready,
        (ProxyState::Ready, false) if failures < FAILURES_TO_SWITCH => ProxyState::Ready,
        (_, false) => ProxyState::Unavailable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_failures_switch_off_one_success_back() {
        let s = next_state(ProxyState::Ready, false, 1);
        assert_eq!(s, ProxyState::Ready);
        let s = next_state(s, false, 2);
        assert_eq!(s, ProxyState::Unavailable);
        assert_eq!(next_state(s, false, 3), ProxyState::Unavailable);
        assert_eq!(next_state(s, true, 0), ProxyState::Ready);
    }

    #[test]
    fn probe_targets_follow_the_mode() {
        let base = r#"
[[route]]
name = "mesh"
protocols = ["tcp"]
destinations = ["10.96.0.0/12"]
ports = [80]
action = "linkerd"
"#;
        let relay = Config::parse(base, "t").unwrap();
        assert_eq!(
            Probe::of(&relay),
            Probe::Listening("127.0.0.1:4140".parse().unwrap())
        );
        let kernel =
            Config::parse(&format!("[linkerd]\nhandoff = \"kernel\"\n{base}"), "t").unwrap();
        assert_eq!(
            Probe::of(&kernel),
            Probe::Listening("169.254.15.1:4140".parse().unwrap())
        );
        let url = Config::parse(
            &format!("[linkerd]\nready_url = \"http://127.0.0.1:4191/ready\"\n{base}"),
            "t",
        )
        .unwrap();
        assert_eq!(url.linkerd.ready_url.as_ref().unwrap().path, "/ready");
        assert!(matches!(Probe::of(&url), Probe::Http(_)));
    }
}
