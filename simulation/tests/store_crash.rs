//! The real store on a simulated disk that loses power in the middle of a
//! commit, at every write of it in turn: whatever the crash keeps of the
//! unsynced writes (none, some with the next one torn, all), the store opens
//! again, everything committed before is there, and the interrupted batch is
//! there whole or not at all, its chain intact.

use meshlog::store::{AppendRequest, Store, WriteOp, WriteOutcome};
use meshlog::wire::PreparedRecords;
use meshlog::{Record, TopicConfig};
use meshlog_sim::disk::CrashDisk;

const TOPIC: &str = "t";

fn batch(tag: &str, n: usize) -> WriteOp {
    let records: Vec<Record> = (0..n)
        .map(|i| Record::new(format!("{tag}-{i}-{}", "x".repeat(200)), 1))
        .collect();
    WriteOp::Append(AppendRequest {
        topic: TOPIC.into(),
        partition: 0,
        producer: None,
        records: PreparedRecords::new(&records).expect("prepare"),
    })
}

fn append(store: &Store, op: WriteOp) -> Result<u64, String> {
    let mut results = store.write(vec![op]).map_err(|e| e.to_string())?;
    match results.pop() {
        Some(Ok(WriteOutcome::Appended(appended))) => Ok(appended.base_offset),
        other => Err(format!("{other:?}")),
    }
}

/// A disk holding a topic with one committed batch of 10 records.
fn disk_with_a_batch() -> (CrashDisk, Store) {
    let disk = CrashDisk::new();
    let store = Store::open_on_backend(disk.clone(), "sim-disk", true).expect("open");
    store
        .create_topic(TOPIC, TopicConfig::default(), 0)
        .expect("create");
    assert_eq!(append(&store, batch("first", 10)), Ok(0));
    (disk, store)
}

#[test]
fn a_commit_cut_short_at_any_write_loses_nothing_committed_and_never_half_a_batch() {
    // How many disk operations one commit of the second batch takes.
    let (disk, store) = disk_with_a_batch();
    let before = disk.ops();
    assert_eq!(append(&store, batch("second", 10)), Ok(10));
    let commit_ops = disk.ops() - before;
    assert!(
        commit_ops > 1,
        "a commit writes and syncs: {commit_ops} operations"
    );
    drop(store);

    let mut outcomes = [0usize; 2];
    for power_left in 0..=commit_ops {
        for keep in ["none", "torn", "all"] {
            let (disk, store) = disk_with_a_batch();
            disk.cut_power_after(power_left);
            let answered = append(&store, batch("second", 10));
            let unsynced = disk.unsynced_writes();
            drop(store);
            let (kept, torn) = match keep {
                "none" => (0, 0),
                "torn" => (unsynced / 2, 100),
                _ => (unsynced, 0),
            };
            disk.crash(kept, torn);
            let case = format!(
                "power cut after {power_left} of {commit_ops}, kept {keep} of {unsynced} unsynced ({answered:?})"
            );

            let store = Store::open_on_backend(disk.after_crash(), "sim-disk", true)
                .unwrap_or_else(|e| panic!("{case}: the store does not open: {e}"));
            let state = store.partition_state(TOPIC, 0).expect("state");
            assert!(
                state.log_end_offset == 10 || state.log_end_offset == 20,
                "{case}: the log ends at {} (the first batch is 0..10, the second 10..20)",
                state.log_end_offset
            );
            if answered.is_ok() {
                assert_eq!(
                    state.log_end_offset, 20,
                    "{case}: an acknowledged commit was lost"
                );
            }
            outcomes[usize::from(state.log_end_offset == 20)] += 1;
            let read = store.read(TOPIC, 0, 0, 1 << 20).expect("read");
            assert_eq!(read.records.len() as u64, state.log_end_offset, "{case}");
            let checked = store
                .verify_partition(TOPIC, 0)
                .expect("the chain verifies");
            assert_eq!(checked.records, state.log_end_offset, "{case}");
            // The store goes on: the next batch lands at the log end.
            assert_eq!(
                append(&store, batch("third", 1)),
                Ok(state.log_end_offset),
                "{case}"
            );
        }
    }
    assert!(
        outcomes[0] > 0 && outcomes[1] > 0,
        "some cuts lose the interrupted batch, some keep it: {outcomes:?}"
    );
}
