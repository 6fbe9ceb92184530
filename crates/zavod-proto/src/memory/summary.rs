//! Running summaries: the turns of a conversation that no longer fit a
//! prompt are folded, with the summary before them, into a new summary
//! written by the mesh's own model, and the summary stands in for them in
//! later prompts.
//!
//! A summary is an entry of the conversation like a turn, replicated,
//! repaired and deleted with it: one [`Role::Summary`] turn, stamped with
//! the sequence of the newest entry it covers (and an id of its own). Its
//! place in the conversation is what it covers: every entry whose sequence
//! is at most its own. The newest summary wins; two folded at once by two
//! nodes are both kept, and the later one is used.
//!
//! Invariants: a fold covers only entries older than the ones a prompt
//! still holds, so no turn is both summarized and in the prompt; the
//! request's text is bounded ([`MAX_FOLD_BYTES`]); nothing here runs a
//! model or reads a clock.

use crate::chat::prompt::{Role, Turn};
use crate::limits::MAX_FOLD_BYTES;
use crate::memory::log::{Entry, Stamp};

/// The fewest entries (a user turn and its answer each) worth a fold: a
/// fold runs the model, so it waits until a few turns are out.
pub const MIN_FOLD_ENTRIES: usize = 4;

/// The newest summary among `entries` (by stamp), if any, and what follows
/// it: the entries it does not cover, oldest first.
pub fn split(entries: &[Entry]) -> (Option<&Entry>, Vec<&Entry>) {
    let summary = entries.iter().rev().find(|e| is_summary(e));
    let after = entries
        .iter()
        .filter(|e| !is_summary(e))
        .filter(|e| summary.is_none_or(|s| e.stamp.seq > s.stamp.seq))
        .collect();
    (summary, after)
}

/// Whether an entry is a summary.
pub fn is_summary(e: &Entry) -> bool {
    e.turns.first().is_some_and(|t| t.role == Role::Summary)
}

/// The summary's text.
pub fn text_of(e: &Entry) -> Option<&str> {
    e.turns
        .first()
        .filter(|t| t.role == Role::Summary)
        .map(|t| t.text.as_str())
}

/// What one fold summarizes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fold {
    /// The summary it extends.
    pub previous: Option<String>,
    /// The turns it folds in, oldest first (facts left out).
    pub turns: Vec<Turn>,
    /// The newest entry folded: the new summary's place.
    pub through: Stamp,
}

/// The fold due for a conversation whose prompt holds its newest
/// `in_prompt` uncovered entries: every older uncovered entry, when there
/// are at least [`MIN_FOLD_ENTRIES`] of them. The request's text stays
/// within [`MAX_FOLD_BYTES`]: a fold that would pass it takes its oldest
/// entries only (the next takes the rest).
pub fn due(entries: &[Entry], in_prompt: usize) -> Option<Fold> {
    let (summary, after) = split(entries);
    let out = after.len().saturating_sub(in_prompt);
    if out < MIN_FOLD_ENTRIES {
        return None;
    }
    let previous = summary.and_then(text_of).map(str::to_owned);
    let mut bytes = previous.as_ref().map_or(0, String::len);
    let mut turns = Vec::new();
    let mut through = None;
    for e in &after[..out] {
        let size: usize = e.turns.iter().map(|t| t.text.len()).sum();
        if through.is_some() && bytes + size > MAX_FOLD_BYTES {
            break;
        }
        bytes += size;
        turns.extend(e.turns.iter().filter(|t| t.role != Role::Fact).cloned());
        through = Some(e.stamp);
    }
    Some(Fold {
        previous,
        turns,
        through: through?,
    })
}

/// The request that asks the model for the fold's summary.
pub fn request(fold: &Fold) -> Vec<Turn> {
    let mut text = String::from(
        "Summarize this conversation between a user and an assistant in at most three short \
         sentences. Keep names, numbers and what the user asked for.\n\n",
    );
    if let Some(p) = &fold.previous {
        text.push_str("Summary so far: ");
        text.push_str(p);
        text.push_str("\n\n");
    }
    text.push_str("Conversation:\n");
    for t in &fold.turns {
        // Whole bytes only, within the bound.
        let mut end = t.text.len().min(MAX_FOLD_BYTES);
        while !t.text.is_char_boundary(end) {
            end -= 1;
        }
        text.push_str(t.role.as_str());
        text.push_str(": ");
        text.push_str(&t.text[..end]);
        text.push('\n');
    }
    vec![Turn {
        role: Role::User,
        tokens: crate::chat::prompt::estimate_tokens(&text),
        text,
    }]
}

/// The entry a summary is kept as: at the fold's place, under its own id.
pub fn entry(fold: &Fold, id: u64, text: String, tokens: u32) -> Entry {
    Entry {
        stamp: Stamp {
            seq: fold.through.seq,
            id,
        },
        turns: vec![Turn {
            role: Role::Summary,
            text,
            tokens,
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(seq: u64) -> Entry {
        Entry {
            stamp: Stamp { seq, id: seq },
            turns: vec![
                Turn {
                    role: Role::User,
                    text: format!("q{seq}"),
                    tokens: 1,
                },
                Turn {
                    role: Role::Assistant,
                    text: format!("a{seq}"),
                    tokens: 1,
                },
                Turn {
                    role: Role::Fact,
                    text: format!("My fact {seq}."),
                    tokens: 3,
                },
            ],
        }
    }

    #[test]
    fn the_turns_older_than_the_prompt_are_folded_into_the_newest_summary() {
        let mut entries: Vec<Entry> = (1..=8).map(turn).collect();
        // The prompt holds the newest four: four are out, one fold.
        let fold = due(&entries, 4).expect("a fold is due");
        assert_eq!(fold.previous, None);
        assert_eq!(fold.through, Stamp { seq: 4, id: 4 });
        let texts: Vec<&str> = fold.turns.iter().map(|t| t.text.as_str()).collect();
        assert_eq!(
            texts,
            ["q1", "a1", "q2", "a2", "q3", "a3", "q4", "a4"],
            "facts stay facts"
        );
        assert!(request(&fold)[0].text.contains("user: q1\nassistant: a1\n"));
        // Only three out: not yet.
        assert_eq!(due(&entries, 5), None);

        // Kept, it covers the first four; the next fold extends it.
        entries.push(entry(&fold, 99, "S1".into(), 1));
        entries.sort_by_key(|e| e.stamp);
        let (s, after) = split(&entries);
        assert_eq!(s.and_then(text_of), Some("S1"));
        assert_eq!(
            after.iter().map(|e| e.stamp.seq).collect::<Vec<_>>(),
            [5, 6, 7, 8]
        );
        assert_eq!(due(&entries, 1), None, "three out are not enough");
        let next = due(&entries, 0).expect("due again");
        assert_eq!(next.previous.as_deref(), Some("S1"));
        assert_eq!(next.through.seq, 8);
        assert!(request(&next)[0].text.contains("Summary so far: S1"));
    }

    #[test]
    fn a_fold_stays_within_its_bound() {
        let big = |seq: u64| {
            let mut e = turn(seq);
            e.turns[0].text = "x".repeat(MAX_FOLD_BYTES / 2);
            e
        };
        let entries: Vec<Entry> = (1..=6).map(big).collect();
        let fold = due(&entries, 1).expect("due");
        assert_eq!(fold.through.seq, 1, "the rest waits for the next fold");
        assert!(request(&fold)[0].text.len() <= MAX_FOLD_BYTES + 1024);
    }
}
