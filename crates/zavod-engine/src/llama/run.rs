//! The engine thread: the one owner of the llama.cpp context.
//!
//! Each step builds one batch from every running sequence, in sequence-id
//! order: one token for each sequence that is decoding, and chunks of
//! pending prompts in the room left (chunked prefill), so new requests join
//! without pausing running ones (continuous batching). The order matters:
//! with a KV stream per sequence, llama.cpp runs a batch as one pass over
//! the weights only when its sequences come in increasing, consecutive ids;
//! out of order, the same tokens cost a pass per run of ids. New prompts go
//! to the lowest empty slot for the same reason.
//!
//! Prompts start where a cached sequence agrees with them (see
//! [`crate::prompt_cache`]): the thread carries out the cache's plans
//! (save a slot's state, restore one, trim a sequence) and tells it what it
//! holds when a request ends. Requests wait in a fair queue
//! ([`crate::queue`]) when every slot is busy; a cancelled request leaves
//! the queue, or its slot, before the next step.
//!
//! Events leave through each job's bounded channel with `try_send`, so one
//! slow reader can only fail its own job.
//!
//! Why one file of about 700 lines: everything here acts on the one
//! context this thread owns (admitting, stepping, sampling, finishing,
//! saving states), through one `Engine` value; the decisions that can be
//! pure already live beside it (`prompt_cache`, `queue`, `sampling`,
//! `pacing`).
//!
//! Why this file passes 600 lines: the engine thread's loop and the batches
//! it builds share the llama context and every sequence's state; its pure
//! parts live beside it (prompt_cache.rs, queue.rs, sampling.rs, stops.rs,
//! pacing.rs).

use super::{LlamaConfig, LoadedModel, MAX_SAVED_STATE_BYTES, backend};
use crate::pacing::Pacer;
use crate::prompt_cache::PromptCache;
use crate::queue::FairQueue;
use crate::sampling::{self, argmax};
use crate::stops::StopMatcher;
use crate::utf8::Utf8Stream;
use crate::{CancelFlag, EngineError, EngineEvent, GenToken, Job};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::session::{LlamaStateSeqFlags, SeqState};
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use llama_cpp_2::token::logit_bias::LlamaLogitBias;
use std::collections::{BTreeMap, VecDeque};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::error::TrySendError as EvTrySendError;
use zavod_proto::mesh::capacity::CACHE_SUMMARY_MAX_KEYS;
use zavod_proto::wire::{DoneInfo, StopReason};

use super::Shared;

/// One running request inside the engine thread.
struct Seq {
    job_id: zavod_proto::RequestId,
    events: tokio::sync::mpsc::Sender<EngineEvent>,
    cancel: CancelFlag,
    seq_id: i32,
    prompt: Vec<LlamaToken>,
    /// Tokens the sequence's cache holds, in order from position 0.
    in_cache: Vec<i32>,
    /// Prompt tokens that came from the cache.
    cached: usize,
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
    sampler: Sampler,
    max_tokens: u32,
    ignore_eos: bool,
    generated: u32,
    utf8: Utf8Stream,
    submitted: Instant,
    first_at: Option<Instant>,
    last_at: Option<Instant>,
    /// Tokens made but not yet handed over.
    pacer: Pacer<GenToken>,
    /// Holds back text that may begin a stop sequence.
    stops: StopMatcher,
}

/// How a sequence picks its next token (see [`crate::sampling`]).
enum Sampler {
    /// Temperature 0: the largest logit.
    Greedy,
    /// llama.cpp's top-p, temperature and seeded draw, run on the `top_k`
    /// most likely tokens (every token when `top_k` is 0).
    Draw { top_k: usize, chain: LlamaSampler },
    /// Output held to a grammar (JSON), penalised or biased: llama.cpp's
    /// whole chain over the whole vocabulary, since the likeliest tokens
    /// may all be ones the grammar forbids or the bias pushes down.
    Constrained(LlamaSampler),
}

fn sampler_for(model: &LoadedModel, p: &zavod_proto::wire::GenParams) -> Result<Sampler, String> {
    let seed = (p.seed ^ (p.seed >> 32)) as u32;
    let penalised = p.presence_penalty != 0.0 || p.frequency_penalty != 0.0;
    if p.grammar.is_some() || penalised || !p.logit_bias.is_empty() {
        let n_vocab = model.model().n_vocab();
        let mut chain = Vec::new();
        if !p.logit_bias.is_empty() {
            if let Some((t, _)) = p.logit_bias.iter().find(|(t, _)| *t >= n_vocab) {
                return Err(format!(
                    "logit_bias names token {t}, not in this model's vocabulary of {n_vocab}"
                ));
            }
            let biases: Vec<LlamaLogitBias> = p
                .logit_bias
                .iter()
                .map(|&(t, b)| LlamaLogitBias::new(LlamaToken(t), b))
                .collect();
            chain.push(LlamaSampler::logit_bias(n_vocab, &biases));
        }
        if penalised {
            // Over the whole answer: every token it accepted so far.
            let last_n = i32::try_from(p.max_tokens).unwrap_or(i32::MAX);
            chain.push(LlamaSampler::penalties(
                n_vocab,
                last_n,
                1.0,
                p.frequency_penalty,
                p.presence_penalty,
            ));
        }
        if let Some(g) = &p.grammar {
            chain.push(
                LlamaSampler::grammar(model.model(), g, "root")
                    .map_err(|e| format!("the output grammar does not parse: {e}"))?,
            );
        }
        if p.temperature <= 0.0 {
            chain.push(LlamaSampler::greedy());
        } else {
            if p.top_k > 0 {
                chain.push(LlamaSampler::top_k(
                    i32::try_from(p.top_k).unwrap_or(i32::MAX),
                ));
            }
            chain.push(LlamaSampler::top_p(p.top_p, 1));
            chain.push(LlamaSampler::temp(p.temperature));
            chain.push(LlamaSampler::dist(seed));
        }
        return Ok(Sampler::Constrained(LlamaSampler::chain_simple(chain)));
    }
    Ok(if p.temperature <= 0.0 {
        Sampler::Greedy
    } else {
        let seed = (p.seed ^ (p.seed >> 32)) as u32;
        Sampler::Draw {
            top_k: p.top_k as usize,
            chain: LlamaSampler::chain_simple([
                LlamaSampler::top_p(p.top_p, 1),
                LlamaSampler::temp(p.temperature),
                LlamaSampler::dist(seed),
            ]),
        }
    })
}

impl Sampler {
    /// The next token from the logits of batch position `idx`.
    fn sample(&mut self, ctx: &LlamaContext<'_>, idx: i32) -> LlamaToken {
        // `idx` is a position this step asked logits for, so llama.cpp has
        // them (it panics otherwise).
        let top = |i: usize| LlamaToken(i32::try_from(i).unwrap_or(0));
        match self {
            // Samples and accepts, so the grammar and penalties move on.
            Sampler::Constrained(chain) => chain.sample(ctx, idx),
            Sampler::Greedy => top(argmax(ctx.get_logits_ith(idx)).unwrap_or(0)),
            Sampler::Draw { top_k, chain } => {
                let logits = ctx.get_logits_ith(idx);
                let picked: Vec<LlamaTokenData> = if *top_k == 0 || *top_k >= logits.len() {
                    logits
                        .iter()
                        .enumerate()
                        .map(|(i, &x)| LlamaTokenData::new(top(i), x, 0.0))
                        .collect()
                } else {
                    sampling::top_k(logits, *top_k)
                        .into_iter()
                        .map(|(i, x)| LlamaTokenData::new(top(i), x, 0.0))
                        .collect()
                };
                let first = picked.first().map_or(LlamaToken(0), LlamaTokenData::id);
                let mut arr = LlamaTokenDataArray::new(picked, *top_k > 0);
                arr.apply_sampler(chain);
                arr.selected_token().unwrap_or(first)
            }
        }
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

/// Hands over the tokens a sequence still holds, if any: those kept back
/// for a possible stop sequence (none matched), then the paced ones.
fn release_held(s: &mut Seq) {
    let mut held: Vec<GenToken> = s.pacer.release().collect();
    held.extend(s.stops.finish());
    if !held.is_empty() {
        let _ = send(&s.events, EngineEvent::Tokens(held));
    }
}

/// The sliding-window width of the model's attention, 0 when it has none.
fn sliding_window(model: &LoadedModel) -> u32 {
    let m = model.model();
    let arch = m.meta_val_str("general.architecture").unwrap_or_default();
    m.meta_val_str(&format!("{arch}.attention.sliding_window"))
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Everything the engine thread owns besides the context.
struct Engine {
    model: Arc<LoadedModel>,
    cfg: LlamaConfig,
    shared: Arc<Shared>,
    cache: PromptCache,
    /// Saved sequence states, by the cache's ids.
    states: BTreeMap<u64, SeqState>,
    queue: FairQueue<Job>,
    /// Running sequences, by sequence id.
    active: Vec<Seq>,
    rate_ewma: f32,
    n_swa: u32,
}

pub(super) fn run(
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
    // A small sliding-window cache for models that have one, as llama.cpp's
    // own server keeps: it reads far less per token in long contexts.
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n_ctx))
        .with_n_batch(cfg.batch_tokens)
        .with_n_ubatch(cfg.batch_tokens.min(512))
        .with_n_seq_max(cfg.slots)
        .with_swa_full(false)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let mut ctx = match model.model().new_context(backend, params) {
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
    let n_swa = sliding_window(&model);
    tracing::info!(
        slots = cfg.slots,
        ctx_per_seq = cfg.context_tokens_per_seq,
        threads,
        sliding_window = n_swa,
        prompt_cache = cfg.prompt_cache,
        prompt_cache_ram_mib = cfg.prompt_cache_ram_bytes >> 20,
        "engine ready"
    );
    let mut e = Engine {
        cache: PromptCache::new(
            cfg.slots as usize,
            cfg.prompt_cache_ram_bytes.min(MAX_SAVED_STATE_BYTES),
            cfg.share_prompt_cache,
            cfg.prompt_cache,
        ),
        states: BTreeMap::new(),
        queue: FairQueue::new(cfg.queue_capacity),
        active: Vec::new(),
        rate_ewma: 0.0,
        n_swa,
        model: Arc::clone(&model),
        cfg,
        shared,
    };
    let mut batch = LlamaBatch::new(e.cfg.batch_tokens as usize, 1);
    let mut input_open = true;
    loop {
        // Take new jobs: block when idle, otherwise only what is waiting.
        let mut joined = Vec::new();
        loop {
            let next = if e.active.is_empty() && e.queue.is_empty() && input_open {
                rx.recv().map_err(|_| TryRecvError::Disconnected)
            } else {
                rx.try_recv()
            };
            match next {
                Ok(job) => {
                    joined.push((job.cache.partition, job.id));
                    e.enqueue(job);
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    input_open = false;
                    break;
                }
            }
        }
        e.drop_cancelled_waiting();
        while e.cache.has_idle()
            && let Some(job) = e.queue.pop()
        {
            e.shared.queued.fetch_sub(1, Ordering::SeqCst);
            e.admit(&mut ctx, job);
        }
        // Those that must wait learn their place in the line.
        for (partition, id) in joined {
            if let Some((ahead, job)) = e.queue.ahead(partition, |j| j.id == id) {
                let ahead = u32::try_from(ahead).unwrap_or(u32::MAX);
                let _ = send(&job.events, EngineEvent::Queued { ahead });
            }
        }
        if e.active.is_empty() {
            if !input_open && e.queue.is_empty() {
                return;
            }
            e.publish_load();
            continue;
        }
        e.end_cancelled(&mut ctx);
        e.step(&mut ctx, &mut batch);
        e.publish_load();
    }
}

impl Engine {
    fn enqueue(&mut self, job: Job) {
        let partition = job.cache.partition;
        if let Err(job) = self.queue.push(partition, job) {
            // Cannot happen while the channel is no larger than the queue;
            // refused rather than dropped if it ever does.
            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            let _ = send(
                &job.events,
                EngineEvent::Failed("the engine queue is full".into()),
            );
        }
    }

    /// Requests cancelled while they waited leave the queue at once.
    fn drop_cancelled_waiting(&mut self) {
        let before = self.queue.len();
        self.queue.retain(|j| {
            let gone = j.cancel.is_cancelled() || j.events.is_closed();
            if gone {
                let _ = send(&j.events, EngineEvent::Done(cancelled_unstarted()));
            }
            !gone
        });
        let left = before - self.queue.len();
        if left > 0 {
            self.shared.queued.fetch_sub(left, Ordering::SeqCst);
        }
    }

    fn publish_load(&self) {
        if let Ok(mut l) = self.shared.load.lock() {
            l.slots_total = self.cfg.slots;
            l.slots_busy = self.active.len() as u32;
            l.tokens_per_s = self.rate_ewma;
            l.cache_keys = self.cache.keys(CACHE_SUMMARY_MAX_KEYS);
        }
    }

    /// Starts a job in the slot the prompt cache picks.
    fn admit(&mut self, ctx: &mut LlamaContext<'_>, job: Job) {
        let sampler = match sampler_for(&self.model, &job.params) {
            Ok(s) => s,
            Err(m) => {
                let _ = send(&job.events, EngineEvent::Failed(m));
                return;
            }
        };
        let prompt = super::tokenize_prompt(&self.model, &job.prompt);
        // A resumed answer goes on after the tokens already streamed.
        let n_vocab = self.model.model().n_vocab();
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
            return;
        }
        let forced: VecDeque<LlamaToken> = job
            .params
            .resume_tokens
            .iter()
            .map(|&t| LlamaToken(t))
            .collect();
        let limit = self.cfg.context_tokens_per_seq as usize;
        if prompt.is_empty() || prompt.len() + forced.len() >= limit {
            let _ = send(
                &job.events,
                EngineEvent::Failed(format!(
                    "prompt of {} tokens does not fit the context of {} tokens per request",
                    prompt.len() + forced.len(),
                    limit
                )),
            );
            return;
        }
        let ids: Vec<i32> = prompt.iter().map(|t| t.0).collect();
        let Some(plan) = self.cache.plan(job.cache, &ids) else {
            // Only called with a slot idle; keep the job rather than lose it.
            let _ = self.queue.push(job.cache.partition, job);
            self.shared.queued.fetch_add(1, Ordering::SeqCst);
            return;
        };
        let seq = plan.seq as i32;
        if plan.save_first {
            self.save(ctx, plan.seq);
        }
        let mut reuse = plan.reuse;
        if let Some(id) = plan.restore {
            let _ = ctx.clear_kv_cache_seq(Some(seq as u32), None, None);
            match self
                .states
                .remove(&id)
                .map(|st| ctx.state_seq_set(&st, seq))
            {
                Some(Ok(())) => self.cache.restored(plan.seq, id),
                other => {
                    if let Some(Err(e)) = other {
                        tracing::warn!(error = %e, "a saved prompt state failed to load; prefilling");
                    }
                    self.cache.forget(id);
                    reuse = 0;
                }
            }
        }
        reuse = self.keep_prefix(ctx, seq, reuse);
        self.cache.truncate(plan.seq, reuse);
        // A character the failed node's last tokens ended inside of is
        // completed by this node's first ones.
        let sent: Vec<u8> = forced
            .iter()
            .flat_map(|&t| self.model.model().vocab().token_to_piece(t, false, None))
            .collect();
        let utf8 = Utf8Stream::resumed_after(&sent);
        let prompt_tokens = (prompt.len() + forced.len()) as u32;
        let started = EngineEvent::Started {
            prompt_tokens,
            cached_tokens: reuse as u32,
        };
        if !matches!(send(&job.events, started), Sent::Ok) {
            self.cache.release(plan.seq, ids[..reuse].to_vec());
            return;
        }
        let s = Seq {
            job_id: job.id,
            events: job.events,
            cancel: job.cancel,
            seq_id: seq,
            in_cache: ids[..reuse].to_vec(),
            cached: reuse,
            prompt,
            forced,
            prefilled: reuse,
            n_past: reuse as i32,
            next: None,
            logits_idx: None,
            sampler,
            max_tokens: job.params.max_tokens,
            ignore_eos: job.params.ignore_eos,
            generated: 0,
            utf8,
            submitted: Instant::now(),
            first_at: None,
            last_at: None,
            pacer: Pacer::new(Duration::from_millis(u64::from(
                self.cfg.stream_interval_ms,
            ))),
            stops: StopMatcher::new(&job.params.stop),
        };
        let at = self.active.partition_point(|a| a.seq_id < s.seq_id);
        self.active.insert(at, s);
    }

    /// Trims sequence `seq` to its first `reuse` positions and checks the
    /// cache can go on from there; returns what is kept (0 clears it).
    fn keep_prefix(&mut self, ctx: &mut LlamaContext<'_>, seq: i32, reuse: usize) -> usize {
        let clear = |ctx: &mut LlamaContext<'_>| {
            let _ = ctx.clear_kv_cache_seq(Some(seq as u32), None, None);
            0
        };
        if reuse == 0 {
            return clear(ctx);
        }
        if ctx
            .kv_cache_seq_rm(seq, u32::try_from(reuse).ok(), None)
            .is_err()
        {
            return clear(ctx);
        }
        // A sliding-window cache keeps only the last positions of a
        // sequence: the next token at `reuse` attends to positions from
        // `reuse + 1 - window`, which must still be there.
        let pos_min = ctx.kv_cache_seq_pos_min(seq);
        let needed = (reuse + 1).saturating_sub(self.n_swa as usize);
        let whole = pos_min <= 0 || (self.n_swa > 0 && pos_min as usize <= needed);
        if whole { reuse } else { clear(ctx) }
    }

    /// Saves a slot's cached sequence to memory (within the budget).
    fn save(&mut self, ctx: &LlamaContext<'_>, seq: usize) {
        match ctx.state_seq_get(seq as i32, LlamaStateSeqFlags::empty()) {
            Ok(state) => {
                let (id, dropped) = self.cache.saved(seq, state.byte_len() as u64);
                for d in dropped {
                    self.states.remove(&d);
                }
                if let Some(id) = id {
                    self.states.insert(id, state);
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not save a cached prompt"),
        }
    }

    /// Cancelled jobs end before they cost another step.
    fn end_cancelled(&mut self, ctx: &mut LlamaContext<'_>) {
        let mut i = 0;
        while i < self.active.len() {
            if self.active[i].cancel.is_cancelled() || self.active[i].events.is_closed() {
                let s = self.active.remove(i);
                self.finish(ctx, s, StopReason::Cancelled);
            } else {
                i += 1;
            }
        }
    }

    /// One decode step over every running sequence.
    fn step(&mut self, ctx: &mut LlamaContext<'_>, batch: &mut LlamaBatch<'_>) {
        batch.clear();
        let cap = self.cfg.batch_tokens as usize;
        let mut add_failed = false;
        // Decoding sequences first (a token each), then prompt chunks in
        // the room left; both in sequence order (see the module docs).
        let decoding = self.active.iter().filter(|s| s.next.is_some()).count();
        let mut room = cap.saturating_sub(decoding);
        for s in self.active.iter_mut() {
            if let Some(tok) = s.next.take() {
                s.logits_idx = Some(batch.n_tokens());
                add_failed |= batch.add(tok, s.n_past, &[s.seq_id], true).is_err();
                s.in_cache.push(tok.0);
                s.n_past += 1;
            } else if s.prefilled < s.prompt.len() && room > 0 {
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
                    s.in_cache.push(s.prompt[pos].0);
                }
                room -= take;
                s.prefilled += take;
                if s.prefilled == s.prompt.len() {
                    s.n_past = s.prompt.len() as i32;
                }
            }
        }
        if batch.n_tokens() == 0 {
            return;
        }
        let decoded = if add_failed {
            Err("batch overflow".to_string())
        } else {
            ctx.decode(batch).map_err(|e| e.to_string())
        };
        if let Err(err) = decoded {
            tracing::error!(error = %err, "decode failed; failing the running requests");
            for mut s in self.active.drain(..) {
                // What was made still goes out: a client can resume from it.
                release_held(&mut s);
                let _ = send(
                    &s.events,
                    EngineEvent::Failed(format!("decode failed: {err}")),
                );
                let _ = ctx.clear_kv_cache_seq(Some(s.seq_id as u32), None, None);
                self.cache.discard(s.seq_id as usize);
            }
            return;
        }
        self.sample(ctx);
    }

    /// Samples the next token of every sequence that has logits now.
    fn sample(&mut self, ctx: &mut LlamaContext<'_>) {
        let model = Arc::clone(&self.model);
        let vocab = model.model().vocab();
        let mut i = 0;
        while i < self.active.len() {
            let s = &mut self.active[i];
            let Some(idx) = s.logits_idx.take() else {
                i += 1;
                continue;
            };
            if let Some(tok) = s.forced.pop_front() {
                // A grammar (and the penalties) follow the resumed tokens as
                // if they had picked them.
                if let Sampler::Constrained(chain) = &mut s.sampler {
                    chain.accept(tok);
                }
                s.next = Some(tok);
                i += 1;
                continue;
            }
            let tok = s.sampler.sample(ctx, idx);
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
                let step = s.stops.push(made);
                if step.stopped {
                    // The answer is what was sent: the tokens holding the
                    // stop sequence are not part of it.
                    s.generated -= step.dropped.min(s.generated);
                    stop = Some(StopReason::EndOfGeneration);
                }
                // One event per release: each event wakes the node.
                let mut sent = Sent::Ok;
                for t in step.release {
                    if let Some(due) = s.pacer.push(now, t) {
                        sent = send(&s.events, EngineEvent::Tokens(due.collect()));
                        if !matches!(sent, Sent::Ok) {
                            break;
                        }
                    }
                }
                match sent {
                    Sent::Ok => {}
                    Sent::Gone => stop = Some(StopReason::Cancelled),
                    Sent::Full => {
                        let s = self.active.remove(i);
                        let _ = ctx.clear_kv_cache_seq(Some(s.seq_id as u32), None, None);
                        self.cache.discard(s.seq_id as usize);
                        tracing::warn!(request = %s.job_id, "client not reading; job dropped");
                        continue;
                    }
                }
                if stop.is_none() {
                    if s.generated >= s.max_tokens {
                        stop = Some(StopReason::MaxTokens);
                    } else if s.n_past >= self.cfg.context_tokens_per_seq as i32 {
                        // No position left to feed this token back at.
                        stop = Some(StopReason::ContextFull);
                    } else {
                        s.next = Some(tok);
                    }
                }
            }
            if let Some(reason) = stop {
                let s = self.active.remove(i);
                self.finish(ctx, s, reason);
            } else {
                i += 1;
            }
        }
    }

    /// Ends a sequence: its cache stays for the next prompt that shares it.
    fn finish(&mut self, _ctx: &mut LlamaContext<'_>, mut s: Seq, stop: StopReason) {
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
            self.rate_ewma = if self.rate_ewma == 0.0 {
                r
            } else {
                0.7 * self.rate_ewma + 0.3 * r
            };
        }
        // Only what was fed to the model is in the cache; a prompt cut
        // short by a cancel keeps its computed part.
        let kept = std::mem::take(&mut s.in_cache);
        self.cache.release(s.seq_id as usize, kept);
        // Load is published before Done so a client that sees Done never
        // reads a stale busy count.
        self.publish_load();
        release_held(&mut s);
        let _ = send(
            &s.events,
            EngineEvent::Done(DoneInfo {
                stop,
                prompt_tokens: s.prompt.len() as u32,
                cached_tokens: s.cached as u32,
                generated_tokens: s.generated,
                first_token_ms,
                decode_tokens_per_s,
                finished_at_ms: unix_ms(),
                receipt: None,
                unrecorded: None,
            }),
        );
    }
}

/// What a request cancelled before it started reports.
fn cancelled_unstarted() -> DoneInfo {
    DoneInfo {
        stop: StopReason::Cancelled,
        prompt_tokens: 0,
        cached_tokens: 0,
        generated_tokens: 0,
        first_token_ms: 0.0,
        decode_tokens_per_s: 0.0,
        finished_at_ms: unix_ms(),
        receipt: None,
        unrecorded: None,
    }
}
