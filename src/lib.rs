//! etp: a node-level TPROXY traffic router that hands flows to the Linkerd proxy.
//!
//! Layout (data flows one way; only the modules marked (edge) touch the kernel):
//! - `config`   TOML -> validated `Config` (file:line:key errors)
//! - `classify` (proto, src, orig dst) -> route; the order the ruleset encodes
//! - `plan`     Config -> `model::Desired` (every policy decision)
//! - `model`    the desired state as plain data; `Display` prints nft syntax
//! - `nft`      Desired -> one netlink batch (`encode`), sent and audited by `apply`; change
//!   notifications (`monitor`) (edge)
//! - `route`    ip rules and local routes over rtnetlink; their notifications (edge)
//! - `kernel`   nft + route as one unit: apply order, audit, cleanup, `Monitor` (edge)
//! - `sockdiag` TIME-WAIT remnants of client legs, destroyed on a fail-open stop (edge)
//! - `sys`      the socket options etp needs (the only `unsafe` outside nft FFI) (edge)
//! - `tproxy`   transparent TCP/UDP listeners and their flows (edge)
//! - `relay`    TCP byte copying, half-close, idle timeout
//! - `daemon`   start order, reload, drain, resync; `admin` metrics and health
//! - `fdlimit`  back-off and a reserved descriptor for when the process runs out of fds

pub mod admin;
pub mod classify;
pub mod cli;
pub mod config;
pub mod conntrack;
pub mod daemon;
pub mod fdlimit;
pub mod kernel;
pub mod metrics;
pub mod model;
pub mod nft;
pub mod plan;
pub mod relay;
pub mod route;
pub mod sockdiag;
pub mod sys;
pub mod telemetry;
pub mod tproxy;
