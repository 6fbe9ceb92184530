//! The prompt cache and the fair queue of the llama.cpp engine, against the
//! real development model (`models/gemma-3-270m-q4_k_m.gguf`).

use std::path::PathBuf;
use std::time::{Duration, Instant};
use zavod_engine::llama::{LlamaConfig, LlamaEngine, LoadedModel, job_channel};
use zavod_engine::{CacheTag, CancelFlag, Engine, EngineEvent, Job, Prompt};
use zavod_proto::RequestId;
use zavod_proto::chat::prompt::{Role, Turn};
use zavod_proto::wire::{GenParams, StopReason};

fn config(slots: u32, prompt_cache: bool) -> LlamaConfig {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/gemma-3-270m-q4_k_m.gguf");
    assert!(
        path.exists(),
        "{} is missing: run scripts/setup.sh first",
        path.display()
    );
    LlamaConfig {
        path,
        name: None,
        gpu_layers: 0,
        slots,
        context_tokens_per_seq: 2048,
        threads: 0,
        batch_tokens: 512,
        queue_capacity: 16,
        chat_template: None,
        stream_interval_ms: 0,
        prompt_cache,
        prompt_cache_ram_bytes: 256 << 20,
        share_prompt_cache: false,
    }
}

fn engine(cfg: &LlamaConfig) -> LlamaEngine {
    let model = LoadedModel::load(cfg, |_| {}).expect("model loads");
    LlamaEngine::start(model, cfg).expect("engine starts")
}

fn greedy(max_tokens: u32) -> GenParams {
    GenParams {
        temperature: 0.0,
        max_tokens,
        ..Default::default()
    }
}

fn tag(partition: u64) -> CacheTag {
    CacheTag {
        partition,
        key: partition,
    }
}

#[derive(Debug)]
struct Answer {
    prompt_tokens: u32,
    cached_tokens: u32,
    text: String,
    ids: Vec<i32>,
}

fn ask(e: &LlamaEngine, prompt: &Prompt, cache: CacheTag, params: GenParams) -> Answer {
    let (tx, mut rx) = job_channel();
    e.submit(Job {
        id: RequestId(1),
        prompt: prompt.clone(),
        params,
        events: tx,
        cancel: CancelFlag::default(),
        cache,
    })
    .expect("queued");
    let mut a = Answer {
        prompt_tokens: 0,
        cached_tokens: 0,
        text: String::new(),
        ids: Vec::new(),
    };
    loop {
        match rx.blocking_recv().expect("a terminal event") {
            EngineEvent::Started {
                prompt_tokens,
                cached_tokens,
            } => (a.prompt_tokens, a.cached_tokens) = (prompt_tokens, cached_tokens),
            EngineEvent::Tokens(t) => {
                for t in t {
                    a.ids.push(t.id);
                    a.text.push_str(&t.text);
                }
            }
            EngineEvent::Done(d) => {
                assert_eq!(d.cached_tokens, a.cached_tokens);
                return a;
            }
            EngineEvent::Failed(m) => panic!("job failed: {m}"),
            EngineEvent::Queued { .. } => {}
        }
    }
}

fn user(text: &str) -> Turn {
    Turn {
        role: Role::User,
        text: text.into(),
        tokens: 0,
    }
}

fn assistant(text: &str) -> Turn {
    Turn {
        role: Role::Assistant,
        text: text.into(),
        tokens: 0,
    }
}

const FIRST: &str = "Tell me about the old harbour town, its market and its walls, and the \
     traders who came there in winter with salt and cloth from the north.";
const SECOND: &str = "And what became of the bell tower after the great fire?";

#[test]
fn a_later_turn_prefills_only_its_new_tokens_and_answers_as_a_cold_run() {
    let cached = engine(&config(2, true));
    let p1 = cached.format_chat(&[user(FIRST)]).expect("formats");
    let a1 = ask(&cached, &p1, tag(1), greedy(24));
    assert_eq!(a1.cached_tokens, 0, "nothing is cached at first");
    let p2 = cached
        .format_chat(&[user(FIRST), assistant(&a1.text), user(SECOND)])
        .expect("formats");
    let a2 = ask(&cached, &p2, tag(1), greedy(24));
    // The first turn's prompt and answer are reused; only the rest is new.
    assert!(
        a2.cached_tokens >= a1.prompt_tokens,
        "cached {} of {}, the first prompt alone has {}",
        a2.cached_tokens,
        a2.prompt_tokens,
        a1.prompt_tokens
    );
    let new = a2.prompt_tokens - a2.cached_tokens;
    let second = cached.count_tokens(SECOND);
    assert!(
        new <= second + 16,
        "{new} tokens prefilled for a new turn of {second} (plus its template)"
    );
    // At temperature 0, the same answer as an engine that prefills it all.
    let cold = engine(&config(2, false));
    let c2 = ask(&cold, &p2, tag(1), greedy(24));
    assert_eq!(c2.cached_tokens, 0);
    assert_eq!(c2.prompt_tokens, a2.prompt_tokens);
    assert_eq!(a2.ids, c2.ids, "cached {:?} vs cold {:?}", a2.text, c2.text);
    assert_eq!(a2.text, c2.text);
}

#[test]
fn a_credential_never_reuses_another_credentials_prompt() {
    let e = engine(&config(2, true));
    let p = e.format_chat(&[user(FIRST)]).expect("formats");
    let first = ask(&e, &p, tag(1), greedy(4));
    assert_eq!(first.cached_tokens, 0);
    // The same text from another credential computes it afresh.
    let other = ask(&e, &p, tag(2), greedy(4));
    assert_eq!(other.cached_tokens, 0);
    // The first credential again: all but the last prompt token.
    let again = ask(&e, &p, tag(1), greedy(4));
    assert_eq!(again.cached_tokens, again.prompt_tokens - 1);
    assert_eq!(again.ids, first.ids);
}

#[test]
fn a_conversation_evicted_from_its_slot_comes_back_from_memory() {
    // One slot: each conversation's turn pushes the other out, to memory
    // (long enough to be worth saving).
    let e = engine(&config(1, true));
    let first = FIRST.repeat(3);
    let a1 = e.format_chat(&[user(&first)]).expect("formats");
    let b1 = e
        .format_chat(&[user("Describe a winter festival with music.")])
        .expect("formats");
    let ra = ask(&e, &a1, tag(1), greedy(8));
    let rb = ask(&e, &b1, tag(1), greedy(8));
    // Only the chat template's opening is shared.
    assert!(rb.cached_tokens < 8, "{rb:?}");
    let a2 = e
        .format_chat(&[user(&first), assistant(&ra.text), user(SECOND)])
        .expect("formats");
    let ra2 = ask(&e, &a2, tag(1), greedy(8));
    assert!(
        ra2.cached_tokens >= ra.prompt_tokens,
        "restored {} tokens, the first prompt had {}",
        ra2.cached_tokens,
        ra.prompt_tokens
    );
}

/// Submits a job; returns the receiver and its cancel flag.
fn submit(
    e: &LlamaEngine,
    id: u128,
    prompt: &str,
    partition: u64,
    max_tokens: u32,
) -> (tokio::sync::mpsc::Receiver<EngineEvent>, CancelFlag) {
    let (tx, rx) = job_channel();
    let cancel = CancelFlag::default();
    e.submit(Job {
        id: RequestId(id),
        prompt: Prompt::markup(prompt),
        params: GenParams {
            ignore_eos: true,
            ..greedy(max_tokens)
        },
        events: tx,
        cancel: cancel.clone(),
        cache: tag(partition),
    })
    .expect("queued");
    (rx, cancel)
}

/// When each job started, by waiting for the events of all of them.
fn started_at(rxs: Vec<tokio::sync::mpsc::Receiver<EngineEvent>>) -> Vec<Instant> {
    let handles: Vec<_> = rxs
        .into_iter()
        .map(|mut rx| {
            std::thread::spawn(move || {
                let mut at = None;
                while let Some(ev) = rx.blocking_recv() {
                    match ev {
                        EngineEvent::Started { .. } => at = Some(Instant::now()),
                        EngineEvent::Done(_) => break,
                        EngineEvent::Failed(m) => panic!("{m}"),
                        EngineEvent::Queued { .. } | EngineEvent::Tokens(_) => {}
                    }
                }
                at.expect("the job started")
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect()
}

#[test]
fn waiting_requests_take_turns_by_credential_and_a_cancelled_one_leaves_at_once() {
    let e = engine(&config(1, false));
    // Credential 1 fills the slot and queues two more; credential 2 asks
    // once, last.
    let (r1, _) = submit(&e, 1, "Count slowly: one, two, three", 1, 24);
    std::thread::sleep(Duration::from_millis(200));
    let (r2, _) = submit(&e, 2, "Count slowly: four, five, six", 1, 8);
    let (r3, _) = submit(&e, 3, "Count slowly: seven, eight", 1, 8);
    let (r4, _) = submit(&e, 4, "Name three rivers", 2, 8);
    // A waiting request that is cancelled ends at once, without starting.
    let (mut gone, cancel) = submit(&e, 5, "Never mind", 3, 8);
    assert!(e.load().queue_depth >= 3, "{:?}", e.load());
    cancel.cancel();
    let t = Instant::now();
    match gone.blocking_recv() {
        Some(EngineEvent::Done(d)) => {
            assert_eq!((d.stop, d.generated_tokens), (StopReason::Cancelled, 0));
        }
        other => panic!("expected a cancelled end, got {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let at = started_at(vec![r1, r2, r3, r4]);
    // Credential 2's one request goes before credential 1's next two.
    assert!(at[3] < at[1] && at[3] < at[2], "{at:?}");
    assert!(at[1] < at[2], "one credential's requests keep their order");
    assert_eq!(e.load().queue_depth, 0);
}
