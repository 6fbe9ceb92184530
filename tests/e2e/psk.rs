//! A private mesh: `zavod mesh psk` writes a key; nodes and clients with
//! `--psk-file` of the same key connect over TCP (QUIC off, and said);
//! anything with another key or none cannot, and both sides say why in
//! words.

use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::Duration;
use zavod_tests::{NodeProc, READY_TIMEOUT, invite, stderr, stdout, wait_until, zavod, zavod_in};

fn status_with(
    dir: &std::path::Path,
    addr: &str,
    key: Option<&std::path::Path>,
) -> std::process::Output {
    let mut c = zavod();
    c.args(["status", "--peer", addr, "--data-dir"]).arg(dir);
    if let Some(k) = key {
        c.arg("--psk-file").arg(k);
    }
    c.stdin(Stdio::null()).output().expect("run zavod status")
}

#[test]
fn only_nodes_and_clients_with_the_mesh_key_connect() {
    let root = tempfile::tempdir().expect("tempdir");
    let d = |n: &str| root.path().join(n);
    let (k1, k2) = (d("k1.psk"), d("k2.psk"));
    for k in [&k1, &k2] {
        let o = zavod()
            .args(["mesh", "psk", "--out"])
            .arg(k)
            .output()
            .expect("zavod mesh psk");
        assert!(o.status.success(), "{}", stderr(&o));
        let mode = std::fs::metadata(k).expect("key file").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the key is its owner's only");
    }
    let again = zavod()
        .args(["mesh", "psk", "--out"])
        .arg(&k1)
        .output()
        .expect("zavod mesh psk");
    assert_eq!(again.status.code(), Some(1));
    assert!(
        stderr(&again).contains("never overwritten"),
        "{}",
        stderr(&again)
    );

    // A, with key 1 and a QUIC address it must pass over; its log kept.
    let log = d("a.stderr");
    let mut cmd = zavod_in(None);
    cmd.args([
        "node",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--listen",
        "/ip4/127.0.0.1/udp/0/quic-v1",
        "--psk-file",
    ])
    .arg(&k1)
    .arg("--data-dir")
    .arg(d("a"))
    .stderr(std::fs::File::create(&log).expect("log"));
    let a = zavod_harness::NodeProc::spawn(cmd, &d("a"), READY_TIMEOUT).expect("node A");
    assert!(
        a.stdout
            .iter()
            .any(|l| l.starts_with("private mesh:") && l.contains("QUIC is off")),
        "{:#?}",
        a.stdout
    );
    assert!(
        !a.stdout.iter().any(|l| l.contains("quic")),
        "listens on QUIC: {:#?}",
        a.stdout
    );

    // The same key: the status answers.
    let o = status_with(&d("a"), &a.addr, Some(&k1));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains(&a.peer_id), "{}", stdout(&o));
    // Another key, and none: refused, with the reason in words.
    let o = status_with(&d("a"), &a.addr, Some(&k2));
    assert!(!o.status.success());
    // The handshake either fails or times out, depending on what the
    // other side's bytes look like; either way the words say why.
    assert!(
        stderr(&o).contains("different key or none"),
        "{}",
        stderr(&o)
    );
    let o = status_with(&d("a"), &a.addr, None);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("needs the same key (--psk-file)"),
        "{}",
        stderr(&o)
    );
    // A's side says it too.
    assert!(
        wait_until(Duration::from_secs(5), || {
            std::fs::read_to_string(&log).is_ok_and(|l| l.contains("different key or none"))
        })
        .is_some(),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );

    // A node with the key joins through A and gossips with it.
    let k1s = k1.to_str().expect("utf8");
    let b = NodeProc::start(&d("b"), &["--psk-file", k1s, "--join", &invite(&d("a"))]);
    let alive = || {
        let o = status_with(&d("a"), &a.addr, Some(&k1));
        o.status.success()
            && stdout(&o)
                .lines()
                .any(|l| l.starts_with(&b.peer_id) && l.contains("alive"))
    };
    assert!(
        wait_until(Duration::from_secs(15), alive).is_some(),
        "B never alive in A's view"
    );
}
