//! The client side of a chat: dial any node, send one request with the
//! credential, and receive the answer as it streams. Used by `zavod chat`,
//! `zavod bench` and the tests.

use crate::datadir::ClientIdentity;
use crate::protocol::run_client::{RunBreak, RunFrame, RunStream};
use libp2p::{Multiaddr, PeerId};
use std::time::{Duration, Instant};
use zavod_net::{FrameStream, NetConfig, NetError};
use zavod_proto::chat::failover::{AnswerStream, OnFailure, ResumeRequest};
use zavod_proto::chat::reader::{EntryReader, Read, ReadError};
use zavod_proto::ids::ConversationId;
use zavod_proto::wire::memory::{MemoryOp, MemoryReply, MemoryRequest};
use zavod_proto::wire::{
    Accepted, ChatRequest, ClientFrame, DoneInfo, ErrorCode, ErrorFrame, GenParams, Redirect,
    ServerFrame, StatusReply, StatusRequest,
};

/// Runs `fut` as a task on the runtime's worker thread and waits for it.
///
/// The client's network event loop runs on that worker; a chat polled from
/// the calling thread (`block_on`) instead would wake a second thread for
/// every token that arrives, and on a machine whose cores all run inference
/// each wake-up takes time from the model. `zavod chat` and the bench call
/// it alike.
pub fn on_worker<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    fut: impl std::future::Future<Output = T> + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    rt.block_on(rt.spawn(fut))
}

/// How long a client tries to reach the target a redirect names before it
/// asks its entry to relay. A connection takes a few round trips even
/// across continents; a target hidden by a partition or a firewall would
/// otherwise hold the first token for the whole dial timeout.
const REDIRECT_DIAL: Duration = Duration::from_secs(3);

/// How long a status request may take to be sent and answered.
const STATUS_WAIT: Duration = Duration::from_secs(10);

/// One request on the status protocol to `peer` over `net`: the one
/// client of that protocol for commands and clients (`None`: the node
/// closed the stream without answering).
async fn status_on(
    net: &zavod_net::Client,
    peer: PeerId,
    request: &StatusRequest,
) -> Result<Option<StatusReply>, ChatError> {
    let (mut w, mut r) = net.open(peer, zavod_net::STATUS_PROTOCOL).await?.split();
    w.send(request, STATUS_WAIT).await?;
    tokio::time::timeout(STATUS_WAIT, r.recv::<StatusReply>())
        .await
        .map_err(|_| ChatError::Protocol(format!("no answer within {} s", STATUS_WAIT.as_secs())))?
        .map_err(ChatError::from)
}

/// Dials the node at `addr` with `key` (and the mesh key, if any) and
/// asks it one status request: `zavod status`, `zavod mesh revoke` and
/// `zavod cap revoke`.
pub async fn ask_status(
    key: &zavod_proto::trust::Keypair,
    addr: Multiaddr,
    cfg: NetConfig,
    request: &StatusRequest,
) -> Result<Option<StatusReply>, ChatError> {
    let (net, mut events, event_loop) =
        zavod_net::new(zavod_net::identity_from_secret(key.secret_bytes())?, cfg)?;
    tokio::spawn(event_loop.run());
    tokio::spawn(async move { while events.recv().await.is_some() {} });
    let peer = net.dial(addr).await?;
    status_on(&net, peer, request).await
}

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("{0}")]
    Net(#[from] NetError),
    #[error("the node refused: {message} ({code:?})")]
    Refused { code: ErrorCode, message: String },
    #[error("the node closed the stream before the answer was complete")]
    Truncated,
    #[error("the node broke the protocol: {0}")]
    Protocol(String),
    #[error(
        "{peer} is not a member of the mesh your credential is from ({why}); nothing was sent \
         to it. Check --peer, or use a credential from that node's mesh"
    )]
    NotInMesh { peer: PeerId, why: String },
}

impl From<ReadError> for ChatError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Refused(e) => e.into(),
            ReadError::Ended => ChatError::Truncated,
            ReadError::Unexpected(what) => ChatError::Protocol(what.into()),
        }
    }
}

impl From<ErrorFrame> for ChatError {
    fn from(e: ErrorFrame) -> Self {
        ChatError::Refused {
            code: e.code,
            message: e.message,
        }
    }
}

/// What a streaming chat reports as it goes.
#[derive(Debug)]
pub enum ChatEvent<'a> {
    Accepted(&'a Accepted),
    /// The answer streams straight from the target node.
    Direct {
        target: PeerId,
    },
    /// The target was out of reach; the entry node relays the answer.
    Relayed {
        reason: &'a str,
    },
    /// The target's slots were all busy; the entry places the answer on
    /// another node.
    Full {
        reason: &'a str,
    },
    /// The target failed after `tokens` tokens; the rest comes from
    /// another node, placed by the entry.
    Resuming {
        reason: &'a str,
        tokens: u32,
    },
    Token {
        index: u32,
        text: &'a str,
    },
}

/// A finished answer, with client-side timings.
#[derive(Debug, Clone)]
pub struct ChatOutcome {
    pub accepted: Accepted,
    pub text: String,
    pub done: DoneInfo,
    pub tokens: u32,
    /// From sending the request to the first token arriving.
    pub first_token: Duration,
    /// From the first token to the last.
    pub decode: Duration,
}

impl ChatOutcome {
    pub fn decode_tokens_per_s(&self) -> f64 {
        if self.tokens > 1 && !self.decode.is_zero() {
            f64::from(self.tokens - 1) / self.decode.as_secs_f64()
        } else {
            0.0
        }
    }
}

/// A connected client. Clones share one connection.
#[derive(Clone)]
pub struct ChatClient {
    net: zavod_net::Client,
    peer: PeerId,
    identity: ClientIdentity,
    frame_timeout: Duration,
    /// Longest wait for the next token once an answer is streaming; a
    /// target silent this long is treated as failed.
    stall_timeout: Duration,
}

impl std::fmt::Debug for ChatClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChatClient(peer {})", self.peer)
    }
}

/// One chat turn to send.
#[derive(Debug, Clone, Default)]
pub struct Ask {
    pub message: String,
    pub model: Option<String>,
    pub conversation: Option<ConversationId>,
    pub params: GenParams,
    pub show_prompt: bool,
}

impl ChatClient {
    /// Starts a client swarm with the identity's key and connects to `addr`.
    pub async fn connect(
        identity: ClientIdentity,
        addr: Multiaddr,
        cfg: NetConfig,
    ) -> Result<Self, ChatError> {
        let secret = identity.key.secret_bytes();
        let (net, mut events, event_loop) =
            zavod_net::new(zavod_net::identity_from_secret(secret)?, cfg)?;
        tokio::spawn(event_loop.run());
        // Drain network events; a client needs none of them.
        tokio::spawn(async move { while events.recv().await.is_some() {} });
        let peer = net.dial(addr).await?;
        let client = ChatClient {
            net,
            peer,
            identity,
            frame_timeout: Duration::from_secs(120),
            stall_timeout: Duration::from_secs(10),
        };
        client.check_membership().await?;
        Ok(client)
    }

    /// Makes sure the node dialled is a member of the mesh whose authority
    /// signed this client's credential before the credential or any prompt
    /// goes to it: a node anyone can set up at an address the client was
    /// given would otherwise read every prompt.
    async fn check_membership(&self) -> Result<(), ChatError> {
        let not_in = |why: String| ChatError::NotInMesh {
            peer: self.peer,
            why,
        };
        let reply = status_on(&self.net, self.peer, &StatusRequest::Membership).await?;
        let cert = match reply {
            Some(StatusReply::Membership(m)) => m,
            Some(StatusReply::Refused(e)) => return Err(not_in(e.message)),
            Some(_) | None => {
                return Err(ChatError::Protocol(
                    "no membership certificate in the reply".into(),
                ));
            }
        };
        let authority = self.identity.credential.signer;
        let now = crate::clock::now_ms();
        let body = cert
            .verify(&[authority].into_iter().collect(), now)
            .map_err(|e| not_in(format!("its certificate: {e}")))?;
        match zavod_net::node_id_of(&self.peer) {
            Some(id) if id == body.member => Ok(()),
            _ => Err(not_in(
                "it showed another node's membership certificate".into(),
            )),
        }
    }

    pub fn peer(&self) -> PeerId {
        self.peer
    }

    /// One operation on this client's own conversations at the node (the
    /// memory protocol): list, export a page, delete.
    pub async fn memory(&self, op: MemoryOp) -> Result<MemoryReply, ChatError> {
        let t = Duration::from_secs(30);
        let (mut w, mut r) = self
            .net
            .open(self.peer, zavod_net::MEMORY_PROTOCOL)
            .await?
            .split();
        let request = MemoryRequest {
            credential: self.identity.credential.clone(),
            op,
        };
        w.send(&request, t).await?;
        let reply = tokio::time::timeout(t, r.recv::<MemoryReply>())
            .await
            .map_err(|_| ChatError::Protocol("no answer to a memory request within 30 s".into()))??
            .ok_or(ChatError::Truncated)?;
        if let MemoryReply::Refused(e) = reply {
            return Err(e.into());
        }
        reply.check().map_err(ChatError::Protocol)?;
        Ok(reply)
    }

    /// The underlying network handle (tests use it to play other roles).
    pub fn net(&self) -> &zavod_net::Client {
        &self.net
    }

    pub fn identity(&self) -> &ClientIdentity {
        &self.identity
    }

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
    pub async fn chat(
        &self,
        ask: Ask,
        mut on_event: impl FnMut(ChatEvent<'_>),
        cancel: impl std::future::Future<Output = ()>,
    ) -> Result<ChatOutcome, ChatError> {
        let stream = self.net.open_chat(self.peer).await?;
        let request = ChatRequest {
            credential: self.identity.credential.clone(),
            model: ask.model,
            conversation: ask.conversation,
            message: ask.message,
            params: ask.params,
            show_prompt: ask.show_prompt,
        };
        let (mut w, mut r) = stream_split(stream);
        let sent_at = Instant::now();
        w.send(&ClientFrame::Chat(Box::new(request)), self.frame_timeout)
            .await?;
        let mut reader = EntryReader::new(true);
        let mut accepted: Option<Accepted> = None;
        let mut progress = Progress {
            stream: AnswerStream::new(zavod_proto::limits::MAX_CLIENT_RESUMES),
            first: None,
            last: sent_at,
        };
        tokio::pin!(cancel);
        let mut cancelled = false;
        loop {
            let frame = tokio::select! {
                f = tokio::time::timeout(self.frame_timeout, r.recv::<ServerFrame>()) => f
                    .map_err(|_| NetError::Timeout { what: "waiting for the answer".into(), ms: self.frame_timeout.as_millis() as u64 })??,
                () = &mut cancel, if !cancelled => {
                    cancelled = true;
                    w.send(&ClientFrame::Cancel, self.frame_timeout).await?;
                    continue;
                }
            };
            match reader.read(frame)? {
                Read::Accepted { accepted: a, .. } => {
                    on_event(ChatEvent::Accepted(&a));
                    accepted = Some(*a);
                }
                Read::Redirect(redirect) => {
                    match self
                        .run_remote(&redirect, &mut on_event, &mut progress)
                        .await
                    {
                        Ok(mut done) => {
                            let receipt = done.receipt.clone().ok_or_else(|| {
                                ChatError::Protocol("the target sent no receipt".into())
                            })?;
                            w.send(
                                &ClientFrame::Finished {
                                    answer: progress.stream.text().to_owned(),
                                    receipt: Box::new(receipt),
                                },
                                self.frame_timeout,
                            )
                            .await?;
                            // The entry closes the stream once the turn is
                            // recorded, or says first why it could not be.
                            if let Ok(Ok(Some(ServerFrame::Error(e)))) =
                                tokio::time::timeout(self.frame_timeout, r.recv::<ServerFrame>())
                                    .await
                            {
                                done.unrecorded = Some(e.message);
                            }
                            return progress.outcome(accepted, done, sent_at);
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
                            match decision {
                                // All its slots were busy: the entry places
                                // the answer elsewhere.
                                OnFailure::Full => {
                                    let reason = e.to_string();
                                    on_event(ChatEvent::Full { reason: &reason });
                                    w.send(&ClientFrame::Full { reason }, self.frame_timeout)
                                        .await?;
                                }
                                // Not reachable from here: ask the entry to relay.
                                OnFailure::Relay => {
                                    let reason = e.to_string();
                                    on_event(ChatEvent::Relayed { reason: &reason });
                                    w.send(&ClientFrame::Relay { reason }, self.frame_timeout)
                                        .await?;
                                }
                                // A target that died or stalled is replaced.
                                OnFailure::Resume(ResumeRequest {
                                    answer,
                                    tokens,
                                    ids,
                                }) => {
                                    let reason = e.to_string();
                                    on_event(ChatEvent::Resuming {
                                        reason: &reason,
                                        tokens,
                                    });
                                    w.send(
                                        &ClientFrame::Resume {
                                            reason,
                                            answer,
                                            tokens,
                                            ids,
                                        },
                                        self.frame_timeout,
                                    )
                                    .await?;
                                }
                                OnFailure::GiveUp => return Err(e),
                            }
                        }
                    }
                }
                Read::Token { index, text: t, id } => {
                    progress.token(Source::Entry, index, &t, id, &mut on_event)?
                }
                Read::Done(done) => return progress.outcome(accepted, done, sent_at),
            }
        }
    }
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
