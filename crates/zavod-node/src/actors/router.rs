//! Router: admits requests (credential, scope, rate and budget through
//! zavod_proto::trust), keeps the mesh view (zavod_proto::mesh::view) fed by
//! gossip, announces this node, places requests with the placer
//! (zavod_proto::mesh::placer: MCDA score, this entry's running placements,
//! cache affinity, two choices) among alive members whose breaker allows
//! it, and mints the per-request grant.
//!
//! Why this file passes 600 lines: one actor whose handlers share its state
//! (view, placer, ledger, reports it waits for); every decision it takes is
//! a zavod-proto call.

use super::breaker::BreakerMsg;
use super::{NodeShared, error_frame, unavailable};
use crate::clock::now_ms;
use crate::datadir::random_u128;
use ractor::message::{BoxedDowncastErr, SerializedMessage};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use zavod_net::Verdict;
use zavod_proto::mesh::announcer::Announcer;
use zavod_proto::mesh::breaker::BreakerState;
use zavod_proto::mesh::capacity::{CapacityReport, ModelOffer, Resources, WorkerLoad};
use zavod_proto::mesh::placer::{Ask, Confirming, Placer};
use zavod_proto::mesh::score::{Candidate, rank};
use zavod_proto::mesh::view::{Accepted, Announcement, Liveness, MeshView, ViewError};
use zavod_proto::trust::{AuthError, Grant, GrantBody, UsageLedger, mint_grant, sign_report};
use zavod_proto::wire::{
    ChatRequest, ErrorCode, ErrorFrame, RunReport, StatusReply, StatusRequest, StatusRow,
};
use zavod_proto::{NodeId, RequestId};
use zavod_store::ConvKey;

mod revoke;

/// How long the Router waits for the Breaker.
const BREAKER_TIMEOUT_MS: u64 = 2_000;
pub(crate) struct Router;

/// An admitted request.
#[derive(Debug, Clone)]
pub struct Admission {
    pub model: String,
    /// Tokens reserved from the credential's budget.
    pub max_tokens: u32,
    pub credential_id: [u8; 16],
    pub conversation: Option<ConvKey>,
    /// Context of the model, per request, as its servers announce it.
    pub context_tokens: u32,
}

/// A request to place, as the serving task asks the Router.
#[derive(Debug, Clone)]
pub struct PlaceAsk {
    /// The key the grant is bound to (the client, or this node when it
    /// relays).
    pub client: NodeId,
    pub model: String,
    pub prompt_hash: [u8; 32],
    pub max_tokens: u32,
    /// Nodes not to place on (they just failed this request).
    pub exclude: Vec<NodeId>,
    /// Nodes to place on only when no other is left (they were full).
    pub avoid: Vec<NodeId>,
    /// The credential whose prompt cache the request may use.
    pub cache_scope: [u8; 16],
    /// The prompt's affinity key (zavod_proto::chat::prompt::affinity_key).
    pub cache_key: u64,
}

/// Where a request runs, and its permission to.
#[derive(Debug)]
pub struct Placement {
    pub target: NodeId,
    pub addrs: Vec<String>,
    pub grant: Grant,
    pub score: f64,
    /// Whether the target holds the prompt's cache (by its last report).
    pub cache_hit: bool,
    /// Counts the request against its target in this entry's placer while
    /// it lives (`None` for a placement this node did not make).
    pub in_flight: Option<InFlight>,
}

/// Tells the Router, when dropped, that a placement it made is over, so
/// its target's load estimate drops at once rather than at the placement's
/// deadline. The serving task holds it exactly as long as the request runs
/// on that target.
#[derive(Debug)]
pub struct InFlight {
    request: RequestId,
    target: NodeId,
    router: ActorRef<RouterMsg>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let _ = self.router.cast(RouterMsg::Done {
            request: self.request,
            target: self.target,
        });
    }
}

pub enum RouterMsg {
    Admit {
        client: NodeId,
        request: Box<ChatRequest>,
        reply: RpcReplyPort<Result<Admission, ErrorFrame>>,
    },
    Place {
        ask: PlaceAsk,
        reply: RpcReplyPort<Result<Placement, ErrorFrame>>,
    },
    /// A placement this node made is over (its [`InFlight`] was dropped).
    Done {
        request: RequestId,
        target: NodeId,
    },
    /// A node failed a request this node placed, or this node's last
    /// connection to it closed: the placer passes it over until it
    /// reports again.
    Failed {
        node: NodeId,
    },
    /// Charges tokens beyond a request's reservation (a target the client
    /// left mid-answer reported more than the client said it had).
    Charge {
        credential_id: [u8; 16],
        tokens: u32,
    },
    /// Returns unused reserved tokens when a request ends.
    Settle {
        credential_id: [u8; 16],
        reserved: u32,
        used: u32,
    },
    Resources(Resources),
    /// The load of the worker of the model at this index of
    /// `NodeShared::models`.
    WorkerLoad {
        model: usize,
        load: WorkerLoad,
    },
    /// A capacity announcement heard by gossip; the Router's verdict goes
    /// back to the network with the ticket, and decides whether it is
    /// forwarded.
    Announce {
        a: Box<Announcement>,
        author: Option<libp2p::PeerId>,
        ticket: zavod_net::GossipTicket,
    },
    Rtt {
        node: NodeId,
        rtt_ms: f64,
    },
    GossipTick,
    Status {
        client: NodeId,
        request: Box<StatusRequest>,
        reply: RpcReplyPort<StatusReply>,
    },
    /// Models the mesh serves now (alive members), with how many nodes
    /// serve each.
    Models(RpcReplyPort<Vec<(ModelOffer, u32)>>),
    /// Members by liveness, for metrics.
    PeerCounts(RpcReplyPort<Vec<(&'static str, u32)>>),
    /// Members this node takes to be alive (itself included) and how many
    /// members it knows of, alive or not: what conversation replicas are
    /// placed over.
    Members(RpcReplyPort<(Vec<NodeId>, usize)>),
    /// Members alive other than this node, not revoked, with the addresses
    /// they announce (for remembering where the mesh is).
    MemberAddrs(RpcReplyPort<Vec<(NodeId, Vec<String>)>>),
    /// Whether a node is a member this node's view has verified.
    IsMember {
        node: NodeId,
        reply: RpcReplyPort<bool>,
    },
    /// A request this node placed elsewhere: deliver the target's report
    /// of it to `tx`.
    Expect {
        request: RequestId,
        tx: oneshot::Sender<RunReport>,
        /// What the prompt was, so the report teaches how the model's
        /// texts tokenize even when the client finished first.
        model: String,
        prompt_bytes: usize,
    },
    /// Revocations to hold: handed over by a member whose list differed
    /// (`from`), or read from this node's own data directory.
    Revocations {
        from: Option<NodeId>,
        list: Vec<zavod_proto::trust::Revocation>,
    },
    /// From another node, over the actor session: the target of a request
    /// this node placed reports the answer with its signed receipt. The
    /// only variant that crosses nodes.
    Report(Box<RunReport>),
}

/// Name under which [`RouterMsg::Report`] travels between nodes.
const REPORT_VARIANT: &str = "zavod.report.2";

// Only `Report` is ever sent to a remote Router; every other variant
// carries local reply ports and fails to serialize. Decoding is parse,
// don't validate: anything that is not a well-formed report is refused,
// and ractor drops what a Router cannot decode.
impl ractor::Message for RouterMsg {
    fn serializable() -> bool {
        true
    }

    fn serialize(self) -> Result<SerializedMessage, BoxedDowncastErr> {
        match self {
            RouterMsg::Report(r) => Ok(SerializedMessage::Cast {
                variant: REPORT_VARIANT.to_string(),
                args: zavod_proto::wire::encode(&*r).map_err(|_| BoxedDowncastErr)?,
                metadata: None,
            }),
            _ => Err(BoxedDowncastErr),
        }
    }

    fn deserialize(msg: SerializedMessage) -> Result<Self, BoxedDowncastErr> {
        match msg {
            SerializedMessage::Cast { variant, args, .. } if variant == REPORT_VARIANT => {
                match zavod_proto::wire::decode::<RunReport>(&args) {
                    Ok(r) => Ok(RouterMsg::Report(Box::new(r))),
                    Err(e) => {
                        tracing::info!(error = %e, "undecodable report from a peer dropped");
                        Err(BoxedDowncastErr)
                    }
                }
            }
            _ => Err(BoxedDowncastErr),
        }
    }
}

/// A request placed elsewhere, waiting for its target's report.
pub(crate) struct Expected {
    tx: oneshot::Sender<RunReport>,
    model: String,
    prompt_bytes: usize,
}

/// Most requests placed elsewhere that may wait for a report at once.
const MAX_EXPECTED: usize = 4_096;

pub(crate) struct RouterState {
    shared: Arc<NodeShared>,
    ledger: UsageLedger,
    resources: Resources,
    /// The latest load of each local model's worker, by index.
    loads: Vec<WorkerLoad>,
    seq: u64,
    view: MeshView,
    /// When this node announces (zavod_proto::mesh::announcer).
    announcer: Announcer,
    /// Requests placed elsewhere, waiting for their target's report.
    expected: BTreeMap<RequestId, Expected>,
    /// This entry's placements still running, for load estimates.
    placer: Placer,
    /// Members recently asked for their revocations: the digest they
    /// announced then, and when (see `revoke::maybe_fetch_revocations`).
    revocation_fetches: BTreeMap<NodeId, (zavod_proto::trust::RevocationDigest, u64)>,
    /// The ledger's exports go to the task that saves them
    /// (`crate::usage`); `usage_saved` is the ledger version last sent.
    usage_saver: tokio::sync::watch::Sender<crate::usage::Counts>,
    usage_sent: u64,
}

/// How long a member is not asked again for the same list.
const REVOCATION_FETCH_EVERY_MS: u64 = 5_000;
/// Members asked for their revocations within that time, at most.
const MAX_REVOCATION_FETCHES: usize = 4;

fn auth_error(e: AuthError) -> ErrorFrame {
    let code = match &e {
        AuthError::ModelNotAllowed { .. } => ErrorCode::Forbidden,
        AuthError::RateLimited { .. } => ErrorCode::RateLimited,
        AuthError::BudgetExhausted { .. } => ErrorCode::BudgetExhausted,
        _ => ErrorCode::Unauthorized,
    };
    error_frame(code, format!("credential refused: {e}"))
}

impl RouterState {
    fn me(&self) -> NodeId {
        self.shared.identity.id()
    }

    fn self_report(&mut self) -> CapacityReport {
        self.seq += 1;
        let served: Vec<(ModelOffer, WorkerLoad)> = self
            .shared
            .models
            .iter()
            .zip(&self.loads)
            .map(|(m, l)| (m.offer(), l.clone()))
            .collect();
        CapacityReport::build(self.me(), self.seq, now_ms(), &self.resources, &served)
    }

    /// Announces this node when its figures moved or the heartbeat is due.
    fn gossip_tick(&mut self) {
        let now = now_ms();
        self.view.forget(now);
        let Some(membership) = self.shared.membership() else {
            return;
        };
        self.save_usage();
        let mut report = self.self_report();
        report.addrs = self.shared.listen_addrs();
        report.revocations = self.shared.revocations().digest();
        // Spending changed: other entries hear of it at this tick.
        if self.ledger.has_news() {
            self.announcer.reset();
        }
        if !self.announcer.poll(&report, now) {
            return;
        }
        report.usage = self
            .ledger
            .poll_counts(zavod_proto::limits::MAX_USAGE_PER_ANNOUNCEMENT);
        let a = Announcement {
            report: sign_report(&self.shared.identity.key, report),
            membership,
        };
        if let Err(e) = self.view.on_announcement(&a, now) {
            tracing::warn!(error = %e, "this node's own announcement was refused");
        }
        match zavod_proto::wire::encode(&a) {
            Ok(bytes) => {
                self.shared.net.publish(bytes);
                self.shared
                    .metrics
                    .gossip_messages
                    .get_or_create(&crate::metrics::DirectionLabels { direction: "out" })
                    .inc();
            }
            Err(e) => tracing::warn!(error = %e, "cannot encode announcement"),
        }
    }

    /// Takes in an announcement and says whether gossip should pass it on:
    /// only new, valid reports whose gossip author is the node they are
    /// about travel further.
    fn on_announce(&mut self, a: &Announcement, author: Option<libp2p::PeerId>) -> Verdict {
        self.shared
            .metrics
            .gossip_messages
            .get_or_create(&crate::metrics::DirectionLabels { direction: "in" })
            .inc();
        let now = now_ms();
        let node = a.report.body.node;
        if node == self.me() {
            return Verdict::Ignore;
        }
        // Another node's report signed into gossip by someone else is a
        // replay: the report's own signature holds, but it is not theirs
        // to spread.
        if author.and_then(|p| zavod_net::node_id_of(&p)) != Some(node) {
            tracing::debug!(peer = %node.short(), "announcement published by another node dropped");
            return Verdict::Reject;
        }
        if self.shared.revocations().node_revoked(&node) {
            tracing::debug!(peer = %node.short(), "announcement of a revoked node dropped");
            return Verdict::Reject;
        }
        let verdict = self.take_announcement(a, now);
        if verdict == Verdict::Accept {
            self.maybe_fetch_revocations(node, &a.report.body.revocations, now);
            self.ledger.on_remote(node, &a.report.body.usage, now);
        }
        verdict
    }

    /// Hands the ledger's latest counts to the saver when they changed.
    fn save_usage(&mut self) {
        let v = self.ledger.version();
        if v != self.usage_sent {
            self.usage_sent = v;
            self.usage_saver.send_replace(self.ledger.export(self.me()));
        }
    }

    fn take_announcement(&mut self, a: &Announcement, now: u64) -> Verdict {
        let node = a.report.body.node;
        match self.view.on_announcement(a, now) {
            Ok(Accepted::New) => {
                tracing::info!(peer = %node.short(), models = ?a.report.body.models.iter().map(|m| &m.name).collect::<Vec<_>>(), "member joined the view");
                self.placer.on_report(&node);
                self.connect_to(node);
                Verdict::Accept
            }
            Ok(Accepted::Updated) => {
                self.placer.on_report(&node);
                Verdict::Accept
            }
            Ok(Accepted::Stale) => Verdict::Ignore,
            Err(ViewError::Full) => Verdict::Ignore,
            Err(e) => {
                tracing::debug!(peer = %node.short(), error = %e, "announcement dropped");
                Verdict::Reject
            }
        }
    }

    /// Dials a member we heard of, for RTT and direct gossip.
    fn connect_to(&self, node: NodeId) {
        let Some(peer) = zavod_net::peer_id_of(&node) else {
            return;
        };
        let addrs = self
            .view
            .get(&node)
            .map(|m| {
                m.addrs
                    .iter()
                    .filter_map(|a| a.parse::<libp2p::Multiaddr>().ok())
                    .map(|a| zavod_net::addr::split_peer(&a).0)
                    .collect()
            })
            .unwrap_or_default();
        self.shared.net.connect(peer, addrs);
    }

    /// Models alive members serve, by name, with their node counts.
    fn models(&self) -> Vec<(ModelOffer, u32)> {
        let now = now_ms();
        let mut by_name: BTreeMap<String, (ModelOffer, u32)> = BTreeMap::new();
        for (_, m) in self.view.members() {
            if m.liveness(&self.view.config, now) == Liveness::Gone {
                continue;
            }
            for offer in &m.report.models {
                by_name
                    .entry(offer.name.clone())
                    .or_insert_with(|| (offer.clone(), 0))
                    .1 += 1;
            }
        }
        by_name.into_values().collect()
    }

    fn serves(&self, model: &str, now: u64) -> bool {
        !self
            .view
            .candidates(model, &self.me(), now, None)
            .is_empty()
    }

    fn admit(&mut self, client: NodeId, req: ChatRequest) -> Result<Admission, ErrorFrame> {
        req.check()
            .map_err(|m| error_frame(ErrorCode::BadRequest, m))?;
        let now = now_ms();
        // A mesh that serves nothing at all cannot serve now (503 over
        // HTTP); one that serves other models does not know this one (404).
        let nothing_served = || {
            error_frame(
                ErrorCode::NoCapacity,
                "no node in the mesh serves a model yet",
            )
        };
        let model = match req.model {
            Some(m) => m,
            None => self.default_model(now).ok_or_else(nothing_served)?,
        };
        let cred = req
            .credential
            .verify(&self.shared.identity.authorities, &client, &model, now)
            .map_err(auth_error)?;
        self.check_not_revoked(&cred.id)?;
        if !self.serves(&model, now) {
            if self.models().is_empty() {
                return Err(nothing_served());
            }
            let served: Vec<String> = self.models().into_iter().map(|(o, _)| o.name).collect();
            return Err(error_frame(
                ErrorCode::ModelUnavailable,
                format!(
                    "no alive node in the mesh serves model {model:?}; it serves {} \
                     (ask for one with --model NAME, or the OpenAI `model` field)",
                    served.join(", ")
                ),
            ));
        }
        let context_tokens = self.context_tokens(&model, now);
        let max_tokens = self
            .ledger
            .admit(cred, req.params.max_tokens, now)
            .map_err(auth_error)?;
        Ok(Admission {
            model,
            max_tokens,
            context_tokens,
            credential_id: cred.id,
            conversation: req.conversation.map(|c| ConvKey {
                owner: client,
                conversation: c,
            }),
        })
    }

    /// The smallest context any alive server of `model` offers, so the
    /// prompt fits wherever it is placed.
    fn context_tokens(&self, model: &str, now: u64) -> u32 {
        self.view
            .members()
            .filter(|(_, m)| m.liveness(&self.view.config, now) == Liveness::Alive)
            .flat_map(|(_, m)| m.report.models.iter())
            .filter(|o| o.name == model)
            .map(|o| o.context_tokens)
            .min()
            .unwrap_or(self.shared.config.model.context_tokens)
    }

    /// This node's model, else the model most alive members serve.
    fn default_model(&self, now: u64) -> Option<String> {
        if let Some(m) = self.shared.models.first() {
            return Some(m.offer().name);
        }
        let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
        for (_, m) in self.view.members() {
            if m.liveness(&self.view.config, now) == Liveness::Alive {
                for o in &m.report.models {
                    *counts.entry(o.name.as_str()).or_default() += 1;
                }
            }
        }
        counts
            .into_iter()
            .max_by_key(|(name, n)| (*n, std::cmp::Reverse(*name)))
            .map(|(name, _)| name.to_string())
    }

    fn candidates(&self, model: &str, now: u64, cache_key: u64) -> Vec<Candidate> {
        let me = self.me();
        let mut c = self.view.candidates(model, &me, now, Some(cache_key));
        // This node's own figures are fresher than its last announcement.
        let own = self
            .shared
            .model_index(model)
            .and_then(|i| self.loads.get(i));
        for cand in c.iter_mut().filter(|c| c.node == me) {
            let Some(load) = own else { continue };
            cand.slots_free = load.slots_total.saturating_sub(load.slots_busy);
            cand.slots_total = load.slots_total;
            cand.queue_depth = load.queue_depth;
            cand.age_ms = 0;
            cand.cache_hit = load.cache_keys.contains(&cache_key);
        }
        c
    }

    async fn place(
        &mut self,
        myself: &ActorRef<RouterMsg>,
        ask: PlaceAsk,
    ) -> Result<Placement, ErrorFrame> {
        let PlaceAsk {
            client,
            model,
            prompt_hash: hash,
            max_tokens,
            exclude,
            avoid,
            cache_scope,
            cache_key,
        } = ask;
        let now = now_ms();
        let candidates: Vec<Candidate> = self.candidates(&model, now, cache_key);
        let breaker = self
            .shared
            .directory
            .get()
            .breaker
            .ok_or_else(|| unavailable("the breaker"))?;
        // The Breaker answers which may be tried; the decision itself is
        // zavod_proto's; then the Breaker confirms it (a half-open peer
        // takes one probe at a time).
        let nodes: Vec<NodeId> = candidates
            .iter()
            .map(|c| c.node)
            .filter(|n| !exclude.contains(n))
            .collect();
        let routable = ractor::call_t!(
            breaker,
            |reply| BreakerMsg::Filter { nodes, reply },
            BREAKER_TIMEOUT_MS
        )
        .map_err(|_| unavailable("the breaker"))?;
        let request =
            RequestId(random_u128().map_err(|e| error_frame(ErrorCode::Internal, e.to_string()))?);
        let config = &self.shared.config;
        let cfg = config.scoring.placer(config.gossip.heartbeat_ms);
        // Counted against its target until the serving task drops it, or
        // for as long as the answer may take at the most.
        let until_ms =
            now + config.limits.stall_timeout_ms + u64::from(max_tokens).saturating_mul(1_000);
        let ask = Ask {
            request,
            exclude: &exclude,
            avoid: &avoid,
            until_ms,
            cache_key: Some(cache_key),
        };
        // The same steps as `Placer::place_confirmed`, with the
        // confirmation an actor call.
        let mut confirming = Confirming::default();
        let chosen = loop {
            let placed = confirming.next(
                &mut self.placer,
                &candidates,
                |n| routable.contains(n),
                &ask,
                &cfg,
                now,
            );
            let Some(chosen) = placed else {
                return Err(error_frame(
                    ErrorCode::NoCapacity,
                    format!(
                        "no node can serve {model:?} now (none alive with it loaded, or their circuits are open)"
                    ),
                ));
            };
            let node = chosen.node;
            let confirmed = ractor::call_t!(
                breaker,
                |reply| BreakerMsg::Acquire {
                    node,
                    request,
                    until_ms,
                    reply,
                },
                BREAKER_TIMEOUT_MS
            )
            .map_err(|_| unavailable("the breaker"))?;
            if confirmed {
                break chosen;
            }
            // Its circuit opened, or its probe went out, since the filter.
            confirming.refused(&mut self.placer, &chosen, &ask, now);
        };
        let addrs = if chosen.node == self.me() {
            self.shared.listen_addrs()
        } else {
            self.view
                .get(&chosen.node)
                .map(|m| m.addrs.to_vec())
                .unwrap_or_default()
        };
        let grant = mint_grant(
            &self.shared.identity.key,
            GrantBody {
                request,
                client,
                target: chosen.node,
                model,
                max_tokens,
                expires_at_ms: now + self.shared.config.limits.grant_ttl_ms,
                prompt_hash: hash,
                cache_scope,
            },
        );
        Ok(Placement {
            target: chosen.node,
            addrs,
            grant,
            score: chosen.score,
            cache_hit: chosen.cache_hit,
            in_flight: Some(InFlight {
                request,
                target: chosen.node,
                router: myself.clone(),
            }),
        })
    }

    async fn status(&mut self, client: NodeId, request: &StatusRequest) -> StatusReply {
        let now = now_ms();
        let allowed = match request {
            StatusRequest::Credential(c) => {
                match c.verify_holder(&self.shared.identity.authorities, &client, now) {
                    Ok(b) => {
                        if let Err(e) = self.check_not_revoked(&b.id) {
                            return StatusReply::Refused(e);
                        }
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            StatusRequest::Operator(p) => p.verify(&self.me(), &client, now),
            StatusRequest::Revocations => return self.revocations_for(client, now),
            StatusRequest::Revoke(r) => return self.take_revocation(r.clone()).await,
            // Answered by the status protocol itself; nothing to show here.
            StatusRequest::Membership => {
                return StatusReply::Refused(crate::actors::error_frame(
                    zavod_proto::wire::ErrorCode::BadRequest,
                    "a membership request is answered by the status stream",
                ));
            }
        };
        if let Err(e) = allowed {
            return StatusReply::Refused(auth_error(e));
        }
        let breakers: Vec<(NodeId, BreakerState)> = match self.shared.directory.get().breaker {
            Some(b) => {
                ractor::call_t!(b, BreakerMsg::States, BREAKER_TIMEOUT_MS).unwrap_or_default()
            }
            None => Vec::new(),
        };
        let me = self.me();
        let alive = self.view.alive_candidates(&me, now);
        let scores = rank(&alive, &self.shared.config.scoring.weights);
        let rows = self
            .view
            .members()
            .map(|(id, m)| StatusRow {
                node: *id,
                is_self: *id == me,
                addrs: m.addrs.to_vec(),
                models: m.report.models.clone(),
                on_gpu: m.report.on_gpu,
                mem_free_bytes: m.report.mem_free_bytes,
                mem_total_bytes: m.report.mem_total_bytes,
                slots_free: m.report.slots_free,
                slots_total: m.report.slots_total,
                queue_depth: m.report.queue_depth,
                tokens_per_s: m.report.tokens_per_s,
                liveness: m.liveness(&self.view.config, now).name().into(),
                breaker: breakers
                    .iter()
                    .find(|(n, _)| n == id)
                    .map_or("closed", |(_, s)| s.name())
                    .into(),
                rtt_ms: if *id == me { Some(0.0) } else { m.rtt_ms },
                score: scores
                    .iter()
                    .find(|s| s.node == *id)
                    .map_or(0.0, |s| s.score),
                heard_ms_ago: now.saturating_sub(m.heard_at_ms),
                tailnet_name: if *id == me {
                    self.shared.tailnet_self.clone()
                } else {
                    zavod_net::peer_id_of(id).and_then(|p| {
                        let names = match self.shared.tailnet_names.read() {
                            Ok(n) => n,
                            Err(p) => p.into_inner(),
                        };
                        names.get(&p).cloned()
                    })
                },
            })
            .collect();
        StatusReply::Mesh {
            entry: me,
            rows,
            dropped_non_member: self.view.dropped.non_member,
        }
    }
}

impl Actor for Router {
    type Msg = RouterMsg;
    type State = RouterState;
    type Arguments = Arc<NodeShared>;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        shared: Arc<NodeShared>,
    ) -> Result<Self::State, ActorProcessingErr> {
        let loads = vec![
            WorkerLoad {
                slots_total: shared.config.model.slots,
                ..Default::default()
            };
            shared.models.len()
        ];
        let view = MeshView::new(
            shared.identity.authorities.clone(),
            shared.config.view.clone(),
        );
        myself.send_interval(
            Duration::from_millis(shared.config.gossip.interval_ms),
            || RouterMsg::GossipTick,
        );
        let heartbeat_ms = shared.config.gossip.heartbeat_ms;
        // What credentials spent, here and at other entries, before this
        // actor (or the node) restarted.
        let mut ledger = UsageLedger::default();
        match crate::usage::load(&shared.identity.dir) {
            Ok(saved) => ledger.import(shared.identity.id(), &saved, now_ms()),
            Err(e) => {
                tracing::error!(error = %e, "cannot read saved credential usage; budgets start from what other entries report")
            }
        }
        let usage_saver = crate::usage::saver(&shared.identity.dir);
        let mut st = RouterState {
            shared,
            ledger,
            resources: Resources::default(),
            loads,
            seq: 0,
            view,
            announcer: Announcer::new(heartbeat_ms),
            expected: BTreeMap::new(),
            placer: Placer::new(),
            revocation_fetches: BTreeMap::new(),
            usage_saver,
            usage_sent: 0,
        };
        ractor::pg::join(
            crate::cluster::ROUTER_GROUP.to_string(),
            vec![myself.get_cell()],
        );
        // Sequence numbers must grow across restarts of this actor (and of
        // the node), or peers would ignore the new reports as stale.
        st.seq = now_ms();
        st.gossip_tick();
        Ok(st)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RouterMsg::Admit {
                client,
                request,
                reply,
            } => {
                let _ = reply.send(st.admit(client, *request));
            }
            RouterMsg::Place { ask, reply } => {
                let placed = st.place(&myself, ask).await;
                // A requester that gave up drops the placement, which
                // counts it done.
                let _ = reply.send(placed);
            }
            RouterMsg::Done { request, target } => {
                st.placer.on_done(request, now_ms());
                // A half-open probe that ended without an outcome frees
                // its slot (after an outcome this changes nothing).
                if let Some(b) = st.shared.directory.get().breaker {
                    let _ = b.cast(BreakerMsg::Release {
                        node: target,
                        request,
                    });
                }
            }
            RouterMsg::Failed { node } => st.placer.on_failure(&node),
            RouterMsg::Settle {
                credential_id,
                reserved,
                used,
            } => st.ledger.settle(&credential_id, reserved, used),
            RouterMsg::Charge {
                credential_id,
                tokens,
            } => st.ledger.charge(&credential_id, tokens),
            RouterMsg::Resources(r) => {
                st.shared.metrics.resources(&r);
                st.resources = r;
            }
            RouterMsg::WorkerLoad { model, load } => {
                if let Some(l) = st.loads.get_mut(model) {
                    *l = load;
                }
                st.shared
                    .metrics
                    .load(&zavod_proto::mesh::capacity::total_load(st.loads.iter()));
                // Fresh figures of this node count its running requests.
                let me = st.me();
                st.placer.on_report(&me);
            }
            RouterMsg::Models(reply) => {
                let _ = reply.send(st.models());
            }
            RouterMsg::PeerCounts(reply) => {
                let now = now_ms();
                let mut counts = [("alive", 0u32), ("suspect", 0), ("gone", 0)];
                for (_, m) in st.view.members() {
                    let i = match m.liveness(&st.view.config, now) {
                        Liveness::Alive => 0,
                        Liveness::Suspect => 1,
                        Liveness::Gone => 2,
                    };
                    counts[i].1 += 1;
                }
                let _ = reply.send(counts.to_vec());
            }
            RouterMsg::Announce { a, author, ticket } => {
                let verdict = st.on_announce(&a, author);
                st.shared.net.judge(ticket, verdict);
            }
            RouterMsg::Rtt { node, rtt_ms } => st.view.on_rtt(&node, rtt_ms),
            RouterMsg::GossipTick => st.gossip_tick(),
            RouterMsg::Status {
                client,
                request,
                reply,
            } => {
                let _ = reply.send(st.status(client, &request).await);
            }
            RouterMsg::Members(reply) => {
                let now = now_ms();
                let revoked = st.shared.revocations();
                let mut known = 0usize;
                let mut alive = Vec::new();
                for (id, m) in st.view.members() {
                    if revoked.node_revoked(id) {
                        continue;
                    }
                    known += 1;
                    if m.liveness(&st.view.config, now) == Liveness::Alive {
                        alive.push(*id);
                    }
                }
                drop(revoked);
                let _ = reply.send((alive, known));
            }
            RouterMsg::MemberAddrs(reply) => {
                let now = now_ms();
                let me = st.me();
                let revoked = st.shared.revocations();
                let alive: Vec<(NodeId, Vec<String>)> = st
                    .view
                    .members()
                    .filter(|(id, m)| {
                        **id != me
                            && !revoked.node_revoked(id)
                            && m.liveness(&st.view.config, now) == Liveness::Alive
                    })
                    .map(|(id, m)| (*id, m.addrs.to_vec()))
                    .collect();
                drop(revoked);
                let _ = reply.send(alive);
            }
            RouterMsg::IsMember { node, reply } => {
                let member = st.view.is_member(&node, now_ms())
                    && !st.shared.revocations().node_revoked(&node);
                let _ = reply.send(member);
            }
            RouterMsg::Revocations { from, list } => {
                st.apply_revocations(from, list).await;
            }
            RouterMsg::Expect {
                request,
                tx,
                model,
                prompt_bytes,
            } => {
                if st.expected.len() >= MAX_EXPECTED {
                    st.expected.retain(|_, e| !e.tx.is_closed());
                }
                // When full, the request simply goes without a report and
                // relies on the client's.
                if st.expected.len() < MAX_EXPECTED {
                    st.expected.insert(
                        request,
                        Expected {
                            tx,
                            model,
                            prompt_bytes,
                        },
                    );
                }
            }
            RouterMsg::Report(report) => match st.expected.remove(&report.request) {
                Some(e) => {
                    st.shared
                        .learn_tokens(&e.model, e.prompt_bytes, report.prompt_tokens);
                    let _ = e.tx.send(*report);
                }
                None => tracing::debug!(request = %report.request, "report for no waiting request"),
            },
        }
        Ok(())
    }
}
