//! Identifiers: nodes and clients are ed25519 public keys; requests are
//! 128-bit ids drawn by the caller; conversations are short client-chosen
//! names, checked on parse so that they are safe as storage keys.

use serde::{Deserialize, Serialize};
use std::fmt;

/// An ed25519 public key naming a node, a client or an authority.
/// The libp2p peer id of a node is derived from the same key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId(pub [u8; 32]);

impl NodeId {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Short form for logs and tables: the first 8 hex digits.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }

    pub fn from_hex(s: &str) -> Result<Self, IdError> {
        let bytes = hex::decode(s).map_err(|_| IdError::BadHex)?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| IdError::BadLength)?;
        Ok(NodeId(arr))
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.short())
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// A request id, unique per request; drawn by the entry node from its RNG.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RequestId(pub u128);

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestId({:032x})", self.0)
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// The most bytes a conversation id may have.
pub const CONVERSATION_ID_MAX_BYTES: usize = 64;

/// A conversation name chosen by the client: 1 to 64 bytes of ASCII letters,
/// digits, `-`, `_` and `.`. Constructed only through [`ConversationId::parse`],
/// so every value in the system is valid.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ConversationId(String);

impl ConversationId {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.is_empty() || s.len() > CONVERSATION_ID_MAX_BYTES {
            return Err(IdError::ConversationLength(s.len()));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        {
            return Err(IdError::ConversationChar(c));
        }
        Ok(ConversationId(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Where the facts about a credential holder that hold across its
    /// conversations are kept (long-term memory): a name no client may
    /// chat in ([`ConversationId::is_reserved`]).
    pub fn holder_facts() -> Self {
        ConversationId(HOLDER_FACTS.to_owned())
    }

    /// Whether the name is the node's own (clients may export and delete
    /// it, not chat in it).
    pub fn is_reserved(&self) -> bool {
        self.0.starts_with(RESERVED_PREFIX)
    }
}

/// Conversation names beginning so are the node's own.
const RESERVED_PREFIX: &str = "_zavod";
const HOLDER_FACTS: &str = "_zavod-facts";
const _: () = assert!(HOLDER_FACTS.len() <= CONVERSATION_ID_MAX_BYTES);

impl<'de> Deserialize<'de> for ConversationId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ConversationId::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl fmt::Debug for ConversationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConversationId({})", self.0)
    }
}

impl fmt::Display for ConversationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("not hexadecimal")]
    BadHex,
    #[error("a key is 32 bytes (64 hex digits)")]
    BadLength,
    #[error("a conversation id has 1 to {CONVERSATION_ID_MAX_BYTES} bytes, got {0}")]
    ConversationLength(usize),
    #[error("a conversation id may hold only letters, digits, '-', '_' and '.', got {0:?}")]
    ConversationChar(char),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversation_ids_are_checked() {
        assert!(ConversationId::parse("chat-1.a_b").is_ok());
        assert_eq!(
            ConversationId::parse(""),
            Err(IdError::ConversationLength(0))
        );
        assert_eq!(
            ConversationId::parse("a/b"),
            Err(IdError::ConversationChar('/'))
        );
        assert!(ConversationId::parse(&"x".repeat(65)).is_err());
    }

    #[test]
    fn node_id_hex_round_trips() {
        let id = NodeId([7; 32]);
        assert_eq!(NodeId::from_hex(&id.to_hex()), Ok(id));
        assert_eq!(NodeId::from_hex("zz"), Err(IdError::BadHex));
        assert_eq!(NodeId::from_hex("abcd"), Err(IdError::BadLength));
    }
}
