//! Serving streams from the network.
//!
//! - chat (entry): read the request; the Router admits it, the MemoryKeeper
//!   assembles the prompt, the Router places it and mints a grant. If this
//!   node is the target, the ModelWorker runs it and tokens stream back
//!   here. Otherwise the client is redirected to the target with the grant
//!   and the prompt; it comes back with the answer and the target's signed
//!   receipt, or asks this node to relay when it cannot reach the target.
//!   Either way the turn is recorded (durably, before the client is told it
//!   is done), the credential's reservation is settled and the Breaker
//!   learns how the target did.
//! - run (target): check the grant (in the ModelWorker), generate, stream,
//!   and sign a receipt for the entry node.
//! - join: sign a membership for a node presenting this mesh's invite.
//! - status: the mesh as this node sees it.
//!
//! Every wait has a deadline; a peer that sends junk, stalls or leaves
//! only ever ends its own stream.

use crate::actors::breaker::BreakerMsg;
use crate::actors::memory_keeper::{MemoryMsg, PreparedPrompt};
use crate::actors::model_worker::{JobStream, WorkerMsg};
use crate::actors::router::{Admission, PlaceAsk, Placement, RouterMsg};
use crate::actors::{NodeShared, error_frame, unavailable};
use crate::clock::now_ms;
use libp2p::PeerId;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Semaphore, oneshot};
use zavod_engine::EngineEvent;
use zavod_net::{FrameReader, FrameStream, FrameWriter, NetError, RUN_PROTOCOL, node_id_of};
use zavod_proto::NodeId;
use zavod_proto::auth::{ReceiptBody, prompt_hash, sign_receipt};
use zavod_proto::breaker::{Fault, Outcome, fault_of};
use zavod_proto::failover::{ResumeRequest, Resumption};
use zavod_proto::prompt::{Role, Turn, affinity_key, run_hash};
use zavod_proto::wire::{
    Accepted, ChatRequest, ClientFrame, DoneInfo, ErrorCode, ErrorFrame, GenParams, JoinReply,
    JoinRequest, Redirect, RunReport, RunRequest, ServerFrame, StatusReply, StatusRequest,
    StopReason,
};

/// Deadline for a reply from a local actor.
const ACTOR_CALL_MS: u64 = 10_000;
/// Most targets that may fail one answer before the entry gives up on it
/// (each later one continues after what the failed ones streamed).
const RELAY_ATTEMPTS: usize = 3;
/// How long an entry that has the target's report still waits for the
/// client's own receipt before closing the stream.
const REPORT_GRACE_MS: u64 = 2_000;

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
                let reply = zavod_proto::embed::EmbedReply::Refused(busy);
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

/// Frames for an in-process client (the HTTP API).
pub(crate) struct ChannelSink {
    pub tx: tokio::sync::mpsc::Sender<ServerFrame>,
    pub wt: Duration,
}

impl Sink for ChannelSink {
    async fn send(&mut self, frame: &ServerFrame) -> Result<(), ()> {
        match tokio::time::timeout(self.wt, self.tx.send(frame.clone())).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(()),
        }
    }
}

/// An in-process client has left when it drops its receiver.
pub(crate) struct ChannelWatch(pub tokio::sync::mpsc::Sender<ServerFrame>);

impl Watch for ChannelWatch {
    async fn cancelled(&mut self) {
        self.0.closed().await
    }
}

/// What a finished generation produced.
struct Streamed {
    answer: String,
    done: DoneInfo,
}

/// Streams a local job's tokens to `sink` until it ends; the job is
/// cancelled when `watch` says the client cancelled or left.
async fn stream_job(
    shared: &NodeShared,
    job: JobStream,
    sink: &mut impl Sink,
    watch: &mut impl Watch,
) -> Result<Option<Streamed>, ErrorFrame> {
    let stall = Duration::from_millis(shared.config.limits.stall_timeout_ms);
    let JobStream { mut events, cancel } = job;
    let mut answer = String::new();
    let mut watching = true;
    let metrics = &shared.metrics;
    let started = tokio::time::Instant::now();
    let mut last_token: Option<tokio::time::Instant> = None;
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
        match ev {
            EngineEvent::Started {
                prompt_tokens,
                cached_tokens,
            } => {
                metrics.queue_wait.observe(started.elapsed().as_secs_f64());
                let counted = |source| {
                    metrics
                        .prompt_tokens
                        .get_or_create(&crate::metrics::SourceLabels { source })
                };
                counted("cache").inc_by(u64::from(cached_tokens));
                counted("computed").inc_by(u64::from(prompt_tokens.saturating_sub(cached_tokens)));
            }
            EngineEvent::Tokens(tokens) => {
                // Each batch leaves in one write: one wake-up of the client.
                let now = tokio::time::Instant::now();
                match last_token {
                    None => metrics
                        .time_to_first_token
                        .observe((now - started).as_secs_f64()),
                    Some(t) => {
                        // Tokens that leave together share the gap evenly.
                        let gap = (now - t).as_secs_f64() / tokens.len().max(1) as f64;
                        for _ in &tokens {
                            metrics.inter_token.observe(gap);
                        }
                    }
                }
                last_token = Some(now);
                metrics.tokens_generated.inc_by(tokens.len() as u64);
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
                if sink.send_all(&frames).await.is_err() {
                    // The client left; nothing more to deliver.
                    cancel.cancel();
                    return Ok(None);
                }
            }
            EngineEvent::Done(done) => return Ok(Some(Streamed { answer, done })),
            EngineEvent::Failed(msg) => return Err(error_frame(ErrorCode::Internal, msg)),
        }
    }
}

async fn record_turn(
    shared: &NodeShared,
    admission: &Admission,
    prepared: &PreparedPrompt,
    answer: &str,
    generated: u32,
) {
    let Some(key) = admission.conversation.clone() else {
        return;
    };
    let turns = vec![
        prepared.user_turn.clone(),
        Turn {
            role: Role::Assistant,
            text: answer.to_string(),
            tokens: generated,
        },
    ];
    let recorded = call(shared.directory.get().memory, "memory", |reply| {
        MemoryMsg::Record {
            key,
            turns,
            reply: Some(reply),
        }
    })
    .await;
    match recorded {
        Ok(Ok(())) => {}
        Ok(Err(m)) => tracing::error!(message = %m, "turn not recorded"),
        Err(e) => tracing::error!(message = %e.message, "turn not recorded"),
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
    let result = run_chat(shared, client, request, writer, reader).await;
    shared.metrics.request(
        "chat",
        match &result {
            Ok(()) => "ok",
            Err(e) => crate::metrics::outcome_of(e.code),
        },
    );
    if let Err(frame) = result {
        tracing::info!(client = %client.short(), code = ?frame.code, message = %frame.message, "chat refused or failed");
        let _ = writer.send(&ServerFrame::Error(frame), wt).await;
    }
}

async fn run_chat(
    shared: &Arc<NodeShared>,
    client: NodeId,
    request: ChatRequest,
    writer: &mut FrameWriter,
    reader: &mut FrameReader,
) -> Result<(), ErrorFrame> {
    let wt = Duration::from_millis(shared.config.limits.write_timeout_ms);
    let show_prompt = request.show_prompt;
    let dir = &shared.directory;
    let me = shared.identity.id();
    let Prepared {
        admission,
        params,
        prepared,
    } = admit_and_assemble(shared, client, request, Vec::new()).await?;
    let mut reservation = Reservation {
        shared,
        admission: &admission,
        used: None,
    };

    let placement = place(
        shared,
        client,
        &admission,
        &prepared.turns,
        &params,
        Vec::new(),
    )
    .await?;
    let accepted = |p: &Placement| {
        ServerFrame::Accepted(Box::new(Accepted {
            request: p.grant.body.request,
            served_by: p.target,
            model: admission.model.clone(),
            history_turns: prepared.history_turns,
            grant: p.grant.clone(),
            prompt: show_prompt
                .then(|| prepared.display(shared.model(&admission.model).map(|m| &**m))),
        }))
    };

    if placement.target == me {
        let job = run_local(shared, &placement, None, client, &prepared.turns, &params).await?;
        if writer.send(&accepted(&placement), wt).await.is_err() {
            job.cancel.cancel();
            return Ok(());
        }
        return finish_local(
            shared,
            &admission,
            &prepared,
            &placement,
            job,
            &Resumption::new(admission.max_tokens, RELAY_ATTEMPTS),
            &mut WriterSink { writer, wt },
            &mut ReaderWatch::new(reader),
            &mut reservation,
        )
        .await;
    }

    // Another node generates: send the client there.
    let membership = shared.identity.membership.clone().ok_or_else(|| {
        error_frame(
            ErrorCode::Internal,
            "this node has no membership to vouch for its grants",
        )
    })?;
    let redirect = |p: &Placement, turns: &[Turn], params: &GenParams| {
        ServerFrame::Redirect(Box::new(Redirect {
            target: p.target,
            addrs: p.addrs.clone(),
            run: RunRequest {
                grant: p.grant.clone(),
                issuer_membership: membership.clone(),
                turns: turns.to_vec(),
                params: params.clone(),
            },
        }))
    };
    // The target also reports to this node over the actor session, so the
    // turn is kept and the credential settled even if the client never
    // comes back with the receipt.
    let expect = |request| {
        let (tx, rx) = oneshot::channel();
        if let Some(router) = dir.get().router {
            let _ = router.cast(RouterMsg::Expect {
                request,
                tx,
                model: admission.model.clone(),
                prompt_bytes: prepared.text_bytes(),
            });
        }
        rx
    };
    let mut report_rx = expect(placement.grant.body.request);
    // Targets the client left while they may still be generating: each
    // is charged from its own report, whenever it comes.
    let mut abandoned = Abandoned {
        shared: Arc::clone(shared),
        credential_id: admission.credential_id,
        pending: Vec::new(),
    };
    if writer.send(&accepted(&placement), wt).await.is_err()
        || writer
            .send(&redirect(&placement, &prepared.turns, &params), wt)
            .await
            .is_err()
    {
        return Ok(());
    }
    let mut placement = placement;
    // What failed targets streamed before they died, and who they were.
    let mut so_far = Resumption::new(admission.max_tokens, RELAY_ATTEMPTS);
    // The answer may take as long as generating every allowed token.
    let wait = Duration::from_millis(shared.config.limits.stall_timeout_ms)
        + Duration::from_millis(u64::from(admission.max_tokens) * 1_000);
    let deadline = tokio::time::Instant::now() + wait;
    let mut recorded = false;
    let mut client_open = true;
    let mut report_open = true;
    while client_open || (report_open && !recorded) {
        tokio::select! {
            back = reader.recv::<ClientFrame>(), if client_open => match back {
                Ok(Some(ClientFrame::Finished { answer, receipt })) => {
                    if recorded {
                        // Already kept from the target's report; closing
                        // the stream tells the client.
                        return Ok(());
                    }
                    let bad = |m: String| error_frame(ErrorCode::BadRequest, m);
                    let tail = so_far
                        .tail_of(&answer)
                        .ok_or_else(|| bad("the answer does not begin with the part resumed from".into()))?;
                    let body = receipt
                        .verify(&placement.target, placement.grant.body.request, tail)
                        .map_err(|e| bad(format!("the receipt does not match the answer: {e}")))?;
                    let answered = Answered { target: placement.target, so_far: &so_far, tail, tail_tokens: body.generated_tokens, stop: None };
                    book_answer(shared, &admission, &prepared, answered, &mut reservation).await;
                    return Ok(());
                }
                Ok(Some(ClientFrame::Relay { reason })) if !recorded && so_far.tokens() == 0 => {
                    tracing::info!(target = %placement.target.short(), %reason, "client cannot reach the target; relaying");
                    abandoned.add(report_rx, &placement, 0, deadline);
                    return relay(
                        shared,
                        &admission,
                        &prepared,
                        &params,
                        &mut WriterSink { writer, wt },
                        &mut ReaderWatch::new(reader),
                        &mut reservation,
                    )
                    .await;
                }
                Ok(Some(ClientFrame::Resume { reason, answer, tokens, ids })) if !recorded => {
                    tracing::warn!(target = %placement.target.short(), %reason, tokens, "target failed mid-answer; resuming elsewhere");
                    let before = so_far.tokens();
                    so_far
                        .on_resume(placement.target, ResumeRequest { answer, tokens, ids })
                        .map_err(|e| error_frame(ErrorCode::BadRequest, format!("cannot resume this answer: {e}")))?;
                    // The client's word excludes the target from this
                    // answer only; its breaker counts what this node sees,
                    // and its work is charged from its own report.
                    check_target(shared, placement.target);
                    let claimed = so_far.tokens().saturating_sub(before);
                    let old_report = std::mem::replace(&mut report_rx, oneshot::channel().1);
                    abandoned.add(old_report, &placement, claimed, deadline);
                    let rest = so_far.params(&params);
                    let next = place(shared, client, &admission, &prepared.turns, &rest, so_far.exclude().to_vec()).await?;
                    if writer.send(&accepted(&next), wt).await.is_err() {
                        return Ok(());
                    }
                    if next.target == me {
                        // This node has the model: it finishes the answer.
                        let job = run_local(shared, &next, None, client, &prepared.turns, &rest).await?;
                        let mut sink = OffsetSink { inner: WriterSink { writer, wt }, base: so_far.tokens() };
                        return finish_local(
                            shared,
                            &admission,
                            &prepared,
                            &next,
                            job,
                            &so_far,
                            &mut sink,
                            &mut ReaderWatch::new(reader),
                            &mut reservation,
                        )
                        .await;
                    }
                    report_rx = expect(next.grant.body.request);
                    report_open = true;
                    if writer.send(&redirect(&next, &prepared.turns, &rest), wt).await.is_err() {
                        return Ok(());
                    }
                    placement = next;
                }
                // Cancelled, gone or a protocol slip: only the target's
                // report can still tell what was generated.
                _ => client_open = false,
            },
            report = &mut report_rx, if report_open && !recorded => match report {
                Ok(r) => match r.receipt.verify(&placement.target, placement.grant.body.request, &r.answer) {
                    Ok(body) => {
                        let answered = Answered { target: placement.target, so_far: &so_far, tail: &r.answer, tail_tokens: body.generated_tokens, stop: Some(r.stop) };
                        book_answer(shared, &admission, &prepared, answered, &mut reservation).await;
                        recorded = true;
                    }
                    Err(e) => {
                        tracing::warn!(target = %placement.target.short(), error = %e, "report with a bad receipt ignored");
                        report_open = false;
                    }
                },
                Err(_) => report_open = false,
            },
            _ = tokio::time::sleep_until(deadline) => break,
        }
        if recorded && client_open {
            // Give the client a moment to send its own receipt, then close.
            let grace = Duration::from_millis(REPORT_GRACE_MS);
            let _ = tokio::time::timeout(grace, reader.recv::<ClientFrame>()).await;
            return Ok(());
        }
    }
    // Neither the client nor the target reported: the reservation is
    // charged in full, since only the target knows what it generated.
    Ok(())
}

/// Reports still due from targets a client left mid-answer (by a Resume
/// or a Relay): when this entry is done with the request, a task waits for
/// them until the answer's deadline and charges the credential what each
/// target's receipt shows it generated beyond what the client claimed.
struct Abandoned {
    shared: Arc<NodeShared>,
    credential_id: [u8; 16],
    pending: Vec<AbandonedRun>,
}

struct AbandonedRun {
    report: oneshot::Receiver<RunReport>,
    target: NodeId,
    request: zavod_proto::RequestId,
    claimed: u32,
    deadline: tokio::time::Instant,
}

impl Abandoned {
    fn add(
        &mut self,
        report: oneshot::Receiver<RunReport>,
        placement: &Placement,
        claimed: u32,
        deadline: tokio::time::Instant,
    ) {
        self.pending.push(AbandonedRun {
            report,
            target: placement.target,
            request: placement.grant.body.request,
            claimed,
            deadline,
        });
    }
}

impl Drop for Abandoned {
    fn drop(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        if pending.is_empty() {
            return;
        }
        let shared = Arc::clone(&self.shared);
        let credential_id = self.credential_id;
        tokio::spawn(async move {
            for run in pending {
                let Ok(Ok(report)) = tokio::time::timeout_at(run.deadline, run.report).await else {
                    continue;
                };
                let Ok(body) = report
                    .receipt
                    .verify(&run.target, run.request, &report.answer)
                else {
                    continue;
                };
                let extra = body.generated_tokens.saturating_sub(run.claimed);
                if extra > 0
                    && let Some(router) = shared.directory.get().router
                {
                    tracing::info!(target = %run.target.short(), extra, "charging a run the client left mid-answer");
                    let _ = router.cast(RouterMsg::Charge {
                        credential_id,
                        tokens: extra,
                    });
                }
            }
        });
    }
}

/// A client says its target failed. The entry takes no one's word for a
/// peer's failure: it opens a stream to the target itself, and counts a
/// failure against its breaker only if that fails.
fn check_target(shared: &Arc<NodeShared>, target: NodeId) {
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        let Some(peer) = zavod_net::peer_id_of(&target) else {
            return;
        };
        let limit = Duration::from_millis(shared.config.limits.dial_timeout_ms);
        let open = shared.net.open(peer, zavod_net::STATUS_PROTOCOL);
        match tokio::time::timeout(limit, open).await {
            // Closed at once: the target sees a status stream with no
            // request, which ends it quietly.
            Ok(Ok(stream)) => drop(stream),
            Ok(Err(e)) => {
                tracing::info!(target = %target.short(), error = %e, "the target a client gave up on is unreachable from here too");
                record_outcome(&shared, target, Outcome::Failure);
            }
            Err(_) => record_outcome(&shared, target, Outcome::Failure),
        }
    });
}

/// Shifts token indices so a resumed answer goes on counting where the
/// failed node stopped.
struct OffsetSink<S> {
    inner: S,
    base: u32,
}

impl<S: Sink> Sink for &mut S {
    async fn send(&mut self, frame: &ServerFrame) -> Result<(), ()> {
        (**self).send(frame).await
    }

    async fn send_all(&mut self, frames: &[ServerFrame]) -> Result<(), ()> {
        (**self).send_all(frames).await
    }
}

impl<S> OffsetSink<S> {
    fn shift(&self, frame: &ServerFrame) -> ServerFrame {
        match frame {
            ServerFrame::Token { index, text, id } => ServerFrame::Token {
                index: index.saturating_add(self.base),
                text: text.clone(),
                id: *id,
            },
            other => other.clone(),
        }
    }
}

impl<S: Sink> Sink for OffsetSink<S> {
    async fn send(&mut self, frame: &ServerFrame) -> Result<(), ()> {
        let shifted = self.shift(frame);
        self.inner.send(&shifted).await
    }

    async fn send_all(&mut self, frames: &[ServerFrame]) -> Result<(), ()> {
        let shifted: Vec<ServerFrame> = frames.iter().map(|f| self.shift(f)).collect();
        self.inner.send_all(&shifted).await
    }
}

/// An answer that ended well: who generated its last part, what came
/// before it from failed nodes, that part's text and token count, and how
/// it ended (`None` when only the client's receipt tells).
struct Answered<'a> {
    target: NodeId,
    so_far: &'a Resumption,
    tail: &'a str,
    tail_tokens: u32,
    stop: Option<StopReason>,
}

/// Books a finished answer by the one rule, whichever way it finished
/// ([`Resumption::book`]): its last target succeeded, the credential is
/// charged every part, and the turn is kept whole unless cancelled.
async fn book_answer(
    shared: &NodeShared,
    admission: &Admission,
    prepared: &PreparedPrompt,
    a: Answered<'_>,
    reservation: &mut Reservation<'_>,
) -> zavod_proto::failover::Booking {
    record_outcome(shared, a.target, Outcome::Success);
    let booking = a.so_far.book(a.tail_tokens, a.stop);
    reservation.used = Some(booking.charged_tokens);
    if booking.record {
        let whole = a.so_far.whole(a.tail);
        record_turn(shared, admission, prepared, &whole, booking.answer_tokens).await;
    }
    booking
}

/// Books an answer this node streamed itself (see [`book_answer`]) and
/// tells the client it is done.
async fn complete(
    shared: &NodeShared,
    admission: &Admission,
    prepared: &PreparedPrompt,
    a: Answered<'_>,
    mut done: DoneInfo,
    reservation: &mut Reservation<'_>,
    sink: &mut impl Sink,
) {
    shared.learn_tokens(&admission.model, prepared.text_bytes(), done.prompt_tokens);
    let booking = book_answer(shared, admission, prepared, a, reservation).await;
    done.generated_tokens = booking.answer_tokens;
    let _ = sink.send(&ServerFrame::Done(done)).await;
}

/// Streams a job this node runs to the end and records the turn. `so_far`
/// is what failed nodes streamed before it (empty for a fresh answer): the
/// turn is recorded whole and the usage counts both parts.
#[allow(clippy::too_many_arguments)]
async fn finish_local(
    shared: &NodeShared,
    admission: &Admission,
    prepared: &PreparedPrompt,
    placement: &Placement,
    job: JobStream,
    so_far: &Resumption,
    sink: &mut impl Sink,
    watch: &mut impl Watch,
    reservation: &mut Reservation<'_>,
) -> Result<(), ErrorFrame> {
    match stream_job(shared, job, sink, watch).await {
        Ok(Some(Streamed { answer, done })) => {
            let finished = Answered {
                target: placement.target,
                so_far,
                tail: &answer,
                tail_tokens: done.generated_tokens,
                stop: Some(done.stop),
            };
            complete(
                shared,
                admission,
                prepared,
                finished,
                done,
                reservation,
                sink,
            )
            .await;
            Ok(())
        }
        Ok(None) => Ok(()),
        Err(e) => {
            record_outcome(shared, placement.target, Outcome::Failure);
            Err(e)
        }
    }
}

/// Serves a request from an in-process client (the HTTP API) with this
/// node as its entry: admitted, assembled and placed as a chat is, then run
/// here or fetched from the target and passed on (such a client cannot
/// dial the target itself). `supplied` is history the client sent with the
/// request. Frames go to `tx`, ending with `Done` or `Error`; dropping the
/// receiver cancels the request.
pub async fn serve_in_process(
    shared: Arc<NodeShared>,
    client: NodeId,
    request: ChatRequest,
    supplied: Vec<(Role, String)>,
    tx: tokio::sync::mpsc::Sender<ServerFrame>,
) -> Result<(), ErrorFrame> {
    let wt = Duration::from_millis(shared.config.limits.write_timeout_ms);
    let mut sink = ChannelSink { tx: tx.clone(), wt };
    let mut watch = ChannelWatch(tx);
    let result = in_process(&shared, client, request, supplied, &mut sink, &mut watch).await;
    if let Err(e) = &result {
        let _ = sink.send(&ServerFrame::Error(e.clone())).await;
    }
    result
}

async fn in_process(
    shared: &Arc<NodeShared>,
    client: NodeId,
    request: ChatRequest,
    supplied: Vec<(Role, String)>,
    sink: &mut ChannelSink,
    watch: &mut ChannelWatch,
) -> Result<(), ErrorFrame> {
    let Prepared {
        admission,
        params,
        prepared,
    } = admit_and_assemble(shared, client, request, supplied).await?;
    let mut reservation = Reservation {
        shared,
        admission: &admission,
        used: None,
    };
    relay(
        shared,
        &admission,
        &prepared,
        &params,
        sink,
        watch,
        &mut reservation,
    )
    .await
}

/// An admitted request with its prompt assembled.
struct Prepared {
    admission: Admission,
    params: GenParams,
    prepared: PreparedPrompt,
}

/// The entry's first steps for any client: the Router admits the request
/// (credential, scope, rate, budget reservation) and the MemoryKeeper
/// assembles its prompt. A prompt that cannot be assembled hands the
/// reservation back uncharged.
async fn admit_and_assemble(
    shared: &NodeShared,
    client: NodeId,
    request: ChatRequest,
    supplied: Vec<(Role, String)>,
) -> Result<Prepared, ErrorFrame> {
    let dir = &shared.directory;
    let mut params = request.params.clone();
    let message = request.message.clone();
    let admission: Admission = call(dir.get().router, "the router", |reply| RouterMsg::Admit {
        client,
        request: Box::new(request),
        reply,
    })
    .await??;
    params.max_tokens = admission.max_tokens;
    let assembled = call(dir.get().memory, "memory", |reply| MemoryMsg::Assemble {
        model: admission.model.clone(),
        key: admission.conversation.clone(),
        supplied,
        message,
        answer_tokens: admission.max_tokens,
        context_tokens: admission.context_tokens,
        reply,
    })
    .await
    .and_then(|r| r);
    match assembled {
        Ok(prepared) => Ok(Prepared {
            admission,
            params,
            prepared,
        }),
        Err(e) => {
            // Dropping it settles the reservation with nothing used.
            drop(Reservation {
                shared,
                admission: &admission,
                used: Some(0),
            });
            Err(e)
        }
    }
}

/// Places a request (excluding nodes that already failed it).
async fn place(
    shared: &NodeShared,
    client: NodeId,
    admission: &Admission,
    turns: &[Turn],
    params: &GenParams,
    exclude: Vec<NodeId>,
) -> Result<Placement, ErrorFrame> {
    call(shared.directory.get().router, "the router", |reply| {
        RouterMsg::Place {
            ask: PlaceAsk {
                client,
                model: admission.model.clone(),
                prompt_hash: run_hash(turns, params),
                max_tokens: admission.max_tokens,
                exclude,
                cache_scope: admission.credential_id,
                cache_key: affinity_key(&admission.credential_id, &admission.model, turns),
            },
            reply,
        }
    })
    .await?
}

async fn run_local(
    shared: &NodeShared,
    placement: &Placement,
    issuer_membership: Option<zavod_proto::auth::Membership>,
    client: NodeId,
    turns: &[Turn],
    params: &GenParams,
) -> Result<JobStream, ErrorFrame> {
    let worker = shared
        .model_index(&placement.grant.body.model)
        .and_then(|i| shared.directory.get().workers.get(&i).cloned());
    let r = call(worker, "the model worker", |reply| WorkerMsg::Run {
        grant: Box::new(placement.grant.clone()),
        issuer_membership: issuer_membership.map(Box::new),
        client,
        turns: turns.to_vec(),
        params: Box::new(params.clone()),
        reply,
    })
    .await;
    match r {
        Ok(Ok(j)) => Ok(j),
        Ok(Err(e)) | Err(e) => {
            if matches!(e.code, ErrorCode::Internal | ErrorCode::Timeout) {
                record_outcome(shared, placement.target, Outcome::Failure);
            }
            Err(e)
        }
    }
}

/// Fetches the answer on the client's behalf, replacing up to
/// [`RELAY_ATTEMPTS`] targets that fail (continuing after what they
/// streamed).
#[allow(clippy::too_many_arguments)]
async fn relay(
    shared: &Arc<NodeShared>,
    admission: &Admission,
    prepared: &PreparedPrompt,
    params: &GenParams,
    sink: &mut impl Sink,
    watch: &mut impl Watch,
    reservation: &mut Reservation<'_>,
) -> Result<(), ErrorFrame> {
    let me = shared.identity.id();
    // What earlier targets streamed before they failed: the next one
    // continues from there.
    let mut so_far = Resumption::new(admission.max_tokens, RELAY_ATTEMPTS);
    // Once a target failed, its error says more than "no other node".
    let mut last_err: Option<ErrorFrame> = None;
    loop {
        // The same as `params` until a target fails mid-answer.
        let run = so_far.params(params);
        // A fresh grant bound to this node, which now acts as the client.
        // The client's unreachable target stays eligible: this node may
        // well reach it.
        let placement = match place(
            shared,
            me,
            admission,
            &prepared.turns,
            &run,
            so_far.exclude().to_vec(),
        )
        .await
        {
            Ok(p) => p,
            Err(e) => return Err(last_err.unwrap_or(e)),
        };
        let target = placement.target;
        // Tell the client which node really answers now.
        let now_serving = ServerFrame::Accepted(Box::new(Accepted {
            request: placement.grant.body.request,
            served_by: target,
            model: admission.model.clone(),
            history_turns: prepared.history_turns,
            grant: placement.grant.clone(),
            prompt: None,
        }));
        if sink.send(&now_serving).await.is_err() {
            return Ok(());
        }
        let mut shifted = OffsetSink {
            inner: &mut *sink,
            base: so_far.tokens(),
        };
        if target == me {
            let job = run_local(shared, &placement, None, me, &prepared.turns, &run).await?;
            return finish_local(
                shared,
                admission,
                prepared,
                &placement,
                job,
                &so_far,
                &mut shifted,
                watch,
                reservation,
            )
            .await;
        }
        match fetch_remote(
            shared,
            &placement,
            &prepared.turns,
            &run,
            &mut shifted,
            watch,
        )
        .await
        {
            Ok(Fetched::Done {
                answer,
                done,
                receipt_tokens,
            }) => {
                let finished = Answered {
                    target,
                    so_far: &so_far,
                    tail: &answer,
                    tail_tokens: receipt_tokens,
                    stop: Some(done.stop),
                };
                complete(
                    shared,
                    admission,
                    prepared,
                    finished,
                    *done,
                    reservation,
                    sink,
                )
                .await;
                return Ok(());
            }
            Ok(Fetched::ClientGone) => return Ok(()),
            Err(failed) => {
                let fault = failed.fault();
                let Failed {
                    error,
                    tokens,
                    answer,
                    ids,
                    ..
                } = failed;
                match fault {
                    // The target refused the request itself (bad input,
                    // over budget): the client's answer, and no one's
                    // fault; another target would refuse it too.
                    Fault::Request if tokens == 0 => return Err(error),
                    Fault::Request | Fault::Busy => {}
                    Fault::Target => record_outcome(shared, target, Outcome::Failure),
                }
                tracing::warn!(target = %target.short(), error = %error.message, tokens, "relay attempt failed");
                if let Err(why) = so_far.on_fetch_failed(target, &answer, &ids) {
                    tracing::warn!(error = %why, "relay gives up");
                    return Err(error);
                }
                last_err = Some(error);
            }
        }
    }
}

/// How a remote run failed, and what it had streamed by then.
struct Failed {
    error: ErrorFrame,
    /// The target answered with this error (to be sorted by `fault_of`);
    /// otherwise this node saw the fault itself (no connection, stall,
    /// broken stream or receipt).
    from_target: bool,
    tokens: u32,
    answer: String,
    ids: Vec<i32>,
}

impl Failed {
    fn fault(&self) -> Fault {
        if self.from_target {
            fault_of(self.error.code)
        } else {
            Fault::Target
        }
    }
}

enum Fetched {
    Done {
        answer: String,
        done: Box<DoneInfo>,
        receipt_tokens: u32,
    },
    ClientGone,
}

/// Runs a granted request on a remote target and forwards its tokens.
async fn fetch_remote(
    shared: &NodeShared,
    placement: &Placement,
    turns: &[Turn],
    params: &GenParams,
    sink: &mut impl Sink,
    watch: &mut impl Watch,
) -> Result<Fetched, Failed> {
    let wt = Duration::from_millis(shared.config.limits.write_timeout_ms);
    let stall = Duration::from_millis(shared.config.limits.stall_timeout_ms);
    let fail = |code, m: String| Failed {
        error: error_frame(code, m),
        from_target: false,
        tokens: 0,
        answer: String::new(),
        ids: Vec::new(),
    };
    let peer = zavod_net::peer_id_of(&placement.target)
        .ok_or_else(|| fail(ErrorCode::Internal, "target has no peer id".into()))?;
    let addrs: Vec<libp2p::Multiaddr> = placement
        .addrs
        .iter()
        .filter_map(|a| a.parse().ok())
        .map(|a| zavod_net::addr::split_peer(&a).0)
        .collect();
    shared.net.connect(peer, addrs);
    let membership = shared
        .identity
        .membership
        .clone()
        .ok_or_else(|| fail(ErrorCode::Internal, "no membership".into()))?;
    let stream = shared.net.open(peer, RUN_PROTOCOL).await.map_err(|e| {
        fail(
            ErrorCode::NoCapacity,
            format!("cannot reach the target: {e}"),
        )
    })?;
    let (mut tw, mut tr) = stream.split();
    tw.send(
        &RunRequest {
            grant: placement.grant.clone(),
            issuer_membership: membership,
            turns: turns.to_vec(),
            params: params.clone(),
        },
        wt,
    )
    .await
    .map_err(|e| fail(ErrorCode::NoCapacity, format!("target: {e}")))?;
    let mut answer = String::new();
    let mut ids = Vec::new();
    let mut sent = 0u32;
    let mut from_target = false;
    let error = loop {
        let frame = tokio::select! {
            f = tokio::time::timeout(stall, tr.recv::<ServerFrame>()) => f,
            // Dropping the target's stream cancels the run there.
            () = watch.cancelled() => return Ok(Fetched::ClientGone),
        };
        match frame {
            Ok(Ok(Some(ServerFrame::Token { index, text, id }))) => {
                answer.push_str(&text);
                ids.push(id);
                if sink
                    .send(&ServerFrame::Token { index, text, id })
                    .await
                    .is_err()
                {
                    return Ok(Fetched::ClientGone);
                }
                sent += 1;
            }
            Ok(Ok(Some(ServerFrame::Done(done)))) => {
                let receipt = done.receipt.as_ref().map(|r| {
                    r.verify(&placement.target, placement.grant.body.request, &answer)
                        .map(|b| b.generated_tokens)
                });
                match receipt {
                    Some(Ok(receipt_tokens)) => {
                        return Ok(Fetched::Done {
                            answer,
                            done: Box::new(done),
                            receipt_tokens,
                        });
                    }
                    Some(Err(e)) => {
                        break error_frame(ErrorCode::Internal, format!("target receipt: {e}"));
                    }
                    None => break error_frame(ErrorCode::Internal, "target sent no receipt"),
                }
            }
            Ok(Ok(Some(ServerFrame::Error(error)))) => {
                from_target = true;
                break error;
            }
            Ok(Ok(Some(_))) => {
                break error_frame(ErrorCode::Internal, "target broke the protocol");
            }
            Ok(Ok(None)) | Ok(Err(_)) => {
                break error_frame(ErrorCode::Internal, "the target dropped the stream");
            }
            Err(_) => {
                break error_frame(
                    ErrorCode::Timeout,
                    format!("target silent for {} ms", stall.as_millis()),
                );
            }
        }
    };
    Err(Failed {
        error,
        from_target,
        tokens: sent,
        answer,
        ids,
    })
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
    let placement = Placement {
        target: shared.identity.id(),
        addrs: Vec::new(),
        grant: req.grant,
        score: 0.0,
        cache_hit: false,
        in_flight: None,
    };
    let job = match run_local(
        shared,
        &placement,
        Some(req.issuer_membership),
        client,
        &req.turns,
        &req.params,
    )
    .await
    {
        Ok(j) => j,
        Err(e) => {
            tracing::info!(client = %client.short(), message = %e.message, "run refused");
            let _ = writer.send(&ServerFrame::Error(e), wt).await;
            return;
        }
    };
    let mut sink = WriterSink { writer, wt };
    let mut watch = ReaderWatch::new(reader);
    match stream_job(shared, job, &mut sink, &mut watch).await {
        Ok(Some(Streamed { answer, mut done })) => {
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
        Ok(None) => {}
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
