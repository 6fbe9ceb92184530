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
use zavod_proto::ids::ConversationId;
use zavod_proto::trust::{CAP_TEXT_PREFIX, CREDENTIAL_TEXT_PREFIX, CapabilityToken, Keypair};
use zavod_proto::wire::{
    Accepted, ChatRequest, DoneInfo, ErrorCode, ErrorFrame, GenParams, ServerFrame, StopReason,
};

mod embeddings;

/// Frames buffered between the request task and the HTTP response.
const FRAME_BUFFER: usize = 64;
/// Deadline for the actors' answers to a scrape or a model listing.
const ACTOR_MS: u64 = 2_000;

struct Http {
    shared: Arc<NodeShared>,
    in_flight: Arc<Semaphore>,
}

/// The routes, ready to serve.
pub fn router(shared: Arc<NodeShared>) -> Router {
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

// ---------- errors ----------

/// An error in OpenAI's shape.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: &'static str,
    param: Option<String>,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        let kind = match status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::SERVICE_UNAVAILABLE => "service_unavailable_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        };
        ApiError {
            status,
            kind,
            code,
            param: None,
            message: message.into(),
        }
    }

    fn bad_field(param: impl Into<String>, message: impl Into<String>) -> Self {
        let param = param.into();
        let message = message.into();
        ApiError {
            param: (!param.is_empty()).then_some(param),
            ..ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
        }
    }

    fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl From<ErrorFrame> for ApiError {
    fn from(e: ErrorFrame) -> Self {
        let status = match e.code {
            ErrorCode::BadRequest | ErrorCode::UnsupportedVersion => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::RateLimited | ErrorCode::BudgetExhausted => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::ModelUnavailable => StatusCode::NOT_FOUND,
            ErrorCode::NoCapacity => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::FrameTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, outcome_of(e.code), e.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint; this node serves /v1/chat/completions, /v1/completions, /v1/models, /v1/embeddings, /metrics, /healthz and /readyz",
    )
}

// ---------- auth ----------

/// Who is asking: the key the capability token carries, and its credential.
struct Bearer {
    key: Keypair,
    token: CapabilityToken,
}

fn bearer(headers: &HeaderMap) -> Result<Bearer, ApiError> {
    let unauthorized = |m: String| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m);
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| {
            unauthorized(
                "no credential: send `Authorization: Bearer <token>` with a token from `zavod cap issue`"
                    .into(),
            )
        })?
        .to_str()
        .map_err(|_| unauthorized("the Authorization header is not text".into()))?;
    let text = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or_else(|| unauthorized("the Authorization header must be `Bearer <token>`".into()))?
        .trim();
    if text.starts_with(CREDENTIAL_TEXT_PREFIX) {
        return Err(unauthorized(
            "this is a credential without its key; over HTTP use the token `zavod cap issue` prints (it starts with zavod-cap-1.)".into(),
        ));
    }
    if !text.starts_with(CAP_TEXT_PREFIX) {
        return Err(unauthorized(
            "the bearer token is not a zavod capability token (zavod-cap-1.…)".into(),
        ));
    }
    let token = CapabilityToken::from_text(text)
        .map_err(|e| unauthorized(format!("bad capability token: {e}")))?;
    Ok(Bearer {
        key: Keypair::from_secret(token.secret),
        token,
    })
}

// ---------- request bodies ----------

fn parse_body<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                "the request body is larger than this node accepts (http.max_body_bytes)",
            )
        } else {
            ApiError::bad_field("", format!("cannot read the request body: {r}"))
        }
    })?;
    let de = &mut serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let missing = inner
            .to_string()
            .strip_prefix("missing field `")
            .and_then(|r| r.split_once('`'))
            .map(|(f, _)| f.to_string());
        let param = match (path.as_str(), missing) {
            (".", Some(f)) => f,
            (".", None) => String::new(),
            (p, Some(f)) => format!("{p}.{f}"),
            (p, None) => p.to_string(),
        };
        let message = if param.is_empty() {
            format!("malformed request: {inner}")
        } else {
            format!("malformed request at `{param}`: {inner}")
        };
        ApiError::bad_field(param, message)
    })
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    content: Option<Content>,
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// A request body of either endpoint (one struct rather than a flattened
/// pair, so a malformed field is reported by its path). Fields OpenAI
/// defines that zavod does not use are accepted and ignored, so existing
/// clients work unchanged.
#[derive(Debug, Deserialize)]
struct Common {
    model: String,
    /// `/v1/chat/completions`.
    messages: Option<Vec<Message>>,
    /// `/v1/completions`.
    prompt: Option<Prompt>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    temperature: Option<f32>,
    /// llama.cpp's server's extension: sample among the k most likely.
    top_k: Option<u32>,
    top_p: Option<f32>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    seed: Option<i64>,
    n: Option<u32>,
    /// zavod's own: continue and record this conversation.
    conversation: Option<String>,
    /// As llama.cpp's server takes it: generate past end-of-generation
    /// tokens (for benchmarks).
    #[serde(default)]
    ignore_eos: bool,
    /// One stop sequence or several.
    stop: Option<Stop>,
    /// Token id (as text) to a bias added to its logit.
    logit_bias: Option<serde_json::Map<String, serde_json::Value>>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    response_format: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Prompt {
    One(String),
    Many(Vec<String>),
}

fn text_of(i: usize, content: Option<Content>) -> Result<String, ApiError> {
    match content {
        None => Ok(String::new()),
        Some(Content::Text(t)) => Ok(t),
        Some(Content::Parts(parts)) => {
            let mut out = String::new();
            for (j, p) in parts.into_iter().enumerate() {
                match (p.kind.as_str(), p.text) {
                    ("text", Some(t)) => out.push_str(&t),
                    (kind, _) => {
                        return Err(ApiError::bad_field(
                            format!("messages[{i}].content[{j}]"),
                            format!("content parts of type {kind:?} are not supported; send text"),
                        ));
                    }
                }
            }
            Ok(out)
        }
    }
}

/// The new message and the history before it.
fn split_messages(messages: Vec<Message>) -> Result<(String, Vec<(Role, String)>), ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_field(
            "messages",
            "messages must not be empty",
        ));
    }
    let last = messages.len() - 1;
    let mut history = Vec::with_capacity(last);
    let mut message = None;
    for (i, m) in messages.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            other => {
                return Err(ApiError::bad_field(
                    format!("messages[{i}].role"),
                    format!("role {other:?} is not supported (system, developer, user, assistant)"),
                ));
            }
        };
        let text = text_of(i, m.content)?;
        if i == last {
            if role != Role::User {
                return Err(ApiError::bad_field(
                    format!("messages[{i}].role"),
                    "the last message must be the user's",
                ));
            }
            message = Some(text);
        } else {
            history.push((role, text));
        }
    }
    // The loop always reaches `last`, which sets the message.
    let message = message.unwrap_or_default();
    Ok((message, history))
}

/// The grammar a `response_format` asks for: none for text, any JSON
/// object for `json_object`, the schema's documents for `json_schema`.
fn output_grammar(f: &serde_json::Value) -> Result<Option<String>, ApiError> {
    let bad = |m: String| ApiError::bad_field("response_format", m);
    match f.get("type").and_then(|t| t.as_str()) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(zavod_engine::grammar::JSON_OBJECT.to_string())),
        Some("json_schema") => {
            let schema = f
                .get("json_schema")
                .and_then(|j| j.get("schema"))
                .ok_or_else(|| bad("json_schema needs a `schema` object".into()))?;
            zavod_engine::grammar::json_schema(&schema.to_string())
                .map(Some)
                .map_err(|e| bad(e.to_string()))
        }
        other => Err(bad(format!(
            "response_format type {:?} is not one of \"text\", \"json_object\", \"json_schema\"",
            other.unwrap_or("")
        ))),
    }
}

/// The mesh request for a body, and how to answer it.
fn chat_request(
    common: &Common,
    headers: &HeaderMap,
    credential: zavod_proto::trust::Credential,
    message: String,
    raw: bool,
) -> Result<ChatRequest, ApiError> {
    if common.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_field("n", "only n = 1 is supported"));
    }
    let grammar = match &common.response_format {
        None => None,
        Some(f) => output_grammar(f)?,
    };
    let mut params = GenParams {
        raw,
        temperature: 1.0,
        top_p: 1.0,
        ..GenParams::default()
    };
    if let Some(t) = common.temperature {
        params.temperature = t;
    }
    if let Some(p) = common.top_p {
        params.top_p = p;
    }
    if let Some(k) = common.top_k {
        params.top_k = k;
    }
    params.ignore_eos = common.ignore_eos;
    if let Some(s) = common.seed {
        // OpenAI seeds are signed; any 64 bits will do as a seed.
        params.seed = s as u64;
    }
    if let Some(m) = common.max_completion_tokens.or(common.max_tokens) {
        params.max_tokens = m;
    }
    params.grammar = grammar;
    params.presence_penalty = common.presence_penalty.unwrap_or(0.0);
    params.frequency_penalty = common.frequency_penalty.unwrap_or(0.0);
    if let Some(map) = &common.logit_bias {
        params.logit_bias = map
            .iter()
            .map(|(k, v)| {
                let token = k.parse::<i32>().map_err(|_| {
                    ApiError::bad_field(
                        "logit_bias",
                        format!("logit_bias keys are token ids, got {k:?}"),
                    )
                })?;
                let bias = v.as_f64().ok_or_else(|| {
                    ApiError::bad_field(
                        "logit_bias",
                        format!("logit_bias values are numbers, got {v} for {k}"),
                    )
                })?;
                Ok((token, bias as f32))
            })
            .collect::<Result<_, ApiError>>()?;
    }
    params.stop = match &common.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    params.check().map_err(|m| {
        let field = m.split_whitespace().next().unwrap_or("").to_string();
        ApiError::bad_field(field, m)
    })?;
    let conversation = common.conversation.clone().or_else(|| {
        headers
            .get("x-zavod-conversation")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    });
    let conversation = match conversation {
        Some(c) => Some(
            ConversationId::parse(&c)
                .map_err(|e| ApiError::bad_field("conversation", e.to_string()))?,
        ),
        None => None,
    };
    Ok(ChatRequest {
        credential,
        model: Some(common.model.clone()),
        conversation,
        message,
        params,
        show_prompt: false,
    })
}

// ---------- running a request ----------

/// A request on its way: the first frame decided, the rest to come.
struct Running {
    accepted: Accepted,
    rx: mpsc::Receiver<ServerFrame>,
    _permit: OwnedSemaphorePermit,
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

async fn start(
    st: &Http,
    bearer: &Bearer,
    request: ChatRequest,
    history: Vec<(Role, String)>,
) -> Result<Running, ApiError> {
    let permit = in_flight_permit(st)?;
    let (tx, mut rx) = mpsc::channel(FRAME_BUFFER);
    let shared = Arc::clone(&st.shared);
    let client = bearer.key.public();
    tokio::spawn(async move {
        let outcome = match serve_in_process(shared.clone(), client, request, history, tx).await {
            Ok(()) => "ok",
            Err(e) => outcome_of(e.code),
        };
        shared.metrics.request("http", outcome);
    });
    // The entry answers with Accepted (placed) or an error, and never
    // takes longer than its own actor deadlines to do so.
    match rx.recv().await {
        Some(ServerFrame::Accepted(a)) => Ok(Running {
            accepted: *a,
            rx,
            _permit: permit,
        }),
        Some(ServerFrame::Error(e)) => Err(e.into()),
        Some(_) | None => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the request ended before it was placed",
        )),
    }
}

fn finish_reason(stop: StopReason) -> &'static str {
    match stop {
        StopReason::MaxTokens | StopReason::ContextFull => "length",
        StopReason::EndOfGeneration | StopReason::Cancelled => "stop",
    }
}

fn usage(d: &DoneInfo) -> serde_json::Value {
    json!({
        "prompt_tokens": d.prompt_tokens,
        "completion_tokens": d.generated_tokens,
        "total_tokens": d.prompt_tokens + d.generated_tokens,
        "prompt_tokens_details": { "cached_tokens": d.cached_tokens },
    })
}

fn unix_now() -> u64 {
    crate::clock::now_ms() / 1_000
}

/// What a response is made of, for chat and for plain completions.
#[derive(Clone, Copy, PartialEq)]
enum Api {
    Chat,
    Completion,
}

impl Api {
    fn id(self, a: &Accepted) -> String {
        match self {
            Api::Chat => format!("chatcmpl-{}", a.request),
            Api::Completion => format!("cmpl-{}", a.request),
        }
    }
}

/// Sends the answer whole once it is done.
async fn collect(api: Api, mut run: Running) -> Result<Response, ApiError> {
    let mut text = String::new();
    let done = loop {
        match run.rx.recv().await {
            Some(ServerFrame::Token { text: t, .. }) => text.push_str(&t),
            Some(ServerFrame::Done(d)) => break d,
            // A relay that moves to another node says so again.
            Some(ServerFrame::Accepted(a)) => run.accepted = *a,
            Some(ServerFrame::Error(e)) => return Err(e.into()),
            Some(ServerFrame::Redirect(_)) | None => {
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "the answer ended without a result",
                ));
            }
        }
    };
    let a = &run.accepted;
    let choice = match api {
        Api::Chat => json!({
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": null,
            "finish_reason": finish_reason(done.stop),
        }),
        Api::Completion => json!({
            "index": 0,
            "text": text,
            "logprobs": null,
            "finish_reason": finish_reason(done.stop),
        }),
    };
    let body = json!({
        "id": api.id(a),
        "object": if api == Api::Chat { "chat.completion" } else { "text_completion" },
        "created": unix_now(),
        "model": a.model,
        "choices": [choice],
        "usage": usage(&done),
    });
    let mut resp = (StatusCode::OK, axum::Json(body)).into_response();
    served_by(&mut resp, a);
    Ok(resp)
}

fn served_by(resp: &mut Response, a: &Accepted) {
    if let Ok(v) = HeaderValue::from_str(&zavod_net::peer_label(&a.served_by)) {
        resp.headers_mut().insert("x-zavod-served-by", v);
    }
}

/// Streams the answer as server-sent events in OpenAI's chunk format,
/// ending with `data: [DONE]`.
fn stream(api: Api, mut run: Running, include_usage: bool) -> Response {
    let a = run.accepted.clone();
    let id = api.id(&a);
    let created = unix_now();
    let object = match api {
        Api::Chat => "chat.completion.chunk",
        Api::Completion => "text_completion",
    };
    let chunk = move |choices: serde_json::Value, usage: Option<serde_json::Value>| {
        let mut c = json!({
            "id": id,
            "object": object,
            "created": created,
            "model": a.model,
            "choices": choices,
        });
        if let Some(u) = usage {
            c["usage"] = u;
        }
        Event::default().data(c.to_string())
    };
    let choice = move |text: Option<&str>, finish: Option<&str>, role: bool| match api {
        Api::Chat => {
            let mut d = json!({});
            if role {
                d["role"] = json!("assistant");
            }
            if let Some(t) = text {
                d["content"] = json!(t);
            }
            json!([{"index": 0, "delta": d, "logprobs": null, "finish_reason": finish}])
        }
        Api::Completion => json!([{
            "index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish,
        }]),
    };
    let (tx, rx) = mpsc::channel::<Event>(FRAME_BUFFER);
    let resp_accepted = run.accepted.clone();
    tokio::spawn(async move {
        // Sending fails once the HTTP client has gone; returning then drops
        // `run`, which cancels the generation.
        if api == Api::Chat
            && tx
                .send(chunk(choice(Some(""), None, true), None))
                .await
                .is_err()
        {
            return;
        }
        loop {
            let ev = match run.rx.recv().await {
                Some(ServerFrame::Token { text, .. }) => {
                    chunk(choice(Some(&text), None, false), None)
                }
                // A relay that moves to another node says so again;
                // the headers are already sent.
                Some(ServerFrame::Accepted(_)) => continue,
                Some(ServerFrame::Done(d)) => {
                    let last = chunk(choice(None, Some(finish_reason(d.stop)), false), None);
                    if tx.send(last).await.is_err() {
                        return;
                    }
                    if include_usage && tx.send(chunk(json!([]), Some(usage(&d)))).await.is_err() {
                        return;
                    }
                    let _ = tx.send(Event::default().data("[DONE]")).await;
                    return;
                }
                Some(ServerFrame::Error(e)) => {
                    let _ = tx
                        .send(Event::default().data(ApiError::from(e).body().to_string()))
                        .await;
                    return;
                }
                Some(ServerFrame::Redirect(_)) | None => {
                    let e = ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "internal",
                        "the answer ended without a result",
                    );
                    let _ = tx.send(Event::default().data(e.body().to_string())).await;
                    return;
                }
            };
            if tx.send(ev).await.is_err() {
                return;
            }
        }
    });
    let events = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    let mut resp = Sse::new(events).into_response();
    served_by(&mut resp, &resp_accepted);
    resp
}

// ---------- handlers ----------

async fn chat_completions(
    State(st): State<Arc<Http>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (bearer, req, history, common) = counted(&st, || {
        let bearer = bearer(&headers)?;
        let mut body: Common = parse_body(body)?;
        let messages = body
            .messages
            .take()
            .ok_or_else(|| ApiError::bad_field("messages", "missing field `messages`"))?;
        let (message, history) = split_messages(messages)?;
        let cred = bearer.token.credential.clone();
        let req = chat_request(&body, &headers, cred, message, false)?;
        Ok((bearer, req, history, body))
    })?;
    let run = start(&st, &bearer, req, history).await?;
    respond(Api::Chat, run, &common).await
}

async fn completions(
    State(st): State<Arc<Http>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (bearer, req, common) = counted(&st, || {
        let bearer = bearer(&headers)?;
        let mut body: Common = parse_body(body)?;
        let prompt = match body.prompt.take() {
            Some(Prompt::One(p)) => p,
            Some(Prompt::Many(mut v)) if v.len() == 1 => v.remove(0),
            Some(Prompt::Many(_)) => {
                return Err(ApiError::bad_field("prompt", "send one prompt per request"));
            }
            None => return Err(ApiError::bad_field("prompt", "missing field `prompt`")),
        };
        let cred = bearer.token.credential.clone();
        let req = chat_request(&body, &headers, cred, prompt, true)?;
        Ok((bearer, req, body))
    })?;
    let run = start(&st, &bearer, req, Vec::new()).await?;
    respond(Api::Completion, run, &common).await
}

async fn respond(api: Api, run: Running, common: &Common) -> Result<Response, ApiError> {
    if common.stream {
        let usage = common
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage);
        Ok(stream(api, run, usage))
    } else {
        collect(api, run).await
    }
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

async fn models(State(st): State<Arc<Http>>, headers: HeaderMap) -> Result<Response, ApiError> {
    let bearer = bearer(&headers)?;
    let now = crate::clock::now_ms();
    let cred = bearer
        .token
        .credential
        .verify_holder(&st.shared.identity.authorities, &bearer.key.public(), now)
        .map_err(|e| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string()))?;
    let router = st.shared.directory.get().router.ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_capacity",
            "the router is restarting",
        )
    })?;
    let list = ractor::call_t!(router, RouterMsg::Models, ACTOR_MS).map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_capacity",
            format!("router: {e}"),
        )
    })?;
    // This node's own choice of file, for each model it serves.
    let own: Vec<(String, String)> = st
        .shared
        .models
        .iter()
        .filter_map(|m| Some((m.offer().name, m.selection()?.reason.clone())))
        .collect();
    let data: Vec<serde_json::Value> = list
        .into_iter()
        .filter(|(offer, _)| cred.models.matches(&offer.name))
        .map(|(offer, nodes)| {
            let mut v = json!({
                "id": offer.name,
                "object": "model",
                "created": 0,
                "owned_by": "zavod",
                "quantization": offer.quant,
                "tier": zavod_proto::mesh::tiers::tier_of(&offer.quant).map(|t| t.name()),
                "context_length": offer.context_tokens,
                "nodes": nodes,
            });
            if let Some((_, why)) = own.iter().find(|(name, _)| *name == offer.name) {
                v["selected_here"] = json!(why);
            }
            v
        })
        .collect();
    Ok(axum::Json(json!({"object": "list", "data": data})).into_response())
}

async fn metrics(State(st): State<Arc<Http>>) -> Response {
    let shared = &st.shared;
    let m = &shared.metrics;
    let dir = shared.directory.get();
    // Figures that move with time alone are read now.
    if let Some(router) = dir.router
        && let Ok(counts) = ractor::call_t!(router, RouterMsg::PeerCounts, ACTOR_MS)
    {
        for (state, n) in counts {
            m.peers
                .get_or_create(&StateLabels { state })
                .set(i64::from(n));
        }
    }
    if let Some(breaker) = dir.breaker
        && let Ok(states) = ractor::call_t!(breaker, BreakerMsg::States, ACTOR_MS)
    {
        m.breaker.clear();
        for (node, state) in states {
            m.breaker
                .get_or_create(&PeerStateLabels {
                    peer: zavod_net::peer_label(&node),
                    state: state.name(),
                })
                .set(1);
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.encode(),
    )
        .into_response()
}

async fn healthz(State(st): State<Arc<Http>>) -> Response {
    let d = st.shared.directory.get();
    if d.router.is_some() && d.memory.is_some() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "actors restarting\n").into_response()
    }
}

/// Ready when some node of the mesh (this one included) serves a model.
async fn readyz(State(st): State<Arc<Http>>) -> Response {
    let Some(router) = st.shared.directory.get().router else {
        return (StatusCode::SERVICE_UNAVAILABLE, "router restarting\n").into_response();
    };
    match ractor::call_t!(router, RouterMsg::Models, ACTOR_MS) {
        Ok(models) if !models.is_empty() => {
            let names: Vec<String> = models.into_iter().map(|(o, _)| o.name).collect();
            (StatusCode::OK, format!("ready: {}\n", names.join(", "))).into_response()
        }
        Ok(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "no node of the mesh serves a model yet\n",
        )
            .into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("router: {e}\n")).into_response(),
    }
}

/// Serves on `listener` until the task is aborted.
pub async fn serve(listener: tokio::net::TcpListener, shared: Arc<NodeShared>) {
    if let Err(e) = axum::serve(listener, router(shared)).await {
        tracing::error!(error = %e, "http server stopped");
    }
}
