//! A credential's token budget holds across the mesh: a client that goes
//! from entry to entry spends no more than its budget, and an entry that
//! restarts still knows what was spent.

use std::time::Duration;
use zavod_tests::{
    NodeProc, cap_issue, chat, invite_for, member_state, model_path, status_json, stderr,
    wait_until,
};

/// The tokens a `--verbose` chat says were generated.
fn generated(o: &std::process::Output) -> u64 {
    let e = stderr(o);
    let at = e.rfind(" generated (").expect("a verbose summary");
    e[..at]
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("a token count")
}

#[test]
fn a_budget_holds_across_three_entries_and_a_restart() {
    let root = tempfile::tempdir().expect("tempdir");
    let d = |n: &str| root.path().join(n);
    let model = model_path().to_str().expect("utf8").to_string();
    // A serves the model; B and C are entries only.
    let a = NodeProc::start(&d("a"), &["--model", &model]);
    let invite = invite_for(&d("a"), 2);
    let mut b = NodeProc::start(&d("b"), &["--join", &invite]);
    let c = NodeProc::start(&d("c"), &["--join", &invite]);
    let sees_a = |n: &NodeProc| {
        member_state(&status_json(&d("a"), &n.addr), &a.peer_id).as_deref() == Some("alive")
    };
    assert!(
        wait_until(Duration::from_secs(20), || sees_a(&b) && sees_a(&c)).is_some(),
        "the mesh did not form"
    );

    const BUDGET: u64 = 40;
    let token = cap_issue(
        &d("a"),
        &["--max-tokens", &BUDGET.to_string(), "--ttl", "1h"],
    );
    let ask = |n: &NodeProc| {
        chat(
            &d("a"),
            &n.addr,
            &[
                "--prompt",
                "Count from one to fifty in words.",
                "--temperature",
                "0",
                "--max-tokens",
                "8",
                "--verbose",
                "--credential",
                &token,
            ],
        )
    };
    // Round and round the three entries, waiting a gossip interval (1 s)
    // after each answer, until every entry refuses. Each entry alone
    // would allow the whole budget: 3 x 40 tokens in all.
    let entries = [&a, &b, &c];
    let (mut spent, mut answers, mut refused_in_a_row) = (0u64, 0, 0);
    for i in 0..30 {
        let o = ask(entries[i % 3]);
        if o.status.success() {
            spent += generated(&o);
            answers += 1;
            refused_in_a_row = 0;
        } else {
            assert!(stderr(&o).contains("budget is spent"), "{}", stderr(&o));
            refused_in_a_row += 1;
            if refused_in_a_row == 3 {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(1_500));
    }
    eprintln!("{answers} answers, {spent} tokens generated, of a budget of {BUDGET}");
    assert_eq!(refused_in_a_row, 3, "not every entry refused");
    assert!(spent <= BUDGET, "{spent} tokens spent of {BUDGET}");
    assert!(spent >= BUDGET - 8, "only {spent} tokens were allowed");

    // B restarts and still refuses, from its own record.
    drop(b);
    b = NodeProc::start(&d("b"), &[]);
    assert!(
        wait_until(Duration::from_secs(20), || sees_a(&b)).is_some(),
        "B did not come back"
    );
    let o = ask(&b);
    assert!(
        !o.status.success() && stderr(&o).contains("budget is spent"),
        "{}",
        stderr(&o)
    );
}
