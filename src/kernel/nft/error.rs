//! The errors of the nft module.

use std::io;

use super::encode::EncodeError;

/// Why talking to nf_tables failed. Refusals name the object the kernel refused.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("opening the nftables netlink socket")]
    Open(#[source] io::Error),
    #[error("setting {option} on the nftables netlink socket")]
    SockOpt {
        option: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Encode(#[from] EncodeError),
    #[error("sending {what} ({bytes} bytes) to nf_tables")]
    Send {
        what: &'static str,
        bytes: usize,
        #[source]
        source: io::Error,
    },
    #[error("reading nf_tables replies to {what}")]
    Recv {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("no reply from nf_tables to {what} within {waited_ms} ms")]
    Timeout { what: &'static str, waited_ms: u64 },
    /// The kernel refused a message of the batch; nothing of it was applied.
    #[error("nft batch refused at {label}: {}", io::Error::from_raw_os_error(*.errno))]
    Refused { label: String, errno: i32 },
    /// The ruleset changed since the expected generation was read (ERESTART); nothing applied.
    #[error(
        "nft ruleset changed concurrently (expected generation {expected}): batch not applied"
    )]
    Concurrent { expected: u32 },
    /// Replies were lost (receive buffer overflow or timeout) and the generation id did not
    /// show the batch as committed.
    #[error("nft batch outcome unknown after {cause}: generation stayed at {generation}")]
    Unknown { cause: String, generation: u32 },
    #[error("nf_tables refused {what}: {}", io::Error::from_raw_os_error(*.errno))]
    Request { what: String, errno: i32 },
    #[error("nf_tables dump for {what} interrupted by concurrent changes")]
    DumpInterrupted { what: &'static str },
    #[error("malformed nf_tables reply to {what}")]
    Malformed { what: &'static str },
}

impl NftError {
    /// The errno the kernel answered with, for refusals.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NftError::Refused { errno, .. } | NftError::Request { errno, .. } => Some(*errno),
            NftError::Concurrent { .. } => Some(libc::ERESTART),
            _ => None,
        }
    }
}
