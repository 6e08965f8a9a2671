//! A full disk: appends fail with a clear error, nothing acknowledged is lost,
//! and the store opens again afterwards. Runs on a small tmpfs mounted by the
//! test (it needs root, and fails saying so without it).

mod common;

use common::SmallDisk;

use meshlog::error::StoreError;
use meshlog::store::{AppendRequest, Store};
use meshlog::wire::PreparedRecords;
use meshlog::{Record, TopicConfig};

fn batch(i: usize) -> AppendRequest {
    let records: Vec<Record> = (0..50)
        .map(|j| Record::new(format!("{i}-{j}-{}", "x".repeat(1000)), 0))
        .collect();
    AppendRequest {
        topic: "t".into(),
        partition: 0,
        producer: None,
        records: PreparedRecords::new(&records).unwrap(),
    }
}

#[test]
fn a_full_disk_is_an_error_and_loses_nothing_acknowledged() {
    let disk = SmallDisk::mount("8m");
    let dir = disk.path().join("node");
    let mut acknowledged = 0u64;
    let error = {
        let store = Store::open(&dir, true).expect("open on the small disk");
        store.create_topic("t", TopicConfig::default(), 0).unwrap();
        let mut error = None;
        for i in 0..1000 {
            match store.append(batch(i)) {
                Ok(outcome) => acknowledged = outcome.base_offset + outcome.ids.len() as u64,
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        let error = error.expect("8 MiB must fill up");
        // What was acknowledged before stays readable from the open store.
        let read = store.read("t", 0, 0, usize::MAX).unwrap();
        assert_eq!(read.records.len() as u64, acknowledged);
        error
    };
    println!("full disk after {acknowledged} records: {error}");
    assert!(acknowledged > 0);
    assert!(
        matches!(error, StoreError::Io(_) | StoreError::Database(_)),
        "unexpected error kind: {error}"
    );
    assert!(
        error.to_string().contains("space") || error.to_string().contains("storage"),
        "{error}"
    );

    // After the failure the store opens again with every acknowledged record.
    match Store::open(&dir, true) {
        Ok(store) => {
            assert_eq!(
                store.partition_state("t", 0).unwrap().high_watermark,
                acknowledged
            );
            assert_eq!(
                store.verify_partition("t", 0).unwrap().records,
                acknowledged
            );
        }
        Err(e) => panic!("reopening after a full disk failed: {e}"),
    }
}
