//! Membership renewal. Memberships are short-lived (an invite says how
//! long, `zavod mesh invite --membership-ttl`, a week by default), so a
//! node the authority can no longer reach, or will no longer sign for
//! (revoked), drops out of every view when its certificate expires, even
//! where a revocation never arrived. A member has its membership renewed
//! at half-life at the node that signed it (the invite's bootstrap node,
//! remembered in the data directory), presenting the one it holds; the
//! authority's own node renews its own locally.
//!
//! Invariants: the renewed certificate replaces the held one only if it
//! verifies, names this node and lasts longer; it is on disk before the
//! node announces it; every exchange with the signer has a deadline.

use crate::actors::NodeShared;
use crate::clock::now_ms;
use libp2p::Multiaddr;
use std::sync::Arc;
use std::time::Duration;
use zavod_proto::trust::Membership;
use zavod_proto::wire::{JoinReply, JoinRequest};

/// One request on a join stream to the node at `addr` (which names its
/// peer id) and its reply.
pub(crate) async fn ask_signer(
    net: &zavod_net::Client,
    addr: Multiaddr,
    request: &JoinRequest,
    timeout: Duration,
) -> Result<JoinReply, String> {
    let peer = net.dial(addr).await.map_err(|e| e.to_string())?;
    let stream = net
        .open(peer, zavod_net::JOIN_PROTOCOL)
        .await
        .map_err(|e| e.to_string())?;
    let (mut w, mut r) = stream.split();
    w.send(request, timeout).await.map_err(|e| e.to_string())?;
    match tokio::time::timeout(timeout, r.recv::<JoinReply>()).await {
        Ok(Ok(Some(reply))) => Ok(reply),
        Ok(Ok(None)) => Err("the node closed the stream".to_string()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer in time".to_string()),
    }
}

/// How long a membership was signed for (its span less the backdating).
fn ttl_ms(m: &Membership) -> u64 {
    m.body
        .expires_at_ms
        .saturating_sub(m.body.issued_at_ms)
        .saturating_sub(crate::datadir::CLOCK_SKEW_MS)
        .max(1)
}

/// Renews this node's membership at half-life, for as long as the node
/// runs.
pub(crate) async fn renew_forever(shared: Arc<NodeShared>) {
    let signer = shared.identity.signer_addrs();
    let mut warned_no_signer = false;
    loop {
        let Some(held) = shared.membership() else {
            return;
        };
        let now = now_ms();
        let ttl = ttl_ms(&held);
        let check = Duration::from_millis((ttl / 10).clamp(200, 60_000));
        let left = held.body.expires_at_ms.saturating_sub(now);
        if left < ttl / 2 {
            match renew_once(&shared, &held, &signer).await {
                Ok(m) => {
                    tracing::info!(
                        expires_in_s = m.body.expires_at_ms.saturating_sub(now_ms()) / 1000,
                        "membership renewed"
                    );
                }
                Err(e) if signer.is_empty() && shared.identity.authority.is_none() => {
                    if !warned_no_signer {
                        tracing::warn!(error = %e, "membership cannot be renewed");
                        warned_no_signer = true;
                    }
                }
                Err(e) if left == 0 => tracing::error!(
                    error = %e,
                    "this node's membership expired and could not be renewed: members no \
                     longer route to it; ask the mesh's operator for a new invite \
                     (zavod mesh invite), then zavod node --join INVITE"
                ),
                Err(e) => tracing::warn!(
                    expires_in_s = left / 1000,
                    error = %e,
                    "membership renewal failed; trying again"
                ),
            }
        }
        tokio::time::sleep(check).await;
    }
}

async fn renew_once(
    shared: &NodeShared,
    held: &Membership,
    signer: &[String],
) -> Result<Membership, String> {
    let me = shared.identity.id();
    let fresh = if shared.identity.authority.is_some() {
        shared.identity.renew(held, me, now_ms())?
    } else if signer.is_empty() {
        return Err(
            "this data directory does not record the node that signed its membership (it \
             joined before renewals); it lasts until it expires"
                .into(),
        );
    } else {
        let timeout = Duration::from_millis(shared.config.limits.request_timeout_ms);
        let mut last = String::new();
        let mut got = None;
        for a in signer {
            let Ok(addr) = a.parse::<Multiaddr>() else {
                last = format!("{a}: not a multiaddr");
                continue;
            };
            match ask_signer(
                &shared.net,
                addr,
                &JoinRequest::Renew(held.clone()),
                timeout,
            )
            .await
            {
                Ok(JoinReply::Welcome { membership, .. }) => {
                    got = Some(membership);
                    break;
                }
                Ok(JoinReply::Refused(e)) => last = format!("{a}: {}", e.message),
                Err(e) => last = format!("{a}: {e}"),
            }
        }
        got.ok_or(last)?
    };
    if fresh.body.member != me
        || fresh
            .verify(&shared.identity.authorities, now_ms())
            .is_err()
        || fresh.body.expires_at_ms <= held.body.expires_at_ms
    {
        return Err("the signer sent a membership that does not verify or is no newer".into());
    }
    shared
        .identity
        .store_membership(&fresh)
        .map_err(|e| e.to_string())?;
    match shared.membership.write() {
        Ok(mut m) => *m = Some(fresh.clone()),
        Err(p) => *p.into_inner() = Some(fresh.clone()),
    }
    Ok(fresh)
}
