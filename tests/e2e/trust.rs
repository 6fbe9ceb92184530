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

    // A credential signed by another mesh's authority.
    let other = tempfile::tempdir().expect("tempdir");
    let other_node = NodeProc::start(other.path(), &[]);
    drop(other_node);
    let foreign = chat(other.path(), &node.addr, &["--prompt", "Hi"]);
    assert_eq!(foreign.status.code(), Some(1));
    let e = stderr(&foreign);
    assert!(
        e.contains("credential refused") && e.contains("not a trusted authority"),
        "{e}"
    );

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
