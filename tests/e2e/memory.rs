use std::time::Duration;
use zavod_tests::{
    NodeProc, cap_issue, chat, invite, member_state, model_path, status_json, stderr, wait_until,
};

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

/// Writes zeros to `path` until the disk under it is full.
fn fill_disk(path: &std::path::Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).expect("create the filler");
    let block = vec![0u8; 1 << 16];
    loop {
        match f.write(&block) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    let _ = f.sync_all();
}

/// An entry whose disk is full still delivers the answer whole and tells
/// the client its turn was not saved: `zavod chat` (redirected to the
/// model node, so told after its receipt) prints a warning, the OpenAI API
/// (relayed) says so in `zavod_unrecorded`. The entry's data directory is a
/// small tmpfs in a mount namespace of its own, filled by the test.
#[test]
fn a_turn_the_entry_cannot_save_is_reported_to_the_client() {
    let root = tempfile::tempdir().expect("tempdir");
    let model = model_path();
    let model = model.to_str().expect("utf8");
    let Some(a) = NodeProc::start_on_tmpfs(&root.path().join("a"), 16, &["--http", "127.0.0.1:0"])
    else {
        eprintln!("SKIPPED: cannot make a mount namespace here (needs root and `unshare`)");
        return;
    };
    let a_dir = a.data_view();
    let b_dir = root.path().join("b");
    let b = NodeProc::start(&b_dir, &["--join", &invite(&a_dir), "--model", model]);
    assert!(
        wait_until(Duration::from_secs(10), || {
            member_state(&status_json(&a_dir, &a.addr), &b.peer_id).as_deref() == Some("alive")
        })
        .is_some(),
        "B never alive in A's view"
    );
    let token = cap_issue(
        &a_dir,
        &["--models", "*", "--max-tokens", "100000", "--ttl", "1h"],
    );
    let turn = |prompt: &str| {
        chat(
            &a_dir,
            &a.addr,
            &[
                "--conversation",
                "full-disk",
                "--prompt",
                prompt,
                "--temperature",
                "0",
                "--max-tokens",
                "8",
                "--verbose",
            ],
        )
    };
    let http = a.http.clone().expect("A serves HTTP");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let http_turn = |content: &str| -> serde_json::Value {
        rt.block_on(async {
            reqwest::Client::new()
                .post(format!("{http}/v1/chat/completions"))
                .bearer_auth(&token)
                .json(&serde_json::json!({
                    "model": "gemma-3-270m-q4_k_m",
                    "messages": [{"role": "user", "content": content}],
                    "max_tokens": 8,
                    "temperature": 0,
                    "conversation": "full-disk-http",
                }))
                .send()
                .await
                .expect("sent")
                .json()
                .await
                .expect("json")
        })
    };
    // While there is room, turns are saved and nothing is said.
    let first = turn("My name is Zorblax.");
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(!stderr(&first).contains("warning"), "{}", stderr(&first));
    let body = http_turn("My name is Zorblax.");
    assert!(
        body["choices"][0]["message"]["content"].is_string(),
        "{body}"
    );
    assert!(body.get("zavod_unrecorded").is_none(), "{body}");

    fill_disk(&a_dir.join("filler"));
    // sled appends to its file's last page and a tmpfs page is 4 KiB: a
    // turn of 4 KiB needs a page the full disk no longer has (few tokens:
    // one word, repeated).
    let long = format!("Remember this word: {}", "harbour ".repeat(480));
    let second = turn(&long);
    let e = stderr(&second);
    assert!(second.status.success(), "{e}");
    assert!(
        e.contains(&format!("served by {}", b.peer_id)),
        "B generated it: {e}"
    );
    assert!(
        !zavod_tests::stdout(&second).trim().is_empty(),
        "the answer arrives whole"
    );
    assert!(
        e.contains("warning: the answer is whole, but this node could not save the turn")
            && e.contains("No space left on device"),
        "{e}"
    );

    let body = http_turn(&long);
    assert!(
        body["choices"][0]["message"]["content"].is_string(),
        "{body}"
    );
    let why = body["zavod_unrecorded"].as_str().unwrap_or_default();
    assert!(why.contains("could not save the turn"), "{body}");
}
