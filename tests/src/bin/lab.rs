//! The lab: `lab server …` runs a scenario, `lab client …` drives one.
use clap::{Parser, Subcommand};
use tracer_tests::{client, server};

#[derive(Parser)]
#[command(about = "Lab server and client reproducing backend latency pathologies")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a scenario; prints `listening on ADDR` when ready.
    Server(server::ServerOptions),
    /// Drive a server; prints one line per connection with its byte counts.
    Client(client::ClientOptions),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Server(opts) => server::run(opts),
        Command::Client(opts) => {
            for r in client::run(&opts)? {
                println!(
                    "port={} sent={} received={} requests={} connect_ms={:.3} elapsed_ms={:.1}",
                    r.local_port,
                    r.bytes_sent,
                    r.bytes_received,
                    r.requests,
                    r.connect.as_secs_f64() * 1e3,
                    r.elapsed.as_secs_f64() * 1e3
                );
            }
            Ok(())
        }
    }
}
