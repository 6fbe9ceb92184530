//! The workloads `zavod bench --concurrent` and `--conversation` put on an
//! OpenAI-compatible server (a zavod node's HTTP API, or llama.cpp's own
//! llama-server), with one streaming client for both, so the two servers
//! are measured by the same yardstick.
//!
//! - Concurrent: N clients at once, each sending a few requests one after
//!   another; prompts are distinct (a nonce leads each), so no server gets
//!   a prompt it has cached.
//! - Conversation: C clients each holding a K-turn chat, sending the whole
//!   history every turn as OpenAI clients do; each turn adds a long user
//!   message. A server that keeps a conversation's cache prefills only the
//!   new turn; one that does not, all of it.
//!
//! Every request is greedy with `ignore_eos`, so both servers generate
//! exactly the tokens asked for.

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// Words the synthetic prompts are drawn from: plain English, so a
/// tokenizer cuts them about as it cuts prose.
const WORDS: &[&str] = &[
    "the",
    "river",
    "city",
    "market",
    "grain",
    "traders",
    "walls",
    "harbour",
    "ships",
    "winter",
    "summer",
    "bridge",
    "council",
    "bread",
    "salt",
    "stone",
    "tower",
    "bells",
    "school",
    "library",
    "merchants",
    "rain",
    "road",
    "north",
    "south",
    "forest",
    "village",
    "festival",
    "music",
    "letters",
    "lamp",
    "garden",
    "mill",
    "wheat",
    "boats",
    "fishermen",
    "clock",
    "square",
    "church",
    "painters",
    "workshop",
    "iron",
    "copper",
    "wool",
    "cloth",
    "dyers",
    "weavers",
    "and",
    "of",
    "in",
    "with",
    "over",
    "under",
    "after",
    "before",
    "while",
    "because",
    "many",
    "old",
    "new",
    "small",
    "great",
    "quiet",
    "busy",
    "early",
    "late",
    "every",
    "some",
    "was",
    "were",
    "built",
    "grew",
    "sold",
    "carried",
    "remembered",
    "opened",
    "closed",
    "painted",
];

/// A seeded word generator (splitmix64), so every run of a bench asks the
/// same kind of text.
#[derive(Debug, Clone)]
pub(crate) struct Text(u64);

impl Text {
    pub(crate) fn new(seed: u64) -> Self {
        Text(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        zavod_proto::mesh::score::splitmix64(self.0)
    }

    /// `words` words of prose-like text, in sentences.
    pub(crate) fn words(&mut self, words: usize) -> String {
        let mut s = String::with_capacity(words * 7);
        for i in 0..words {
            let w = WORDS[(self.next() % WORDS.len() as u64) as usize];
            if i % 12 == 0 {
                if i > 0 {
                    s.push_str(". ");
                }
                let mut c = w.chars();
                if let Some(f) = c.next() {
                    s.extend(f.to_uppercase());
                    s.push_str(c.as_str());
                }
            } else {
                s.push(' ');
                s.push_str(w);
            }
        }
        s.push('.');
        s
    }
}

/// One streamed answer as the client saw it.
#[derive(Debug, Clone)]
pub(crate) struct Answer {
    pub text: String,
    /// From sending the request to the first token.
    pub first_token: Duration,
    /// Arrival times of the tokens (content chunks), from the request.
    pub token_times: Vec<Duration>,
    pub prompt_tokens: Option<u64>,
    pub cached_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    /// The node that answered (zavod's `x-zavod-served-by`), if said.
    pub served_by: Option<String>,
}

impl Answer {
    /// Decode rate: tokens after the first over the time they took.
    pub(crate) fn decode_tok_s(&self) -> f64 {
        let n = self
            .completion_tokens
            .unwrap_or(self.token_times.len() as u64);
        match (self.token_times.first(), self.token_times.last()) {
            (Some(a), Some(b)) if n > 1 && b > a => (n - 1) as f64 / (*b - *a).as_secs_f64(),
            _ => 0.0,
        }
    }
}

/// An OpenAI-compatible server under test.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    pub name: String,
    /// `http://HOST:PORT`.
    pub base: String,
    pub model: String,
    pub bearer: Option<String>,
}

/// Streams one chat completion; `messages` is the whole conversation.
pub(crate) async fn stream_chat(
    http: &reqwest::Client,
    ep: &Endpoint,
    messages: &[Value],
    max_tokens: u32,
) -> Result<Answer> {
    let body = json!({
        "model": ep.model,
        "messages": messages,
        "stream": true,
        "stream_options": {"include_usage": true},
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": true,
        "cache_prompt": true,
    });
    let mut req = http
        .post(format!("{}/v1/chat/completions", ep.base))
        .json(&body);
    if let Some(b) = &ep.bearer {
        req = req.bearer_auth(b);
    }
    let sent = Instant::now();
    let resp = req
        .send()
        .await
        .with_context(|| format!("sending a request to {}", ep.name))?;
    let status = resp.status();
    let served_by = resp
        .headers()
        .get("x-zavod-served-by")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        bail!("{} answered {status}: {text}", ep.name);
    }
    let mut answer = Answer {
        text: String::new(),
        first_token: Duration::ZERO,
        token_times: Vec::with_capacity(max_tokens as usize),
        prompt_tokens: None,
        cached_tokens: None,
        completion_tokens: None,
        served_by,
    };
    let mut stream = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.with_context(|| format!("reading the stream from {}", ep.name))?;
        let at = sent.elapsed();
        buf.extend_from_slice(&chunk);
        while let Some(end) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let Some(data) = line.trim().strip_prefix("data:") else {
                continue;
            };
            let data = data.trim();
            if data == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(data)
                .with_context(|| format!("{} sent a chunk that is not JSON: {data}", ep.name))?;
            if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                answer.prompt_tokens = u["prompt_tokens"].as_u64();
                answer.completion_tokens = u["completion_tokens"].as_u64();
                answer.cached_tokens = u["prompt_tokens_details"]["cached_tokens"].as_u64();
            }
            // llama-server reports its own figures as `timings`.
            if let Some(t) = v.get("timings").filter(|t| !t.is_null())
                && let Some(n) = t["cache_n"].as_u64()
            {
                answer.cached_tokens = Some(n);
            }
            let content = v["choices"][0]["delta"]["content"].as_str().unwrap_or("");
            if !content.is_empty() {
                if answer.token_times.is_empty() {
                    answer.first_token = at;
                }
                answer.token_times.push(at);
                answer.text.push_str(content);
            }
        }
    }
    if answer.token_times.is_empty() {
        bail!("{} streamed no tokens", ep.name);
    }
    Ok(answer)
}

/// What one run of the concurrent workload gave.
#[derive(Debug, Clone)]
pub(crate) struct ConcurrentRun {
    pub aggregate_tok_s: f64,
    pub median_stream_tok_s: f64,
    pub median_first_token_ms: f64,
    pub p90_first_token_ms: f64,
    pub wall_s: f64,
}

/// The concurrent workload's shape.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Concurrent {
    pub clients: usize,
    pub requests_per_client: usize,
    pub prompt_words: usize,
    pub tokens: u32,
}

pub(crate) async fn run_concurrent(
    http: &reqwest::Client,
    ep: &Endpoint,
    w: Concurrent,
    nonce: u64,
) -> Result<ConcurrentRun> {
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(w.clients);
    for c in 0..w.clients {
        let (http, ep) = (http.clone(), ep.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::with_capacity(w.requests_per_client);
            for r in 0..w.requests_per_client {
                let mut text = Text::new(nonce ^ ((c as u64) << 32) ^ r as u64);
                let prompt = format!(
                    "Request {nonce}-{c}-{r}. Continue this history of the town: {}",
                    text.words(w.prompt_words)
                );
                let msgs = [json!({"role": "user", "content": prompt})];
                out.push(stream_chat(&http, &ep, &msgs, w.tokens).await?);
            }
            anyhow::Ok(out)
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.extend(t.await.context("a client task stopped")??);
    }
    let wall = started.elapsed().as_secs_f64();
    let tokens: u64 = answers
        .iter()
        .map(|a| a.completion_tokens.unwrap_or(a.token_times.len() as u64))
        .sum();
    let mut ttft: Vec<f64> = answers
        .iter()
        .map(|a| a.first_token.as_secs_f64() * 1e3)
        .collect();
    ttft.sort_by(f64::total_cmp);
    Ok(ConcurrentRun {
        aggregate_tok_s: tokens as f64 / wall,
        median_stream_tok_s: crate::median(answers.iter().map(Answer::decode_tok_s).collect()),
        median_first_token_ms: crate::median(ttft.clone()),
        p90_first_token_ms: ttft[(ttft.len() * 9 / 10).min(ttft.len() - 1)],
        wall_s: wall,
    })
}

/// The conversation workload's shape.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Conversation {
    pub clients: usize,
    pub turns: usize,
    /// Words of each new user message.
    pub turn_words: usize,
    pub answer_tokens: u32,
}

/// Per turn, over the clients: first-token times (ms) and cached tokens.
#[derive(Debug, Clone, Default)]
pub(crate) struct ConversationRun {
    pub first_token_ms: Vec<Vec<f64>>,
    pub prompt_tokens: Vec<Vec<u64>>,
    pub cached_tokens: Vec<Vec<u64>>,
    pub served_by: Vec<Vec<Option<String>>>,
}

pub(crate) async fn run_conversations(
    http: &reqwest::Client,
    ep: &Endpoint,
    w: Conversation,
    nonce: u64,
) -> Result<ConversationRun> {
    let mut tasks = Vec::with_capacity(w.clients);
    for c in 0..w.clients {
        let (http, ep) = (http.clone(), ep.clone());
        tasks.push(tokio::spawn(async move {
            let mut text = Text::new(nonce ^ ((c as u64 + 1) << 40));
            let mut history: Vec<Value> = Vec::new();
            let mut turns = Vec::with_capacity(w.turns);
            for t in 0..w.turns {
                let msg = format!(
                    "Conversation {nonce}-{c}, part {}. Read these notes and go on with them: {}",
                    t + 1,
                    text.words(w.turn_words)
                );
                history.push(json!({"role": "user", "content": msg}));
                let a = stream_chat(&http, &ep, &history, w.answer_tokens).await?;
                history.push(json!({"role": "assistant", "content": a.text.clone()}));
                turns.push(a);
            }
            anyhow::Ok(turns)
        }));
    }
    let mut run = ConversationRun::default();
    for _ in 0..w.turns {
        run.first_token_ms.push(Vec::new());
        run.prompt_tokens.push(Vec::new());
        run.cached_tokens.push(Vec::new());
        run.served_by.push(Vec::new());
    }
    for t in tasks {
        let turns = t.await.context("a client task stopped")??;
        for (i, a) in turns.into_iter().enumerate() {
            run.first_token_ms[i].push(a.first_token.as_secs_f64() * 1e3);
            run.prompt_tokens[i].push(a.prompt_tokens.unwrap_or(0));
            run.cached_tokens[i].push(a.cached_tokens.unwrap_or(0));
            run.served_by[i].push(a.served_by);
        }
    }
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_seeded_prose() {
        let a = Text::new(7).words(40);
        assert_eq!(a, Text::new(7).words(40));
        assert_ne!(a, Text::new(8).words(40));
        assert_eq!(a.split_whitespace().count(), 40);
        assert!(a.ends_with('.'));
    }
}
