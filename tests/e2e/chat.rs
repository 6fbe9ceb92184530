use zavod_tests::{NodeProc, chat, model_path, stderr, stdout};

#[test]
fn chat_streams_text_and_temperature_zero_repeats_itself() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = model_path();
    let node = NodeProc::start(
        dir.path(),
        &[
            "--model",
            model.to_str().expect("utf8"),
            "--listen",
            "/ip4/127.0.0.1/udp/0/quic-v1",
        ],
    );
    assert!(
        node.stdout
            .iter()
            .any(|l| l.starts_with("model gemma-3-270m-q4_k_m")),
        "{:#?}",
        node.stdout
    );

    let args = [
        "--prompt",
        "Write one sentence about the sea.",
        "--temperature",
        "0",
        "--max-tokens",
        "32",
        "--verbose",
    ];
    let a = chat(dir.path(), &node.addr, &args);
    assert!(a.status.success(), "chat failed: {}", stderr(&a));
    let text = stdout(&a);
    assert!(text.trim().len() > 5, "answer: {text:?}");
    // --verbose names the peer that generated the answer.
    assert!(
        stderr(&a).contains(&format!("served by {}", node.peer_id)),
        "{}",
        stderr(&a)
    );

    let b = chat(dir.path(), &node.addr, &args);
    assert!(b.status.success(), "chat failed: {}", stderr(&b));
    assert_eq!(
        text,
        stdout(&b),
        "temperature 0 must give the same text twice"
    );

    // host:port and a multiaddr without /p2p/ work as --peer too.
    let port = node
        .addr
        .split("/tcp/")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .expect("port");
    let c = chat(dir.path(), &format!("127.0.0.1:{port}"), &args);
    assert_eq!(stdout(&c), text, "{}", stderr(&c));
    let d = chat(dir.path(), &format!("/ip4/127.0.0.1/tcp/{port}"), &args);
    assert_eq!(stdout(&d), text, "{}", stderr(&d));

    // QUIC beside TCP.
    let quic = node
        .stdout
        .iter()
        .find_map(|l| {
            l.strip_prefix("listening on ")
                .filter(|a| a.contains("/quic-v1/"))
        })
        .unwrap_or_else(|| panic!("no QUIC listen address in {:#?}", node.stdout));
    let q = chat(dir.path(), quic, &args);
    assert_eq!(stdout(&q), text, "{}", stderr(&q));
}

#[test]
fn seeded_sampling_repeats_and_max_tokens_bounds_the_answer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = model_path();
    let node = NodeProc::start(dir.path(), &["--model", model.to_str().expect("utf8")]);
    let args = [
        "--prompt",
        "Tell me a story.",
        "--temperature",
        "0.9",
        "--seed",
        "42",
        "--max-tokens",
        "8",
        "-v",
    ];
    let a = chat(dir.path(), &node.addr, &args);
    let b = chat(dir.path(), &node.addr, &args);
    assert!(a.status.success() && b.status.success(), "{}", stderr(&a));
    assert_eq!(stdout(&a), stdout(&b));
    let e = stderr(&a);
    let generated: u32 = e
        .split(" generated")
        .next()
        .and_then(|s| s.rsplit(", ").next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no generated count in {e}"));
    assert!(generated <= 8, "{e}");
}

/// `zavod bench` end to end at its smallest: a node, a direct llama.cpp
/// worker, both timed; figures only have to be sane, not fast.
#[test]
fn bench_measures_both_paths() {
    let model = model_path();
    let out = std::process::Command::new(zavod_tests::zavod_bin())
        .args([
            "bench",
            "--threads",
            "1",
            "--tokens",
            "4",
            "--runs",
            "1",
            "--first-token-runs",
            "1",
            "--processes",
            "1",
            "--json",
            "--model",
        ])
        .arg(&model)
        .output()
        .expect("run zavod bench");
    assert!(out.status.success(), "{}", stderr(&out));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bench JSON");
    for path in ["direct", "node"] {
        let rate = j[path]["decode_tok_s"].as_f64().unwrap_or(0.0);
        let first = j[path]["first_token_ms"].as_f64().unwrap_or(0.0);
        assert!(rate > 0.0 && first > 0.0, "{path}: {j}");
    }
    assert!(j["prompt_tokens"].as_u64().unwrap_or(0) > 0, "{j}");
    assert!(j["idle_node_rss_bytes"].as_u64().unwrap_or(0) > 0, "{j}");
    let added = j["first_token_added_by_node_ms"].as_f64().unwrap_or(-1.0);
    assert!(added >= 0.0, "{j}");
}

#[test]
fn the_chat_model_answers_a_question() {
    // The model `scripts/run.sh` talks to: instruction-tuned, with its own
    // chat template, so a question gets an answer rather than more text.
    let dir = tempfile::tempdir().expect("tempdir");
    let model = zavod_tests::chat_model_path();
    let node = NodeProc::start(dir.path(), &["--model", model.to_str().expect("utf8")]);
    let o = chat(
        dir.path(),
        &node.addr,
        &[
            "--prompt",
            "What is the capital of France?",
            "--temperature",
            "0",
            "--max-tokens",
            "32",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let answer = stdout(&o);
    assert!(answer.contains("Paris"), "answer: {answer:?}");
}
