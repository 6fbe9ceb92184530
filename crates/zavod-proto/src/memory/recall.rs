//! Long-term memory in prompts. A user turn that states something about
//! its user ("My name is…", "Answer in French.", "Remember that…") yields
//! facts: those about the user in general are kept for the credential
//! holder across conversations, the others with the conversation. For each
//! prompt, [`recall`] picks what goes in, ahead of the new message, beside
//! the recent turns that fit:
//! every fact about the holder, then the conversation's facts that the new
//! message is about (BM25 relevance), newest first among equals, within a
//! token budget, leaving out what the recent turns already say. What it
//! injected is returned as plain lines, for the client to show.
//!
//! Facts are picked out by what a sentence opens with, not by a model: it
//! runs on every turn, on the entry, and must be cheap and predictable.
//!
//! Invariants: the output is a function of the input (relevance scores are
//! rounded and ties broken by recency, so no map order leaks out); the
//! injected turn never passes the budget; facts are bounded in number and
//! length at every step.

use crate::chat::prompt::{Role, Turn};
use crate::limits::{MAX_FACT_BYTES, MAX_FACTS_PER_TURN, MAX_RECALL_CANDIDATES};

/// Whom a fact is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The credential holder, in every conversation.
    Holder,
    /// This conversation.
    Conversation,
}

/// Openings of sentences about the holder in general.
const HOLDER: &[&str] = &[
    "my name is ",
    "call me ",
    "i am called ",
    "i'm called ",
    "answer in ",
    "reply in ",
    "always answer ",
    "always reply ",
    "please answer in ",
    "please reply in ",
    "please always ",
    "i prefer ",
    "i live in ",
    "i am from ",
    "i'm from ",
    "i speak ",
];

/// Openings of sentences worth keeping with the conversation.
const CONVERSATION: &[&str] = &[
    "remember ",
    "remember:",
    "note that ",
    "my ",
    "our ",
    "i have ",
    "i keep ",
    "i like ",
    "i love ",
    "i hate ",
    "i work ",
    "i am a ",
    "i'm a ",
    "i own ",
    "i need ",
    "i want ",
    "we are ",
    "we're ",
];

/// The facts `message` states, in order, at most [`MAX_FACTS_PER_TURN`].
pub fn facts_in(message: &str) -> Vec<(Scope, String)> {
    let mut out = Vec::new();
    for sentence in sentences(message) {
        if out.len() >= MAX_FACTS_PER_TURN {
            break;
        }
        if sentence.len() < 6 || sentence.len() > MAX_FACT_BYTES {
            continue;
        }
        let lower = sentence.to_lowercase();
        let scope = if HOLDER.iter().any(|p| lower.starts_with(p)) {
            Scope::Holder
        } else if CONVERSATION.iter().any(|p| lower.starts_with(p)) {
            Scope::Conversation
        } else {
            continue;
        };
        out.push((scope, sentence.to_string()));
    }
    out
}

/// Sentences of `text`, each with its closing mark, trimmed.
fn sentences(text: &str) -> impl Iterator<Item = &str> {
    text.split_inclusive(['.', '!', '?', '\n'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// The turns a fact is kept as, beside its user turn.
pub fn fact_turns(
    facts: &[(Scope, String)],
    scope: Scope,
    count: impl Fn(&str) -> u32,
) -> Vec<Turn> {
    facts
        .iter()
        .filter(|(s, _)| *s == scope)
        .map(|(_, text)| Turn {
            role: Role::Fact,
            tokens: count(text),
            text: text.clone(),
        })
        .collect()
}

/// What goes into one prompt from long-term memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recall {
    /// The text to put ahead of the new message, if anything was picked.
    /// It goes in the user's own turn (in the user's voice), so that the
    /// prompt's history, and the prompt cache holding it, stay as they
    /// were, and every chat template takes it.
    pub text: Option<String>,
    /// Its tokens (by the counter given).
    pub tokens: u32,
    /// What it holds, one fact per line, for people.
    pub injected: Vec<String>,
}

/// The opening of the injected text.
pub const RECALL_HEADER: &str = "Things I told you before:";

/// Picks facts for a prompt whose new message is `query`. `holder` and
/// `conversation` are the facts kept, oldest first; `in_context` the texts
/// of the turns the prompt already holds. The text's tokens (by `count`)
/// stay within `budget_tokens`.
pub fn recall(
    holder: &[String],
    conversation: &[String],
    query: &str,
    in_context: &[&str],
    budget_tokens: u32,
    count: impl Fn(&str) -> u32,
) -> Recall {
    let fresh = |f: &&String| !in_context.iter().any(|t| t.contains(f.as_str()));
    // Newest first, each once, bounded.
    let newest = |facts: &[String]| -> Vec<String> {
        let mut seen: Vec<String> = Vec::new();
        let mut out = Vec::new();
        for f in facts.iter().rev().filter(fresh) {
            let key = f.to_lowercase();
            if !seen.contains(&key) {
                seen.push(key);
                out.push(f.clone());
            }
            if out.len() >= MAX_RECALL_CANDIDATES {
                break;
            }
        }
        out
    };
    let holder = newest(holder);
    let conversation: Vec<String> = newest(conversation)
        .into_iter()
        .filter(|f| !holder.iter().any(|h| h.eq_ignore_ascii_case(f)))
        .collect();
    let mut picked: Vec<String> = holder;
    picked.extend(relevant(&conversation, query));

    let mut tokens = count(RECALL_HEADER).saturating_add(1);
    let mut injected = Vec::new();
    for f in picked {
        let line = format!("- {f}");
        let t = count(&line).saturating_add(1);
        if tokens.saturating_add(t) > budget_tokens {
            continue;
        }
        tokens += t;
        injected.push(f);
    }
    if injected.is_empty() {
        return Recall::default();
    }
    let mut text = String::from(RECALL_HEADER);
    for f in &injected {
        text.push_str("\n- ");
        text.push_str(f);
    }
    Recall {
        text: Some(text),
        tokens,
        injected,
    }
}

/// `message` with the recalled `text` ahead of it, as the model sees it.
pub fn with_recall(text: &str, message: &str) -> String {
    format!("{text}\n\n{message}")
}

/// The facts (newest first) that `query` is about, most relevant first;
/// equal scores keep the newer first.
fn relevant(facts: &[String], query: &str) -> Vec<String> {
    if facts.is_empty() {
        return Vec::new();
    }
    let engine = bm25::SearchEngineBuilder::<usize>::with_documents(
        bm25::Language::English,
        facts
            .iter()
            .enumerate()
            .map(|(i, f)| bm25::Document::new(i, f.clone())),
    )
    .build();
    let mut hits: Vec<(i64, usize)> = engine
        .search(query, None)
        .into_iter()
        .filter(|r| r.score > 0.0)
        // Rounded, so that how the library sums does not order ties.
        .map(|r| ((f64::from(r.score) * 1e4).round() as i64, r.document.id))
        .collect();
    hits.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    hits.into_iter().map(|(_, i)| facts[i].clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> u32 {
        s.split_whitespace().count() as u32
    }

    #[test]
    fn facts_are_the_sentences_about_the_user() {
        let f = facts_in(
            "Hello there! My name is Zorblax. What is the weather? Answer in French please. \
             I keep bees in my garden.\nremember: the code is 42",
        );
        assert_eq!(
            f,
            vec![
                (Scope::Holder, "My name is Zorblax.".to_string()),
                (Scope::Holder, "Answer in French please.".to_string()),
                (Scope::Conversation, "I keep bees in my garden.".to_string()),
                (Scope::Conversation, "remember: the code is 42".to_string()),
            ]
        );
        assert!(facts_in("What is my name?").is_empty());
        let many = "My dog is big. ".repeat(20);
        assert_eq!(facts_in(&many).len(), MAX_FACTS_PER_TURN);
        let long = format!("My {} is here.", "very ".repeat(100));
        assert!(facts_in(&long).is_empty(), "longer than a fact may be");
    }

    #[test]
    fn a_prompt_gets_the_holders_facts_and_the_relevant_ones_within_budget() {
        let holder = vec!["My name is Zorblax.".to_string()];
        let conversation = vec![
            "I keep bees in my garden.".to_string(),
            "My car is red.".to_string(),
            "My sister lives in Oslo.".to_string(),
        ];
        let r = recall(
            &holder,
            &conversation,
            "What colour is my car?",
            &[],
            100,
            words,
        );
        assert_eq!(r.injected, ["My name is Zorblax.", "My car is red."]);
        let text = r.text.expect("a text");
        assert!(text.starts_with(RECALL_HEADER));
        assert!(text.contains("\n- My car is red."));
        assert!(r.tokens <= 100);

        // Already in the recent turns: not injected again.
        let r = recall(
            &holder,
            &conversation,
            "What colour is my car?",
            &["Hi. My name is Zorblax."],
            100,
            words,
        );
        assert_eq!(r.injected, ["My car is red."]);

        // The budget holds: what does not fit is left out.
        let r = recall(&holder, &conversation, "car", &[], 13, words);
        assert_eq!(r.injected, ["My name is Zorblax."]);
        assert!(r.tokens <= 13);
        assert_eq!(
            recall(&holder, &conversation, "car", &[], 3, words),
            Recall::default()
        );

        // Nothing kept, nothing injected.
        assert_eq!(recall(&[], &[], "car", &[], 100, words), Recall::default());
    }

    #[test]
    fn the_newest_of_equal_facts_comes_first_and_each_once() {
        let conversation = vec![
            "My car is red.".to_string(),
            "My car is blue.".to_string(),
            "my car is blue.".to_string(),
        ];
        let r = recall(&[], &conversation, "my car", &[], 100, words);
        assert_eq!(r.injected, ["my car is blue.", "My car is red."]);
        // The same input gives the same output.
        for _ in 0..10 {
            assert_eq!(recall(&[], &conversation, "my car", &[], 100, words), r);
        }
    }
}
