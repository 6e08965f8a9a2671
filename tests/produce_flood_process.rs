//! `meshlog produce` fed far more lines than its buffer holds, in tiny
//! batches, into three real node processes: back-pressure holds. Every line
//! is stored exactly once, the command exits by itself, and its memory stays
//! within its `buffer_memory` plus a constant.
//!
//! `MESHLOG_FLOOD_LINES` sets how many lines (default 400,000; the issue's
//! figure is 2,000,000).

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::Line;
use common::cluster::{create_replicated, read_all, start_cluster, stop_all, wait_for_agreement};

const TOPIC: &str = "flood";
const PARTITIONS: u32 = 3;
/// The producer's default `buffer_memory`.
const BUFFER_MEMORY: u64 = 32 * 1024 * 1024;
/// What the process needs beyond its buffer: code, runtime, libp2p, a node.
const BASE_MEMORY: u64 = 96 * 1024 * 1024;

fn lines() -> u64 {
    std::env::var("MESHLOG_FLOOD_LINES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(400_000)
}

/// The process's peak resident set so far (`VmHWM`), in bytes.
fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_tiny_batches_is_stored_once_each_within_the_buffer() {
    let count = lines();
    let dirs: Vec<tempfile::TempDir> = (0..5).map(|_| tempfile::tempdir().unwrap()).collect();
    let (tx, _lines) = mpsc::channel::<Line>();
    let (mut nodes, ids, client) = start_cluster(&dirs[..4], &tx).await;
    create_replicated(&client, TOPIC, PARTITIONS).await;
    let bootstrap = nodes[0]
        .as_ref()
        .map(|n| n.address.clone())
        .expect("node 0");

    let started = Instant::now();
    let mut child = common::meshlog(dirs[4].path())
        .args([
            "--bootstrap-server",
            &bootstrap,
            "produce",
            TOPIC,
            "--batch-size",
            "150",
            "--linger-ms",
            "0",
            "--acks",
            "all",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn meshlog produce");
    let mut stdin = child.stdin.take().expect("stdin");
    let writer = std::thread::spawn(move || {
        let mut out = std::io::BufWriter::new(&mut stdin);
        for i in 0..count {
            if writeln!(out, "{i}").is_err() {
                return false;
            }
        }
        out.flush().is_ok()
    });
    let pid = child.id();
    let mut peak = 0;
    let deadline = started + Duration::from_secs(10 * 60);
    let status = loop {
        if let Some(rss) = peak_rss(pid) {
            peak = peak.max(rss);
        }
        match child.try_wait().expect("poll meshlog produce") {
            Some(status) => break status,
            None if Instant::now() > deadline => {
                let _ = child.kill();
                panic!("meshlog produce neither finished nor stopped within 10 minutes");
            }
            None => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let elapsed = started.elapsed();
    let stderr = {
        let mut text = String::new();
        if let Some(mut err) = child.stderr.take() {
            use std::io::Read;
            let _ = err.read_to_string(&mut text);
        }
        text
    };
    assert!(writer.join().unwrap_or(false), "the input was read whole");
    assert!(status.success(), "meshlog produce failed: {stderr}");
    assert!(
        stderr.contains(&format!("Sent {count} records")),
        "every line acknowledged: {stderr}"
    );
    println!(
        "{count} lines in {:.1} s ({:.0} lines/s), peak RSS {:.1} MiB",
        elapsed.as_secs_f64(),
        count as f64 / elapsed.as_secs_f64(),
        peak as f64 / (1024.0 * 1024.0)
    );
    assert!(
        peak <= BUFFER_MEMORY + BASE_MEMORY,
        "peak RSS {peak} bytes: more than buffer_memory plus {BASE_MEMORY}"
    );

    wait_for_agreement(&client, &ids, TOPIC, PARTITIONS, &BTreeMap::new()).await;
    stop_all(client, &mut nodes).await;
    for dir in &dirs[..3] {
        let store = meshlog::store::Store::open(dir.path(), true).expect("reopen the store");
        let mut seen = vec![false; count as usize];
        for partition in 0..PARTITIONS {
            for record in read_all(&store, TOPIC, partition) {
                let line: usize = std::str::from_utf8(record.value())
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("unexpected value {:?}", record.value()));
                let slot = seen
                    .get_mut(line)
                    .unwrap_or_else(|| panic!("line {line} was never sent"));
                assert!(!*slot, "line {line} stored twice");
                *slot = true;
            }
        }
        let missing = seen.iter().filter(|s| !**s).count();
        assert_eq!(missing, 0, "every line stored in {}", dir.path().display());
    }
}
