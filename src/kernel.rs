//! The kernel side as one unit: etp's nftables table plus its ip rules and local routes.
//!
//! Order matters and lives here: policy routing goes in before the table (a tproxy-marked
//! packet without its ip rule would be forwarded rather than delivered locally), and comes out
//! after it. No decisions about *what* to install are made here: that is `plan`.

use std::fmt;

use crate::config::ROUTE_PROTOCOL;
use crate::model::Desired;
use crate::nft::{self, Nft};
use crate::plan::TABLE;
use crate::route::{RouteChanges, RouteDrift, RouteError, Routing};

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("nftables")]
    Nft(#[from] nft::NftError),
    #[error("policy routing")]
    Route(#[from] RouteError),
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
    Nft(nft::Drift),
    Route(RouteDrift),
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Drift::Nft(d) => write!(f, "{d}"),
            Drift::Route(d) => write!(f, "{d}"),
        }
    }
}

/// What `cleanup` removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Removed {
    pub table: bool,
    pub routing_entries: usize,
}

/// Owner of etp's two netlink sockets (nftables and rtnetlink).
pub struct Kernel {
    nft: Nft,
    routing: Routing,
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
        let report = blocking(|| self.nft.apply(&desired.table, expect_generation))?;
        Ok(Applied {
            generation: report.generation,
            routes,
            messages: report.messages,
            bytes: report.bytes,
        })
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
        Ok(out)
    }

    /// Only the routing part of the audit (cheap: two small dumps).
    pub async fn audit_routing(&mut self, desired: &Desired) -> Result<Vec<Drift>, KernelError> {
        Ok(self
            .routing
            .audit(&desired.ip_rules, &desired.routes)
            .await?
            .into_iter()
            .map(Drift::Route)
            .collect())
    }

    /// Removes etp's table, then every rule and route tagged with etp's protocol number.
    pub async fn cleanup(&mut self) -> Result<Removed, KernelError> {
        let table = blocking(|| self.nft.delete_table(TABLE))?;
        let routing_entries = self.routing.cleanup(ROUTE_PROTOCOL).await?;
        Ok(Removed {
            table,
            routing_entries,
        })
    }
}
