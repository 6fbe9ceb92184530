//! zavod-store: conversation memory.
//!
//! A conversation belongs to the key that holds it (the client's public
//! key) and a client-chosen [`ConversationId`]; one client can never read
//! another's. [`SledStore`] keeps each conversation in its own sled tree, turns
//! keyed by a big-endian sequence number so iteration is in order, and
//! flushes after every append so an answered turn survives a crash.
//! [`MemStore`] is its in-memory twin with the same behaviour (one test suite
//! runs against both).
//!
//! Bounds: at most [`MAX_TURNS_PER_CONVERSATION`] turns are kept per
//! conversation (oldest dropped first); reads return at most what is asked.

#![warn(unreachable_pub)]

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use zavod_proto::NodeId;
use zavod_proto::chat::prompt::Turn;
use zavod_proto::ids::ConversationId;

/// Turns kept per conversation; older ones are dropped.
pub const MAX_TURNS_PER_CONVERSATION: usize = 2_000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("memory database at {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: sled::Error,
    },
    #[error("memory database: {0}")]
    Db(#[from] sled::Error),
    #[error("memory database is poisoned by an earlier panic")]
    Poisoned,
}

/// Whose conversation: the holder's key and the conversation's name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConvKey {
    pub owner: NodeId,
    pub conversation: ConversationId,
}

impl ConvKey {
    fn tree_name(&self) -> String {
        format!("conv/{}/{}", self.owner.to_hex(), self.conversation)
    }
}

/// Conversation memory as the MemoryKeeper uses it.
pub trait ConversationStore: Send + Sync {
    /// Appends turns at the end, durably.
    fn append(&self, key: &ConvKey, turns: &[Turn]) -> Result<(), StoreError>;
    /// The last `max_turns` turns, oldest first.
    fn recent(&self, key: &ConvKey, max_turns: usize) -> Result<Vec<Turn>, StoreError>;
    /// Number of turns stored (in a sled store, the span of their sequence
    /// numbers, found without a scan: more only where records were lost).
    fn len(&self, key: &ConvKey) -> Result<usize, StoreError>;
    fn is_empty(&self, key: &ConvKey) -> Result<bool, StoreError> {
        Ok(self.len(key)? == 0)
    }
    /// Forgets a conversation.
    fn clear(&self, key: &ConvKey) -> Result<(), StoreError>;
}

#[derive(Serialize, Deserialize)]
struct StoredTurn(Turn);

/// sled-backed memory.
pub struct SledStore {
    db: sled::Db,
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SledStore")
    }
}

impl SledStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .open()
            .map_err(|source| StoreError::Open {
                path: path.display().to_string(),
                source,
            })?;
        Ok(SledStore { db })
    }

    fn tree(&self, key: &ConvKey) -> Result<sled::Tree, StoreError> {
        Ok(self.db.open_tree(key.tree_name())?)
    }

    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}

fn decode_turn(key: &ConvKey, raw: &[u8]) -> Option<Turn> {
    match zavod_proto::wire::decode_unversioned::<StoredTurn>(raw) {
        Ok(t) => Some(t.0),
        Err(e) => {
            // A damaged record is skipped, not fatal: the rest of the
            // conversation stays usable.
            tracing::warn!(conversation = %key.conversation, error = %e, "skipping an unreadable turn");
            None
        }
    }
}

impl ConversationStore for SledStore {
    fn append(&self, key: &ConvKey, turns: &[Turn]) -> Result<(), StoreError> {
        let tree = self.tree(key)?;
        let (first, mut next) = span(&tree)?;
        let mut batch = sled::Batch::default();
        for t in turns {
            let bytes = zavod_proto::wire::encode_unversioned(&StoredTurn(t.clone()));
            batch.insert(&next.to_be_bytes(), bytes);
            next = next.saturating_add(1);
        }
        tree.apply_batch(batch)?;
        // Counted from the first and next keys, not by a scan: appending
        // stays as cheap on the thousandth turn as on the first. Kept: the
        // turns among the last MAX_TURNS_PER_CONVERSATION sequence numbers.
        let mut first = first;
        while next.saturating_sub(first) > MAX_TURNS_PER_CONVERSATION as u64 {
            tree.pop_min()?;
            first = span(&tree)?.0;
        }
        tree.flush()?;
        Ok(())
    }

    fn recent(&self, key: &ConvKey, max_turns: usize) -> Result<Vec<Turn>, StoreError> {
        let tree = self.tree(key)?;
        let mut out = Vec::new();
        for item in tree.iter().rev().take(max_turns) {
            let (_, v) = item?;
            if let Some(t) = decode_turn(key, &v) {
                out.push(t);
            }
        }
        out.reverse();
        Ok(out)
    }

    fn len(&self, key: &ConvKey) -> Result<usize, StoreError> {
        let (first, next) = span(&self.tree(key)?)?;
        Ok(usize::try_from(next - first).unwrap_or(usize::MAX))
    }

    fn clear(&self, key: &ConvKey) -> Result<(), StoreError> {
        self.db.drop_tree(key.tree_name())?;
        Ok(())
    }
}

/// The first turn's key and the key the next turn gets. Turns are keyed by
/// consecutive sequence numbers (appends take the next one, trimming pops
/// the smallest), so `next - first` is how many are held.
fn span(tree: &sled::Tree) -> Result<(u64, u64), StoreError> {
    let seq = |k: &[u8]| k.try_into().map(u64::from_be_bytes).unwrap_or(0);
    let first = tree.first()?.map_or(0, |(k, _)| seq(&k));
    let next = tree
        .last()?
        .map_or(first, |(k, _)| seq(&k).saturating_add(1));
    Ok((first, next.max(first)))
}

/// In-memory memory with the same behaviour as [`SledStore`].
#[derive(Debug, Default)]
pub struct MemStore {
    convs: Mutex<BTreeMap<ConvKey, Vec<Turn>>>,
}

impl ConversationStore for MemStore {
    fn append(&self, key: &ConvKey, turns: &[Turn]) -> Result<(), StoreError> {
        let mut m = self.convs.lock().map_err(|_| StoreError::Poisoned)?;
        let v = m.entry(key.clone()).or_default();
        v.extend_from_slice(turns);
        let excess = v.len().saturating_sub(MAX_TURNS_PER_CONVERSATION);
        v.drain(..excess);
        Ok(())
    }

    fn recent(&self, key: &ConvKey, max_turns: usize) -> Result<Vec<Turn>, StoreError> {
        let m = self.convs.lock().map_err(|_| StoreError::Poisoned)?;
        Ok(m.get(key)
            .map(|v| v[v.len().saturating_sub(max_turns)..].to_vec())
            .unwrap_or_default())
    }

    fn len(&self, key: &ConvKey) -> Result<usize, StoreError> {
        let m = self.convs.lock().map_err(|_| StoreError::Poisoned)?;
        Ok(m.get(key).map_or(0, Vec::len))
    }

    fn clear(&self, key: &ConvKey) -> Result<(), StoreError> {
        let mut m = self.convs.lock().map_err(|_| StoreError::Poisoned)?;
        m.remove(key);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zavod_proto::chat::prompt::Role;

    fn key(owner: u8, c: &str) -> ConvKey {
        ConvKey {
            owner: NodeId([owner; 32]),
            conversation: ConversationId::parse(c).expect("valid"),
        }
    }

    fn turn(i: usize) -> Turn {
        Turn {
            role: if i.is_multiple_of(2) {
                Role::User
            } else {
                Role::Assistant
            },
            text: format!("turn {i}"),
            tokens: i as u32,
        }
    }

    /// The behaviour both stores must share.
    fn suite(s: &dyn ConversationStore) {
        let a = key(1, "chat");
        let b = key(2, "chat");
        assert!(s.is_empty(&a).expect("len"));
        s.append(&a, &[turn(0), turn(1)]).expect("append");
        s.append(&a, &[turn(2)]).expect("append");
        assert_eq!(
            s.recent(&a, 10).expect("read"),
            vec![turn(0), turn(1), turn(2)]
        );
        assert_eq!(s.recent(&a, 2).expect("read"), vec![turn(1), turn(2)]);
        assert!(
            s.recent(&b, 10).expect("read").is_empty(),
            "owners are apart"
        );
        s.clear(&a).expect("clear");
        assert_eq!(s.len(&a).expect("len"), 0);
        let many: Vec<Turn> = (0..MAX_TURNS_PER_CONVERSATION + 5).map(turn).collect();
        s.append(&a, &many).expect("append");
        assert_eq!(s.len(&a).expect("len"), MAX_TURNS_PER_CONVERSATION);
        assert_eq!(
            s.recent(&a, 1).expect("read"),
            vec![turn(MAX_TURNS_PER_CONVERSATION + 4)]
        );
        assert_eq!(s.recent(&a, usize::MAX).expect("read")[0], turn(5));
    }

    #[test]
    fn mem_store_behaves() {
        suite(&MemStore::default());
    }

    #[test]
    fn sled_store_behaves_and_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let s = SledStore::open(dir.path()).expect("open");
            suite(&s);
            s.append(&key(3, "kept"), &[turn(0), turn(1)])
                .expect("append");
        }
        let s = SledStore::open(dir.path()).expect("reopen");
        assert_eq!(
            s.recent(&key(3, "kept"), 10).expect("read"),
            vec![turn(0), turn(1)]
        );
    }

    #[test]
    fn unreadable_records_are_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = SledStore::open(dir.path()).expect("open");
        let k = key(4, "x");
        s.append(&k, &[turn(0)]).expect("append");
        s.tree(&k)
            .expect("tree")
            .insert(99u64.to_be_bytes(), &b"\xff\xff garbage"[..])
            .expect("insert");
        s.append(&k, &[turn(2)]).expect("append");
        assert_eq!(s.recent(&k, 10).expect("read"), vec![turn(0), turn(2)]);
    }

    #[test]
    fn an_unopenable_path_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").expect("write");
        let err = SledStore::open(&file.join("db")).expect_err("cannot open under a file");
        assert!(err.to_string().contains("file"), "{err}");
    }
}
