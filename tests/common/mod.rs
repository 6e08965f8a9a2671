//! Helpers shared by the tests that run the real `meshlog` binary.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// A `meshlog` command working on `data_dir`.
pub fn meshlog(data_dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshlog"));
    cmd.arg("--data-dir")
        .arg(data_dir)
        .env_remove("MESHLOG_DATA_DIR")
        .env_remove("RUST_LOG");
    cmd
}

/// Runs `meshlog ARGS` on `data_dir` with `stdin` as standard input.
pub fn run(data_dir: &Path, args: &[&str], stdin: &str) -> Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = meshlog(data_dir)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn meshlog");
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin.as_bytes()).expect("write stdin");
    drop(input);
    child.wait_with_output().expect("wait for meshlog")
}

/// Standard output as text.
pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Standard error as text.
pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs `meshlog ARGS` and fails the test unless it succeeds; returns stdout.
pub fn ok(data_dir: &Path, args: &[&str], stdin: &str) -> String {
    let output = run(data_dir, args, stdin);
    assert!(
        output.status.success(),
        "meshlog {args:?} failed: {}",
        stderr(&output)
    );
    stdout(&output)
}
