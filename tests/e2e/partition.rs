//! Five hosts on one switch (network namespaces), cut into two groups and
//! healed. Each group has a node with the model: chats through a node of
//! either group complete while the mesh is cut, both at once (the entry
//! may still place on the far side's model node, which it cannot reach)
//! and once the views have caught up; after healing, every node sees all
//! five alive again.

use std::time::{Duration, Instant};
use zavod_tests::{
    NodeProc, Switched, chat_in, invite_for, member_state, model_path, served_by, status_json_in,
    stderr, wait_until,
};

const SUBNET: u8 = 83;
const HOSTS: usize = 5;
/// Hosts 3 and 4 are cut off from 0, 1 and 2. Hosts 1 and 3 serve the
/// model; 0 (the authority), 2 and 4 route only.
const APART: [usize; 2] = [3, 4];

#[test]
fn a_mesh_cut_in_two_serves_on_both_sides_and_agrees_after_healing() {
    let Some(net) = Switched::new(SUBNET, HOSTS) else {
        eprintln!("SKIPPED: cannot create network namespaces here (needs root and `ip`)");
        return;
    };
    let root = tempfile::tempdir().expect("tempdir");
    let d = |i: usize| root.path().join(format!("h{i}"));
    let model = model_path().to_str().expect("utf8").to_string();
    let listen = |i: usize| format!("/ip4/{}/tcp/0", Switched::ip(SUBNET, i));
    let ns = |i: usize| Some(net.names[i].as_str());

    let h0 = NodeProc::start_in(ns(0), &listen(0), &d(0), &[]);
    let token = invite_for(&d(0), 4);
    let mut nodes = vec![h0];
    for i in 1..HOSTS {
        let mut extra = vec!["--join", token.as_str()];
        if i == 1 || i == 3 {
            extra.extend(["--model", model.as_str()]);
        }
        nodes.push(NodeProc::start_in(ns(i), &listen(i), &d(i), &extra));
    }
    let ids: Vec<String> = nodes.iter().map(|n| n.peer_id.clone()).collect();
    let sees = |i: usize, j: usize| {
        member_state(&status_json_in(ns(i), &d(i), &nodes[i].addr), &ids[j]).as_deref()
            == Some("alive")
    };
    let all_agree = || (0..HOSTS).all(|i| (0..HOSTS).all(|j| sees(i, j)));
    assert!(
        wait_until(Duration::from_secs(30), all_agree).is_some(),
        "the five nodes never all saw each other alive"
    );
    let chat = |i: usize| {
        let t = Instant::now();
        let o = chat_in(
            ns(i),
            &d(0),
            &nodes[i].addr,
            &["--prompt", "Say hello.", "--max-tokens", "8", "--verbose"],
        );
        (o, t.elapsed())
    };
    // Before the cut, for the usual time.
    let (before, usual) = chat(2);
    assert!(before.status.success(), "{}", stderr(&before));

    assert!(net.partition(&APART), "could not cut the switch");
    // At once: each side's entry may still place on the far model node.
    for (entry, model_node) in [(2, 1), (4, 3)] {
        let (o, took) = chat(entry);
        assert!(
            o.status.success(),
            "a chat through host {entry} failed while cut: {}",
            stderr(&o)
        );
        assert_eq!(
            served_by(&o).as_deref(),
            Some(ids[model_node].as_str()),
            "{}",
            stderr(&o)
        );
        assert!(
            took < usual * 4 + Duration::from_secs(20),
            "took {took:?} (usual {usual:?})"
        );
        eprintln!("through host {entry} just after the cut: {took:?} (usual {usual:?})");
    }
    // Once the views have caught up, each side holds the other not alive.
    assert!(
        wait_until(Duration::from_secs(30), || !sees(0, 3) && !sees(3, 1)).is_some(),
        "the views never noticed the cut"
    );
    for (entry, model_node) in [(0, 1), (4, 3)] {
        let (o, _) = chat(entry);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(served_by(&o).as_deref(), Some(ids[model_node].as_str()));
    }

    assert!(net.heal(), "could not heal the switch");
    let healed = wait_until(Duration::from_secs(90), all_agree);
    assert!(
        healed.is_some(),
        "after healing the views never agreed: {:?}",
        (0..HOSTS)
            .map(|i| (0..HOSTS).filter(|&j| sees(i, j)).collect::<Vec<_>>())
            .collect::<Vec<_>>()
    );
    eprintln!("views agreed {healed:?} after healing");
    let (after, _) = chat(4);
    assert!(after.status.success(), "{}", stderr(&after));
}
