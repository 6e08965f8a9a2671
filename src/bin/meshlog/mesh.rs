//! `meshlog node` (run a storage node) and `meshlog peers` (list the members
//! as a light client).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use meshlog::core::membership::{MemberView, MembershipConfig, Role, Status};
use meshlog::net::{Keypair, Mesh, MeshConfig, Multiaddr, NodeId};
use meshlog::{Node, NodeConfig};

use crate::CliResult;

/// How a node or client joins the mesh.
#[derive(Args, Debug, Clone)]
pub struct JoinArgs {
    /// A peer to join through: a multiaddr ending in /p2p/<peer id> (repeatable).
    #[arg(long, value_name = "MULTIADDR")]
    pub bootstrap: Vec<Multiaddr>,
    /// Do not look for peers on the LAN with mDNS.
    #[arg(long)]
    pub no_mdns: bool,
    /// Time between gossip rounds, in ms.
    #[arg(long, default_value_t = 500)]
    pub gossip_interval_ms: u64,
    /// Heartbeat silence before a peer is suspected, in ms.
    #[arg(long, default_value_t = 2000)]
    pub suspect_after_ms: u64,
    /// Time a peer stays suspected before it is declared dead, in ms.
    #[arg(long, default_value_t = 3000)]
    pub suspicion_timeout_ms: u64,
}

impl JoinArgs {
    fn mesh_config(&self, listen: &[Multiaddr], role: Role) -> MeshConfig {
        let mut config = MeshConfig {
            bootstrap: self.bootstrap.clone(),
            mdns: !self.no_mdns,
            role,
            membership: MembershipConfig {
                gossip_interval: Duration::from_millis(self.gossip_interval_ms),
                suspect_after: Duration::from_millis(self.suspect_after_ms),
                suspicion_timeout: Duration::from_millis(self.suspicion_timeout_ms),
                ..MembershipConfig::default()
            },
            ..MeshConfig::default()
        };
        if !listen.is_empty() {
            config.listen = listen.to_vec();
        }
        config
    }
}

/// Options of `meshlog node`.
#[derive(Args, Debug)]
pub struct NodeArgs {
    /// An address to listen on (repeatable) [default: /ip4/0.0.0.0/tcp/0 and /ip4/0.0.0.0/udp/0/quic-v1]
    #[arg(long, value_name = "MULTIADDR")]
    pub listen: Vec<Multiaddr>,
    /// A failure zone (rack, site) to announce, for placement.
    #[arg(long)]
    pub zone: Option<String>,
    /// How often retention drops expired segments, in ms (Kafka's
    /// `log.retention.check.interval.ms`).
    #[arg(long, default_value_t = 300_000)]
    pub retention_check_interval_ms: u64,
    /// Memory the database may use to cache its pages, in MiB.
    #[arg(long, default_value_t = 64)]
    pub cache_mb: usize,
    #[command(flatten)]
    pub join: JoinArgs,
}

/// Options of `meshlog peers`.
#[derive(Args, Debug)]
pub struct PeersArgs {
    #[command(flatten)]
    pub join: JoinArgs,
    /// Give up when no storage node answers within this many ms.
    #[arg(long, default_value_t = 5000)]
    pub timeout_ms: u64,
}

/// Runs a storage node until Ctrl-C or SIGTERM.
pub async fn run_node(data_dir: Option<PathBuf>, fsync: bool, args: &NodeArgs) -> CliResult {
    let mut mesh = args.join.mesh_config(&args.listen, Role::Storage);
    mesh.zone = args.zone.clone();
    mesh.membership.validate()?;
    let mut config = NodeConfig::default().with_fsync(fsync).with_network(mesh);
    config.retention_check_interval = Duration::from_millis(args.retention_check_interval_ms);
    config.cache_bytes = args.cache_mb.saturating_mul(1024 * 1024);
    if let Some(dir) = data_dir {
        config.data_dir = dir;
    }
    let node = Node::open(config).await?;
    let Some(mesh) = node.mesh() else {
        return Err("the node did not join the network".into());
    };
    println!("peer id: {}", mesh.peer_id());
    println!("data dir: {}", node.data_dir().display());
    for address in mesh.wait_listening(Duration::from_secs(10)).await? {
        println!("listening on {address}");
    }
    tokio::select! {
        signal = wait_for_stop_signal() => signal?,
        failure = node.store_failure() => {
            if let Some(reason) = failure {
                node.shutdown().await;
                return Err(format!(
                    "the store failed ({reason}): this node left the mesh and stopped; its peers re-replicate its partitions"
                )
                .into());
            }
        }
    }
    eprintln!("shutting down");
    node.shutdown().await;
    Ok(())
}

async fn wait_for_stop_signal() -> std::io::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result,
        _ = terminate.recv() => Ok(()),
    }
}

/// Joins as a light client, waits for the members' view, prints it.
pub async fn run_peers(args: &PeersArgs) -> CliResult {
    let config = args.join.mesh_config(&[], Role::LightClient);
    config.membership.validate()?;
    let gossip_interval = config.membership.gossip_interval;
    let mesh = Mesh::start(Keypair::generate_ed25519(), config, None).await?;
    let mut events = mesh.subscribe();
    let first = tokio::time::timeout(Duration::from_millis(args.timeout_ms), events.recv()).await;
    if first.is_err() {
        mesh.shutdown().await;
        return Err(format!(
            "no storage node answered within {} ms (give --bootstrap, or check that mDNS reaches the nodes)",
            args.timeout_ms
        )
        .into());
    }
    // The first answer is one node's whole view; give the others a few rounds too.
    tokio::time::sleep(gossip_interval * 3).await;
    let members = mesh.members().await?;
    mesh.shutdown().await;
    print_members(&members);
    Ok(())
}

fn print_members(members: &[MemberView<NodeId>]) {
    println!(
        "{:<54} {:<8} {:<8} {:>7} {:<8} {:>10}  ADDRESSES",
        "PEER ID", "STATUS", "ROLE", "VERSION", "ZONE", "FREE DISK"
    );
    for m in members {
        let status = match m.status {
            Status::Alive => "alive",
            Status::Suspect => "suspect",
            Status::Dead => "dead",
        };
        let (role, version, zone, disk, addrs) = match &m.meta {
            Some(meta) => (
                match meta.role {
                    Role::Storage => "storage",
                    Role::LightClient => "client",
                },
                meta.protocol_version.to_string(),
                meta.zone.clone().unwrap_or_else(|| "-".into()),
                meta.free_disk_bytes.map_or_else(|| "-".into(), human_bytes),
                meta.listen_addrs.join(","),
            ),
            None => ("?", "?".into(), "-".into(), "-".into(), String::new()),
        };
        println!(
            "{:<54} {:<8} {:<8} {:>7} {:<8} {:>10}  {}",
            m.peer.to_string(),
            status,
            role,
            version,
            zone,
            disk,
            addrs
        );
    }
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}
