//! The memory protocol: a credential holder lists, exports or deletes its
//! own conversations on this node, or keeps a turn whose entry failed. The credential must verify, be the
//! stream's own key's and not be revoked; the holder's key is then the
//! only owner the request can reach. The work is done by the MemoryKeeper,
//! so a deletion is ordered with the turns being recorded. The HTTP API's
//! `/v1/conversations` goes through [`own`] too.

use super::{call, first_frame};
use crate::actors::memory_keeper::MemoryMsg;
use crate::actors::{NodeShared, error_frame};
use std::sync::Arc;
use std::time::Duration;
use zavod_net::{FrameReader, FrameWriter};
use zavod_proto::NodeId;
use zavod_proto::trust::Credential;
use zavod_proto::wire::ErrorCode;
use zavod_proto::wire::ErrorFrame;
use zavod_proto::wire::memory::{MemoryOp, MemoryReply, MemoryRequest};

pub(super) async fn serve_memory(
    shared: &Arc<NodeShared>,
    client: NodeId,
    writer: &mut FrameWriter,
    reader: &mut FrameReader,
    first: Duration,
) {
    let wt = Duration::from_millis(shared.config.limits.write_timeout_ms);
    let reply = match first_frame::<MemoryRequest>(reader, first).await {
        Ok(Some(req)) => match holder(shared, &req.credential, &client) {
            Ok(owner) => match req.op.check() {
                Ok(()) => own(shared, owner, req.op).await,
                Err(m) => MemoryReply::Refused(error_frame(ErrorCode::BadRequest, m)),
            },
            Err(e) => MemoryReply::Refused(e),
        },
        Ok(None) => return,
        Err(e) => MemoryReply::Refused(e),
    };
    let _ = writer.send(&reply, wt).await;
}

/// The owner a request may reach: the credential's holder, once the
/// credential verifies for the key that presents it and is not revoked.
pub(crate) fn holder(
    shared: &NodeShared,
    credential: &Credential,
    presenter: &NodeId,
) -> Result<NodeId, ErrorFrame> {
    let now = crate::clock::now_ms();
    let body = credential
        .verify_holder(&shared.identity.authorities, presenter, now)
        .map_err(|e| error_frame(ErrorCode::Unauthorized, format!("credential refused: {e}")))?;
    if shared.revocations().credential_revoked(&body.id) {
        return Err(error_frame(
            ErrorCode::Unauthorized,
            "credential refused: it was revoked by the mesh's authority; ask its operator for a new one",
        ));
    }
    Ok(body.holder)
}

/// Carries out `op` on `owner`'s conversations.
pub(crate) async fn own(shared: &NodeShared, owner: NodeId, op: MemoryOp) -> MemoryReply {
    call(
        shared.directory.get().memory,
        "the memory keeper",
        |reply| MemoryMsg::Own { owner, op, reply },
    )
    .await
    .unwrap_or_else(MemoryReply::Refused)
}
