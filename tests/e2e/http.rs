//! The OpenAI-compatible HTTP API, metrics and health checks, against the
//! real binary and model: through the mesh, streaming and not, with an
//! existing OpenAI client library, and every error status.
//!
//! Why this file passes 600 lines: the four tests share the helpers that
//! start nodes and read OpenAI's bodies, events and metrics.

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequestArgs, FinishReason,
    ResponseFormat, ResponseFormatJsonSchema, StopConfiguration,
};
use futures::StreamExt;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Duration;
use zavod_tests::{
    NodeProc, all_alive, cap_issue, invite, member_state, model_path, status_json, wait_until,
};

const MODEL: &str = "gemma-3-270m-q4_k_m";

fn model_arg() -> String {
    model_path().to_str().expect("utf8").to_string()
}

struct Api {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Api {
    fn new(base: &str, token: &str) -> Self {
        Api {
            base: base.to_string(),
            token: token.to_string(),
            http: reqwest::Client::new(),
        }
    }

    async fn post(&self, path: &str, body: &Value) -> (u16, reqwest::header::HeaderMap, String) {
        self.post_raw(path, body.to_string().into_bytes(), Some(&self.token))
            .await
    }

    async fn post_raw(
        &self,
        path: &str,
        body: Vec<u8>,
        token: Option<&str>,
    ) -> (u16, reqwest::header::HeaderMap, String) {
        let mut r = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        let resp = r.send().await.expect("send");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        (status, headers, resp.text().await.expect("body"))
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("send");
        (resp.status().as_u16(), resp.text().await.expect("body"))
    }
}

fn chat_body(content: &str, max_tokens: u32, stream: bool) -> Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    })
}

/// The `data:` payloads of a server-sent event stream.
fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .map(|d| d.trim().to_string())
        .collect()
}

/// Parses Prometheus text exposition: every line is a comment or
/// `name{labels} value`; returns series to values.
fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "bad labels in {line:?}");
        }
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        out.insert(series.to_string(), v);
    }
    out
}

#[test]
fn the_openai_api_answers_through_the_mesh_streaming_and_not() {
    let root = tempfile::tempdir().expect("tempdir");
    let d = |n: &str| root.path().join(n);
    let a = NodeProc::start(&d("a"), &["--http", "127.0.0.1:0"]);
    let c = NodeProc::start(
        &d("c"),
        &[
            "--join",
            &invite(&d("a")),
            "--model",
            &model_arg(),
            "--http",
            "127.0.0.1:0",
        ],
    );
    // Both views: C, a replica of A's conversations, refuses A until it
    // knows A.
    all_alive(&d("a"), &[&a, &c]);
    let token = cap_issue(
        &d("a"),
        &["--models", "*", "--max-tokens", "100000", "--ttl", "1h"],
    );
    let base = a.http.clone().expect("A serves HTTP");
    let api = Api::new(&base, &token);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        // Health and readiness.
        assert_eq!(api.get("/healthz").await.0, 200);
        let (s, body) = api.get("/readyz").await;
        assert_eq!(s, 200, "{body}");
        assert!(body.contains(MODEL), "{body}");

        // The models the whole mesh serves (A has none itself).
        let (s, body) = api.get("/v1/models").await;
        assert_eq!(s, 200, "{body}");
        let models: Value = serde_json::from_str(&body).expect("json");
        assert_eq!(models["object"], "list");
        assert_eq!(models["data"][0]["id"], MODEL, "{body}");
        assert_eq!(models["data"][0]["nodes"], 1, "{body}");

        // Non-streaming: generated on C, passed on by A, with usage.
        let (s, headers, body) = api
            .post("/v1/chat/completions", &chat_body("Name three colours.", 12, false))
            .await;
        assert_eq!(s, 200, "{body}");
        assert_eq!(
            headers["x-zavod-served-by"].to_str().expect("header"),
            c.peer_id
        );
        let v: Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], MODEL);
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        let whole = v["choices"][0]["message"]["content"]
            .as_str()
            .expect("content")
            .to_string();
        assert!(!whole.is_empty());
        let usage = &v["usage"];
        let (p, c_tok) = (
            usage["prompt_tokens"].as_u64().expect("prompt"),
            usage["completion_tokens"].as_u64().expect("completion"),
        );
        assert!(p > 0 && c_tok > 0 && c_tok <= 12, "{usage}");
        assert_eq!(usage["total_tokens"].as_u64(), Some(p + c_tok));

        // Streaming: OpenAI chunks ending in [DONE], the same text at
        // temperature 0.
        let mut req = chat_body("Name three colours.", 12, true);
        req["stream_options"] = json!({"include_usage": true});
        let (s, headers, body) = api.post("/v1/chat/completions", &req).await;
        assert_eq!(s, 200, "{body}");
        assert!(
            headers["content-type"]
                .to_str()
                .expect("ct")
                .starts_with("text/event-stream")
        );
        let data = sse_data(&body);
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{body}");
        let chunks: Vec<Value> = data[..data.len() - 1]
            .iter()
            .map(|d| serde_json::from_str(d).expect("chunk json"))
            .collect();
        let mut streamed = String::new();
        for ch in &chunks {
            assert_eq!(ch["object"], "chat.completion.chunk", "{ch}");
            if let Some(t) = ch["choices"][0]["delta"]["content"].as_str() {
                streamed.push_str(t);
            }
        }
        assert_eq!(streamed, whole, "streamed and whole answers differ");
        let finish = chunks
            .iter()
            .find_map(|ch| ch["choices"][0]["finish_reason"].as_str())
            .expect("a finish reason");
        assert!(finish == "stop" || finish == "length");
        let last = chunks.last().expect("chunks");
        assert_eq!(last["usage"]["completion_tokens"].as_u64(), Some(c_tok));

        // An existing OpenAI client library, streaming.
        let client = Client::with_config(
            OpenAIConfig::new()
                .with_api_base(format!("{base}/v1"))
                .with_api_key(token.clone()),
        );
        let request = CreateChatCompletionRequestArgs::default()
            .model(MODEL)
            .max_completion_tokens(12u32)
            .temperature(0.0)
            .messages([ChatCompletionRequestUserMessageArgs::default()
                .content("Name three colours.")
                .build()
                .expect("message")
                .into()])
            .build()
            .expect("request");
        let mut s = client
            .chat()
            .create_stream(request)
            .await
            .expect("stream opens");
        let mut via_lib = String::new();
        while let Some(chunk) = s.next().await {
            let chunk = chunk.expect("chunk parses");
            for choice in chunk.choices {
                if let Some(t) = choice.delta.content {
                    via_lib.push_str(&t);
                }
            }
        }
        assert_eq!(via_lib, whole, "the client library saw another answer");

        // Stop sequences, through the client library: the answer ends
        // before the first one, which is not sent.
        let chars: Vec<char> = whole.chars().collect();
        let stop: String = chars[chars.len() / 2..chars.len() / 2 + 3].iter().collect();
        let cut_at = whole.find(&stop).expect("stop is in the text");
        let stopped = client
            .chat()
            .create(
                CreateChatCompletionRequestArgs::default()
                    .model(MODEL)
                    .max_completion_tokens(12u32)
                    .temperature(0.0)
                    .stop(StopConfiguration::StringArray(vec!["\u{1}never".into(), stop.clone()]))
                    .messages([ChatCompletionRequestUserMessageArgs::default()
                        .content("Name three colours.")
                        .build()
                        .expect("message")
                        .into()])
                    .build()
                    .expect("request"),
            )
            .await
            .expect("answer");
        let choice = &stopped.choices[0];
        assert_eq!(
            choice.message.content.as_deref(),
            Some(&whole[..cut_at]),
            "stop {stop:?}"
        );
        assert_eq!(choice.finish_reason, Some(FinishReason::Stop));
        // Penalties are honoured (their effect is tested in the engine).
        let penalised = client
            .chat()
            .create(
                CreateChatCompletionRequestArgs::default()
                    .model(MODEL)
                    .max_completion_tokens(12u32)
                    .temperature(0.0)
                    .presence_penalty(1.5)
                    .frequency_penalty(1.5)
                    .messages([ChatCompletionRequestUserMessageArgs::default()
                        .content("Name three colours.")
                        .build()
                        .expect("message")
                        .into()])
                    .build()
                    .expect("request"),
            )
            .await
            .expect("penalties are honoured");
        assert!(penalised.choices[0].message.content.is_some());
        // Out of range, or not token ids: refused by name.
        let mut b = chat_body("Hi", 2, false);
        b["presence_penalty"] = json!(3.0);
        let (s, _, body) = api.post("/v1/chat/completions", &b).await;
        assert_eq!(s, 400, "{body}");
        assert!(body.contains("presence_penalty"), "{body}");
        let mut b = chat_body("Hi", 2, false);
        b["logit_bias"] = json!({"hello": 5});
        let (s, _, body) = api.post("/v1/chat/completions", &b).await;
        assert_eq!(s, 400, "{body}");
        assert!(body.contains("logit_bias"), "{body}");

        // Plain completions continue the text as is.
        let (s, _, body) = api
            .post(
                "/v1/completions",
                &json!({"model": MODEL, "prompt": "One, two, three,", "max_tokens": 4, "temperature": 0}),
            )
            .await;
        assert_eq!(s, 200, "{body}");
        let v: Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["object"], "text_completion");
        assert!(!v["choices"][0]["text"].as_str().expect("text").is_empty());

        // A named conversation is remembered: the second turn's prompt
        // carries the first.
        let mut first = chat_body("My name is Zorblax.", 4, false);
        first["conversation"] = json!("h1");
        assert_eq!(api.post("/v1/chat/completions", &first).await.0, 200);
        let mut second = chat_body("What is my name?", 2, false);
        let alone = api.post("/v1/chat/completions", &second).await;
        second["conversation"] = json!("h1");
        let remembered = api.post("/v1/chat/completions", &second).await;
        let prompt_tokens = |r: &(u16, reqwest::header::HeaderMap, String)| {
            assert_eq!(r.0, 200, "{}", r.2);
            serde_json::from_str::<Value>(&r.2).expect("json")["usage"]["prompt_tokens"]
                .as_u64()
                .expect("prompt tokens")
        };
        assert!(
            prompt_tokens(&remembered) > prompt_tokens(&alone) + 5,
            "the conversation's earlier turn was not in the prompt"
        );

        // Metrics: valid Prometheus text with the figures that moved.
        let (s, text) = api.get("/metrics").await;
        assert_eq!(s, 200);
        let a_metrics = parse_prometheus(&text);
        assert!(a_metrics["zavod_requests_total{api=\"http\",outcome=\"ok\"}"] >= 6.0);
        assert_eq!(a_metrics["zavod_peers{state=\"alive\"}"], 2.0);
        assert!(a_metrics["zavod_gossip_messages_total{direction=\"in\"}"] > 0.0);
        assert!(a_metrics["zavod_ram_total_bytes"] > 0.0);
        assert!(text.contains("zavod_breaker_state{"), "{text}");
        let c_api = Api::new(c.http.as_deref().expect("C serves HTTP"), &token);
        let (_, text) = c_api.get("/metrics").await;
        let c_metrics = parse_prometheus(&text);
        assert!(c_metrics["zavod_tokens_generated_total"] >= 40.0, "{text}");
        assert!(c_metrics["zavod_time_to_first_token_seconds_count"] >= 6.0);
        assert!(c_metrics["zavod_inter_token_seconds_count"] > 0.0);
        assert_eq!(c_metrics["zavod_job_slots"], 4.0);
    });
}

#[test]
fn http_errors_have_the_openai_shape_and_fitting_status() {
    let root = tempfile::tempdir().expect("tempdir");
    let d = |n: &str| root.path().join(n);
    let node = NodeProc::start(&d("m"), &["--model", &model_arg(), "--http", "127.0.0.1:0"]);
    let lonely = NodeProc::start(&d("l"), &["--http", "127.0.0.1:0"]);
    let token = cap_issue(
        &d("m"),
        &["--models", "*", "--max-tokens", "100000", "--ttl", "1h"],
    );
    let scoped = cap_issue(
        &d("m"),
        &["--models", "llama*", "--max-tokens", "1000", "--ttl", "1h"],
    );
    let rated = cap_issue(
        &d("m"),
        &[
            "--models",
            "*",
            "--max-tokens",
            "1000",
            "--ttl",
            "1h",
            "--rate",
            "1",
        ],
    );
    let small = cap_issue(
        &d("m"),
        &["--models", "*", "--max-tokens", "3", "--ttl", "1h"],
    );
    let foreign = cap_issue(
        &d("l"),
        &["--models", "*", "--max-tokens", "1000", "--ttl", "1h"],
    );
    let cred_only = std::fs::read_to_string(d("m").join("client.cred")).expect("client.cred");
    let api = Api::new(node.http.as_deref().expect("http"), &token);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let ok_body = chat_body("Hi", 2, false).to_string().into_bytes();
        let expect = |r: (u16, reqwest::header::HeaderMap, String), status: u16, needle: &str| {
            assert_eq!(r.0, status, "{}", r.2);
            let v: Value =
                serde_json::from_str(&r.2).unwrap_or_else(|_| panic!("not json: {}", r.2));
            let e = &v["error"];
            assert!(
                e["message"].as_str().is_some_and(|m| m.contains(needle)),
                "{e}"
            );
            assert!(e["type"].is_string() && e["code"].is_string(), "{e}");
            v
        };
        let path = "/v1/chat/completions";
        // 401: none, garbage, a credential without its key, another mesh's.
        expect(
            api.post_raw(path, ok_body.clone(), None).await,
            401,
            "no credential",
        );
        expect(
            api.post_raw(path, ok_body.clone(), Some("sk-garbage"))
                .await,
            401,
            "not a zavod capability token",
        );
        expect(
            api.post_raw(path, ok_body.clone(), Some(cred_only.trim()))
                .await,
            401,
            "without its key",
        );
        expect(
            api.post_raw(path, ok_body.clone(), Some(&foreign)).await,
            401,
            "not a trusted authority",
        );
        // 403: a model outside the credential's scope.
        expect(
            api.post_raw(path, ok_body.clone(), Some(&scoped)).await,
            403,
            "llama*",
        );
        // 404: an unknown model, and an unknown endpoint.
        let mut unknown = chat_body("Hi", 2, false);
        unknown["model"] = json!("no-such-model");
        expect(api.post(path, &unknown).await, 404, "no-such-model");
        expect(
            api.post("/v1/images/generations", &unknown).await,
            404,
            "no such endpoint",
        );
        // 429: over the rate, and over the token budget.
        assert_eq!(
            api.post_raw(path, ok_body.clone(), Some(&rated)).await.0,
            200
        );
        expect(
            api.post_raw(path, ok_body.clone(), Some(&rated)).await,
            429,
            "rate limit",
        );
        // (An answer may end early and leave a token or two of the budget.)
        let three = chat_body("Count to ten.", 3, false)
            .to_string()
            .into_bytes();
        assert_eq!(api.post_raw(path, three.clone(), Some(&small)).await.0, 200);
        let mut spent = None;
        for _ in 0..3 {
            let r = api.post_raw(path, three.clone(), Some(&small)).await;
            if r.0 != 200 {
                spent = Some(r);
                break;
            }
        }
        expect(spent.expect("the budget never ran out"), 429, "budget");
        // 400, naming the field.
        let mut hot = chat_body("Hi", 2, false);
        hot["temperature"] = json!("hot");
        let v = expect(api.post(path, &hot).await, 400, "temperature");
        assert_eq!(v["error"]["param"], "temperature");
        let v = expect(
            api.post(path, &json!({"model": MODEL})).await,
            400,
            "messages",
        );
        assert_eq!(v["error"]["param"], "messages");
        let v = expect(
            api.post(
                path,
                &json!({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}),
            )
            .await,
            400,
            "robot",
        );
        assert_eq!(v["error"]["param"], "messages[0].role");
        expect(
            api.post_raw(path, b"{not json".to_vec(), Some(&token))
                .await,
            400,
            "malformed",
        );
        // 413: a body over the limit.
        let huge = vec![b' '; 2 << 20];
        expect(
            api.post_raw(path, huge, Some(&token)).await,
            413,
            "larger than",
        );
        // 503: a mesh with no model to serve.
        let lonely_token = cap_issue(
            &d("l"),
            &["--models", "*", "--max-tokens", "1000", "--ttl", "1h"],
        );
        let l_api = Api::new(lonely.http.as_deref().expect("http"), &lonely_token);
        expect(
            l_api.post(path, &chat_body("Hi", 2, false)).await,
            503,
            "serves a model",
        );
        assert_eq!(l_api.get("/readyz").await.0, 503);
        assert_eq!(l_api.get("/healthz").await.0, 200);
        // The node still serves after all that.
        assert_eq!(api.post(path, &chat_body("Hi", 2, false)).await.0, 200);
        // Refusals are counted by outcome.
        let m = parse_prometheus(&api.get("/metrics").await.1);
        for outcome in [
            "unauthorized",
            "forbidden",
            "model_unavailable",
            "rate_limited",
            "budget_exhausted",
            "invalid_request",
            "too_large",
        ] {
            let key = format!("zavod_requests_total{{api=\"http\",outcome=\"{outcome}\"}}");
            assert!(
                m.get(&key).copied().unwrap_or(0.0) >= 1.0,
                "{key} not counted"
            );
        }
    });
}

#[test]
fn json_output_follows_the_requested_schema() {
    // The chat model, asked through an OpenAI client library for JSON.
    let root = tempfile::tempdir().expect("tempdir");
    let smol = zavod_tests::chat_model_path();
    let node = NodeProc::start(
        root.path(),
        &[
            "--model",
            smol.to_str().expect("utf8"),
            "--http",
            "127.0.0.1:0",
        ],
    );
    let token = cap_issue(
        root.path(),
        &["--models", "*", "--max-tokens", "100000", "--ttl", "1h"],
    );
    let base = node.http.clone().expect("http");
    let client = Client::with_config(
        OpenAIConfig::new()
            .with_api_base(format!("{base}/v1"))
            .with_api_key(token.clone()),
    );
    let ask = |format: ResponseFormat| {
        CreateChatCompletionRequestArgs::default()
            .model("smollm2-135m-instruct-q4_1")
            .max_completion_tokens(96u32)
            .temperature(0.0)
            .response_format(format)
            .messages([ChatCompletionRequestUserMessageArgs::default()
                .content("What is the capital of France? Answer in JSON.")
                .build()
                .expect("message")
                .into()])
            .build()
            .expect("request")
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let schema = json!({
            "type": "object",
            "properties": {"capital": {"type": "string", "maxLength": 24}},
            "required": ["capital"],
            "additionalProperties": false,
        });
        let r = client
            .chat()
            .create(ask(ResponseFormat::JsonSchema {
                json_schema: ResponseFormatJsonSchema {
                    description: None,
                    name: "capital".into(),
                    schema: schema.clone(),
                    strict: Some(true),
                },
            }))
            .await
            .expect("answer");
        let text = r.choices[0].message.content.clone().expect("content");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
        let obj = v.as_object().expect("an object");
        assert_eq!(obj.len(), 1, "{text}");
        assert!(obj["capital"].is_string(), "{text}");
        eprintln!("json_schema answer: {text}");

        let r = client
            .chat()
            .create(ask(ResponseFormat::JsonObject))
            .await
            .expect("answer");
        let text = r.choices[0].message.content.clone().expect("content");
        assert!(text.trim_start().starts_with('{'), "{text:?}");
        if r.choices[0].finish_reason == Some(FinishReason::Stop) {
            let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
            assert!(v.is_object(), "{text}");
        }
        eprintln!("json_object answer: {text}");

        // A format that is not one is refused by name.
        let api = Api::new(&base, &token);
        let mut body = chat_body("Hi", 4, false);
        body["model"] = json!("smollm2-135m-instruct-q4_1");
        body["response_format"] = json!({"type": "xml"});
        let (s, _, b) = api.post("/v1/chat/completions", &body).await;
        assert_eq!(s, 400, "{b}");
        assert!(b.contains("response_format"), "{b}");
        body["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "x"}});
        let (s, _, b) = api.post("/v1/chat/completions", &body).await;
        assert_eq!(s, 400, "{b}");
        assert!(b.contains("schema"), "{b}");
    });
}

#[test]
fn embeddings_are_routed_through_the_mesh_with_an_openai_client() {
    use async_openai::types::embeddings::{
        CreateEmbeddingRequestArgs, EmbeddingInput, EncodingFormat,
    };
    let root = tempfile::tempdir().expect("tempdir");
    let d = |n: &str| root.path().join(n);
    // A routes only; B serves the model; the vectors come from B through A.
    let a = NodeProc::start(&d("a"), &["--http", "127.0.0.1:0"]);
    let b = NodeProc::start(
        &d("b"),
        &["--join", &invite(&d("a")), "--model", &model_arg()],
    );
    assert!(
        wait_until(Duration::from_secs(10), || {
            member_state(&status_json(&d("a"), &a.addr), &b.peer_id).as_deref() == Some("alive")
        })
        .is_some(),
        "B never alive in A's view"
    );
    let token = cap_issue(
        &d("a"),
        &["--models", "*", "--max-tokens", "100000", "--ttl", "1h"],
    );
    let base = a.http.clone().expect("A serves HTTP");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let client = Client::with_config(
            OpenAIConfig::new()
                .with_api_base(format!("{base}/v1"))
                .with_api_key(token.clone()),
        );
        let texts = [
            "The cat sat on the mat.",
            "A cat was sitting on a rug.",
            "Quarterly tax revenue rose by four percent.",
            "The cat sat on the mat.",
        ];
        let request = CreateEmbeddingRequestArgs::default()
            .model(MODEL)
            .input(EmbeddingInput::StringArray(
                texts.iter().map(ToString::to_string).collect(),
            ))
            .build()
            .expect("request");
        let r = client
            .embeddings()
            .create(request.clone())
            .await
            .expect("embeddings");
        assert_eq!(r.model, MODEL);
        assert_eq!(r.data.len(), 4);
        assert!(r.usage.prompt_tokens >= 20, "{:?}", r.usage);
        let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| p * q).sum::<f32>();
        for (i, e) in r.data.iter().enumerate() {
            assert_eq!(e.index as usize, i);
            assert_eq!(e.embedding.len(), 640, "Gemma 3 270M's width");
            assert!((dot(&e.embedding, &e.embedding) - 1.0).abs() < 1e-3);
        }
        let v: Vec<&[f32]> = r.data.iter().map(|e| e.embedding.as_slice()).collect();
        assert!(dot(v[0], v[3]) > 0.9999, "the same text, the same vector");
        assert!(
            dot(v[0], v[1]) > dot(v[0], v[2]),
            "related texts are closer"
        );

        // base64, as OpenAI's Python client asks by default: the same floats.
        let mut request = request;
        request.encoding_format = Some(EncodingFormat::Base64);
        let r64 = client
            .embeddings()
            .create_base64(request)
            .await
            .expect("base64 embeddings");
        let first: Vec<f32> = r64.data[0].embedding.clone().into();
        assert_eq!(first.len(), 640);
        assert!(dot(&first, v[0]) > 0.9999);

        // Served by B, said in a header; errors are OpenAI-shaped and named.
        let api = Api::new(&base, &token);
        let (s, headers, body) = api
            .post("/v1/embeddings", &json!({"model": MODEL, "input": "hello"}))
            .await;
        assert_eq!(s, 200, "{body}");
        assert_eq!(
            headers["x-zavod-served-by"].to_str().expect("header"),
            b.peer_id
        );
        for (bad, field) in [
            (json!({"model": MODEL, "input": [1, 2, 3]}), "input"),
            (json!({"model": MODEL, "input": ""}), "input"),
            (
                json!({"model": MODEL, "input": "x", "dimensions": 8}),
                "dimensions",
            ),
            (
                json!({"model": MODEL, "input": "x", "encoding_format": "hex"}),
                "encoding_format",
            ),
            (json!({"model": MODEL, "input": vec!["x"; 33]}), "input"),
        ] {
            let (s, _, body) = api.post("/v1/embeddings", &bad).await;
            assert_eq!(s, 400, "{bad}: {body}");
            let e: Value = serde_json::from_str(&body).expect("json");
            assert_eq!(e["error"]["param"], field, "{body}");
        }
        let (s, _, body) = api
            .post(
                "/v1/embeddings",
                &json!({"model": "llama-3-8b", "input": "x"}),
            )
            .await;
        assert_eq!(s, 404, "{body}");
        assert!(body.contains(MODEL), "{body}");
        // Too long for the embedder: a 400 from B, passed on by A.
        let long = "word ".repeat(3000);
        let (s, _, body) = api
            .post("/v1/embeddings", &json!({"model": MODEL, "input": long}))
            .await;
        assert_eq!(s, 400, "{body}");
        assert!(body.contains("tokens"), "{body}");
    });
}
