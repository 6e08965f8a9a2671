//! Crash safety with real processes: a `meshlog produce` child acknowledges
//! records (after fsync) and is SIGKILLed mid-stream; a node restarted on its
//! data directory must serve every acknowledged record exactly once, under a
//! valid hash chain.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use meshlog::{ConsumerConfig, ConsumerRecord, Node, NodeConfig, OffsetReset};

/// Acknowledgements to collect before the kill.
const ACKS_BEFORE_KILL: usize = 3000;
/// Upper bound on lines the feeder writes, so the test always ends.
const MAX_LINES: usize = 2_000_000;
const TOPIC: &str = "crash";

/// One acknowledgement printed by `produce --print-metadata`.
struct Ack {
    partition: u32,
    offset: u64,
    id: String,
}

fn parse_ack(line: &str) -> Ack {
    let fields: Vec<&str> = line.split('\t').collect();
    assert_eq!(fields.len(), 4, "bad ack line {line:?}");
    assert_eq!(fields[0], TOPIC);
    Ack {
        partition: fields[1].parse().expect("partition"),
        offset: fields[2].parse().expect("offset"),
        id: fields[3].to_string(),
    }
}

fn line_value(i: usize) -> String {
    format!("value-{i:08}")
}

#[test]
fn sigkill_mid_stream_loses_no_acknowledged_record() {
    let dir = tempfile::tempdir().unwrap();
    common::ok(
        dir.path(),
        &["topic", "create", TOPIC, "--partitions", "3"],
        "",
    );

    let mut child = common::meshlog(dir.path())
        .args([
            "produce",
            TOPIC,
            "--print-metadata",
            "--key-separator",
            "|",
            "--batch-size",
            "200",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn producer");

    // Feed lines "key|value" until the pipe breaks (the child died) or the cap.
    let mut stdin = child.stdin.take().unwrap();
    let killed = Arc::new(AtomicBool::new(false));
    let feeder = {
        let killed = killed.clone();
        std::thread::spawn(move || {
            for i in 0..MAX_LINES {
                if killed.load(Ordering::Relaxed)
                    || writeln!(stdin, "k{}|{}", i % 17, line_value(i)).is_err()
                {
                    return i;
                }
            }
            MAX_LINES
        })
    };

    // The n-th acknowledgement line belongs to the n-th input line.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut acks = Vec::new();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while acks.len() < ACKS_BEFORE_KILL {
        assert!(
            Instant::now() < deadline,
            "only {} acks before the deadline",
            acks.len()
        );
        line.clear();
        let n = out.read_line(&mut line).unwrap();
        assert!(n > 0, "producer exited early after {} acks", acks.len());
        acks.push(parse_ack(line.trim_end()));
    }
    child.kill().expect("SIGKILL the producer");
    child.wait().unwrap();
    killed.store(true, Ordering::Relaxed);
    // Acks that were already in the pipe are acknowledged too.
    // A line cut short by the kill was never a complete acknowledgement.
    line.clear();
    while out.read_line(&mut line).unwrap_or(0) > 0 && line.ends_with('\n') {
        acks.push(parse_ack(line.trim_end()));
        line.clear();
    }
    let fed = feeder.join().unwrap();
    assert!(
        fed > acks.len(),
        "the kill must land mid-stream (fed {fed}, acked {})",
        acks.len()
    );

    // Restart a node on the directory: its log holds what it acknowledged,
    // and it commits it again (the high watermark stored at the kill may lag
    // the acknowledgements: it is written after them).
    let wanted: Vec<(u32, u64)> = acks.iter().map(|a| (a.partition, a.offset)).collect();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let records = runtime.block_on(read_back(dir.path(), &wanted));
    let mut stored: BTreeMap<(u32, u64), (String, String)> = BTreeMap::new();
    let mut seen_values: HashMap<String, u32> = HashMap::new();
    for r in records {
        let value = String::from_utf8(r.record.value.clone()).unwrap();
        *seen_values.entry(value.clone()).or_default() += 1;
        stored.insert((r.partition, r.offset), (value, r.id.to_hex()));
    }
    assert!(
        seen_values.values().all(|&n| n == 1),
        "a record is stored twice"
    );
    for (i, ack) in acks.iter().enumerate() {
        let (value, id) = stored.get(&(ack.partition, ack.offset)).unwrap_or_else(|| {
            panic!(
                "acknowledged record {i} at {}/{} is lost",
                ack.partition, ack.offset
            )
        });
        assert_eq!(value, &line_value(i), "ack {i} points at another record");
        assert_eq!(id, &ack.id, "ack {i} has another id");
    }
}

/// Every record a node restarted on `dir` serves, once it serves all of
/// `wanted` (or 60 s passed), after verifying each partition's chain.
async fn read_back(dir: &std::path::Path, wanted: &[(u32, u64)]) -> Vec<ConsumerRecord> {
    let config = NodeConfig::default().with_data_dir(dir).without_network();
    let node = Node::open(config).await.expect("restart after SIGKILL");
    let earliest = ConsumerConfig::default().with_auto_offset_reset(OffsetReset::Earliest);
    let mut consumer = node.consumer(earliest).expect("consumer");
    consumer.subscribe(&[TOPIC]).expect("subscribe");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut records: Vec<ConsumerRecord> = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    loop {
        let batch = consumer.poll(Duration::from_secs(1)).await.expect("poll");
        let empty = batch.is_empty();
        for r in batch {
            seen.insert((r.partition, r.offset));
            records.push(r);
        }
        let all = wanted.iter().all(|w| seen.contains(w));
        if (all && empty) || tokio::time::Instant::now() >= deadline {
            break;
        }
    }
    for partition in 0..3 {
        node.verify_partition(TOPIC, partition)
            .await
            .expect("valid chain after the crash");
    }
    node.shutdown().await;
    records
}
