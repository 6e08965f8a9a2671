//! The composed libp2p behaviour: identify, Kademlia, mDNS (optional),
//! membership gossip over request-response, long-lived peer links
//! (libp2p-stream, see [`super::link`]) and connection limits.

use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{StreamProtocol, connection_limits, identify, kad, mdns, request_response};

use super::codec::{GOSSIP_PROTOCOL, GossipCodec};
use super::{MeshConfig, NetError};

/// meshlog's own Kademlia protocol, so its DHT never mixes with other networks'.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/meshlog/kad/1.0.0");

/// What identify announces as the protocol version.
pub const IDENTIFY_PROTOCOL: &str = "/meshlog/id/1.0.0";

/// Every behaviour a node runs.
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    /// Caps connections, so a flood of peers cannot exhaust the node.
    pub limits: connection_limits::Behaviour,
    /// Learns peers' listen addresses and protocols.
    pub identify: identify::Behaviour,
    /// Finds peers beyond the bootstrap ones.
    pub kad: kad::Behaviour<kad::store::MemoryStore>,
    /// Finds peers on the LAN; off when the config says so.
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    /// Membership gossip.
    pub gossip: request_response::Behaviour<GossipCodec>,
    /// Streams of the peer protocol: produce, replication, fetch, topics.
    pub stream: libp2p_stream::Behaviour,
}

impl Behaviour {
    /// Builds the behaviour for `key` with `config`.
    pub fn new(key: &Keypair, config: &MeshConfig) -> Result<Self, NetError> {
        let peer_id = key.public().to_peer_id();
        let limits = connection_limits::ConnectionLimits::default()
            .with_max_established(Some(config.max_connections))
            .with_max_established_per_peer(Some(2))
            .with_max_pending_incoming(Some(config.max_connections / 2 + 1));
        let identify = identify::Behaviour::new(
            identify::Config::new(IDENTIFY_PROTOCOL.to_string(), key.public())
                .with_agent_version(format!("meshlog/{}", env!("CARGO_PKG_VERSION"))),
        );
        let mut kad_config = kad::Config::new(KAD_PROTOCOL);
        kad_config.set_periodic_bootstrap_interval(Some(Duration::from_secs(60)));
        let mut kad =
            kad::Behaviour::with_config(peer_id, kad::store::MemoryStore::new(peer_id), kad_config);
        kad.set_mode(Some(if config.role_is_storage() {
            kad::Mode::Server
        } else {
            kad::Mode::Client
        }));
        let mdns = if config.mdns {
            let mdns_config = mdns::Config {
                query_interval: Duration::from_secs(5),
                ..mdns::Config::default()
            };
            Some(mdns::tokio::Behaviour::new(mdns_config, peer_id).map_err(NetError::Io)?)
        } else {
            None
        };
        let gossip = request_response::Behaviour::new(
            [(GOSSIP_PROTOCOL, request_response::ProtocolSupport::Full)],
            request_response::Config::default().with_request_timeout(Duration::from_secs(5)),
        );
        Ok(Behaviour {
            limits: connection_limits::Behaviour::new(limits),
            identify,
            kad,
            mdns: mdns.into(),
            gossip,
            stream: libp2p_stream::Behaviour::new(),
        })
    }
}
