//! nf_tables engine against the real kernel, each test in fresh network namespaces.
//!
//! etp's netlink work runs on a thread that has entered the test namespace (`setns`): netlink
//! sockets belong to the namespace of the thread that creates them. `nft` is the witness.
mod common;

use std::time::{Duration, Instant};

use common::Netns;
use etp::config::Config;
use etp::kernel::nft::{Nft, NftError, TableDrift};
use etp::model::{Chain, ChainType, FwMark, Hook, Match, Rule, Set, SetElems, Table, Verdict};

const LOCAL_TOML: &str = include_str!("../rulesets/local.netlink.toml");

fn local_config() -> Config {
    Config::parse(LOCAL_TOML, "rulesets/local.netlink.toml").expect("test config is valid")
}

/// Runs `f` on a thread inside `ns` and returns its result.
fn in_netns<T: Send + 'static>(ns: &Netns, f: impl FnOnce() -> T + Send + 'static) -> T {
    common::topo::in_netns(&ns.name, f)
        .join()
        .expect("netns thread panicked")
}

fn apply_in(ns: &Netns, table: &Table) -> Result<etp::kernel::nft::ApplyReport, NftError> {
    let t = table.clone();
    in_netns(ns, move || Nft::open()?.apply(&t, None))
}

fn audit_in(ns: &Netns, table: &Table) -> Vec<TableDrift> {
    let t = table.clone();
    in_netns(ns, move || Nft::open().and_then(|mut n| n.audit(&t))).expect("audit")
}

/// `nft -j list table inet etp` with rule/chain/set handles removed.
fn listing(ns: &Netns) -> serde_json::Value {
    let text = ns.nft(&["-j", "list", "table", "inet", "etp"]);
    let mut v: serde_json::Value = serde_json::from_str(&text).expect("nft -j output is JSON");
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                m.remove("handle");
                m.values_mut().for_each(strip);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    strip(&mut v);
    v
}

fn ruleset(ns: &Netns) -> String {
    ns.nft(&["list", "ruleset"])
}

const FOREIGN: &str = "table ip filter {
\tchain input {
\t\ttype filter hook input priority filter; policy accept;
\t\ttcp dport 22 counter accept comment \"ssh\"
\t}
}
table ip kube-proxy {
\tchain services {
\t\tip daddr 10.96.0.1 tcp dport 443 counter comment \"default/kubernetes:https\"
\t}
\tchain nat-prerouting {
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tjump services
\t}
}
";

fn foreign(ns: &Netns) -> String {
    let f = common::TempFile::new("foreign.nft", FOREIGN);
    ns.nft(&["-f", f.as_str()]);
    foreign_listing(ns)
}

fn foreign_listing(ns: &Netns) -> String {
    ns.nft(&["list", "table", "ip", "filter"]) + &ns.nft(&["list", "table", "ip", "kube-proxy"])
}

#[test]
fn apply_matches_nft_loading_the_render() {
    require_root!();
    let desired = etp::plan::plan(&local_config());
    let ours = Netns::new("nft-ours");
    let theirs = Netns::new("nft-theirs");
    let report = apply_in(&ours, &desired.table).expect("apply");
    let render = common::TempFile::new("render.nft", &desired.to_string());
    theirs.nft(&["-f", render.as_str()]);
    assert_eq!(listing(&ours), listing(&theirs));
    assert!(report.messages > desired.table.chains.len() + desired.table.sets.len());
    // The default config too.
    let default = etp::plan::plan(&Config::embedded());
    let a = Netns::new("nft-def-ours");
    let b = Netns::new("nft-def-theirs");
    apply_in(&a, &default.table).expect("apply default");
    let render = common::TempFile::new("default.nft", &default.to_string());
    b.nft(&["-f", render.as_str()]);
    assert_eq!(listing(&a), listing(&b));
}

#[test]
fn reapply_is_idempotent_and_foreign_tables_untouched() {
    require_root!();
    let ns = Netns::new("nft-idem");
    let before = foreign(&ns);
    let table = etp::plan::plan(&local_config()).table;
    apply_in(&ns, &table).expect("first apply");
    let first = listing(&ns);
    assert_eq!(foreign_listing(&ns), before);
    apply_in(&ns, &table).expect("re-apply");
    assert_eq!(listing(&ns), first);
    assert_eq!(foreign_listing(&ns), before);
    // A different config replaces the table in place.
    let other = etp::plan::plan(&Config::embedded()).table;
    apply_in(&ns, &other).expect("apply other");
    assert_ne!(listing(&ns), first);
    assert_eq!(foreign_listing(&ns), before);
    let deleted = in_netns(&ns, || {
        let mut n = Nft::open()?;
        Ok::<_, NftError>((n.delete_table("etp")?, n.delete_table("etp")?))
    })
    .expect("delete_table");
    assert_eq!(deleted, (true, false), "deleted once, then absent");
    assert_eq!(foreign_listing(&ns), before);
    assert!(!ruleset(&ns).contains("table inet etp"));
}

/// A table whose prerouting chain marks every packet to 127.0.0.2 (set `hit` differs between
/// the two variants, both contain 127.0.0.2).
fn marking_table(variant: usize) -> Table {
    let nets = if variant % 2 == 0 {
        vec!["10.0.0.0/8", "127.0.0.2/32"]
    } else {
        vec!["127.0.0.0/29", "192.168.0.0/16"]
    };
    Table {
        name: "etp".into(),
        sets: vec![Set {
            name: "hit".into(),
            elems: SetElems::V4(nets.iter().map(|n| n.parse().unwrap()).collect()),
        }],
        meters: vec![],
        chains: vec![Chain {
            name: "prerouting".into(),
            kind: ChainType::Filter,
            hook: Hook::Prerouting,
            priority: -150,
            rules: vec![Rule {
                matches: vec![Match::Daddr {
                    family: etp::model::Family::V4,
                    set: "hit".into(),
                }],
                verdict: Verdict::MarkAccept(FwMark(0x1000)),
                comment: format!("variant {variant}"),
            }],
        }],
    }
}

const WITNESS: &str = "table inet witness {
\tchain prerouting {
\t\ttype filter hook prerouting priority 0; policy accept;
\t\tudp dport 9999 meta mark & 0x00001000 == 0x00001000 counter comment \"hit\"
\t\tudp dport 9999 meta mark & 0x00001000 != 0x00001000 counter comment \"missed\"
\t}
}
";

fn witness_counts(ns: &Netns) -> (u64, u64) {
    let v: serde_json::Value =
        serde_json::from_str(&ns.nft(&["-j", "list", "table", "inet", "witness"])).unwrap();
    let mut hit = None;
    let mut missed = None;
    for item in v["nftables"].as_array().unwrap() {
        let Some(rule) = item.get("rule") else {
            continue;
        };
        let packets = rule["expr"]
            .as_array()
            .unwrap()
            .iter()
            .find_map(|e| e.get("counter").map(|c| c["packets"].as_u64().unwrap()));
        match rule["comment"].as_str() {
            Some("hit") => hit = packets,
            Some("missed") => missed = packets,
            _ => {}
        }
    }
    (hit.unwrap(), missed.unwrap())
}

#[test]
fn replace_is_atomic_under_traffic() {
    require_root!();
    let ns = Netns::new("nft-atomic");
    let w = common::TempFile::new("witness.nft", WITNESS);
    ns.nft(&["-f", w.as_str()]);
    apply_in(&ns, &marking_table(0)).expect("initial apply");

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    // Sender: bounded by count (200k) and time (30 s), stops when the applies are done.
    let sender = common::topo::in_netns(&ns.name, move || {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut sent = 0u64;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed)
            && sent < 200_000
            && Instant::now() < deadline
        {
            if sock.send_to(b"x", "127.0.0.2:9999").is_ok() {
                sent += 1;
            }
        }
        sent
    });
    let applies = in_netns(&ns, || {
        let mut nft = Nft::open().unwrap();
        for i in 1..=100 {
            nft.apply(&marking_table(i), None)
                .expect("re-apply under traffic");
        }
        100
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = sender.join().unwrap();
    // Loopback delivery is asynchronous (backlog): wait until every packet was counted.
    let counts = common::wait_for(Duration::from_secs(5), || {
        let (hit, missed) = witness_counts(&ns);
        (hit + missed >= sent).then_some((hit, missed))
    });
    let (hit, missed) = counts.unwrap_or_else(|| witness_counts(&ns));
    eprintln!("{applies} replaces under traffic: sent {sent}, hit {hit}, missed {missed}");
    assert!(
        sent > 1000,
        "the sender ran during the replaces ({sent} packets)"
    );
    assert_eq!(missed, 0, "packets that saw no etp table");
    assert_eq!(hit, sent);
}

#[test]
fn refused_batch_changes_nothing_and_names_the_object() {
    require_root!();
    let ns = Netns::new("nft-refused");
    foreign(&ns);
    let good = etp::plan::plan(&local_config()).table;
    apply_in(&ns, &good).expect("apply");
    let before = ruleset(&ns);

    // Overlapping intervals (the planner never produces them) make the kernel refuse the set.
    let mut bad = good.clone();
    let set = bad
        .sets
        .iter_mut()
        .find(|s| s.name == "r0_frontend_dst4")
        .expect("set exists");
    set.elems = SetElems::V4(vec![
        "10.0.0.0/8".parse().unwrap(),
        "10.1.0.0/16".parse().unwrap(),
    ]);
    let err = apply_in(&ns, &bad).expect_err("overlap refused");
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(
        matches!(
            err,
            NftError::Refused {
                errno: libc::EEXIST,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        msg.contains("set r0_frontend_dst4 element 10.1.0.0/16"),
        "{msg}"
    );
    assert!(msg.contains("etp route frontend"), "{msg}");
    assert!(msg.contains("File exists (os error 17)"), "{msg}");
    assert_eq!(ruleset(&ns), before);

    // A nat chain below conntrack's priority is refused too.
    let mut bad = good.clone();
    bad.chains
        .iter_mut()
        .find(|c| c.name == "handoff")
        .unwrap()
        .priority = -300;
    let err = apply_in(&ns, &bad).expect_err("nat priority refused");
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(
        msg.contains("chain handoff (type nat hook output priority -300)"),
        "{msg}"
    );
    assert_eq!(ruleset(&ns), before);
    assert!(audit_in(&ns, &good).is_empty());
}

#[test]
fn audit_reports_outside_changes() {
    require_root!();
    let ns = Netns::new("nft-audit");
    let table = etp::plan::plan(&local_config()).table;
    apply_in(&ns, &table).expect("apply");
    assert_eq!(audit_in(&ns, &table), vec![]);

    // Delete the bypass-destinations rule of prerouting and one element, from outside.
    let listing = ns.nft(&["-a", "list", "chain", "inet", "etp", "prerouting"]);
    let line = listing
        .lines()
        .find(|l| l.contains("ip daddr @bypass_dst4"))
        .expect("bypass rule listed");
    let handle = line.rsplit("# handle ").next().unwrap().trim().to_string();
    ns.nft(&[
        "delete",
        "rule",
        "inet",
        "etp",
        "prerouting",
        "handle",
        &handle,
    ]);
    ns.nft(&[
        "delete",
        "element",
        "inet",
        "etp",
        "r0_frontend_dst4",
        "{ 192.168.10.0/24 }",
    ]);
    ns.nft(&["add", "element", "inet", "etp", "bypass_ports", "{ 7777 }"]);

    let drift = audit_in(&ns, &table);
    let text: Vec<String> = drift.iter().map(|d| d.to_string()).collect();
    eprintln!("{}", text.join("\n"));
    assert_eq!(drift.len(), 3, "{text:?}");
    assert!(drift.iter().any(|d| matches!(d,
        TableDrift::MissingRule { chain, comment, .. }
            if chain == "prerouting" && comment == "etp bypass: destinations")));
    assert!(drift.contains(&TableDrift::MissingElement {
        set: "r0_frontend_dst4".into(),
        elem: "192.168.10.0/24".into()
    }));
    assert!(drift.contains(&TableDrift::ExtraElement {
        set: "bypass_ports".into(),
        elem: "7777".into()
    }));
    assert!(text
        .iter()
        .any(|t| t.contains("missing rule in chain prerouting")
            && t.contains("lookup reg 1 set bypass_dst4")));

    // Re-apply repairs; after delete_table the table is missing.
    apply_in(&ns, &table).expect("repair");
    assert_eq!(audit_in(&ns, &table), vec![]);
    assert!(in_netns(&ns, || Nft::open()?.delete_table("etp")).unwrap());
    assert_eq!(
        audit_in(&ns, &table),
        vec![TableDrift::MissingTable {
            table: "etp".into()
        }]
    );
}

#[test]
fn hundred_thousand_cidrs_apply_and_audit() {
    require_root!();
    // 100k disjoint /32s (every other address from 10.0.0.0), one route.
    let mut toml = String::from(
        "[listener]\nport = 15001\nipv6 = false\nlocal = true\n\n[[route]]\nname = \"big\"\nprotocols = [\"tcp\"]\nports = [443]\naction = \"linkerd\"\ndestinations = [\n",
    );
    for i in 0..100_000u32 {
        let a = std::net::Ipv4Addr::from(0x0a00_0000 + i * 2);
        toml.push_str(&format!("\"{a}/32\",\n"));
    }
    toml.push_str("]\n");
    let cfg = Config::parse(&toml, "big.toml").expect("big config");
    let table = etp::plan::plan(&cfg).table;
    let n: usize = table
        .sets
        .iter()
        .filter(|s| s.name.starts_with("r0_big_dst"))
        .map(|s| s.elems.len())
        .sum();
    assert_eq!(n, 100_000);

    let ns = Netns::new("nft-big");
    let report = apply_in(&ns, &table).expect("apply 100k");
    eprintln!("100k CIDRs: {report:?}");
    // nftnl pages are 128 KiB; this batch is ~30 of them, sent in one sendmsg.
    assert!(
        report.bytes > 3 * 1024 * 1024,
        "far over one page: {report:?}"
    );
    assert_eq!(audit_in(&ns, &table), vec![]);
    // The witness agrees on the count.
    let set = ns.nft(&["-j", "list", "set", "inet", "etp", "r0_big_dst4"]);
    let v: serde_json::Value = serde_json::from_str(&set).unwrap();
    let elems = v["nftables"][1]["set"]["elem"]
        .as_array()
        .expect("elements")
        .len();
    assert_eq!(elems, 100_000);
}

#[test]
fn stale_generation_is_refused_as_concurrent() {
    require_root!();
    let ns = Netns::new("nft-gen");
    let table = etp::plan::plan(&local_config()).table;
    apply_in(&ns, &table).expect("apply");
    let before = ruleset(&ns);
    let other = etp::plan::plan(&Config::embedded()).table;
    let (stale, ok, gen_after) = in_netns(&ns, move || {
        let mut nft = Nft::open().unwrap();
        let gen = nft.generation().unwrap();
        let stale = nft.apply(&other, Some(gen.wrapping_sub(1)));
        let gen_still = nft.generation().unwrap();
        assert_eq!(gen_still, gen, "a refused batch does not commit");
        let ok = nft.apply(&other, Some(gen));
        (stale, ok, nft.generation().unwrap())
    });
    let err = stale.expect_err("stale generation refused");
    assert!(matches!(err, NftError::Concurrent { .. }), "{err:?}");
    let ok = ok.expect("current generation applies");
    assert_eq!(ok.generation, gen_after);
    assert_ne!(ruleset(&ns), before, "the second apply changed the table");
}
