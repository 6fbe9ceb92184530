//! The single-stream bench: decode rate and first-token time through a
//! node (a real `zavod node` process, chatted with over loopback) against
//! llama.cpp driven directly (in a child process of its own,
//! `--direct-worker`), same model, same thread count, same formatted
//! prompt, greedy, a fixed number of tokens. Runs alternate between the two
//! paths so machine noise hits both alike, over several fresh pairs of
//! processes so no one process's memory placement decides; medians are
//! reported with their ratio. Also the resident memory of an idle node
//! before any model loads.

use crate::routing::decision_us as routing_decision_us;
use crate::{BenchArgs, median, model_node_args, quartiles, start_node};
use anyhow::{Context, Result, bail};
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::sampling::LlamaSampler;
use std::io::{BufRead, BufReader};
use std::num::NonZeroU32;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use zavod_engine::llama::{LlamaConfig, LoadedModel, shared_backend, tokenize_prompt};
use zavod_node::client::{Ask, ChatClient, ChatEvent};
use zavod_node::datadir::ClientIdentity;
use zavod_proto::chat::prompt::{Role, Turn};
use zavod_proto::wire::GenParams;

/// Context of the node's single slot and of the direct context alike.
const CONTEXT_TOKENS: u32 = 4096;
const BATCH_TOKENS: u32 = 512;

/// llama.cpp driven directly, in a child process of its own (`zavod bench
/// --direct-worker`), so it starts as fresh as the node does. One line in
/// (tokens to generate), one line out (the run's timings).
struct DirectProc {
    child: Child,
    stdin: std::process::ChildStdin,
    lines: std::sync::mpsc::Receiver<String>,
    prompt_tokens: usize,
}

impl Drop for DirectProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Longest a direct run may take before the bench gives up on the worker.
const DIRECT_RUN_TIMEOUT: Duration = Duration::from_secs(300);

impl DirectProc {
    fn start(
        exe: &Path,
        model: &Path,
        threads: u32,
        gpu_layers: u32,
        prompt: &str,
    ) -> Result<Self> {
        let mut child = Command::new(exe)
            .args(["bench", "--direct-worker", "--threads"])
            .arg(threads.to_string())
            .arg("--gpu-layers")
            .arg(gpu_layers.to_string())
            .arg("--model")
            .arg(model)
            .arg("--prompt")
            .arg(prompt)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the direct llama.cpp worker")?;
        let stdin = child.stdin.take().context("worker stdin")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        let (tx, lines) = std::sync::mpsc::sync_channel(4);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut proc = DirectProc {
            child,
            stdin,
            lines,
            prompt_tokens: 0,
        };
        let ready = proc.line(Duration::from_secs(120))?;
        proc.prompt_tokens = ready
            .strip_prefix("ready ")
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("the direct worker said {ready:?}, not ready"))?;
        Ok(proc)
    }

    fn line(&self, timeout: Duration) -> Result<String> {
        self.lines
            .recv_timeout(timeout)
            .context("the direct llama.cpp worker stopped answering")
    }

    fn run(&mut self, tokens: u32) -> Result<Run> {
        use std::io::Write;
        writeln!(self.stdin, "{tokens}").context("writing to the direct worker")?;
        self.stdin.flush()?;
        let line = self.line(DIRECT_RUN_TIMEOUT)?;
        let f: Vec<f64> = line
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .with_context(|| format!("the direct worker said {line:?}"))?;
        match f[..] {
            [first_token_ms, decode_tok_s, steady_tok_s] => Ok(Run {
                first_token_ms,
                decode_tok_s,
                steady_tok_s,
                engine_first_token_ms: 0.0,
            }),
            _ => bail!("the direct worker said {line:?}"),
        }
    }
}

/// The child side of [`DirectProc`]: loads the model, then answers each
/// line of stdin (a token count) with one run's timings.
pub(crate) fn direct_worker(args: &BenchArgs) -> Result<()> {
    use std::io::Write;
    let threads = zavod_engine::llama::resolve_threads(args.threads);
    let cfg = LlamaConfig {
        path: args.model.clone(),
        name: None,
        gpu_layers: args.gpu_layers,
        slots: 1,
        context_tokens_per_seq: CONTEXT_TOKENS,
        threads,
        batch_tokens: BATCH_TOKENS,
        queue_capacity: 1,
        chat_template: None,
        stream_interval_ms: 0,
        prompt_cache: false,
        prompt_cache_ram_bytes: 0,
        share_prompt_cache: false,
    };
    let loaded = LoadedModel::load(&cfg, |_| {})?;
    let prompt = loaded.format_chat(&[Turn {
        role: Role::User,
        text: args.prompt.clone(),
        tokens: 0,
    }])?;
    let t = threads as i32;
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(CONTEXT_TOKENS))
        .with_n_batch(BATCH_TOKENS)
        .with_n_ubatch(BATCH_TOKENS)
        .with_n_seq_max(1)
        .with_n_threads(t)
        .with_n_threads_batch(t);
    let mut ctx = loaded.model().new_context(shared_backend()?, params)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready {}", tokenize_prompt(&loaded, &prompt).len())?;
    out.flush()?;
    for line in std::io::stdin().lines() {
        let tokens: u32 = line?.trim().parse().context("a token count")?;
        let r = direct_run(&loaded, &mut ctx, &prompt, tokens)?;
        writeln!(
            out,
            "{} {} {}",
            r.first_token_ms, r.decode_tok_s, r.steady_tok_s
        )?;
        out.flush()?;
    }
    Ok(())
}

/// Tokens per window of the steady rate: long enough to span several of
/// the node's batches (50 ms each at most by default), short enough that
/// a stall spoils few windows.
const STEADY_WINDOW: usize = 32;

#[derive(Debug, Clone, Copy)]
pub(crate) struct Run {
    pub(crate) first_token_ms: f64,
    /// Tokens after the first over the time they took: what a reader sees.
    pub(crate) decode_tok_s: f64,
    /// One over the median per-token time across windows of
    /// [`STEADY_WINDOW`] tokens: the steady per-token cost, which moments
    /// when this shared machine stalls a whole step (both paths alike, at
    /// random) move far less than the mean.
    steady_tok_s: f64,
    /// The engine's own time from taking the job to its first token (node
    /// runs only): what the node adds is `first_token_ms` minus this.
    engine_first_token_ms: f64,
}

impl Run {
    /// Timings from when the request left (`t0`) and each token's arrival.
    fn from_times(t0: Instant, times: &[Instant]) -> Result<Run> {
        let (Some(&first), Some(&last)) = (times.first(), times.last()) else {
            bail!("no tokens arrived");
        };
        // Per-token time over windows of STEADY_WINDOW tokens, not single
        // gaps: a node that hands tokens over in batches delivers several
        // at once, so single gaps would be mostly zero.
        let w = STEADY_WINDOW.min(times.len() - 1).max(1);
        let gaps: Vec<f64> = times
            .windows(w + 1)
            .map(|s| (s[w] - s[0]).as_secs_f64() / w as f64)
            .collect();
        let gap = median(gaps);
        Ok(Run {
            first_token_ms: (first - t0).as_secs_f64() * 1e3,
            decode_tok_s: (times.len() - 1) as f64 / (last - first).as_secs_f64().max(1e-9),
            steady_tok_s: if gap > 0.0 { 1.0 / gap } else { 0.0 },
            engine_first_token_ms: 0.0,
        })
    }
}

/// One greedy chat of exactly `tokens` tokens, timed at the client from
/// before its stream opens; returns the timings and the peer id that
/// served it.
pub(crate) fn timed_chat(
    rt: &tokio::runtime::Runtime,
    client: &ChatClient,
    prompt: &str,
    tokens: u32,
) -> Result<(Run, String)> {
    let client = client.clone();
    let ask = Ask {
        message: prompt.to_string(),
        params: GenParams {
            temperature: 0.0,
            max_tokens: tokens,
            ignore_eos: true,
            ..Default::default()
        },
        ..Default::default()
    };
    // Timed on the runtime's worker, where the client's network runs too,
    // as `zavod chat` does it.
    let (t0, times, o) = zavod_node::client::on_worker(rt, async move {
        let mut times = Vec::with_capacity(tokens as usize);
        let t0 = Instant::now();
        let o = client
            .chat(
                ask,
                |ev| {
                    if let ChatEvent::Token { .. } = ev {
                        times.push(Instant::now());
                    }
                },
                std::future::pending(),
            )
            .await?;
        anyhow::Ok((t0, times, o))
    })
    .context("the chat task stopped abnormally")??;
    if o.tokens != tokens || times.len() != tokens as usize {
        bail!("generated {} tokens, asked for {tokens}", o.tokens);
    }
    let served = zavod_net::peer_id_of(&o.accepted.served_by)
        .map(|p| p.to_string())
        .unwrap_or_default();
    let mut run = Run::from_times(t0, &times)?;
    run.engine_first_token_ms = o.done.first_token_ms;
    Ok((run, served))
}

/// Greedy generation of `tokens` tokens with llama-cpp-2 and nothing else.
fn direct_run(
    loaded: &LoadedModel,
    ctx: &mut llama_cpp_2::context::LlamaContext<'_>,
    prompt: &zavod_engine::Prompt,
    tokens: u32,
) -> Result<Run> {
    // Drop the previous run's sequence the way the engine does; a full
    // clear_kv_cache() would also zero the buffers and slow this path.
    ctx.clear_kv_cache_seq(Some(0), None, None)?;
    let vocab = loaded.model().vocab();
    let t0 = Instant::now();
    let toks = tokenize_prompt(loaded, prompt);
    let mut batch = LlamaBatch::new(BATCH_TOKENS as usize, 1);
    for (c, chunk) in toks.chunks(BATCH_TOKENS as usize).enumerate() {
        batch.clear();
        for (i, t) in chunk.iter().enumerate() {
            let pos = c * BATCH_TOKENS as usize + i;
            batch.add(*t, pos as i32, &[0], pos + 1 == toks.len())?;
        }
        ctx.decode(&mut batch)?;
    }
    let mut sampler = LlamaSampler::greedy();
    let mut pos = toks.len() as i32;
    let mut times = Vec::with_capacity(tokens as usize);
    loop {
        let tok = sampler.sample(ctx, batch.n_tokens() - 1);
        times.push(Instant::now());
        let _eog = vocab.is_eog(tok);
        let _piece = vocab.token_to_piece(tok, false, None);
        if times.len() == tokens as usize {
            break;
        }
        batch.clear();
        batch.add(tok, pos, &[0], true)?;
        pos += 1;
        ctx.decode(&mut batch)?;
    }
    Run::from_times(t0, &times)
}

pub(crate) fn run(args: BenchArgs) -> Result<()> {
    zavod_engine::llama::check_model_file(&args.model)?;
    let exe = std::env::current_exe().context("finding the zavod binary")?;
    let tmp = tempfile::tempdir().context("creating a temporary data directory")?;
    let threads = zavod_engine::llama::resolve_threads(args.threads);

    let idle_rss = {
        let idle = start_node(&exe, &tmp.path().join("idle"), &[])?;
        std::thread::sleep(Duration::from_millis(300));
        idle.rss_bytes()
            .context("reading the idle node's resident memory")?
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let mut node_runs = Vec::new();
    let mut direct_runs = Vec::new();
    let mut node_first: Vec<Run> = Vec::new();
    let mut direct_first = Vec::new();
    // Per process pair: the median ratio of its decode runs.
    let mut per_pair = Vec::new();
    let mut loaded_rss = 0;
    let mut prompt_tokens = 0;
    for p in 0..args.processes {
        // Fresh processes each round: where a process's memory lands moves
        // its speed by a few percent (two identical nodes, side by side,
        // differed by 4%), more than the difference being measured.
        let node_dir = tmp.path().join(format!("node{p}"));
        let mut node_args = model_node_args(&args.model, threads, args.gpu_layers);
        node_args.extend(["--context-tokens".into(), CONTEXT_TOKENS.to_string()]);
        let node = start_node(&exe, &node_dir, &node_args)?;
        if p == 0 {
            loaded_rss = node
                .rss_bytes()
                .context("reading the node's resident memory")?;
        }
        let mut direct =
            DirectProc::start(&exe, &args.model, threads, args.gpu_layers, &args.prompt)?;
        prompt_tokens = direct.prompt_tokens;
        let client = rt.block_on(ChatClient::connect(
            ClientIdentity::load(&node_dir, None)?,
            node.addr.parse()?,
            Default::default(),
        ))?;
        let node_run =
            |tokens: u32| -> Result<Run> { Ok(timed_chat(&rt, &client, &args.prompt, tokens)?.0) };

        // Warm-up: caches, page faults, connection set-up.
        node_run(args.tokens)?;
        direct.run(args.tokens)?;
        let mut ratios = Vec::new();
        for i in 0..args.runs {
            // Alternate which path goes first so drift hits both.
            let (n, d) = if i % 2 == 0 {
                let n = node_run(args.tokens)?;
                (n, direct.run(args.tokens)?)
            } else {
                let d = direct.run(args.tokens)?;
                (node_run(args.tokens)?, d)
            };
            ratios.push(n.decode_tok_s / d.decode_tok_s);
            node_runs.push(n);
            direct_runs.push(d);
        }
        per_pair.push(median(ratios));
        // Time to first token from one-token runs, interleaved the same way.
        for i in 0..args.first_token_runs {
            if i % 2 == 0 {
                node_first.push(node_run(1)?);
                direct_first.push(direct.run(1)?.first_token_ms);
            } else {
                direct_first.push(direct.run(1)?.first_token_ms);
                node_first.push(node_run(1)?);
            }
        }
    }
    let med = |v: &[Run], f: fn(&Run) -> f64| median(v.iter().map(f).collect());
    let node_tps = med(&node_runs, |r| r.decode_tok_s);
    let direct_tps = med(&direct_runs, |r| r.decode_tok_s);
    let node_steady = med(&node_runs, |r| r.steady_tok_s);
    let direct_steady = med(&direct_runs, |r| r.steady_tok_s);
    let node_ttft = median(node_first.iter().map(|r| r.first_token_ms).collect());
    // Request handling and delivery alone, free of the prefill's noise.
    let node_added = median(
        node_first
            .iter()
            .map(|r| r.first_token_ms - r.engine_first_token_ms)
            .collect(),
    );
    let direct_ttft = median(direct_first.clone());
    // Runs next to each other in time share the machine's mood, so the
    // ratios of pairs are a second, drift-free view; their quartiles say
    // how far one bench run can be trusted.
    let pairs = |f: fn(&Run) -> f64| {
        quartiles(
            node_runs
                .iter()
                .zip(&direct_runs)
                .map(|(n, d)| f(n) / f(d))
                .collect(),
        )
    };
    let (pair_ratio, pair_q1, pair_q3) = pairs(|r| r.decode_tok_s);
    let (steady_ratio, steady_q1, steady_q3) = pairs(|r| r.steady_tok_s);
    let (ttft_pairs, ttft_q1, ttft_q3) = quartiles(
        node_first
            .iter()
            .zip(&direct_first)
            .map(|(n, d)| n.first_token_ms - d)
            .collect(),
    );
    let name = zavod_engine::model_name_from_path(&args.model);
    if args.json {
        let j = serde_json::json!({
            "model": name,
            "threads": threads,
            "gpu_layers": args.gpu_layers,
            "tokens": args.tokens,
            "runs": args.runs,
            "first_token_runs": args.first_token_runs,
            "prompt_tokens": prompt_tokens,
            "processes": args.processes,
            "decode_ratio_per_process_pair": per_pair,
            "direct": {"decode_tok_s": direct_tps, "steady_tok_s": direct_steady, "first_token_ms": direct_ttft},
            "node": {"decode_tok_s": node_tps, "steady_tok_s": node_steady, "first_token_ms": node_ttft},
            "decode_ratio": node_tps / direct_tps,
            "decode_ratio_paired": {"median": pair_ratio, "q1": pair_q1, "q3": pair_q3},
            "steady_ratio_paired": {"median": steady_ratio, "q1": steady_q1, "q3": steady_q3},
            "first_token_overhead_ms": node_ttft - direct_ttft,
            "first_token_overhead_paired_ms": {"median": ttft_pairs, "q1": ttft_q1, "q3": ttft_q3},
            "first_token_added_by_node_ms": node_added,
            "idle_node_rss_bytes": idle_rss,
            "loaded_node_rss_bytes": loaded_rss,
        });
        println!("{}", serde_json::to_string_pretty(&j)?);
    } else {
        println!(
            "zavod bench: {name}, {threads} threads, {prompt_tokens} prompt tokens, {} generated tokens x {} runs x {} fresh process pairs (interleaved; medians)",
            args.tokens, args.runs, args.processes
        );
        println!(
            "{:<28}{:>14}{:>14}{:>16}",
            "", "decode tok/s", "steady tok/s", "first token ms"
        );
        println!(
            "{:<28}{:>14.1}{:>14.1}{:>16.1}",
            "llama.cpp direct", direct_tps, direct_steady, direct_ttft
        );
        println!(
            "{:<28}{:>14.1}{:>14.1}{:>16.1}",
            "through zavod node (TCP)", node_tps, node_steady, node_ttft
        );
        println!(
            "{:<28}{:>14.3}{:>14.3}{:>+16.1}",
            "node / direct",
            node_tps / direct_tps,
            node_steady / direct_steady,
            node_ttft - direct_ttft
        );
        println!(
            "{:<28}{:>14.3}{:>14.3}{:>+16.1}",
            "paired runs (median)", pair_ratio, steady_ratio, ttft_pairs
        );
        println!(
            "{:<28}{:>14}{:>14}{:>16}",
            "paired runs (quartiles)",
            format!("{pair_q1:.3}-{pair_q3:.3}"),
            format!("{steady_q1:.3}-{steady_q3:.3}"),
            format!("{ttft_q1:+.1} to {ttft_q3:+.1}")
        );
        println!(
            "decode ratio per process pair (median of its runs): {}",
            per_pair
                .iter()
                .map(|r| format!("{r:.3}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        println!(
            "decode: tokens after the first over their time; steady: 1 / median per-token time over windows of {STEADY_WINDOW} tokens;"
        );
        println!(
            "first token: from the request (the node's stream opening included) to the first token, over {} one-token runs;",
            args.first_token_runs * args.processes
        );
        println!(
            "  of it the node's own handling and delivery (client's time minus the engine's own time to first token): {node_added:.2} ms (median)"
        );
        println!(
            "node resident memory: {:.1} MiB idle before loading a model, {:.1} MiB with the model loaded",
            idle_rss as f64 / 1048576.0,
            loaded_rss as f64 / 1048576.0
        );
        let (p50, p99) = routing_decision_us(args.routing_peers);
        println!(
            "routing decision over {} members: p50 {p50:.1} us, p99 {p99:.1} us",
            args.routing_peers
        );
    }
    Ok(())
}
