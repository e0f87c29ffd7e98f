//! `paxwasm exec MODULE.wasm [--query Q]... [CMD]...`: runs a guest module
//! locally, without a cluster. Applies each CMD in order, then runs each query,
//! printing one line per result and finally the state hash.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::machine::{EntryContext, GuestLog, Machine, MachineConfig};

#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    /// The guest module (.wasm).
    pub module: PathBuf,
    /// A read-only query to run after all commands (repeatable).
    #[arg(long = "query", value_name = "Q")]
    pub queries: Vec<String>,
    /// Commands to apply, in order.
    #[arg(value_name = "CMD")]
    pub commands: Vec<String>,
}

pub fn run(args: ExecArgs) -> ExitCode {
    let bytes = match std::fs::read(&args.module) {
        Ok(bytes) => bytes,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", args.module.display());
            return ExitCode::FAILURE;
        }
    };
    let config = MachineConfig {
        guest_log: GuestLog::Stderr,
        ..MachineConfig::default()
    };
    let mut machine = match Machine::load(&bytes, &config) {
        Ok(machine) => machine,
        Err(e) => {
            eprintln!("error: {}: {e}", args.module.display());
            return ExitCode::FAILURE;
        }
    };
    for lines in exec_lines(&mut machine, &args.commands, &args.queries) {
        println!("{lines}");
    }
    ExitCode::SUCCESS
}

/// The output lines of `exec` for a loaded machine: one per command, one per
/// query, then `state sha256:<hex>`. Every command gets entry time 0 and
/// seed 0, so runs are reproducible.
pub fn exec_lines(machine: &mut Machine, commands: &[String], queries: &[String]) -> Vec<String> {
    let mut lines = Vec::new();
    for command in commands {
        lines.push(
            match machine.apply(command.as_bytes(), EntryContext::default()) {
                Ok(out) => String::from_utf8_lossy(&out).into_owned(),
                Err(e) => format!("error: {e}"),
            },
        );
    }
    for query in queries {
        lines.push(match machine.query(query.as_bytes()) {
            Ok(out) => String::from_utf8_lossy(&out).into_owned(),
            Err(e) => format!("error: {e}"),
        });
    }
    lines.push(format!("state {}", machine.state_hash_hex()));
    lines
}
