//! The replica protocol's two ends: [`serve_replica`] carries out a
//! member's request on this node's store (writes through the group-commit
//! writer, answered once durable; reads straight from the store), and
//! [`ask`] is the one client every replica read and write goes through
//! (this node's own replica is asked without the network). Only members
//! reach the server (checked before a stream gets here), and every request
//! is checked against the protocol's bounds before it touches the store.

use super::first_frame;
use crate::actors::{NodeShared, error_frame};
use std::time::Duration;
use zavod_net::{FrameReader, FrameWriter};
use zavod_proto::NodeId;
use zavod_proto::limits::{
    MAX_EXPORT_PAGE_BYTES, MAX_LISTED_CONVERSATIONS, MAX_REPLICA_FRAME_TEXT_BYTES,
};
use zavod_proto::wire::ErrorCode;
use zavod_proto::wire::replica::{ReplicaReply, ReplicaRequest};
use zavod_store::StoreError;

pub(super) async fn serve_replica(
    shared: &NodeShared,
    writer: &mut FrameWriter,
    reader: &mut FrameReader,
    first: Duration,
) {
    let wt = Duration::from_millis(shared.config.limits.write_timeout_ms);
    let reply = match first_frame::<ReplicaRequest>(reader, first).await {
        Ok(Some(req)) => match req.check() {
            Ok(()) => local(shared, req).await,
            Err(m) => ReplicaReply::Refused(error_frame(
                ErrorCode::BadRequest,
                format!("replica request out of bounds: {m}"),
            )),
        },
        Ok(None) => return,
        Err(e) => ReplicaReply::Refused(e),
    };
    let _ = writer.send(&reply, wt).await;
}

fn store_error(e: StoreError) -> ReplicaReply {
    let code = match e {
        StoreError::TooManyConversations { .. } => ErrorCode::Forbidden,
        _ => ErrorCode::Internal,
    };
    ReplicaReply::Refused(error_frame(code, format!("memory: {e}")))
}

/// Carries out a replica request on this node's own store.
pub(crate) async fn local(shared: &NodeShared, req: ReplicaRequest) -> ReplicaReply {
    let store = &shared.store;
    match req {
        ReplicaRequest::Write {
            key,
            floor,
            entries,
        } => {
            let (tx, rx) = tokio::sync::oneshot::channel();
            // A full queue answers through the callback as well.
            let _ = shared.writer.write(key, floor, entries, move |r| {
                let _ = tx.send(r);
            });
            match rx.await {
                Ok(Ok(applied)) => ReplicaReply::Applied(applied),
                Ok(Err(e)) => store_error(e),
                Err(_) => ReplicaReply::Refused(error_frame(
                    ErrorCode::Internal,
                    "memory: the writer stopped",
                )),
            }
        }
        ReplicaRequest::Read { key } => match store.read(&key, MAX_REPLICA_FRAME_TEXT_BYTES) {
            Ok(h) => ReplicaReply::Held(h),
            Err(e) => store_error(e),
        },
        ReplicaRequest::Page { key, from } => {
            match store
                .contains(&key)
                .and_then(|held| Ok((held, store.page(&key, from, MAX_EXPORT_PAGE_BYTES)?)))
            {
                Ok((held, page)) => ReplicaReply::Page {
                    turns: page.turns,
                    next: page.next,
                    held,
                },
                Err(e) => store_error(e),
            }
        }
        ReplicaRequest::List { owner } => match store.conversations(&owner) {
            Ok(mut names) => {
                let truncated = names.len() > MAX_LISTED_CONVERSATIONS;
                names.truncate(MAX_LISTED_CONVERSATIONS);
                ReplicaReply::Names { names, truncated }
            }
            Err(e) => store_error(e),
        },
    }
}

/// Asks `node` to carry out `req` within `timeout`; a refusal comes back
/// as `Ok(Refused)`, a failure to get any answer as `Err`.
pub(crate) async fn ask(
    shared: &NodeShared,
    node: NodeId,
    req: ReplicaRequest,
    timeout: Duration,
) -> Result<ReplicaReply, String> {
    if node == shared.identity.id() {
        return Ok(local(shared, req).await);
    }
    let peer = zavod_net::peer_id_of(&node).ok_or("a node key that is no peer id")?;
    let asked = async {
        let (mut w, mut r) = shared
            .net
            .open(peer, zavod_net::REPLICA_PROTOCOL)
            .await
            .map_err(|e| e.to_string())?
            .split();
        w.send(&req, timeout).await.map_err(|e| e.to_string())?;
        let reply = r
            .recv::<ReplicaReply>()
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the replica closed the stream without an answer")?;
        reply.check()?;
        let _ = w.close_within(Duration::from_millis(200)).await;
        Ok::<_, String>(reply)
    };
    tokio::time::timeout(timeout, asked)
        .await
        .map_err(|_| format!("no answer within {} ms", timeout.as_millis()))?
}
