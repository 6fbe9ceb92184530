//! Conversation turns and prompt assembly within a context budget.
//!
//! The newest turns win: history is taken from the end backwards while it
//! fits, and a history that would start with an assistant turn drops it, so
//! the prompt always opens with a user (or system) turn.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    System,
    User,
    Assistant,
    /// Something worth keeping that a user turn said, kept beside the
    /// turn (`crate::memory::recall`); never a turn of a prompt itself.
    Fact,
    /// A running summary of the turns before it
    /// (`crate::memory::summary`); a prompt holds it as a system turn.
    Summary,
}

impl Role {
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Fact => "fact",
            Role::Summary => "summary",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Turn {
    pub role: Role,
    pub text: String,
    /// The turn's length in model tokens, counted once when stored.
    pub tokens: u32,
}

/// What a grant binds: the turns and every generation parameter the
/// entry set (sampling, seed, stops, grammar, penalties, and the tokens of
/// a resumed answer, so a grant to continue one answer continues no
/// other), except `max_tokens`, which the grant bounds on its own (a
/// client may ask for fewer). A client cannot change any of them at the
/// target.
pub fn run_hash(turns: &[Turn], params: &crate::wire::GenParams) -> [u8; 32] {
    let bound = crate::wire::GenParams {
        max_tokens: 0,
        ..params.clone()
    };
    crate::trust::prompt_hash_bytes(&crate::wire::encode_unversioned(&(
        "zavod-run-2",
        turns,
        bound,
    )))
}

/// The key a prompt's KV cache is known by in the mesh (capacity reports
/// summarise the keys a node holds; the entry prefers the node that holds a
/// request's key). It covers whose cache it is (`scope`, the credential the
/// request is charged to, so one holder's conversations never steer another's
/// placement), the model, and the prompt's opening: the system turns and the
/// first user turn. Every later turn of a conversation shares that opening,
/// whether its history comes from a node's memory or from the client (as
/// OpenAI clients send it), so a conversation keeps one key for its whole
/// life, and prompts sharing an opening share a key, as they share a cached
/// prefix.
pub fn affinity_key(scope: &[u8; 16], model: &str, turns: &[Turn]) -> u64 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"zavod-affinity-1");
    h.update(scope);
    h.update((model.len() as u64).to_le_bytes());
    h.update(model.as_bytes());
    for t in turns {
        h.update([t.role as u8]);
        h.update((t.text.len() as u64).to_le_bytes());
        h.update(t.text.as_bytes());
        if t.role != Role::System {
            break;
        }
    }
    let d = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_le_bytes(b)
}

/// Token counts for texts when no tokenizer is at hand, learnt from what
/// nodes with the model report: an entry without the model assembles
/// prompts by estimate, and a crude estimate cuts conversations short (and
/// with them their cached prefix) long before the model's context is full.
/// It keeps the sizes of the last prompts it heard of and uses their
/// bytes per token (weighted by size, so short prompts, where the template
/// is most of the tokens, count little), less a margin, so it errs towards
/// counting more. Before it has heard of any, it falls back to
/// [`estimate_tokens`].
#[derive(Debug, Clone, Default)]
pub struct TokenEstimator {
    /// (bytes, tokens) of recent prompts.
    seen: std::collections::VecDeque<(u64, u64)>,
}

/// Prompts whose ratio a [`TokenEstimator`] remembers.
const ESTIMATOR_WINDOW: usize = 32;
/// How much the smallest ratio seen is shrunk by, so counts err high.
const ESTIMATOR_MARGIN: f64 = 1.1;

impl TokenEstimator {
    /// A prompt of `bytes` bytes of turn text came to `tokens` tokens
    /// (template included).
    pub fn observe(&mut self, bytes: usize, tokens: u32) {
        if tokens == 0 || bytes == 0 {
            return;
        }
        if self.seen.len() >= ESTIMATOR_WINDOW {
            self.seen.pop_front();
        }
        self.seen.push_back((bytes as u64, u64::from(tokens)));
    }

    /// Tokens `text` is likely to take, erring high.
    pub fn estimate(&self, text: &str) -> u32 {
        let (bytes, tokens) = self
            .seen
            .iter()
            .fold((0u64, 0u64), |(b, t), (x, y)| (b + x, t + y));
        if tokens == 0 {
            return estimate_tokens(text);
        }
        let per = (bytes as f64 / tokens as f64).clamp(1.0, 8.0) / ESTIMATOR_MARGIN;
        u32::try_from((text.len() as f64 / per.max(1.0)).ceil() as u64).unwrap_or(u32::MAX)
    }
}

/// Token count for a text when no tokenizer is at hand: one token per three
/// bytes, rounded up. Real tokenizers average three to four bytes per token
/// on prose, so this over-counts and budgets stay safe.
pub fn estimate_tokens(text: &str) -> u32 {
    u32::try_from(text.len().div_ceil(3)).unwrap_or(u32::MAX)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptBudget {
    /// Tokens of context the prompt and answer must share.
    pub context_tokens: u32,
    /// Template tokens around each turn (role markers, separators).
    pub per_turn_overhead_tokens: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assembled {
    /// The turns to format, oldest first, ending with the new message.
    pub turns: Vec<Turn>,
    /// How many of them came from history.
    pub history_turns: u32,
    /// Estimated prompt tokens.
    pub tokens: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PromptError {
    #[error(
        "message of {message_tokens} tokens plus {answer_tokens} for the answer does not fit the context of {context_tokens} tokens"
    )]
    TooLong {
        message_tokens: u32,
        answer_tokens: u32,
        context_tokens: u32,
    },
}

/// Assembles the prompt for `message` given the stored `history` (oldest
/// first), leaving room for `answer_tokens`.
pub fn assemble(
    history: &[Turn],
    message: Turn,
    answer_tokens: u32,
    budget: &PromptBudget,
) -> Result<Assembled, PromptError> {
    let cost = |t: &Turn| t.tokens.saturating_add(budget.per_turn_overhead_tokens);
    let mut used = cost(&message).saturating_add(answer_tokens);
    if used > budget.context_tokens {
        return Err(PromptError::TooLong {
            message_tokens: message.tokens,
            answer_tokens,
            context_tokens: budget.context_tokens,
        });
    }
    let mut start = history.len();
    for (i, t) in history.iter().enumerate().rev() {
        let next = used.saturating_add(cost(t));
        if next > budget.context_tokens {
            break;
        }
        used = next;
        start = i;
    }
    while start < history.len() && history[start].role == Role::Assistant {
        used -= cost(&history[start]);
        start += 1;
    }
    let mut turns: Vec<Turn> = history[start..].to_vec();
    let history_turns = u32::try_from(turns.len()).unwrap_or(u32::MAX);
    turns.push(message);
    Ok(Assembled {
        turns,
        history_turns,
        tokens: used - answer_tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(role: Role, tokens: u32) -> Turn {
        Turn {
            role,
            text: format!("{role:?}{tokens}"),
            tokens,
        }
    }

    const B: PromptBudget = PromptBudget {
        context_tokens: 100,
        per_turn_overhead_tokens: 5,
    };

    #[test]
    fn a_conversation_keeps_its_affinity_key_and_scopes_keep_theirs() {
        let text = |role, s: &str| Turn {
            role,
            text: s.into(),
            tokens: 1,
        };
        let first = vec![text(Role::System, "be brief"), text(Role::User, "hello")];
        let mut later = first.clone();
        later.push(text(Role::Assistant, "hi"));
        later.push(text(Role::User, "how are you?"));
        let a = [1u8; 16];
        let k = affinity_key(&a, "m", &first);
        assert_eq!(k, affinity_key(&a, "m", &later));
        assert_ne!(k, affinity_key(&[2u8; 16], "m", &first));
        assert_ne!(k, affinity_key(&a, "other", &first));
        let other_opening = vec![text(Role::System, "be brief"), text(Role::User, "bye")];
        assert_ne!(k, affinity_key(&a, "m", &other_opening));
    }

    #[test]
    fn an_estimator_learns_the_ratio_and_errs_high() {
        let mut e = TokenEstimator::default();
        let text = "a".repeat(500);
        assert_eq!(e.estimate(&text), estimate_tokens(&text));
        // Long prompts of 5 bytes per token, and a short one where the
        // template is most of it.
        e.observe(5_000, 1_000);
        e.observe(5_000, 1_000);
        e.observe(40, 20);
        // 500 bytes at about 5 bytes a token, less the margin: 111.
        assert_eq!(e.estimate(&text), 111);
        // Nonsense is ignored; the window forgets old prompts.
        e.observe(0, 10);
        e.observe(10, 0);
        for _ in 0..ESTIMATOR_WINDOW {
            e.observe(6_000, 1_000);
        }
        assert_eq!(e.estimate(&text), 92);
    }

    #[test]
    fn newest_turns_fit_first() {
        let h = vec![
            t(Role::User, 30),
            t(Role::Assistant, 30),
            t(Role::User, 10),
            t(Role::Assistant, 10),
        ];
        let a = assemble(&h, t(Role::User, 10), 20, &B).expect("fits");
        // 15 (msg) + 20 (answer) + 15 + 15 = 65; the 35-token assistant turn
        // would make 100 — fits exactly; then the user turn of 35 does not.
        // A history starting with an assistant turn drops it.
        assert_eq!(a.history_turns, 2);
        assert_eq!(a.turns.len(), 3);
        assert_eq!(a.turns[0].role, Role::User);
        assert_eq!(a.tokens, 45);
    }

    #[test]
    fn whole_history_when_it_fits() {
        let h = vec![t(Role::User, 5), t(Role::Assistant, 5)];
        let a = assemble(&h, t(Role::User, 5), 10, &B).expect("fits");
        assert_eq!(a.history_turns, 2);
        assert_eq!(a.tokens, 30);
    }

    #[test]
    fn a_message_too_long_is_refused() {
        assert_eq!(
            assemble(&[], t(Role::User, 90), 20, &B),
            Err(PromptError::TooLong {
                message_tokens: 90,
                answer_tokens: 20,
                context_tokens: 100
            })
        );
    }
}
