//! A chat outlives the node it goes through: `zavod chat`, given several
//! nodes and learning the rest from the mesh, goes on through another one
//! when its entry is killed with SIGKILL before, during or after an
//! answer, and the conversation has every turn once, its answers whole.
//! Over HTTP, a turn sent again to another node with its `Idempotency-Key`
//! is answered from the same history and kept once.

use serde_json::{Value, json};
use std::path::Path;
use std::time::{Duration, Instant};
use zavod_tests::{
    Chat, NodeProc, all_alive, cap_issue, chat_model_path, exported_turns, invite_for,
};

/// The chat model: it counts when asked to, which the test model does not
/// once a conversation has begun.
fn model() -> String {
    chat_model_path().to_str().expect("utf8").to_string()
}

/// Three nodes with the chat model (so every conversation has three
/// replicas); A without it when `entry_only`.
fn three_nodes(root: &Path, http: bool, entry_only: bool) -> Vec<NodeProc> {
    let model = model();
    let mut extra = vec!["--model", &model, "--threads", "1"];
    if http {
        extra.extend(["--http", "127.0.0.1:0"]);
    }
    let a = NodeProc::start(&root.join("a"), if entry_only { &[] } else { &extra });
    let token = invite_for(&root.join("a"), 2);
    let join = |name: &str| {
        let mut args = vec!["--join", &token];
        args.extend(&extra);
        NodeProc::start(&root.join(name), &args)
    };
    let nodes = vec![a, join("b"), join("c")];
    all_alive(&root.join("a"), &nodes.iter().collect::<Vec<_>>());
    nodes
}

/// The integers in `text`, in order.
fn numbers(text: &str) -> Vec<u32> {
    text.split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect()
}

/// Kills a node with SIGKILL, as a crash would (it is reaped when its
/// `NodeProc` is dropped or replaced).
fn sigkill(node: &NodeProc) {
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &node.pid().to_string()])
        .status()
        .expect("kill -KILL");
    assert!(killed.success());
}

fn node_named(nodes: &[NodeProc], peer: &str) -> usize {
    nodes
        .iter()
        .position(|n| n.peer_id == peer)
        .unwrap_or_else(|| panic!("{peer} is none of the three nodes"))
}

/// Restarts the node killed at `i` (same data directory, a new port,
/// through `via`), and waits until all three see each other alive.
fn restart(root: &Path, nodes: &mut [NodeProc], i: usize, name: &str, via: &str) {
    let model = model();
    nodes[i] = NodeProc::start(
        &root.join(name),
        &["--model", &model, "--threads", "1", "--bootstrap", via],
    );
    all_alive(&root.join("a"), &nodes.iter().collect::<Vec<_>>());
}

#[test]
fn a_chat_goes_on_through_another_node_when_its_entry_dies_before_during_and_after_an_answer() {
    let root = tempfile::tempdir().expect("tempdir");
    let root = root.path();
    let mut nodes = three_nodes(root, false, false);
    let names = ["a", "b", "c"];
    let dir = root.join("a");
    // A and B are given; C is learned from the mesh.
    let mut chat = Chat::start(
        &dir,
        &[&nodes[0].addr, &nodes[1].addr],
        &[
            "--conversation",
            "reattach",
            "--temperature",
            "0",
            "--max-tokens",
            "80",
            "--show-prompt",
            "--verbose",
        ],
    );
    let learned = chat.next_line(Duration::from_secs(30));
    assert!(
        learned.contains("1 more node addresses learned"),
        "{learned}"
    );
    let mut entry = 0;

    // During an answer: the entry dies once part of it is printed.
    chat.send("Continue this list: 1, 2, 3, 4, 5,");
    let head = chat.printed(24);
    let killed_at = Instant::now();
    sigkill(&nodes[entry]);
    let said = chat.finish(head);
    let next = said
        .went_on_through()
        .expect("the chat noticed its entry died");
    eprintln!(
        "figure: the answer ended {} ms after its entry was killed mid-answer",
        killed_at.elapsed().as_millis()
    );
    // The answer stops at its token budget, maybe inside a number.
    let mut counted = numbers(&said.text);
    let last = counted.pop().unwrap_or_default();
    assert!(counted.len() >= 12, "a long enough count: {}", said.text);
    let upto = counted.len() as u32 + 1;
    assert!(
        upto.to_string().starts_with(&last.to_string()),
        "the count ends with {upto} or its start: {}",
        said.text
    );
    assert_eq!(
        counted,
        (1..upto).collect::<Vec<_>>(),
        "nothing lost or repeated in the answer: {}\n{}",
        said.text,
        said.lines.join("\n")
    );
    let counting = said.text.clone();
    let killed = entry;
    entry = node_named(&nodes, &next);
    let via = nodes[entry].addr.clone();
    restart(root, &mut nodes, killed, names[killed], &via);

    // Before an answer: the entry is stopped, takes the turn and dies.
    let stop = std::process::Command::new("kill")
        .args(["-STOP", &nodes[entry].pid().to_string()])
        .status()
        .expect("kill -STOP");
    assert!(stop.success());
    chat.send("My name is Zorblax.");
    std::thread::sleep(Duration::from_millis(500));
    sigkill(&nodes[entry]);
    let said = chat.finish(Vec::new());
    let next = said
        .went_on_through()
        .expect("went on through another node");
    assert!(
        said.lines
            .iter()
            .any(|l| l.contains("failed after 0 tokens")),
        "{:?}",
        said.lines
    );
    assert!(
        said.prompt().contains("Continue this list"),
        "{}",
        said.prompt()
    );
    let killed = entry;
    entry = node_named(&nodes, &next);
    let via = nodes[entry].addr.clone();
    restart(root, &mut nodes, killed, names[killed], &via);

    // After an answer: the entry dies once the turn is kept.
    let said = chat.say("I keep bees.");
    if let Some(n) = said.went_on_through() {
        entry = node_named(&nodes, &n);
    }
    sigkill(&nodes[entry]);
    let said = chat.say("What is my name?");
    assert!(said.went_on_through().is_some(), "{:?}", said.lines);
    let prompt = said.prompt();
    for earlier in [
        "Continue this list: 1, 2, 3, 4, 5,",
        "My name is Zorblax.",
        "I keep bees.",
    ] {
        assert_eq!(
            prompt.matches(earlier).count(),
            1,
            "{earlier:?} once in the last turn's prompt:\n{prompt}"
        );
    }
    assert!(
        prompt.contains(counting.trim()),
        "the whole counted answer is history:\n{prompt}"
    );

    // The conversation, from a node that lived: every turn once, in
    // order, the interrupted answer whole.
    let alive = nodes
        .iter()
        .enumerate()
        .find(|(i, _)| *i != entry)
        .map(|(_, n)| n.addr.clone())
        .expect("a live node");
    let turns = exported_turns(&dir, &alive, "reattach").expect("export");
    let users: Vec<&str> = turns
        .iter()
        .filter(|(r, _)| r == "user")
        .map(|(_, t)| t.as_str())
        .collect();
    assert_eq!(
        users,
        [
            "Continue this list: 1, 2, 3, 4, 5,",
            "My name is Zorblax.",
            "I keep bees.",
            "What is my name?"
        ]
    );
    let answer_to_count = &turns[1].1;
    assert_eq!(answer_to_count.trim(), counting.trim());
}

/// An entry without the model redirects the client to a target, which
/// streams the answer to it directly: the entry killed mid-answer leaves
/// the stream whole, and the turn, which the entry could not keep, is kept
/// through another node with the target's receipt.
#[test]
fn a_whole_answer_whose_entry_died_is_kept_through_another_node() {
    let root = tempfile::tempdir().expect("tempdir");
    let root = root.path();
    let nodes = three_nodes(root, false, true);
    let dir = root.join("a");
    let mut chat = Chat::start(
        &dir,
        &[&nodes[0].addr],
        &[
            "--conversation",
            "direct",
            "--temperature",
            "0",
            "--max-tokens",
            "80",
            "--verbose",
        ],
    );
    chat.next_line(Duration::from_secs(30));
    chat.send("Continue this list: 1, 2, 3, 4, 5,");
    loop {
        let l = chat.next_line(Duration::from_secs(30));
        if l.starts_with("[streaming directly from") {
            break;
        }
    }
    let head = chat.printed(24);
    sigkill(&nodes[0]);
    let said = chat.finish(head);
    assert!(
        said.went_on_through().is_some(),
        "the turn went on through another node to be kept: {:?}",
        said.lines
    );
    assert!(
        !said.lines.iter().any(|l| l.starts_with("warning:")),
        "kept: {:?}",
        said.lines
    );
    let turns = exported_turns(&dir, &nodes[1].addr, "direct").expect("export");
    assert_eq!(turns.len(), 2, "{turns:?}");
    assert_eq!(turns[0].1, "Continue this list: 1, 2, 3, 4, 5,");
    assert_eq!(turns[1].1.trim(), said.text, "the whole answer is kept");
}

#[test]
fn an_http_turn_sent_again_to_another_node_with_its_idempotency_key_is_answered_from_the_same_history_and_kept_once()
 {
    let root = tempfile::tempdir().expect("tempdir");
    let root = root.path();
    let nodes = three_nodes(root, true, false);
    let token = cap_issue(
        &root.join("a"),
        &["--models", "*", "--max-tokens", "100000", "--ttl", "1h"],
    );
    let http = reqwest::Client::new();
    let post = |node: &NodeProc, content: &str, key: &str| {
        let base = node.http.clone().expect("serves HTTP");
        let body = json!({
            "model": "smollm2-135m-instruct-q4_1",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 8,
            "temperature": 0,
            "conversation": "retried",
        });
        let r = http
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(&token)
            .header("Idempotency-Key", key)
            .json(&body)
            .send();
        async move {
            let r = r.await.expect("send");
            let status = r.status().as_u16();
            let text = r.text().await.expect("body");
            assert_eq!(status, 200, "{text}");
            let v: Value = serde_json::from_str(&text).expect("json");
            v["usage"]["prompt_tokens"].as_u64().expect("prompt tokens")
        }
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let [a, b, c] = <[NodeProc; 3]>::try_from(nodes).ok().expect("three");
    let first = rt.block_on(post(&a, "My name is Zorblax.", "turn-1"));
    let second = rt.block_on(post(&a, "I keep bees.", "turn-2"));
    assert!(second > first, "the first turn is in the second's prompt");
    // The answer's entry dies; the client, not knowing whether its turn
    // was kept, sends it again to another node.
    a.kill9();
    let again = rt.block_on(post(&b, "I keep bees.", "turn-2"));
    assert_eq!(again, second, "the same history, without the turn itself");
    let third = rt.block_on(post(&c, "What do I keep?", "turn-3"));
    assert!(third > second);
    let turns: Value = rt.block_on(async {
        let base = c.http.clone().expect("serves HTTP");
        let r = http
            .get(format!("{base}/v1/conversations/retried"))
            .bearer_auth(&token)
            .send()
            .await
            .expect("send");
        serde_json::from_str(&r.text().await.expect("body")).expect("json")
    });
    let users: Vec<&str> = turns["turns"]
        .as_array()
        .expect("turns")
        .iter()
        .filter(|t| t["role"] == "user")
        .filter_map(|t| t["text"].as_str())
        .collect();
    assert_eq!(
        users,
        ["My name is Zorblax.", "I keep bees.", "What do I keep?"],
        "every turn once"
    );
    drop(b);
}
