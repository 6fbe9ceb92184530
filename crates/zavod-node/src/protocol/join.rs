//! The join protocol: sign a membership for a node presenting this
//! mesh's invite.

use super::first_frame;
use crate::actors::{NodeShared, error_frame};
use crate::clock::now_ms;
use std::sync::Arc;
use std::time::Duration;
use zavod_net::{FrameReader, FrameWriter};
use zavod_proto::NodeId;
use zavod_proto::wire::{ErrorCode, JoinReply, JoinRequest};

pub(super) async fn serve_join(
    shared: &Arc<NodeShared>,
    joiner: NodeId,
    writer: &mut FrameWriter,
    reader: &mut FrameReader,
    first: Duration,
) {
    let wt = Duration::from_millis(shared.config.limits.write_timeout_ms);
    let reply = match first_frame::<JoinRequest>(reader, first).await {
        Ok(Some(req)) => match shared.identity.admit(&req.ticket, joiner, now_ms()) {
            Ok(membership) => {
                tracing::info!(node = %joiner.short(), "signed a membership for a joining node");
                JoinReply::Welcome {
                    membership,
                    authorities: shared.identity.authorities.iter().copied().collect(),
                }
            }
            Err(m) => JoinReply::Refused(error_frame(ErrorCode::Forbidden, m)),
        },
        Ok(None) => return,
        Err(e) => JoinReply::Refused(e),
    };
    let _ = writer.send(&reply, wt).await;
}
