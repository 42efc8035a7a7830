//! nf_tables framing that libnftnl does not do for us, on top of the generic netlink codec
//! (`kernel::netlink`): message types and attribute numbers, and batch BEGIN/END with a
//! generation id.

use crate::kernel::netlink;

pub const NFNL_SUBSYS_NFTABLES: u16 = 10;
pub const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
pub const NFNL_MSG_BATCH_END: u16 = 0x11;
/// Attribute of BEGIN: the generation the batch was computed against (big endian u32).
pub const NFNL_BATCH_GENID: u16 = 1;

pub const NFT_MSG_NEWTABLE: u16 = 0;
pub const NFT_MSG_GETTABLE: u16 = 1;
pub const NFT_MSG_DELTABLE: u16 = 2;
pub const NFT_MSG_NEWCHAIN: u16 = 3;
pub const NFT_MSG_GETCHAIN: u16 = 4;
pub const NFT_MSG_DELCHAIN: u16 = 5;
pub const NFT_MSG_NEWRULE: u16 = 6;
pub const NFT_MSG_GETRULE: u16 = 7;
pub const NFT_MSG_DELRULE: u16 = 8;
pub const NFT_MSG_NEWSET: u16 = 9;
pub const NFT_MSG_GETSET: u16 = 10;
pub const NFT_MSG_DELSET: u16 = 11;
pub const NFT_MSG_NEWSETELEM: u16 = 12;
pub const NFT_MSG_GETSETELEM: u16 = 13;
pub const NFT_MSG_DELSETELEM: u16 = 14;
pub const NFT_MSG_NEWGEN: u16 = 15;
pub const NFT_MSG_GETGEN: u16 = 16;

/// `NFTA_GEN_ID` in a NEWGEN reply.
pub const NFTA_GEN_ID: u16 = 1;

pub const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
pub const NFTA_SET_ELEM_LIST_SET: u16 = 2;
pub const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
pub const NFTA_LIST_ELEM: u16 = 1;
pub const NFTA_SET_ELEM_KEY: u16 = 1;
pub const NFTA_SET_ELEM_FLAGS: u16 = 3;
pub const NFTA_SET_ELEM_USERDATA: u16 = 6;
pub const NFTA_DATA_VALUE: u16 = 1;
/// Element flag: this key is the (exclusive) end of an interval.
pub const NFT_SET_ELEM_INTERVAL_END: u32 = 1;

/// The nfnetlink message type of an nf_tables command.
pub fn nft_type(cmd: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | cmd
}

/// BEGIN of an nf_tables batch, with the expected generation when given.
pub fn batch_begin(seq: u32, genid: Option<u32>) -> Vec<u8> {
    let mut b = Vec::with_capacity(32);
    let s = netlink::begin_nfgen(
        &mut b,
        NFNL_MSG_BATCH_BEGIN,
        netlink::NLM_F_ACK,
        seq,
        0,
        NFNL_SUBSYS_NFTABLES,
    );
    if let Some(g) = genid {
        netlink::put_attr(&mut b, NFNL_BATCH_GENID, &g.to_be_bytes());
    }
    netlink::end_msg(&mut b, s);
    b
}

/// END of an nf_tables batch.
pub fn batch_end(seq: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(20);
    let s = netlink::begin_nfgen(
        &mut b,
        NFNL_MSG_BATCH_END,
        netlink::NLM_F_ACK,
        seq,
        0,
        NFNL_SUBSYS_NFTABLES,
    );
    netlink::end_msg(&mut b, s);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn begin_carries_genid_big_endian() {
        let b = batch_begin(7, Some(0x01020304));
        let m = netlink::Msgs(&b).next().unwrap();
        assert_eq!(m.ty, NFNL_MSG_BATCH_BEGIN);
        assert_eq!(m.seq, 7);
        assert_eq!(m.flags, netlink::NLM_F_REQUEST | netlink::NLM_F_ACK);
        // res_id is the subsystem, big endian.
        assert_eq!(&m.payload()[2..4], &[0, 10]);
        let attrs: Vec<_> = m.nfgen_attrs().collect();
        assert_eq!(attrs, vec![(NFNL_BATCH_GENID, &[1u8, 2, 3, 4][..])]);
    }
}
