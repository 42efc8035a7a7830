//! Applying etp's table: one in-place replace transaction, encoded against what the kernel
//! holds now ([`Current`]) and pinned to the generation it was read in; a refused batch is
//! named by the object its error ack points at. When the replies are lost (ENOBUFS, timeout),
//! a fresh socket decides whether the batch committed: not if the generation id did not move;
//! if it moved (which any concurrent committer also does), only if etp's table reads back
//! exactly as sent.

use super::current::Current;
use super::encode::{encode_replace, Batch};
use super::error::NftError;
use super::socket::{BatchVerdict, Nft};
use super::wire;
use crate::kernel::netlink;
use crate::model::Table;

/// What one applied transaction cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyReport {
    /// The ruleset generation after the commit.
    pub generation: u32,
    /// Messages sent, BEGIN and END included.
    pub messages: usize,
    /// Bytes sent in the one datagram.
    pub bytes: usize,
}

impl Nft {
    /// Replaces the contents of `table inet NAME` with `table` in one transaction, in place
    /// (see `encode`): the kernel's current chains and sets are read first and the batch is
    /// pinned to that generation. With `expect_gen`, the batch applies only if the ruleset is
    /// still at that generation ([`NftError::Concurrent`] otherwise); without it, a concurrent
    /// change between the read and the commit is retried (up to 3 times).
    pub fn apply(
        &mut self,
        table: &Table,
        expect_gen: Option<u32>,
    ) -> Result<ApplyReport, NftError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let gen = self.generation()?;
            if let Some(want) = expect_gen {
                if want != gen {
                    return Err(NftError::Concurrent { expected: want });
                }
            }
            let current = Current::read(self, &table.name)?;
            let batch = encode_replace(table, &current)?;
            match self.apply_batch(batch, table, Some(gen)) {
                Err(NftError::Concurrent { .. }) if expect_gen.is_none() && attempt < 3 => {
                    tracing::info!(table = %table.name, attempt, "ruleset changed while applying; retrying");
                }
                r => return r,
            }
        }
    }

    /// Sends an already encoded batch as is; `table` is the model it was encoded from (for
    /// labels). Use [`Nft::apply`] unless the batch was built against a known state.
    pub fn apply_batch(
        &mut self,
        mut batch: Batch,
        table: &Table,
        expect_gen: Option<u32>,
    ) -> Result<ApplyReport, NftError> {
        let n = batch.messages().len() as u32;
        let begin_seq = self.next_seq(n + 2);
        batch.renumber(begin_seq + 1);
        let end_seq = begin_seq + n + 1;
        let begin = wire::batch_begin(begin_seq, expect_gen);
        let end = wire::batch_end(end_seq);
        let bytes = begin.len() + batch.bytes().len() + end.len();
        let gen_before = self.generation()?;
        tracing::debug!(
            table = %table.name,
            messages = n + 2,
            bytes,
            gen_before,
            expect_gen,
            "sending nft batch"
        );
        match self.send_batch(&[&begin, batch.bytes(), &end], begin_seq, end_seq, bytes)? {
            BatchVerdict::Committed => {}
            BatchVerdict::Refused(errors) => {
                let first = errors[0];
                if first.seq == begin_seq && first.errno == libc::ERESTART {
                    return Err(NftError::Concurrent {
                        expected: expect_gen.unwrap_or(gen_before),
                    });
                }
                let label = if first.seq == begin_seq {
                    "batch begin".to_string()
                } else if first.seq == end_seq {
                    "batch end".to_string()
                } else {
                    batch.label(table, (first.seq - begin_seq - 1) as usize, first.offset)
                };
                tracing::warn!(
                    table = %table.name,
                    at = %label,
                    errno = first.errno,
                    errors = errors.len(),
                    "nft batch refused"
                );
                return Err(NftError::Refused {
                    label,
                    errno: first.errno,
                });
            }
            BatchVerdict::Unknown(cause) => {
                // Decide on a fresh socket: this one may still hold stale replies.
                let mut fresh = Nft::open()?;
                let generation = fresh.generation()?;
                let committed = committed_after_lost_replies(gen_before, generation, || {
                    fresh.audit(table).map(|drift| drift.is_empty())
                })?;
                if !committed {
                    return Err(NftError::Unknown { cause, generation });
                }
                tracing::warn!(%cause, gen_before, generation, "nft replies lost; etp's table reads back as sent, batch committed");
                return Ok(ApplyReport {
                    generation,
                    messages: n as usize + 2,
                    bytes,
                });
            }
        }
        let generation = match expect_gen {
            Some(g) => g.wrapping_add(1),
            None => self.generation()?,
        };
        Ok(ApplyReport {
            generation,
            messages: n as usize + 2,
            bytes,
        })
    }

    /// Deletes table `inet NAME`; `Ok(false)` when it did not exist (nothing changes then).
    pub fn delete_table(&mut self, name: &str) -> Result<bool, NftError> {
        let begin_seq = self.next_seq(3);
        let mut body = Vec::with_capacity(64);
        let s = netlink::begin_nfgen(
            &mut body,
            wire::nft_type(wire::NFT_MSG_DELTABLE),
            netlink::NLM_F_ACK,
            begin_seq + 1,
            libc::NFPROTO_INET as u8,
            0,
        );
        netlink::put_strz(&mut body, 1, name); // NFTA_TABLE_NAME
        netlink::end_msg(&mut body, s);
        let begin = wire::batch_begin(begin_seq, None);
        let end = wire::batch_end(begin_seq + 2);
        let bytes = begin.len() + body.len() + end.len();
        match self.send_batch(&[&begin, &body, &end], begin_seq, begin_seq + 2, bytes)? {
            BatchVerdict::Committed => Ok(true),
            BatchVerdict::Refused(errors) if errors[0].errno == libc::ENOENT => Ok(false),
            BatchVerdict::Refused(errors) => Err(NftError::Refused {
                label: format!("delete table inet {name}"),
                errno: errors[0].errno,
            }),
            BatchVerdict::Unknown(cause) => Err(NftError::Unknown {
                cause,
                generation: Nft::open()?.generation()?,
            }),
        }
    }
}

/// Whether a batch whose replies were lost (ENOBUFS, timeout) committed. An unchanged
/// generation means nothing committed. A moved one is not proof: any committer in the
/// namespace (kube-proxy applies its own table every few seconds) moves it too, so the
/// verdict is whether etp's table now reads back exactly as sent (`table_matches`, an audit).
/// If it already matched before the batch, "committed" is still the right answer for the
/// caller: the kernel holds what was sent.
fn committed_after_lost_replies(
    gen_before: u32,
    gen_now: u32,
    table_matches: impl FnOnce() -> Result<bool, NftError>,
) -> Result<bool, NftError> {
    if gen_now == gen_before {
        return Ok(false);
    }
    table_matches()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A concurrent committer moved the generation while etp's replies were lost, and etp's
    /// table does not hold what was sent: not committed (deciding by the generation alone said
    /// it was).
    #[test]
    fn a_generation_moved_by_someone_else_is_not_a_commit() {
        let mut asked = 0;
        let r = committed_after_lost_replies(7, 8, || {
            asked += 1;
            Ok(false)
        });
        assert!(!r.unwrap());
        assert_eq!(asked, 1);
        assert!(committed_after_lost_replies(7, 9, || Ok(true)).unwrap());
        // Unchanged generation: nothing committed, no read-back needed.
        assert!(!committed_after_lost_replies(7, 7, || panic!("no audit")).unwrap());
        // The read-back failing is an error, not a verdict.
        assert!(
            committed_after_lost_replies(7, 8, || Err(NftError::Malformed { what: "x" })).is_err()
        );
    }
}
