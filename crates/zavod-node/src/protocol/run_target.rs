//! The run protocol, target side: check the grant (in the ModelWorker),
//! generate, stream the tokens, and sign a receipt for the client and,
//! over the actor session, a report for the entry that issued the grant.
//! A client that cancels or leaves stops the run; it still ends with a
//! receipt and report of what it generated.

use super::{first_frame, record_outcome};
use crate::actors::model_worker::JobStream;
use crate::actors::router::RouterMsg;
use crate::actors::{NodeShared, error_frame};
use crate::protocol::chat_entry::run_local;
use std::sync::Arc;
use std::time::Duration;
use zavod_engine::EngineEvent;
use zavod_net::{FrameReader, FrameWriter};
use zavod_proto::NodeId;
use zavod_proto::mesh::breaker::Outcome;
use zavod_proto::trust::{ReceiptBody, prompt_hash, sign_receipt};
use zavod_proto::wire::{
    ClientFrame, DoneInfo, ErrorCode, ErrorFrame, RunReport, RunRequest, ServerFrame,
};

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
            EngineEvent::Queued { ahead } => metrics.queue_ahead.observe(f64::from(*ahead)),
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
            EngineEvent::Queued { .. } | EngineEvent::Started { .. } => {}
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

pub(super) async fn serve_run(
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
        req.may_queue,
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
