//! The decoder of this user input, for fuzzing: arbitrary bytes read as a
//! mesh-config profile the way `zavod node --config FILE` reads one, then
//! checked, then the derived settings the node builds from it. The
//! `config` cargo-fuzz target (`crates/zavod-fuzz`) calls [`config`], and
//! this crate's tests run it over the committed corpus and seeded
//! mutations of the shipped profiles on every test run.
//!
//! Invariant: [`config`] is total. It reads no file the profile names
//! (`node.psk_file`, model paths): what it covers is text in, a config or
//! an error out.

use crate::{ConfigError, NodeConfig};

/// Parses and checks `data` as a profile; every outcome but a panic is
/// fine. Errors must say something, and a parse error names its source.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_and_check(text) {
        Ok(c) => {
            let _ = c.scoring.placer(c.gossip.interval_ms);
            let _ = c.admission.net();
            let _ = c.data_dir();
        }
        Err(e) => {
            let m = e.to_string();
            assert!(!m.trim().is_empty(), "an empty error");
            if let ConfigError::Parse { .. } = e {
                assert!(
                    m.contains("fuzzed.toml"),
                    "a parse error names its source: {m}"
                );
            }
        }
    }
}

/// What a node does with a profile before it starts anything.
pub fn parse_and_check(text: &str) -> Result<NodeConfig, ConfigError> {
    let c = NodeConfig::from_toml(text, "fuzzed.toml")?;
    c.check()?;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    fn corpus() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../zavod-fuzz/corpus/config")
    }

    /// The committed corpus holds every shipped profile (so a fuzzing
    /// session starts from real ones), and each input in it runs through
    /// the target. `ZAVOD_FUZZ_WRITE_CORPUS=1` copies the profiles in.
    #[test]
    fn the_corpus_holds_the_shipped_profiles_and_runs_through_the_target() {
        let profiles = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../mesh-config");
        let dir = corpus();
        if std::env::var_os("ZAVOD_FUZZ_WRITE_CORPUS").is_some() {
            std::fs::create_dir_all(&dir).expect("corpus dir");
            for e in std::fs::read_dir(&profiles).expect("mesh-config") {
                let p = e.expect("entry").path();
                let name = p.file_name().expect("name");
                std::fs::copy(&p, dir.join(name)).expect("copy");
            }
        }
        let mut held: Vec<Vec<u8>> = Vec::new();
        for e in std::fs::read_dir(&dir).expect("crates/zavod-fuzz/corpus/config") {
            let bytes = std::fs::read(e.expect("entry").path()).expect("read");
            config(&bytes);
            held.push(bytes);
        }
        for e in std::fs::read_dir(&profiles).expect("mesh-config") {
            let p = e.expect("entry").path();
            let text = std::fs::read(&p).expect("read");
            assert!(
                held.contains(&text),
                "{} is not in the config corpus as it is now; run this test with ZAVOD_FUZZ_WRITE_CORPUS=1",
                p.display()
            );
        }
    }
}
