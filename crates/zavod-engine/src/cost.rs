//! A cost-model engine: no weights, only timing. Tokens are deterministic
//! words derived from the prompt and seed; prefill and decode take the time
//! the model says. For the simulator and for tests of routing and
//! supervision, never for answers people read.
//!
//! `panic_on` makes the engine thread panic when a prompt contains the given
//! text, so tests can show that a dead engine is detected and replaced.

use crate::{Engine, EngineError, EngineEvent, GenToken, Job, ModelInfo, Prompt};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use zavod_proto::chat::prompt::Turn;
use zavod_proto::mesh::capacity::WorkerLoad;
use zavod_proto::mesh::score::splitmix64;
use zavod_proto::wire::{DoneInfo, StopReason};

/// Timing of a model on some hardware.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CostModel {
    pub prefill_tokens_per_s: f64,
    /// Decode rate of a single stream.
    pub decode_tokens_per_s: f64,
}

impl CostModel {
    pub fn prefill_ms(&self, tokens: u32) -> f64 {
        f64::from(tokens) * 1e3 / self.prefill_tokens_per_s.max(1e-9)
    }

    /// Time between tokens of one stream when `streams` decode together:
    /// batching raises the aggregate rate sublinearly (exponent 0.6 fits
    /// llama.cpp's batched decode on CPU: 1→74, 8→160 tok/s).
    pub fn token_interval_ms(&self, streams: u32) -> f64 {
        let n = f64::from(streams.max(1));
        let aggregate = self.decode_tokens_per_s * n.powf(0.37);
        1e3 * n / aggregate.max(1e-9)
    }
}

#[derive(Debug, Clone)]
pub struct CostEngineConfig {
    pub name: String,
    pub model: CostModel,
    pub queue_capacity: usize,
    pub panic_on: Option<String>,
}

#[derive(Debug, Default)]
struct Shared {
    queued: AtomicUsize,
    busy: AtomicUsize,
    alive: AtomicBool,
    rate: Mutex<f32>,
}

/// Runs jobs one after another on its own thread, sleeping per the model.
pub struct CostModelEngine {
    info: ModelInfo,
    tx: SyncSender<Job>,
    shared: Arc<Shared>,
    cap: usize,
}

impl std::fmt::Debug for CostModelEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CostModelEngine({})", self.info.name)
    }
}

fn word_tokens(text: &str) -> u32 {
    u32::try_from(text.split_whitespace().count()).unwrap_or(u32::MAX)
}

impl CostModelEngine {
    pub fn start(cfg: CostEngineConfig) -> Result<Self, EngineError> {
        let (tx, rx) = sync_channel::<Job>(cfg.queue_capacity.max(1));
        let shared = Arc::new(Shared::default());
        shared.alive.store(true, Ordering::SeqCst);
        let sh = Arc::clone(&shared);
        let model = cfg.model;
        let panic_on = cfg.panic_on.clone();
        std::thread::Builder::new()
            .name("zavod-cost-engine".into())
            .spawn(move || {
                struct Guard(Arc<Shared>);
                impl Drop for Guard {
                    fn drop(&mut self) {
                        self.0.alive.store(false, Ordering::SeqCst);
                    }
                }
                let _g = Guard(Arc::clone(&sh));
                while let Ok(job) = rx.recv() {
                    sh.queued.fetch_sub(1, Ordering::SeqCst);
                    if let Some(p) = &panic_on
                        && job.prompt.joined().contains(p.as_str())
                    {
                        panic!("cost-model engine: injected fault for prompt containing {p:?}");
                    }
                    sh.busy.store(1, Ordering::SeqCst);
                    run_job(&model, job, &sh);
                    sh.busy.store(0, Ordering::SeqCst);
                }
            })
            .map_err(|e| EngineError::Context(e.to_string()))?;
        Ok(CostModelEngine {
            info: ModelInfo {
                name: cfg.name.clone(),
                quant: "none".into(),
                path: String::new(),
                size_bytes: 0,
                context_tokens_per_seq: 4096,
                slots: 1,
            },
            tx,
            shared,
            cap: cfg.queue_capacity,
        })
    }
}

fn run_job(model: &CostModel, job: Job, sh: &Shared) {
    let start = Instant::now();
    let prompt_tokens = word_tokens(&job.prompt.joined()).max(1);
    if job
        .events
        .try_send(EngineEvent::Started {
            prompt_tokens,
            cached_tokens: 0,
        })
        .is_err()
    {
        return;
    }
    std::thread::sleep(Duration::from_secs_f64(
        model.prefill_ms(prompt_tokens) / 1e3,
    ));
    let interval = Duration::from_secs_f64(model.token_interval_ms(1) / 1e3);
    let mut h = splitmix64(job.params.seed ^ u64::from(prompt_tokens));
    let mut first = None;
    let mut generated = 0;
    let mut stop = StopReason::MaxTokens;
    while generated < job.params.max_tokens {
        if job.cancel.is_cancelled() {
            stop = StopReason::Cancelled;
            break;
        }
        if generated > 0 {
            std::thread::sleep(interval);
        }
        h = splitmix64(h);
        let text = format!(" w{}", h % 1000);
        if job
            .events
            .try_send(EngineEvent::Tokens(vec![GenToken {
                index: generated,
                text,
                // Any id will do for a model that is only a cost.
                id: i32::try_from(generated).unwrap_or(i32::MAX),
            }]))
            .is_err()
        {
            return;
        }
        first.get_or_insert_with(Instant::now);
        generated += 1;
    }
    let first_token_ms = first.map_or(0.0, |f| (f - start).as_secs_f64() * 1e3);
    let rate = if generated > 1 {
        first.map_or(0.0, |f| {
            f64::from(generated - 1) / f.elapsed().as_secs_f64()
        })
    } else {
        0.0
    };
    if let Ok(mut r) = sh.rate.lock() {
        *r = rate as f32;
    }
    let _ = job.events.try_send(EngineEvent::Done(DoneInfo {
        stop,
        prompt_tokens,
        cached_tokens: 0,
        generated_tokens: generated,
        first_token_ms,
        decode_tokens_per_s: rate,
        finished_at_ms: 0,
        receipt: None,
        unrecorded: None,
    }));
}

impl Engine for CostModelEngine {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn submit(&self, job: Job) -> Result<(), EngineError> {
        self.shared.queued.fetch_add(1, Ordering::SeqCst);
        self.tx.try_send(job).map_err(|e| {
            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            match e {
                TrySendError::Full(_) => EngineError::QueueFull(self.cap),
                TrySendError::Disconnected(_) => EngineError::Stopped,
            }
        })
    }

    fn load(&self) -> WorkerLoad {
        WorkerLoad {
            slots_total: 1,
            slots_busy: u32::try_from(self.shared.busy.load(Ordering::SeqCst)).unwrap_or(1),
            queue_depth: u32::try_from(self.shared.queued.load(Ordering::SeqCst)).unwrap_or(0),
            tokens_per_s: self.shared.rate.lock().map_or(0.0, |r| *r),
            cache_keys: Vec::new(),
        }
    }

    fn count_tokens(&self, text: &str) -> u32 {
        word_tokens(text)
    }

    fn format_chat(&self, turns: &[Turn]) -> Result<Prompt, EngineError> {
        Ok(Prompt::text_only(
            turns
                .iter()
                .map(|t| format!("{}: {}\n", t.role.as_str(), t.text))
                .collect::<String>(),
        ))
    }

    fn is_alive(&self) -> bool {
        self.shared.alive.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CancelFlag;
    use zavod_proto::RequestId;
    use zavod_proto::wire::GenParams;

    fn engine(panic_on: Option<&str>) -> CostModelEngine {
        CostModelEngine::start(CostEngineConfig {
            name: "cost".into(),
            model: CostModel {
                prefill_tokens_per_s: 1e6,
                decode_tokens_per_s: 1e4,
            },
            queue_capacity: 4,
            panic_on: panic_on.map(Into::into),
        })
        .expect("starts")
    }

    fn job(prompt: &str, seed: u64) -> (Job, tokio::sync::mpsc::Receiver<EngineEvent>) {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        (
            Job {
                id: RequestId(1),
                prompt: Prompt::text_only(prompt),
                params: GenParams {
                    seed,
                    max_tokens: 5,
                    ..Default::default()
                },
                events: tx,
                cancel: CancelFlag::default(),
                cache: crate::CacheTag::default(),
            },
            rx,
        )
    }

    fn collect(mut rx: tokio::sync::mpsc::Receiver<EngineEvent>) -> Vec<EngineEvent> {
        let mut out = vec![];
        while let Some(e) = rx.blocking_recv() {
            let end = matches!(e, EngineEvent::Done(_) | EngineEvent::Failed(_));
            out.push(e);
            if end {
                break;
            }
        }
        out
    }

    #[test]
    fn same_seed_same_words_and_one_terminal_event() {
        let e = engine(None);
        let (j1, r1) = job("a b c", 7);
        e.submit(j1).expect("queued");
        let a = collect(r1);
        let (j2, r2) = job("a b c", 7);
        e.submit(j2).expect("queued");
        let b = collect(r2);
        let strip = |v: &[EngineEvent]| {
            v.iter()
                .flat_map(|e| match e {
                    EngineEvent::Tokens(t) => t.iter().map(|t| t.text.clone()).collect(),
                    _ => Vec::new(),
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(strip(&a), strip(&b));
        assert_eq!(strip(&a).len(), 5);
        assert!(matches!(a.last(), Some(EngineEvent::Done(d)) if d.stop == StopReason::MaxTokens));
    }

    #[test]
    fn injected_panic_kills_the_engine_visibly() {
        let e = engine(Some("boom"));
        let (j, rx) = job("boom now", 1);
        e.submit(j).expect("queued");
        let events = collect(rx);
        assert!(events.is_empty(), "no terminal event from a dead engine");
        for _ in 0..100 {
            if !e.is_alive() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!e.is_alive());
    }

    #[test]
    fn batching_raises_aggregate_rate_sublinearly() {
        let m = CostModel {
            prefill_tokens_per_s: 700.0,
            decode_tokens_per_s: 74.0,
        };
        let agg = |n: u32| f64::from(n) * 1e3 / m.token_interval_ms(n);
        assert!((agg(1) - 74.0).abs() < 1e-9);
        assert!(agg(8) > 140.0 && agg(8) < 180.0, "{}", agg(8));
    }
}
