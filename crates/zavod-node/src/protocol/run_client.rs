//! The run protocol, client side, as an entry uses it when it relays: open
//! a run stream to the target, send the granted request, and hand the
//! target's frames on; and the dial an entry makes to see for itself
//! whether a target a client gave up on is reachable.

use crate::actors::{NodeShared, error_frame};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use zavod_net::RUN_PROTOCOL;
use zavod_proto::NodeId;
use zavod_proto::chat::entry::RunToken;
use zavod_proto::wire::{ClientFrame, DoneInfo, ErrorCode, ErrorFrame, RunRequest, ServerFrame};

pub(crate) enum FetchEvent {
    Token(RunToken),
    Done(Box<DoneInfo>),
    /// The error, and whether the target answered with it.
    Failed(ErrorFrame, bool),
}

/// Runs a granted request on a remote target and hands its frames on;
/// `cancel` asks the target to stop (its end still comes back). Dropping
/// the receiver ends the stream, which cancels the run there.
pub(crate) async fn fetch(
    shared: Arc<NodeShared>,
    target: NodeId,
    addrs: Vec<String>,
    run: RunRequest,
    tx: mpsc::Sender<FetchEvent>,
    mut cancel: oneshot::Receiver<()>,
) {
    let limits = &shared.config.limits;
    let wt = Duration::from_millis(limits.write_timeout_ms);
    let stall = Duration::from_millis(limits.stall_timeout_ms);
    let failed = |code, m: String| FetchEvent::Failed(error_frame(code, m), false);
    let Some(peer) = zavod_net::peer_id_of(&target) else {
        let _ = tx
            .send(failed(
                ErrorCode::Internal,
                "the target has no peer id".into(),
            ))
            .await;
        return;
    };
    let addrs: Vec<libp2p::Multiaddr> = addrs
        .iter()
        .filter_map(|a| a.parse().ok())
        .map(|a| zavod_net::addr::split_peer(&a).0)
        .collect();
    shared.net.connect(peer, addrs);
    let stream = match shared.net.open(peer, RUN_PROTOCOL).await {
        Ok(s) => s,
        Err(e) => {
            let m = format!("cannot reach the target: {e}");
            let _ = tx.send(failed(ErrorCode::NoCapacity, m)).await;
            return;
        }
    };
    let (mut tw, mut tr) = stream.split();
    if let Err(e) = tw.send(&run, wt).await {
        let _ = tx
            .send(failed(ErrorCode::NoCapacity, format!("the target: {e}")))
            .await;
        return;
    }
    let mut cancelling = false;
    loop {
        let frame = tokio::select! {
            f = tokio::time::timeout(stall, tr.recv::<ServerFrame>()) => f,
            r = &mut cancel, if !cancelling => {
                cancelling = true;
                if r.is_ok() {
                    let _ = tw.send(&ClientFrame::Cancel, wt).await;
                }
                continue;
            }
        };
        let event = match frame {
            Ok(Ok(Some(ServerFrame::Token { index, text, id }))) => {
                FetchEvent::Token(RunToken { index, text, id })
            }
            Ok(Ok(Some(ServerFrame::Done(done)))) => FetchEvent::Done(Box::new(done)),
            Ok(Ok(Some(ServerFrame::Error(e)))) => FetchEvent::Failed(e, true),
            Ok(Ok(Some(_))) => failed(ErrorCode::Internal, "the target broke the protocol".into()),
            Ok(Ok(None)) | Ok(Err(_)) => {
                failed(ErrorCode::Internal, "the target dropped the stream".into())
            }
            Err(_) => failed(
                ErrorCode::Timeout,
                format!("the target was silent for {} ms", stall.as_millis()),
            ),
        };
        let end = !matches!(event, FetchEvent::Token(_));
        if tx.send(event).await.is_err() || end {
            return;
        }
    }
}

/// Whether this node can open a stream to `node` now (a client said it
/// failed; the entry takes no one's word for a peer's failure).
pub(crate) async fn reachable(shared: &NodeShared, node: NodeId) -> bool {
    let Some(peer) = zavod_net::peer_id_of(&node) else {
        return false;
    };
    let limit = Duration::from_millis(shared.config.limits.dial_timeout_ms);
    let open = shared.net.open(peer, zavod_net::STATUS_PROTOCOL);
    match tokio::time::timeout(limit, open).await {
        // Closed at once: the target sees a status stream with no
        // request, which ends it quietly.
        Ok(Ok(stream)) => {
            drop(stream);
            true
        }
        Ok(Err(e)) => {
            tracing::info!(target = %node.short(), error = %e, "the target a client gave up on is unreachable from here too");
            false
        }
        Err(_) => false,
    }
}
