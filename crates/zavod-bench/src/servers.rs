//! The servers a workload bench runs against, as child processes killed on
//! drop: a `zavod node` serving the OpenAI API, and llama.cpp's own
//! `llama-server` on the same model, threads, slots and context.

use super::workload::Endpoint;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A server of a workload bench, killed on drop: a zavod node (through the
/// harness the tests use) or llama-server.
pub(crate) enum Proc {
    Node(zavod_harness::NodeProc),
    Server(Child),
}

impl Drop for Proc {
    fn drop(&mut self) {
        // A node kills itself on drop.
        if let Proc::Server(c) = self {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Proc {
    pub(crate) fn exited(&mut self) -> bool {
        match self {
            Proc::Node(n) => !n.is_running(),
            Proc::Server(c) => matches!(c.try_wait(), Ok(Some(_))),
        }
    }
}

/// Where llama-server is: `path` if given, else `$LLAMA_SERVER`, else
/// where `scripts/build-llama-server.sh` puts it.
pub(crate) fn find_llama_server(path: Option<&Path>) -> Result<PathBuf> {
    let candidates: Vec<PathBuf> = match path {
        Some(p) => vec![p.to_path_buf()],
        None => std::env::var_os("LLAMA_SERVER")
            .map(PathBuf::from)
            .into_iter()
            .chain([PathBuf::from("target/llama-server/bin/llama-server")])
            .collect(),
    };
    candidates.into_iter().find(|p| p.is_file()).context(
        "llama-server not found: build it with scripts/build-llama-server.sh (about 10 minutes), \
         or name it with --llama-server PATH or LLAMA_SERVER; or pass --zavod-only",
    )
}

/// Waits until `GET url` answers 200 (or the process exits).
async fn wait_healthy(
    http: &reqwest::Client,
    url: &str,
    proc: &mut Proc,
    what: &str,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if proc.exited() {
            bail!("{what} exited while starting");
        }
        if let Ok(r) = http.get(url).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what} did not become ready within 180 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What every server in a workload bench runs with.
#[derive(Debug, Clone)]
pub(crate) struct Shape {
    pub model: PathBuf,
    pub threads: u32,
    pub slots: u32,
    pub context_tokens: u32,
}

pub(crate) async fn start_llama_server(
    http: &reqwest::Client,
    exe: &Path,
    shape: &Shape,
) -> Result<(Proc, Endpoint)> {
    let port = zavod_harness::free_port().context("finding a free port")?;
    let child = Command::new(exe)
        .arg("-m")
        .arg(&shape.model)
        .args(["-t", &shape.threads.to_string()])
        .args(["-tb", &shape.threads.to_string()])
        .args(["-np", &shape.slots.to_string()])
        .args([
            "-c",
            &(shape.slots * shape.context_tokens).to_string(),
            "--no-webui",
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    let mut proc = Proc::Server(child);
    let base = format!("http://127.0.0.1:{port}");
    wait_healthy(http, &format!("{base}/health"), &mut proc, "llama-server").await?;
    let model = zavod_engine::model_name_from_path(&shape.model);
    Ok((
        proc,
        Endpoint {
            name: "llama-server".into(),
            base,
            model,
            bearer: None,
        },
    ))
}

/// A `zavod node` with the model and the OpenAI API on a free port; `extra`
/// adds flags (e.g. `--prompt-cache false`).
pub(crate) async fn start_zavod(
    http: &reqwest::Client,
    exe: &Path,
    data_dir: &Path,
    shape: &Shape,
    extra: &[String],
) -> Result<(Proc, Endpoint)> {
    let mut flags: Vec<String> = vec![
        "--model".into(),
        shape.model.display().to_string(),
        "--threads".into(),
        shape.threads.to_string(),
        "--slots".into(),
        shape.slots.to_string(),
        "--context-tokens".into(),
        shape.context_tokens.to_string(),
        "--http".into(),
        "127.0.0.1:0".into(),
    ];
    flags.extend(extra.iter().cloned());
    let node = crate::start_node(exe, data_dir, &flags)?;
    let base = node
        .http
        .clone()
        .context("the zavod node did not say where its HTTP API is")?;
    let mut proc = Proc::Node(node);
    wait_healthy(http, &format!("{base}/readyz"), &mut proc, "zavod node").await?;
    let bearer = issue_token(exe, data_dir)?;
    Ok((
        proc,
        Endpoint {
            name: "zavod".into(),
            base,
            model: zavod_engine::model_name_from_path(&shape.model),
            bearer: Some(bearer),
        },
    ))
}

/// A capability token from the node's local authority.
pub(crate) fn issue_token(exe: &Path, data_dir: &Path) -> Result<String> {
    let out = Command::new(exe)
        .args([
            "cap",
            "issue",
            "--models",
            "*",
            "--max-tokens",
            "1000000000",
            "--ttl",
            "7d",
        ])
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .context("zavod cap issue")?;
    if !out.status.success() {
        bail!(
            "zavod cap issue failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}
