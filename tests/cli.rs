//! The command line as a new user types it: create a topic, produce lines,
//! consume them back with a group, describe, and get one clear line on errors.

mod common;

use common::{ok, run, stderr, stdout};

#[test]
fn quick_start_flow() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let created = ok(
        d,
        &[
            "topic",
            "create",
            "test",
            "--partitions",
            "3",
            "--replication-factor",
            "1",
        ],
        "",
    );
    assert_eq!(created.trim(), "Created topic test.");
    let again = ok(
        d,
        &[
            "topic",
            "create",
            "test",
            "--partitions",
            "3",
            "--replication-factor",
            "1",
        ],
        "",
    );
    assert!(again.contains("already exists"), "{again}");
    assert_eq!(ok(d, &["topic", "list"], "").trim(), "test");

    let meta = ok(
        d,
        &["produce", "test", "--key", "k", "--print-metadata"],
        "one\ntwo\nthree\n",
    );
    let rows: Vec<Vec<&str>> = meta.lines().map(|l| l.split('\t').collect()).collect();
    assert_eq!(rows.len(), 3);
    // One key: one partition, consecutive offsets, distinct 64-hex-digit ids.
    assert!(
        rows.iter()
            .all(|r| r[0] == "test" && r[1] == rows[0][1] && r[3].len() == 64)
    );
    assert_eq!(
        rows.iter().map(|r| r[2]).collect::<Vec<_>>(),
        ["0", "1", "2"]
    );
    ok(d, &["produce", "test"], "four\nfive\n");

    let consumed = ok(
        d,
        &[
            "consume",
            "test",
            "--group",
            "G",
            "--from-beginning",
            "--max-messages",
            "5",
        ],
        "",
    );
    let mut values: Vec<&str> = consumed.lines().collect();
    values.sort();
    assert_eq!(values, ["five", "four", "one", "three", "two"]);
    // The keyed records come back in the order they were sent.
    let keyed: Vec<&str> = consumed
        .lines()
        .filter(|v| ["one", "two", "three"].contains(v))
        .collect();
    assert_eq!(keyed, ["one", "two", "three"]);

    // The group committed: nothing new for it, until more is produced.
    let nothing = ok(
        d,
        &[
            "consume",
            "test",
            "--group",
            "G",
            "--from-beginning",
            "--timeout-ms",
            "200",
        ],
        "",
    );
    assert_eq!(nothing, "");
    ok(d, &["produce", "test", "--key", "k"], "six\n");
    let next = ok(
        d,
        &[
            "consume",
            "test",
            "--group",
            "G",
            "--timeout-ms",
            "200",
            "--print-key",
        ],
        "",
    );
    assert_eq!(next, "k\tsix\n");

    let described = ok(d, &["topic", "describe", "test"], "");
    assert!(
        described.contains("Topic: test\tPartitionCount: 3"),
        "{described}"
    );
    let watermarks: u64 = described
        .lines()
        .filter_map(|l| l.split("HighWatermark: ").nth(1))
        .map(|rest| rest.split('\t').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(watermarks, 6);
}

#[test]
fn errors_are_one_line_with_a_failing_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(d, &["topic", "create", "t"], "");
    let cases: [(&[&str], &str); 5] = [
        (
            &["consume", "missing", "--timeout-ms", "10"],
            "error: topic 'missing' not found",
        ),
        (&["produce", "missing"], "error: topic 'missing' not found"),
        (
            &["topic", "create", "t", "--partitions", "2"],
            "already exists with a different configuration",
        ),
        (&["topic", "create", "bad name"], "not a valid topic name"),
        (
            &["topic", "create", "z", "--partitions", "0"],
            "invalid partitions",
        ),
    ];
    for (args, expected) in cases {
        let output = run(d, args, "");
        let err = stderr(&output);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(
            err.lines().count(),
            1,
            "{args:?} printed more than one line: {err}"
        );
        assert!(err.contains(expected), "{args:?}: {err}");
        assert!(stdout(&output).is_empty());
    }
    let too_big = "x".repeat(2 << 20);
    let output = run(d, &["produce", "t"], &format!("{too_big}\n"));
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("exceeds max_message_bytes"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn a_data_dir_in_use_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let _store = meshlog::store::Store::open(dir.path(), true).unwrap();
    let output = run(dir.path(), &["topic", "list"], "");
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("in use"), "{}", stderr(&output));
}

#[test]
fn peers_without_any_node_to_ask_fails_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let output = run(
        dir.path(),
        &["peers", "--no-mdns", "--timeout-ms", "300"],
        "",
    );
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("no storage node answered within 300 ms"),
        "{err}"
    );
}

#[test]
fn a_bootstrap_address_without_a_peer_id_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let output = run(
        dir.path(),
        &["peers", "--no-mdns", "--bootstrap", "/ip4/127.0.0.1/tcp/1"],
        "",
    );
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("must end in /p2p/<peer id>"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn groups_show_lag_and_reset_offsets_like_kafka() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(d, &["topic", "create", "t", "--partitions", "2"], "");
    ok(d, &["produce", "t", "--key", "a"], "1\n2\n3\n");
    ok(
        d,
        &[
            "consume",
            "t",
            "--group",
            "g",
            "--from-beginning",
            "--max-messages",
            "2",
        ],
        "",
    );
    assert_eq!(ok(d, &["group", "list"], "").trim(), "g");

    let described = ok(d, &["group", "describe", "g"], "");
    let rows: Vec<Vec<&str>> = described
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    // (topic, current offset, log end, lag) summed over the partitions the group has read.
    let lag: u64 = rows.iter().map(|r| r[5].parse::<u64>().unwrap()).sum();
    let committed: u64 = rows.iter().map(|r| r[3].parse::<u64>().unwrap()).sum();
    assert_eq!((committed, lag), (2, 1), "{described}");

    // A dry run changes nothing; --execute does.
    let plan = run(
        d,
        &[
            "group",
            "reset-offsets",
            "g",
            "--topic",
            "t",
            "--to-earliest",
        ],
        "",
    );
    assert!(plan.status.success());
    assert!(stderr(&plan).contains("Dry run"));
    assert_eq!(ok(d, &["group", "describe", "g"], ""), described);
    ok(
        d,
        &[
            "group",
            "reset-offsets",
            "g",
            "--topic",
            "t",
            "--to-earliest",
            "--execute",
        ],
        "",
    );
    let again = ok(
        d,
        &["consume", "t", "--group", "g", "--timeout-ms", "200"],
        "",
    );
    assert_eq!(
        again, "1\n2\n3\n",
        "after the reset the group reads everything again"
    );

    let missing = run(d, &["group", "describe", "nobody"], "");
    assert_eq!(missing.status.code(), Some(1));
    assert!(stderr(&missing).contains("does not exist"));
}

#[test]
fn the_demo_runs_a_local_mesh_and_reports_agreement() {
    let dir = tempfile::tempdir().unwrap();
    let output = common::meshlog(dir.path())
        .arg("demo")
        .output()
        .expect("run meshlog demo");
    let text = common::stdout(&output);
    assert!(
        output.status.success(),
        "{text}\n{}",
        common::stderr(&output)
    );
    assert_eq!(
        text.lines()
            .filter(|l| l.trim_start().starts_with("test "))
            .count(),
        100,
        "one line per record sent:\n{text}"
    );
    assert!(text.contains("Stopped node c"), "{text}");
    assert!(
        text.contains("== All 100 records were replicated, survived the loss of a node, and the replicas agree."),
        "{text}"
    );
}
