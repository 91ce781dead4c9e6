//! `tracer`: where a server's time goes, measured in the kernel.
//!
//! The pipeline: `probes` (load and attach the kernel programs) → `events` (decode the
//! ring buffer) → `timeline` (per-connection phases) → `stats` (histograms, counters) →
//! `report` (text or JSON). `run` wires them together.

mod btf;
mod cgroups;
mod checks;
mod cli;
mod command;
mod compat;
mod doctor;
mod endpoints;
mod events;
mod labels;
mod listeners;
mod metrics;
mod offsets;
mod probes;
mod procs;
mod report;
mod run;
mod sockets;
mod stats;
mod timeline;
mod tls;
mod upstream;

use std::io::{self, Write as _};

use clap::Parser as _;

/// Exit status for a usage or set-up error.
const EXIT_SETUP: i32 = 2;

fn main() {
    // `tracer doctor` stands apart from the tracing options.
    if std::env::args().nth(1).as_deref() == Some("doctor") {
        env_logger::Builder::new().filter_level(log::LevelFilter::Error).init();
        // Options as for tracing: `--skip-hook-kind KIND[,KIND]` and the hidden
        // `--disable-hook PROGRAM` (both repeatable).
        let rest: Vec<String> = std::env::args()
            .skip(2)
            .flat_map(|a| match a.split_once('=') {
                Some((flag, value)) if flag.starts_with("--") => vec![flag.to_owned(), value.to_owned()],
                _ => vec![a],
            })
            .collect();
        let mut disabled = Vec::new();
        let mut skip_kinds = Vec::new();
        let mut i = 0;
        while i < rest.len() {
            match (rest[i].as_str(), rest.get(i + 1)) {
                ("--disable-hook", Some(program)) => disabled.push(program.clone()),
                ("--skip-hook-kind", Some(kinds)) => {
                    for kind in kinds.split(',') {
                        match kind.parse::<compat::Kind>() {
                            Ok(kind) => skip_kinds.push(kind),
                            Err(e) => {
                                let _ = writeln!(io::stderr(), "tracer doctor: {e}");
                                std::process::exit(EXIT_SETUP);
                            }
                        }
                    }
                }
                (other, _) => {
                    let _ = writeln!(io::stderr(), "tracer doctor: unexpected argument '{other}'");
                    std::process::exit(EXIT_SETUP);
                }
            }
            i += 2;
        }
        let code = match doctor::run(disabled, skip_kinds) {
            Ok(code) => code,
            Err(err) => {
                let _ = writeln!(io::stderr(), "tracer: error: {err:#}");
                EXIT_SETUP
            }
        };
        std::process::exit(code);
    }
    let args = cli::Args::parse();
    let level = match args.verbose {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        _ => log::LevelFilter::Debug,
    };
    env_logger::Builder::new().filter_level(level).format_timestamp(None).format_target(false).init();
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
