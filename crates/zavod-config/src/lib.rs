//! zavod's node configuration: typed, with defaults, read from a
//! mesh-config TOML profile, then overridden by `ZAVOD_*` environment
//! variables and command line flags (the binary maps both onto
//! [`Overrides`]). Unknown keys are errors that name the key, so a typo
//! never silently does nothing; [`NodeConfig::check`] names the key of any
//! value out of range.
//!
//! A crate of its own so that the decoder of this user input can be
//! fuzzed (`fuzz`, and the `config` cargo-fuzz target) without building
//! the inference engine.
//!
//! Why this file passes 600 lines: the typed configuration and its layering
//! (defaults, mesh-config TOML, `ZAVOD_*` environment, flags) are one job; a
//! third is tests.

mod admission;
pub mod fuzz;

pub use admission::AdmissionSection;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use zavod_proto::mesh::breaker::BreakerConfig;
use zavod_proto::mesh::placer::PlacerConfig;
use zavod_proto::mesh::score::Weights;
use zavod_proto::mesh::view::ViewConfig;

/// The default profile, `mesh-config/local.toml`, built in so a bare
/// `zavod node` behaves as that file says.
pub(crate) const LOCAL_PROFILE: &str = include_str!("../../../mesh-config/local.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config {source_name}: {message}")]
    Parse {
        source_name: String,
        message: String,
    },
    #[error("config: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    pub node: NodeSection,
    pub model: ModelSection,
    pub memory: MemorySection,
    pub generation: GenerationSection,
    pub scoring: ScoringSection,
    pub breaker: BreakerConfig,
    pub limits: LimitsSection,
    pub monitor: MonitorSection,
    pub supervisor: SupervisorSection,
    pub gossip: GossipSection,
    pub view: ViewConfig,
    pub http: HttpSection,
    pub tailscale: TailscaleSection,
    pub admission: AdmissionSection,
}

/// A mesh on a Tailscale tailnet (with `node.tailscale = true`): the node
/// binds to this machine's tailnet addresses and finds zavod peers among
/// the tailnet's online machines.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TailscaleSection {
    /// The port zavod nodes use on the tailnet (TCP, and UDP for QUIC).
    pub port: u16,
    /// Dial only tailnet machines carrying this ACL tag (e.g. "tag:zavod").
    pub tag: Option<String>,
    /// Dial only tailnet machines whose host name matches (`*`, `?`).
    pub host_pattern: Option<String>,
    /// How often Tailscale's status is read again, to find machines that
    /// came (or came back).
    pub poll_ms: u64,
}

impl Default for TailscaleSection {
    fn default() -> Self {
        TailscaleSection {
            port: 7070,
            tag: None,
            host_pattern: None,
            poll_ms: 5_000,
        }
    }
}

/// The OpenAI-compatible HTTP API, metrics and health checks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSection {
    /// `HOST:PORT` to serve on; none serves no HTTP.
    pub listen: Option<String>,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// How long a connection may take to send a request's headers.
    pub header_read_timeout_ms: u64,
    /// How long a request's body may take to arrive.
    pub body_read_timeout_ms: u64,
    /// Connections held open at once; more are closed on arrival.
    pub max_connections: usize,
    /// `HOST:PORT` to serve `/metrics` on instead of the API's listener
    /// (keep the figures off a port clients reach); none serves them with
    /// the API.
    pub metrics_listen: Option<String>,
}

impl Default for HttpSection {
    fn default() -> Self {
        HttpSection {
            listen: None,
            max_body_bytes: 1 << 20,
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 30_000,
            max_connections: 512,
            metrics_listen: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GossipSection {
    /// How often this node checks whether to announce itself.
    pub interval_ms: u64,
    /// Announce at least this often even when nothing changed.
    pub heartbeat_ms: u64,
}

impl Default for GossipSection {
    fn default() -> Self {
        GossipSection {
            interval_ms: 1_000,
            heartbeat_ms: 2_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeSection {
    /// Multiaddrs to listen on.
    pub listen: Vec<String>,
    /// Where keys, credentials and memory live; empty means the user's data
    /// directory (`ZAVOD_DATA_DIR` and `--data-dir` override).
    pub data_dir: Option<PathBuf>,
    /// Nodes to join the mesh through (multiaddrs, with /p2p/PEER_ID).
    pub bootstrap: Vec<String>,
    /// Find peers on the local network by mDNS.
    pub mdns: bool,
    /// Bind to this machine's Tailscale addresses and find zavod peers on
    /// the tailnet (see `[tailscale]`).
    pub tailscale: bool,
    /// A private mesh's pre-shared key file (`zavod mesh psk`): TCP only,
    /// and only with nodes that have the same key.
    pub psk_file: Option<PathBuf>,
    /// Threads for networking, routing and the actors; 0 = automatic (see
    /// [`NodeConfig::runtime_threads`]).
    pub runtime_threads: u32,
}

impl Default for NodeSection {
    fn default() -> Self {
        NodeSection {
            listen: vec!["/ip4/127.0.0.1/tcp/7070".into()],
            data_dir: None,
            bootstrap: Vec::new(),
            mdns: false,
            tailscale: false,
            psk_file: None,
            runtime_threads: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// GGUF files to serve, or family folders of GGUF files of one model
    /// at several quantizations (the best that fits is loaded): one path or
    /// a list, each model with its own slots. With none (and no `dir`) the
    /// node is an entry and router only.
    #[serde(deserialize_with = "one_or_many")]
    pub path: Vec<PathBuf>,
    /// A folder of models: every family in it (as `zavod model list`
    /// shows them) is served, besides those `path` names.
    pub dir: Option<PathBuf>,
    /// In a family folder, load this quantization (e.g. "Q8_0") instead of
    /// the best that fits.
    pub quant: Option<String>,
    /// Choose a family's file as if this much memory were free, instead of
    /// measuring it (for tests, and for machines shared with other work).
    pub assume_free_memory_mib: Option<u64>,
    pub gpu_layers: u32,
    /// Requests generated at once (continuous batching).
    pub slots: u32,
    /// Context tokens per request.
    pub context_tokens: u32,
    /// CPU threads; 0 = all available cores.
    pub threads: u32,
    pub batch_tokens: u32,
    /// Requests that may wait for a free slot.
    pub queue_capacity: usize,
    /// A llama.cpp built-in template name, for models without their own.
    pub chat_template: Option<String>,
    /// Longest a generated token is held so that several leave together;
    /// 0 sends each token as it is made. Unset: automatic (see
    /// [`NodeConfig::stream_interval_ms`]).
    pub stream_interval_ms: Option<u32>,
    /// Keep finished requests' KV cache so a prompt sharing a prefix
    /// (a conversation's next turn) prefills only what is new.
    pub prompt_cache: bool,
    /// Memory for cached prompts saved out of their slots when a slot is
    /// needed; 0 keeps only what the slots hold.
    pub prompt_cache_ram_mib: u64,
    /// Reuse an identical cached prefix across credentials. Off, each
    /// credential only ever reuses its own prompts, so no one can tell
    /// from a fast start what someone else asked.
    pub share_prompt_cache: bool,
}

impl ModelSection {
    /// Whether this node is to serve any model.
    pub fn serves_any(&self) -> bool {
        !self.path.is_empty() || self.dir.is_some()
    }
}

/// `path = "a.gguf"` or `path = ["a.gguf", "b/"]`.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<PathBuf>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(PathBuf),
        Many(Vec<PathBuf>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(p) => vec![p],
        OneOrMany::Many(v) => v,
    })
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection {
            path: Vec::new(),
            dir: None,
            quant: None,
            assume_free_memory_mib: None,
            gpu_layers: 0,
            slots: 4,
            context_tokens: 4096,
            threads: 0,
            batch_tokens: 512,
            queue_capacity: 64,
            chat_template: None,
            stream_interval_ms: None,
            prompt_cache: true,
            prompt_cache_ram_mib: 1024,
            share_prompt_cache: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemorySection {
    /// Most stored turns considered when assembling a prompt.
    pub max_history_turns: usize,
    /// Template tokens counted around each turn.
    pub per_turn_overhead_tokens: u32,
    /// Conversations this node keeps for one credential holder; a request
    /// that would start another is refused before any work is done.
    pub max_conversations_per_holder: usize,
    /// Nodes that keep each conversation (fewer in a smaller mesh); a turn
    /// is acknowledged once a majority of them has it on disk.
    pub replicas: usize,
    /// How often a node checks that every conversation it keeps has its
    /// replicas, repairing those that lack entries and handing over those
    /// it no longer should keep.
    pub sync_interval_ms: u64,
    /// How long one try of a replica read or write may take before it is
    /// tried again (the whole operation gives up after three tries).
    pub replica_timeout_ms: u64,
    /// Most tokens of a prompt given to long-term memory: the facts a
    /// user stated before that the recent turns no longer hold (0: none).
    pub recall_tokens: u32,
}

impl Default for MemorySection {
    fn default() -> Self {
        MemorySection {
            max_history_turns: 64,
            per_turn_overhead_tokens: 8,
            max_conversations_per_holder: 1_000,
            replicas: zavod_proto::memory::DEFAULT_REPLICAS,
            sync_interval_ms: 10_000,
            replica_timeout_ms: 1_500,
            recall_tokens: 256,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GenerationSection {
    pub default_max_tokens: u32,
}

impl Default for GenerationSection {
    fn default() -> Self {
        GenerationSection {
            default_max_tokens: 256,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScoringSection {
    pub weights: Weights,
    /// The choices are drawn from this many best-scored candidates (0: all;
    /// 1: always the best).
    pub pool: usize,
    /// Candidates drawn for each request; the least loaded wins.
    pub choices: usize,
    /// A node keeps a request it can serve itself while its load is at
    /// most this fraction of its slots above the drawn alternative's.
    pub local_slack: f64,
    /// The node holding a conversation's prompt cache keeps its next turn
    /// while its load is at most this fraction of its slots above the
    /// drawn alternative's.
    pub cache_slack: f64,
}

impl Default for ScoringSection {
    fn default() -> Self {
        let p = PlacerConfig::default();
        ScoringSection {
            weights: p.weights,
            pool: p.pool,
            choices: p.choices,
            local_slack: p.local_slack,
            cache_slack: p.cache_slack,
        }
    }
}

impl ScoringSection {
    /// The placer's settings; `report_every_ms` is the gossip heartbeat.
    pub fn placer(&self, report_every_ms: u64) -> PlacerConfig {
        PlacerConfig {
            weights: self.weights.clone(),
            pool: self.pool,
            choices: self.choices,
            report_every_ms,
            local_slack: self.local_slack,
            cache_slack: self.cache_slack,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    pub max_frame_bytes: usize,
    /// How long a new chat stream may take to send its request.
    pub request_timeout_ms: u64,
    /// How long one frame write may block on a slow client.
    pub write_timeout_ms: u64,
    /// Chat streams served at once; more are refused with NoCapacity.
    pub max_concurrent_streams: usize,
    /// Lifetime of per-request grants.
    pub grant_ttl_ms: u64,
    pub dial_timeout_ms: u64,
    pub idle_connection_timeout_ms: u64,
    /// A running request with no token for this long is failed.
    pub stall_timeout_ms: u64,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            max_frame_bytes: zavod_proto::limits::MAX_FRAME_BYTES,
            request_timeout_ms: 10_000,
            write_timeout_ms: 30_000,
            max_concurrent_streams: 256,
            grant_ttl_ms: 30_000,
            dial_timeout_ms: 10_000,
            idle_connection_timeout_ms: 60_000,
            stall_timeout_ms: 60_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MonitorSection {
    pub sample_interval_ms: u64,
}

impl Default for MonitorSection {
    fn default() -> Self {
        MonitorSection {
            sample_interval_ms: 1_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SupervisorSection {
    pub restart_backoff_initial_ms: u64,
    pub restart_backoff_max_ms: u64,
    /// A child that ran this long before failing restarts with the initial backoff.
    pub restart_reset_after_ms: u64,
}

impl Default for SupervisorSection {
    fn default() -> Self {
        SupervisorSection {
            restart_backoff_initial_ms: 100,
            restart_backoff_max_ms: 10_000,
            restart_reset_after_ms: 30_000,
        }
    }
}

/// Values from the environment and the command line; `None` keeps the
/// profile's value.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<Vec<String>>,
    /// Added to the profile's bootstrap list.
    pub bootstrap: Vec<String>,
    pub data_dir: Option<PathBuf>,
    /// Replaces the profile's model paths when not empty.
    pub model: Vec<PathBuf>,
    pub models_dir: Option<PathBuf>,
    pub quant: Option<String>,
    pub assume_free_memory_mib: Option<u64>,
    pub gpu_layers: Option<u32>,
    pub slots: Option<u32>,
    pub batch_tokens: Option<u32>,
    pub prompt_cache: Option<bool>,
    pub prompt_cache_ram_mib: Option<u64>,
    pub context_tokens: Option<u32>,
    pub threads: Option<u32>,
    pub runtime_threads: Option<u32>,
    pub stream_interval_ms: Option<u32>,
    pub http: Option<String>,
    pub tailscale: Option<bool>,
    pub psk_file: Option<PathBuf>,
}

impl NodeConfig {
    pub fn from_toml(text: &str, source_name: &str) -> Result<Self, ConfigError> {
        let cfg: NodeConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            source_name: source_name.into(),
            message: e.to_string().trim().to_string(),
        })?;
        Ok(cfg)
    }

    /// The profile at `path`, or the built-in local profile.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.display().to_string(),
                    source,
                })?;
                Self::from_toml(&text, &p.display().to_string())
            }
            None => Self::from_toml(LOCAL_PROFILE, "mesh-config/local.toml (built in)"),
        }
    }

    pub fn apply(&mut self, o: Overrides) {
        if let Some(v) = o.listen {
            self.node.listen = v;
        }
        self.node.bootstrap.extend(o.bootstrap);
        if let Some(v) = o.data_dir {
            self.node.data_dir = Some(v);
        }
        if !o.model.is_empty() {
            self.model.path = o.model;
        }
        if let Some(v) = o.models_dir {
            self.model.dir = Some(v);
        }
        if let Some(v) = o.quant {
            self.model.quant = Some(v);
        }
        if let Some(v) = o.assume_free_memory_mib {
            self.model.assume_free_memory_mib = Some(v);
        }
        if let Some(v) = o.gpu_layers {
            self.model.gpu_layers = v;
        }
        if let Some(v) = o.slots {
            self.model.slots = v;
        }
        if let Some(v) = o.batch_tokens {
            self.model.batch_tokens = v;
        }
        if let Some(v) = o.prompt_cache {
            self.model.prompt_cache = v;
        }
        if let Some(v) = o.prompt_cache_ram_mib {
            self.model.prompt_cache_ram_mib = v;
        }
        if let Some(v) = o.context_tokens {
            self.model.context_tokens = v;
        }
        if let Some(v) = o.threads {
            self.model.threads = v;
        }
        if let Some(v) = o.runtime_threads {
            self.node.runtime_threads = v;
        }
        if let Some(v) = o.stream_interval_ms {
            self.model.stream_interval_ms = Some(v);
        }
        if let Some(v) = o.http {
            self.http.listen = Some(v);
        }
        if let Some(v) = o.tailscale {
            self.node.tailscale = v;
        }
        if let Some(v) = o.psk_file {
            self.node.psk_file = Some(v);
        }
    }

    /// Checks values that types cannot; errors name the key.
    pub fn check(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if let Some(v) = self.model.stream_interval_ms
            && v > zavod_proto::limits::MAX_STREAM_INTERVAL_MS
        {
            return bad(format!(
                "model.stream_interval_ms must be 0 to {}, got {v}",
                zavod_proto::limits::MAX_STREAM_INTERVAL_MS
            ));
        }
        if self.node.runtime_threads > 256 {
            return bad(format!(
                "node.runtime_threads must be 0 (automatic) to 256, got {}",
                self.node.runtime_threads
            ));
        }
        if self.node.listen.is_empty() {
            return bad("node.listen must name at least one address".into());
        }
        if let Some(a) = &self.http.listen
            && a.parse::<std::net::SocketAddr>().is_err()
        {
            return bad(format!(
                "http.listen must be HOST:PORT with an IP address (e.g. 127.0.0.1:8080), got {a:?}"
            ));
        }
        if let Some(a) = &self.http.metrics_listen
            && a.parse::<std::net::SocketAddr>().is_err()
        {
            return bad(format!(
                "http.metrics_listen must be HOST:PORT with an IP address (e.g. 127.0.0.1:9090), got {a:?}"
            ));
        }
        for (key, v) in [
            (
                "http.header_read_timeout_ms",
                self.http.header_read_timeout_ms,
            ),
            ("http.body_read_timeout_ms", self.http.body_read_timeout_ms),
            ("http.max_connections", self.http.max_connections as u64),
        ] {
            if v == 0 {
                return bad(format!("{key} must be at least 1"));
            }
        }
        if self.http.max_body_bytes < 1024 {
            return bad(format!(
                "http.max_body_bytes must be at least 1024, got {}",
                self.http.max_body_bytes
            ));
        }
        self.scoring
            .weights
            .check()
            .map_err(|e| ConfigError::Invalid(format!("scoring.weights: {e}")))?;
        if self.scoring.choices == 0 || self.scoring.choices > 16 {
            return bad(format!(
                "scoring.choices must be 1 to 16, got {}",
                self.scoring.choices
            ));
        }
        for (key, v) in [
            ("scoring.local_slack", self.scoring.local_slack),
            ("scoring.cache_slack", self.scoring.cache_slack),
        ] {
            if !v.is_finite() || !(0.0..=4.0).contains(&v) {
                return bad(format!("{key} must be between 0 and 4, got {v}"));
            }
        }
        if self.model.prompt_cache_ram_mib > (zavod_proto::limits::MAX_SAVED_STATE_BYTES >> 20) {
            return bad(format!(
                "model.prompt_cache_ram_mib must be at most {}, got {}",
                zavod_proto::limits::MAX_SAVED_STATE_BYTES >> 20,
                self.model.prompt_cache_ram_mib
            ));
        }
        let (most_slots, most_queue) = (
            zavod_proto::limits::MAX_SLOTS_PER_MODEL,
            zavod_proto::limits::MAX_QUEUE_PER_MODEL,
        );
        if self.model.slots == 0 || self.model.slots > most_slots {
            return bad(format!(
                "model.slots must be 1 to {most_slots}, got {}",
                self.model.slots
            ));
        }
        if self.model.queue_capacity > most_queue as usize {
            return bad(format!(
                "model.queue_capacity must be at most {most_queue}, got {}",
                self.model.queue_capacity
            ));
        }
        if self.model.context_tokens < 64 {
            return bad(format!(
                "model.context_tokens must be at least 64, got {}",
                self.model.context_tokens
            ));
        }
        if self.limits.max_frame_bytes < 1024
            || self.limits.max_frame_bytes > zavod_proto::limits::MAX_FRAME_BYTES
        {
            return bad(format!(
                "limits.max_frame_bytes must be 1024 to {}, got {}",
                zavod_proto::limits::MAX_FRAME_BYTES,
                self.limits.max_frame_bytes
            ));
        }
        if self.limits.max_concurrent_streams == 0 {
            return bad("limits.max_concurrent_streams must be at least 1".into());
        }
        self.admission
            .check(
                self.limits.max_concurrent_streams,
                self.limits.request_timeout_ms,
            )
            .map_err(ConfigError::Invalid)?;
        if self.gossip.interval_ms < 50 || self.gossip.heartbeat_ms < self.gossip.interval_ms {
            return bad(
                "gossip.interval_ms must be at least 50 and gossip.heartbeat_ms at least that"
                    .into(),
            );
        }
        if self.view.suspect_after_ms <= self.gossip.heartbeat_ms
            || self.view.gone_after_ms < self.view.suspect_after_ms
        {
            return bad("view.suspect_after_ms must exceed gossip.heartbeat_ms, and view.gone_after_ms must be at least view.suspect_after_ms".into());
        }
        for b in &self.node.bootstrap {
            if b.parse::<libp2p::Multiaddr>().is_err() {
                return bad(format!("node.bootstrap: {b:?} is not a multiaddr"));
            }
        }
        if self.tailscale.port == 0 {
            return bad(
                "tailscale.port must be 1 to 65535 (the port every node uses on the tailnet)"
                    .into(),
            );
        }
        if self.tailscale.poll_ms < 500 || self.tailscale.poll_ms > 600_000 {
            return bad(format!(
                "tailscale.poll_ms must be 500 to 600000, got {}",
                self.tailscale.poll_ms
            ));
        }
        zavod_net::tailscale::PeerFilter::new(
            self.tailscale.tag.as_deref(),
            self.tailscale.host_pattern.as_deref(),
        )
        .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if self.memory.max_conversations_per_holder == 0
            || self.memory.max_conversations_per_holder > 1_000_000
        {
            return bad(format!(
                "memory.max_conversations_per_holder must be 1 to 1000000, got {}",
                self.memory.max_conversations_per_holder
            ));
        }
        if !(1..=7).contains(&self.memory.replicas) {
            return bad(format!(
                "memory.replicas must be 1 to 7, got {}",
                self.memory.replicas
            ));
        }
        if !(500..=3_600_000).contains(&self.memory.sync_interval_ms) {
            return bad(format!(
                "memory.sync_interval_ms must be 500 to 3600000, got {}",
                self.memory.sync_interval_ms
            ));
        }
        if self.memory.recall_tokens > 8_192 {
            return bad(format!(
                "memory.recall_tokens must be 0 to 8192, got {}",
                self.memory.recall_tokens
            ));
        }
        if !(50..=60_000).contains(&self.memory.replica_timeout_ms) {
            return bad(format!(
                "memory.replica_timeout_ms must be 50 to 60000, got {}",
                self.memory.replica_timeout_ms
            ));
        }
        if self.monitor.sample_interval_ms < 50 {
            return bad("monitor.sample_interval_ms must be at least 50".into());
        }
        if self.generation.default_max_tokens == 0
            || self.generation.default_max_tokens > zavod_proto::limits::MAX_TOKENS_PER_REQUEST
        {
            return bad("generation.default_max_tokens is out of range".into());
        }
        Ok(())
    }

    /// The private mesh's key, read from `node.psk_file` (none without it).
    pub fn mesh_key(&self) -> Result<Option<libp2p::pnet::PreSharedKey>, ConfigError> {
        self.node
            .psk_file
            .as_deref()
            .map(zavod_net::psk::read)
            .transpose()
            .map_err(|e| ConfigError::Invalid(format!("node.psk_file: {e}")))
    }

    /// The data directory: configured, else `<user data dir>/zavod`.
    pub fn data_dir(&self) -> PathBuf {
        self.node.data_dir.clone().unwrap_or_else(default_data_dir)
    }
}

pub fn default_data_dir() -> PathBuf {
    dirs::data_dir()
        .unwrap_or_else(|| PathBuf::from("."))
        .join("zavod")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_profile_in_mesh_config_parses_and_checks() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../mesh-config");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).expect("mesh-config") {
            let path = entry.expect("entry").path();
            let c = NodeConfig::load(Some(&path)).expect("profile parses");
            c.check()
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            if path.ends_with("tailscale.toml") {
                assert!(c.node.tailscale, "the tailscale profile turns it on");
            }
            seen += 1;
        }
        assert!(seen >= 3, "{seen} profiles");
    }

    /// The config's fuzz smoke run: 20,000 seeded mutations of the shipped
    /// profiles (values swapped for hostile ones, lines dropped, doubled or
    /// cut) through the fuzz target. Each must end in a config or an error
    /// that names its source, never a panic; many of each.
    #[test]
    fn mutated_profiles_get_a_config_or_an_error_never_a_panic() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../mesh-config");
        let mut seeds: Vec<String> = std::fs::read_dir(&dir)
            .expect("mesh-config")
            .map(|e| std::fs::read_to_string(e.expect("entry").path()).expect("read"))
            .collect();
        seeds.sort();
        let hostile = [
            "-1",
            "0",
            "1e309",
            "nan",
            "inf",
            "-inf",
            "18446744073709551616",
            "4294967296",
            "\"\"",
            "\"x\"",
            "[]",
            "{}",
            "true",
            "\"\\u0000\"",
            "\"/dev/null\"",
            "\"[\"",
            "{ a = 1 }",
            "1979-05-27T07:32:00Z",
            "0x7fffffff",
        ];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as usize
        };
        let (mut ok, mut refused) = (0, 0);
        for i in 0..20_000 {
            let mut lines: Vec<String> = seeds[i % seeds.len()].lines().map(String::from).collect();
            for _ in 0..=next() % 3 {
                if lines.is_empty() {
                    break;
                }
                let at = next() % lines.len();
                match next() % 4 {
                    0 => {
                        if let Some((k, _)) = lines[at].split_once('=') {
                            lines[at] = format!("{k}= {}", hostile[next() % hostile.len()]);
                        }
                    }
                    1 => {
                        lines.remove(at);
                    }
                    2 => {
                        let dup = lines[at].clone();
                        lines.insert(at, dup);
                    }
                    _ => {
                        let cut = next() % (lines[at].len() + 1);
                        if lines[at].is_char_boundary(cut) {
                            lines[at].truncate(cut);
                        }
                    }
                }
            }
            let text = lines.join("\n");
            fuzz::config(text.as_bytes());
            match fuzz::parse_and_check(&text) {
                Ok(_) => ok += 1,
                Err(_) => refused += 1,
            }
        }
        assert!(
            ok > 1_000 && refused > 1_000,
            "{ok} taken, {refused} refused"
        );
    }

    #[test]
    fn a_bad_tailnet_setting_is_named() {
        let mut c = NodeConfig::load(None).expect("local profile");
        c.tailscale.host_pattern = Some("[".into());
        let e = c.check().expect_err("bad pattern");
        assert!(e.to_string().contains("tailscale.host_pattern"), "{e}");
        let mut c = NodeConfig::load(None).expect("local profile");
        c.tailscale.poll_ms = 10;
        assert!(
            c.check()
                .expect_err("too often")
                .to_string()
                .contains("tailscale.poll_ms")
        );
        assert!(
            NodeConfig::from_toml("[tailscale]\nport = 7070\nfilter = \"x\"\n", "t")
                .expect_err("unknown key")
                .to_string()
                .contains("filter")
        );
    }

    #[test]
    fn the_local_profile_parses_and_checks() {
        let c = NodeConfig::load(None).expect("local profile");
        c.check().expect("valid");
        assert_eq!(c.scoring.weights, Weights::default());
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = NodeConfig::from_toml("[model]\nslotz = 3\n", "x.toml").expect_err("unknown");
        let m = e.to_string();
        assert!(m.contains("slotz") && m.contains("x.toml"), "{m}");
        let e = NodeConfig::from_toml("[nodes]\n", "x.toml").expect_err("unknown section");
        assert!(e.to_string().contains("nodes"), "{e}");
    }

    #[test]
    fn bad_values_are_named() {
        let mut c = NodeConfig::default();
        c.scoring.weights.rtt = -1.0;
        assert!(c.check().expect_err("bad").to_string().contains("rtt"));
        let e = NodeConfig::from_toml("[model]\nslots = \"four\"\n", "x.toml").expect_err("type");
        assert!(e.to_string().contains("slots"), "{e}");
    }

    #[test]
    fn overrides_win() {
        let mut c = NodeConfig::default();
        c.apply(Overrides {
            slots: Some(2),
            model: vec!["m.gguf".into()],
            ..Default::default()
        });
        assert_eq!(c.model.slots, 2);
        assert_eq!(c.model.path, vec![PathBuf::from("m.gguf")]);
        // One path or a list, in a profile.
        let one = NodeConfig::from_toml("[model]\npath = \"a.gguf\"\n", "x.toml").expect("one");
        assert_eq!(one.model.path, vec![PathBuf::from("a.gguf")]);
        let two = NodeConfig::from_toml(
            "[model]\npath = [\"a.gguf\", \"fam/\"]\ndir = \"models\"\n",
            "x.toml",
        )
        .expect("list");
        assert_eq!(two.model.path.len(), 2);
        assert_eq!(two.model.dir, Some(PathBuf::from("models")));
        assert!(NodeConfig::from_toml("[model]\npath = 3\n", "x.toml").is_err());
    }
}
