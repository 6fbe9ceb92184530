//! The llama.cpp engine: one model, one context with `slots` sequences,
//! driven by a dedicated OS thread.
//!
//! Each step builds one batch from every running sequence: one token for
//! each sequence that is decoding, then chunks of pending prompts in the room
//! left (chunked prefill), so new requests join without pausing running ones
//! (continuous batching). Jobs wait in a bounded queue when every slot is
//! busy. Events leave through each job's bounded channel with `try_send`, so
//! one slow reader can only fail its own job.

use crate::pacing::Pacer;
use crate::utf8::Utf8Stream;
use crate::{
    CancelFlag, Engine, EngineError, EngineEvent, GenToken, JOB_EVENT_BUFFER, Job, ModelInfo,
    model_name_from_path, quant_from_name,
};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use std::collections::VecDeque;
use std::io::Read;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::error::TrySendError as EvTrySendError;
use zavod_proto::capacity::WorkerLoad;
use zavod_proto::prompt::{Role, Turn};
use zavod_proto::wire::{DoneInfo, StopReason};

/// Longest pacing interval accepted: past this a stream reads as stalled.
pub const MAX_STREAM_INTERVAL_MS: u32 = 1_000;

/// How the engine runs a model.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub path: PathBuf,
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
fn backend() -> Result<&'static LlamaBackend, EngineError> {
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
        Ok(Arc::new(LoadedModel {
            model,
            template,
            path: cfg.path.clone(),
            size_bytes,
        }))
    }

    pub fn model(&self) -> &LlamaModel {
        &self.model
    }

    pub fn format_chat(&self, turns: &[Turn]) -> Result<String, EngineError> {
        match &self.template {
            Template::Llama(t) => {
                let msgs = turns
                    .iter()
                    .map(|t| LlamaChatMessage::new(t.role.as_str().into(), t.text.clone()))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| EngineError::Template(format!("message: {e}")))?;
                self.model
                    .apply_chat_template(t, &msgs, true)
                    .map_err(|e| EngineError::Template(e.to_string()))
            }
            Template::Plain => {
                let mut s = String::new();
                for t in turns {
                    let who = match t.role {
                        Role::System => "System",
                        Role::User => "User",
                        Role::Assistant => "Assistant",
                    };
                    s.push_str(who);
                    s.push_str(": ");
                    s.push_str(&t.text);
                    s.push('\n');
                }
                s.push_str("Assistant:");
                Ok(s)
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
    tx: SyncSender<Job>,
    queue_capacity: usize,
    shared: Arc<Shared>,
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
        let name = model_name_from_path(&model.path);
        let info = ModelInfo {
            quant: quant_from_name(&name),
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
        std::thread::Builder::new()
            .name("zavod-engine".into())
            .spawn(move || {
                let _alive = AliveGuard(Arc::clone(&thread_shared));
                run(thread_model, thread_cfg, rx, ready_tx, thread_shared);
            })
            .map_err(|e| EngineError::Context(format!("cannot spawn engine thread: {e}")))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(LlamaEngine {
                info,
                model,
                tx,
                queue_capacity: cfg.queue_capacity,
                shared,
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
        self.shared.queued.fetch_add(1, Ordering::SeqCst);
        match self.tx.try_send(job) {
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

    fn format_chat(&self, turns: &[Turn]) -> Result<String, EngineError> {
        self.model.format_chat(turns)
    }

    fn is_alive(&self) -> bool {
        self.shared.alive.load(Ordering::SeqCst)
    }
}

/// One running request inside the engine thread.
struct Seq {
    job_id: zavod_proto::RequestId,
    events: tokio::sync::mpsc::Sender<EngineEvent>,
    cancel: CancelFlag,
    seq_id: i32,
    prompt: Vec<LlamaToken>,
    /// Tokens of a resumed answer, fed back one per step in place of
    /// sampling: the same steps the failed node took, so at temperature 0
    /// the continuation is the one it would have produced (a single
    /// prefill batch would round differently and can flip near-ties).
    forced: VecDeque<LlamaToken>,
    prefilled: usize,
    /// Next position to write in this sequence's cache.
    n_past: i32,
    /// Sampled token still to be fed back.
    next: Option<LlamaToken>,
    logits_idx: Option<i32>,
    sampler: LlamaSampler,
    max_tokens: u32,
    ignore_eos: bool,
    generated: u32,
    utf8: Utf8Stream,
    submitted: Instant,
    first_at: Option<Instant>,
    last_at: Option<Instant>,
    /// Tokens made but not yet handed over.
    pacer: Pacer<GenToken>,
}

fn sampler_for(p: &zavod_proto::wire::GenParams) -> LlamaSampler {
    if p.temperature <= 0.0 {
        LlamaSampler::greedy()
    } else {
        let seed = (p.seed ^ (p.seed >> 32)) as u32;
        LlamaSampler::chain_simple([
            LlamaSampler::top_p(p.top_p, 1),
            LlamaSampler::temp(p.temperature),
            LlamaSampler::dist(seed),
        ])
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

enum Sent {
    Ok,
    /// The receiver is gone: the client left, so the job is cancelled.
    Gone,
    /// The receiver is not keeping up.
    Full,
}

fn send(tx: &tokio::sync::mpsc::Sender<EngineEvent>, ev: EngineEvent) -> Sent {
    match tx.try_send(ev) {
        Ok(()) => Sent::Ok,
        Err(EvTrySendError::Closed(_)) => Sent::Gone,
        Err(EvTrySendError::Full(_)) => Sent::Full,
    }
}

/// Hands over the tokens a sequence still holds, if any.
fn release_held(s: &mut Seq) {
    let held: Vec<GenToken> = s.pacer.release().collect();
    if !held.is_empty() {
        let _ = send(&s.events, EngineEvent::Tokens(held));
    }
}

fn run(
    model: Arc<LoadedModel>,
    cfg: LlamaConfig,
    rx: Receiver<Job>,
    ready: std::sync::mpsc::Sender<Result<(), EngineError>>,
    shared: Arc<Shared>,
) {
    let backend = match backend() {
        Ok(b) => b,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let threads = cfg.effective_threads();
    let n_ctx = cfg.slots.saturating_mul(cfg.context_tokens_per_seq);
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n_ctx))
        .with_n_batch(cfg.batch_tokens)
        .with_n_ubatch(cfg.batch_tokens.min(512))
        .with_n_seq_max(cfg.slots)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let mut ctx = match model.model.new_context(backend, params) {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(EngineError::Context(format!(
                "{e} (context of {n_ctx} tokens for {} slots)",
                cfg.slots
            ))));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    tracing::info!(
        slots = cfg.slots,
        ctx_per_seq = cfg.context_tokens_per_seq,
        threads,
        "engine ready"
    );

    let batch_cap = cfg.batch_tokens as usize;
    let mut batch = LlamaBatch::new(batch_cap, 1);
    let mut free: Vec<i32> = (0..cfg.slots as i32).rev().collect();
    let mut active: Vec<Seq> = Vec::new();
    let mut rate_ewma: f32 = 0.0;
    let mut input_open = true;

    loop {
        // Take new jobs: block when idle, otherwise only what is waiting.
        while !free.is_empty() && input_open {
            let job = if active.is_empty() {
                match rx.recv() {
                    Ok(j) => j,
                    Err(_) => {
                        input_open = false;
                        break;
                    }
                }
            } else {
                match rx.try_recv() {
                    Ok(j) => j,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        input_open = false;
                        break;
                    }
                }
            };
            shared.queued.fetch_sub(1, Ordering::SeqCst);
            if let Some(seq_id) = free.pop() {
                match admit(&model, &cfg, job, seq_id) {
                    Some(s) => active.push(s),
                    None => free.push(seq_id),
                }
            }
        }
        if active.is_empty() {
            if !input_open {
                return;
            }
            continue;
        }

        // Cancelled jobs end before they cost another step.
        let mut i = 0;
        while i < active.len() {
            if active[i].cancel.is_cancelled() || active[i].events.is_closed() {
                let s = active.swap_remove(i);
                let books = Books {
                    shared: &shared,
                    cfg: &cfg,
                    busy_after: active.len(),
                };
                finish(
                    &mut ctx,
                    &mut free,
                    s,
                    StopReason::Cancelled,
                    &mut rate_ewma,
                    books,
                );
            } else {
                i += 1;
            }
        }

        batch.clear();
        let mut add_failed = false;
        for s in active.iter_mut() {
            if let Some(tok) = s.next.take() {
                s.logits_idx = Some(batch.n_tokens());
                add_failed |= batch.add(tok, s.n_past, &[s.seq_id], true).is_err();
                s.n_past += 1;
            }
        }
        for s in active.iter_mut() {
            let room = batch_cap.saturating_sub(batch.n_tokens() as usize);
            if room == 0 {
                break;
            }
            if s.prefilled < s.prompt.len() {
                let take = room.min(s.prompt.len() - s.prefilled);
                for k in 0..take {
                    let pos = s.prefilled + k;
                    let last = pos + 1 == s.prompt.len();
                    if last {
                        s.logits_idx = Some(batch.n_tokens());
                    }
                    add_failed |= batch
                        .add(s.prompt[pos], pos as i32, &[s.seq_id], last)
                        .is_err();
                }
                s.prefilled += take;
                if s.prefilled == s.prompt.len() {
                    s.n_past = s.prompt.len() as i32;
                }
            }
        }
        publish_load(&shared, &cfg, active.len(), rate_ewma);
        if batch.n_tokens() == 0 {
            continue;
        }
        let decoded = if add_failed {
            Err("batch overflow".to_string())
        } else {
            ctx.decode(&mut batch).map_err(|e| e.to_string())
        };
        if let Err(e) = decoded {
            tracing::error!(error = %e, "decode failed; failing the running requests");
            for mut s in active.drain(..) {
                // What was made still goes out: a client can resume from it.
                release_held(&mut s);
                let _ = send(
                    &s.events,
                    EngineEvent::Failed(format!("decode failed: {e}")),
                );
                let _ = ctx.clear_kv_cache_seq(Some(s.seq_id as u32), None, None);
                free.push(s.seq_id);
            }
            continue;
        }

        let vocab = model.model.vocab();
        let mut i = 0;
        while i < active.len() {
            let s = &mut active[i];
            let Some(idx) = s.logits_idx.take() else {
                i += 1;
                continue;
            };
            if let Some(tok) = s.forced.pop_front() {
                s.next = Some(tok);
                i += 1;
                continue;
            }
            let tok = s.sampler.sample(&ctx, idx);
            let now = Instant::now();
            s.first_at.get_or_insert(now);
            s.last_at = Some(now);
            let mut stop = None;
            if !s.ignore_eos && vocab.is_eog(tok) {
                stop = Some(StopReason::EndOfGeneration);
            } else {
                let piece = vocab.token_to_piece(tok, false, None);
                let text = s.utf8.push(&piece);
                let index = s.generated;
                s.generated += 1;
                let made = GenToken {
                    index,
                    text,
                    id: tok.0,
                };
                // One event per release: each event wakes the node.
                let sent = match s.pacer.push(now, made) {
                    Some(due) => send(&s.events, EngineEvent::Tokens(due.collect())),
                    None => Sent::Ok,
                };
                match sent {
                    Sent::Ok => {}
                    Sent::Gone => stop = Some(StopReason::Cancelled),
                    Sent::Full => {
                        let s = active.swap_remove(i);
                        let _ = ctx.clear_kv_cache_seq(Some(s.seq_id as u32), None, None);
                        free.push(s.seq_id);
                        tracing::warn!(request = %s.job_id, "client not reading; job dropped");
                        continue;
                    }
                }
                if stop.is_none() {
                    if s.generated >= s.max_tokens {
                        stop = Some(StopReason::MaxTokens);
                    } else if s.n_past >= cfg.context_tokens_per_seq as i32 {
                        // No position left to feed this token back at.
                        stop = Some(StopReason::ContextFull);
                    } else {
                        s.next = Some(tok);
                    }
                }
            }
            if let Some(reason) = stop {
                let s = active.swap_remove(i);
                let books = Books {
                    shared: &shared,
                    cfg: &cfg,
                    busy_after: active.len(),
                };
                finish(&mut ctx, &mut free, s, reason, &mut rate_ewma, books);
            } else {
                i += 1;
            }
        }
        publish_load(&shared, &cfg, active.len(), rate_ewma);
    }
}

fn publish_load(shared: &Shared, cfg: &LlamaConfig, busy: usize, rate: f32) {
    if let Ok(mut l) = shared.load.lock() {
        l.slots_total = cfg.slots;
        l.slots_busy = busy as u32;
        l.tokens_per_s = rate;
    }
}

fn admit(model: &LoadedModel, cfg: &LlamaConfig, job: Job, seq_id: i32) -> Option<Seq> {
    let vocab = model.model.vocab();
    let prompt = vocab.tokenize(job.prompt.as_bytes(), true, true);
    // A resumed answer goes on after the tokens already streamed.
    let n_vocab = model.model.n_vocab();
    if let Some(bad) = job
        .params
        .resume_tokens
        .iter()
        .find(|&&t| t < 0 || t >= n_vocab)
    {
        let _ = send(
            &job.events,
            EngineEvent::Failed(format!(
                "resume token {bad} is not in this model's vocabulary"
            )),
        );
        return None;
    }
    let forced: VecDeque<LlamaToken> = job
        .params
        .resume_tokens
        .iter()
        .map(|&t| LlamaToken(t))
        .collect();
    let limit = cfg.context_tokens_per_seq as usize;
    if prompt.is_empty() || prompt.len() + forced.len() >= limit {
        let _ = send(
            &job.events,
            EngineEvent::Failed(format!(
                "prompt of {} tokens does not fit the context of {} tokens per request",
                prompt.len() + forced.len(),
                limit
            )),
        );
        return None;
    }
    let prompt_tokens = (prompt.len() + forced.len()) as u32;
    if !matches!(
        send(&job.events, EngineEvent::Started { prompt_tokens }),
        Sent::Ok
    ) {
        return None;
    }
    Some(Seq {
        job_id: job.id,
        events: job.events,
        cancel: job.cancel,
        seq_id,
        prompt,
        forced,
        prefilled: 0,
        n_past: 0,
        next: None,
        logits_idx: None,
        sampler: sampler_for(&job.params),
        max_tokens: job.params.max_tokens,
        ignore_eos: job.params.ignore_eos,
        generated: 0,
        utf8: Utf8Stream::default(),
        submitted: Instant::now(),
        first_at: None,
        last_at: None,
        pacer: Pacer::new(Duration::from_millis(u64::from(cfg.stream_interval_ms))),
    })
}

/// Where a finished sequence reports to.
struct Books<'a> {
    shared: &'a Shared,
    cfg: &'a LlamaConfig,
    busy_after: usize,
}

fn finish(
    ctx: &mut LlamaContext<'_>,
    free: &mut Vec<i32>,
    mut s: Seq,
    stop: StopReason,
    rate_ewma: &mut f32,
    books: Books<'_>,
) {
    let _ = ctx.clear_kv_cache_seq(Some(s.seq_id as u32), None, None);
    free.push(s.seq_id);
    let first_token_ms = s
        .first_at
        .map_or(0.0, |t| (t - s.submitted).as_secs_f64() * 1e3);
    let decode_tokens_per_s = match (s.first_at, s.last_at) {
        (Some(a), Some(b)) if s.generated > 1 && b > a => {
            f64::from(s.generated - 1) / (b - a).as_secs_f64()
        }
        _ => 0.0,
    };
    if decode_tokens_per_s > 0.0 {
        let r = decode_tokens_per_s as f32;
        *rate_ewma = if *rate_ewma == 0.0 {
            r
        } else {
            0.7 * *rate_ewma + 0.3 * r
        };
    }
    // Load is published before Done so a client that sees Done never reads a
    // stale busy count.
    publish_load(books.shared, books.cfg, books.busy_after, *rate_ewma);
    release_held(&mut s);
    let _ = send(
        &s.events,
        EngineEvent::Done(DoneInfo {
            stop,
            prompt_tokens: s.prompt.len() as u32,
            generated_tokens: s.generated,
            first_token_ms,
            decode_tokens_per_s,
            finished_at_ms: unix_ms(),
            receipt: None,
        }),
    );
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

/// Tokenizes with the same settings as the engine (for benchmarks).
pub fn tokenize_prompt(model: &LoadedModel, prompt: &str) -> Vec<LlamaToken> {
    model.model.vocab().tokenize(prompt.as_bytes(), true, true)
}

/// The shared llama.cpp backend (for benchmarks that drive llama.cpp directly).
pub fn shared_backend() -> Result<&'static LlamaBackend, EngineError> {
    backend()
}
