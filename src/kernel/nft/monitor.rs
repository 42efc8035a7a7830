//! nf_tables change notifications: the multicast group `NFNLGRP_NFTABLES`, what `nft monitor`
//! reads. After every committed transaction the kernel sends one message per object that
//! changed (table, chain, rule, set, element, ...) and a `NEWGEN` with the new generation id.
//!
//! etp only asks one question of them: did a change touch *its* table? Other agents on a node
//! (kube-proxy in nftables mode, a CNI) commit often, and their changes must not cost an audit.
//! Every per-object notification carries its table's name as attribute 1 (`NFTA_TABLE_NAME`,
//! `NFTA_CHAIN_TABLE`, `NFTA_RULE_TABLE`, `NFTA_SET_TABLE`, `NFTA_SET_ELEM_LIST_TABLE`, ...;
//! include/uapi/linux/netfilter/nf_tables.h), and the family in its nfgenmsg header, which is
//! all [`touches_table`] reads. A receive-queue overrun (`ENOBUFS`: notifications were lost,
//! as after one of etp's own large applies) counts as a change, since a lost message may have
//! named etp's table; the resync it triggers is cheap when the generation id says nothing moved.

use std::io;

use rtnetlink::sys::{protocols::NETLINK_NETFILTER, AsyncSocket, AsyncSocketExt, TokioSocket};

use super::wire::{NFNL_SUBSYS_NFTABLES, NFT_MSG_NEWGEN};
use crate::kernel::netlink::{from_kernel, Msgs};

/// `NFNLGRP_NFTABLES` (include/uapi/linux/netfilter/nfnetlink.h).
pub const NFNLGRP_NFTABLES: u32 = 7;
/// Room for a burst of notifications; an overrun is handled (see the module docs).
const RCVBUF: usize = 4 << 20;
const RECV_CHUNK: usize = 256 * 1024;

/// Whether any nf_tables notification in `buf` names table `name` of `family`.
pub fn touches_table(buf: &[u8], family: u8, name: &str) -> bool {
    Msgs(buf).any(|m| {
        m.ty >> 8 == NFNL_SUBSYS_NFTABLES
            && m.ty & 0xff != NFT_MSG_NEWGEN
            && m.payload().first() == Some(&family)
            && m.nfgen_attrs()
                .any(|(ty, v)| ty == 1 && v.split(|b| *b == 0).next() == Some(name.as_bytes()))
    })
}

/// A netlink socket subscribed to nf_tables notifications in the calling thread's namespace.
pub struct NftMonitor {
    sock: TokioSocket,
    buf: Vec<u8>,
    family: u8,
    table: String,
}

impl NftMonitor {
    /// Subscribes; the socket is bound to a kernel-chosen port id first (an unbound netlink
    /// socket has port id 0 and would be skipped by broadcasts that exclude no one).
    pub fn open(family: u8, table: &str) -> io::Result<NftMonitor> {
        let mut sock = TokioSocket::new(NETLINK_NETFILTER)?;
        let s = sock.socket_mut();
        s.bind_auto()?;
        s.add_membership(NFNLGRP_NFTABLES)?;
        // Best effort: without it the default buffer overruns sooner, which is handled.
        let _ = s.set_rx_buf_sz(RCVBUF);
        Ok(NftMonitor {
            sock,
            buf: Vec::with_capacity(RECV_CHUNK),
            family,
            table: table.to_string(),
        })
    }

    /// Waits for a notification batch that touches the table (or for lost notifications).
    pub async fn changed(&mut self) -> io::Result<()> {
        loop {
            self.buf.clear();
            match self.sock.recv_from(&mut self.buf).await {
                Ok(from) if !from_kernel(&from, "nf_tables notification") => {}
                Ok(_) if touches_table(&self.buf, self.family, &self.table) => return Ok(()),
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::netlink::{begin_nfgen as begin_msg, end_msg, put_attr, put_strz};
    use crate::kernel::nft::wire::nft_type;
    use crate::kernel::nft::wire::{
        NFTA_GEN_ID, NFT_MSG_DELTABLE, NFT_MSG_NEWRULE, NFT_MSG_NEWSETELEM,
    };

    const INET: u8 = 1;
    const IP: u8 = 2;

    fn notification(buf: &mut Vec<u8>, cmd: u16, family: u8, table: &str) {
        let s = begin_msg(buf, nft_type(cmd), 0, 0, family, 0);
        put_strz(buf, 1, table);
        put_strz(buf, 2, "object");
        end_msg(buf, s);
    }

    #[test]
    fn only_changes_to_etps_own_table_count() {
        let mut other = Vec::new();
        notification(&mut other, NFT_MSG_NEWRULE, IP, "kube-proxy");
        notification(&mut other, NFT_MSG_NEWSETELEM, INET, "etp2");
        notification(&mut other, NFT_MSG_DELTABLE, IP, "etp"); // same name, other family
        let g = begin_msg(&mut other, nft_type(NFT_MSG_NEWGEN), 0, 0, 0, 0);
        put_attr(&mut other, NFTA_GEN_ID, &7u32.to_be_bytes());
        end_msg(&mut other, g);
        assert!(!touches_table(&other, INET, "etp"));

        let mut ours = other.clone();
        notification(&mut ours, NFT_MSG_DELTABLE, INET, "etp");
        assert!(touches_table(&ours, INET, "etp"));
        let mut rule = Vec::new();
        notification(&mut rule, NFT_MSG_NEWRULE, INET, "etp");
        assert!(touches_table(&rule, INET, "etp"));
    }

    #[test]
    fn truncated_buffers_are_not_read_past() {
        let mut b = Vec::new();
        notification(&mut b, NFT_MSG_DELTABLE, INET, "etp");
        for cut in 0..b.len() {
            // Whatever the cut, no panic, and a cut message is not counted.
            assert!(!touches_table(&b[..cut], INET, "etp"), "cut at {cut}");
        }
    }
}
