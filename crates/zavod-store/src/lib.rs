//! zavod-store: the replica of conversation memory a node keeps on disk.
//!
//! A conversation belongs to the key that holds it (the client's public
//! key) and a client-chosen [`ConversationId`]; one client can never read
//! another's. What a node keeps of one is its replica
//! (`zavod_proto::memory::log`'s rules, the same the simulator checks):
//! entries (a user turn and its answer) keyed by stamp, at most one per
//! request id, above a floor that deletions raise. [`SledStore`] keeps each
//! conversation in its own sled tree: entries under `e` ‖ stamp (sequence
//! then request id, big-endian, so iteration is in order) and the request
//! ids under `i` ‖ id, with each conversation's entry count in the index
//! and its floor in a tree of floors that outlives the conversation (so a
//! deletion holds against a replica that comes back with older entries).
//! A write is durable once the store syncs, and [`GroupWriter`] makes one
//! sync serve every write waiting for it. [`MemStore`] is its in-memory
//! twin (one test suite runs against both).
//!
//! Bounds: at most [`MAX_ENTRIES_PER_CONVERSATION`] entries are kept per
//! conversation (oldest dropped first); an owner holds at most the store's
//! conversation cap (a write that would start one past it is refused,
//! naming the cap); reads return at most what is asked, and an export page
//! at most its bytes.
//!
//! Invariants: reading never creates storage (a conversation exists once
//! an entry was written to it); an index of each owner's conversations is
//! kept beside the entries, so listing, counting and deleting one owner's
//! conversations never scans another's, and a write never scans the
//! conversation it writes to.
//!
//! Why this file passes 600 lines: the on-disk store and its in-memory
//! twin implement one trait by one set of rules and are tested by one
//! suite; kept together, a change to the rules changes both.

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
pub use zavod_proto::memory::ConvKey;
use zavod_proto::memory::log::Applied;
use zavod_proto::memory::{Entry, Held, ReplicaLog, Stamp};

/// Entries (a turn and its answer) kept per conversation; older ones are
/// dropped.
pub const MAX_ENTRIES_PER_CONVERSATION: usize = 1_000;

/// Conversations one owner may hold unless the store is opened with
/// another cap (`memory.max_conversations_per_holder`). The node's own
/// conversation for a holder (its facts) is not counted.
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

fn tree_name(key: &ConvKey) -> String {
    format!("conv/{}/{}", key.owner.to_hex(), key.conversation)
}

/// The key in the index of conversations: owner, then name, so one
/// owner's conversations are one prefix.
fn index_key(key: &ConvKey) -> Vec<u8> {
    let mut k = key.owner.0.to_vec();
    k.extend_from_slice(key.conversation.as_str().as_bytes());
    k
}

/// The key an index key stands for.
fn from_index_key(k: &[u8]) -> Option<ConvKey> {
    let owner: [u8; 32] = k.get(..32)?.try_into().ok()?;
    let name = std::str::from_utf8(k.get(32..)?).ok()?;
    Some(ConvKey {
        owner: NodeId(owner),
        conversation: ConversationId::parse(name).ok()?,
    })
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

const ENTRY: u8 = b'e';
const ID: u8 = b'i';

fn entry_key(s: &Stamp) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = ENTRY;
    k[1..9].copy_from_slice(&s.seq.to_be_bytes());
    k[9..].copy_from_slice(&s.id.to_be_bytes());
    k
}

fn id_key(id: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = ID;
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

fn stamp_of(k: &[u8]) -> Option<Stamp> {
    let seq = u64::from_be_bytes(k.get(1..9)?.try_into().ok()?);
    let id = u64::from_be_bytes(k.get(9..17)?.try_into().ok()?);
    Some(Stamp { seq, id })
}

/// One page of an export: turns in order, and where the next page starts
/// (`None`: that was the last).
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    pub turns: Vec<Turn>,
    pub next: Option<u64>,
}

/// A node's replica of conversation memory, as the MemoryKeeper and the
/// replica protocol use it.
pub trait ConversationStore: Send + Sync {
    /// Applies a replica write (`zavod_proto::memory::log`'s rules),
    /// durably.
    fn write(&self, key: &ConvKey, floor: u64, entries: &[Entry]) -> Result<Applied, StoreError> {
        let a = self.write_deferred(key, floor, entries)?;
        self.sync()?;
        Ok(a)
    }
    /// Applies a replica write, visible to reads at once and durable at
    /// the next [`ConversationStore::sync`] ([`GroupWriter`] makes one
    /// sync serve many writes). A write that would start a conversation
    /// past the owner's cap is refused.
    fn write_deferred(
        &self,
        key: &ConvKey,
        floor: u64,
        entries: &[Entry],
    ) -> Result<Applied, StoreError>;
    /// Makes every write so far durable.
    fn sync(&self) -> Result<(), StoreError>;
    /// The floor and the newest entries within `max_bytes` of text (at
    /// least one).
    fn read(&self, key: &ConvKey, max_bytes: usize) -> Result<Held, StoreError>;
    /// Entries held.
    fn len(&self, key: &ConvKey) -> Result<usize, StoreError>;
    fn is_empty(&self, key: &ConvKey) -> Result<bool, StoreError> {
        Ok(self.len(key)? == 0)
    }
    /// Whether this node holds entries of the conversation.
    fn contains(&self, key: &ConvKey) -> Result<bool, StoreError>;
    /// The owner's conversations held here, by name.
    fn conversations(&self, owner: &NodeId) -> Result<Vec<ConversationId>, StoreError>;
    /// Conversations held here after `after` (all owners, in key order),
    /// at most `max`: a sync walks them page by page.
    fn held_after(&self, after: Option<&ConvKey>, max: usize) -> Result<Vec<ConvKey>, StoreError>;
    /// Turns from the `from`-th kept one (0: the oldest kept), as many as
    /// fit `max_bytes` of text (always at least one, so a page advances).
    fn page(&self, key: &ConvKey, from: u64, max_bytes: usize) -> Result<Page, StoreError>;
    /// Drops this node's copy, keeping its floor (the conversation moved
    /// to other replicas); whether it held one.
    fn forget(&self, key: &ConvKey) -> Result<bool, StoreError>;
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

/// How an entry is kept on disk.
#[derive(Serialize, Deserialize)]
struct StoredEntry(Vec<Turn>);

/// How a turn was kept before entries (one per 8-byte sequence key).
#[derive(Serialize, Deserialize)]
struct StoredTurn(Turn);

/// sled-backed memory.
pub struct SledStore {
    db: sled::Db,
    /// Owner ‖ conversation name → entries held (u64, big-endian).
    index: sled::Tree,
    /// Owner ‖ conversation name → floor (u64, big-endian); kept after the
    /// conversation is gone.
    floors: sled::Tree,
    max_conversations: usize,
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SledStore")
    }
}

fn be_u64(v: Option<sled::IVec>) -> u64 {
    v.and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
        .map_or(0, u64::from_be_bytes)
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
        let floors = db.open_tree("floors")?;
        let store = SledStore {
            db,
            index,
            floors,
            max_conversations,
        };
        store.upgrade_older_conversations()?;
        Ok(store)
    }

    /// A database written before entries kept one turn per 8-byte
    /// sequence key (and, before that, had no index): each such turn
    /// becomes an entry of its own (stamp: its sequence, twice), in order,
    /// and the conversation is indexed. Done once per conversation: an
    /// upgraded tree has no 8-byte key left.
    fn upgrade_older_conversations(&self) -> Result<(), StoreError> {
        for name in self.db.tree_names() {
            let Some(key) = from_tree_name(&name) else {
                continue;
            };
            let tree = self.db.open_tree(&name)?;
            let mut batch = sled::Batch::default();
            let mut moved = 0u64;
            for item in tree.iter() {
                let (k, v) = item?;
                let Ok(seq) = <[u8; 8]>::try_from(k.as_ref()).map(u64::from_be_bytes) else {
                    continue;
                };
                batch.remove(k);
                let Ok(StoredTurn(t)) = zavod_proto::wire::decode_unversioned::<StoredTurn>(&v)
                else {
                    continue;
                };
                let s = Stamp { seq, id: seq };
                let e = zavod_proto::wire::encode_unversioned(&StoredEntry(vec![t]));
                batch.insert(&entry_key(&s), e);
                batch.insert(&id_key(seq), &entry_key(&s)[1..]);
                moved += 1;
            }
            if moved > 0 || !self.index.contains_key(index_key(&key))? {
                tree.apply_batch(batch)?;
                let held = tree.scan_prefix([ENTRY]).count() as u64;
                if held > 0 {
                    self.index.insert(index_key(&key), &held.to_be_bytes())?;
                }
            }
        }
        self.db.flush()?;
        Ok(())
    }

    /// The conversation's tree, if it exists (opening a tree creates it).
    fn existing(&self, key: &ConvKey) -> Result<Option<sled::Tree>, StoreError> {
        if self.index.contains_key(index_key(key))? {
            Ok(Some(self.db.open_tree(tree_name(key))?))
        } else {
            Ok(None)
        }
    }

    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    fn count(&self, key: &ConvKey) -> Result<u64, StoreError> {
        Ok(be_u64(self.index.get(index_key(key))?))
    }

    /// Removes one entry and its id; whether it was there.
    fn remove_entry(tree: &sled::Tree, s: &Stamp) -> Result<bool, StoreError> {
        let had = tree.remove(entry_key(s))?.is_some();
        if had && tree.get(id_key(s.id))?.as_deref() == Some(&entry_key(s)[1..]) {
            tree.remove(id_key(s.id))?;
        }
        Ok(had)
    }
}

fn decode_entry(key: &ConvKey, k: &[u8], raw: &[u8]) -> Option<Entry> {
    let stamp = stamp_of(k)?;
    match zavod_proto::wire::decode_unversioned::<StoredEntry>(raw) {
        Ok(StoredEntry(turns)) => Some(Entry { stamp, turns }),
        Err(e) => {
            // A damaged record is skipped, not fatal: the rest of the
            // conversation stays usable (and a repair may bring it back).
            tracing::warn!(conversation = %key.conversation, error = %e, "skipping an unreadable entry");
            None
        }
    }
}

impl ConversationStore for SledStore {
    fn sync(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    fn write_deferred(
        &self,
        key: &ConvKey,
        floor: u64,
        entries: &[Entry],
    ) -> Result<Applied, StoreError> {
        let ik = index_key(key);
        let mut held_floor = be_u64(self.floors.get(&ik)?);
        let mut count = self.count(key)?;
        let existing = self.existing(key)?;
        if floor > held_floor {
            held_floor = floor;
            self.floors.insert(&ik, &floor.to_be_bytes())?;
            if let Some(tree) = &existing {
                // Entries below the floor: a range of keys, no scan of the
                // rest.
                let below: Vec<Stamp> = tree
                    .range(
                        entry_key(&Stamp { seq: 0, id: 0 })..entry_key(&Stamp {
                            seq: floor,
                            id: 0,
                        }),
                    )
                    .keys()
                    .filter_map(|k| k.ok().and_then(|k| stamp_of(&k)))
                    .collect();
                for s in below {
                    if Self::remove_entry(tree, &s)? {
                        count = count.saturating_sub(1);
                    }
                }
            }
        }
        let new: Vec<&Entry> = entries
            .iter()
            .filter(|e| e.stamp.seq >= held_floor)
            .collect();
        let tree = match existing {
            Some(t) => t,
            None if new.is_empty() => {
                return Ok(Applied {
                    floor: held_floor,
                    added: 0,
                });
            }
            None => {
                self.check_room(key)?;
                self.db.open_tree(tree_name(key))?
            }
        };
        let mut added = 0u32;
        for e in new {
            // One entry per request id: the smallest stamp wins.
            if let Some(old) = tree.get(id_key(e.stamp.id))? {
                let old = stamp_of(&[&[ENTRY][..], &old].concat());
                match old {
                    Some(o) if o <= e.stamp => continue,
                    Some(o) if Self::remove_entry(&tree, &o)? => {
                        count = count.saturating_sub(1);
                    }
                    _ => {}
                }
            }
            let bytes = zavod_proto::wire::encode_unversioned(&StoredEntry(e.turns.clone()));
            if tree.insert(entry_key(&e.stamp), bytes)?.is_none() {
                count += 1;
                added += 1;
            }
            tree.insert(id_key(e.stamp.id), &entry_key(&e.stamp)[1..])?;
        }
        while count > MAX_ENTRIES_PER_CONVERSATION as u64 {
            let Some((k, _)) = tree.scan_prefix([ENTRY]).next().transpose()? else {
                break;
            };
            match stamp_of(&k) {
                Some(s) => {
                    Self::remove_entry(&tree, &s)?;
                }
                None => {
                    tree.remove(k)?;
                }
            }
            count -= 1;
        }
        if count == 0 {
            self.index.remove(&ik)?;
            self.db.drop_tree(tree_name(key))?;
        } else {
            self.index.insert(&ik, &count.to_be_bytes())?;
        }
        Ok(Applied {
            floor: held_floor,
            added,
        })
    }

    fn read(&self, key: &ConvKey, max_bytes: usize) -> Result<Held, StoreError> {
        let floor = be_u64(self.floors.get(index_key(key))?);
        let Some(tree) = self.existing(key)? else {
            return Ok(Held {
                floor,
                ..Held::default()
            });
        };
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut truncated = false;
        for item in tree.scan_prefix([ENTRY]).rev() {
            let (k, v) = item?;
            let Some(e) = decode_entry(key, &k, &v) else {
                continue;
            };
            bytes = bytes.saturating_add(e.text_bytes());
            if !out.is_empty() && bytes > max_bytes {
                truncated = true;
                break;
            }
            out.push(e);
        }
        out.reverse();
        Ok(Held {
            floor,
            entries: out,
            truncated,
        })
    }

    fn len(&self, key: &ConvKey) -> Result<usize, StoreError> {
        Ok(usize::try_from(self.count(key)?).unwrap_or(usize::MAX))
    }

    fn contains(&self, key: &ConvKey) -> Result<bool, StoreError> {
        Ok(self.index.contains_key(index_key(key))?)
    }

    fn conversations(&self, owner: &NodeId) -> Result<Vec<ConversationId>, StoreError> {
        let mut out = Vec::new();
        for item in self.index.scan_prefix(owner.0) {
            let (k, _) = item?;
            if let Some(c) = from_index_key(&k) {
                out.push(c.conversation);
            }
        }
        Ok(out)
    }

    fn held_after(&self, after: Option<&ConvKey>, max: usize) -> Result<Vec<ConvKey>, StoreError> {
        let iter = match after {
            Some(a) => {
                let mut from = index_key(a);
                from.push(0);
                self.index.range(from..)
            }
            None => self.index.range::<&[u8], _>(..),
        };
        let mut out = Vec::new();
        for item in iter.take(max) {
            let (k, _) = item?;
            if let Some(c) = from_index_key(&k) {
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
        // Errors end the page early rather than silently: collect them.
        let mut failed = None;
        let turns = tree
            .scan_prefix([ENTRY])
            .filter_map(|item| match item {
                Ok((k, v)) => decode_entry(key, &k, &v),
                Err(e) => {
                    failed.get_or_insert(e);
                    None
                }
            })
            .flat_map(|e| e.turns)
            .skip(usize::try_from(from).unwrap_or(usize::MAX));
        let page = fill_page(turns, from, max_bytes);
        match failed {
            Some(e) => Err(e.into()),
            None => Ok(page),
        }
    }

    fn forget(&self, key: &ConvKey) -> Result<bool, StoreError> {
        let held = self.index.remove(index_key(key))?.is_some();
        self.db.drop_tree(tree_name(key))?;
        Ok(held)
    }

    fn check_room(&self, key: &ConvKey) -> Result<(), StoreError> {
        if key.conversation.is_reserved() || self.index.contains_key(index_key(key))? {
            return Ok(());
        }
        let held = self
            .index
            .scan_prefix(key.owner.0)
            .keys()
            .filter(|k| {
                k.as_ref()
                    .ok()
                    .and_then(|k| from_index_key(k))
                    .is_none_or(|k| !k.conversation.is_reserved())
            })
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

/// In-memory memory with the same behaviour as [`SledStore`]: the
/// replica rules themselves (`ReplicaLog`), one per conversation.
#[derive(Debug)]
pub struct MemStore {
    convs: Mutex<BTreeMap<ConvKey, ReplicaLog>>,
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
        m: &'a BTreeMap<ConvKey, ReplicaLog>,
        owner: &'a NodeId,
    ) -> impl Iterator<Item = &'a ConvKey> {
        m.iter()
            .filter(move |(k, l)| {
                k.owner == *owner && !l.is_empty() && !k.conversation.is_reserved()
            })
            .map(|(k, _)| k)
    }
}

impl ConversationStore for MemStore {
    fn sync(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn write_deferred(
        &self,
        key: &ConvKey,
        floor: u64,
        entries: &[Entry],
    ) -> Result<Applied, StoreError> {
        let mut m = self.convs.lock().map_err(|_| StoreError::Poisoned)?;
        let held = key.conversation.is_reserved() || m.get(key).is_some_and(|l| !l.is_empty());
        let above = m.get(key).map_or(0, ReplicaLog::floor).max(floor);
        if !held && entries.iter().any(|e| e.stamp.seq >= above) {
            let held = Self::held(&m, &key.owner).count();
            if held >= self.max_conversations {
                return Err(StoreError::TooManyConversations {
                    held,
                    max: self.max_conversations,
                });
            }
        }
        Ok(m.entry(key.clone())
            .or_default()
            .write(floor, entries, MAX_ENTRIES_PER_CONVERSATION))
    }

    fn read(&self, key: &ConvKey, max_bytes: usize) -> Result<Held, StoreError> {
        let m = self.convs.lock().map_err(|_| StoreError::Poisoned)?;
        Ok(m.get(key).map(|l| l.read(max_bytes)).unwrap_or_default())
    }

    fn len(&self, key: &ConvKey) -> Result<usize, StoreError> {
        let m = self.convs.lock().map_err(|_| StoreError::Poisoned)?;
        Ok(m.get(key).map_or(0, ReplicaLog::len))
    }

    fn contains(&self, key: &ConvKey) -> Result<bool, StoreError> {
        let m = self.convs.lock().map_err(|_| StoreError::Poisoned)?;
        Ok(m.get(key).is_some_and(|l| !l.is_empty()))
    }

    fn conversations(&self, owner: &NodeId) -> Result<Vec<ConversationId>, StoreError> {
        let m = self.convs.lock().map_err(|_| StoreError::Poisoned)?;
        // Keys are ordered by owner, then name: already by name.
        Ok(Self::held(&m, owner)
            .map(|k| k.conversation.clone())
            .collect())
    }

    fn held_after(&self, after: Option<&ConvKey>, max: usize) -> Result<Vec<ConvKey>, StoreError> {
        let m = self.convs.lock().map_err(|_| StoreError::Poisoned)?;
        Ok(m.iter()
            .filter(|(k, l)| after.is_none_or(|a| *k > a) && !l.is_empty())
            .map(|(k, _)| k.clone())
            .take(max)
            .collect())
    }

    fn page(&self, key: &ConvKey, from: u64, max_bytes: usize) -> Result<Page, StoreError> {
        let m = self.convs.lock().map_err(|_| StoreError::Poisoned)?;
        let skip = usize::try_from(from).unwrap_or(usize::MAX);
        let turns: Vec<Turn> = m
            .get(key)
            .map(|l| l.entries().flat_map(|e| e.turns.clone()).collect())
            .unwrap_or_default();
        Ok(fill_page(turns.into_iter().skip(skip), from, max_bytes))
    }

    fn forget(&self, key: &ConvKey) -> Result<bool, StoreError> {
        let mut m = self.convs.lock().map_err(|_| StoreError::Poisoned)?;
        let Some(l) = m.get_mut(key) else {
            return Ok(false);
        };
        let held = !l.is_empty();
        // Keep the floor: an empty log at it.
        let floor = l.floor();
        let mut kept = ReplicaLog::default();
        kept.write(floor, &[], MAX_ENTRIES_PER_CONVERSATION);
        *l = kept;
        Ok(held)
    }

    fn check_room(&self, key: &ConvKey) -> Result<(), StoreError> {
        let m = self.convs.lock().map_err(|_| StoreError::Poisoned)?;
        if key.conversation.is_reserved() || m.get(key).is_some_and(|l| !l.is_empty()) {
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

    fn entry(seq: u64, id: u64) -> Entry {
        Entry {
            stamp: Stamp { seq, id },
            turns: vec![turn(2 * seq as usize), turn(2 * seq as usize + 1)],
        }
    }

    fn ids(h: &Held) -> Vec<u64> {
        h.entries.iter().map(|e| e.stamp.id).collect()
    }

    /// The replica rules, which both stores share with `ReplicaLog`.
    fn suite(s: &dyn ConversationStore) {
        let a = key(1, "chat");
        let b = key(2, "chat");
        assert!(s.is_empty(&a).expect("len"));
        assert_eq!(
            s.write(&a, 0, &[entry(0, 10), entry(1, 11)])
                .expect("write")
                .added,
            2
        );
        assert_eq!(
            s.write(&a, 0, &[entry(1, 11)]).expect("again").added,
            0,
            "applied once"
        );
        // The same request at a later sequence (a retry elsewhere) stays
        // at its first; at an earlier one, moves there.
        s.write(&a, 0, &[entry(5, 11)]).expect("retry");
        assert_eq!(ids(&s.read(&a, 1 << 20).expect("read")), [10, 11]);
        s.write(&a, 0, &[entry(2, 12), entry(3, 13)])
            .expect("write");
        s.write(
            &a,
            0,
            &[Entry {
                stamp: Stamp { seq: 1, id: 13 },
                turns: vec![turn(9)],
            }],
        )
        .expect("earlier");
        let h = s.read(&a, 1 << 20).expect("read");
        assert_eq!(ids(&h), [10, 11, 13, 12]);
        assert_eq!(s.len(&a).expect("len"), 4);
        // Reads are bounded by bytes, newest first, at least one.
        let h = s.read(&a, 14).expect("read");
        assert_eq!(ids(&h), [12]);
        assert!(h.truncated);
        assert!(
            s.read(&b, 100).expect("read").entries.is_empty(),
            "owners are apart"
        );
        // A deletion: everything below the floor goes and stays gone.
        let d = s.write(&a, 3, &[]).expect("delete");
        assert_eq!(d.floor, 3);
        assert!(s.read(&a, 1 << 20).expect("read").entries.is_empty());
        assert!(!s.contains(&a).expect("contains"));
        assert_eq!(s.write(&a, 0, &[entry(2, 12)]).expect("late").added, 0);
        assert_eq!(s.read(&a, 10).expect("read").floor, 3);
        assert_eq!(s.write(&a, 1, &[entry(4, 14)]).expect("after").floor, 3);
        assert_eq!(ids(&s.read(&a, 100).expect("read")), [14]);
        // The newest are kept.
        let many: Vec<Entry> = (10..10 + MAX_ENTRIES_PER_CONVERSATION as u64 + 5)
            .map(|i| entry(i, 100 + i))
            .collect();
        s.write(&a, 0, &many).expect("write");
        assert_eq!(s.len(&a).expect("len"), MAX_ENTRIES_PER_CONVERSATION);
        let all = s.read(&a, usize::MAX).expect("read");
        assert_eq!(all.entries.first().map(|e| e.stamp.seq), Some(15));
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
        let turns: Vec<Turn> = all.entries.iter().flat_map(|e| e.turns.clone()).collect();
        assert_eq!(read, turns);
        assert!(s.page(&b, 0, 100).expect("page").turns.is_empty());
        // Forgetting a copy keeps the floor.
        assert!(s.forget(&a).expect("forget"));
        assert!(!s.contains(&a).expect("contains"));
        assert_eq!(s.read(&a, 10).expect("read").floor, 3);
    }

    /// Listing, the cap and deletion, which both stores share.
    fn owners_suite(s: &dyn ConversationStore) {
        let owner = NodeId([7; 32]);
        // Reading creates nothing.
        assert!(
            s.read(&key(7, "ghost"), 10)
                .expect("read")
                .entries
                .is_empty()
        );
        assert_eq!(s.len(&key(7, "ghost")).expect("len"), 0);
        assert!(!s.contains(&key(7, "ghost")).expect("contains"));
        assert!(s.conversations(&owner).expect("list").is_empty());
        s.write(&key(7, "b"), 0, &[entry(0, 1)]).expect("write");
        s.write(&key(7, "a"), 0, &[entry(0, 1)]).expect("write");
        s.write(&key(8, "other"), 0, &[entry(0, 1)]).expect("write");
        let names: Vec<String> = s
            .conversations(&owner)
            .expect("list")
            .iter()
            .map(|c| c.as_str().to_string())
            .collect();
        assert_eq!(names, ["a", "b"]);
        let held = s.held_after(None, 10).expect("held");
        assert_eq!(held, vec![key(7, "a"), key(7, "b"), key(8, "other")]);
        assert_eq!(
            s.held_after(Some(&key(7, "a")), 1).expect("held"),
            vec![key(7, "b")]
        );
        // The cap is 2 in these tests: a third conversation is refused,
        // writing to a held one is not, and another owner is not held
        // back.
        let e = s
            .write(&key(7, "c"), 0, &[entry(0, 1)])
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
        // The node's own conversation for a holder (its facts) is not
        // counted: it has room at the cap, and leaves the cap as it was.
        s.check_room(&key(7, "_zavod-facts"))
            .expect("the facts have room");
        s.write(&key(7, "_zavod-facts"), 0, &[entry(0, 1)])
            .expect("the facts are kept at the cap");
        assert!(s.check_room(&key(7, "c")).is_err());
        // A deletion of one not held is no new conversation.
        s.write(&key(7, "c"), 9, &[]).expect("a floor only");
        s.check_room(&key(7, "a")).expect("a held one has room");
        s.write(&key(7, "a"), 0, &[entry(1, 2)]).expect("held");
        s.write(&key(8, "second"), 0, &[entry(0, 1)])
            .expect("another owner");
        assert!(!s.contains(&key(7, "c")).expect("contains"));
        // Deleting frees a place.
        s.write(&key(7, "a"), 5, &[]).expect("delete");
        assert!(s.read(&key(7, "a"), 10).expect("read").entries.is_empty());
        s.write(&key(7, "d"), 0, &[entry(0, 1)])
            .expect("room again");
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
    fn a_database_of_turns_from_before_entries_is_upgraded_when_opened() {
        let dir = tempfile::tempdir().expect("tempdir");
        let k = key(5, "old");
        {
            let db = sled::open(dir.path()).expect("open");
            let tree = db.open_tree(tree_name(&k)).expect("tree");
            for i in 0..3u64 {
                let bytes = zavod_proto::wire::encode_unversioned(&StoredTurn(turn(i as usize)));
                tree.insert(i.to_be_bytes(), bytes).expect("insert");
            }
            db.flush().expect("flush");
        }
        let s = SledStore::open(dir.path(), 10).expect("open");
        assert_eq!(
            s.conversations(&NodeId([5; 32])).expect("list"),
            vec![k.conversation.clone()]
        );
        let h = s.read(&k, 1 << 20).expect("read");
        let turns: Vec<Turn> = h.entries.iter().flat_map(|e| e.turns.clone()).collect();
        assert_eq!(turns, vec![turn(0), turn(1), turn(2)]);
        assert_eq!(s.len(&k).expect("len"), 3);
        // New entries go after them.
        s.write(&k, 0, &[entry(1_700_000_000_000, 77)])
            .expect("write");
        assert_eq!(s.read(&k, 1 << 20).expect("read").entries.len(), 4);
        drop(s);
        let s = SledStore::open(dir.path(), 10).expect("reopen");
        assert_eq!(s.len(&k).expect("len"), 4, "upgraded once");
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
            s.write(&key(3, "kept"), 0, &[entry(0, 1), entry(1, 2)])
                .expect("write");
            s.write(&key(3, "gone"), 0, &[entry(0, 1)]).expect("write");
            s.write(&key(3, "gone"), 4, &[]).expect("delete");
        }
        let s = SledStore::open(dir.path(), DEFAULT_MAX_CONVERSATIONS).expect("reopen");
        assert_eq!(
            ids(&s.read(&key(3, "kept"), 1 << 20).expect("read")),
            [1, 2]
        );
        assert_eq!(s.read(&key(3, "gone"), 10).expect("read").floor, 4);
        assert_eq!(
            s.write(&key(3, "gone"), 0, &[entry(0, 1)])
                .expect("w")
                .added,
            0
        );
    }

    #[test]
    fn the_stores_agree_with_the_replica_rules() {
        // The same writes through a store and through ReplicaLog give the
        // same replica.
        let dir = tempfile::tempdir().expect("tempdir");
        let sled = SledStore::open(dir.path(), 10).expect("open");
        let mem = MemStore::new(10);
        let mut log = ReplicaLog::default();
        let k = key(1, "x");
        let mut x = 7u64;
        for _ in 0..300 {
            x = zavod_proto::mesh::score::splitmix64(x);
            let (floor, es) = if x.is_multiple_of(17) {
                (x % 40, vec![])
            } else {
                (0, vec![entry(x % 50, x % 23)])
            };
            let a = log.write(floor, &es, MAX_ENTRIES_PER_CONVERSATION);
            assert_eq!(sled.write(&k, floor, &es).expect("sled"), a);
            assert_eq!(mem.write(&k, floor, &es).expect("mem"), a);
        }
        let want = log.read(usize::MAX);
        assert_eq!(sled.read(&k, usize::MAX).expect("read"), want);
        assert_eq!(mem.read(&k, usize::MAX).expect("read"), want);
    }

    #[test]
    fn unreadable_records_are_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = SledStore::open(dir.path(), DEFAULT_MAX_CONVERSATIONS).expect("open");
        let k = key(4, "x");
        s.write(&k, 0, &[entry(0, 1)]).expect("write");
        s.db.open_tree(tree_name(&k))
            .expect("tree")
            .insert(
                entry_key(&Stamp { seq: 1, id: 9 }),
                &b"\xff\xff garbage"[..],
            )
            .expect("insert");
        s.write(&k, 0, &[entry(2, 2)]).expect("write");
        assert_eq!(ids(&s.read(&k, 1 << 20).expect("read")), [1, 2]);
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
