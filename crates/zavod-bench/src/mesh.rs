//! `zavod bench --mesh`: a chat through an entry node that routes to a
//! model node, against the same chat attached to the model node directly.

use crate::routing::decision_us as routing_decision_us;
use crate::single::{Run, timed_chat};
use crate::{BenchArgs, median, mesh_invite, model_node_args, start_node};
use anyhow::{Context, Result, bail};
use std::time::{Duration, Instant};
use zavod_node::client::ChatClient;
use zavod_node::datadir::ClientIdentity;

/// `zavod bench --mesh`: entry A (no model) routes to C (the model); the
/// same chats attached to C directly, interleaved.
pub(crate) fn run(args: BenchArgs) -> Result<()> {
    zavod_engine::llama::check_model_file(&args.model)?;
    let exe = std::env::current_exe().context("finding the zavod binary")?;
    let tmp = tempfile::tempdir().context("creating a temporary data directory")?;
    let threads = zavod_engine::llama::resolve_threads(args.threads);
    let a_dir = tmp.path().join("a");
    let a = start_node(&exe, &a_dir, &[])?;
    let token = mesh_invite(&exe, &a_dir)?;
    let c = start_node(
        &exe,
        &tmp.path().join("c"),
        &[
            vec!["--join".into(), token],
            model_node_args(&args.model, threads, args.gpu_layers),
        ]
        .concat(),
    )?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let via_a = rt.block_on(ChatClient::connect(
        ClientIdentity::load(&a_dir, None)?,
        a.addr.parse()?,
        Default::default(),
    ))?;
    let at_c = rt.block_on(ChatClient::connect(
        ClientIdentity::load(&a_dir, None)?,
        c.addr.parse()?,
        Default::default(),
    ))?;
    let one = |client: &ChatClient| timed_chat(&rt, client, &args.prompt, args.tokens);
    // Until C's announcement reaches A, A has nowhere to route.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match one(&via_a) {
            Ok(_) => break,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(300)),
            Err(e) => return Err(e.context("the entry node never routed to the model node")),
        }
    }
    one(&at_c)?;
    let (mut via, mut direct) = (Vec::new(), Vec::new());
    let c_peer = c.addr.rsplit('/').next().unwrap_or_default().to_string();
    for i in 0..args.runs {
        let (first, second) = if i % 2 == 0 {
            (&via_a, &at_c)
        } else {
            (&at_c, &via_a)
        };
        let (r1, s1) = one(first)?;
        let (r2, s2) = one(second)?;
        for s in [&s1, &s2] {
            if *s != c_peer {
                bail!("a chat was served by {s}, not the model node {c_peer}");
            }
        }
        if i % 2 == 0 {
            via.push(r1);
            direct.push(r2);
        } else {
            direct.push(r1);
            via.push(r2);
        }
    }
    let med = |v: &[Run], f: fn(&Run) -> f64| median(v.iter().map(f).collect());
    let (via_tps, direct_tps) = (
        med(&via, |r| r.decode_tok_s),
        med(&direct, |r| r.decode_tok_s),
    );
    let (via_ttft, direct_ttft) = (
        med(&via, |r| r.first_token_ms),
        med(&direct, |r| r.first_token_ms),
    );
    let (p50, p99) = routing_decision_us(args.routing_peers);
    if args.json {
        let j = serde_json::json!({
            "mode": "mesh",
            "threads": threads,
            "gpu_layers": args.gpu_layers,
            "tokens": args.tokens,
            "runs": args.runs,
            "attached_to_model_node": {"decode_tok_s": direct_tps, "first_token_ms": direct_ttft},
            "through_entry_node": {"decode_tok_s": via_tps, "first_token_ms": via_ttft},
            "decode_ratio": via_tps / direct_tps,
            "first_token_overhead_ms": via_ttft - direct_ttft,
            "routing_peers": args.routing_peers,
            "routing_decision_us": {"p50": p50, "p99": p99},
        });
        println!("{}", serde_json::to_string_pretty(&j)?);
    } else {
        println!(
            "zavod bench --mesh: {} threads on the model node, {} generated tokens x {} runs (interleaved; medians)",
            threads, args.tokens, args.runs
        );
        println!("{:<34}{:>16}{:>18}", "", "decode tok/s", "first token ms");
        println!(
            "{:<34}{:>16.1}{:>18.1}",
            "attached to the model node", direct_tps, direct_ttft
        );
        println!(
            "{:<34}{:>16.1}{:>18.1}",
            "through an entry node (routed)", via_tps, via_ttft
        );
        println!(
            "{:<34}{:>16.3}{:>+18.1}",
            "routed / direct",
            via_tps / direct_tps,
            via_ttft - direct_ttft
        );
        println!(
            "routing decision over {} members: p50 {p50:.1} us, p99 {p99:.1} us",
            args.routing_peers
        );
    }
    Ok(())
}
