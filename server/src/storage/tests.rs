//! The model test: the on-disk [`Wal`] against the in-memory [`MemStore`].
//!
//! Random sequences of appends (some overwriting a suffix), hard states, syncs, local and installed
//! snapshots and restarts are applied to both. After every call both must agree on what reads see;
//! after every restart (dropping the `Wal` without syncing is a crash) the `Wal` must recover
//! exactly what the model says was durable. Small segment sizes make rollover and compaction
//! happen constantly.

use proptest::prelude::*;
use sync_proto::raft::v1::{Entry, HardState, SnapshotMetadata};

use super::wal::tests::scratch;
use super::{LogStore, MemStore, Wal, WalOptions};

#[derive(Debug, Clone)]
enum Op {
    /// Append `count` entries starting `back` entries before the end (0 = plain append);
    /// `new_term` starts a new term first, as a new leader would.
    Append {
        back: u64,
        count: u64,
        new_term: bool,
    },
    /// Save a hard state.
    HardState { vote: u64, commit: u64 },
    /// Group commit.
    Sync,
    /// Snapshot the state machine `back` entries before the end.
    SaveSnapshot { back: u64 },
    /// Install a leader's snapshot `ahead` entries past the current snapshot; `matching` picks the
    /// term of the entry there (if held), otherwise a newer term.
    InstallSnapshot { ahead: u64, matching: bool },
    /// Crash and restart.
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u64..4, 1u64..5, proptest::bool::weighted(0.2))
            .prop_map(|(back, count, new_term)| Op::Append { back, count, new_term }),
        2 => (0u64..3, 0u64..30).prop_map(|(vote, commit)| Op::HardState { vote, commit }),
        5 => Just(Op::Sync),
        1 => (0u64..6).prop_map(|back| Op::SaveSnapshot { back }),
        1 => (1u64..12, any::<bool>()).prop_map(|(ahead, matching)| Op::InstallSnapshot { ahead, matching }),
        1 => Just(Op::Reopen),
    ]
}

fn fail(e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

fn entry(index: u64, term: u64) -> Entry {
    Entry {
        index,
        term,
        data: bytes::Bytes::from(vec![index as u8; (index % 7) as usize * 9]),
        ..Default::default()
    }
}

fn check_reads(wal: &Wal, model: &MemStore) -> Result<(), TestCaseError> {
    prop_assert_eq!(wal.first_index(), model.first_index());
    prop_assert_eq!(wal.last_index(), model.last_index());
    prop_assert_eq!(wal.hard_state(), model.hard_state());
    let lo = model.first_index();
    let hi = model.last_index() + 1;
    prop_assert_eq!(
        wal.entries(lo, hi).map_err(fail)?,
        model.entries(lo, hi).map_err(fail)?
    );
    prop_assert_eq!(
        wal.snapshot().map_err(fail)?,
        model.snapshot().map_err(fail)?
    );
    Ok(())
}

fn run_model(ops: Vec<Op>, segment_size: u64) -> Result<(), TestCaseError> {
    let tmp = scratch().map_err(fail)?;
    // Preallocation capped by the small segments, so that frames land in zeros and past them.
    let options = WalOptions {
        segment_size,
        preallocate: 256,
    };
    let (mut wal, _) = Wal::open(tmp.path(), options.clone()).map_err(fail)?;
    let mut model = MemStore::new();
    let mut term = 1u64;
    for op in ops {
        match op {
            Op::Append {
                back,
                count,
                new_term,
            } => {
                if new_term {
                    term += 1;
                }
                let start = (model.last_index() + 1)
                    .saturating_sub(back)
                    .max(model.first_index());
                let entries: Vec<Entry> = (start..start + count).map(|i| entry(i, term)).collect();
                let (a, b) = (wal.append(&entries), model.append(&entries));
                prop_assert_eq!(a.is_ok(), b.is_ok(), "append: wal {:?}, model {:?}", a, b);
            }
            Op::HardState { vote, commit } => {
                let hs = HardState { term, vote, commit };
                wal.set_hard_state(&hs).map_err(fail)?;
                model.set_hard_state(&hs).map_err(fail)?;
            }
            Op::Sync => {
                wal.sync().map_err(fail)?;
                model.sync().map_err(fail)?;
            }
            Op::SaveSnapshot { back } => {
                let index = model.last_index().saturating_sub(back);
                if index < model.first_index() {
                    continue;
                }
                let meta = SnapshotMetadata {
                    last_index: index,
                    last_term: model.term(index).map_err(fail)?,
                    config: None,
                };
                let data = format!("state at {index}").into_bytes();
                wal.save_snapshot(&meta, &data).map_err(fail)?;
                model.save_snapshot(&meta, &data).map_err(fail)?;
            }
            Op::InstallSnapshot { ahead, matching } => {
                let index = model.first_index() - 1 + ahead;
                let last_term = match model.term(index) {
                    Ok(t) if matching => t,
                    _ => {
                        term += 1;
                        term
                    }
                };
                let meta = SnapshotMetadata {
                    last_index: index,
                    last_term,
                    config: None,
                };
                let data = format!("leader state at {index}").into_bytes();
                wal.install_snapshot(&meta, &data).map_err(fail)?;
                model.install_snapshot(&meta, &data).map_err(fail)?;
            }
            Op::Reopen => {
                drop(wal);
                let (reopened, recovered) = Wal::open(tmp.path(), options.clone()).map_err(fail)?;
                wal = reopened;
                prop_assert_eq!(recovered, model.crash());
            }
        }
        check_reads(&wal, &model)?;
    }
    drop(wal);
    let (wal, recovered) = Wal::open(tmp.path(), options).map_err(fail)?;
    prop_assert_eq!(recovered, model.crash());
    check_reads(&wal, &model)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(192))]

    #[test]
    fn reopened_wal_matches_the_in_memory_model_for_everything_synced(
        ops in proptest::collection::vec(op(), 1..80),
        segment_size in 64u64..1500,
    ) {
        run_model(ops, segment_size)?;
    }
}
