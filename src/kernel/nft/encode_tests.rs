//! Unit tests of `encode`: golden comparison with nft's own expressions, message order, element
//! keys and splitting, error labels.

use super::*;
use crate::config::Config;
use crate::kernel::nft::current::{CurrentChain, CurrentSet};
use crate::kernel::nft::text::rule_debug;
use crate::model::{PortRange, Set};

fn local_config() -> Config {
    Config::parse(
        include_str!("../../../rulesets/local.netlink.toml"),
        "rulesets/local.netlink.toml",
    )
    .expect("test config is valid")
}

/// libnftnl's print of every rule message, in batch order, as nft --debug=netlink shows it.
fn rules_debug(batch: &Batch) -> String {
    let mut out = String::new();
    for (i, m) in batch.messages().iter().enumerate() {
        if m.cmd == wire::NFT_MSG_NEWRULE {
            out.push_str(&rule_debug(batch.message(i)).expect("rule parses back"));
            out.push('\n'); // nft prints a newline after each rule
        }
    }
    out
}

fn golden(text: &str) -> String {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Compares line by line so that a failure shows the first differing line, not 20 KB.
fn assert_same_lines(got: &str, want: &str) {
    for (i, (g, w)) in got.lines().zip(want.lines()).enumerate() {
        assert_eq!(g, w, "line {} differs", i + 1);
    }
    assert_eq!(
        got.lines().count(),
        want.lines().count(),
        "line counts differ"
    );
}

#[test]
fn default_rules_match_nft_expression_for_expression() {
    let table = crate::plan::plan(&Config::embedded()).table;
    let batch = encode(&table).unwrap();
    assert_same_lines(
        &rules_debug(&batch),
        &golden(include_str!("../../../rulesets/default.netlink.txt")),
    );
}

#[test]
fn local_config_rules_match_nft_expression_for_expression() {
    let table = crate::plan::plan(&local_config()).table;
    let batch = encode(&table).unwrap();
    assert_same_lines(
        &rules_debug(&batch),
        &golden(include_str!("../../../rulesets/local.netlink.txt")),
    );
}

#[test]
fn kernel_handoff_rules_match_nft_expression_for_expression() {
    let cfg = Config::parse(
        include_str!("../../../rulesets/kernel.toml"),
        "rulesets/kernel.toml",
    )
    .expect("golden config is valid");
    let table = crate::plan::plan(&cfg).table;
    let batch = encode(&table).unwrap();
    // nft sends `dnat` with min only and PROTO_SPECIFIED; the kernel fills max = min and adds
    // MAP_IPS, and dumps that back. etp sends the dumped form so that audit compares equal
    // (`expr::Dnat`): the same rule, written out.
    let nft = golden(include_str!("../../../rulesets/kernel.netlink.txt")).replace(
        "addr_min reg 1 proto_min reg 2 flags 0x2",
        "addr_min reg 1 addr_max reg 1 proto_min reg 2 proto_max reg 2 flags 0x3",
    );
    assert_same_lines(&rules_debug(&batch), &nft);
}

#[test]
fn default_batch_message_sequence() {
    let table = crate::plan::plan(&Config::embedded()).table;
    let batch = encode(&table).unwrap();
    let objs: Vec<Object> = batch.messages().iter().map(|m| m.object).collect();
    let n_sets = table.sets.len();
    let mut want = vec![Object::AddTable];
    want.extend((0..n_sets).map(Object::Set));
    want.extend((0..table.meters.len()).map(Object::Meter));
    for (i, s) in table.sets.iter().enumerate() {
        want.push(Object::Elems {
            set: i,
            first: 0,
            count: s.elems.len(),
        });
    }
    for (ci, c) in table.chains.iter().enumerate() {
        want.push(Object::Chain(ci));
        want.extend((0..c.rules.len()).map(|rule| Object::Rule { chain: ci, rule }));
    }
    assert_eq!(objs, want);
    // Message types and sequence numbers as the kernel will see them.
    let parsed: Vec<_> = netlink::Msgs(batch.bytes()).collect();
    assert_eq!(parsed.len(), batch.messages().len());
    for (i, (p, m)) in parsed.iter().zip(batch.messages()).enumerate() {
        assert_eq!(p.ty, wire::nft_type(m.cmd));
        assert_eq!(p.seq, i as u32 + 1);
        assert_eq!(p.bytes.len(), m.len);
    }
    assert_eq!(batch.messages()[0].cmd, wire::NFT_MSG_NEWTABLE);
}

#[test]
fn replace_flushes_what_stays_and_deletes_what_goes() {
    let table = crate::plan::plan(&local_config()).table;
    let mut current = Current::default();
    // The kernel holds the prerouting chain as wanted, a stale chain, a kept set and a stale
    // set.
    current.chains.push(CurrentChain {
        name: "prerouting".into(),
        kind: "filter".into(),
        hook: 0,
        priority: -150,
    });
    current.chains.push(CurrentChain {
        name: "old".into(),
        kind: "filter".into(),
        hook: 0,
        priority: -150,
    });
    current.sets.push(CurrentSet {
        name: "bypass_ports".into(),
        key_type: 13,
        key_len: 2,
        flags: libc::NFT_SET_INTERVAL as u32,
    });
    current.sets.push(CurrentSet {
        name: "r9_gone_dst4".into(),
        key_type: 7,
        key_len: 4,
        flags: libc::NFT_SET_INTERVAL as u32,
    });
    let batch = encode_replace(&table, &current).unwrap();
    let objs: Vec<Object> = batch.messages().iter().map(|m| m.object).collect();
    assert_eq!(
        &objs[..7],
        &[
            Object::AddTable,
            Object::FlushRules(0),
            Object::FlushRules(1),
            Object::DelChain(1),
            Object::FlushSet(0),
            Object::DelSet(1),
            Object::Set(0), // bypass_dst4 is created; bypass_ports (index 2) is kept
        ]
    );
    let bypass_ports = table
        .sets
        .iter()
        .position(|s| s.name == "bypass_ports")
        .unwrap();
    assert!(!objs.contains(&Object::Set(bypass_ports)));
    assert!(objs.contains(&Object::Elems {
        set: bypass_ports,
        first: 0,
        count: table.sets[bypass_ports].elems.len()
    }));
    // prerouting is kept (not re-created), output and handoff are created.
    assert!(!objs.contains(&Object::Chain(0)));
    assert!(objs.contains(&Object::Chain(1)) && objs.contains(&Object::Chain(2)));
    assert_eq!(batch.label(&table, 3, None), "delete chain old");
}

#[test]
fn element_keys_are_start_and_exclusive_end_open_at_the_top() {
    let table = Table {
        name: "etp".into(),
        sets: vec![Set {
            name: "p".into(),
            elems: SetElems::Ports(vec![
                PortRange {
                    first: 53,
                    last: 53,
                },
                PortRange {
                    first: 1024,
                    last: 65535,
                },
            ]),
        }],
        meters: vec![],
        chains: vec![],
    };
    let batch = encode(&table).unwrap();
    let i = batch
        .messages()
        .iter()
        .position(|m| m.cmd == wire::NFT_MSG_NEWSETELEM)
        .unwrap();
    let m = netlink::Msgs(batch.message(i)).next().unwrap();
    let (_, elems) = m
        .nfgen_attrs()
        .find(|(t, _)| *t == wire::NFTA_SET_ELEM_LIST_ELEMENTS)
        .unwrap();
    let mut seen = Vec::new();
    for (_, e) in netlink::Attrs(elems) {
        let mut key = vec![];
        let mut flags = 0;
        let mut udata = false;
        for (t, v) in netlink::Attrs(e) {
            match t {
                wire::NFTA_SET_ELEM_KEY => key = netlink::Attrs(v).next().unwrap().1.to_vec(),
                wire::NFTA_SET_ELEM_FLAGS => flags = u32::from_be_bytes(v.try_into().unwrap()),
                wire::NFTA_SET_ELEM_USERDATA => udata = true,
                _ => {}
            }
        }
        seen.push((key, flags, udata));
    }
    assert_eq!(
        seen,
        vec![
            (vec![0, 53], 0, false),
            (vec![0, 54], 1, false),
            (vec![4, 0], 0, true), // open interval: no end element, flagged for nft list
        ]
    );
    // The same keys model.rs documents.
    assert_eq!(
        table.sets[0].elems.key_intervals(),
        vec![(vec![0, 53], Some(vec![0, 54])), (vec![4, 0], None)]
    );
}

#[test]
fn big_sets_split_into_messages_that_fit_and_labels_find_the_element() {
    let nets: Vec<_> = (0..100_000u32)
        .map(|i| ipnetwork::Ipv4Network::new((0x0a00_0000 + i * 4).into(), 30).unwrap())
        .collect();
    let table = Table {
        name: "etp".into(),
        sets: vec![Set {
            name: "r0_big_dst4".into(),
            elems: SetElems::V4(nets),
        }],
        meters: vec![],
        chains: vec![],
    };
    let batch = encode(&table).unwrap();
    let elem_msgs: Vec<(usize, &MsgInfo)> = batch
        .messages()
        .iter()
        .enumerate()
        .filter(|(_, m)| m.cmd == wire::NFT_MSG_NEWSETELEM)
        .collect();
    assert!(elem_msgs.len() > 50, "{} messages", elem_msgs.len());
    let mut covered = 0;
    for (_, m) in &elem_msgs {
        assert!(m.len <= nftnl::nft_nlmsg_maxsize() as usize);
        assert!(m.len < 65_535);
        if let Object::Elems { first, count, .. } = m.object {
            assert_eq!(first, covered);
            covered += count;
        }
    }
    assert_eq!(covered, 100_000);
    // An extended-ack offset inside the 3rd element of the second message names it.
    let (idx, m) = elem_msgs[1];
    let Object::Elems { first, .. } = m.object else {
        unreachable!()
    };
    let msg = batch.message(idx);
    let (_, elems) = netlink::Msgs(msg)
        .next()
        .unwrap()
        .nfgen_attrs()
        .find(|(t, _)| *t == wire::NFTA_SET_ELEM_LIST_ELEMENTS)
        .unwrap();
    let third_end = netlink::Attrs(elems).nth(5).unwrap().1; // start,end pairs: 5 = 3rd end
    let off = third_end.as_ptr() as usize - msg.as_ptr() as usize;
    let label = batch.label(&table, idx, Some(off as u32));
    let want = table.sets[0].elems.elem_text(first + 2);
    assert_eq!(label, format!("set r0_big_dst4 element {want}"));
}
