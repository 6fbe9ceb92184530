//! The node's actors and the directory through which they find each other.
//!
//! A restarted child gets a new `ActorRef`; the supervisor publishes it in
//! the [`Directory`], and everyone looks refs up there at call time, so no
//! one holds a ref to a dead actor for long.

pub(crate) mod breaker;
pub(crate) mod gpu_monitor;
pub(crate) mod memory_keeper;
pub(crate) mod model_worker;
pub(crate) mod router;
pub(crate) mod supervisor;

use crate::backend::ModelBackend;
use crate::config::NodeConfig;
use crate::datadir::NodeIdentity;
use ractor::ActorRef;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use zavod_proto::chat::prompt::TokenEstimator;
use zavod_proto::wire::{ErrorCode, ErrorFrame};
use zavod_store::ConversationStore;

#[derive(Default, Clone)]
pub struct Refs {
    pub router: Option<ActorRef<router::RouterMsg>>,
    /// The worker of each served model, by its index in
    /// [`NodeShared::models`].
    pub workers: BTreeMap<usize, ActorRef<model_worker::WorkerMsg>>,
    pub memory: Option<ActorRef<memory_keeper::MemoryMsg>>,
    pub breaker: Option<ActorRef<breaker::BreakerMsg>>,
    pub monitor: Option<ActorRef<gpu_monitor::MonitorMsg>>,
}

#[derive(Default)]
pub struct Directory {
    refs: RwLock<Refs>,
}

impl Directory {
    pub fn get(&self) -> Refs {
        // A poisoned lock only means a writer panicked mid-update of plain
        // Option fields; the data is still coherent enough to read.
        match self.refs.read() {
            Ok(r) => r.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn update(&self, f: impl FnOnce(&mut Refs)) {
        match self.refs.write() {
            Ok(mut r) => f(&mut r),
            Err(p) => f(&mut p.into_inner()),
        }
    }
}

/// Everything the actors share, fixed for the node's life.
pub struct NodeShared {
    pub config: NodeConfig,
    pub identity: NodeIdentity,
    pub directory: Directory,
    /// The models this node serves, each with its own worker and engine;
    /// names are unique (checked at start). Empty on an entry-only node.
    pub models: Vec<Arc<dyn ModelBackend>>,
    pub store: Arc<dyn ConversationStore>,
    /// Every write to `store` goes through it (group commit), so a slow
    /// fsync never holds up prompt assembly, which reads `store` directly.
    pub writer: zavod_store::GroupWriter,
    pub net: zavod_net::Client,
    /// Actor sessions with other nodes.
    pub cluster: crate::cluster::Cluster,
    pub metrics: crate::metrics::Metrics,
    /// This node's dialable addresses (with /p2p/), once it listens.
    pub listen_addrs: RwLock<Vec<String>>,
    /// How texts tokenize for each model this node routes but does not
    /// serve, learnt from the answers' reports.
    pub token_estimates: std::sync::Mutex<BTreeMap<String, TokenEstimator>>,
    /// Tailnet names: this node's, and its peers' found on the tailnet
    /// (`node.tailscale`), for `zavod status`.
    pub tailnet_self: Option<String>,
    pub tailnet_names: zavod_net::tailscale::TailnetNames,
    /// Invites this node admitted a node with (where it holds the
    /// authority key, the only place memberships are signed).
    pub(crate) used_invites: std::sync::Mutex<crate::invites::UsedInvites>,
    /// How many members this node last knew of (kept in the data
    /// directory), so a restarted node does not plan conversations' replicas
    /// for a mesh of one while its view fills.
    pub(crate) known_members: crate::replication::KnownMembers,
    /// This node's membership certificate: the data directory's at start,
    /// replaced by each renewal (`crate::renewal`, the only writer).
    pub(crate) membership: std::sync::RwLock<Option<zavod_proto::trust::Membership>>,
    /// Revocations this node holds; the Router is the only writer.
    pub(crate) revocations: std::sync::RwLock<crate::revocations::RevocationStore>,
    /// Conversations whose summaries this node is writing.
    pub(crate) folding: crate::summaries::Folding,
}

/// Models whose tokenization a node keeps estimates for, at most.
const MAX_ESTIMATED_MODELS: usize = 64;

impl NodeShared {
    /// A prompt of `bytes` bytes of turn text came to `tokens` tokens on
    /// a node serving `model`.
    /// The membership certificate held now.
    pub(crate) fn membership(&self) -> Option<zavod_proto::trust::Membership> {
        match self.membership.read() {
            Ok(m) => m.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The revocations held now (a poisoned lock still holds them: the
    /// set only grows, so no writer leaves it half-changed).
    pub(crate) fn revocations(
        &self,
    ) -> std::sync::RwLockReadGuard<'_, crate::revocations::RevocationStore> {
        match self.revocations.read() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    pub fn learn_tokens(&self, model: &str, bytes: usize, tokens: u32) {
        if let Ok(mut m) = self.token_estimates.lock() {
            if !m.contains_key(model) && m.len() >= MAX_ESTIMATED_MODELS {
                return;
            }
            m.entry(model.to_string())
                .or_default()
                .observe(bytes, tokens);
        }
    }

    /// Where `model` is in [`NodeShared::models`], when this node serves it.
    pub fn model_index(&self, model: &str) -> Option<usize> {
        self.models.iter().position(|m| m.offer().name == model)
    }

    /// The local model named `model`, when this node serves it.
    pub fn model(&self, model: &str) -> Option<&Arc<dyn ModelBackend>> {
        self.model_index(model).map(|i| &self.models[i])
    }

    /// The token count of `text` for `model`: exact with a local model,
    /// else estimated.
    pub fn count_tokens(&self, model: &str, text: &str) -> u32 {
        if let Some(m) = self.model(model) {
            return m.count_tokens(text);
        }
        self.token_estimates
            .lock()
            .ok()
            .and_then(|m| m.get(model).map(|e| e.estimate(text)))
            .unwrap_or_else(|| zavod_proto::chat::prompt::estimate_tokens(text))
    }
}

impl NodeShared {
    pub fn listen_addrs(&self) -> Vec<String> {
        match self.listen_addrs.read() {
            Ok(a) => a.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}

pub(crate) fn error_frame(code: ErrorCode, message: impl Into<String>) -> ErrorFrame {
    ErrorFrame {
        code,
        message: message.into(),
    }
}

/// An actor we needed is between restarts.
pub(crate) fn unavailable(what: &str) -> ErrorFrame {
    error_frame(
        ErrorCode::NoCapacity,
        format!("{what} is restarting; try again in a moment"),
    )
}
