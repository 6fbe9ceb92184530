//! A private mesh's pre-shared key: libp2p's private-network transport
//! (`pnet`) encrypts every TCP connection with it before anything else is
//! said, so a machine without the key cannot even start a handshake. It
//! covers TCP only, so a node with a key runs without QUIC.
//!
//! The key file is the common three-line form (`/key/swarm/psk/1.0.0/`,
//! `/base16/`, 64 hex digits) that `zavod mesh psk` writes, readable by
//! its owner only.

use crate::NetError;
use libp2p::pnet::PreSharedKey;
use std::io::Read;
use std::path::Path;

/// A fresh key in its file form.
pub fn generate() -> Result<String, NetError> {
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).map_err(|e| NetError::Setup(format!("no randomness: {e}")))?;
    Ok(format!("{}\n", PreSharedKey::new(key)))
}

/// Reads the key at `path`, saying what is wrong with the file if it is not
/// one.
pub fn read(path: &Path) -> Result<PreSharedKey, NetError> {
    let cannot = |e: std::io::Error| {
        NetError::Setup(format!(
            "cannot read the mesh key file {}: {e} (make one with `zavod mesh psk --out FILE`)",
            path.display()
        ))
    };
    // A key file is about 100 bytes; reading at most this much keeps a
    // config naming /dev/zero or a huge file from taking the memory.
    let mut text = String::new();
    std::fs::File::open(path)
        .map_err(cannot)?
        .take(4096)
        .read_to_string(&mut text)
        .map_err(cannot)?;
    text.trim().parse::<PreSharedKey>().map_err(|e| {
        NetError::Setup(format!(
            "{} is not a mesh key ({e}); `zavod mesh psk --out FILE` writes one",
            path.display()
        ))
    })
}

/// What a failed handshake most likely means, given whether this node
/// has a key.
pub(crate) fn handshake_hint(has_key: bool) -> &'static str {
    if has_key {
        "this node uses a mesh key, so the other node most likely has a different key or none (every node of a private mesh needs the same --psk-file)"
    } else {
        "if the other node uses a mesh key, this one needs the same key (--psk-file)"
    }
}

/// What a connection that timed out may mean, given whether this node has
/// a key.
pub(crate) fn timeout_hint(has_key: bool) -> &'static str {
    if has_key {
        "since this node uses a mesh key, the other node may have a different key or none (every node of a private mesh needs the same --psk-file)"
    } else {
        "if the other node uses a mesh key, this one needs the same key (--psk-file)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_reads_back_and_a_bad_file_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mesh.psk");
        let text = generate().expect("a key");
        assert!(
            text.starts_with("/key/swarm/psk/1.0.0/\n/base16/\n"),
            "{text}"
        );
        std::fs::write(&path, &text).expect("write");
        let key = read(&path).expect("reads back");
        assert_eq!(format!("{key}\n"), text);
        assert_ne!(generate().expect("another"), text, "fresh each time");
        std::fs::write(&path, "not a key").expect("write");
        let e = read(&path).expect_err("garbage").to_string();
        assert!(e.contains("is not a mesh key"), "{e}");
        let e = read(&dir.path().join("missing"))
            .expect_err("missing")
            .to_string();
        assert!(e.contains("zavod mesh psk"), "{e}");
        // A file that never ends is read only as far as a key could go.
        let e = read(Path::new("/dev/zero")).expect_err("zeros").to_string();
        assert!(e.contains("/dev/zero"), "{e}");
    }
}
