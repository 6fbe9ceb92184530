//! zavod-net: the libp2p shell.
//!
//! Shape: [`new`] returns a [`Client`] (a cheap handle that sends commands
//! over a bounded channel and gets replies on oneshots), a receiver of
//! [`Event`]s, and an [`EventLoop`] that owns the swarm and must be spawned.
//! Streams for chats are opened and accepted through libp2p-stream's
//! `Control`, outside the event loop, and framed by [`frames::FrameStream`]:
//! a length prefix and a bincode body under a hard size limit.
//!
//! Discovery: bootstrap addresses are dialled, identify tells Kademlia the
//! addresses peers listen on, Kademlia spreads them, and mDNS (when enabled)
//! finds peers on the LAN. Capacity announcements travel on one gossipsub
//! topic; messages are signed by their author and limited in size.
//!
//! Every wait on the network has a timeout; every channel is bounded.
//!
//! Admission happens in the swarm: the deny and allow lists and the
//! connection limits are behaviours ahead of the rest, gossip is judged by
//! the node before it is forwarded (with peer scoring), Kademlia stores no
//! records, and a connection whose pings fail is closed.
//!
//! Why this file passes 600 lines: the swarm's construction (two transport
//! chains, the behaviours and their admission and scoring settings), its
//! event loop and the commands it serves all hold the one swarm; the
//! addresses, frames, mesh key and Tailscale are in their own files, and
//! the last ninety lines are tests.

#![warn(unreachable_pub)]

pub mod addr;
pub mod frames;
pub mod psk;
pub mod tailscale;

use futures::StreamExt;
use libp2p::core::ConnectedPoint;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{ConnectionId, NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, gossipsub, identify, kad, mdns, noise, ping, tcp,
    yamux,
};
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use zavod_proto::NodeId;

pub use addr::parse_peer_addr;
pub use frames::{FrameReader, FrameStream, FrameWriter};
pub use libp2p;

/// The chat stream protocol: one request, then a stream of answer frames.
pub const CHAT_PROTOCOL: StreamProtocol = StreamProtocol::new("/zavod/chat/1");
/// Stream protocol for joining a mesh with an invite.
pub const JOIN_PROTOCOL: StreamProtocol = StreamProtocol::new("/zavod/join/1");
/// Stream protocol for asking a node about the mesh.
pub const STATUS_PROTOCOL: StreamProtocol = StreamProtocol::new("/zavod/status/1");
/// Stream protocol for running a granted request on its target node.
pub const RUN_PROTOCOL: StreamProtocol = StreamProtocol::new("/zavod/run/1");
/// An entry asks the node it placed an embedding request on for vectors.
pub const EMBED_PROTOCOL: StreamProtocol = StreamProtocol::new("/zavod/embed/1");
/// A credential holder lists, exports or deletes its own conversations.
pub const MEMORY_PROTOCOL: StreamProtocol = StreamProtocol::new("/zavod/memory/1");
/// Members read and write the replicas of conversations they keep.
pub const REPLICA_PROTOCOL: StreamProtocol = StreamProtocol::new("/zavod/replica/1");
/// Node to node actor sessions (ractor_cluster), one per pair of nodes.
pub const ACTORS_PROTOCOL: StreamProtocol = StreamProtocol::new("/zavod/actors/1");
const IDENTIFY_PROTOCOL: &str = "/zavod/id/1";
const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/zavod/kad/1");
/// The gossipsub topic of capacity announcements.
pub const CAPACITY_TOPIC: &str = "zavod/capacity/1";
/// Largest gossip message accepted or sent.
pub const MAX_GOSSIP_BYTES: usize = 16 * 1024;
/// How often Kademlia refreshes its routing table.
const KAD_BOOTSTRAP_EVERY: Duration = Duration::from_secs(30);
/// Commands waiting for the event loop.
const COMMAND_BUFFER: usize = 64;
/// Events waiting for the node.
const EVENT_BUFFER: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("network setup: {0}")]
    Setup(String),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: String, reason: String },
    #[error("cannot reach {addr}: {reason}")]
    Dial { addr: String, reason: String },
    #[error("timed out after {ms} ms while {what}")]
    Timeout { what: String, ms: u64 },
    #[error("cannot open a {protocol} stream to {peer}: {reason}")]
    OpenStream {
        protocol: String,
        peer: String,
        reason: String,
    },
    #[error("malformed address {input:?}: {reason}")]
    BadAddress { input: String, reason: String },
    #[error("the network event loop has stopped")]
    Stopped,
    #[error("peer sent a frame over the {limit}-byte limit")]
    FrameTooLarge { limit: usize },
    #[error("stream: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Wire(#[from] zavod_proto::wire::WireError),
}

/// Why a stream did not open, in words: libp2p says "oneshot canceled"
/// when the connection closed while the stream was being opened.
fn open_failure(e: &libp2p_stream::OpenStreamError) -> String {
    match e {
        libp2p_stream::OpenStreamError::UnsupportedProtocol(p) => {
            format!("it does not serve {p} (another zavod version, or not a zavod node)")
        }
        libp2p_stream::OpenStreamError::Io(io)
            if io.kind() == std::io::ErrorKind::ConnectionReset =>
        {
            "the connection to it closed before the stream opened (the node stopped, \
             restarted or went away)"
                .into()
        }
        libp2p_stream::OpenStreamError::Io(io) => error_chain(io),
        other => error_chain(other),
    }
}

/// An error and its sources in one line: libp2p's transport errors often
/// say nothing themselves and keep the cause (an OS error) as a source.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        parts.push(s.to_string());
        source = s.source();
    }
    parts.retain(|p| !p.is_empty());
    parts.dedup();
    if parts.is_empty() {
        "unknown error".into()
    } else {
        parts.join(": ")
    }
}

/// Timeouts and limits of the network shell.
#[derive(Debug, Clone)]
pub struct NetConfig {
    pub dial_timeout_ms: u64,
    pub idle_connection_timeout_ms: u64,
    pub max_frame_bytes: usize,
    /// Find peers on the local network by mDNS.
    pub mdns: bool,
    /// Take part in capacity gossip (clients do not).
    pub gossip: bool,
    /// A private mesh's pre-shared key: TCP only, through libp2p's private
    /// network transport, and no QUIC (see [`psk`]).
    pub psk: Option<libp2p::pnet::PreSharedKey>,
    /// Who may connect, and how many connections are kept.
    pub admission: Admission,
}

/// Which peers may hold a connection to this node, and how many
/// connections it keeps. Enforced by the swarm before any protocol runs.
#[derive(Debug, Clone)]
pub struct Admission {
    /// When not empty, only these peers connect (in or out): every member
    /// and client this node talks with must be listed.
    pub allow: Vec<PeerId>,
    /// Never connected with, whatever else holds.
    pub deny: Vec<PeerId>,
    /// Established connections, in and out together.
    pub max_connections: u32,
    pub max_connections_per_peer: u32,
    /// Incoming connections still in their handshake.
    pub max_pending_incoming: u32,
}

impl Default for Admission {
    fn default() -> Self {
        Admission {
            allow: Vec::new(),
            deny: Vec::new(),
            max_connections: 1024,
            max_connections_per_peer: 4,
            max_pending_incoming: 128,
        }
    }
}

/// How the node judged a gossip message, which decides whether it is
/// forwarded and how its sender is scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// New and valid: forwarded.
    Accept,
    /// Valid but nothing new (stale, or the view is full): not forwarded,
    /// the sender not blamed.
    Ignore,
    /// Invalid (undecodable, not a member, a bad signature, or the gossip
    /// author is not the node the report is about): not forwarded, and the
    /// peer that sent it loses score.
    Reject,
}

/// Names one received gossip message so the node can report its verdict.
#[derive(Debug, Clone)]
pub struct GossipTicket {
    id: gossipsub::MessageId,
    from: PeerId,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            dial_timeout_ms: 10_000,
            idle_connection_timeout_ms: 60_000,
            max_frame_bytes: zavod_proto::limits::MAX_FRAME_BYTES,
            mdns: false,
            gossip: false,
            psk: None,
            admission: Admission::default(),
        }
    }
}

impl NetConfig {
    /// A client's network (`zavod chat`, `zavod status`): no gossip, and
    /// the private mesh's key when `psk_file` names one.
    pub fn client(psk_file: Option<&std::path::Path>) -> Result<Self, NetError> {
        Ok(NetConfig {
            psk: psk_file.map(psk::read).transpose()?,
            ..Default::default()
        })
    }
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    // First, so a refused peer is turned away before any other behaviour
    // sees its connection.
    deny: libp2p::allow_block_list::Behaviour<libp2p::allow_block_list::BlockedPeers>,
    allow: Toggle<libp2p::allow_block_list::Behaviour<libp2p::allow_block_list::AllowedPeers>>,
    limits: libp2p::connection_limits::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    stream: libp2p_stream::Behaviour,
    kad: Toggle<kad::Behaviour<kad::store::MemoryStore>>,
    gossipsub: Toggle<gossipsub::Behaviour>,
    mdns: Toggle<mdns::tokio::Behaviour>,
}

/// What the event loop tells the node.
#[derive(Debug, Clone)]
pub enum Event {
    Connected {
        peer: PeerId,
        addr: Multiaddr,
    },
    Disconnected {
        peer: PeerId,
    },
    Rtt {
        peer: PeerId,
        rtt: Duration,
    },
    /// A capacity announcement from `author` (signed by it at the gossip
    /// layer), held back from forwarding until the node reports its
    /// [`Verdict`] with [`Client::judge`].
    Gossip {
        author: Option<PeerId>,
        data: Vec<u8>,
        ticket: GossipTicket,
    },
}

#[derive(Debug)]
enum Command {
    Listen {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<Multiaddr, NetError>>,
    },
    Dial {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<PeerId, NetError>>,
    },
    ListenAddrs {
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
    /// Dial if not connected; no reply (used for peers learnt from gossip).
    Connect {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
    },
    Publish {
        data: Vec<u8>,
    },
    IsConnected {
        peer: PeerId,
        reply: oneshot::Sender<bool>,
    },
    Judge {
        ticket: GossipTicket,
        verdict: Verdict,
    },
    Block {
        peer: PeerId,
    },
}

/// Handle to the network; clone freely.
#[derive(Clone)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    control: libp2p_stream::Control,
    local_peer_id: PeerId,
    cfg: NetConfig,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Client({})", self.local_peer_id)
    }
}

/// Builds a libp2p identity from a zavod key's 32 secret bytes.
pub fn identity_from_secret(secret: [u8; 32]) -> Result<libp2p::identity::Keypair, NetError> {
    libp2p::identity::Keypair::ed25519_from_bytes(secret)
        .map_err(|e| NetError::Setup(format!("bad node key: {e}")))
}

/// The zavod node id behind an ed25519 peer id; `None` for other key types.
pub fn node_id_of(peer: &PeerId) -> Option<NodeId> {
    let mh: &libp2p::multihash::Multihash<64> = peer.as_ref();
    // ed25519 peer ids inline the public key (identity multihash, code 0).
    if mh.code() != 0 {
        return None;
    }
    let pk = libp2p::identity::PublicKey::try_decode_protobuf(mh.digest()).ok()?;
    let ed = pk.try_into_ed25519().ok()?;
    Some(NodeId(ed.to_bytes()))
}

/// The peer id of a zavod node id.
pub fn peer_id_of(node: &NodeId) -> Option<PeerId> {
    let ed = libp2p::identity::ed25519::PublicKey::try_from_bytes(&node.0).ok()?;
    Some(PeerId::from_public_key(&ed.into()))
}

/// How people see a node: its peer id, or its key in hex if it has none.
pub fn peer_label(node: &NodeId) -> String {
    peer_id_of(node).map_or_else(|| node.to_hex(), |p| p.to_string())
}

/// The network behaviours every node runs (Kademlia and gossip only with
/// `gossip`, mDNS only with `mdns`).
fn make_behaviour(
    key: &libp2p::identity::Keypair,
    gossip_on: bool,
    mdns_on: bool,
    admission: &Admission,
) -> Result<Behaviour, Box<dyn std::error::Error + Send + Sync>> {
    let peer = key.public().to_peer_id();
    let kad = gossip_on.then(|| {
        let mut config = kad::Config::new(KAD_PROTOCOL);
        // Kademlia only finds peers here; records and provider entries
        // other nodes put are handed to the event loop, which stores none,
        // so a stranger cannot fill this node's memory with them.
        config.set_record_filtering(kad::StoreInserts::FilterBoth);
        let mut k = kad::Behaviour::with_config(peer, kad::store::MemoryStore::new(peer), config);
        // Answer queries even before an external address is known
        // (loopback and private meshes).
        k.set_mode(Some(kad::Mode::Server));
        k
    });
    let gossipsub = if gossip_on {
        let config = gossipsub::ConfigBuilder::default()
            .heartbeat_interval(Duration::from_millis(700))
            .validation_mode(gossipsub::ValidationMode::Strict)
            // Nothing is forwarded before the node has judged it.
            .validate_messages()
            .max_transmit_size(MAX_GOSSIP_BYTES)
            .build()?;
        let mut g =
            gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Signed(key.clone()), config)?;
        let topic = gossipsub::IdentTopic::new(CAPACITY_TOPIC);
        g.with_peer_score(gossip_score_params(&topic), gossip_score_thresholds())?;
        g.subscribe(&topic)?;
        Some(g)
    } else {
        None
    };
    let mdns = if mdns_on {
        Some(mdns::tokio::Behaviour::new(mdns::Config::default(), peer)?)
    } else {
        None
    };
    let mut deny =
        libp2p::allow_block_list::Behaviour::<libp2p::allow_block_list::BlockedPeers>::default();
    for p in &admission.deny {
        deny.block_peer(*p);
    }
    let allow = (!admission.allow.is_empty()).then(|| {
        let mut a =
            libp2p::allow_block_list::Behaviour::<libp2p::allow_block_list::AllowedPeers>::default(
            );
        for p in &admission.allow {
            a.allow_peer(*p);
        }
        a
    });
    let limits = libp2p::connection_limits::Behaviour::new(
        libp2p::connection_limits::ConnectionLimits::default()
            .with_max_established(Some(admission.max_connections))
            .with_max_established_per_peer(Some(admission.max_connections_per_peer))
            .with_max_pending_incoming(Some(admission.max_pending_incoming)),
    );
    Ok(Behaviour {
        deny,
        allow: allow.into(),
        limits,
        identify: identify::Behaviour::new(identify::Config::new(
            IDENTIFY_PROTOCOL.into(),
            key.public(),
        )),
        ping: ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_secs(5))),
        stream: libp2p_stream::Behaviour::new(),
        kad: kad.into(),
        gossipsub: gossipsub.into(),
        mdns: mdns.into(),
    })
}

/// Peer scoring for the capacity topic. Announcements are few (about one
/// a second per node), so the delivery-rate terms that suit busy topics
/// would mark honest peers of a small mesh as slow; they are off. What
/// counts is invalid messages: each one the node rejects costs its sender
/// (squared, so a few are enough to cut it off), and the penalty decays
/// within a minute, so one disagreement about a membership's expiry at
/// the edge of two clocks does not.
fn gossip_score_params(topic: &gossipsub::IdentTopic) -> gossipsub::PeerScoreParams {
    let topic_params = gossipsub::TopicScoreParams {
        topic_weight: 1.0,
        time_in_mesh_weight: 0.01,
        time_in_mesh_quantum: Duration::from_secs(1),
        time_in_mesh_cap: 100.0,
        first_message_deliveries_weight: 0.1,
        first_message_deliveries_decay: 0.9,
        first_message_deliveries_cap: 100.0,
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        invalid_message_deliveries_weight: -10.0,
        invalid_message_deliveries_decay: 0.9,
        ..Default::default()
    };
    let mut p = gossipsub::PeerScoreParams {
        // Nodes of one machine or behind one address are normal here.
        ip_colocation_factor_weight: 0.0,
        ..Default::default()
    };
    p.topics.insert(topic.hash(), topic_params);
    p
}

/// Below `graylist` (about three rejected messages in a row) a peer's
/// gossip is ignored altogether until its score recovers.
fn gossip_score_thresholds() -> gossipsub::PeerScoreThresholds {
    gossipsub::PeerScoreThresholds {
        gossip_threshold: -20.0,
        publish_threshold: -40.0,
        graylist_threshold: -80.0,
        ..Default::default()
    }
}

/// Creates the swarm. Spawn `EventLoop::run` and keep the event receiver
/// drained.
pub fn new(
    identity: libp2p::identity::Keypair,
    cfg: NetConfig,
) -> Result<(Client, mpsc::Receiver<Event>, EventLoop), NetError> {
    let idle = Duration::from_millis(cfg.idle_connection_timeout_ms);
    let (gossip_on, mdns_on, has_key) = (cfg.gossip, cfg.mdns, cfg.psk.is_some());
    let admission = cfg.admission.clone();
    let behaviour =
        move |key: &libp2p::identity::Keypair| make_behaviour(key, gossip_on, mdns_on, &admission);
    let setup = |e: &dyn std::fmt::Display| NetError::Setup(e.to_string());
    let swarm = match cfg.psk {
        None => libp2p::SwarmBuilder::with_existing_identity(identity)
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )
            .map_err(|e| setup(&e))?
            .with_quic()
            .with_dns()
            .map_err(|e| setup(&e))?
            .with_behaviour(behaviour)
            .map_err(|e| setup(&e))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
            .build(),
        // TCP alone, each connection first wrapped in the mesh key.
        Some(psk) => libp2p::SwarmBuilder::with_existing_identity(identity)
            .with_tokio()
            .with_other_transport(
                |key| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
                    use libp2p::Transport;
                    Ok(
                        tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                            .and_then(move |socket, _| {
                                libp2p::pnet::PnetConfig::new(psk).handshake(socket)
                            })
                            .upgrade(libp2p::core::upgrade::Version::V1Lazy)
                            .authenticate(noise::Config::new(key)?)
                            .multiplex(yamux::Config::default()),
                    )
                },
            )
            .map_err(|e| setup(&e))?
            .with_dns()
            .map_err(|e| setup(&e))?
            .with_behaviour(behaviour)
            .map_err(|e| setup(&e))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
            .build(),
    };
    let local_peer_id = *swarm.local_peer_id();
    let control = swarm.behaviour().stream.new_control();
    let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_BUFFER);
    let (ev_tx, ev_rx) = mpsc::channel(EVENT_BUFFER);
    Ok((
        Client {
            commands: cmd_tx,
            control,
            local_peer_id,
            cfg,
        },
        ev_rx,
        EventLoop {
            swarm,
            commands: cmd_rx,
            events: ev_tx,
            pending_listen: HashMap::new(),
            pending_dial: HashMap::new(),
            joined_dial: HashMap::new(),
            has_key,
            handshake_warned_at: None,
            backlog: std::collections::VecDeque::new(),
        },
    ))
}

/// Most connections the node opens by itself to peers learnt from gossip.
const MAX_AUTO_CONNECTIONS: usize = 64;

impl Client {
    pub fn local_peer_id(&self) -> PeerId {
        self.local_peer_id
    }

    async fn ask<T>(
        &self,
        what: &str,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
        timeout_ms: u64,
    ) -> Result<T, NetError> {
        let (tx, rx) = oneshot::channel();
        // One bound for both waits: a busy event loop's full command queue
        // holds the sender as long as a slow reply would.
        let asked = async {
            self.commands
                .send(make(tx))
                .await
                .map_err(|_| NetError::Stopped)?;
            rx.await.map_err(|_| NetError::Stopped)
        };
        match tokio::time::timeout(Duration::from_millis(timeout_ms), asked).await {
            Ok(r) => r,
            Err(_) => Err(NetError::Timeout {
                what: what.into(),
                ms: timeout_ms,
            }),
        }
    }

    /// Starts listening; returns the first concrete address.
    pub async fn listen(&self, addr: Multiaddr) -> Result<Multiaddr, NetError> {
        let what = format!("starting to listen on {addr}");
        self.ask(&what, |reply| Command::Listen { addr, reply }, 10_000)
            .await?
    }

    /// Dials an address (with or without `/p2p/…`) and returns the peer id
    /// once the connection is up.
    pub async fn dial(&self, addr: Multiaddr) -> Result<PeerId, NetError> {
        let what = format!("connecting to {addr}");
        let ms = self.cfg.dial_timeout_ms;
        let shown = addr.to_string();
        match self
            .ask(&what, |reply| Command::Dial { addr, reply }, ms)
            .await
        {
            Ok(outcome) => outcome,
            // Two nodes with different mesh keys read each other's bytes
            // as noise, and the handshake waits rather than fails: a
            // connection that times out may be that.
            Err(NetError::Timeout { ms, .. }) => Err(NetError::Dial {
                addr: shown,
                reason: format!(
                    "no connection within {ms} ms: the node may be unreachable, or {}",
                    psk::timeout_hint(self.cfg.psk.is_some())
                ),
            }),
            Err(e) => Err(e),
        }
    }

    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, NetError> {
        self.ask(
            "listing addresses",
            |reply| Command::ListenAddrs { reply },
            5_000,
        )
        .await
    }

    /// Whether a connection to `peer` is open now.
    pub async fn is_connected(&self, peer: PeerId) -> Result<bool, NetError> {
        self.ask(
            "checking a connection",
            |reply| Command::IsConnected { peer, reply },
            5_000,
        )
        .await
    }

    /// Whether the event loop has stopped (no command will be served).
    pub fn is_stopped(&self) -> bool {
        self.commands.is_closed()
    }

    /// Publishes a capacity announcement (dropped if the loop is busy).
    pub fn publish(&self, data: Vec<u8>) {
        if self.commands.try_send(Command::Publish { data }).is_err() {
            tracing::debug!("gossip publish dropped: network busy");
        }
    }

    /// Reports the node's verdict on a gossip message: accepted ones are
    /// forwarded, rejected ones count against the peer that sent them.
    pub fn judge(&self, ticket: GossipTicket, verdict: Verdict) {
        if self
            .commands
            .try_send(Command::Judge { ticket, verdict })
            .is_err()
        {
            // Unjudged messages expire in gossipsub's cache unforwarded.
            tracing::debug!("gossip verdict dropped: network busy");
        }
    }

    /// Closes every connection to `peer` and refuses it from now on (its
    /// membership was revoked). Waits up to 5 s for room in a busy loop's
    /// queue rather than dropping it at once: a block should not be lost.
    pub async fn block(&self, peer: PeerId) {
        let send = self.commands.send(Command::Block { peer });
        if tokio::time::timeout(Duration::from_secs(5), send)
            .await
            .is_err()
        {
            tracing::warn!(%peer, "could not block a revoked peer: network busy");
        }
    }

    /// Connects to a peer if not connected yet (best effort, no reply).
    pub fn connect(&self, peer: PeerId, addrs: Vec<Multiaddr>) {
        let _ = self.commands.try_send(Command::Connect { peer, addrs });
    }

    /// Opens a stream of `protocol` to `peer` (dialling it if needed).
    pub async fn open(
        &self,
        peer: PeerId,
        protocol: StreamProtocol,
    ) -> Result<FrameStream, NetError> {
        self.open_with_limit(peer, protocol, self.cfg.max_frame_bytes)
            .await
    }

    async fn open_with_limit(
        &self,
        peer: PeerId,
        protocol: StreamProtocol,
        max_frame_bytes: usize,
    ) -> Result<FrameStream, NetError> {
        let stream = self.open_raw(peer, protocol).await?;
        Ok(FrameStream::new(stream, max_frame_bytes))
    }

    /// Opens a bare stream of `protocol` to `peer` (dialling it if needed),
    /// for protocols that bring their own framing.
    pub async fn open_raw(
        &self,
        peer: PeerId,
        protocol: StreamProtocol,
    ) -> Result<libp2p::Stream, NetError> {
        let mut control = self.control.clone();
        let ms = self.cfg.dial_timeout_ms;
        let stream = tokio::time::timeout(
            Duration::from_millis(ms),
            control.open_stream(peer, protocol.clone()),
        )
        .await
        .map_err(|_| NetError::Timeout {
            what: format!("opening {protocol} to {peer}"),
            ms,
        })?
        .map_err(|e| NetError::OpenStream {
            protocol: protocol.to_string(),
            peer: peer.to_string(),
            reason: open_failure(&e),
        })?;
        Ok(stream)
    }

    /// Accepts inbound streams of `protocol`. Call once per protocol,
    /// before the node is announced.
    pub fn accept(
        &self,
        protocol: StreamProtocol,
    ) -> Result<libp2p_stream::IncomingStreams, NetError> {
        self.control
            .clone()
            .accept(protocol.clone())
            .map_err(|_| NetError::Setup(format!("{protocol} registered twice")))
    }

    /// Opens a chat stream to a connected (or dialable) peer.
    pub async fn open_chat(&self, peer: PeerId) -> Result<FrameStream, NetError> {
        self.open_chat_with_limit(peer, self.cfg.max_frame_bytes)
            .await
    }

    /// Like [`Client::open_chat`] with another frame limit for this stream
    /// (tests use a larger one to send oversized frames).
    pub async fn open_chat_with_limit(
        &self,
        peer: PeerId,
        max_frame_bytes: usize,
    ) -> Result<FrameStream, NetError> {
        self.open_with_limit(peer, CHAT_PROTOCOL, max_frame_bytes)
            .await
    }

    pub fn max_frame_bytes(&self) -> usize {
        self.cfg.max_frame_bytes
    }
}

/// Owns the swarm; run it on a task.
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
    pending_listen:
        HashMap<libp2p::core::transport::ListenerId, oneshot::Sender<Result<Multiaddr, NetError>>>,
    pending_dial: HashMap<ConnectionId, (Multiaddr, DialReply)>,
    /// Dials of a peer another dial was already connecting to (two
    /// addresses of one bootstrap node): answered with that dial's outcome.
    joined_dial: HashMap<PeerId, Vec<(Multiaddr, DialReply)>>,
    /// Whether this node runs a private mesh (a pre-shared key).
    has_key: bool,
    /// When a failed incoming handshake was last logged (at most one a
    /// [`HANDSHAKE_WARN_EVERY`], so a flood does not flood the log).
    handshake_warned_at: Option<std::time::Instant>,
    /// Connection events the node has not taken yet: these are never
    /// dropped (the view and the actor sessions follow them). At most one
    /// per connection opened or closed while the node is behind, and the
    /// connection limits bound those; [`MAX_BACKLOG`] is a last guard.
    backlog: std::collections::VecDeque<Event>,
}

/// Most connection events held for a node that has fallen behind.
const MAX_BACKLOG: usize = 16 * 1024;

/// Least time between two logged incoming handshake failures.
const HANDSHAKE_WARN_EVERY: Duration = Duration::from_secs(10);

/// Whether a connection failed while being set up (key, encryption or
/// protocol negotiation) rather than not reaching the other side at all:
/// the mark of two nodes that do not share a mesh key.
fn failed_in_handshake(reason: &str) -> bool {
    let r = reason.to_ascii_lowercase();
    // libp2p words every failed dial "failed to negotiate transport
    // protocol(s)", a refused or unroutable one too: those never reached a
    // handshake, and a key is not why.
    if [
        "connection refused",
        "no route to host",
        "network is unreachable",
        "host is unreachable",
        "cannot assign requested address",
    ]
    .iter()
    .any(|w| r.contains(w))
    {
        return false;
    }
    [
        "handshake",
        "negotiat",
        "upgrade",
        "decrypt",
        "noise",
        "multistream",
        "invalid data",
        "unexpected eof",
    ]
    .iter()
    .any(|w| r.contains(w))
}

/// Where a dial's outcome goes.
type DialReply = oneshot::Sender<Result<PeerId, NetError>>;

/// Dials that may wait on another dial of the same peer, per peer.
const MAX_JOINED_DIALS: usize = 16;

impl EventLoop {
    /// Runs until every [`Client`] is dropped.
    pub async fn run(mut self) {
        let mut kad_refresh = tokio::time::interval(KAD_BOOTSTRAP_EVERY);
        // A second handle, so waiting for room in the channel does not
        // borrow the loop's state.
        let events = self.events.clone();
        loop {
            tokio::select! {
                ev = self.swarm.select_next_some() => self.on_swarm_event(ev),
                permit = events.reserve(), if !self.backlog.is_empty() => match permit {
                    Ok(permit) => {
                        if let Some(ev) = self.backlog.pop_front() {
                            permit.send(ev);
                        }
                    }
                    // The node is gone: nobody will read them.
                    Err(_) => self.backlog.clear(),
                },
                cmd = self.commands.recv() => match cmd {
                    Some(c) => self.on_command(c),
                    None => return,
                },
                _ = kad_refresh.tick() => {
                    if let Some(k) = self.swarm.behaviour_mut().kad.as_mut() {
                        let _ = k.bootstrap();
                    }
                }
            }
        }
    }

    fn learn(&mut self, peer: PeerId, addr: Multiaddr) {
        if let Some(k) = self.swarm.behaviour_mut().kad.as_mut() {
            k.add_address(&peer, addr);
        }
    }

    fn emit(&self, ev: Event) {
        // The node drains events; if it falls behind, dropping an RTT sample
        // or a gossip message (gossip repeats itself) is better than
        // stalling the swarm.
        if self.events.try_send(ev).is_err() {
            tracing::debug!("network event dropped: receiver full or gone");
        }
    }

    /// A connection event: delivered in order, queued while the node is
    /// behind, never dropped.
    fn emit_connection(&mut self, ev: Event) {
        if self.backlog.is_empty() {
            match self.events.try_send(ev) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Closed(_)) => return,
                Err(mpsc::error::TrySendError::Full(ev)) => self.backlog.push_back(ev),
            }
        } else {
            self.backlog.push_back(ev);
        }
        if self.backlog.len() > MAX_BACKLOG {
            self.backlog.pop_front();
            tracing::warn!("the node is far behind on connection events; the oldest was dropped");
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Listen { addr, reply } => match self.swarm.listen_on(addr.clone()) {
                Ok(id) => {
                    self.pending_listen.insert(id, reply);
                }
                Err(e) => {
                    let _ = reply.send(Err(NetError::Listen {
                        addr: addr.to_string(),
                        reason: error_chain(&e),
                    }));
                }
            },
            Command::Dial { addr, reply } => {
                if let (_, Some(peer)) = addr::split_peer(&addr)
                    && self.swarm.is_connected(&peer)
                {
                    let _ = reply.send(Ok(peer));
                    return;
                }
                let opts = match addr::split_peer(&addr) {
                    (base, Some(peer)) => DialOpts::peer_id(peer).addresses(vec![base]).build(),
                    (base, None) => DialOpts::unknown_peer_id().address(base).build(),
                };
                let id = opts.connection_id();
                match self.swarm.dial(opts) {
                    Ok(()) => {
                        self.pending_dial.insert(id, (addr, reply));
                    }
                    // Already being dialled (another address of it): this
                    // dial succeeds or fails with that one.
                    Err(libp2p::swarm::DialError::DialPeerConditionFalse(_))
                        if addr::split_peer(&addr).1.is_some() =>
                    {
                        if let (_, Some(peer)) = addr::split_peer(&addr) {
                            let waiting = self.joined_dial.entry(peer).or_default();
                            if waiting.len() < MAX_JOINED_DIALS {
                                waiting.push((addr, reply));
                            }
                        }
                    }
                    Err(e) => {
                        let _ = reply.send(Err(NetError::Dial {
                            addr: addr.to_string(),
                            reason: e.to_string(),
                        }));
                    }
                }
            }
            Command::ListenAddrs { reply } => {
                let _ = reply.send(self.swarm.listeners().cloned().collect());
            }
            Command::IsConnected { peer, reply } => {
                let _ = reply.send(self.swarm.is_connected(&peer));
            }
            Command::Judge { ticket, verdict } => {
                if let Some(g) = self.swarm.behaviour_mut().gossipsub.as_mut() {
                    let acceptance = match verdict {
                        Verdict::Accept => gossipsub::MessageAcceptance::Accept,
                        Verdict::Ignore => gossipsub::MessageAcceptance::Ignore,
                        Verdict::Reject => gossipsub::MessageAcceptance::Reject,
                    };
                    g.report_message_validation_result(&ticket.id, &ticket.from, acceptance);
                }
            }
            Command::Block { peer } => {
                self.swarm.behaviour_mut().deny.block_peer(peer);
            }
            Command::Connect { peer, addrs } => {
                let connected = self.swarm.connected_peers().count();
                if peer != *self.swarm.local_peer_id()
                    && !self.swarm.is_connected(&peer)
                    && connected < MAX_AUTO_CONNECTIONS
                {
                    for a in &addrs {
                        self.learn(peer, a.clone());
                    }
                    let _ = self
                        .swarm
                        .dial(DialOpts::peer_id(peer).addresses(addrs).build());
                }
            }
            Command::Publish { data } => {
                if let Some(g) = self.swarm.behaviour_mut().gossipsub.as_mut() {
                    let topic = gossipsub::IdentTopic::new(CAPACITY_TOPIC);
                    if let Err(e) = g.publish(topic, data) {
                        // NoPeersSubscribedToTopic is normal for a lone node.
                        tracing::trace!(error = %e, "gossip publish");
                    }
                }
            }
        }
        // Replies whose asker timed out are dropped here, keeping the maps bounded.
        self.pending_dial.retain(|_, (_, r)| !r.is_closed());
        self.joined_dial.retain(|_, v| {
            v.retain(|(_, r)| !r.is_closed());
            !v.is_empty()
        });
        self.pending_listen.retain(|_, r| !r.is_closed());
    }

    fn on_swarm_event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                tracing::debug!(%address, "listening");
                if let Some(reply) = self.pending_listen.remove(&listener_id) {
                    let _ = reply.send(Ok(address));
                }
            }
            SwarmEvent::ListenerError { listener_id, error } => {
                if let Some(reply) = self.pending_listen.remove(&listener_id) {
                    let _ = reply.send(Err(NetError::Listen {
                        addr: "listener".into(),
                        reason: error_chain(&error),
                    }));
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                if let Some((_, reply)) = self.pending_dial.remove(&connection_id) {
                    let _ = reply.send(Ok(peer_id));
                }
                for (_, reply) in self.joined_dial.remove(&peer_id).unwrap_or_default() {
                    let _ = reply.send(Ok(peer_id));
                }
                let addr = match endpoint {
                    ConnectedPoint::Dialer { address, .. } => address,
                    ConnectedPoint::Listener { send_back_addr, .. } => send_back_addr,
                };
                self.emit_connection(Event::Connected {
                    peer: peer_id,
                    addr,
                });
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => {
                if let Some((addr, reply)) = self.pending_dial.remove(&connection_id) {
                    let mut reason = error_chain(&error);
                    if failed_in_handshake(&reason) {
                        reason = format!("{reason}; {}", psk::handshake_hint(self.has_key));
                    }
                    let _ = reply.send(Err(NetError::Dial {
                        addr: addr.to_string(),
                        reason,
                    }));
                }
                // Those waiting on it retry on their own (their address may
                // still work) unless the peer is connected meanwhile.
                if let Some(peer) = peer_id
                    && !self.swarm.is_connected(&peer)
                {
                    for (addr, reply) in self.joined_dial.remove(&peer).unwrap_or_default() {
                        let _ = reply.send(Err(NetError::Dial {
                            addr: addr.to_string(),
                            reason: format!("another dial of this peer failed: {error}"),
                        }));
                    }
                }
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                ..
            } => {
                let reason = error_chain(&error);
                let now = std::time::Instant::now();
                if failed_in_handshake(&reason)
                    && self
                        .handshake_warned_at
                        .is_none_or(|t| now.duration_since(t) >= HANDSHAKE_WARN_EVERY)
                {
                    self.handshake_warned_at = Some(now);
                    tracing::warn!(
                        from = %send_back_addr,
                        "a connection failed during its handshake ({reason}); {}",
                        psk::handshake_hint(self.has_key)
                    );
                } else {
                    tracing::debug!(from = %send_back_addr, %reason, "incoming connection failed");
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => self.emit_connection(Event::Disconnected { peer: peer_id }),
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            })) => self.emit(Event::Rtt { peer, rtt }),
            // A connection that does not answer pings is half dead (a peer
            // that vanished without closing, a stalled link): closing it
            // frees its slot and tells the node the peer is gone.
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                connection,
                result: Err(e),
            })) => {
                tracing::debug!(%peer, error = %e, "ping failed; closing the connection");
                self.swarm.close_connection(connection);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                for a in info
                    .listen_addrs
                    .into_iter()
                    .take(zavod_proto::mesh::view::MAX_ADDRS)
                {
                    self.learn(peer_id, a);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                message,
                message_id,
                propagation_source,
            })) => self.emit(Event::Gossip {
                author: message.source,
                data: message.data,
                ticket: GossipTicket {
                    id: message_id,
                    from: propagation_source,
                },
            }),
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                for (peer, addr) in found {
                    self.learn(peer, addr.clone());
                    if !self.swarm.is_connected(&peer) {
                        let _ = self
                            .swarm
                            .dial(DialOpts::peer_id(peer).addresses(vec![addr]).build());
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_dial_is_not_blamed_on_a_mesh_key() {
        let refused = "Failed to negotiate transport protocol(s): [(/ip4/127.0.0.1/tcp/1: : \
                       Multiple dial errors occurred:\n - Connection refused (os error 111))]";
        assert!(!failed_in_handshake(refused));
        let key = "Failed to negotiate transport protocol(s): [(/ip4/127.0.0.1/tcp/1: : \
                   Multistream select failed: Protocol negotiation failed.)]";
        assert!(failed_in_handshake(key));
        assert!(failed_in_handshake("Noise handshake failed: decrypt error"));
    }

    #[test]
    fn a_stream_that_did_not_open_says_why_in_words() {
        let closed = libp2p_stream::OpenStreamError::Io(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "oneshot canceled",
        ));
        let why = open_failure(&closed);
        assert!(why.contains("closed before the stream opened"), "{why}");
        assert!(!why.contains("oneshot"), "{why}");
        let other = libp2p_stream::OpenStreamError::UnsupportedProtocol(CHAT_PROTOCOL);
        assert!(open_failure(&other).contains("does not serve /zavod/chat/1"));
    }

    #[test]
    fn node_ids_and_peer_ids_map_both_ways() {
        let kp = identity_from_secret([3; 32]).expect("key");
        let peer = kp.public().to_peer_id();
        let node = node_id_of(&peer).expect("ed25519");
        let zk = zavod_proto::trust::Keypair::from_secret([3; 32]);
        assert_eq!(node, zk.public());
        assert_eq!(peer_id_of(&node), Some(peer));
    }

    #[tokio::test]
    async fn two_swarms_exchange_frames_and_refuse_oversized_ones() {
        use zavod_proto::wire::{ErrorCode, ErrorFrame, ServerFrame};
        let (server, _ev, el) = new(
            identity_from_secret([1; 32]).expect("key"),
            NetConfig {
                max_frame_bytes: 4096,
                ..Default::default()
            },
        )
        .expect("swarm");
        tokio::spawn(el.run());
        let mut incoming = server.accept(CHAT_PROTOCOL).expect("accept");
        let addr = server
            .listen("/ip4/127.0.0.1/tcp/0".parse().expect("addr"))
            .await
            .expect("listen");
        tokio::spawn(async move {
            while let Some((_peer, stream)) = incoming.next().await {
                let mut s = FrameStream::new(stream, 4096);
                let reply = match s.recv::<ServerFrame>(Duration::from_secs(5)).await {
                    Ok(Some(f)) => f,
                    Ok(None) => continue,
                    Err(e) => ServerFrame::Error(ErrorFrame {
                        code: ErrorCode::FrameTooLarge,
                        message: e.to_string(),
                    }),
                };
                let _ = s.send(&reply).await;
            }
        });

        let (client, _ev2, el2) = new(
            identity_from_secret([2; 32]).expect("key"),
            NetConfig::default(),
        )
        .expect("swarm");
        tokio::spawn(el2.run());
        let peer = client.dial(addr).await.expect("dial");
        let mut s = client.open_chat(peer).await.expect("open");
        let hello = ServerFrame::Token {
            index: 0,
            text: "hi".into(),
            id: 1,
        };
        s.send(&hello).await.expect("send");
        let echoed: ServerFrame = s
            .recv(Duration::from_secs(5))
            .await
            .expect("recv")
            .expect("frame");
        assert_eq!(echoed, hello);

        let mut s = client.open_chat(peer).await.expect("open");
        let big = ServerFrame::Token {
            index: 0,
            text: "x".repeat(10_000),
            id: 1,
        };
        s.send(&big).await.expect("send");
        match s.recv::<ServerFrame>(Duration::from_secs(5)).await {
            Ok(Some(ServerFrame::Error(e))) => assert!(e.message.contains("4096"), "{e:?}"),
            other => panic!("expected an error frame, got {other:?}"),
        }
        // The server keeps serving after the bad frame.
        let mut s = client.open_chat(peer).await.expect("open again");
        s.send(&hello).await.expect("send");
        let again: ServerFrame = s
            .recv(Duration::from_secs(5))
            .await
            .expect("recv")
            .expect("frame");
        assert_eq!(again, hello);
    }
}
