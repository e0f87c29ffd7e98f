//! The `paxwasm` command line. Each subcommand lives in its own module and owns
//! its arguments; this file only dispatches.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "paxwasm", version, about = "Replicated WebAssembly applications over Multi-Paxos")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {}
}
