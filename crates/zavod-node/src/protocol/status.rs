//! The status protocol: the mesh as this node sees it, for a credential
//! holder or the node's operator; this node's membership certificate, for
//! anyone (clients check it before they send a credential); the
//! revocations it holds, for members; and a signed revocation to take,
//! from anyone.

use super::{call, first_frame};
use crate::actors::router::RouterMsg;
use crate::actors::{NodeShared, error_frame};
use std::sync::Arc;
use std::time::Duration;
use zavod_net::{FrameReader, FrameWriter};
use zavod_proto::NodeId;
use zavod_proto::wire::{ErrorCode, StatusReply, StatusRequest};

pub(super) async fn serve_status(
    shared: &Arc<NodeShared>,
    client: NodeId,
    writer: &mut FrameWriter,
    reader: &mut FrameReader,
    first: Duration,
) {
    let wt = Duration::from_millis(shared.config.limits.write_timeout_ms);
    let reply = match first_frame::<StatusRequest>(reader, first).await {
        Ok(Some(StatusRequest::Membership)) => match shared.membership() {
            Some(m) => StatusReply::Membership(m),
            None => StatusReply::Refused(error_frame(
                ErrorCode::Forbidden,
                "this node is not a member of a mesh yet",
            )),
        },
        Ok(Some(req)) => call(shared.directory.get().router, "the router", |reply| {
            RouterMsg::Status {
                client,
                request: Box::new(req),
                reply,
            }
        })
        .await
        .unwrap_or_else(StatusReply::Refused),
        Ok(None) => return,
        Err(e) => StatusReply::Refused(e),
    };
    let _ = writer.send(&reply, wt).await;
}
