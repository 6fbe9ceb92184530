//! `zavod node`.

use crate::cli::NodeArgs;
use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::time::Instant;
use zavod_node::node::{llama_config, load_llama};
use zavod_node::{Node, NodeConfig, Overrides, StartOptions};

pub fn run(args: NodeArgs) -> Result<()> {
    let mut config = NodeConfig::load(args.config.as_deref())?;
    config.apply(Overrides {
        listen: (!args.listen.is_empty())
            .then(|| args.listen.iter().map(ToString::to_string).collect()),
        bootstrap: args.bootstrap.iter().map(ToString::to_string).collect(),
        data_dir: args.data_dir,
        model: args.model,
        models_dir: args.models_dir,
        quant: args.quant,
        assume_free_memory_mib: args.assume_free_memory_mib,
        gpu_layers: args.gpu_layers,
        slots: args.slots,
        batch_tokens: args.batch_tokens,
        prompt_cache: args.prompt_cache,
        prompt_cache_ram_mib: args.prompt_cache_ram_mib,
        context_tokens: args.context_tokens,
        threads: args.threads,
        runtime_threads: args.runtime_threads,
        stream_interval_ms: args.stream_interval_ms,
        http: args.http,
        tailscale: args.tailscale,
        psk_file: args.psk_file,
    });
    let ticket = match &args.join {
        Some(t) => Some(
            zavod_proto::trust::JoinTicket::from_text(t)
                .map_err(|e| anyhow::anyhow!("--join: {e}"))?,
        ),
        None => None,
    };
    if let Some(t) = &ticket {
        config
            .node
            .bootstrap
            .extend(t.body.bootstrap.iter().cloned());
    }
    config.check()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(zavod_node::tuning::runtime_threads(&config))
        .enable_all()
        .build()
        .context("starting the async runtime")?;

    // One node per data directory, taken before any key is read.
    let _lock = zavod_node::datadir::lock_dir(&config.data_dir())?;
    let (identity, report) = match &ticket {
        None => Node::open_identity(&config)?,
        Some(t) => {
            let now = zavod_node::clock::now_ms();
            let (mut identity, report) =
                zavod_node::datadir::NodeIdentity::open_for_join(&config.data_dir(), now)?;
            let member_of_it = identity.authorities.contains(&t.signer)
                && identity
                    .membership
                    .as_ref()
                    .is_some_and(|m| m.verify(&identity.authorities, now).is_ok());
            if identity.is_authority() && !identity.authorities.contains(&t.signer) {
                anyhow::bail!(
                    "{} already holds its own mesh; use a fresh --data-dir to join another",
                    identity.dir.display()
                );
            }
            if !member_of_it {
                println!("joining the mesh of authority {} ...", t.signer.short());
                rt.block_on(zavod_node::node::join_mesh(
                    &mut identity,
                    t,
                    &config.limits,
                    config.mesh_key()?,
                ))?;
                println!("joined: membership signed by {}", t.signer.short());
            }
            (identity, report)
        }
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "zavod node {}", env!("CARGO_PKG_VERSION"))?;
    writeln!(out, "data dir: {}", identity.dir.display())?;
    if report.created_authority {
        writeln!(
            out,
            "created a local mesh authority {}",
            identity
                .authorities
                .iter()
                .next()
                .map(|a| a.short())
                .unwrap_or_default()
        )?;
    }
    if let Some(p) = &report.created_client_credential {
        writeln!(
            out,
            "wrote a chat credential for this machine's user: {}",
            p.display()
        )?;
    }
    let peer_id = zavod_net::peer_id_of(&identity.id()).context("node key is not ed25519")?;
    writeln!(out, "peer id: {peer_id}")?;
    if let (Some(path), Some(key)) = (&config.node.psk_file, config.mesh_key()?) {
        writeln!(
            out,
            "private mesh: key {} (fingerprint {}); QUIC is off, as the key covers TCP only",
            path.display(),
            key.fingerprint()
        )?;
    }
    out.flush()?;
    drop(out);

    let selections = zavod_node::model_choice::select(&config)?;
    if selections.is_empty() {
        println!("no model given: this node only routes (pass --model PATH to serve one)");
    }
    let mut models = Vec::with_capacity(selections.len());
    for sel in selections {
        if sel.files > 1 || config.model.quant.is_some() {
            println!(
                "model {}: chose {} of {} files, {}",
                sel.name,
                sel.path.display(),
                sel.files,
                sel.reason
            );
        }
        let lcfg = llama_config(&config, &sel);
        let bar = ProgressBar::new(100).with_message(format!("loading {}", sel.name));
        bar.set_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {percent}%")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        let t0 = Instant::now();
        let b = bar.clone();
        let loaded = load_llama(&lcfg, Some(sel), move |p| {
            b.set_position((p * 100.0) as u64)
        });
        bar.finish_and_clear();
        let loaded = loaded?;
        let offer = loaded.offer();
        println!(
            "model {} ({}, {}) loaded in {:.1} s: {} slots x {} context tokens, {} threads{}",
            offer.name,
            offer.quant,
            zavod_proto::mesh::tiers::tier_of(&offer.quant).map_or("no tier", |t| t.name()),
            t0.elapsed().as_secs_f64(),
            lcfg.slots,
            lcfg.context_tokens_per_seq,
            lcfg.effective_threads(),
            if lcfg.gpu_layers > 0 {
                format!(", {} layers on the GPU", lcfg.gpu_layers)
            } else {
                String::new()
            }
        );
        models.push(loaded);
    }

    rt.block_on(async move {
        let node = Node::start(StartOptions {
            config,
            identity,
            models,
        })
        .await?;
        let addrs = node.listen_addrs().await?;
        for a in &addrs {
            println!("listening on {a}");
        }
        match (node.http_addr(), node.metrics_addr()) {
            (Some(h), Some(m)) => {
                println!("http api on http://{h}/v1 (metrics on http://{m}/metrics)")
            }
            (Some(h), None) => println!("http api on http://{h}/v1"),
            (None, Some(m)) => println!("metrics on http://{m}/metrics"),
            (None, None) => {}
        }
        let first = addrs.first().map(ToString::to_string).unwrap_or_default();
        // The handlers are installed before `ready:` is printed: a signal
        // sent the moment a supervisor sees it must stop the node cleanly,
        // not meet the default action and kill it.
        let shutdown = ShutdownSignal::install()?;
        println!("ready: chat with `zavod chat --peer {first}`");
        std::io::stdout().flush()?;
        shutdown.wait().await;
        println!("shutting down");
        node.shutdown().await?;
        Ok(())
    })
}

/// SIGINT or SIGTERM, listened for from the moment it is installed.
struct ShutdownSignal {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignal {
    fn install() -> anyhow::Result<ShutdownSignal> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(ShutdownSignal {
                term: signal(SignalKind::terminate()).context("listen for SIGTERM")?,
                int: signal(SignalKind::interrupt()).context("listen for SIGINT")?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(ShutdownSignal {})
        }
    }

    async fn wait(mut self) {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.term.recv() => {}
                _ = self.int.recv() => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
