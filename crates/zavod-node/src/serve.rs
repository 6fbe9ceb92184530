//! Serving streams from the network.
//!
//! - chat (entry): read the request and hand it to [`crate::chat_entry`],
//!   which admits, assembles, places and then redirects, runs here or
//!   relays, by the rules of the entry machine in zavod-proto.
//! - run (target): check the grant (in the ModelWorker), generate, stream,
//!   and sign a receipt for the client and, over the actor session, a
//!   report for the entry that issued the grant.
//! - join: sign a membership for a node presenting this mesh's invite.
//! - status: the mesh as this node sees it.
//!
//! Every wait has a deadline; a peer that sends junk, stalls or leaves
//! only ever ends its own stream.

use crate::actors::breaker::BreakerMsg;
use crate::actors::model_worker::JobStream;
use crate::actors::router::{Admission, RouterMsg};
use crate::actors::{NodeShared, error_frame, unavailable};
use crate::chat_entry::{StreamClient, run_local, serve_entry};
use crate::clock::now_ms;
use libp2p::PeerId;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use zavod_engine::EngineEvent;
use zavod_net::{FrameReader, FrameStream, FrameWriter, NetError, node_id_of};
use zavod_proto::NodeId;
use zavod_proto::mesh::breaker::Outcome;
use zavod_proto::trust::{ReceiptBody, prompt_hash, sign_receipt};
use zavod_proto::wire::{
    ClientFrame, DoneInfo, ErrorCode, ErrorFrame, JoinReply, JoinRequest, RunReport, RunRequest,
    ServerFrame, StatusReply, StatusRequest,
};

/// Deadline for a reply from a local actor.
const ACTOR_CALL_MS: u64 = 10_000;

/// Which stream protocol a stream came in on.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Chat,
    Run,
    Join,
    Status,
    Embed,
}

/// Serves one inbound stream to completion.
pub async fn serve_stream(
    shared: Arc<NodeShared>,
    permits: Arc<Semaphore>,
    kind: Kind,
    peer: PeerId,
    stream: libp2p::Stream,
) {
    let limits = &shared.config.limits;
    let wt = Duration::from_millis(limits.write_timeout_ms);
    let (mut writer, mut reader) = FrameStream::new(stream, limits.max_frame_bytes).split();
    let Ok(_permit) = permits.try_acquire() else {
        let busy = error_frame(
            ErrorCode::NoCapacity,
            "this node is serving as many streams as it allows; try another node or later",
        );
        let _ = match kind {
            Kind::Join => writer.send(&JoinReply::Refused(busy), wt).await,
            Kind::Status => writer.send(&StatusReply::Refused(busy), wt).await,
            Kind::Chat | Kind::Run => writer.send(&ServerFrame::Error(busy), wt).await,
            Kind::Embed => {
                let reply = zavod_proto::wire::embed::EmbedReply::Refused(busy);
                writer.send(&reply, wt).await
            }
        };
        return;
    };
    let Some(remote) = node_id_of(&peer) else {
        let e = error_frame(ErrorCode::Unauthorized, "peers must use an ed25519 key");
        let _ = writer.send(&ServerFrame::Error(e), wt).await;
        return;
    };
    let first = Duration::from_millis(limits.request_timeout_ms);
    match kind {
        Kind::Chat => serve_chat(&shared, remote, &mut writer, &mut reader, first).await,
        Kind::Run => serve_run(&shared, remote, &mut writer, &mut reader, first).await,
        Kind::Join => serve_join(&shared, remote, &mut writer, &mut reader, first).await,
        Kind::Status => serve_status(&shared, remote, &mut writer, &mut reader, first).await,
        Kind::Embed => {
            crate::embed::serve_embed(&shared, remote, &mut writer, &mut reader, first).await
        }
    }
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

/// Where an entry or target sends what its client should see: a chat
/// stream, or a channel to the HTTP API.
pub(crate) trait Sink: Send {
    /// Sends a frame; an error means the client is gone.
    fn send(&mut self, frame: &ServerFrame) -> impl Future<Output = Result<(), ()>> + Send;

    /// Sends frames in order, together where the sink can (one flush).
    fn send_all(&mut self, frames: &[ServerFrame]) -> impl Future<Output = Result<(), ()>> + Send {
        async move {
            for f in frames {
                self.send(f).await?;
            }
            Ok(())
        }
    }
}

/// Tells when the client cancelled or left.
pub(crate) trait Watch: Send {
    /// Resolves once the client cancels or leaves; pending until then.
    fn cancelled(&mut self) -> impl Future<Output = ()> + Send;
}

struct WriterSink<'a> {
    writer: &'a mut FrameWriter,
    wt: Duration,
}

impl Sink for WriterSink<'_> {
    async fn send(&mut self, frame: &ServerFrame) -> Result<(), ()> {
        self.writer.send(frame, self.wt).await.map_err(|_| ())
    }

    async fn send_all(&mut self, frames: &[ServerFrame]) -> Result<(), ()> {
        self.writer.send_all(frames, self.wt).await.map_err(|_| ())
    }
}

struct ReaderWatch<'a> {
    reader: &'a mut FrameReader,
    half_closed: bool,
}

impl<'a> ReaderWatch<'a> {
    fn new(reader: &'a mut FrameReader) -> Self {
        ReaderWatch {
            reader,
            half_closed: false,
        }
    }
}

impl Watch for ReaderWatch<'_> {
    async fn cancelled(&mut self) {
        if !self.half_closed {
            match self.reader.recv::<ClientFrame>().await {
                // A half-close only says the client has nothing more to send.
                Ok(None) => self.half_closed = true,
                // Cancel, a reset stream or a protocol violation.
                Ok(Some(_)) | Err(_) => return,
            }
        }
        std::future::pending::<()>().await
    }
}

/// What a finished generation produced.
struct Streamed {
    answer: String,
    done: DoneInfo,
}

/// What a local run's events tell the node's metrics: queue wait, prompt
/// tokens by source, time to first token, gaps between tokens.
pub(crate) struct RunMetrics {
    started: tokio::time::Instant,
    last_token: Option<tokio::time::Instant>,
}

impl RunMetrics {
    pub(crate) fn start() -> Self {
        RunMetrics {
            started: tokio::time::Instant::now(),
            last_token: None,
        }
    }

    pub(crate) fn observe(&mut self, metrics: &crate::metrics::Metrics, ev: &EngineEvent) {
        match ev {
            EngineEvent::Started {
                prompt_tokens,
                cached_tokens,
            } => {
                metrics
                    .queue_wait
                    .observe(self.started.elapsed().as_secs_f64());
                let counted = |source| {
                    metrics
                        .prompt_tokens
                        .get_or_create(&crate::metrics::SourceLabels { source })
                };
                counted("cache").inc_by(u64::from(*cached_tokens));
                counted("computed").inc_by(u64::from(prompt_tokens.saturating_sub(*cached_tokens)));
            }
            EngineEvent::Tokens(tokens) => {
                let now = tokio::time::Instant::now();
                match self.last_token {
                    None => metrics
                        .time_to_first_token
                        .observe((now - self.started).as_secs_f64()),
                    Some(t) => {
                        // Tokens that leave together share the gap evenly.
                        let gap = (now - t).as_secs_f64() / tokens.len().max(1) as f64;
                        for _ in tokens {
                            metrics.inter_token.observe(gap);
                        }
                    }
                }
                self.last_token = Some(now);
                metrics.tokens_generated.inc_by(tokens.len() as u64);
            }
            EngineEvent::Done(_) | EngineEvent::Failed(_) => {}
        }
    }
}

/// Streams a local job's tokens to `sink` until it ends; the job is
/// cancelled when `watch` says the client cancelled or left, or a write
/// to it fails, and runs on to its end, so its receipt says what it
/// generated.
async fn stream_job(
    shared: &NodeShared,
    job: JobStream,
    sink: &mut impl Sink,
    watch: &mut impl Watch,
) -> Result<Streamed, ErrorFrame> {
    let stall = Duration::from_millis(shared.config.limits.stall_timeout_ms);
    let JobStream { mut events, cancel } = job;
    let mut answer = String::new();
    let mut watching = true;
    let mut sending = true;
    let mut observed = RunMetrics::start();
    loop {
        let ev = tokio::select! {
            ev = tokio::time::timeout(stall, events.recv()) => match ev {
                Ok(Some(ev)) => ev,
                Ok(None) => {
                    return Err(error_frame(ErrorCode::Internal, "the model worker stopped mid-answer"));
                }
                Err(_) => {
                    cancel.cancel();
                    return Err(error_frame(ErrorCode::Timeout, format!("no token for {} ms", stall.as_millis())));
                }
            },
            () = watch.cancelled(), if watching => {
                // Stop generating; the engine answers with Done(Cancelled).
                watching = false;
                cancel.cancel();
                continue;
            }
        };
        observed.observe(&shared.metrics, &ev);
        match ev {
            EngineEvent::Started { .. } => {}
            EngineEvent::Tokens(tokens) => {
                let frames: Vec<ServerFrame> = tokens
                    .into_iter()
                    .map(|t| {
                        answer.push_str(&t.text);
                        ServerFrame::Token {
                            index: t.index,
                            text: t.text,
                            id: t.id,
                        }
                    })
                    .collect();
                // Each batch leaves in one write: one wake-up of the client.
                if sending && sink.send_all(&frames).await.is_err() {
                    // The client left: stop generating, and still learn
                    // what was generated.
                    sending = false;
                    watching = false;
                    cancel.cancel();
                }
            }
            EngineEvent::Done(done) => return Ok(Streamed { answer, done }),
            EngineEvent::Failed(msg) => return Err(error_frame(ErrorCode::Internal, msg)),
        }
    }
}

async fn serve_chat(
    shared: &Arc<NodeShared>,
    client: NodeId,
    writer: &mut FrameWriter,
    reader: &mut FrameReader,
    first: Duration,
) {
    let wt = Duration::from_millis(shared.config.limits.write_timeout_ms);
    let request = match first_frame::<ClientFrame>(reader, first).await {
        Ok(Some(ClientFrame::Chat(r))) => *r,
        Ok(None) => return,
        Ok(Some(_)) => {
            let e = error_frame(
                ErrorCode::BadRequest,
                "a chat stream must start with a chat request",
            );
            let _ = writer.send(&ServerFrame::Error(e), wt).await;
            return;
        }
        Err(e) => {
            tracing::info!(client = %client.short(), message = %e.message, "refused a chat stream");
            let _ = writer.send(&ServerFrame::Error(e), wt).await;
            return;
        }
    };
    let mut side = StreamClient::new(writer, reader, wt);
    let result = serve_entry(shared, client, true, request, Vec::new(), &mut side).await;
    shared.metrics.request(
        "chat",
        match &result {
            Ok(()) => "ok",
            Err(e) => crate::metrics::outcome_of(e.code),
        },
    );
    if let Err(frame) = result {
        tracing::info!(client = %client.short(), code = ?frame.code, message = %frame.message, "chat refused or failed");
    }
}

async fn serve_run(
    shared: &Arc<NodeShared>,
    client: NodeId,
    writer: &mut FrameWriter,
    reader: &mut FrameReader,
    first: Duration,
) {
    let wt = Duration::from_millis(shared.config.limits.write_timeout_ms);
    let req = match first_frame::<RunRequest>(reader, first).await {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) => {
            let _ = writer.send(&ServerFrame::Error(e), wt).await;
            return;
        }
    };
    let request = req.grant.body.request;
    let issuer = req.grant.signer;
    let job = match run_local(
        shared,
        req.grant,
        Some(req.issuer_membership),
        client,
        &req.turns,
        &req.params,
    )
    .await
    {
        Ok(j) => j,
        Err(e) => {
            if matches!(e.code, ErrorCode::Internal | ErrorCode::Timeout) {
                record_outcome(shared, shared.identity.id(), Outcome::Failure);
            }
            tracing::info!(client = %client.short(), message = %e.message, "run refused");
            let _ = writer.send(&ServerFrame::Error(e), wt).await;
            return;
        }
    };
    let mut sink = WriterSink { writer, wt };
    let mut watch = ReaderWatch::new(reader);
    match stream_job(shared, job, &mut sink, &mut watch).await {
        Ok(Streamed { answer, mut done }) => {
            let receipt = sign_receipt(
                &shared.identity.key,
                ReceiptBody {
                    request,
                    client,
                    generated_tokens: done.generated_tokens,
                    answer_hash: prompt_hash(&answer),
                },
            );
            done.receipt = Some(receipt.clone());
            if issuer != shared.identity.id() && issuer != client {
                tokio::spawn(report_to_issuer(
                    Arc::clone(shared),
                    issuer,
                    RunReport {
                        request,
                        answer,
                        receipt,
                        prompt_tokens: done.prompt_tokens,
                        stop: done.stop,
                    },
                ));
            }
            let _ = sink.send(&ServerFrame::Done(done)).await;
        }
        Err(e) => {
            let _ = sink.send(&ServerFrame::Error(e)).await;
        }
    }
}

/// Tells the node that issued a grant how its request went, over the
/// actor session between the two nodes.
async fn report_to_issuer(shared: Arc<NodeShared>, issuer: NodeId, report: RunReport) {
    let Some(peer) = zavod_net::peer_id_of(&issuer) else {
        return;
    };
    let request = report.request;
    match shared.cluster.router_of(peer).await {
        Ok(router) => {
            if let Err(e) = router.cast(RouterMsg::Report(Box::new(report))) {
                tracing::info!(%request, issuer = %issuer.short(), error = %e, "report not sent");
            }
        }
        Err(e) => tracing::info!(%request, issuer = %issuer.short(), error = %e, "report not sent"),
    }
}

async fn serve_join(
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

async fn serve_status(
    shared: &Arc<NodeShared>,
    client: NodeId,
    writer: &mut FrameWriter,
    reader: &mut FrameReader,
    first: Duration,
) {
    let wt = Duration::from_millis(shared.config.limits.write_timeout_ms);
    let reply = match first_frame::<StatusRequest>(reader, first).await {
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
