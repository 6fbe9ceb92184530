//! Memory scenarios (`kind = "memory"`): conversation memory as the mesh
//! keeps it, under crashes, lost disks, loss, duplication, reordering and
//! partitions.
//!
//! Every node holds replica logs (`zavod_proto::memory::ReplicaLog`, the
//! rules the node's store applies) that survive a crash, unless the crash
//! loses its disk. Clients hold conversations: each turn goes to a random
//! up node, which reads the conversation from its replica set (placement
//! over the members it can reach: `zavod_proto::memory::replicas`) with the
//! read machine, then writes the new entry with the write machine, and the
//! client counts the turn kept when the write is acknowledged. A turn whose
//! entry died or whose write failed is sent again, with the same request
//! id, through another node. A share of turns deletes the conversation
//! instead. Every node syncs what it holds now and then: a read of every
//! replica with repairs, or, for a conversation it is no longer a replica
//! of, a write of what it holds to those that are.
//!
//! Checked at the end, after faults stop and a drain lets syncs run:
//! - no acknowledged entry is lost (each is on every replica of its
//!   conversation), unless a later acknowledged deletion removed it;
//! - the replicas of each conversation hold the same generation and
//!   entries (they converged);
//! - no entry is there twice: each request id once per replica, at the same
//!   stamp everywhere;
//! - nothing deleted came back: no replica holds an entry of a generation
//!   older than the newest acknowledged deletion.
//!
//! During the run, reads that missed an acknowledged entry are counted
//! (a replica set that changed under a crash can answer from replicas the
//! write never reached until a sync repairs them); it is a figure, not a
//! violation.
//!
//! Disks are lost at most `replicas - 1` at a time (a lost disk is
//! counted back once two sync intervals have passed after its restart),
//! and never the last disk holding an acknowledged entry. A turn is
//! acknowledged at a write quorum, 2 of 3: until the write or a sync
//! brings it to the third replica (which may be cut off by a partition for
//! seconds), it is on two disks, and losing both loses it. No quorum
//! protocol that acknowledges before every replica has a turn does better,
//! so the run does not ask it to; what it checks is that the mesh brings
//! every acknowledged entry back to all of its replicas from any copy that
//! is left.
//!
//! Why this file passes 600 lines: the scenario, the event loop, the
//! nodes' operations and the end checks share the `MemSim` state, as the
//! mesh simulator's do in `lib.rs`.

use crate::{Report, Rng};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use zavod_proto::chat::prompt::{Role, Turn};
use zavod_proto::ids::{ConversationId, NodeId};
use zavod_proto::limits::MAX_REPLICA_FRAME_TEXT_BYTES;
use zavod_proto::memory::log::{Applied, EntrySet};
use zavod_proto::memory::read::{Read, ReadOutcome};
use zavod_proto::memory::write::{Write, WriteOutcome};
use zavod_proto::memory::{
    ConvKey, Entry, Held, QuorumConfig, ReplicaLog, Stamp, deletion_floor, next_seq, planned,
    read_quorum, replicas,
};

/// A memory scenario file. Unknown keys are errors.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryScenario {
    /// Always "memory".
    pub kind: String,
    pub nodes: usize,
    pub replicas: usize,
    /// Faults and new turns stop here; the run then drains.
    pub duration_ms: u64,
    pub drain_ms: u64,
    pub conversations: usize,
    pub think_ms: u64,
    pub latency_ms: u64,
    pub jitter_ms: u64,
    pub loss: f64,
    pub duplicate: f64,
    /// Mean crashes per second across the mesh.
    pub crash_per_s: f64,
    pub restart_after_ms: u64,
    /// Share of crashes that lose the node's disk (never more than
    /// `replicas - 1` not yet synced back).
    pub disk_loss: f64,
    pub partition_per_s: f64,
    pub partition_ms: u64,
    /// Share of turns that delete the conversation instead.
    pub delete_share: f64,
    /// Share of operations whose node's view still holds down nodes.
    pub stale_view: f64,
    pub sync_interval_ms: u64,
    pub max_entries: usize,
    pub try_timeout_ms: u64,
    pub max_tries: u32,
    pub deadline_ms: u64,
}

impl Default for MemoryScenario {
    fn default() -> Self {
        MemoryScenario {
            kind: "memory".into(),
            nodes: 8,
            replicas: 3,
            duration_ms: 60_000,
            drain_ms: 30_000,
            conversations: 30,
            think_ms: 800,
            latency_ms: 5,
            jitter_ms: 5,
            loss: 0.0,
            duplicate: 0.0,
            crash_per_s: 0.0,
            restart_after_ms: 3_000,
            disk_loss: 0.0,
            partition_per_s: 0.0,
            partition_ms: 5_000,
            delete_share: 0.0,
            stale_view: 0.0,
            sync_interval_ms: 2_000,
            max_entries: 2_000,
            try_timeout_ms: 500,
            max_tries: 3,
            deadline_ms: 2_000,
        }
    }
}

impl MemoryScenario {
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let s: MemoryScenario = toml::from_str(text).map_err(|e| e.to_string())?;
        if s.kind != "memory" {
            return Err(format!(
                "kind = {:?}: a memory scenario says kind = \"memory\"",
                s.kind
            ));
        }
        if s.nodes == 0 || s.replicas == 0 || s.sync_interval_ms == 0 || s.max_entries == 0 {
            return Err(
                "nodes, replicas, sync_interval_ms and max_entries must be positive".into(),
            );
        }
        Ok(s)
    }
}

type OpId = u64;

#[derive(Debug, Clone)]
enum Msg {
    Write {
        floor: u64,
        entries: Vec<Entry>,
    },
    Read,
    Applied(Applied),
    Held(Held),
    /// The destination was down: the sender's connection failed.
    Refused,
}

#[derive(Debug, Clone)]
enum Ev {
    Deliver {
        from: usize,
        to: usize,
        op: OpId,
        key: ConvKey,
        msg: Msg,
    },
    Timer {
        node: usize,
        op: OpId,
    },
    Turn {
        conv: usize,
    },
    /// The client's patience with one attempt.
    ClientTimeout {
        conv: usize,
        attempt: u64,
    },
    Crash,
    Restart {
        node: usize,
    },
    Partition,
    Heal,
    Sync {
        node: usize,
    },
}

#[derive(Debug)]
enum Phase {
    Reading(Read),
    Writing {
        w: Write,
        floor: u64,
        entries: Vec<Entry>,
    },
}

#[derive(Debug)]
enum Purpose {
    /// A client's turn (its request id) or deletion.
    Turn {
        conv: usize,
        id: u64,
    },
    Delete {
        conv: usize,
    },
    /// A sync of a conversation this node holds.
    Sync,
    /// Repairs and pushes: nobody waits on them.
    Background,
}

#[derive(Debug)]
struct Op {
    key: ConvKey,
    phase: Phase,
    purpose: Purpose,
    replicas: Vec<NodeId>,
    /// The client's attempt this op serves.
    attempt: u64,
    /// Request ids acknowledged to the client when the read began.
    expect: Vec<u64>,
    /// The timer set, so one is not set twice.
    timer: Option<u64>,
}

struct SimNode {
    id: NodeId,
    up: bool,
    logs: BTreeMap<ConvKey, ReplicaLog>,
    ops: BTreeMap<OpId, Op>,
}

struct Client {
    key: ConvKey,
    /// Request ids of the acknowledged entries of the current generation.
    acked: BTreeSet<u64>,
    /// Request ids acknowledged before the newest acknowledged deletion.
    deleted: BTreeSet<u64>,
    /// The newest acknowledged deletion's floor.
    deleted_floor: u64,
    /// The turn in flight: its request id (kept across retries), or a
    /// deletion.
    pending: Option<u64>,
    deleting: bool,
    busy: bool,
    attempt: u64,
}

struct MemSim {
    sc: MemoryScenario,
    rng: Rng,
    now: u64,
    seq: u64,
    queue: BTreeMap<(u64, u64), Ev>,
    nodes: Vec<SimNode>,
    clients: Vec<Client>,
    /// Nodes on the far side of the partition, while one holds.
    partition: Option<BTreeSet<usize>>,
    /// Lost disks not yet synced back, with when each was lost.
    lost: Vec<u64>,
    next_op: OpId,
    next_id: u64,
    cfg: QuorumConfig,
    hash: Sha256,
    violations: Vec<String>,
    events: u64,
    turns: u64,
    acked: u64,
    failed: u64,
    deletes: u64,
    reads: u64,
    stale_reads: u64,
    repairs: u64,
    disks_lost: u64,
}

fn node_id(i: usize) -> NodeId {
    let mut b = [0u8; 32];
    b[..8].copy_from_slice(&(i as u64).to_be_bytes());
    b[8] = 0x5a;
    NodeId(b)
}

impl MemSim {
    fn new(sc: MemoryScenario, seed: u64) -> Self {
        let nodes = (0..sc.nodes)
            .map(|i| SimNode {
                id: node_id(i),
                up: true,
                logs: BTreeMap::new(),
                ops: BTreeMap::new(),
            })
            .collect();
        let clients = (0..sc.conversations)
            .map(|c| Client {
                key: ConvKey {
                    owner: node_id(1_000_000 + c % 7),
                    conversation: ConversationId::parse(&format!("conv-{c}"))
                        .expect("a valid name"),
                },
                acked: BTreeSet::new(),
                deleted: BTreeSet::new(),
                deleted_floor: 0,
                pending: None,
                deleting: false,
                busy: false,
                attempt: 0,
            })
            .collect();
        let cfg = QuorumConfig {
            try_timeout_ms: sc.try_timeout_ms,
            max_tries: sc.max_tries,
            deadline_ms: sc.deadline_ms,
        };
        let mut s = MemSim {
            rng: Rng::new(seed ^ 0x4d45_4d4f),
            sc,
            now: 0,
            seq: 0,
            queue: BTreeMap::new(),
            nodes,
            clients,
            partition: None,
            lost: Vec::new(),
            next_op: 0,
            next_id: 1,
            cfg,
            hash: Sha256::new(),
            violations: Vec::new(),
            events: 0,
            turns: 0,
            acked: 0,
            failed: 0,
            deletes: 0,
            reads: 0,
            stale_reads: 0,
            repairs: 0,
            disks_lost: 0,
        };
        for c in 0..s.clients.len() {
            let at = s.rng.below(s.sc.think_ms.max(1));
            s.at(at, Ev::Turn { conv: c });
        }
        for n in 0..s.nodes.len() {
            let at = s.rng.below(s.sc.sync_interval_ms);
            s.at(at, Ev::Sync { node: n });
        }
        if s.sc.crash_per_s > 0.0 {
            let at = s.rng.exp(1_000.0 / s.sc.crash_per_s) as u64;
            s.at(at, Ev::Crash);
        }
        if s.sc.partition_per_s > 0.0 {
            let at = s.rng.exp(1_000.0 / s.sc.partition_per_s) as u64;
            s.at(at, Ev::Partition);
        }
        s
    }

    fn at(&mut self, t: u64, ev: Ev) {
        self.seq += 1;
        self.queue.insert((t, self.seq), ev);
    }

    fn faults_on(&self) -> bool {
        self.now < self.sc.duration_ms
    }

    fn can_reach(&self, a: usize, b: usize) -> bool {
        match &self.partition {
            Some(far) => far.contains(&a) == far.contains(&b),
            None => true,
        }
    }

    /// The members node `n` takes to be alive: those up that it can reach,
    /// or (a stale view) every node.
    fn view(&mut self, n: usize) -> Vec<NodeId> {
        let stale = self.faults_on() && self.rng.chance(self.sc.stale_view);
        (0..self.nodes.len())
            .filter(|&m| stale || (self.nodes[m].up && self.can_reach(n, m)))
            .map(|m| self.nodes[m].id)
            .collect()
    }

    /// Replicas a conversation should have: the nodes are all known
    /// members, up or not.
    fn planned(&self) -> usize {
        planned(self.sc.replicas, self.nodes.len())
    }

    fn index(&self, id: &NodeId) -> usize {
        let mut b = [0u8; 8];
        b.copy_from_slice(&id.0[..8]);
        u64::from_be_bytes(b) as usize
    }

    fn send(&mut self, from: usize, to: usize, op: OpId, key: ConvKey, msg: Msg) {
        if !self.nodes[to].up {
            // The dial fails: the sender hears of it a round trip later.
            if !matches!(msg, Msg::Applied(_) | Msg::Held(_) | Msg::Refused) {
                let t = self.now + 2 * self.sc.latency_ms;
                self.at(
                    t,
                    Ev::Deliver {
                        from: to,
                        to: from,
                        op,
                        key,
                        msg: Msg::Refused,
                    },
                );
            }
            return;
        }
        if !self.can_reach(from, to) || (self.faults_on() && self.rng.chance(self.sc.loss)) {
            return;
        }
        let copies = if self.faults_on() && self.rng.chance(self.sc.duplicate) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let t = self.now + self.sc.latency_ms + self.rng.below(self.sc.jitter_ms + 1);
            self.at(
                t,
                Ev::Deliver {
                    from,
                    to,
                    op,
                    key: key.clone(),
                    msg: msg.clone(),
                },
            );
        }
    }

    fn trace(&mut self, ev: &Ev) {
        let (a, b, c) = match ev {
            Ev::Deliver {
                from, to, op, msg, ..
            } => (
                *from as u64,
                *to as u64,
                op * 8
                    + match msg {
                        Msg::Write { .. } => 1,
                        Msg::Read => 2,
                        Msg::Applied(_) => 3,
                        Msg::Held(_) => 4,
                        Msg::Refused => 5,
                    },
            ),
            Ev::Timer { node, op } => (*node as u64, *op, 6),
            Ev::Turn { conv } => (*conv as u64, 0, 7),
            Ev::ClientTimeout { conv, attempt } => (*conv as u64, *attempt, 13),
            Ev::Crash => (0, 0, 8),
            Ev::Restart { node } => (*node as u64, 0, 9),
            Ev::Partition => (0, 0, 10),
            Ev::Heal => (0, 0, 11),
            Ev::Sync { node } => (*node as u64, 0, 12),
        };
        for v in [self.now, a, b, c] {
            self.hash.update(v.to_le_bytes());
        }
    }

    fn run(mut self) -> Report {
        let end = self.sc.duration_ms + self.sc.drain_ms;
        while let Some(((t, _), ev)) = self.queue.pop_first() {
            if t > end {
                break;
            }
            self.now = t;
            self.events += 1;
            self.trace(&ev);
            self.handle(ev);
        }
        self.check_end();
        Report {
            trace_hash: hex::encode(self.hash.finalize()),
            violations: self.violations,
            requests: self.turns,
            completed: self.acked,
            failed: self.failed,
            events: self.events,
            memory: Some(crate::MemoryFigures {
                deletes: self.deletes,
                reads: self.reads,
                stale_reads: self.stale_reads,
                repairs: self.repairs,
                disks_lost: self.disks_lost,
            }),
            ..Report::default()
        }
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Turn { conv } => self.turn(conv),
            Ev::ClientTimeout { conv, attempt } => {
                let c = &mut self.clients[conv];
                if c.busy && c.attempt == attempt {
                    c.busy = false;
                    self.failed += 1;
                    self.at(self.now, Ev::Turn { conv });
                }
            }
            Ev::Deliver {
                from,
                to,
                op,
                key,
                msg,
            } => self.deliver(from, to, op, key, msg),
            Ev::Timer { node, op } => {
                if self.nodes[node].up
                    && let Some(o) = self.nodes[node].ops.get_mut(&op)
                {
                    o.timer = None;
                    match &mut o.phase {
                        Phase::Reading(r) => r.handle_timeout(self.now),
                        Phase::Writing { w, .. } => w.handle_timeout(self.now),
                    }
                    self.pump(node, op);
                }
            }
            Ev::Crash => self.crash(),
            Ev::Restart { node } => self.nodes[node].up = true,
            Ev::Partition => {
                if self.faults_on() && self.partition.is_none() {
                    let far: BTreeSet<usize> = (0..self.nodes.len())
                        .filter(|_| self.rng.chance(0.4))
                        .collect();
                    self.partition = Some(far);
                    let t = self.now + self.sc.partition_ms;
                    self.at(t, Ev::Heal);
                }
                if self.faults_on() {
                    let t = self.now + self.rng.exp(1_000.0 / self.sc.partition_per_s) as u64;
                    self.at(t, Ev::Partition);
                }
            }
            Ev::Heal => self.partition = None,
            Ev::Sync { node } => {
                if self.nodes[node].up {
                    self.sync(node);
                }
                let t = self.now + self.sc.sync_interval_ms;
                self.at(t, Ev::Sync { node });
            }
        }
    }

    fn crash(&mut self) {
        if !self.faults_on() {
            return;
        }
        let t = self.now + self.rng.exp(1_000.0 / self.sc.crash_per_s) as u64;
        self.at(t, Ev::Crash);
        let up: Vec<usize> = (0..self.nodes.len())
            .filter(|&n| self.nodes[n].up)
            .collect();
        if up.len() <= 1 {
            return;
        }
        let n = up[self.rng.below(up.len() as u64) as usize];
        self.nodes[n].up = false;
        // Its operations die with it; what it acknowledged as a replica
        // is on its disk.
        self.nodes[n].ops.clear();
        // A lost disk counts until a partition-free sync round has passed.
        let settle = 2 * self.sc.sync_interval_ms + self.sc.restart_after_ms;
        let now = self.now;
        self.lost.retain(|&at| at + settle > now);
        if self.rng.chance(self.sc.disk_loss)
            && self.lost.len() + 1 < self.sc.replicas
            && !self.holds_a_last_copy(n)
        {
            self.nodes[n].logs.clear();
            self.lost.push(self.now);
            self.disks_lost += 1;
        }
        let t = self.now + self.sc.restart_after_ms;
        self.at(t, Ev::Restart { node: n });
    }

    /// Whether node `n`'s disk is the only one holding some acknowledged
    /// entry that no deletion has removed.
    fn holds_a_last_copy(&self, n: usize) -> bool {
        self.clients.iter().any(|c| {
            let Some(log) = self.nodes[n].logs.get(&c.key) else {
                return false;
            };
            log.entries().any(|e| {
                c.acked.contains(&e.stamp.id)
                    && !self.nodes.iter().enumerate().any(|(m, other)| {
                        m != n
                            && other
                                .logs
                                .get(&c.key)
                                .is_some_and(|l| l.entries().any(|o| o.stamp.id == e.stamp.id))
                    })
            })
        })
    }

    fn new_op(&mut self, node: usize, op: Op) {
        self.next_op += 1;
        let id = self.next_op;
        self.nodes[node].ops.insert(id, op);
        self.pump(node, id);
    }

    fn read_op(&mut self, node: usize, key: ConvKey, purpose: Purpose, all: bool) {
        let view = self.view(node);
        let set = replicas(&key, &view, self.sc.replicas);
        let need = if all {
            set.len()
        } else {
            read_quorum(self.planned())
        };
        let (expect, attempt) = match &purpose {
            Purpose::Turn { conv, .. } | Purpose::Delete { conv } => {
                let c = &self.clients[*conv];
                (c.acked.iter().copied().collect(), c.attempt)
            }
            _ => (Vec::new(), 0),
        };
        let r = Read::new(
            set.clone(),
            need,
            MAX_REPLICA_FRAME_TEXT_BYTES,
            self.now,
            self.cfg,
        );
        let op = Op {
            key,
            phase: Phase::Reading(r),
            purpose,
            replicas: set,
            attempt,
            expect,
            timer: None,
        };
        self.new_op(node, op);
    }

    fn turn(&mut self, conv: usize) {
        let c = &self.clients[conv];
        if c.busy || (c.pending.is_none() && !self.faults_on()) {
            return;
        }
        let up: Vec<usize> = (0..self.nodes.len())
            .filter(|&n| self.nodes[n].up)
            .collect();
        if up.is_empty() {
            self.at(self.now + 100, Ev::Turn { conv });
            return;
        }
        let node = up[self.rng.below(up.len() as u64) as usize];
        if self.clients[conv].pending.is_none() {
            self.turns += 1;
            let deleting = self.rng.chance(self.sc.delete_share);
            let c = &mut self.clients[conv];
            c.deleting = deleting;
            c.pending = Some(self.next_id);
            self.next_id += 1;
        }
        let patience = 2 * self.sc.deadline_ms + 1_000;
        let c = &mut self.clients[conv];
        c.busy = true;
        c.attempt += 1;
        let (attempt, key, id, deleting) = (c.attempt, c.key.clone(), c.pending, c.deleting);
        self.at(self.now + patience, Ev::ClientTimeout { conv, attempt });
        let purpose = match (deleting, id) {
            (false, Some(id)) => Purpose::Turn { conv, id },
            _ => Purpose::Delete { conv },
        };
        self.read_op(node, key, purpose, false);
    }

    fn sync(&mut self, node: usize) {
        let keys: Vec<ConvKey> = self.nodes[node].logs.keys().cloned().collect();
        for key in keys {
            let busy = self.nodes[node]
                .ops
                .values()
                .any(|o| o.key == key && matches!(o.purpose, Purpose::Sync | Purpose::Background));
            if busy {
                continue;
            }
            let view = self.view(node);
            let set = replicas(&key, &view, self.sc.replicas);
            if set.contains(&self.nodes[node].id) {
                self.read_op(node, key, Purpose::Sync, true);
            } else if let Some(log) = self.nodes[node].logs.get(&key) {
                // Not a replica any more: hand what it holds to those that
                // are (a write of older data is refused or merged).
                let floor = log.floor();
                let entries: Vec<Entry> = log.entries().cloned().collect();
                let lowest = entries.first().map_or(u64::MAX, |e| e.stamp.seq);
                let w = Write::new(set.clone(), self.planned(), lowest, self.now, self.cfg);
                let op = Op {
                    key,
                    phase: Phase::Writing { w, floor, entries },
                    purpose: Purpose::Background,
                    replicas: set,
                    attempt: 0,
                    expect: Vec::new(),
                    timer: None,
                };
                self.new_op(node, op);
            }
        }
    }

    fn deliver(&mut self, from: usize, to: usize, op: OpId, key: ConvKey, msg: Msg) {
        if !self.nodes[to].up {
            return;
        }
        let max = self.sc.max_entries;
        match msg {
            Msg::Write { floor, entries } => {
                let log = self.nodes[to].logs.entry(key.clone()).or_default();
                let applied = log.write(floor, &entries, max);
                self.send(to, from, op, key, Msg::Applied(applied));
            }
            Msg::Read => {
                let held = self.nodes[to]
                    .logs
                    .get(&key)
                    .map(|l| l.read(MAX_REPLICA_FRAME_TEXT_BYTES))
                    .unwrap_or_default();
                self.send(to, from, op, key, Msg::Held(held));
            }
            reply => {
                let now = self.now;
                let from_id = self.nodes[from].id;
                let Some(o) = self.nodes[to].ops.get_mut(&op) else {
                    return;
                };
                match (&mut o.phase, reply) {
                    (Phase::Reading(r), Msg::Held(h)) => r.handle_held(from_id, h, now),
                    (Phase::Reading(r), Msg::Refused) => r.handle_failed(from_id, now),
                    (Phase::Writing { w, .. }, Msg::Applied(a)) => {
                        w.handle_applied(from_id, a, now)
                    }
                    (Phase::Writing { w, .. }, Msg::Refused) => w.handle_failed(from_id, now),
                    _ => return,
                }
                self.pump(to, op);
            }
        }
    }

    /// Carries out what an op's machine asks for, and acts on its outcome.
    fn pump(&mut self, node: usize, id: OpId) {
        let now = self.now;
        let Some(o) = self.nodes[node].ops.get_mut(&id) else {
            return;
        };
        let key = o.key.clone();
        let mut sends: Vec<(NodeId, Msg)> = Vec::new();
        let mut read_outcome = None;
        let mut write_outcome = None;
        let done;
        let timeout;
        match &mut o.phase {
            Phase::Reading(r) => {
                while let Some(to) = r.poll_transmit(now) {
                    sends.push((to, Msg::Read));
                }
                while let Some(p) = r.poll_repair() {
                    self.repairs += 1;
                    let msg = Msg::Write {
                        floor: p.floor,
                        entries: p.entries,
                    };
                    sends.push((p.to, msg));
                }
                read_outcome = r.poll_outcome();
                done = r.is_done();
                timeout = r.poll_timeout();
            }
            Phase::Writing { w, floor, entries } => {
                while let Some(to) = w.poll_transmit(now) {
                    let msg = Msg::Write {
                        floor: *floor,
                        entries: entries.clone(),
                    };
                    sends.push((to, msg));
                }
                write_outcome = w.poll_outcome();
                done = w.is_done();
                timeout = w.poll_timeout();
            }
        }
        let timer = match timeout {
            Some(t) if o.timer != Some(t) => {
                o.timer = Some(t);
                Some(t)
            }
            _ => None,
        };
        for (to, msg) in sends {
            let to = self.index(&to);
            // Repairs' replies find no op and are dropped.
            self.send(node, to, id, key.clone(), msg);
        }
        if let Some(t) = timer {
            self.at(t.max(now), Ev::Timer { node, op: id });
        }
        if let Some(out) = read_outcome {
            self.read_done(node, id, out);
        } else if let Some(out) = write_outcome {
            self.write_done(node, id, out);
        } else if done {
            self.nodes[node].ops.remove(&id);
        }
    }

    fn read_done(&mut self, node: usize, id: OpId, out: ReadOutcome) {
        let Some(o) = self.nodes[node].ops.get(&id) else {
            return;
        };
        let (conv, turn) = match o.purpose {
            Purpose::Turn { conv, id } => (conv, Some(id)),
            Purpose::Delete { conv } => (conv, None),
            Purpose::Sync | Purpose::Background => {
                // Its repairs are out; the rest come with later replies.
                self.pump_done(node, id);
                return;
            }
        };
        if self.clients[conv].attempt != o.attempt {
            self.nodes[node].ops.remove(&id);
            return;
        }
        let held = match out {
            ReadOutcome::Read(h) => h,
            ReadOutcome::Failed { .. } => {
                self.nodes[node].ops.remove(&id);
                self.client_failed(conv);
                return;
            }
        };
        self.reads += 1;
        let mut seen = BTreeSet::new();
        for e in &held.entries {
            if !seen.insert(e.stamp.id) {
                self.violations.push(format!(
                    "{}: a read holds request {} twice",
                    o.key.conversation, e.stamp.id
                ));
            }
        }
        let expect_floor = self.clients[conv].deleted_floor;
        if held.floor < expect_floor || o.expect.iter().any(|i| !seen.contains(i)) {
            self.stale_reads += 1;
        }
        let newest = held.entries.last().map(|e| e.stamp.seq);
        let (floor, lowest, entries) = match turn {
            Some(rid) => {
                let stamp = held
                    .entries
                    .iter()
                    .find(|e| e.stamp.id == rid)
                    .map(|e| e.stamp)
                    .unwrap_or(Stamp {
                        seq: next_seq(newest, self.now),
                        id: rid,
                    });
                let entry = Entry {
                    stamp,
                    turns: vec![Turn {
                        role: Role::User,
                        text: format!("turn {rid}"),
                        tokens: 2,
                    }],
                };
                (held.floor, stamp.seq, vec![entry])
            }
            None => (
                deletion_floor(newest, held.floor, self.now),
                u64::MAX,
                Vec::new(),
            ),
        };
        let planned = planned(self.sc.replicas, self.nodes.len());
        let Some(o) = self.nodes[node].ops.get_mut(&id) else {
            return;
        };
        let w = Write::new(o.replicas.clone(), planned, lowest, self.now, self.cfg);
        o.phase = Phase::Writing { w, floor, entries };
        o.timer = None;
        self.pump(node, id);
    }

    /// An op whose outcome is in: kept only while its machine has more to
    /// send.
    fn pump_done(&mut self, node: usize, id: OpId) {
        let done = match self.nodes[node].ops.get(&id).map(|o| &o.phase) {
            Some(Phase::Reading(r)) => r.is_done(),
            Some(Phase::Writing { w, .. }) => w.is_done(),
            None => false,
        };
        if done {
            self.nodes[node].ops.remove(&id);
        }
    }

    fn write_done(&mut self, node: usize, id: OpId, out: WriteOutcome) {
        let Some(o) = self.nodes[node].ops.get(&id) else {
            return;
        };
        let (conv, attempt, floor) = match (&o.purpose, &o.phase) {
            (
                Purpose::Turn { conv, .. } | Purpose::Delete { conv },
                Phase::Writing { floor, .. },
            ) => (*conv, o.attempt, *floor),
            _ => {
                self.pump_done(node, id);
                return;
            }
        };
        let rid = match o.purpose {
            Purpose::Turn { id, .. } => Some(id),
            _ => None,
        };
        self.pump_done(node, id);
        let c = &mut self.clients[conv];
        if c.attempt != attempt || !c.busy {
            return;
        }
        match out {
            WriteOutcome::Acked { .. } => {
                match rid {
                    Some(r) => {
                        c.acked.insert(r);
                    }
                    None => {
                        let gone = std::mem::take(&mut c.acked);
                        c.deleted.extend(gone);
                        c.deleted_floor = c.deleted_floor.max(floor);
                        self.deletes += 1;
                    }
                }
                c.pending = None;
                c.busy = false;
                self.acked += 1;
                let think = self.rng.exp(self.sc.think_ms as f64) as u64;
                self.at(self.now + think + 1, Ev::Turn { conv });
            }
            WriteOutcome::Stale { .. } | WriteOutcome::Failed { .. } => self.client_failed(conv),
        }
    }

    /// The attempt ended without its turn kept: the client tries again,
    /// with the same request id, through another node.
    fn client_failed(&mut self, conv: usize) {
        let c = &mut self.clients[conv];
        c.busy = false;
        self.failed += 1;
        // Its op may still be writing: wait until any of it is over, so
        // two attempts of one client never overlap.
        let wait = 2 * self.sc.deadline_ms;
        self.at(self.now + wait, Ev::Turn { conv });
    }

    fn check_end(&mut self) {
        let mut violations = std::mem::take(&mut self.violations);
        self.check_end_into(&mut violations);
        self.violations = violations;
    }

    fn check_end_into(&self, violations: &mut Vec<String>) {
        let all: Vec<NodeId> = self.nodes.iter().map(|n| n.id).collect();
        for c in &self.clients {
            let name = &c.key.conversation;
            let set = replicas(&c.key, &all, self.sc.replicas);
            let empty = ReplicaLog::default();
            let logs: Vec<&ReplicaLog> = set
                .iter()
                .map(|id| {
                    self.nodes[self.index(id)]
                        .logs
                        .get(&c.key)
                        .unwrap_or(&empty)
                })
                .collect();
            let Some(first) = logs.first() else {
                continue;
            };
            if logs.iter().any(|l| l != first) {
                let shapes: Vec<String> = logs
                    .iter()
                    .map(|l| format!("floor {} with {} entries", l.floor(), l.len()))
                    .collect();
                violations.push(format!(
                    "{name}: replicas did not converge: {}",
                    shapes.join(", ")
                ));
            }
            for (l, id) in logs.iter().zip(&set) {
                let mut ids = EntrySet::default();
                let mut seen = BTreeSet::new();
                for e in l.entries() {
                    ids.merge(e);
                    if !seen.insert(e.stamp.id) {
                        violations.push(format!("{name}: request {} held twice", e.stamp.id));
                    }
                    if c.deleted.contains(&e.stamp.id) {
                        violations.push(format!(
                            "{name}: request {} came back after its deletion was acknowledged",
                            e.stamp.id
                        ));
                    }
                }
                if l.floor() < c.deleted_floor {
                    violations.push(format!(
                        "{name}: a replica's floor is {} after a deletion to {} was acknowledged",
                        l.floor(),
                        c.deleted_floor
                    ));
                }
                for r in &c.acked {
                    if !seen.contains(r) {
                        violations.push(format!(
                            "{name}: acknowledged request {r} is missing on replica {}",
                            self.index(id)
                        ));
                    }
                }
            }
        }
    }
}

/// Runs one seed of a memory scenario.
pub fn run_memory(sc: &MemoryScenario, seed: u64) -> Report {
    MemSim::new(sc.clone(), seed).run()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn faulty() -> MemoryScenario {
        MemoryScenario {
            nodes: 6,
            conversations: 8,
            duration_ms: 20_000,
            drain_ms: 20_000,
            loss: 0.05,
            duplicate: 0.05,
            crash_per_s: 0.3,
            disk_loss: 0.3,
            partition_per_s: 0.05,
            delete_share: 0.05,
            stale_view: 0.1,
            ..MemoryScenario::default()
        }
    }

    #[test]
    fn a_faulty_mesh_keeps_every_acknowledged_turn_and_converges() {
        for seed in 0..6 {
            let r = run_memory(&faulty(), seed);
            assert!(r.violations.is_empty(), "seed {seed}: {:?}", r.violations);
            assert!(r.completed > 100, "seed {seed}: {} kept", r.completed);
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_trace() {
        let a = run_memory(&faulty(), 3);
        let b = run_memory(&faulty(), 3);
        assert_eq!(a.trace_hash, b.trace_hash);
        assert_ne!(a.trace_hash, run_memory(&faulty(), 4).trace_hash);
    }

    #[test]
    fn losing_every_replica_at_once_is_caught() {
        // The checker is not blind: wipe a conversation's whole replica
        // set after its turns were acknowledged, and it is reported.
        let sc = MemoryScenario {
            nodes: 4,
            conversations: 2,
            duration_ms: 5_000,
            drain_ms: 5_000,
            ..MemoryScenario::default()
        };
        let mut sim = MemSim::new(sc, 1);
        let end = 10_000;
        while let Some(((t, _), ev)) = sim.queue.pop_first() {
            if t > end {
                break;
            }
            sim.now = t;
            sim.handle(ev);
        }
        assert!(!sim.clients[0].acked.is_empty());
        for n in &mut sim.nodes {
            n.logs.remove(&sim.clients[0].key);
        }
        sim.check_end();
        assert!(
            sim.violations.iter().any(|v| v.contains("missing")),
            "{:?}",
            sim.violations
        );
    }
}
