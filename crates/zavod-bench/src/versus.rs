//! `zavod bench --concurrent N` and `zavod bench --conversation K`: a zavod
//! node against llama.cpp's own llama-server, same model, threads, slots
//! and context, over their OpenAI APIs with the same client, alternating
//! rounds (the order flips every round) so the machine's drift hits both;
//! ratios are of medians over rounds.

use super::servers::{Shape, find_llama_server, start_llama_server, start_zavod};
use super::workload::{
    Concurrent, ConcurrentRun, Conversation, ConversationRun, Endpoint, run_concurrent,
    run_conversations,
};
use crate::BenchArgs;
use crate::median;
use anyhow::{Context, Result};
use serde_json::json;

fn shape(args: &BenchArgs) -> Shape {
    Shape {
        model: args.model.clone(),
        threads: zavod_engine::llama::resolve_threads(args.threads),
        slots: args.slots,
        context_tokens: args.context_tokens,
    }
}

/// The endpoints to compare: zavod, and llama-server unless `--zavod-only`.
struct Servers {
    _procs: Vec<super::servers::Proc>,
    _dir: tempfile::TempDir,
    endpoints: Vec<Endpoint>,
}

async fn start(http: &reqwest::Client, args: &BenchArgs) -> Result<Servers> {
    zavod_engine::llama::check_model_file(&args.model)?;
    let exe = std::env::current_exe().context("finding the zavod binary")?;
    let dir = tempfile::tempdir().context("creating a temporary data directory")?;
    let shape = shape(args);
    let mut procs = Vec::new();
    let mut endpoints = Vec::new();
    let (p, e) = start_zavod(
        http,
        &exe,
        &dir.path().join("node"),
        &shape,
        &args.node_flag,
    )
    .await?;
    procs.push(p);
    endpoints.push(e);
    if !args.zavod_only {
        let ls = find_llama_server(args.llama_server.as_deref())?;
        let (p, e) = start_llama_server(http, &ls, &shape).await?;
        procs.push(p);
        endpoints.push(e);
    }
    Ok(Servers {
        _procs: procs,
        _dir: dir,
        endpoints,
    })
}

/// Endpoint order for round `r`: flipped every round.
fn order(n: usize, r: u32) -> Vec<usize> {
    let mut o: Vec<usize> = (0..n).collect();
    if r % 2 == 1 {
        o.reverse();
    }
    o
}

/// One connection per request: llama-server closes idle keep-alive
/// connections on its own schedule, and a pooled one may be dead.
fn http_client() -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .context("building the HTTP client")
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { f64::NAN }
}

pub(crate) fn run_concurrent_bench(args: &BenchArgs, clients: usize) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let http = http_client()?;
        let servers = start(&http, args).await?;
        let w = Concurrent {
            clients,
            requests_per_client: args.requests,
            prompt_words: args.prompt_words,
            tokens: args.tokens,
        };
        let eps = &servers.endpoints;
        // Warm-up: one small round each (page cache, first allocations).
        for ep in eps {
            let small = Concurrent {
                requests_per_client: 1,
                ..w
            };
            run_concurrent(&http, ep, small, 0).await?;
        }
        let mut runs: Vec<Vec<ConcurrentRun>> = vec![Vec::new(); eps.len()];
        for r in 0..args.rounds {
            for i in order(eps.len(), r) {
                let nonce = 1_000 + u64::from(r) * 10 + i as u64;
                let run = run_concurrent(&http, &eps[i], w, nonce).await?;
                eprintln!(
                    "round {}: {:<12} aggregate {:6.1} tok/s, median stream {:5.1} tok/s, first token median {:6.0} ms",
                    r + 1,
                    eps[i].name,
                    run.aggregate_tok_s,
                    run.median_stream_tok_s,
                    run.median_first_token_ms
                );
                runs[i].push(run);
            }
        }
        let med = |i: usize, f: fn(&ConcurrentRun) -> f64| median(runs[i].iter().map(f).collect());
        let rows: Vec<_> = eps
            .iter()
            .enumerate()
            .map(|(i, e)| {
                json!({
                    "server": e.name,
                    "aggregate_tok_s": med(i, |r| r.aggregate_tok_s),
                    "median_stream_tok_s": med(i, |r| r.median_stream_tok_s),
                    "first_token_ms_median": med(i, |r| r.median_first_token_ms),
                    "first_token_ms_p90": med(i, |r| r.p90_first_token_ms),
                    "wall_s": med(i, |r| r.wall_s),
                })
            })
            .collect();
        // Ratios of rounds next to each other in time.
        let paired = |f: fn(&ConcurrentRun) -> f64| {
            (eps.len() > 1).then(|| {
                median(
                    runs[0]
                        .iter()
                        .zip(&runs[1])
                        .map(|(a, b)| ratio(f(a), f(b)))
                        .collect(),
                )
            })
        };
        let out = json!({
            "mode": "concurrent",
            "clients": clients,
            "requests_per_client": args.requests,
            "prompt_words": args.prompt_words,
            "tokens": args.tokens,
            "threads": shape(args).threads,
            "slots": args.slots,
            "rounds": args.rounds,
            "servers": rows,
            "ratio_aggregate": paired(|r| r.aggregate_tok_s),
            "ratio_stream": paired(|r| r.median_stream_tok_s),
            "ratio_first_token": paired(|r| r.median_first_token_ms),
        });
        if args.json {
            println!("{}", serde_json::to_string_pretty(&out)?);
        } else {
            println!(
                "zavod bench --concurrent {clients}: {} requests each, ~{} prompt words, {} tokens, {} threads, {} slots, {} rounds (alternating; medians)",
                args.requests, args.prompt_words, args.tokens, shape(args).threads, args.slots, args.rounds
            );
            println!("{:<14} {:>12} {:>14} {:>16} {:>14}", "", "aggregate", "median stream", "first token p50", "first token p90");
            for r in &rows {
                println!(
                    "{:<14} {:>8.1} t/s {:>10.1} t/s {:>13.0} ms {:>11.0} ms",
                    r["server"].as_str().unwrap_or(""),
                    r["aggregate_tok_s"].as_f64().unwrap_or(0.0),
                    r["median_stream_tok_s"].as_f64().unwrap_or(0.0),
                    r["first_token_ms_median"].as_f64().unwrap_or(0.0),
                    r["first_token_ms_p90"].as_f64().unwrap_or(0.0),
                );
            }
            if let (Some(a), Some(s), Some(f)) = (
                out["ratio_aggregate"].as_f64(),
                out["ratio_stream"].as_f64(),
                out["ratio_first_token"].as_f64(),
            ) {
                println!(
                    "zavod / llama-server (median of paired rounds): aggregate {a:.3}, median stream {s:.3}, first token {f:.3} (lower is better)"
                );
            }
        }
        Ok(())
    })
}

pub(crate) fn run_conversation_bench(args: &BenchArgs, turns: usize) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let http = http_client()?;
        let servers = start(&http, args).await?;
        let w = Conversation {
            clients: args.clients,
            turns,
            turn_words: args.turn_words,
            answer_tokens: args.answer_tokens,
        };
        let eps = &servers.endpoints;
        let mut runs: Vec<Vec<ConversationRun>> = vec![Vec::new(); eps.len()];
        for r in 0..args.rounds {
            for i in order(eps.len(), r) {
                let nonce = 5_000 + u64::from(r) * 10 + i as u64;
                let run = run_conversations(&http, &eps[i], w, nonce).await?;
                let last = median(run.first_token_ms[turns - 1].clone());
                eprintln!(
                    "round {}: {:<12} first token of turn {turns}: {last:6.0} ms (turns: {})",
                    r + 1,
                    eps[i].name,
                    run.first_token_ms
                        .iter()
                        .map(|t| format!("{:.0}", median(t.clone())))
                        .collect::<Vec<_>>()
                        .join(" ")
                );
                runs[i].push(run);
            }
        }
        let per_turn = |i: usize| -> Vec<f64> {
            (0..turns)
                .map(|t| median(runs[i].iter().map(|r| median(r.first_token_ms[t].clone())).collect()))
                .collect()
        };
        let mean_of = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len().max(1) as f64;
        let prompt_last = |i: usize| {
            median(runs[i].iter().map(|r| mean_of(&r.prompt_tokens[turns - 1])).collect())
        };
        let cached_last = |i: usize| {
            median(runs[i].iter().map(|r| mean_of(&r.cached_tokens[turns - 1])).collect())
        };
        let rows: Vec<_> = eps
            .iter()
            .enumerate()
            .map(|(i, e)| {
                json!({
                    "server": e.name,
                    "first_token_ms_by_turn": per_turn(i),
                    "last_turn_prompt_tokens": prompt_last(i),
                    "last_turn_cached_tokens": cached_last(i),
                })
            })
            .collect();
        let paired_last = (eps.len() > 1).then(|| {
            median(
                runs[0]
                    .iter()
                    .zip(&runs[1])
                    .map(|(a, b)| {
                        ratio(
                            median(a.first_token_ms[turns - 1].clone()),
                            median(b.first_token_ms[turns - 1].clone()),
                        )
                    })
                    .collect(),
            )
        });
        let out = json!({
            "mode": "conversation",
            "clients": args.clients,
            "turns": turns,
            "turn_words": args.turn_words,
            "answer_tokens": args.answer_tokens,
            "threads": shape(args).threads,
            "slots": args.slots,
            "rounds": args.rounds,
            "servers": rows,
            "ratio_last_turn_first_token": paired_last,
        });
        if args.json {
            println!("{}", serde_json::to_string_pretty(&out)?);
        } else {
            println!(
                "zavod bench --conversation {turns}: {} clients, ~{} words a turn, {}-token answers, {} threads, {} slots, {} rounds (alternating; medians)",
                args.clients, args.turn_words, args.answer_tokens, shape(args).threads, args.slots, args.rounds
            );
            for r in &rows {
                let ft: Vec<String> = r["first_token_ms_by_turn"]
                    .as_array()
                    .map(|a| a.iter().map(|v| format!("{:.0}", v.as_f64().unwrap_or(0.0))).collect())
                    .unwrap_or_default();
                println!(
                    "{:<14} first token by turn (ms): {}; last turn: {:.0} prompt tokens, {:.0} from cache",
                    r["server"].as_str().unwrap_or(""),
                    ft.join(" "),
                    r["last_turn_prompt_tokens"].as_f64().unwrap_or(0.0),
                    r["last_turn_cached_tokens"].as_f64().unwrap_or(0.0),
                );
            }
            if let Some(x) = paired_last {
                println!("zavod / llama-server, first token of turn {turns} (median of paired rounds): {x:.3} (lower is better)");
            }
        }
        Ok(())
    })
}
