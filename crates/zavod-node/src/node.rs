//! Starting and stopping a node: open the data directory and memory, load
//! the model, start the supervisor and its actors, then the network, and
//! accept chat streams (at most `limits.max_concurrent_streams` at once).
//!
//! Why this file passes 600 lines: start-up is one sequence whose steps
//! hand each other what they made (the identity, the store, the network,
//! the actors), and it reads best in order; what a step does at length
//! lives in its own module (`rejoin`, `replication`, `tailnet`, …).

use crate::actors::router::RouterMsg;
use crate::actors::supervisor::{Child, NodeSupervisor, SupervisorMsg};
use crate::actors::{Directory, NodeShared};
use crate::backend::{LlamaBackendHandle, ModelBackend};
use crate::cluster::{Cluster, mesh_cookie};
use crate::config::{ConfigError, NodeConfig};
use crate::datadir::{DataDirError, InitReport, NodeIdentity};
use crate::protocol::{Kind, serve_stream};
use futures::StreamExt;
use libp2p::{Multiaddr, PeerId};
use ractor::{Actor, ActorRef};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use zavod_engine::EngineError;
use zavod_engine::llama::{LlamaConfig, LoadedModel};
use zavod_net::{NetConfig, NetError};
use zavod_proto::mesh::view::Announcement;
use zavod_store::{SledStore, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("bad listen address {addr:?} in config: {reason}")]
    ListenAddr { addr: String, reason: String },
    #[error("the node's actors could not start: {0}")]
    Actors(String),
    #[error("joining the mesh failed: {0}")]
    Join(String),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    /// Not a `source`: the message says it all, once.
    #[error("--tailscale: {0}")]
    Tailscale(zavod_net::tailscale::TailscaleError),
    #[error("cannot serve HTTP on {addr}: {reason}")]
    Http { addr: String, reason: String },
}

/// What to start a node with.
pub struct StartOptions {
    pub config: NodeConfig,
    pub identity: NodeIdentity,
    /// The models to serve, each with its own worker; none runs an
    /// entry/router-only node. Names must differ.
    pub models: Vec<Arc<dyn ModelBackend>>,
}

/// Whether `addr` is a QUIC address.
fn is_quic(addr: &Multiaddr) -> bool {
    addr.iter()
        .any(|p| matches!(p, libp2p::multiaddr::Protocol::QuicV1))
}

/// Whether the Router's view holds `peer` as a member.
pub(crate) async fn is_member(shared: &NodeShared, peer: &PeerId) -> bool {
    let (Some(router), Some(node)) = (shared.directory.get().router, zavod_net::node_id_of(peer))
    else {
        return false;
    };
    matches!(
        ractor::call_t!(router, |reply| RouterMsg::IsMember { node, reply }, 2_000),
        Ok(true)
    )
}

/// Binds an HTTP listener, naming the address when it cannot.
/// How long a stopping node waits for turns still being written.
const WRITER_DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

async fn bind_http(addr: &str) -> Result<tokio::net::TcpListener, NodeError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| NodeError::Http {
            addr: addr.to_string(),
            reason: e.to_string(),
        })
}

/// Joins a mesh with an invite: dials its bootstrap nodes until one signs
/// this node's membership, and stores it in the data directory.
pub async fn join_mesh(
    identity: &mut NodeIdentity,
    ticket: &zavod_proto::trust::JoinTicket,
    limits: &crate::config::LimitsSection,
    psk: Option<libp2p::pnet::PreSharedKey>,
) -> Result<(), NodeError> {
    use zavod_proto::wire::{JoinReply, JoinRequest};
    let now = crate::clock::now_ms();
    let body = ticket
        .verify(now)
        .map_err(|e| NodeError::Join(format!("the invite is not valid: {e}")))?;
    let (net, mut events, event_loop) = zavod_net::new(
        zavod_net::identity_from_secret(identity.key.secret_bytes())?,
        NetConfig {
            dial_timeout_ms: limits.dial_timeout_ms,
            psk,
            ..Default::default()
        },
    )?;
    let el = tokio::spawn(event_loop.run());
    let drain = tokio::spawn(async move { while events.recv().await.is_some() {} });
    let mut last = String::from("the invite names no bootstrap node");
    let timeout = std::time::Duration::from_millis(limits.request_timeout_ms);
    for a in &body.bootstrap {
        let attempt = async {
            let addr: Multiaddr = a.parse().map_err(|e| format!("{a}: {e}"))?;
            // Without the peer id, whoever answers at the address would be
            // handed the invite.
            if !addr
                .iter()
                .any(|p| matches!(p, libp2p::multiaddr::Protocol::P2p(_)))
            {
                return Err(
                    "names no peer id (/p2p/…), so the node there cannot be told from an \
                     impostor; ask for a new invite (zavod mesh invite)"
                        .to_string(),
                );
            }
            crate::renewal::ask_signer(&net, addr, &JoinRequest::Invite(ticket.clone()), timeout)
                .await
        };
        match attempt.await {
            Ok(JoinReply::Welcome {
                membership,
                authorities,
                session_secret,
            }) => {
                let trusted: std::collections::BTreeSet<_> = authorities.iter().copied().collect();
                if !trusted.contains(&ticket.signer) {
                    last = format!("{a}: answered for another mesh");
                    continue;
                }
                if membership.body.member != identity.id()
                    || membership.verify(&trusted, crate::clock::now_ms()).is_err()
                {
                    last = format!("{a}: sent a membership that does not verify");
                    continue;
                }
                identity.save_membership(
                    membership,
                    &authorities,
                    std::slice::from_ref(a),
                    session_secret,
                )?;
                el.abort();
                drain.abort();
                return Ok(());
            }
            Ok(JoinReply::Refused(e)) => last = format!("{a}: {}", e.message),
            Err(e) => last = format!("{a}: {e}"),
        }
    }
    el.abort();
    drain.abort();
    Err(NodeError::Join(last))
}

/// The llama.cpp settings a config asks for, for the file chosen.
pub fn llama_config(
    cfg: &NodeConfig,
    selection: &crate::model_choice::ModelSelection,
) -> LlamaConfig {
    let m = &cfg.model;
    LlamaConfig {
        path: selection.path.clone(),
        name: Some(selection.name.clone()),
        gpu_layers: m.gpu_layers,
        slots: m.slots,
        context_tokens_per_seq: m.context_tokens,
        threads: m.threads,
        batch_tokens: m.batch_tokens,
        queue_capacity: m.queue_capacity,
        chat_template: m.chat_template.clone(),
        stream_interval_ms: crate::tuning::stream_interval_ms(cfg),
        prompt_cache: m.prompt_cache,
        prompt_cache_ram_bytes: m.prompt_cache_ram_mib << 20,
        share_prompt_cache: m.share_prompt_cache,
    }
}

/// Loads the configured GGUF model (blocking; run off the async runtime).
pub fn load_llama(
    cfg: &LlamaConfig,
    selection: Option<crate::model_choice::ModelSelection>,
    progress: impl FnMut(f32) + 'static,
) -> Result<Arc<dyn ModelBackend>, EngineError> {
    let model = LoadedModel::load(cfg, progress)?;
    Ok(Arc::new(LlamaBackendHandle {
        model,
        cfg: cfg.clone(),
        selection,
        embedder: Mutex::new(None),
    }))
}

/// A running node.
pub struct Node {
    shared: Arc<NodeShared>,
    supervisor: ActorRef<SupervisorMsg>,
    store: Arc<SledStore>,
    peer_id: PeerId,
    net: zavod_net::Client,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    http_addr: Option<std::net::SocketAddr>,
    metrics_addr: Option<std::net::SocketAddr>,
}

impl Node {
    /// Opens the data directory named by the config, creating a local mesh
    /// on first use.
    pub fn open_identity(config: &NodeConfig) -> Result<(NodeIdentity, InitReport), NodeError> {
        Ok(NodeIdentity::open(
            &config.data_dir(),
            crate::clock::now_ms(),
        )?)
    }

    pub async fn start(opts: StartOptions) -> Result<Node, NodeError> {
        let StartOptions {
            config,
            identity,
            models,
        } = opts;
        config.check()?;
        let mut names = std::collections::BTreeSet::new();
        for m in &models {
            let name = m.offer().name;
            if !names.insert(name.clone()) {
                return Err(NodeError::Config(ConfigError::Invalid(format!(
                    "two models are both named {name}; serve each model once"
                ))));
            }
        }
        let parse = |a: &String| {
            a.parse::<Multiaddr>().map_err(|e| NodeError::ListenAddr {
                addr: a.clone(),
                reason: e.to_string(),
            })
        };
        let listen: Vec<Multiaddr> = config
            .node
            .listen
            .iter()
            .map(parse)
            .collect::<Result<_, _>>()?;
        let bootstrap: Vec<Multiaddr> = config
            .node
            .bootstrap
            .iter()
            .map(parse)
            .collect::<Result<_, _>>()?;
        let rejoin_through = crate::rejoin::rejoin_through(&identity, &bootstrap);
        let psk = config.mesh_key()?;
        // libp2p's private networks cover TCP only: with a key, no QUIC.
        let listen: Vec<Multiaddr> = if psk.is_some() {
            let (quic, tcp): (Vec<Multiaddr>, Vec<Multiaddr>) =
                listen.into_iter().partition(is_quic);
            for a in &quic {
                tracing::warn!(addr = %a, "not listening on this QUIC address: QUIC is off in a private mesh (a pre-shared key covers TCP only)");
            }
            if tcp.is_empty() {
                return Err(NodeError::Config(ConfigError::Invalid(
                    "node.listen has only QUIC addresses, and a private mesh (node.psk_file) runs on TCP only; add a /tcp/ address".into(),
                )));
            }
            tcp
        } else {
            listen
        };
        let tailnet = crate::tailnet::prepare(&config, &listen, psk.is_none())
            .await
            .map_err(NodeError::Tailscale)?;
        let memory_dir = identity.dir.join("memory");
        crate::datadir::create_private_dir(&memory_dir)?;
        let store = Arc::new(SledStore::open(
            &memory_dir,
            config.memory.max_conversations_per_holder,
        )?);
        let writer = zavod_store::GroupWriter::start(store.clone())
            .map_err(|e| NodeError::Store(zavod_store::StoreError::Sync(e.to_string())))?;
        let limits = config.limits.clone();
        // Each connection and stream costs descriptors; the usual soft
        // limit (1,024) is below what the connection limits allow.
        let want = config.admission.open_files;
        // A descriptor per connection (pending ones too), and some for the
        // store, the model files and HTTP.
        let need = u64::from(config.admission.max_connections)
            + u64::from(config.admission.max_pending_incoming)
            + 256;
        match crate::admission::raise_open_files(want) {
            Ok(n) if n < need => tracing::warn!(
                open_files = n,
                needed = need,
                "the open-files limit is below what admission.max_connections needs (the hard limit stops it); raise it with `ulimit -Hn` or the service's LimitNOFILE, or lower admission.max_connections"
            ),
            Ok(n) => tracing::debug!(open_files = n, "open-files limit"),
            Err(e) => tracing::warn!(error = %e, "cannot raise the open-files limit"),
        }

        let (net, mut events, event_loop) = zavod_net::new(
            zavod_net::identity_from_secret(identity.key.secret_bytes())?,
            NetConfig {
                dial_timeout_ms: limits.dial_timeout_ms,
                idle_connection_timeout_ms: limits.idle_connection_timeout_ms,
                max_frame_bytes: limits.max_frame_bytes,
                mdns: config.node.mdns,
                gossip: true,
                psk,
                admission: config.admission.net(),
            },
        )?;
        let peer_id = net.local_peer_id();
        let mut tasks = vec![tokio::spawn(event_loop.run())];
        if identity.session_secret.is_none() {
            tracing::warn!(
                "this data directory holds no actor-session secret (it joined its mesh before \
                 meshes had one), so its actor-session cookie derives from public keys and \
                 differs from its members': join again with a new invite (zavod mesh invite)"
            );
        }
        let cookie = mesh_cookie(&identity.authorities, identity.session_secret.as_ref());
        let cluster = Cluster::start(net.clone(), cookie).await?;
        let used_invites = crate::invites::UsedInvites::load(&identity.dir)?;
        let revocations =
            crate::revocations::RevocationStore::load(&identity.dir, &identity.authorities)?;
        for node in revocations.nodes() {
            if let Some(peer) = zavod_net::peer_id_of(&node) {
                net.block(peer).await;
            }
        }
        let membership = identity.membership.clone();
        let known_members = crate::replication::KnownMembers::load(&config.data_dir());
        let shared = Arc::new(NodeShared {
            known_members,
            config,
            identity,
            directory: Directory::default(),
            models,
            store: store.clone(),
            writer: writer.clone(),
            net: net.clone(),
            cluster: cluster.clone(),
            metrics: crate::metrics::Metrics::new(),
            listen_addrs: Default::default(),
            token_estimates: Default::default(),
            tailnet_self: tailnet.as_ref().map(|t| t.name.clone()),
            tailnet_names: Default::default(),
            used_invites: std::sync::Mutex::new(used_invites),
            revocations: std::sync::RwLock::new(revocations),
            membership: std::sync::RwLock::new(membership),
            folding: Default::default(),
        });
        tasks.push(tokio::spawn(crate::renewal::renew_forever(shared.clone())));

        let (supervisor, _) = Actor::spawn(None, NodeSupervisor, Arc::clone(&shared))
            .await
            .map_err(|e| NodeError::Actors(e.to_string()))?;

        // Gossip and RTT go to whichever Router is current.
        let ev_shared = Arc::clone(&shared);
        tasks.push(tokio::spawn(async move {
            while let Some(ev) = events.recv().await {
                if let zavod_net::Event::Disconnected { peer } = &ev {
                    ev_shared.cluster.peer_gone(peer);
                }
                let Some(router) = ev_shared.directory.get().router else {
                    continue;
                };
                match ev {
                    // Its last connection closed: a process that died is
                    // heard of at once (its sockets close), long before its
                    // heartbeat is overdue. The placer passes it over until
                    // it reports again.
                    zavod_net::Event::Disconnected { peer } => {
                        if let Some(node) = zavod_net::node_id_of(&peer) {
                            let _ = router.cast(RouterMsg::Failed { node });
                        }
                    }
                    zavod_net::Event::Gossip {
                        data,
                        author,
                        ticket,
                    } => match zavod_proto::wire::decode::<Announcement>(&data) {
                        Ok(a) => {
                            let _ = router.cast(RouterMsg::Announce {
                                a: Box::new(a),
                                author,
                                ticket,
                            });
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "undecodable gossip dropped");
                            ev_shared.net.judge(ticket, zavod_net::Verdict::Reject);
                        }
                    },
                    zavod_net::Event::Rtt { peer, rtt } => {
                        if let Some(node) = zavod_net::node_id_of(&peer) {
                            let _ = router.cast(RouterMsg::Rtt {
                                node,
                                rtt_ms: rtt.as_secs_f64() * 1e3,
                            });
                        }
                    }
                    other => tracing::debug!(?other, "network"),
                }
            }
        }));

        // Every conversation this node keeps gets its replicas back after
        // members come and go.
        tasks.push(tokio::spawn(crate::replication::sync_loop(Arc::clone(
            &shared,
        ))));

        // Accept before listening, so no early stream meets an unknown protocol.
        let pools = crate::admission::StreamPools::new(
            &shared.config.admission,
            limits.max_concurrent_streams,
        );
        for (protocol, kind) in [
            (zavod_net::CHAT_PROTOCOL, Kind::Chat),
            (zavod_net::RUN_PROTOCOL, Kind::Run),
            (zavod_net::JOIN_PROTOCOL, Kind::Join),
            (zavod_net::STATUS_PROTOCOL, Kind::Status),
            (zavod_net::EMBED_PROTOCOL, Kind::Embed),
            (zavod_net::MEMORY_PROTOCOL, Kind::Memory),
            (zavod_net::REPLICA_PROTOCOL, Kind::Replica),
        ] {
            let mut incoming = net.accept(protocol)?;
            let s = Arc::clone(&shared);
            let p = Arc::clone(&pools);
            tasks.push(tokio::spawn(async move {
                while let Some((peer, stream)) = incoming.next().await {
                    tokio::spawn(serve_stream(
                        Arc::clone(&s),
                        Arc::clone(&p),
                        kind,
                        peer,
                        stream,
                    ));
                }
            }));
        }
        // Actor sessions, from members only.
        let mut incoming = net.accept(zavod_net::ACTORS_PROTOCOL)?;
        let s = Arc::clone(&shared);
        tasks.push(tokio::spawn(async move {
            // One at a time: sessions are opened rarely (once per pair of
            // nodes), and this bounds what a flood of streams can cost.
            while let Some((peer, stream)) = incoming.next().await {
                if is_member(&s, &peer).await {
                    s.cluster.accept(peer, stream);
                } else {
                    tracing::info!(%peer, "actor session from a non-member refused");
                }
            }
        }));
        for addr in listen {
            net.listen(addr).await?;
        }
        // A tailnet address this machine cannot bind (IPv6 turned off, say)
        // is passed over, as long as one can be.
        if let Some(t) = &tailnet {
            let mut bound = 0;
            let mut last = None;
            for addr in &t.listen {
                match net.listen(addr.clone()).await {
                    Ok(_) => bound += 1,
                    Err(e) => {
                        tracing::warn!(%addr, error = %e, "cannot listen on this tailnet address; passing it over");
                        last = Some(e);
                    }
                }
            }
            if bound == 0
                && let Some(e) = last
            {
                return Err(NodeError::Net(e));
            }
        }
        let addrs: Vec<String> = net
            .listen_addrs()
            .await?
            .into_iter()
            .map(|a| {
                a.with(libp2p::multiaddr::Protocol::P2p(peer_id))
                    .to_string()
            })
            .collect();
        match shared.listen_addrs.write() {
            Ok(mut l) => *l = addrs.clone(),
            Err(p) => *p.into_inner() = addrs.clone(),
        }
        // For `zavod mesh invite` on this machine.
        let _ = crate::datadir::write_file(
            &shared.identity.dir.join(crate::datadir::LISTEN_ADDRS),
            &(addrs.join("\n") + "\n"),
            false,
        );
        if let Some(router) = shared.directory.get().router {
            let _ = router.cast(RouterMsg::GossipTick);
        }
        for addr in bootstrap {
            let net = net.clone();
            tasks.push(tokio::spawn(crate::rejoin::dial_until_connected(net, addr)));
        }
        tasks.push(tokio::spawn(crate::rejoin::rejoin(
            Arc::clone(&shared),
            rejoin_through,
        )));
        tasks.push(tokio::spawn(crate::rejoin::remember(Arc::clone(&shared))));
        if let Some(t) = tailnet {
            tasks.push(tokio::spawn(zavod_net::tailscale::discover(
                net.clone(),
                t.discovery,
                Arc::clone(&shared.tailnet_names),
            )));
        }
        let http_addr = match &shared.config.http.listen {
            Some(a) => {
                let listener = bind_http(a).await?;
                let bound = listener.local_addr().ok();
                tasks.push(tokio::spawn(crate::http::serve(
                    listener,
                    Arc::clone(&shared),
                )));
                bound
            }
            None => None,
        };
        // Metrics on a listener of their own, with or without the API.
        let metrics_addr = match &shared.config.http.metrics_listen {
            Some(m) => {
                let listener = bind_http(m).await?;
                let bound = listener.local_addr().ok();
                tasks.push(tokio::spawn(crate::http::serve_metrics(
                    listener,
                    Arc::clone(&shared),
                )));
                bound
            }
            None => http_addr,
        };
        Ok(Node {
            http_addr,
            metrics_addr,
            shared,
            supervisor,
            store,
            peer_id,
            net,
            tasks,
        })
    }

    /// Where `/metrics` is served, when it is.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics_addr
    }

    /// Where the HTTP API listens, when it does.
    pub fn http_addr(&self) -> Option<std::net::SocketAddr> {
        self.http_addr
    }

    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    pub fn shared(&self) -> &Arc<NodeShared> {
        &self.shared
    }

    /// Listen addresses, each with `/p2p/<peer id>` so they can be dialled as is.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, NodeError> {
        let addrs = self.net.listen_addrs().await?;
        Ok(addrs
            .into_iter()
            .map(|a| a.with(libp2p::multiaddr::Protocol::P2p(self.peer_id)))
            .collect())
    }

    /// How often each actor was restarted.
    pub async fn restarts(&self) -> BTreeMap<Child, u32> {
        ractor::call_t!(self.supervisor, SupervisorMsg::Restarts, 5_000).unwrap_or_default()
    }

    /// Stops actors and network and flushes memory to disk.
    pub async fn shutdown(self) -> Result<(), NodeError> {
        for t in &self.tasks {
            t.abort();
        }
        self.supervisor.stop_and_wait(None, None).await.ok();
        self.shared.cluster.stop();
        // Turns still waiting for the writer are written before the stop.
        let writer = self.shared.writer.clone();
        let drained = tokio::task::spawn_blocking(move || writer.drain(WRITER_DRAIN))
            .await
            .unwrap_or(false);
        if !drained {
            tracing::warn!("the memory writer did not finish within {WRITER_DRAIN:?}");
        }
        self.store.flush()?;
        Ok(())
    }
}
