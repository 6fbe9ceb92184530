//! Actor sessions between nodes: ractor_cluster node sessions carried over
//! libp2p streams of [`zavod_net::ACTORS_PROTOCOL`], so actor messages from
//! node to node share the swarm's one encrypted, peer-authenticated
//! transport and its one port.
//!
//! Invariants:
//! - A session's ractor node name is `<peer id>@zavod`, and it must have
//!   come in on a libp2p stream from that very peer (the stream's label says
//!   which). Any other session (a name that does not match the noise
//!   authenticated peer, or one through the NodeServer's own TCP listener,
//!   which ractor_cluster always opens and we bind to loopback) is stopped
//!   as soon as it authenticates.
//! - A session lives no longer than the libp2p connection under it: when
//!   the last connection to a peer closes, that peer's sessions are stopped,
//!   so a stale session never shadows a fresh one.
//! - Sessions are opened on demand by the node that has something to say,
//!   once at a time per peer; the accepting side admits only members.
//! - Remote actors are found through `ractor::pg`: each node's Router joins
//!   [`ROUTER_GROUP`], and the session's group exchange makes it visible to
//!   the peer. Every wait here has a deadline.

use crate::actors::router::RouterMsg;
use libp2p::PeerId;
use ractor::{Actor, ActorRef};
use ractor_cluster::node::{NodeConnectionMode, NodeServerSessionInformation};
use ractor_cluster::{
    BoxRead, BoxWrite, ClusterBidiStream, NodeEventSubscription, NodeServer, NodeServerMessage,
    NodeSessionMessage,
};
use sha2::{Digest, Sha256};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::compat::FuturesAsyncReadCompatExt;
use zavod_proto::NodeId;

/// The process group every node's Router joins.
pub(crate) const ROUTER_GROUP: &str = "zavod.router";
/// How long opening a session and seeing the peer's Router may take.
const SESSION_READY_MS: u64 = 5_000;
/// How often the peer's process groups are looked at while waiting.
const PG_POLL_MS: u64 = 10;
/// Host part of every node name (the peer id is the name).
const HOST: &str = "zavod";

/// Why no actor session could be had with a peer.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot start the actor session server: {0}")]
    Start(String),
    #[error("cannot open an actor session to {peer}: {reason}")]
    Open { peer: String, reason: String },
    #[error("no actor session with {peer} after {ms} ms")]
    Timeout { peer: String, ms: u64 },
}

/// The label a session's stream carries: which peer it came from.
fn label(peer: &PeerId) -> String {
    format!("p2p/{peer}")
}

/// The peer a session belongs to, if its name and its stream agree.
fn peer_of(ses: &NodeServerSessionInformation) -> Option<PeerId> {
    claimed_peer(&ses.peer_name.as_ref()?.name, &ses.peer_addr)
}

/// The peer named `name` if the stream labelled `stream_label` came from it.
fn claimed_peer(name: &str, stream_label: &str) -> Option<PeerId> {
    let (id, host) = name.split_once('@')?;
    let peer: PeerId = id.parse().ok()?;
    (host == HOST && stream_label == label(&peer)).then_some(peer)
}

/// The cookie sessions authenticate with: every node of a mesh derives the
/// same one from the mesh's session secret, which the authority's node
/// makes and hands to each node it admits. (The peer's identity comes from
/// noise; the cookie keeps out whoever reaches ractor_cluster's own
/// loopback listener, as a local user can, since only members know it.)
/// A data directory that joined before meshes had a secret derives it
/// from the authorities' public keys, as before.
pub(crate) fn mesh_cookie(authorities: &BTreeSet<NodeId>, secret: Option<&[u8; 32]>) -> String {
    let mut h = Sha256::new();
    match secret {
        Some(s) => {
            h.update(b"zavod-actors-cookie-2");
            h.update(s);
        }
        None => {
            h.update(b"zavod-actors-cookie-1");
            for a in authorities {
                h.update(a.0);
            }
        }
    }
    hex::encode(h.finalize())
}

/// A libp2p stream as ractor_cluster's external transport.
struct P2pStream {
    stream: libp2p::Stream,
    peer: PeerId,
}

impl ClusterBidiStream for P2pStream {
    fn split(self: Box<Self>) -> (BoxRead, BoxWrite) {
        let (r, w) = tokio::io::split(self.stream.compat());
        (Box::new(r), Box::new(w))
    }

    fn peer_label(&self) -> Option<String> {
        Some(label(&self.peer))
    }
}

#[derive(Clone)]
struct Ready {
    node: u64,
    session: ActorRef<NodeSessionMessage>,
}

#[derive(Default)]
struct Inner {
    ready: Mutex<HashMap<PeerId, Ready>>,
    changed: Notify,
}

impl Inner {
    fn ready(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, Ready>> {
        // A poisoned map is still a consistent map: entries are whole values.
        self.ready.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Session events from the NodeServer.
struct Watch(Arc<Inner>);

impl NodeEventSubscription for Watch {
    fn node_session_opened(&self, _ses: NodeServerSessionInformation) {}

    fn node_session_authenticated(&self, ses: NodeServerSessionInformation) {
        if peer_of(&ses).is_none() {
            tracing::warn!(peer = %ses.peer_addr, name = ?ses.peer_name.as_ref().map(|n| &n.name),
                "actor session refused: its name does not match the connection");
            ses.actor
                .stop(Some("name does not match the connection".into()));
        }
    }

    fn node_session_ready(&self, ses: NodeServerSessionInformation) {
        let Some(peer) = peer_of(&ses) else {
            ses.actor
                .stop(Some("name does not match the connection".into()));
            return;
        };
        tracing::debug!(%peer, node = ses.node_id, "actor session ready");
        self.0.ready().insert(
            peer,
            Ready {
                node: ses.node_id,
                session: ses.actor,
            },
        );
        self.0.changed.notify_waiters();
    }

    fn node_session_disconnected(&self, ses: NodeServerSessionInformation) {
        let mut ready = self.0.ready();
        ready.retain(|_, r| r.node != ses.node_id);
        drop(ready);
        self.0.changed.notify_waiters();
    }
}

/// This node's end of the actor sessions; clone freely.
#[derive(Clone)]
pub struct Cluster {
    server: ActorRef<NodeServerMessage>,
    net: zavod_net::Client,
    inner: Arc<Inner>,
    opening: Arc<Mutex<HashSet<PeerId>>>,
}

impl Cluster {
    /// Starts the session server (before any peer can open a session).
    pub async fn start(net: zavod_net::Client, cookie: String) -> Result<Self, ClusterError> {
        let server = NodeServer::new(
            0,
            cookie,
            net.local_peer_id().to_string(),
            HOST.to_string(),
            None,
            Some(NodeConnectionMode::Isolated),
        )
        .with_listen_addr(IpAddr::V4(Ipv4Addr::LOCALHOST))
        .with_max_inbound_frame_size(zavod_proto::limits::MAX_FRAME_BYTES as u64);
        let (server, _) = Actor::spawn(None, server, ())
            .await
            .map_err(|e| ClusterError::Start(e.to_string()))?;
        let inner = Arc::new(Inner::default());
        server
            .cast(NodeServerMessage::SubscribeToEvents {
                id: "zavod".into(),
                subscription: Box::new(Watch(Arc::clone(&inner))),
            })
            .map_err(|e| ClusterError::Start(e.to_string()))?;
        Ok(Cluster {
            server,
            net,
            inner,
            opening: Arc::default(),
        })
    }

    /// Hands an accepted stream to the session server.
    pub fn accept(&self, peer: PeerId, stream: libp2p::Stream) {
        let stream = Box::new(P2pStream { stream, peer });
        if let Err(e) = self
            .server
            .cast(NodeServerMessage::ConnectionOpenedExternal {
                stream,
                is_server: true,
            })
        {
            tracing::warn!(%peer, error = %e, "actor session server gone");
        }
    }

    /// Whether a session with `peer` is up.
    pub fn has_session(&self, peer: &PeerId) -> bool {
        self.inner.ready().contains_key(peer)
    }

    /// Stops the sessions of a peer whose last connection closed.
    pub fn peer_gone(&self, peer: &PeerId) {
        if let Some(r) = self.inner.ready().remove(peer) {
            r.session.stop(Some("connection closed".into()));
        }
    }

    /// The ractor node id of the session with `peer`, opening one if needed.
    async fn session(&self, peer: PeerId) -> Result<u64, ClusterError> {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(SESSION_READY_MS);
        loop {
            let changed = self.inner.changed.notified();
            if let Some(r) = self.inner.ready().get(&peer) {
                return Ok(r.node);
            }
            let first = self
                .opening
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(peer);
            if first {
                let opened = self.open(peer).await;
                if opened.is_err() {
                    self.opening
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&peer);
                }
                opened?;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                self.opening
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&peer);
                return match self.inner.ready().get(&peer) {
                    Some(r) => Ok(r.node),
                    None => Err(ClusterError::Timeout {
                        peer: peer.to_string(),
                        ms: SESSION_READY_MS,
                    }),
                };
            }
            if self.has_session(&peer) {
                self.opening
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&peer);
            }
        }
    }

    async fn open(&self, peer: PeerId) -> Result<(), ClusterError> {
        let err = |reason: String| ClusterError::Open {
            peer: peer.to_string(),
            reason,
        };
        let stream = self
            .net
            .open_raw(peer, zavod_net::ACTORS_PROTOCOL)
            .await
            .map_err(|e| err(e.to_string()))?;
        ractor_cluster::client_connect_external(&self.server, Box::new(P2pStream { stream, peer }))
            .await
            .map_err(|e| err(e.to_string()))
    }

    /// The Router of `peer`, reached over an actor session.
    pub async fn router_of(&self, peer: PeerId) -> Result<ActorRef<RouterMsg>, ClusterError> {
        let node = self.session(peer).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(SESSION_READY_MS);
        loop {
            let found = ractor::pg::get_members(&ROUTER_GROUP.to_string())
                .into_iter()
                .find(|cell| !cell.get_id().is_local() && cell.get_id().node() == node);
            if let Some(cell) = found {
                return Ok(ActorRef::from(cell));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ClusterError::Timeout {
                    peer: peer.to_string(),
                    ms: SESSION_READY_MS,
                });
            }
            tokio::time::sleep(Duration::from_millis(PG_POLL_MS)).await;
        }
    }

    pub fn stop(&self) {
        self.server.stop(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_must_come_from_the_peer_it_names() {
        let a = PeerId::random();
        let b = PeerId::random();
        assert_eq!(claimed_peer(&format!("{a}@zavod"), &label(&a)), Some(a));
        // Another peer's name over a's stream.
        assert_eq!(claimed_peer(&format!("{b}@zavod"), &label(&a)), None);
        // Through the loopback TCP listener rather than libp2p.
        assert_eq!(claimed_peer(&format!("{a}@zavod"), "127.0.0.1:4000"), None);
        // Malformed names.
        for name in [
            "",
            "@",
            "zavod",
            &a.to_string(),
            &format!("{a}@elsewhere"),
            "x@zavod",
        ] {
            assert_eq!(claimed_peer(name, &label(&a)), None, "{name}");
        }
    }

    #[test]
    fn cookies_follow_the_mesh() {
        let a: BTreeSet<NodeId> = [NodeId([1; 32])].into();
        let b: BTreeSet<NodeId> = [NodeId([2; 32])].into();
        assert_eq!(mesh_cookie(&a, None), mesh_cookie(&a.clone(), None));
        assert_ne!(mesh_cookie(&a, None), mesh_cookie(&b, None));
        // With the mesh's secret, the cookie is the secret's alone: nobody
        // who knows only the mesh's public keys can compute it.
        let (s, t) = ([5u8; 32], [6u8; 32]);
        assert_eq!(mesh_cookie(&a, Some(&s)), mesh_cookie(&b, Some(&s)));
        assert_ne!(mesh_cookie(&a, Some(&s)), mesh_cookie(&a, Some(&t)));
        assert_ne!(mesh_cookie(&a, Some(&s)), mesh_cookie(&a, None));
    }
}
