//! Which files a node loads: each path of `model.path` and every family in
//! `model.dir`, and for a family folder the best quantization tier that
//! fits the memory free at start (VRAM of GPU 0 when layers are offloaded,
//! available RAM otherwise) with the KV cache of the configured slots, or
//! the quantization `model.quant` names. Models are chosen in order and
//! each one's need is taken from the memory left for the next. The choice
//! itself is the pure [`zavod_proto::mesh::tiers::choose`]; this file measures
//! and reports.

use crate::config::NodeConfig;
use std::path::PathBuf;
use zavod_engine::EngineError;
use zavod_engine::family::Family;
use zavod_proto::mesh::tiers::Tier;

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

/// The families the config names: its paths in order, then the families
/// of its models folder.
fn families(cfg: &NodeConfig) -> Result<Vec<Family>, EngineError> {
    let mut out = cfg
        .model
        .path
        .iter()
        .map(|p| Family::open(p))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(dir) = &cfg.model.dir {
        let (found, errors) = zavod_engine::family::list(dir)?;
        if let Some(e) = errors.into_iter().next() {
            return Err(e);
        }
        if found.is_empty() {
            return Err(EngineError::ModelFile {
                path: dir.display().to_string(),
                reason: "the models folder holds no .gguf files or family folders".into(),
            });
        }
        out.extend(found);
    }
    let most = zavod_proto::limits::MAX_MODELS_PER_NODE;
    if out.len() > most {
        return Err(EngineError::Config(format!(
            "{} models to serve; a node serves at most {most} (its capacity reports carry no \
             more): name fewer with model.path, or split model.dir between nodes",
            out.len()
        )));
    }
    Ok(out)
}

/// Resolves the config's models to the files to load; empty when the node
/// serves none. Two models of one name are refused.
pub fn select(cfg: &NodeConfig) -> Result<Vec<ModelSelection>, EngineError> {
    let families = families(cfg)?;
    let mut names = std::collections::BTreeSet::new();
    for f in &families {
        if !names.insert(f.name.as_str()) {
            return Err(EngineError::Config(format!(
                "two models are both named {}; serve each model once",
                f.name
            )));
        }
    }
    let (slots, context) = (cfg.model.slots, cfg.model.context_tokens);
    let forced = cfg.model.quant.as_deref();
    // Memory is measured once, when a choice first depends on it; the
    // models chosen before and since take their share of it.
    let mut measured: Option<(u64, String)> = None;
    let mut taken: u64 = 0;
    let mut out = Vec::with_capacity(families.len());
    for family in &families {
        if family.files.len() == 1 && forced.is_none() {
            let f = &family.files[0];
            taken = taken.saturating_add(family.need_bytes(0, slots, context));
            out.push(ModelSelection {
                name: family.name.clone(),
                path: f.path.clone(),
                quant: f.facts.quant.clone(),
                tier: zavod_proto::mesh::tiers::tier_of(&f.facts.quant),
                files: 1,
                reason: "the only file".into(),
            });
            continue;
        }
        if measured.is_none() {
            measured = Some(free_memory(cfg)?);
        }
        let (free, source) = measured.clone().unwrap_or_default();
        let left = free.saturating_sub(taken);
        let choice = family.choose(slots, context, left, forced)?;
        let file = &family.files[choice.index];
        taken = taken.saturating_add(family.need_bytes(choice.index, slots, context));
        let source = if taken > 0 && left < free {
            format!("{source}, less what the models before it need")
        } else {
            source
        };
        out.push(ModelSelection {
            name: family.name.clone(),
            path: file.path.clone(),
            quant: choice.quant,
            tier: choice.tier,
            files: family.files.len(),
            reason: format!("{} ({source})", choice.reason),
        });
    }
    Ok(out)
}
