//! Embeddings through the mesh, routed as chats are.
//!
//! - entry ([`embed`]): the Router admits the request (credential, model
//!   scope, rate, and a budget reservation of the texts' estimated tokens)
//!   and places it by the same MCDA rank; the vectors come from this node's
//!   model worker or, over the embed protocol, from the target's. A target
//!   that cannot be reached, stalls, breaks the stream or fails inside is
//!   counted against its breaker and the request goes to the next (at most
//!   [`ATTEMPTS`] targets); a refusal of the texts themselves is the
//!   client's answer and counts against no one.
//! - target ([`serve_embed`]): the model worker checks the grant (bound to
//!   the texts by `embed_hash`, single use), then the model's embedder
//!   thread computes the vectors.
//!
//! The reservation is settled once, with the tokens the texts came to.

use super::{Reservation, call, first_frame, net_error_frame, record_outcome};
use crate::actors::model_worker::WorkerMsg;
use crate::actors::router::{Admission, PlaceAsk, Placement, RouterMsg};
use crate::actors::{NodeShared, error_frame};
use std::sync::Arc;
use std::time::Duration;
use zavod_engine::EngineError;
use zavod_net::{EMBED_PROTOCOL, FrameReader, FrameWriter};
use zavod_proto::NodeId;
use zavod_proto::limits::MAX_TOKENS_PER_REQUEST;
use zavod_proto::mesh::breaker::{Fault, Outcome, fault_of};
use zavod_proto::trust::{Credential, Grant, Membership};
use zavod_proto::wire::embed::{EmbedReply, EmbedRequest, check_inputs, check_vectors, embed_hash};
use zavod_proto::wire::{ChatRequest, ErrorCode, ErrorFrame, GenParams};

/// Most targets tried for one request.
const ATTEMPTS: usize = 3;

/// The vectors of a request, in the order of its texts.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct EmbedOutput {
    pub model: String,
    pub vectors: Vec<Vec<f32>>,
    pub prompt_tokens: u32,
    pub served_by: NodeId,
}

/// Embeds `inputs` with `model` (or the mesh's default) for the holder
/// `client` of `credential`, with this node as the entry.
pub(crate) async fn embed(
    shared: &Arc<NodeShared>,
    client: NodeId,
    credential: Credential,
    model: Option<String>,
    inputs: Vec<String>,
) -> Result<EmbedOutput, ErrorFrame> {
    check_inputs(&inputs).map_err(|m| error_frame(ErrorCode::BadRequest, m))?;
    // The texts' tokens are reserved as a chat's answer is; what they
    // come to is charged when the vectors arrive.
    let estimate: u64 = inputs
        .iter()
        .map(|t| u64::from(zavod_proto::chat::prompt::estimate_tokens(t)) + 2)
        .sum();
    let want = u32::try_from(estimate)
        .unwrap_or(u32::MAX)
        .clamp(1, MAX_TOKENS_PER_REQUEST);
    let admit = ChatRequest {
        credential,
        model,
        conversation: None,
        // Admission checks the message only for its size; the texts are
        // checked above.
        message: inputs[0].clone(),
        params: GenParams {
            max_tokens: want,
            ..GenParams::default()
        },
        show_prompt: false,
        turn: None,
        continued: None,
    };
    let admission: Admission = call(shared.directory.get().router, "the router", |reply| {
        RouterMsg::Admit {
            client,
            request: Box::new(admit),
            reply,
        }
    })
    .await??;
    let mut reservation = Reservation {
        shared,
        admission: &admission,
        used: Some(0),
    };
    let me = shared.identity.id();
    let hash = embed_hash(&inputs);
    let mut exclude = Vec::new();
    let mut last = None;
    for _ in 0..ATTEMPTS {
        let placement: Placement = call(shared.directory.get().router, "the router", |reply| {
            RouterMsg::Place {
                ask: PlaceAsk {
                    // This node presents the grant, here or at the target.
                    client: me,
                    model: admission.model.clone(),
                    prompt_hash: hash,
                    max_tokens: admission.max_tokens,
                    exclude: exclude.clone(),
                    avoid: Vec::new(),
                    cache_scope: admission.credential_id,
                    cache_key: 0,
                },
                reply,
            }
        })
        .await??;
        let target = placement.target;
        let r = if target == me {
            embed_here(shared, &placement.grant, None, me, inputs.clone()).await
        } else {
            fetch(shared, &placement, &inputs).await
        };
        match r {
            Ok((vectors, prompt_tokens)) => {
                record_outcome(shared, target, Outcome::Success);
                reservation.used = Some(prompt_tokens.min(admission.max_tokens));
                return Ok(EmbedOutput {
                    model: admission.model.clone(),
                    vectors,
                    prompt_tokens,
                    served_by: target,
                });
            }
            Err(Failed::Input(e)) => return Err(e),
            Err(Failed::Busy(e)) => last = Some(e),
            Err(Failed::Target(e)) => {
                record_outcome(shared, target, Outcome::Failure);
                last = Some(e);
            }
        }
        exclude.push(target);
    }
    Err(last.unwrap_or_else(|| error_frame(ErrorCode::NoCapacity, "no target could embed")))
}

/// How one target's attempt went wrong.
enum Failed {
    /// The texts themselves were refused: the client's answer.
    Input(ErrorFrame),
    /// The target was full or restarting: try another, blame no one.
    Busy(ErrorFrame),
    /// A fault the entry saw itself: unreachable, stalled, broken, internal.
    Target(ErrorFrame),
}

impl Failed {
    /// Sorts a refusal by [`fault_of`].
    fn of(e: ErrorFrame) -> Failed {
        match fault_of(e.code) {
            Fault::Request => Failed::Input(e),
            Fault::Target => Failed::Target(e),
            Fault::Busy => Failed::Busy(e),
        }
    }
}

fn engine_error(e: EngineError) -> ErrorFrame {
    match e {
        EngineError::Config(m) => error_frame(ErrorCode::BadRequest, m),
        EngineError::QueueFull(n) => error_frame(
            ErrorCode::NoCapacity,
            format!("the model's embedding queue is full ({n} requests waiting)"),
        ),
        other => error_frame(ErrorCode::Internal, format!("embedding: {other}")),
    }
}

/// Embeds on this node: the worker checks and spends the grant, then the
/// model's embedder thread runs the texts.
async fn embed_here(
    shared: &Arc<NodeShared>,
    grant: &Grant,
    issuer_membership: Option<Membership>,
    client: NodeId,
    inputs: Vec<String>,
) -> Result<(Vec<Vec<f32>>, u32), Failed> {
    let worker = shared
        .model_index(&grant.body.model)
        .and_then(|i| shared.directory.get().workers.get(&i).cloned());
    let backend = call(worker, "the model worker", |reply| WorkerMsg::Embed {
        grant: Box::new(grant.clone()),
        issuer_membership: issuer_membership.map(Box::new),
        client,
        inputs_hash: embed_hash(&inputs),
        reply,
    })
    .await
    .and_then(|r| r)
    .map_err(Failed::of)?;
    let queued = tokio::task::spawn_blocking(move || backend.embed(inputs))
        .await
        .map_err(|e| Failed::Target(error_frame(ErrorCode::Internal, e.to_string())))?
        .map_err(|e| Failed::of(engine_error(e)))?;
    let wait = Duration::from_millis(shared.config.limits.stall_timeout_ms);
    match tokio::time::timeout(wait, queued).await {
        Ok(Ok(Ok(e))) => Ok((e.vectors, e.prompt_tokens)),
        Ok(Ok(Err(e))) => Err(Failed::of(engine_error(e))),
        Ok(Err(_)) => Err(Failed::Target(error_frame(
            ErrorCode::Internal,
            "the embedder stopped",
        ))),
        Err(_) => Err(Failed::Target(error_frame(
            ErrorCode::Timeout,
            format!("no embeddings within {} ms", wait.as_millis()),
        ))),
    }
}

/// Asks the target over the embed protocol.
async fn fetch(
    shared: &Arc<NodeShared>,
    placement: &Placement,
    inputs: &[String],
) -> Result<(Vec<Vec<f32>>, u32), Failed> {
    let limits = &shared.config.limits;
    let wt = Duration::from_millis(limits.write_timeout_ms);
    let unreachable =
        |m: String| Failed::Target(error_frame(ErrorCode::NoCapacity, format!("target: {m}")));
    let peer = zavod_net::peer_id_of(&placement.target)
        .ok_or_else(|| unreachable("has no peer id".into()))?;
    let addrs: Vec<libp2p::Multiaddr> = placement
        .addrs
        .iter()
        .filter_map(|a| a.parse().ok())
        .map(|a| zavod_net::addr::split_peer(&a).0)
        .collect();
    shared.net.connect(peer, addrs);
    let membership = shared.membership().ok_or_else(|| {
        Failed::Busy(error_frame(
            ErrorCode::NoCapacity,
            "this node holds no membership to vouch for its grant",
        ))
    })?;
    let stream = shared
        .net
        .open(peer, EMBED_PROTOCOL)
        .await
        .map_err(|e| unreachable(format!("cannot reach it: {e}")))?;
    let (mut w, mut r) = stream.split();
    w.send(
        &EmbedRequest {
            grant: placement.grant.clone(),
            issuer_membership: membership,
            inputs: inputs.to_vec(),
        },
        wt,
    )
    .await
    .map_err(|e| unreachable(e.to_string()))?;
    let wait = Duration::from_millis(limits.stall_timeout_ms);
    let reply = match tokio::time::timeout(wait, r.recv::<EmbedReply>()).await {
        Ok(Ok(Some(reply))) => reply,
        Ok(Ok(None)) => return Err(unreachable("closed the stream without an answer".into())),
        Ok(Err(e)) => return Err(Failed::Target(net_error_frame(e))),
        Err(_) => {
            return Err(Failed::Target(error_frame(
                ErrorCode::Timeout,
                format!("target sent no embeddings within {} ms", wait.as_millis()),
            )));
        }
    };
    let _ = w.close().await;
    match reply {
        EmbedReply::Vectors {
            vectors,
            prompt_tokens,
        } => {
            check_vectors(&vectors, inputs.len()).map_err(|m| {
                Failed::Target(error_frame(ErrorCode::Internal, format!("target sent {m}")))
            })?;
            Ok((vectors, prompt_tokens))
        }
        EmbedReply::Refused(e) => Err(Failed::of(e)),
    }
}

/// Serves one embed stream from an entry that placed a request here.
pub(crate) async fn serve_embed(
    shared: &Arc<NodeShared>,
    client: NodeId,
    writer: &mut FrameWriter,
    reader: &mut FrameReader,
    first: Duration,
) {
    let wt = Duration::from_millis(shared.config.limits.write_timeout_ms);
    let reply = match first_frame::<EmbedRequest>(reader, first).await {
        Ok(Some(req)) => match check_inputs(&req.inputs) {
            Err(m) => EmbedReply::Refused(error_frame(ErrorCode::BadRequest, m)),
            Ok(()) => {
                match embed_here(
                    shared,
                    &req.grant,
                    Some(req.issuer_membership),
                    client,
                    req.inputs,
                )
                .await
                {
                    Ok((vectors, prompt_tokens)) => EmbedReply::Vectors {
                        vectors,
                        prompt_tokens,
                    },
                    Err(Failed::Input(e) | Failed::Busy(e) | Failed::Target(e)) => {
                        tracing::info!(client = %client.short(), message = %e.message, "embedding refused");
                        EmbedReply::Refused(e)
                    }
                }
            }
        },
        Ok(None) => return,
        Err(e) => EmbedReply::Refused(e),
    };
    let _ = writer.send(&reply, wt).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_faults_the_entry_saw_count_against_a_target() {
        let f = |code| Failed::of(error_frame(code, "x"));
        assert!(matches!(f(ErrorCode::BadRequest), Failed::Input(_)));
        assert!(matches!(f(ErrorCode::FrameTooLarge), Failed::Input(_)));
        assert!(matches!(f(ErrorCode::Internal), Failed::Target(_)));
        assert!(matches!(f(ErrorCode::Timeout), Failed::Target(_)));
        for code in [
            ErrorCode::NoCapacity,
            ErrorCode::RateLimited,
            ErrorCode::Unauthorized,
            ErrorCode::Forbidden,
        ] {
            assert!(matches!(f(code), Failed::Busy(_)));
        }
        // A text too long for the model is the client's to fix.
        let too_long = engine_error(EngineError::Config("input 0 is 3000 tokens".into()));
        assert_eq!(too_long.code, ErrorCode::BadRequest);
        let full = engine_error(EngineError::QueueFull(16));
        assert_eq!(full.code, ErrorCode::NoCapacity);
    }
}
