//! Policy routing over rtnetlink: the `ip rule fwmark M lookup T` entries and the
//! `local default dev lo table T` routes that deliver TPROXY-marked packets to the local stack.
//!
//! - `message` is pure: model entries -> `RuleMessage` / `RouteMessage`, dumped messages ->
//!   comparable `RuleView` / `RouteView`, and the desired/observed `diff`.
//! - [`Routing`] is the edge: one rtnetlink socket in the namespace of the thread that connects;
//!   it dumps, then adds and deletes, and makes no policy decisions.
//!
//! Ownership: etp's entries are the ones tagged with its protocol number (`proto 231`, the
//! model's `protocol` field). Reconcile, audit and cleanup look at nothing else, so rules and
//! routes of other programs (and the kernel's default rules) are never touched.

mod apply;
#[cfg(test)]
mod fuzz_tests;
mod message;
mod monitor;

use std::fmt;
use std::io;

pub use apply::Routing;
pub(crate) use message::Entry;
pub(crate) use monitor::RouteMonitor;

/// Errors of the routing module; each names the step and, when there is one, the entry.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("opening the rtnetlink socket")]
    Connect {
        #[source]
        source: io::Error,
    },
    #[error("looking up the loopback interface {name:?}")]
    Loopback {
        name: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("dumping {what}")]
    Dump {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    /// `adding ip rule fwmark 0x1000/0x3000 lookup 15001 priority 30100 (IPv4): File exists`
    #[error("{step} {entry}")]
    Apply {
        step: &'static str,
        entry: Entry,
        #[source]
        source: io::Error,
    },
}

/// What [`Routing::reconcile`] changed, in the order it changed it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteChanges {
    pub added: Vec<Entry>,
    pub removed: Vec<Entry>,
}

impl RouteChanges {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

/// One line per change: `added ip rule fwmark ...`, `removed route local default ...`;
/// `no changes` when there were none.
impl fmt::Display for RouteChanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("no changes");
        }
        let lines = self
            .added
            .iter()
            .map(|e| ("added", e))
            .chain(self.removed.iter().map(|e| ("removed", e)));
        for (i, (what, e)) in lines.enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{what} {e}")?;
        }
        Ok(())
    }
}

/// A difference between the desired and the kernel's etp-tagged entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteDrift {
    /// Desired, not in the kernel.
    Missing(Entry),
    /// Tagged with etp's protocol in the kernel, not desired.
    Extra(Entry),
}

/// `missing ip rule: fwmark 0x1000/0x3000 lookup 15001 priority 30100 (IPv4)`
impl fmt::Display for RouteDrift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (what, e) = match self {
            RouteDrift::Missing(e) => ("missing", e),
            RouteDrift::Extra(e) => ("extra", e),
        };
        write!(f, "{what} {}: {}", e.kind(), e.detail())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Family, FwMark, IpRule, TableId};

    fn entry() -> Entry {
        Entry::Rule(message::RuleView::from(&IpRule {
            family: Family::V4,
            mark: FwMark(0x1000),
            mask: FwMark(0x3000),
            table: TableId(15001),
            priority: 30100,
            protocol: 231,
        }))
    }

    #[test]
    fn drift_and_changes_display() {
        assert_eq!(
            RouteDrift::Missing(entry()).to_string(),
            "missing ip rule: fwmark 0x1000/0x3000 lookup 15001 priority 30100 (IPv4)"
        );
        assert!(RouteDrift::Extra(entry())
            .to_string()
            .starts_with("extra ip rule: "));
        let changes = RouteChanges {
            added: vec![entry()],
            removed: vec![entry()],
        };
        assert_eq!(
            changes.to_string(),
            "added ip rule fwmark 0x1000/0x3000 lookup 15001 priority 30100 (IPv4)\n\
             removed ip rule fwmark 0x1000/0x3000 lookup 15001 priority 30100 (IPv4)"
        );
        assert_eq!(RouteChanges::default().to_string(), "no changes");
    }

    #[test]
    fn apply_error_names_step_and_entry() {
        let err = RouteError::Apply {
            step: "adding",
            entry: entry(),
            source: io::Error::from_raw_os_error(libc::EEXIST),
        };
        assert_eq!(
            err.to_string(),
            "adding ip rule fwmark 0x1000/0x3000 lookup 15001 priority 30100 (IPv4)"
        );
        assert!(crate::telemetry::chain(&err).ends_with("(IPv4): File exists (os error 17)"));
        assert!(std::error::Error::source(&err).is_some());
    }
}
