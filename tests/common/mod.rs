//! Helpers shared by the tests that run the real `meshlog` binary.

#![allow(dead_code)]

pub mod cluster;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

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

/// One log or output line of a node process, stamped when the test read it.
pub struct Line {
    pub node: usize,
    pub at: Instant,
    pub text: String,
}

/// A running `meshlog node` whose output lines arrive on the shared channel.
pub struct NodeProcess {
    pub child: Child,
    pub peer_id: String,
    pub address: String,
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `meshlog node` on 127.0.0.1 with `extra` arguments; waits until it
/// prints its peer id and address. Its stderr lines go to `lines`.
pub fn spawn_node(
    index: usize,
    data_dir: &Path,
    bootstrap: Option<&str>,
    lines: &mpsc::Sender<Line>,
    extra: &[String],
) -> NodeProcess {
    let mut cmd = meshlog(data_dir);
    cmd.args(["node", "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"])
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(address) = bootstrap {
        cmd.args(["--bootstrap", address]);
    }
    let mut child = cmd.spawn().expect("spawn meshlog node");
    forward(index, child.stderr.take().expect("stderr"), lines.clone());
    let (own_tx, own_rx) = mpsc::channel();
    forward(index, child.stdout.take().expect("stdout"), own_tx);
    let (mut peer_id, mut address) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(20);
    while peer_id.is_none() || address.is_none() {
        let line = own_rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("node printed its peer id and address in time");
        if let Some(id) = line.text.strip_prefix("peer id: ") {
            peer_id = Some(id.to_string());
        }
        if let Some(a) = line.text.strip_prefix("listening on ") {
            address = Some(a.to_string());
        }
    }
    NodeProcess {
        child,
        peer_id: peer_id.unwrap_or_default(),
        address: address.unwrap_or_default(),
    }
}

/// Sends each line of `stream` to `lines`, stamped with the time it was read.
pub fn forward(
    node: usize,
    stream: impl std::io::Read + Send + 'static,
    lines: mpsc::Sender<Line>,
) {
    std::thread::spawn(move || {
        for text in BufReader::new(stream).lines().map_while(Result::ok) {
            if lines
                .send(Line {
                    node,
                    at: Instant::now(),
                    text,
                })
                .is_err()
            {
                return;
            }
        }
    });
}

/// Waits for a child to exit, up to `within`.
pub fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("wait for the node") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the node did not exit within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends SIGTERM to a child (a clean stop).
pub fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -TERM failed");
}

/// A tmpfs mounted for the test's lifetime.
pub struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it) on a fresh
    /// directory, or fails the test saying why (it needs root).
    pub fn mount(size: &str) -> SmallDisk {
        match Self::try_mount(size) {
            Ok(disk) => disk,
            Err(reason) => {
                panic!("this test mounts a small tmpfs and needs root to do it: {reason}")
            }
        }
    }

    fn try_mount(size: &str) -> Result<SmallDisk, String> {
        let dir = tempfile::Builder::new()
            .prefix("meshlog-full-disk-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let path = dir.keep();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !status.status.success() {
            let _ = std::fs::remove_dir(&path);
            return Err(format!(
                "mount failed: {}",
                String::from_utf8_lossy(&status.stderr).trim()
            ));
        }
        Ok(SmallDisk { path })
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
        let _ = std::fs::remove_dir(&self.path);
    }
}
