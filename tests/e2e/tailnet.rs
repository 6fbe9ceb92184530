//! Tailscale: nodes started with `--tailscale` bind to their tailnet
//! addresses and find each other through what `tailscale status --json`
//! says, with no bootstrap address. The tailnet is three network
//! namespaces on one switch; each node's `tailscale` is a fake executable
//! (named by `ZAVOD_TAILSCALE_BIN`) printing a recorded-style status whose
//! addresses are the namespaces', so discovery really dials. Without a
//! usable Tailscale the node says what is wrong and exits 1.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use zavod_tests::{
    NodeProc, Switched, invite, member_state, model_path, served_by, status_json_in, stderr,
    wait_until, zavod,
};

const SUBNET: u8 = 79;
/// The port every node uses on the tailnet.
const PORT: u16 = 7171;

/// A peer entry of a status.
fn peer(host: &str, ip: &str, online: bool, tags: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "HostName": host,
        "DNSName": format!("{host}.tail-test.ts.net."),
        "OS": "linux",
        "TailscaleIPs": [ip, format!("fd7a:115c:a1e0::{}", ip.rsplit('.').next().unwrap_or("9"))],
        "Online": online,
        "Tags": tags,
    })
}

/// Writes a fake `tailscale` that answers `status --json` with `status`.
fn fake_tailscale(dir: &Path, name: &str, status: &serde_json::Value) -> PathBuf {
    let json = dir.join(format!("{name}.json"));
    std::fs::write(&json, status.to_string()).expect("status file");
    let bin = dir.join(format!("{name}-tailscale"));
    std::fs::write(
        &bin,
        format!(
            "#!/bin/sh\n[ \"$1 $2\" = \"status --json\" ] || exit 2\ncat '{}'\n",
            json.display()
        ),
    )
    .expect("fake tailscale");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    bin
}

/// The status as the machine `me` (host index `i`) sees the tailnet.
fn status_of(me: (&str, usize), peers: &[serde_json::Value]) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    for (k, p) in peers.iter().enumerate() {
        map.insert(format!("nodekey:{k}"), p.clone());
    }
    serde_json::json!({
        "Version": "1.76.1",
        "BackendState": "Running",
        "Self": peer(me.0, &Switched::ip(SUBNET, me.1), true, &["tag:zavod"]),
        "Peer": map,
    })
}

#[test]
fn nodes_on_a_tailnet_find_each_other_and_serve_a_chat_with_no_address_given() {
    let Some(lan) = Switched::new(SUBNET, 3) else {
        eprintln!("SKIPPED: cannot create network namespaces here (needs root and `ip`)");
        return;
    };
    let (na, nb, nc) = (&lan.names[0], &lan.names[1], &lan.names[2]);
    let root = tempfile::tempdir().expect("tempdir");
    let d = |n: &str| root.path().join(n);
    let model = model_path().to_str().expect("utf8").to_string();
    let ip = |i| Switched::ip(SUBNET, i);

    // B becomes a member through A once, over the LAN, then both stop.
    let a = NodeProc::start_in(Some(na), &format!("/ip4/{}/tcp/0", ip(0)), &d("a"), &[]);
    let b = NodeProc::start_in(
        Some(nb),
        &format!("/ip4/{}/tcp/0", ip(1)),
        &d("b"),
        &["--join", &invite(&d("a"))],
    );
    let b_id = b.peer_id.clone();
    assert!(b.stop().success());
    assert!(a.stop().success());

    // The tailnet: A (alpha), B (beta), a machine with no zavod on it
    // (gamma, on the third host), one offline and one without the tag.
    let alpha = peer("alpha", &ip(0), true, &["tag:zavod"]);
    let beta = peer("beta", &ip(1), true, &["tag:zavod"]);
    let gamma = peer("gamma", &ip(2), true, &["tag:zavod"]);
    let offline = peer("old-desktop", "10.79.0.40", false, &["tag:zavod"]);
    let untagged = peer("phone", "10.79.0.41", true, &[]);
    let a_bin = fake_tailscale(
        root.path(),
        "a",
        &status_of(
            ("alpha", 0),
            &[
                beta.clone(),
                gamma.clone(),
                offline.clone(),
                untagged.clone(),
            ],
        ),
    );
    let b_bin = fake_tailscale(
        root.path(),
        "b",
        &status_of(("beta", 1), &[alpha, gamma, offline, untagged]),
    );
    let cfg = root.path().join("tailnet.toml");
    std::fs::write(
        &cfg,
        format!("[node]\ntailscale = true\n\n[tailscale]\nport = {PORT}\ntag = \"zavod\"\npoll_ms = 500\n"),
    )
    .expect("config");
    let cfg = cfg.to_str().expect("utf8");

    let a = NodeProc::start_with_env(
        Some(na),
        "/ip4/127.0.0.1/tcp/0",
        &d("a"),
        &["--config", cfg],
        &[("ZAVOD_TAILSCALE_BIN", a_bin.to_str().expect("utf8"))],
    );
    let tailnet_addr = format!("/ip4/{}/tcp/{PORT}", ip(0));
    assert!(
        a.stdout
            .iter()
            .any(|l| l.starts_with(&format!("listening on {tailnet_addr}/"))),
        "A does not listen on its tailnet address: {:#?}",
        a.stdout
    );
    let b = NodeProc::start_with_env(
        Some(nb),
        "/ip4/127.0.0.1/tcp/0",
        &d("b"),
        &["--config", cfg, "--model", &model],
        &[("ZAVOD_TAILSCALE_BIN", b_bin.to_str().expect("utf8"))],
    );
    assert_eq!(b.peer_id, b_id);
    let status = || status_json_in(Some(na), &d("a"), &a.addr);
    assert!(
        wait_until(Duration::from_secs(20), || {
            member_state(&status(), &b_id).as_deref() == Some("alive")
        })
        .is_some(),
        "A never found B on the tailnet: {:#}",
        status()
    );
    // `zavod status` names each node found on the tailnet.
    let s = status();
    let names: Vec<(String, String)> = s["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| {
            (
                m["peer_id"].as_str().unwrap_or_default().to_string(),
                m["tailnet_name"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert!(
        names.contains(&(b_id.clone(), "beta.tail-test.ts.net".into())),
        "{names:?}"
    );
    assert!(
        names.contains(&(a.peer_id.clone(), "alpha.tail-test.ts.net".into())),
        "{names:?}"
    );

    // A client on the third host reaches A at its tailnet address; the
    // answer comes from B, found only through the tailnet.
    let o = zavod_tests::zavod_in(Some(nc))
        .args([
            "chat",
            "--peer",
            &format!("{tailnet_addr}/p2p/{}", a.peer_id),
            "--data-dir",
        ])
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
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!zavod_tests::stdout(&o).trim().is_empty(), "{}", stderr(&o));
    assert_eq!(
        served_by(&o).as_deref(),
        Some(b_id.as_str()),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_node_without_a_usable_tailnet_says_why_and_exits_1() {
    let root = tempfile::tempdir().expect("tempdir");
    let logged_out = fake_tailscale(
        root.path(),
        "out",
        &serde_json::json!({"BackendState": "NeedsLogin", "Self": null, "Peer": null}),
    );
    let stopped = fake_tailscale(
        root.path(),
        "stopped",
        &serde_json::json!({"BackendState": "Stopped", "Self": {"HostName": "x"}}),
    );
    let missing = root.path().join("no-such-tailscale");
    for (bin, says) in [
        (&logged_out, "not logged in to a tailnet"),
        (&stopped, "Tailscale is stopped"),
        (&missing, "install Tailscale"),
    ] {
        let o = zavod()
            .args([
                "node",
                "--tailscale",
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--data-dir",
            ])
            .arg(root.path().join("node"))
            .env("ZAVOD_TAILSCALE_BIN", bin)
            .stdin(Stdio::null())
            .output()
            .expect("run zavod node");
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains(says), "{says:?} not in: {err}");
        assert!(err.contains("tailscale"), "{err}");
    }
    // With an address beyond this machine, it goes on without the tailnet
    // and says so.
    let log = root.path().join("node.stderr");
    let mut cmd = zavod_tests::zavod_in(None);
    cmd.env("ZAVOD_TAILSCALE_BIN", &logged_out)
        .args([
            "node",
            "--tailscale",
            "--listen",
            "/ip4/0.0.0.0/tcp/0",
            "--data-dir",
        ])
        .arg(root.path().join("node"))
        .stderr(std::fs::File::create(&log).expect("log file"));
    let node =
        zavod_harness::NodeProc::spawn(cmd, &root.path().join("node"), zavod_tests::READY_TIMEOUT)
            .expect("the node goes on without the tailnet");
    let said = std::fs::read_to_string(&log).expect("read the log");
    assert!(
        said.contains("going on without tailnet discovery") && said.contains("not logged in"),
        "{said}"
    );
    drop(node);
}
