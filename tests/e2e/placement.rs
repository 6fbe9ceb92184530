//! A target whose slots are all busy turns a request away rather than
//! queue it, and its entry places it elsewhere: an entry's view of a
//! node's load is up to a heartbeat old, the target's own is not.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;
use zavod_tests::{
    NodeProc, chat, invite_for, member_state, model_path, served_by, status_json, stderr, stdout,
    wait_until, zavod,
};

/// A long answer streamed from `addr` (its node runs it, one slot taken),
/// once it has started; `dir` holds the credential.
fn long_answer(dir: &Path, addr: &str) -> Child {
    let mut child = zavod()
        .args(["chat", "--peer", addr, "--data-dir"])
        .arg(dir)
        .args([
            "--prompt",
            "Count from 1 to 500, separated by commas.",
            "--temperature",
            "0",
            "--max-tokens",
            "250",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn chat");
    let mut out = child.stdout.take().expect("stdout");
    let mut buf = [0u8; 64];
    let n = out.read(&mut buf).expect("read the long answer");
    assert!(n > 0, "the long answer never started");
    // Keep reading in the background so the stream never blocks.
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = out.read_to_end(&mut sink);
    });
    child
}

const QUICK: [&str; 7] = [
    "--prompt",
    "Say hello.",
    "--temperature",
    "0",
    "--max-tokens",
    "8",
    "--verbose",
];

#[test]
fn a_full_node_turns_requests_away_and_a_free_one_serves_them() {
    let root = tempfile::tempdir().expect("tempdir");
    let d = |n: &str| root.path().join(n);
    let model = model_path().to_str().expect("utf8").to_string();
    let a = NodeProc::start(&d("a"), &[]);
    let token = invite_for(&d("a"), 8);
    let model_node = |name: &str| {
        NodeProc::start(
            &d(name),
            &[
                "--join",
                &token,
                "--model",
                &model,
                "--threads",
                "1",
                "--slots",
                "1",
            ],
        )
    };
    let alive_at_a = |n: &NodeProc| {
        wait_until(Duration::from_secs(15), || {
            member_state(&status_json(&d("a"), &a.addr), &n.peer_id).as_deref() == Some("alive")
        })
        .is_some()
    };
    let b = model_node("b");
    assert!(alive_at_a(&b), "B never alive in A's view");

    // B is the only node with the model, and its one slot is busy: it
    // turns the request away as often as the entry allows, then the
    // request waits there. No breaker counts it: B serves it after all.
    let mut long = long_answer(&d("a"), &b.addr);
    let o = chat(&d("a"), &a.addr, &QUICK);
    let log = stderr(&o);
    assert!(o.status.success(), "{log}");
    assert!(!stdout(&o).trim().is_empty(), "{log}");
    assert_eq!(
        log.matches("[the target was full").count(),
        zavod_proto::limits::MAX_FULL_TARGETS,
        "{log}"
    );
    assert_eq!(served_by(&o).as_deref(), Some(b.peer_id.as_str()), "{log}");
    let _ = long.wait();

    // With C free beside it, a request through A while B is busy is
    // served by C, whatever A's view of B said.
    let c = model_node("c");
    assert!(alive_at_a(&c), "C never alive in A's view");
    let mut long = long_answer(&d("a"), &b.addr);
    let o = chat(&d("a"), &a.addr, &QUICK);
    let log = stderr(&o);
    assert!(o.status.success(), "{log}");
    assert_eq!(served_by(&o).as_deref(), Some(c.peer_id.as_str()), "{log}");
    assert!(
        long.try_wait().expect("poll the long answer").is_none(),
        "the quick answer should not have waited for B's long one\n{log}"
    );
    let _ = long.wait();
}
