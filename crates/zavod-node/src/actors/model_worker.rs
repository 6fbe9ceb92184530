//! ModelWorker: owns the engine. It checks each request's grant (issuer is
//! a member, signature, expiry, bound to this node, this client, this model
//! and this prompt, single use), then queues the job; tokens flow from the
//! engine thread straight to the serving task through the job's bounded
//! channel, never through this actor's mailbox.
//!
//! If the engine thread dies the worker fails on purpose, so the supervisor
//! replaces it with a fresh engine over the same loaded weights.

use super::router::RouterMsg;
use super::{NodeShared, error_frame};
use crate::backend::ModelBackend;
use crate::clock::now_ms;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use zavod_engine::llama::job_channel;
use zavod_engine::{CacheTag, CancelFlag, Engine, EngineError, EngineEvent, Job, Prompt};
use zavod_proto::NodeId;
use zavod_proto::chat::prompt::{Turn, affinity_key, run_hash};
use zavod_proto::mesh::capacity::WorkerLoad;
use zavod_proto::trust::{AuthError, Grant, GrantBody, GrantCheck, Membership, ReplayGuard};
use zavod_proto::wire::{ErrorCode, ErrorFrame, GenParams};

/// How often the worker checks its engine and reports load.
const TICK: Duration = Duration::from_millis(500);

pub(crate) struct ModelWorker;

/// A running job as the serving task sees it.
pub struct JobStream {
    pub events: mpsc::Receiver<EngineEvent>,
    pub cancel: CancelFlag,
}

pub enum WorkerMsg {
    Run {
        grant: Box<Grant>,
        /// The issuer's membership, when the grant came from another node.
        issuer_membership: Option<Box<Membership>>,
        client: NodeId,
        turns: Vec<Turn>,
        params: Box<GenParams>,
        /// Whether the run may wait for a slot (else, with every slot
        /// busy, it is refused as `NoCapacity`).
        may_queue: bool,
        reply: RpcReplyPort<Result<JobStream, ErrorFrame>>,
    },
    /// Checks an embedding request's grant (bound to the texts by
    /// `embed_hash`) and hands back the model, so the caller embeds off
    /// this actor: the embedder has its own thread and queue.
    Embed {
        grant: Box<Grant>,
        issuer_membership: Option<Box<Membership>>,
        client: NodeId,
        inputs_hash: [u8; 32],
        reply: RpcReplyPort<Result<Arc<dyn ModelBackend>, ErrorFrame>>,
    },
    Load(RpcReplyPort<WorkerLoad>),
    Tick,
}

impl ractor::Message for WorkerMsg {}

pub(crate) struct WorkerState {
    shared: Arc<NodeShared>,
    /// Which of the node's models this worker serves.
    index: usize,
    engine: Box<dyn Engine>,
    replay: ReplayGuard,
    members: BTreeSet<NodeId>,
}

fn grant_error(e: AuthError) -> ErrorFrame {
    let code = match e {
        AuthError::Replayed(_) | AuthError::WrongTarget { .. } | AuthError::GrantMismatch(_) => {
            ErrorCode::Forbidden
        }
        _ => ErrorCode::Unauthorized,
    };
    error_frame(code, format!("grant refused: {e}"))
}

impl Actor for ModelWorker {
    type Msg = WorkerMsg;
    type State = WorkerState;
    type Arguments = (Arc<NodeShared>, usize);

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        (shared, index): (Arc<NodeShared>, usize),
    ) -> Result<Self::State, ActorProcessingErr> {
        let model: Arc<dyn ModelBackend> = shared
            .models
            .get(index)
            .cloned()
            .ok_or("model worker started for a model the node does not have")?;
        let engine = tokio::task::spawn_blocking(move || model.start_engine()).await??;
        // Members whose grants this worker honours. A single node trusts
        // itself when it holds a valid membership certificate.
        let mut members = BTreeSet::new();
        if let Some(m) = shared.membership()
            && m.verify(&shared.identity.authorities, now_ms()).is_ok()
        {
            members.insert(m.body.member);
        }
        myself.send_interval(TICK, || WorkerMsg::Tick);
        tracing::info!(model = %engine.info().name, slots = engine.info().slots, "model worker ready");
        Ok(WorkerState {
            shared,
            index,
            engine,
            replay: ReplayGuard::default(),
            members,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            WorkerMsg::Run {
                grant,
                issuer_membership,
                client,
                turns,
                params,
                may_queue,
                reply,
            } => {
                let r = run(
                    st,
                    grant,
                    issuer_membership.as_deref(),
                    client,
                    turns,
                    *params,
                    may_queue,
                );
                let _ = reply.send(r);
                if !st.engine.is_alive() {
                    // Fail on purpose: the supervisor builds a fresh engine.
                    return Err("engine stopped".into());
                }
            }
            WorkerMsg::Embed {
                grant,
                issuer_membership,
                client,
                inputs_hash,
                reply,
            } => {
                let r = admit_grant(
                    st,
                    &grant,
                    issuer_membership.as_deref(),
                    client,
                    inputs_hash,
                    0,
                )
                .and_then(|_| {
                    st.shared
                        .models
                        .get(st.index)
                        .cloned()
                        .ok_or_else(|| super::unavailable("the model"))
                });
                let _ = reply.send(r);
            }
            WorkerMsg::Load(reply) => {
                let _ = reply.send(st.engine.load());
            }
            WorkerMsg::Tick => {
                if !st.engine.is_alive() {
                    return Err("engine thread died".into());
                }
                if let Some(r) = st.shared.directory.get().router {
                    let _ = r.cast(RouterMsg::WorkerLoad {
                        model: st.index,
                        load: st.engine.load(),
                    });
                }
            }
        }
        Ok(())
    }
}

/// Checks a grant for this worker's model (signature, issuer membership,
/// expiry, binding to this node, the client, the prompt and the token
/// budget) and spends it.
fn admit_grant(
    st: &mut WorkerState,
    grant: &Grant,
    issuer_membership: Option<&Membership>,
    client: NodeId,
    prompt_hash: [u8; 32],
    max_tokens: u32,
) -> Result<GrantBody, ErrorFrame> {
    let now = now_ms();
    let this = st.shared.identity.id();
    let model = st.engine.info().name.clone();
    let check = GrantCheck {
        this_node: &this,
        client: &client,
        model: &model,
        prompt_hash,
        max_tokens,
    };
    let members = &st.members;
    let authorities = &st.shared.identity.authorities;
    // A grant's issuer must be a member: this node, or the node whose
    // membership certificate came with the request and verifies here; and
    // not one the mesh's authority revoked (its certificate still verifies).
    let revocations = st.shared.revocations();
    let is_member = |n: &NodeId| {
        (members.contains(n)
            || issuer_membership
                .is_some_and(|m| m.body.member == *n && m.verify(authorities, now).is_ok()))
            && !revocations.node_revoked(n)
    };
    let body = grant.verify(is_member, &check, now).map_err(grant_error)?;
    st.replay.admit(body, now).map_err(grant_error)?;
    Ok(body.clone())
}

fn run(
    st: &mut WorkerState,
    grant: Box<Grant>,
    issuer_membership: Option<&Membership>,
    client: NodeId,
    turns: Vec<Turn>,
    params: GenParams,
    may_queue: bool,
) -> Result<JobStream, ErrorFrame> {
    let body = admit_grant(
        st,
        &grant,
        issuer_membership,
        client,
        run_hash(&turns, &params),
        params.max_tokens,
    )?;
    let model = st.engine.info().name.clone();
    params
        .check()
        .map_err(|m| error_frame(ErrorCode::BadRequest, m))?;
    let prompt = if params.raw {
        // A raw prompt's writer writes the template too, control tokens
        // included: the caller holds a credential for exactly that.
        Prompt::markup(turns.iter().map(|t| t.text.as_str()).collect::<String>())
    } else {
        st.engine
            .format_chat(&turns)
            .map_err(|e| error_frame(ErrorCode::BadRequest, e.to_string()))?
    };
    if !may_queue {
        // Runs this actor handed over count at once (queued), so two
        // requests in a row cannot both take the last slot.
        let load = st.engine.load();
        if load.slots_busy.saturating_add(load.queue_depth) >= load.slots_total {
            return Err(error_frame(
                ErrorCode::NoCapacity,
                format!(
                    "all {} slots of {model} are busy; the entry places the request elsewhere",
                    load.slots_total
                ),
            ));
        }
    }
    let (tx, rx) = job_channel();
    let cancel = CancelFlag::default();
    // The entry names whose cache this is (the credential charged) in the
    // grant it signed; the key is the one the entry placed by.
    let mut partition = [0u8; 8];
    partition.copy_from_slice(&body.cache_scope[..8]);
    let cache = CacheTag {
        partition: u64::from_le_bytes(partition),
        key: affinity_key(&body.cache_scope, &model, &turns),
    };
    let job = Job {
        id: body.request,
        prompt,
        params,
        events: tx,
        cancel: cancel.clone(),
        cache,
    };
    match st.engine.submit(job) {
        Ok(()) => Ok(JobStream { events: rx, cancel }),
        Err(EngineError::QueueFull(n)) => Err(error_frame(
            ErrorCode::NoCapacity,
            format!("this node is at capacity ({n} requests waiting)"),
        )),
        Err(EngineError::Stopped) => Err(super::unavailable("the model worker")),
        Err(e) => Err(error_frame(ErrorCode::Internal, format!("engine: {e}"))),
    }
}
