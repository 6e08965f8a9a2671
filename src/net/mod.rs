//! The network shell: the only module that imports libp2p.
//!
//! A [`Mesh`] runs one swarm (TCP + noise + yamux, and QUIC; identify;
//! Kademlia; mDNS; membership gossip) in an event loop task that owns the
//! swarm and the [`Membership`] state machine. The loop feeds the machine
//! gossip messages, discovered peers and ticks, and carries out what it
//! returns: send gossip, log and publish membership events. Callers talk to
//! the loop through a bounded command channel. The peer protocol (records,
//! replication, topics, groups) does not pass through the loop: it runs on
//! long-lived [`link`]s, one stream per peer and direction.
//!
//! [`Membership`]: crate::core::membership::Membership

mod behaviour;
pub mod codec;
mod event_loop;
pub mod identity;
pub mod link;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

pub use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
pub use libp2p::{Multiaddr, PeerId};

use crate::core::membership::{MemberView, MembershipConfig, MembershipEvent, Role};
use crate::protocol::{PeerRequest, PeerResponse};

pub use crate::peer::NodeId;

impl From<PeerId> for NodeId {
    fn from(peer: PeerId) -> NodeId {
        // A peer id's bytes always fit (see `NodeId`); the empty identity is
        // only a fallback no peer can reach.
        NodeId::from_bytes(&peer.to_bytes()).unwrap_or_default()
    }
}

/// The libp2p peer id of a node, or `None` for bytes that are no peer id
/// (an identity a peer made up).
pub fn peer_id_of_node(node: &NodeId) -> Option<PeerId> {
    PeerId::from_bytes(node.as_bytes()).ok()
}

/// The network layer failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum NetError {
    /// An I/O error (sockets, the identity file).
    #[error("network I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The identity file is unreadable.
    #[error("identity file {path} is unreadable: {reason}")]
    Identity {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A listen or bootstrap address is unusable.
    #[error("bad address {address}: {reason}")]
    Address {
        /// The address as given.
        address: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// Building the transport failed.
    #[error("cannot build the network transport: {0}")]
    Transport(String),
    /// The mesh has shut down.
    #[error("the mesh is shut down")]
    Closed,
    /// A request to a peer failed (unreachable, timed out, refused the protocol).
    #[error("request to {peer} failed: {reason}")]
    Request {
        /// The peer.
        peer: NodeId,
        /// What went wrong.
        reason: String,
    },
}

/// How a node takes part in the mesh.
#[derive(Clone, Debug)]
pub struct MeshConfig {
    /// Addresses to listen on. Default: every interface, an ephemeral TCP port
    /// and an ephemeral QUIC port.
    pub listen: Vec<Multiaddr>,
    /// Peers to join through, as multiaddrs ending in `/p2p/<peer id>`.
    pub bootstrap: Vec<Multiaddr>,
    /// Find peers on the LAN by mDNS. Default `true`.
    pub mdns: bool,
    /// Storage node or light client. Default storage.
    pub role: Role,
    /// An optional failure zone, gossiped for placement.
    pub zone: Option<String>,
    /// Most connections at once. Default 256.
    pub max_connections: u32,
    /// Gossip timings.
    pub membership: MembershipConfig,
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            listen: vec![
                tcp_address(Ipv4Addr::UNSPECIFIED),
                quic_address(Ipv4Addr::UNSPECIFIED),
            ],
            bootstrap: Vec::new(),
            mdns: true,
            role: Role::Storage,
            zone: None,
            max_connections: 256,
            membership: MembershipConfig::default(),
        }
    }
}

impl MeshConfig {
    /// Listens on 127.0.0.1 only (TCP), without mDNS: for tests and local meshes.
    pub fn loopback() -> Self {
        MeshConfig {
            listen: vec![tcp_address(Ipv4Addr::LOCALHOST)],
            mdns: false,
            ..MeshConfig::default()
        }
    }

    /// Adds a bootstrap address.
    pub fn with_bootstrap(mut self, address: Multiaddr) -> Self {
        self.bootstrap.push(address);
        self
    }

    /// Sets the role.
    pub fn with_role(mut self, role: Role) -> Self {
        self.role = role;
        self
    }

    pub(crate) fn role_is_storage(&self) -> bool {
        self.role == Role::Storage
    }
}

/// Counters of the gossip traffic a mesh has sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GossipStats {
    /// Gossip messages sent (requests and replies).
    pub messages_sent: u64,
    /// Their encoded bytes.
    pub bytes_sent: u64,
}

/// A peer-protocol request that arrived, with the way to answer it.
pub struct InboundRequest {
    /// Who asked.
    pub from: NodeId,
    /// What it asked.
    pub request: PeerRequest,
    /// Where the answer goes; dropping it fails the peer's request.
    pub reply: oneshot::Sender<PeerResponse>,
}

/// Peer-protocol requests waiting for the node; beyond this, new ones fail.
const INBOUND_DEPTH: usize = 4096;

enum Command {
    Members(oneshot::Sender<Vec<MemberView<NodeId>>>),
    SetMeshId(u64),
    /// Give the swarm the addresses `peer` gossiped, before a link dials it.
    LearnAddresses {
        peer: PeerId,
        done: oneshot::Sender<()>,
    },
    Stats(oneshot::Sender<GossipStats>),
    Shutdown(oneshot::Sender<()>),
}

/// A running mesh membership: the handle to the event loop.
pub struct Mesh {
    peer_id: PeerId,
    inbound: std::sync::Mutex<Option<mpsc::Receiver<InboundRequest>>>,
    commands: mpsc::Sender<Command>,
    /// The peer protocol's outbound links.
    links: link::Links,
    events: broadcast::Sender<MembershipEvent<NodeId>>,
    listening: watch::Receiver<Vec<Multiaddr>>,
}

impl Mesh {
    /// Builds the swarm, starts listening and bootstrapping, and spawns the
    /// event loop. `data_dir` is where free disk space is measured, if any.
    pub async fn start(
        keypair: Keypair,
        config: MeshConfig,
        data_dir: Option<PathBuf>,
    ) -> Result<Mesh, NetError> {
        let peer_id = keypair.public().to_peer_id();
        let (commands, receiver) = mpsc::channel(4096);
        let (inbound_tx, inbound) = mpsc::channel(INBOUND_DEPTH);
        let (events, _) = broadcast::channel(1024);
        let (listen_tx, listening) = watch::channel(Vec::new());
        let channels = event_loop::Channels {
            commands: receiver,
            events: events.clone(),
            listening: listen_tx,
        };
        let storage = config.role_is_storage();
        let event_loop = event_loop::EventLoop::new(keypair, config, data_dir, channels)?;
        let mut control = event_loop.stream_control();
        if storage {
            let incoming = control
                .accept(link::LINK_PROTOCOL)
                .map_err(|e| NetError::Transport(e.to_string()))?;
            tokio::spawn(link::accept(incoming, inbound_tx));
        }
        tokio::spawn(event_loop.run());
        let links = link::Links::new(control, commands.clone());
        Ok(Mesh {
            peer_id,
            inbound: std::sync::Mutex::new(Some(inbound)),
            commands,
            links,
            events,
            listening,
        })
    }

    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Every member this node knows of, with status and metadata.
    pub async fn members(&self) -> Result<Vec<MemberView<NodeId>>, NetError> {
        self.ask(Command::Members).await
    }

    /// The addresses the node listens on now (each ends in `/p2p/<peer id>`).
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.listening.borrow().clone()
    }

    /// Waits until the node listens on at least one address, up to
    /// `timeout`; returns the addresses (empty if none came in time).
    pub async fn wait_listening(&self, timeout: Duration) -> Result<Vec<Multiaddr>, NetError> {
        let mut listening = self.listening.clone();
        let ready =
            tokio::time::timeout(timeout, listening.wait_for(|addrs| !addrs.is_empty())).await;
        match ready {
            Ok(Ok(addrs)) => Ok(addrs.clone()),
            Ok(Err(_)) => Err(NetError::Closed),
            Err(_) => Ok(Vec::new()),
        }
    }

    /// Takes the stream of peer-protocol requests that arrive (once; later
    /// calls get `None`). Until taken, requests wait; past a bound they fail.
    pub fn take_inbound(&self) -> Option<mpsc::Receiver<InboundRequest>> {
        self.inbound.lock().ok()?.take()
    }

    /// Sends `request` to `to` over the link to it and waits for the answer.
    pub async fn request(
        &self,
        to: NodeId,
        request: PeerRequest,
    ) -> Result<PeerResponse, NetError> {
        let (reply, answer) = oneshot::channel();
        self.links.send(&to, request, Some(reply)).await?;
        answer.await.map_err(|_| NetError::Closed)?
    }

    /// Sends `request` to `to` without waiting for an answer (replication
    /// traffic, whose answers come back as requests of their own). Messages
    /// sent this way to one peer arrive in the order they were sent, unless
    /// the link between them broke in between.
    pub async fn send(&self, to: NodeId, request: PeerRequest) -> Result<(), NetError> {
        self.links.send(&to, request, None).await
    }

    /// Announces the mesh this node belongs to; from then on members of any
    /// other mesh are refused.
    pub async fn set_mesh_id(&self, mesh_id: u64) -> Result<(), NetError> {
        self.commands
            .send(Command::SetMeshId(mesh_id))
            .await
            .map_err(|_| NetError::Closed)
    }

    /// The gossip traffic sent so far.
    pub async fn gossip_stats(&self) -> Result<GossipStats, NetError> {
        self.ask(Command::Stats).await
    }

    /// Membership events from now on (joins, suspicions, deaths, refusals).
    pub fn subscribe(&self) -> broadcast::Receiver<MembershipEvent<NodeId>> {
        self.events.subscribe()
    }

    /// Stops the event loop and closes every connection.
    pub async fn shutdown(&self) {
        let _ = self.ask(Command::Shutdown).await;
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, NetError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(make(reply))
            .await
            .map_err(|_| NetError::Closed)?;
        answer.await.map_err(|_| NetError::Closed)
    }
}

/// `/ip4/IP/tcp/0`: an ephemeral TCP port.
pub fn tcp_address(ip: Ipv4Addr) -> Multiaddr {
    Multiaddr::empty()
        .with(Protocol::Ip4(ip))
        .with(Protocol::Tcp(0))
}

/// `/ip4/IP/udp/0/quic-v1`: an ephemeral QUIC port.
pub fn quic_address(ip: Ipv4Addr) -> Multiaddr {
    Multiaddr::empty()
        .with(Protocol::Ip4(ip))
        .with(Protocol::Udp(0))
        .with(Protocol::QuicV1)
}

/// The peer id at the end of a `/p2p/...` multiaddr.
pub fn peer_id_of(address: &Multiaddr) -> Option<PeerId> {
    address.iter().find_map(|p| match p {
        Protocol::P2p(peer) => Some(peer),
        _ => None,
    })
}
