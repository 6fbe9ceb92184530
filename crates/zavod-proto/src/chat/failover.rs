//! Mid-stream failover, as two small state machines: the client's record of
//! an answer arriving token by token ([`AnswerStream`]), and the entry's
//! record of an answer resumed across targets that failed ([`Resumption`]).
//! The node's client and entry drive them over the network; the simulator
//! drives the same ones over its virtual network.
//!
//! Invariants:
//! - the client's text is its accepted tokens in index order, with no gap
//!   and no duplicate; a token out of order is an error, never appended;
//! - a source the entry redirected to counts its tokens from 0, and the
//!   client places them after what it already had;
//! - the entry only takes a resume whose answer extends what it already
//!   knew, has one id per token and leaves budget to generate; a target
//!   that failed is excluded from every later placement of the answer;
//! - resumes are bounded on both sides.

use crate::NodeId;
use crate::wire::{GenParams, StopReason};

/// A token that arrived out of order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("token {got} arrived, expected {expected}")]
pub struct OutOfOrder {
    pub got: u32,
    pub expected: u32,
}

/// What the client sends the entry to have the rest of an answer placed
/// elsewhere: everything it has so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeRequest {
    pub answer: String,
    pub tokens: u32,
    pub ids: Vec<i32>,
}

/// What the client does when the node it streams from fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnFailure {
    /// The first target failed before streaming anything (unreachable,
    /// or it refused): ask the entry to fetch the answer itself; it may
    /// reach what the client cannot, or place it elsewhere.
    Relay,
    /// Ask the entry to place the rest of the answer elsewhere.
    Resume(ResumeRequest),
    /// The target said it was full before streaming anything: tell the
    /// entry, which places the answer elsewhere.
    Full,
    /// A later target refused, or the answer was resumed too often
    /// already: it ends with the error.
    GiveUp,
}

/// The client's side: the answer so far and where the current source
/// started.
#[derive(Debug, Clone, Default)]
pub struct AnswerStream {
    text: String,
    ids: Vec<i32>,
    next_index: u32,
    /// The answer's index of a redirected source's token 0.
    base: u32,
    resumes: u32,
    max_resumes: u32,
    /// Targets that said they were full.
    fulls: usize,
}

impl AnswerStream {
    pub fn new(max_resumes: u32) -> Self {
        AnswerStream {
            max_resumes,
            ..Default::default()
        }
    }

    /// A target the entry redirected to starts streaming; its indices count
    /// from 0 and continue the answer.
    pub fn start_source(&mut self) {
        self.base = self.next_index;
    }

    /// A token with its index in the whole answer (what the entry itself
    /// streams). Returns the index.
    pub fn on_token(&mut self, index: u32, text: &str, id: i32) -> Result<u32, OutOfOrder> {
        if index != self.next_index {
            return Err(OutOfOrder {
                got: index,
                expected: self.next_index,
            });
        }
        self.next_index += 1;
        self.text.push_str(text);
        self.ids.push(id);
        Ok(index)
    }

    /// A token from a redirected source, indexed from that source's start.
    /// Returns its index in the whole answer.
    pub fn on_source_token(&mut self, index: u32, text: &str, id: i32) -> Result<u32, OutOfOrder> {
        self.on_token(index.saturating_add(self.base), text, id)
    }

    /// Whether the current source has streamed anything yet.
    fn source_started(&self) -> bool {
        self.next_index > self.base
    }

    /// How long to wait for the current source's next token: `stall_ms`
    /// once it streams, `first_token_ms` before (a prompt takes a while).
    pub fn wait_ms(&self, first_token_ms: u64, stall_ms: u64) -> u64 {
        if self.source_started() {
            stall_ms
        } else {
            first_token_ms
        }
    }

    /// The current source failed (`refused`: it said no, rather than died
    /// or went silent). Counts a resume when it asks for one.
    pub fn on_failure(&mut self, refused: bool) -> OnFailure {
        if self.next_index == 0 && self.resumes == 0 {
            OnFailure::Relay
        } else if refused {
            OnFailure::GiveUp
        } else if self.resumes < self.max_resumes {
            self.resumes += 1;
            OnFailure::Resume(ResumeRequest {
                answer: self.text.clone(),
                tokens: self.next_index,
                ids: self.ids.clone(),
            })
        } else {
            OnFailure::GiveUp
        }
    }

    /// The current source refused the run because all its slots were
    /// busy. Counts a full target when the entry will place it again.
    pub fn on_full(&mut self) -> OnFailure {
        if !self.source_started() && self.fulls < crate::limits::MAX_FULL_TARGETS {
            self.fulls += 1;
            OnFailure::Full
        } else {
            self.on_failure(true)
        }
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn tokens(&self) -> u32 {
        self.next_index
    }

    pub fn ids(&self) -> &[i32] {
        &self.ids
    }
}

/// Why the entry will not resume an answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResumeError {
    #[error("{0} nodes already failed this answer")]
    TooManyFailures(usize),
    #[error("the resume has {got} tokens, fewer than the {had} already streamed")]
    Shrunk { got: u32, had: u32 },
    #[error("the answer already has {tokens} tokens, its whole budget of {max_tokens}")]
    BudgetSpent { tokens: u32, max_tokens: u32 },
    #[error("the answer does not begin with the part already streamed")]
    NotAnExtension,
    #[error("{ids} token ids for {tokens} tokens")]
    IdCount { ids: usize, tokens: u32 },
}

/// The entry's side: what failed targets streamed before they failed, and
/// who they were.
#[derive(Debug, Clone)]
pub struct Resumption {
    answer: String,
    tokens: u32,
    ids: Vec<i32>,
    failed: Vec<NodeId>,
    max_tokens: u32,
    max_failed: usize,
}

impl Resumption {
    /// A fresh answer of at most `max_tokens`, resumed after at most
    /// `max_failed` failed targets.
    pub fn new(max_tokens: u32, max_failed: usize) -> Self {
        Resumption {
            answer: String::new(),
            tokens: 0,
            ids: Vec::new(),
            failed: Vec::new(),
            max_tokens,
            max_failed,
        }
    }

    /// The client says `target` failed; `r` is the whole answer it has.
    /// On success the caller counts the failure in `target`'s breaker and
    /// places the rest with [`Resumption::exclude`] and
    /// [`Resumption::params`].
    pub fn on_resume(&mut self, target: NodeId, r: ResumeRequest) -> Result<(), ResumeError> {
        self.check_room()?;
        self.take(r)?;
        self.failed.push(target);
        Ok(())
    }

    /// The answer was begun through an entry that failed, which streamed
    /// `r` of it: this entry has the rest generated after it. No target
    /// is known to have failed (the entry did).
    pub fn continue_from(&mut self, r: ResumeRequest) -> Result<(), ResumeError> {
        self.take(r)
    }

    /// Takes `r` as the answer so far, if it extends what was known.
    fn take(&mut self, r: ResumeRequest) -> Result<(), ResumeError> {
        if r.tokens < self.tokens {
            return Err(ResumeError::Shrunk {
                got: r.tokens,
                had: self.tokens,
            });
        }
        if !r.answer.starts_with(self.answer.as_str()) {
            return Err(ResumeError::NotAnExtension);
        }
        if r.ids.len() != r.tokens as usize {
            return Err(ResumeError::IdCount {
                ids: r.ids.len(),
                tokens: r.tokens,
            });
        }
        self.check_budget(r.tokens)?;
        self.answer = r.answer;
        self.tokens = r.tokens;
        self.ids = r.ids;
        Ok(())
    }

    /// `target`, which this node was fetching from itself, failed after
    /// streaming `tail` (its text) with `tail_ids` (one per token).
    pub fn on_fetch_failed(
        &mut self,
        target: NodeId,
        tail: &str,
        tail_ids: &[i32],
    ) -> Result<(), ResumeError> {
        self.check_room()?;
        let tokens = self.tokens.saturating_add(tail_ids.len() as u32);
        self.check_budget(tokens)?;
        self.failed.push(target);
        self.answer.push_str(tail);
        self.ids.extend_from_slice(tail_ids);
        self.tokens = tokens;
        Ok(())
    }

    fn check_room(&self) -> Result<(), ResumeError> {
        if self.failed.len() >= self.max_failed {
            Err(ResumeError::TooManyFailures(self.failed.len()))
        } else {
            Ok(())
        }
    }

    fn check_budget(&self, tokens: u32) -> Result<(), ResumeError> {
        if tokens >= self.max_tokens {
            Err(ResumeError::BudgetSpent {
                tokens,
                max_tokens: self.max_tokens,
            })
        } else {
            Ok(())
        }
    }

    /// Nodes that failed this answer: never placed on again for it.
    pub fn exclude(&self) -> &[NodeId] {
        &self.failed
    }

    /// Parameters for the rest: the same request, continued after the
    /// tokens already streamed, within what is left of the budget.
    pub fn params(&self, params: &GenParams) -> GenParams {
        let mut p = params.clone();
        p.resume_tokens = self.ids.clone();
        p.max_tokens = self.max_tokens.saturating_sub(self.tokens).max(1);
        p
    }

    /// Tokens streamed before the current target: where its count starts.
    pub fn tokens(&self) -> u32 {
        self.tokens
    }

    /// The text streamed before the current target.
    pub fn answer(&self) -> &str {
        &self.answer
    }

    /// The current target's part of a whole `answer` the client reports,
    /// if it extends what came before.
    pub fn tail_of<'a>(&self, answer: &'a str) -> Option<&'a str> {
        answer.strip_prefix(self.answer.as_str())
    }

    /// The whole answer, given the current target's part.
    pub fn whole(&self, tail: &str) -> String {
        format!("{}{tail}", self.answer)
    }

    /// How the answer is booked once its last target finished with
    /// `tail_tokens` tokens (see [`Booking`]); `stop` is how it ended,
    /// `None` when only the client's receipt says it ended.
    pub fn book(&self, tail_tokens: u32, stop: Option<StopReason>) -> Booking {
        let tokens = self.tokens.saturating_add(tail_tokens);
        Booking {
            charged_tokens: tokens.min(self.max_tokens),
            answer_tokens: tokens,
            record: stop != Some(StopReason::Cancelled),
        }
    }
}

/// The one rule for a finished answer, whichever way it finished (run by
/// the entry, fetched from a target by the entry, or fetched by the
/// client and reported by receipt or by the target): the credential is
/// charged every part's tokens within the answer's reservation, and the
/// turn is kept, whole, unless the answer was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Booking {
    pub charged_tokens: u32,
    /// The whole answer's tokens, as the turn records them.
    pub answer_tokens: u32,
    pub record: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_books_an_answer_by_one_rule() {
        let mut r = Resumption::new(20, 3);
        let fresh = r.book(7, Some(StopReason::EndOfGeneration));
        assert_eq!(
            fresh,
            Booking {
                charged_tokens: 7,
                answer_tokens: 7,
                record: true
            }
        );
        // Cancelled: charged, not kept.
        assert!(!r.book(7, Some(StopReason::Cancelled)).record);
        // Only a receipt: kept.
        assert!(r.book(7, None).record);
        // After a failover both parts count, within the reservation.
        r.on_resume(
            node(1),
            ResumeRequest {
                answer: "abc".into(),
                tokens: 12,
                ids: vec![1; 12],
            },
        )
        .expect("resume");
        let b = r.book(15, Some(StopReason::MaxTokens));
        assert_eq!((b.charged_tokens, b.answer_tokens), (20, 27));
    }

    fn node(n: u8) -> NodeId {
        NodeId([n; 32])
    }

    fn feed(s: &mut AnswerStream, from: u32, to: u32) {
        for (rel, i) in (from..to).enumerate() {
            s.on_source_token(rel as u32, &format!("{i} "), i as i32)
                .expect("in order");
        }
    }

    #[test]
    fn tokens_out_of_order_are_refused_and_not_kept() {
        let mut s = AnswerStream::new(3);
        s.on_token(0, "a", 1).expect("first");
        assert_eq!(
            s.on_token(0, "a", 1),
            Err(OutOfOrder {
                got: 0,
                expected: 1
            })
        );
        assert_eq!(
            s.on_token(2, "c", 3),
            Err(OutOfOrder {
                got: 2,
                expected: 1
            })
        );
        assert_eq!((s.text(), s.tokens(), s.ids()), ("a", 1, &[1][..]));
    }

    #[test]
    fn failure_before_any_token_relays_then_resumes_then_gives_up() {
        let mut s = AnswerStream::new(2);
        assert_eq!(s.on_failure(false), OnFailure::Relay);
        s.on_token(0, "x", 7).expect("in order");
        assert!(matches!(s.on_failure(false), OnFailure::Resume(r) if r.tokens == 1));
        assert!(matches!(s.on_failure(false), OnFailure::Resume(_)));
        assert_eq!(
            s.on_failure(false),
            OnFailure::GiveUp,
            "two resumes allowed"
        );
        let mut s = AnswerStream::new(2);
        assert_eq!(s.on_failure(true), OnFailure::Relay, "a first refusal");
        s.on_token(0, "x", 7).expect("in order");
        assert_eq!(s.on_failure(true), OnFailure::GiveUp, "a later refusal");
    }

    #[test]
    fn a_full_target_is_passed_on_a_bounded_number_of_times() {
        use crate::limits::MAX_FULL_TARGETS;
        let mut s = AnswerStream::new(2);
        for _ in 0..MAX_FULL_TARGETS {
            assert_eq!(s.on_full(), OnFailure::Full);
            s.start_source();
        }
        assert_eq!(
            s.on_full(),
            OnFailure::Relay,
            "then it is a refusal like any other"
        );
        let mut s = AnswerStream::new(2);
        s.start_source();
        s.on_source_token(0, "x", 7).expect("in order");
        assert_eq!(
            s.on_full(),
            OnFailure::GiveUp,
            "a source that streamed cannot say it was full"
        );
    }

    #[test]
    fn the_wait_is_longer_until_a_source_streams() {
        let mut s = AnswerStream::new(1);
        assert_eq!(s.wait_ms(30_000, 10_000), 30_000);
        s.on_token(0, "a", 0).expect("in order");
        assert_eq!(s.wait_ms(30_000, 10_000), 10_000);
        s.start_source();
        assert_eq!(s.wait_ms(30_000, 10_000), 30_000, "a new source");
    }

    /// A client and an entry stepped through two failures: the client's
    /// text is whole, each target counts from 0, failed targets are
    /// excluded and the budget shrinks.
    #[test]
    fn an_answer_survives_two_failed_targets() {
        let mut client = AnswerStream::new(3);
        let mut entry = Resumption::new(30, 3);
        let params = GenParams {
            max_tokens: 30,
            ..Default::default()
        };
        client.start_source();
        feed(&mut client, 0, 8);
        let OnFailure::Resume(r) = client.on_failure(false) else {
            panic!("expected a resume");
        };
        entry.on_resume(node(1), r).expect("resumable");
        let p = entry.params(&params);
        assert_eq!((p.max_tokens, p.resume_tokens.len()), (22, 8));
        client.start_source();
        feed(&mut client, 8, 15);
        let OnFailure::Resume(r) = client.on_failure(false) else {
            panic!("expected a resume");
        };
        entry.on_resume(node(2), r).expect("resumable");
        assert_eq!(entry.exclude(), &[node(1), node(2)]);
        assert_eq!(entry.params(&params).max_tokens, 15);
        client.start_source();
        feed(&mut client, 15, 30);
        let expected: String = (0..30).map(|i| format!("{i} ")).collect();
        assert_eq!(client.text(), expected);
        assert_eq!(client.ids(), (0..30).collect::<Vec<i32>>());
        let tail = entry.tail_of(client.text()).expect("extends");
        assert!(tail.starts_with("15 "));
        assert_eq!(entry.whole(tail), expected);
    }

    #[test]
    fn the_entry_refuses_resumes_that_do_not_add_up() {
        let mut e = Resumption::new(10, 2);
        let r = |answer: &str, tokens: u32, ids: Vec<i32>| ResumeRequest {
            answer: answer.into(),
            tokens,
            ids,
        };
        e.on_resume(node(1), r("ab", 2, vec![1, 2])).expect("fine");
        assert_eq!(
            e.on_resume(node(2), r("a", 1, vec![1])),
            Err(ResumeError::Shrunk { got: 1, had: 2 })
        );
        assert_eq!(
            e.on_resume(node(2), r("xbc", 3, vec![1, 2, 3])),
            Err(ResumeError::NotAnExtension)
        );
        assert_eq!(
            e.on_resume(node(2), r("abc", 3, vec![1])),
            Err(ResumeError::IdCount { ids: 1, tokens: 3 })
        );
        assert_eq!(
            e.on_resume(node(2), r("abcdefghij", 10, (0..10).collect())),
            Err(ResumeError::BudgetSpent {
                tokens: 10,
                max_tokens: 10
            })
        );
        e.on_fetch_failed(node(2), "c", &[3]).expect("fine");
        assert_eq!((e.answer(), e.tokens()), ("abc", 3));
        assert_eq!(
            e.on_fetch_failed(node(3), "d", &[4]),
            Err(ResumeError::TooManyFailures(2))
        );
        assert_eq!(e.exclude(), &[node(1), node(2)], "refusals change nothing");
    }
}
