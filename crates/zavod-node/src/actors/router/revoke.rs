//! The Router's part in revocations: it takes them (from `zavod mesh
//! revoke` and `zavod cap revoke`, or from a member), holds them
//! (`crate::revocations`), enforces them at once (a revoked node leaves the
//! view and is disconnected; a revoked credential is refused), and spreads
//! them: every capacity report carries the digest of the list, and a node
//! that sees a member with a digest that says it holds more asks that
//! member for its list. A new revocation changes the digest, which the
//! next announcement (sent at once) carries, so each gossip round spreads
//! it one hop further with one request per node.

use super::{RouterMsg, RouterState};
use crate::actors::error_frame;
use std::time::Duration;
use zavod_proto::NodeId;
use zavod_proto::trust::{Revocation, RevocationDigest, RevocationError, Revoked, hex16};
use zavod_proto::wire::{ErrorCode, ErrorFrame, StatusReply, StatusRequest};

/// How long a fetch of a member's revocations may take in all.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

impl RouterState {
    /// Refuses a credential the mesh's authority revoked.
    pub(super) fn check_not_revoked(&self, credential: &[u8; 16]) -> Result<(), ErrorFrame> {
        if self.shared.revocations().credential_revoked(credential) {
            return Err(error_frame(
                ErrorCode::Unauthorized,
                format!(
                    "credential refused: credential {} was revoked by the mesh's authority; \
                     ask its operator for a new one (zavod cap issue)",
                    hex16(credential)
                ),
            ));
        }
        Ok(())
    }

    /// Every revocation held, for a member that asks.
    pub(super) fn revocations_for(&self, client: NodeId, now: u64) -> StatusReply {
        let held = self.shared.revocations();
        if !self.view.is_member(&client, now) || held.node_revoked(&client) {
            return StatusReply::Refused(error_frame(
                ErrorCode::Forbidden,
                "revocations are handed to members of the mesh only",
            ));
        }
        StatusReply::Revocations(held.set.iter().cloned().collect())
    }

    /// A revocation handed in by anyone: its signature is its admission.
    pub(super) async fn take_revocation(&mut self, r: Box<Revocation>) -> StatusReply {
        let (new, errors) = self.apply_revocations(None, vec![*r]).await;
        if let Some(e) = errors.first() {
            return StatusReply::Refused(error_frame(ErrorCode::Unauthorized, e.to_string()));
        }
        StatusReply::Revoked {
            new: !new.is_empty(),
            held: u32::try_from(self.shared.revocations().set.len()).unwrap_or(u32::MAX),
        }
    }

    /// Holds the new revocations among `list` and enforces them now.
    pub(super) async fn apply_revocations(
        &mut self,
        from: Option<NodeId>,
        list: Vec<Revocation>,
    ) -> (Vec<Revocation>, Vec<RevocationError>) {
        let (new, errors) = match self.shared.revocations.write() {
            Ok(mut held) => held.add(list),
            Err(p) => p.into_inner().add(list),
        };
        let from = from.map(|n| n.short());
        for e in &errors {
            tracing::warn!(from = ?from, error = %e, "revocation refused");
        }
        let me = self.me();
        for r in &new {
            tracing::warn!(subject = %r.body.subject, from = ?from, "revocation taken");
            match r.body.subject {
                Revoked::Node(n) if n == me => tracing::error!(
                    "this node's membership was revoked by the mesh's authority: members no \
                     longer route to it, accept its grants or keep its connections"
                ),
                Revoked::Node(n) => {
                    self.view.remove(&n);
                    self.placer.on_failure(&n);
                    if let Some(peer) = zavod_net::peer_id_of(&n) {
                        self.shared.net.block(peer).await;
                    }
                }
                Revoked::Credential(_) => {}
            }
        }
        if !new.is_empty() {
            // The new digest goes out now rather than at the next heartbeat.
            self.announcer.reset();
            self.gossip_tick();
        }
        (new, errors)
    }

    /// Asks `node` for its revocations when its report's digest says it
    /// holds some this node lacks: once per digest it announces (again
    /// after a few seconds if that did not help), and a few members at
    /// once.
    pub(super) fn maybe_fetch_revocations(
        &mut self,
        node: NodeId,
        theirs: &RevocationDigest,
        now: u64,
    ) {
        if !self.shared.revocations().digest().should_fetch_from(theirs) {
            return;
        }
        self.revocation_fetches
            .retain(|_, (_, at)| now.saturating_sub(*at) < super::REVOCATION_FETCH_EVERY_MS);
        // A member whose list grew since we last asked it is asked again at
        // once; one whose list we already fetched, only after a while.
        let asked = self.revocation_fetches.get(&node);
        if asked.is_some_and(|(d, _)| d == theirs)
            || (asked.is_none() && self.revocation_fetches.len() >= super::MAX_REVOCATION_FETCHES)
        {
            return;
        }
        let (Some(peer), Some(router)) = (
            zavod_net::peer_id_of(&node),
            self.shared.directory.get().router,
        ) else {
            return;
        };
        self.revocation_fetches.insert(node, (*theirs, now));
        let net = self.shared.net.clone();
        tokio::spawn(async move {
            let fetched = tokio::time::timeout(FETCH_TIMEOUT, async {
                let (mut w, mut r) = net.open(peer, zavod_net::STATUS_PROTOCOL).await?.split();
                w.send(&StatusRequest::Revocations, FETCH_TIMEOUT).await?;
                r.recv::<StatusReply>().await
            })
            .await;
            match fetched {
                Ok(Ok(Some(StatusReply::Revocations(list)))) => {
                    let _ = router.cast(RouterMsg::Revocations {
                        from: Some(node),
                        list,
                    });
                }
                Ok(Ok(Some(StatusReply::Refused(e)))) => {
                    tracing::debug!(peer = %node.short(), error = %e.message, "member would not hand over its revocations");
                }
                Ok(Ok(_)) => {
                    tracing::debug!(peer = %node.short(), "member answered a revocations request with something else");
                }
                Ok(Err(e)) => {
                    tracing::debug!(peer = %node.short(), error = %e, "fetching a member's revocations failed");
                }
                Err(_) => {
                    tracing::debug!(peer = %node.short(), "fetching a member's revocations timed out");
                }
            }
        });
    }
}
