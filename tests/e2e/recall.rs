//! Long-term memory: with a small context, a fact stated in a
//! conversation's first turn is long out of the recent turns by its
//! thirtieth, yet that turn's prompt recalls it (marked in `--show-prompt`,
//! listed by `/memory`) and the chat model answers with it; a fact about
//! the user holds in their next conversation too, and deleting everything
//! removes it.

use std::time::Duration;
use zavod_tests::{Chat, NodeProc, chat_model_path, exported_turns};

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

    // Kept where the holder can see and remove it.
    let facts = exported_turns(&dir, &node.addr, "_zavod-facts").expect("export the facts");
    assert_eq!(
        facts,
        [("fact".to_string(), "My name is Zorblax.".to_string())]
    );
    let o = zavod_tests::zavod()
        .args([
            "memory",
            "delete",
            "--all",
            "--peer",
            &node.addr,
            "--data-dir",
        ])
        .arg(&dir)
        .output()
        .expect("zavod memory delete --all");
    assert!(o.status.success(), "{}", zavod_tests::stderr(&o));
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
