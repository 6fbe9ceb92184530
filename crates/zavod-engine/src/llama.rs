//! The llama.cpp engine: one model, one context with `slots` sequences,
//! driven by a dedicated OS thread ([`run`]).
//!
//! This file loads models (checking the file first), picks the chat
//! template, and is the handle the node holds: it queues jobs for the
//! engine thread and reads the load it publishes. The thread's loop
//! (continuous batching, the prompt cache, the fair queue) is in
//! [`run`].

mod run;

use crate::{
    Engine, EngineError, EngineEvent, JOB_EVENT_BUFFER, Job, ModelInfo, Prompt,
    model_name_from_path,
};
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::token::LlamaToken;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, OnceLock};
use zavod_proto::chat::prompt::{Role, Turn};
use zavod_proto::mesh::capacity::WorkerLoad;

/// The engine's bounds are the mesh's, kept with every other limit.
pub use zavod_proto::limits::{MAX_SAVED_STATE_BYTES, MAX_STREAM_INTERVAL_MS};

/// How the engine runs a model.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub path: PathBuf,
    /// The name the mesh knows the model by (a family's folder name);
    /// `None`: the file's stem.
    pub name: Option<String>,
    /// Layers offloaded to the GPU (needs the `cuda` feature); 0 runs on CPU.
    pub gpu_layers: u32,
    /// Sequences generated at once.
    pub slots: u32,
    /// Context tokens for each sequence.
    pub context_tokens_per_seq: u32,
    /// CPU threads; 0 picks the number of available cores.
    pub threads: u32,
    /// Most tokens in one decode call.
    pub batch_tokens: u32,
    /// Jobs that may wait for a slot.
    pub queue_capacity: usize,
    /// A llama.cpp built-in template name to use instead of the model's.
    pub chat_template: Option<String>,
    /// Longest a generated token waits so that several leave together
    /// (see [`crate::pacing`]); 0 sends each token as it is made.
    pub stream_interval_ms: u32,
    /// Keep finished sequences' KV cache for prompts that share a prefix.
    pub prompt_cache: bool,
    /// Memory for cached sequences saved out of their slots.
    pub prompt_cache_ram_bytes: u64,
    /// Reuse an identical prefix across credentials (off: each credential
    /// sees only its own cached prompts).
    pub share_prompt_cache: bool,
}

impl LlamaConfig {
    pub fn check(&self) -> Result<(), EngineError> {
        let bad = |m: String| Err(EngineError::Config(m));
        if self.slots == 0 || self.slots > 256 {
            return bad(format!("slots must be 1 to 256, got {}", self.slots));
        }
        if self.context_tokens_per_seq < 64 {
            return bad(format!(
                "context_tokens must be at least 64, got {}",
                self.context_tokens_per_seq
            ));
        }
        if self.batch_tokens < 16 {
            return bad(format!(
                "batch_tokens must be at least 16, got {}",
                self.batch_tokens
            ));
        }
        if self.queue_capacity == 0 {
            return bad("queue_capacity must be at least 1".into());
        }
        if self.stream_interval_ms > MAX_STREAM_INTERVAL_MS {
            return bad(format!(
                "stream_interval_ms must be at most {MAX_STREAM_INTERVAL_MS}, got {}",
                self.stream_interval_ms
            ));
        }
        if self
            .slots
            .checked_mul(self.context_tokens_per_seq)
            .is_none()
        {
            return bad("slots × context_tokens is too large".into());
        }
        Ok(())
    }

    pub fn effective_threads(&self) -> i32 {
        i32::try_from(resolve_threads(self.threads)).unwrap_or(1)
    }
}

/// A thread count from config: 0 means every available core.
pub fn resolve_threads(threads: u32) -> u32 {
    if threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
    } else {
        threads
    }
}

static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();

/// llama.cpp's backend may be initialised once per process; every engine
/// shares it.
pub(crate) fn backend() -> Result<&'static LlamaBackend, EngineError> {
    BACKEND
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| EngineError::Context(format!("llama.cpp backend: {e}")))
}

enum Template {
    Llama(LlamaChatTemplate),
    /// For models with no template llama.cpp knows: `role: text` lines.
    Plain,
}

/// A model loaded into memory, shared by engine restarts.
pub struct LoadedModel {
    model: LlamaModel,
    template: Template,
    path: PathBuf,
    size_bytes: u64,
    quant: String,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LoadedModel({})", self.path.display())
    }
}

const GGUF_MAGIC: &[u8; 4] = b"GGUF";

/// Checks that `path` is a readable GGUF file, so a wrong path or a
/// truncated download gets an error naming the problem.
pub fn check_model_file(path: &Path) -> Result<u64, EngineError> {
    let err = |reason: String| EngineError::ModelFile {
        path: path.display().to_string(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if !meta.is_file() {
        return Err(err("is not a file".into()));
    }
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .map_err(|e| err(format!("cannot read its header: {e}")))?;
    if &magic != GGUF_MAGIC {
        return Err(err("is not a GGUF model (bad magic bytes)".into()));
    }
    Ok(meta.len())
}

/// The model's parameter count, from its tensor shapes: llama.cpp reads
/// the file's tensor table without allocating or reading any weights.
pub fn count_parameters(path: &Path) -> Result<u64, EngineError> {
    check_model_file(path)?;
    let backend = backend()?;
    let params = LlamaModelParams::default()
        .with_n_gpu_layers(0)
        .with_no_alloc(true);
    let model =
        LlamaModel::load_from_file(backend, path, &params).map_err(|e| EngineError::Load {
            path: path.display().to_string(),
            reason: format!("{e} (the file may be corrupt or of an unsupported architecture)"),
        })?;
    Ok(model.n_params())
}

impl LoadedModel {
    /// Loads a GGUF model; `progress` receives 0.0..=1.0 while it loads.
    pub fn load(
        cfg: &LlamaConfig,
        progress: impl FnMut(f32) + 'static,
    ) -> Result<Arc<Self>, EngineError> {
        cfg.check()?;
        let size_bytes = check_model_file(&cfg.path)?;
        let backend = backend()?;
        let mut progress = progress;
        let params = LlamaModelParams::default()
            .with_n_gpu_layers(cfg.gpu_layers)
            .with_progress_callback(move |p| {
                progress(p);
                true
            });
        let model = LlamaModel::load_from_file(backend, &cfg.path, &params).map_err(|e| {
            EngineError::Load {
                path: cfg.path.display().to_string(),
                reason: format!("{e} (the file may be corrupt or of an unsupported architecture)"),
            }
        })?;
        let template = choose_template(&model, cfg.chat_template.as_deref())?;
        // The quantization the file declares (not its name's guess).
        let quant = model
            .meta_val_str("general.file_type")
            .ok()
            .and_then(|v| v.trim().parse::<u32>().ok())
            .and_then(crate::gguf::quant_name)
            .unwrap_or("unknown")
            .to_string();
        Ok(Arc::new(LoadedModel {
            model,
            template,
            path: cfg.path.clone(),
            size_bytes,
            quant,
        }))
    }

    /// The quantization named by the file's `general.file_type`.
    pub fn quant(&self) -> &str {
        &self.quant
    }

    pub fn model(&self) -> &LlamaModel {
        &self.model
    }

    /// Formats turns with the chat template, keeping the template's markup
    /// apart from the turns' text (see [`crate::prompt`]).
    pub fn format_chat(&self, turns: &[Turn]) -> Result<Prompt, EngineError> {
        match &self.template {
            Template::Llama(t) => {
                let render = |texts: Vec<String>| -> Result<String, EngineError> {
                    let msgs = turns
                        .iter()
                        .zip(texts)
                        .map(|(t, text)| LlamaChatMessage::new(t.role.as_str().into(), text))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| EngineError::Template(format!("message: {e}")))?;
                    self.model
                        .apply_chat_template(t, &msgs, true)
                        .map_err(|e| EngineError::Template(e.to_string()))
                };
                let real = render(turns.iter().map(|t| t.text.clone()).collect())?;
                let shape = render((0..turns.len()).map(Prompt::placeholder).collect())?;
                let texts: Vec<&str> = turns.iter().map(|t| t.text.as_str()).collect();
                // Templates put a turn's text in as it is or trimmed; the
                // one that reproduces the real rendering is the right one.
                // A template that changes text some other way keeps its
                // markup around the text as given.
                let exact = Prompt::from_shape(&shape, &texts, false);
                if exact.joined() == real {
                    return Ok(exact);
                }
                let trimmed = Prompt::from_shape(&shape, &texts, true);
                if trimmed.joined() == real {
                    return Ok(trimmed);
                }
                tracing::debug!(
                    "the chat template changes turn text; its markup is kept around the text as given"
                );
                Ok(exact)
            }
            Template::Plain => {
                let mut shape = String::new();
                for (i, t) in turns.iter().enumerate() {
                    let who = match t.role {
                        Role::System | Role::Fact | Role::Summary => "System",
                        Role::User => "User",
                        Role::Assistant => "Assistant",
                    };
                    shape.push_str(who);
                    shape.push_str(": ");
                    shape.push_str(&Prompt::placeholder(i));
                    shape.push('\n');
                }
                shape.push_str("Assistant:");
                let texts: Vec<&str> = turns.iter().map(|t| t.text.as_str()).collect();
                Ok(Prompt::from_shape(&shape, &texts, false))
            }
        }
    }

    pub fn count_tokens(&self, text: &str) -> u32 {
        let n = self
            .model
            .vocab()
            .tokenize(text.as_bytes(), false, false)
            .len();
        u32::try_from(n).unwrap_or(u32::MAX)
    }
}

/// The model's own template; else a llama.cpp built-in chosen by name from
/// config or by architecture; else the plain template.
fn choose_template(model: &LlamaModel, configured: Option<&str>) -> Result<Template, EngineError> {
    let probe = |t: LlamaChatTemplate| -> Option<Template> {
        let msg = LlamaChatMessage::new("user".into(), "hi".into()).ok()?;
        model
            .apply_chat_template(&t, &[msg], true)
            .ok()
            .map(|_| Template::Llama(t))
    };
    if let Some(name) = configured {
        let t = LlamaChatTemplate::new(name)
            .map_err(|e| EngineError::Template(format!("{name:?}: {e}")))?;
        return probe(t).ok_or_else(|| {
            EngineError::Template(format!("llama.cpp does not know the template {name:?}"))
        });
    }
    if let Ok(t) = model.chat_template(None)
        && let Some(t) = probe(t)
    {
        return Ok(t);
    }
    let arch = model
        .meta_val_str("general.architecture")
        .unwrap_or_default();
    let builtin = ["gemma", "llama3", "chatml", "mistral-v7", "phi3"]
        .into_iter()
        .find(|name| arch.starts_with(name.split('-').next().unwrap_or(name)));
    if let Some(name) = builtin
        && let Ok(t) = LlamaChatTemplate::new(name)
        && let Some(t) = probe(t)
    {
        tracing::info!(
            template = name,
            "model has no chat template; using llama.cpp's built-in one for its architecture"
        );
        return Ok(t);
    }
    tracing::info!("model has no chat template; using the plain one");
    Ok(Template::Plain)
}

/// State shared between the handle and the engine thread.
#[derive(Debug, Default)]
struct Shared {
    load: Mutex<WorkerLoad>,
    queued: AtomicUsize,
    alive: AtomicBool,
}

/// A running llama.cpp engine.
pub struct LlamaEngine {
    info: ModelInfo,
    model: Arc<LoadedModel>,
    /// `None` only while dropping: closing it tells the thread to finish.
    tx: Option<SyncSender<Job>>,
    queue_capacity: usize,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for LlamaEngine {
    /// Closes the job channel and waits for the engine thread to free its
    /// context. Returning first would let a process exit while the thread
    /// still frees GPU memory, which the CUDA runtime, already shutting
    /// down, answers with an abort.
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl std::fmt::Debug for LlamaEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LlamaEngine({})", self.info.name)
    }
}

impl LlamaEngine {
    /// Starts the engine thread with a fresh context over `model`; returns
    /// once the context exists.
    pub fn start(model: Arc<LoadedModel>, cfg: &LlamaConfig) -> Result<Self, EngineError> {
        cfg.check()?;
        let name = cfg
            .name
            .clone()
            .unwrap_or_else(|| model_name_from_path(&model.path));
        let info = ModelInfo {
            quant: model.quant().to_string(),
            name,
            path: model.path.display().to_string(),
            size_bytes: model.size_bytes,
            context_tokens_per_seq: cfg.context_tokens_per_seq,
            slots: cfg.slots,
        };
        let (tx, rx) = sync_channel::<Job>(cfg.queue_capacity);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let shared = Arc::new(Shared::default());
        shared.alive.store(true, Ordering::SeqCst);
        if let Ok(mut l) = shared.load.lock() {
            l.slots_total = cfg.slots;
        }
        let thread_model = Arc::clone(&model);
        let thread_cfg = cfg.clone();
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("zavod-engine".into())
            .spawn(move || {
                let _alive = AliveGuard(Arc::clone(&thread_shared));
                run::run(thread_model, thread_cfg, rx, ready_tx, thread_shared);
            })
            .map_err(|e| EngineError::Context(format!("cannot spawn engine thread: {e}")))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(LlamaEngine {
                info,
                model,
                tx: Some(tx),
                queue_capacity: cfg.queue_capacity,
                shared,
                thread: Some(thread),
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(EngineError::Context(
                "engine thread ended while starting".into(),
            )),
        }
    }

    pub fn loaded_model(&self) -> &Arc<LoadedModel> {
        &self.model
    }
}

struct AliveGuard(Arc<Shared>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.alive.store(false, Ordering::SeqCst);
    }
}

impl Engine for LlamaEngine {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn submit(&self, job: Job) -> Result<(), EngineError> {
        if !self.is_alive() {
            return Err(EngineError::Stopped);
        }
        // The jobs waiting (in the hand-over channel or the engine's fair
        // queue) are bounded together.
        if self.shared.queued.fetch_add(1, Ordering::SeqCst) >= self.queue_capacity {
            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::QueueFull(self.queue_capacity));
        }
        let Some(tx) = &self.tx else {
            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::Stopped);
        };
        match tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.shared.queued.fetch_sub(1, Ordering::SeqCst);
                match e {
                    TrySendError::Full(_) => Err(EngineError::QueueFull(self.queue_capacity)),
                    TrySendError::Disconnected(_) => Err(EngineError::Stopped),
                }
            }
        }
    }

    fn load(&self) -> WorkerLoad {
        let mut l = self
            .shared
            .load
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default();
        l.queue_depth = u32::try_from(self.shared.queued.load(Ordering::SeqCst)).unwrap_or(0);
        l
    }

    fn count_tokens(&self, text: &str) -> u32 {
        self.model.count_tokens(text)
    }

    fn format_chat(&self, turns: &[Turn]) -> Result<Prompt, EngineError> {
        self.model.format_chat(turns)
    }

    fn is_alive(&self) -> bool {
        self.shared.alive.load(Ordering::SeqCst)
    }
}

/// Builds the bounded event channel for a job.
pub fn job_channel() -> (
    tokio::sync::mpsc::Sender<EngineEvent>,
    tokio::sync::mpsc::Receiver<EngineEvent>,
) {
    tokio::sync::mpsc::channel(JOB_EVENT_BUFFER)
}

/// Whether llama.cpp in this build can offload to a GPU.
pub fn supports_gpu_offload() -> bool {
    backend().is_ok_and(|b| b.supports_gpu_offload())
}

/// Tokenizes a prompt as the engine does: the template's markup with its
/// control tokens, the turns' text as text, the model's start token first.
pub fn tokenize_prompt(model: &LoadedModel, prompt: &Prompt) -> Vec<LlamaToken> {
    let vocab = model.model.vocab();
    let mut out = Vec::new();
    for (i, piece) in prompt.pieces().iter().enumerate() {
        out.extend(vocab.tokenize(piece.text.as_bytes(), i == 0, piece.markup));
    }
    if prompt.pieces().is_empty() {
        out.extend(vocab.tokenize(b"", true, false));
    }
    out
}

/// The shared llama.cpp backend (for benchmarks that drive llama.cpp directly).
pub fn shared_backend() -> Result<&'static LlamaBackend, EngineError> {
    backend()
}
