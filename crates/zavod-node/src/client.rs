//! The client side of a chat: dial any node, send one request with the
//! credential, and receive the answer as it streams. Used by `zavod chat`,
//! `zavod bench` and the tests.

use crate::datadir::ClientIdentity;
use libp2p::{Multiaddr, PeerId};
use std::time::{Duration, Instant};
use zavod_net::{FrameStream, NetConfig, NetError};
use zavod_proto::ids::ConversationId;
use zavod_proto::wire::{
    Accepted, ChatRequest, ClientFrame, DoneInfo, ErrorCode, ErrorFrame, GenParams, ServerFrame,
};

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
    Token { index: u32, text: &'a str },
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

/// A connected client.
pub struct ChatClient {
    net: zavod_net::Client,
    peer: PeerId,
    identity: ClientIdentity,
    frame_timeout: Duration,
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
        Ok(ChatClient {
            net,
            peer,
            identity,
            frame_timeout: Duration::from_secs(120),
        })
    }

    pub fn peer(&self) -> PeerId {
        self.peer
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
        let mut accepted: Option<Accepted> = None;
        let mut text = String::new();
        let mut first: Option<Instant> = None;
        let mut last = sent_at;
        let mut next_index = 0u32;
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
            match frame {
                None => return Err(ChatError::Truncated),
                Some(ServerFrame::Accepted(a)) => {
                    on_event(ChatEvent::Accepted(&a));
                    accepted = Some(*a);
                }
                Some(ServerFrame::Token { index, text: t }) => {
                    if index != next_index {
                        return Err(ChatError::Protocol(format!(
                            "token {index} arrived, expected {next_index}"
                        )));
                    }
                    next_index += 1;
                    let now = Instant::now();
                    first.get_or_insert(now);
                    last = now;
                    on_event(ChatEvent::Token { index, text: &t });
                    text.push_str(&t);
                }
                Some(ServerFrame::Done(done)) => {
                    let accepted = accepted.ok_or_else(|| {
                        ChatError::Protocol("answer finished before it was accepted".into())
                    })?;
                    let first = first.unwrap_or(last);
                    return Ok(ChatOutcome {
                        accepted,
                        text,
                        tokens: next_index,
                        first_token: first - sent_at,
                        decode: last - first,
                        done,
                    });
                }
                Some(ServerFrame::Error(e)) => return Err(e.into()),
            }
        }
    }
}

fn stream_split(s: FrameStream) -> (zavod_net::FrameWriter, zavod_net::FrameReader) {
    s.split()
}
