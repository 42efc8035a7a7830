//! The kernel side as one unit: etp's nftables table plus its ip rules and local routes.
//!
//! Order matters and lives here: policy routing goes in before the table (a tproxy-marked
//! packet without its ip rule would be forwarded rather than delivered locally), and comes out
//! after it. No decisions about *what* to install are made here: that is `plan`.
//!
//! The only place that opens netlink sockets; it imports `model` only.
//! - `netlink`: generic framing, acks, interrupted dumps, the socket (kernel-only reads)
//! - `nft`: etp's nftables table (encode, current state, apply, audit, notifications)
//! - `route`: ip rules and local routes over rtnetlink (messages, apply, notifications)
//! - `conntrack`: a UDP flow's pre-DNAT destination; `sockdiag`: TIME-WAIT cleanup

pub(crate) mod conntrack;
pub(crate) mod ct_events;
#[cfg(test)]
pub(crate) mod fuzz_gen;
#[cfg(test)]
mod fuzz_tests;
pub mod link;
mod netlink;
pub mod nft;
pub mod route;
pub(crate) mod sockdiag;

use std::fmt;

use crate::model::{Desired, TableId, ROUTE_PROTOCOL, TABLE};
use crate::plan_handoff::HANDOFF_LINK;
use nft::Nft;
use route::{RouteChanges, RouteDrift, RouteError, RouteMonitor, Routing};

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("nftables")]
    Nft(#[from] nft::NftError),
    #[error("policy routing")]
    Route(#[from] RouteError),
    #[error("destroying TIME-WAIT sockets over sock_diag")]
    SockDiag(#[source] std::io::Error),
    #[error("subscribing to nftables notifications")]
    NftMonitor(#[source] std::io::Error),
    #[error("subscribing to routing notifications")]
    RouteMonitor(#[source] RouteError),
    #[error("hand-off interface")]
    Link(#[from] link::LinkError),
}

/// The result of one apply.
#[derive(Debug, Clone)]
pub struct Applied {
    /// The nftables generation id after etp's commit.
    pub generation: u32,
    pub routes: RouteChanges,
    pub messages: usize,
    pub bytes: usize,
}

/// One difference between the kernel and the desired state.
#[derive(Debug)]
pub enum Drift {
    Nft(nft::TableDrift),
    Route(RouteDrift),
    Link(link::LinkDrift),
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Drift::Nft(d) => write!(f, "{d}"),
            Drift::Route(d) => write!(f, "{d}"),
            Drift::Link(d) => write!(f, "{d}"),
        }
    }
}

/// What `cleanup` removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Removed {
    pub table: bool,
    pub routing_entries: usize,
    /// The hand-off interface was there and is gone.
    pub handoff_link: bool,
}

/// Owner of etp's two netlink sockets (nftables and rtnetlink).
pub struct Kernel {
    nft: Nft,
    routing: Routing,
    links: link::Links,
}

/// Runs a short blocking netlink exchange without stalling the other tasks of a multi-threaded
/// runtime (the nftables socket is synchronous).
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

impl Kernel {
    /// Opens both sockets in the current network namespace.
    pub async fn connect() -> Result<Kernel, KernelError> {
        Ok(Kernel {
            nft: Nft::open()?,
            routing: Routing::connect().await?,
            links: link::Links::connect()?,
        })
    }

    /// The nftables generation id (moves on every commit, system-wide).
    pub fn generation(&mut self) -> Result<u32, KernelError> {
        Ok(blocking(|| self.nft.generation())?)
    }

    /// Installs `desired`: routing first, then the table in one transaction. When
    /// `expect_generation` is given the batch only commits if nobody changed nftables since.
    pub async fn apply(
        &mut self,
        desired: &Desired,
        expect_generation: Option<u32>,
    ) -> Result<Applied, KernelError> {
        let routes = self
            .routing
            .reconcile(&desired.ip_rules, &desired.routes)
            .await?;
        // The hand-off address exists before any rule DNATs to it.
        self.links
            .reconcile(HANDOFF_LINK, desired.handoff_link.as_ref())
            .await?;
        let report = blocking(|| self.nft.apply(&desired.table, expect_generation))?;
        Ok(Applied {
            generation: report.generation,
            routes,
            messages: report.messages,
            bytes: report.bytes,
        })
    }

    /// Creates (or repairs) only the hand-off interface: the daemon's first health probe
    /// connects to the hand-off address, which must exist by then.
    pub async fn apply_link(&mut self, desired: &Desired) -> Result<(), KernelError> {
        self.links
            .reconcile(HANDOFF_LINK, desired.handoff_link.as_ref())
            .await?;
        Ok(())
    }

    /// Installs only the table (the drain table on shutdown keeps the routing as it is).
    pub fn apply_table(&mut self, desired: &Desired) -> Result<u32, KernelError> {
        Ok(blocking(|| self.nft.apply(&desired.table, None))?.generation)
    }

    /// Differences between the kernel and `desired`; empty when in sync.
    pub async fn audit(&mut self, desired: &Desired) -> Result<Vec<Drift>, KernelError> {
        let mut out: Vec<Drift> = blocking(|| self.nft.audit(&desired.table))?
            .into_iter()
            .map(Drift::Nft)
            .collect();
        out.extend(
            self.routing
                .audit(&desired.ip_rules, &desired.routes)
                .await?
                .into_iter()
                .map(Drift::Route),
        );
        out.extend(self.audit_link(desired).await?);
        Ok(out)
    }

    async fn audit_link(&mut self, desired: &Desired) -> Result<Vec<Drift>, KernelError> {
        Ok(self
            .links
            .audit(HANDOFF_LINK, desired.handoff_link.as_ref())
            .await?
            .into_iter()
            .map(Drift::Link)
            .collect())
    }

    /// Only the routing part of the audit (cheap: two small dumps).
    pub async fn audit_routing(&mut self, desired: &Desired) -> Result<Vec<Drift>, KernelError> {
        let mut out: Vec<Drift> = self
            .routing
            .audit(&desired.ip_rules, &desired.routes)
            .await?
            .into_iter()
            .map(Drift::Route)
            .collect();
        out.extend(self.audit_link(desired).await?);
        Ok(out)
    }

    /// Every rule of etp's table as (comment, packets its counter counted).
    pub fn rule_packets(&mut self) -> Result<Vec<(String, u64)>, KernelError> {
        let rules = blocking(|| self.nft.have_rules(TABLE))?;
        Ok(rules
            .into_iter()
            .filter_map(|r| Some((r.comment?, r.packets)))
            .collect())
    }

    /// Destroys the TIME-WAIT TCP sockets `ours` selects (see `sockdiag`); returns how many.
    pub fn forget_time_wait(
        &mut self,
        ours: impl Fn(&sockdiag::TimeWait) -> bool,
    ) -> Result<usize, KernelError> {
        blocking(|| sockdiag::destroy_time_wait(ours)).map_err(KernelError::SockDiag)
    }

    /// Removes etp's table, then every rule and route tagged with etp's protocol number.
    pub async fn cleanup(&mut self) -> Result<Removed, KernelError> {
        let table = blocking(|| self.nft.delete_table(TABLE))?;
        let routing_entries = self.routing.cleanup(ROUTE_PROTOCOL).await?;
        let handoff_link = self.links.remove(HANDOFF_LINK).await?;
        Ok(Removed {
            table,
            routing_entries,
            handoff_link,
        })
    }
}

/// What a change notification was about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// etp's nftables table (or notifications were lost).
    Nft,
    /// One of etp's ip rules or a route in its table.
    Routing,
    /// A subscription failed and was dropped; drift repair for that half waits for the
    /// resync tick from now on.
    Lost { what: &'static str, error: String },
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Nft => f.write_str("nftables table inet etp"),
            Change::Routing => f.write_str("etp's ip rules or routes"),
            Change::Lost { what, error } => write!(f, "{what} notifications lost: {error}"),
        }
    }
}

/// Change notifications for etp's kernel state, so that drift is repaired when it happens
/// rather than at the next resync tick. Its sockets only listen; they are separate from the
/// ones that change the kernel. Either half may be absent (its subscription was refused).
pub struct Monitor {
    nft: Option<nft::NftMonitor>,
    routes: Option<RouteMonitor>,
}

impl Monitor {
    /// Subscribes in the calling thread's network namespace. Returns the monitor and what could
    /// not be subscribed to (for the caller to log).
    pub fn open(route_table: TableId) -> (Monitor, Vec<KernelError>) {
        let mut failed = Vec::new();
        let nft = nft::NftMonitor::open(libc::NFPROTO_INET as u8, TABLE)
            .map_err(|e| failed.push(KernelError::NftMonitor(e)))
            .ok();
        let routes = RouteMonitor::open(route_table.0, ROUTE_PROTOCOL)
            .map_err(|e| failed.push(KernelError::RouteMonitor(e)))
            .ok();
        (Monitor { nft, routes }, failed)
    }

    /// A monitor that reports nothing (`[daemon] watch_kernel = false`).
    pub fn none() -> Monitor {
        Monitor {
            nft: None,
            routes: None,
        }
    }

    /// Follows a reload that moved etp's route table.
    pub fn set_route_table(&mut self, table: TableId) {
        if let Some(r) = self.routes.as_mut() {
            r.set_table(table.0);
        }
    }

    /// Waits for the next change to etp's state. Never resolves when both halves are gone.
    pub async fn changed(&mut self) -> Change {
        let nft = async {
            match self.nft.as_mut() {
                Some(m) => m.changed().await.map_err(|e| e.to_string()),
                None => std::future::pending().await,
            }
        };
        let routes = async {
            match self.routes.as_mut() {
                Some(m) => m.changed().await,
                None => std::future::pending().await,
            }
        };
        let change = tokio::select! {
            r = nft => match r {
                Ok(()) => Change::Nft,
                Err(error) => Change::Lost { what: "nftables", error },
            },
            r = routes => match r {
                Some(()) => Change::Routing,
                None => Change::Lost { what: "routing", error: "connection closed".into() },
            },
        };
        match &change {
            Change::Lost {
                what: "nftables", ..
            } => self.nft = None,
            Change::Lost { .. } => self.routes = None,
            _ => {}
        }
        change
    }
}
