//! The stream protocols a node serves, one file each; this file takes an
//! inbound stream, checks its peer and a permit, and hands it to its
//! protocol, and holds what the protocols share (actor calls, the
//! reservation guard, breaker outcomes).
//!
//! - chat (entry): read the request and hand it to [`crate::chat_entry`],
//!   which admits, assembles, places and then redirects, runs here or
//!   relays, by the rules of the entry machine in zavod-proto.
//! - run (target): check the grant (in the ModelWorker), generate, stream,
//!   and sign a receipt for the client and, over the actor session, a
//!   report for the entry that issued the grant.
//! - join: sign a membership for a node presenting this mesh's invite.
//! - status: the mesh as this node sees it.
//! - memory: a credential holder's own conversations, to list, export or
//!   delete.
//! - replica: members' reads and writes of the conversation replicas this
//!   node keeps.
//!
//! Every wait has a deadline; a peer that sends junk, stalls or leaves
//! only ever ends its own stream. A stream passes the admission steps of
//! [`crate::admission`] (a per-peer quota, a short wait for its first frame
//! on a pool of its own, then a serving permit) before its protocol runs,
//! and gives its permit back before its close is awaited.

use crate::actors::breaker::BreakerMsg;
use crate::actors::router::{Admission, RouterMsg};
use crate::actors::{NodeShared, error_frame, unavailable};
use crate::admission::{Refusal, StreamPools};
use libp2p::PeerId;
use std::sync::Arc;
use std::time::Duration;
use zavod_net::{FrameReader, FrameStream, NetError, node_id_of};
use zavod_proto::NodeId;
use zavod_proto::mesh::breaker::Outcome;
use zavod_proto::wire::{ErrorCode, ErrorFrame, JoinReply, ServerFrame, StatusReply};

pub(crate) mod chat_entry;
pub(crate) mod embed;
mod entry_client;
mod join;
pub(crate) mod memory;
pub(crate) mod replica;
pub(crate) mod run_client;
mod run_target;
mod status;

pub(crate) use chat_entry::serve_in_process;
pub(crate) use run_target::RunMetrics;

/// Deadline for a reply from a local actor.
const ACTOR_CALL_MS: u64 = 10_000;

/// Which stream protocol a stream came in on.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    Chat,
    Run,
    Join,
    Status,
    Embed,
    Memory,
    Replica,
}

/// How long a refusal may take to write: a stream that is turned away
/// gets one frame and little patience.
const REFUSAL_WRITE_MS: u64 = 1_000;

/// Tells a stream why it is not served, in its protocol's own reply.
async fn refuse(writer: &mut zavod_net::FrameWriter, kind: Kind, e: ErrorFrame) {
    let wt = Duration::from_millis(REFUSAL_WRITE_MS);
    let _ = match kind {
        Kind::Join => writer.send(&JoinReply::Refused(e), wt).await,
        Kind::Status => writer.send(&StatusReply::Refused(e), wt).await,
        Kind::Chat | Kind::Run => writer.send(&ServerFrame::Error(e), wt).await,
        Kind::Embed => {
            let reply = zavod_proto::wire::embed::EmbedReply::Refused(e);
            writer.send(&reply, wt).await
        }
        Kind::Memory => {
            let reply = zavod_proto::wire::memory::MemoryReply::Refused(e);
            writer.send(&reply, wt).await
        }
        Kind::Replica => {
            let reply = zavod_proto::wire::replica::ReplicaReply::Refused(e);
            writer.send(&reply, wt).await
        }
    };
    let _ = writer.close_within(wt).await;
}

fn refusal_frame(r: Refusal) -> ErrorFrame {
    match r {
        Refusal::PeerQuota => error_frame(
            ErrorCode::NoCapacity,
            "you have as many streams open to this node as one peer may; wait for one to end",
        ),
        Refusal::Busy => error_frame(
            ErrorCode::NoCapacity,
            "this node is serving as many streams as it allows; try another node or later",
        ),
    }
}

/// Serves one inbound stream to completion.
pub(crate) async fn serve_stream(
    shared: Arc<NodeShared>,
    pools: Arc<StreamPools>,
    kind: Kind,
    peer: PeerId,
    stream: libp2p::Stream,
) {
    let limits = &shared.config.limits;
    let admission = &shared.config.admission;
    let wt = Duration::from_millis(limits.write_timeout_ms);
    let (mut writer, mut reader) = FrameStream::new(stream, limits.max_frame_bytes)
        .with_write_timeout(wt)
        .split();
    let _slot = match pools.peer_slot(peer) {
        Ok(s) => s,
        Err(r) => return refuse(&mut writer, kind, refusal_frame(r)).await,
    };
    let Some(remote) = node_id_of(&peer) else {
        let e = error_frame(ErrorCode::Unauthorized, "peers must use an ed25519 key");
        return refuse(&mut writer, kind, e).await;
    };
    // Until its first frame is here a stream has proved nothing: it waits
    // on the small pool, briefly.
    let waiting = match pools.first_frame() {
        Ok(p) => p,
        Err(r) => return refuse(&mut writer, kind, refusal_frame(r)).await,
    };
    let first_ms = admission.first_frame_timeout_ms;
    match tokio::time::timeout(Duration::from_millis(first_ms), reader.arrived()).await {
        Ok(true) => {}
        Ok(false) => return,
        Err(_) => {
            let e = error_frame(
                ErrorCode::Timeout,
                format!("no request within {first_ms} ms of opening the stream"),
            );
            return refuse(&mut writer, kind, e).await;
        }
    }
    drop(waiting);
    // Runs and embeddings carry an entry's grant: members' granted work
    // has a reserve that clients' chats cannot use up.
    let member = matches!(kind, Kind::Run | Kind::Embed | Kind::Replica)
        && crate::node::is_member(&shared, &peer).await;
    if matches!(kind, Kind::Replica) && !member {
        let e = error_frame(
            ErrorCode::Unauthorized,
            "only members of this mesh read or write its conversation replicas",
        );
        return refuse(&mut writer, kind, e).await;
    }
    let reserved = member;
    let permit = match pools.serve(reserved) {
        Ok(p) => p,
        Err(r) => return refuse(&mut writer, kind, refusal_frame(r)).await,
    };
    let first = Duration::from_millis(limits.request_timeout_ms);
    match kind {
        Kind::Chat => {
            chat_entry::serve_chat(&shared, remote, &mut writer, &mut reader, first).await
        }
        Kind::Run => run_target::serve_run(&shared, remote, &mut writer, &mut reader, first).await,
        Kind::Join => join::serve_join(&shared, remote, &mut writer, &mut reader, first).await,
        Kind::Status => {
            status::serve_status(&shared, remote, &mut writer, &mut reader, first).await
        }
        Kind::Embed => embed::serve_embed(&shared, remote, &mut writer, &mut reader, first).await,
        Kind::Memory => {
            memory::serve_memory(&shared, remote, &mut writer, &mut reader, first).await
        }
        Kind::Replica => replica::serve_replica(&shared, &mut writer, &mut reader, first).await,
    }
    // The work is done: a peer slow to take the close holds no permit.
    drop(permit);
    let _ = writer.close().await;
}

pub(crate) async fn first_frame<T: serde::de::DeserializeOwned>(
    reader: &mut FrameReader,
    timeout: Duration,
) -> Result<Option<T>, ErrorFrame> {
    match tokio::time::timeout(timeout, reader.recv::<T>()).await {
        Ok(Ok(f)) => Ok(f),
        Ok(Err(e)) => Err(net_error_frame(e)),
        Err(_) => Err(error_frame(
            ErrorCode::Timeout,
            format!("no request within {} ms", timeout.as_millis()),
        )),
    }
}

pub(crate) fn net_error_frame(e: NetError) -> ErrorFrame {
    match e {
        NetError::FrameTooLarge { .. } => error_frame(ErrorCode::FrameTooLarge, e.to_string()),
        NetError::Wire(w) => ErrorFrame::from(w),
        NetError::Timeout { .. } => error_frame(ErrorCode::Timeout, e.to_string()),
        other => error_frame(ErrorCode::BadRequest, other.to_string()),
    }
}

pub(crate) async fn call<M, T>(
    actor: Option<ractor::ActorRef<M>>,
    what: &str,
    make: impl FnOnce(ractor::RpcReplyPort<T>) -> M,
) -> Result<T, ErrorFrame>
where
    M: ractor::Message,
    T: Send + 'static,
{
    let actor = actor.ok_or_else(|| unavailable(what))?;
    match actor
        .call(make, Some(Duration::from_millis(ACTOR_CALL_MS)))
        .await
    {
        Ok(ractor::rpc::CallResult::Success(v)) => Ok(v),
        Ok(ractor::rpc::CallResult::Timeout) => Err(error_frame(
            ErrorCode::Timeout,
            format!("{what} did not answer within {ACTOR_CALL_MS} ms"),
        )),
        _ => Err(unavailable(what)),
    }
}

/// A reservation that is settled exactly once, whatever path the request
/// takes; unless told what was used, the whole reservation is charged.
pub(crate) struct Reservation<'a> {
    pub(crate) shared: &'a NodeShared,
    pub(crate) admission: &'a Admission,
    pub(crate) used: Option<u32>,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if let Some(r) = self.shared.directory.get().router {
            let _ = r.cast(RouterMsg::Settle {
                credential_id: self.admission.credential_id,
                reserved: self.admission.max_tokens,
                used: self.used.unwrap_or(self.admission.max_tokens),
            });
        }
    }
}

pub(crate) fn record_outcome(shared: &NodeShared, node: NodeId, outcome: Outcome) {
    let dir = shared.directory.get();
    if let Some(b) = dir.breaker {
        let _ = b.cast(BreakerMsg::Record { node, outcome });
    }
    if outcome == Outcome::Failure
        && let Some(r) = dir.router
    {
        let _ = r.cast(RouterMsg::Failed { node });
    }
}
