//! `tracer`: where a server's time goes, measured in the kernel.
//!
//! The pipeline: `probes` (load and attach the kernel programs) → `events` (decode the
//! ring buffer) → `timeline` (per-connection phases) → `stats` (histograms, counters) →
//! `report` (text or JSON). `run` wires them together.

mod btf;
mod checks;
mod cli;
mod command;
mod events;
mod listeners;
mod offsets;
mod probes;
mod procs;
mod report;
mod run;
mod sockets;
mod stats;
mod timeline;
mod upstream;

use std::io::{self, Write as _};

use clap::Parser as _;

/// Exit status for a usage or set-up error.
const EXIT_SETUP: i32 = 2;

fn main() {
    let args = cli::Args::parse();
    let level = match args.verbose {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        _ => log::LevelFilter::Debug,
    };
    env_logger::Builder::new()
        .filter_level(level)
        .format_timestamp(None)
        .format_target(false)
        .init();
    let code = match run::run(args) {
        Ok(code) => code,
        Err(err) if run::is_broken_pipe(&err) => 0,
        Err(err) => {
            let _ = writeln!(io::stderr(), "tracer: error: {err:#}");
            EXIT_SETUP
        }
    };
    std::process::exit(code);
}
