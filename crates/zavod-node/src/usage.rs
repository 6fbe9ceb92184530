//! The usage ledger on disk (`DATA_DIR/usage`): this entry's totals per
//! credential and the ones other entries reported, so a restarted node
//! neither forgets what a credential spent here nor, until those entries
//! report again, what it spent elsewhere. One line per (entry, credential):
//! `ENTRY_KEY CREDENTIAL_ID CHARGED RELEASED REQUESTS EXPIRES_AT_MS`.
//!
//! Invariants: the file is rewritten atomically by one saver task, at most
//! once per [`SAVE_EVERY`], always with the ledger's latest export (a
//! crash loses at most that long of counting); a line that does not parse
//! is skipped with a warning.

use crate::datadir::{DataDirError, write_file};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::watch;
use zavod_proto::NodeId;
use zavod_proto::trust::{UsageCount, hex16, parse_hex16};

/// The file, in the data directory.
pub(crate) const USAGE_FILE: &str = "usage";
/// How often the file is rewritten at most.
const SAVE_EVERY: Duration = Duration::from_secs(1);

/// A ledger's export: (entry, its totals for one credential).
pub(crate) type Counts = Vec<(NodeId, UsageCount)>;

pub(crate) fn load(dir: &Path) -> Result<Counts, DataDirError> {
    let path = dir.join(USAGE_FILE);
    let text = crate::datadir::read_if_present(&path)?;
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match parse_line(line) {
            Some(c) => out.push(c),
            None => tracing::warn!(file = %path.display(), line, "skipping an unreadable line"),
        }
    }
    Ok(out)
}

fn parse_line(line: &str) -> Option<(NodeId, UsageCount)> {
    let mut f = line.split_whitespace();
    let entry = NodeId::from_hex(f.next()?).ok()?;
    let credential = parse_hex16(f.next()?)?;
    let charged = f.next()?.parse().ok()?;
    let released = f.next()?.parse().ok()?;
    let requests = f.next()?.parse().ok()?;
    let expires_at_ms = f.next()?.parse().ok()?;
    Some((
        entry,
        UsageCount {
            credential,
            charged,
            released,
            requests,
            expires_at_ms,
        },
    ))
}

fn save(path: &Path, counts: &Counts) -> Result<(), DataDirError> {
    let mut text = String::from(
        "# Tokens charged and released per credential, by entry (zavod keeps this file).\n",
    );
    for (entry, c) in counts {
        text.push_str(&format!(
            "{} {} {} {} {} {}\n",
            entry.to_hex(),
            hex16(&c.credential),
            c.charged,
            c.released,
            c.requests,
            c.expires_at_ms
        ));
    }
    write_file(path, &text, false)
}

/// Starts the saver task for `dir`; the Router sends it each new export.
/// It ends when the sender is dropped (the Router stopped), after saving
/// what it was last sent.
pub(crate) fn saver(dir: &Path) -> watch::Sender<Counts> {
    let (tx, mut rx) = watch::channel(Counts::new());
    let path: PathBuf = dir.join(USAGE_FILE);
    tokio::spawn(async move {
        // `changed` yields a value not yet seen even after the sender is
        // gone, and fails only once there is none: nothing is lost, and an
        // empty ledger never overwrites the file.
        while rx.changed().await.is_ok() {
            let counts = rx.borrow_and_update().clone();
            let path = path.clone();
            let saved = tokio::task::spawn_blocking(move || save(&path, &counts)).await;
            match saved {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e,
                    "cannot record credential usage on disk; budgets are still enforced from \
                     memory, but a restart would forget the spending since the last save"),
                Err(e) => tracing::error!(error = %e, "the usage saver failed"),
            }
            tokio::time::sleep(SAVE_EVERY).await;
        }
    });
    tx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_survive_a_save_and_a_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = |n: u8| UsageCount {
            credential: [n; 16],
            charged: 100 + u64::from(n),
            released: 7,
            requests: 3,
            expires_at_ms: 9_999_999,
        };
        let counts = vec![(NodeId([1; 32]), c(1)), (NodeId([2; 32]), c(2))];
        save(&dir.path().join(USAGE_FILE), &counts).expect("save");
        assert_eq!(load(dir.path()).expect("load"), counts);
        std::fs::write(dir.path().join(USAGE_FILE), "junk line\n").expect("write");
        assert!(load(dir.path()).expect("load").is_empty());
    }
}
