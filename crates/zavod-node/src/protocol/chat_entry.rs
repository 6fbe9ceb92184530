//! The entry's side of a chat request, carried out: this module pumps
//! [`zavod_proto::chat::entry::Entry`] over real streams and actors. It decides
//! nothing itself; every rule (redirect, relay, local run, resume,
//! breaker outcomes, settlement, booking) is the machine's, and the
//! simulator pumps the same machine.
//!
//! What it does: admits and assembles the request (Router, MemoryKeeper),
//! then turns the machine's outputs into actor calls, a local model run,
//! a fetch from a target, frames to the client, and feeds back what came
//! of them. Once the client's stream is done with, what is still due
//! (reports of runs a client left, dials checking a client's claim)
//! finishes in a task of its own, by the answer's deadline.
//!
//! Why this file passes 600 lines: the pump's loop, the inputs it feeds
//! and the outputs it carries out share one request's state (the machine,
//! its placements, the current run, the pending tasks).
//!
//! Invariants: the credential's reservation is settled exactly once (by
//! the machine's `Settle`, or in full by [`Reservation`]'s drop if the pump
//! is torn down first); every wait has a deadline.

use super::entry_client::{ChannelClient, ClientSide, StreamClient};
use super::run_client::{FetchEvent, fetch, reachable};
use super::{Reservation, RunMetrics, call, first_frame, record_outcome};
use crate::actors::memory_keeper::{MemoryMsg, PreparedPrompt};
use crate::actors::model_worker::{JobStream, WorkerMsg};
use crate::actors::router::{Admission, PlaceAsk, Placement, RouterMsg};
use crate::actors::{NodeShared, error_frame};
use crate::clock::now_ms;
use crate::holders::turn_entry;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use zavod_engine::{CancelFlag, EngineEvent};
use zavod_net::{FrameReader, FrameWriter};
use zavod_proto::NodeId;
use zavod_proto::chat::entry::{
    AttemptId, ClientInput, Entry, EntryConfig, EntryRequest, Output, Placed, RunToken,
};
use zavod_proto::chat::failover::ResumeRequest;
use zavod_proto::chat::prompt::{Role, Turn, affinity_key, run_hash};
use zavod_proto::limits::{MAX_FAILED_TARGETS, MAX_FULL_TARGETS, REPORT_GRACE_MS};
use zavod_proto::wire::{
    ChatRequest, ClientFrame, DoneInfo, ErrorCode, ErrorFrame, GenParams, ServerFrame,
};

/// Frames of a fetched run in flight between its reader and the pump.
const FETCH_BUFFER: usize = 64;

/// What a spawned piece of work came back with.
enum Task {
    Placed(AttemptId, Result<Box<Placement>, ErrorFrame>),
    Started(AttemptId, Result<JobStream, ErrorFrame>),
    Report(Box<zavod_proto::wire::RunReport>),
    Checked(NodeId, bool),
    /// A wait that ended with nothing (a report that never came).
    Nothing,
}

/// Where the answer streams from now.
enum Run {
    Local {
        attempt: AttemptId,
        events: mpsc::Receiver<EngineEvent>,
        cancel: CancelFlag,
        metrics: RunMetrics,
    },
    Fetched {
        attempt: AttemptId,
        events: mpsc::Receiver<FetchEvent>,
        cancel: Option<oneshot::Sender<()>>,
    },
}

/// What a run produced next, as the machine takes it.
enum RunInput {
    Tokens(Vec<RunToken>),
    Done(DoneInfo),
    Failed(ErrorFrame, bool),
}

/// One request's machine and everything its outputs started.
struct Pump {
    shared: Arc<NodeShared>,
    machine: Entry,
    admission: Admission,
    prepared: PreparedPrompt,
    tasks: JoinSet<Task>,
    /// Placements whose targets this entry counts as running them.
    placements: BTreeMap<AttemptId, Placement>,
    run: Option<Run>,
    settled: bool,
    /// The error the client was sent, if any (for metrics).
    failed: Option<ErrorFrame>,
    /// Why the answer's turn could not be saved, until the client is told:
    /// in the answer's `Done`, or after the client's receipt when it
    /// streamed from the target itself.
    unrecorded: Option<String>,
}

/// Reads a chat stream's request and serves it as its entry.
pub(super) async fn serve_chat(
    shared: &Arc<NodeShared>,
    client: NodeId,
    writer: &mut FrameWriter,
    reader: &mut FrameReader,
    first: Duration,
) {
    let wt = Duration::from_millis(shared.config.limits.write_timeout_ms);
    let request = match first_frame::<ClientFrame>(reader, first).await {
        Ok(Some(ClientFrame::Chat(r))) => *r,
        Ok(None) => return,
        Ok(Some(_)) => {
            let e = error_frame(
                ErrorCode::BadRequest,
                "a chat stream must start with a chat request",
            );
            let _ = writer.send(&ServerFrame::Error(e), wt).await;
            return;
        }
        Err(e) => {
            tracing::info!(client = %client.short(), message = %e.message, "refused a chat stream");
            let _ = writer.send(&ServerFrame::Error(e), wt).await;
            return;
        }
    };
    let mut side = StreamClient::new(writer, reader, wt);
    let result = serve_entry(shared, client, true, request, Vec::new(), &mut side).await;
    shared.metrics.request(
        "chat",
        match &result {
            Ok(()) => "ok",
            Err(e) => crate::metrics::outcome_of(e.code),
        },
    );
    if let Err(frame) = result {
        tracing::info!(client = %client.short(), code = ?frame.code, message = %frame.message, "chat refused or failed");
    }
}

/// Serves a chat request with this node as its entry, from admission to
/// the end, sending the client every frame it gets (errors included).
/// `supplied` is history an HTTP client sent with the request. Returns
/// the error the client was sent, if any.
pub(crate) async fn serve_entry(
    shared: &Arc<NodeShared>,
    client_id: NodeId,
    client_dials: bool,
    request: ChatRequest,
    supplied: Vec<(Role, String)>,
    client: &mut impl ClientSide,
) -> Result<(), ErrorFrame> {
    let show_prompt = request.show_prompt;
    let continued = request.continued.clone().map(|c| ResumeRequest {
        answer: c.answer,
        tokens: c.tokens,
        ids: c.ids,
    });
    let (admission, params, prepared) =
        match admit_and_assemble(shared, client_id, request, supplied).await {
            Ok(p) => p,
            Err(e) => {
                let _ = client.send_all(&[ServerFrame::Error(e.clone())]).await;
                return Err(e);
            }
        };
    let limits = &shared.config.limits;
    let config = EntryConfig {
        max_failed_targets: MAX_FAILED_TARGETS,
        max_full_targets: MAX_FULL_TARGETS,
        report_grace_ms: REPORT_GRACE_MS,
        // The answer may take as long as generating every allowed token.
        answer_deadline_ms: limits.stall_timeout_ms + u64::from(admission.max_tokens) * 1_000,
    };
    let req = EntryRequest {
        me: shared.identity.id(),
        client: client_id,
        client_dials,
        model: admission.model.clone(),
        params,
        turns: prepared.turns.clone(),
        history_turns: prepared.history_turns,
        prompt_display: show_prompt
            .then(|| prepared.display(shared.model(&admission.model).map(|m| &**m))),
        recalled: prepared.recalled.injected.clone(),
        membership: shared.membership(),
        continued,
    };
    let mut pump = Pump {
        shared: Arc::clone(shared),
        machine: Entry::new(config, req, now_ms()),
        admission,
        prepared,
        tasks: JoinSet::new(),
        placements: BTreeMap::new(),
        run: None,
        settled: false,
        failed: None,
        unrecorded: None,
    };
    pump.serve(client).await;
    let result = pump.failed.clone().map_or(Ok(()), Err);
    if !pump.machine.is_finished() {
        // Reports and checks still due finish on their own.
        tokio::spawn(async move { pump.drain().await });
    }
    result
}

impl Pump {
    /// Runs the machine until the client's stream is done with.
    async fn serve(&mut self, client: &mut impl ClientSide) {
        loop {
            self.carry_out(Some(client)).await;
            if self.machine.is_closed() {
                if let Some(m) = self.unrecorded.take() {
                    // The client sent its receipt and waits for the stream
                    // to close: the answer stands, its turn was not kept.
                    let _ = client
                        .send_all(&[ServerFrame::Error(error_frame(ErrorCode::Internal, m))])
                        .await;
                }
                return;
            }
            self.step(Some(client)).await;
        }
    }

    /// Runs what is still due once the client is gone, by the answer's
    /// deadline at the latest.
    async fn drain(mut self) {
        self.run = None;
        while !self.machine.is_finished() {
            self.step(None::<&mut ChannelClient>).await;
            self.carry_out(None::<&mut ChannelClient>).await;
        }
    }

    /// Waits for the next input and feeds it to the machine.
    async fn step(&mut self, client: Option<&mut impl ClientSide>) {
        let deadline = self.machine.poll_timeout().map(|t| {
            tokio::time::Instant::now() + Duration::from_millis(t.saturating_sub(now_ms()))
        });
        let stall = Duration::from_millis(self.shared.config.limits.stall_timeout_ms);
        let has_client = client.is_some();
        let client_next = async {
            match client {
                Some(c) => c.next().await,
                None => std::future::pending().await,
            }
        };
        let has_run = self.run.is_some();
        let has_tasks = !self.tasks.is_empty();
        tokio::select! {
            input = client_next, if has_client => self.machine.handle_client(input, now_ms()),
            Some(done) = self.tasks.join_next(), if has_tasks => match done {
                Ok(task) => self.on_task(task),
                Err(e) => tracing::warn!(error = %e, "an entry task failed"),
            },
            next = next_of(&mut self.run, &self.shared, stall), if has_run => self.on_run(next),
            () = sleep_until(deadline) => self.machine.handle_timeout(now_ms()),
        }
    }

    fn on_task(&mut self, task: Task) {
        let now = now_ms();
        match task {
            Task::Placed(attempt, result) => {
                let placed = result.map(|p| {
                    let placed = Placed {
                        target: p.target,
                        addrs: p.addrs.clone(),
                        grant: p.grant.clone(),
                    };
                    self.placements.insert(attempt, *p);
                    placed
                });
                self.machine.handle_placed(attempt, placed, now);
            }
            Task::Started(attempt, Ok(job)) => {
                self.run = Some(Run::Local {
                    attempt,
                    events: job.events,
                    cancel: job.cancel,
                    metrics: RunMetrics::start(),
                });
                self.machine.handle_started(attempt, now);
            }
            Task::Started(attempt, Err(e)) => self.machine.handle_failed(attempt, e, true, now),
            Task::Report(report) => self.machine.handle_report(*report, now),
            Task::Checked(node, reachable) => self.machine.handle_check(node, reachable, now),
            Task::Nothing => {}
        }
    }

    fn on_run(&mut self, next: Option<(AttemptId, RunInput)>) {
        let now = now_ms();
        let Some((attempt, input)) = next else {
            return;
        };
        match input {
            RunInput::Tokens(t) => self.machine.handle_tokens(attempt, t, now),
            RunInput::Done(done) => {
                self.run = None;
                self.shared.learn_tokens(
                    &self.admission.model,
                    self.prepared.text_bytes(),
                    done.prompt_tokens,
                );
                self.machine.handle_done(attempt, done, now);
            }
            RunInput::Failed(e, from_target) => {
                self.run = None;
                self.machine.handle_failed(attempt, e, from_target, now);
            }
        }
    }

    /// Carries out the machine's outputs in order; frames that follow one
    /// another leave in one write.
    async fn carry_out(&mut self, mut client: Option<&mut impl ClientSide>) {
        let mut frames: Vec<ServerFrame> = Vec::new();
        loop {
            let next = self.machine.poll();
            let is_frame = matches!(next, Some(Output::Transmit(_)));
            if !is_frame && !frames.is_empty() {
                let batch = std::mem::take(&mut frames);
                let sent = match client.as_deref_mut() {
                    Some(c) => c.send_all(&batch).await,
                    None => Err(()),
                };
                if sent.is_err() {
                    self.machine.handle_client(ClientInput::Gone, now_ms());
                    client = None;
                }
                if next.is_none() {
                    // The client's leaving may have produced more.
                    continue;
                }
            }
            let Some(out) = next else {
                return;
            };
            self.carry(out, &mut frames).await;
        }
    }

    async fn carry(&mut self, out: Output, frames: &mut Vec<ServerFrame>) {
        let shared = &self.shared;
        match out {
            Output::Transmit(mut frame) => {
                match &mut frame {
                    ServerFrame::Error(e) => self.failed = Some(e.clone()),
                    ServerFrame::Done(d) => d.unrecorded = self.unrecorded.take(),
                    _ => {}
                }
                frames.push(frame);
            }
            Output::Place {
                attempt,
                holder,
                exclude,
                avoid,
                params,
            } => {
                let ask = PlaceAsk {
                    client: holder,
                    model: self.admission.model.clone(),
                    prompt_hash: run_hash(&self.prepared.turns, &params),
                    max_tokens: self.admission.max_tokens,
                    exclude,
                    avoid,
                    cache_scope: self.admission.credential_id,
                    cache_key: affinity_key(
                        &self.admission.credential_id,
                        &self.admission.model,
                        &self.prepared.turns,
                    ),
                };
                let shared = Arc::clone(shared);
                self.tasks.spawn(async move {
                    let placed = call(shared.directory.get().router, "the router", |reply| {
                        RouterMsg::Place { ask, reply }
                    })
                    .await
                    .and_then(|r| r)
                    .map(Box::new);
                    Task::Placed(attempt, placed)
                });
            }
            Output::RunLocal {
                attempt,
                params,
                may_queue,
            } => {
                let Some(grant) = self.placements.get(&attempt).map(|p| p.grant.clone()) else {
                    return;
                };
                let shared = Arc::clone(shared);
                // Whoever the grant is bound to: the client, or this node
                // when it relays.
                let client = grant.body.client;
                let turns = self.prepared.turns.clone();
                self.tasks.spawn(async move {
                    let job =
                        run_local(&shared, grant, None, client, &turns, &params, may_queue).await;
                    Task::Started(attempt, job)
                });
            }
            Output::Fetch {
                attempt,
                target,
                addrs,
                run,
            } => {
                let (tx, events) = mpsc::channel(FETCH_BUFFER);
                let (cancel, cancelled) = oneshot::channel();
                tokio::spawn(fetch(
                    Arc::clone(shared),
                    target,
                    addrs,
                    *run,
                    tx,
                    cancelled,
                ));
                self.run = Some(Run::Fetched {
                    attempt,
                    events,
                    cancel: Some(cancel),
                });
            }
            Output::Expect {
                attempt: _,
                request,
            } => {
                let (tx, rx) = oneshot::channel();
                if let Some(router) = shared.directory.get().router {
                    let _ = router.cast(RouterMsg::Expect {
                        request,
                        tx,
                        model: self.admission.model.clone(),
                        prompt_bytes: self.prepared.text_bytes(),
                    });
                }
                let wait = self
                    .machine
                    .poll_timeout()
                    .map_or(0, |t| t.saturating_sub(now_ms()));
                self.tasks.spawn(async move {
                    match tokio::time::timeout(Duration::from_millis(wait), rx).await {
                        Ok(Ok(r)) => Task::Report(Box::new(r)),
                        _ => Task::Nothing,
                    }
                });
            }
            Output::Cancel { attempt } => match &mut self.run {
                Some(Run::Local {
                    attempt: a, cancel, ..
                }) if *a == attempt => cancel.cancel(),
                Some(Run::Fetched {
                    attempt: a, cancel, ..
                }) if *a == attempt => {
                    if let Some(c) = cancel.take() {
                        let _ = c.send(());
                    }
                }
                _ => {}
            },
            Output::Release { attempt } => {
                self.placements.remove(&attempt);
            }
            Output::CheckTarget { node } => {
                let shared = Arc::clone(shared);
                self.tasks
                    .spawn(async move { Task::Checked(node, reachable(&shared, node).await) });
            }
            Output::Breaker { node, outcome } => record_outcome(shared, node, outcome),
            Output::Record { answer, tokens } => self.record_turn(answer, tokens).await,
            Output::Settle { used } => {
                self.settled = true;
                drop(Reservation {
                    shared,
                    admission: &self.admission,
                    used: Some(used),
                });
            }
            Output::Charge { tokens } => {
                if let Some(router) = shared.directory.get().router {
                    tracing::info!(tokens, "charging a run the client left mid-answer");
                    let _ = router.cast(RouterMsg::Charge {
                        credential_id: self.admission.credential_id,
                        tokens,
                    });
                }
            }
            Output::Close => {}
        }
    }

    async fn record_turn(&mut self, answer: String, tokens: u32) {
        let Some(key) = self.admission.conversation.clone() else {
            return;
        };
        let stamp = zavod_proto::memory::Stamp {
            seq: zavod_proto::memory::next_seq(self.prepared.newest_seq, now_ms()),
            id: self.prepared.entry_id,
        };
        let answer = Turn {
            role: Role::Assistant,
            text: answer,
            tokens,
        };
        let model = self.admission.model.clone();
        let shared = Arc::clone(&self.shared);
        let (entry, holder_facts) =
            turn_entry(stamp, self.prepared.user_turn.clone(), answer, |t| {
                shared.count_tokens(&model, t)
            });
        let floor = self.prepared.floor;
        let fold = self
            .prepared
            .fold_due()
            .then_some((model, self.prepared.in_prompt_entries));
        let recorded = call(self.shared.directory.get().memory, "memory", |reply| {
            MemoryMsg::Record {
                key,
                floor,
                entry,
                holder_facts,
                fold,
                reply: Some(reply),
            }
        })
        .await;
        let why = match recorded {
            Ok(Ok(())) => return,
            Ok(Err(m)) => m,
            Err(e) => e.message,
        };
        tracing::error!(message = %why, "turn not recorded");
        self.unrecorded = Some(format!(
            "the answer is whole, but this node could not save the turn to the conversation \
             ({why}); the next turn will not see it. Check the node's disk and its log"
        ));
    }
}

impl Drop for Pump {
    fn drop(&mut self) {
        if !self.settled {
            // Torn down before the machine settled: only the whole
            // reservation is certain.
            drop(Reservation {
                shared: &self.shared,
                admission: &self.admission,
                used: None,
            });
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The next thing the current run produced; `None` once it has nothing
/// more (its end was already handed on).
async fn next_of(
    run: &mut Option<Run>,
    shared: &NodeShared,
    stall: Duration,
) -> Option<(AttemptId, RunInput)> {
    match run.as_mut()? {
        Run::Local {
            attempt,
            events,
            cancel,
            metrics,
        } => loop {
            let ev = match tokio::time::timeout(stall, events.recv()).await {
                Ok(Some(ev)) => ev,
                Ok(None) => {
                    let e = error_frame(ErrorCode::Internal, "the model worker stopped mid-answer");
                    return Some((*attempt, RunInput::Failed(e, false)));
                }
                Err(_) => {
                    cancel.cancel();
                    let m = format!("no token for {} ms", stall.as_millis());
                    return Some((
                        *attempt,
                        RunInput::Failed(error_frame(ErrorCode::Timeout, m), false),
                    ));
                }
            };
            metrics.observe(&shared.metrics, &ev);
            match ev {
                EngineEvent::Queued { .. } | EngineEvent::Started { .. } => continue,
                EngineEvent::Tokens(tokens) => {
                    let tokens = tokens
                        .into_iter()
                        .map(|t| RunToken {
                            index: t.index,
                            text: t.text,
                            id: t.id,
                        })
                        .collect();
                    return Some((*attempt, RunInput::Tokens(tokens)));
                }
                EngineEvent::Done(done) => return Some((*attempt, RunInput::Done(done))),
                EngineEvent::Failed(m) => {
                    let e = error_frame(ErrorCode::Internal, m);
                    return Some((*attempt, RunInput::Failed(e, false)));
                }
            }
        },
        Run::Fetched {
            attempt, events, ..
        } => {
            let input = match events.recv().await {
                Some(FetchEvent::Token(t)) => RunInput::Tokens(vec![t]),
                Some(FetchEvent::Done(d)) => RunInput::Done(*d),
                Some(FetchEvent::Failed(e, from_target)) => RunInput::Failed(e, from_target),
                None => {
                    RunInput::Failed(error_frame(ErrorCode::Internal, "the fetch stopped"), false)
                }
            };
            Some((*attempt, input))
        }
    }
}

/// The entry's first steps for any client: the Router admits the request
/// (credential, scope, rate, budget reservation) and the MemoryKeeper
/// assembles its prompt. A prompt that cannot be assembled hands the
/// reservation back uncharged.
async fn admit_and_assemble(
    shared: &NodeShared,
    client: NodeId,
    request: ChatRequest,
    supplied: Vec<(Role, String)>,
) -> Result<(Admission, GenParams, PreparedPrompt), ErrorFrame> {
    let dir = &shared.directory;
    let mut params = request.params.clone();
    let message = request.message.clone();
    let turn = request.turn;
    let admission: Admission = call(dir.get().router, "the router", |reply| RouterMsg::Admit {
        client,
        request: Box::new(request),
        reply,
    })
    .await??;
    params.max_tokens = admission.max_tokens;
    let assembled = call(dir.get().memory, "memory", |reply| MemoryMsg::Assemble {
        model: admission.model.clone(),
        key: admission.conversation.clone(),
        supplied,
        message,
        turn,
        answer_tokens: admission.max_tokens,
        context_tokens: admission.context_tokens,
        reply,
    })
    .await
    .and_then(|r| r);
    match assembled {
        Ok(prepared) => Ok((admission, params, prepared)),
        Err(e) => {
            // Dropping it settles the reservation with nothing used.
            drop(Reservation {
                shared,
                admission: &admission,
                used: Some(0),
            });
            Err(e)
        }
    }
}

/// Asks this node's model worker to run a granted request.
pub(crate) async fn run_local(
    shared: &NodeShared,
    grant: zavod_proto::trust::Grant,
    issuer_membership: Option<zavod_proto::trust::Membership>,
    client: NodeId,
    turns: &[Turn],
    params: &GenParams,
    may_queue: bool,
) -> Result<JobStream, ErrorFrame> {
    let worker = shared
        .model_index(&grant.body.model)
        .and_then(|i| shared.directory.get().workers.get(&i).cloned());
    call(worker, "the model worker", |reply| WorkerMsg::Run {
        grant: Box::new(grant),
        issuer_membership: issuer_membership.map(Box::new),
        client,
        turns: turns.to_vec(),
        params: Box::new(params.clone()),
        may_queue,
        reply,
    })
    .await
    .and_then(|r| r)
}

/// Serves a request from an in-process client (the HTTP API) with this
/// node as its entry: such a client cannot dial a target, so the answer is
/// run here or relayed. Frames go to `tx`, ending with `Done` or `Error`;
/// dropping the receiver cancels the request.
pub(crate) async fn serve_in_process(
    shared: Arc<NodeShared>,
    client: NodeId,
    request: ChatRequest,
    supplied: Vec<(Role, String)>,
    tx: mpsc::Sender<ServerFrame>,
) -> Result<(), ErrorFrame> {
    let wt = Duration::from_millis(shared.config.limits.write_timeout_ms);
    let mut side = ChannelClient::new(tx, wt);
    serve_entry(&shared, client, false, request, supplied, &mut side).await
}
