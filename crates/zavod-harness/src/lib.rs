//! Runs `zavod node` as a child process: the one harness the multi-process
//! tests (`tests/`) and the benchmarks (`zavod-bench`) start nodes with.
//!
//! A node is ready when it prints `ready:` on stdout; before that it prints
//! its peer id, its listen addresses and, with `--http`, where its OpenAI
//! API is. The harness reads those lines, keeps draining stdout so the node
//! never blocks on a full pipe, and kills the node when dropped.
//!
//! Invariants: a [`NodeProc`] never outlives its process handle (dropping it
//! kills and reaps the child); waiting for readiness is bounded by the
//! caller's timeout.

#![warn(unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Why a node could not be started.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("could not start {what}: {source}")]
    Spawn {
        what: String,
        source: std::io::Error,
    },
    #[error(
        "the node exited, or did not become ready within {secs} s; its stdout so far: {stdout:#?}"
    )]
    NotReady { secs: u64, stdout: Vec<String> },
    #[error("the node became ready without saying {what}; its stdout: {stdout:#?}")]
    Incomplete {
        what: &'static str,
        stdout: Vec<String>,
    },
}

/// A command running `exe` (inside network namespace `netns`, when given)
/// with none of the caller's `ZAVOD_*` variables, so only what the caller
/// passes configures the node.
pub fn clean_command(exe: &Path, netns: Option<&str>) -> Command {
    let mut c = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    for (k, _) in std::env::vars_os() {
        if k.to_str().is_some_and(|k| k.starts_with("ZAVOD_")) {
            c.env_remove(k);
        }
    }
    c
}

/// A port free on loopback now (a later bind may still race; the server
/// then fails to start and says so).
pub fn free_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// A running `zavod node`; killed on drop.
#[derive(Debug)]
pub struct NodeProc {
    child: Child,
    pub data_dir: PathBuf,
    /// First listen address (TCP preferred), with /p2p/PEER_ID.
    pub addr: String,
    pub peer_id: String,
    /// What the node printed up to and including its `ready:` line.
    pub stdout: Vec<String>,
    /// `http://HOST:PORT` of the OpenAI API, when started with --http.
    pub http: Option<String>,
}

impl NodeProc {
    /// Spawns `cmd` (a `zavod node …` command; its stderr is the caller's
    /// choice) and waits up to `timeout` for the node to say it is ready.
    pub fn spawn(
        mut cmd: Command,
        data_dir: &Path,
        timeout: Duration,
    ) -> Result<NodeProc, HarnessError> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|source| HarnessError::Spawn {
                what: format!("{cmd:?}"),
                source,
            })?;
        let Some(out) = child.stdout.take() else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(HarnessError::Incomplete {
                what: "anything (no stdout)",
                stdout: vec![],
            });
        };
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut node = NodeProc {
            child,
            data_dir: data_dir.to_path_buf(),
            addr: String::new(),
            peer_id: String::new(),
            stdout: Vec::new(),
            http: None,
        };
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    let ready = line.starts_with("ready:");
                    node.stdout.push(line);
                    if ready {
                        break;
                    }
                }
                // Dropping `node` kills the child.
                Err(_) => {
                    return Err(HarnessError::NotReady {
                        secs: timeout.as_secs(),
                        stdout: std::mem::take(&mut node.stdout),
                    });
                }
            }
        }
        // Keep draining stdout so the node never blocks on a full pipe.
        std::thread::spawn(move || while rx.recv().is_ok() {});
        let lines = &node.stdout;
        // Prefer TCP: listeners report in no fixed order.
        let listening: Vec<&str> = lines
            .iter()
            .filter_map(|l| l.strip_prefix("listening on "))
            .collect();
        let addr = listening
            .iter()
            .find(|a| a.contains("/tcp/"))
            .or(listening.first())
            .map(|a| a.to_string());
        let peer_id = lines
            .iter()
            .find_map(|l| l.strip_prefix("peer id: "))
            .map(str::to_string);
        node.http = lines.iter().find_map(|l| {
            l.strip_prefix("http api on ")
                .and_then(|r| r.split_once("/v1"))
                .map(|(base, _)| base.to_string())
        });
        match (addr, peer_id) {
            (Some(a), Some(p)) => {
                node.addr = a;
                node.peer_id = p;
                Ok(node)
            }
            (None, _) => Err(HarnessError::Incomplete {
                what: "where it listens",
                stdout: std::mem::take(&mut node.stdout),
            }),
            (_, None) => Err(HarnessError::Incomplete {
                what: "its peer id",
                stdout: std::mem::take(&mut node.stdout),
            }),
        }
    }

    /// The node's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Asks the node to stop (SIGTERM), waits up to 10 s for it to exit,
    /// then kills it.
    pub fn stop(mut self) -> std::io::Result<ExitStatus> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        self.child.wait()
    }

    /// Kills the node at once (SIGKILL), as a crash would.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The node's resident memory, from /proc (Linux).
    pub fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())?;
        Some(kb * 1024)
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
