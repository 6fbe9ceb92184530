//! Starting and stopping a node: open the data directory and memory, load
//! the model, start the supervisor and its actors, then the network, and
//! accept chat streams (at most `limits.max_concurrent_streams` at once).

use crate::actors::supervisor::{Child, NodeSupervisor, SupervisorMsg};
use crate::actors::{Directory, NodeShared};
use crate::backend::{LlamaBackendHandle, ModelBackend};
use crate::config::{ConfigError, NodeConfig};
use crate::datadir::{DataDirError, InitReport, NodeIdentity};
use crate::serve::serve_stream;
use futures::StreamExt;
use libp2p::{Multiaddr, PeerId};
use ractor::{Actor, ActorRef};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::Semaphore;
use zavod_engine::EngineError;
use zavod_engine::llama::{LlamaConfig, LoadedModel};
use zavod_net::{NetConfig, NetError};
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
}

/// What to start a node with.
pub struct StartOptions {
    pub config: NodeConfig,
    pub identity: NodeIdentity,
    /// The model; `None` runs an entry/router-only node.
    pub model: Option<Arc<dyn ModelBackend>>,
}

/// The llama.cpp settings a config asks for.
pub fn llama_config(cfg: &NodeConfig) -> Option<LlamaConfig> {
    let m = &cfg.model;
    m.path.as_ref().map(|path| LlamaConfig {
        path: path.clone(),
        gpu_layers: m.gpu_layers,
        slots: m.slots,
        context_tokens_per_seq: m.context_tokens,
        threads: m.threads,
        batch_tokens: m.batch_tokens,
        queue_capacity: m.queue_capacity,
        chat_template: m.chat_template.clone(),
    })
}

/// Loads the configured GGUF model (blocking; run off the async runtime).
pub fn load_llama(
    cfg: &LlamaConfig,
    progress: impl FnMut(f32) + 'static,
) -> Result<Arc<dyn ModelBackend>, EngineError> {
    let model = LoadedModel::load(cfg, progress)?;
    Ok(Arc::new(LlamaBackendHandle {
        model,
        cfg: cfg.clone(),
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
            model,
        } = opts;
        config.check()?;
        let listen: Vec<Multiaddr> = config
            .node
            .listen
            .iter()
            .map(|a| {
                a.parse()
                    .map_err(|e: libp2p::multiaddr::Error| NodeError::ListenAddr {
                        addr: a.clone(),
                        reason: e.to_string(),
                    })
            })
            .collect::<Result<_, _>>()?;
        let store = Arc::new(SledStore::open(&identity.dir.join("memory"))?);
        let secret = identity.key.secret_bytes();
        let limits = config.limits.clone();
        let shared = Arc::new(NodeShared {
            config,
            identity,
            directory: Directory::default(),
            model,
            store: store.clone(),
        });

        let (supervisor, _) = Actor::spawn(None, NodeSupervisor, Arc::clone(&shared))
            .await
            .map_err(|e| NodeError::Actors(e.to_string()))?;

        let (net, mut events, event_loop) = zavod_net::new(
            zavod_net::identity_from_secret(secret)?,
            NetConfig {
                dial_timeout_ms: limits.dial_timeout_ms,
                idle_connection_timeout_ms: limits.idle_connection_timeout_ms,
                max_frame_bytes: limits.max_frame_bytes,
            },
        )?;
        let peer_id = net.local_peer_id();
        let mut tasks = vec![tokio::spawn(event_loop.run())];
        tasks.push(tokio::spawn(async move {
            while let Some(ev) = events.recv().await {
                tracing::debug!(?ev, "network");
            }
        }));
        // Accept before listening, so no early stream meets an unknown protocol.
        let mut incoming = net.accept_chats()?;
        let permits = Arc::new(Semaphore::new(limits.max_concurrent_streams));
        let serve_shared = Arc::clone(&shared);
        tasks.push(tokio::spawn(async move {
            while let Some((peer, stream)) = incoming.next().await {
                tokio::spawn(serve_stream(
                    Arc::clone(&serve_shared),
                    Arc::clone(&permits),
                    peer,
                    stream,
                ));
            }
        }));
        for addr in listen {
            net.listen(addr).await?;
        }
        Ok(Node {
            shared,
            supervisor,
            store,
            peer_id,
            net,
            tasks,
        })
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
        self.store.flush()?;
        Ok(())
    }
}
