//! zavod-engine: text generation behind one small interface.
//!
//! [`Engine`] is what a model worker drives: submit a prepared prompt, get a
//! bounded stream of [`EngineEvent`]s back. Two implementations:
//! - [`llama::LlamaEngine`]: llama.cpp (llama-cpp-2) on its own OS thread,
//!   many sequences in one context (continuous batching), fed by a bounded
//!   queue; the blocking FFI never runs on an async runtime thread.
//! - [`cost::CostModelEngine`]: a timing model with no weights, for the
//!   simulator and for tests of routing and supervision. It is never used
//!   where a real answer is expected.
//!
//! Tokens leave the llama.cpp engine in batches when its stream interval is
//! set ([`pacing`]): one event, so one wake-up of the node, for several.
//! Finished sequences stay cached so prompts sharing their prefix prefill
//! only the rest ([`prompt_cache`]); requests beyond the slots wait in a
//! queue fair between credentials ([`queue`]).
//!
//! Invariants: every submitted job ends with exactly one terminal event
//! ([`EngineEvent::Done`] or [`EngineEvent::Failed`]) unless its receiver was
//! dropped (which cancels it); a slow receiver never stalls other jobs (its
//! job is failed instead); queues are bounded; a job's tokens arrive in
//! order, indices without gaps, and every token made before its terminal
//! event is handed over before it.

#![warn(unreachable_pub)]

pub mod cost;
pub mod embed;
pub mod family;
pub mod gguf;
pub mod grammar;
pub mod llama;
pub mod pacing;
pub mod prompt;
pub mod prompt_cache;
pub mod quantize;
pub mod queue;
pub mod sampling;
pub mod stops;
mod utf8;

pub use prompt::Prompt;
pub use prompt_cache::CacheTag;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::mpsc;
use zavod_proto::RequestId;
use zavod_proto::chat::prompt::Turn;
use zavod_proto::mesh::capacity::{ModelOffer, WorkerLoad};
use zavod_proto::wire::{DoneInfo, GenParams};

/// Tokens buffered per job before a receiver counts as too slow.
pub const JOB_EVENT_BUFFER: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model file {path}: {reason}")]
    ModelFile { path: String, reason: String },
    #[error("llama.cpp could not load model {path}: {reason}")]
    Load { path: String, reason: String },
    #[error("could not create an inference context: {0}")]
    Context(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("the engine queue is full ({0} jobs waiting)")]
    QueueFull(usize),
    #[error("the engine has stopped")]
    Stopped,
    #[error("bad engine configuration: {0}")]
    Config(String),
}

/// A prompt ready to run: already formatted with the chat template, its
/// markup apart from the turns' text.
#[derive(Debug)]
pub struct Job {
    pub id: RequestId,
    pub prompt: Prompt,
    pub params: GenParams,
    pub events: mpsc::Sender<EngineEvent>,
    pub cancel: CancelFlag,
    /// Whose prompt cache it may use, and what its cache is known by.
    pub cache: CacheTag,
}

/// Set to stop a job early; the engine ends it with `StopReason::Cancelled`.
#[derive(Debug, Clone, Default)]
pub struct CancelFlag(Arc<AtomicBool>);

impl CancelFlag {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    /// The job waits for a slot: `ahead` jobs go before it as the wait
    /// line stands (fair order between credentials). Emitted once, when
    /// it joins the line; never for a job that gets a slot at once.
    Queued {
        ahead: u32,
    },
    /// Emitted once, when the prompt has been tokenized and placed in a
    /// sequence.
    Started {
        prompt_tokens: u32,
        /// Of them, those whose KV cache was already computed (a prefix
        /// shared with an earlier prompt): only the rest is prefilled.
        cached_tokens: u32,
    },
    /// Generated tokens, in order, handed over together (see
    /// [`pacing`]); never empty.
    Tokens(Vec<GenToken>),
    Done(DoneInfo),
    Failed(String),
}

/// One generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct GenToken {
    /// Position in the answer, from 0.
    pub index: u32,
    /// The token's text; empty while it ends inside a UTF-8 character.
    pub text: String,
    /// The model's token id.
    pub id: i32,
}

/// Static facts about the loaded model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    pub name: String,
    pub quant: String,
    pub path: String,
    pub size_bytes: u64,
    /// Context tokens available to each sequence.
    pub context_tokens_per_seq: u32,
    pub slots: u32,
}

impl ModelInfo {
    pub fn offer(&self) -> ModelOffer {
        ModelOffer::new(
            self.name.clone(),
            self.quant.clone(),
            self.context_tokens_per_seq,
        )
    }
}

/// A text generator. Implementations are cheap handles; the work happens on
/// threads they own.
pub trait Engine: Send + Sync {
    fn info(&self) -> &ModelInfo;
    /// Queues a job; fails at once when the queue is full or the engine died.
    fn submit(&self, job: Job) -> Result<(), EngineError>;
    /// Current slots, queue and decode rate.
    fn load(&self) -> WorkerLoad;
    /// Model tokens in `text` (for context budgeting).
    fn count_tokens(&self, text: &str) -> u32;
    /// Formats turns with the model's chat template, ready for generation.
    fn format_chat(&self, turns: &[Turn]) -> Result<Prompt, EngineError>;
    /// Whether the engine's thread is still running.
    fn is_alive(&self) -> bool;
}

/// The name a model is known by in the mesh: its file name without `.gguf`.
pub fn model_name_from_path(path: &std::path::Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_the_file_name() {
        let p = std::path::Path::new("/m/gemma-3-270m-q4_k_m.gguf");
        assert_eq!(model_name_from_path(p), "gemma-3-270m-q4_k_m");
    }
}
