//! LAN discovery: two nodes on two network namespaces joined by a veth
//! pair (a two-host LAN on this machine) find each other by mDNS, with no
//! address given, when the profile enables it.

use std::time::Duration;
use zavod_tests::{Lan, NodeProc, invite, member_state, status_json_in, wait_until};

fn status_in(ns: &str, dir: &std::path::Path, addr: &str) -> serde_json::Value {
    status_json_in(Some(ns), dir, addr)
}

#[test]
fn nodes_on_a_lan_find_each_other_by_mdns() {
    let Some(lan) = Lan::new(77) else {
        // Network namespaces need root (CAP_NET_ADMIN) and iproute2.
        eprintln!("SKIPPED: cannot create network namespaces here (needs root and `ip`)");
        return;
    };
    let [na, nb] = &lan.names;
    let root = tempfile::tempdir().expect("tempdir");
    let d = |n: &str| root.path().join(n);
    let cfg = root.path().join("lan.toml");
    std::fs::write(&cfg, "[node]\nmdns = true\n").expect("config");
    let cfg = cfg.to_str().expect("utf8");

    let a = NodeProc::start_in(
        Some(na),
        "/ip4/10.77.0.1/tcp/0",
        &d("a"),
        &["--config", cfg],
    );
    // B becomes a member through A once, then leaves.
    let b = NodeProc::start_in(
        Some(nb),
        "/ip4/10.77.0.2/tcp/0",
        &d("b"),
        &["--config", cfg, "--join", &invite(&d("a"))],
    );
    let b_id = b.peer_id.clone();
    assert!(b.stop().success());
    assert!(
        wait_until(Duration::from_secs(20), || {
            member_state(&status_in(na, &d("a"), &a.addr), &b_id).as_deref() != Some("alive")
        })
        .is_some(),
        "A kept B alive after it stopped"
    );

    // Control: B again without mDNS and without A's address stays apart.
    // (A restarted member dials the node that signed its membership; the
    // record of where that node listens is removed, so only mDNS is left.)
    std::fs::remove_file(d("b").join("signer_addrs")).expect("B recorded its signer");
    let quiet = root.path().join("quiet.toml");
    std::fs::write(&quiet, "[node]\nmdns = false\n").expect("config");
    let b = NodeProc::start_in(
        Some(nb),
        "/ip4/10.77.0.2/tcp/0",
        &d("b"),
        &["--config", quiet.to_str().expect("utf8")],
    );
    std::thread::sleep(Duration::from_secs(5));
    assert_ne!(
        member_state(&status_in(na, &d("a"), &a.addr), &b.peer_id).as_deref(),
        Some("alive"),
        "B was found without mDNS"
    );
    assert!(b.stop().success());

    // B with mDNS, and still no address of A anywhere: only mDNS can bring
    // them together.
    let b = NodeProc::start_in(
        Some(nb),
        "/ip4/10.77.0.2/tcp/0",
        &d("b"),
        &["--config", cfg],
    );
    let took = wait_until(Duration::from_secs(20), || {
        member_state(&status_in(na, &d("a"), &a.addr), &b.peer_id).as_deref() == Some("alive")
            && member_state(&status_in(nb, &d("a"), &b.addr), &a.peer_id).as_deref()
                == Some("alive")
    });
    eprintln!("mDNS discovery took {took:?}");
    assert!(took.is_some(), "A and B never found each other by mDNS");
    drop(b);
    drop(a);
}
