//! Reads etp's table back over netlink and compares it with the desired `model::Table`.
//!
//! Rules are compared by their libnftnl expression text (counter values normalised away) and
//! comment, in order; the desired text comes from encoding the model, so a rule that `encode`
//! would write identically is in sync. Interval sets come back as start/end element pairs, in any
//! order (rbtree dumps are descending), and are rebuilt into intervals before comparing.

use std::fmt;

use super::current::{key_type, meter_key, Current};
use super::encode::{encode, Object};
use super::error::NftError;
use super::socket::Nft;
use super::text::{rule_text, RuleText};
use super::wire;
use crate::kernel::netlink::{be32, Attrs, Msgs};
use crate::model::{interval_text, Meter, Set, Table};

/// A difference between the kernel and the desired table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableDrift {
    MissingTable {
        table: String,
    },
    MissingChain {
        chain: String,
    },
    ExtraChain {
        chain: String,
    },
    ChangedChain {
        chain: String,
        want: String,
        have: String,
    },
    MissingSet {
        set: String,
    },
    ExtraSet {
        set: String,
    },
    ChangedSet {
        set: String,
        want: String,
        have: String,
    },
    MissingRule {
        chain: String,
        comment: String,
        text: String,
    },
    ExtraRule {
        chain: String,
        handle: u64,
        comment: String,
        text: String,
    },
    MissingElement {
        set: String,
        elem: String,
    },
    ExtraElement {
        set: String,
        elem: String,
    },
}

impl fmt::Display for TableDrift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TableDrift::MissingTable { table } => write!(f, "missing table inet {table}"),
            TableDrift::MissingChain { chain } => write!(f, "missing chain {chain}"),
            TableDrift::ExtraChain { chain } => write!(f, "extra chain {chain}"),
            TableDrift::ChangedChain { chain, want, have } => {
                write!(f, "changed chain {chain}: want {want}, have {have}")
            }
            TableDrift::MissingSet { set } => write!(f, "missing set {set}"),
            TableDrift::ExtraSet { set } => write!(f, "extra set {set}"),
            TableDrift::ChangedSet { set, want, have } => {
                write!(f, "changed set {set}: want {want}, have {have}")
            }
            TableDrift::MissingRule {
                chain,
                comment,
                text,
            } => {
                write!(f, "missing rule in chain {chain}: \"{comment}\": {text}")
            }
            TableDrift::ExtraRule {
                chain,
                handle,
                comment,
                text,
            } => write!(
                f,
                "extra rule in chain {chain} (handle {handle}): \"{comment}\": {text}"
            ),
            TableDrift::MissingElement { set, elem } => {
                write!(f, "missing element {elem} in set {set}")
            }
            TableDrift::ExtraElement { set, elem } => {
                write!(f, "extra element {elem} in set {set}")
            }
        }
    }
}

const NFTA_RULE_TABLE: u16 = 1;

fn hook_name(n: u32) -> String {
    // NF_INET_* numbering.
    match n {
        0 => "prerouting".into(),
        1 => "input".into(),
        2 => "forward".into(),
        3 => "output".into(),
        4 => "postrouting".into(),
        n => format!("hook{n}"),
    }
}

fn chain_desc(kind: &str, hook: &str, prio: i32) -> String {
    format!("type {kind} hook {hook} priority {prio}")
}

fn set_desc(key_type: u32, key_len: u32, flags: u32) -> String {
    format!("key type {key_type} len {key_len} flags {flags:#x}")
}

/// Rebuilds intervals from dumped elements `(key, is_end)`: sorted by key with ends before
/// starts at the same key (adjacent intervals), a start followed by its end; an end without a
/// start (nft's leading zero element) is ignored; a trailing start is open-ended.
pub(crate) fn intervals(mut elems: Vec<(Vec<u8>, bool)>) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    elems.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    let mut out = Vec::new();
    let mut open: Option<Vec<u8>> = None;
    for (key, is_end) in elems {
        if is_end {
            if let Some(s) = open.take() {
                out.push((s, Some(key)));
            }
        } else if let Some(s) = open.replace(key) {
            out.push((s, None));
        }
    }
    if let Some(s) = open {
        out.push((s, None));
    }
    out
}

pub(crate) fn parse_elems(msgs: &[Vec<u8>]) -> Vec<(Vec<u8>, bool)> {
    let mut out = Vec::new();
    for raw in msgs {
        for m in Msgs(raw) {
            for (ty, d) in m.nfgen_attrs() {
                if ty != wire::NFTA_SET_ELEM_LIST_ELEMENTS {
                    continue;
                }
                for (_, elem) in Attrs(d) {
                    let mut key = None;
                    let mut end = false;
                    for (t, v) in Attrs(elem) {
                        if t == wire::NFTA_SET_ELEM_KEY {
                            key = Attrs(v)
                                .find(|(t, _)| *t == wire::NFTA_DATA_VALUE)
                                .map(|(_, k)| k.to_vec());
                        } else if t == wire::NFTA_SET_ELEM_FLAGS {
                            end = be32(v) & wire::NFT_SET_ELEM_INTERVAL_END != 0;
                        }
                    }
                    if let Some(k) = key {
                        out.push((k, end));
                    }
                }
            }
        }
    }
    out
}

/// Longest common subsequence alignment of two rule lists: (missing from have, extra in have).
fn diff_rules<'a>(
    want: &'a [RuleText],
    have: &'a [RuleText],
) -> (Vec<&'a RuleText>, Vec<&'a RuleText>) {
    let same = |a: &RuleText, b: &RuleText| a.exprs == b.exprs && a.comment == b.comment;
    let (n, m) = (want.len(), have.len());
    let mut l = vec![vec![0u32; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            l[i][j] = if same(&want[i], &have[j]) {
                l[i + 1][j + 1] + 1
            } else {
                l[i + 1][j].max(l[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let (mut missing, mut extra) = (Vec::new(), Vec::new());
    while i < n && j < m {
        if same(&want[i], &have[j]) {
            i += 1;
            j += 1;
        } else if l[i + 1][j] >= l[i][j + 1] {
            missing.push(&want[i]);
            i += 1;
        } else {
            extra.push(&have[j]);
            j += 1;
        }
    }
    missing.extend(want[i..].iter());
    extra.extend(have[j..].iter());
    (missing, extra)
}

/// Chains: missing, changed (type, hook, priority) and extra.
fn audit_chains(table: &Table, current: &Current, drift: &mut Vec<TableDrift>) {
    for c in &table.chains {
        let want = chain_desc(&c.kind.to_string(), &c.hook.to_string(), c.priority);
        match current.chains.iter().find(|k| k.name == c.name) {
            None => drift.push(TableDrift::MissingChain {
                chain: c.name.clone(),
            }),
            Some(k) if !k.matches(c) => drift.push(TableDrift::ChangedChain {
                chain: c.name.clone(),
                want,
                have: chain_desc(&k.kind, &hook_name(k.hook), k.priority),
            }),
            Some(_) => {}
        }
    }
    for k in &current.chains {
        if !table.chains.iter().any(|c| c.name == k.name) {
            drift.push(TableDrift::ExtraChain {
                chain: k.name.clone(),
            });
        }
    }
}

/// The desired rules as text, per chain, from encoding `table`.
fn want_rules(table: &Table) -> Result<Vec<Vec<RuleText>>, NftError> {
    let batch = encode(table)?;
    let mut want_rules: Vec<Vec<RuleText>> = vec![Vec::new(); table.chains.len()];
    for (i, m) in batch.messages().iter().enumerate() {
        if let Object::Rule { chain, .. } = m.object {
            if let Some(t) = rule_text(batch.message(i)) {
                want_rules[chain].push(t);
            }
        }
    }
    Ok(want_rules)
}

/// A desired set against the kernel's: `false` (drift recorded) when it is missing or its
/// key type, length or flags differ, so its elements are not worth comparing.
fn audit_set_header(s: &Set, current: &Current, drift: &mut Vec<TableDrift>) -> bool {
    let (kt, kl) = key_type(&s.elems);
    let want = set_desc(kt, kl, libc::NFT_SET_INTERVAL as u32);
    match current.sets.iter().find(|k| k.name == s.name) {
        None => {
            drift.push(TableDrift::MissingSet {
                set: s.name.clone(),
            });
            false
        }
        Some(k) if !k.matches(s) => {
            drift.push(TableDrift::ChangedSet {
                set: s.name.clone(),
                want,
                have: set_desc(k.key_type, k.key_len, k.flags),
            });
            false
        }
        Some(_) => true,
    }
}

/// A meter's dynamic set against the kernel's: the set itself, never its keys (the kernel
/// fills them at run time).
fn audit_meter(m: &Meter, current: &Current, drift: &mut Vec<TableDrift>) {
    let (kt, kl, flags) = meter_key(m);
    match current.sets.iter().find(|k| k.name == m.name) {
        None => drift.push(TableDrift::MissingSet {
            set: m.name.clone(),
        }),
        Some(k) if !k.matches_meter(m) => drift.push(TableDrift::ChangedSet {
            set: m.name.clone(),
            want: set_desc(kt, kl, flags),
            have: set_desc(k.key_type, k.key_len, k.flags),
        }),
        Some(_) => {}
    }
}

/// The rules of a GETRULE dump; a malformed message is logged and skipped, never trusted.
pub(crate) fn rules_from_dump(msgs: &[Vec<u8>]) -> Vec<RuleText> {
    let mut out = Vec::new();
    for m in msgs.iter().flat_map(|raw| Msgs(raw)) {
        match rule_text(m.bytes) {
            Some(t) => out.push(t),
            None => tracing::warn!(
                bytes = m.bytes.len(),
                msg_type = m.ty,
                "nf_tables rule dump: a message that does not parse as a rule; skipped"
            ),
        }
    }
    out
}

impl Nft {
    /// Compares the kernel's `table inet NAME` with `table`; empty when in sync.
    pub fn audit(&mut self, table: &Table) -> Result<Vec<TableDrift>, NftError> {
        let name = table.name.as_str();
        if !self.table_exists(name)? {
            return Ok(vec![TableDrift::MissingTable {
                table: name.to_string(),
            }]);
        }
        let mut drift = Vec::new();
        let current = Current::read(self, name)?;
        audit_chains(table, &current, &mut drift);
        self.audit_rules(table, &mut drift)?;
        for s in &table.sets {
            if audit_set_header(s, &current, &mut drift) {
                self.audit_elements(name, s, &mut drift)?;
            }
        }
        for m in &table.meters {
            audit_meter(m, &current, &mut drift);
        }
        for k in &current.sets {
            if !table.sets.iter().any(|s| s.name == k.name)
                && !table.meters.iter().any(|m| m.name == k.name)
            {
                drift.push(TableDrift::ExtraSet {
                    set: k.name.clone(),
                });
            }
        }
        Ok(drift)
    }

    /// Rules, chain by chain: the desired text from our own encoding, the kernel's from a
    /// GETRULE dump, aligned in order.
    fn audit_rules(&mut self, table: &Table, drift: &mut Vec<TableDrift>) -> Result<(), NftError> {
        let want_rules = want_rules(table)?;
        let have_rules = self.have_rules(&table.name)?;
        for (ci, c) in table.chains.iter().enumerate() {
            let have: Vec<RuleText> = have_rules
                .iter()
                .filter(|r| r.chain == c.name)
                .cloned()
                .collect();
            let (missing, extra) = diff_rules(&want_rules[ci], &have);
            for r in missing {
                drift.push(TableDrift::MissingRule {
                    chain: c.name.clone(),
                    comment: r.comment.clone().unwrap_or_default(),
                    text: r.exprs_line(),
                });
            }
            for r in extra {
                drift.push(TableDrift::ExtraRule {
                    chain: c.name.clone(),
                    handle: r.handle,
                    comment: r.comment.clone().unwrap_or_default(),
                    text: r.exprs_line(),
                });
            }
        }
        Ok(())
    }

    /// Every rule of `table inet NAME` as text (GETRULE dump).
    pub fn have_rules(&mut self, name: &str) -> Result<Vec<RuleText>, NftError> {
        let rules = self.dump(
            wire::NFT_MSG_GETRULE,
            &[(NFTA_RULE_TABLE, name)],
            "GETRULE dump",
        )?;
        Ok(rules_from_dump(&rules))
    }

    /// A set's elements (GETSETELEM dump) against the desired intervals.
    fn audit_elements(
        &mut self,
        name: &str,
        s: &Set,
        drift: &mut Vec<TableDrift>,
    ) -> Result<(), NftError> {
        let raw = self.dump(
            wire::NFT_MSG_GETSETELEM,
            &[
                (wire::NFTA_SET_ELEM_LIST_TABLE, name),
                (wire::NFTA_SET_ELEM_LIST_SET, &s.name),
            ],
            "GETSETELEM dump",
        )?;
        let mut have = intervals(parse_elems(&raw));
        let mut want = s.elems.key_intervals();
        want.sort();
        have.sort();
        let (mut i, mut j) = (0, 0);
        while i < want.len() || j < have.len() {
            let ord = match (want.get(i), have.get(j)) {
                (Some(a), Some(b)) => a.cmp(b),
                (Some(_), None) => std::cmp::Ordering::Less,
                _ => std::cmp::Ordering::Greater,
            };
            match ord {
                std::cmp::Ordering::Equal => {
                    i += 1;
                    j += 1;
                }
                std::cmp::Ordering::Less => {
                    let (a, b) = &want[i];
                    drift.push(TableDrift::MissingElement {
                        set: s.name.clone(),
                        elem: interval_text(a, b.as_deref()),
                    });
                    i += 1;
                }
                std::cmp::Ordering::Greater => {
                    let (a, b) = &have[j];
                    drift.push(TableDrift::ExtraElement {
                        set: s.name.clone(),
                        elem: interval_text(a, b.as_deref()),
                    });
                    j += 1;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_rebuild_descending_dumps_with_adjacent_ranges() {
        let k = |x: u8| vec![0, x];
        // [1,3) [3,5) [9,open), dumped descending, plus nft's leading zero end element.
        let dumped = vec![
            (k(9), false),
            (k(5), true),
            (k(3), false),
            (k(3), true),
            (k(1), false),
            (k(0), true),
        ];
        assert_eq!(
            intervals(dumped),
            vec![(k(1), Some(k(3))), (k(3), Some(k(5))), (k(9), None)]
        );
    }
}
