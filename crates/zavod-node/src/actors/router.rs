//! Router: admits requests (credential, scope, rate and budget through
//! zavod_proto::auth), keeps the capacity view, places requests by MCDA
//! rank and the request-id keyed pick (zavod_proto::score) among members
//! whose breaker allows it, and mints the per-request grant.
//!
//! With one node the view holds only this node; the mesh adds peers.

use super::breaker::BreakerMsg;
use super::{NodeShared, error_frame, unavailable};
use crate::clock::now_ms;
use crate::datadir::random_u128;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::sync::Arc;
use std::time::Duration;
use zavod_proto::auth::{AuthError, Grant, GrantBody, UsageLedger, mint_grant, prompt_hash};
use zavod_proto::capacity::{CapacityReport, Resources, WorkerLoad};
use zavod_proto::score::{Candidate, pick, rank};
use zavod_proto::wire::{ChatRequest, ErrorCode, ErrorFrame};
use zavod_proto::{NodeId, RequestId};
use zavod_store::ConvKey;

/// How long the Router waits for the Breaker.
const BREAKER_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Router;

/// An admitted request.
#[derive(Debug, Clone)]
pub struct Admission {
    pub model: String,
    /// Tokens reserved from the credential's budget.
    pub max_tokens: u32,
    pub credential_id: [u8; 16],
    pub conversation: Option<ConvKey>,
}

/// Where a request runs, and its permission to.
#[derive(Debug, Clone)]
pub struct Placement {
    pub target: NodeId,
    pub grant: Grant,
    pub score: f64,
}

pub enum RouterMsg {
    Admit {
        client: NodeId,
        request: Box<ChatRequest>,
        reply: RpcReplyPort<Result<Admission, ErrorFrame>>,
    },
    Place {
        client: NodeId,
        model: String,
        prompt_hash: [u8; 32],
        max_tokens: u32,
        reply: RpcReplyPort<Result<Placement, ErrorFrame>>,
    },
    /// Returns unused reserved tokens when a request ends.
    Settle {
        credential_id: [u8; 16],
        reserved: u32,
        used: u32,
    },
    Resources(Resources),
    WorkerLoad(WorkerLoad),
    SelfReport(RpcReplyPort<CapacityReport>),
}

impl ractor::Message for RouterMsg {}

pub struct RouterState {
    shared: Arc<NodeShared>,
    ledger: UsageLedger,
    resources: Resources,
    load: WorkerLoad,
    seq: u64,
}

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
    fn self_report(&mut self) -> CapacityReport {
        self.seq += 1;
        let models = self
            .shared
            .model
            .as_ref()
            .map(|m| vec![m.offer()])
            .unwrap_or_default();
        CapacityReport::build(
            self.shared.identity.id(),
            self.seq,
            now_ms(),
            &self.resources,
            &self.load,
            models,
        )
    }

    fn admit(&mut self, client: NodeId, req: ChatRequest) -> Result<Admission, ErrorFrame> {
        req.check()
            .map_err(|m| error_frame(ErrorCode::BadRequest, m))?;
        let now = now_ms();
        let model = match req.model {
            Some(m) => m,
            None => self
                .shared
                .model
                .as_ref()
                .map(|m| m.offer().name)
                .ok_or_else(|| {
                    error_frame(
                        ErrorCode::ModelUnavailable,
                        "no model is served here; name one with --model",
                    )
                })?,
        };
        let cred = req
            .credential
            .verify(&self.shared.identity.authorities, &client, &model, now)
            .map_err(auth_error)?;
        let serves = self
            .shared
            .model
            .as_ref()
            .is_some_and(|m| m.offer().name == model);
        if !serves {
            return Err(error_frame(
                ErrorCode::ModelUnavailable,
                format!("no node serves model {model:?}"),
            ));
        }
        let max_tokens = self
            .ledger
            .admit(cred, req.params.max_tokens, now)
            .map_err(auth_error)?;
        Ok(Admission {
            model,
            max_tokens,
            credential_id: cred.id,
            conversation: req.conversation.map(|c| ConvKey {
                owner: client,
                conversation: c,
            }),
        })
    }

    async fn place(
        &mut self,
        client: NodeId,
        model: String,
        hash: [u8; 32],
        max_tokens: u32,
    ) -> Result<Placement, ErrorFrame> {
        let me = self.self_report();
        let candidates: Vec<Candidate> = [me]
            .iter()
            .filter(|r| r.serves(&model))
            .map(|r| Candidate {
                node: r.node,
                mem_free_bytes: r.mem_free_bytes,
                slots_free: r.slots_free,
                slots_total: r.slots_total,
                rtt_ms: Some(0.0),
                tokens_per_s: f64::from(r.tokens_per_s),
            })
            .collect();
        let breaker = self
            .shared
            .directory
            .get()
            .breaker
            .ok_or_else(|| unavailable("the breaker"))?;
        let nodes: Vec<NodeId> = candidates.iter().map(|c| c.node).collect();
        let open = ractor::call_t!(
            breaker,
            |reply| BreakerMsg::Filter { nodes, reply },
            BREAKER_TIMEOUT.as_millis() as u64
        )
        .map_err(|_| unavailable("the breaker"))?;
        let candidates: Vec<Candidate> = candidates
            .into_iter()
            .filter(|c| open.contains(&c.node))
            .collect();
        let request =
            RequestId(random_u128().map_err(|e| error_frame(ErrorCode::Internal, e.to_string()))?);
        let ranked = rank(&candidates, &self.shared.config.scoring.weights);
        let chosen = pick(&ranked, request, self.shared.config.scoring.top_k).ok_or_else(|| {
            error_frame(
                ErrorCode::NoCapacity,
                format!("no node can serve {model:?} now (circuit open or none loaded)"),
            )
        })?;
        let grant = mint_grant(
            &self.shared.identity.key,
            GrantBody {
                request,
                client,
                target: chosen.node,
                model,
                max_tokens,
                expires_at_ms: now_ms() + self.shared.config.limits.grant_ttl_ms,
                prompt_hash: hash,
            },
        );
        Ok(Placement {
            target: chosen.node,
            grant,
            score: chosen.score,
        })
    }
}

/// The hash a grant binds a prompt with.
pub fn hash_prompt(prompt: &str) -> [u8; 32] {
    prompt_hash(prompt)
}

impl Actor for Router {
    type Msg = RouterMsg;
    type State = RouterState;
    type Arguments = Arc<NodeShared>;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        shared: Arc<NodeShared>,
    ) -> Result<Self::State, ActorProcessingErr> {
        let slots = shared
            .model
            .as_ref()
            .map_or(0, |_| shared.config.model.slots);
        Ok(RouterState {
            shared,
            ledger: UsageLedger::default(),
            resources: Resources::default(),
            load: WorkerLoad {
                slots_total: slots,
                ..Default::default()
            },
            seq: 0,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
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
            RouterMsg::Place {
                client,
                model,
                prompt_hash,
                max_tokens,
                reply,
            } => {
                let _ = reply.send(st.place(client, model, prompt_hash, max_tokens).await);
            }
            RouterMsg::Settle {
                credential_id,
                reserved,
                used,
            } => st.ledger.settle(&credential_id, reserved, used),
            RouterMsg::Resources(r) => st.resources = r,
            RouterMsg::WorkerLoad(l) => st.load = l,
            RouterMsg::SelfReport(reply) => {
                let _ = reply.send(st.self_report());
            }
        }
        Ok(())
    }
}
