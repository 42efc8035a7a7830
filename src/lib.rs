//! etp: a node-level TPROXY traffic router that hands flows to the Linkerd proxy.
//!
//! Layout: a pure policy core and two wings. Data flows one way (config -> plan -> model ->
//! kernel); only the two wings touch the kernel.
//! - policy core: `config` (TOML -> validated `Config`), `classify` ((proto, src, orig dst) ->
//!   route, the order the ruleset encodes), `plan` (Config -> `model::Desired`, every policy
//!   decision), `model` (the desired state as plain data; `Display` prints nft syntax)
//! - `kernel`: the only module that opens netlink sockets (one generic netlink module under
//!   all of them); nftables (`kernel::nft`), ip rules and local routes (`kernel::route`),
//!   conntrack lookups and sock_diag; apply order, audit, cleanup and change notifications.
//!   It imports `model` only.
//! - `dataplane`: transparent TCP/UDP listeners, flow decisions, upstream sockets, the relay, the
//!   UDP flow table, descriptor back-off and socket options (`dataplane::sockopt`)
//! - wiring: `daemon` (start order, reload, drain, resync), `admin` (metrics and health),
//!   `cli`, `metrics`, `pidfile`, `telemetry`

pub mod admin;
mod classify;
pub mod cli;
pub mod config;
pub mod daemon;
mod dataplane;
mod handoff_flows;
pub mod health;
pub mod kernel;
mod metrics;
pub mod model;
pub mod pidfile;
pub mod plan;
pub mod plan_handoff;
pub mod telemetry;
