//! The entry's side of one chat request, as a sans-IO state machine.
//!
//! An entry node has admitted a request and assembled its prompt; from
//! there this machine decides everything else: where the answer comes from
//! (a run on this node, a redirect of the client to a target, or a relay
//! the entry fetches itself), what happens when a target fails (the rest
//! is placed elsewhere, after what it streamed, away from every target
//! that failed it), which outcomes count against a peer's breaker, how the
//! credential is charged for every grant issued, and how the finished turn
//! is booked. The node pumps it over real streams and actors; the
//! simulator pumps the same machine over its virtual network.
//!
//! Inputs come through `handle_*(…, now)`; outputs through [`Entry::poll`]
//! (in order) and [`Entry::poll_timeout`]. Nothing here reads a clock or
//! does IO.
//!
//! Invariants:
//! - a breaker hears of a failure only when the entry saw it itself: its
//!   own fetch broke, stalled or got an internal error, its own dial of a
//!   target a client gave up on failed, or its own run failed. A client's
//!   word and a refusal of the request's own input never count;
//! - the credential's reservation is settled exactly once ([`Output::Settle`]);
//!   every other run a grant was issued for is charged from its target's
//!   signed report, for what it generated beyond what was already counted
//!   ([`Output::Charge`]), so every token generated is charged once;
//! - a target that turned the answer away as full (every slot busy, and
//!   the run not allowed to wait) is avoided, not excluded, and counted by
//!   no breaker; after `max_full_targets` turn-aways the next run may wait
//!   in its target's queue, so an answer is turned away a bounded number
//!   of times;
//! - only the entry sets resume tokens (from what failed targets streamed,
//!   or what an entry that failed had streamed of the answer);
//! - a finished answer is booked by one rule ([`Resumption::book`]), and
//!   its turn is recorded before the client is told it is done;
//! - every wait ends by the answer's deadline.
//!
//! Why this file passes 600 lines: it is one machine, and its rules read
//! and write the same state (the attempts, the resumption, the client's
//! side); split, each part would need all of it. Its protocol tests are in
//! `entry_tests.rs`.

use crate::NodeId;
use crate::RequestId;
use crate::UnixMs;
use crate::chat::failover::{ResumeRequest, Resumption};
use crate::chat::prompt::Turn;
use crate::mesh::breaker::{Fault, Outcome, fault_of};
use crate::trust::{Grant, Membership};
use crate::wire::{
    Accepted, ClientFrame, DoneInfo, ErrorCode, ErrorFrame, GenParams, Redirect, RunReport,
    RunRequest, ServerFrame,
};
use std::collections::VecDeque;

/// Index of a placement within one request (0 for the first).
pub type AttemptId = usize;

/// How an entry runs its requests.
#[derive(Debug, Clone)]
pub struct EntryConfig {
    /// Most targets that may fail one answer before the entry gives up.
    pub max_failed_targets: usize,
    /// Most times full targets may turn one answer away; until then its
    /// runs may not wait in a target's queue.
    pub max_full_targets: usize,
    /// How long an entry that has the target's report still waits for the
    /// client's own receipt before closing the stream.
    pub report_grace_ms: u64,
    /// How long the whole answer may take, from admission (the longest
    /// any wait of this request lasts).
    pub answer_deadline_ms: u64,
}

/// The request as admitted and assembled.
#[derive(Debug, Clone)]
pub struct EntryRequest {
    /// This node.
    pub me: NodeId,
    /// The client's key (grants for redirects are bound to it).
    pub client: NodeId,
    /// Whether the client can open a run stream to a target itself (a
    /// chat stream client); an in-process client is always relayed.
    pub client_dials: bool,
    pub model: String,
    /// The generation parameters; `max_tokens` is what was reserved.
    pub params: GenParams,
    pub turns: Vec<Turn>,
    pub history_turns: u32,
    /// The assembled prompt, when the client asked to see it.
    pub prompt_display: Option<String>,
    /// What long-term memory put in the prompt (for the client to show).
    pub recalled: Vec<String>,
    /// This node's membership, vouching for its grants at targets.
    pub membership: Option<Membership>,
    /// What an entry that failed had streamed of this answer (the
    /// client's word, as with a resume): the rest is generated after it.
    pub continued: Option<ResumeRequest>,
}

/// A target the placer chose, with the grant minted for it.
#[derive(Debug, Clone)]
pub struct Placed {
    pub target: NodeId,
    pub addrs: Vec<String>,
    pub grant: Grant,
}

/// A token from a run, indexed from that run's start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunToken {
    pub index: u32,
    pub text: String,
    pub id: i32,
}

/// What the client side of the entry did.
#[derive(Debug, Clone)]
pub enum ClientInput {
    Frame(ClientFrame),
    /// The client has nothing more to send (it still reads).
    HalfClosed,
    /// The client left: its stream broke, it reset, or a write failed.
    Gone,
}

/// What the entry asks its shell to do, in order.
#[derive(Debug, Clone)]
pub enum Output {
    /// Choose a target (never one of `exclude`; one of `avoid`, which
    /// were full, only when no other is left) and mint a grant bound to
    /// `holder`; answer with [`Entry::handle_placed`].
    Place {
        attempt: AttemptId,
        holder: NodeId,
        exclude: Vec<NodeId>,
        avoid: Vec<NodeId>,
        params: GenParams,
    },
    /// Run the attempt on this node's model worker; answer with
    /// [`Entry::handle_started`], then its tokens and end. Unless
    /// `may_queue`, a worker with every slot busy refuses it
    /// (`NoCapacity`).
    RunLocal {
        attempt: AttemptId,
        params: GenParams,
        may_queue: bool,
    },
    /// Open a run stream to the attempt's target and send `run`; feed its
    /// frames back.
    Fetch {
        attempt: AttemptId,
        target: NodeId,
        addrs: Vec<String>,
        run: Box<RunRequest>,
    },
    /// Route the target's report of `request` here ([`Entry::handle_report`]).
    Expect {
        attempt: AttemptId,
        request: RequestId,
    },
    /// Stop the attempt's run (local or fetched); its end still comes back.
    Cancel { attempt: AttemptId },
    /// The attempt no longer runs for this entry: stop counting it in the
    /// target's load, free a probe slot it held.
    Release { attempt: AttemptId },
    /// A client said `node` failed: dial it, and answer with
    /// [`Entry::handle_check`].
    CheckTarget { node: NodeId },
    /// Count an outcome in `node`'s breaker.
    Breaker { node: NodeId, outcome: Outcome },
    /// Send the client a frame.
    Transmit(ServerFrame),
    /// Keep the turn (durably, before the next output is carried out).
    Record { answer: String, tokens: u32 },
    /// Settle the credential's reservation: `used` tokens of it are spent.
    Settle { used: u32 },
    /// Charge the credential `tokens` more (a run left mid-answer that
    /// generated beyond what was counted).
    Charge { tokens: u32 },
    /// The client is done with: close its stream. Reports and checks may
    /// still be due ([`Entry::is_finished`]).
    Close,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Not placed yet.
    Pending,
    Local,
    Redirected,
    Fetched,
}

#[derive(Debug, Clone)]
struct Attempt {
    kind: Kind,
    placed: Option<Placed>,
    /// Tokens of the answer before this attempt's first.
    base: u32,
    /// What a local or fetched run streamed so far.
    tail: String,
    tail_ids: Vec<i32>,
    /// Left while it may still generate: charged from its report for what
    /// it generated beyond `claimed`.
    abandoned: bool,
    claimed: u32,
    /// Its tokens are accounted for (booked, settled or charged).
    settled: bool,
    /// Its run may wait for a slot at its target.
    may_queue: bool,
}

impl Attempt {
    fn target(&self) -> Option<NodeId> {
        self.placed.as_ref().map(|p| p.target)
    }

    fn request(&self) -> Option<RequestId> {
        self.placed.as_ref().map(|p| p.grant.body.request)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Placing(AttemptId),
    Running(AttemptId),
    /// The answer is booked from the target's report; the client may still
    /// send its receipt until then.
    Grace {
        until_ms: UnixMs,
    },
    Closed,
}

/// The entry's side of one request.
#[derive(Debug)]
pub struct Entry {
    config: EntryConfig,
    req: EntryRequest,
    so_far: Resumption,
    attempts: Vec<Attempt>,
    phase: Phase,
    /// The entry fetches the answer itself (the client cannot dial, or
    /// asked it to).
    relaying: bool,
    /// The client still reads frames.
    client_reads: bool,
    /// After a redirect: the client may still send its receipt or ask for
    /// a resume.
    client_sends: bool,
    /// The client asked to stop (or left) while a run streamed here.
    cancelled: bool,
    accepted_sent: bool,
    settled: bool,
    deadline_ms: UnixMs,
    /// Once a target failed, its error says more than "no other node".
    last_error: Option<ErrorFrame>,
    /// Targets that turned this answer away as full (avoided, not
    /// excluded, and never counted against a breaker), and how many times
    /// it was turned away (one target may be the only one, and say so
    /// again).
    full: Vec<NodeId>,
    turned_away: usize,
    /// A target the client could not reach (avoided for the relay: the
    /// client's word only, so not excluded).
    unreached: Option<NodeId>,
    pending_checks: usize,
    /// Tokens a failed run streamed that the answer could not take in
    /// (it ended there): still charged.
    lost_tokens: u32,
    close_sent: bool,
    out: VecDeque<Output>,
}

fn error(code: ErrorCode, message: impl Into<String>) -> ErrorFrame {
    ErrorFrame {
        code,
        message: message.into(),
    }
}

impl Entry {
    /// Starts a request admitted at `now`: its first placement is asked for.
    pub fn new(config: EntryConfig, req: EntryRequest, now: UnixMs) -> Self {
        let so_far = Resumption::new(req.params.max_tokens, config.max_failed_targets);
        let deadline_ms = now.saturating_add(config.answer_deadline_ms);
        let mut e = Entry {
            relaying: !req.client_dials,
            config,
            req,
            so_far,
            attempts: Vec::new(),
            phase: Phase::Closed,
            client_reads: true,
            client_sends: true,
            cancelled: false,
            accepted_sent: false,
            settled: false,
            deadline_ms,
            last_error: None,
            full: Vec::new(),
            turned_away: 0,
            unreached: None,
            pending_checks: 0,
            lost_tokens: 0,
            close_sent: false,
            out: VecDeque::new(),
        };
        if let Some(r) = e.req.continued.take()
            && let Err(err) = e.so_far.continue_from(r)
        {
            e.refuse(format!("cannot continue this answer: {err}"));
            return e;
        }
        e.place_next();
        e
    }

    /// The next thing to do, in order.
    pub fn poll(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// When [`Entry::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<UnixMs> {
        if self.is_finished() {
            return None;
        }
        match self.phase {
            Phase::Grace { until_ms } => Some(until_ms.min(self.deadline_ms)),
            _ => Some(self.deadline_ms),
        }
    }

    /// Whether the client is done with and nothing is still due.
    pub fn is_finished(&self) -> bool {
        self.phase == Phase::Closed && self.pending_checks == 0 && !self.awaits_reports()
    }

    fn awaits_reports(&self) -> bool {
        self.attempts.iter().any(|a| a.abandoned && !a.settled)
    }

    /// Whether the client's stream is closed (the rest is bookkeeping).
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// The answer's tokens before the current run (what failed targets
    /// streamed).
    pub fn resumed_tokens(&self) -> u32 {
        self.so_far.tokens()
    }

    /// The targets that failed this answer.
    pub fn failed_targets(&self) -> &[NodeId] {
        self.so_far.exclude()
    }

    // ---- inputs ----

    /// The placer answered the attempt's [`Output::Place`].
    pub fn handle_placed(
        &mut self,
        attempt: AttemptId,
        placed: Result<Placed, ErrorFrame>,
        _now: UnixMs,
    ) {
        if self.phase != Phase::Placing(attempt) {
            // Not asked for (or no longer wanted): let it go.
            if placed.is_ok() {
                self.out.push_back(Output::Release { attempt });
            }
            return;
        }
        let p = match placed {
            Ok(p) => p,
            Err(e) => {
                let e = self.last_error.take().unwrap_or(e);
                return self.fail(e);
            }
        };
        let params = self.so_far.params(&self.req.params);
        let may_queue = self.attempts[attempt].may_queue;
        let local = p.target == self.req.me;
        let kind = if local {
            Kind::Local
        } else if self.relaying {
            Kind::Fetched
        } else {
            Kind::Redirected
        };
        let run = self.req.membership.clone().map(|membership| {
            Box::new(RunRequest {
                grant: p.grant.clone(),
                issuer_membership: membership,
                turns: self.req.turns.clone(),
                params: params.clone(),
                may_queue,
            })
        });
        let (target, addrs, request) = (p.target, p.addrs.clone(), p.grant.body.request);
        let a = &mut self.attempts[attempt];
        a.kind = kind;
        a.placed = Some(p);
        self.phase = Phase::Running(attempt);
        if kind == Kind::Local {
            // Accepted once the worker has taken it.
            self.out.push_back(Output::RunLocal {
                attempt,
                params,
                may_queue,
            });
            if self.cancelled {
                self.out.push_back(Output::Cancel { attempt });
            }
            return;
        }
        let Some(run) = run else {
            self.out.push_back(Output::Release { attempt });
            self.attempts[attempt].settled = true;
            return self.fail(error(
                ErrorCode::Internal,
                "this node has no membership to vouch for its grants",
            ));
        };
        let accepted = self.accepted(attempt);
        if kind == Kind::Redirected {
            // The target also reports here, so the turn is kept and the
            // credential charged even if the client never comes back.
            self.out.push_back(Output::Expect { attempt, request });
            self.transmit(accepted);
            self.transmit(ServerFrame::Redirect(Box::new(Redirect {
                target,
                addrs,
                run: *run,
            })));
        } else {
            self.transmit(accepted);
            self.out.push_back(Output::Fetch {
                attempt,
                target,
                addrs,
                run,
            });
            if self.cancelled {
                self.out.push_back(Output::Cancel { attempt });
            }
        }
    }

    /// This node's model worker took the attempt's run.
    pub fn handle_started(&mut self, attempt: AttemptId, _now: UnixMs) {
        if self.streaming(attempt) == Some(Kind::Local) {
            let accepted = self.accepted(attempt);
            self.transmit(accepted);
        }
    }

    /// Tokens of a local or fetched run, indexed from its start.
    pub fn handle_tokens(&mut self, attempt: AttemptId, tokens: Vec<RunToken>, now: UnixMs) {
        if self.streaming(attempt).is_none() {
            return;
        }
        let a = &mut self.attempts[attempt];
        let budget = self.req.params.max_tokens.saturating_sub(a.base).max(1);
        let mut frames = Vec::with_capacity(tokens.len());
        let mut broken = None;
        for t in tokens {
            let expected = a.tail_ids.len() as u32;
            if t.index != expected {
                broken = Some(format!("token {} arrived, expected {expected}", t.index));
                break;
            }
            if expected >= budget {
                broken = Some(format!("more than the {budget} tokens granted"));
                break;
            }
            a.tail.push_str(&t.text);
            a.tail_ids.push(t.id);
            frames.push(ServerFrame::Token {
                index: a.base.saturating_add(t.index),
                text: t.text,
                id: t.id,
            });
        }
        for f in frames {
            self.transmit(f);
        }
        if let Some(why) = broken {
            self.out.push_back(Output::Cancel { attempt });
            let e = error(
                ErrorCode::Internal,
                format!("the target broke the protocol: {why}"),
            );
            self.handle_failed(attempt, e, false, now);
        }
    }

    /// A local or fetched run ended well. A fetched run's receipt must
    /// match what it streamed.
    pub fn handle_done(&mut self, attempt: AttemptId, mut done: DoneInfo, now: UnixMs) {
        let Some(kind) = self.streaming(attempt) else {
            return;
        };
        let a = &self.attempts[attempt];
        let tail_tokens = match kind {
            Kind::Fetched => {
                let (Some(target), Some(request)) = (a.target(), a.request()) else {
                    return;
                };
                let checked = match &done.receipt {
                    None => Err("the target sent no receipt".to_string()),
                    Some(r) => r
                        .verify(&target, request, &a.tail)
                        .map(|b| b.generated_tokens)
                        .map_err(|e| format!("the target's receipt: {e}")),
                };
                match checked {
                    Ok(n) => n,
                    Err(m) => {
                        return self.handle_failed(
                            attempt,
                            error(ErrorCode::Internal, m),
                            false,
                            now,
                        );
                    }
                }
            }
            _ => done.generated_tokens,
        };
        let tail = a.tail.clone();
        let stop = done.stop;
        let booking = self.book(attempt, &tail, tail_tokens, Some(stop));
        done.generated_tokens = booking;
        self.transmit(ServerFrame::Done(done));
        self.close();
    }

    /// A local or fetched run failed: `from_target` when the target
    /// answered with this error, otherwise this node saw the fault itself
    /// (its own run failed, no connection, a stall, a broken stream or
    /// receipt).
    pub fn handle_failed(
        &mut self,
        attempt: AttemptId,
        error: ErrorFrame,
        from_target: bool,
        _now: UnixMs,
    ) {
        let Some(kind) = self.streaming(attempt) else {
            return;
        };
        let a = &mut self.attempts[attempt];
        let Some(target) = a.target() else {
            return;
        };
        a.settled = true;
        let (tail, tail_ids) = (std::mem::take(&mut a.tail), std::mem::take(&mut a.tail_ids));
        self.out.push_back(Output::Release { attempt });
        if from_target && tail_ids.is_empty() && self.turned_away(target, error.code) {
            return;
        }
        if kind == Kind::Local {
            // This node's own worker: it ends the answer.
            if matches!(error.code, ErrorCode::Internal | ErrorCode::Timeout) {
                self.breaker(target, Outcome::Failure);
            }
            self.lost_tokens = self.lost_tokens.saturating_add(tail_ids.len() as u32);
            return self.fail(error);
        }
        let fault = if from_target {
            fault_of(error.code)
        } else {
            Fault::Target
        };
        match fault {
            // The target refused the request itself: the client's answer;
            // another target would refuse it too.
            Fault::Request if tail_ids.is_empty() => return self.fail(error),
            Fault::Request | Fault::Busy => {}
            Fault::Target => self.breaker(target, Outcome::Failure),
        }
        if self
            .so_far
            .on_fetch_failed(target, &tail, &tail_ids)
            .is_err()
        {
            // Failed too often, or nothing left to generate: it ends here.
            self.lost_tokens = self.lost_tokens.saturating_add(tail_ids.len() as u32);
            return self.fail(error);
        }
        if self.cancelled {
            return self.fail(error);
        }
        self.last_error = Some(error);
        self.place_next();
    }

    /// The client sent a frame, half-closed, or left.
    pub fn handle_client(&mut self, input: ClientInput, now: UnixMs) {
        let running = match self.phase {
            Phase::Running(a) => Some((a, self.attempts[a].kind)),
            _ => None,
        };
        let redirected = matches!(running, Some((_, Kind::Redirected)));
        let grace = matches!(self.phase, Phase::Grace { .. });
        match input {
            ClientInput::Gone => {
                self.client_reads = false;
                self.client_sends = false;
                if grace {
                    return self.close();
                }
                self.cancel_streaming();
            }
            ClientInput::HalfClosed => {
                self.client_sends = false;
                if grace {
                    self.close();
                }
            }
            ClientInput::Frame(frame) if redirected || grace => {
                if !self.client_sends {
                    return;
                }
                match frame {
                    ClientFrame::Finished { answer, receipt } => {
                        if grace {
                            // Already kept from the target's report.
                            return self.close();
                        }
                        if let Some((a, _)) = running {
                            self.on_finished(a, &answer, &receipt);
                        }
                    }
                    ClientFrame::Full { .. } if !grace => {
                        if let Some((a, _)) = running {
                            let target = self.attempts[a].target();
                            // The client's word: the target is only
                            // avoided, and what it may have generated is
                            // still charged from its report.
                            self.abandon(a, 0);
                            match target {
                                Some(t) if self.turned_away(t, ErrorCode::NoCapacity) => {}
                                _ => self.fail(error(
                                    ErrorCode::NoCapacity,
                                    format!(
                                        "the answer was turned away as full {} times",
                                        self.turned_away + 1
                                    ),
                                )),
                            }
                        }
                    }
                    ClientFrame::Relay { .. } if self.so_far.tokens() == 0 && !grace => {
                        if let Some((a, _)) = running {
                            self.unreached = self.attempts[a].target();
                            self.abandon(a, 0);
                            self.relaying = true;
                            self.place_next();
                        }
                    }
                    ClientFrame::Resume {
                        answer,
                        tokens,
                        ids,
                        ..
                    } if !grace => {
                        if let Some((a, _)) = running {
                            self.on_resume(
                                a,
                                ResumeRequest {
                                    answer,
                                    tokens,
                                    ids,
                                },
                            );
                        }
                    }
                    // Cancelled, or a protocol slip: only the target's
                    // report can still tell what was generated.
                    _ => {
                        self.client_sends = false;
                        if grace {
                            self.close();
                        }
                    }
                }
            }
            // Anything on a stream the entry serves itself stops the run:
            // a cancel, or a protocol slip.
            ClientInput::Frame(_) => self.cancel_streaming(),
        }
        let _ = now;
    }

    /// A target reported how a run this entry granted went.
    pub fn handle_report(&mut self, report: RunReport, now: UnixMs) {
        let Some(attempt) = self
            .attempts
            .iter()
            .position(|a| a.kind == Kind::Redirected && a.request() == Some(report.request))
        else {
            return;
        };
        let a = &self.attempts[attempt];
        if a.settled {
            return;
        }
        let Some(target) = a.target() else {
            return;
        };
        let Ok(body) = report
            .receipt
            .verify(&target, report.request, &report.answer)
        else {
            // Not the target's word about this request: it proves nothing.
            return;
        };
        let generated = body.generated_tokens;
        if a.abandoned {
            let extra = generated.saturating_sub(a.claimed);
            self.attempts[attempt].settled = true;
            if extra > 0 {
                self.out.push_back(Output::Charge { tokens: extra });
            }
            return;
        }
        if self.phase != Phase::Running(attempt) {
            return;
        }
        self.book(attempt, &report.answer, generated, Some(report.stop));
        if self.client_sends {
            // Give the client a moment to send its own receipt.
            self.phase = Phase::Grace {
                until_ms: now.saturating_add(self.config.report_grace_ms),
            };
        } else {
            self.close();
        }
    }

    /// The entry's own dial of a target a client gave up on came back.
    pub fn handle_check(&mut self, node: NodeId, reachable: bool, _now: UnixMs) {
        self.pending_checks = self.pending_checks.saturating_sub(1);
        if !reachable {
            self.breaker(node, Outcome::Failure);
        }
    }

    /// Time passed; call at [`Entry::poll_timeout`].
    pub fn handle_timeout(&mut self, now: UnixMs) {
        if let Phase::Grace { until_ms } = self.phase
            && now >= until_ms
        {
            self.close();
        }
        if now < self.deadline_ms {
            return;
        }
        // The answer's time is up: nothing more is waited for.
        match self.phase {
            Phase::Running(a) | Phase::Placing(a) => {
                let kind = self.attempts[a].kind;
                if matches!(kind, Kind::Local | Kind::Fetched) {
                    self.out.push_back(Output::Cancel { attempt: a });
                }
                if kind == Kind::Redirected {
                    // Only the target knows what it generated, and it did
                    // not say: the reservation is charged in full.
                    self.attempts[a].settled = true;
                    self.out.push_back(Output::Release { attempt: a });
                    self.settle(self.req.params.max_tokens);
                    self.close();
                } else {
                    self.out.push_back(Output::Release { attempt: a });
                    self.attempts[a].settled = true;
                    self.fail(error(
                        ErrorCode::Timeout,
                        format!("no answer within {} ms", self.config.answer_deadline_ms),
                    ));
                }
            }
            Phase::Grace { .. } | Phase::Closed => self.close(),
        }
        for a in &mut self.attempts {
            a.settled |= a.abandoned;
        }
        self.pending_checks = 0;
    }

    // ---- the rules ----

    /// The kind of `attempt` if the answer streams from it through here now.
    fn streaming(&self, attempt: AttemptId) -> Option<Kind> {
        if self.phase != Phase::Running(attempt) {
            return None;
        }
        let kind = self.attempts.get(attempt)?.kind;
        matches!(kind, Kind::Local | Kind::Fetched).then_some(kind)
    }

    fn cancel_streaming(&mut self) {
        self.client_reads = false;
        if self.cancelled {
            return;
        }
        self.cancelled = true;
        if let Phase::Running(a) = self.phase
            && matches!(self.attempts[a].kind, Kind::Local | Kind::Fetched)
        {
            self.out.push_back(Output::Cancel { attempt: a });
        }
    }

    /// The client's receipt for a redirected attempt's whole answer.
    fn on_finished(&mut self, attempt: AttemptId, answer: &str, receipt: &crate::trust::Receipt) {
        let a = &self.attempts[attempt];
        let (Some(target), Some(request)) = (a.target(), a.request()) else {
            return;
        };
        let Some(tail) = self.so_far.tail_of(answer) else {
            return self.refuse("the answer does not begin with the part resumed from".into());
        };
        let tail = tail.to_string();
        match receipt.verify(&target, request, &tail) {
            Ok(body) => {
                let n = body.generated_tokens;
                self.book(attempt, &tail, n, None);
                self.close();
            }
            Err(e) => self.refuse(format!("the receipt does not match the answer: {e}")),
        }
    }

    /// The client says its target failed mid-answer and hands over what
    /// it has. Its word excludes the target from this answer only; the
    /// entry dials the target to see for itself.
    fn on_resume(&mut self, attempt: AttemptId, r: ResumeRequest) {
        let Some(target) = self.attempts[attempt].target() else {
            return;
        };
        let before = self.so_far.tokens();
        if let Err(e) = self.so_far.on_resume(target, r) {
            return self.refuse(format!("cannot resume this answer: {e}"));
        }
        self.pending_checks += 1;
        self.out.push_back(Output::CheckTarget { node: target });
        let claimed = self.so_far.tokens().saturating_sub(before);
        self.abandon(attempt, claimed);
        self.place_next();
    }

    /// A target turned the answer away before its run streamed anything
    /// because it was full: the answer is placed again, away from it if
    /// any other will do, and no breaker hears of it. Whether it was taken
    /// as such (`false` once it was turned away `max_full_targets` times:
    /// it is then a plain failure).
    fn turned_away(&mut self, target: NodeId, code: ErrorCode) -> bool {
        if code != ErrorCode::NoCapacity || self.turned_away >= self.config.max_full_targets {
            return false;
        }
        self.turned_away += 1;
        if !self.full.contains(&target) {
            self.full.push(target);
        }
        if self.cancelled {
            self.fail(error(ErrorCode::NoCapacity, "cancelled while being placed"));
        } else {
            self.place_next();
        }
        true
    }

    /// A redirected attempt the client left while it may still generate:
    /// `claimed` of its tokens are counted in the answer, the rest is
    /// charged from its report.
    fn abandon(&mut self, attempt: AttemptId, claimed: u32) {
        let a = &mut self.attempts[attempt];
        if a.settled || a.abandoned {
            return;
        }
        a.abandoned = true;
        a.claimed = claimed;
        self.out.push_back(Output::Release { attempt });
    }

    /// Books a finished answer by the one rule: its last target
    /// succeeded, the credential is charged every part, and the turn is
    /// kept whole unless cancelled. Returns the whole answer's tokens.
    fn book(
        &mut self,
        attempt: AttemptId,
        tail: &str,
        tail_tokens: u32,
        stop: Option<crate::wire::StopReason>,
    ) -> u32 {
        let a = &mut self.attempts[attempt];
        a.settled = true;
        let target = a.target();
        if let Some(t) = target {
            self.breaker(t, Outcome::Success);
        }
        self.out.push_back(Output::Release { attempt });
        let booking = self.so_far.book(tail_tokens, stop);
        if booking.record {
            self.out.push_back(Output::Record {
                answer: self.so_far.whole(tail),
                tokens: booking.answer_tokens,
            });
        }
        self.settle(booking.charged_tokens);
        booking.answer_tokens
    }

    /// Asks for the next placement: away from every target that failed
    /// this answer, for the rest of it, with a grant bound to whoever will
    /// open the run stream.
    fn place_next(&mut self) {
        let attempt = self.attempts.len();
        self.attempts.push(Attempt {
            kind: Kind::Pending,
            placed: None,
            base: self.so_far.tokens(),
            tail: String::new(),
            tail_ids: Vec::new(),
            abandoned: false,
            claimed: 0,
            settled: false,
            // Once turned away often enough, the next target is waited for.
            may_queue: self.turned_away >= self.config.max_full_targets,
        });
        let holder = if self.relaying {
            self.req.me
        } else {
            self.req.client
        };
        self.phase = Phase::Placing(attempt);
        self.out.push_back(Output::Place {
            attempt,
            holder,
            exclude: self.so_far.exclude().to_vec(),
            avoid: self.full.iter().chain(&self.unreached).copied().collect(),
            params: self.so_far.params(&self.req.params),
        });
    }

    /// Ends the request with `e` for the client. A redirected run still
    /// going is charged from its report; what this entry saw streamed is
    /// what the reservation is settled with.
    fn fail(&mut self, e: ErrorFrame) {
        if let Phase::Running(a) = self.phase
            && self.attempts[a].kind == Kind::Redirected
        {
            self.abandon(a, 0);
        }
        self.transmit(ServerFrame::Error(e));
        self.settle(self.so_far.tokens().saturating_add(self.lost_tokens));
        self.close();
    }

    /// The client's own frame does not add up: its request ends.
    fn refuse(&mut self, message: String) {
        self.fail(error(ErrorCode::BadRequest, message));
    }

    fn settle(&mut self, used: u32) {
        if !self.settled {
            self.settled = true;
            self.out.push_back(Output::Settle { used });
        }
    }

    fn close(&mut self) {
        self.phase = Phase::Closed;
        self.client_reads = false;
        self.client_sends = false;
        if !self.close_sent {
            self.close_sent = true;
            self.out.push_back(Output::Close);
        }
    }

    fn breaker(&mut self, node: NodeId, outcome: Outcome) {
        self.out.push_back(Output::Breaker { node, outcome });
    }

    fn transmit(&mut self, frame: ServerFrame) {
        if self.client_reads {
            self.out.push_back(Output::Transmit(frame));
        }
    }

    fn accepted(&mut self, attempt: AttemptId) -> ServerFrame {
        // Only the first says what the prompt was, and what it recalled.
        let (prompt, recalled) = if self.accepted_sent {
            (None, Vec::new())
        } else {
            (self.req.prompt_display.clone(), self.req.recalled.clone())
        };
        self.accepted_sent = true;
        let a = &self.attempts[attempt];
        let (served_by, request, grant) = match &a.placed {
            Some(p) => (p.target, p.grant.body.request, p.grant.clone()),
            None => return ServerFrame::Error(error(ErrorCode::Internal, "not placed")),
        };
        ServerFrame::Accepted(Box::new(Accepted {
            request,
            served_by,
            model: self.req.model.clone(),
            history_turns: self.req.history_turns,
            grant,
            prompt,
            recalled,
        }))
    }
}

#[cfg(test)]
#[path = "entry_tests.rs"]
mod tests;
