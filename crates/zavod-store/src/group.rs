//! Group commit: one thread owns every write to the store. It takes the
//! replica writes (and other work) waiting for it, applies them in the order
//! they came, then syncs once and tells each append's sender how it went.
//! A slow fsync therefore delays only the writes waiting for it, never a
//! read (prompt assembly reads the store directly, and sees an append as
//! soon as it is applied), and a burst of answers costs one sync, not one
//! each.
//!
//! Invariants: jobs run in submission order; a write is reported done
//! only after a sync that followed it succeeded, and a failed sync is
//! reported to every write it covered; the queue is bounded
//! ([`QUEUE`]), and a full queue is an error to the sender, never a wait;
//! the thread ends when the last handle is dropped.

use crate::{ConvKey, ConversationStore, StoreError};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};
use zavod_proto::memory::Entry;
use zavod_proto::memory::log::Applied;

/// Writes that may wait for the writer thread.
pub(crate) const QUEUE: usize = 4_096;
/// Writes applied before one sync, at most.
const GROUP: usize = 256;

type Done = Box<dyn FnOnce(Result<Applied, StoreError>) + Send>;
type Work = Box<dyn FnOnce(&dyn ConversationStore) + Send>;

enum Job {
    Write {
        key: ConvKey,
        floor: u64,
        entries: Vec<Entry>,
        done: Done,
    },
    /// Any other work that must be ordered with the writes (a deletion).
    Run(Work),
}

/// The handle to the writer thread; clones share it.
#[derive(Clone)]
pub struct GroupWriter {
    tx: SyncSender<Job>,
}

impl std::fmt::Debug for GroupWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GroupWriter")
    }
}

/// The writer's queue was full: the write was not taken.
#[derive(Debug, thiserror::Error)]
#[error(
    "the memory writer has {QUEUE} writes waiting (the disk is slower than the answers); \
     this one was not taken"
)]
pub struct Busy;

impl GroupWriter {
    /// Starts the writer thread over `store`.
    pub fn start(store: Arc<dyn ConversationStore>) -> std::io::Result<GroupWriter> {
        let (tx, rx) = sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("zavod-memory-writer".into())
            .spawn(move || run(store.as_ref(), rx))?;
        Ok(GroupWriter { tx })
    }

    /// Applies a replica write; `done` is called once it is durable, or
    /// with the error that kept it from that (a full queue included: then
    /// it is called before this returns [`Busy`]).
    pub fn write(
        &self,
        key: ConvKey,
        floor: u64,
        entries: Vec<Entry>,
        done: impl FnOnce(Result<Applied, StoreError>) + Send + 'static,
    ) -> Result<(), Busy> {
        let job = Job::Write {
            key,
            floor,
            entries,
            done: Box::new(done),
        };
        match self.submit(job) {
            Ok(()) => Ok(()),
            Err(job) => {
                if let Job::Write { done, .. } = job {
                    done(Err(StoreError::Sync(Busy.to_string())));
                }
                Err(Busy)
            }
        }
    }

    /// Runs `work` on the writer thread, after every write submitted
    /// before it.
    pub fn run(
        &self,
        work: impl FnOnce(&dyn ConversationStore) + Send + 'static,
    ) -> Result<(), Busy> {
        self.submit(Job::Run(Box::new(work))).map_err(|_| Busy)
    }

    /// Waits until every write submitted so far has been applied and
    /// synced (for a clean stop), at most `timeout`; whether it was.
    pub fn drain(&self, timeout: std::time::Duration) -> bool {
        let (tx, rx) = std::sync::mpsc::channel();
        let marker = self.run(move |store| {
            let _ = tx.send(store.sync().is_ok());
        });
        marker.is_ok() && rx.recv_timeout(timeout).unwrap_or(false)
    }

    /// Queues `job`, or gives it back when the queue is full (a stopped
    /// writer takes nothing either: its store is gone).
    fn submit(&self, job: Job) -> Result<(), Job> {
        match self.tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(j) | TrySendError::Disconnected(j)) => Err(j),
        }
    }
}

fn run(store: &dyn ConversationStore, rx: Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < GROUP {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        // Applied in order; the writes that applied wait for the sync.
        let mut waiting: Vec<(Done, Applied)> = Vec::new();
        for job in jobs {
            match job {
                Job::Write {
                    key,
                    floor,
                    entries,
                    done,
                } => match store.write_deferred(&key, floor, &entries) {
                    Ok(a) => waiting.push((done, a)),
                    Err(e) => done(Err(e)),
                },
                Job::Run(work) => work(store),
            }
        }
        if waiting.is_empty() {
            continue;
        }
        match store.sync() {
            Ok(()) => waiting.into_iter().for_each(|(d, a)| d(Ok(a))),
            Err(e) => {
                let m = e.to_string();
                tracing::error!(error = %m, "the memory store could not sync");
                for (d, _) in waiting {
                    d(Err(StoreError::Sync(m.clone())));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MemStore, Page};
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;
    use zavod_proto::NodeId;
    use zavod_proto::chat::prompt::{Role, Turn};
    use zavod_proto::ids::ConversationId;
    use zavod_proto::memory::{Held, Stamp};

    /// A store whose syncs are slow (and can fail), counting them.
    struct SlowDisk {
        inner: MemStore,
        syncs: AtomicUsize,
        fail: AtomicBool,
    }

    impl ConversationStore for SlowDisk {
        fn write_deferred(
            &self,
            key: &ConvKey,
            floor: u64,
            entries: &[Entry],
        ) -> Result<Applied, StoreError> {
            self.inner.write_deferred(key, floor, entries)
        }
        fn sync(&self) -> Result<(), StoreError> {
            std::thread::sleep(Duration::from_millis(100));
            self.syncs.fetch_add(1, Ordering::SeqCst);
            if self.fail.load(Ordering::SeqCst) {
                return Err(StoreError::Sync("no space left on device".into()));
            }
            Ok(())
        }
        fn read(&self, key: &ConvKey, max: usize) -> Result<Held, StoreError> {
            self.inner.read(key, max)
        }
        fn held_after(
            &self,
            after: Option<&ConvKey>,
            max: usize,
        ) -> Result<Vec<ConvKey>, StoreError> {
            self.inner.held_after(after, max)
        }
        fn len(&self, key: &ConvKey) -> Result<usize, StoreError> {
            self.inner.len(key)
        }
        fn contains(&self, key: &ConvKey) -> Result<bool, StoreError> {
            self.inner.contains(key)
        }
        fn conversations(&self, owner: &NodeId) -> Result<Vec<ConversationId>, StoreError> {
            self.inner.conversations(owner)
        }
        fn page(&self, key: &ConvKey, from: u64, max: usize) -> Result<Page, StoreError> {
            self.inner.page(key, from, max)
        }
        fn forget(&self, key: &ConvKey) -> Result<bool, StoreError> {
            self.inner.forget(key)
        }
        fn check_room(&self, key: &ConvKey) -> Result<(), StoreError> {
            self.inner.check_room(key)
        }
    }

    fn key(c: &str) -> ConvKey {
        ConvKey {
            owner: NodeId([1; 32]),
            conversation: ConversationId::parse(c).expect("valid"),
        }
    }

    fn entry(i: u32) -> Entry {
        Entry {
            stamp: Stamp {
                seq: u64::from(i),
                id: u64::from(i),
            },
            turns: vec![Turn {
                role: Role::User,
                text: format!("turn {i}"),
                tokens: i,
            }],
        }
    }

    fn disk() -> Arc<SlowDisk> {
        Arc::new(SlowDisk {
            inner: MemStore::default(),
            syncs: AtomicUsize::new(0),
            fail: AtomicBool::new(false),
        })
    }

    /// Twenty writes made while a sync is under way are made durable by
    /// one or two more syncs, in order, and the store is readable
    /// throughout (reads do not wait for the writer).
    #[test]
    fn writes_waiting_for_a_slow_sync_share_the_next_one() {
        let store = disk();
        let w = GroupWriter::start(store.clone()).expect("start");
        let results = Arc::new(Mutex::new(Vec::new()));
        for i in 0..21 {
            let r = Arc::clone(&results);
            w.write(key("a"), 0, vec![entry(i)], move |res| {
                r.lock().expect("lock").push((i, res.is_ok()))
            })
            .expect("queued");
            if i == 0 {
                // Let the first sync start before the others arrive.
                std::thread::sleep(Duration::from_millis(20));
                let t = std::time::Instant::now();
                let _ = store.read(&key("a"), 1000).expect("read");
                assert!(t.elapsed() < Duration::from_millis(50), "a read waited");
            }
        }
        let all = (0..21).map(|i| (i, true)).collect::<Vec<_>>();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while results.lock().expect("lock").len() < 21 {
            assert!(std::time::Instant::now() < deadline, "writes not done");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(*results.lock().expect("lock"), all, "in order, all durable");
        let syncs = store.syncs.load(Ordering::SeqCst);
        assert!((2..=3).contains(&syncs), "{syncs} syncs for 21 writes");
        let kept = store.read(&key("a"), 1 << 20).expect("read");
        assert_eq!(kept.entries, (0..21).map(entry).collect::<Vec<_>>());
    }

    /// A failed sync is reported to every write it covered; work queued
    /// after the writes runs after them.
    #[test]
    fn a_failed_sync_reaches_every_write_it_covered() {
        let store = disk();
        store.fail.store(true, Ordering::SeqCst);
        let w = GroupWriter::start(store.clone()).expect("start");
        let (tx, rx) = std::sync::mpsc::channel();
        for i in 0..3 {
            let tx = tx.clone();
            w.write(key("b"), 0, vec![entry(i)], move |r| {
                let _ = tx.send(r.map_err(|e| e.to_string()));
            })
            .expect("queued");
        }
        let (ltx, lrx) = std::sync::mpsc::channel();
        w.run(move |s| {
            let _ = ltx.send(s.len(&key("b")).expect("len"));
        })
        .expect("queued");
        for _ in 0..3 {
            let r = rx.recv_timeout(Duration::from_secs(5)).expect("reported");
            let e = r.expect_err("the sync failed");
            assert!(e.contains("no space left on device"), "{e}");
        }
        assert_eq!(lrx.recv_timeout(Duration::from_secs(5)).expect("ran"), 3);
        assert!(!w.drain(Duration::from_secs(5)), "the disk still fails");
        store.fail.store(false, Ordering::SeqCst);
        assert!(w.drain(Duration::from_secs(5)));
    }
}
