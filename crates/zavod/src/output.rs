//! Logging setup and stdout helpers.

use crate::cli::LogFormat;
use tracing_subscriber::EnvFilter;

/// Default filter: our crates at info, dependencies (llama.cpp included) at warn.
const DEFAULT_FILTER: &str = "warn,llama-cpp-2=error,libp2p_kad=error,zavod=info,zavod_node=info,zavod_net=info,zavod_engine=info,zavod_store=info";

pub fn init_logging(format: &LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
