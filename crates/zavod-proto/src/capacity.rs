//! What a node can offer: its resources and the capacity report built from
//! them. Reports are small (a few hundred bytes) because every node receives
//! every other node's report.

use crate::UnixMs;
use crate::ids::NodeId;
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

/// A model a node has loaded and serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelOffer {
    pub name: String,
    /// Quantization, e.g. `Q4_K_M`.
    pub quant: String,
    pub context_tokens: u32,
}

/// Load figures a model worker reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct WorkerLoad {
    pub slots_total: u32,
    pub slots_busy: u32,
    pub queue_depth: u32,
    /// Recent decode rate, tokens per second per stream.
    pub tokens_per_s: f32,
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
}

impl CapacityReport {
    pub fn build(
        node: NodeId,
        seq: u64,
        at_ms: UnixMs,
        res: &Resources,
        load: &WorkerLoad,
        models: Vec<ModelOffer>,
    ) -> Self {
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
        }
    }

    pub fn serves(&self, model: &str) -> bool {
        self.models.iter().any(|m| m.name == model)
    }
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
        };
        let rep = CapacityReport::build(NodeId([1; 32]), 1, 5, &r, &load, vec![]);
        assert!(rep.on_gpu);
        assert_eq!(rep.slots_free, 3);
        assert_eq!(rep.mem_total_bytes, 80);
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
                name: "gemma-3-270m-q4_k_m".into(),
                quant: "Q4_K_M".into(),
                context_tokens: 32768,
            }],
        };
        let n = crate::wire::encode(&rep).expect("encodes").len();
        assert!(n < 200, "report is {n} bytes");
    }
}
