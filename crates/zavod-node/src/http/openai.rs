//! The OpenAI API: chat and text completions (whole or streamed as
//! server-sent events) and the model list, served with this node as the
//! entry.
//!
//! Why this file passes 600 lines: the two completion endpoints share the
//! request types, the request's start and the whole and streamed responses.

use super::*;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
pub(super) struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(super) struct Message {
    role: String,
    content: Option<Content>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// A request body of either endpoint (one struct rather than a flattened
/// pair, so a malformed field is reported by its path). Fields OpenAI
/// defines that zavod does not use are accepted and ignored, so existing
/// clients work unchanged.
#[derive(Debug, Deserialize)]
pub(super) struct Common {
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
pub(super) enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum Prompt {
    One(String),
    Many(Vec<String>),
}

pub(super) fn text_of(i: usize, content: Option<Content>) -> Result<String, ApiError> {
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
pub(super) fn split_messages(
    messages: Vec<Message>,
) -> Result<(String, Vec<(Role, String)>), ApiError> {
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
pub(super) fn output_grammar(f: &serde_json::Value) -> Result<Option<String>, ApiError> {
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
pub(super) fn chat_request(
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
        turn: turn_of(headers)?,
        continued: None,
    })
}

/// The turn id a client's `Idempotency-Key` header names: a request sent
/// again with the same key (to this node or another, after a failure) is
/// one turn of its conversation, kept once.
fn turn_of(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = v
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= 255)
        .ok_or_else(|| {
            ApiError::bad_field(
                "Idempotency-Key",
                "the Idempotency-Key header must be 1 to 255 visible ASCII characters",
            )
        })?;
    let h = zavod_proto::trust::prompt_hash(key);
    let mut id = [0u8; 8];
    id.copy_from_slice(&h[..8]);
    Ok(Some(u64::from_be_bytes(id)))
}

// ---------- running a request ----------

/// A request on its way: the first frame decided, the rest to come.
pub(super) struct Running {
    accepted: Accepted,
    rx: mpsc::Receiver<ServerFrame>,
    reader: EntryReader,
    _permit: OwnedSemaphorePermit,
}

pub(super) async fn start(
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
    // The entry runs in process and relays rather than redirect.
    let mut reader = EntryReader::new(false);
    match reader.read(rx.recv().await)? {
        Read::Accepted { accepted, .. } => Ok(Running {
            accepted: *accepted,
            rx,
            reader,
            _permit: permit,
        }),
        _ => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the request went on before it was placed",
        )),
    }
}

impl From<ReadError> for ApiError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Refused(e) => e.into(),
            other => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                other.to_string(),
            ),
        }
    }
}

pub(super) fn finish_reason(stop: StopReason) -> &'static str {
    match stop {
        StopReason::MaxTokens | StopReason::ContextFull => "length",
        StopReason::EndOfGeneration | StopReason::Cancelled => "stop",
    }
}

pub(super) fn usage(d: &DoneInfo) -> serde_json::Value {
    json!({
        "prompt_tokens": d.prompt_tokens,
        "completion_tokens": d.generated_tokens,
        "total_tokens": d.prompt_tokens + d.generated_tokens,
        "prompt_tokens_details": { "cached_tokens": d.cached_tokens },
    })
}

pub(super) fn unix_now() -> u64 {
    crate::clock::now_ms() / 1_000
}

/// What a response is made of, for chat and for plain completions.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Api {
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
pub(super) async fn collect(api: Api, mut run: Running) -> Result<Response, ApiError> {
    let mut text = String::new();
    let done = loop {
        let frame = run.rx.recv().await;
        match run.reader.read(frame)? {
            Read::Token { text: t, .. } => text.push_str(&t),
            Read::Done(d) => break d,
            // A relay that moves to another node says so again.
            Read::Accepted { accepted, .. } => run.accepted = *accepted,
            // Invariant: a reader made with `new(false)` returns redirects
            // as errors.
            Read::Redirect(_) => unreachable!("the reader refuses redirects here"),
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
    let mut body = body;
    if let Some(m) = &done.unrecorded {
        // The answer is whole; its turn was not kept in the conversation.
        body["zavod_unrecorded"] = json!(m);
    }
    let mut resp = (StatusCode::OK, axum::Json(body)).into_response();
    served_by(&mut resp, a);
    Ok(resp)
}

pub(super) fn served_by(resp: &mut Response, a: &Accepted) {
    if let Ok(v) = HeaderValue::from_str(&zavod_net::peer_label(&a.served_by)) {
        resp.headers_mut().insert("x-zavod-served-by", v);
    }
}

/// Streams the answer as server-sent events in OpenAI's chunk format,
/// ending with `data: [DONE]`.
pub(super) fn stream(api: Api, mut run: Running, include_usage: bool) -> Response {
    let a = run.accepted.clone();
    let id = api.id(&a);
    let created = unix_now();
    let object = match api {
        Api::Chat => "chat.completion.chunk",
        Api::Completion => "text_completion",
    };
    let chunk = move |choices: serde_json::Value,
                      usage: Option<serde_json::Value>,
                      unrecorded: Option<&str>| {
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
        if let Some(m) = unrecorded {
            // The answer is whole; its turn was not kept in the conversation.
            c["zavod_unrecorded"] = json!(m);
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
                .send(chunk(choice(Some(""), None, true), None, None))
                .await
                .is_err()
        {
            return;
        }
        loop {
            let frame = run.rx.recv().await;
            let ev = match run.reader.read(frame) {
                Ok(Read::Token { text, .. }) => chunk(choice(Some(&text), None, false), None, None),
                // A relay that moves to another node says so again;
                // the headers are already sent.
                Ok(Read::Accepted { .. }) => continue,
                Ok(Read::Done(d)) => {
                    let last = chunk(
                        choice(None, Some(finish_reason(d.stop)), false),
                        None,
                        d.unrecorded.as_deref(),
                    );
                    if tx.send(last).await.is_err() {
                        return;
                    }
                    if include_usage
                        && tx
                            .send(chunk(json!([]), Some(usage(&d)), None))
                            .await
                            .is_err()
                    {
                        return;
                    }
                    let _ = tx.send(Event::default().data("[DONE]")).await;
                    return;
                }
                // Invariant: as in `collect`.
                Ok(Read::Redirect(_)) => unreachable!("the reader refuses redirects here"),
                Err(e) => {
                    let _ = tx
                        .send(Event::default().data(ApiError::from(e).body().to_string()))
                        .await;
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

pub(super) async fn chat_completions(
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

pub(super) async fn completions(
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

pub(super) async fn respond(api: Api, run: Running, common: &Common) -> Result<Response, ApiError> {
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

pub(super) async fn models(
    State(st): State<Arc<Http>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
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
