//! What a node can offer: its resources and the capacity report built from
//! them. Reports are small (a few hundred bytes) because every node receives
//! every other node's report: the summary of a node's prompt cache is a
//! fixed-size Bloom filter, however many sequences it keeps.

use crate::UnixMs;
use crate::ids::NodeId;
use crate::trust::{RevocationDigest, UsageCount};
use serde::{Deserialize, Serialize};

/// One GPU as sampled by the monitor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuSample {
    pub name: String,
    pub vram_total_bytes: u64,
    pub vram_free_bytes: u64,
    pub utilization_percent: u32,
    pub temperature_c: u32,
    pub power_milliwatts: u32,
}

/// One sample of a machine's resources.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Resources {
    pub gpus: Vec<GpuSample>,
    pub ram_total_bytes: u64,
    pub ram_free_bytes: u64,
    pub cpu_percent: f32,
    pub cpu_cores: u32,
}

impl Resources {
    /// Free memory that counts for placing models: VRAM on GPU nodes,
    /// RAM on CPU nodes.
    pub fn placement_free_bytes(&self) -> u64 {
        if self.gpus.is_empty() {
            self.ram_free_bytes
        } else {
            self.gpus.iter().map(|g| g.vram_free_bytes).sum()
        }
    }

    pub fn placement_total_bytes(&self) -> u64 {
        if self.gpus.is_empty() {
            self.ram_total_bytes
        } else {
            self.gpus.iter().map(|g| g.vram_total_bytes).sum()
        }
    }
}

/// A model a node has loaded and serves. A node may serve several, each
/// with its own engine, so each offer carries its own slots and queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelOffer {
    pub name: String,
    /// Quantization, e.g. `Q4_K_M`.
    pub quant: String,
    pub context_tokens: u32,
    pub slots_free: u32,
    pub slots_total: u32,
    pub queue_depth: u32,
}

impl ModelOffer {
    /// The static facts of a model; its load is filled in by
    /// [`ModelOffer::with_load`] when a report is built.
    pub fn new(name: impl Into<String>, quant: impl Into<String>, context_tokens: u32) -> Self {
        ModelOffer {
            name: name.into(),
            quant: quant.into(),
            context_tokens,
            slots_free: 0,
            slots_total: 0,
            queue_depth: 0,
        }
    }

    pub fn with_load(self, load: &WorkerLoad) -> Self {
        ModelOffer {
            slots_free: load.slots_total.saturating_sub(load.slots_busy),
            slots_total: load.slots_total,
            queue_depth: load.queue_depth,
            ..self
        }
    }
}

/// Load figures a model worker reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct WorkerLoad {
    pub slots_total: u32,
    pub slots_busy: u32,
    pub queue_depth: u32,
    /// Recent decode rate, tokens per second per stream.
    pub tokens_per_s: f32,
    /// Affinity keys (see [`crate::chat::prompt::affinity_key`]) of the prompts
    /// whose KV cache the worker keeps, most recently used first; at most
    /// [`CACHE_SUMMARY_MAX_KEYS`].
    pub cache_keys: Vec<u64>,
}

/// 64-bit words in a cache summary: 1,024 bits.
pub const CACHE_SUMMARY_WORDS: usize = 16;
/// Keys a summary holds at most; with 3 bits per key the chance that a key
/// not held reads as held stays under 2% at this many.
pub const CACHE_SUMMARY_MAX_KEYS: usize = 96;
const CACHE_SUMMARY_BITS_PER_KEY: u64 = 3;
const _: () = assert!(CACHE_SUMMARY_WORDS * 64 >= 8 * CACHE_SUMMARY_MAX_KEYS);

/// Which prompts a node holds in its KV cache, as a Bloom filter over their
/// affinity keys: fixed size, so a report stays small whatever the cache
/// holds. A false "held" costs a routing preference, never correctness
/// (the target then prefills the whole prompt). Empty when nothing is held,
/// and then one byte on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct CacheSummary {
    words: Vec<u64>,
}

impl CacheSummary {
    /// The summary of `keys`; keys past [`CACHE_SUMMARY_MAX_KEYS`] are left
    /// out (callers list the most recently used first).
    pub fn of(keys: &[u64]) -> Self {
        if keys.is_empty() {
            return CacheSummary::default();
        }
        let mut words = vec![0u64; CACHE_SUMMARY_WORDS];
        for &k in keys.iter().take(CACHE_SUMMARY_MAX_KEYS) {
            for bit in Self::bits(k) {
                words[bit / 64] |= 1 << (bit % 64);
            }
        }
        CacheSummary { words }
    }

    /// Whether `key` may be held. A summary of the wrong size (a peer's
    /// bug or malice) holds nothing.
    pub fn may_hold(&self, key: u64) -> bool {
        self.words.len() == CACHE_SUMMARY_WORDS
            && Self::bits(key).all(|bit| self.words[bit / 64] & (1 << (bit % 64)) != 0)
    }

    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }

    fn bits(key: u64) -> impl Iterator<Item = usize> {
        let total = (CACHE_SUMMARY_WORDS * 64) as u64;
        (0..CACHE_SUMMARY_BITS_PER_KEY).map(move |i| {
            (crate::mesh::score::splitmix64(key ^ i.wrapping_mul(0x9e37)) % total) as usize
        })
    }
}

/// What a node tells the mesh about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CapacityReport {
    pub node: NodeId,
    /// Increases with every report from this node; older ones are ignored.
    pub seq: u64,
    pub at_ms: UnixMs,
    pub on_gpu: bool,
    pub mem_free_bytes: u64,
    pub mem_total_bytes: u64,
    pub slots_free: u32,
    pub slots_total: u32,
    pub queue_depth: u32,
    pub tokens_per_s: f32,
    pub models: Vec<ModelOffer>,
    /// The prompts this node holds cached, for cache-affinity routing.
    pub cached: CacheSummary,
    /// Where the node can be dialled (multiaddrs as text), under the
    /// report's signature so no relay can point others elsewhere.
    pub addrs: Vec<String>,
    /// Which revocations the node holds: a member whose digest differs
    /// from ours is asked for its list (see [`RevocationDigest`]).
    pub revocations: RevocationDigest,
    /// This node's spending of credentials as an entry, a few at a time
    /// (see [`crate::trust::UsageLedger`]): signed with the report, so no
    /// relay can change another entry's counts.
    pub usage: Vec<UsageCount>,
}

impl CapacityReport {
    /// The report of a node serving `served` (each model with its worker's
    /// load; empty on an entry-only node). The node-wide figures are the
    /// sums over its models.
    pub fn build(
        node: NodeId,
        seq: u64,
        at_ms: UnixMs,
        res: &Resources,
        served: &[(ModelOffer, WorkerLoad)],
    ) -> Self {
        let load = total_load(served.iter().map(|(_, l)| l));
        let models = served.iter().map(|(o, l)| o.clone().with_load(l)).collect();
        CapacityReport {
            node,
            seq,
            at_ms,
            on_gpu: !res.gpus.is_empty(),
            mem_free_bytes: res.placement_free_bytes(),
            mem_total_bytes: res.placement_total_bytes(),
            slots_free: load.slots_total.saturating_sub(load.slots_busy),
            slots_total: load.slots_total,
            queue_depth: load.queue_depth,
            tokens_per_s: load.tokens_per_s,
            models,
            cached: CacheSummary::of(&load.cache_keys),
            addrs: Vec::new(),
            revocations: RevocationDigest::default(),
            usage: Vec::new(),
        }
    }

    pub fn serves(&self, model: &str) -> bool {
        self.models.iter().any(|m| m.name == model)
    }

    /// Whether the figures could be true: a signed report from a member can
    /// still lie, and one that claims more free memory than it has, or
    /// thousands of free slots, would draw every request. Checked before a
    /// report counts; a report that fails is dropped as bad.
    pub fn plausible(&self) -> Result<(), String> {
        use crate::limits::{
            MAX_CONTEXT_TOKENS, MAX_MODELS_PER_NODE, MAX_QUEUE_PER_MODEL, MAX_SLOTS_PER_MODEL,
        };
        if self.mem_free_bytes > self.mem_total_bytes {
            return Err(format!(
                "free memory {} B is more than the total {} B",
                self.mem_free_bytes, self.mem_total_bytes
            ));
        }
        if !self.tokens_per_s.is_finite() || !(0.0..=1e7).contains(&self.tokens_per_s) {
            return Err(format!("decode rate {} tok/s", self.tokens_per_s));
        }
        if self.usage.len() > crate::limits::MAX_USAGE_PER_ANNOUNCEMENT {
            return Err(format!(
                "{} usage counts, more than {}",
                self.usage.len(),
                crate::limits::MAX_USAGE_PER_ANNOUNCEMENT
            ));
        }
        if self.models.len() > MAX_MODELS_PER_NODE {
            return Err(format!(
                "{} models, more than {MAX_MODELS_PER_NODE}",
                self.models.len()
            ));
        }
        let (mut total, mut free, mut queue) = (0u32, 0u32, 0u32);
        for m in &self.models {
            if m.name.is_empty() || m.name.len() > MAX_MODEL_NAME_BYTES {
                return Err(format!("a model name of {} bytes", m.name.len()));
            }
            if m.slots_total > MAX_SLOTS_PER_MODEL
                || m.slots_free > m.slots_total
                || m.queue_depth > MAX_QUEUE_PER_MODEL
                || m.context_tokens > MAX_CONTEXT_TOKENS
            {
                return Err(format!(
                    "model {}: {} of {} slots free, {} waiting, {} context tokens",
                    m.name, m.slots_free, m.slots_total, m.queue_depth, m.context_tokens
                ));
            }
            // Bounded by the limits above (asserted in `limits`).
            total += m.slots_total;
            free += m.slots_free;
            queue += m.queue_depth;
        }
        if (self.slots_total, self.slots_free, self.queue_depth) != (total, free, queue) {
            return Err(format!(
                "{} of {} slots free and {} waiting, where its models add up to {free} of {total} and {queue}",
                self.slots_free, self.slots_total, self.queue_depth
            ));
        }
        Ok(())
    }
}

/// The longest model name a report may carry.
pub const MAX_MODEL_NAME_BYTES: usize = 256;

/// One node's load over all its models: slots and queues add up, the rate
/// is the best stream rate, and the cache keys are interleaved (each
/// model's most recent first) so a summary cut at its limit keeps the
/// newest of every model.
pub fn total_load<'a>(loads: impl Iterator<Item = &'a WorkerLoad> + Clone) -> WorkerLoad {
    let mut total = WorkerLoad::default();
    for l in loads.clone() {
        total.slots_total = total.slots_total.saturating_add(l.slots_total);
        total.slots_busy = total.slots_busy.saturating_add(l.slots_busy);
        total.queue_depth = total.queue_depth.saturating_add(l.queue_depth);
        total.tokens_per_s = total.tokens_per_s.max(l.tokens_per_s);
    }
    let longest = loads.clone().map(|l| l.cache_keys.len()).max().unwrap_or(0);
    for i in 0..longest.min(CACHE_SUMMARY_MAX_KEYS) {
        for l in loads.clone() {
            if let Some(k) = l.cache_keys.get(i) {
                total.cache_keys.push(*k);
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_nodes_place_by_vram_cpu_nodes_by_ram() {
        let mut r = Resources {
            ram_total_bytes: 32,
            ram_free_bytes: 16,
            ..Default::default()
        };
        assert_eq!(r.placement_free_bytes(), 16);
        r.gpus.push(GpuSample {
            name: "g".into(),
            vram_total_bytes: 80,
            vram_free_bytes: 70,
            utilization_percent: 0,
            temperature_c: 40,
            power_milliwatts: 0,
        });
        assert_eq!(r.placement_free_bytes(), 70);
        let load = WorkerLoad {
            slots_total: 4,
            slots_busy: 1,
            queue_depth: 0,
            tokens_per_s: 60.0,
            cache_keys: vec![7, 9],
        };
        let offer = ModelOffer::new("m", "Q4_K_M", 4096);
        let rep = CapacityReport::build(NodeId([1; 32]), 1, 5, &r, &[(offer, load)]);
        assert!(rep.on_gpu);
        assert_eq!(rep.slots_free, 3);
        assert_eq!(rep.models[0].slots_free, 3);
        assert_eq!(rep.mem_total_bytes, 80);
        assert!(rep.cached.may_hold(7) && rep.cached.may_hold(9));
    }

    #[test]
    fn a_node_serving_two_models_reports_each_models_slots_and_the_sum() {
        let a = WorkerLoad {
            slots_total: 4,
            slots_busy: 4,
            queue_depth: 2,
            tokens_per_s: 30.0,
            cache_keys: vec![1, 2, 3],
        };
        let b = WorkerLoad {
            slots_total: 2,
            slots_busy: 0,
            queue_depth: 0,
            tokens_per_s: 50.0,
            cache_keys: vec![10],
        };
        let served = [
            (ModelOffer::new("big", "Q8_0", 4096), a),
            (ModelOffer::new("small", "Q4_K_M", 2048), b),
        ];
        let rep = CapacityReport::build(NodeId([1; 32]), 1, 5, &Resources::default(), &served);
        assert_eq!(
            (rep.slots_total, rep.slots_free, rep.queue_depth),
            (6, 2, 2)
        );
        assert_eq!(rep.tokens_per_s, 50.0);
        let big = &rep.models[0];
        assert_eq!(
            (big.slots_total, big.slots_free, big.queue_depth),
            (4, 0, 2)
        );
        let small = &rep.models[1];
        assert_eq!((small.slots_total, small.slots_free), (2, 2));
        for k in [1, 2, 3, 10] {
            assert!(rep.cached.may_hold(k));
        }
        // Interleaved: the newest key of every model comes first.
        let total = total_load(served.iter().map(|(_, l)| l));
        assert_eq!(total.cache_keys, vec![1, 10, 2, 3]);
    }

    #[test]
    fn a_report_stays_small() {
        let rep = CapacityReport {
            node: NodeId([1; 32]),
            seq: u64::MAX,
            at_ms: u64::MAX,
            on_gpu: true,
            mem_free_bytes: u64::MAX,
            mem_total_bytes: u64::MAX,
            slots_free: 64,
            slots_total: 64,
            queue_depth: 100,
            tokens_per_s: 100.0,
            models: vec![ModelOffer {
                slots_free: 64,
                slots_total: 64,
                queue_depth: 100,
                ..ModelOffer::new("gemma-3-270m-q4_k_m", "Q4_K_M", 32768)
            }],
            cached: CacheSummary::default(),
            addrs: vec![],
            revocations: Default::default(),
            usage: Vec::new(),
        };
        let n = crate::wire::encode(&rep).expect("encodes").len();
        assert!(n < 200, "report is {n} bytes");
        // A full cache summary adds a fixed 128 bytes or so, however much
        // the node holds.
        let keys: Vec<u64> = (0..10_000).collect();
        let full = CapacityReport {
            cached: CacheSummary::of(&keys),
            ..rep
        };
        let n = crate::wire::encode(&full).expect("encodes").len();
        assert!(n < 350, "report with a cache summary is {n} bytes");
    }

    #[test]
    fn a_cache_summary_holds_its_keys_and_rarely_others() {
        let keys: Vec<u64> = (0..CACHE_SUMMARY_MAX_KEYS as u64)
            .map(|k| crate::mesh::score::splitmix64(k + 1000))
            .collect();
        let s = CacheSummary::of(&keys);
        assert!(keys.iter().all(|k| s.may_hold(*k)));
        let false_hits = (0..10_000u64)
            .map(|k| crate::mesh::score::splitmix64(k + 1_000_000))
            .filter(|k| s.may_hold(*k))
            .count();
        assert!(false_hits < 250, "{false_hits} false hits in 10,000");
        assert!(!CacheSummary::default().may_hold(keys[0]));
        assert!(CacheSummary::of(&[]).is_empty());
        // A peer's summary of the wrong size holds nothing.
        let bad = CacheSummary {
            words: vec![u64::MAX; 3],
        };
        assert!(!bad.may_hold(1));
    }
}
