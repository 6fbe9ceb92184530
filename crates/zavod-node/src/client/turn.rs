//! One chat turn, carried out: the request to the entry, the answer as it
//! streams (from the entry, or from the target it redirects to, with the
//! target failures the entry is told of), and, when the entry itself
//! fails, the turn going on through the next node the client knows:
//! sent again, continued after what had streamed, or kept with the
//! target's receipt. `zavod chat`, `zavod bench` and the tests all chat
//! through here.

use super::{Ask, ChatClient, ChatError, ChatEvent, ChatOutcome, REDIRECT_DIAL};
use crate::protocol::run_client::{RunBreak, RunFrame, RunStream};
use libp2p::{Multiaddr, PeerId};
use std::time::{Duration, Instant};
use zavod_net::{FrameStream, NetError};
use zavod_proto::chat::failover::{AnswerStream, OnFailure, ResumeRequest};
use zavod_proto::chat::reader::{EntryReader, Read};
use zavod_proto::limits::MAX_CLIENT_ENTRIES_PER_TURN;
use zavod_proto::wire::memory::{MemoryOp, MemoryReply};
use zavod_proto::wire::{
    Accepted, ChatRequest, ClientFrame, Continued, DoneInfo, ErrorCode, Redirect, ServerFrame,
};

/// How one entry's part of a turn ended, when it did not end well.
enum Broke {
    /// The entry failed (its stream broke, ended or went silent): the
    /// turn may go on through another node.
    Entry(ChatError),
    /// The entry failed after the whole answer streamed from its target,
    /// before it said the turn was kept: `done` is the target's.
    Whole {
        error: ChatError,
        done: Box<DoneInfo>,
    },
    /// The request failed for a reason another entry would not change.
    Failed(ChatError),
}

impl From<ChatError> for Broke {
    fn from(e: ChatError) -> Self {
        match e {
            ChatError::Net(_) | ChatError::Truncated => Broke::Entry(e),
            e => Broke::Failed(e),
        }
    }
}

impl From<NetError> for Broke {
    fn from(e: NetError) -> Self {
        Broke::Entry(e.into())
    }
}

impl ChatClient {
    /// Fetches a redirected answer from its target: dial, present the
    /// grant, stream. Tokens go to `on_event` as they arrive.
    async fn run_remote(
        &self,
        r: &Redirect,
        on_event: &mut impl FnMut(ChatEvent<'_>),
        progress: &mut Progress,
    ) -> Result<DoneInfo, ChatError> {
        let peer = zavod_net::peer_id_of(&r.target)
            .ok_or_else(|| ChatError::Protocol("redirect names an invalid node".into()))?;
        let mut reached = false;
        let mut why = String::from("the redirect has no address");
        for a in &r.addrs {
            match a.parse::<Multiaddr>() {
                Ok(addr) => match tokio::time::timeout(REDIRECT_DIAL, self.net.dial(addr)).await {
                    Ok(Ok(p)) if p == peer => {
                        reached = true;
                        break;
                    }
                    Ok(Ok(p)) => why = format!("{a} answered as {p}"),
                    Ok(Err(e)) => why = e.to_string(),
                    Err(_) => {
                        why = format!(
                            "{a}: no answer within {} s (a partition or a firewall between \
                             this client and the target)",
                            REDIRECT_DIAL.as_secs()
                        )
                    }
                },
                Err(e) => why = format!("{a}: {e}"),
            }
        }
        if !reached {
            return Err(ChatError::Net(NetError::Dial {
                addr: r.addrs.join(", "),
                reason: why,
            }));
        }
        let stream = self.net.open(peer, zavod_net::RUN_PROTOCOL).await?;
        let mut run = RunStream::start(stream, &r.run, self.frame_timeout).await?;
        on_event(ChatEvent::Direct { target: peer });
        progress.stream.start_source();
        loop {
            let wait = Duration::from_millis(progress.stream.wait_ms(
                self.frame_timeout.as_millis() as u64,
                self.stall_timeout.as_millis() as u64,
            ));
            match run.next(wait).await {
                RunFrame::Token(t) => {
                    progress.token(Source::Target, t.index, &t.text, t.id, on_event)?
                }
                RunFrame::Done(d) => return Ok(*d),
                RunFrame::Refused(e) => return Err(e.into()),
                RunFrame::Broken(RunBreak::Ended) => return Err(ChatError::Truncated),
                RunFrame::Broken(RunBreak::Net(e)) => return Err(e.into()),
                RunFrame::Broken(RunBreak::Unexpected) => {
                    return Err(ChatError::Protocol(
                        "unexpected frame from the target".into(),
                    ));
                }
                RunFrame::Silent { ms } => {
                    return Err(NetError::Timeout {
                        what: "waiting for the target's next token".into(),
                        ms,
                    }
                    .into());
                }
            }
        }
    }

    /// Sends one turn and streams the answer to `on_event`. `cancel`, when
    /// it resolves, asks the node to stop.
    ///
    /// When the entry fails (its stream breaks, ends early or goes silent)
    /// the turn goes on through the next node this client knows, at most
    /// [`MAX_CLIENT_ENTRIES_PER_TURN`] entries in all, under the same turn
    /// id: sent again if nothing had streamed, continued after what had
    /// (the new entry has the rest generated), or, when the whole answer
    /// had streamed from its target, kept with its receipt. The text the
    /// caller sees is the answer's, once.
    pub async fn chat(
        &self,
        ask: Ask,
        mut on_event: impl FnMut(ChatEvent<'_>),
        cancel: impl std::future::Future<Output = ()>,
    ) -> Result<ChatOutcome, ChatError> {
        let turn = match ask.turn {
            Some(t) => t,
            None => {
                let mut id = [0u8; 8];
                getrandom::fill(&mut id).map_err(|e| {
                    ChatError::Protocol(format!("no randomness for a turn id: {e}"))
                })?;
                u64::from_be_bytes(id)
            }
        };
        let mut request = ChatRequest {
            credential: self.identity.credential.clone(),
            model: ask.model,
            conversation: ask.conversation,
            message: ask.message,
            params: ask.params,
            show_prompt: ask.show_prompt,
            turn: Some(turn),
            continued: None,
        };
        let sent_at = Instant::now();
        let mut turn_state = TurnState {
            progress: Progress {
                stream: AnswerStream::new(zavod_proto::limits::MAX_CLIENT_RESUMES),
                first: None,
                last: sent_at,
            },
            accepted: None,
            cancelled: false,
        };
        tokio::pin!(cancel);
        let mut entries = 1;
        loop {
            let peer = self.peer();
            let broke = match self
                .chat_via(peer, &request, &mut turn_state, &mut on_event, &mut cancel)
                .await
            {
                Ok(done) => {
                    return turn_state
                        .progress
                        .outcome(turn_state.accepted, done, sent_at);
                }
                Err(b) => b,
            };
            let (error, whole) = match broke {
                Broke::Failed(e) => return Err(e),
                Broke::Entry(e) => (e, None),
                Broke::Whole { error, done } => (error, Some(done)),
            };
            if turn_state.cancelled || entries >= MAX_CLIENT_ENTRIES_PER_TURN {
                return Err(error);
            }
            entries += 1;
            let next = match self.reattach(peer).await {
                Ok(p) => p,
                Err(why) => {
                    return Err(ChatError::Protocol(format!(
                        "{error}; and no other node took the turn over: {why}"
                    )));
                }
            };
            // The new entry's view of the mesh is the one to fall back on
            // next.
            self.learn_peers().await;
            let reason = error.to_string();
            on_event(ChatEvent::Reattached {
                from: peer,
                to: next,
                reason: &reason,
                tokens: turn_state.progress.stream.tokens(),
            });
            if let Some(mut done) = whole {
                done.unrecorded = self.keep(&request, &turn_state, &done).await.err();
                return turn_state
                    .progress
                    .outcome(turn_state.accepted, *done, sent_at);
            }
            let stream = &turn_state.progress.stream;
            request.continued = (stream.tokens() > 0).then(|| Continued {
                answer: stream.text().to_owned(),
                tokens: stream.tokens(),
                ids: stream.ids().to_vec(),
            });
        }
    }

    /// Keeps a turn whose whole answer streamed from its target but whose
    /// entry failed before keeping it, through the node now attached.
    /// `Err`: why it is not kept, for the person to be told.
    async fn keep(
        &self,
        request: &ChatRequest,
        state: &TurnState,
        done: &DoneInfo,
    ) -> Result<(), String> {
        let (Some(conversation), Some(turn), Some(receipt)) = (
            request.conversation.clone(),
            request.turn,
            done.receipt.clone(),
        ) else {
            // A one-off answer has no conversation to keep it in.
            return Ok(());
        };
        let op = MemoryOp::Keep {
            conversation,
            turn,
            message: request.message.clone(),
            answer: state.progress.stream.text().to_owned(),
            receipt: Box::new(receipt),
        };
        match self.memory(op).await {
            Ok(MemoryReply::Kept { .. }) => Ok(()),
            Ok(other) => Err(format!(
                "the answer is whole, but its entry failed and the next node answered {other:?} \
                 when asked to keep the turn"
            )),
            Err(e) => Err(format!(
                "the answer is whole, but its entry failed before keeping the turn, and the next \
                 node could not keep it ({e}); the next turn will not see it"
            )),
        }
    }

    /// One entry's part of a turn: send the request to `peer` and stream
    /// what it (or a target it redirects to) answers, until `Done`.
    async fn chat_via(
        &self,
        peer: PeerId,
        request: &ChatRequest,
        state: &mut TurnState,
        on_event: &mut impl FnMut(ChatEvent<'_>),
        cancel: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> Result<DoneInfo, Broke> {
        let stream = self.net.open_chat(peer).await?;
        let (mut w, mut r) = stream_split(stream);
        w.send(
            &ClientFrame::Chat(Box::new(request.clone())),
            self.frame_timeout,
        )
        .await?;
        let mut reader = EntryReader::new(true);
        let progress = &mut state.progress;
        loop {
            let frame = tokio::select! {
                f = tokio::time::timeout(self.frame_timeout, r.recv::<ServerFrame>()) => f
                    .map_err(|_| NetError::Timeout { what: "waiting for the answer".into(), ms: self.frame_timeout.as_millis() as u64 })??,
                () = cancel.as_mut(), if !state.cancelled => {
                    state.cancelled = true;
                    w.send(&ClientFrame::Cancel, self.frame_timeout).await?;
                    continue;
                }
            };
            match reader.read(frame).map_err(ChatError::from)? {
                Read::Accepted { accepted: a, .. } => {
                    on_event(ChatEvent::Accepted(&a));
                    // The latest placement serves the answer; what the
                    // prompt was and recalled comes with the first.
                    let mut a = *a;
                    if let Some(first) = state.accepted.take() {
                        if a.prompt.is_none() {
                            a.prompt = first.prompt;
                        }
                        if a.recalled.is_empty() {
                            a.recalled = first.recalled;
                        }
                    }
                    state.accepted = Some(a);
                }
                Read::Redirect(redirect) => {
                    match self.run_remote(&redirect, on_event, progress).await {
                        Ok(mut done) => {
                            let receipt = done.receipt.clone().ok_or_else(|| {
                                Broke::Failed(ChatError::Protocol(
                                    "the target sent no receipt".into(),
                                ))
                            })?;
                            let finished = ClientFrame::Finished {
                                answer: progress.stream.text().to_owned(),
                                receipt: Box::new(receipt),
                            };
                            if let Err(e) = w.send(&finished, self.frame_timeout).await {
                                return Err(Broke::Whole {
                                    error: e.into(),
                                    done: Box::new(done),
                                });
                            }
                            // The entry closes the stream once the turn is
                            // recorded, or says first why it could not be;
                            // a stream that breaks instead leaves it unknown.
                            match tokio::time::timeout(self.frame_timeout, r.recv::<ServerFrame>())
                                .await
                            {
                                Ok(Ok(None)) => {}
                                Ok(Ok(Some(ServerFrame::Error(e)))) => {
                                    done.unrecorded = Some(e.message)
                                }
                                Ok(Ok(Some(_))) => {
                                    return Err(Broke::Failed(ChatError::Protocol(
                                        "a frame after the answer was done".into(),
                                    )));
                                }
                                Ok(Err(e)) => {
                                    return Err(Broke::Whole {
                                        error: e.into(),
                                        done: Box::new(done),
                                    });
                                }
                                Err(_) => {
                                    let error = NetError::Timeout {
                                        what: "waiting for the entry to keep the turn".into(),
                                        ms: self.frame_timeout.as_millis() as u64,
                                    };
                                    return Err(Broke::Whole {
                                        error: error.into(),
                                        done: Box::new(done),
                                    });
                                }
                            }
                            return Ok(done);
                        }
                        Err(e) => {
                            let decision = match &e {
                                ChatError::Refused {
                                    code: ErrorCode::NoCapacity,
                                    ..
                                } => progress.stream.on_full(),
                                ChatError::Refused { .. } => progress.stream.on_failure(true),
                                _ => progress.stream.on_failure(false),
                            };
                            let reason = e.to_string();
                            let frame = match decision {
                                // All its slots were busy: the entry places
                                // the answer elsewhere.
                                OnFailure::Full => {
                                    on_event(ChatEvent::Full { reason: &reason });
                                    ClientFrame::Full { reason }
                                }
                                // Not reachable from here: ask the entry to relay.
                                OnFailure::Relay => {
                                    on_event(ChatEvent::Relayed { reason: &reason });
                                    ClientFrame::Relay { reason }
                                }
                                // A target that died or stalled is replaced.
                                OnFailure::Resume(ResumeRequest {
                                    answer,
                                    tokens,
                                    ids,
                                }) => {
                                    on_event(ChatEvent::Resuming {
                                        reason: &reason,
                                        tokens,
                                    });
                                    ClientFrame::Resume {
                                        reason,
                                        answer,
                                        tokens,
                                        ids,
                                    }
                                }
                                OnFailure::GiveUp => return Err(Broke::Failed(e)),
                            };
                            w.send(&frame, self.frame_timeout).await?;
                        }
                    }
                }
                Read::Token { index, text: t, id } => {
                    progress.token(Source::Entry, index, &t, id, on_event)?
                }
                Read::Done(done) => return Ok(done),
            }
        }
    }
}

/// One turn's state across the entries it goes through.
struct TurnState {
    progress: Progress,
    accepted: Option<Accepted>,
    cancelled: bool,
}

/// Who a token came from: the entry counts in the whole answer, a target
/// from its own start.
#[derive(Clone, Copy)]
enum Source {
    Entry,
    Target,
}

/// The answer as it accumulates, from the entry or from a target, with
/// client-side timings.
struct Progress {
    stream: AnswerStream,
    first: Option<Instant>,
    last: Instant,
}

impl Progress {
    fn token(
        &mut self,
        source: Source,
        index: u32,
        text: &str,
        id: i32,
        on_event: &mut impl FnMut(ChatEvent<'_>),
    ) -> Result<(), ChatError> {
        let index = match source {
            Source::Entry => self.stream.on_token(index, text, id),
            Source::Target => self.stream.on_source_token(index, text, id),
        }
        .map_err(|e| ChatError::Protocol(e.to_string()))?;
        let now = Instant::now();
        self.first.get_or_insert(now);
        self.last = now;
        on_event(ChatEvent::Token { index, text });
        Ok(())
    }

    fn outcome(
        &self,
        accepted: Option<Accepted>,
        done: DoneInfo,
        sent_at: Instant,
    ) -> Result<ChatOutcome, ChatError> {
        let accepted = accepted
            .ok_or_else(|| ChatError::Protocol("answer finished before it was accepted".into()))?;
        let first = self.first.unwrap_or(self.last);
        Ok(ChatOutcome {
            accepted,
            text: self.stream.text().to_owned(),
            tokens: self.stream.tokens(),
            first_token: first - sent_at,
            decode: self.last - first,
            done,
        })
    }
}

fn stream_split(s: FrameStream) -> (zavod_net::FrameWriter, zavod_net::FrameReader) {
    s.split()
}
