use zavod_tests::{NodeProc, chat, model_path, stderr};

#[test]
fn conversation_memory_survives_a_node_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = model_path();
    let model = model.to_str().expect("utf8");
    let first_turn = "My name is Zorblax and I keep bees.";

    let node = NodeProc::start(dir.path(), &["--model", model]);
    let a = chat(
        dir.path(),
        &node.addr,
        &[
            "--conversation",
            "restart-test",
            "--prompt",
            first_turn,
            "--temperature",
            "0",
            "--max-tokens",
            "16",
        ],
    );
    assert!(a.status.success(), "{}", stderr(&a));
    let first_answer = zavod_tests::stdout(&a);
    assert!(node.stop().success(), "node stops cleanly on SIGTERM");

    let node = NodeProc::start(dir.path(), &["--model", model]);
    let b = chat(
        dir.path(),
        &node.addr,
        &[
            "--conversation",
            "restart-test",
            "--prompt",
            "What is my name?",
            "--temperature",
            "0",
            "--max-tokens",
            "16",
            "--show-prompt",
            "--verbose",
        ],
    );
    assert!(b.status.success(), "{}", stderr(&b));
    let e = stderr(&b);
    let prompt = e
        .split("--- prompt ---")
        .nth(1)
        .and_then(|p| p.split("--- end of prompt ---").next())
        .unwrap_or_else(|| panic!("no prompt shown: {e}"));
    assert!(
        prompt.contains(first_turn),
        "first turn missing from the assembled prompt: {prompt}"
    );
    let answer = first_answer.trim();
    if !answer.is_empty() {
        assert!(
            prompt.contains(answer),
            "first answer missing from the prompt: {prompt}"
        );
    }
    assert!(prompt.contains("What is my name?"), "{prompt}");
    assert!(e.contains("2 earlier turns in context"), "{e}");

    // Another conversation does not see it.
    let c = chat(
        dir.path(),
        &node.addr,
        &[
            "--conversation",
            "other",
            "--prompt",
            "Hi",
            "--max-tokens",
            "4",
            "--show-prompt",
        ],
    );
    assert!(c.status.success());
    assert!(!stderr(&c).contains("Zorblax"));
}
