//! The HTTP face of a node (axum): an OpenAI-compatible API
//! (`/v1/chat/completions`, `/v1/completions`, `/v1/models`,
//! `/v1/embeddings`), Prometheus
//! metrics on `/metrics`, and `/healthz` and `/readyz`.
//!
//! Requests take the same path as chats over the mesh protocol, with this
//! node as the entry: the Router admits the bearer's capability token, the
//! MemoryKeeper assembles the prompt (from the named conversation when
//! there is one), the request is placed by MCDA rank and run here or on the
//! target, whose tokens this node passes on (an HTTP client cannot dial the
//! target itself).
//!
//! Invariants: every error is an OpenAI-shaped JSON body with a fitting
//! status; bodies are bounded (`http.max_body_bytes`), requests in flight
//! are bounded (`limits.max_concurrent_streams`); a client that goes away
//! cancels its generation.

use crate::actors::NodeShared;
use crate::actors::breaker::BreakerMsg;
use crate::actors::router::RouterMsg;
use crate::metrics::{PeerStateLabels, StateLabels, outcome_of};
use crate::protocol::serve_in_process;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;
use std::convert::Infallible;
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use zavod_proto::chat::prompt::Role;
use zavod_proto::chat::reader::{EntryReader, Read, ReadError};
use zavod_proto::ids::ConversationId;
use zavod_proto::trust::{CAP_TEXT_PREFIX, CREDENTIAL_TEXT_PREFIX, CapabilityToken, Keypair};
use zavod_proto::wire::{
    Accepted, ChatRequest, DoneInfo, ErrorCode, ErrorFrame, GenParams, ServerFrame, StopReason,
};

mod embeddings;
mod errors;
mod openai;
mod ops;

use errors::*;
use openai::*;
use ops::*;

/// Frames buffered between the request task and the HTTP response.
const FRAME_BUFFER: usize = 64;
/// Deadline for the actors' answers to a scrape or a model listing.
const ACTOR_MS: u64 = 2_000;

struct Http {
    shared: Arc<NodeShared>,
    in_flight: Arc<Semaphore>,
}

/// The routes, ready to serve.
pub(crate) fn router(shared: Arc<NodeShared>) -> Router {
    let max_body = shared.config.http.max_body_bytes;
    let in_flight = Arc::new(Semaphore::new(shared.config.limits.max_concurrent_streams));
    let state = Arc::new(Http { shared, in_flight });
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

/// A place among the requests this node serves at once, or the 503 that
/// says it has none.
fn in_flight_permit(st: &Http) -> Result<OwnedSemaphorePermit, ApiError> {
    Arc::clone(&st.in_flight).try_acquire_owned().map_err(|_| {
        st.shared.metrics.request("http", "no_capacity");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_capacity",
            "this node is serving as many requests as it allows; retry later or use another node",
        )
    })
}

/// Runs the checks made before a request reaches the entry path, counting
/// the refusals (the entry path counts its own outcomes).
fn counted<T>(st: &Http, f: impl FnOnce() -> Result<T, ApiError>) -> Result<T, ApiError> {
    let r = f();
    if let Err(e) = &r {
        st.shared.metrics.request("http", e.code);
    }
    r
}

/// Serves on `listener` until the task is aborted.
pub(crate) async fn serve(listener: tokio::net::TcpListener, shared: Arc<NodeShared>) {
    if let Err(e) = axum::serve(listener, router(shared)).await {
        tracing::error!(error = %e, "http server stopped");
    }
}
