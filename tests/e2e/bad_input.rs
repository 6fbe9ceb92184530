use std::time::Duration;
use zavod_node::datadir::ClientIdentity;
use zavod_proto::wire::{ErrorCode, ServerFrame};
use zavod_tests::{NodeProc, chat, model_path, stderr, zavod};

fn node_fails(args: &[&str]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = zavod()
        .arg("node")
        .arg("--data-dir")
        .arg(dir.path())
        .arg("--listen")
        .arg("/ip4/127.0.0.1/tcp/0")
        .args(args)
        .output()
        .expect("run");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_models_configs_and_addresses_get_clear_errors() {
    let (code, e) = node_fails(&["--model", "/nonexistent/model.gguf"]);
    assert_eq!(code, Some(1));
    assert!(e.contains("/nonexistent/model.gguf"), "{e}");

    let dir = tempfile::tempdir().expect("tempdir");
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"this is not a model").expect("write");
    let (code, e) = node_fails(&["--model", junk.to_str().expect("utf8")]);
    assert_eq!(code, Some(1));
    assert!(e.contains("not a GGUF"), "{e}");

    let truncated = dir.path().join("truncated.gguf");
    let real = std::fs::read(model_path()).expect("model");
    std::fs::write(&truncated, &real[..1 << 20]).expect("write");
    let (code, e) = node_fails(&["--model", truncated.to_str().expect("utf8")]);
    assert_eq!(code, Some(1));
    assert!(
        e.contains("truncated.gguf") && e.contains("truncated or corrupt GGUF"),
        "{e}"
    );

    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "[model]\nslotz = 2\n").expect("write");
    let (code, e) = node_fails(&["--config", cfg.to_str().expect("utf8")]);
    assert_eq!(code, Some(1));
    assert!(e.contains("slotz") && e.contains("bad.toml"), "{e}");

    let (code, e) = node_fails(&["--config", "/nonexistent.toml"]);
    assert_eq!(code, Some(1));
    assert!(e.contains("/nonexistent.toml"), "{e}");

    // Command-line misuse exits 2.
    let (code, e) = node_fails(&["--listen", "/ip4/nonsense"]);
    assert_eq!(code, Some(2), "{e}");
    let out = zavod()
        .args(["chat", "--peer", "not an address", "--prompt", "x"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected a multiaddr"));
    let out = zavod()
        .args(["chat", "--temperature", "9", "--prompt", "x"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let out = zavod().arg("--no-such-flag").output().expect("run");
    assert_eq!(out.status.code(), Some(2));

    // Unreachable peer: a runtime failure, with a deadline. (A short-lived
    // node gives this data directory a credential.)
    let d = tempfile::tempdir().expect("tempdir");
    drop(NodeProc::start(d.path(), &[]));
    let out = chat(d.path(), "127.0.0.1:1", &["--prompt", "x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("127.0.0.1"), "{}", stderr(&out));
}

#[test]
fn malformed_and_oversized_frames_do_not_hurt_the_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = model_path();
    let mut node = NodeProc::start(dir.path(), &["--model", model.to_str().expect("utf8")]);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let identity = ClientIdentity::load(dir.path(), None).expect("identity");
    let addr: zavod_net::libp2p::Multiaddr = node.addr.parse().expect("addr");
    rt.block_on(async {
        let (net, _ev, el) = zavod_net::new(
            zavod_net::identity_from_secret(identity.key.secret_bytes()).expect("key"),
            Default::default(),
        )
        .expect("swarm");
        tokio::spawn(el.run());
        let peer = net.dial(addr).await.expect("dial");
        let t = Duration::from_secs(10);

        // Garbage bytes.
        let mut s = net.open_chat(peer).await.expect("open");
        s.send_raw(vec![0xde, 0xad, 0xbe, 0xef, 1, 2, 3])
            .await
            .expect("send");
        match s.recv::<ServerFrame>(t).await {
            Ok(Some(ServerFrame::Error(e))) => {
                assert!(
                    matches!(
                        e.code,
                        ErrorCode::BadRequest | ErrorCode::UnsupportedVersion
                    ),
                    "{e:?}"
                );
                assert!(!e.message.is_empty());
            }
            other => panic!("expected an error frame, got {other:?}"),
        }

        // A frame over the node's 1 MiB limit. The node answers after the
        // length prefix, while we are still writing, so read concurrently.
        let s = net.open_chat_with_limit(peer, 4 << 20).await.expect("open");
        let (mut w, mut r) = s.split();
        let writer = tokio::spawn(async move { w.send_raw(vec![7u8; 2 << 20]).await });
        let answer = tokio::time::timeout(t, r.recv::<ServerFrame>())
            .await
            .expect("answer in time");
        writer.abort();
        match answer {
            Ok(Some(ServerFrame::Error(e))) => {
                assert_eq!(e.code, ErrorCode::FrameTooLarge, "{e:?}");
                assert!(e.message.contains("limit"), "{e:?}");
            }
            other => panic!("expected an error frame, got {other:?}"),
        }

        // A stream that says nothing, and one that closes at once.
        let _silent = net.open_chat(peer).await.expect("open");
        let mut closed = net.open_chat(peer).await.expect("open");
        closed.close().await.expect("close");
    });
    // The node stays up and keeps serving.
    assert!(node.is_running());
    let ok = chat(
        dir.path(),
        &node.addr,
        &["--prompt", "Hi", "--max-tokens", "3"],
    );
    assert!(ok.status.success(), "{}", stderr(&ok));
}

#[test]
fn a_second_node_on_a_running_nodes_data_directory_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = NodeProc::start(dir.path(), &[]);
    let out = zavod()
        .args(["node", "--listen", "/ip4/127.0.0.1/tcp/0", "--data-dir"])
        .arg(dir.path())
        .output()
        .expect("run zavod node");
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("another zavod node is running"), "{err}");
    let first = a.peer_id.clone();
    assert!(a.stop().success());
    // Once it has stopped, the directory is free again, with the same key.
    let b = NodeProc::start(dir.path(), &[]);
    assert_eq!(b.peer_id, first);
}
