use zavod_tests::{NodeProc, chat, model_path, stderr};

#[test]
fn chats_without_a_valid_credential_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = model_path();
    let node = NodeProc::start(dir.path(), &["--model", model.to_str().expect("utf8")]);
    let ok = chat(
        dir.path(),
        &node.addr,
        &["--prompt", "Hi", "--max-tokens", "2"],
    );
    assert!(ok.status.success(), "{}", stderr(&ok));

    // No credential at all.
    let empty = tempfile::tempdir().expect("tempdir");
    let none = chat(empty.path(), &node.addr, &["--prompt", "Hi"]);
    assert_eq!(none.status.code(), Some(1));
    assert!(
        stderr(&none).contains("no client credential"),
        "{}",
        stderr(&none)
    );

    // A credential signed by another mesh's authority: the client finds
    // the node is not of its credential's mesh and sends it nothing (the
    // node would refuse the credential too: trust::tests).
    let other = tempfile::tempdir().expect("tempdir");
    let other_node = NodeProc::start(other.path(), &[]);
    let foreign = chat(other.path(), &node.addr, &["--prompt", "Hi"]);
    assert_eq!(foreign.status.code(), Some(1));
    let e = stderr(&foreign);
    assert!(
        e.contains(&format!(
            "{} is not a member of the mesh your credential is from",
            node.peer_id
        )) && e.contains("not a trusted authority")
            && e.contains("nothing was sent"),
        "{e}"
    );
    // This mesh's client attached to a node of another mesh: the same.
    let stranger = chat(dir.path(), &other_node.addr, &["--prompt", "Hi"]);
    assert_eq!(stranger.status.code(), Some(1));
    assert!(
        stderr(&stranger).contains(&format!(
            "{} is not a member of the mesh your credential is from",
            other_node.peer_id
        )),
        "{}",
        stderr(&stranger)
    );
    drop(other_node);

    // This mesh's credential presented by another key (stolen credential).
    let thief = tempfile::tempdir().expect("tempdir");
    let cred = dir.path().join("client.cred");
    let stolen = chat(
        thief.path(),
        &node.addr,
        &[
            "--prompt",
            "Hi",
            "--credential",
            cred.to_str().expect("utf8"),
        ],
    );
    assert_eq!(stolen.status.code(), Some(1));
    assert!(
        stderr(&stolen).contains("belongs to key"),
        "{}",
        stderr(&stolen)
    );

    // Garbage text.
    let garbage = chat(
        dir.path(),
        &node.addr,
        &["--prompt", "Hi", "--credential", "zavod-cred-1.AAAA"],
    );
    assert_eq!(garbage.status.code(), Some(1));
    assert!(stderr(&garbage).contains("corrupt"), "{}", stderr(&garbage));

    // The node is still serving.
    let again = chat(
        dir.path(),
        &node.addr,
        &["--prompt", "Hi", "--max-tokens", "2"],
    );
    assert!(again.status.success(), "{}", stderr(&again));
}

#[test]
fn the_operator_of_a_joined_node_reads_its_status_and_is_told_how_to_chat() {
    let root = tempfile::tempdir().expect("tempdir");
    let d = |n: &str| root.path().join(n);
    let model = model_path();
    let a = NodeProc::start(&d("a"), &["--model", model.to_str().expect("utf8")]);
    let token = zavod_tests::invite(&d("a"));
    let b = NodeProc::start(&d("b"), &["--join", &token]);

    // B's data directory has no credential (only the authority issues
    // them), yet its operator sees B's status, signed with B's own key.
    assert!(!d("b").join("client.cred").exists());
    let s = zavod_tests::status_json(&d("b"), &b.addr);
    let me = s["members"]
        .as_array()
        .expect("members")
        .iter()
        .find(|m| m["is_self"] == true)
        .expect("B lists itself");
    assert_eq!(me["peer_id"], b.peer_id.as_str());

    // B's key does not open A's status.
    let other = zavod_tests::zavod()
        .args(["status", "--peer", &a.addr, "--data-dir"])
        .arg(d("b"))
        .output()
        .expect("run zavod status");
    assert_eq!(other.status.code(), Some(1));
    assert!(
        stderr(&other).contains("not by this node") && stderr(&other).contains("zavod cap issue"),
        "{}",
        stderr(&other)
    );

    // A chat from B's directory says what to run, with the key to bind.
    let none = chat(&d("b"), &b.addr, &["--prompt", "Hi"]);
    assert_eq!(none.status.code(), Some(1));
    let e = stderr(&none);
    assert!(e.contains("only the mesh's authority issues"), "{e}");
    let at = e.find("--holder ").expect("names the key") + "--holder ".len();
    let holder = &e[at..at + 64];
    assert!(holder.bytes().all(|c| c.is_ascii_hexdigit()), "{e}");

    // Doing what it says makes the chat work through B.
    let out = d("b").join("client.cred");
    zavod_tests::cap_issue(
        &d("a"),
        &[
            "--max-tokens",
            "1000",
            "--ttl",
            "1d",
            "--holder",
            holder,
            "--out",
            out.to_str().expect("utf8"),
        ],
    );
    let serves = zavod_tests::wait_until(std::time::Duration::from_secs(10), || {
        let s = zavod_tests::status_json(&d("b"), &b.addr);
        zavod_tests::member_state(&s, &a.peer_id).as_deref() == Some("alive")
    });
    assert!(serves.is_some(), "B never heard of A");
    let ok = chat(&d("b"), &b.addr, &["--prompt", "Hi", "--max-tokens", "4"]);
    assert!(ok.status.success(), "{}", stderr(&ok));
}

/// Runs `zavod node` expecting it to fail to start (within a minute);
/// returns its exit code and stderr.
fn failed_start(dir: &std::path::Path, extra: &[&str]) -> (Option<i32>, String) {
    let mut child = zavod_tests::zavod()
        .args(["node", "--listen", "/ip4/127.0.0.1/tcp/0", "--data-dir"])
        .arg(dir)
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn zavod node");
    let exited = zavod_tests::wait_until(std::time::Duration::from_secs(60), || {
        child.try_wait().ok().flatten().is_some()
    });
    if exited.is_none() {
        let _ = child.kill();
        panic!("the node started where it should have refused to");
    }
    let out = child.wait_with_output().expect("output");
    (out.status.code(), stderr(&out))
}

#[test]
fn an_invite_admits_one_node_and_names_the_node_that_signs() {
    let root = tempfile::tempdir().expect("tempdir");
    let d = |n: &str| root.path().join(n);
    let a = NodeProc::start(&d("a"), &[]);
    let token = zavod_tests::invite(&d("a"));
    let b = NodeProc::start(&d("b"), &["--join", &token]);
    // The same invite a second time, by another node: refused.
    let (code, e) = failed_start(&d("c"), &["--join", &token]);
    assert_eq!(code, Some(1), "{e}");
    assert!(
        e.contains("admits 1 node and was used by") && e.contains("zavod mesh invite"),
        "{e}"
    );
    // An invite for two admits two, and no third.
    let two = zavod_tests::invite_for(&d("a"), 2);
    let c = NodeProc::start(&d("c"), &["--join", &two]);
    let d2 = NodeProc::start(&d("d"), &["--join", &two]);
    let (code, e) = failed_start(&d("e"), &["--join", &two]);
    assert_eq!(code, Some(1), "{e}");
    assert!(e.contains("admits 2 nodes"), "{e}");
    drop((c, d2));

    // A bootstrap address given without a peer id gets the signing node's.
    let port = a
        .addr
        .split("/tcp/")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .expect("port");
    let bare = format!("/ip4/127.0.0.1/tcp/{port}");
    let made = zavod_tests::zavod()
        .args(["mesh", "invite", "--bootstrap", &bare, "--data-dir"])
        .arg(d("a"))
        .output()
        .expect("invite");
    assert!(made.status.success(), "{}", stderr(&made));
    let f = NodeProc::start(&d("f"), &["--join", zavod_tests::stdout(&made).trim()]);
    drop(f);
    // One naming another node is refused: only the authority's node signs.
    let other = format!("{bare}/p2p/{}", b.peer_id);
    let refused = zavod_tests::zavod()
        .args(["mesh", "invite", "--bootstrap", &other, "--data-dir"])
        .arg(d("a"))
        .output()
        .expect("invite");
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("only this data directory's node"),
        "{}",
        stderr(&refused)
    );
}

#[test]
fn memberships_are_renewed_and_lapse_when_their_signer_is_gone() {
    use std::time::Duration;
    use zavod_tests::{member_state, status_json, wait_until};
    let root = tempfile::tempdir().expect("tempdir");
    let d = |n: &str| root.path().join(n);
    let a = NodeProc::start(&d("a"), &[]);
    let made = zavod_tests::zavod()
        .args([
            "mesh",
            "invite",
            "--uses",
            "2",
            "--membership-ttl",
            "4s",
            "--data-dir",
        ])
        .arg(d("a"))
        .output()
        .expect("invite");
    assert!(made.status.success(), "{}", stderr(&made));
    let invite = zavod_tests::stdout(&made).trim().to_string();
    let b = NodeProc::start(&d("b"), &["--join", &invite]);
    let c = NodeProc::start(&d("c"), &["--join", &invite]);
    let alive = |at: &NodeProc, who: &NodeProc| {
        member_state(&status_json(&d("a"), &at.addr), &who.peer_id).as_deref() == Some("alive")
    };
    assert!(
        wait_until(Duration::from_secs(20), || alive(&c, &b) && alive(&b, &c)).is_some(),
        "the mesh did not form"
    );
    // Each admitted node was handed the mesh's actor-session secret, kept
    // readable by its owner only.
    let secret = |n: &str| std::fs::read_to_string(d(n).join("session.secret")).expect("secret");
    assert_eq!(secret("b"), secret("a"));
    assert_eq!(secret("c"), secret("a"));
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d("b").join("session.secret"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // Three lifetimes of a 4 s membership later, both are still members:
    // each had its membership renewed at A, and announced the new one. A
    // busy machine can leave an announcement late and a member suspect
    // for a moment, so the views get a few seconds; a membership that had
    // lapsed could not come back, as A renews only one still valid.
    std::thread::sleep(Duration::from_secs(12));
    assert!(
        wait_until(Duration::from_secs(5), || alive(&c, &b)
            && alive(&b, &c)
            && alive(&a, &b))
        .is_some(),
        "a member lapsed"
    );
    // With A gone, nobody can renew them: within a lifetime they lapse in
    // each other's view.
    drop(a);
    let lapsed = wait_until(Duration::from_secs(10), || !alive(&c, &b) && !alive(&b, &c));
    eprintln!("memberships lapsed {lapsed:?} after the signer stopped");
    assert!(lapsed.is_some(), "memberships outlived their signer");
}
