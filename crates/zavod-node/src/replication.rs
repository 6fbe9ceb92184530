//! Conversation memory as a mesh service: this file pumps zavod-proto's
//! memory machines (placement, the quorum read with its repairs, the
//! quorum write) over the replica protocol, and runs the sync that keeps
//! R copies of every conversation this node holds. Every decision is the
//! machines'; this file only sends what they ask, feeds back what came of
//! it, and sleeps until their next timer.
//!
//! A read or write answers its caller as soon as its machine has an
//! outcome (a read quorum, a write quorum) and goes on in its own task
//! until every replica answered or had its tries, so the repairs and the
//! writes to the last replica do not hold up a prompt or a reply.
//!
//! Members are the Router's view: placement is over the members it takes
//! to be alive, and quorums count against the planned replica count
//! (`memory.replicas`, fewer only when fewer members are known), so a node
//! cut off from the others cannot acknowledge a turn only it holds.

use crate::actors::router::RouterMsg;
use crate::actors::{NodeShared, error_frame};
use crate::clock::now_ms;
use crate::protocol::replica::ask;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use zavod_proto::NodeId;
use zavod_proto::limits::{MAX_REPLICA_FRAME_TEXT_BYTES, MAX_REPLICA_WRITE_ENTRIES};
use zavod_proto::memory::read::{Read, ReadOutcome, Repair};
use zavod_proto::memory::write::{Write, WriteOutcome};
use zavod_proto::memory::{ConvKey, Entry, Held, QuorumConfig, planned, read_quorum, replicas};
use zavod_proto::wire::replica::{ReplicaReply, ReplicaRequest};
use zavod_proto::wire::{ErrorCode, ErrorFrame};

/// Conversations one sync round checks at once.
const SYNC_PARALLEL: usize = 8;
/// Conversations read from the store per page of a sync round.
const SYNC_PAGE: usize = 256;

/// Where a conversation lives as this node sees the mesh.
#[derive(Debug, Clone)]
pub(crate) struct Placement {
    pub(crate) replicas: Vec<NodeId>,
    pub(crate) planned: usize,
}

/// The file in the data directory that remembers how many members this
/// node last knew of.
const KNOWN_MEMBERS_FILE: &str = "known_members";

/// For this long after a start, a node plans replicas for at least as many
/// members as it knew before (its view is still filling from gossip);
/// after it, for the members it knows now, so a mesh that shrank for good
/// plans for its new size.
const WARMUP: Duration = Duration::from_secs(30);

/// How many members this node last knew of, kept across restarts. Without
/// it a restarted node, knowing only itself until gossip arrives, would
/// plan one replica and acknowledge a turn only it holds.
#[derive(Debug)]
pub(crate) struct KnownMembers {
    path: std::path::PathBuf,
    started: std::time::Instant,
    remembered: usize,
    written: std::sync::atomic::AtomicUsize,
}

impl KnownMembers {
    /// Reads the count kept in `data_dir` (none, or an unreadable file,
    /// counts as 1).
    pub(crate) fn load(data_dir: &std::path::Path) -> KnownMembers {
        let path = data_dir.join(KNOWN_MEMBERS_FILE);
        let remembered = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(1)
            .clamp(1, 1 << 20);
        KnownMembers {
            path,
            started: std::time::Instant::now(),
            remembered,
            written: std::sync::atomic::AtomicUsize::new(remembered),
        }
    }

    /// The member count to plan replicas for, given the `known` members
    /// the view holds now; keeps the file up to date once warmed up.
    fn plan_for(&self, known: usize) -> usize {
        use std::sync::atomic::Ordering;
        if self.started.elapsed() < WARMUP {
            return known.max(self.remembered);
        }
        if self.written.swap(known, Ordering::Relaxed) != known {
            // Best effort: a count that could not be kept only matters at
            // the next restart, and the view refills then.
            let text = format!("{known}\n");
            if let Err(e) = crate::datadir::write_file(&self.path, &text, false) {
                tracing::warn!(error = %e, "could not keep the member count");
            }
        }
        known
    }
}

/// Members this node takes to be alive, and how many it plans replicas
/// for (the members it knows, or after a restart the ones it knew).
pub(crate) async fn members(shared: &NodeShared) -> Result<(Vec<NodeId>, usize), ErrorFrame> {
    let router = shared.directory.get().router;
    let (mut alive, known) =
        crate::protocol::call(router, "the router", RouterMsg::Members).await?;
    // Before this node's first announcement it is still a member.
    let me = shared.identity.id();
    if !alive.contains(&me) {
        alive.push(me);
    }
    let known = known.max(alive.len());
    Ok((alive, shared.known_members.plan_for(known)))
}

pub(crate) async fn placement(shared: &NodeShared, key: &ConvKey) -> Result<Placement, ErrorFrame> {
    let (alive, known) = members(shared).await?;
    let r = shared.config.memory.replicas;
    Ok(Placement {
        replicas: replicas(key, &alive, r),
        planned: planned(r, known),
    })
}

fn quorum_config(shared: &NodeShared) -> QuorumConfig {
    let t = shared.config.memory.replica_timeout_ms;
    QuorumConfig {
        try_timeout_ms: t,
        // Refused tries wait t/4, t/2, then t before the last: 1.75 t in
        // all, inside the deadline.
        max_tries: 4,
        deadline_ms: 3 * t,
    }
}

fn try_timeout(shared: &NodeShared) -> Duration {
    Duration::from_millis(shared.config.memory.replica_timeout_ms)
}

async fn sleep_until_ms(at: Option<u64>) {
    match at {
        Some(t) => tokio::time::sleep(Duration::from_millis(t.saturating_sub(now_ms()))).await,
        None => std::future::pending().await,
    }
}

/// What went wrong with each replica that failed, for the error people see.
#[derive(Default)]
struct Failures(BTreeMap<NodeId, String>);

impl Failures {
    fn note(&mut self, node: NodeId, why: String) {
        self.0.insert(node, why);
    }

    fn describe(&self) -> String {
        self.0
            .iter()
            .map(|(n, why)| format!("{}: {why}", zavod_net::peer_label(n)))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

fn refusal(reply: ReplicaReply) -> String {
    match reply {
        ReplicaReply::Refused(e) => e.message,
        other => format!("an answer of the wrong kind ({other:?})"),
    }
}

/// Reads `key` from its replicas; `all` waits for every replica (a sync)
/// instead of a read quorum.
pub(crate) async fn read(
    shared: &Arc<NodeShared>,
    key: &ConvKey,
    all: bool,
) -> Result<Held, ErrorFrame> {
    let p = placement(shared, key).await?;
    read_from(shared, key, p, all).await
}

async fn read_from(
    shared: &Arc<NodeShared>,
    key: &ConvKey,
    p: Placement,
    all: bool,
) -> Result<Held, ErrorFrame> {
    let need = if all {
        p.replicas.len()
    } else {
        read_quorum(p.planned)
    };
    let machine = Read::new(
        p.replicas,
        need,
        MAX_REPLICA_FRAME_TEXT_BYTES,
        now_ms(),
        quorum_config(shared),
    );
    let (tx, rx) = oneshot::channel();
    let req = ReplicaRequest::Read { key: key.clone() };
    tokio::spawn(drive(Arc::clone(shared), key.clone(), req, machine, tx));
    match rx.await {
        Ok((ReadOutcome::Read(h), _)) => Ok(h),
        Ok((ReadOutcome::Failed { replied, needed }, why)) => Err(error_frame(
            ErrorCode::NoCapacity,
            format!(
                "could not read the conversation's memory: {replied} of the {needed} replicas \
                 needed answered ({why}); try again once more of the mesh is up"
            ),
        )),
        Err(_) => Err(error_frame(ErrorCode::Internal, "memory: the read stopped")),
    }
}

/// What the pump needs of a quorum machine (the read and the write).
trait Pumped: Send + 'static {
    type Outcome: Send + 'static;
    fn poll_transmit(&mut self, now: u64) -> Option<NodeId>;
    fn poll_outcome(&mut self) -> Option<Self::Outcome>;
    fn poll_timeout(&self) -> Option<u64>;
    fn is_done(&self) -> bool;
    fn handle_failed(&mut self, from: NodeId, now: u64);
    fn handle_timeout(&mut self, now: u64);
    /// Takes the reply the machine waits for; gives back any other.
    fn handle_reply(
        &mut self,
        from: NodeId,
        reply: ReplicaReply,
        now: u64,
    ) -> Result<(), ReplicaReply>;
    /// Writes to send besides, once each (a read's repairs).
    fn poll_repair(&mut self) -> Option<Repair> {
        None
    }
}

impl Pumped for Read {
    type Outcome = ReadOutcome;
    fn poll_transmit(&mut self, now: u64) -> Option<NodeId> {
        Read::poll_transmit(self, now)
    }
    fn poll_outcome(&mut self) -> Option<ReadOutcome> {
        Read::poll_outcome(self)
    }
    fn poll_timeout(&self) -> Option<u64> {
        Read::poll_timeout(self)
    }
    fn is_done(&self) -> bool {
        Read::is_done(self)
    }
    fn handle_failed(&mut self, from: NodeId, now: u64) {
        Read::handle_failed(self, from, now)
    }
    fn handle_timeout(&mut self, now: u64) {
        Read::handle_timeout(self, now)
    }
    fn handle_reply(
        &mut self,
        from: NodeId,
        reply: ReplicaReply,
        now: u64,
    ) -> Result<(), ReplicaReply> {
        match reply {
            ReplicaReply::Held(h) => {
                self.handle_held(from, h, now);
                Ok(())
            }
            other => Err(other),
        }
    }
    fn poll_repair(&mut self) -> Option<Repair> {
        Read::poll_repair(self)
    }
}

impl Pumped for Write {
    type Outcome = WriteOutcome;
    fn poll_transmit(&mut self, now: u64) -> Option<NodeId> {
        Write::poll_transmit(self, now)
    }
    fn poll_outcome(&mut self) -> Option<WriteOutcome> {
        Write::poll_outcome(self)
    }
    fn poll_timeout(&self) -> Option<u64> {
        Write::poll_timeout(self)
    }
    fn is_done(&self) -> bool {
        Write::is_done(self)
    }
    fn handle_failed(&mut self, from: NodeId, now: u64) {
        Write::handle_failed(self, from, now)
    }
    fn handle_timeout(&mut self, now: u64) {
        Write::handle_timeout(self, now)
    }
    fn handle_reply(
        &mut self,
        from: NodeId,
        reply: ReplicaReply,
        now: u64,
    ) -> Result<(), ReplicaReply> {
        match reply {
            ReplicaReply::Applied(a) => {
                self.handle_applied(from, a, now);
                Ok(())
            }
            other => Err(other),
        }
    }
}

/// Pumps `m`, sending `req` to each replica it names, until every replica
/// answered or had its tries; its outcome goes to `tx` as soon as it is
/// known, with what went wrong at each replica that failed.
async fn drive<M: Pumped>(
    shared: Arc<NodeShared>,
    key: ConvKey,
    req: ReplicaRequest,
    mut m: M,
    tx: oneshot::Sender<(M::Outcome, String)>,
) {
    let mut tx = Some(tx);
    let mut tasks = JoinSet::new();
    let mut failures = Failures::default();
    let t = try_timeout(&shared);
    loop {
        let now = now_ms();
        while let Some(to) = m.poll_transmit(now) {
            let (s, req) = (Arc::clone(&shared), req.clone());
            tasks.spawn(async move { (to, ask(&s, to, req, t).await) });
        }
        while let Some(repair) = m.poll_repair() {
            // Sent once; a lost one is made again by a later read or sync.
            for entries in chunks(repair.entries) {
                let req = ReplicaRequest::Write {
                    key: key.clone(),
                    floor: repair.floor,
                    entries,
                };
                let s = Arc::clone(&shared);
                tokio::spawn(async move { ask(&s, repair.to, req, t).await });
            }
        }
        if let Some(o) = m.poll_outcome()
            && let Some(tx) = tx.take()
        {
            let _ = tx.send((o, failures.describe()));
        }
        if m.is_done() {
            return;
        }
        let at = m.poll_timeout();
        tokio::select! {
            Some(done) = tasks.join_next() => {
                if let Ok((from, reply)) = done {
                    let why = match reply {
                        Ok(r) => m.handle_reply(from, r, now_ms()).err().map(refusal),
                        Err(e) => Some(e),
                    };
                    if let Some(why) = why {
                        failures.note(from, why);
                        m.handle_failed(from, now_ms());
                    }
                }
            }
            _ = sleep_until_ms(at) => m.handle_timeout(now_ms()),
        }
    }
}

/// Splits entries into writes that each fit a frame.
fn chunks(entries: Vec<Entry>) -> Vec<Vec<Entry>> {
    let mut out: Vec<Vec<Entry>> = vec![Vec::new()];
    let mut bytes = 0usize;
    for e in entries {
        let b = e.text_bytes();
        let last = out.last().map_or(0, Vec::len);
        if last > 0
            && (bytes + b > MAX_REPLICA_FRAME_TEXT_BYTES || last >= MAX_REPLICA_WRITE_ENTRIES)
        {
            out.push(Vec::new());
            bytes = 0;
        }
        bytes += b;
        if let Some(c) = out.last_mut() {
            c.push(e);
        }
    }
    out
}

/// How a replicated write ended.
#[derive(Debug)]
pub(crate) enum Written {
    Acked,
    /// The conversation was deleted past these entries meanwhile.
    Deleted,
}

/// Writes `entries` (all in one frame) with `floor` to `key`'s replicas;
/// answered at a write quorum.
pub(crate) async fn write(
    shared: &Arc<NodeShared>,
    key: &ConvKey,
    floor: u64,
    entries: Vec<Entry>,
) -> Result<Written, ErrorFrame> {
    let p = placement(shared, key).await?;
    write_to(shared, key, &p, floor, entries).await
}

async fn write_to(
    shared: &Arc<NodeShared>,
    key: &ConvKey,
    p: &Placement,
    floor: u64,
    entries: Vec<Entry>,
) -> Result<Written, ErrorFrame> {
    let lowest = entries
        .iter()
        .map(|e| e.stamp.seq)
        .min()
        .unwrap_or(u64::MAX);
    let machine = Write::new(
        p.replicas.clone(),
        p.planned,
        lowest,
        now_ms(),
        quorum_config(shared),
    );
    let req = ReplicaRequest::Write {
        key: key.clone(),
        floor,
        entries,
    };
    let (tx, rx) = oneshot::channel();
    tokio::spawn(drive(Arc::clone(shared), key.clone(), req, machine, tx));
    match rx.await {
        Ok((WriteOutcome::Acked { .. }, _)) => Ok(Written::Acked),
        Ok((WriteOutcome::Stale { .. }, _)) => Ok(Written::Deleted),
        Ok((WriteOutcome::Failed { acked, needed }, why)) => Err(error_frame(
            ErrorCode::NoCapacity,
            format!(
                "{acked} of the {needed} replicas needed kept it ({})",
                if why.is_empty() {
                    "too few are up".into()
                } else {
                    why
                }
            ),
        )),
        Err(_) => Err(error_frame(
            ErrorCode::Internal,
            "memory: the write stopped",
        )),
    }
}

/// One conversation's sync: a read of every replica with repairs when this
/// node is one of them; otherwise its copy is handed to the replicas, and
/// dropped here once every planned replica has it.
async fn sync_one(shared: &Arc<NodeShared>, key: ConvKey) {
    let p = match placement(shared, &key).await {
        Ok(p) => p,
        Err(_) => return,
    };
    if p.replicas.contains(&shared.identity.id()) {
        if let Err(e) = read_from(shared, &key, p, true).await {
            tracing::debug!(conversation = %key.conversation, error = %e.message, "sync read");
        }
        return;
    }
    let held = match shared.store.read(&key, MAX_REPLICA_FRAME_TEXT_BYTES) {
        Ok(h) => h,
        Err(_) => return,
    };
    if p.replicas.len() < p.planned || held.entries.is_empty() {
        return;
    }
    let truncated = held.truncated;
    let mut all_kept = true;
    for entries in chunks(held.entries) {
        let ok = matches!(
            write_all(shared, &key, &p, held.floor, entries).await,
            Ok(n) if n == p.replicas.len()
        );
        all_kept &= ok;
    }
    if all_kept && !truncated {
        tracing::debug!(conversation = %key.conversation, "handed over to its replicas");
        let _ = shared.writer.run(move |store| {
            let _ = store.forget(&key);
        });
    }
}

/// Writes to every replica in `p` and waits for all of them to answer or
/// give up; how many kept it.
async fn write_all(
    shared: &Arc<NodeShared>,
    key: &ConvKey,
    p: &Placement,
    floor: u64,
    entries: Vec<Entry>,
) -> Result<usize, ErrorFrame> {
    let t = try_timeout(shared);
    let mut kept = 0;
    let mut tasks = JoinSet::new();
    for to in p.replicas.clone() {
        let req = ReplicaRequest::Write {
            key: key.clone(),
            floor,
            entries: entries.clone(),
        };
        let s = Arc::clone(shared);
        tasks.spawn(async move { ask(&s, to, req, t).await });
    }
    while let Some(r) = tasks.join_next().await {
        if matches!(r, Ok(Ok(ReplicaReply::Applied(_)))) {
            kept += 1;
        }
    }
    Ok(kept)
}

/// Every `memory.sync_interval_ms`, checks each conversation this node
/// holds: runs until the node stops.
pub(crate) async fn sync_loop(shared: Arc<NodeShared>) {
    let every = Duration::from_millis(shared.config.memory.sync_interval_ms);
    loop {
        tokio::time::sleep(every).await;
        let started = std::time::Instant::now();
        let mut after: Option<ConvKey> = None;
        let mut checked = 0usize;
        loop {
            let page = match shared.store.held_after(after.as_ref(), SYNC_PAGE) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "memory sync could not list conversations");
                    break;
                }
            };
            let Some(last) = page.last().cloned() else {
                break;
            };
            let mut tasks = JoinSet::new();
            for key in page {
                while tasks.len() >= SYNC_PARALLEL {
                    let _ = tasks.join_next().await;
                }
                let s = Arc::clone(&shared);
                tasks.spawn(async move { sync_one(&s, key).await });
                checked += 1;
            }
            while tasks.join_next().await.is_some() {}
            after = Some(last);
        }
        if checked > 0 {
            tracing::debug!(
                checked,
                ms = started.elapsed().as_millis() as u64,
                "memory sync round"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zavod_proto::chat::prompt::{Role, Turn};
    use zavod_proto::memory::Stamp;

    fn entry(i: u64, bytes: usize) -> Entry {
        Entry {
            stamp: Stamp { seq: i, id: i },
            turns: vec![Turn {
                role: Role::User,
                text: "x".repeat(bytes),
                tokens: 1,
            }],
        }
    }

    #[test]
    fn a_restarted_node_plans_for_the_members_it_knew() {
        let dir = tempfile::tempdir().expect("tempdir");
        let k = KnownMembers::load(dir.path());
        assert_eq!(k.plan_for(1), 1, "nothing known before");
        std::fs::write(dir.path().join(KNOWN_MEMBERS_FILE), "5\n").expect("write");
        let k = KnownMembers::load(dir.path());
        assert_eq!(k.plan_for(1), 5, "while the view fills");
        assert_eq!(k.plan_for(7), 7);
        std::fs::write(dir.path().join(KNOWN_MEMBERS_FILE), "junk").expect("write");
        assert_eq!(KnownMembers::load(dir.path()).plan_for(2), 2);
    }

    #[test]
    fn chunks_fit_a_frame_and_keep_every_entry_in_order() {
        let big = MAX_REPLICA_FRAME_TEXT_BYTES / 3;
        let all: Vec<Entry> = (0..7).map(|i| entry(i, big)).collect();
        let c = chunks(all.clone());
        assert_eq!(c.len(), 3, "three to a frame");
        assert!(c.iter().all(
            |c| c.iter().map(Entry::text_bytes).sum::<usize>() <= MAX_REPLICA_FRAME_TEXT_BYTES
        ));
        assert_eq!(c.concat(), all);
        // One entry over the bound still goes, alone.
        let huge = chunks(vec![
            entry(0, 2 * MAX_REPLICA_FRAME_TEXT_BYTES),
            entry(1, 1),
        ]);
        assert_eq!(huge.iter().map(Vec::len).collect::<Vec<_>>(), [1, 1]);
        let many = chunks((0..3000).map(|i| entry(i, 1)).collect());
        assert!(many.iter().all(|c| c.len() <= MAX_REPLICA_WRITE_ENTRIES));
        assert_eq!(chunks(vec![]), vec![Vec::<Entry>::new()]);
    }
}
