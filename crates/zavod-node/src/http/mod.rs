//! The HTTP face of a node (axum): an OpenAI-compatible API
//! (`/v1/chat/completions`, `/v1/completions`, `/v1/models`,
//! `/v1/embeddings`), the bearer's own conversations
//! (`/v1/conversations`: list, export, delete), Prometheus
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
//! status; bodies are bounded (`http.max_body_bytes`, a `Content-Length`
//! over it refused before any of the body is read) and timed
//! (`http.body_read_timeout_ms`); the bearer is checked before the body is
//! read; connections and their request heads are bounded by [`server`];
//! requests in flight are bounded (`limits.max_concurrent_streams`); a
//! client that goes away cancels its generation.

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

mod conversations;
mod embeddings;
mod errors;
mod openai;
mod ops;
mod server;

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

/// The routes, ready to serve: the API, the health checks, and `/metrics`
/// unless `http.metrics_listen` gives the figures a listener of their own.
pub(crate) fn router(shared: Arc<NodeShared>) -> Router {
    let http = &shared.config.http;
    let max_body = http.max_body_bytes;
    let body_timeout = std::time::Duration::from_millis(http.body_read_timeout_ms);
    let metrics_here = http.metrics_listen.is_none();
    let in_flight = Arc::new(Semaphore::new(shared.config.limits.max_concurrent_streams));
    let state = Arc::new(Http { shared, in_flight });
    let api = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route(
            "/v1/conversations",
            get(conversations::list).delete(conversations::delete_all),
        )
        .route(
            "/v1/conversations/{id}",
            get(conversations::export).delete(conversations::delete),
        )
        // Runs before the handlers' extractors read any of the body.
        .route_layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            guard,
        ));
    let mut routes = api
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz));
    if metrics_here {
        routes = routes.route("/metrics", get(metrics));
    }
    routes
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            body_timeout,
        ))
        .with_state(state)
}

/// `/metrics` alone, for `http.metrics_listen`.
fn metrics_router(shared: Arc<NodeShared>) -> Router {
    let in_flight = Arc::new(Semaphore::new(1));
    let state = Arc::new(Http { shared, in_flight });
    Router::new()
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(state)
}

/// What an API request must show before its body is read: a declared
/// length within `http.max_body_bytes`, and a bearer token of the right
/// form.
async fn guard(
    State(st): State<Arc<Http>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let max = st.shared.config.http.max_body_bytes;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let checked = counted(&st, || {
        if declared.is_some_and(|n| n > max as u64) {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!(
                    "the request body is larger than this node accepts ({max} bytes, http.max_body_bytes)"
                ),
            ));
        }
        bearer(req.headers()).map(|_| ())
    });
    match checked {
        Ok(()) => next.run(req).await,
        Err(e) => {
            if declared.is_some_and(|n| n <= (max as u64).saturating_mul(LINGER_FACTOR)) {
                linger(req.into_body());
            }
            e.into_response()
        }
    }
}

/// A refused body up to this many times `http.max_body_bytes` is read and
/// dropped after the answer; a larger one is not read at all.
const LINGER_FACTOR: u64 = 4;
/// How long a refused body is read and dropped, at most.
const LINGER: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads and drops, in the background, the rest of a body refused before
/// it was read, while the answer goes out at once. A connection closed
/// with unread data is reset, and the reset can destroy the answer before
/// the client reads it (a client still sending its body would see a
/// broken pipe, not the 413 or 401). Bounded by [`LINGER_FACTOR`] and
/// [`LINGER`].
fn linger(body: axum::body::Body) {
    use futures::StreamExt;
    tokio::spawn(async move {
        let mut data = body.into_data_stream();
        let _ = tokio::time::timeout(LINGER, async {
            while let Some(Ok(_)) = data.next().await {}
        })
        .await;
    });
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

/// Serves the API on `listener` until the task is aborted.
pub(crate) async fn serve(listener: tokio::net::TcpListener, shared: Arc<NodeShared>) {
    let (max, head) = limits_of(&shared);
    server::serve(listener, router(shared), max, head).await
}

/// Serves `/metrics` alone on `listener` until the task is aborted.
pub(crate) async fn serve_metrics(listener: tokio::net::TcpListener, shared: Arc<NodeShared>) {
    let (max, head) = limits_of(&shared);
    server::serve(listener, metrics_router(shared), max, head).await
}

fn limits_of(shared: &NodeShared) -> (usize, std::time::Duration) {
    let http = &shared.config.http;
    (
        http.max_connections,
        std::time::Duration::from_millis(http.header_read_timeout_ms),
    )
}
