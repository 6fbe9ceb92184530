//! MemoryKeeper: conversation memory for this node's requests and its
//! holders. A conversation lives on its replicas (`crate::replication`:
//! placement over the mesh, quorum reads and writes, repairs, sync), not
//! on whichever node a client reached: prompt assembly reads it from a
//! read quorum (the newest turns that fit the context budget,
//! zavod_proto::chat::prompt::assemble), and an answered turn is written
//! to a write quorum before the client is told it is kept. Long-term
//! memory joins the prompt here: the conversation's summary heads it in
//! place of the turns it covers (`zavod_proto::memory::summary`, written
//! by `crate::summaries` once a kept turn leaves older ones out), and the
//! facts recalled for the new message go ahead of it
//! (`zavod_proto::memory::recall`). A holder's own operations (the memory
//! protocol and `/v1/conversations`) are `crate::holders`'. This actor
//! only starts that work; each piece runs in its own task, so a slow
//! replica delays its own request, never the next prompt.
//! A request that would start a conversation past the holder's cap on
//! this node is refused at assembly, before it is placed or run (each
//! replica enforces its own cap on the write). Tokens are counted with
//! this node's model when it has one, else estimated on the safe side;
//! the node that generates formats the turns with its model's chat
//! template.

use super::{NodeShared, error_frame};
use crate::replication::{self, Written};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::sync::Arc;
use zavod_proto::NodeId;
use zavod_proto::chat::prompt::{PromptBudget, Role, Turn, assemble};
use zavod_proto::memory::recall::{Recall, recall, with_recall};
use zavod_proto::memory::summary;
use zavod_proto::memory::{ConvKey, Entry, Held};
use zavod_proto::wire::memory::{MemoryOp, MemoryReply};
use zavod_proto::wire::{ErrorCode, ErrorFrame};
use zavod_store::StoreError;

/// How a prompt introduces the conversation's summary.
const SUMMARY_HEADER: &str = "Summary of the conversation so far:";

pub(crate) struct MemoryKeeper;

/// A prompt ready to be granted and run.
#[derive(Debug, Clone)]
pub struct PreparedPrompt {
    /// History that fits, oldest first, then the new message.
    pub turns: Vec<Turn>,
    pub history_turns: u32,
    pub estimated_tokens: u32,
    pub user_turn: Turn,
    /// What the conversation's read found, for stamping the turn when it
    /// is recorded: the floor, and the newest entry's sequence.
    pub floor: u64,
    pub newest_seq: Option<u64>,
    /// The id the turn's entry is kept under (one per request).
    pub entry_id: u64,
    /// What long-term memory put ahead of the new message.
    pub recalled: Recall,
    /// The conversation's summary, as the prompt holds it.
    pub summary: Option<String>,
    /// Of the conversation's entries after its summary, how many there are
    /// and how many the prompt holds (the rest are due to be summarized).
    pub in_prompt_entries: usize,
    pub uncovered_entries: usize,
}

impl PreparedPrompt {
    /// Whether turns the prompt no longer holds are due to be summarized
    /// once this turn is kept.
    pub fn fold_due(&self) -> bool {
        self.uncovered_entries
            .saturating_sub(self.in_prompt_entries)
            >= summary::MIN_FOLD_ENTRIES
    }
}

impl PreparedPrompt {
    /// Bytes of the turns' text (for learning how texts tokenize).
    pub fn text_bytes(&self) -> usize {
        self.turns.iter().map(|t| t.text.len()).sum()
    }

    /// The prompt for people to read (`--show-prompt`): as the model will
    /// see it when this node has the model, otherwise the turns one per
    /// line. Rendered only on request, off the first-token path.
    /// What long-term memory injected is marked `«memory» … «/memory»`
    /// (for people only; the model sees it unmarked).
    pub fn display(&self, model: Option<&dyn crate::backend::ModelBackend>) -> String {
        let mut turns = self.turns.clone();
        if let Some(summary) = &self.summary
            && let Some(t) = turns.iter_mut().find(|t| t.text.contains(summary.as_str()))
        {
            t.text = t.text.replace(
                summary.as_str(),
                &format!("«summary»\n{summary}\n«/summary»"),
            );
        }
        if let (Some(text), Some(last)) = (&self.recalled.text, turns.last_mut()) {
            last.text = with_recall(
                &format!("«memory»\n{text}\n«/memory»"),
                &self.user_turn.text,
            );
        }
        let plain = || {
            turns
                .iter()
                .map(|t| format!("{}: {}\n", t.role.as_str(), t.text))
                .collect()
        };
        match model {
            Some(m) => m
                .format_chat(&turns)
                .map(|p| p.joined())
                .unwrap_or_else(|_| plain()),
            None => plain(),
        }
    }
}

pub enum MemoryMsg {
    Assemble {
        /// The model the prompt is for (token counts depend on it).
        model: String,
        key: Option<ConvKey>,
        /// History the client sent with its request (the HTTP API's earlier
        /// messages). Without a conversation it is the whole history; with
        /// one, only its system messages are kept, ahead of the stored turns.
        supplied: Vec<(Role, String)>,
        message: String,
        /// The client's id for the turn, when it gave one: a turn sent
        /// again is not its own history.
        turn: Option<u64>,
        answer_tokens: u32,
        /// Context of the model that will answer.
        context_tokens: u32,
        reply: RpcReplyPort<Result<PreparedPrompt, ErrorFrame>>,
    },
    /// Writes a turn's entry to the conversation's replicas; replies once
    /// a write quorum has it on disk. Then keeps `holder_facts` (facts the
    /// turn stated about its holder in general) with the holder's facts.
    Record {
        key: ConvKey,
        floor: u64,
        entry: Entry,
        holder_facts: Vec<Turn>,
        /// When the prompt no longer held some older turns: the model to
        /// summarize them with, and how many entries the prompt held.
        fold: Option<(String, usize)>,
        reply: Option<RpcReplyPort<Result<(), String>>>,
    },
    /// A holder's operation on its own conversations.
    Own {
        owner: NodeId,
        op: MemoryOp,
        reply: RpcReplyPort<MemoryReply>,
    },
}

impl ractor::Message for MemoryMsg {}

impl Actor for MemoryKeeper {
    type Msg = MemoryMsg;
    type State = Arc<NodeShared>;
    type Arguments = Arc<NodeShared>;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        shared: Arc<NodeShared>,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(shared)
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        shared: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let shared = Arc::clone(shared);
        match msg {
            MemoryMsg::Assemble {
                model,
                key,
                supplied,
                message,
                turn,
                answer_tokens,
                context_tokens,
                reply,
            } => {
                tokio::spawn(async move {
                    let started = std::time::Instant::now();
                    let (held, holder_facts) = match &key {
                        Some(k) => match check_room(&shared, k) {
                            Ok(()) => {
                                let (held, facts) = tokio::join!(
                                    replication::read(&shared, k, false),
                                    crate::holders::read_holder_facts(&shared, k.owner)
                                );
                                (held.map(Some), facts)
                            }
                            Err(e) => (Err(e), Vec::new()),
                        },
                        None => (Ok(None), Vec::new()),
                    };
                    let read_us = started.elapsed().as_micros() as u64;
                    let prepared = held.and_then(|held| {
                        prepare(
                            &shared,
                            &model,
                            held,
                            holder_facts,
                            supplied,
                            message,
                            turn,
                            answer_tokens,
                            context_tokens,
                        )
                    });
                    if let Ok(p) = &prepared {
                        tracing::debug!(
                            read_us,
                            total_us = started.elapsed().as_micros() as u64,
                            recalled = p.recalled.injected.len(),
                            summary = p.summary.is_some(),
                            "prompt assembled"
                        );
                    }
                    let _ = reply.send(prepared);
                });
            }
            MemoryMsg::Record {
                key,
                floor,
                entry,
                holder_facts,
                fold,
                reply,
            } => {
                tokio::spawn(async move {
                    let conversation = key.conversation.clone();
                    let id = entry.stamp.id;
                    let started = std::time::Instant::now();
                    let written = replication::write(&shared, &key, floor, vec![entry]).await;
                    tracing::debug!(
                        %conversation,
                        us = started.elapsed().as_micros() as u64,
                        "turn written to a write quorum"
                    );
                    let r = match written {
                        Ok(Written::Acked) => Ok(()),
                        Ok(Written::Deleted) => {
                            Err("the conversation was deleted while this turn was answered".into())
                        }
                        Err(e) => Err(e.message),
                    };
                    if let Err(e) = &r {
                        tracing::error!(%conversation, error = %e, "could not record a turn");
                    }
                    let kept = r.is_ok();
                    if let Some(reply) = reply {
                        let _ = reply.send(r);
                    }
                    if kept && !holder_facts.is_empty() {
                        crate::holders::keep_holder_facts(&shared, &key, id, holder_facts).await;
                    }
                    if kept && let Some((model, in_prompt)) = fold {
                        crate::summaries::fold(Arc::clone(&shared), key, model, in_prompt).await;
                    }
                });
            }
            MemoryMsg::Own { owner, op, reply } => {
                tokio::spawn(async move {
                    let _ = reply.send(crate::holders::own(&shared, owner, op).await);
                });
            }
        }
        Ok(())
    }
}

/// Whether this node has room for the conversation: a holder past its cap
/// here is refused before any work (each replica checks its own cap again
/// when the turn is written).
pub(crate) fn check_room(shared: &NodeShared, key: &ConvKey) -> Result<(), ErrorFrame> {
    shared.store.check_room(key).map_err(|e| match e {
        StoreError::TooManyConversations { .. } => error_frame(ErrorCode::Forbidden, e.to_string()),
        e => error_frame(ErrorCode::Internal, format!("memory: {e}")),
    })
}

#[allow(clippy::too_many_arguments)]
fn prepare(
    shared: &NodeShared,
    model: &str,
    held: Option<Held>,
    holder_facts: Vec<String>,
    supplied: Vec<(Role, String)>,
    message: String,
    turn_id: Option<u64>,
    answer_tokens: u32,
    context_tokens: u32,
) -> Result<PreparedPrompt, ErrorFrame> {
    let turn = |role: Role, text: String| Turn {
        role,
        tokens: shared.count_tokens(model, &text),
        text,
    };
    // Without the model here, stored counts were estimates made when less
    // was known of how its texts tokenize: count again. (Answers' counts
    // are the tokens generated, exact.)
    let exact = shared.model(model).is_some();
    let (floor, newest_seq) = held.as_ref().map_or((0, None), |h| {
        (h.floor, h.entries.last().map(|e| e.stamp.seq))
    });
    let mut conversation_facts = Vec::new();
    let mut summary_text: Option<String> = None;
    let mut uncovered_entries = 0;
    let history = match held {
        Some(held) => {
            let mut h: Vec<Turn> = supplied
                .into_iter()
                .filter(|(role, _)| *role == Role::System)
                .map(|(role, text)| turn(role, text))
                .collect();
            // A turn sent again after its entry failed may already be
            // kept under its id: it is being answered, not history.
            let entries: Vec<Entry> = held
                .entries
                .into_iter()
                .filter(|e| Some(e.stamp.id) != turn_id)
                .collect();
            // Facts stay recallable after their turns are summarized.
            conversation_facts = entries
                .iter()
                .flat_map(|e| &e.turns)
                .filter(|t| t.role == Role::Fact)
                .map(|t| t.text.clone())
                .collect();
            // The newest summary stands in for the turns it covers.
            let (summary, after) = summary::split(&entries);
            summary_text = summary
                .and_then(summary::text_of)
                .map(|t| format!("{SUMMARY_HEADER} {t}"));
            uncovered_entries = after.len();
            let stored: Vec<Turn> = after
                .iter()
                .flat_map(|e| &e.turns)
                .filter(|t| t.role != Role::Fact)
                .cloned()
                .collect();
            let max = shared.config.memory.max_history_turns;
            h.extend(stored[stored.len().saturating_sub(max)..].iter().cloned());
            if !exact {
                for t in h.iter_mut().filter(|t| t.role != Role::Assistant) {
                    t.tokens = shared.count_tokens(model, &t.text);
                }
            }
            h
        }
        None => supplied
            .into_iter()
            .map(|(role, text)| turn(role, text))
            .collect(),
    };
    let user_turn = turn(Role::User, message);
    // Long-term memory has its share of the context set aside when there
    // is anything to recall.
    let recall_budget = if holder_facts.is_empty() && conversation_facts.is_empty() {
        0
    } else {
        shared.config.memory.recall_tokens.min(context_tokens / 4)
    };
    let overhead = shared.config.memory.per_turn_overhead_tokens;
    // The summary is always in the prompt: its room is set aside too.
    let summary_turn = summary_text.as_ref().map(|t| turn(Role::System, t.clone()));
    let summary_cost = summary_turn
        .as_ref()
        .map_or(0, |t| t.tokens.saturating_add(overhead));
    let budget = PromptBudget {
        context_tokens: context_tokens
            .saturating_sub(recall_budget)
            .saturating_sub(summary_cost),
        per_turn_overhead_tokens: overhead,
    };
    let mut assembled = assemble(&history, user_turn.clone(), answer_tokens, &budget)
        .map_err(|e| error_frame(ErrorCode::BadRequest, e.to_string()))?;
    // Each kept entry has one user turn: those in the prompt, before the
    // new message, are the entries it holds.
    let in_prompt_entries = assembled.turns[..assembled.turns.len().saturating_sub(1)]
        .iter()
        .filter(|t| t.role == Role::User)
        .count();
    if let Some(st) = summary_turn {
        assembled.tokens = assembled.tokens.saturating_add(summary_cost);
        let several = assembled.turns.len() > 1;
        match assembled.turns.first_mut() {
            // One system turn at the head: every chat template takes that.
            Some(first) if first.role == Role::System && several => {
                first.text = format!("{}\n\n{}", first.text, st.text);
                first.tokens = first.tokens.saturating_add(st.tokens);
            }
            _ => assembled.turns.insert(0, st),
        }
    }
    let recalled = {
        let in_context: Vec<&str> = assembled.turns.iter().map(|t| t.text.as_str()).collect();
        recall(
            &holder_facts,
            &conversation_facts,
            &user_turn.text,
            &in_context,
            recall_budget,
            |t| shared.count_tokens(model, t),
        )
    };
    if let (Some(text), Some(last)) = (&recalled.text, assembled.turns.last_mut()) {
        last.text = with_recall(text, &last.text);
        last.tokens = last.tokens.saturating_add(recalled.tokens);
        assembled.tokens = assembled.tokens.saturating_add(recalled.tokens);
    }
    let entry_id = match turn_id {
        Some(id) => id,
        None => {
            let mut id = [0u8; 8];
            getrandom::fill(&mut id).map_err(|e| {
                error_frame(
                    ErrorCode::Internal,
                    format!("no randomness for a turn id: {e}"),
                )
            })?;
            u64::from_be_bytes(id)
        }
    };
    Ok(PreparedPrompt {
        turns: assembled.turns,
        history_turns: assembled.history_turns,
        estimated_tokens: assembled.tokens,
        user_turn,
        floor,
        newest_seq,
        entry_id,
        recalled,
        summary: summary_text,
        in_prompt_entries,
        uncovered_entries,
    })
}
