//! Helpers for the multi-process tests: find the built `zavod` binary and
//! the development model, start nodes as child processes on loopback and
//! wait for them to be ready, run `zavod chat`.
//!
//! Build first: `cargo build --release -p zavod` (scripts/test.sh does).

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How long a node may take to load the model and listen.
pub const READY_TIMEOUT: Duration = Duration::from_secs(90);

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The `zavod` binary of the same profile as this test.
pub fn zavod_bin() -> PathBuf {
    // target/<profile>/deps/<test> -> target/<profile>/zavod
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile directory");
    let bin = dir.join("zavod");
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build --release -p zavod` (scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// The development model, fetched by scripts/setup.sh.
pub fn model_path() -> PathBuf {
    let p = workspace_root().join("models/gemma-3-270m-q4_k_m.gguf");
    assert!(
        p.exists(),
        "{} is missing: run scripts/setup.sh",
        p.display()
    );
    p
}

/// The chat model (SmolLM2 135M Instruct), fetched by scripts/setup.sh.
pub fn chat_model_path() -> PathBuf {
    let p = workspace_root().join("models/smollm2-135m-instruct-q4_1.gguf");
    assert!(
        p.exists(),
        "{} is missing: run scripts/setup.sh",
        p.display()
    );
    p
}

/// A `zavod` command with a clean environment of our variables.
pub fn zavod() -> Command {
    zavod_in(None)
}

/// A `zavod` command run inside network namespace `netns`, when given.
pub fn zavod_in(netns: Option<&str>) -> Command {
    let mut c = zavod_harness::clean_command(&zavod_bin(), netns);
    // ZAVOD_TEST_LOG sets the nodes' log filter when a test needs looking into.
    let filter =
        std::env::var("ZAVOD_TEST_LOG").unwrap_or_else(|_| "warn,llama-cpp-2=error".into());
    c.env("RUST_LOG", filter);
    c
}

/// A running `zavod node` (the harness the benchmarks use too); killed on
/// drop. Its fields (`addr`, `peer_id`, `http`, `stdout`, `data_dir`) are
/// the harness's.
pub struct NodeProc(zavod_harness::NodeProc);

impl std::ops::Deref for NodeProc {
    type Target = zavod_harness::NodeProc;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for NodeProc {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl NodeProc {
    /// Starts a node on an ephemeral loopback port, waits for "ready".
    pub fn start(data_dir: &Path, extra: &[&str]) -> NodeProc {
        Self::start_in(None, "/ip4/127.0.0.1/tcp/0", data_dir, extra)
    }

    /// Starts a node inside network namespace `netns` listening on `listen`.
    pub fn start_in(
        netns: Option<&str>,
        listen: &str,
        data_dir: &Path,
        extra: &[&str],
    ) -> NodeProc {
        Self::start_with_env(netns, listen, data_dir, extra, &[])
    }

    /// As [`NodeProc::start_in`], with environment variables set for the
    /// node (e.g. `ZAVOD_TAILSCALE_BIN`).
    pub fn start_with_env(
        netns: Option<&str>,
        listen: &str,
        data_dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> NodeProc {
        let mut cmd = zavod_in(netns);
        cmd.envs(env.iter().copied());
        cmd.arg("node")
            .arg("--listen")
            .arg(listen)
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .stderr(Stdio::inherit());
        match zavod_harness::NodeProc::spawn(cmd, data_dir, READY_TIMEOUT) {
            Ok(n) => NodeProc(n),
            Err(e) => panic!("{e}"),
        }
    }

    /// Starts a node whose data directory is a tmpfs of `size_mib` MiB in a
    /// mount namespace of its own, so a test can fill its disk; from
    /// outside, the directory is `/proc/PID/root` followed by `data_dir`
    /// ([`NodeProc::data_view`]). `None` where mount namespaces cannot be
    /// made (not root, no `unshare`).
    pub fn start_on_tmpfs(data_dir: &Path, size_mib: u32, extra: &[&str]) -> Option<NodeProc> {
        let can = Command::new("unshare")
            .args(["-m", "true"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !can || std::fs::create_dir_all(data_dir).is_err() {
            return None;
        }
        let mut cmd = zavod_harness::clean_command(Path::new("unshare"), None);
        let filter =
            std::env::var("ZAVOD_TEST_LOG").unwrap_or_else(|_| "warn,llama-cpp-2=error".into());
        cmd.env("RUST_LOG", filter)
            .args(["-m", "--propagation", "private", "sh", "-c"])
            .arg("mount -t tmpfs -o \"size=$1m,mode=0700\" zavod-test \"$2\" && shift 2 && exec \"$@\"")
            .arg("sh")
            .arg(size_mib.to_string())
            .arg(data_dir)
            .arg(zavod_bin())
            .args(["node", "--listen", "/ip4/127.0.0.1/tcp/0", "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .stderr(Stdio::inherit());
        match zavod_harness::NodeProc::spawn(cmd, data_dir, READY_TIMEOUT) {
            Ok(n) => Some(NodeProc(n)),
            Err(e) => panic!("{e}"),
        }
    }

    /// The node's data directory as this process reaches it (through the
    /// node's own mount namespace, for [`NodeProc::start_on_tmpfs`]).
    pub fn data_view(&self) -> PathBuf {
        let inside = self.0.data_dir.to_string_lossy().into_owned();
        PathBuf::from(format!("/proc/{}/root{inside}", self.0.pid()))
    }

    /// Asks the node to stop (SIGTERM) and waits for it to exit.
    pub fn stop(self) -> std::process::ExitStatus {
        self.0.stop().expect("wait for the node to exit")
    }

    /// Kills the node at once (SIGKILL), as a crash would.
    pub fn kill9(self) {
        self.0.kill9()
    }
}

/// Runs `zavod chat` against `addr` and returns its output.
pub fn chat(data_dir: &Path, addr: &str, args: &[&str]) -> Output {
    chat_in(None, data_dir, addr, args)
}

/// As [`chat`], from inside network namespace `netns` when given.
pub fn chat_in(netns: Option<&str>, data_dir: &Path, addr: &str, args: &[&str]) -> Output {
    zavod_in(netns)
        .arg("chat")
        .arg("--peer")
        .arg(addr)
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run zavod chat")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `zavod mesh invite` for the mesh whose authority lives in `dir`: a
/// single-use invite, as by default.
pub fn invite(dir: &Path) -> String {
    invite_for(dir, 1)
}

/// An invite that admits `nodes` nodes (`--uses`).
pub fn invite_for(dir: &Path, nodes: u32) -> String {
    let out = zavod()
        .args(["mesh", "invite", "--uses", &nodes.to_string(), "--data-dir"])
        .arg(dir)
        .output()
        .expect("run zavod mesh invite");
    assert!(out.status.success(), "invite failed: {}", stderr(&out));
    stdout(&out).trim().to_string()
}

/// `zavod status --json` against `addr`, with the credential in `dir`.
pub fn status_json(dir: &Path, addr: &str) -> serde_json::Value {
    status_json_in(None, dir, addr)
}

/// [`status_json`] run inside network namespace `netns`, when given.
pub fn status_json_in(netns: Option<&str>, dir: &Path, addr: &str) -> serde_json::Value {
    let out = zavod_in(netns)
        .args(["status", "--json", "--peer", addr, "--data-dir"])
        .arg(dir)
        .output()
        .expect("run zavod status");
    assert!(out.status.success(), "status failed: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).expect("status JSON")
}

/// The state of `peer_id` in a status reply, if listed.
pub fn member_state(status: &serde_json::Value, peer_id: &str) -> Option<String> {
    status["members"]
        .as_array()?
        .iter()
        .find(|m| m["peer_id"] == peer_id)
        .and_then(|m| m["state"].as_str().map(String::from))
}

/// Waits until every one of `nodes` sees every one of them alive, asking
/// with the credential in `dir`. A node that sees the others may not yet
/// be seen by them, and a replica refuses reads from a node it does not
/// know as a member, so a test waits on every view, not one.
pub fn all_alive(dir: &Path, nodes: &[&NodeProc]) {
    for n in nodes {
        assert!(
            wait_until(Duration::from_secs(20), || {
                let s = status_json(dir, &n.addr);
                nodes
                    .iter()
                    .all(|m| member_state(&s, &m.peer_id).as_deref() == Some("alive"))
            })
            .is_some(),
            "all {} alive in {}'s view",
            nodes.len(),
            n.peer_id
        );
    }
}

/// Polls `f` every 100 ms until it holds or `timeout` passes; returns how
/// long it took.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = std::time::Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// The peer id a `--verbose` chat says served it (the last word on it).
pub fn served_by(o: &Output) -> Option<String> {
    let e = stderr(o);
    let at = e.rfind("[served by ")? + "[served by ".len();
    let rest = &e[at..];
    let end = rest.find([',', ':', ']'])?;
    Some(rest[..end].to_string())
}

/// A capability token (the one-line text `zavod cap issue` prints).
pub fn cap_issue(dir: &Path, extra: &[&str]) -> String {
    let o = zavod()
        .args(["cap", "issue", "--data-dir"])
        .arg(dir)
        .args(extra)
        .output()
        .expect("run zavod cap issue");
    assert!(o.status.success(), "cap issue: {}", stderr(&o));
    stdout(&o).trim().to_string()
}

/// A client with the identity in `dir`, connected to the node at `addr`
/// (for tests that play the client's part by hand).
pub async fn chat_client(dir: &Path, addr: &str) -> zavod_node::client::ChatClient {
    zavod_node::client::ChatClient::connect(
        zavod_node::datadir::ClientIdentity::load(dir, None).expect("identity"),
        addr.parse().expect("addr"),
        Default::default(),
    )
    .await
    .expect("connect")
}

/// Sends a chat to the client's entry at temperature 0 and returns the
/// redirect it answers with, and the entry stream (still open).
pub async fn ask_for_redirect(
    client: &zavod_node::client::ChatClient,
    message: &str,
    conversation: Option<zavod_proto::ids::ConversationId>,
    max_tokens: u32,
) -> (zavod_proto::wire::Redirect, zavod_net::FrameStream) {
    use zavod_proto::wire::{ChatRequest, ClientFrame, GenParams, ServerFrame};
    let mut s = client
        .net()
        .open_chat(client.peer())
        .await
        .expect("open chat");
    let req = ChatRequest {
        credential: client.identity().credential.clone(),
        model: None,
        conversation,
        message: message.into(),
        params: GenParams {
            temperature: 0.0,
            max_tokens,
            ..Default::default()
        },
        show_prompt: false,
        turn: None,
        continued: None,
    };
    s.send(&ClientFrame::Chat(Box::new(req)))
        .await
        .expect("send");
    loop {
        match s
            .recv::<ServerFrame>(Duration::from_secs(30))
            .await
            .expect("frame")
        {
            Some(ServerFrame::Accepted(_)) => {}
            Some(ServerFrame::Redirect(r)) => return (*r, s),
            other => panic!("expected a redirect, got {other:?}"),
        }
    }
}

/// Two network namespaces joined by a veth pair (two hosts on a LAN on
/// this machine): the first is 10.N.0.1, the second 10.N.0.2, each with its
/// own loopback. Removed on drop. `None` where namespaces cannot be made
/// (they need root and iproute2).
pub struct Lan {
    pub names: [String; 2],
}

impl Lan {
    pub fn new(subnet: u8) -> Option<Lan> {
        let tag = std::process::id();
        let names = [format!("zva{subnet}x{tag}"), format!("zvb{subnet}x{tag}")];
        let run = |args: &[&str]| {
            Command::new("ip")
                .args(args)
                .status()
                .is_ok_and(|s| s.success())
        };
        if !run(&["netns", "add", &names[0]]) {
            return None;
        }
        let lan = Lan { names };
        let [a, b] = &lan.names;
        let (va, vb) = (format!("zv{subnet}a"), format!("zv{subnet}b"));
        let (ip_a, ip_b) = (format!("10.{subnet}.0.1/24"), format!("10.{subnet}.0.2/24"));
        let ok = run(&["netns", "add", b])
            && run(&[
                "link", "add", &va, "netns", a, "type", "veth", "peer", "name", &vb, "netns", b,
            ])
            && run(&["-n", a, "addr", "add", &ip_a, "dev", &va])
            && run(&["-n", b, "addr", "add", &ip_b, "dev", &vb])
            && run(&["-n", a, "link", "set", &va, "up"])
            && run(&["-n", b, "link", "set", &vb, "up"])
            && run(&["-n", a, "link", "set", "lo", "up"])
            && run(&["-n", b, "link", "set", "lo", "up"]);
        ok.then_some(lan)
    }
}

/// Three or more network namespaces on one switch: host `i` (from 0) is
/// `10.SUBNET.0.(i+1)`, all joined by a bridge in a namespace of its own.
/// `None` where namespaces cannot be made (not root, no `ip`).
pub struct Switched {
    pub names: Vec<String>,
    switch: String,
    subnet: u8,
}

impl Switched {
    pub fn new(subnet: u8, hosts: usize) -> Option<Switched> {
        let tag = std::process::id();
        let run = |args: &[&str]| {
            Command::new("ip")
                .args(args)
                .status()
                .is_ok_and(|s| s.success())
        };
        let switch = format!("zvs{subnet}x{tag}");
        if !run(&["netns", "add", &switch]) {
            return None;
        }
        let mut lan = Switched {
            names: Vec::new(),
            switch,
            subnet,
        };
        let sw = lan.switch.clone();
        let mut ok = run(&["-n", &sw, "link", "add", "br0", "type", "bridge"])
            && run(&["-n", &sw, "link", "set", "br0", "up"]);
        for i in 0..hosts {
            if !ok {
                break;
            }
            let name = format!("zvh{subnet}x{i}x{tag}");
            let (host_if, port_if) = (format!("zv{subnet}h{i}"), format!("zv{subnet}p{i}"));
            let ip = format!("10.{subnet}.0.{}/24", i + 1);
            ok = run(&["netns", "add", &name]);
            if ok {
                lan.names.push(name.clone());
            }
            ok =
                ok && run(&[
                    "link", "add", &host_if, "netns", &name, "type", "veth", "peer", "name",
                    &port_if, "netns", &sw,
                ]) && run(&["-n", &sw, "link", "set", &port_if, "master", "br0"])
                    && run(&["-n", &sw, "link", "set", &port_if, "up"])
                    && run(&["-n", &name, "addr", "add", &ip, "dev", &host_if])
                    && run(&["-n", &name, "link", "set", &host_if, "up"])
                    && run(&["-n", &name, "link", "set", "lo", "up"]);
        }
        ok.then_some(lan)
    }

    /// Host `i`'s address.
    pub fn ip(subnet: u8, i: usize) -> String {
        format!("10.{subnet}.0.{}", i + 1)
    }

    /// Cuts hosts `apart` off from the others: their switch ports move to
    /// a second bridge, so each group still reaches its own members and
    /// nothing of the other group. Returns whether every step worked.
    pub fn partition(&self, apart: &[usize]) -> bool {
        let run = |args: &[&str]| {
            Command::new("ip")
                .args(["-n", &self.switch])
                .args(args)
                .status()
                .is_ok_and(|s| s.success())
        };
        let mut ok =
            run(&["link", "add", "br1", "type", "bridge"]) && run(&["link", "set", "br1", "up"]);
        for i in apart {
            ok = ok
                && run(&[
                    "link",
                    "set",
                    &format!("zv{}p{i}", self.subnet),
                    "master",
                    "br1",
                ]);
        }
        ok
    }

    /// Undoes [`Switched::partition`]: every port back on one bridge.
    pub fn heal(&self) -> bool {
        let run = |args: &[&str]| {
            Command::new("ip")
                .args(["-n", &self.switch])
                .args(args)
                .status()
                .is_ok_and(|s| s.success())
        };
        let mut ok = true;
        for i in 0..self.names.len() {
            ok = ok
                && run(&[
                    "link",
                    "set",
                    &format!("zv{}p{i}", self.subnet),
                    "master",
                    "br0",
                ]);
        }
        ok && run(&["link", "del", "br1"])
    }
}

impl Drop for Switched {
    fn drop(&mut self) {
        for n in self.names.iter().chain([&self.switch]) {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

/// The turns (role, text) of conversation `name` as node `addr` exports
/// them with `zavod memory export` (the credential in `dir`); `Err` holds
/// what the command printed when it failed.
pub fn exported_turns(dir: &Path, addr: &str, name: &str) -> Result<Vec<(String, String)>, String> {
    let o = zavod()
        .args([
            "memory",
            "export",
            "--conversation",
            name,
            "--peer",
            addr,
            "--data-dir",
        ])
        .arg(dir)
        .output()
        .expect("run zavod memory export");
    if !o.status.success() {
        return Err(stderr(&o));
    }
    Ok(stdout(&o)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| {
            let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
            (s("role"), s("text"))
        })
        .collect())
}

/// An interactive `zavod chat`, its input piped, its output read as it
/// comes.
pub struct Chat {
    child: Child,
    stdin: ChildStdin,
    out: mpsc::Receiver<Vec<u8>>,
    err: mpsc::Receiver<String>,
    pub log: Vec<String>,
}

/// What one turn showed.
pub struct Said {
    /// The answer as printed.
    pub text: String,
    /// stderr lines from the turn's sending to its report.
    pub lines: Vec<String>,
}

impl Said {
    /// The node the chat said it went on through, if it did.
    pub fn went_on_through(&self) -> Option<String> {
        self.lines.iter().rev().find_map(|l| {
            l.split("going on through ")
                .nth(1)
                .map(|r| r.trim_end_matches(']').to_string())
        })
    }

    pub fn prompt(&self) -> String {
        let all = self.lines.join("\n");
        all.split("--- prompt ---")
            .last()
            .and_then(|p| p.split("--- end of prompt ---").next())
            .unwrap_or_default()
            .to_string()
    }
}

impl Chat {
    pub fn start(dir: &Path, peers: &[&str], args: &[&str]) -> Chat {
        let mut cmd = zavod();
        cmd.arg("chat");
        for p in peers {
            cmd.args(["--peer", p]);
        }
        let mut child = cmd
            .arg("--data-dir")
            .arg(dir)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn zavod chat");
        let (err_tx, err) = mpsc::channel();
        let e = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(e).lines().map_while(Result::ok) {
                let _ = err_tx.send(line);
            }
        });
        let (out_tx, out) = mpsc::channel();
        let mut o = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            while let Ok(n) = o.read(&mut buf) {
                if n == 0 || out_tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take().expect("stdin");
        Chat {
            child,
            stdin,
            out,
            err,
            log: Vec::new(),
        }
    }

    pub fn send(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").expect("write to the chat");
        self.stdin.flush().expect("flush the chat's input");
    }

    /// The next stderr line, within `wait`.
    pub fn next_line(&mut self, wait: Duration) -> String {
        match self.err.recv_timeout(wait) {
            Ok(l) => {
                self.log.push(l.clone());
                l
            }
            Err(_) => panic!(
                "the chat said nothing more within {wait:?}:\n{}",
                self.log.join("\n")
            ),
        }
    }

    /// Reads stdout until at least `bytes` more bytes came.
    pub fn printed(&mut self, bytes: usize) -> Vec<u8> {
        let mut got = Vec::new();
        while got.len() < bytes {
            got.extend(
                self.out
                    .recv_timeout(Duration::from_secs(60))
                    .expect("the chat printed too little"),
            );
        }
        got
    }

    /// Waits for the end of the turn under way (its report), then returns
    /// what it printed after `head` and what it said on stderr.
    pub fn finish(&mut self, mut head: Vec<u8>) -> Said {
        let mut lines = Vec::new();
        loop {
            let l = self.next_line(Duration::from_secs(120));
            assert!(
                !l.starts_with("error:"),
                "the turn failed:\n{}",
                self.log.join("\n")
            );
            let done = l.starts_with("[served by ") && l.contains("prompt tokens");
            lines.push(l);
            if done {
                break;
            }
        }
        // The answer's last bytes, and a warning, may trail its report by
        // a moment.
        std::thread::sleep(Duration::from_millis(200));
        head.extend(self.out.try_iter().flatten());
        let trailing: Vec<String> = self.err.try_iter().collect();
        self.log.extend(trailing.iter().cloned());
        lines.extend(trailing);
        let text = String::from_utf8(head).expect("utf8");
        Said {
            text: text.replace("you> ", "").trim().to_string(),
            lines,
        }
    }

    pub fn say(&mut self, line: &str) -> Said {
        self.send(line);
        self.finish(Vec::new())
    }
}

impl Drop for Chat {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
