//! What a node needs from its model, whatever runs it: token counting and
//! chat formatting (used by MemoryKeeper) and a way to start a fresh engine
//! (used by ModelWorker, again after every restart). The model's weights are
//! loaded once and shared across engine restarts.

use crate::model_choice::ModelSelection;
use std::sync::{Arc, Mutex};
use zavod_engine::embed::{EmbedReply, Embedder};
use zavod_engine::llama::{LlamaConfig, LlamaEngine, LoadedModel};
use zavod_engine::{Engine, EngineError, Prompt, model_name_from_path};
use zavod_proto::chat::prompt::Turn;
use zavod_proto::mesh::capacity::ModelOffer;

pub trait ModelBackend: Send + Sync {
    fn offer(&self) -> ModelOffer;
    fn count_tokens(&self, text: &str) -> u32;
    fn format_chat(&self, turns: &[Turn]) -> Result<Prompt, EngineError>;
    fn start_engine(&self) -> Result<Box<dyn Engine>, EngineError>;
    /// How the file was chosen from its family, when it was.
    fn selection(&self) -> Option<&ModelSelection> {
        None
    }
    /// Queues texts for embedding (blocking on first use while the
    /// embedder starts; call off the async runtime).
    fn embed(&self, _inputs: Vec<String>) -> Result<EmbedReply, EngineError> {
        Err(EngineError::Config(
            "this model does not make embeddings".into(),
        ))
    }
}

/// llama.cpp with a model loaded once.
pub(crate) struct LlamaBackendHandle {
    pub model: Arc<LoadedModel>,
    pub cfg: LlamaConfig,
    pub selection: Option<ModelSelection>,
    /// Started on the first embedding request.
    pub embedder: Mutex<Option<Arc<Embedder>>>,
}

impl ModelBackend for LlamaBackendHandle {
    fn offer(&self) -> ModelOffer {
        let name = self
            .cfg
            .name
            .clone()
            .unwrap_or_else(|| model_name_from_path(&self.cfg.path));
        ModelOffer::new(name, self.model.quant(), self.cfg.context_tokens_per_seq)
    }

    fn count_tokens(&self, text: &str) -> u32 {
        self.model.count_tokens(text)
    }

    fn format_chat(&self, turns: &[Turn]) -> Result<Prompt, EngineError> {
        self.model.format_chat(turns)
    }

    fn start_engine(&self) -> Result<Box<dyn Engine>, EngineError> {
        Ok(Box::new(LlamaEngine::start(
            Arc::clone(&self.model),
            &self.cfg,
        )?))
    }

    fn selection(&self) -> Option<&ModelSelection> {
        self.selection.as_ref()
    }

    fn embed(&self, inputs: Vec<String>) -> Result<EmbedReply, EngineError> {
        let embedder = {
            // A poisoned lock means a start panicked; starting again is safe.
            let mut slot = self.embedder.lock().unwrap_or_else(|p| p.into_inner());
            match &*slot {
                Some(e) => Arc::clone(e),
                None => {
                    let e = Arc::new(Embedder::start(
                        Arc::clone(&self.model),
                        self.cfg.context_tokens_per_seq,
                        self.cfg.effective_threads(),
                    )?);
                    *slot = Some(Arc::clone(&e));
                    e
                }
            }
        };
        embedder.submit(inputs)
    }
}
