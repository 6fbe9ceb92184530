//! zavod-store: conversation memory.
//!
//! A conversation belongs to the key that holds it (the client's public
//! key) and a client-chosen [`ConversationId`]; one client can never read
//! another's. [`SledStore`] keeps each conversation in its own sled tree, turns
//! keyed by a big-endian sequence number so iteration is in order; an
//! append is durable once the store syncs, and [`GroupWriter`] makes one
//! sync serve every append waiting for it, so an answered turn survives a
//! crash without each turn paying for its own fsync.
//! [`MemStore`] is its in-memory twin with the same behaviour (one test suite
//! runs against both).
//!
//! Bounds: at most [`MAX_TURNS_PER_CONVERSATION`] turns are kept per
//! conversation (oldest dropped first); an owner holds at most the store's
//! conversation cap (a new one past it is refused, naming the cap); reads
//! return at most what is asked, and an export page at most its bytes.
//!
//! Invariants: reading never creates storage (a conversation exists once
//! a turn was appended to it); an index of each owner's conversations is
//! kept beside the turns, so listing, counting and deleting one owner's
//! conversations never scans another's.

#![warn(unreachable_pub)]

mod group;
pub use group::{Busy, GroupWriter};

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use zavod_proto::NodeId;
use zavod_proto::chat::prompt::Turn;
use zavod_proto::ids::ConversationId;

/// Turns kept per conversation; older ones are dropped.
pub const MAX_TURNS_PER_CONVERSATION: usize = 2_000;

/// Conversations one owner may hold unless the store is opened with
/// another cap (`memory.max_conversations_per_holder`).
pub const DEFAULT_MAX_CONVERSATIONS: usize = 1_000;

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
    #[error("memory database could not write to disk: {0}")]
    Sync(String),
    #[error(
        "this credential's holder already keeps {held} conversations on this node, the most it \
         keeps for one holder (memory.max_conversations_per_holder = {max}); delete one \
         (zavod memory delete --conversation ID) or continue an existing one"
    )]
    TooManyConversations { held: usize, max: usize },
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

    /// The key in the index of conversations: owner, then name, so one
    /// owner's conversations are one prefix.
    fn index_key(&self) -> Vec<u8> {
        let mut k = self.owner.0.to_vec();
        k.extend_from_slice(self.conversation.as_str().as_bytes());
        k
    }

    /// The key a tree name stands for (`conv/OWNER_HEX/NAME`).
    fn from_tree_name(name: &[u8]) -> Option<ConvKey> {
        let rest = std::str::from_utf8(name).ok()?.strip_prefix("conv/")?;
        let (owner, conversation) = rest.split_once('/')?;
        Some(ConvKey {
            owner: NodeId::from_hex(owner).ok()?,
            conversation: ConversationId::parse(conversation).ok()?,
        })
    }
}

/// One page of an export: turns in order, and where the next page starts
/// (`None`: that was the last).
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    pub turns: Vec<Turn>,
    pub next: Option<u64>,
}

/// Conversation memory as the MemoryKeeper uses it.
pub trait ConversationStore: Send + Sync {
    /// Appends turns at the end, durably.
    fn append(&self, key: &ConvKey, turns: &[Turn]) -> Result<(), StoreError> {
        self.append_deferred(key, turns)?;
        self.sync()
    }
    /// Appends turns at the end, visible to reads at once and durable at
    /// the next [`ConversationStore::sync`] ([`GroupWriter`] makes one
    /// sync serve many appends).
    fn append_deferred(&self, key: &ConvKey, turns: &[Turn]) -> Result<(), StoreError>;
    /// Makes every append so far durable.
    fn sync(&self) -> Result<(), StoreError>;
    /// The last `max_turns` turns, oldest first.
    fn recent(&self, key: &ConvKey, max_turns: usize) -> Result<Vec<Turn>, StoreError>;
    /// Number of turns stored (in a sled store, the span of their sequence
    /// numbers, found without a scan: more only where records were lost).
    fn len(&self, key: &ConvKey) -> Result<usize, StoreError>;
    fn is_empty(&self, key: &ConvKey) -> Result<bool, StoreError> {
        Ok(self.len(key)? == 0)
    }
    /// Whether the owner holds this conversation.
    fn contains(&self, key: &ConvKey) -> Result<bool, StoreError>;
    /// The owner's conversations, by name.
    fn conversations(&self, owner: &NodeId) -> Result<Vec<ConversationId>, StoreError>;
    /// Turns from the `from`-th kept one (0: the oldest kept), as many as
    /// fit `max_bytes` of text (always at least one, so a page advances).
    fn page(&self, key: &ConvKey, from: u64, max_bytes: usize) -> Result<Page, StoreError>;
    /// Forgets a conversation; whether it was held.
    fn clear(&self, key: &ConvKey) -> Result<bool, StoreError>;
    /// Whether one more conversation would pass the owner's cap: the error
    /// to give, before any work is done for a request that would create it.
    fn check_room(&self, key: &ConvKey) -> Result<(), StoreError>;
}

/// Fills a page from turns in order, stopping before `max_bytes` of text.
fn fill_page(turns: impl Iterator<Item = Turn>, from: u64, max_bytes: usize) -> Page {
    let mut out = Vec::new();
    let mut bytes = 0usize;
    let mut turns = turns.peekable();
    while let Some(t) = turns.peek() {
        if !out.is_empty() && bytes.saturating_add(t.text.len()) > max_bytes {
            break;
        }
        bytes = bytes.saturating_add(t.text.len());
        if let Some(t) = turns.next() {
            out.push(t);
        }
    }
    let more = turns.peek().is_some();
    let next = more.then(|| from.saturating_add(out.len() as u64));
    Page { turns: out, next }
}

#[derive(Serialize, Deserialize)]
struct StoredTurn(Turn);

/// sled-backed memory.
pub struct SledStore {
    db: sled::Db,
    /// Owner ‖ conversation name → nothing: which conversations exist.
    index: sled::Tree,
    max_conversations: usize,
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SledStore")
    }
}

impl SledStore {
    /// Opens (or creates) the database at `path`; each owner may hold at
    /// most `max_conversations` conversations.
    pub fn open(path: &Path, max_conversations: usize) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .open()
            .map_err(|source| StoreError::Open {
                path: path.display().to_string(),
                source,
            })?;
        let index = db.open_tree("conversations")?;
        let store = SledStore {
            db,
            index,
            max_conversations,
        };
        store.index_older_conversations()?;
        Ok(store)
    }

    /// A database written before the index existed has conversation trees
    /// and no index: index them once.
    fn index_older_conversations(&self) -> Result<(), StoreError> {
        if !self.index.is_empty() {
            return Ok(());
        }
        for name in self.db.tree_names() {
            if let Some(key) = ConvKey::from_tree_name(&name) {
                self.index.insert(key.index_key(), &[])?;
            }
        }
        Ok(())
    }

    /// The conversation's tree, if it exists (opening a tree creates it).
    fn existing(&self, key: &ConvKey) -> Result<Option<sled::Tree>, StoreError> {
        if self.index.contains_key(key.index_key())? {
            Ok(Some(self.tree(key)?))
        } else {
            Ok(None)
        }
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
    fn sync(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    fn append_deferred(&self, key: &ConvKey, turns: &[Turn]) -> Result<(), StoreError> {
        if !self.index.contains_key(key.index_key())? {
            self.check_room(key)?;
            self.index.insert(key.index_key(), &[])?;
        }
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
        Ok(())
    }

    fn recent(&self, key: &ConvKey, max_turns: usize) -> Result<Vec<Turn>, StoreError> {
        let Some(tree) = self.existing(key)? else {
            return Ok(Vec::new());
        };
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
        let Some(tree) = self.existing(key)? else {
            return Ok(0);
        };
        let (first, next) = span(&tree)?;
        Ok(usize::try_from(next - first).unwrap_or(usize::MAX))
    }

    fn contains(&self, key: &ConvKey) -> Result<bool, StoreError> {
        Ok(self.index.contains_key(key.index_key())?)
    }

    fn conversations(&self, owner: &NodeId) -> Result<Vec<ConversationId>, StoreError> {
        let mut out = Vec::new();
        for item in self.index.scan_prefix(owner.0) {
            let (k, _) = item?;
            let name = k
                .get(owner.0.len()..)
                .and_then(|b| std::str::from_utf8(b).ok());
            if let Some(c) = name.and_then(|n| ConversationId::parse(n).ok()) {
                out.push(c);
            }
        }
        Ok(out)
    }

    fn page(&self, key: &ConvKey, from: u64, max_bytes: usize) -> Result<Page, StoreError> {
        let Some(tree) = self.existing(key)? else {
            return Ok(Page {
                turns: Vec::new(),
                next: None,
            });
        };
        let (first, _) = span(&tree)?;
        let start = first.saturating_add(from).to_be_bytes();
        // Errors end the page early rather than silently: collect them.
        let mut failed = None;
        let turns = tree.range(start..).filter_map(|item| match item {
            Ok((_, v)) => decode_turn(key, &v),
            Err(e) => {
                failed.get_or_insert(e);
                None
            }
        });
        let page = fill_page(turns, from, max_bytes);
        match failed {
            Some(e) => Err(e.into()),
            None => Ok(page),
        }
    }

    fn clear(&self, key: &ConvKey) -> Result<bool, StoreError> {
        let held = self.index.remove(key.index_key())?.is_some();
        self.db.drop_tree(key.tree_name())?;
        self.index.flush()?;
        Ok(held)
    }

    fn check_room(&self, key: &ConvKey) -> Result<(), StoreError> {
        if self.index.contains_key(key.index_key())? {
            return Ok(());
        }
        let held = self
            .index
            .scan_prefix(key.owner.0)
            .take(self.max_conversations.saturating_add(1))
            .count();
        if held >= self.max_conversations {
            return Err(StoreError::TooManyConversations {
                held,
                max: self.max_conversations,
            });
        }
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
#[derive(Debug)]
pub struct MemStore {
    convs: Mutex<BTreeMap<ConvKey, Vec<Turn>>>,
    max_conversations: usize,
}

impl Default for MemStore {
    fn default() -> Self {
        MemStore::new(DEFAULT_MAX_CONVERSATIONS)
    }
}

impl MemStore {
    pub fn new(max_conversations: usize) -> Self {
        MemStore {
            convs: Mutex::new(BTreeMap::new()),
            max_conversations,
        }
    }

    fn held<'a>(
        m: &'a BTreeMap<ConvKey, Vec<Turn>>,
        owner: &'a NodeId,
    ) -> impl Iterator<Item = &'a ConversationId> {
        m.keys()
            .filter(move |k| k.owner == *owner)
            .map(|k| &k.conversation)
    }
}

impl ConversationStore for MemStore {
    fn sync(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn append_deferred(&self, key: &ConvKey, turns: &[Turn]) -> Result<(), StoreError> {
        self.check_room(key)?;
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

    fn contains(&self, key: &ConvKey) -> Result<bool, StoreError> {
        let m = self.convs.lock().map_err(|_| StoreError::Poisoned)?;
        Ok(m.contains_key(key))
    }

    fn conversations(&self, owner: &NodeId) -> Result<Vec<ConversationId>, StoreError> {
        let m = self.convs.lock().map_err(|_| StoreError::Poisoned)?;
        // Keys are ordered by owner, then name: already by name.
        Ok(Self::held(&m, owner).cloned().collect())
    }

    fn page(&self, key: &ConvKey, from: u64, max_bytes: usize) -> Result<Page, StoreError> {
        let m = self.convs.lock().map_err(|_| StoreError::Poisoned)?;
        let turns = m.get(key).map(Vec::as_slice).unwrap_or_default();
        let skip = usize::try_from(from).unwrap_or(usize::MAX);
        Ok(fill_page(turns.iter().skip(skip).cloned(), from, max_bytes))
    }

    fn clear(&self, key: &ConvKey) -> Result<bool, StoreError> {
        let mut m = self.convs.lock().map_err(|_| StoreError::Poisoned)?;
        Ok(m.remove(key).is_some())
    }

    fn check_room(&self, key: &ConvKey) -> Result<(), StoreError> {
        let m = self.convs.lock().map_err(|_| StoreError::Poisoned)?;
        if m.contains_key(key) {
            return Ok(());
        }
        let held = Self::held(&m, &key.owner).count();
        if held >= self.max_conversations {
            return Err(StoreError::TooManyConversations {
                held,
                max: self.max_conversations,
            });
        }
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
        // Pages cover every kept turn once, in order, within their bytes.
        let mut read = Vec::new();
        let mut from = 0;
        loop {
            let p = s.page(&a, from, 100).expect("page");
            assert!(!p.turns.is_empty());
            let bytes: usize = p.turns.iter().map(|t| t.text.len()).sum();
            assert!(bytes <= 100 || p.turns.len() == 1, "{bytes}");
            read.extend(p.turns);
            match p.next {
                Some(n) => from = n,
                None => break,
            }
        }
        assert_eq!(read, s.recent(&a, usize::MAX).expect("read"));
        assert!(s.page(&b, 0, 100).expect("page").turns.is_empty());
    }

    /// Listing, the cap and deletion, which both stores share.
    fn owners_suite(s: &dyn ConversationStore) {
        let owner = NodeId([7; 32]);
        // Reading creates nothing.
        assert_eq!(s.recent(&key(7, "ghost"), 10).expect("read"), vec![]);
        assert_eq!(s.len(&key(7, "ghost")).expect("len"), 0);
        assert!(!s.contains(&key(7, "ghost")).expect("contains"));
        assert!(s.conversations(&owner).expect("list").is_empty());
        s.append(&key(7, "b"), &[turn(0)]).expect("append");
        s.append(&key(7, "a"), &[turn(0)]).expect("append");
        s.append(&key(8, "other"), &[turn(0)]).expect("append");
        let names: Vec<String> = s
            .conversations(&owner)
            .expect("list")
            .iter()
            .map(|c| c.as_str().to_string())
            .collect();
        assert_eq!(names, ["a", "b"]);
        // The cap is 2 in these tests: a third conversation is refused,
        // appending to a held one is not, and another owner is not held
        // back.
        let e = s
            .append(&key(7, "c"), &[turn(0)])
            .expect_err("past the cap");
        assert!(
            matches!(e, StoreError::TooManyConversations { held: 2, max: 2 }),
            "{e}"
        );
        assert!(
            e.to_string().contains("max_conversations_per_holder"),
            "{e}"
        );
        assert!(s.check_room(&key(7, "c")).is_err());
        s.check_room(&key(7, "a")).expect("a held one has room");
        s.append(&key(7, "a"), &[turn(1)]).expect("held");
        s.append(&key(8, "second"), &[turn(0)])
            .expect("another owner");
        assert!(!s.contains(&key(7, "c")).expect("contains"));
        // Deleting frees a place.
        assert!(s.clear(&key(7, "a")).expect("clear"));
        assert!(!s.clear(&key(7, "a")).expect("again"));
        assert!(s.recent(&key(7, "a"), 10).expect("read").is_empty());
        s.append(&key(7, "c"), &[turn(0)]).expect("room again");
    }

    #[test]
    fn mem_store_keeps_owners_apart_and_capped() {
        owners_suite(&MemStore::new(2));
    }

    #[test]
    fn sled_store_keeps_owners_apart_and_capped() {
        let dir = tempfile::tempdir().expect("tempdir");
        owners_suite(&SledStore::open(dir.path(), 2).expect("open"));
    }

    #[test]
    fn a_database_from_before_the_index_is_indexed_when_opened() {
        let dir = tempfile::tempdir().expect("tempdir");
        let k = key(5, "old");
        {
            let db = sled::open(dir.path()).expect("open");
            let tree = db.open_tree(k.tree_name()).expect("tree");
            let bytes = zavod_proto::wire::encode_unversioned(&StoredTurn(turn(0)));
            tree.insert(0u64.to_be_bytes(), bytes).expect("insert");
            db.flush().expect("flush");
        }
        let s = SledStore::open(dir.path(), 10).expect("open");
        assert_eq!(
            s.conversations(&NodeId([5; 32])).expect("list"),
            vec![k.conversation.clone()]
        );
        assert_eq!(s.recent(&k, 10).expect("read"), vec![turn(0)]);
    }

    #[test]
    fn mem_store_behaves() {
        suite(&MemStore::default());
    }

    #[test]
    fn sled_store_behaves_and_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let s = SledStore::open(dir.path(), DEFAULT_MAX_CONVERSATIONS).expect("open");
            suite(&s);
            s.append(&key(3, "kept"), &[turn(0), turn(1)])
                .expect("append");
        }
        let s = SledStore::open(dir.path(), DEFAULT_MAX_CONVERSATIONS).expect("reopen");
        assert_eq!(
            s.recent(&key(3, "kept"), 10).expect("read"),
            vec![turn(0), turn(1)]
        );
    }

    #[test]
    fn unreadable_records_are_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = SledStore::open(dir.path(), DEFAULT_MAX_CONVERSATIONS).expect("open");
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
        let err = SledStore::open(&file.join("db"), 1).expect_err("cannot open under a file");
        assert!(err.to_string().contains("file"), "{err}");
    }
}
