//! Real `meshlog node` processes on 127.0.0.1: failure detection after a
//! SIGKILL (suspect, then dead, never before the suspicion timeout), and a
//! restart from the same data directory that keeps the peer id and re-joins.

mod common;

use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

const GOSSIP_MS: u64 = 200;
const SUSPECT_AFTER_MS: u64 = 1500;
const SUSPICION_TIMEOUT_MS: u64 = 2000;
/// Margin for log lines to cross a pipe and for timer granularity.
const SLACK: Duration = Duration::from_millis(150);

use common::{Line, NodeProcess};

fn spawn_node(
    index: usize,
    data_dir: &Path,
    bootstrap: Option<&str>,
    lines: &mpsc::Sender<Line>,
) -> NodeProcess {
    let timings = [
        "--gossip-interval-ms".to_string(),
        GOSSIP_MS.to_string(),
        "--suspect-after-ms".to_string(),
        SUSPECT_AFTER_MS.to_string(),
        "--suspicion-timeout-ms".to_string(),
        SUSPICION_TIMEOUT_MS.to_string(),
    ];
    common::spawn_node(index, data_dir, bootstrap, lines, &timings)
}

fn says(line: &Line, node: usize, event: &str, peer: &str) -> bool {
    line.node == node && line.text.contains(event) && line.text.contains(&format!("peer={peer}"))
}

#[test]
fn a_killed_node_is_suspected_then_declared_dead_and_rejoins_with_its_identity() {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (tx, lines) = mpsc::channel();
    let first = spawn_node(0, dirs[0].path(), None, &tx);
    let second = spawn_node(1, dirs[1].path(), Some(&first.address), &tx);
    let third = spawn_node(2, dirs[2].path(), Some(&first.address), &tx);
    let ids = [
        first.peer_id.clone(),
        second.peer_id.clone(),
        third.peer_id.clone(),
    ];

    // Everyone sees everyone.
    let mut pending: Vec<(usize, usize)> = (0..3)
        .flat_map(|a| (0..3).filter(move |b| *b != a).map(move |b| (a, b)))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !pending.is_empty() {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("full membership in 30 s");
        pending.retain(|(a, b)| !says(&line, *a, "peer joined", &ids[*b]));
    }

    // A light client lists all three as live storage members.
    let peers = common::meshlog(dirs[0].path())
        .args([
            "peers",
            "--no-mdns",
            "--gossip-interval-ms",
            "200",
            "--bootstrap",
            &first.address,
        ])
        .output()
        .expect("run meshlog peers");
    assert!(
        peers.status.success(),
        "{}",
        String::from_utf8_lossy(&peers.stderr)
    );
    let listed = String::from_utf8_lossy(&peers.stdout);
    for id in &ids {
        assert!(
            listed.lines().any(|l| l.starts_with(id.as_str())
                && l.contains("alive")
                && l.contains("storage")),
            "{id} missing from:\n{listed}"
        );
    }

    // SIGKILL the third node.
    let mut third = third;
    third.child.kill().expect("SIGKILL");
    let killed_at = Instant::now();
    third.child.wait().unwrap();

    let detection = Duration::from_millis(SUSPECT_AFTER_MS + SUSPICION_TIMEOUT_MS + 2 * GOSSIP_MS)
        + Duration::from_secs(2);
    let mut suspected = [None, None];
    let mut died = [None, None];
    let deadline = Instant::now() + detection;
    while died.iter().any(Option::is_none) {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("not declared dead within {detection:?} (suspected {suspected:?}, dead {died:?})"));
        for observer in 0..2 {
            if says(&line, observer, "peer suspected", &ids[2]) {
                suspected[observer].get_or_insert(line.at);
            }
            if says(&line, observer, "peer dead", &ids[2]) {
                died[observer].get_or_insert(line.at);
            }
        }
    }
    let suspicion_timeout = Duration::from_millis(SUSPICION_TIMEOUT_MS);
    for observer in 0..2 {
        let (Some(s), Some(d)) = (suspected[observer], died[observer]) else {
            panic!("observer {observer} declared death without suspecting first");
        };
        assert!(
            d.duration_since(s) + SLACK >= suspicion_timeout,
            "observer {observer}: dead {:?} after suspect",
            d.duration_since(s)
        );
        let earliest = Duration::from_millis(SUSPECT_AFTER_MS + SUSPICION_TIMEOUT_MS - GOSSIP_MS);
        assert!(
            d.duration_since(killed_at) + SLACK >= earliest,
            "observer {observer}: dead too soon"
        );
        println!(
            "observer {observer}: suspected after {:?}, dead after {:?}",
            s.duration_since(killed_at),
            d.duration_since(killed_at)
        );
    }

    // Restart from the same data directory: same peer id, and the others see it join again.
    let restarted = spawn_node(2, dirs[2].path(), Some(&first.address), &tx);
    assert_eq!(
        restarted.peer_id, ids[2],
        "the identity is kept in the data directory"
    );
    let mut rejoined = [false, false];
    let deadline = Instant::now() + Duration::from_secs(20);
    while !rejoined.iter().all(|r| *r) {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("re-join not seen by both within 20 s: {rejoined:?}"));
        for (observer, seen) in rejoined.iter_mut().enumerate() {
            *seen |= says(&line, observer, "peer joined", &ids[2]);
        }
    }
    // SIGTERM: a clean shutdown and a zero exit code.
    let mut second = second;
    let status = std::process::Command::new("kill")
        .args(["-TERM", &second.child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
    let exit = common::wait_exit(&mut second.child, Duration::from_secs(10));
    assert!(
        exit.success(),
        "SIGTERM must end the node cleanly, got {exit}"
    );
    drop((first, restarted));
}
