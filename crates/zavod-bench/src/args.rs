//! The flags of `zavod bench`, parsed by the `zavod` command.

use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// GGUF model to measure.
    #[arg(
        long,
        env = "ZAVOD_MODEL",
        value_name = "PATH",
        default_value = "models/gemma-3-270m-q4_k_m.gguf"
    )]
    pub model: PathBuf,
    /// CPU threads, the same for the node and for llama.cpp direct (0 = all cores).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub threads: u32,
    /// Model layers offloaded to the GPU, the same for the node and for
    /// llama.cpp direct (needs a CUDA build; 0 runs on the CPU).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub gpu_layers: u32,
    /// Tokens generated per run.
    #[arg(long, default_value_t = 128, value_name = "N")]
    pub tokens: u32,
    /// Measured decode runs of each path (interleaved) per process pair, after
    /// one warm-up each.
    #[arg(long, default_value_t = 2, value_name = "N")]
    pub runs: u32,
    /// Measured one-token runs of each path (interleaved) per process pair,
    /// for the time to first token; short, so many fit.
    #[arg(long, default_value_t = 6, value_name = "N")]
    pub first_token_runs: u32,
    /// Fresh pairs of processes (a node, and llama.cpp on its own) to spread
    /// the runs over, so no one process's luck decides the ratio.
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub processes: u32,
    /// Internal: be the direct llama.cpp side of a bench (reads token counts
    /// on stdin, writes timings on stdout).
    #[arg(long, hide = true)]
    pub direct_worker: bool,
    /// Prompt sent as one chat turn.
    #[arg(
        long,
        default_value = "Write a short story about a lighthouse keeper.",
        value_name = "TEXT"
    )]
    pub prompt: String,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
    /// Compare a chat through an entry node without the model (routed to a
    /// second node that has it) with a chat attached to that node directly,
    /// instead of node against llama.cpp.
    #[arg(long)]
    pub mesh: bool,
    /// Members in the synthetic view used to time routing decisions.
    #[arg(long, default_value_t = 1000, value_name = "N")]
    pub routing_peers: usize,
    /// Only time routing decisions (no nodes, no model).
    #[arg(long)]
    pub routing_only: bool,
    /// Workload mode: N clients streaming at once (`--requests` each, one
    /// after another), a zavod node against llama-server over their OpenAI
    /// APIs; `--tokens` per answer.
    #[arg(long, value_name = "N", conflicts_with_all = ["conversation", "mesh"])]
    pub concurrent: Option<usize>,
    /// Workload mode: `--clients` chats of K turns each, the whole history
    /// sent every turn, a zavod node against llama-server. With `--mesh`: a
    /// conversation through an entry node against one attached to the
    /// model node directly.
    #[arg(long, value_name = "K")]
    pub conversation: Option<usize>,
    /// Requests each concurrent client sends, one after another.
    #[arg(long, default_value_t = 2, value_name = "N")]
    pub requests: usize,
    /// Words of each concurrent request's prompt (about 1.25 tokens each).
    #[arg(long, default_value_t = 150, value_name = "N")]
    pub prompt_words: usize,
    /// Conversations held at once.
    #[arg(long, default_value_t = 2, value_name = "N")]
    pub clients: usize,
    /// Words of each new user turn in a conversation.
    #[arg(long, default_value_t = 420, value_name = "N")]
    pub turn_words: usize,
    /// Tokens of each answer in a conversation.
    #[arg(long, default_value_t = 48, value_name = "N")]
    pub answer_tokens: u32,
    /// Slots of the servers in a workload bench (llama-server's -np).
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub slots: u32,
    /// Context tokens per slot in a workload bench.
    #[arg(long, default_value_t = 4096, value_name = "N")]
    pub context_tokens: u32,
    /// Alternating rounds of a workload bench.
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub rounds: u32,
    /// llama.cpp's llama-server [default: $LLAMA_SERVER, else
    /// target/llama-server/bin/llama-server from scripts/build-llama-server.sh].
    #[arg(long, value_name = "PATH")]
    pub llama_server: Option<PathBuf>,
    /// Measure only the zavod node in a workload bench.
    #[arg(long)]
    pub zavod_only: bool,
    /// Extra flag for the zavod node(s) of a workload bench (repeatable),
    /// e.g. --node-flag=--prompt-cache=false to measure without the cache.
    #[arg(long, value_name = "FLAG", allow_hyphen_values = true)]
    pub node_flag: Vec<String>,
}
