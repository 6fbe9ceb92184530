//! Revocation: `zavod cap revoke` and `zavod mesh revoke` on the
//! authority's data directory reach every member within a gossip round,
//! are enforced there (a revoked credential refused at every entry, over
//! the chat protocol and HTTP; a revoked node out of every view and never
//! routed to), and are still held after a member restarts.

use std::time::Duration;
use zavod_tests::{
    NodeProc, cap_issue, chat, invite_for, member_state, model_path, served_by, status_json,
    stderr, stdout, wait_until, zavod,
};

fn ask(dir: &std::path::Path, addr: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "--prompt",
        "The sky is",
        "--temperature",
        "0",
        "--max-tokens",
        "3",
        "--verbose",
    ];
    args.extend_from_slice(extra);
    chat(dir, addr, &args)
}

fn revoke(what: &str, subject: &str, dir: &std::path::Path) -> std::process::Output {
    zavod()
        .args([what, "revoke", subject, "--data-dir"])
        .arg(dir)
        .output()
        .expect("run zavod revoke")
}

#[test]
fn revocations_reach_every_member_and_are_enforced_there() {
    let root = tempfile::tempdir().expect("tempdir");
    let d = |n: &str| root.path().join(n);
    let model = model_path().to_str().expect("utf8").to_string();

    // With no node running on a data directory, a revocation is written
    // into it for its node to spread when it starts.
    let idle = d("idle");
    let init = zavod()
        .args(["mesh", "init", "--data-dir"])
        .arg(&idle)
        .output()
        .expect("init");
    assert!(init.status.success(), "{}", stderr(&init));
    let o = revoke("cap", &"ab".repeat(16), &idle);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("recorded in"), "{}", stdout(&o));
    let bad = revoke("mesh", "not-a-node", &idle);
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        stderr(&bad).contains("neither a peer id"),
        "{}",
        stderr(&bad)
    );

    // A routes only; B and C serve the model.
    let a = NodeProc::start(&d("a"), &[]);
    let invite = invite_for(&d("a"), 2);
    let b = NodeProc::start(&d("b"), &["--join", &invite, "--model", &model]);
    let c = NodeProc::start(&d("c"), &["--join", &invite, "--model", &model]);
    let all_alive = wait_until(Duration::from_secs(20), || {
        [&a, &b, &c].iter().all(|n| {
            let s = status_json(&d("a"), &n.addr);
            [&b, &c]
                .iter()
                .all(|m| member_state(&s, &m.peer_id).as_deref() == Some("alive"))
        })
    });
    assert!(all_alive.is_some(), "the mesh did not form");

    // A credential that works through every entry, until revoked.
    let token = cap_issue(&d("a"), &["--max-tokens", "1000", "--ttl", "1h"]);
    for n in [&b, &c] {
        let o = ask(&d("a"), &n.addr, &["--credential", &token]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let o = revoke("cap", &token, &d("a"));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("taken by"), "{}", stdout(&o));
    // Refused at the entries that did not take the revocation themselves,
    // within a gossip round or two.
    let refused_everywhere = wait_until(Duration::from_secs(10), || {
        [&b, &c].iter().all(|n| {
            let o = ask(&d("a"), &n.addr, &["--credential", &token]);
            !o.status.success() && stderr(&o).contains("was revoked by the mesh's authority")
        })
    });
    eprintln!("credential refused everywhere after {refused_everywhere:?}");
    assert!(
        refused_everywhere.is_some(),
        "a revoked credential still worked"
    );
    // Over HTTP too.
    if let Some(http) = c.http.clone() {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let status = rt.block_on(async {
            reqwest::Client::new()
                .post(format!("{http}/v1/chat/completions"))
                .bearer_auth(&token)
                .json(&serde_json::json!({
                    "max_tokens": 2,
                    "messages": [{"role": "user", "content": "Hi"}],
                }))
                .send()
                .await
                .expect("post")
                .status()
        });
        assert_eq!(status.as_u16(), 401);
    }
    // Other credentials still work.
    let o = ask(&d("a"), &c.addr, &[]);
    assert!(o.status.success(), "{}", stderr(&o));

    // C's membership revoked: it leaves every view, and chats through A
    // and B are served by B alone.
    let o = revoke("mesh", &c.peer_id, &d("a"));
    assert!(o.status.success(), "{}", stderr(&o));
    let gone = wait_until(Duration::from_secs(10), || {
        [&a, &b]
            .iter()
            .all(|n| member_state(&status_json(&d("a"), &n.addr), &c.peer_id).is_none())
    });
    eprintln!("revoked node out of every view after {gone:?}");
    assert!(gone.is_some(), "a revoked node stayed in a view");
    for n in [&a, &b, &a, &b] {
        let o = ask(&d("a"), &n.addr, &[]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(
            served_by(&o).as_deref(),
            Some(b.peer_id.as_str()),
            "{}",
            stderr(&o)
        );
    }

    // B keeps both revocations on disk and holds them after a restart.
    let kept = std::fs::read_to_string(d("b").join("revocations")).expect("revocations file");
    assert_eq!(
        kept.lines()
            .filter(|l| l.starts_with("zavod-revoke-1."))
            .count(),
        2,
        "{kept}"
    );
    drop(b);
    let b = NodeProc::start(&d("b"), &["--model", &model]);
    let back = wait_until(Duration::from_secs(20), || {
        member_state(&status_json(&d("a"), &a.addr), &b.peer_id).as_deref() == Some("alive")
    });
    assert!(back.is_some(), "B did not come back");
    let o = ask(&d("a"), &b.addr, &["--credential", &token]);
    assert!(
        !o.status.success() && stderr(&o).contains("was revoked"),
        "{}",
        stderr(&o)
    );
    assert!(member_state(&status_json(&d("a"), &b.addr), &c.peer_id).is_none());
    drop(c);
}
