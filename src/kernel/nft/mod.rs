//! etp's nftables table over netlink: `encode` (pure) builds one transaction from the model,
//! `socket` (the kernel edge) sends it, and `audit` reads the table back and compares.
//!
//! - `expr`   nf_tables expressions the nftnl crate lacks (tproxy, redir, named lookup, payload)
//! - `wire`   netlink framing: batch BEGIN/END, element messages, reply parsing
//! - `encode` `model::Table` -> `Batch` (labelled messages; no socket)
//! - `text`   libnftnl's text form of rules (golden tests, audit)
//! - `socket` [`Nft`]: open, generation id, apply, delete_table (edge)
//! - `audit`  read back and compare -> [`TableDrift`] (edge)

mod audit;
mod encode;
mod error;
mod expr;
mod monitor;
mod socket;
mod text;
pub(crate) mod wire;

pub use audit::TableDrift;
pub use error::NftError;
pub(crate) use monitor::NftMonitor;
pub use socket::{ApplyReport, Nft};
