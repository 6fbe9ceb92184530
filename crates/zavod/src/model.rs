//! `zavod model`: what a model file is (read from its metadata), the
//! families in a folder, and new quantizations made by llama.cpp.

use crate::cli::ModelCommand;
use anyhow::{Context, Result};
use std::path::Path;
use zavod_engine::family;
use zavod_engine::gguf::read_facts;
use zavod_engine::llama::count_parameters;
use zavod_proto::mesh::tiers::tier_of;

pub fn run(cmd: ModelCommand) -> Result<()> {
    match cmd {
        ModelCommand::Inspect { file, json } => inspect(&file, json),
        ModelCommand::Quantize {
            src,
            quant,
            out,
            threads,
        } => {
            let t0 = std::time::Instant::now();
            zavod_engine::quantize::quantize(&src, &out, &quant, threads)?;
            let facts = read_facts(&out).context("reading the file just written")?;
            let size = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
            println!(
                "wrote {} ({}, {}) in {:.1} s",
                out.display(),
                facts.quant,
                human(size),
                t0.elapsed().as_secs_f64()
            );
            Ok(())
        }
        ModelCommand::List { dir } => list(&dir),
    }
}

fn human(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

fn params_text(n: u64) -> String {
    if n >= 1_000_000_000 {
        format!("{:.2}B", n as f64 / 1e9)
    } else {
        format!("{:.0}M", n as f64 / 1e6)
    }
}

fn inspect(file: &Path, json: bool) -> Result<()> {
    let f = read_facts(file)?;
    let params = count_parameters(file)?;
    let size = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    let tier = tier_of(&f.quant).map(|t| t.name());
    if json {
        let v = serde_json::json!({
            "file": file.display().to_string(),
            "architecture": f.architecture,
            "name": f.name,
            "size_label": f.size_label,
            "parameters": params,
            "file_type": f.file_type,
            "quantization": f.quant,
            "tier": tier,
            "size_bytes": size,
            "bits_per_weight": (params > 0).then(|| size as f64 * 8.0 / params as f64),
            "context_length": f.context_length,
            "layers": f.layers,
            "embedding_length": f.embedding_length,
            "head_count": f.head_count,
            "head_count_kv": f.head_count_kv,
            "kv_cache_bytes_per_token": f.kv_bytes(1),
            "chat_template": f.has_chat_template,
            "metadata_keys": f.metadata_keys,
            "tensors": f.tensors,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let opt = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |n| n.to_string());
    println!("file           {}", file.display());
    println!(
        "model          {}{}",
        f.name.as_deref().unwrap_or("(no general.name)"),
        f.size_label
            .as_deref()
            .map(|l| format!(" ({l})"))
            .unwrap_or_default()
    );
    println!("architecture   {}", f.architecture);
    println!("parameters     {} ({params})", params_text(params));
    println!(
        "quantization   {} (general.file_type {}), tier {}",
        f.quant,
        f.file_type
            .map_or_else(|| "absent".to_string(), |t| t.to_string()),
        tier.unwrap_or("none")
    );
    println!(
        "size           {}{}",
        human(size),
        if params > 0 {
            format!(", {:.2} bits per weight", size as f64 * 8.0 / params as f64)
        } else {
            String::new()
        }
    );
    println!("context        {} tokens (trained)", opt(f.context_length));
    println!(
        "shape          {} layers, {} embedding, {} heads ({} for keys and values)",
        opt(f.layers),
        opt(f.embedding_length),
        opt(f.head_count),
        opt(f.head_count_kv)
    );
    if let Some(b) = f.kv_bytes(1) {
        println!("kv cache       {} bytes per token (f16)", b);
    }
    println!(
        "chat template  {}",
        if f.has_chat_template {
            "yes (in the file)"
        } else {
            "no"
        }
    );
    println!(
        "metadata       {} keys, {} tensors",
        f.metadata_keys, f.tensors
    );
    Ok(())
}

fn list(dir: &Path) -> Result<()> {
    let (families, errors) =
        family::list(dir).with_context(|| format!("listing {}", dir.display()))?;
    if families.is_empty() && errors.is_empty() {
        println!("no models in {} (run scripts/setup.sh)", dir.display());
    }
    for fam in &families {
        println!(
            "{} ({} file{})",
            fam.name,
            fam.files.len(),
            if fam.files.len() == 1 { "" } else { "s" }
        );
        for f in &fam.files {
            println!(
                "  {:<8} {:<10} {:>10}  {}",
                f.facts.quant,
                tier_of(&f.facts.quant).map_or("-", |t| t.name()),
                human(f.size_bytes),
                f.path.display()
            );
        }
    }
    for e in &errors {
        eprintln!("skipped: {e}");
    }
    Ok(())
}
