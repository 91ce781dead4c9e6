//! `cargo xtask demo`: the tracer on the lab. Four lab servers each show one fault (slow
//! think, a stalled response body, a slow accept loop, a balancer with one slow backend
//! of two); the tracer attaches to all four, the lab client drives traffic, and the
//! report shows which phase each server loses its time in and which upstream peer the
//! balancer waits on. With `--pid`, the tracer attaches to that process instead.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};

use crate::{cargo, exec, is_root, setup, workspace_root, Killed};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Trace this running process instead of the lab (repeatable).
    #[arg(long)]
    pub pid: Vec<u32>,
    /// More tracer options, after `--`.
    #[arg(last = true)]
    pub tracer_args: Vec<String>,
}

fn bin(name: &str) -> std::path::PathBuf {
    workspace_root().join("target/debug").join(name)
}

fn lab_server(args: &[&str]) -> Result<(Killed, String)> {
    let mut child = Command::new(bin("lab")).arg("server").args(args).stdout(Stdio::piped()).spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
    let addr = line.trim().strip_prefix("listening on ").context("lab server did not start")?.to_owned();
    Ok((Killed(child), addr))
}

fn lab_client(addr: &str, args: &[&str]) -> Result<()> {
    exec(Command::new(bin("lab")).args(["client", "--server", addr]).args(args).stdout(Stdio::null()))
}

pub fn run(opts: &Options) -> Result<()> {
    setup::run()?;
    exec(cargo().args(["build", "--package", "tracer", "--package", "tracer-tests", "--bins"]))?;
    if !is_root() {
        bail!("the tracer loads eBPF programs: run `cargo xtask demo` as root (or grant CAP_BPF and CAP_PERFMON)");
    }
    if !opts.pid.is_empty() {
        let mut cmd = Command::new(bin("tracer"));
        for pid in &opts.pid {
            cmd.args(["--pid", &pid.to_string()]);
        }
        return exec(cmd.args(&opts.tracer_args));
    }

    let (think, think_addr) = lab_server(&["--scenario", "slow-think", "--delay-ms", "40"])?;
    let (stall, stall_addr) = lab_server(&["--scenario", "body-stall", "--delay-ms", "120"])?;
    let (accept, accept_addr) = lab_server(&["--scenario", "slow-accept", "--delay-ms", "25"])?;
    let (_fast, fast_addr) = lab_server(&[])?;
    let (_slow, slow_addr) = lab_server(&["--scenario", "slow-think", "--delay-ms", "30"])?;
    let (balancer, balancer_addr) =
        lab_server(&["--scenario", "balancer", "--backend", &fast_addr, "--backend", &slow_addr])?;
    let (shop, shop_addr) = lab_server(&["--scenario", "shop"])?;
    println!("lab: slow-think (40 ms) on {think_addr}, body-stall (120 ms) on {stall_addr}, slow-accept (25 ms) on {accept_addr}");
    println!("lab: balancer on {balancer_addr} over {fast_addr} and {slow_addr} (30 ms slower)");
    println!("lab: shop on {shop_addr}: a client fetching the whole /products list (1.5 MB) to filter it itself");

    // Labels on: the report says which endpoint spends the time.
    let mut tracer = Command::new(bin("tracer"));
    tracer.arg("--labels");
    for server in [&think, &stall, &accept, &balancer, &shop] {
        tracer.args(["--pid", &server.0.id().to_string()]);
    }
    let mut tracer = Killed(tracer.args(&opts.tracer_args).stderr(Stdio::piped()).spawn()?);
    let stderr = tracer.0.stderr.take().expect("piped");
    let mut lines = BufReader::new(stderr).lines();
    loop {
        let line = lines.next().context("the tracer exited before attaching")??;
        eprintln!("{line}");
        if line.starts_with("tracer: tracing") {
            break;
        }
    }
    thread::spawn(move || lines.map_while(Result::ok).for_each(|l| eprintln!("{l}")));

    println!("lab: driving traffic (about 5 s)…");
    let clients = [
        (think_addr.clone(), vec!["--connections", "4", "--requests", "10", "--parallel"]),
        (stall_addr.clone(), vec!["--connections", "2", "--requests", "8", "--parallel"]),
        (accept_addr.clone(), vec!["--connections", "30", "--parallel"]),
        (balancer_addr.clone(), vec!["--connections", "2", "--requests", "10", "--parallel"]),
        (
            shop_addr.clone(),
            vec![
                "--connections",
                "2",
                "--parallel",
                "--read-delay-ms",
                "50",
                "--path",
                "/products",
                "--path",
                "/productTypes",
                "--path",
                "/products/7",
                "--path",
                "/products",
                "--path",
                "/products/12",
                "--path",
                "/productTypes",
                "--path",
                "/basket",
            ],
        ),
    ];
    let handles: Vec<_> =
        clients.into_iter().map(|(addr, args)| thread::spawn(move || lab_client(&addr, &args))).collect();
    for h in handles {
        h.join().expect("client thread")?;
    }
    thread::sleep(Duration::from_millis(300));
    unsafe { libc::kill(tracer.0.id() as i32, libc::SIGINT) };
    let status = tracer.0.wait()?;
    if !status.success() {
        bail!("the tracer failed: {status}");
    }
    Ok(())
}
