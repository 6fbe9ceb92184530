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

    // Another conversation does not see its turns; only the fact about
    // the user in general is recalled there (long-term memory).
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
            "--verbose",
        ],
    );
    assert!(c.status.success());
    let e = stderr(&c);
    assert!(e.contains("0 earlier turns in context"), "{e}");
    let outside_memory: String = e
        .split("«memory»")
        .enumerate()
        .map(|(i, part)| {
            if i == 0 {
                part
            } else {
                part.split("«/memory»").nth(1).unwrap_or("")
            }
        })
        .collect();
    assert!(!outside_memory.contains("Zorblax"), "{e}");
    assert!(e.contains(&format!("- {first_turn}")), "recalled: {e}");
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

/// A holder's own conversations: `zavod memory list|export|delete` and
/// `/v1/conversations` show and remove exactly the holder's, another
/// holder reaches none of them, and a holder at the node's cap
/// (`memory.max_conversations_per_holder`, 2 here) is refused a third
/// conversation before anything runs, with an error that names the cap,
/// until it deletes one.
#[test]
fn a_holder_lists_exports_and_deletes_its_conversations_up_to_a_cap() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("node");
    let profile = root.path().join("capped.toml");
    let local = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../mesh-config/local.toml"),
    )
    .expect("local profile");
    assert!(local.contains("max_conversations_per_holder = 1000"));
    std::fs::write(
        &profile,
        local.replace(
            "max_conversations_per_holder = 1000",
            "max_conversations_per_holder = 2",
        ),
    )
    .expect("write profile");
    let model = model_path();
    let node = NodeProc::start(
        &dir,
        &[
            "--config",
            profile.to_str().expect("utf8"),
            "--model",
            model.to_str().expect("utf8"),
            "--http",
            "127.0.0.1:0",
        ],
    );
    let say = |conversation: &str, prompt: &str| {
        chat(
            &dir,
            &node.addr,
            &[
                "--conversation",
                conversation,
                "--prompt",
                prompt,
                "--temperature",
                "0",
                "--max-tokens",
                "8",
            ],
        )
    };
    let memory = |data_dir: &std::path::Path, args: &[&str]| {
        zavod_tests::zavod()
            .arg("memory")
            .args(args)
            .arg("--peer")
            .arg(&node.addr)
            .arg("--data-dir")
            .arg(data_dir)
            .output()
            .expect("run zavod memory")
    };
    for (c, p) in [
        ("alpha", "My name is Ada."),
        ("alpha", "I like tea."),
        ("beta", "Hello."),
    ] {
        let o = say(c, p);
        assert!(o.status.success(), "{}", stderr(&o));
    }

    // List and export.
    let o = memory(&dir, &["list"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        zavod_tests::stdout(&o).lines().collect::<Vec<_>>(),
        ["alpha", "beta"]
    );
    let o = memory(&dir, &["export", "--conversation", "alpha"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let turns: Vec<serde_json::Value> = zavod_tests::stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(
        turns.len(),
        5,
        "two questions, two answers and a fact: {turns:?}"
    );
    assert_eq!(turns[4]["role"], "fact");
    assert_eq!(turns[4]["text"], "I like tea.");
    assert_eq!(turns[0]["role"], "user");
    assert_eq!(turns[0]["text"], "My name is Ada.");
    assert_eq!(turns[1]["role"], "assistant");
    assert_eq!(turns[2]["text"], "I like tea.");
    let o = memory(&dir, &["export", "--conversation", "nothing-here"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("holds no conversation nothing-here"),
        "{}",
        stderr(&o)
    );

    // At the cap: a third conversation is refused, naming the cap; the
    // held ones go on.
    let o = say("gamma", "Hi.");
    assert!(!o.status.success(), "a third conversation past a cap of 2");
    let e = stderr(&o);
    assert!(
        e.contains("max_conversations_per_holder = 2") && e.contains("zavod memory delete"),
        "{e}"
    );
    let o = say("beta", "Still here?");
    assert!(o.status.success(), "{}", stderr(&o));

    // Another holder (its own key and credential) sees none of them and
    // deletes nothing of them.
    let other = cap_issue(
        &dir,
        &["--models", "*", "--max-tokens", "1000", "--ttl", "1h"],
    );
    let o = memory(&dir, &["list", "--credential", &other]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(zavod_tests::stdout(&o).trim(), "");
    let o = memory(&dir, &["delete", "--all", "--credential", &other]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("deleted 0 conversation"),
        "{}",
        stderr(&o)
    );

    // Over HTTP, with the holder's token.
    let token = cap_issue(
        &dir,
        &["--models", "*", "--max-tokens", "1000", "--ttl", "1h"],
    );
    let base = node.http.clone().expect("http address");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let http = reqwest::Client::new();
    let send = |req: reqwest::RequestBuilder| {
        rt.block_on(async {
            let r = req.bearer_auth(&token).send().await.expect("send");
            let status = r.status().as_u16();
            (status, r.json::<serde_json::Value>().await.expect("json"))
        })
    };
    // The token names a fresh key: a holder of its own, with nothing yet.
    let (s, body) = send(http.get(format!("{base}/v1/conversations")));
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["data"], serde_json::json!([]));
    let (s, body) = send(http.post(format!("{base}/v1/chat/completions")).json(
        &serde_json::json!({
            "model": "gemma-3-270m-q4_k_m",
            "messages": [{"role": "user", "content": "Remember 42."}],
            "max_tokens": 4,
            "conversation": "web",
        }),
    ));
    assert_eq!(s, 200, "{body}");
    let (s, body) = send(http.get(format!("{base}/v1/conversations/web")));
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["turns"][0]["text"], "Remember 42.");
    // The question, its answer, and the fact it states.
    assert_eq!(body["turns"].as_array().map(Vec::len), Some(3), "{body}");
    assert_eq!(body["turns"][2]["role"], "fact", "{body}");
    assert_eq!(body["next"], serde_json::Value::Null);
    let (s, body) = send(http.delete(format!("{base}/v1/conversations/web")));
    assert_eq!(
        (s, &body["deleted"]),
        (200, &serde_json::json!(true)),
        "{body}"
    );
    let (s, body) = send(http.get(format!("{base}/v1/conversations/web")));
    assert_eq!(s, 404, "{body}");
    let (s, body) = send(http.get(format!("{base}/v1/conversations/bad%20name")));
    assert_eq!(s, 400, "{body}");
    let (s, _) = rt.block_on(async {
        let r = http
            .get(format!("{base}/v1/conversations"))
            .send()
            .await
            .expect("send");
        (r.status().as_u16(), ())
    });
    assert_eq!(s, 401, "no bearer, no list");

    // Deleting frees a place under the cap; --all takes the rest.
    let o = memory(&dir, &["delete", "--conversation", "alpha"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("deleted 1 conversation"),
        "{}",
        stderr(&o)
    );
    let o = say("gamma", "Hi.");
    assert!(o.status.success(), "room again: {}", stderr(&o));
    let o = memory(&dir, &["delete", "--all"]);
    assert!(
        stderr(&o).contains("deleted 2 conversation"),
        "{}",
        stderr(&o)
    );
    let o = memory(&dir, &["list"]);
    assert_eq!(zavod_tests::stdout(&o).trim(), "");
    // What was deleted stays deleted across a restart.
    drop(rt);
    assert!(node.stop().success());
    let node = NodeProc::start(&dir, &["--model", model.to_str().expect("utf8")]);
    let o = zavod_tests::zavod()
        .args(["memory", "list", "--peer", &node.addr, "--data-dir"])
        .arg(&dir)
        .output()
        .expect("run");
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(zavod_tests::stdout(&o).trim(), "");
}

/// A turn `zavod chat` was told is recorded survives SIGKILL of the node
/// that holds it (the write is answered only once a sync covers it): the
/// restarted node exports it whole.
#[test]
fn an_answered_turn_survives_kill_9_of_its_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = model_path();
    let model = model.to_str().expect("utf8");
    let node = NodeProc::start(dir.path(), &["--model", model]);
    for prompt in ["One.", "Two."] {
        let o = chat(
            dir.path(),
            &node.addr,
            &[
                "--conversation",
                "k9",
                "--prompt",
                prompt,
                "--max-tokens",
                "6",
            ],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(!stderr(&o).contains("warning:"), "{}", stderr(&o));
    }
    node.kill9();
    let node = NodeProc::start(dir.path(), &["--model", model]);
    let o = zavod_tests::zavod()
        .args([
            "memory",
            "export",
            "--conversation",
            "k9",
            "--peer",
            &node.addr,
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .expect("run zavod memory export");
    assert!(o.status.success(), "{}", stderr(&o));
    let texts: Vec<String> = zavod_tests::stdout(&o)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json");
            format!(
                "{}:{}",
                v["role"].as_str().unwrap_or("?"),
                v["text"].as_str().unwrap_or("?")
            )
        })
        .collect();
    assert_eq!(texts.len(), 4, "{texts:?}");
    assert_eq!(texts[0], "user:One.");
    assert_eq!(texts[2], "user:Two.");
}

/// The user turns of conversation `name` as node `addr` exports them.
fn exported_user_turns(
    dir: &std::path::Path,
    addr: &str,
    name: &str,
) -> Result<Vec<String>, String> {
    Ok(zavod_tests::exported_turns(dir, addr, name)?
        .into_iter()
        .filter(|(role, _)| role == "user")
        .map(|(_, text)| text)
        .collect())
}

/// A conversation lives on its replicas, not on the node a client
/// reached: with three nodes (so three replicas), the entry that answered
/// two turns is killed with SIGKILL right after the second answer, and
/// another node exports both turns and answers a third with both in its
/// prompt; a deletion through the third node reaches the replica that was
/// down when it was made, once that one is back. The time from the kill
/// to the next turn answered through another node is printed.
#[test]
fn a_conversation_outlives_its_entry_and_continues_through_another_node() {
    let root = tempfile::tempdir().expect("tempdir");
    let d = |n: &str| root.path().join(n);
    let model = model_path().to_str().expect("utf8").to_string();
    let a = NodeProc::start(&d("a"), &["--model", &model, "--threads", "1"]);
    let token = invite(&d("a"));
    let token2 = invite(&d("a"));
    let b = NodeProc::start(
        &d("b"),
        &["--join", &token, "--model", &model, "--threads", "1"],
    );
    let c = NodeProc::start(
        &d("c"),
        &["--join", &token2, "--model", &model, "--threads", "1"],
    );
    let all_alive = |at: &NodeProc, peers: &[&str]| {
        wait_until(Duration::from_secs(15), || {
            let s = status_json(&d("a"), &at.addr);
            peers
                .iter()
                .all(|p| member_state(&s, p).as_deref() == Some("alive"))
        })
        .is_some()
    };
    let ids = [a.peer_id.clone(), b.peer_id.clone(), c.peer_id.clone()];
    let peers = [ids[0].as_str(), ids[1].as_str(), ids[2].as_str()];
    for n in [&a, &b, &c] {
        assert!(
            all_alive(n, &peers),
            "all three alive in {}'s view",
            n.peer_id
        );
    }
    let say = |addr: &str, prompt: &str, extra: &[&str]| {
        let mut args = vec![
            "--conversation",
            "trip",
            "--prompt",
            prompt,
            "--max-tokens",
            "6",
            "--temperature",
            "0",
        ];
        args.extend_from_slice(extra);
        chat(&d("a"), addr, &args)
    };
    for prompt in ["My name is Zorblax.", "I keep bees."] {
        let o = say(&a.addr, prompt, &[]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(!stderr(&o).contains("warning:"), "recorded: {}", stderr(&o));
    }
    // The entry dies right after the answer it was told is kept.
    let killed = std::time::Instant::now();
    let a_peer = a.peer_id.clone();
    a.kill9();
    let o = say(&b.addr, "What do I keep?", &["--show-prompt"]);
    let continued = killed.elapsed();
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("My name is Zorblax.") && err.contains("I keep bees."),
        "the third turn's prompt holds both earlier turns: {err}"
    );
    eprintln!(
        "figure: a turn through another node answered {} ms after the entry was killed",
        continued.as_millis()
    );
    let turns = exported_user_turns(&d("a"), &c.addr, "trip").expect("export through c");
    assert_eq!(
        turns,
        ["My name is Zorblax.", "I keep bees.", "What do I keep?"],
        "every turn once, in order"
    );

    // A deletion while a replica is down reaches it when it comes back.
    let o = zavod_tests::zavod()
        .args([
            "memory",
            "delete",
            "--conversation",
            "trip",
            "--peer",
            &c.addr,
            "--data-dir",
        ])
        .arg(d("a"))
        .output()
        .expect("run zavod memory delete");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("deleted 1 conversation"),
        "{}",
        stderr(&o)
    );
    // A restarts with its copy of the two first turns on disk (and, on a
    // new port, through B); a sync round brings it level with the
    // deletion.
    let a = NodeProc::start(
        &d("a"),
        &["--model", &model, "--threads", "1", "--bootstrap", &b.addr],
    );
    assert_eq!(a.peer_id, a_peer);
    assert!(all_alive(&a, &peers), "B and C in A's view again");
    assert!(
        wait_until(Duration::from_secs(30), || {
            exported_user_turns(&d("a"), &a.addr, "trip")
                .is_err_and(|e| e.contains("holds no conversation trip"))
        })
        .is_some(),
        "the deleted conversation stays deleted on the replica that was down"
    );
    let o = zavod_tests::zavod()
        .args(["memory", "list", "--peer", &b.addr, "--data-dir"])
        .arg(d("a"))
        .output()
        .expect("run zavod memory list");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        !zavod_tests::stdout(&o).contains("trip"),
        "{}",
        zavod_tests::stdout(&o)
    );
}
