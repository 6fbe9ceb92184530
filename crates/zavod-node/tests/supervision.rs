//! A failing ModelWorker is restarted by the supervisor and the node keeps
//! serving: once when the worker itself panics inside a handler, once when
//! its engine thread dies under it. Runs a real node (network, actors, sled)
//! in-process with the cost-model engine, whose only job here is to fail on
//! cue; real answers are tested with llama.cpp in tests/.

use std::sync::Arc;
use std::time::Duration;
use zavod_engine::cost::{CostEngineConfig, CostModel, CostModelEngine};
use zavod_engine::{Engine, EngineError, Job, ModelInfo};
use zavod_node::backend::ModelBackend;
use zavod_node::client::{Ask, ChatClient, ChatError};
use zavod_node::datadir::ClientIdentity;
use zavod_node::{Child, Node, NodeConfig, StartOptions};
use zavod_proto::chat::prompt::Turn;
use zavod_proto::mesh::capacity::{ModelOffer, WorkerLoad};
use zavod_proto::wire::{ErrorCode, GenParams};

/// An engine whose `submit` panics — inside the ModelWorker's handler —
/// when the prompt contains "panic-in-worker".
struct PanickyEngine(CostModelEngine);

impl Engine for PanickyEngine {
    fn info(&self) -> &ModelInfo {
        self.0.info()
    }
    fn submit(&self, job: Job) -> Result<(), EngineError> {
        assert!(
            !job.prompt.joined().contains("panic-in-worker"),
            "injected worker panic"
        );
        self.0.submit(job)
    }
    fn load(&self) -> WorkerLoad {
        self.0.load()
    }
    fn count_tokens(&self, text: &str) -> u32 {
        self.0.count_tokens(text)
    }
    fn format_chat(&self, turns: &[Turn]) -> Result<zavod_engine::Prompt, EngineError> {
        self.0.format_chat(turns)
    }
    fn is_alive(&self) -> bool {
        self.0.is_alive()
    }
}

struct Backend(CostEngineConfig);

impl ModelBackend for Backend {
    fn offer(&self) -> ModelOffer {
        ModelOffer::new(self.0.name.clone(), "none", 4096)
    }
    fn count_tokens(&self, text: &str) -> u32 {
        text.split_whitespace().count() as u32
    }
    fn format_chat(&self, turns: &[Turn]) -> Result<zavod_engine::Prompt, EngineError> {
        Ok(zavod_engine::Prompt::text_only(
            turns
                .iter()
                .map(|t| format!("{}\n", t.text))
                .collect::<String>(),
        ))
    }
    fn start_engine(&self) -> Result<Box<dyn Engine>, EngineError> {
        Ok(Box::new(PanickyEngine(CostModelEngine::start(
            self.0.clone(),
        )?)))
    }
}

async fn ask(client: &ChatClient, message: &str) -> Result<String, ChatError> {
    client
        .chat(
            Ask {
                message: message.into(),
                params: GenParams {
                    max_tokens: 8,
                    temperature: 0.0,
                    ..Default::default()
                },
                ..Default::default()
            },
            |_| {},
            std::future::pending(),
        )
        .await
        .map(|o| o.text)
}

/// Retries while the worker is between restarts.
async fn ask_until_served(client: &ChatClient, message: &str) -> String {
    for _ in 0..100 {
        match ask(client, message).await {
            Ok(text) => return text,
            Err(ChatError::Refused {
                code: ErrorCode::NoCapacity,
                ..
            }) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    panic!("the node never served again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_model_worker_is_restarted_and_the_node_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = NodeConfig::default();
    config.node.listen = vec!["/ip4/127.0.0.1/tcp/0".into()];
    config.node.data_dir = Some(dir.path().to_path_buf());
    config.supervisor.restart_backoff_initial_ms = 20;
    let (identity, _) = Node::open_identity(&config).expect("identity");
    let model: Arc<dyn ModelBackend> = Arc::new(Backend(CostEngineConfig {
        name: "cost-model".into(),
        model: CostModel {
            prefill_tokens_per_s: 1e6,
            decode_tokens_per_s: 2e3,
        },
        queue_capacity: 8,
        panic_on: Some("kill-engine-thread".into()),
    }));
    let node = Node::start(StartOptions {
        config,
        identity,
        models: vec![model],
    })
    .await
    .expect("node starts");
    let addr = node.listen_addrs().await.expect("addrs").remove(0);
    let client = ChatClient::connect(
        ClientIdentity::load(dir.path(), None).expect("client identity"),
        addr,
        Default::default(),
    )
    .await
    .expect("connect");

    let before = ask(&client, "hello there").await.expect("served");
    assert!(!before.is_empty());

    // 1. The worker panics inside its handler.
    let err = ask(&client, "please panic-in-worker now")
        .await
        .expect_err("fails");
    assert!(matches!(err, ChatError::Refused { .. }), "{err}");
    let after = ask_until_served(&client, "hello there").await;
    assert_eq!(
        after, before,
        "same prompt, same deterministic answer after restart"
    );
    assert!(node.restarts().await[&Child::ModelWorker(0)] >= 1);

    // 2. The engine thread dies under the worker mid-request.
    let err = ask(&client, "kill-engine-thread please")
        .await
        .expect_err("fails");
    assert!(
        matches!(
            err,
            ChatError::Refused {
                code: ErrorCode::Internal,
                ..
            }
        ),
        "{err}"
    );
    let again = ask_until_served(&client, "hello there").await;
    assert_eq!(again, before);
    assert!(node.restarts().await[&Child::ModelWorker(0)] >= 2);

    node.shutdown().await.expect("clean shutdown");
}
