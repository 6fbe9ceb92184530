//! Which file a node loads when `model.path` names a family folder: the
//! best quantization tier that fits the memory free at start (VRAM of GPU
//! 0 when layers are offloaded, available RAM otherwise) with the KV cache
//! of the configured slots, or the quantization `model.quant` names. The
//! choice itself is the pure [`zavod_proto::tiers::choose`]; this file
//! measures and reports.

use crate::config::NodeConfig;
use std::path::PathBuf;
use zavod_engine::EngineError;
use zavod_engine::family::Family;
use zavod_proto::tiers::Tier;

/// The file chosen and why.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSelection {
    /// The name the mesh knows the model by.
    pub name: String,
    pub path: PathBuf,
    pub quant: String,
    pub tier: Option<Tier>,
    /// How many files the family has.
    pub files: usize,
    /// One line: the choice, what it needs, what was free, what a better
    /// file would have needed.
    pub reason: String,
}

/// Free memory the choice is made against, and where the figure came from.
fn free_memory(cfg: &NodeConfig) -> Result<(u64, String), EngineError> {
    if let Some(mib) = cfg.model.assume_free_memory_mib {
        return Ok((mib << 20, "model.assume_free_memory_mib".into()));
    }
    if cfg.model.gpu_layers > 0 {
        let nvml = nvml_wrapper::Nvml::init().map_err(|e| {
            EngineError::Config(format!(
                "cannot measure free VRAM to choose a file ({e}); name one with --quant, \
                 or set model.assume_free_memory_mib"
            ))
        })?;
        let free = nvml
            .device_by_index(0)
            .and_then(|d| d.memory_info())
            .map_err(|e| EngineError::Config(format!("cannot read GPU 0's memory: {e}")))?
            .free;
        return Ok((free, "free VRAM on GPU 0".into()));
    }
    let mut sys = sysinfo::System::new();
    sys.refresh_memory();
    Ok((sys.available_memory(), "available RAM".into()))
}

/// Resolves `model.path` to the file to load. `None` when the node serves
/// no model.
pub fn select(cfg: &NodeConfig) -> Result<Option<ModelSelection>, EngineError> {
    let Some(path) = &cfg.model.path else {
        return Ok(None);
    };
    let family = Family::open(path)?;
    let forced = cfg.model.quant.as_deref();
    if family.files.len() == 1 && forced.is_none() {
        let f = &family.files[0];
        return Ok(Some(ModelSelection {
            name: family.name.clone(),
            path: f.path.clone(),
            quant: f.facts.quant.clone(),
            tier: zavod_proto::tiers::tier_of(&f.facts.quant),
            files: 1,
            reason: "the only file".into(),
        }));
    }
    let (free, source) = free_memory(cfg)?;
    let choice = family.choose(cfg.model.slots, cfg.model.context_tokens, free, forced)?;
    let file = &family.files[choice.index];
    Ok(Some(ModelSelection {
        name: family.name.clone(),
        path: file.path.clone(),
        quant: choice.quant,
        tier: choice.tier,
        files: family.files.len(),
        reason: format!("{} ({source})", choice.reason),
    }))
}
