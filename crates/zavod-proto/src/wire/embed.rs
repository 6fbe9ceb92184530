//! The embed protocol: an entry that placed an embedding request on
//! another node sends it the texts with the grant it minted, and gets the
//! vectors back in one reply. Both frames are checked on receipt (counts,
//! sizes, finite numbers), so a bad peer's reply is an error, never a
//! panic or an allocation past the limits.

use crate::limits::{MAX_EMBED_DIMENSIONS, MAX_EMBED_INPUTS, MAX_MESSAGE_BYTES};
use crate::trust::{Grant, Membership};
use crate::wire::ErrorFrame;
use serde::{Deserialize, Serialize};

/// First frame on an embed stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbedRequest {
    /// Bound to the texts by [`embed_hash`].
    pub grant: Grant,
    /// The entry's membership, so the target can check the grant's issuer
    /// before gossip has introduced them.
    pub issuer_membership: Membership,
    pub inputs: Vec<String>,
}

/// The target's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum EmbedReply {
    Vectors {
        vectors: Vec<Vec<f32>>,
        /// Tokens the texts came to (what the request is charged).
        prompt_tokens: u32,
    },
    Refused(ErrorFrame),
}

/// What a grant for embeddings binds: the texts, under a tag of their own
/// so the hash of an embedding request is never that of a chat prompt.
pub fn embed_hash(inputs: &[String]) -> [u8; 32] {
    crate::trust::prompt_hash_bytes(&crate::wire::encode_unversioned(&("zavod-embed-1", inputs)))
}

/// Checks the texts of a request: 1 to [`MAX_EMBED_INPUTS`] of them, none
/// empty, together at most [`MAX_MESSAGE_BYTES`].
pub fn check_inputs(inputs: &[String]) -> Result<(), String> {
    if inputs.is_empty() {
        return Err("input is empty: give a text or a list of texts".into());
    }
    if inputs.len() > MAX_EMBED_INPUTS {
        return Err(format!(
            "input has {} texts; at most {MAX_EMBED_INPUTS} per request",
            inputs.len()
        ));
    }
    if let Some(i) = inputs.iter().position(|t| t.is_empty()) {
        return Err(format!("input {i} is an empty string"));
    }
    if let Some(i) = inputs.iter().position(|t| t.contains('\0')) {
        return Err(format!("input {i} contains a NUL character"));
    }
    let bytes: usize = inputs.iter().map(String::len).sum();
    if bytes > MAX_MESSAGE_BYTES {
        return Err(format!(
            "the texts are {bytes} bytes together; at most {MAX_MESSAGE_BYTES}"
        ));
    }
    Ok(())
}

/// A target's vectors for `inputs` texts, checked: one per text, all of
/// one length from 1 to [`MAX_EMBED_DIMENSIONS`], every number finite.
pub fn check_vectors(vectors: &[Vec<f32>], inputs: usize) -> Result<(), String> {
    if vectors.len() != inputs {
        return Err(format!("{} vectors for {inputs} texts", vectors.len()));
    }
    let dims = vectors.first().map_or(0, Vec::len);
    if vectors.iter().any(|v| v.len() != dims) || dims == 0 || dims > MAX_EMBED_DIMENSIONS {
        return Err("vectors of a bad or uneven length".into());
    }
    if vectors.iter().flatten().any(|x| !x.is_finite()) {
        return Err("a vector holds a number that is not finite".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_are_bounded_and_named_when_bad() {
        assert!(check_inputs(&["a".into()]).is_ok());
        assert!(check_inputs(&[]).is_err());
        let e = check_inputs(&["a".into(), String::new()]).expect_err("empty");
        assert!(e.contains("input 1"), "{e}");
        assert!(check_inputs(&vec!["a".into(); MAX_EMBED_INPUTS + 1]).is_err());
        assert!(check_inputs(&["x".repeat(MAX_MESSAGE_BYTES + 1)]).is_err());
        assert!(check_inputs(&["a\0b".into()]).is_err());
    }

    #[test]
    fn a_peers_vectors_are_checked() {
        assert!(check_vectors(&[vec![1.0, 0.0], vec![0.0, 1.0]], 2).is_ok());
        assert!(check_vectors(&[vec![1.0, 0.0]], 2).is_err());
        assert!(check_vectors(&[vec![1.0, 0.0], vec![1.0]], 2).is_err());
        assert!(check_vectors(&[vec![f32::NAN]], 1).is_err());
        assert!(check_vectors(&[vec![]], 1).is_err());
        assert!(check_vectors(&[vec![0.5; MAX_EMBED_DIMENSIONS + 1]], 1).is_err());
    }

    #[test]
    fn an_embedding_grant_never_binds_a_chat_prompt() {
        let texts = vec!["hello".to_string()];
        let turns = [crate::chat::prompt::Turn {
            role: crate::chat::prompt::Role::User,
            text: "hello".into(),
            tokens: 1,
        }];
        assert_ne!(
            embed_hash(&texts),
            crate::chat::prompt::run_hash(&turns, &Default::default())
        );
        assert_ne!(embed_hash(&texts), embed_hash(&["hello!".to_string()]));
    }

    #[test]
    fn frames_round_trip() {
        let r = EmbedReply::Vectors {
            vectors: vec![vec![0.25; 8]],
            prompt_tokens: 3,
        };
        let bytes = crate::wire::encode(&r).expect("encodes");
        assert_eq!(
            crate::wire::decode::<EmbedReply>(&bytes).expect("decodes"),
            r
        );
    }
}
