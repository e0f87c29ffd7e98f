//! The `paxwasm` command line. Each subcommand lives in its own module and owns
//! its arguments; this file only dispatches.

pub mod bench;
pub mod client;
pub mod dev;
pub mod members;
pub mod node;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod exec;
pub mod sim;

#[derive(Debug, Parser)]
#[command(
    name = "paxwasm",
    version,
    about = "Replicated WebAssembly applications over Multi-Paxos"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Deploy(client::DeployArgs),
    Submit(client::SubmitArgs),
    Query(client::QueryArgs),
    Status(client::StatusArgs),
    Bench(bench::BenchArgs),
    /// Run the deterministic cluster simulator over many seeds.
    Sim(sim::SimArgs),
    /// Run a guest module locally: apply commands, run queries, print the state hash.
    Exec(exec::ExecArgs),
    /// Run one replica.
    Node(node::NodeArgs),
    /// Run a local cluster of replicas on loopback.
    Dev(dev::DevArgs),
    /// List the cluster's members, add, promote or remove one, or set the voters in one step.
    Members(members::MembersArgs),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Deploy(args) => client::deploy(args),
        Command::Submit(args) => client::submit(args),
        Command::Query(args) => client::query(args),
        Command::Status(args) => client::status(args),
        Command::Bench(args) => bench::bench(args),
        Command::Sim(args) => sim::run(args),
        Command::Exec(args) => exec::run(args),
        Command::Node(args) => node::run(args),
        Command::Dev(args) => dev::run(args),
        Command::Members(args) => members::members(args),
    }
}
