//! The target checks every grant: a forged, replayed, misdirected or
//! stolen grant is refused with an error that says why.

use std::time::Duration;
use zavod_net::FrameStream;
use zavod_node::client::ChatClient;
use zavod_proto::wire::{Redirect, RunRequest, ServerFrame};
use zavod_tests::{
    NodeProc, ask_for_redirect, chat_client, invite, invite_for, member_state, model_path,
    status_json, wait_until,
};

const T: Duration = Duration::from_secs(20);

/// Asks the entry for a redirect for a short greeting.
async fn redirect(client: &ChatClient) -> (Redirect, FrameStream) {
    ask_for_redirect(client, "Hello there", None, 4).await
}

/// Presents a run request to `peer_addr`; Ok(tokens) or Err(error message).
async fn run_on(net: &zavod_net::Client, addr: &str, run: &RunRequest) -> Result<u32, String> {
    let peer = net.dial(addr.parse().expect("addr")).await.expect("dial");
    let mut s = net
        .open(peer, zavod_net::RUN_PROTOCOL)
        .await
        .expect("open run");
    s.send(run).await.expect("send");
    let mut tokens = 0;
    loop {
        match s.recv::<ServerFrame>(T).await.expect("frame") {
            Some(ServerFrame::Token { .. }) => tokens += 1,
            Some(ServerFrame::Done(d)) => {
                assert!(d.receipt.is_some(), "a finished run carries a receipt");
                return Ok(tokens);
            }
            Some(ServerFrame::Error(e)) => return Err(e.message),
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn forged_replayed_misdirected_and_stolen_grants_are_refused() {
    let root = tempfile::tempdir().expect("tempdir");
    let d = |n: &str| root.path().join(n);
    let model = model_path().to_str().expect("utf8").to_string();
    // Grants from A live 15 s, so one can be seen to expire; long enough
    // that each other check finishes within it even when the machine is
    // busy with the other end-to-end tests (5 s was not, once).
    std::fs::create_dir_all(root.path()).expect("dir");
    let cfg = root.path().join("short-grants.toml");
    std::fs::write(&cfg, "[limits]\ngrant_ttl_ms = 15000\n").expect("write config");
    let a = NodeProc::start(&d("a"), &["--config", cfg.to_str().expect("utf8")]);
    let token = invite_for(&d("a"), 8);
    let b = NodeProc::start(&d("b"), &["--join", &token, "--model", &model]);
    let c = NodeProc::start(&d("c"), &["--join", &token, "--model", &model]);
    assert!(
        wait_until(Duration::from_secs(10), || {
            let s = status_json(&d("a"), &a.addr);
            member_state(&s, &b.peer_id).as_deref() == Some("alive")
                && member_state(&s, &c.peer_id).as_deref() == Some("alive")
        })
        .is_some(),
        "B and C never both alive in A's view"
    );
    let addr_of = |peer: &str| {
        if peer == b.peer_id {
            b.addr.clone()
        } else {
            c.addr.clone()
        }
    };
    let other_of = |peer: &str| {
        if peer == b.peer_id {
            c.addr.clone()
        } else {
            b.addr.clone()
        }
    };

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let client = chat_client(&d("a"), &a.addr).await;
        let net = client.net();
        let target = |r: &Redirect| zavod_net::peer_id_of(&r.target).expect("peer").to_string();

        // Used once: fine. Twice: replayed.
        let (r, _s1) = redirect(&client).await;
        let t = target(&r);
        assert!(run_on(net, &addr_of(&t), &r.run).await.expect("first use") > 0);
        let e = run_on(net, &addr_of(&t), &r.run).await.expect_err("replay");
        assert!(e.contains("already used"), "{e}");

        // Presented to the other node: misdirected.
        let (r, _s2) = redirect(&client).await;
        let t = target(&r);
        let e = run_on(net, &other_of(&t), &r.run)
            .await
            .expect_err("misdirected");
        assert!(e.contains("grant is for node"), "{e}");

        // Budget raised after signing: forged.
        let (mut r, _s3) = redirect(&client).await;
        let t = target(&r);
        r.run.grant.body.max_tokens += 1000;
        let e = run_on(net, &addr_of(&t), &r.run).await.expect_err("forged");
        assert!(e.contains("signature does not verify"), "{e}");

        // Another prompt under the same grant.
        let (mut r, _s4) = redirect(&client).await;
        let t = target(&r);
        r.run.turns[0].text = "something else entirely".into();
        let e = run_on(net, &addr_of(&t), &r.run)
            .await
            .expect_err("prompt swapped");
        assert!(e.contains("prompt or generation parameters differs"), "{e}");

        // The same prompt with other sampling: the grant binds those too.
        for tamper in [
            |r: &mut Redirect| r.run.params.temperature = 1.5,
            |r: &mut Redirect| r.run.params.seed ^= 1,
            |r: &mut Redirect| r.run.params.ignore_eos = true,
            |r: &mut Redirect| r.run.params.raw = true,
        ] {
            let (mut r, _s) = redirect(&client).await;
            let t = target(&r);
            tamper(&mut r);
            let e = run_on(net, &addr_of(&t), &r.run)
                .await
                .expect_err("sampling changed");
            assert!(e.contains("generation parameters differs"), "{e}");
        }
        // Asking for fewer tokens than granted is fine.
        let (mut r, _s) = redirect(&client).await;
        let t = target(&r);
        r.run.params.max_tokens = 1;
        assert_eq!(run_on(net, &addr_of(&t), &r.run).await.expect("fewer"), 1);

        // The grant is bound to the client's key: another key cannot use it.
        let (r, _s5) = redirect(&client).await;
        let t = target(&r);
        let (thief, mut ev, el) = zavod_net::new(
            zavod_net::identity_from_secret([77; 32]).expect("key"),
            Default::default(),
        )
        .expect("swarm");
        tokio::spawn(el.run());
        tokio::spawn(async move { while ev.recv().await.is_some() {} });
        let e = run_on(&thief, &addr_of(&t), &r.run)
            .await
            .expect_err("stolen");
        assert!(e.contains("client differs"), "{e}");
        // The rightful holder can still use it.
        assert!(run_on(net, &addr_of(&t), &r.run).await.is_ok());

        // Presented after its expiry.
        let (r, _s6) = redirect(&client).await;
        let t = target(&r);
        tokio::time::sleep(Duration::from_millis(15_200)).await;
        let e = run_on(net, &addr_of(&t), &r.run)
            .await
            .expect_err("expired");
        assert!(e.contains("expired"), "{e}");
    });
}

/// B's breaker as A shows it.
fn breaker_of(status: &serde_json::Value, peer: &str) -> String {
    status["members"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["peer_id"] == peer))
        .and_then(|m| m["breaker"].as_str())
        .unwrap_or("?")
        .to_string()
}

#[test]
fn clients_cannot_open_a_peers_breaker_with_claims_or_bad_input() {
    use zavod_proto::wire::ClientFrame;
    let root = tempfile::tempdir().expect("tempdir");
    let d = |n: &str| root.path().join(n);
    let model = model_path().to_str().expect("utf8").to_string();
    let a = NodeProc::start(&d("a"), &["--http", "127.0.0.1:0"]);
    let b = NodeProc::start(&d("b"), &["--join", &invite(&d("a")), "--model", &model]);
    assert!(
        wait_until(Duration::from_secs(10), || {
            member_state(&status_json(&d("a"), &a.addr), &b.peer_id).as_deref() == Some("alive")
        })
        .is_some(),
        "B never alive in A's view"
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let client = chat_client(&d("a"), &a.addr).await;
        // Four times the breaker's threshold: a redirect, then at once a
        // Resume with nothing in it, claiming B failed.
        for _ in 0..4 {
            let (_r, mut s) = redirect(&client).await;
            s.send(&ClientFrame::Resume {
                reason: "B failed (it did not)".into(),
                answer: String::new(),
                tokens: 0,
                ids: Vec::new(),
            })
            .await
            .expect("send");
            // A places the rest elsewhere; with B excluded there is none.
            let _ = s.recv::<ServerFrame>(T).await;
        }
    });
    // A checked B itself (reachable), so nothing counts against it.
    std::thread::sleep(Duration::from_millis(500));
    let st = status_json(&d("a"), &a.addr);
    assert_eq!(breaker_of(&st, &b.peer_id), "closed", "{st}");

    // Over HTTP A relays; B refuses content with a NUL byte as bad input:
    // the client's 400, and not B's fault.
    let token = zavod_tests::cap_issue(&d("a"), &["--max-tokens", "10000", "--ttl", "1h"]);
    let http = a.http.clone().expect("http");
    rt.block_on(async {
        let post = |content: &str| {
            reqwest::Client::new()
                .post(format!("{http}/v1/chat/completions"))
                .bearer_auth(&token)
                .json(&serde_json::json!({
                    "model": "gemma-3-270m-q4_k_m",
                    "max_tokens": 4,
                    "messages": [{"role": "user", "content": content}],
                }))
                .send()
        };
        for _ in 0..4 {
            let r = post("bad\u{0}input").await.expect("send");
            assert_eq!(
                r.status().as_u16(),
                400,
                "{}",
                r.text().await.unwrap_or_default()
            );
        }
        let r = post("Hello").await.expect("send");
        assert_eq!(r.status().as_u16(), 200, "B still serves");
    });
    let st = status_json(&d("a"), &a.addr);
    assert_eq!(breaker_of(&st, &b.peer_id), "closed", "{st}");
}

/// Runs a granted request on `addr` to its end: the answer, its token
/// count and the target's receipt.
async fn run_whole(
    net: &zavod_net::Client,
    addr: &str,
    run: &RunRequest,
) -> (String, u32, zavod_proto::trust::Receipt) {
    let peer = net.dial(addr.parse().expect("addr")).await.expect("dial");
    let mut s = net
        .open(peer, zavod_net::RUN_PROTOCOL)
        .await
        .expect("open run");
    s.send(run).await.expect("send");
    let mut answer = String::new();
    loop {
        match s.recv::<ServerFrame>(T).await.expect("frame") {
            Some(ServerFrame::Token { text, .. }) => answer.push_str(&text),
            Some(ServerFrame::Done(d)) => {
                return (answer, d.generated_tokens, d.receipt.expect("receipt"));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn a_target_the_client_leaves_mid_answer_is_still_charged() {
    use zavod_proto::wire::ClientFrame;
    let root = tempfile::tempdir().expect("tempdir");
    let d = |n: &str| root.path().join(n);
    let model = model_path().to_str().expect("utf8").to_string();
    let a = NodeProc::start(&d("a"), &[]);
    let token = invite_for(&d("a"), 8);
    let b = NodeProc::start(&d("b"), &["--join", &token, "--model", &model]);
    let c = NodeProc::start(&d("c"), &["--join", &token, "--model", &model]);
    assert!(
        wait_until(Duration::from_secs(10), || {
            let s = status_json(&d("a"), &a.addr);
            member_state(&s, &b.peer_id).as_deref() == Some("alive")
                && member_state(&s, &c.peer_id).as_deref() == Some("alive")
        })
        .is_some(),
        "B and C never both alive in A's view"
    );
    let addr_of = |peer: &str| {
        if peer == b.peer_id {
            b.addr.clone()
        } else {
            c.addr.clone()
        }
    };
    // A budget of 21 tokens; each answer may take 20.
    let cap = zavod_tests::cap_issue(&d("a"), &["--max-tokens", "21", "--ttl", "1h"]);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let client = ChatClient::connect(
            zavod_node::datadir::ClientIdentity::load(&d("a"), Some(&cap)).expect("identity"),
            a.addr.parse().expect("addr"),
            Default::default(),
        )
        .await
        .expect("connect");
        let net = client.net();
        let target = |r: &Redirect| zavod_net::peer_id_of(&r.target).expect("peer").to_string();
        let prompt = "Count from one to one hundred in words, separated by commas.";
        let (first, mut s) = ask_for_redirect(&client, prompt, None, 20).await;
        // At once, before running it: "the target failed with nothing".
        s.send(&ClientFrame::Resume {
            reason: "pretend".into(),
            answer: String::new(),
            tokens: 0,
            ids: Vec::new(),
        })
        .await
        .expect("send");
        let second = loop {
            match s.recv::<ServerFrame>(T).await.expect("frame") {
                Some(ServerFrame::Accepted(_)) => {}
                Some(ServerFrame::Redirect(r)) => break *r,
                other => panic!("expected a second redirect, got {other:?}"),
            }
        };
        assert_ne!(
            target(&first),
            target(&second),
            "the claimed failure is excluded"
        );
        // The client runs both anyway: twice the work for one answer.
        let (_, n1, _) = run_whole(net, &addr_of(&target(&first)), &first.run).await;
        let (answer, n2, receipt) = run_whole(net, &addr_of(&target(&second)), &second.run).await;
        assert!(n1 + n2 >= 21, "both answers ran long enough ({n1} + {n2})");
        s.send(&ClientFrame::Finished {
            answer,
            receipt: Box::new(receipt),
        })
        .await
        .expect("send");
        let _ = s.recv::<ServerFrame>(Duration::from_secs(5)).await;
        drop(s);
        // Both targets' work is charged (the first from its own report,
        // which reached A long ago): nothing is left for another answer.
        // One try only: a try that is let through spends the rest itself.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let o = zavod_tests::chat(
            &d("a"),
            &a.addr,
            &["--credential", &cap, "--prompt", "Hi", "--max-tokens", "4"],
        );
        let err = zavod_tests::stderr(&o);
        assert!(
            !o.status.success() && err.contains("budget is spent"),
            "the abandoned run went uncharged: {err}"
        );
    });
}

#[test]
fn a_cancelled_answer_is_not_kept_whichever_node_ran_it() {
    use zavod_proto::ids::ConversationId;
    use zavod_proto::wire::ClientFrame;
    let root = tempfile::tempdir().expect("tempdir");
    let d = |n: &str| root.path().join(n);
    let model = model_path().to_str().expect("utf8").to_string();
    let a = NodeProc::start(&d("a"), &[]);
    let b = NodeProc::start(&d("b"), &["--join", &invite(&d("a")), "--model", &model]);
    assert!(
        wait_until(Duration::from_secs(10), || {
            member_state(&status_json(&d("a"), &a.addr), &b.peer_id).as_deref() == Some("alive")
        })
        .is_some(),
        "B never alive in A's view"
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let client = chat_client(&d("a"), &a.addr).await;
        let net = client.net();
        let conv = ConversationId::parse("cancel-me").expect("id");
        let (r, entry) =
            ask_for_redirect(&client, "Tell me a long story.", Some(conv.clone()), 64).await;
        // Run it at B and cancel after the first tokens.
        let peer = net.dial(b.addr.parse().expect("addr")).await.expect("dial");
        let mut s = net
            .open(peer, zavod_net::RUN_PROTOCOL)
            .await
            .expect("open run");
        s.send(&r.run).await.expect("send");
        let mut seen = 0;
        let stop = loop {
            match s.recv::<ServerFrame>(T).await.expect("frame") {
                Some(ServerFrame::Token { .. }) => {
                    seen += 1;
                    if seen == 2 {
                        s.send(&ClientFrame::Cancel).await.expect("cancel");
                    }
                }
                Some(ServerFrame::Done(d)) => break d.stop,
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(stop, zavod_proto::wire::StopReason::Cancelled);
        // The client leaves A without a receipt: B's report books it.
        drop(entry);
        tokio::time::sleep(Duration::from_secs(2)).await;
        // The next turn of the conversation has no history: the cancelled
        // answer was charged but not kept, as when A runs one itself.
        let mut e2 = client.net().open_chat(client.peer()).await.expect("open");
        e2.send(&ClientFrame::Chat(Box::new(
            zavod_proto::wire::ChatRequest {
                credential: client.identity().credential.clone(),
                model: None,
                conversation: Some(conv),
                message: "And then?".into(),
                params: zavod_proto::wire::GenParams {
                    max_tokens: 4,
                    ..Default::default()
                },
                show_prompt: false,
                turn: None,
                continued: None,
            },
        )))
        .await
        .expect("send");
        match e2.recv::<ServerFrame>(T).await.expect("frame") {
            Some(ServerFrame::Accepted(acc)) => {
                assert_eq!(acc.history_turns, 0, "the cancelled turn was kept");
            }
            other => panic!("expected Accepted, got {other:?}"),
        }
    });
}
