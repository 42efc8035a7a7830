//! etp's nftables table over netlink: `encode` (pure) builds one transaction from the model,
//! `apply` sends it against what the kernel holds now (`current`), and `audit` reads the
//! table back and compares. Nothing here decides *what* to install: that is `plan`.
//!
//! - `expr`    nf_tables expressions the nftnl crate lacks (tproxy, redir, named lookup, payload)
//! - `wire`    nf_tables framing: batch BEGIN/END, element messages, reply parsing
//! - `encode`  `model::Table` -> `Batch` (labelled messages; no socket)
//! - `text`    libnftnl's text form of rules (golden tests, audit)
//! - `socket`  [`Nft`]: open, requests and dumps, generation id, one batch and its acks (edge)
//! - `current` what etp's table holds now: its chains and sets (read by apply and audit)
//! - `apply`   in-place replace in one transaction, delete_table (edge)
//! - `audit`   read back and compare -> [`TableDrift`] (edge)
//! - `monitor` nf_tables change notifications for etp's table

mod abi;
mod apply;
mod audit;
mod current;
mod encode;
mod error;
mod expr;
#[cfg(test)]
mod fuzz_tests;
mod monitor;
mod socket;
mod text;
mod wire;

pub use apply::ApplyReport;
pub use audit::TableDrift;
pub use error::NftError;
pub(crate) use monitor::NftMonitor;
pub use socket::Nft;
