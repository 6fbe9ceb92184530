//! `zavod-sim`: runs scenarios of the mesh simulation.
//!
//! `zavod-sim --scenario simulations/steady.toml --seeds 200` runs seeds
//! 0..200 twice over (the second pass must give the same trace hashes),
//! `--seed S` runs one and prints its trace hash. A failing seed prints the
//! single command that replays it, and the run exits non-zero.

use anyhow::{Context, Result};
use clap::Parser;
use rayon::prelude::*;
use std::path::PathBuf;
use std::time::Instant;
use zavod_sim::memory::{MemoryScenario, run_memory};
use zavod_sim::{Report, Scenario, run};

#[derive(Debug, Parser)]
#[command(name = "zavod-sim", about = "Deterministic simulation of a zavod mesh")]
struct Args {
    /// Scenario file (TOML).
    #[arg(long, value_name = "FILE")]
    scenario: PathBuf,
    /// Run seeds 0..N.
    #[arg(long, value_name = "N", conflicts_with = "seed")]
    seeds: Option<u64>,
    /// Run this one seed and print its trace hash.
    #[arg(long, value_name = "S")]
    seed: Option<u64>,
    /// Final pick by plain argmax instead of the power-of-two choice
    /// (for comparing load spread).
    #[arg(long)]
    argmax: bool,
    /// Route conversations without cache affinity (for comparing hit rates).
    #[arg(long)]
    no_affinity: bool,
    /// Skip the second, determinism-checking pass.
    #[arg(long)]
    once: bool,
    /// Seeds run at once on this many threads (default: the CPUs there
    /// are). Each seed is its own simulation, so results do not depend on
    /// it; output is in seed order.
    #[arg(long, value_name = "N")]
    jobs: Option<usize>,
}

/// A mesh scenario, or a memory one (`kind = "memory"`).
enum Any {
    Mesh(Box<Scenario>),
    Memory(MemoryScenario),
}

/// Runs every seed over `pool`; results in seed order.
fn run_all(pool: &rayon::ThreadPool, sc: &Any, seeds: &[u64]) -> Vec<Report> {
    pool.install(|| {
        seeds
            .par_iter()
            .map(|&seed| match sc {
                Any::Mesh(sc) => run(sc, seed),
                Any::Memory(sc) => run_memory(sc, seed),
            })
            .collect()
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.scenario)
        .with_context(|| format!("reading {}", args.scenario.display()))?;
    let bad = |e: String| anyhow::anyhow!("{}: {e}", args.scenario.display());
    let memory = toml::from_str::<toml::Table>(&text)
        .map_err(|e| bad(e.to_string()))?
        .contains_key("kind");
    let sc = if memory {
        Any::Memory(MemoryScenario::from_toml(&text).map_err(bad)?)
    } else {
        let mut sc = Scenario::from_toml(&text).map_err(bad)?;
        if args.argmax {
            sc.pool = 1;
        }
        if args.no_affinity {
            sc.affinity = false;
        }
        Any::Mesh(Box::new(sc))
    };
    let name = args.scenario.display().to_string();
    let replay = |seed: u64| {
        format!(
            "cargo run --release -p zavod-sim -- --scenario {name} --seed {seed}{}",
            if args.argmax { " --argmax" } else { "" }
        ) + if args.no_affinity {
            " --no-affinity"
        } else {
            ""
        }
    };
    let seeds: Vec<u64> = match (args.seed, args.seeds) {
        (Some(s), _) => vec![s],
        (None, Some(n)) => (0..n).collect(),
        (None, None) => (0..1).collect(),
    };
    // 0 lets the pool use every CPU.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(args.jobs.unwrap_or(0))
        .build()
        .context("starting the worker threads")?;
    let started = Instant::now();
    let mut failed = 0usize;
    let mut totals = (0u64, 0u64, 0u64, 0u64, 0f64, 0f64, 0f64);
    let mut turned_away = 0u64;
    let (mut later_turns, mut cache_hits) = (0u64, 0u64);
    let mut first_token_ms: Vec<u64> = Vec::new();
    let mut errors: std::collections::BTreeMap<String, u64> = Default::default();
    let mut hashes = Vec::with_capacity(seeds.len());
    let mut mem = zavod_sim::MemoryFigures::default();
    for (&seed, r) in seeds.iter().zip(run_all(&pool, &sc, &seeds)) {
        if args.seed.is_some() {
            println!(
                "seed {seed}: trace {} ({} events; {} requests: {} completed, {} failed with an error, {} failovers, {} turned away as full; spread max {:.2} mean {:.2}; gossip {:.0} B/s per node)",
                r.trace_hash,
                r.events,
                r.requests,
                r.completed,
                r.failed,
                r.failovers,
                r.turned_away,
                r.max_spread,
                r.mean_spread,
                r.gossip_bytes_per_node_per_s
            );
        }
        if !r.violations.is_empty() {
            failed += 1;
            eprintln!("seed {seed} FAILED:");
            for v in &r.violations {
                eprintln!("  {v}");
            }
            eprintln!("replay: {}", replay(seed));
        }
        totals.0 += r.requests;
        totals.1 += r.completed;
        totals.2 += r.failed;
        totals.3 += r.failovers;
        turned_away += r.turned_away;
        totals.4 = totals.4.max(r.max_spread);
        totals.5 += r.mean_spread;
        totals.6 += r.gossip_bytes_per_node_per_s;
        later_turns += r.later_turns;
        cache_hits += r.cache_hits;
        first_token_ms.extend(&r.first_token_ms);
        for (m, n) in &r.errors {
            *errors.entry(m.clone()).or_default() += n;
        }
        if let Some(m) = &r.memory {
            mem.deletes += m.deletes;
            mem.reads += m.reads;
            mem.stale_reads += m.stale_reads;
            mem.repairs += m.repairs;
            mem.disks_lost += m.disks_lost;
        }
        hashes.push(r.trace_hash);
    }
    let wall = started.elapsed();
    if !args.once {
        // Determinism: the same seeds again give the same traces.
        let again = run_all(&pool, &sc, &seeds);
        for ((&seed, h), again) in seeds.iter().zip(&hashes).zip(again) {
            let again = again.trace_hash;
            if &again != h {
                failed += 1;
                eprintln!("seed {seed} is not deterministic: {h} then {again}");
                eprintln!("replay: {}", replay(seed));
            }
        }
    }
    let n = seeds.len() as f64;
    println!(
        "{name}: {} seeds in {:.2} s ({:.1} seeds/s), {} failed; {} requests ({} completed, {} ended with an error, {} failovers, {} turned away as full); load spread max {:.2}, mean {:.2}; gossip {:.0} B/s per node{}",
        seeds.len(),
        wall.as_secs_f64(),
        n / wall.as_secs_f64().max(1e-9),
        failed,
        totals.0,
        totals.1,
        totals.2,
        totals.3,
        turned_away,
        totals.4,
        totals.5 / n,
        totals.6 / n,
        if args.argmax { " [argmax]" } else { "" }
    );
    if memory {
        println!(
            "  memory: {} turns and deletions kept, {} attempts failed and were retried; {} deletions; {} reads, {} of them missing an acknowledged entry; {} repairs; {} disks lost",
            totals.1,
            totals.2,
            mem.deletes,
            mem.reads,
            mem.stale_reads,
            mem.repairs,
            mem.disks_lost
        );
    }
    first_token_ms.sort_unstable();
    let pct = |p: usize| {
        first_token_ms
            .get((first_token_ms.len() * p / 100).min(first_token_ms.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    if !first_token_ms.is_empty() {
        print!(
            "  time to first token p50 {} ms, p95 {} ms",
            pct(50),
            pct(95)
        );
        if later_turns > 0 {
            print!(
                "; cache hits {:.1}% of {later_turns} later turns",
                cache_hits as f64 * 100.0 / later_turns as f64
            );
        }
        println!();
    }
    if !errors.is_empty() {
        let mut by_count: Vec<_> = errors.into_iter().collect();
        by_count.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let listed: Vec<String> = by_count
            .iter()
            .map(|(m, n)| format!("{n} \"{m}\""))
            .collect();
        println!("  errors: {}", listed.join(", "));
    }
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}
