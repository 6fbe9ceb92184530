//! A client that cannot reach the node chosen to answer: the entry relays
//! the answer, and `zavod chat --verbose` says so. Two namespaces: the
//! entry A and the model node B share host 1 (B only on its loopback); the
//! client is on host 2, which reaches A over the LAN and never B.

use std::process::Stdio;
use std::time::Duration;
use zavod_tests::{Lan, NodeProc, invite, member_state, model_path, status_json_in, wait_until};

#[test]
fn an_unreachable_target_is_relayed_by_the_entry_and_the_client_is_told() {
    let Some(lan) = Lan::new(78) else {
        eprintln!("SKIPPED: cannot create network namespaces here (needs root and `ip`)");
        return;
    };
    let [host1, host2] = &lan.names;
    let root = tempfile::tempdir().expect("tempdir");
    let d = |n: &str| root.path().join(n);
    let a = NodeProc::start_in(
        Some(host1),
        "/ip4/10.78.0.1/tcp/0",
        &d("a"),
        &["--listen", "/ip4/127.0.0.1/tcp/0"],
    );
    let model = model_path().to_str().expect("utf8").to_string();
    let b = NodeProc::start_in(
        Some(host1),
        "/ip4/127.0.0.1/tcp/0",
        &d("b"),
        &["--join", &invite(&d("a")), "--model", &model],
    );
    assert!(
        wait_until(Duration::from_secs(10), || {
            member_state(&status_json_in(Some(host1), &d("a"), &a.addr), &b.peer_id).as_deref()
                == Some("alive")
        })
        .is_some(),
        "B never alive in A's view"
    );
    let lan_addr = a
        .stdout
        .iter()
        .filter_map(|l| l.strip_prefix("listening on "))
        .find(|l| l.starts_with("/ip4/10.78.0.1/"))
        .expect("A listens on the LAN")
        .to_string();
    let o = zavod_tests::zavod_in(Some(host2))
        .args(["chat", "--peer", &lan_addr, "--data-dir"])
        .arg(d("a"))
        .args([
            "--prompt",
            "The capital of France is",
            "--max-tokens",
            "8",
            "--temperature",
            "0",
            "--verbose",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run zavod chat");
    let (out, err) = (zavod_tests::stdout(&o), zavod_tests::stderr(&o));
    assert!(o.status.success(), "{err}");
    assert!(!out.trim().is_empty(), "no answer: {err}");
    assert!(err.contains("the entry node relays"), "{err}");
}
