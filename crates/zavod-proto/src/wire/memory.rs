//! The memory protocol: a credential holder's own conversations on the
//! node it asks: list them, export one page by page, delete one or all,
//! and keep a turn whose answer is whole but whose entry failed before
//! keeping it.
//! The credential must name the key the stream is authenticated with, so
//! one holder can never reach another's conversations.
//!
//! A page is bounded by [`MAX_EXPORT_PAGE_BYTES`] of text (one turn at
//! least, so a page always advances), and a list by
//! [`MAX_LISTED_CONVERSATIONS`], so every reply fits a frame.

use crate::chat::prompt::Turn;
use crate::ids::ConversationId;
use crate::limits::{MAX_EXPORT_PAGE_BYTES, MAX_LISTED_CONVERSATIONS, MAX_MESSAGE_BYTES};
use crate::trust::{Credential, Receipt};
use crate::wire::ErrorFrame;
use serde::{Deserialize, Serialize};

/// First and only frame a client sends on a memory stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryRequest {
    pub credential: Credential,
    pub op: MemoryOp,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum MemoryOp {
    /// The holder's conversations on this node.
    List,
    /// Turns of one conversation from the `from`-th kept one (0: oldest).
    Export {
        conversation: ConversationId,
        from: u64,
    },
    /// Forget one conversation.
    Delete { conversation: ConversationId },
    /// Forget every conversation of the holder.
    DeleteAll,
    /// Keep the turn `turn` of a conversation: `message` and its whole
    /// `answer`, which a target streamed and signed `receipt` for, but
    /// whose entry failed before keeping it. Kept once: a turn already
    /// held under that id stays as it is.
    Keep {
        conversation: ConversationId,
        turn: u64,
        message: String,
        answer: String,
        receipt: Box<Receipt>,
    },
}

impl MemoryOp {
    /// Checks a request's bounds before the node acts on it.
    pub fn check(&self) -> Result<(), String> {
        // A kept turn is a chat turn: the node's own conversations take
        // none, as a chat in them is refused.
        if let MemoryOp::Keep { conversation, .. } = self
            && conversation.is_reserved()
        {
            return Err(format!(
                "conversation {conversation} is the node's own (the facts it keeps about you); \
                 no turn is kept in it"
            ));
        }
        if let MemoryOp::Keep {
            message, answer, ..
        } = self
            && (message.is_empty()
                || message.len() > MAX_MESSAGE_BYTES
                || answer.len() > MAX_MESSAGE_BYTES)
        {
            return Err(format!(
                "a kept turn's message (1 to {MAX_MESSAGE_BYTES} bytes) and answer (at most \
                 {MAX_MESSAGE_BYTES}) have {} and {} bytes",
                message.len(),
                answer.len()
            ));
        }
        Ok(())
    }
}

/// The node's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum MemoryReply {
    /// Names, and whether there were more than a reply holds.
    Conversations {
        names: Vec<ConversationId>,
        truncated: bool,
    },
    /// One page; `next` is where the following one starts (`None`: done).
    /// `held` says whether the conversation exists at all.
    Turns {
        turns: Vec<Turn>,
        next: Option<u64>,
        held: bool,
    },
    /// How many conversations were forgotten.
    Deleted {
        conversations: u32,
    },
    /// The turn is kept (`already`: it was, under its id).
    Kept {
        already: bool,
    },
    Refused(ErrorFrame),
}

impl MemoryReply {
    /// Checks a reply from a node against the protocol's bounds before a
    /// client relies on it.
    pub fn check(&self) -> Result<(), String> {
        match self {
            MemoryReply::Conversations { names, .. } if names.len() > MAX_LISTED_CONVERSATIONS => {
                Err(format!("a list of {} conversations", names.len()))
            }
            MemoryReply::Turns { turns, .. } => {
                let bytes: usize = turns.iter().map(|t| t.text.len()).sum();
                if turns.len() > 1 && bytes > MAX_EXPORT_PAGE_BYTES {
                    Err(format!("a page of {bytes} bytes"))
                } else {
                    Ok(())
                }
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{NodeId, RequestId};
    use crate::trust::{Keypair, ReceiptBody, sign_receipt};

    fn keep(conversation: &str, message: &str) -> MemoryOp {
        let receipt = sign_receipt(
            &Keypair::from_secret([7; 32]),
            ReceiptBody {
                request: RequestId(1),
                client: NodeId([1; 32]),
                generated_tokens: 1,
                answer_hash: [0; 32],
            },
        );
        MemoryOp::Keep {
            conversation: ConversationId::parse(conversation).expect("a valid name"),
            turn: 1,
            message: message.into(),
            answer: "ok".into(),
            receipt: Box::new(receipt),
        }
    }

    #[test]
    fn a_turn_is_kept_in_a_chat_of_the_holder_and_never_in_the_nodes_own_conversations() {
        assert_eq!(keep("trip", "hello").check(), Ok(()));
        let facts = keep(ConversationId::holder_facts().as_str(), "hello").check();
        assert!(
            facts.as_ref().is_err_and(|e| e.contains("the node's own")),
            "{facts:?}"
        );
        assert!(keep("trip", "").check().is_err(), "an empty message");
        let long = "x".repeat(MAX_MESSAGE_BYTES + 1);
        assert!(keep("trip", &long).check().is_err(), "a message too long");
    }
}
