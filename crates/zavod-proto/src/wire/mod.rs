//! Wire messages and their encoding.
//!
//! Every frame is a protocol version (bincode varint `u16`) followed by the
//! bincode 2 encoding of the message, decoded under [`MAX_FRAME_BYTES`] so a
//! peer cannot make us allocate more than that. Decoding rejects unknown
//! versions, trailing bytes and malformed data with a [`WireError`]; it never
//! panics. Framing (the length prefix) is the network shell's job.
//!
//! Why this file passes 600 lines: every frame of the chat, run, join and
//! status protocols with their one codec; a fifth is tests.

pub mod embed;
pub mod memory;
pub mod replica;

use crate::UnixMs;
use crate::ids::{ConversationId, NodeId, RequestId};
use crate::limits::{
    MAX_FRAME_BYTES, MAX_GRAMMAR_BYTES, MAX_LOGIT_BIAS, MAX_MESSAGE_BYTES, MAX_STOP_BYTES,
    MAX_STOP_SEQUENCES, MAX_TOKENS_PER_REQUEST,
};
use crate::mesh::capacity::ModelOffer;
use crate::trust::{Credential, Grant, JoinTicket, Membership, OperatorProof, Receipt, Revocation};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;

type Config = bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_FRAME_BYTES>,
>;

fn config() -> Config {
    bincode::config::standard().with_limit::<MAX_FRAME_BYTES>()
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame of {0} bytes is over the {MAX_FRAME_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("peer speaks protocol version {0}, this node speaks {PROTOCOL_VERSION}")]
    UnsupportedVersion(u16),
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("frame has {0} unexpected trailing bytes")]
    TrailingBytes(usize),
}

/// Encodes a message with the protocol version in front.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, WireError> {
    let mut out = bincode::serde::encode_to_vec(PROTOCOL_VERSION, config())
        .map_err(|e| WireError::Malformed(e.to_string()))?;
    let body = bincode::serde::encode_to_vec(msg, config())
        .map_err(|e| WireError::Malformed(e.to_string()))?;
    out.extend_from_slice(&body);
    if out.len() > MAX_FRAME_BYTES {
        return Err(WireError::TooLarge(out.len()));
    }
    Ok(out)
}

/// Decodes a versioned message; see the module docs for what is refused.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    if bytes.len() > MAX_FRAME_BYTES {
        return Err(WireError::TooLarge(bytes.len()));
    }
    let (version, used): (u16, usize) = bincode::serde::decode_from_slice(bytes, config())
        .map_err(|e| WireError::Malformed(format!("no version: {e}")))?;
    if version != PROTOCOL_VERSION {
        return Err(WireError::UnsupportedVersion(version));
    }
    decode_unversioned(&bytes[used..])
}

/// Bincode without the version prefix, for documents that carry their own
/// prefix (credential text) or are signed.
pub fn encode_unversioned<T: Serialize>(msg: &T) -> Vec<u8> {
    // Our documents are far below the limit and have no failing serializers.
    bincode::serde::encode_to_vec(msg, config()).unwrap_or_default()
}

pub fn decode_unversioned<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    let (msg, used): (T, usize) =
        bincode::serde::decode_from_slice(bytes, config()).map_err(|e| match e {
            bincode::error::DecodeError::LimitExceeded => WireError::TooLarge(bytes.len()),
            other => WireError::Malformed(other.to_string()),
        })?;
    if used != bytes.len() {
        return Err(WireError::TrailingBytes(bytes.len() - used));
    }
    Ok(msg)
}

/// How to sample. Temperature 0 means greedy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenParams {
    pub temperature: f32,
    /// Sample only among this many most likely tokens (0: all), as
    /// llama.cpp's server does by default; it also spares sorting the
    /// whole vocabulary at every token.
    pub top_k: u32,
    pub top_p: f32,
    pub seed: u64,
    pub max_tokens: u32,
    /// Keep generating past end-of-generation tokens (benchmarks only).
    pub ignore_eos: bool,
    /// Continue the turns' text as is, without the chat template (plain
    /// completions).
    pub raw: bool,
    /// Generation ends where the answer's text first contains one of
    /// these, which is not sent (see `zavod_engine::stops`).
    pub stop: Vec<String>,
    /// A GBNF grammar (llama.cpp's format, rule `root`) the answer must
    /// follow: how JSON output is asked for.
    pub grammar: Option<String>,
    /// OpenAI's penalties on tokens already in the answer: the presence
    /// penalty once per token seen, the frequency penalty per occurrence
    /// (both -2 to 2; 0 is off).
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Added to the logits of the given token ids (-100 to 100).
    pub logit_bias: Vec<(i32, f32)>,
    /// Token ids of the answer so far, streamed by a node that then
    /// failed: generation continues after them rather than starting anew.
    /// Ids, not text, so the continuation sees exactly what the failed
    /// node saw (same model, same vocabulary).
    pub resume_tokens: Vec<i32>,
}

impl Default for GenParams {
    fn default() -> Self {
        GenParams {
            temperature: 0.7,
            top_k: DEFAULT_TOP_K,
            top_p: 0.95,
            seed: 0,
            max_tokens: 256,
            ignore_eos: false,
            raw: false,
            stop: Vec::new(),
            grammar: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            resume_tokens: Vec::new(),
        }
    }
}

/// Tokens sampling keeps by default ([`GenParams::top_k`]).
pub const DEFAULT_TOP_K: u32 = 40;
/// The most tokens `top_k` may keep.
pub const MAX_TOP_K: u32 = 1 << 20;

impl GenParams {
    /// Checks ranges; the error names the field.
    pub fn check(&self) -> Result<(), String> {
        if self.top_k > MAX_TOP_K {
            return Err(format!(
                "top_k must be at most {MAX_TOP_K}, got {}",
                self.top_k
            ));
        }
        if !self.temperature.is_finite() || !(0.0..=5.0).contains(&self.temperature) {
            return Err(format!(
                "temperature must be between 0 and 5, got {}",
                self.temperature
            ));
        }
        if !self.top_p.is_finite() || self.top_p <= 0.0 || self.top_p > 1.0 {
            return Err(format!(
                "top_p must be above 0 and at most 1, got {}",
                self.top_p
            ));
        }
        if self.stop.len() > MAX_STOP_SEQUENCES {
            return Err(format!(
                "stop may hold at most {MAX_STOP_SEQUENCES} sequences, got {}",
                self.stop.len()
            ));
        }
        if let Some(s) = self.stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
            return Err(format!(
                "stop sequences may be at most {MAX_STOP_BYTES} bytes, got one of {}",
                s.len()
            ));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !v.is_finite() || !(-2.0..=2.0).contains(&v) {
                return Err(format!("{name} must be between -2 and 2, got {v}"));
            }
        }
        if self.logit_bias.len() > MAX_LOGIT_BIAS {
            return Err(format!(
                "logit_bias may name at most {MAX_LOGIT_BIAS} tokens, got {}",
                self.logit_bias.len()
            ));
        }
        if let Some((t, b)) = self
            .logit_bias
            .iter()
            .find(|(t, b)| *t < 0 || !b.is_finite() || !(-100.0..=100.0).contains(b))
        {
            return Err(format!(
                "logit_bias must map token ids to -100..100, got {t}: {b}"
            ));
        }
        if let Some(g) = self
            .grammar
            .as_ref()
            .filter(|g| g.len() > MAX_GRAMMAR_BYTES)
        {
            return Err(format!(
                "grammar of {} bytes is over the {MAX_GRAMMAR_BYTES}-byte limit",
                g.len()
            ));
        }
        if self.resume_tokens.len() > MAX_TOKENS_PER_REQUEST as usize {
            return Err(format!(
                "resume_tokens may hold at most {MAX_TOKENS_PER_REQUEST} tokens, got {}",
                self.resume_tokens.len()
            ));
        }
        if self.max_tokens == 0 || self.max_tokens > MAX_TOKENS_PER_REQUEST {
            return Err(format!(
                "max_tokens must be between 1 and {MAX_TOKENS_PER_REQUEST}, got {}",
                self.max_tokens
            ));
        }
        Ok(())
    }
}

/// A chat turn sent by a client to any node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    pub credential: Credential,
    /// Model wanted; `None` lets the mesh choose the model it serves.
    pub model: Option<String>,
    /// Conversation to continue and record into; `None` for a one-off.
    pub conversation: Option<ConversationId>,
    pub message: String,
    pub params: GenParams,
    /// Ask the node to send back the assembled prompt (for debugging).
    pub show_prompt: bool,
    /// The client's id for this turn. A turn sent again (through this
    /// node or another, after its entry failed) carries the same id, and
    /// its conversation keeps it once; `None` lets the entry choose one.
    pub turn: Option<u64>,
    /// The answer was begun through an entry that failed: what had
    /// streamed of it there.
    pub continued: Option<Continued>,
}

/// What had streamed of a turn's answer when its entry failed, for the
/// entry the turn is sent to next, which has the rest generated after it.
/// (A whole answer whose entry failed before keeping it is kept with the
/// memory protocol's `Keep`.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Continued {
    pub answer: String,
    pub tokens: u32,
    /// One id per token.
    pub ids: Vec<i32>,
}

impl Continued {
    pub fn check(&self) -> Result<(), String> {
        if self.ids.len() != self.tokens as usize {
            return Err(format!(
                "{} token ids for {} tokens",
                self.ids.len(),
                self.tokens
            ));
        }
        if self.tokens == 0 || self.tokens >= MAX_TOKENS_PER_REQUEST {
            return Err(format!(
                "a continued answer has 1 to {} tokens, not {}",
                MAX_TOKENS_PER_REQUEST - 1,
                self.tokens
            ));
        }
        if self.answer.len() > MAX_MESSAGE_BYTES {
            return Err(format!(
                "a continued answer of {} bytes is over the {MAX_MESSAGE_BYTES}-byte limit",
                self.answer.len()
            ));
        }
        Ok(())
    }
}

impl ChatRequest {
    pub fn check(&self) -> Result<(), String> {
        if self.message.is_empty() {
            return Err("message is empty".into());
        }
        if self.message.len() > MAX_MESSAGE_BYTES {
            return Err(format!(
                "message of {} bytes is over the {MAX_MESSAGE_BYTES}-byte limit",
                self.message.len()
            ));
        }
        if let Some(m) = &self.model
            && (m.is_empty() || m.len() > 256)
        {
            return Err("model name must have 1 to 256 bytes".into());
        }
        // Only an entry continues an answer, from what a failed target
        // streamed (and the grant binds it): tokens a client names would be
        // computed for free.
        if !self.params.resume_tokens.is_empty() {
            return Err("resume_tokens are set by the entry node, never by a client".into());
        }
        if let Some(c) = &self.continued {
            c.check()?;
        }
        if let Some(c) = &self.conversation
            && c.is_reserved()
        {
            return Err(format!(
                "conversation {c} is the node's own (the facts it keeps about you); chat in \
                 another"
            ));
        }
        self.params.check()
    }
}

/// Frames a client sends on a chat stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ClientFrame {
    Chat(Box<ChatRequest>),
    /// Stop generating; the node answers with `Done { stop: Cancelled }`.
    Cancel,
    /// After a redirect: the answer as the target streamed it, with the
    /// target's signed receipt, so the entry can record the turn and
    /// charge the credential.
    Finished {
        answer: String,
        receipt: Box<Receipt>,
    },
    /// After a redirect: the target could not be reached; the entry should
    /// relay the answer itself.
    Relay {
        reason: String,
    },
    /// After a redirect: the target failed mid-answer. `answer` is the text
    /// of the `tokens` tokens received; the entry places the rest elsewhere
    /// and the client goes on counting token indices from `tokens`.
    Resume {
        reason: String,
        answer: String,
        tokens: u32,
        /// The ids of those tokens.
        ids: Vec<i32>,
    },
    /// After a redirect: the target said all its slots were busy before
    /// streaming anything (`NoCapacity`); the entry places the answer
    /// elsewhere, and the client goes on from where it was.
    Full {
        reason: String,
    },
}

/// What a target tells the entry that issued a grant once it has served
/// it, node to node (over the actor session), so the entry can record the
/// turn and settle the credential even if the client never reports back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    pub request: RequestId,
    pub answer: String,
    pub receipt: Receipt,
    /// Tokens the prompt came to at the target (so an entry without the
    /// model learns how its texts tokenize).
    pub prompt_tokens: u32,
    /// How the answer ended (a cancelled one is charged, not kept).
    pub stop: StopReason,
}

/// What a client sends on a run stream to the target named by a redirect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRequest {
    pub grant: Grant,
    /// The entry node's membership, so the target can check the grant's
    /// issuer even before gossip has introduced them.
    pub issuer_membership: Membership,
    /// The conversation turns to answer; the target formats them with its
    /// model's chat template. The grant binds their hash.
    pub turns: Vec<crate::chat::prompt::Turn>,
    pub params: GenParams,
    /// Whether the run may wait in the target's queue when every slot is
    /// busy. When not, a full target refuses it at once (`NoCapacity`)
    /// and the entry places it elsewhere: fresher news of the target's
    /// load than any report. Not part of the grant: it only decides
    /// whether the holder waits.
    pub may_queue: bool,
}

/// Tells the client to fetch the answer from another node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Redirect {
    pub target: NodeId,
    pub addrs: Vec<String>,
    pub run: RunRequest,
}

/// First frame on a join stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum JoinRequest {
    /// A new node presents its invite.
    Invite(JoinTicket),
    /// A member presents the membership it holds, to have it renewed
    /// before it expires.
    Renew(Membership),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum JoinReply {
    Welcome {
        membership: Membership,
        authorities: Vec<NodeId>,
        /// The mesh's actor-session secret, which node-to-node actor
        /// sessions authenticate with (sent over the joiner's encrypted,
        /// peer-authenticated stream).
        session_secret: Option<[u8; 32]>,
    },
    Refused(ErrorFrame),
}

/// First frame on a status stream: a client credential from the mesh's
/// authority, or the node's own key's say-so for its operator; or, from
/// anyone, a request for the node's membership certificate (public: it
/// rides in every capacity announcement), which a client checks before it
/// sends a credential or a prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StatusRequest {
    Credential(Credential),
    Operator(OperatorProof),
    Membership,
    /// From a member whose list of revocations differs from this node's
    /// (their digests in capacity reports differ): every revocation held.
    Revocations,
    /// From anyone (`zavod mesh revoke`, `zavod cap revoke`): a revocation
    /// to hold and spread. Its authority's signature is its admission.
    Revoke(Box<Revocation>),
}

/// One node in a status reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusRow {
    pub node: NodeId,
    pub is_self: bool,
    pub addrs: Vec<String>,
    pub models: Vec<ModelOffer>,
    pub on_gpu: bool,
    pub mem_free_bytes: u64,
    pub mem_total_bytes: u64,
    pub slots_free: u32,
    pub slots_total: u32,
    pub queue_depth: u32,
    pub tokens_per_s: f32,
    pub liveness: String,
    pub breaker: String,
    pub rtt_ms: Option<f64>,
    pub score: f64,
    pub heard_ms_ago: u64,
    /// Its Tailscale name, when the node asked found it on a tailnet.
    pub tailnet_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StatusReply {
    Mesh {
        entry: NodeId,
        rows: Vec<StatusRow>,
        dropped_non_member: u64,
    },
    /// The node's membership certificate.
    Membership(Membership),
    /// Every revocation the node holds.
    Revocations(Vec<Revocation>),
    /// A revocation was taken: whether it was new to the node, and how
    /// many it holds now.
    Revoked {
        new: bool,
        held: u32,
    },
    Refused(ErrorFrame),
}

/// Frames a node sends on a chat stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ServerFrame {
    Accepted(Box<Accepted>),
    /// The answer comes from another node: open a run stream there.
    Redirect(Box<Redirect>),
    Token {
        index: u32,
        text: String,
        /// The model's token id, so another node with the same model can
        /// resume the answer exactly.
        id: i32,
    },
    Done(DoneInfo),
    Error(ErrorFrame),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Accepted {
    pub request: RequestId,
    /// The node that generates the answer.
    pub served_by: NodeId,
    pub model: String,
    /// Earlier turns of the conversation included in the prompt.
    pub history_turns: u32,
    /// The grant the entry node minted for this request.
    pub grant: Grant,
    /// The assembled prompt, when the client asked for it.
    pub prompt: Option<String>,
    /// What long-term memory put in the prompt: the facts the user stated
    /// before that the recent turns no longer hold, one per line.
    pub recalled: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StopReason {
    EndOfGeneration,
    MaxTokens,
    Cancelled,
    ContextFull,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DoneInfo {
    pub stop: StopReason,
    pub prompt_tokens: u32,
    /// Of the prompt tokens, those taken from the prompt cache.
    pub cached_tokens: u32,
    pub generated_tokens: u32,
    /// Time from the engine taking the job to its first token.
    pub first_token_ms: f64,
    /// Decode rate over the tokens after the first.
    pub decode_tokens_per_s: f64,
    pub finished_at_ms: UnixMs,
    /// Signed by the node that generated the answer.
    pub receipt: Option<Receipt>,
    /// Set by the entry when the answer is whole but its turn could not be
    /// saved to the conversation (the next turn will not see it): why.
    pub unrecorded: Option<String>,
}

/// A closed class of failures a client can act on, with a message for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    Forbidden,
    RateLimited,
    BudgetExhausted,
    ModelUnavailable,
    NoCapacity,
    FrameTooLarge,
    UnsupportedVersion,
    Timeout,
    Internal,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorFrame {
    pub code: ErrorCode,
    pub message: String,
}

impl From<WireError> for ErrorFrame {
    fn from(e: WireError) -> Self {
        let code = match e {
            WireError::TooLarge(_) => ErrorCode::FrameTooLarge,
            WireError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            WireError::Malformed(_) | WireError::TrailingBytes(_) => ErrorCode::BadRequest,
        };
        ErrorFrame {
            code,
            message: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::{Authority, CredentialBody, Keypair, ModelPattern};

    fn request() -> ChatRequest {
        let auth = Authority::new(Keypair::from_secret([1; 32]));
        ChatRequest {
            credential: auth.issue_credential(CredentialBody {
                id: [0; 16],
                holder: Keypair::from_secret([2; 32]).public(),
                models: ModelPattern("*".into()),
                token_budget: 10,
                rate_per_min: 0,
                not_before_ms: 0,
                expires_at_ms: 1,
            }),
            model: None,
            conversation: Some(ConversationId::parse("c1").expect("valid")),
            message: "hi".into(),
            params: GenParams::default(),
            show_prompt: false,
            turn: None,
            continued: None,
        }
    }

    #[test]
    fn a_client_cannot_name_resume_tokens() {
        let mut r = request();
        assert!(r.check().is_ok());
        r.params.resume_tokens = vec![1, 2, 3];
        let e = r.check().expect_err("client resume tokens");
        assert!(e.contains("entry"), "{e}");
    }

    #[test]
    fn frames_round_trip() {
        let f = ClientFrame::Chat(Box::new(request()));
        let bytes = encode(&f).expect("encodes");
        assert_eq!(decode::<ClientFrame>(&bytes), Ok(f));
        let t = ServerFrame::Token {
            index: 3,
            text: "é".into(),
            id: 42,
        };
        assert_eq!(decode::<ServerFrame>(&encode(&t).expect("encodes")), Ok(t));
    }

    #[test]
    fn bad_frames_are_refused_with_a_reason() {
        let good = encode(&ClientFrame::Cancel).expect("encodes");
        let mut v2 = bincode::serde::encode_to_vec(2u16, config()).expect("encodes");
        v2.extend_from_slice(&good[1..]);
        assert_eq!(
            decode::<ClientFrame>(&v2),
            Err(WireError::UnsupportedVersion(2))
        );
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(
            decode::<ClientFrame>(&trailing),
            Err(WireError::TrailingBytes(1))
        );
        assert!(matches!(
            decode::<ClientFrame>(&[]),
            Err(WireError::Malformed(_))
        ));
        assert!(matches!(
            decode::<ClientFrame>(&[1, 200]),
            Err(WireError::Malformed(_))
        ));
        let big = vec![0u8; MAX_FRAME_BYTES + 1];
        assert!(matches!(
            decode::<ClientFrame>(&big),
            Err(WireError::TooLarge(_))
        ));
    }

    #[test]
    fn claimed_lengths_beyond_the_limit_do_not_allocate() {
        // Version 1, variant 0 (Chat), then a credential whose first field
        // claims a huge vector length.
        let mut bytes = vec![1u8, 0];
        bytes.extend_from_slice(&[0xfc, 0xff, 0xff, 0xff, 0x7f]);
        assert!(decode::<ClientFrame>(&bytes).is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A small deterministic xorshift stream of garbage frames.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in 0..2000usize {
            let mut buf = Vec::with_capacity(len % 300);
            for _ in 0..(len % 300) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                buf.push(x as u8);
            }
            let _ = decode::<ClientFrame>(&buf);
            let _ = decode::<ServerFrame>(&buf);
        }
        // Mutations of a valid frame.
        let good = encode(&ClientFrame::Chat(Box::new(request()))).expect("encodes");
        for i in 0..good.len() {
            for flip in [1u8, 0x80, 0xff] {
                let mut m = good.clone();
                m[i] ^= flip;
                let _ = decode::<ClientFrame>(&m);
            }
        }
    }

    #[test]
    fn params_are_checked_by_field() {
        let mut p = GenParams::default();
        assert!(p.check().is_ok());
        p.temperature = f32::NAN;
        assert!(p.check().unwrap_err().contains("temperature"));
        p = GenParams {
            top_p: 0.0,
            ..Default::default()
        };
        assert!(p.check().unwrap_err().contains("top_p"));
        p = GenParams {
            max_tokens: 0,
            ..Default::default()
        };
        assert!(p.check().unwrap_err().contains("max_tokens"));
    }
}
