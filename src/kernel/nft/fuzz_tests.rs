//! Fuzz tests (proptest) of every nf_tables reply and notification parser: message and
//! attribute framing, acks, the monitor's table filter, the chain/set/element/rule dumps that
//! audit and apply read, libnftnl's rule parser and the interval printer. No input may panic
//! (or crash libnftnl), and nothing may be read past a length the input declares.
//! Seeds are etp's own encodings of the embedded and example configs (the kernel's layout).

use std::sync::OnceLock;

use proptest::prelude::*;

use super::audit::{intervals, parse_elems, rules_from_dump};
use super::current::{chains_from_dump, sets_from_dump};
use super::encode::encode;
use super::monitor::touches_table;
use super::text::{comment_from_udata, rule_debug};
use crate::config::Config;
use crate::kernel::fuzz_gen::{self, attr, message};
use crate::kernel::netlink::{parse_ack, Attrs, Msgs, NLMSG_ERROR};
use crate::model::interval_text;

/// Every message of etp's batches for the embedded and example configs, plus acks and errors
/// with extended-ack offsets.
fn seeds() -> Vec<Vec<u8>> {
    static SEEDS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    SEEDS
        .get_or_init(|| {
            let example = include_str!("../../../deploy/etp.example.toml");
            let mut out = Vec::new();
            for cfg in [
                Config::embedded(),
                Config::parse(example, "example").expect("example config"),
            ] {
                let batch = encode(&crate::plan::plan(&cfg).table).expect("encode");
                out.extend((0..batch.messages().len()).map(|i| batch.message(i).to_vec()));
            }
            for (errno, flags) in [(0i32, 0x100u16), (-22, 0x200), (-17, 0x300)] {
                let mut p = errno.to_ne_bytes().to_vec();
                p.extend(message(0x0a06, 5, 77, &[]));
                p.extend(attr(2, &24u32.to_ne_bytes())); // NLMSGERR_ATTR_OFFS
                out.push(message(NLMSG_ERROR, flags, 77, &p));
            }
            out
        })
        .clone()
}

fn buffers() -> impl Strategy<Value = Vec<u8>> {
    fuzz_gen::netlink(seeds())
}

proptest! {
    #[test]
    fn framing_and_acks_stay_within_the_buffer(buf in buffers()) {
        let start = buf.as_ptr() as usize;
        let within = |s: &[u8]| {
            let p = s.as_ptr() as usize;
            s.is_empty() || (p >= start && p + s.len() <= start + buf.len())
        };
        for m in Msgs(&buf) {
            prop_assert!(within(m.bytes) && m.bytes.len() >= 16);
            prop_assert!(within(m.payload()));
            for (_, d) in m.nfgen_attrs() {
                prop_assert!(within(d));
                for (_, inner) in Attrs(d) {
                    prop_assert!(within(inner));
                }
            }
            let _ = parse_ack(&m);
        }
    }

    #[test]
    fn the_monitor_filter_takes_any_notification(buf in buffers()) {
        let _ = touches_table(&buf, libc::NFPROTO_INET as u8, "etp");
    }

    #[test]
    fn chain_set_and_element_dumps_take_any_reply(
        bufs in prop::collection::vec(buffers(), 1..3)
    ) {
        let _ = chains_from_dump(&bufs, "etp");
        let _ = sets_from_dump(&bufs, "etp");
        for (start, end) in intervals(parse_elems(&bufs)) {
            let _ = interval_text(&start, end.as_deref());
        }
    }

    #[test]
    fn rule_dumps_take_any_reply(bufs in prop::collection::vec(buffers(), 1..3)) {
        for r in rules_from_dump(&bufs) {
            let _ = r.exprs_line();
        }
        for b in &bufs {
            for m in Msgs(b) {
                let _ = rule_debug(m.bytes);
            }
        }
    }

    #[test]
    fn intervals_print_whatever_the_key_lengths(
        start in prop::collection::vec(any::<u8>(), 0..20),
        end in prop::option::of(prop::collection::vec(any::<u8>(), 0..20)),
    ) {
        let _ = interval_text(&start, end.as_deref());
    }

    #[test]
    fn rule_comments_take_any_userdata(ud in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = comment_from_udata(&ud);
    }
}

// Regressions: inputs the fuzz tests found.

/// A rule whose NFTA_RULE_ID is one byte long: libnftnl exited the process ("nf_tables kernel
/// ABI is broken"). Now the message is refused before libnftnl sees it.
#[test]
fn a_rule_attribute_of_the_wrong_size_does_not_end_the_process() {
    let mut p = vec![1u8, 0, 0, 0];
    p.extend(attr(1, b"etp\0"));
    p.extend(attr(9, &[7])); // NFTA_RULE_ID: a u32, here 1 byte
    let msg = message(0x0a06, 0, 1, &p);
    assert!(super::text::rule_text(&msg).is_none());
    assert!(rules_from_dump(&[msg]).is_empty());
    // The same inside an expression: cmp's NFTA_CMP_SREG must be 4 bytes.
    let mut data = attr(1, &[1, 2]);
    data.extend(attr(2, &0u32.to_be_bytes()));
    let mut e = attr(1, b"cmp\0");
    e.extend(attr(2, &data));
    let mut p = vec![1u8, 0, 0, 0];
    p.extend(attr(4, &attr(1, &e)));
    assert!(super::text::rule_text(&message(0x0a06, 0, 1, &p)).is_none());
    // A message whose length is not a multiple of 4: libmnl reads up to the aligned end, so
    // the copy's zero padding became a 4-byte NFTA_RULE_HANDLE (a u64): exit again.
    let mut p = vec![1u8, 0, 0, 0];
    p.extend(attr(1, b"etp\0"));
    p.extend([8, 0, 3, 0, 0x5e]);
    let mut msg = message(0x0a06, 0, 1, &p);
    msg.truncate(16 + p.len());
    let len = msg.len() as u32;
    msg[..4].copy_from_slice(&len.to_ne_bytes());
    assert!(super::text::rule_text(&msg).is_none());
    // An expression without a name (libnftnl dereferenced NULL).
    let mut p = vec![1u8, 0, 0, 0];
    p.extend(attr(4, &attr(1, &attr(2, &[]))));
    assert!(super::text::rule_text(&message(0x0a06, 0, 1, &p)).is_none());
}

/// An interval whose end key is shorter than its start indexed past the end.
#[test]
fn an_interval_end_of_another_length_is_printed_not_indexed() {
    assert_eq!(interval_text(&[0, 80], Some(&[])), "[00, 50]-[]");
    assert_eq!(
        interval_text(&[10, 0, 0, 0], Some(&[1])),
        "[0a, 00, 00, 00]-[01]"
    );
}

/// etp's own encodings still parse (the check refuses nothing the kernel sends).
#[test]
fn etps_own_rules_pass_the_libnftnl_check() {
    let rules: Vec<Vec<u8>> = seeds()
        .into_iter()
        .filter(|m| m.get(4..6) == Some(&0x0a06u16.to_ne_bytes()[..]))
        .collect();
    assert!(rules.len() > 10);
    assert_eq!(rules_from_dump(&rules).len(), rules.len());
}
