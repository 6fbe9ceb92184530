//! Fuzzes `zavod_proto::fuzz::invites` (see there for what it decodes and checks).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| zavod_proto::fuzz::invites(data));
