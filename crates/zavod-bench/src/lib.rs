//! `zavod bench`: how fast a node is against llama.cpp itself, and a mesh
//! against a node attached directly. Every figure comes from real `zavod
//! node` processes (started through `zavod-harness`, as the tests start
//! them) measured side by side with the reference in one run, alternating,
//! as ratios: the machine is shared and noisy.
//!
//! - `single`: one stream through a node against llama.cpp driven directly
//!   (decode rate, first token, resident memory);
//! - `mesh`: a chat through an entry node against one attached to the model
//!   node;
//! - `versus` (with `workload` and `servers`): many clients at once, and
//!   conversations, against llama-server;
//! - `mesh_conversation`: conversations through an entry against attached;
//! - `routing`: the time of one placement decision over a large view.
//!
//! Errors are `anyhow`: this crate is the body of a command, and every
//! failure ends in a message to the person running it.

#![warn(unreachable_pub)]

mod args;
mod mesh;
mod mesh_conversation;
mod routing;
mod servers;
mod single;
mod versus;
mod workload;

pub use args::BenchArgs;

use anyhow::{Context, Result, bail};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use zavod_harness::NodeProc;

/// How long a bench's node may take to load its model and listen.
const NODE_READY_TIMEOUT: Duration = Duration::from_secs(120);

/// A `zavod node` on an ephemeral loopback port with data in `data_dir`
/// and `extra` flags, ready.
fn start_node(exe: &Path, data_dir: &Path, extra: &[String]) -> Result<NodeProc> {
    let mut cmd = zavod_harness::clean_command(exe, None);
    cmd.arg("node")
        .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--data-dir"])
        .arg(data_dir)
        .args(extra)
        .stderr(Stdio::null());
    Ok(NodeProc::spawn(cmd, data_dir, NODE_READY_TIMEOUT)?)
}

/// Flags for a node that serves `model` on `threads` CPU threads (and
/// `gpu_layers` offloaded) with one slot, as every bench's model node does.
pub(crate) fn model_node_args(model: &Path, threads: u32, gpu_layers: u32) -> Vec<String> {
    vec![
        "--model".into(),
        model.display().to_string(),
        "--threads".into(),
        threads.to_string(),
        "--gpu-layers".into(),
        gpu_layers.to_string(),
        "--slots".into(),
        "1".into(),
        // Every run sends the same prompt; the direct side computes it
        // afresh each time, so the node must too.
        "--prompt-cache".into(),
        "false".into(),
    ]
}

/// (median, first quartile, third quartile); zeros when `v` is empty.
pub(crate) fn quartiles(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let q = |p: f64| {
        v.get(((v.len().max(1) - 1) as f64 * p).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    let (q1, q3) = (q(0.25), q(0.75));
    (median(v), q1, q3)
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// An invite to the mesh whose founding node keeps its data in `dir`.
pub(crate) fn mesh_invite(exe: &Path, dir: &Path) -> Result<String> {
    let invite = Command::new(exe)
        .args(["mesh", "invite", "--uses", "16", "--data-dir"])
        .arg(dir)
        .output()
        .context("zavod mesh invite")?;
    if !invite.status.success() {
        bail!(
            "mesh invite failed: {}",
            String::from_utf8_lossy(&invite.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&invite.stdout).trim().to_string())
}

pub fn run(args: BenchArgs) -> Result<()> {
    if args.direct_worker {
        return single::direct_worker(&args);
    }
    if let Some(clients) = args.concurrent {
        if clients == 0 || args.requests == 0 || args.rounds == 0 || args.tokens == 0 {
            eprintln!("error: --concurrent, --requests, --rounds and --tokens must be at least 1");
            std::process::exit(2);
        }
        return versus::run_concurrent_bench(&args, clients);
    }
    if let Some(turns) = args.conversation {
        if turns == 0 || args.clients == 0 || args.rounds == 0 || args.answer_tokens == 0 {
            eprintln!(
                "error: --conversation, --clients, --rounds and --answer-tokens must be at least 1"
            );
            std::process::exit(2);
        }
        if args.mesh {
            return mesh_conversation::run(&args, turns);
        }
        return versus::run_conversation_bench(&args, turns);
    }
    if args.tokens < 2 || args.runs == 0 || args.first_token_runs == 0 || args.processes == 0 {
        eprintln!(
            "error: --tokens must be at least 2, --runs, --first-token-runs and --processes at least 1"
        );
        std::process::exit(2);
    }
    if args.routing_only {
        let (p50, p99) = routing::decision_us(args.routing_peers);
        println!(
            "routing decision over {} members: p50 {p50:.1} us, p99 {p99:.1} us",
            args.routing_peers
        );
        return Ok(());
    }
    if args.mesh {
        return mesh::run(args);
    }
    single::run(args)
}
