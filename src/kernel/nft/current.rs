//! What etp's table holds in the kernel now: its base chains and sets, read over netlink.
//! `Nft::apply` encodes its in-place replace against it (`encode_replace`), and `audit`
//! compares the desired table with it. Rules and set elements are read by `audit` alone.

use super::error::NftError;
use super::socket::Nft;
use super::wire;
use crate::kernel::netlink::{be32, strz, Attrs, Msgs};
use crate::model::{self, SetElems};

/// A base chain as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentChain {
    pub name: String,
    /// `filter`, `route`, `nat`
    pub kind: String,
    /// NF_INET_* hook number.
    pub hook: u32,
    pub priority: i32,
}

/// A set as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentSet {
    pub name: String,
    pub key_type: u32,
    pub key_len: u32,
    pub flags: u32,
}

/// What the kernel's table holds now (empty when the table does not exist).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Current {
    pub chains: Vec<CurrentChain>,
    pub sets: Vec<CurrentSet>,
}

impl CurrentChain {
    pub(super) fn matches(&self, c: &model::Chain) -> bool {
        self.name == c.name
            && self.kind == c.kind.to_string()
            && self.hook == hook_number(c.hook)
            && self.priority == c.priority
    }
}

impl CurrentSet {
    pub(super) fn matches(&self, s: &model::Set) -> bool {
        let (kt, kl) = key_type(&s.elems);
        self.name == s.name
            && self.key_type == kt
            && self.key_len == kl
            && self.flags == libc::NFT_SET_INTERVAL as u32
    }
}

impl CurrentSet {
    /// Size and timeout are not compared: the kernel reports them back only in part.
    pub fn matches_meter(&self, m: &model::Meter) -> bool {
        let (kt, kl, flags) = meter_key(m);
        self.name == m.name && self.key_type == kt && self.key_len == kl && self.flags == flags
    }
}

/// Key type, key length and set flags of a meter's dynamic set.
pub fn meter_key(m: &model::Meter) -> (u32, u32, u32) {
    let (kt, kl) = match m.family {
        model::Family::V4 => (7, 4),
        model::Family::V6 => (8, 16),
    };
    let mut flags = libc::NFT_SET_EVAL as u32;
    if m.timeout_secs.is_some() {
        flags |= libc::NFT_SET_TIMEOUT as u32;
    }
    (kt, kl, flags)
}

impl Current {
    /// The chains and sets of `table inet NAME` now (empty when the table does not exist).
    pub fn read(nft: &mut Nft, name: &str) -> Result<Current, NftError> {
        let mut current = Current::default();
        if !nft.table_exists(name)? {
            return Ok(current);
        }
        let chains = nft.dump(
            wire::NFT_MSG_GETCHAIN,
            &[(NFTA_CHAIN_TABLE, name)],
            "GETCHAIN dump",
        )?;
        current.chains = chains_from_dump(&chains, name);
        let sets = nft.dump(
            wire::NFT_MSG_GETSET,
            &[(NFTA_SET_TABLE, name)],
            "GETSET dump",
        )?;
        current.sets = sets_from_dump(&sets, name);
        Ok(current)
    }
}

/// The chains of table `name` in a GETCHAIN dump.
pub(crate) fn chains_from_dump(msgs: &[Vec<u8>], name: &str) -> Vec<CurrentChain> {
    let mut out = Vec::new();
    for m in msgs.iter().flat_map(|raw| Msgs(raw)) {
        let mut t = String::new();
        let mut c = CurrentChain {
            name: String::new(),
            kind: String::new(),
            hook: u32::MAX,
            priority: 0,
        };
        for (ty, d) in m.nfgen_attrs() {
            match ty {
                NFTA_CHAIN_TABLE => t = strz(d),
                NFTA_CHAIN_NAME => c.name = strz(d),
                NFTA_CHAIN_TYPE => c.kind = strz(d),
                NFTA_CHAIN_HOOK => {
                    for (h, v) in Attrs(d) {
                        match h {
                            NFTA_HOOK_HOOKNUM => c.hook = be32(v),
                            NFTA_HOOK_PRIORITY => c.priority = be32(v) as i32,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        if t == name {
            out.push(c);
        }
    }
    out
}

/// The sets of table `name` in a GETSET dump.
pub(crate) fn sets_from_dump(msgs: &[Vec<u8>], name: &str) -> Vec<CurrentSet> {
    let mut out = Vec::new();
    for m in msgs.iter().flat_map(|raw| Msgs(raw)) {
        let mut t = String::new();
        let mut s = CurrentSet {
            name: String::new(),
            key_type: 0,
            key_len: 0,
            flags: 0,
        };
        for (ty, d) in m.nfgen_attrs() {
            match ty {
                NFTA_SET_TABLE => t = strz(d),
                NFTA_SET_NAME => s.name = strz(d),
                NFTA_SET_FLAGS => s.flags = be32(d),
                NFTA_SET_KEY_TYPE => s.key_type = be32(d),
                NFTA_SET_KEY_LEN => s.key_len = be32(d),
                _ => {}
            }
        }
        if t == name {
            out.push(s);
        }
    }
    out
}

/// NF_INET_* number of a hook.
pub fn hook_number(h: model::Hook) -> u32 {
    match h {
        model::Hook::Prerouting => libc::NF_INET_PRE_ROUTING as u32,
        model::Hook::Output => libc::NF_INET_LOCAL_OUT as u32,
    }
}

/// nft's key type id and length for a set's elements.
pub fn key_type(elems: &SetElems) -> (u32, u32) {
    match elems {
        SetElems::V4(_) => (7, 4),     // ipv4_addr
        SetElems::V6(_) => (8, 16),    // ipv6_addr
        SetElems::Ports(_) => (13, 2), // inet_service, big endian
    }
}

// Attribute numbers of the dumps we read.
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
