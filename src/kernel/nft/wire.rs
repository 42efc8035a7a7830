//! Netlink framing that libnftnl does not do for us: batch BEGIN/END with a generation id, set
//! element messages written straight into the batch buffer (no per-element allocation), and a
//! reader for replies (acks, errors with extended-ack offsets, dump parts).
//!
//! Layout reminders (all native endian unless noted): `nlmsghdr` {len u32, type u16, flags u16,
//! seq u32, pid u32} then `nfgenmsg` {family u8, version u8, res_id be16}, then attributes
//! {len u16, type u16, payload, padding to 4}.

/// `NLMSG_ERROR`: an ack (error 0) or an error for one request.
pub const NLMSG_ERROR: u16 = 2;
/// `NLMSG_DONE`: end of a dump.
pub const NLMSG_DONE: u16 = 3;

pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
/// `NLM_F_ROOT | NLM_F_MATCH`
pub const NLM_F_DUMP: u16 = 0x300;
/// Set on an error message when it carries extended-ack attributes.
pub const NLM_F_ACK_TLVS: u16 = 0x200;

/// Extended ack attribute: offset of the offending attribute in the failing request.
pub const NLMSGERR_ATTR_OFFS: u16 = 2;

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

pub const NLMSG_HDRLEN: usize = 16;
pub const NFGEN_HDRLEN: usize = 4;

/// The nfnetlink message type of an nf_tables command.
pub fn nft_type(cmd: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | cmd
}

pub fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Starts a message at the end of `buf`; returns its offset for [`end_msg`].
pub fn begin_msg(
    buf: &mut Vec<u8>,
    ty: u16,
    flags: u16,
    seq: u32,
    family: u8,
    res_id: u16,
) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&0u32.to_ne_bytes()); // length, patched by end_msg
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
    buf.push(family);
    buf.push(0); // NFNETLINK_V0
    buf.extend_from_slice(&res_id.to_be_bytes());
    start
}

/// Patches the length of the message started at `start`.
pub fn end_msg(buf: &mut [u8], start: usize) {
    let len = (buf.len() - start) as u32;
    buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

/// A big-endian u32 attribute payload (0 when shorter).
pub fn be32(d: &[u8]) -> u32 {
    d.get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .unwrap_or(0)
}

/// A NUL-terminated string attribute payload.
pub fn strz(d: &[u8]) -> String {
    let end = d.iter().position(|&b| b == 0).unwrap_or(d.len());
    String::from_utf8_lossy(&d[..end]).into_owned()
}

/// Appends one attribute (padded).
pub fn put_attr(buf: &mut Vec<u8>, ty: u16, data: &[u8]) {
    let len = 4 + data.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(data);
    buf.resize(buf.len() + align4(len) - len, 0);
}

/// Appends a NUL-terminated string attribute.
pub fn put_strz(buf: &mut Vec<u8>, ty: u16, s: &str) {
    let len = 4 + s.len() + 1;
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(s.as_bytes());
    buf.push(0);
    buf.resize(buf.len() + align4(len) - len, 0);
}

/// Opens a nested attribute; close it with [`nest_end`]. libnftnl does not set NLA_F_NESTED and
/// nf_tables parses nests without it, so neither do we (the bytes then match nft's).
pub fn nest_start(buf: &mut Vec<u8>, ty: u16) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&0u16.to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    start
}

pub fn nest_end(buf: &mut [u8], start: usize) {
    let len = (buf.len() - start) as u16;
    buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
}

/// BEGIN of an nf_tables batch, with the expected generation when given.
pub fn batch_begin(seq: u32, genid: Option<u32>) -> Vec<u8> {
    let mut b = Vec::with_capacity(32);
    let s = begin_msg(
        &mut b,
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_ACK,
        seq,
        0,
        NFNL_SUBSYS_NFTABLES,
    );
    if let Some(g) = genid {
        put_attr(&mut b, NFNL_BATCH_GENID, &g.to_be_bytes());
    }
    end_msg(&mut b, s);
    b
}

/// END of an nf_tables batch.
pub fn batch_end(seq: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(20);
    let s = begin_msg(
        &mut b,
        NFNL_MSG_BATCH_END,
        NLM_F_ACK,
        seq,
        0,
        NFNL_SUBSYS_NFTABLES,
    );
    end_msg(&mut b, s);
    b
}

/// One netlink message of a received (or encoded) buffer.
#[derive(Debug, Clone, Copy)]
pub struct Msg<'a> {
    pub ty: u16,
    pub flags: u16,
    pub seq: u32,
    /// The whole message, header included.
    pub bytes: &'a [u8],
}

impl<'a> Msg<'a> {
    /// Bytes after the nlmsghdr.
    pub fn payload(&self) -> &'a [u8] {
        &self.bytes[NLMSG_HDRLEN.min(self.bytes.len())..]
    }

    /// Attributes after the nfgenmsg header (nf_tables messages).
    pub fn nft_attrs(&self) -> Attrs<'a> {
        Attrs(self.payload().get(NFGEN_HDRLEN..).unwrap_or(&[]))
    }
}

/// Iterates the messages in a buffer; stops at a truncated one.
pub struct Msgs<'a>(pub &'a [u8]);

impl<'a> Iterator for Msgs<'a> {
    type Item = Msg<'a>;
    fn next(&mut self) -> Option<Msg<'a>> {
        let b = self.0;
        if b.len() < NLMSG_HDRLEN {
            return None;
        }
        let len = u32::from_ne_bytes(b[0..4].try_into().ok()?) as usize;
        if len < NLMSG_HDRLEN || len > b.len() {
            return None;
        }
        let msg = Msg {
            ty: u16::from_ne_bytes([b[4], b[5]]),
            flags: u16::from_ne_bytes([b[6], b[7]]),
            seq: u32::from_ne_bytes(b[8..12].try_into().ok()?),
            bytes: &b[..len],
        };
        self.0 = &b[align4(len).min(b.len())..];
        Some(msg)
    }
}

/// Iterates attributes: `(type without flag bits, payload)`.
pub struct Attrs<'a>(pub &'a [u8]);

impl<'a> Iterator for Attrs<'a> {
    type Item = (u16, &'a [u8]);
    fn next(&mut self) -> Option<(u16, &'a [u8])> {
        let b = self.0;
        if b.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        if len < 4 || len > b.len() {
            return None;
        }
        let ty = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
        self.0 = &b[align4(len).min(b.len())..];
        Some((ty, &b[4..len]))
    }
}

/// A reply to one request: an ack (errno 0) or an error, with the extended-ack offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// Sequence number of the request it answers.
    pub seq: u32,
    /// 0 for an ack, else a positive errno.
    pub errno: i32,
    /// Offset of the offending attribute in the request (from its nlmsghdr), when the kernel
    /// said which one.
    pub offset: Option<u32>,
}

/// Parses an `NLMSG_ERROR` message.
pub fn parse_ack(m: &Msg<'_>) -> Option<Ack> {
    let p = m.payload();
    if p.len() < 4 + NLMSG_HDRLEN {
        return None;
    }
    let err = i32::from_ne_bytes(p[0..4].try_into().ok()?);
    // The echoed request header: its seq identifies the request.
    let seq = u32::from_ne_bytes(p[12..16].try_into().ok()?);
    let orig_len = u32::from_ne_bytes(p[4..8].try_into().ok()?) as usize;
    // With NETLINK_CAP_ACK only the header is echoed; else the whole request (errors only).
    let echoed = if m.flags & 0x100 != 0 || err == 0 {
        NLMSG_HDRLEN
    } else {
        align4(orig_len)
    };
    let mut offset = None;
    if m.flags & NLM_F_ACK_TLVS != 0 {
        if let Some(tlvs) = p.get(4 + echoed..) {
            for (ty, data) in Attrs(tlvs) {
                if ty == NLMSGERR_ATTR_OFFS && data.len() >= 4 {
                    offset = Some(u32::from_ne_bytes(data[0..4].try_into().ok()?));
                }
            }
        }
    }
    Some(Ack {
        seq,
        errno: -err,
        offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn begin_carries_genid_big_endian() {
        let b = batch_begin(7, Some(0x01020304));
        let m = Msgs(&b).next().unwrap();
        assert_eq!(m.ty, NFNL_MSG_BATCH_BEGIN);
        assert_eq!(m.seq, 7);
        assert_eq!(m.flags, NLM_F_REQUEST | NLM_F_ACK);
        // res_id is the subsystem, big endian.
        assert_eq!(&m.payload()[2..4], &[0, 10]);
        let attrs: Vec<_> = m.nft_attrs().collect();
        assert_eq!(attrs, vec![(NFNL_BATCH_GENID, &[1u8, 2, 3, 4][..])]);
    }

    #[test]
    fn attrs_are_padded_and_nests_sized() {
        let mut b = Vec::new();
        let s = begin_msg(&mut b, nft_type(NFT_MSG_NEWSETELEM), 0, 1, 1, 0);
        put_strz(&mut b, 1, "etp");
        let n = nest_start(&mut b, 3);
        put_attr(&mut b, 1, &[1, 2]);
        nest_end(&mut b, n);
        end_msg(&mut b, s);
        assert_eq!(b.len() % 4, 0);
        let m = Msgs(&b).next().unwrap();
        let attrs: Vec<_> = m.nft_attrs().collect();
        assert_eq!(attrs[0], (1, &b"etp\0"[..]));
        assert_eq!(attrs[1].0, 3);
        let inner: Vec<_> = Attrs(attrs[1].1).collect();
        assert_eq!(inner, vec![(1, &[1u8, 2][..])]);
    }
}
