//! The client side of a chat: dial any node, send one request with the
//! credential, and receive the answer as it streams. Used by `zavod chat`,
//! `zavod bench` and the tests.

use crate::datadir::ClientIdentity;
use libp2p::{Multiaddr, PeerId};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use zavod_net::{NetConfig, NetError};
use zavod_proto::chat::reader::ReadError;
use zavod_proto::ids::ConversationId;
use zavod_proto::limits::MAX_CLIENT_KNOWN_PEERS;
use zavod_proto::wire::memory::{MemoryOp, MemoryReply, MemoryRequest};
use zavod_proto::wire::{
    Accepted, DoneInfo, ErrorCode, ErrorFrame, GenParams, StatusReply, StatusRequest,
};

mod turn;

/// Runs `fut` as a task on the runtime's worker thread and waits for it.
///
/// The client's network event loop runs on that worker; a chat polled from
/// the calling thread (`block_on`) instead would wake a second thread for
/// every token that arrives, and on a machine whose cores all run inference
/// each wake-up takes time from the model. `zavod chat` and the bench call
/// it alike.
pub fn on_worker<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    fut: impl std::future::Future<Output = T> + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    rt.block_on(rt.spawn(fut))
}

/// How long a client tries to reach the target a redirect names before it
/// asks its entry to relay. A connection takes a few round trips even
/// across continents; a target hidden by a partition or a firewall would
/// otherwise hold the first token for the whole dial timeout.
const REDIRECT_DIAL: Duration = Duration::from_secs(3);

/// How long a status request may take to be sent and answered.
const STATUS_WAIT: Duration = Duration::from_secs(10);

/// One request on the status protocol to `peer` over `net`: the one
/// client of that protocol for commands and clients (`None`: the node
/// closed the stream without answering).
async fn status_on(
    net: &zavod_net::Client,
    peer: PeerId,
    request: &StatusRequest,
) -> Result<Option<StatusReply>, ChatError> {
    let (mut w, mut r) = net.open(peer, zavod_net::STATUS_PROTOCOL).await?.split();
    w.send(request, STATUS_WAIT).await?;
    tokio::time::timeout(STATUS_WAIT, r.recv::<StatusReply>())
        .await
        .map_err(|_| ChatError::Protocol(format!("no answer within {} s", STATUS_WAIT.as_secs())))?
        .map_err(ChatError::from)
}

/// Dials the node at `addr` with `key` (and the mesh key, if any) and
/// asks it one status request: `zavod status`, `zavod mesh revoke` and
/// `zavod cap revoke`.
pub async fn ask_status(
    key: &zavod_proto::trust::Keypair,
    addr: Multiaddr,
    cfg: NetConfig,
    request: &StatusRequest,
) -> Result<Option<StatusReply>, ChatError> {
    let (net, mut events, event_loop) =
        zavod_net::new(zavod_net::identity_from_secret(key.secret_bytes())?, cfg)?;
    tokio::spawn(event_loop.run());
    tokio::spawn(async move { while events.recv().await.is_some() {} });
    let peer = net.dial(addr).await?;
    status_on(&net, peer, request).await
}

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("{0}")]
    Net(#[from] NetError),
    #[error("the node refused: {message} ({code:?})")]
    Refused { code: ErrorCode, message: String },
    #[error("the node closed the stream before the answer was complete")]
    Truncated,
    #[error("the node broke the protocol: {0}")]
    Protocol(String),
    #[error(
        "{peer} is not a member of the mesh your credential is from ({why}); nothing was sent \
         to it. Check --peer, or use a credential from that node's mesh"
    )]
    NotInMesh { peer: PeerId, why: String },
}

impl From<ReadError> for ChatError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Refused(e) => e.into(),
            ReadError::Ended => ChatError::Truncated,
            ReadError::Unexpected(what) => ChatError::Protocol(what.into()),
        }
    }
}

impl From<ErrorFrame> for ChatError {
    fn from(e: ErrorFrame) -> Self {
        ChatError::Refused {
            code: e.code,
            message: e.message,
        }
    }
}

/// What a streaming chat reports as it goes.
#[derive(Debug)]
pub enum ChatEvent<'a> {
    Accepted(&'a Accepted),
    /// The answer streams straight from the target node.
    Direct {
        target: PeerId,
    },
    /// The target was out of reach; the entry node relays the answer.
    Relayed {
        reason: &'a str,
    },
    /// The target's slots were all busy; the entry places the answer on
    /// another node.
    Full {
        reason: &'a str,
    },
    /// The target failed after `tokens` tokens; the rest comes from
    /// another node, placed by the entry.
    Resuming {
        reason: &'a str,
        tokens: u32,
    },
    /// The entry failed after `tokens` tokens of the answer; the turn goes
    /// on through another node.
    Reattached {
        from: PeerId,
        to: PeerId,
        reason: &'a str,
        tokens: u32,
    },
    Token {
        index: u32,
        text: &'a str,
    },
}

/// A finished answer, with client-side timings.
#[derive(Debug, Clone)]
pub struct ChatOutcome {
    pub accepted: Accepted,
    pub text: String,
    pub done: DoneInfo,
    pub tokens: u32,
    /// From sending the request to the first token arriving.
    pub first_token: Duration,
    /// From the first token to the last.
    pub decode: Duration,
}

impl ChatOutcome {
    pub fn decode_tokens_per_s(&self) -> f64 {
        if self.tokens > 1 && !self.decode.is_zero() {
            f64::from(self.tokens - 1) / self.decode.as_secs_f64()
        } else {
            0.0
        }
    }
}

/// A connected client. Clones share one connection, and the node they
/// attach through: when it fails, a turn goes on through another node the
/// client knows, and so do the turns after it.
#[derive(Clone)]
pub struct ChatClient {
    net: zavod_net::Client,
    attached: Arc<Mutex<Attached>>,
    identity: ClientIdentity,
    frame_timeout: Duration,
    /// Longest wait for the next token once an answer is streaming; a
    /// target silent this long is treated as failed.
    stall_timeout: Duration,
}

/// The node a client attaches through, and the addresses of the nodes it
/// may fall back on: those it was given, in order, then those it last
/// learned from the mesh; at most [`MAX_CLIENT_KNOWN_PEERS`] in all.
struct Attached {
    peer: PeerId,
    given: Vec<Multiaddr>,
    learned: Vec<Multiaddr>,
}

impl std::fmt::Debug for ChatClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChatClient(peer {})", self.peer())
    }
}

/// One chat turn to send.
#[derive(Debug, Clone, Default)]
pub struct Ask {
    pub message: String,
    pub model: Option<String>,
    pub conversation: Option<ConversationId>,
    pub params: GenParams,
    pub show_prompt: bool,
    /// The turn's id, kept by its conversation once however often it is
    /// sent; `None`: a fresh one.
    pub turn: Option<u64>,
}

impl ChatClient {
    /// Starts a client swarm with the identity's key and connects to `addr`.
    pub async fn connect(
        identity: ClientIdentity,
        addr: Multiaddr,
        cfg: NetConfig,
    ) -> Result<Self, ChatError> {
        Self::connect_any(identity, vec![addr], cfg).await
    }

    /// Starts a client swarm with the identity's key and connects to the
    /// first of `addrs` that answers as a member of the credential's mesh;
    /// the others are kept to fall back on. Errors with the first
    /// address's failure when none does.
    pub async fn connect_any(
        identity: ClientIdentity,
        mut addrs: Vec<Multiaddr>,
        cfg: NetConfig,
    ) -> Result<Self, ChatError> {
        addrs.truncate(MAX_CLIENT_KNOWN_PEERS);
        let Some(first) = addrs.first().cloned() else {
            return Err(ChatError::Protocol("no node address to connect to".into()));
        };
        let secret = identity.key.secret_bytes();
        let (net, mut events, event_loop) =
            zavod_net::new(zavod_net::identity_from_secret(secret)?, cfg)?;
        tokio::spawn(event_loop.run());
        // Drain network events; a client needs none of them.
        tokio::spawn(async move { while events.recv().await.is_some() {} });
        let client = ChatClient {
            net,
            attached: Arc::new(Mutex::new(Attached {
                peer: PeerId::random(),
                given: addrs.clone(),
                learned: Vec::new(),
            })),
            identity,
            frame_timeout: Duration::from_secs(120),
            stall_timeout: Duration::from_secs(10),
        };
        let mut first_error = None;
        for addr in addrs {
            let single = addr == first;
            match client.attach(addr, single).await {
                Ok(peer) => {
                    client.set_peer(peer);
                    return Ok(client);
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.unwrap_or(ChatError::Truncated))
    }

    /// Dials `addr` and checks that it is a member of this client's mesh.
    /// `patient`: wait as long as a dial takes (the address the person
    /// named first), else [`REDIRECT_DIAL`].
    async fn attach(&self, addr: Multiaddr, patient: bool) -> Result<PeerId, ChatError> {
        let peer = if patient {
            self.net.dial(addr).await?
        } else {
            tokio::time::timeout(REDIRECT_DIAL, self.net.dial(addr.clone()))
                .await
                .map_err(|_| NetError::Timeout {
                    what: format!("dialling {addr}"),
                    ms: REDIRECT_DIAL.as_millis() as u64,
                })??
        };
        self.check_membership(peer).await?;
        Ok(peer)
    }

    fn set_peer(&self, peer: PeerId) {
        if let Ok(mut a) = self.attached.lock() {
            a.peer = peer;
        }
    }

    /// Asks the attached node for the other members' addresses, and keeps
    /// them, in place of those learned before (after those given, up to
    /// [`MAX_CLIENT_KNOWN_PEERS`]), to fall back on. Returns how many it
    /// learned. A node that does not answer teaches nothing and leaves
    /// what was learned before; that is not an error.
    pub async fn learn_peers(&self) -> usize {
        let request = StatusRequest::Credential(self.identity.credential.clone());
        let rows = match status_on(&self.net, self.peer(), &request).await {
            Ok(Some(StatusReply::Mesh { rows, .. })) => rows,
            _ => return 0,
        };
        let Ok(mut a) = self.attached.lock() else {
            return 0;
        };
        let a = &mut *a;
        a.learned.clear();
        let room = MAX_CLIENT_KNOWN_PEERS.saturating_sub(a.given.len());
        for row in rows.iter().filter(|r| !r.is_self) {
            let Some(peer) = zavod_net::peer_id_of(&row.node) else {
                continue;
            };
            for text in &row.addrs {
                let Ok(mut addr) = text.parse::<Multiaddr>() else {
                    continue;
                };
                if !matches!(
                    addr.iter().last(),
                    Some(libp2p::multiaddr::Protocol::P2p(_))
                ) {
                    addr.push(libp2p::multiaddr::Protocol::P2p(peer));
                }
                if a.learned.len() < room && !a.given.contains(&addr) && !a.learned.contains(&addr)
                {
                    a.learned.push(addr);
                }
            }
        }
        a.learned.len()
    }

    /// The entry `failed` failed: attaches through the next node known,
    /// after it in order (any address not of `failed`), and returns it.
    async fn reattach(&self, failed: PeerId) -> Result<PeerId, ChatError> {
        let known: Vec<Multiaddr> = match self.attached.lock() {
            Ok(a) => a.given.iter().chain(&a.learned).cloned().collect(),
            Err(_) => Vec::new(),
        };
        let of_failed = |addr: &Multiaddr| matches!(addr.iter().last(), Some(libp2p::multiaddr::Protocol::P2p(p)) if p == failed);
        let mut last = None;
        for addr in known.into_iter().filter(|a| !of_failed(a)) {
            match self.attach(addr, false).await {
                Ok(peer) if peer != failed => {
                    self.set_peer(peer);
                    return Ok(peer);
                }
                Ok(_) => {}
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            ChatError::Protocol("no other node is known to go on through".into())
        }))
    }

    /// Makes sure the node dialled is a member of the mesh whose authority
    /// signed this client's credential before the credential or any prompt
    /// goes to it: a node anyone can set up at an address the client was
    /// given would otherwise read every prompt.
    async fn check_membership(&self, peer: PeerId) -> Result<(), ChatError> {
        let not_in = |why: String| ChatError::NotInMesh { peer, why };
        let reply = status_on(&self.net, peer, &StatusRequest::Membership).await?;
        let cert = match reply {
            Some(StatusReply::Membership(m)) => m,
            Some(StatusReply::Refused(e)) => return Err(not_in(e.message)),
            Some(_) | None => {
                return Err(ChatError::Protocol(
                    "no membership certificate in the reply".into(),
                ));
            }
        };
        let authority = self.identity.credential.signer;
        let now = crate::clock::now_ms();
        let body = cert
            .verify(&[authority].into_iter().collect(), now)
            .map_err(|e| not_in(format!("its certificate: {e}")))?;
        match zavod_net::node_id_of(&peer) {
            Some(id) if id == body.member => Ok(()),
            _ => Err(not_in(
                "it showed another node's membership certificate".into(),
            )),
        }
    }

    /// The node this client attaches through now.
    pub fn peer(&self) -> PeerId {
        match self.attached.lock() {
            Ok(a) => a.peer,
            // A poisoned lock only means a panic elsewhere mid-update of a
            // PeerId, which is written whole.
            Err(p) => p.into_inner().peer,
        }
    }

    /// One operation on this client's own conversations at the node (the
    /// memory protocol): list, export a page, delete.
    pub async fn memory(&self, op: MemoryOp) -> Result<MemoryReply, ChatError> {
        let t = Duration::from_secs(30);
        let (mut w, mut r) = self
            .net
            .open(self.peer(), zavod_net::MEMORY_PROTOCOL)
            .await?
            .split();
        let request = MemoryRequest {
            credential: self.identity.credential.clone(),
            op,
        };
        w.send(&request, t).await?;
        let reply = tokio::time::timeout(t, r.recv::<MemoryReply>())
            .await
            .map_err(|_| ChatError::Protocol("no answer to a memory request within 30 s".into()))??
            .ok_or(ChatError::Truncated)?;
        if let MemoryReply::Refused(e) = reply {
            return Err(e.into());
        }
        reply.check().map_err(ChatError::Protocol)?;
        Ok(reply)
    }

    /// The underlying network handle (tests use it to play other roles).
    pub fn net(&self) -> &zavod_net::Client {
        &self.net
    }

    pub fn identity(&self) -> &ClientIdentity {
        &self.identity
    }
}
