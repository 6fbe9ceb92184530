//! Embeddings with llama.cpp: a thread per model owns a context made for
//! them (embeddings on; the model's own pooling when its file names one,
//! else the mean of its last hidden states), started on first use so a
//! node that never embeds spends no memory on it.
//!
//! Invariants: inputs run one at a time, each whole in one batch, so an
//! input is at most [`Embedder::context_tokens`] long and is refused, not
//! cut, when longer; the queue is bounded ([`EMBED_QUEUE`] requests), and
//! a full queue is refused at once; vectors are L2-normalized, as OpenAI's
//! are, so a dot product is their cosine.

use crate::EngineError;
use crate::llama::{LoadedModel, backend};
use llama_cpp_2::context::params::{LlamaContextParams, LlamaPoolingType};
use llama_cpp_2::llama_batch::LlamaBatch;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use tokio::sync::oneshot;

/// Embedding requests that may wait for the embedder thread.
pub const EMBED_QUEUE: usize = 16;
/// Longest input, in tokens, whatever the model's context: the whole
/// input is one batch, and the compute buffers grow with its square.
pub const EMBED_CONTEXT_TOKENS_MAX: u32 = 2048;

/// The vectors of a request's inputs, in order, and the tokens they came to.
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    pub vectors: Vec<Vec<f32>>,
    pub prompt_tokens: u32,
}

/// The answer to one request, sent back from the embedder thread.
pub type EmbedReply = oneshot::Receiver<Result<Embeddings, EngineError>>;

struct EmbedJob {
    inputs: Vec<String>,
    reply: oneshot::Sender<Result<Embeddings, EngineError>>,
}

/// A running embedder thread; dropping it ends the thread once the queue
/// is empty.
pub struct Embedder {
    tx: SyncSender<EmbedJob>,
    context_tokens: u32,
}

impl Embedder {
    /// Starts the thread and waits until its context exists, so a model
    /// that cannot embed is reported at the first request, not hung on.
    pub fn start(
        model: Arc<LoadedModel>,
        context_tokens: u32,
        threads: i32,
    ) -> Result<Embedder, EngineError> {
        let context_tokens = context_tokens.clamp(16, EMBED_CONTEXT_TOKENS_MAX);
        let (tx, rx) = sync_channel::<EmbedJob>(EMBED_QUEUE);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("zavod-embed".into())
            .spawn(move || {
                let backend = match backend() {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let pooling = if declares_pooling(&model) {
                    LlamaPoolingType::Unspecified
                } else {
                    LlamaPoolingType::Mean
                };
                let params = LlamaContextParams::default()
                    .with_n_ctx(NonZeroU32::new(context_tokens))
                    .with_n_batch(context_tokens)
                    .with_n_ubatch(context_tokens)
                    .with_n_seq_max(1)
                    .with_embeddings(true)
                    .with_pooling_type(pooling)
                    .with_n_threads(threads)
                    .with_n_threads_batch(threads);
                let mut ctx = match model.model().new_context(backend, params) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx.send(Err(EngineError::Context(format!(
                            "{e} (embedding context of {context_tokens} tokens)"
                        ))));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                while let Ok(job) = rx.recv() {
                    let r = embed_all(&model, &mut ctx, &job.inputs, context_tokens);
                    let _ = job.reply.send(r);
                }
            })
            .map_err(|e| EngineError::Context(format!("cannot start the embedder thread: {e}")))?;
        ready_rx.recv().map_err(|_| EngineError::Stopped)??;
        Ok(Embedder { tx, context_tokens })
    }

    /// The longest input this embedder takes, in tokens.
    pub fn context_tokens(&self) -> u32 {
        self.context_tokens
    }

    /// Queues a request; fails at once when the queue is full.
    pub fn submit(&self, inputs: Vec<String>) -> Result<EmbedReply, EngineError> {
        let (reply, rx) = oneshot::channel();
        match self.tx.try_send(EmbedJob { inputs, reply }) {
            Ok(()) => Ok(rx),
            Err(TrySendError::Full(_)) => Err(EngineError::QueueFull(EMBED_QUEUE)),
            Err(TrySendError::Disconnected(_)) => Err(EngineError::Stopped),
        }
    }
}

/// Whether the file names its own pooling (embedding models do; chat
/// models do not, and llama.cpp would then pool nothing).
fn declares_pooling(model: &LoadedModel) -> bool {
    let m = model.model();
    m.meta_val_str("general.architecture")
        .ok()
        .is_some_and(|arch| m.meta_val_str(&format!("{arch}.pooling_type")).is_ok())
}

fn embed_all(
    model: &LoadedModel,
    ctx: &mut llama_cpp_2::context::LlamaContext<'_>,
    inputs: &[String],
    context_tokens: u32,
) -> Result<Embeddings, EngineError> {
    let mut out = Embeddings {
        vectors: Vec::with_capacity(inputs.len()),
        prompt_tokens: 0,
    };
    for (i, text) in inputs.iter().enumerate() {
        // Inputs are plain text: special-token names in them stay text.
        let tokens = model.model().vocab().tokenize(text.as_bytes(), true, false);
        if tokens.is_empty() {
            return Err(EngineError::Config(format!("input {i} is empty")));
        }
        let n = u32::try_from(tokens.len()).unwrap_or(u32::MAX);
        if n > context_tokens {
            return Err(EngineError::Config(format!(
                "input {i} is {n} tokens, over the {context_tokens}-token limit for embeddings; \
                 split it"
            )));
        }
        ctx.clear_kv_cache();
        let mut batch = LlamaBatch::new(tokens.len(), 1);
        batch
            .add_sequence(&tokens, 0, true)
            .map_err(|e| EngineError::Context(format!("embedding batch: {e}")))?;
        ctx.decode(&mut batch)
            .map_err(|e| EngineError::Context(format!("embedding input {i}: {e}")))?;
        let v = ctx.embeddings_seq_ith(0).map_err(|e| {
            EngineError::Context(format!("the model gave no pooled embedding: {e}"))
        })?;
        out.vectors.push(normalized(v));
        out.prompt_tokens = out.prompt_tokens.saturating_add(n);
    }
    Ok(out)
}

/// `v` scaled to unit length (a zero vector stays zero).
fn normalized(v: &[f32]) -> Vec<f32> {
    let norm = v
        .iter()
        .map(|x| f64::from(*x) * f64::from(*x))
        .sum::<f64>()
        .sqrt();
    if norm == 0.0 || !norm.is_finite() {
        return v.to_vec();
    }
    v.iter().map(|x| (f64::from(*x) / norm) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_come_out_unit_length() {
        let v = normalized(&[3.0, 4.0]);
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6);
        assert_eq!(normalized(&[0.0, 0.0]), vec![0.0, 0.0]);
    }
}
