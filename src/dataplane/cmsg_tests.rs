//! Control-message parsing on crafted buffers: what a kernel (or a bug) could hand
//! `recvmsg`'s caller. A length that does not cover a whole sockaddr, a length past the
//! buffer, a zero length, a family that does not match the type and a truncated control
//! buffer (`MSG_CTRUNC`) all yield no original destination (the datagram is then dropped and
//! counted), never a guess and never a read past what the header declares.

use std::mem::size_of;
use std::net::SocketAddr;

use super::sockopt::orig_dst_from_control;

/// `CMSG_LEN(0)`: the header rounded up to the control-buffer alignment.
const HDR: usize =
    (size_of::<libc::cmsghdr>() + size_of::<usize>() - 1) & !(size_of::<usize>() - 1);

fn cmsg(level: libc::c_int, ty: libc::c_int, declared_len: usize, data: &[u8]) -> Vec<u8> {
    // cmsghdr on Linux: cmsg_len (size_t), cmsg_level (int), cmsg_type (int).
    let mut b = Vec::new();
    b.extend_from_slice(&declared_len.to_ne_bytes());
    b.extend_from_slice(&level.to_ne_bytes());
    b.extend_from_slice(&ty.to_ne_bytes());
    b.resize(HDR, 0);
    b.extend_from_slice(data);
    b.resize((b.len() + 7) & !7, 0);
    b
}

fn sin(family: u16, port: u16, ip: [u8; 4]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&family.to_ne_bytes());
    d.extend_from_slice(&port.to_be_bytes());
    d.extend_from_slice(&ip);
    d.resize(size_of::<libc::sockaddr_in>(), 0);
    d
}

fn sin6(port: u16, ip: [u8; 16]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
    d.extend_from_slice(&port.to_be_bytes());
    d.extend_from_slice(&0u32.to_ne_bytes());
    d.extend_from_slice(&ip);
    d.extend_from_slice(&0u32.to_ne_bytes());
    d
}

const V4: libc::c_int = libc::IP_ORIGDSTADDR;
const V6: libc::c_int = libc::IPV6_ORIGDSTADDR;

fn v4_data() -> Vec<u8> {
    sin(libc::AF_INET as u16, 53, [10, 96, 0, 10])
}

#[test]
fn a_well_formed_orig_dst_is_read() {
    let d = v4_data();
    let buf = cmsg(libc::SOL_IP, V4, HDR + d.len(), &d);
    assert_eq!(
        orig_dst_from_control(&buf, 0),
        Some("10.96.0.10:53".parse::<SocketAddr>().unwrap())
    );
    let mut ip = [0u8; 16];
    ip[0] = 0xfd;
    ip[15] = 0x0a;
    let d6 = sin6(7001, ip);
    // Another control message first: skipped by its declared length.
    let mut buf = cmsg(libc::SOL_SOCKET, libc::SO_TIMESTAMP, HDR + 16, &[0; 16]);
    buf.extend(cmsg(libc::SOL_IPV6, V6, HDR + d6.len(), &d6));
    assert_eq!(
        orig_dst_from_control(&buf, 0),
        Some("[fd00::a]:7001".parse::<SocketAddr>().unwrap())
    );
}

#[test]
fn a_truncated_control_buffer_is_not_trusted() {
    let d = v4_data();
    let buf = cmsg(libc::SOL_IP, V4, HDR + d.len(), &d);
    assert_eq!(orig_dst_from_control(&buf, libc::MSG_CTRUNC), None);
}

#[test]
fn a_length_shorter_than_the_sockaddr_is_refused() {
    let d = v4_data();
    // The header claims 4 data bytes; the bytes after them must not be read as the address.
    let buf = cmsg(libc::SOL_IP, V4, HDR + 4, &d);
    assert_eq!(orig_dst_from_control(&buf, 0), None);
    let d6 = sin6(53, [1; 16]);
    let buf = cmsg(libc::SOL_IPV6, V6, HDR + 8, &d6);
    assert_eq!(orig_dst_from_control(&buf, 0), None);
}

#[test]
fn lengths_past_the_buffer_or_below_the_header_end_the_walk() {
    let d = v4_data();
    for declared in [0, 1, HDR - 1, HDR + d.len() + 1, usize::MAX] {
        let buf = cmsg(libc::SOL_IP, V4, declared, &d);
        assert_eq!(orig_dst_from_control(&buf, 0), None, "cmsg_len {declared}");
    }
    // A buffer shorter than one header.
    assert_eq!(orig_dst_from_control(&[0u8; 7], 0), None);
    assert_eq!(orig_dst_from_control(&[], 0), None);
}

#[test]
fn a_family_that_does_not_match_the_type_is_refused() {
    let d = sin(libc::AF_INET6 as u16, 53, [10, 96, 0, 10]);
    let buf = cmsg(libc::SOL_IP, V4, HDR + d.len(), &d);
    assert_eq!(orig_dst_from_control(&buf, 0), None);
}

proptest::proptest! {
    /// Any control buffer and flags: no panic, no read past a declared length, and an
    /// address only from a message that declares a whole sockaddr.
    #[test]
    fn any_control_buffer_is_parsed_or_refused(
        control in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..160),
        flags in proptest::prelude::any::<libc::c_int>(),
    ) {
        let _ = orig_dst_from_control(&control, flags);
    }

    #[test]
    fn crafted_headers_are_parsed_or_refused(
        declared in 0usize..64,
        level in proptest::sample::select(vec![libc::SOL_IP, libc::SOL_IPV6, libc::SOL_SOCKET]),
        ty in proptest::sample::select(vec![V4, V6, 0]),
        data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40),
    ) {
        let buf = cmsg(level, ty, declared, &data);
        if let Some(a) = orig_dst_from_control(&buf, 0) {
            // Only a declared length covering the whole sockaddr yields an address.
            let need = if a.is_ipv4() { size_of::<libc::sockaddr_in>() } else { size_of::<libc::sockaddr_in6>() };
            proptest::prop_assert!(declared >= HDR + need);
        }
    }
}
