//! The HTTP listener against clients that misbehave: a declared body over
//! the limit and a missing bearer are refused before the body is read, a
//! body that stops halfway is answered 408 once its time is up, a
//! request head that does not arrive in time closes its connection,
//! connections beyond the cap are closed on arrival, and `/metrics` can
//! live on a listener of its own.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use zavod_harness::free_port;
use zavod_tests::{NodeProc, cap_issue};

/// Writes `head` and returns what the server answered and how long it took
/// (empty when it closed without a word).
fn exchange(addr: &str, head: &str) -> (String, Duration) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    let t0 = Instant::now();
    s.write_all(head.as_bytes()).expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                // One response is enough: the node need not close.
                if got.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    (String::from_utf8_lossy(&got).into_owned(), t0.elapsed())
}

#[test]
fn the_http_listener_refuses_early_times_out_and_caps_connections() {
    let root = tempfile::tempdir().expect("tempdir");
    let metrics_port = free_port().expect("port");
    let cfg = root.path().join("http.toml");
    std::fs::write(
        &cfg,
        format!(
            "[http]\nmax_body_bytes = 4096\nheader_read_timeout_ms = 3000\nbody_read_timeout_ms = 2000\nmax_connections = 4\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\n"
        ),
    )
    .expect("config");
    let node = NodeProc::start(
        &root.path().join("n"),
        &[
            "--http",
            "127.0.0.1:0",
            "--config",
            cfg.to_str().expect("utf8"),
        ],
    );
    let base = node.http.clone().expect("http");
    let addr = base.trim_start_matches("http://").to_string();

    // A declared body over the limit: 413 at once, none of it sent.
    let (r, took) = exchange(
        &addr,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer zavod-cap-1.x\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\n\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 413"), "{r}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    // No bearer: 401 before the (never sent) body.
    let (r, took) = exchange(
        &addr,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 401"), "{r}");
    assert!(took < Duration::from_secs(5), "{took:?}");

    // A body that stops halfway: 408 once the body's time is up.
    let token = cap_issue(
        &root.path().join("n"),
        &["--models", "*", "--max-tokens", "1000", "--ttl", "1h"],
    );
    let (r, took) = exchange(
        &addr,
        &format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"model\":"
        ),
    );
    assert!(r.starts_with("HTTP/1.1 408"), "{r}");
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(10),
        "answered after {took:?}"
    );

    // Half a request head: the connection is closed after the timeout.
    let (r, took) = exchange(&addr, "GET /healthz HTTP/1.1\r\nHost: x\r\n");
    assert!(
        !r.starts_with("HTTP/1.1 200"),
        "an unfinished head was served: {r}"
    );
    assert!(
        took >= Duration::from_millis(2500) && took < Duration::from_secs(14),
        "closed after {took:?}"
    );

    // Four idle connections fill the cap; a fifth is closed on arrival.
    let idle: Vec<TcpStream> = (0..4)
        .map(|_| TcpStream::connect(&addr).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let (r, took) = exchange(&addr, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(r.is_empty(), "a fifth connection was served: {r}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    // The node closes them when no request head arrives in time, and
    // serves again.
    std::thread::sleep(Duration::from_millis(3500));
    for mut s in idle {
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut b = [0u8; 16];
        assert_eq!(
            s.read(&mut b).ok(),
            Some(0),
            "an idle connection stayed open"
        );
    }
    let (r, _) = exchange(&addr, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");

    // /metrics on its own listener only.
    let (r, _) = exchange(&addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    let (r, _) = exchange(
        &format!("127.0.0.1:{metrics_port}"),
        "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(
        node.stdout.iter().any(|l| l.contains(&format!(
            "metrics on http://127.0.0.1:{metrics_port}/metrics"
        ))),
        "{:#?}",
        node.stdout
    );
}
