//! Hostile peers against a running node: who may connect (deny and allow
//! lists), a stranger that floods a node with silent streams, half-open
//! TCP connections and junk gossip while a member chats through it, and
//! one that floods it with Kademlia records.

use std::time::{Duration, Instant};
use zavod_net::libp2p::{Multiaddr, PeerId};
use zavod_net::{NetConfig, identity_from_secret};
use zavod_proto::wire::{ServerFrame, StatusReply};
use zavod_tests::{NodeProc, chat, model_path, stderr, zavod};

fn peer_of(secret: u8) -> PeerId {
    identity_from_secret([secret; 32])
        .expect("key")
        .public()
        .to_peer_id()
}

/// Whether a peer with key `secret` gets any answer from the node at
/// `addr` (a refusal counts: it was let in to hear it).
async fn answered(secret: u8, addr: &str) -> bool {
    let (net, _ev, el) = zavod_net::new(
        identity_from_secret([secret; 32]).expect("key"),
        NetConfig {
            dial_timeout_ms: 5_000,
            ..Default::default()
        },
    )
    .expect("swarm");
    let el = tokio::spawn(el.run());
    let addr: Multiaddr = addr.parse().expect("addr");
    let outcome = async {
        let peer = net.dial(addr).await.ok()?;
        let s = net.open(peer, zavod_net::STATUS_PROTOCOL).await.ok()?;
        let (mut w, mut r) = s.split();
        w.send_raw(vec![1, 2, 3]).await.ok()?;
        tokio::time::timeout(Duration::from_secs(5), r.recv::<StatusReply>())
            .await
            .ok()?
            .ok()?
    };
    let got = outcome.await.is_some();
    el.abort();
    got
}

#[test]
fn denied_peers_are_turned_away_and_an_allowlist_admits_only_its_peers() {
    let root = tempfile::tempdir().expect("tempdir");
    let d = |n: &str| root.path().join(n);
    let rt = tokio::runtime::Runtime::new().expect("runtime");

    let deny = d("deny.toml");
    std::fs::write(
        &deny,
        format!("[admission]\ndeny_peers = [\"{}\"]\n", peer_of(9)),
    )
    .expect("config");
    let a = NodeProc::start(&d("a"), &["--config", deny.to_str().expect("utf8")]);
    assert!(
        !rt.block_on(answered(9, &a.addr)),
        "a denied peer was served"
    );
    assert!(rt.block_on(answered(10, &a.addr)), "another peer was not");

    let allow = d("allow.toml");
    std::fs::write(
        &allow,
        format!("[admission]\nallow_peers = [\"{}\"]\n", peer_of(10)),
    )
    .expect("config");
    let b = NodeProc::start(&d("b"), &["--config", allow.to_str().expect("utf8")]);
    assert!(
        rt.block_on(answered(10, &b.addr)),
        "the allowed peer was not served"
    );
    assert!(
        !rt.block_on(answered(11, &b.addr)),
        "an unlisted peer was served"
    );

    // A list that names no peer id is a configuration error, said plainly.
    let bad = d("bad.toml");
    std::fs::write(&bad, "[admission]\ndeny_peers = [\"mallory\"]\n").expect("config");
    let o = zavod()
        .args(["node", "--listen", "/ip4/127.0.0.1/tcp/0", "--data-dir"])
        .arg(d("c"))
        .arg("--config")
        .arg(&bad)
        .output()
        .expect("run zavod node");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("admission.deny_peers") && stderr(&o).contains("mallory"),
        "{}",
        stderr(&o)
    );
}

/// What one silent stream of the flood got.
#[derive(Debug, Default)]
struct Flood {
    quota: usize,
    first_frame_deadline: usize,
    busy: usize,
    other: Vec<String>,
}

#[test]
fn a_strangers_flood_does_not_starve_a_members_chat() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("hostile.toml");
    std::fs::write(
        &cfg,
        "[admission]\nfirst_frame_streams = 32\nfirst_frame_timeout_ms = 1500\nmax_streams_per_peer = 8\n",
    )
    .expect("config");
    let model = model_path();
    let mut node = NodeProc::start(
        dir.path(),
        &[
            "--model",
            model.to_str().expect("utf8"),
            "--config",
            cfg.to_str().expect("utf8"),
        ],
    );
    let args = ["--prompt", "Say hello.", "--max-tokens", "8"];
    let t0 = Instant::now();
    let o = chat(dir.path(), &node.addr, &args);
    assert!(o.status.success(), "{}", stderr(&o));
    let usual = t0.elapsed();
    let rss_before = node.rss_bytes().unwrap_or(0);

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (flood, during) = rt.block_on(async {
        let (net, _ev, el) = zavod_net::new(
            identity_from_secret([66; 32]).expect("key"),
            NetConfig {
                gossip: true,
                ..Default::default()
            },
        )
        .expect("swarm");
        tokio::spawn(el.run());
        let addr: Multiaddr = node.addr.parse().expect("addr");
        let peer = net.dial(addr).await.expect("a stranger may connect");

        // Half-open TCP: sockets that connect and never speak.
        let port = node
            .addr
            .split('/')
            .nth(4)
            .and_then(|p| p.parse::<u16>().ok())
            .expect("tcp port");
        let mut half_open = Vec::new();
        for _ in 0..40 {
            if let Ok(s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                half_open.push(s);
            }
        }

        // Silent streams, far more than one peer may hold.
        let mut silent = Vec::new();
        for _ in 0..200 {
            let net = net.clone();
            silent.push(tokio::spawn(async move {
                let mut s = net.open_chat(peer).await.map_err(|e| e.to_string())?;
                match s.recv::<ServerFrame>(Duration::from_secs(15)).await {
                    Ok(Some(ServerFrame::Error(e))) => Ok(e.message),
                    other => Err(format!("{other:?}")),
                }
            }));
        }
        // Junk gossip on the capacity topic.
        for i in 0..50u8 {
            net.publish(vec![i; 64]);
        }

        // A member chats meanwhile.
        let chat_dir = dir.path().to_path_buf();
        let chat_addr = node.addr.clone();
        let t1 = Instant::now();
        let during = tokio::task::spawn_blocking(move || {
            let o = chat(&chat_dir, &chat_addr, &args);
            (o, t1.elapsed())
        });

        let mut flood = Flood::default();
        for s in silent {
            match s.await.expect("task") {
                Ok(m) if m.contains("as one peer may") => flood.quota += 1,
                Ok(m) if m.contains("no request within") => flood.first_frame_deadline += 1,
                Ok(m) if m.contains("as many streams as it allows") => flood.busy += 1,
                Ok(m) => flood.other.push(m),
                Err(e) => flood.other.push(e),
            }
        }
        drop(half_open);
        (flood, during.await.expect("chat task"))
    });

    let (o, took) = during;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        took < usual * 4 + Duration::from_secs(10),
        "a member's chat took {took:?} during the flood, {usual:?} before it"
    );
    assert!(flood.quota > 0, "{flood:?}");
    assert!(flood.first_frame_deadline > 0, "{flood:?}");
    assert!(flood.other.is_empty(), "{flood:?}");
    assert!(node.is_running());
    let rss_after = node.rss_bytes().unwrap_or(0);
    assert!(
        rss_after < rss_before + (256 << 20),
        "memory grew from {rss_before} to {rss_after} bytes"
    );
    // And it serves as before.
    let o = chat(dir.path(), &node.addr, &args);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// A stranger's Kademlia peer: stores records at the node and asks for
/// them back.
#[derive(libp2p::swarm::NetworkBehaviour)]
struct KadOnly {
    kad: libp2p::kad::Behaviour<libp2p::kad::store::MemoryStore>,
}

#[test]
fn a_strangers_kademlia_records_are_never_stored() {
    use futures::StreamExt;
    use libp2p::kad;
    use libp2p::swarm::SwarmEvent;
    let dir = tempfile::tempdir().expect("tempdir");
    let model = model_path();
    let mut node = NodeProc::start(dir.path(), &["--model", model.to_str().expect("utf8")]);
    let args = ["--prompt", "Say hello.", "--max-tokens", "8"];
    let o = chat(dir.path(), &node.addr, &args);
    assert!(o.status.success(), "{}", stderr(&o));
    let rss_before = node.rss_bytes().unwrap_or(0);
    let target: PeerId = node.peer_id.parse().expect("peer id");
    let addr: Multiaddr = node.addr.parse().expect("addr");

    const RECORDS: usize = 4_000;
    const VALUE_BYTES: usize = 12 * 1024;
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (acked, found_at_node) = rt.block_on(async {
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(
            identity_from_secret([67; 32]).expect("key"),
        )
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default(),
            libp2p::noise::Config::new,
            libp2p::yamux::Config::default,
        )
        .expect("tcp")
        .with_behaviour(|key| {
            let peer = key.public().to_peer_id();
            let cfg = kad::Config::new(libp2p::StreamProtocol::new("/zavod/kad/1"));
            KadOnly {
                kad: kad::Behaviour::with_config(peer, kad::store::MemoryStore::new(peer), cfg),
            }
        })
        .expect("behaviour")
        .build();
        swarm.behaviour_mut().kad.add_address(&target, addr.clone());
        swarm.dial(addr).expect("dial");
        // Thousands of records, 48 MB in all, put straight at the node
        // (each within Kademlia's 16 KiB message limit).
        let mut pending = 0usize;
        let mut acked = 0usize;
        let mut sent = 0usize;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        while (sent < RECORDS || pending > 0) && tokio::time::Instant::now() < deadline {
            while sent < RECORDS && pending < 64 {
                let rec =
                    kad::Record::new(format!("junk-{sent}").into_bytes(), vec![7u8; VALUE_BYTES]);
                swarm.behaviour_mut().kad.put_record_to(
                    rec,
                    std::iter::once(target),
                    kad::Quorum::One,
                );
                sent += 1;
                pending += 1;
            }
            match tokio::time::timeout(Duration::from_secs(5), swarm.select_next_some()).await {
                Ok(SwarmEvent::Behaviour(KadOnlyEvent::Kad(
                    kad::Event::OutboundQueryProgressed {
                        result: kad::QueryResult::PutRecord(r),
                        step,
                        ..
                    },
                ))) if step.last => {
                    pending -= 1;
                    if r.is_ok() {
                        acked += 1;
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        // Ask for some back: the node answers with none of them.
        let mut found_at_node = 0usize;
        for i in (0..RECORDS).step_by(200) {
            swarm
                .behaviour_mut()
                .kad
                .get_record(kad::RecordKey::new(&format!("junk-{i}")));
            let until = tokio::time::Instant::now() + Duration::from_secs(5);
            while let Ok(ev) = tokio::time::timeout_at(until, swarm.select_next_some()).await {
                if let SwarmEvent::Behaviour(KadOnlyEvent::Kad(
                    kad::Event::OutboundQueryProgressed {
                        result: kad::QueryResult::GetRecord(r),
                        step,
                        ..
                    },
                )) = ev
                {
                    if let Ok(kad::GetRecordOk::FoundRecord(p)) = r
                        && p.peer == Some(target)
                    {
                        found_at_node += 1;
                    }
                    if step.last {
                        break;
                    }
                }
            }
        }
        (acked, found_at_node)
    });
    eprintln!("{acked} of {RECORDS} records acknowledged by the node; {found_at_node} found there");
    assert!(
        acked > 0,
        "no record reached the node: the test proves nothing"
    );
    assert_eq!(found_at_node, 0, "the node stored a stranger's records");
    assert!(node.is_running());
    let rss_after = node.rss_bytes().unwrap_or(0);
    assert!(
        rss_after < rss_before + (64 << 20),
        "memory grew from {rss_before} to {rss_after} bytes under {} MB of records",
        (RECORDS * VALUE_BYTES) >> 20
    );
    let o = chat(dir.path(), &node.addr, &args);
    assert!(o.status.success(), "{}", stderr(&o));
}
