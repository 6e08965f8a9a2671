//! mDNS discovery between two real `meshlog node` processes, each in a network
//! namespace the test creates, joined by a veth pair (loopback has no
//! multicast, and libp2p's mDNS ignores it). Needs root and `ip`; elsewhere
//! the test is skipped with the reason printed.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Two namespaces joined by a veth pair, removed on drop.
struct Link {
    namespaces: [String; 2],
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Link {
    fn create(tag: &str, addresses: [&str; 2]) -> Result<Link, String> {
        let namespaces = [format!("ml-{tag}-a"), format!("ml-{tag}-b")];
        let link = Link {
            namespaces: namespaces.clone(),
        };
        let veth = [format!("mla{tag}"), format!("mlb{tag}")];
        for ns in &namespaces {
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        ip(&[
            "link",
            "add",
            &veth[0],
            "netns",
            &namespaces[0],
            "type",
            "veth",
            "peer",
            "name",
            &veth[1],
            "netns",
            &namespaces[1],
        ])?;
        for i in 0..2 {
            ip(&[
                "-n",
                &namespaces[i],
                "addr",
                "add",
                &format!("{}/24", addresses[i]),
                "dev",
                &veth[i],
            ])?;
            ip(&["-n", &namespaces[i], "link", "set", &veth[i], "up"])?;
        }
        Ok(link)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_in(
    ns: &str,
    data_dir: &Path,
    listen_ip: &str,
    index: usize,
    lines: &mpsc::Sender<(usize, String)>,
) -> Killed {
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            env!("CARGO_BIN_EXE_meshlog"),
            "--data-dir",
        ])
        .arg(data_dir)
        .args([
            "node",
            "--listen",
            &format!("/ip4/{listen_ip}/tcp/0"),
            "--gossip-interval-ms",
            "200",
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn meshlog node in a namespace");
    for stream in [
        Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().expect("stderr")),
    ] {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if lines.send((index, line)).is_err() {
                    return;
                }
            }
        });
    }
    Killed(child)
}

#[test]
fn nodes_find_each_other_by_mdns_without_bootstrap_addresses() {
    let tag = format!("{}", std::process::id() % 100_000);
    let addresses = ["10.231.7.1", "10.231.7.2"];
    let link = match Link::create(&tag, addresses) {
        Ok(link) => link,
        Err(reason) => {
            println!("skipped: cannot create network namespaces here ({reason})");
            return;
        }
    };
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let (tx, lines) = mpsc::channel();
    let _a = spawn_in(&link.namespaces[0], dirs[0].path(), addresses[0], 0, &tx);
    let _b = spawn_in(&link.namespaces[1], dirs[1].path(), addresses[1], 1, &tx);

    // Output and log lines cross separate pipes: collect both, then check.
    let mut peer_ids: [Option<String>; 2] = [None, None];
    let mut joined: [Vec<String>; 2] = [Vec::new(), Vec::new()];
    let sees_other = |node: usize, ids: &[Option<String>; 2], joined: &[Vec<String>; 2]| {
        ids[1 - node].as_ref().is_some_and(|other| {
            joined[node]
                .iter()
                .any(|l| l.contains(&format!("peer={other}")))
        })
    };
    let deadline = Instant::now() + Duration::from_secs(40);
    while !(sees_other(0, &peer_ids, &joined) && sees_other(1, &peer_ids, &joined)) {
        let (node, line) = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| {
                panic!("no mDNS discovery within 40 s (peer ids {peer_ids:?}, joins {joined:?})")
            });
        if let Some(id) = line.strip_prefix("peer id: ") {
            peer_ids[node] = Some(id.to_string());
        }
        if line.contains("peer joined") {
            joined[node].push(line);
        }
    }
}
