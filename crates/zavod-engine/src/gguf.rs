//! What a GGUF file says about itself, read from its metadata by llama.cpp's
//! own reader without loading any weights: architecture, quantization (the
//! file's `general.file_type`, never guessed from its name), shape, and the
//! figures the node needs to size a KV cache before it loads the model.
//!
//! Values are read only after their stored type is checked: llama.cpp's
//! typed getters abort the process on a type mismatch, and a model file is
//! input from anywhere.

use crate::EngineError;
use llama_cpp_2::gguf::GgufContext;
use std::path::Path;

// GGUF value types (gguf.h); stable across GGUF versions 2 and 3.
const TYPE_UINT32: i64 = 4;
const TYPE_INT32: i64 = 5;
const TYPE_STRING: i64 = 8;
const TYPE_UINT64: i64 = 10;

/// Facts read from a GGUF file's metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufFacts {
    pub architecture: String,
    /// `general.name`, when the file has one.
    pub name: Option<String>,
    /// `general.size_label` (e.g. "135M"), when the file has one.
    pub size_label: Option<String>,
    /// `general.file_type`: llama.cpp's number for the quantization.
    pub file_type: Option<u32>,
    /// The quantization's name from `file_type` ("Q4_K_M"), or "unknown".
    pub quant: String,
    pub context_length: Option<u64>,
    pub layers: Option<u64>,
    pub embedding_length: Option<u64>,
    pub head_count: Option<u64>,
    pub head_count_kv: Option<u64>,
    pub key_length: Option<u64>,
    pub value_length: Option<u64>,
    pub has_chat_template: bool,
    pub metadata_keys: i64,
    pub tensors: i64,
}

impl GgufFacts {
    /// Bytes of an f16 KV cache for `tokens` positions, from the attention
    /// shape (keys and values of every layer). `None` when the file does
    /// not give the shape. Sliding-window layers are counted whole: an
    /// estimate for choosing a file must not fall short.
    pub fn kv_bytes(&self, tokens: u64) -> Option<u64> {
        let layers = self.layers?;
        let heads = self.head_count?;
        let kv_heads = self.head_count_kv.unwrap_or(heads);
        let head_dim = self.embedding_length? / heads.max(1);
        let k = self.key_length.unwrap_or(head_dim);
        let v = self.value_length.unwrap_or(head_dim);
        Some(
            tokens
                .saturating_mul(layers)
                .saturating_mul(kv_heads.saturating_mul(k + v))
                .saturating_mul(2),
        )
    }
}

/// llama.cpp's quantization name for a `general.file_type` (llama.h's
/// `llama_ftype`; the numbers are part of the file format).
pub fn quant_name(file_type: u32) -> Option<&'static str> {
    Some(match file_type {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        38 => "MXFP4_MOE",
        _ => return None,
    })
}

/// The `general.file_type` number for a quantization name (any case).
pub fn file_type_of(quant: &str) -> Option<u32> {
    (0..64).find(|&n| quant_name(n).is_some_and(|q| q.eq_ignore_ascii_case(quant)))
}

/// Reads `path`'s metadata. The file is checked first (exists, is GGUF),
/// so a wrong path gets an error naming the problem.
pub fn read_facts(path: &Path) -> Result<GgufFacts, EngineError> {
    crate::llama::check_model_file(path)?;
    // Routes llama.cpp's own complaints about the file into our log.
    crate::llama::backend()?;
    let ctx = GgufContext::from_file(path).ok_or_else(|| EngineError::ModelFile {
        path: path.display().to_string(),
        reason: "llama.cpp cannot read its metadata (truncated or corrupt GGUF)".into(),
    })?;
    let architecture = string(&ctx, "general.architecture").unwrap_or_else(|| "unknown".into());
    let arch_key = |k: &str| format!("{architecture}.{k}");
    let file_type = number(&ctx, "general.file_type").and_then(|n| u32::try_from(n).ok());
    Ok(GgufFacts {
        name: string(&ctx, "general.name"),
        size_label: string(&ctx, "general.size_label"),
        file_type,
        quant: file_type
            .and_then(quant_name)
            .unwrap_or("unknown")
            .to_string(),
        context_length: number(&ctx, &arch_key("context_length")),
        layers: number(&ctx, &arch_key("block_count")),
        embedding_length: number(&ctx, &arch_key("embedding_length")),
        head_count: number(&ctx, &arch_key("attention.head_count")),
        head_count_kv: number(&ctx, &arch_key("attention.head_count_kv")),
        key_length: number(&ctx, &arch_key("attention.key_length")),
        value_length: number(&ctx, &arch_key("attention.value_length")),
        has_chat_template: ctx.find_key("tokenizer.chat_template") >= 0,
        metadata_keys: ctx.n_kv(),
        tensors: ctx.n_tensors(),
        architecture,
    })
}

fn string(ctx: &GgufContext, key: &str) -> Option<String> {
    let i = ctx.find_key(key);
    if i < 0 || i64::from(ctx.kv_type(i)) != TYPE_STRING {
        return None;
    }
    ctx.val_str(i).map(str::to_owned)
}

/// An integer value of any of the widths models use for counts; other
/// types (arrays per layer, floats) read as absent.
fn number(ctx: &GgufContext, key: &str) -> Option<u64> {
    let i = ctx.find_key(key);
    if i < 0 {
        return None;
    }
    match i64::from(ctx.kv_type(i)) {
        TYPE_UINT32 => Some(u64::from(ctx.val_u32(i))),
        TYPE_INT32 => u64::try_from(ctx.val_i32(i)).ok(),
        TYPE_UINT64 => Some(ctx.val_u64(i)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quant_names_round_trip_through_file_types() {
        assert_eq!(quant_name(15), Some("Q4_K_M"));
        assert_eq!(quant_name(3), Some("Q4_1"));
        assert_eq!(quant_name(4), None, "retired file type");
        for n in 0..64 {
            if let Some(q) = quant_name(n) {
                assert_eq!(file_type_of(q), Some(n));
                assert_eq!(file_type_of(&q.to_lowercase()), Some(n));
            }
        }
        assert_eq!(file_type_of("Q9_Z"), None);
    }

    #[test]
    fn kv_bytes_follow_the_attention_shape() {
        let f = GgufFacts {
            architecture: "llama".into(),
            name: None,
            size_label: None,
            file_type: Some(3),
            quant: "Q4_1".into(),
            context_length: Some(8192),
            layers: Some(30),
            embedding_length: Some(576),
            head_count: Some(9),
            head_count_kv: Some(3),
            key_length: None,
            value_length: None,
            has_chat_template: true,
            metadata_keys: 0,
            tensors: 0,
        };
        // 30 layers × 3 kv heads × (64 + 64) × 2 bytes = 23,040 per token.
        assert_eq!(f.kv_bytes(1), Some(23_040));
        assert_eq!(f.kv_bytes(4096), Some(23_040 * 4096));
        let no_shape = GgufFacts { layers: None, ..f };
        assert_eq!(no_shape.kv_bytes(1), None);
    }

    #[test]
    fn files_that_are_not_gguf_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("x.gguf");
        std::fs::write(&p, b"GGUF\x03\x00\x00\x00 truncated").expect("write");
        let e = read_facts(&p).expect_err("corrupt");
        assert!(e.to_string().contains("cannot read its metadata"), "{e}");
        let e = read_facts(&dir.path().join("missing.gguf")).expect_err("missing");
        assert!(e.to_string().contains("missing.gguf"), "{e}");
    }
}
