//! Long-term memory: with a small context, a fact stated in a
//! conversation's first turn is long out of the recent turns by its
//! thirtieth, yet that turn's prompt recalls it (marked in `--show-prompt`,
//! listed by `/memory`) and the chat model answers with it; the turns that
//! no longer fit are summarized by the model, the summary stands in for
//! them in the prompt, and it is kept on the conversation's other replicas
//! too; a fact about the user holds in their next conversation, and
//! deleting everything removes it.

use std::time::Duration;
use zavod_tests::{Chat, NodeProc, all_alive, chat_model_path, exported_turns, invite_for};

#[test]
fn a_fact_from_turn_one_is_recalled_at_turn_thirty_and_in_the_next_conversation() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("n");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let cfg = root.path().join("small.toml");
    std::fs::write(
        &cfg,
        "[model]\ncontext_tokens = 512\n[memory]\nrecall_tokens = 96\n",
    )
    .expect("write config");
    let model = chat_model_path().to_str().expect("utf8").to_string();
    let node = NodeProc::start(
        &dir,
        &["--model", &model, "--config", cfg.to_str().expect("utf8")],
    );
    // Two more members without the model: the conversation's other
    // replicas.
    let token = invite_for(&dir, 2);
    let replicas: Vec<NodeProc> = ["r1", "r2"]
        .iter()
        .map(|n| NodeProc::start(&root.path().join(n), &["--join", &token]))
        .collect();
    // Every view, not only the model node's: a replica refuses reads
    // from a node it does not know yet.
    let mut all = vec![&node];
    all.extend(&replicas);
    all_alive(&dir, &all);
    let mut chat = Chat::start(
        &dir,
        &[&node.addr],
        &[
            "--conversation",
            "long",
            "--temperature",
            "0",
            "--max-tokens",
            "12",
            "--show-prompt",
            "--verbose",
        ],
    );
    chat.next_line(Duration::from_secs(30));
    let first = chat.say("My name is Zorblax.");
    assert!(first.prompt().contains("My name is Zorblax."));
    for i in 2..30 {
        chat.say(&format!("Tell me a short fact about the number {i}."));
    }
    let last = chat.say("What is my name?");
    let prompt = last.prompt();
    let memory = prompt
        .split("«memory»")
        .nth(1)
        .and_then(|p| p.split("«/memory»").next())
        .unwrap_or_else(|| panic!("nothing recalled at turn 30:\n{prompt}"));
    assert!(memory.contains("My name is Zorblax."), "{memory}");
    assert_eq!(
        prompt.matches("My name is Zorblax.").count(),
        1,
        "the first turn itself is long out of the prompt:\n{prompt}"
    );
    assert!(
        !prompt.contains("number 2."),
        "the early turns no longer fit:\n{prompt}"
    );
    assert!(
        last.text.contains("Zorblax"),
        "the model answers with the recalled fact: {}",
        last.text
    );
    let summary = prompt
        .split("«summary»")
        .nth(1)
        .and_then(|p| p.split("«/summary»").next())
        .unwrap_or_else(|| panic!("no summary in the prompt at turn 30:\n{prompt}"));
    assert!(
        summary.contains("Summary of the conversation so far:"),
        "{summary}"
    );
    // Kept on another replica too, where an export reads it.
    let kept = exported_turns(&dir, &replicas[0].addr, "long").expect("export via a replica");
    let summaries = kept.iter().filter(|(r, _)| r == "summary").count();
    assert!(
        summaries >= 1,
        "summaries kept with the conversation: {kept:?}"
    );
    eprintln!(
        "figure: {summaries} summaries written over 30 turns; the last prompt held {} turns",
        prompt.matches("<|im_start|>").count()
    );
    chat.send("/memory");
    let shown = [
        chat.next_line(Duration::from_secs(10)),
        chat.next_line(Duration::from_secs(10)),
    ];
    assert_eq!(
        shown,
        ["the last prompt recalled:", "  - My name is Zorblax."],
        "{}",
        chat.log.join("\n")
    );

    // A fact about the user holds in their next conversation.
    chat.send("/new");
    chat.next_line(Duration::from_secs(10));
    let other = chat.say("What is my name?");
    assert!(
        other.prompt().contains("«memory»"),
        "recalled in a new conversation:\n{}",
        other.prompt()
    );
    drop(chat);

    // Kept where the holder can see it, with the conversation that said
    // it; deleting that conversation deletes the fact, and every summary
    // and turn of it.
    let facts = exported_turns(&dir, &node.addr, "_zavod-facts").expect("export the facts");
    assert_eq!(
        facts,
        [
            ("system".to_string(), "from conversation long".to_string()),
            ("fact".to_string(), "My name is Zorblax.".to_string())
        ]
    );
    let memory = |args: &[&str]| {
        let o = zavod_tests::zavod()
            .arg("memory")
            .args(args)
            .args(["--peer", &node.addr, "--data-dir"])
            .arg(&dir)
            .output()
            .expect("zavod memory");
        assert!(o.status.success(), "{}", zavod_tests::stderr(&o));
    };
    memory(&["delete", "--conversation", "long"]);
    for at in [&node.addr, &replicas[1].addr] {
        let e = exported_turns(&dir, at, "long").expect_err("deleted");
        assert!(e.contains("holds no conversation long"), "{e}");
        let e = exported_turns(&dir, at, "_zavod-facts").expect_err("no facts left");
        assert!(e.contains("holds no conversation _zavod-facts"), "{e}");
    }
    memory(&["delete", "--all"]);
    let mut chat = Chat::start(
        &dir,
        &[&node.addr],
        &[
            "--conversation",
            "after",
            "--max-tokens",
            "4",
            "--show-prompt",
            "--verbose",
        ],
    );
    chat.next_line(Duration::from_secs(30));
    let after = chat.say("What is my name?");
    assert!(
        !after.prompt().contains("«memory»"),
        "nothing recalled once deleted:\n{}",
        after.prompt()
    );
}
