//! Command-line flags. Every flag of `node` may also come from a `ZAVOD_*`
//! environment variable; flags beat the environment, which beats the
//! config file, which beats the built-in defaults.

use clap::{Args, Parser, Subcommand, ValueEnum};
use libp2p::Multiaddr;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(name = "zavod", version, about = "A peer-to-peer LLM inference mesh", long_about = None)]
pub struct Cli {
    /// Log format on stderr; filter with RUST_LOG (e.g. RUST_LOG=zavod_node=debug).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "ZAVOD_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node: serve a model (with --model) and route chats.
    Node(NodeArgs),
    /// Chat with the mesh through any node (interactive, or one answer with --prompt).
    Chat(ChatArgs),
    /// Show the mesh as a node sees it: members, models, load, breakers, scores.
    Status(StatusArgs),
    /// Create a mesh, or invite nodes into it.
    #[command(subcommand)]
    Mesh(MeshCommand),
    /// Issue client credentials.
    #[command(subcommand)]
    Cap(CapCommand),
    /// Measure decode speed and first-token time through a node against llama.cpp driven directly.
    Bench(zavod_bench::BenchArgs),
    /// Inspect, list and quantize model files.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Your conversations on a node: list, export, delete.
    #[command(subcommand)]
    Memory(MemoryCommand),
}

#[derive(Debug, Subcommand)]
pub enum MemoryCommand {
    /// List your conversations the node holds.
    List {
        #[command(flatten)]
        at: Attach,
    },
    /// Print one conversation as JSON lines, oldest turn first:
    /// {"role": "user"|"assistant"|"system", "text": …, "tokens": …}.
    Export {
        #[arg(long, value_name = "ID")]
        conversation: String,
        #[command(flatten)]
        at: Attach,
    },
    /// Delete one conversation (--conversation ID) or every one of yours (--all).
    Delete {
        #[arg(
            long,
            value_name = "ID",
            required_unless_present = "all",
            conflicts_with = "all"
        )]
        conversation: Option<String>,
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        at: Attach,
    },
}

/// The node a client attaches to, and who the client is.
#[derive(Debug, Args)]
pub struct Attach {
    /// The node to talk to: a multiaddr, with or without /p2p/PEER_ID, or
    /// host:port. Repeat it (or separate addresses with commas) to name
    /// nodes to fall back on, in order: the first that answers as a member
    /// is used, and a chat goes on through the next when its node fails.
    #[arg(long, env = "ZAVOD_PEER", value_name = "ADDR", value_parser = parse_peer, value_delimiter = ',', default_value = "127.0.0.1:7070")]
    pub peer: Vec<Multiaddr>,
    /// Data directory holding this user's key and credential.
    #[arg(long, env = "ZAVOD_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Credential to present: a file, or the credential text itself [default: DIR/client.cred].
    #[arg(long, env = "ZAVOD_CREDENTIAL", value_name = "FILE_OR_TEXT")]
    pub credential: Option<String>,
    /// The private mesh's pre-shared key, when the node uses one.
    #[arg(long, env = "ZAVOD_PSK_FILE", value_name = "FILE")]
    pub psk_file: Option<PathBuf>,
}

impl Attach {
    /// The addresses named, for messages.
    pub fn peers(&self) -> String {
        let all: Vec<String> = self.peer.iter().map(ToString::to_string).collect();
        all.join(", ")
    }
}

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Print what a GGUF file says about itself: architecture, parameters,
    /// quantization (from its metadata, not its name), shape, context.
    Inspect {
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Write a file of another quantization with llama.cpp's quantizer
    /// (requantizing an already quantized file is allowed).
    Quantize {
        src: PathBuf,
        /// Target quantization, e.g. Q8_0, Q4_K_M, Q2_K.
        #[arg(long = "type", value_name = "TYPE")]
        quant: String,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// CPU threads (0 = all cores).
        #[arg(long, default_value_t = 0, value_name = "N")]
        threads: u32,
    },
    /// List the model families in a folder (sub-folders of GGUF files, and
    /// loose GGUF files) with each file's quantization, tier and size.
    List {
        #[arg(default_value = "models", value_name = "DIR")]
        dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum MeshCommand {
    /// Create a mesh authority in the data directory (and this node's membership
    /// and a credential for the local user).
    Init {
        #[arg(long, env = "ZAVOD_DATA_DIR", value_name = "DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Print a one-line invite for a new node: `zavod node --join TOKEN`.
    Invite {
        #[arg(long, env = "ZAVOD_DATA_DIR", value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// How long the invite can be used (e.g. 1h, 7d).
        #[arg(long, default_value = "24h", value_parser = parse_duration, value_name = "DURATION")]
        ttl: std::time::Duration,
        /// Address of a node that can sign memberships (repeatable)
        /// [default: the addresses the node on this data directory listens on].
        #[arg(long, value_name = "MULTIADDR", value_parser = parse_multiaddr)]
        bootstrap: Vec<Multiaddr>,
        /// How many nodes the invite admits (each once; a node may present
        /// it again). Invites are single-use unless you say otherwise.
        #[arg(long, default_value_t = 1, value_name = "N",
              value_parser = clap::value_parser!(u32).range(1..=i64::from(zavod_proto::trust::MAX_INVITE_USES)))]
        uses: u32,
        /// How long the membership of a node it admits lasts before that
        /// node must have it renewed (it does so by itself at half-life, at
        /// the node that signed it; a node that cannot, leaves the mesh
        /// when it expires).
        #[arg(long, default_value = "7d", value_parser = parse_duration, value_name = "DURATION")]
        membership_ttl: std::time::Duration,
    },
    /// Revoke a node's membership: members stop routing to it, refuse its
    /// grants and close its connections within one gossip round, and no
    /// invite admits it again. Signed with this data directory's authority
    /// key; kept by every node for good.
    Revoke {
        /// The node: its peer id (12D3KooW…, as `zavod status` shows it) or
        /// its node key (64 hex digits).
        node: String,
        #[command(flatten)]
        to: RevokeArgs,
    },
    /// Write a fresh pre-shared key for a private mesh: every node started
    /// with `--psk-file FILE` (and every client) needs the same file, and
    /// nothing without it can connect. QUIC is off on such nodes.
    Psk {
        /// Where to write the key (never overwritten; readable by you only).
        #[arg(long, default_value = "mesh.psk", value_name = "FILE")]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum CapCommand {
    /// Issue a credential: printed as one line (a capability token holding a
    /// fresh client key) unless --out is given.
    Issue {
        #[arg(long, env = "ZAVOD_DATA_DIR", value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// Models allowed; `*` matches any run of characters (e.g. "gemma-*").
        #[arg(long, default_value = "*", value_name = "PATTERN")]
        models: String,
        /// Tokens the credential may have generated over its life.
        #[arg(long, value_name = "N")]
        max_tokens: u64,
        /// How long the credential is valid (e.g. 30d, 12h).
        #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
        ttl: std::time::Duration,
        /// Requests per minute (0 = no limit).
        #[arg(long, default_value_t = 0, value_name = "PER_MIN")]
        rate: u32,
        /// Bind the credential to an existing client key (64 hex digits)
        /// instead of making a new one.
        #[arg(long, value_name = "PUBKEY")]
        holder: Option<String>,
        /// Write the credential to this file instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Revoke a credential: every entry of the mesh refuses it within one
    /// gossip round. Signed with this data directory's authority key; kept
    /// by every node for good.
    Revoke {
        /// The credential: its id (32 hex digits, as `zavod cap issue`
        /// prints it), or the credential or capability token itself (a
        /// file, or the text).
        credential: String,
        #[command(flatten)]
        to: RevokeArgs,
    },
}

/// Where a revocation goes.
#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The data directory holding the mesh's authority key.
    #[arg(long, env = "ZAVOD_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// A running member to hand the revocation to [default: the node
    /// running on the data directory; when none runs there, the revocation
    /// is written into the data directory, and its node spreads it when it
    /// starts].
    #[arg(long, value_name = "ADDR", value_parser = parse_peer)]
    pub peer: Option<Multiaddr>,
    /// The private mesh's pre-shared key, when the node uses one.
    #[arg(long, env = "ZAVOD_PSK_FILE", value_name = "FILE")]
    pub psk_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    // Without a credential, a node's own data directory reads that node's
    // status as its operator.
    #[command(flatten)]
    pub at: Attach,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{e}; expected a duration like 90s, 30m, 24h or 7d"))
}

fn parse_multiaddr(s: &str) -> Result<Multiaddr, String> {
    s.parse::<Multiaddr>()
        .map_err(|e| format!("{e}; expected a multiaddr like /ip4/0.0.0.0/tcp/7070"))
}

fn parse_peer(s: &str) -> Result<Multiaddr, String> {
    zavod_net::parse_peer_addr(s).map_err(|e| e.to_string())
}

#[derive(Debug, Args)]
pub struct NodeArgs {
    /// Config profile (TOML); without it the built-in mesh-config/local.toml applies.
    #[arg(long, env = "ZAVOD_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// GGUF model to serve, or a family folder holding one model's files at
    /// several quantizations (the best that fits free memory is loaded).
    /// Repeat it (or separate paths with commas) to serve several models,
    /// each with its own slots. Without one the node only routes.
    #[arg(long, env = "ZAVOD_MODEL", value_name = "PATH", value_delimiter = ',')]
    pub model: Vec<PathBuf>,
    /// Serve every model in this folder (its GGUF files and family
    /// folders, as `zavod model list` shows them).
    #[arg(long, env = "ZAVOD_MODELS_DIR", value_name = "DIR")]
    pub models_dir: Option<PathBuf>,
    /// In a family folder, load this quantization (e.g. Q8_0) rather than
    /// the best that fits (with several models: in each of them).
    #[arg(long, env = "ZAVOD_QUANT", value_name = "TYPE")]
    pub quant: Option<String>,
    /// Choose a family's file as if this much memory (MiB) were free rather
    /// than measuring it.
    #[arg(long, env = "ZAVOD_ASSUME_FREE_MEMORY_MIB", value_name = "MIB")]
    pub assume_free_memory_mib: Option<u64>,
    /// Run on this machine's Tailscale tailnet: bind to its tailnet
    /// addresses and find zavod peers there (asks the `tailscale` CLI, or
    /// the one ZAVOD_TAILSCALE_BIN names).
    #[arg(long, env = "ZAVOD_TAILSCALE", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub tailscale: Option<bool>,
    /// A private mesh's pre-shared key (`zavod mesh psk` writes one): only
    /// nodes and clients with the same key can connect; QUIC is off.
    #[arg(long, env = "ZAVOD_PSK_FILE", value_name = "FILE")]
    pub psk_file: Option<PathBuf>,
    /// Address to listen on (repeatable), e.g. /ip4/0.0.0.0/tcp/7070.
    #[arg(long, env = "ZAVOD_LISTEN", value_name = "MULTIADDR", value_parser = parse_multiaddr, value_delimiter = ',')]
    pub listen: Vec<Multiaddr>,
    /// Where keys, credentials and conversation memory live [default: the user's data dir + /zavod].
    #[arg(long, env = "ZAVOD_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// CPU threads for inference (0 = all cores).
    #[arg(long, env = "ZAVOD_THREADS", value_name = "N")]
    pub threads: Option<u32>,
    /// Threads for networking and the node's actors (0 = the cores inference
    /// leaves free, from 1 to 4).
    #[arg(long, env = "ZAVOD_RUNTIME_THREADS", value_name = "N")]
    pub runtime_threads: Option<u32>,
    /// Longest a generated token is held so that several reach the client
    /// together (0 = each token as it is made; default: 0, or 50 when the
    /// model's CPU threads take every core).
    #[arg(long, env = "ZAVOD_STREAM_INTERVAL_MS", value_name = "MS")]
    pub stream_interval_ms: Option<u32>,
    /// Requests generated at once (continuous batching).
    #[arg(long, env = "ZAVOD_SLOTS", value_name = "N")]
    pub slots: Option<u32>,
    /// Most tokens one decode step computes (prompt chunks and every
    /// running answer's next token together).
    #[arg(long, env = "ZAVOD_BATCH_TOKENS", value_name = "N")]
    pub batch_tokens: Option<u32>,
    /// Keep finished requests' KV cache, so a conversation's next turn (or
    /// any prompt sharing a prefix) prefills only what is new.
    #[arg(long, env = "ZAVOD_PROMPT_CACHE", value_name = "BOOL", action = clap::ArgAction::Set)]
    pub prompt_cache: Option<bool>,
    /// Memory for cached prompts saved out of their slots (MiB; 0 keeps only
    /// what the slots hold).
    #[arg(long, env = "ZAVOD_PROMPT_CACHE_RAM_MIB", value_name = "MIB")]
    pub prompt_cache_ram_mib: Option<u64>,
    /// Context tokens per request.
    #[arg(long, env = "ZAVOD_CONTEXT_TOKENS", value_name = "N")]
    pub context_tokens: Option<u32>,
    /// Model layers to offload to the GPU (needs a build with --features cuda).
    #[arg(long, env = "ZAVOD_GPU_LAYERS", value_name = "N")]
    pub gpu_layers: Option<u32>,
    /// A node of the mesh to connect through (repeatable), with /p2p/PEER_ID.
    #[arg(long, env = "ZAVOD_BOOTSTRAP", value_name = "MULTIADDR", value_parser = parse_multiaddr, value_delimiter = ',')]
    pub bootstrap: Vec<Multiaddr>,
    /// Join a mesh with an invite from `zavod mesh invite` (first start only;
    /// later starts remember the membership).
    #[arg(long, env = "ZAVOD_JOIN", value_name = "TOKEN")]
    pub join: Option<String>,
    /// Serve the OpenAI-compatible HTTP API, /metrics and health checks on HOST:PORT.
    #[arg(long, env = "ZAVOD_HTTP", value_name = "HOST:PORT")]
    pub http: Option<String>,
}

#[derive(Debug, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub at: Attach,
    /// Ask once, print the answer on stdout and exit (for scripts).
    #[arg(long, value_name = "TEXT")]
    pub prompt: Option<String>,
    /// Sampling temperature; 0 is greedy (same text every time).
    #[arg(long, default_value_t = 0.7, value_name = "T")]
    pub temperature: f32,
    /// Sample only among the K most likely tokens (0: all).
    #[arg(long, default_value_t = zavod_proto::wire::DEFAULT_TOP_K, value_name = "K")]
    pub top_k: u32,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 0.95, value_name = "P")]
    pub top_p: f32,
    /// End the answer where it first contains TEXT, which is not shown
    /// (repeatable, at most 4).
    #[arg(long = "stop", value_name = "TEXT")]
    pub stop: Vec<String>,
    /// Most tokens to generate per answer.
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub max_tokens: u32,
    /// Sampling seed.
    #[arg(long, default_value_t = 0, value_name = "S")]
    pub seed: u64,
    /// Conversation to continue (its memory is kept by the node); default: a new one.
    #[arg(long, value_name = "ID")]
    pub conversation: Option<String>,
    /// Model to ask for [default: what the node serves].
    #[arg(long, value_name = "NAME")]
    pub model: Option<String>,
    /// Print on stderr which peer served the answer and how fast.
    #[arg(long, short)]
    pub verbose: bool,
    /// Print on stderr the prompt the node assembled (history and template).
    #[arg(long)]
    pub show_prompt: bool,
}
