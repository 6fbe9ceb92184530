//! MemoryKeeper: each conversation's turns in the store (sled), and prompt
//! assembly: the newest turns that fit the context budget
//! (zavod_proto::chat::prompt::assemble). Tokens are counted with this node's
//! model when it has one, else estimated on the safe side; the node that
//! generates formats the turns with its model's chat template.

use super::{NodeShared, error_frame};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::sync::Arc;
use zavod_proto::chat::prompt::{PromptBudget, Role, Turn, assemble};
use zavod_proto::wire::{ErrorCode, ErrorFrame};
use zavod_store::ConvKey;

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
                // Appending flushes to disk; off the runtime's threads, which
                // may be a single one that also streams every answer's tokens.
                // Awaiting it here keeps this actor's writes in order.
                let store = Arc::clone(shared);
                let conversation = key.conversation.clone();
                let r = tokio::task::spawn_blocking(move || {
                    store.store.append(&key, &turns).map_err(|e| e.to_string())
                })
                .await
                .unwrap_or_else(|e| Err(format!("the write task failed: {e}")));
                if let Err(e) = &r {
                    tracing::error!(%conversation, error = %e, "could not record turns");
                }
                if let Some(reply) = reply {
                    let _ = reply.send(r);
                }
            }
        }
        Ok(())
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
