//! Fuzzes `zavod_proto::fuzz::grants` (see there for what it decodes and checks).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| zavod_proto::fuzz::grants(data));
