//! zavod-sim: a deterministic simulation of a zavod mesh.
//!
//! Virtual nodes are built from the zavod-proto state machines the real
//! node runs: the membership-gated `MeshView` fed by signed capacity
//! announcements (sent by the node's own `Announcer`), the `BreakerBoard`,
//! the `Placer`, and for every request the entry machine
//! (`zavod_proto::chat::entry::Entry`) the node pumps: redirect, relay, local
//! run, resume after failure, breaker outcomes, settlement and booking are
//! its decisions, carried out here over a simulated network (seeded latency
//! and jitter; loss; duplication; partitions; crashes and restarts; slow
//! nodes; a crash closes the dead node's connections, and the others hear
//! of it a hop later) with a cost-model engine (`slots` runs at a time, each a
//! prefill delay then one token per `1/tokens_per_s`; runs beyond the
//! slots wait first come first served, and one that may not wait is
//! turned away as full) and a virtual clock. Clients keep their answer in an
//! `AnswerStream`, as `zavod chat` does; a share of them is adversarial
//! (see [`requests`]). Every token has a text derived from its index, and
//! a completed answer must be exactly the concatenation of its tokens'
//! texts.
//!
//! Invariants are checked as events are processed (and at the end):
//! - every request ends exactly once, completed or with an error, within
//!   `request_bound_ms`;
//! - the token stream a client sees has no gap and no duplicate, across
//!   failovers;
//! - no request is placed on a node whose breaker is open at the entry, that
//!   the entry's view holds gone, or that is not a member;
//! - breakers count only faults the entry saw; one probe per half-open
//!   peer; every generated token charged once; a turn recorded at most
//!   once (see [`requests`]);
//! - after a partition heals, every view agrees on who is in the mesh (not
//!   gone) within `agree_within_ms`;
//! - load spread (max over mean of active jobs among serving nodes) stays
//!   within `max_spread`.
//!
//! Conversations: a scenario with `conversations` holds that many chats,
//! each attached to one entry; a turn's prefill is the whole history, or
//! only the new turn on a node whose cost-model cache holds the
//! conversation (reported in its capacity report's cache summary, as the
//! real node's engine reports its own). Hit rate and time to first token
//! are reported.
//!
//! Determinism: all randomness comes from the seed; events are ordered by
//! (time, sequence number); maps are BTreeMaps. The trace hash covers every
//! event processed, so the same seed and scenario give the same hash.
//!
//! Why this file passes 600 lines: the scenario, the event loop, gossip,
//! crashes and the checks share the `Sim` state; requests live in
//! [`requests`].

pub mod memory;
mod requests;

use requests::{Adversary, SimAttempt};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use zavod_proto::chat::entry::{AttemptId, Entry};
use zavod_proto::chat::failover::{AnswerStream, OnFailure};
use zavod_proto::ids::{NodeId, RequestId};
use zavod_proto::mesh::announcer::Announcer;
use zavod_proto::mesh::breaker::{BreakerBoard, BreakerConfig, BreakerState, Outcome};
use zavod_proto::mesh::capacity::{CapacityReport, ModelOffer, Resources, WorkerLoad};
use zavod_proto::mesh::placer::{Ask, Placer, PlacerConfig};
use zavod_proto::mesh::score::{Weights, splitmix64};
use zavod_proto::mesh::view::{Announcement, Liveness, MeshView, VerifiedAnnouncement, ViewConfig};
use zavod_proto::trust::{
    Authority, GrantBody, GrantCheck, Keypair, Membership, MembershipBody, mint_grant, sign_report,
};
use zavod_proto::wire::StopReason;

const MODEL: &str = "sim-model";

/// A scenario file (`simulations/*.toml`). Unknown keys are errors.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Scenario {
    /// Members serving the model.
    pub nodes: usize,
    /// Members without the model (entries and routers only).
    pub entries: usize,
    /// Nodes with the model but a membership from another mesh.
    pub non_members: usize,
    /// New requests arrive until this time; the run then drains.
    pub duration_ms: u64,
    pub drain_ms: u64,
    pub requests_per_s: f64,
    pub max_tokens: u32,
    pub slots: u32,
    pub tokens_per_s: f64,
    pub prefill_ms: u64,
    pub gossip_interval_ms: u64,
    /// A node with nothing new announces this often (0: twice the gossip
    /// interval, as the node's defaults have it).
    pub heartbeat_ms: u64,
    pub latency_ms: u64,
    pub jitter_ms: u64,
    /// Probability a gossip message is lost / delivered twice.
    pub loss: f64,
    pub duplicate: f64,
    pub partitions: Vec<Partition>,
    /// Mean node crashes per second across the mesh.
    pub crash_per_s: f64,
    pub restart_after_ms: u64,
    pub slow_nodes: usize,
    /// Speed of slow nodes, as a fraction of `tokens_per_s`.
    pub slow_factor: f64,
    /// A client replaces a target silent this long.
    pub stall_ms: u64,
    pub max_failovers: u32,
    /// Candidates the choices are drawn from (0: all; 1: argmax).
    pub pool: usize,
    /// Candidates drawn; the least loaded wins.
    pub choices: usize,
    /// Draw the fault rates from the seed (swarm testing).
    pub swarm: bool,
    /// Conversations held at once; each sends a turn, waits for the
    /// answer, thinks, and sends the next (0: one-off requests arriving at
    /// `requests_per_s` instead).
    pub conversations: usize,
    /// Turns of a conversation; a finished one is replaced by a new one.
    pub turns: u32,
    /// Mean pause between an answer and the next turn.
    pub think_ms: u64,
    /// New prompt tokens each turn adds.
    pub turn_prompt_tokens: u32,
    /// Prompt tokens a node prefills per second.
    pub prefill_tokens_per_s: f64,
    /// Conversations whose prompt cache a node keeps (least recently used
    /// out).
    pub cache_entries: usize,
    /// Entries prefer the node holding a conversation's cache.
    pub affinity: bool,
    /// Cache hits wanted of the turns after a conversation's first (checked
    /// at the end of a run; 0 checks nothing).
    pub min_hit_rate: f64,
    pub max_spread: f64,
    /// Mean active jobs per serving node above which spread is checked.
    pub spread_min_mean: f64,
    pub agree_within_ms: u64,
    pub request_bound_ms: u64,
    /// Share of clients that misbehave (forged resumes, relays while the
    /// target streams, input every target refuses).
    pub adversarial: f64,
    pub view: ViewConfig,
    pub breaker: BreakerConfig,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            nodes: 8,
            entries: 2,
            non_members: 1,
            duration_ms: 20_000,
            drain_ms: 30_000,
            requests_per_s: 4.0,
            max_tokens: 64,
            slots: 4,
            tokens_per_s: 40.0,
            prefill_ms: 80,
            gossip_interval_ms: 1_000,
            heartbeat_ms: 0,
            latency_ms: 2,
            jitter_ms: 8,
            loss: 0.0,
            duplicate: 0.0,
            partitions: Vec::new(),
            crash_per_s: 0.0,
            restart_after_ms: 3_000,
            slow_nodes: 0,
            slow_factor: 0.25,
            stall_ms: 1_500,
            max_failovers: 4,
            pool: PlacerConfig::default().pool,
            choices: PlacerConfig::default().choices,
            swarm: false,
            conversations: 0,
            turns: 6,
            think_ms: 2_000,
            turn_prompt_tokens: 500,
            prefill_tokens_per_s: 700.0,
            cache_entries: 16,
            affinity: true,
            min_hit_rate: 0.0,
            max_spread: 4.0,
            spread_min_mean: 2.0,
            agree_within_ms: 6_000,
            request_bound_ms: 30_000,
            adversarial: 0.0,
            view: ViewConfig::default(),
            breaker: BreakerConfig::default(),
        }
    }
}

/// Cuts `fraction` of the nodes off from the rest between two times.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Partition {
    pub start_ms: u64,
    pub end_ms: u64,
    pub fraction: f64,
}

impl Scenario {
    /// How often a node with nothing new announces.
    pub fn heartbeat(&self) -> u64 {
        if self.heartbeat_ms > 0 {
            self.heartbeat_ms
        } else {
            2 * self.gossip_interval_ms
        }
    }

    pub fn from_toml(text: &str) -> Result<Self, String> {
        let s: Scenario = toml::from_str(text).map_err(|e| e.to_string())?;
        if s.nodes == 0 || s.nodes + s.entries == 0 {
            return Err("a scenario needs at least one node with the model".into());
        }
        if !s.tokens_per_s.is_finite()
            || s.tokens_per_s <= 0.0
            || s.gossip_interval_ms == 0
            || s.slots == 0
        {
            return Err("tokens_per_s, gossip_interval_ms and slots must be positive".into());
        }
        Ok(s)
    }
}

/// A seeded generator (splitmix64).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(splitmix64(seed ^ 0x5eed_2a40_d00d_f00d))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        splitmix64(self.0)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }
    /// Exponentially distributed with the given mean.
    pub fn exp(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.unit()).ln()
    }
}

/// Figures of a memory scenario ([`memory`]).
#[derive(Debug, Clone, Default)]
pub struct MemoryFigures {
    /// Deletions acknowledged.
    pub deletes: u64,
    /// Reads for turns, and those that missed an acknowledged entry.
    pub reads: u64,
    pub stale_reads: u64,
    pub repairs: u64,
    pub disks_lost: u64,
}

/// What one run produced.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub trace_hash: String,
    pub violations: Vec<String>,
    pub requests: u64,
    pub completed: u64,
    pub failed: u64,
    pub failovers: u64,
    /// Placements a full target turned away (each placed again).
    pub turned_away: u64,
    pub events: u64,
    /// Largest and mean load spread seen (max over mean of active jobs).
    pub max_spread: f64,
    pub mean_spread: f64,
    pub gossip_bytes_per_node_per_s: f64,
    /// Turns after a conversation's first, and of them those whose node
    /// held the conversation's cache.
    pub later_turns: u64,
    pub cache_hits: u64,
    /// Time to first token of every completed request, in ms.
    pub first_token_ms: Vec<u64>,
    /// Requests that ended with an error, by the error's message.
    pub errors: BTreeMap<String, u64>,
    pub memory: Option<MemoryFigures>,
}

struct Node {
    id: NodeId,
    key: Keypair,
    membership: Membership,
    member: bool,
    has_model: bool,
    up: bool,
    /// Bumped on every crash: work from before is void.
    epoch: u32,
    view: MeshView,
    breakers: BreakerBoard,
    /// What this node, as an entry, placed and is still running.
    placer: Placer,
    /// When it announces: the node's own announcer.
    announcer: Announcer,
    seq: u64,
    speed: f64,
    /// Runs it holds: in a slot, or waiting for one.
    jobs: BTreeMap<(u64, AttemptId), Job>,
    /// Runs waiting for a slot, first come first served (some may have
    /// been stopped meanwhile: they are skipped).
    waiting: std::collections::VecDeque<(u64, AttemptId)>,
    /// As an entry: the request holding each half-open peer's probe.
    probes: BTreeMap<NodeId, RequestId>,
    /// Conversations whose prompt cache this node holds, most recent
    /// first (the cost model's KV cache).
    cache: Vec<u64>,
}

#[derive(Debug, Clone)]
struct Job {
    /// Next token, counted from this job's start (as a target counts).
    next: u32,
    /// Tokens this job may generate.
    budget: u32,
    /// It holds a slot (else it waits for one).
    in_slot: bool,
}

/// The affinity key of conversation `c` (as the real entry derives one
/// from a conversation's opening).
fn cache_key(c: u64) -> u64 {
    splitmix64(c ^ 0xc0ff_ee00)
}

/// The text and id of the answer's token `index` (the cost model's
/// "generation").
fn token_text(index: u32) -> String {
    format!("t{index} ")
}

#[derive(Debug, Clone, PartialEq)]
enum State {
    Running,
    Completed,
    Failed(String),
}

#[derive(Debug)]
struct Request {
    issued_ms: u64,
    max_tokens: u32,
    entry: usize,
    /// The entry's epoch when the request arrived: a crash loses it.
    entry_epoch: u32,
    state: State,
    ends: u32,
    ended_ms: u64,
    failovers: u32,
    /// Times a full target turned it away, and whether the last attempt
    /// ended so (its next placement is no failover).
    turned_away: u32,
    last_turned_away: bool,
    /// The client's answer so far.
    stream: AnswerStream,
    /// The entry's machine for this request, while the entry has it.
    machine: Option<Entry>,
    attempts: BTreeMap<AttemptId, SimAttempt>,
    /// The redirected run the client streams from.
    source: Option<AttemptId>,
    client_progress_ms: u64,
    /// The conversation and turn (from 0) this request is, if any.
    conv: Option<(u64, u32)>,
    /// When its first token reached the client.
    first_token_at: Option<u64>,
    /// Whether its first placement found the conversation's cache.
    hit: Option<bool>,
    adversary: Option<Adversary>,
    /// Tokens the entry charged (settled and charged).
    charged: u64,
    settles: u32,
    records: u32,
    /// Nodes the entry saw fail for this request (ground truth the sim
    /// fed it).
    faulty: BTreeSet<NodeId>,
    timer_at: Option<u64>,
    /// An adversary's next token from the entry starts its answer over.
    fresh_source: bool,
    /// The entry crashed or ran out of time: its books cannot be checked.
    books_lost: bool,
}

#[derive(Debug, Clone)]
enum Ev {
    Gossip(usize),
    Deliver {
        to: Vec<usize>,
        from: usize,
        ann: Rc<VerifiedAnnouncement>,
    },
    Arrive,
    /// A conversation's next turn is sent.
    Turn {
        conv: u64,
        turn: u32,
    },
    Run {
        target: usize,
        request: u64,
        attempt: AttemptId,
        epoch: u32,
    },
    Step {
        target: usize,
        request: u64,
        attempt: AttemptId,
        epoch: u32,
    },
    /// A run's token `index` (counted from its start), or with `stop` its
    /// end (`index` `u32::MAX`: an end with no token).
    Token {
        request: u64,
        attempt: AttemptId,
        index: u32,
        stop: Option<StopReason>,
    },
    /// Whoever reads a run checks it is not silent.
    ReadTimeout {
        request: u64,
        attempt: AttemptId,
    },
    /// A redirected run's report reaches its entry.
    Report {
        request: u64,
        attempt: AttemptId,
    },
    EntryTimer {
        request: u64,
    },
    Crash,
    Restart(usize),
    /// `at` sees its connection to `peer` close (`peer`'s process died:
    /// its sockets are closed, and the peer's side hears of it).
    Disconnected {
        at: usize,
        peer: usize,
    },
    Sample,
    CheckAgreement,
}

impl Ev {
    /// Whether the event belongs to a request or a pending check, so the
    /// run must not end before it.
    fn is_work(&self) -> bool {
        matches!(
            self,
            Ev::Run { .. }
                | Ev::Turn { .. }
                | Ev::Step { .. }
                | Ev::Token { .. }
                | Ev::ReadTimeout { .. }
                | Ev::Report { .. }
                | Ev::EntryTimer { .. }
                | Ev::CheckAgreement
        )
    }

    fn tag(&self) -> u8 {
        match self {
            Ev::Gossip(_) => 1,
            Ev::Deliver { .. } => 2,
            Ev::Arrive => 3,
            Ev::Run { .. } => 4,
            Ev::Step { .. } => 5,
            Ev::Token { .. } => 6,
            Ev::ReadTimeout { .. } => 7,
            Ev::Crash => 8,
            Ev::Restart(_) => 9,
            Ev::Sample => 10,
            Ev::CheckAgreement => 11,
            Ev::Turn { .. } => 12,
            Ev::Report { .. } => 13,
            Ev::EntryTimer { .. } => 14,
            Ev::Disconnected { .. } => 15,
        }
    }
}

pub struct Sim {
    sc: Scenario,
    rng: Rng,
    now: u64,
    seq: u64,
    queue: BTreeMap<(u64, u64), Ev>,
    /// Events in `queue` for which [`Ev::is_work`] holds.
    pending_work: u64,
    nodes: Vec<Node>,
    authorities: BTreeSet<NodeId>,
    requests: Vec<Request>,
    hash: Sha256,
    violations: Vec<String>,
    events: u64,
    spreads: Vec<f64>,
    gossip_bytes: u64,
    last_churn_ms: u64,
    first_token_ms: Vec<u64>,
    later_turns: u64,
    cache_hits: u64,
    /// Conversations started so far (the next one's id).
    conversations_started: u64,
    /// The entry each running conversation attached to.
    conv_entry: BTreeMap<u64, usize>,
}

const SAMPLE_MS: u64 = 250;

impl Sim {
    pub fn new(mut sc: Scenario, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        if sc.swarm {
            // Swarm testing: each seed draws its own fault mix.
            sc.loss *= rng.unit();
            sc.duplicate *= rng.unit();
            sc.crash_per_s *= rng.unit();
            sc.jitter_ms = rng.below(sc.jitter_ms + 1);
        }
        let key = |rng: &mut Rng| {
            let mut b = [0u8; 32];
            for c in b.chunks_mut(8) {
                c.copy_from_slice(&rng.next_u64().to_le_bytes());
            }
            Keypair::from_secret(b)
        };
        let authority = Authority::new(key(&mut rng));
        let foreign = Authority::new(key(&mut rng));
        let authorities: BTreeSet<NodeId> = [authority.id()].into();
        let total = sc.nodes + sc.entries + sc.non_members;
        let mut nodes = Vec::with_capacity(total);
        for i in 0..total {
            let k = key(&mut rng);
            let id = k.public();
            let member = i < sc.nodes + sc.entries;
            let body = MembershipBody {
                member: id,
                issued_at_ms: 0,
                expires_at_ms: u64::MAX / 2,
            };
            let membership = if member {
                authority.certify_member(body)
            } else {
                foreign.certify_member(body)
            };
            let has_model = i < sc.nodes || !member;
            let slow = i < sc.slow_nodes;
            nodes.push(Node {
                id,
                key: k,
                membership,
                member,
                has_model,
                up: true,
                epoch: 0,
                view: MeshView::new(authorities.clone(), sc.view.clone()),
                breakers: BreakerBoard::new(sc.breaker.clone()),
                placer: Placer::new(),
                announcer: Announcer::new(sc.heartbeat()),
                seq: 0,
                speed: if slow {
                    sc.tokens_per_s * sc.slow_factor
                } else {
                    sc.tokens_per_s
                },
                jobs: BTreeMap::new(),
                waiting: std::collections::VecDeque::new(),
                probes: BTreeMap::new(),
                cache: Vec::new(),
            });
        }
        let mut sim = Sim {
            sc,
            rng,
            now: 0,
            seq: 0,
            queue: BTreeMap::new(),
            pending_work: 0,
            nodes,
            authorities,
            requests: Vec::new(),
            hash: Sha256::new(),
            violations: Vec::new(),
            events: 0,
            spreads: Vec::new(),
            gossip_bytes: 0,
            last_churn_ms: 0,
            first_token_ms: Vec::new(),
            later_turns: 0,
            cache_hits: 0,
            conversations_started: 0,
            conv_entry: BTreeMap::new(),
        };
        for i in 0..sim.nodes.len() {
            let first = sim.rng.below(sim.sc.gossip_interval_ms);
            sim.at(first, Ev::Gossip(i));
        }
        // Requests start once the first round of gossip has spread.
        let warmup = sim.sc.gossip_interval_ms + 200;
        if sim.sc.conversations == 0 {
            sim.at(warmup, Ev::Arrive);
        } else {
            // Conversations start spread over the first think time.
            for _ in 0..sim.sc.conversations {
                let conv = sim.conversations_started;
                sim.conversations_started += 1;
                let t = warmup + sim.rng.below(sim.sc.think_ms.max(1));
                sim.at(t, Ev::Turn { conv, turn: 0 });
            }
        }
        sim.at(warmup, Ev::Sample);
        if sim.sc.crash_per_s > 0.0 {
            let dt = sim.rng.exp(1_000.0 / sim.sc.crash_per_s) as u64;
            sim.at(warmup + dt, Ev::Crash);
        }
        for p in sim.sc.partitions.clone() {
            sim.at(p.end_ms + sim.sc.agree_within_ms, Ev::CheckAgreement);
        }
        sim
    }

    fn at(&mut self, t: u64, ev: Ev) {
        self.seq += 1;
        self.pending_work += u64::from(ev.is_work());
        self.queue.insert((t.max(self.now), self.seq), ev);
    }

    fn violation(&mut self, m: String) {
        if self.violations.len() < 20 {
            self.violations.push(format!("t={} ms: {m}", self.now));
        }
    }

    /// Whether a and b are cut off from each other now.
    fn cut(&self, a: usize, b: usize) -> bool {
        let n = self.nodes.len();
        self.sc.partitions.iter().any(|p| {
            if self.now < p.start_ms || self.now >= p.end_ms {
                return false;
            }
            let side = |i: usize| (i as f64) < p.fraction * n as f64;
            side(a) != side(b)
        })
    }

    fn latency(&mut self) -> u64 {
        self.sc.latency_ms + self.rng.below(self.sc.jitter_ms + 1)
    }

    fn report_of(&mut self, i: usize) -> Announcement {
        let n = &mut self.nodes[i];
        n.seq += 1;
        let busy = n.jobs.len() as u32;
        let slots = if n.has_model { self.sc.slots } else { 0 };
        // Built by the same function as the real node's report, from what
        // the cost-model node has.
        let resources = Resources {
            ram_total_bytes: 16 << 30,
            ram_free_bytes: 8 << 30,
            cpu_cores: 8,
            ..Default::default()
        };
        let load = WorkerLoad {
            slots_total: slots,
            slots_busy: busy.min(slots),
            queue_depth: busy.saturating_sub(slots),
            tokens_per_s: n.speed as f32,
            cache_keys: n.cache.iter().map(|&c| cache_key(c)).collect(),
        };
        let served = if n.has_model {
            vec![(ModelOffer::new(MODEL, "Q4_K_M", 4096), load)]
        } else {
            Vec::new()
        };
        let mut report = CapacityReport::build(n.id, n.seq, self.now, &resources, &served);
        report.addrs = vec![format!("/sim/{i}")];
        Announcement {
            report: sign_report(&n.key, report),
            membership: n.membership.clone(),
        }
    }

    pub fn run(mut self) -> Report {
        let end = self.sc.duration_ms + self.sc.drain_ms;
        self.now = end;
        while let Some(((t, _), ev)) = self.queue.pop_first() {
            if t > end {
                self.now = end;
                break;
            }
            self.now = t;
            self.events += 1;
            self.pending_work -= u64::from(ev.is_work());
            self.trace(&ev);
            self.step(ev);
            // Once arrivals have stopped and nothing is left that a request
            // or a check waits on, only gossip would follow: stop. A
            // request not ended by then never would be, and `finish` says
            // so.
            if self.now >= self.sc.duration_ms && self.pending_work == 0 {
                break;
            }
        }
        self.finish()
    }

    fn trace(&mut self, ev: &Ev) {
        let (a, b, c) = match ev {
            Ev::Gossip(i) | Ev::Restart(i) => (*i as u64, 0, 0),
            Ev::Deliver { to, from, ann } => (*from as u64, to.len() as u64, ann.report.seq),
            Ev::Run {
                target,
                request,
                attempt,
                ..
            } => (*target as u64, *request, *attempt as u64),
            Ev::Step {
                target,
                request,
                attempt,
                ..
            } => (*target as u64, *request, *attempt as u64),
            Ev::Token {
                request,
                attempt,
                index,
                ..
            } => (*request, u64::from(*index), *attempt as u64),
            Ev::ReadTimeout { request, attempt } | Ev::Report { request, attempt } => {
                (*request, *attempt as u64, 0)
            }
            Ev::EntryTimer { request } => (*request, 0, 0),
            Ev::Disconnected { at, peer } => (*at as u64, *peer as u64, 0),
            Ev::Turn { conv, turn } => (*conv, u64::from(*turn), 0),
            Ev::Arrive | Ev::Crash | Ev::Sample | Ev::CheckAgreement => (0, 0, 0),
        };
        self.hash.update(self.now.to_le_bytes());
        self.hash.update([ev.tag()]);
        self.hash.update(a.to_le_bytes());
        self.hash.update(b.to_le_bytes());
        self.hash.update(c.to_le_bytes());
    }

    fn step(&mut self, ev: Ev) {
        match ev {
            Ev::Gossip(i) => self.gossip(i),
            Ev::Deliver { to, from, ann } => {
                let node = self.nodes[from].id;
                for r in to {
                    if self.nodes[r].up && !self.cut(from, r) {
                        let now = self.now;
                        let n = &mut self.nodes[r];
                        if n.view.on_verified((*ann).clone(), now).is_ok() {
                            n.placer.on_report(&node);
                        }
                    }
                }
            }
            Ev::Arrive => self.arrive(None),
            Ev::Turn { conv, turn } => self.arrive(Some((conv, turn))),
            Ev::Run {
                target,
                request,
                attempt,
                epoch,
            } => self.run_job(target, request, attempt, epoch),
            Ev::Step {
                target,
                request,
                attempt,
                epoch,
            } => self.job_step(target, request, attempt, epoch),
            Ev::Token {
                request,
                attempt,
                index,
                stop,
            } => self.token(request, attempt, index, stop),
            Ev::ReadTimeout { request, attempt } => self.read_timeout(request, attempt),
            Ev::Report { request, attempt } => self.report(request, attempt),
            Ev::EntryTimer { request } => self.entry_timer(request),
            Ev::Crash => self.crash(),
            Ev::Restart(i) => {
                let n = &mut self.nodes[i];
                n.up = true;
                n.view = MeshView::new(self.authorities.clone(), self.sc.view.clone());
                n.breakers = BreakerBoard::new(self.sc.breaker.clone());
                n.placer = Placer::new();
                n.probes.clear();
                n.announcer.reset();
                // Sequence numbers outlive restarts (the real node starts
                // from the clock).
                n.seq = n.seq.max(self.now);
                self.last_churn_ms = self.now;
                self.at(self.now, Ev::Gossip(i));
            }
            Ev::Disconnected { at, peer } => {
                let node = self.nodes[peer].id;
                let n = &mut self.nodes[at];
                if n.up && !self.nodes[peer].up {
                    // As the node's network task does: a closed connection
                    // makes the peer doubtful until it reports again.
                    self.nodes[at].placer.on_failure(&node);
                }
            }
            Ev::Sample => self.sample(),
            Ev::CheckAgreement => self.check_agreement(),
        }
    }

    fn gossip(&mut self, i: usize) {
        let next = self.now + self.sc.gossip_interval_ms;
        if !self.nodes[i].up {
            return;
        }
        self.at(next, Ev::Gossip(i));
        let ann = self.report_of(i);
        let now = self.now;
        if !self.nodes[i].announcer.poll(&ann.report.body, now) {
            return;
        }
        self.gossip_bytes += zavod_proto::wire::encode(&ann).map_or(0, |b| b.len() as u64);
        // Signatures are checked once here rather than by every receiver;
        // a non-member's announcement fails and reaches no view.
        let Ok(v) = ann.verify(&self.authorities, self.now) else {
            return;
        };
        let now = self.now;
        let n = &mut self.nodes[i];
        if n.view.on_verified(v.clone(), now).is_ok() {
            n.placer.on_report(&n.id.clone());
        }
        let v = Rc::new(v);
        // Receivers grouped by arrival time, so a broadcast costs a few
        // events rather than one per receiver.
        let mut by_time: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        for r in 0..self.nodes.len() {
            if r == i || self.rng.chance(self.sc.loss) {
                continue;
            }
            let copies = if self.rng.chance(self.sc.duplicate) {
                2
            } else {
                1
            };
            for _ in 0..copies {
                let t = self.now + self.latency();
                by_time.entry(t).or_default().push(r);
            }
        }
        for (t, to) in by_time {
            self.at(
                t,
                Ev::Deliver {
                    to,
                    from: i,
                    ann: Rc::clone(&v),
                },
            );
        }
    }

    fn up_entries(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].up && self.nodes[i].member)
            .collect()
    }

    /// How long a client (or relaying entry) waits for a new target's first
    /// token: a prompt takes a while, and so do the hops.
    fn first_token_ms(&self, id: u64) -> u64 {
        self.sc.stall_ms
            + self.prefill_ms(id, false)
            + 4 * self.sc.latency_ms
            + 4 * self.sc.jitter_ms
    }

    /// How long request `id`'s prompt takes to prefill: a conversation's
    /// whole history, or only its new turn on a node holding its cache.
    fn prefill_ms(&self, id: u64, hit: bool) -> u64 {
        let r = &self.requests[id as usize];
        match r.conv {
            None => self.sc.prefill_ms,
            Some((_, turn)) => {
                let per_turn = u64::from(self.sc.turn_prompt_tokens + r.max_tokens);
                let tokens = if hit {
                    u64::from(self.sc.turn_prompt_tokens)
                } else {
                    per_turn * u64::from(turn) + u64::from(self.sc.turn_prompt_tokens)
                };
                self.sc.prefill_ms + (tokens as f64 * 1_000.0 / self.sc.prefill_tokens_per_s) as u64
            }
        }
    }

    fn end(&mut self, id: u64, state: State) {
        let now = self.now;
        let r = &mut self.requests[id as usize];
        r.ends += 1;
        if r.ends > 1 {
            self.violation(format!("request {id} ended twice"));
            return;
        }
        let completed = state == State::Completed;
        r.state = state;
        r.ended_ms = now;
        let conv = r.conv;
        if completed {
            if let Some(first) = r.first_token_at {
                self.first_token_ms.push(first - r.issued_ms);
            }
            if let (Some((_, turn)), Some(hit)) = (conv, r.hit)
                && turn > 0
            {
                self.later_turns += 1;
                self.cache_hits += u64::from(hit);
            }
        }
        // The conversation goes on (after a failed turn too), or a new one
        // takes its place.
        if let Some((c, turn)) = conv {
            let think = self.rng.exp(self.sc.think_ms as f64).max(1.0) as u64;
            let next = if turn + 1 < self.sc.turns {
                (c, turn + 1)
            } else {
                self.conv_entry.remove(&c);
                let c = self.conversations_started;
                self.conversations_started += 1;
                (c, 0)
            };
            self.at(
                now + think,
                Ev::Turn {
                    conv: next.0,
                    turn: next.1,
                },
            );
        }
        let r = &self.requests[id as usize];
        if now - r.issued_ms > self.sc.request_bound_ms {
            let took = now - r.issued_ms;
            self.violation(format!("request {id} took {took} ms to end"));
        }
    }

    fn crash(&mut self) {
        let dt = self.rng.exp(1_000.0 / self.sc.crash_per_s).max(1.0) as u64;
        self.at(self.now + dt, Ev::Crash);
        let up: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].up)
            .collect();
        // Keep at least two nodes standing.
        if up.len() <= 2 {
            return;
        }
        let i = up[self.rng.below(up.len() as u64) as usize];
        let n = &mut self.nodes[i];
        n.up = false;
        n.epoch += 1;
        // What its runs generated beyond what was delivered is lost.
        let jobs = std::mem::take(&mut n.jobs);
        n.waiting.clear();
        n.cache.clear();
        for (id, attempt) in jobs.into_keys() {
            if let Some(a) = self.requests[id as usize].attempts.get_mut(&attempt) {
                a.lost = true;
            }
        }
        self.entry_crashed(i);
        for j in 0..self.nodes.len() {
            if j != i && self.nodes[j].up && !self.cut(i, j) {
                let at = self.now + self.latency();
                self.at(at, Ev::Disconnected { at: j, peer: i });
            }
        }
        self.last_churn_ms = self.now;
        let back = self.now + self.sc.restart_after_ms;
        self.at(back, Ev::Restart(i));
    }

    fn sample(&mut self) {
        if self.now < self.sc.duration_ms {
            self.at(self.now + SAMPLE_MS, Ev::Sample);
        }
        let loads: Vec<f64> = self
            .nodes
            .iter()
            .filter(|n| n.up && n.has_model && n.member)
            .map(|n| n.jobs.len() as f64)
            .collect();
        if loads.is_empty() {
            return;
        }
        let mean = loads.iter().sum::<f64>() / loads.len() as f64;
        if mean >= self.sc.spread_min_mean {
            let max = loads.iter().copied().fold(0.0, f64::max);
            let spread = max / mean;
            self.spreads.push(spread);
            if spread > self.sc.max_spread {
                self.violation(format!(
                    "load spread {spread:.2} (max {max}, mean {mean:.2})"
                ));
            }
        }
    }

    fn check_agreement(&mut self) {
        // Only meaningful when no node crashed or restarted meanwhile.
        if self.now.saturating_sub(self.last_churn_ms) < self.sc.agree_within_ms {
            return;
        }
        let now = self.now;
        let truth: BTreeSet<NodeId> = self
            .nodes
            .iter()
            .filter(|n| n.up && n.member)
            .map(|n| n.id)
            .collect();
        for i in 0..self.nodes.len() {
            let n = &self.nodes[i];
            if !n.up || !n.member {
                continue;
            }
            let seen: BTreeSet<NodeId> = n
                .view
                .members()
                .filter(|(_, m)| m.liveness(&n.view.config, now) != Liveness::Gone)
                .map(|(id, _)| *id)
                .collect();
            if seen != truth {
                let (extra, missing) = (
                    seen.difference(&truth).count(),
                    truth.difference(&seen).count(),
                );
                self.violation(format!(
                    "node {i}'s view disagrees after the partition healed ({missing} missing, {extra} extra)"
                ));
            }
        }
    }

    fn finish(mut self) -> Report {
        let now = self.now;
        let mut unfinished = Vec::new();
        for (id, r) in self.requests.iter().enumerate() {
            if r.ends == 0 {
                unfinished.push(format!(
                    "request {id} never ended (issued at {} ms)",
                    r.issued_ms
                ));
            }
        }
        for u in unfinished {
            self.violation(u);
        }
        if self.sc.min_hit_rate > 0.0 && self.later_turns >= 20 {
            let rate = self.cache_hits as f64 / self.later_turns as f64;
            if rate < self.sc.min_hit_rate {
                self.violation(format!(
                    "cache hits on {:.1}% of later turns, below {:.1}%",
                    rate * 100.0,
                    self.sc.min_hit_rate * 100.0
                ));
            }
        }
        let completed = self
            .requests
            .iter()
            .filter(|r| r.state == State::Completed)
            .count() as u64;
        let failed = self
            .requests
            .iter()
            .filter(|r| matches!(r.state, State::Failed(_)))
            .count() as u64;
        let failovers = self.requests.iter().map(|r| u64::from(r.failovers)).sum();
        let turned_away = self.requests.iter().map(|r| u64::from(r.turned_away)).sum();
        let mut errors: BTreeMap<String, u64> = BTreeMap::new();
        for r in &self.requests {
            if let State::Failed(m) = &r.state {
                *errors.entry(m.clone()).or_default() += 1;
            }
        }
        let seconds = (now.max(1) as f64) / 1_000.0;
        let max_spread = self.spreads.iter().copied().fold(0.0, f64::max);
        let mean_spread = if self.spreads.is_empty() {
            0.0
        } else {
            self.spreads.iter().sum::<f64>() / self.spreads.len() as f64
        };
        Report {
            trace_hash: hex::encode(self.hash.finalize()),
            violations: self.violations,
            requests: self.requests.len() as u64,
            completed,
            failed,
            failovers,
            turned_away,
            events: self.events,
            max_spread,
            mean_spread,
            gossip_bytes_per_node_per_s: self.gossip_bytes as f64
                / self.nodes.len() as f64
                / seconds,
            later_turns: self.later_turns,
            cache_hits: self.cache_hits,
            first_token_ms: self.first_token_ms,
            errors,
            memory: None,
        }
    }
}

/// Runs one seed of a scenario.
pub fn run(sc: &Scenario, seed: u64) -> Report {
    Sim::new(sc.clone(), seed).run()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> Scenario {
        Scenario {
            nodes: 4,
            entries: 1,
            duration_ms: 5_000,
            drain_ms: 20_000,
            ..Scenario::default()
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_trace() {
        let a = run(&small(), 7);
        let b = run(&small(), 7);
        assert_eq!(a.trace_hash, b.trace_hash);
        assert_ne!(a.trace_hash, run(&small(), 8).trace_hash);
        assert!(a.requests > 5 && a.completed > 0, "{a:?}");
        assert!(a.violations.is_empty(), "{:?}", a.violations);
    }

    #[test]
    fn a_broken_invariant_is_reported() {
        // A spread bound no mesh can meet is flagged, not ignored.
        let sc = Scenario {
            max_spread: 0.5,
            spread_min_mean: 0.1,
            requests_per_s: 20.0,
            ..small()
        };
        let r = run(&sc, 3);
        assert!(
            r.violations.iter().any(|v| v.contains("load spread")),
            "{r:?}"
        );
    }
}
