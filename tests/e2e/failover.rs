//! Mid-stream failover: the node streaming an answer is killed with
//! SIGKILL; the client resumes through its entry on another node, and the
//! text it prints is whole, at temperature 0 the same as undisturbed.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use zavod_tests::{
    NodeProc, chat, invite_for, member_state, model_path, served_by, status_json, stderr, stdout,
    wait_until, zavod,
};

const ASK: [&str; 8] = [
    "--prompt",
    "Count from 1 to 60, separated by commas.",
    "--temperature",
    "0",
    "--max-tokens",
    "100",
    "--verbose",
    "--seed",
];

/// Entry A (no model, started with `entry_args`) and members B and C with
/// the model, both alive in A's view.
fn entry_and_two_model_nodes(root: &Path, entry_args: &[&str]) -> (NodeProc, Vec<NodeProc>) {
    let d = |n: &str| root.join(n);
    let model = model_path().to_str().expect("utf8").to_string();
    let a = NodeProc::start(&d("a"), entry_args);
    let token = invite_for(&d("a"), 8);
    let model_node = |name: &str| {
        NodeProc::start(
            &d(name),
            &["--join", &token, "--model", &model, "--threads", "1"],
        )
    };
    let nodes = vec![model_node("b"), model_node("c")];
    assert!(
        wait_until(Duration::from_secs(10), || {
            let s = status_json(&d("a"), &a.addr);
            nodes
                .iter()
                .all(|n| member_state(&s, &n.peer_id).as_deref() == Some("alive"))
        })
        .is_some(),
        "B and C never both alive in A's view"
    );
    (a, nodes)
}

#[test]
fn a_chat_survives_its_serving_node_killed_mid_answer() {
    let root = tempfile::tempdir().expect("tempdir");
    let d = |n: &str| root.path().join(n);
    let (a, mut nodes) = entry_and_two_model_nodes(root.path(), &[]);
    let mut args: Vec<&str> = ASK.to_vec();
    args.push("7");

    // Undisturbed.
    let o = chat(&d("a"), &a.addr, &args);
    assert!(o.status.success(), "{}", stderr(&o));
    let reference = stdout(&o);
    assert!(
        reference.len() > 60,
        "answer too short to interrupt: {reference:?}"
    );

    // Disturbed: kill the streaming node once some of the answer is out.
    let mut child = zavod()
        .args(["chat", "--peer", &a.addr, "--data-dir"])
        .arg(d("a"))
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn chat");
    let (err_tx, err_rx) = mpsc::channel::<String>();
    let err = child.stderr.take().expect("stderr");
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = err_tx.send(line);
        }
    });
    let (out_tx, out_rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let mut out = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 || out_tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                break;
            }
        }
    });
    let mut err_lines = Vec::new();
    let serving = loop {
        let line = err_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the chat never said who streams");
        err_lines.push(line.clone());
        if let Some(p) = line
            .strip_prefix("[streaming directly from ")
            .and_then(|r| r.strip_suffix(']'))
        {
            break p.to_string();
        }
    };
    let mut text = Vec::new();
    while text.len() < 24 {
        let (_, chunk) = out_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("no tokens before the kill");
        text.extend(chunk);
    }
    let i = nodes
        .iter()
        .position(|n| n.peer_id == serving)
        .expect("streamed by B or C");
    let killed_at = Instant::now();
    nodes.remove(i).kill9();
    let mut stall = None;
    while let Ok((at, chunk)) = out_rx.recv_timeout(Duration::from_secs(60)) {
        if stall.is_none() && at > killed_at {
            stall = Some(at - killed_at);
        }
        text.extend(chunk);
    }
    let status = child.wait().expect("chat exits");
    err_lines.extend(err_rx.try_iter());
    let log = err_lines.join("\n");
    assert!(status.success(), "chat failed after the kill:\n{log}");
    assert!(log.contains("resuming on another node"), "{log}");
    let text = String::from_utf8(text).expect("utf8");
    assert_eq!(
        text, reference,
        "the resumed answer differs from the undisturbed one\n{log}"
    );
    let stall = stall.expect("no token after the kill");
    eprintln!(
        "failover stall, kill to next token: {} ms",
        stall.as_millis()
    );
    // A generous bound for a shared 2-core machine; the benchmark figure is
    // in the closing note.
    assert!(stall < Duration::from_secs(5), "stall {stall:?}");

    // The next chat is answered by the surviving node (directly, or relayed
    // by the entry if it first picks the dead one before its view notices).
    let o = chat(&d("a"), &a.addr, &args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        served_by(&o).as_deref(),
        Some(nodes[0].peer_id.as_str()),
        "{}",
        stderr(&o)
    );
}

/// The same over HTTP, where the entry relays: the target is killed mid
/// stream and the entry finishes the answer from another node.
#[test]
fn an_http_stream_survives_its_serving_node_killed_mid_answer() {
    use futures::StreamExt;
    let root = tempfile::tempdir().expect("tempdir");
    let d = |n: &str| root.path().join(n);
    let (a, mut nodes) = entry_and_two_model_nodes(root.path(), &["--http", "127.0.0.1:0"]);
    let cap = zavod_tests::cap_issue(
        &d("a"),
        &["--models", "*", "--max-tokens", "100000", "--ttl", "1h"],
    );
    let url = format!("{}/v1/chat/completions", a.http.as_deref().expect("http"));
    let body = serde_json::json!({
        "model": "gemma-3-270m-q4_k_m",
        "messages": [{"role": "user", "content": "Count from 1 to 60, separated by commas."}],
        "max_tokens": 100,
        "temperature": 0,
        "stream": true,
    });
    let http = reqwest::Client::new();
    let content = |data: &str| -> Option<String> {
        let v: serde_json::Value = serde_json::from_str(data).ok()?;
        v["choices"][0]["delta"]["content"]
            .as_str()
            .map(str::to_string)
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let whole = http
            .post(&url)
            .bearer_auth(&cap)
            .json(&body)
            .send()
            .await
            .expect("send")
            .text()
            .await
            .expect("body");
        let reference: String = whole
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(content)
            .collect();
        assert!(reference.len() > 60, "{whole}");

        let resp = http
            .post(&url)
            .bearer_auth(&cap)
            .json(&body)
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 200);
        let serving = resp.headers()["x-zavod-served-by"]
            .to_str()
            .expect("header")
            .to_string();
        let mut stream = resp.bytes_stream();
        let mut raw = String::new();
        let mut killed = false;
        while let Some(chunk) = stream.next().await {
            raw.push_str(&String::from_utf8_lossy(&chunk.expect("chunk")));
            if !killed && raw.matches("\"content\"").count() > 8 {
                let i = nodes
                    .iter()
                    .position(|n| n.peer_id == serving)
                    .expect("served by B or C");
                nodes.remove(i).kill9();
                killed = true;
            }
        }
        assert!(killed, "the answer ended before the kill: {raw}");
        let data: Vec<&str> = raw
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .collect();
        assert_eq!(data.last().copied(), Some("[DONE]"), "{raw}");
        let text: String = data.iter().copied().filter_map(content).collect();
        assert_eq!(text, reference, "the relayed, resumed answer differs");
    });
}
