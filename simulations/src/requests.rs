//! Requests in the simulator: clients, entries and targets.
//!
//! The entry is the real one: each request's entry node runs
//! `zavod_proto::chat::entry::Entry`, the machine the node pumps, and this file
//! only carries out its outputs over the virtual network (placement by the
//! entry's own `Placer` and `BreakerBoard`, grants minted and checked,
//! frames to the client, runs at targets, reports and checks) and feeds
//! back what came of them. The client keeps its answer in an
//! `AnswerStream`, as `zavod chat` does. Targets are the cost model: a
//! slot (or a wait for one, or a refusal when the run may not wait), a
//! prefill delay, then one token per `1/speed`, a signed receipt at the end.
//!
//! Adversarial clients (a scenario's `adversarial` share) send a resume
//! right after a redirect claiming the target failed, ask for a relay
//! while the target streams, or send input every target refuses.
//!
//! Invariants checked here:
//! - a breaker at an entry counts a failure of a node only after the entry
//!   itself saw that node fail (a stall or break of its own fetch, or its
//!   own dial failing), never on a client's word or a refusal of bad input;
//! - at most one request at a time holds a half-open node's probe slot at
//!   an entry;
//! - every token generated for a request is charged to it exactly once
//!   (the reservation settled once, plus charges for runs left
//!   mid-answer), across failovers;
//! - a turn is recorded at most once, and only for a completed answer.
//!
//! Why this file passes 600 lines: a request's client, entry and targets act
//! on the same request state, event by event.

use super::*;
use zavod_proto::chat::entry::{
    AttemptId, ClientInput, Entry, EntryConfig, EntryRequest, Output, Placed, RunToken,
};
use zavod_proto::limits::{MAX_FULL_TARGETS, REPORT_GRACE_MS};
use zavod_proto::trust::{ReceiptBody, prompt_hash, sign_receipt};
use zavod_proto::wire::{
    ClientFrame, DoneInfo, ErrorCode, ErrorFrame, GenParams, RunReport, ServerFrame,
};

/// What an adversarial client does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Adversary {
    /// Claims the target failed as soon as it is redirected.
    ForgedResume,
    /// Asks the entry to relay once the target has streamed a token.
    RelayWhileStreaming,
    /// Sends input every target refuses.
    BadInput,
}

/// One placement of a request, as the simulator sees it.
#[derive(Debug, Clone)]
pub(crate) struct SimAttempt {
    pub(crate) target: usize,
    pub(crate) grant_request: RequestId,
    /// Tokens flow to the entry machine (a local run or a fetch) rather
    /// than to the client.
    pub(crate) to_entry: bool,
    /// The answer's index of this run's first token.
    pub(crate) base: u32,
    /// Tokens this run may generate.
    pub(crate) budget: u32,
    /// Generated at the target / delivered to whoever reads it.
    pub(crate) generated: u32,
    pub(crate) delivered: u32,
    /// Its tokens beyond those delivered can never be known (its target
    /// crashed, or the reader gave up on it unreported).
    pub(crate) lost: bool,
    pub(crate) last_progress_ms: u64,
    /// When the last token it generated reaches its reader.
    pub(crate) last_sent_at: u64,
    /// The placer's bookkeeping to undo when the entry releases it.
    pub(crate) released: bool,
    /// Its run may wait for a slot (else a full target refuses it).
    pub(crate) may_queue: bool,
    /// The entry stopped reading it (its fetch went silent): tokens still
    /// on the way are never read.
    pub(crate) unread: bool,
}

impl Sim {
    /// A request arrives: a one-off (`conv` None, and the next one-off is
    /// scheduled) or a conversation's turn.
    pub(crate) fn arrive(&mut self, conv: Option<(u64, u32)>) {
        if self.now >= self.sc.duration_ms {
            return;
        }
        if conv.is_none() {
            let dt = self.rng.exp(1_000.0 / self.sc.requests_per_s).max(1.0) as u64;
            self.at(self.now + dt, Ev::Arrive);
        }
        let entries = self.up_entries();
        if entries.is_empty() {
            return;
        }
        let drawn = entries[self.rng.below(entries.len() as u64) as usize];
        // A conversation keeps its entry while it is up, as `zavod chat`
        // keeps the peer it attached to.
        let entry = match conv {
            Some((c, _)) => {
                let e = self
                    .conv_entry
                    .get(&c)
                    .copied()
                    .filter(|&e| self.nodes[e].up);
                let e = e.unwrap_or(drawn);
                self.conv_entry.insert(c, e);
                e
            }
            None => drawn,
        };
        let adversary = if self.sc.adversarial > 0.0 && self.rng.chance(self.sc.adversarial) {
            Some(match self.rng.below(3) {
                0 => Adversary::ForgedResume,
                1 => Adversary::RelayWhileStreaming,
                _ => Adversary::BadInput,
            })
        } else {
            None
        };
        let id = self.requests.len() as u64;
        let e = &self.nodes[entry];
        let config = EntryConfig {
            max_failed_targets: self.sc.max_failovers as usize,
            max_full_targets: MAX_FULL_TARGETS,
            report_grace_ms: REPORT_GRACE_MS,
            answer_deadline_ms: self.sc.request_bound_ms.saturating_sub(1_000),
        };
        let client = client_key(id);
        let req = EntryRequest {
            me: e.id,
            client,
            client_dials: true,
            model: MODEL.into(),
            params: GenParams {
                max_tokens: self.sc.max_tokens,
                ..Default::default()
            },
            turns: Vec::new(),
            history_turns: 0,
            prompt_display: None,
            recalled: Vec::new(),
            membership: Some(e.membership.clone()),
            continued: None,
        };
        let machine = Entry::new(config, req, self.now);
        self.requests.push(Request {
            issued_ms: self.now,
            max_tokens: self.sc.max_tokens,
            entry,
            entry_epoch: self.nodes[entry].epoch,
            state: State::Running,
            ends: 0,
            ended_ms: 0,
            failovers: 0,
            turned_away: 0,
            last_turned_away: false,
            stream: AnswerStream::new(self.sc.max_failovers),
            machine: Some(machine),
            attempts: BTreeMap::new(),
            source: None,
            client_progress_ms: self.now,
            conv,
            first_token_at: None,
            hit: None,
            adversary,
            charged: 0,
            settles: 0,
            records: 0,
            faulty: BTreeSet::new(),
            timer_at: None,
            fresh_source: false,
            books_lost: false,
        });
        self.pump(id);
    }

    /// Carries out the entry machine's outputs until it has none.
    pub(crate) fn pump(&mut self, id: u64) {
        loop {
            let r = &mut self.requests[id as usize];
            let Some(m) = r.machine.as_mut() else {
                return;
            };
            let Some(out) = m.poll() else {
                break;
            };
            self.carry(id, out);
        }
        self.after_pump(id);
    }

    /// Schedules the machine's timer, and checks the books once it is
    /// finished.
    fn after_pump(&mut self, id: u64) {
        let r = &mut self.requests[id as usize];
        let Some(m) = r.machine.as_ref() else {
            return;
        };
        if m.is_closed() && r.state == State::Running && r.source.is_none() {
            // The entry closed the stream with nothing more for the client.
            self.end(id, State::Failed("the entry closed the stream".into()));
        }
        let r = &mut self.requests[id as usize];
        let Some(m) = r.machine.as_ref() else {
            return;
        };
        if m.is_finished() {
            r.machine = None;
            self.check_books(id);
            return;
        }
        let at = m.poll_timeout();
        if at.is_some() && at != r.timer_at {
            r.timer_at = at;
            if let Some(t) = at {
                self.at(t, Ev::EntryTimer { request: id });
            }
        }
    }

    fn carry(&mut self, id: u64, out: Output) {
        let now = self.now;
        let entry = self.requests[id as usize].entry;
        match out {
            Output::Place {
                attempt,
                holder,
                exclude,
                avoid,
                params,
            } => {
                let placed = self.place(id, attempt, holder, &exclude, &avoid, &params);
                if let Some(m) = self.requests[id as usize].machine.as_mut() {
                    m.handle_placed(attempt, placed, now);
                }
            }
            out @ (Output::RunLocal { .. } | Output::Fetch { .. }) => {
                let (attempt, may_queue) = match out {
                    Output::RunLocal {
                        attempt, may_queue, ..
                    } => (attempt, may_queue),
                    Output::Fetch { attempt, run, .. } => (attempt, run.may_queue),
                    _ => return,
                };
                let Some(a) = self.requests[id as usize].attempts.get_mut(&attempt) else {
                    return;
                };
                a.to_entry = true;
                a.may_queue = may_queue;
                let target = a.target;
                let hops = if target == entry {
                    0
                } else {
                    2 * self.latency()
                };
                self.open_run(id, attempt, target, hops);
            }
            // A redirected target reports when its run ends (see
            // `stop_run` and `token`).
            Output::Expect { .. } => {}
            Output::Cancel { attempt } => self.cancel_run(id, attempt),
            Output::Release { attempt } => self.release(id, attempt),
            Output::CheckTarget { node } => {
                let up = self
                    .index_of(&node)
                    .is_some_and(|t| self.nodes[t].up && !self.cut(entry, t));
                if !up {
                    self.requests[id as usize].faulty.insert(node);
                }
                if let Some(m) = self.requests[id as usize].machine.as_mut() {
                    m.handle_check(node, up, now);
                }
            }
            Output::Breaker { node, outcome } => {
                if outcome == Outcome::Failure && !self.requests[id as usize].faulty.contains(&node)
                {
                    self.violation(format!(
                        "request {id}: a breaker counted a failure of a node the entry never saw fail"
                    ));
                }
                let e = &mut self.nodes[entry];
                e.breakers.record(&node, outcome, now);
                if outcome == Outcome::Failure {
                    e.placer.on_failure(&node);
                }
            }
            Output::Transmit(frame) => self.client_receives(id, frame),
            Output::Record { .. } => {
                let r = &mut self.requests[id as usize];
                r.records += 1;
                if r.records > 1 {
                    self.violation(format!("request {id}: its turn was recorded twice"));
                }
            }
            Output::Settle { used } => {
                let r = &mut self.requests[id as usize];
                r.settles += 1;
                r.charged += u64::from(used);
                if r.settles > 1 {
                    self.violation(format!("request {id}: its reservation was settled twice"));
                }
            }
            Output::Charge { tokens } => {
                self.requests[id as usize].charged += u64::from(tokens);
            }
            Output::Close => {}
        }
    }

    /// The entry's decision: the same placer and breakers as the real
    /// Router's, with a grant minted and checked as the target would.
    fn place(
        &mut self,
        id: u64,
        attempt: AttemptId,
        holder: NodeId,
        exclude: &[NodeId],
        avoid: &[NodeId],
        params: &GenParams,
    ) -> Result<Placed, ErrorFrame> {
        let now = self.now;
        let entry = self.requests[id as usize].entry;
        let request = RequestId(u128::from(id) << 32 | attempt as u128);
        let cfg = PlacerConfig {
            weights: Weights::default(),
            pool: self.sc.pool,
            choices: self.sc.choices,
            report_every_ms: self.sc.heartbeat(),
            ..PlacerConfig::default()
        };
        let until_ms = now + self.sc.request_bound_ms;
        let key = self.requests[id as usize]
            .conv
            .filter(|_| self.sc.affinity)
            .map(|(c, _)| cache_key(c));
        let e = &mut self.nodes[entry];
        let me = e.id;
        let candidates = e.view.candidates(MODEL, &me, now, key);
        let ask = Ask {
            request,
            exclude,
            avoid,
            until_ms,
            cache_key: key,
        };
        // As the node's Router does: the placer chooses among the routable,
        // then the breaker confirms the choice (a half-open peer's single
        // probe slot), and a refused choice gives way to the next.
        let mut second_probe = false;
        let routable: Vec<NodeId> = candidates
            .iter()
            .map(|c| c.node)
            .filter(|n| e.breakers.is_routable(n, now))
            .collect();
        let b = &mut e.breakers;
        let probes = &mut e.probes;
        let chosen = e.placer.place_confirmed(
            &candidates,
            |n| routable.contains(n),
            |c| {
                let was = b.state(&c.node, now);
                let ok = b.try_acquire(&c.node, request, now, until_ms);
                if ok && matches!(was, BreakerState::HalfOpen { .. }) {
                    // Invariant: one probe at a time per peer.
                    second_probe = probes.contains_key(&c.node);
                    probes.insert(c.node, request);
                }
                ok
            },
            &ask,
            &cfg,
            now,
        );
        if second_probe {
            self.violation(format!(
                "request {id}: a second probe of a half-open node at its entry"
            ));
        }
        let Some(chosen) = chosen else {
            return Err(ErrorFrame {
                code: ErrorCode::NoCapacity,
                message: "no node can serve now".into(),
            });
        };
        let Some(target) = self.index_of(&chosen.node) else {
            self.violation(format!("request {id} placed on an unknown node"));
            return Err(ErrorFrame {
                code: ErrorCode::Internal,
                message: "unknown node".into(),
            });
        };
        // Invariant: never an open breaker, a gone node or a non-member.
        let e = &self.nodes[entry];
        let open = matches!(
            e.breakers.state(&chosen.node, now),
            BreakerState::Open { .. }
        );
        let gone = e.view.liveness(&chosen.node, now) == Some(Liveness::Gone);
        if open {
            self.violation(format!(
                "request {id} placed on a node with an open breaker"
            ));
        }
        if gone {
            self.violation(format!("request {id} placed on a gone node"));
        }
        if !self.nodes[target].member {
            self.violation(format!("request {id} placed on a non-member"));
        }
        // The grant the entry signs, checked as the target would.
        let body = GrantBody {
            request,
            client: holder,
            target: chosen.node,
            model: MODEL.into(),
            max_tokens: self.sc.max_tokens,
            expires_at_ms: now + 30_000,
            prompt_hash: [0; 32],
            cache_scope: [0; 16],
        };
        let grant = mint_grant(&self.nodes[entry].key, body);
        let check = GrantCheck {
            this_node: &chosen.node,
            client: &holder,
            model: MODEL,
            prompt_hash: [0; 32],
            max_tokens: self.sc.max_tokens,
        };
        if let Err(err) = grant.verify(|n| *n == me, &check, now) {
            self.violation(format!("request {id}: its grant does not verify: {err}"));
        }
        let r = &mut self.requests[id as usize];
        if attempt > 0 && !std::mem::take(&mut r.last_turned_away) {
            r.failovers += 1;
        }

        r.attempts.insert(
            attempt,
            SimAttempt {
                target,
                grant_request: request,
                to_entry: false,
                base: r.machine.as_ref().map_or(0, |m| m.resumed_tokens()),
                budget: params.max_tokens,
                generated: 0,
                delivered: 0,
                lost: false,
                last_progress_ms: now,
                last_sent_at: now,
                released: false,
                may_queue: true,
                unread: false,
            },
        );
        Ok(Placed {
            target: chosen.node,
            addrs: vec![format!("/sim/{target}")],
            grant,
        })
    }

    fn index_of(&self, node: &NodeId) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == *node)
    }

    /// The entry no longer counts the attempt as running on its target.
    fn release(&mut self, id: u64, attempt: AttemptId) {
        let now = self.now;
        let entry = self.requests[id as usize].entry;
        let Some(a) = self.requests[id as usize].attempts.get_mut(&attempt) else {
            return;
        };
        if a.released {
            return;
        }
        a.released = true;
        let (request, target) = (a.grant_request, self.nodes[a.target].id);
        let e = &mut self.nodes[entry];
        e.placer.on_done(request, now);
        // A probe that ended without an outcome frees its slot (after an
        // outcome this changes nothing).
        e.breakers.release(&target, request);
        if e.probes.get(&target) == Some(&request) {
            e.probes.remove(&target);
        }
    }

    /// A frame from the entry reaches the client.
    fn client_receives(&mut self, id: u64, frame: ServerFrame) {
        let now = self.now;
        if self.requests[id as usize].state != State::Running {
            return;
        }
        match frame {
            ServerFrame::Accepted(_) => {}
            ServerFrame::Redirect(redirect) => {
                let Some(target) = self.index_of(&redirect.target) else {
                    return;
                };
                let r = &mut self.requests[id as usize];
                let Some((&attempt, _)) = r
                    .attempts
                    .iter()
                    .find(|(_, a)| a.grant_request == redirect.run.grant.body.request)
                else {
                    return;
                };
                r.stream.start_source();
                r.source = Some(attempt);
                if let Some(a) = r.attempts.get_mut(&attempt) {
                    a.may_queue = redirect.run.may_queue;
                }
                r.client_progress_ms = now;
                let adversary = r.adversary;
                if adversary == Some(Adversary::ForgedResume) && attempt == 0 {
                    // A resume with nothing in it, right after the redirect.
                    self.client_leaves_source(id);
                    let frame = ClientFrame::Resume {
                        reason: "forged".into(),
                        answer: String::new(),
                        tokens: 0,
                        ids: Vec::new(),
                    };
                    return self.client_says(id, ClientInput::Frame(frame));
                }
                let hops = 2 * self.latency();
                self.open_run(id, attempt, target, hops);
            }
            ServerFrame::Token {
                index,
                text,
                id: tid,
            } => {
                let r = &mut self.requests[id as usize];
                if r.fresh_source {
                    // An adversary that asked for a relay after its
                    // target streamed starts over from the entry's count.
                    r.fresh_source = false;
                    r.stream = AnswerStream::new(self.sc.max_failovers);
                }
                if let Err(e) = r.stream.on_token(index, &text, tid) {
                    self.violation(format!("request {id}: {e}"));
                    return;
                }
                r.client_progress_ms = now;
                r.first_token_at.get_or_insert(now);
            }
            ServerFrame::Done(_) => {
                let r = &self.requests[id as usize];
                let expected: String = (0..r.stream.tokens()).map(token_text).collect();
                if r.stream.text() != expected {
                    self.violation(format!("request {id}: the answer's text is not whole"));
                }
                self.end(id, State::Completed);
            }
            ServerFrame::Error(e) => {
                self.end(id, State::Failed(e.message));
            }
        }
    }

    /// The client sends its entry something (lost if the entry is down).
    fn client_says(&mut self, id: u64, input: ClientInput) {
        let now = self.now;
        let r = &mut self.requests[id as usize];
        let entry_up = self.nodes[r.entry].up && self.nodes[r.entry].epoch == r.entry_epoch;
        match r.machine.as_mut() {
            Some(m) if entry_up => m.handle_client(input, now),
            _ => {
                if r.state == State::Running {
                    self.end(id, State::Failed("the entry is gone".into()));
                }
                return;
            }
        }
        self.pump(id);
    }

    /// Whoever reads `attempt` (the client, or the entry) opens its run at
    /// `target` after `hops`, and times the read.
    fn open_run(&mut self, id: u64, attempt: AttemptId, target: usize, hops: u64) {
        let now = self.now;
        let epoch = self.nodes[target].epoch;
        self.at(
            now + hops,
            Ev::Run {
                target,
                request: id,
                attempt,
                epoch,
            },
        );
        let check_at = now + self.first_token_ms(id);
        self.at(
            check_at,
            Ev::ReadTimeout {
                request: id,
                attempt,
            },
        );
    }

    /// The client stops reading its redirected target (it resumes or
    /// relays): the target sees the stream close, stops, and reports.
    fn client_leaves_source(&mut self, id: u64) {
        let r = &mut self.requests[id as usize];
        if let Some(a) = r.source.take() {
            self.stop_run(id, a, true);
        }
    }

    /// A target's run of `attempt` starts.
    pub(crate) fn run_job(&mut self, target: usize, id: u64, attempt: AttemptId, epoch: u32) {
        let n = &self.nodes[target];
        if !n.up || n.epoch != epoch {
            return;
        }
        let r = &self.requests[id as usize];
        let Some(a) = r.attempts.get(&attempt) else {
            return;
        };
        if a.lost || r.adversary == Some(Adversary::BadInput) {
            // The target refuses the request's own input.
            if r.adversary == Some(Adversary::BadInput) {
                let e = ErrorFrame {
                    code: ErrorCode::BadRequest,
                    message: "bad input".into(),
                };
                self.run_refused(id, attempt, e);
            }
            return;
        }
        if !a.may_queue && self.nodes[target].jobs.len() >= self.sc.slots as usize {
            // Every slot is busy, and the run may not wait: the freshest
            // news of this node's load its entry can get.
            let e = ErrorFrame {
                code: ErrorCode::NoCapacity,
                message: format!("all {} slots are busy", self.sc.slots),
            };
            let r = &mut self.requests[id as usize];
            r.turned_away += 1;
            r.last_turned_away = true;
            return self.run_refused(id, attempt, e);
        }
        let budget = a.budget;
        let local = target == r.entry;
        let n = &mut self.nodes[target];
        let in_slot = n.jobs.values().filter(|j| j.in_slot).count() < self.sc.slots as usize;
        n.jobs.insert(
            (id, attempt),
            Job {
                next: 0,
                budget,
                in_slot,
            },
        );
        if !in_slot {
            n.waiting.push_back((id, attempt));
        }
        // The worker has taken it (it may still wait for a slot).
        if local && let Some(m) = self.requests[id as usize].machine.as_mut() {
            m.handle_started(attempt, self.now);
            self.pump(id);
        }
        if in_slot {
            self.start_job(target, id, attempt, epoch);
        }
    }

    /// A run gets a slot: its prompt is prefilled, then it decodes.
    fn start_job(&mut self, target: usize, id: u64, attempt: AttemptId, epoch: u32) {
        let r = &self.requests[id as usize];
        let n = &self.nodes[target];
        // The prompt: a conversation's whole history, of which only the new
        // turn is prefilled where its cache is held.
        let hit = r
            .conv
            .is_some_and(|(c, turn)| turn > 0 && n.cache.contains(&c));
        let hits_now = (r.conv.is_some() && attempt == 0).then_some(hit);
        let speed = n.speed;
        let prefill_ms = self.prefill_ms(id, hit);
        // Continuous batching: every job in a slot decodes at the node's
        // speed.
        let first = self.now + prefill_ms + (1_000.0 / speed) as u64;
        if hits_now.is_some() {
            self.requests[id as usize].hit = hits_now;
        }
        self.at(
            first,
            Ev::Step {
                target,
                request: id,
                attempt,
                epoch,
            },
        );
    }

    /// A run left its slot: the first still waiting takes it.
    fn slot_freed(&mut self, target: usize) {
        let epoch = self.nodes[target].epoch;
        while let Some(key) = self.nodes[target].waiting.pop_front() {
            if let Some(job) = self.nodes[target].jobs.get_mut(&key) {
                job.in_slot = true;
                return self.start_job(target, key.0, key.1, epoch);
            }
        }
    }

    /// A target refuses a run: the reader hears it after a hop.
    fn run_refused(&mut self, id: u64, attempt: AttemptId, e: ErrorFrame) {
        let now = self.now;
        let r = &mut self.requests[id as usize];
        let Some(a) = r.attempts.get(&attempt) else {
            return;
        };
        if a.to_entry {
            if let Some(m) = r.machine.as_mut() {
                m.handle_failed(attempt, e, true, now);
            }
            self.pump(id);
        } else if r.source == Some(attempt) {
            // The client's target said no before streaming anything.
            self.client_failed(id, Failure::Refused(e.code));
        }
    }

    pub(crate) fn job_step(&mut self, target: usize, id: u64, attempt: AttemptId, epoch: u32) {
        let lat = self.latency();
        let n = &mut self.nodes[target];
        if !n.up || n.epoch != epoch {
            return;
        }
        let Some(job) = n.jobs.get_mut(&(id, attempt)) else {
            return;
        };
        let index = job.next;
        job.next += 1;
        let last = job.next >= job.budget;
        let dt = (1_000.0 / n.speed) as u64;
        let arrives = self.now + lat;
        if let Some(a) = self.requests[id as usize].attempts.get_mut(&attempt) {
            a.generated = a.generated.max(index + 1);
            a.last_sent_at = a.last_sent_at.max(arrives);
        }
        if last {
            self.nodes[target].jobs.remove(&(id, attempt));
            self.slot_freed(target);
            // The conversation's prompt and answer stay cached here.
            if let Some((c, _)) = self.requests[id as usize].conv {
                let cap = self.sc.cache_entries;
                let n = &mut self.nodes[target];
                n.cache.retain(|&k| k != c);
                n.cache.insert(0, c);
                n.cache.truncate(cap);
            }
        } else {
            self.at(
                self.now + dt.max(1),
                Ev::Step {
                    target,
                    request: id,
                    attempt,
                    epoch,
                },
            );
        }
        let stop = last.then_some(StopReason::MaxTokens);
        self.at(
            arrives,
            Ev::Token {
                request: id,
                attempt,
                index,
                stop,
            },
        );
    }

    /// Stops a run at its target (a cancel, or its reader left): it ends
    /// with what it generated, reported to its reader or its entry.
    fn stop_run(&mut self, id: u64, attempt: AttemptId, reader_left: bool) {
        let r = &self.requests[id as usize];
        let Some(a) = r.attempts.get(&attempt) else {
            return;
        };
        let (target, last_sent_at, to_entry) = (a.target, a.last_sent_at, a.to_entry);
        let Some(job) = self.nodes[target].jobs.remove(&(id, attempt)) else {
            return;
        };
        if job.in_slot {
            self.slot_freed(target);
        }
        // A stream keeps its order: the end follows the last token.
        let at = (self.now + self.latency()).max(last_sent_at);
        if reader_left {
            // Nobody reads its end; a redirected run reports to its entry.
            if !to_entry {
                self.at(
                    at,
                    Ev::Report {
                        request: id,
                        attempt,
                    },
                );
            }
            return;
        }
        self.at(
            at,
            Ev::Token {
                request: id,
                attempt,
                index: u32::MAX,
                stop: Some(StopReason::Cancelled),
            },
        );
    }

    fn cancel_run(&mut self, id: u64, attempt: AttemptId) {
        self.stop_run(id, attempt, false);
    }

    /// A target's receipt for the first `n` tokens of `attempt`.
    fn receipt(
        &self,
        id: u64,
        attempt: AttemptId,
        n: u32,
    ) -> Option<(String, zavod_proto::trust::Receipt)> {
        let r = &self.requests[id as usize];
        let a = r.attempts.get(&attempt)?;
        let text: String = (a.base..a.base + n).map(token_text).collect();
        let holder = client_key(id);
        let receipt = sign_receipt(
            &self.nodes[a.target].key,
            ReceiptBody {
                request: a.grant_request,
                client: if a.to_entry {
                    self.nodes[r.entry].id
                } else {
                    holder
                },
                generated_tokens: n,
                answer_hash: prompt_hash(&text),
            },
        );
        Some((text, receipt))
    }

    /// A redirected run's report reaches its entry.
    pub(crate) fn report(&mut self, id: u64, attempt: AttemptId) {
        let now = self.now;
        let r = &self.requests[id as usize];
        let Some(a) = r.attempts.get(&attempt) else {
            return;
        };
        let n = a.generated;
        let entry_up = self.nodes[r.entry].up && self.nodes[r.entry].epoch == r.entry_epoch;
        let Some((answer, receipt)) = self.receipt(id, attempt, n) else {
            return;
        };
        let report = RunReport {
            request: a.grant_request,
            answer,
            receipt,
            prompt_tokens: 1,
            stop: StopReason::Cancelled,
        };
        let r = &mut self.requests[id as usize];
        if let Some(m) = r.machine.as_mut().filter(|_| entry_up) {
            m.handle_report(report, now);
            self.pump(id);
        }
    }

    /// A token (or, with `stop`, the end) of a run reaches its reader.
    pub(crate) fn token(
        &mut self,
        id: u64,
        attempt: AttemptId,
        index: u32,
        stop: Option<StopReason>,
    ) {
        let now = self.now;
        let r = &mut self.requests[id as usize];
        let Some(a) = r.attempts.get_mut(&attempt) else {
            return;
        };
        if a.unread {
            return;
        }
        let cancelled_end = index == u32::MAX;
        if !cancelled_end {
            a.delivered = a.delivered.max(index + 1);
            a.last_progress_ms = now;
        }
        let (base, delivered, to_entry) = (a.base, a.delivered, a.to_entry);
        if to_entry {
            if r.machine.is_none() {
                return;
            }
            let token = (!cancelled_end).then(|| RunToken {
                index,
                text: token_text(base + index),
                id: (base + index) as i32,
            });
            let done = stop.and_then(|stop| {
                let (_, receipt) = self.receipt(id, attempt, delivered)?;
                Some(DoneInfo {
                    stop,
                    prompt_tokens: 1,
                    cached_tokens: 0,
                    generated_tokens: delivered,
                    first_token_ms: 0.0,
                    decode_tokens_per_s: 0.0,
                    finished_at_ms: now,
                    receipt: Some(receipt),
                    unrecorded: None,
                })
            });
            let has_end = done.is_some();
            if let Some(m) = self.requests[id as usize].machine.as_mut() {
                if let Some(t) = token {
                    m.handle_tokens(attempt, vec![t], now);
                }
                if let Some(d) = done {
                    m.handle_done(attempt, d, now);
                }
            }
            if !has_end {
                self.schedule_read_timeout(id, attempt);
            }
            self.pump(id);
            return;
        }
        let r = &mut self.requests[id as usize];
        // A redirected run streams to the client.
        if r.source != Some(attempt) || r.state != State::Running {
            if stop.is_some() {
                // Its end reports to the entry.
                let lat = self.latency();
                self.at(
                    now + lat,
                    Ev::Report {
                        request: id,
                        attempt,
                    },
                );
            }
            return;
        }
        let got = r
            .stream
            .on_source_token(index, &token_text(base + index), (base + index) as i32);
        if let Err(e) = got {
            self.violation(format!("request {id}: {e}"));
            return;
        }
        r.client_progress_ms = now;
        r.first_token_at.get_or_insert(now);
        if stop.is_some() || r.stream.tokens() >= r.max_tokens {
            let expected: String = (0..r.stream.tokens()).map(token_text).collect();
            let answer = r.stream.text().to_string();
            if answer != expected {
                self.violation(format!("request {id}: the answer's text is not whole"));
            }
            self.end(id, State::Completed);
            // The target reports to the entry; the client hands in its
            // receipt.
            let lat = self.latency();
            self.at(
                now + lat,
                Ev::Report {
                    request: id,
                    attempt,
                },
            );
            let n = self.requests[id as usize].attempts[&attempt].delivered;
            if let Some((_, receipt)) = self.receipt(id, attempt, n) {
                let frame = ClientFrame::Finished {
                    answer,
                    receipt: Box::new(receipt),
                };
                self.requests[id as usize].source = None;
                self.client_says(id, ClientInput::Frame(frame));
            }
            return;
        }
        if r.adversary == Some(Adversary::RelayWhileStreaming) && index == 0 && attempt == 0 {
            self.client_leaves_source(id);
            self.requests[id as usize].fresh_source = true;
            let frame = ClientFrame::Relay {
                reason: "adversary".into(),
            };
            return self.client_says(id, ClientInput::Frame(frame));
        }
        self.schedule_read_timeout(id, attempt);
    }

    fn schedule_read_timeout(&mut self, id: u64, attempt: AttemptId) {
        let check_at = self.now + self.sc.stall_ms;
        self.at(
            check_at,
            Ev::ReadTimeout {
                request: id,
                attempt,
            },
        );
    }

    /// Whoever reads `attempt` checks it still makes progress (the read
    /// timeout of the real stream): a silent run is the machine's to
    /// handle, as the entry's own fetch failing or the client's target
    /// failing.
    pub(crate) fn read_timeout(&mut self, id: u64, attempt: AttemptId) {
        let now = self.now;
        let first_token_ms = self.first_token_ms(id);
        let stall_ms = self.sc.stall_ms;
        let r = &self.requests[id as usize];
        if r.state != State::Running && r.machine.is_none() {
            return;
        }
        let Some(a) = r.attempts.get(&attempt) else {
            return;
        };
        let wait = if a.delivered == 0 {
            first_token_ms
        } else {
            stall_ms
        };
        if now.saturating_sub(a.last_progress_ms) < wait {
            return;
        }
        if a.to_entry {
            // The entry's own fetch went silent: a fault it saw itself.
            let target = self.nodes[a.target].id;
            let entry_up = self.nodes[r.entry].up && self.nodes[r.entry].epoch == r.entry_epoch;
            let open = r.machine.as_ref().is_some_and(|m| !m.is_closed());
            if !entry_up || !open {
                return;
            }
            let r = &mut self.requests[id as usize];
            r.faulty.insert(target);
            if let Some(a) = r.attempts.get_mut(&attempt) {
                a.lost = true;
                a.unread = true;
            }
            self.stop_run(id, attempt, true);
            let e = ErrorFrame {
                code: ErrorCode::Timeout,
                message: "the target went silent".into(),
            };
            if let Some(m) = self.requests[id as usize].machine.as_mut() {
                m.handle_failed(attempt, e, false, now);
            }
            self.pump(id);
            return;
        }
        if r.source != Some(attempt) || r.state != State::Running {
            return;
        }
        self.client_failed(id, Failure::Broke);
    }

    /// The client's redirected target failed.
    fn client_failed(&mut self, id: u64, how: Failure) {
        let r = &mut self.requests[id as usize];
        let decision = match how {
            Failure::Refused(ErrorCode::NoCapacity) => r.stream.on_full(),
            Failure::Refused(_) => r.stream.on_failure(true),
            Failure::Broke => r.stream.on_failure(false),
        };
        self.client_leaves_source(id);
        match decision {
            OnFailure::GiveUp => {
                self.end(id, State::Failed("gave up after repeated failovers".into()));
                self.client_says(id, ClientInput::Gone);
            }
            OnFailure::Full => {
                let frame = ClientFrame::Full {
                    reason: "full".into(),
                };
                self.client_says(id, ClientInput::Frame(frame));
            }
            OnFailure::Relay => {
                let frame = ClientFrame::Relay {
                    reason: "unreachable".into(),
                };
                self.client_says(id, ClientInput::Frame(frame));
            }
            OnFailure::Resume(req) => {
                let frame = ClientFrame::Resume {
                    reason: "stalled".into(),
                    answer: req.answer,
                    tokens: req.tokens,
                    ids: req.ids,
                };
                self.client_says(id, ClientInput::Frame(frame));
            }
        }
    }

    /// The entry machine's timer.
    pub(crate) fn entry_timer(&mut self, id: u64) {
        let now = self.now;
        let r = &mut self.requests[id as usize];
        let entry_up = self.nodes[r.entry].up && self.nodes[r.entry].epoch == r.entry_epoch;
        let Some(m) = r.machine.as_mut() else {
            return;
        };
        if !entry_up {
            return;
        }
        if m.poll_timeout().is_some_and(|t| t <= now) {
            r.timer_at = None;
            if now >= r.issued_ms + self.sc.request_bound_ms.saturating_sub(1_000) {
                // Out of time: the entry charges what it cannot know in full.
                r.books_lost = true;
            }
            m.handle_timeout(now);
            self.pump(id);
        }
    }

    /// An entry crashed: the machines of its requests are lost with it;
    /// clients reading from it see their stream break.
    pub(crate) fn entry_crashed(&mut self, entry: usize) {
        for id in 0..self.requests.len() as u64 {
            let r = &mut self.requests[id as usize];
            if r.entry != entry || r.machine.is_none() {
                continue;
            }
            r.machine = None;
            r.books_lost = true;
            // A client streaming from a redirected target goes on; one
            // the entry served itself has lost its stream.
            if r.state == State::Running && r.source.is_none() {
                self.end(id, State::Failed("the entry is gone".into()));
            }
        }
    }

    /// Once the entry is finished with a request: every token generated
    /// was charged once.
    fn check_books(&mut self, id: u64) {
        let r = &self.requests[id as usize];
        if r.books_lost || r.settles == 0 {
            return;
        }
        let expected: u64 = r
            .attempts
            .values()
            .map(|a| u64::from(if a.lost { a.delivered } else { a.generated }))
            .sum();
        if r.charged != expected {
            let charged = r.charged;
            self.violation(format!(
                "request {id}: charged {charged} tokens, generated {expected}"
            ));
        }
    }
}

/// How a client's redirected target failed it.
#[derive(Debug, Clone, Copy)]
enum Failure {
    /// It answered with an error before the answer's end.
    Refused(ErrorCode),
    /// It broke the stream, died or went silent.
    Broke,
}

/// The key a simulated client holds (its grants are bound to it).
fn client_key(id: u64) -> NodeId {
    let mut b = [0u8; 32];
    b[..8].copy_from_slice(&id.to_le_bytes());
    b[31] = 0xc1;
    NodeId(b)
}
