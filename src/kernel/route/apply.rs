//! The edge: one rtnetlink socket that dumps, adds and deletes etp's rules and routes.
//!
//! A netlink socket belongs to the network namespace of the thread that creates it, so
//! [`Routing::connect`] acts on the namespace it is called in. Every change is preceded by a
//! dump: the kernel refuses duplicate rules only with EEXIST and ignores NLM_F_REPLACE for
//! rules, so reconciling means comparing first and then adding exactly what is missing.

use std::io;

use futures::StreamExt;
use netlink_packet_route::route::RouteMessage;
use netlink_packet_route::rule::RuleMessage;
use netlink_packet_route::RouteNetlinkMessage;
use rtnetlink::packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST,
};
use rtnetlink::Handle;
use tokio::task::JoinHandle;
use tracing::{debug, info};

use super::message::{
    diff, route_dump_request, route_message, rule_message, Entry, RouteView, RuleView, LOOPBACK,
};
use super::{RouteChanges, RouteDrift, RouteError};
use crate::kernel::netlink::NLM_F_DUMP_INTR;
use crate::model::ROUTE_PROTOCOL;
use crate::model::{Family, IpRule, LocalRoute};

/// How often an interrupted dump is run again before the error is reported.
const DUMP_ATTEMPTS: usize = 3;

/// A dumped entry, kept whole: deleting echoes the kernel's own message back (what `ip rule
/// flush` and `ip route flush` do), so the delete matches exactly the entry that was seen.
#[derive(Debug, Clone)]
enum Dumped {
    Rule(RuleMessage),
    Route(RouteMessage),
}

impl Dumped {
    fn into_message(self) -> RouteNetlinkMessage {
        match self {
            Dumped::Rule(m) => RouteNetlinkMessage::DelRule(m),
            Dumped::Route(m) => RouteNetlinkMessage::DelRoute(m),
        }
    }
}

/// Owner of the rtnetlink connection used for policy routing.
#[derive(Debug)]
pub struct Routing {
    handle: Handle,
    lo_index: u32,
    connection: JoinHandle<()>,
}

impl Drop for Routing {
    fn drop(&mut self) {
        // The connection task would otherwise live until every handle clone is gone.
        self.connection.abort();
    }
}

impl Routing {
    /// Opens an rtnetlink socket in the calling thread's network namespace, spawns its
    /// connection task on the current tokio runtime and looks up `lo`'s ifindex.
    pub async fn connect() -> Result<Routing, RouteError> {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|source| RouteError::Connect { source })?;
        let connection = tokio::spawn(conn);
        let mut routing = Routing {
            lo_index: 0,
            handle,
            connection,
        };
        routing.lo_index = routing.loopback_index().await?;
        debug!(lo_index = routing.lo_index, "rtnetlink connected");
        Ok(routing)
    }

    async fn loopback_index(&self) -> Result<u32, RouteError> {
        let err = |source| RouteError::Loopback {
            name: LOOPBACK,
            source,
        };
        let mut links = self.handle.link().get().match_name(LOOPBACK).execute();
        match links.next().await {
            Some(Ok(link)) => Ok(link.header.index),
            Some(Err(e)) => Err(err(io_error(e))),
            None => Err(err(io::Error::from_raw_os_error(libc::ENODEV))),
        }
    }

    /// Makes the etp-tagged rules and routes exactly `rules` and `routes`: adds what is missing
    /// (routes before rules, so a rule never points at an empty table), then deletes tagged
    /// entries nobody wants (rules before routes). Entries with another protocol are never
    /// touched. Running it twice changes nothing the second time.
    pub async fn reconcile(
        &self,
        rules: &[IpRule],
        routes: &[LocalRoute],
    ) -> Result<RouteChanges, RouteError> {
        let protocols = protocols(rules, routes);
        let desired = self.desired(rules, routes);
        let entries: Vec<Entry> = desired.iter().map(|(e, _)| e.clone()).collect();
        let observed = self.dump().await?;
        let (missing, extra) = diff(&entries, &observed, &protocols);
        let mut changes = RouteChanges::default();
        for entry in missing {
            let (_, msg) = desired
                .iter()
                .find(|(e, _)| e == entry)
                .expect("diff returns desired entries");
            self.send(
                msg.clone(),
                NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            )
            .await
            .map_err(|source| RouteError::Apply {
                step: "adding",
                entry: entry.clone(),
                source,
            })?;
            info!(entry = %entry, "added");
            changes.added.push(entry.clone());
        }
        for (entry, dumped) in extra {
            if self.delete(entry, dumped.clone()).await? {
                changes.removed.push(entry.clone());
            }
        }
        Ok(changes)
    }

    /// The differences between the desired entries and the kernel's etp-tagged ones; empty
    /// when they agree.
    pub async fn audit(
        &self,
        rules: &[IpRule],
        routes: &[LocalRoute],
    ) -> Result<Vec<RouteDrift>, RouteError> {
        let protocols = protocols(rules, routes);
        let entries: Vec<Entry> = self
            .desired(rules, routes)
            .into_iter()
            .map(|(e, _)| e)
            .collect();
        let observed = self.dump().await?;
        let (missing, extra) = diff(&entries, &observed, &protocols);
        Ok(missing
            .into_iter()
            .map(|e| RouteDrift::Missing(e.clone()))
            .chain(extra.into_iter().map(|(e, _)| RouteDrift::Extra(e.clone())))
            .collect())
    }

    /// Deletes every rule and route tagged with `protocol`, IPv4 and IPv6 (rules first);
    /// returns how many it deleted.
    pub async fn cleanup(&self, protocol: u8) -> Result<usize, RouteError> {
        let mut removed = 0;
        for (entry, dumped) in self.dump().await? {
            if entry.protocol() == protocol && self.delete(&entry, dumped).await? {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Desired entries with their RTM_NEW* messages: routes first, then rules.
    fn desired(
        &self,
        rules: &[IpRule],
        routes: &[LocalRoute],
    ) -> Vec<(Entry, RouteNetlinkMessage)> {
        let routes = routes.iter().map(|r| {
            (
                Entry::Route(RouteView::from_local_route(r, self.lo_index)),
                RouteNetlinkMessage::NewRoute(route_message(r, self.lo_index)),
            )
        });
        let rules = rules.iter().map(|r| {
            (
                Entry::Rule(RuleView::from(r)),
                RouteNetlinkMessage::NewRule(rule_message(r)),
            )
        });
        routes.chain(rules).collect()
    }

    /// Deletes one dumped entry. `Ok(false)` when it was already gone (ENOENT / ESRCH: someone
    /// else deleted it between the dump and now).
    async fn delete(&self, entry: &Entry, dumped: Dumped) -> Result<bool, RouteError> {
        match self
            .send(dumped.into_message(), NLM_F_REQUEST | NLM_F_ACK)
            .await
        {
            Ok(_) => {
                info!(entry = %entry, "removed");
                Ok(true)
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESRCH)) => {
                debug!(entry = %entry, "already gone");
                Ok(false)
            }
            Err(source) => Err(RouteError::Apply {
                step: "removing",
                entry: entry.clone(),
                source,
            }),
        }
    }

    /// Every IPv4 and IPv6 rule and route in the namespace (all tables, all protocols):
    /// rules first, then routes.
    async fn dump(&self) -> Result<Vec<(Entry, Dumped)>, RouteError> {
        let mut out = Vec::new();
        for (family, what) in [(Family::V4, "IPv4 rules"), (Family::V6, "IPv6 rules")] {
            let mut req = RuleMessage::default();
            req.header.family = match family {
                Family::V4 => netlink_packet_route::AddressFamily::Inet,
                Family::V6 => netlink_packet_route::AddressFamily::Inet6,
            };
            let replies = self
                .dump_one(RouteNetlinkMessage::GetRule(req), what)
                .await?;
            for reply in replies {
                if let RouteNetlinkMessage::NewRule(m) = reply {
                    if let Some(view) = RuleView::from_message(&m) {
                        out.push((Entry::Rule(view), Dumped::Rule(m)));
                    }
                }
            }
        }
        for (family, what) in [(Family::V4, "IPv4 routes"), (Family::V6, "IPv6 routes")] {
            let replies = self
                .dump_one(
                    RouteNetlinkMessage::GetRoute(route_dump_request(family)),
                    what,
                )
                .await?;
            for reply in replies {
                if let RouteNetlinkMessage::NewRoute(m) = reply {
                    if let Some(view) = RouteView::from_message(&m, self.lo_index) {
                        out.push((Entry::Route(view), Dumped::Route(m)));
                    }
                }
            }
        }
        Ok(out)
    }

    /// One dump; a dump the kernel marks interrupted (`NLM_F_DUMP_INTR`: rules or routes
    /// changed while it ran, so it may mix two states) is run again, up to
    /// [`DUMP_ATTEMPTS`] times, rather than compared as drift.
    async fn dump_one(
        &self,
        req: RouteNetlinkMessage,
        what: &'static str,
    ) -> Result<Vec<RouteNetlinkMessage>, RouteError> {
        let mut attempt = 1;
        loop {
            match self.send(req.clone(), NLM_F_REQUEST | NLM_F_DUMP).await {
                Err(e) if e.kind() == io::ErrorKind::Interrupted && attempt < DUMP_ATTEMPTS => {
                    debug!(what, attempt, "rtnetlink dump interrupted; retrying");
                    attempt += 1;
                }
                r => return r.map_err(|source| RouteError::Dump { what, source }),
            }
        }
    }

    /// Sends one request and collects its replies; a netlink error (a negative errno in an
    /// NLMSG_ERROR) becomes the `io::Error` of that errno, an interrupted dump
    /// `ErrorKind::Interrupted`.
    async fn send(
        &self,
        body: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, io::Error> {
        let mut req = NetlinkMessage::from(body);
        req.header.flags = flags;
        let mut replies = self.handle.clone().request(req).map_err(io_error)?;
        let mut out = Vec::new();
        let mut interrupted = false;
        while let Some(reply) = replies.next().await {
            interrupted |= reply.header.flags & NLM_F_DUMP_INTR != 0;
            match reply.payload {
                NetlinkPayload::InnerMessage(m) => out.push(m),
                // An ACK is an error message with code 0 (netlink-proto normally drops them).
                NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                _ => {}
            }
        }
        if interrupted {
            return Err(io::Error::new(
                io::ErrorKind::Interrupted,
                "dump interrupted by concurrent changes (NLM_F_DUMP_INTR)",
            ));
        }
        Ok(out)
    }
}

/// The protocol numbers whose entries reconcile and audit consider: those of the desired
/// entries, or etp's own when nothing is desired (so that an empty config removes everything).
fn protocols(rules: &[IpRule], routes: &[LocalRoute]) -> Vec<u8> {
    let mut p: Vec<u8> = rules
        .iter()
        .map(|r| r.protocol)
        .chain(routes.iter().map(|r| r.protocol))
        .collect();
    p.sort_unstable();
    p.dedup();
    if p.is_empty() {
        p.push(ROUTE_PROTOCOL);
    }
    p
}

fn io_error(e: rtnetlink::Error) -> io::Error {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.to_io(),
        other => io::Error::other(other),
    }
}
