//! Serving one chat stream: read the request, then ask the Router to admit
//! it, the MemoryKeeper to assemble the prompt, the Router to place it and
//! mint a grant, and the ModelWorker to run it; stream the tokens back; on
//! completion record the turn (durably, before `Done` goes out), settle the
//! credential's reservation and tell the Breaker how it went.
//!
//! Every wait has a deadline; a client that sends junk, stalls or leaves
//! only ever ends its own stream.

use crate::actors::breaker::BreakerMsg;
use crate::actors::memory_keeper::{MemoryMsg, PreparedPrompt};
use crate::actors::model_worker::{JobStream, WorkerMsg};
use crate::actors::router::{Admission, Placement, RouterMsg, hash_prompt};
use crate::actors::{NodeShared, error_frame, unavailable};
use libp2p::PeerId;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use zavod_engine::EngineEvent;
use zavod_net::{FrameStream, FrameWriter, NetError, node_id_of};
use zavod_proto::NodeId;
use zavod_proto::breaker::Outcome;
use zavod_proto::prompt::{Role, Turn};
use zavod_proto::wire::{
    Accepted, ChatRequest, ClientFrame, ErrorCode, ErrorFrame, ServerFrame, StopReason,
};

/// Deadline for a reply from a local actor.
const ACTOR_CALL_MS: u64 = 10_000;

/// Serves one inbound chat stream to completion.
pub async fn serve_stream(
    shared: Arc<NodeShared>,
    permits: Arc<Semaphore>,
    peer: PeerId,
    stream: libp2p::Stream,
) {
    let limits = &shared.config.limits;
    let write_timeout = Duration::from_millis(limits.write_timeout_ms);
    let (mut writer, mut reader) = FrameStream::new(stream, limits.max_frame_bytes).split();
    let Ok(_permit) = permits.try_acquire() else {
        let _ = writer
            .send(
                &ServerFrame::Error(error_frame(
                    ErrorCode::NoCapacity,
                    "this node is serving as many streams as it allows; try another node or later",
                )),
                write_timeout,
            )
            .await;
        return;
    };
    let request_timeout = Duration::from_millis(limits.request_timeout_ms);
    let first = match tokio::time::timeout(request_timeout, reader.recv::<ClientFrame>()).await {
        Ok(r) => r,
        Err(_) => Err(NetError::Timeout {
            what: "waiting for the chat request".into(),
            ms: limits.request_timeout_ms,
        }),
    };
    let refusal = match (first, node_id_of(&peer)) {
        (Ok(Some(ClientFrame::Chat(r))), Some(client)) => Ok((*r, client)),
        (Ok(Some(ClientFrame::Chat(_))), None) => Err(error_frame(
            ErrorCode::Unauthorized,
            "clients must use an ed25519 key",
        )),
        (Ok(Some(ClientFrame::Cancel)), _) => Err(error_frame(
            ErrorCode::BadRequest,
            "a chat stream must start with a chat request",
        )),
        (Ok(None), _) => return,
        (Err(e), _) => Err(net_error_frame(e)),
    };
    let (request, client) = match refusal {
        Ok(v) => v,
        Err(frame) => {
            tracing::info!(%peer, message = %frame.message, "refused a chat stream");
            let _ = writer.send(&ServerFrame::Error(frame), write_timeout).await;
            let _ = writer.close().await;
            return;
        }
    };
    let result = run_chat(
        &shared,
        client,
        request,
        &mut writer,
        &mut reader,
        write_timeout,
    )
    .await;
    if let Err(frame) = result {
        tracing::info!(%peer, code = ?frame.code, message = %frame.message, "chat refused or failed");
        let _ = writer.send(&ServerFrame::Error(frame), write_timeout).await;
    }
    let _ = writer.close().await;
}

fn net_error_frame(e: NetError) -> ErrorFrame {
    match e {
        NetError::FrameTooLarge { .. } => error_frame(ErrorCode::FrameTooLarge, e.to_string()),
        NetError::Wire(w) => ErrorFrame::from(w),
        NetError::Timeout { .. } => error_frame(ErrorCode::Timeout, e.to_string()),
        other => error_frame(ErrorCode::BadRequest, other.to_string()),
    }
}

async fn call<M, T>(
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

/// A reservation that is settled exactly once, whatever path the request takes.
struct Reservation<'a> {
    shared: &'a NodeShared,
    admission: &'a Admission,
    used: u32,
    settled: bool,
}

impl Reservation<'_> {
    fn settle(&mut self) {
        if self.settled {
            return;
        }
        self.settled = true;
        if let Some(r) = self.shared.directory.get().router {
            let _ = r.cast(RouterMsg::Settle {
                credential_id: self.admission.credential_id,
                reserved: self.admission.max_tokens,
                used: self.used,
            });
        }
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.settle();
    }
}

fn record_outcome(shared: &NodeShared, node: NodeId, outcome: Outcome) {
    if let Some(b) = shared.directory.get().breaker {
        let _ = b.cast(BreakerMsg::Record { node, outcome });
    }
}

async fn run_chat(
    shared: &Arc<NodeShared>,
    client: NodeId,
    request: ChatRequest,
    writer: &mut FrameWriter,
    reader: &mut zavod_net::FrameReader,
    write_timeout: Duration,
) -> Result<(), ErrorFrame> {
    let show_prompt = request.show_prompt;
    let mut params = request.params.clone();
    let message = request.message.clone();
    let dir = &shared.directory;

    let admission: Admission = call(dir.get().router, "the router", |reply| RouterMsg::Admit {
        client,
        request: Box::new(request),
        reply,
    })
    .await??;
    let mut reservation = Reservation {
        shared,
        admission: &admission,
        used: 0,
        settled: false,
    };
    params.max_tokens = admission.max_tokens;

    let prepared: PreparedPrompt = call(dir.get().memory, "memory", |reply| MemoryMsg::Assemble {
        key: admission.conversation.clone(),
        message,
        answer_tokens: admission.max_tokens,
        reply,
    })
    .await??;

    let placement: Placement = call(dir.get().router, "the router", |reply| RouterMsg::Place {
        client,
        model: admission.model.clone(),
        prompt_hash: hash_prompt(&prepared.text),
        max_tokens: admission.max_tokens,
        reply,
    })
    .await??;

    let job: JobStream = match call(dir.get().worker, "the model worker", |reply| {
        WorkerMsg::Run {
            grant: Box::new(placement.grant.clone()),
            client,
            prompt: prepared.text.clone(),
            params,
            reply,
        }
    })
    .await
    {
        Ok(Ok(j)) => j,
        Ok(Err(e)) | Err(e) => {
            if matches!(e.code, ErrorCode::Internal | ErrorCode::Timeout) {
                record_outcome(shared, placement.target, Outcome::Failure);
            }
            return Err(e);
        }
    };

    let accepted = ServerFrame::Accepted(Box::new(Accepted {
        request: placement.grant.body.request,
        served_by: placement.target,
        model: admission.model.clone(),
        history_turns: prepared.history_turns,
        grant: placement.grant.clone(),
        prompt: show_prompt.then(|| prepared.text.clone()),
    }));
    let JobStream { mut events, cancel } = job;
    if let Err(e) = writer.send(&accepted, write_timeout).await {
        cancel.cancel();
        tracing::debug!(error = %e, "client left before the answer");
        return Ok(());
    }

    let stall = Duration::from_millis(shared.config.limits.stall_timeout_ms);
    let mut answer = String::new();
    let mut client_reading = true;
    loop {
        tokio::select! {
            ev = tokio::time::timeout(stall, events.recv()) => {
                let ev = match ev {
                    Ok(Some(ev)) => ev,
                    Ok(None) => {
                        record_outcome(shared, placement.target, Outcome::Failure);
                        return Err(error_frame(ErrorCode::Internal, "the model worker stopped mid-answer"));
                    }
                    Err(_) => {
                        cancel.cancel();
                        record_outcome(shared, placement.target, Outcome::Failure);
                        return Err(error_frame(ErrorCode::Timeout, format!("no token for {} ms", stall.as_millis())));
                    }
                };
                match ev {
                    EngineEvent::Started { .. } => {}
                    EngineEvent::Token { index, text } => {
                        reservation.used = index + 1;
                        answer.push_str(&text);
                        if writer.send(&ServerFrame::Token { index, text }, write_timeout).await.is_err() {
                            cancel.cancel();
                            return Ok(());
                        }
                    }
                    EngineEvent::Done(done) => {
                        reservation.used = done.generated_tokens;
                        record_outcome(shared, placement.target, Outcome::Success);
                        if done.stop != StopReason::Cancelled
                            && let Some(key) = admission.conversation.clone()
                        {
                            let turns = vec![
                                prepared.user_turn.clone(),
                                Turn { role: Role::Assistant, text: answer.clone(), tokens: done.generated_tokens },
                            ];
                            let recorded = call(dir.get().memory, "memory", |reply| MemoryMsg::Record {
                                key,
                                turns,
                                reply: Some(reply),
                            })
                            .await;
                            if let Err(e) | Ok(Err(e)) = recorded.map(|r| r.map_err(|m| error_frame(ErrorCode::Internal, m))) {
                                tracing::error!(message = %e.message, "turn not recorded");
                            }
                        }
                        reservation.settle();
                        let _ = writer.send(&ServerFrame::Done(done), write_timeout).await;
                        return Ok(());
                    }
                    EngineEvent::Failed(msg) => {
                        record_outcome(shared, placement.target, Outcome::Failure);
                        return Err(error_frame(ErrorCode::Internal, msg));
                    }
                }
            }
            frame = reader.recv::<ClientFrame>(), if client_reading => {
                client_reading = false;
                match frame {
                    // A half-close only says the client has nothing more to send.
                    Ok(None) => {}
                    // Cancel, a reset stream or a protocol violation: stop
                    // generating; the engine answers with Done(Cancelled).
                    Ok(Some(_)) | Err(_) => cancel.cancel(),
                }
            }
        }
    }
}
