//! The join protocol: sign a membership for a node presenting this
//! mesh's invite, which admits as many nodes as it says (`crate::invites`),
//! or renew the membership a member presents (`crate::renewal`).

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
        Ok(Some(req)) => match admit(shared, &req, joiner) {
            Ok(membership) => {
                let what = match req {
                    JoinRequest::Invite(_) => "signed a membership for a joining node",
                    JoinRequest::Renew(_) => "renewed a member's membership",
                };
                tracing::info!(node = %joiner.short(), "{what}");
                JoinReply::Welcome {
                    membership,
                    authorities: shared.identity.authorities.iter().copied().collect(),
                    session_secret: shared.identity.session_secret,
                }
            }
            Err(m) => JoinReply::Refused(error_frame(ErrorCode::Forbidden, m)),
        },
        Ok(None) => return,
        Err(e) => JoinReply::Refused(e),
    };
    let _ = writer.send(&reply, wt).await;
}

/// Signs a membership if the invite is this mesh's, unexpired, and unused
/// or used by this same node; or renews the membership a member presents.
/// Never for a revoked node.
fn admit(
    shared: &NodeShared,
    req: &JoinRequest,
    joiner: NodeId,
) -> Result<zavod_proto::trust::Membership, String> {
    let now = now_ms();
    if shared.revocations().node_revoked(&joiner) {
        return Err(format!(
            "node {} was revoked by the mesh's authority (zavod mesh revoke); no membership is \
             signed for it again",
            joiner.short()
        ));
    }
    let ticket = match req {
        JoinRequest::Invite(t) => t,
        JoinRequest::Renew(held) => return shared.identity.renew(held, joiner, now),
    };
    let membership = shared.identity.admit(ticket, joiner, now)?;
    let mut used = shared
        .used_invites
        .lock()
        .map_err(|_| "the node's invite records are unavailable".to_string())?;
    used.claim(
        ticket.body.id,
        ticket.body.uses,
        joiner,
        ticket.body.expires_at_ms,
        now,
    )?;
    Ok(membership)
}
