//! The event loop: one task owns the swarm and the membership state machine.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, Message};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm, identify, kad, mdns};
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, info, warn};

use super::behaviour::{Behaviour, BehaviourEvent, KAD_PROTOCOL};
use super::codec::encoded_len;
use super::{
    Command, GossipStats, Keypair, MeshConfig, NetError, NodeId, peer_id_of, peer_id_of_node,
};
use crate::core::membership::{
    Action, MemberMeta, Membership, MembershipEvent, PROTOCOL_VERSION, Role,
};

/// How many gossip rounds between two measurements of free disk space.
const DISK_REFRESH_ROUNDS: u64 = 20;

/// The channels between the event loop and its [`super::Mesh`] handle.
pub(super) struct Channels {
    pub commands: mpsc::Receiver<Command>,
    pub events: broadcast::Sender<MembershipEvent<NodeId>>,
    pub listening: watch::Sender<Vec<Multiaddr>>,
}

pub(super) struct EventLoop {
    swarm: Swarm<Behaviour>,
    membership: Membership<NodeId>,
    channels: Channels,
    /// The origin of the membership's clock.
    start: Instant,
    /// Where free disk space is measured.
    data_dir: Option<PathBuf>,
    meta: MemberMeta,
    stats: GossipStats,
    listen_addrs: Vec<Multiaddr>,
    gossip_interval: Duration,
    rounds: u64,
}

impl EventLoop {
    pub fn new(
        keypair: Keypair,
        config: MeshConfig,
        data_dir: Option<PathBuf>,
        channels: Channels,
    ) -> Result<Self, NetError> {
        let peer_id = keypair.public().to_peer_id();
        let mut swarm = build_swarm(keypair, &config)?;
        for address in &config.listen {
            swarm
                .listen_on(address.clone())
                .map_err(|e| NetError::Address {
                    address: address.to_string(),
                    reason: e.to_string(),
                })?;
        }
        let meta = MemberMeta {
            role: config.role,
            protocol_version: PROTOCOL_VERSION,
            listen_addrs: Vec::new(),
            free_disk_bytes: None,
            zone: config.zone.clone(),
            mesh_id: None,
        };
        let incarnation = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_millis() as u64);
        let seed = {
            use std::hash::BuildHasher;
            std::hash::RandomState::new().hash_one(peer_id)
        };
        let mut membership = Membership::new(
            NodeId::from(peer_id),
            meta.clone(),
            incarnation,
            config.membership.clone(),
            seed,
        );
        for address in &config.bootstrap {
            let peer = peer_id_of(address).ok_or_else(|| NetError::Address {
                address: address.to_string(),
                reason: "a bootstrap address must end in /p2p/<peer id>".into(),
            })?;
            if peer == peer_id {
                continue;
            }
            swarm.add_peer_address(peer, address.clone());
            swarm
                .behaviour_mut()
                .kad
                .add_address(&peer, address.clone());
            membership.add_seed(NodeId::from(peer));
        }
        if !config.bootstrap.is_empty() {
            let _ = swarm.behaviour_mut().kad.bootstrap();
        }
        Ok(EventLoop {
            swarm,
            membership,
            channels,
            start: Instant::now(),
            data_dir,
            meta,
            stats: GossipStats::default(),
            listen_addrs: Vec::new(),
            gossip_interval: config.membership.gossip_interval,
            rounds: 0,
        })
    }

    /// A handle that opens and accepts the peer links' streams.
    pub fn stream_control(&self) -> libp2p_stream::Control {
        self.swarm.behaviour().stream.new_control()
    }

    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    /// Runs until shut down or until the handle is dropped.
    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(self.gossip_interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = self.channels.commands.recv() => match command {
                    Some(Command::Shutdown(done)) => {
                        let _ = done.send(());
                        break;
                    }
                    Some(command) => self.on_command(command),
                    None => break,
                },
                _ = tick.tick() => self.on_tick(),
            }
        }
        debug!("mesh event loop stopped");
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Members(reply) => {
                let _ = reply.send(self.membership.members());
            }
            Command::Stats(reply) => {
                let _ = reply.send(self.stats);
            }
            Command::LearnAddresses { peer, done } => {
                self.ensure_addresses(&NodeId::from(peer));
                let _ = done.send(());
            }
            Command::SetMeshId(mesh_id) => {
                self.meta.mesh_id = Some(mesh_id);
                self.membership.set_meta(self.meta.clone());
            }
            Command::Shutdown(done) => {
                let _ = done.send(());
            }
        }
    }

    fn on_tick(&mut self) {
        self.rounds += 1;
        if self.rounds % DISK_REFRESH_ROUNDS == 1 {
            self.refresh_meta();
        }
        let actions = self.membership.tick(self.now());
        self.apply(actions);
    }

    fn refresh_meta(&mut self) {
        self.meta.free_disk_bytes = self
            .data_dir
            .as_ref()
            .and_then(|dir| fs4::available_space(dir).ok());
        self.meta.listen_addrs = self.listen_addrs.iter().map(ToString::to_string).collect();
        self.membership.set_meta(self.meta.clone());
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                info!(address = %address.clone().with(Protocol::P2p(*self.swarm.local_peer_id())), "listening");
                self.listen_addrs.push(address);
                self.publish_listen_addrs();
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| *a != address);
                self.publish_listen_addrs();
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                for (peer, address) in found {
                    debug!(%peer, %address, "found by mDNS");
                    self.learn_address(peer, address);
                    self.membership.add_seed(NodeId::from(peer));
                }
            }
            // Kademlia learns no addresses by itself: feed it what identify reports.
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) if info.protocols.contains(&KAD_PROTOCOL) => {
                for address in info.listen_addrs {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer_id, address);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::RoutingUpdated {
                peer, ..
            })) => {
                self.membership.add_seed(NodeId::from(peer));
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossip(event)) => self.on_gossip_event(event),
            SwarmEvent::Behaviour(BehaviourEvent::Stream(())) => {}
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(peer),
                error,
                ..
            } => {
                debug!(%peer, %error, "cannot connect");
            }
            _ => {}
        }
    }

    fn publish_listen_addrs(&mut self) {
        let peer = *self.swarm.local_peer_id();
        let full: Vec<Multiaddr> = self
            .listen_addrs
            .iter()
            .map(|a| a.clone().with(Protocol::P2p(peer)))
            .collect();
        self.channels.listening.send_replace(full);
        self.refresh_meta();
    }

    fn learn_address(&mut self, peer: PeerId, address: Multiaddr) {
        self.swarm.add_peer_address(peer, address.clone());
        self.swarm.behaviour_mut().kad.add_address(&peer, address);
    }

    fn on_gossip_event(
        &mut self,
        event: request_response::Event<super::codec::GossipRequest, super::codec::GossipResponse>,
    ) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                Message::Request {
                    request, channel, ..
                } => {
                    let now = self.now();
                    let actions = self
                        .membership
                        .handle_message(NodeId::from(peer), request, now);
                    let (reply, others): (Vec<_>, Vec<_>) = actions.into_iter().partition(
                        |a| matches!(a, Action::Reply { to, .. } if *to == NodeId::from(peer)),
                    );
                    let reply = reply.into_iter().find_map(|a| match a {
                        Action::Reply { message, .. } => Some(message),
                        _ => None,
                    });
                    if let Some(message) = &reply {
                        self.count_sent(message);
                    }
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .gossip
                        .send_response(channel, reply);
                    self.apply(others);
                }
                Message::Response {
                    response: Some(message),
                    ..
                } => {
                    let now = self.now();
                    let actions = self
                        .membership
                        .handle_message(NodeId::from(peer), message, now);
                    self.apply(actions);
                }
                Message::Response { response: None, .. } => {}
            },
            request_response::Event::OutboundFailure { peer, error, .. } => {
                debug!(%peer, %error, "gossip not delivered");
                self.membership.unreachable(&NodeId::from(peer));
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                debug!(%peer, %error, "gossip from peer failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    fn count_sent(&mut self, message: &super::codec::GossipRequest) {
        self.stats.messages_sent += 1;
        self.stats.bytes_sent += encoded_len(message) as u64;
    }

    fn apply(&mut self, actions: Vec<Action<NodeId>>) {
        for action in actions {
            match action {
                Action::Send { to, message } | Action::Reply { to, message } => {
                    let Some(peer) = peer_id_of_node(&to) else {
                        continue;
                    };
                    self.count_sent(&message);
                    self.ensure_addresses(&to);
                    self.swarm
                        .behaviour_mut()
                        .gossip
                        .send_request(&peer, message);
                }
                Action::Event(event) => self.on_membership_event(event),
            }
        }
    }

    /// Before sending to a peer we are not connected to, give the swarm the
    /// addresses the peer gossiped about itself.
    fn ensure_addresses(&mut self, node: &NodeId) {
        let Some(peer) = peer_id_of_node(node) else {
            return;
        };
        if self.swarm.is_connected(&peer) {
            return;
        }
        let addresses: Vec<Multiaddr> = self
            .membership
            .members()
            .into_iter()
            .filter(|m| m.peer == *node)
            .filter_map(|m| m.meta)
            .flat_map(|meta| meta.listen_addrs)
            .filter_map(|a| a.parse().ok())
            .collect();
        for address in addresses {
            self.learn_address(peer, address);
        }
    }

    fn on_membership_event(&mut self, event: MembershipEvent<NodeId>) {
        match &event {
            MembershipEvent::Joined { peer } => {
                let role = match self.role_of(peer) {
                    Some(Role::Storage) => "storage",
                    Some(Role::LightClient) => "light client",
                    None => "unknown yet",
                };
                info!(%peer, role, "peer joined");
            }
            MembershipEvent::Suspected { peer } => warn!(%peer, "peer suspected"),
            MembershipEvent::Recovered { peer } => info!(%peer, "peer recovered"),
            MembershipEvent::Died { peer } => warn!(%peer, "peer dead"),
            MembershipEvent::Refused { peer, version } => {
                warn!(%peer, "refusing peer: it speaks protocol version {version}, this node speaks {PROTOCOL_VERSION}");
                if let Some(peer) = peer_id_of_node(peer) {
                    let _ = self.swarm.disconnect_peer_id(peer);
                }
            }
            MembershipEvent::ForeignMesh { peer, mesh_id } => {
                warn!(%peer, "refusing peer: it belongs to mesh {mesh_id:016x}, this node to mesh {:016x}; two meshes never merge", self.meta.mesh_id.unwrap_or(0));
                if let Some(peer) = peer_id_of_node(peer) {
                    let _ = self.swarm.disconnect_peer_id(peer);
                }
            }
        }
        let _ = self.channels.events.send(event);
    }

    fn role_of(&self, peer: &NodeId) -> Option<Role> {
        self.membership
            .members()
            .into_iter()
            .find(|m| m.peer == *peer)
            .and_then(|m| m.meta)
            .map(|meta| meta.role)
    }
}

fn build_swarm(keypair: Keypair, config: &MeshConfig) -> Result<Swarm<Behaviour>, NetError> {
    let transport_error = |e: &dyn std::fmt::Display| NetError::Transport(e.to_string());
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default().nodelay(true),
            libp2p::noise::Config::new,
            libp2p::yamux::Config::default,
        )
        .map_err(|e| transport_error(&e))?
        .with_quic()
        .with_behaviour(|key| {
            Behaviour::new(key, config)
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
        })
        .map_err(|e| transport_error(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    Ok(swarm)
}
