//! Making a family's smaller files: llama.cpp's own quantizer
//! (`llama_model_quantize`, the code behind its `llama-quantize` tool),
//! called in-process. Requantizing an already quantized file is allowed,
//! as the development models come quantized only.
//!
//! The only unsafe code in zavod's engine wrapper outside llama-cpp-2 is
//! here: llama-cpp-2 has no safe call for quantizing.
#![allow(unsafe_code)]

use crate::EngineError;
use crate::gguf::{file_type_of, quant_name};
use std::ffi::CString;
use std::path::Path;

/// Writes `src` quantized to `quant` (a name such as "Q4_K_M") at `out`,
/// with `threads` CPU threads (0: all cores). Checks its inputs first so
/// that every refusal names what is wrong.
pub fn quantize(src: &Path, out: &Path, quant: &str, threads: u32) -> Result<(), EngineError> {
    crate::llama::check_model_file(src)?;
    let file_type = file_type_of(quant).ok_or_else(|| {
        let known: Vec<&str> = (0..64).filter_map(quant_name).collect();
        EngineError::Config(format!(
            "unknown quantization {quant:?}; llama.cpp knows {}",
            known.join(", ")
        ))
    })?;
    if out.exists() && std::fs::canonicalize(out).ok() == std::fs::canonicalize(src).ok() {
        return Err(EngineError::Config(
            "the output would overwrite the source file".into(),
        ));
    }
    let c_path = |p: &Path| {
        p.to_str()
            .and_then(|s| CString::new(s).ok())
            .ok_or_else(|| EngineError::ModelFile {
                path: p.display().to_string(),
                reason: "the path is not valid UTF-8 or holds a NUL byte".into(),
            })
    };
    let (c_src, c_out) = (c_path(src)?, c_path(out)?);
    crate::llama::backend()?;
    // SAFETY: the default parameters come from llama.cpp itself; we set
    // plain fields only and leave every pointer field as it gave them
    // (null). Both paths are NUL-terminated and outlive the call, which
    // reads them and returns; llama.cpp keeps no pointer to them.
    let rc = unsafe {
        let mut params = llama_cpp_sys_2::llama_model_quantize_default_params();
        params.nthread = i32::try_from(crate::llama::resolve_threads(threads)).unwrap_or(1);
        params.ftype = file_type as llama_cpp_sys_2::llama_ftype;
        params.allow_requantize = true;
        llama_cpp_sys_2::llama_model_quantize(c_src.as_ptr(), c_out.as_ptr(), &params)
    };
    if rc != 0 {
        let _ = std::fs::remove_file(out);
        return Err(EngineError::Load {
            path: src.display().to_string(),
            reason: format!(
                "llama.cpp could not quantize it to {quant} (see the log above; \
                 the IQ1/IQ2 types need an importance matrix, which zavod does not make)"
            ),
        });
    }
    Ok(())
}
