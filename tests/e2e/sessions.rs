//! Node to node actor sessions: a target reports each answer it served to
//! the entry that granted it, so the entry keeps the turn even when the
//! client never comes back with the receipt.

use std::time::Duration;
use zavod_proto::ids::ConversationId;
use zavod_proto::wire::ServerFrame;
use zavod_tests::{
    NodeProc, all_alive, ask_for_redirect, chat, chat_client, invite_for, model_path, stderr,
};

const T: Duration = Duration::from_secs(30);

#[test]
fn the_entry_keeps_a_turn_the_client_never_reported() {
    let root = tempfile::tempdir().expect("tempdir");
    let d = |n: &str| root.path().join(n);
    let model = model_path().to_str().expect("utf8").to_string();
    let a = NodeProc::start(&d("a"), &[]);
    let token = invite_for(&d("a"), 8);
    let c = NodeProc::start(&d("c"), &["--join", &token, "--model", &model]);
    // Both views: C, a replica of A's conversations, refuses A until it
    // knows A.
    all_alive(&d("a"), &[&a, &c]);

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let answer = rt.block_on(async {
        let client = chat_client(&d("a"), &a.addr).await;
        let net = client.net();
        let conversation = Some(ConversationId::parse("unreported").expect("id"));
        let (redirect, entry) =
            ask_for_redirect(&client, "My name is Zorblax.", conversation, 6).await;
        assert_eq!(
            zavod_net::peer_id_of(&redirect.target)
                .expect("peer")
                .to_string(),
            c.peer_id
        );
        // Stream the answer from C, then vanish without telling A.
        let peer = net.dial(c.addr.parse().expect("addr")).await.expect("dial");
        let mut run = net
            .open(peer, zavod_net::RUN_PROTOCOL)
            .await
            .expect("open run");
        run.send(&redirect.run).await.expect("send run");
        let mut answer = String::new();
        loop {
            match run.recv::<ServerFrame>(T).await.expect("frame") {
                Some(ServerFrame::Token { text, .. }) => answer.push_str(&text),
                Some(ServerFrame::Done(_)) => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        drop(entry);
        answer
    });
    assert!(!answer.is_empty());

    // A learnt the answer from C itself: the next turn has both. (One
    // look only: each look adds its own turns to the conversation.)
    std::thread::sleep(Duration::from_millis(500));
    let o = chat(
        &d("a"),
        &a.addr,
        &[
            "--conversation",
            "unreported",
            "--prompt",
            "What is my name?",
            "--max-tokens",
            "1",
            "--show-prompt",
            "--verbose",
        ],
    );
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(
        e.contains("user: My name is Zorblax.")
            && e.contains(answer.trim())
            && e.contains("2 earlier turns in context"),
        "A did not keep the turn C served ({answer:?}):\n{e}"
    );
}
