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
    /// Drive a server; prints one line per connection with its byte counts (with --path,
    /// each followed by one `exchange …` line per request).
    Client(client::ClientOptions),
    /// Opens many connections (one request each), holds them until a line arrives on
    /// stdin, then closes them.
    Hold(tracer_tests::hold::HoldOptions),
    /// A reader thread handing requests to a pool of workers that call backends; prints
    /// its own times when a line arrives on stdin.
    HandOff(tracer_tests::handoff::HandOffOptions),
    /// Waits for a line on stdin, then connects to each address in turn (giving up after
    /// --timeout-ms) and prints how each attempt ended.
    Connect {
        #[arg(long, default_value_t = 3500)]
        timeout_ms: u64,
        addrs: Vec<std::net::SocketAddr>,
    },
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
                if !opts.paths.is_empty() {
                    for e in &r.exchanges {
                        println!(
                            "exchange port={} target={} status={} sent={} received={}",
                            r.local_port, e.target, e.status, e.bytes_sent, e.bytes_received
                        );
                    }
                }
            }
            Ok(())
        }
        Command::Hold(opts) => tracer_tests::hold::run(&opts),
        Command::HandOff(opts) => tracer_tests::handoff::run(opts),
        Command::Connect { timeout_ms, addrs } => {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
            for addr in addrs {
                let start = std::time::Instant::now();
                let outcome =
                    match std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(timeout_ms)) {
                        Ok(_) => "established".to_owned(),
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => "refused".to_owned(),
                        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => "gave_up".to_owned(),
                        Err(e) => format!("error:{e}"),
                    };
                println!("addr={addr} outcome={outcome} elapsed_ms={:.0}", start.elapsed().as_secs_f64() * 1e3);
            }
            Ok(())
        }
    }
}
