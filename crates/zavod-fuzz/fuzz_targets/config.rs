//! Fuzzes `zavod_config::fuzz::config`: bytes read as a mesh-config
//! profile, parsed and checked as `zavod node --config FILE` does.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| zavod_config::fuzz::config(data));
