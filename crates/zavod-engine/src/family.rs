//! Model families: one model's GGUF files at several quantizations, kept
//! in one folder (`models/gemma-3-270m/` holding Q8_0, Q4_K_M, Q2_K). The
//! folder's name is the name the mesh knows the model by; a lone `.gguf`
//! file is a family of one, named by its file stem as before.
//!
//! Every file's quantization is read from its metadata, never from its
//! name, so a file may be called anything.

use crate::EngineError;
use crate::gguf::{GgufFacts, read_facts};
use std::path::{Path, PathBuf};
use zavod_proto::mesh::tiers::{Room, TierChoice, TierFile, choose};

/// Most files read from one family folder: a guard against pointing the
/// node at a folder of thousands of files, far above any real family.
pub const MAX_FAMILY_FILES: usize = 64;

/// One file of a family.
#[derive(Debug, Clone, PartialEq)]
pub struct FamilyFile {
    pub path: PathBuf,
    pub size_bytes: u64,
    pub facts: GgufFacts,
}

/// A model and its files, in file-name order.
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    pub name: String,
    pub files: Vec<FamilyFile>,
}

impl Family {
    /// The family at `path`: every `.gguf` file in a folder, or one file.
    pub fn open(path: &Path) -> Result<Family, EngineError> {
        let meta = std::fs::metadata(path).map_err(|e| EngineError::ModelFile {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        if !meta.is_dir() {
            let facts = read_facts(path)?;
            return Ok(Family {
                name: crate::model_name_from_path(path),
                files: vec![FamilyFile {
                    path: path.to_path_buf(),
                    size_bytes: meta.len(),
                    facts,
                }],
            });
        }
        let name = path
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        let paths = gguf_files(path)?;
        if paths.is_empty() {
            return Err(EngineError::ModelFile {
                path: path.display().to_string(),
                reason: "the folder holds no .gguf files".into(),
            });
        }
        let mut files = Vec::with_capacity(paths.len());
        for p in paths {
            let size_bytes = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
            let facts = read_facts(&p)?;
            files.push(FamilyFile {
                path: p,
                size_bytes,
                facts,
            });
        }
        Ok(Family { name, files })
    }

    /// The file to load for `slots` sequences of `context_tokens` each in
    /// `free_bytes` of memory, or the one `forced` names.
    pub fn choose(
        &self,
        slots: u32,
        context_tokens: u32,
        free_bytes: u64,
        forced: Option<&str>,
    ) -> Result<TierChoice, EngineError> {
        let kv_bytes = self.kv_bytes(slots, context_tokens);
        let files: Vec<TierFile> = self
            .files
            .iter()
            .map(|f| TierFile {
                quant: f.facts.quant.clone(),
                size_bytes: f.size_bytes,
            })
            .collect();
        choose(
            &files,
            Room {
                free_bytes,
                kv_bytes,
            },
            forced,
        )
        .map_err(|e| EngineError::Config(format!("model {}: {e}", self.name)))
    }
}

impl Family {
    /// The KV cache of `slots` sequences of `context_tokens` each. Files of
    /// one family share the attention shape; the largest estimate is taken
    /// in case one file lacks it.
    pub fn kv_bytes(&self, slots: u32, context_tokens: u32) -> u64 {
        let tokens = u64::from(slots) * u64::from(context_tokens);
        self.files
            .iter()
            .filter_map(|f| f.facts.kv_bytes(tokens))
            .max()
            .unwrap_or(0)
    }

    /// Memory the file at `index` needs loaded with that KV cache.
    pub fn need_bytes(&self, index: usize, slots: u32, context_tokens: u32) -> u64 {
        self.files.get(index).map_or(0, |f| {
            zavod_proto::mesh::tiers::need_bytes(
                &TierFile {
                    quant: f.facts.quant.clone(),
                    size_bytes: f.size_bytes,
                },
                self.kv_bytes(slots, context_tokens),
            )
        })
    }
}

/// The `.gguf` files directly in `dir`, sorted by name.
fn gguf_files(dir: &Path) -> Result<Vec<PathBuf>, EngineError> {
    let io = |e: std::io::Error| EngineError::ModelFile {
        path: dir.display().to_string(),
        reason: e.to_string(),
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let p = entry.map_err(io)?.path();
        if p.is_file()
            && p.extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        {
            if out.len() == MAX_FAMILY_FILES {
                return Err(EngineError::ModelFile {
                    path: dir.display().to_string(),
                    reason: format!("more than {MAX_FAMILY_FILES} .gguf files"),
                });
            }
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// Every family under `models_dir`: its sub-folders holding `.gguf` files,
/// and its loose `.gguf` files. A file that cannot be read is reported
/// beside the families rather than hiding them.
pub fn list(models_dir: &Path) -> Result<(Vec<Family>, Vec<EngineError>), EngineError> {
    let io = |e: std::io::Error| EngineError::ModelFile {
        path: models_dir.display().to_string(),
        reason: e.to_string(),
    };
    let mut entries: Vec<PathBuf> = std::fs::read_dir(models_dir)
        .map_err(io)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    let (mut families, mut errors) = (Vec::new(), Vec::new());
    for p in entries {
        let is_model_dir = p.is_dir() && gguf_files(&p).is_ok_and(|f| !f.is_empty());
        let is_model_file = p.is_file()
            && p.extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
        if !(is_model_dir || is_model_file) {
            continue;
        }
        match Family::open(&p) {
            Ok(f) => families.push(f),
            Err(e) => errors.push(e),
        }
    }
    Ok((families, errors))
}
