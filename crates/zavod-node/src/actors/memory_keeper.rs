//! MemoryKeeper: each conversation's turns in the store (sled), prompt
//! assembly (the newest turns that fit the context budget,
//! zavod_proto::chat::prompt::assemble), and a holder's own operations on
//! its conversations (list, export, delete: the memory protocol and
//! `/v1/conversations`). Every write goes to the store's group-commit
//! writer (`zavod_store::GroupWriter`) and is answered from there once a
//! sync covers it, so this actor never waits on the disk: a slow fsync
//! delays the writes waiting for it, not the next prompt. Deletions and
//! exports run on that writer too, ordered with the writes.
//! A request that would start a conversation past the holder's cap is
//! refused at assembly, before it is placed or run. Tokens are counted with this node's
//! model when it has one, else estimated on the safe side; the node that
//! generates formats the turns with its model's chat template.

use super::{NodeShared, error_frame};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::sync::Arc;
use zavod_proto::NodeId;
use zavod_proto::chat::prompt::{PromptBudget, Role, Turn, assemble};
use zavod_proto::limits::{MAX_EXPORT_PAGE_BYTES, MAX_LISTED_CONVERSATIONS};
use zavod_proto::wire::memory::{MemoryOp, MemoryReply};
use zavod_proto::wire::{ErrorCode, ErrorFrame};
use zavod_store::{ConvKey, ConversationStore, StoreError};

pub(crate) struct MemoryKeeper;

/// A prompt ready to be granted and run.
#[derive(Debug, Clone)]
pub struct PreparedPrompt {
    /// History that fits, oldest first, then the new message.
    pub turns: Vec<Turn>,
    pub history_turns: u32,
    pub estimated_tokens: u32,
    pub user_turn: Turn,
}

impl PreparedPrompt {
    /// Bytes of the turns' text (for learning how texts tokenize).
    pub fn text_bytes(&self) -> usize {
        self.turns.iter().map(|t| t.text.len()).sum()
    }

    /// The prompt for people to read (`--show-prompt`): as the model will
    /// see it when this node has the model, otherwise the turns one per
    /// line. Rendered only on request, off the first-token path.
    pub fn display(&self, model: Option<&dyn crate::backend::ModelBackend>) -> String {
        let plain = || {
            self.turns
                .iter()
                .map(|t| format!("{}: {}\n", t.role.as_str(), t.text))
                .collect()
        };
        match model {
            Some(m) => m
                .format_chat(&self.turns)
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
        answer_tokens: u32,
        /// Context of the model that will answer.
        context_tokens: u32,
        reply: RpcReplyPort<Result<PreparedPrompt, ErrorFrame>>,
    },
    /// Appends turns; replies once they are durable.
    Record {
        key: ConvKey,
        turns: Vec<Turn>,
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
        match msg {
            MemoryMsg::Assemble {
                model,
                key,
                supplied,
                message,
                answer_tokens,
                context_tokens,
                reply,
            } => {
                let _ = reply.send(prepare(
                    shared,
                    &model,
                    key.as_ref(),
                    supplied,
                    message,
                    answer_tokens,
                    context_tokens,
                ));
            }
            MemoryMsg::Record { key, turns, reply } => {
                // The writer thread applies it, in order with every other
                // write, and answers once a sync covers it; this actor goes
                // on assembling prompts meanwhile.
                let conversation = key.conversation.clone();
                let done = move |r: Result<(), StoreError>| {
                    let r = r.map_err(|e| e.to_string());
                    if let Err(e) = &r {
                        tracing::error!(%conversation, error = %e, "could not record turns");
                    }
                    if let Some(reply) = reply {
                        let _ = reply.send(r);
                    }
                };
                // A full queue is reported through `done` as well.
                let _ = shared.writer.append(key, turns, done);
            }
            MemoryMsg::Own { owner, op, reply } => {
                let refused =
                    |m: String| MemoryReply::Refused(error_frame(ErrorCode::NoCapacity, m));
                let (tx, rx) = tokio::sync::oneshot::channel();
                match shared.writer.run(move |store| {
                    let _ = tx.send(own(store, owner, op));
                }) {
                    Ok(()) => {
                        // Answered off this actor, so a slow write does not
                        // hold up prompt assembly.
                        tokio::spawn(async move {
                            let r = rx
                                .await
                                .unwrap_or_else(|_| refused("the memory writer stopped".into()));
                            let _ = reply.send(r);
                        });
                    }
                    Err(busy) => {
                        let _ = reply.send(refused(busy.to_string()));
                    }
                }
            }
        }
        Ok(())
    }
}

/// One holder's operation on its own conversations.
fn own(store: &dyn ConversationStore, owner: NodeId, op: MemoryOp) -> MemoryReply {
    let failed = |e: StoreError| {
        tracing::error!(error = %e, "memory operation failed");
        MemoryReply::Refused(error_frame(ErrorCode::Internal, format!("memory: {e}")))
    };
    let key = |conversation| ConvKey {
        owner,
        conversation,
    };
    match op {
        MemoryOp::List => match store.conversations(&owner) {
            Ok(mut names) => {
                let truncated = names.len() > MAX_LISTED_CONVERSATIONS;
                names.truncate(MAX_LISTED_CONVERSATIONS);
                MemoryReply::Conversations { names, truncated }
            }
            Err(e) => failed(e),
        },
        MemoryOp::Export { conversation, from } => {
            let k = key(conversation);
            match store
                .contains(&k)
                .and_then(|held| Ok((held, store.page(&k, from, MAX_EXPORT_PAGE_BYTES)?)))
            {
                Ok((held, page)) => MemoryReply::Turns {
                    turns: page.turns,
                    next: page.next,
                    held,
                },
                Err(e) => failed(e),
            }
        }
        MemoryOp::Delete { conversation } => match store.clear(&key(conversation)) {
            Ok(held) => MemoryReply::Deleted {
                conversations: u32::from(held),
            },
            Err(e) => failed(e),
        },
        MemoryOp::DeleteAll => {
            let mut deleted = 0u32;
            // Each round takes every one listed, so one round empties the
            // list unless writes race it; a few more take those.
            for _round in 0..4 {
                let names = match store.conversations(&owner) {
                    Ok(n) => n,
                    Err(e) => return failed(e),
                };
                if names.is_empty() {
                    break;
                }
                for c in names {
                    match store.clear(&key(c)) {
                        Ok(held) => deleted += u32::from(held),
                        Err(e) => return failed(e),
                    }
                }
            }
            MemoryReply::Deleted {
                conversations: deleted,
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn prepare(
    shared: &NodeShared,
    model: &str,
    key: Option<&ConvKey>,
    supplied: Vec<(Role, String)>,
    message: String,
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
    let history = match key {
        Some(k) => {
            shared.store.check_room(k).map_err(|e| match e {
                StoreError::TooManyConversations { .. } => {
                    error_frame(ErrorCode::Forbidden, e.to_string())
                }
                e => error_frame(ErrorCode::Internal, format!("memory: {e}")),
            })?;
            let mut h: Vec<Turn> = supplied
                .into_iter()
                .filter(|(role, _)| *role == Role::System)
                .map(|(role, text)| turn(role, text))
                .collect();
            h.extend(
                shared
                    .store
                    .recent(k, shared.config.memory.max_history_turns)
                    .map_err(|e| error_frame(ErrorCode::Internal, format!("memory: {e}")))?,
            );
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
    let budget = PromptBudget {
        context_tokens,
        per_turn_overhead_tokens: shared.config.memory.per_turn_overhead_tokens,
    };
    let assembled = assemble(&history, user_turn.clone(), answer_tokens, &budget)
        .map_err(|e| error_frame(ErrorCode::BadRequest, e.to_string()))?;
    Ok(PreparedPrompt {
        turns: assembled.turns,
        history_turns: assembled.history_turns,
        estimated_tokens: assembled.tokens,
        user_turn,
    })
}
