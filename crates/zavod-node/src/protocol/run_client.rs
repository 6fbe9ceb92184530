//! The run protocol, client side: the one reader of a target's run stream
//! ([`RunStream`]), used by `zavod chat` after a redirect and by an entry
//! that relays ([`fetch`]); and the dial an entry makes to see for itself
//! whether a target a client gave up on is reachable.

use crate::actors::{NodeShared, error_frame};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use zavod_net::{FrameReader, FrameStream, FrameWriter, NetError, RUN_PROTOCOL};
use zavod_proto::NodeId;
use zavod_proto::chat::entry::RunToken;
use zavod_proto::wire::{ClientFrame, DoneInfo, ErrorCode, ErrorFrame, RunRequest, ServerFrame};

pub(crate) enum FetchEvent {
    Token(RunToken),
    Done(Box<DoneInfo>),
    /// The error, and whether the target answered with it.
    Failed(ErrorFrame, bool),
}

/// A run stream to a target, from the side that sent the granted request:
/// the one reader of a target's frames, for `zavod chat` following a
/// redirect and for an entry relaying.
pub(crate) struct RunStream {
    writer: FrameWriter,
    reader: FrameReader,
    write_timeout: Duration,
}

/// What came next on a run stream.
#[derive(Debug)]
pub(crate) enum RunFrame {
    Token(RunToken),
    Done(Box<DoneInfo>),
    /// The target answered with an error.
    Refused(ErrorFrame),
    /// The stream ended or broke before the end.
    Broken(RunBreak),
    /// Nothing came within the wait.
    Silent {
        ms: u64,
    },
}

#[derive(Debug)]
pub(crate) enum RunBreak {
    /// The target closed the stream without an end.
    Ended,
    /// A frame that has no place on a run stream.
    Unexpected,
    Net(NetError),
}

impl std::fmt::Display for RunBreak {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunBreak::Ended => f.write_str("the target dropped the stream"),
            RunBreak::Unexpected => f.write_str("the target broke the protocol"),
            RunBreak::Net(e) => write!(f, "the target's stream: {e}"),
        }
    }
}

impl RunStream {
    /// Sends the granted request on a fresh run stream.
    pub(crate) async fn start(
        stream: FrameStream,
        run: &RunRequest,
        write_timeout: Duration,
    ) -> Result<Self, NetError> {
        let (mut writer, reader) = stream.split();
        writer.send(run, write_timeout).await?;
        Ok(RunStream {
            writer,
            reader,
            write_timeout,
        })
    }

    /// The next thing the target sent, waiting at most `wait`.
    pub(crate) async fn next(&mut self, wait: Duration) -> RunFrame {
        match tokio::time::timeout(wait, self.reader.recv::<ServerFrame>()).await {
            Ok(Ok(Some(ServerFrame::Token { index, text, id }))) => {
                RunFrame::Token(RunToken { index, text, id })
            }
            Ok(Ok(Some(ServerFrame::Done(done)))) => RunFrame::Done(Box::new(done)),
            Ok(Ok(Some(ServerFrame::Error(e)))) => RunFrame::Refused(e),
            Ok(Ok(Some(_))) => RunFrame::Broken(RunBreak::Unexpected),
            Ok(Ok(None)) => RunFrame::Broken(RunBreak::Ended),
            Ok(Err(e)) => RunFrame::Broken(RunBreak::Net(e)),
            Err(_) => RunFrame::Silent {
                ms: wait.as_millis() as u64,
            },
        }
    }

    /// Asks the target to stop; its end (with a receipt) still follows.
    pub(crate) async fn cancel(&mut self) -> Result<(), NetError> {
        self.writer
            .send(&ClientFrame::Cancel, self.write_timeout)
            .await
    }
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
    let started = match shared.net.open(peer, RUN_PROTOCOL).await {
        Ok(s) => RunStream::start(s, &run, wt).await,
        Err(e) => Err(e),
    };
    let mut stream = match started {
        Ok(s) => s,
        Err(e) => {
            let m = format!("cannot reach the target: {e}");
            let _ = tx.send(failed(ErrorCode::NoCapacity, m)).await;
            return;
        }
    };
    let mut cancelling = false;
    loop {
        let frame = tokio::select! {
            f = stream.next(stall) => f,
            r = &mut cancel, if !cancelling => {
                cancelling = true;
                if r.is_ok() {
                    let _ = stream.cancel().await;
                }
                continue;
            }
        };
        let event = match frame {
            RunFrame::Token(t) => FetchEvent::Token(t),
            RunFrame::Done(done) => FetchEvent::Done(done),
            RunFrame::Refused(e) => FetchEvent::Failed(e, true),
            RunFrame::Broken(b) => failed(ErrorCode::Internal, b.to_string()),
            RunFrame::Silent { ms } => failed(
                ErrorCode::Timeout,
                format!("the target was silent for {ms} ms"),
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
