//! etp's hand-off interface over rtnetlink: a dummy link holding the hand-off addresses
//! (`[linkerd] handoff = "kernel"`), created, audited, repaired and removed like etp's routes.
//!
//! Why a dummy link: the kernel hand-off DNATs a client's connection to an address the proxy
//! listens on. The incoming interface may have no address at all (Calico's and Cilium's host
//! veths), so `redirect` (to the incoming interface's primary address) fails there, and DNAT to
//! 127.0.0.1 from outside needs `route_localnet`, which exposes every loopback listener of the
//! node (CVE-2020-8558). An address on a dummy link is local (the `local` table routes it to
//! this host) but no other listener binds it, the pattern NodeLocal DNSCache uses.
//! Ownership: the link is etp's by its name; nothing else is touched.

use std::fmt;
use std::io;
use std::net::IpAddr;

use futures::StreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags};
use netlink_packet_route::link::{LinkFlags, LinkMessage};
use rtnetlink::{Handle, LinkDummy, LinkIfb, LinkUnspec};
use tokio::task::JoinHandle;

use crate::model::HandoffLink;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("opening the rtnetlink socket for the hand-off interface")]
    Connect(#[source] io::Error),
    #[error("{step} hand-off interface {name}")]
    Step {
        step: &'static str,
        name: String,
        #[source]
        source: io::Error,
    },
}

/// A difference between the desired hand-off interface and the kernel's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkDrift {
    MissingLink(String),
    Down(String),
    MissingAddress(String, IpAddr),
    ExtraAddress(String, IpAddr),
    /// The link exists but etp no longer wants it.
    ExtraLink(String),
}

impl fmt::Display for LinkDrift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkDrift::MissingLink(n) => write!(f, "missing hand-off interface {n}"),
            LinkDrift::Down(n) => write!(f, "hand-off interface {n} is down"),
            LinkDrift::MissingAddress(n, a) => write!(f, "missing address {a} on {n}"),
            LinkDrift::ExtraAddress(n, a) => write!(f, "extra address {a} on {n}"),
            LinkDrift::ExtraLink(n) => write!(f, "extra hand-off interface {n}"),
        }
    }
}

/// The rtnetlink connection used for the hand-off interface.
pub struct Links {
    handle: Handle,
    connection: JoinHandle<()>,
}

impl Drop for Links {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

fn io_error(e: rtnetlink::Error) -> io::Error {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.to_io(),
        other => io::Error::other(other),
    }
}

/// What the kernel holds for one link name.
struct Observed {
    index: u32,
    up: bool,
    addrs: Vec<(IpAddr, netlink_packet_route::address::AddressMessage)>,
}

impl Links {
    pub fn connect() -> Result<Links, LinkError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(LinkError::Connect)?;
        Ok(Links {
            handle,
            connection: tokio::spawn(conn),
        })
    }

    fn err(step: &'static str, name: &str) -> impl FnOnce(rtnetlink::Error) -> LinkError {
        let name = name.to_string();
        move |e| LinkError::Step {
            step,
            name,
            source: io_error(e),
        }
    }

    async fn link(&self, name: &str) -> Result<Option<LinkMessage>, LinkError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.next().await {
            Some(Ok(l)) => Ok(Some(l)),
            Some(Err(rtnetlink::Error::NetlinkError(m)))
                if m.raw_code() == -libc::ENODEV || m.raw_code() == -libc::EINVAL =>
            {
                Ok(None)
            }
            Some(Err(e)) => Err(Self::err("looking up", name)(e)),
            None => Ok(None),
        }
    }

    async fn observe(&self, name: &str) -> Result<Option<Observed>, LinkError> {
        let Some(link) = self.link(name).await? else {
            return Ok(None);
        };
        let index = link.header.index;
        let up = link.header.flags.contains(LinkFlags::Up);
        let mut addrs = Vec::new();
        let mut dump = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        while let Some(msg) = dump.next().await {
            let msg = msg.map_err(Self::err("dumping the addresses of", name))?;
            if msg.header.index != index {
                continue;
            }
            let addr = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            if let Some(ip) = addr {
                // IPv6 link-local addresses the kernel adds itself are not drift.
                let kernel_ll = matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80);
                if !kernel_ll {
                    addrs.push((ip, msg));
                }
            }
        }
        Ok(Some(Observed { index, up, addrs }))
    }

    /// Differences between `want` and the kernel (`name` is the link etp owns).
    pub async fn audit(
        &self,
        name: &str,
        want: Option<&HandoffLink>,
    ) -> Result<Vec<LinkDrift>, LinkError> {
        let seen = self.observe(name).await?;
        let mut drift = Vec::new();
        match (want, seen) {
            (None, None) => {}
            (None, Some(_)) => drift.push(LinkDrift::ExtraLink(name.to_string())),
            (Some(w), None) => drift.push(LinkDrift::MissingLink(w.name.clone())),
            (Some(w), Some(o)) => {
                if !o.up {
                    drift.push(LinkDrift::Down(w.name.clone()));
                }
                for a in &w.addrs {
                    if !o.addrs.iter().any(|(b, _)| b == a) {
                        drift.push(LinkDrift::MissingAddress(w.name.clone(), *a));
                    }
                }
                for (b, _) in &o.addrs {
                    if !w.addrs.contains(b) {
                        drift.push(LinkDrift::ExtraAddress(w.name.clone(), *b));
                    }
                }
            }
        }
        Ok(drift)
    }

    /// Makes the kernel hold exactly `want` (or no link `name` when `None`); returns what changed.
    pub async fn reconcile(
        &self,
        name: &str,
        want: Option<&HandoffLink>,
    ) -> Result<Vec<LinkDrift>, LinkError> {
        let drift = self.audit(name, want).await?;
        if drift.is_empty() {
            return Ok(drift);
        }
        let Some(w) = want else {
            self.remove(name).await?;
            return Ok(drift);
        };
        if drift.contains(&LinkDrift::MissingLink(w.name.clone())) {
            let dummy = self
                .handle
                .link()
                .add(LinkDummy::new(&w.name).up().build())
                .execute()
                .await;
            match dummy {
                Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code() == -libc::EOPNOTSUPP => {
                    // A kernel without CONFIG_DUMMY (this machine's 6.18 build): an ifb device
                    // holds addresses just as well and carries no traffic of its own.
                    tracing::info!(name = %w.name, "no dummy interfaces in this kernel; using an ifb device");
                    self.handle
                        .link()
                        .add(LinkIfb::new(&w.name).up().build())
                        .execute()
                        .await
                        .map_err(Self::err("creating", &w.name))?;
                }
                other => other.map_err(Self::err("creating", &w.name))?,
            }
        }
        let o = self
            .observe(&w.name)
            .await?
            .ok_or_else(|| LinkError::Step {
                step: "finding the new",
                name: w.name.clone(),
                source: io::Error::from_raw_os_error(libc::ENODEV),
            })?;
        if !o.up {
            self.handle
                .link()
                .set(LinkUnspec::new_with_index(o.index).up().build())
                .execute()
                .await
                .map_err(Self::err("bringing up", &w.name))?;
        }
        for a in &w.addrs {
            if o.addrs.iter().any(|(b, _)| b == a) {
                continue;
            }
            let prefix = if a.is_ipv4() { 32 } else { 128 };
            let mut req = self.handle.address().add(o.index, *a, prefix);
            if a.is_ipv6() {
                // No duplicate address detection: a tentative address cannot be bound or
                // reached for a second or more, and nothing else can own it on a dummy link.
                let m = req.message_mut();
                m.header.flags |= AddressHeaderFlags::Nodad;
                m.attributes
                    .push(AddressAttribute::Flags(AddressFlags::Nodad));
            }
            req.execute()
                .await
                .map_err(Self::err("adding an address to", &w.name))?;
        }
        for (b, msg) in o.addrs {
            if !w.addrs.contains(&b) {
                self.handle
                    .address()
                    .del(msg)
                    .execute()
                    .await
                    .map_err(Self::err("removing an address from", &w.name))?;
            }
        }
        Ok(drift)
    }

    /// Deletes link `name` (and with it its addresses); false when there was none.
    pub async fn remove(&self, name: &str) -> Result<bool, LinkError> {
        let Some(link) = self.link(name).await? else {
            return Ok(false);
        };
        self.handle
            .link()
            .del(link.header.index)
            .execute()
            .await
            .map_err(Self::err("deleting", name))?;
        Ok(true)
    }
}
