//! Policy routing against the real kernel, each test in its own network namespace.
//!
//! A netlink socket belongs to the namespace of the thread that opens it, so every call into
//! `etp::kernel::route` runs on a fresh thread that first enters the test's namespace (`setns`) and then
//! builds a current-thread tokio runtime. `ip` is the independent witness.
mod common;

use std::future::Future;

use common::Netns;
use etp::kernel::route::{RouteChanges, RouteDrift, Routing};
use etp::model::{Family, FwMark, IpRule, LocalRoute, TableId};

const PROTO: u8 = 231;

fn rules(table: u32) -> Vec<IpRule> {
    [Family::V4, Family::V6]
        .into_iter()
        .map(|family| IpRule {
            family,
            mark: FwMark(0x1000),
            mask: FwMark(0x3000),
            table: TableId(table),
            priority: 30100,
            protocol: PROTO,
        })
        .collect()
}

fn routes(table: u32) -> Vec<LocalRoute> {
    [Family::V4, Family::V6]
        .into_iter()
        .map(|family| LocalRoute {
            family,
            table: TableId(table),
            protocol: PROTO,
        })
        .collect()
}

/// Runs `f` with a freshly connected [`Routing`] inside `ns` and returns its result.
fn with_routing<F, Fut, T>(ns: &Netns, f: F) -> T
where
    F: FnOnce(Routing) -> Fut + Send + 'static,
    Fut: Future<Output = T>,
    T: Send + 'static,
{
    common::topo::in_netns(&ns.name, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        rt.block_on(async move {
            let routing = Routing::connect().await.expect("connect rtnetlink");
            f(routing).await
        })
    })
    .join()
    .expect("routing thread panicked")
}

fn reconcile(ns: &Netns, table: u32) -> RouteChanges {
    with_routing(ns, move |r| async move {
        r.reconcile(&rules(table), &routes(table))
            .await
            .expect("reconcile")
    })
}

fn audit(ns: &Netns, table: u32) -> Vec<String> {
    with_routing(ns, move |r| async move {
        let drift: Vec<RouteDrift> = r.audit(&rules(table), &routes(table)).await.expect("audit");
        drift.iter().map(|d| d.to_string()).collect()
    })
}

fn cleanup(ns: &Netns) -> usize {
    with_routing(
        ns,
        |r| async move { r.cleanup(PROTO).await.expect("cleanup") },
    )
}

/// Everything `ip` shows about rules and routes, both families, all tables.
fn ip_state(ns: &Netns) -> String {
    [
        ns.ip(&["-4", "rule", "show"]),
        ns.ip(&["-6", "rule", "show"]),
        ns.ip(&["-4", "route", "show", "table", "all"]),
        ns.ip(&["-6", "route", "show", "table", "all"]),
    ]
    .join("")
}

/// The lines of [`ip_state`] that are not etp's (not tagged `proto 231`).
fn foreign_state(ns: &Netns) -> String {
    ip_state(ns)
        .lines()
        .filter(|l| !l.contains("proto 231"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn etp_lines(ns: &Netns) -> Vec<String> {
    ip_state(ns)
        .lines()
        .filter(|l| l.contains("proto 231"))
        .map(str::to_string)
        .collect()
}

fn route_get(ns: &Netns, args: &[&str]) -> String {
    let out = ns.try_exec("ip", args);
    String::from_utf8_lossy(if out.status.success() {
        &out.stdout
    } else {
        &out.stderr
    })
    .into_owned()
}

#[test]
fn reconcile_installs_rules_and_local_routes_idempotently() {
    require_root!();
    let ns = Netns::new("rt-apply");
    let changes = reconcile(&ns, 15001);
    assert_eq!(changes.added.len(), 4, "{changes}");
    assert!(changes.removed.is_empty(), "{changes}");

    for v in ["-4", "-6"] {
        let rule = ns.ip(&[v, "rule", "show"]);
        assert!(
            rule.contains("30100:\tfrom all fwmark 0x1000/0x3000 lookup 15001 proto 231"),
            "ip {v} rule:\n{rule}"
        );
        let table = ns.ip(&[v, "route", "show", "table", "15001"]);
        assert_eq!(
            table.lines().count(),
            1,
            "ip {v} route table 15001:\n{table}"
        );
        assert!(
            table.starts_with("local default dev lo proto 231"),
            "ip {v} route table 15001:\n{table}"
        );
        if v == "-4" {
            assert!(table.contains("scope host"), "{table}");
        }
    }

    // Marked packets are delivered locally; the same packets without etp's mark bits are not.
    let got = route_get(&ns, &["-4", "route", "get", "10.96.0.1", "mark", "0x1000"]);
    assert!(
        got.starts_with("local 10.96.0.1 dev lo table 15001"),
        "{got}"
    );
    let got = route_get(&ns, &["-4", "route", "get", "10.96.0.1", "mark", "0x5000"]);
    assert!(
        got.starts_with("local 10.96.0.1 dev lo"),
        "mask 0x3000 ignores 0x4000: {got}"
    );
    let got = route_get(&ns, &["-4", "route", "get", "10.96.0.1", "mark", "0x2000"]);
    assert!(!got.contains("local"), "mark 0x2000 must not match: {got}");
    let got = route_get(&ns, &["-6", "route", "get", "fd00:96::1", "mark", "0x1000"]);
    assert!(got.starts_with("local fd00:96::1 "), "{got}");
    assert!(got.contains("dev lo table 15001"), "{got}");
    let got = route_get(&ns, &["-6", "route", "get", "fd00:96::1"]);
    assert!(!got.contains("local"), "unmarked must not match: {got}");

    let before = ip_state(&ns);
    let again = reconcile(&ns, 15001);
    assert!(again.is_empty(), "second reconcile changed: {again}");
    assert_eq!(ip_state(&ns), before);
}

#[test]
fn foreign_rules_and_routes_survive_reconcile_audit_and_cleanup() {
    require_root!();
    let ns = Netns::new("rt-foreign");
    ns.ip(&[
        "-4", "rule", "add", "fwmark", "0x40", "lookup", "200", "priority", "1000",
    ]);
    ns.ip(&[
        "-6", "rule", "add", "fwmark", "0x40", "lookup", "200", "priority", "1000",
    ]);
    ns.ip(&[
        "-4",
        "route",
        "add",
        "blackhole",
        "10.200.0.0/16",
        "table",
        "200",
    ]);
    ns.ip(&[
        "-6",
        "route",
        "add",
        "blackhole",
        "fd00:200::/64",
        "table",
        "200",
    ]);
    // Same selectors as etp's, another protocol: not etp's either. The kernel keeps identical
    // rules apart by protocol, and a delete that names proto 231 leaves this one alone.
    ns.ip(&[
        "-4",
        "rule",
        "add",
        "fwmark",
        "0x1000/0x3000",
        "lookup",
        "15001",
        "priority",
        "30100",
        "proto",
        "static",
    ]);
    ns.ip(&[
        "-4",
        "route",
        "add",
        "blackhole",
        "10.201.0.0/16",
        "table",
        "15001",
        "proto",
        "static",
    ]);
    let foreign = foreign_state(&ns);
    assert!(
        foreign.contains("1000:\tfrom all fwmark 0x40 lookup 200"),
        "{foreign}"
    );
    assert!(
        foreign.contains("blackhole 10.200.0.0/16 table 200"),
        "{foreign}"
    );
    assert!(
        foreign.contains("fwmark 0x1000/0x3000 lookup 15001 proto static"),
        "{foreign}"
    );

    reconcile(&ns, 15001);
    assert_eq!(foreign_state(&ns), foreign, "after reconcile");
    assert_eq!(etp_lines(&ns).len(), 4, "{:?}", etp_lines(&ns));

    // A changed config: the old table's entries go, the new ones come, nothing else moves.
    let changes = reconcile(&ns, 15002);
    assert_eq!(
        (changes.added.len(), changes.removed.len()),
        (4, 4),
        "{changes}"
    );
    assert!(
        changes
            .removed
            .iter()
            .all(|e| e.to_string().contains("15001")),
        "{changes}"
    );
    assert_eq!(foreign_state(&ns), foreign, "after config change");
    let etp = etp_lines(&ns);
    assert_eq!(etp.len(), 4, "{etp:?}");
    assert!(etp.iter().all(|l| l.contains("15002")), "{etp:?}");

    assert!(audit(&ns, 15002).is_empty());
    assert_eq!(foreign_state(&ns), foreign, "after audit");

    assert_eq!(cleanup(&ns), 4);
    assert_eq!(foreign_state(&ns), foreign, "after cleanup");
    assert!(etp_lines(&ns).is_empty(), "{:?}", etp_lines(&ns));
}

#[test]
fn audit_reports_missing_and_extra_entries() {
    require_root!();
    let ns = Netns::new("rt-audit");
    let all_missing = audit(&ns, 15001);
    assert_eq!(all_missing.len(), 4, "{all_missing:?}");
    assert!(all_missing.iter().all(|d| d.starts_with("missing ")));

    reconcile(&ns, 15001);
    assert_eq!(audit(&ns, 15001), Vec::<String>::new());

    ns.ip(&[
        "-4",
        "rule",
        "del",
        "fwmark",
        "0x1000/0x3000",
        "lookup",
        "15001",
        "priority",
        "30100",
    ]);
    assert_eq!(
        audit(&ns, 15001),
        vec!["missing ip rule: fwmark 0x1000/0x3000 lookup 15001 priority 30100 (IPv4)"]
    );
    reconcile(&ns, 15001);
    assert_eq!(audit(&ns, 15001), Vec::<String>::new());

    ns.ip(&[
        "-6", "route", "del", "local", "::/0", "dev", "lo", "table", "15001",
    ]);
    assert_eq!(
        audit(&ns, 15001),
        vec!["missing route: local default dev lo table 15001 (IPv6)"]
    );
    reconcile(&ns, 15001);
    assert_eq!(audit(&ns, 15001), Vec::<String>::new());

    // Somebody adds an entry with etp's tag: it is extra, and reconcile takes it away.
    ns.ip(&[
        "-4",
        "rule",
        "add",
        "fwmark",
        "0x2000/0x3000",
        "lookup",
        "15009",
        "priority",
        "30200",
        "proto",
        "231",
    ]);
    assert_eq!(
        audit(&ns, 15001),
        vec!["extra ip rule: fwmark 0x2000/0x3000 lookup 15009 priority 30200 (IPv4)"]
    );
    let changes = reconcile(&ns, 15001);
    assert_eq!(
        changes.to_string(),
        "removed ip rule fwmark 0x2000/0x3000 lookup 15009 priority 30200 (IPv4)"
    );
    assert_eq!(audit(&ns, 15001), Vec::<String>::new());
}

#[test]
fn cleanup_removes_everything_tagged_and_then_nothing() {
    require_root!();
    let ns = Netns::new("rt-clean");
    assert_eq!(cleanup(&ns), 0, "nothing to clean in a fresh namespace");
    reconcile(&ns, 15001);
    // An etp-tagged leftover of an older config is cleaned too.
    ns.ip(&[
        "-6", "route", "add", "local", "::/0", "dev", "lo", "table", "15007", "proto", "231",
    ]);
    assert_eq!(etp_lines(&ns).len(), 5, "{:?}", etp_lines(&ns));
    assert_eq!(cleanup(&ns), 5);
    assert!(etp_lines(&ns).is_empty(), "{:?}", etp_lines(&ns));
    assert_eq!(ns.ip(&["-4", "route", "show", "table", "15001"]), "");
    assert_eq!(cleanup(&ns), 0, "second cleanup");
}

#[test]
fn adding_over_a_foreign_identical_route_names_the_entry() {
    require_root!();
    let ns = Netns::new("rt-conflict");
    // The same local route, put there by someone else: etp does not take it over.
    ns.ip(&[
        "-4",
        "route",
        "add",
        "local",
        "0.0.0.0/0",
        "dev",
        "lo",
        "table",
        "15001",
        "proto",
        "static",
    ]);
    let before = ns.ip(&["-4", "route", "show", "table", "15001"]);
    let err = with_routing(&ns, |r| async move {
        let e = r
            .reconcile(&rules(15001), &routes(15001))
            .await
            .expect_err("EEXIST expected");
        etp::telemetry::chain(&e)
    });
    assert!(
        err.starts_with("adding route local default dev lo table 15001 (IPv4): File exists"),
        "{err}"
    );
    assert_eq!(ns.ip(&["-4", "route", "show", "table", "15001"]), before);
}
