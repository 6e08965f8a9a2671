//! The `meshlog` command line: topics, produce, consume, benchmarks and the demo.
//!
//! Topic, produce and consume commands work on a local data directory
//! (`--data-dir`, or `$MESHLOG_DATA_DIR`, or the platform data directory), or,
//! with `--bootstrap-server`, on a running mesh that they join as a light
//! client. Errors print as one line on stderr with a non-zero exit code.

mod bench;
mod bench_mesh;
mod bench_soak;
mod consume;
mod demo;
mod group;
mod mesh;
mod produce;
mod topic;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use meshlog::{Node, NodeConfig};

/// meshlog: a brokerless, Kafka-like message bus with hash-chained records.
#[derive(Parser, Debug)]
#[command(name = "meshlog", version, about)]
struct Cli {
    /// The node's data directory [default: $MESHLOG_DATA_DIR, else ~/.local/share/meshlog]
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,

    /// Acknowledge writes without fsync: faster, but a crash may lose the last records.
    #[arg(long, global = true)]
    no_fsync: bool,

    /// Work on a running mesh, joined as a light client through this node: a
    /// multiaddr ending in /p2p/<peer id> (repeatable).
    #[arg(long, global = true, value_name = "MULTIADDR")]
    bootstrap_server: Vec<meshlog::net::Multiaddr>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create, list, describe and delete topics.
    #[command(subcommand)]
    Topic(topic::TopicCommand),
    /// Send one record per line of standard input.
    Produce(produce::ProduceArgs),
    /// Print records of a topic, one per line.
    Consume(consume::ConsumeArgs),
    /// List consumer groups, show their offsets and lag, reset their offsets.
    #[command(subcommand)]
    Group(group::GroupCommand),
    /// Measure performance.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Play the quick-start on a throwaway local mesh of three nodes: create a
    /// replicated topic, send, read back, stop a node, read again, compare replicas.
    Demo,
    /// Run a storage node in the mesh until Ctrl-C or SIGTERM.
    Node(mesh::NodeArgs),
    /// Join as a light client and list the mesh's members.
    Peers(mesh::PeersArgs),
}

impl Cli {
    /// The node a command runs on: the local data directory, or a light
    /// client of the mesh (with a throwaway data directory) when
    /// `--bootstrap-server` is given.
    fn node_config(&self, scratch: &std::path::Path) -> NodeConfig {
        if !self.bootstrap_server.is_empty() {
            let mut mesh = meshlog::net::MeshConfig::default()
                .with_role(meshlog::core::membership::Role::LightClient);
            mesh.mdns = false;
            mesh.bootstrap = self.bootstrap_server.clone();
            mesh.membership.gossip_interval = std::time::Duration::from_millis(200);
            return NodeConfig::default()
                .with_data_dir(scratch)
                .with_fsync(false)
                .with_network(mesh);
        }
        let config = NodeConfig::default()
            .with_fsync(!self.no_fsync)
            .without_network();
        match &self.data_dir {
            Some(dir) => config.with_data_dir(dir),
            None => config,
        }
    }
}

/// What commands return: any error, shown as one line.
type CliResult = Result<(), Box<dyn std::error::Error>>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A node's joins and deaths are its output; other commands log only warnings.
    init_logging(match cli.command {
        Command::Node(_) => "info,libp2p_swarm=warn,libp2p_kad=error",
        // The demo stops a node on purpose: the others' warnings are expected.
        Command::Demo => "error",
        _ => "warn",
    });
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    // A read of standard input still blocked in its thread (a command that
    // stopped on an error before its input ended) must not keep the process
    // alive: the runtime gives its threads a moment, then exits without them.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> CliResult {
    match &cli.command {
        Command::Topic(command) => with_node(&cli, |node| topic::run(node, command)).await,
        Command::Produce(args) => with_node(&cli, |node| produce::run(node, args)).await,
        Command::Consume(args) => with_node(&cli, |node| consume::run(node, args)).await,
        Command::Group(command) => with_node(&cli, |node| group::run(node, command)).await,
        Command::Bench(command) => bench::run(command, !cli.no_fsync).await,
        Command::Demo => demo::run().await,
        Command::Node(args) => mesh::run_node(cli.data_dir.clone(), !cli.no_fsync, args).await,
        Command::Peers(args) => mesh::run_peers(args).await,
    }
}

/// Opens the node, runs `f`, and shuts the node down whatever `f` returned.
async fn with_node<F, Fut>(cli: &Cli, f: F) -> CliResult
where
    F: FnOnce(Node) -> Fut,
    Fut: std::future::Future<Output = CliResult>,
{
    let scratch = tempfile::TempDir::new()?;
    let node = Node::open(cli.node_config(scratch.path())).await?;
    let result = f(node.clone()).await;
    node.shutdown().await;
    result
}

/// Logs go to stderr, filtered by `RUST_LOG` (default: `default_level`),
/// coloured only on a terminal.
fn init_logging(default_level: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
