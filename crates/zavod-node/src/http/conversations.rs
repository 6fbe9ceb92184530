//! `/v1/conversations`: the bearer's own conversations on this node, the
//! HTTP face of the memory protocol (`crate::protocol::memory`, which does
//! the checks and the work): `GET /v1/conversations` lists them,
//! `GET /v1/conversations/{id}?from=N` exports one page of turns (and
//! where the next starts), `DELETE /v1/conversations/{id}` deletes one and
//! `DELETE /v1/conversations` all of them.

use super::{ApiError, Http, bearer, counted};
use crate::protocol::memory::{holder, own};
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;
use zavod_proto::NodeId;
use zavod_proto::ids::ConversationId;
use zavod_proto::wire::memory::{MemoryOp, MemoryReply};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct From {
    #[serde(default)]
    from: u64,
}

/// The bearer's key, once its credential holds.
fn owner(st: &Http, headers: &HeaderMap) -> Result<NodeId, ApiError> {
    counted(st, || {
        let b = bearer(headers)?;
        holder(&st.shared, &b.token.credential, &b.key.public()).map_err(ApiError::from)
    })
}

fn conversation(id: &str) -> Result<ConversationId, ApiError> {
    ConversationId::parse(id).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!("conversation {id:?}: {e}"),
        )
    })
}

async fn run(st: &Http, owner: NodeId, op: MemoryOp) -> Result<MemoryReply, ApiError> {
    match own(&st.shared, owner, op).await {
        MemoryReply::Refused(e) => Err(e.into()),
        r => Ok(r),
    }
}

fn unexpected() -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal_error",
        "the memory keeper answered with something else",
    )
}

pub(super) async fn list(
    State(st): State<Arc<Http>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let owner = owner(&st, &headers)?;
    match run(&st, owner, MemoryOp::List).await? {
        MemoryReply::Conversations { names, truncated } => Ok(Json(json!({
            "object": "list",
            "data": names.iter().map(|n| json!({"id": n.as_str(), "object": "conversation"})).collect::<Vec<_>>(),
            "has_more": truncated,
        }))),
        _ => Err(unexpected()),
    }
}

pub(super) async fn export(
    State(st): State<Arc<Http>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<From>,
) -> Result<Json<Value>, ApiError> {
    let owner = owner(&st, &headers)?;
    let conversation = conversation(&id)?;
    let op = MemoryOp::Export {
        conversation,
        from: q.from,
    };
    match run(&st, owner, op).await? {
        MemoryReply::Turns { held: false, .. } => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("the mesh holds no conversation {id} of yours"),
        )),
        MemoryReply::Turns { turns, next, .. } => Ok(Json(json!({
            "id": id,
            "object": "conversation",
            "turns": turns
                .iter()
                .map(|t| json!({"role": t.role.as_str(), "text": t.text, "tokens": t.tokens}))
                .collect::<Vec<_>>(),
            "next": next,
        }))),
        _ => Err(unexpected()),
    }
}

pub(super) async fn delete(
    State(st): State<Arc<Http>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let owner = owner(&st, &headers)?;
    let conversation = conversation(&id)?;
    match run(&st, owner, MemoryOp::Delete { conversation }).await? {
        MemoryReply::Deleted { conversations } => Ok(Json(json!({
            "id": id,
            "object": "conversation.deleted",
            "deleted": conversations > 0,
        }))),
        _ => Err(unexpected()),
    }
}

pub(super) async fn delete_all(
    State(st): State<Arc<Http>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let owner = owner(&st, &headers)?;
    match run(&st, owner, MemoryOp::DeleteAll).await? {
        MemoryReply::Deleted { conversations } => Ok(Json(json!({
            "object": "conversation.deleted",
            "deleted": conversations,
        }))),
        _ => Err(unexpected()),
    }
}
