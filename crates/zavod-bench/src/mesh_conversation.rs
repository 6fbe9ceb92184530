//! `zavod bench --mesh --conversation K`: does the mesh keep a node's
//! conversation speed? Entry A (no model) in front of model nodes B and C;
//! `--clients` conversations of K turns held with `zavod chat`'s client
//! and conversation ids (the entry keeps each history and assembles its
//! prompt), through A, against the same conversations attached to B
//! directly. Reported: the first token of every turn both ways, and how
//! often a turn through A landed where its conversation's cache was (its
//! prompt came mostly from cache).

use super::workload::Text;
use crate::BenchArgs;
use crate::{median, mesh_invite, start_node};
use anyhow::{Context, Result};
use serde_json::json;
use std::time::{Duration, Instant};
use zavod_node::client::{Ask, ChatClient};
use zavod_node::datadir::ClientIdentity;
use zavod_proto::ConversationId;
use zavod_proto::wire::GenParams;

/// One turn as the client saw it.
struct Turn {
    first_token_ms: f64,
    prompt_tokens: u32,
    cached_tokens: u32,
    served_by: zavod_proto::NodeId,
}

/// Holds `clients` conversations of `turns` turns at once through `client`.
async fn converse(
    client: &ChatClient,
    clients: usize,
    turns: usize,
    words: usize,
    answer_tokens: u32,
    nonce: u64,
) -> Result<Vec<Vec<Turn>>> {
    let mut tasks = Vec::new();
    for c in 0..clients {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let id = ConversationId::parse(&format!("bench-{nonce}-{c}"))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let mut text = Text::new(nonce ^ ((c as u64 + 1) << 40));
            let mut out = Vec::with_capacity(turns);
            for t in 0..turns {
                let ask = Ask {
                    message: format!(
                        "Conversation {nonce}-{c}, part {}. Read these notes and go on with them: {}",
                        t + 1,
                        text.words(words)
                    ),
                    conversation: Some(id.clone()),
                    params: GenParams {
                        temperature: 0.0,
                        max_tokens: answer_tokens,
                        ignore_eos: true,
                        ..Default::default()
                    },
                    ..Default::default()
                };
                let o = client.chat(ask, |_| {}, std::future::pending()).await?;
                out.push(Turn {
                    first_token_ms: o.first_token.as_secs_f64() * 1e3,
                    prompt_tokens: o.done.prompt_tokens,
                    cached_tokens: o.done.cached_tokens,
                    served_by: o.accepted.served_by,
                });
            }
            anyhow::Ok(out)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.push(t.await.context("a conversation task stopped")??);
    }
    Ok(all)
}

pub(crate) fn run(args: &BenchArgs, turns: usize) -> Result<()> {
    zavod_engine::llama::check_model_file(&args.model)?;
    let exe = std::env::current_exe().context("finding the zavod binary")?;
    let tmp = tempfile::tempdir().context("creating a temporary data directory")?;
    let threads = zavod_engine::llama::resolve_threads(args.threads);
    let a_dir = tmp.path().join("a");
    let a = start_node(&exe, &a_dir, &[])?;
    let token = mesh_invite(&exe, &a_dir)?;
    let model_flags = || -> Vec<String> {
        let mut f = vec![
            "--join".into(),
            token.clone(),
            "--model".into(),
            args.model.display().to_string(),
            "--threads".into(),
            threads.to_string(),
            "--slots".into(),
            args.slots.to_string(),
            "--context-tokens".into(),
            args.context_tokens.to_string(),
        ];
        f.extend(args.node_flag.iter().cloned());
        f
    };
    let b = start_node(&exe, &tmp.path().join("b"), &model_flags())?;
    let _c = start_node(&exe, &tmp.path().join("c"), &model_flags())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let via_a = ChatClient::connect(
            ClientIdentity::load(&a_dir, None)?,
            a.addr.parse()?,
            Default::default(),
        )
        .await?;
        let at_b = ChatClient::connect(
            ClientIdentity::load(&a_dir, None)?,
            b.addr.parse()?,
            Default::default(),
        )
        .await?;
        // Until B's and C's announcements reach A, A has nowhere to route.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let probe = converse(&via_a, 1, 1, 8, 2, 1).await;
            match probe {
                Ok(_) => break,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(300)).await
                }
                Err(e) => return Err(e.context("the entry node never routed to a model node")),
            }
        }
        // Both model nodes announced and heard of each other.
        tokio::time::sleep(Duration::from_secs(3)).await;
        converse(&at_b, 1, 1, 8, 2, 2).await?;
        let (mut via, mut direct) = (Vec::new(), Vec::new());
        for r in 0..args.rounds {
            let nonce = 9_000 + u64::from(r) * 10;
            let first_via = r % 2 == 0;
            for via_now in [first_via, !first_via] {
                let client = if via_now { &via_a } else { &at_b };
                let res = converse(
                    client,
                    args.clients,
                    turns,
                    args.turn_words,
                    args.answer_tokens,
                    nonce + u64::from(via_now),
                )
                .await?;
                let last: Vec<f64> = res.iter().map(|c| c[turns - 1].first_token_ms).collect();
                eprintln!(
                    "round {}: {:<16} first token of turn {turns}: {:6.0} ms",
                    r + 1,
                    if via_now { "through entry" } else { "attached directly" },
                    median(last)
                );
                if via_now {
                    via.push(res);
                } else {
                    direct.push(res);
                }
            }
        }
        let by_turn = |runs: &[Vec<Vec<Turn>>]| -> Vec<f64> {
            (0..turns)
                .map(|t| {
                    median(
                        runs.iter()
                            .map(|r| median(r.iter().map(|c| c[t].first_token_ms).collect()))
                            .collect(),
                    )
                })
                .collect()
        };
        // A turn after the first "hit" when most of its prompt came from
        // the cache of the node that served it.
        let (mut hits, mut later) = (0u32, 0u32);
        let mut moved = 0u32;
        for run in &via {
            for conv in run {
                for w in conv.windows(2) {
                    later += 1;
                    if w[1].cached_tokens * 2 > w[1].prompt_tokens {
                        hits += 1;
                    }
                    if w[1].served_by != w[0].served_by {
                        moved += 1;
                    }
                }
            }
        }
        let hit_rate = f64::from(hits) / f64::from(later.max(1));
        let (v, d) = (by_turn(&via), by_turn(&direct));
        let paired = median(
            via.iter()
                .zip(&direct)
                .map(|(a, b)| {
                    median(a.iter().map(|c| c[turns - 1].first_token_ms).collect())
                        / median(b.iter().map(|c| c[turns - 1].first_token_ms).collect())
                })
                .collect(),
        );
        let out = json!({
            "mode": "mesh-conversation",
            "clients": args.clients,
            "turns": turns,
            "turn_words": args.turn_words,
            "answer_tokens": args.answer_tokens,
            "threads": threads,
            "slots": args.slots,
            "rounds": args.rounds,
            "through_entry_first_token_ms_by_turn": v,
            "attached_first_token_ms_by_turn": d,
            "ratio_last_turn_first_token": paired,
            "cache_hit_rate": hit_rate,
            "turns_that_changed_node": moved,
        });
        if args.json {
            println!("{}", serde_json::to_string_pretty(&out)?);
        } else {
            let fmt = |v: &[f64]| v.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(" ");
            println!(
                "zavod bench --mesh --conversation {turns}: entry A (no model) before model nodes B and C ({threads} threads, {} slots each); {} conversations, ~{} words a turn, {}-token answers, {} rounds",
                args.slots, args.clients, args.turn_words, args.answer_tokens, args.rounds
            );
            println!("through entry A, first token by turn (ms):     {}", fmt(&v));
            println!("attached to B directly, first token by turn:   {}", fmt(&d));
            println!(
                "through / direct, first token of turn {turns} (median of paired rounds): {paired:.3}; cache hits {:.0}% of later turns ({hits}/{later}), {moved} turns changed node",
                hit_rate * 100.0
            );
        }
        Ok(())
    })
}
