//! The `zavod` command: run a node, chat with the mesh, benchmark.
//!
//! Thin on purpose: flags become a config or a request and the work is done
//! by zavod-node. Exit codes: 0 success (and a closed stdout pipe), 1 a
//! runtime failure, 2 misuse of the command line.

mod chat;
mod cli;
mod memory;
mod mesh;
mod model;
mod node;
mod output;
mod revoke;
mod status;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    output::init_logging(&cli.log_format);
    let result = match cli.command {
        cli::Command::Node(args) => node::run(args),
        cli::Command::Chat(args) => chat::run(args),
        cli::Command::Bench(args) => zavod_bench::run(args),
        cli::Command::Status(args) => status::run(args),
        cli::Command::Mesh(cmd) => mesh::run_mesh(cmd),
        cli::Command::Cap(cmd) => mesh::run_cap(cmd),
        cli::Command::Model(cmd) => model::run(cmd),
        cli::Command::Memory(cmd) => memory::run(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if output::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
