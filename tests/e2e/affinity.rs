//! Cache affinity in a mesh: an entry without the model sends each turn of
//! a conversation to the node holding its prompt cache, which prefills
//! only the new turn.

use zavod_tests::{NodeProc, all_alive, chat, invite_for, model_path, stderr};

/// (served by, prompt tokens, of them from cache) from a `--verbose` chat.
fn served(o: &std::process::Output) -> (String, u32, u32) {
    let e = stderr(o);
    let at = e.rfind("[served by ").expect("a served-by line") + "[served by ".len();
    let rest = &e[at..];
    let (peer, rest) = rest.split_once(": ").expect("peer: figures");
    let prompt: u32 = rest
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("prompt tokens");
    let cached: u32 = rest
        .split_once('(')
        .and_then(|(_, r)| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("cached tokens");
    (peer.to_string(), prompt, cached)
}

#[test]
fn each_turn_of_a_conversation_goes_back_to_the_node_holding_its_cache() {
    let root = tempfile::tempdir().expect("tempdir");
    let d = |n: &str| root.path().join(n);
    let model = model_path().to_str().expect("utf8").to_string();
    let a = NodeProc::start(&d("a"), &[]);
    let token = invite_for(&d("a"), 8);
    let flags = [
        "--join",
        &token,
        "--model",
        &model,
        "--threads",
        "1",
        "--slots",
        "2",
    ];
    let b = NodeProc::start(&d("b"), &flags);
    let c = NodeProc::start(&d("c"), &flags);
    // Every view: a replica refuses a node it does not know yet.
    all_alive(&d("a"), &[&a, &b, &c]);
    let long = "The old harbour town had a market by the river, walls of grey stone, \
        a bell tower and a school; traders came in winter with salt, wool and cloth. ";
    for conv in ["left", "right"] {
        let mut turns = Vec::new();
        for t in 0..3 {
            let prompt = format!("{} Part {t} of the {conv} story.", long.repeat(2));
            let o = chat(
                &d("a"),
                &a.addr,
                &[
                    "--conversation",
                    conv,
                    "--prompt",
                    &prompt,
                    "--temperature",
                    "0",
                    "--max-tokens",
                    "8",
                    "--verbose",
                ],
            );
            assert!(o.status.success(), "{}", stderr(&o));
            turns.push(served(&o));
        }
        eprintln!("{conv}: {turns:?}");
        let node = &turns[0].0;
        assert!(
            [&b.peer_id, &c.peer_id].contains(&node),
            "served by a model node: {turns:?}"
        );
        for (i, (peer, prompt, cached)) in turns.iter().enumerate().skip(1) {
            assert_eq!(peer, node, "turn {i} went elsewhere: {turns:?}");
            // Everything before the new turn came from the cache.
            assert!(
                *cached >= turns[i - 1].1,
                "turn {i}: {cached} of {prompt} from cache, the last prompt had {}: {turns:?}",
                turns[i - 1].1
            );
        }
    }
}
