//! Project automation: `cargo xtask setup | test | demo | bench | soak | vm-test | dist`.

mod bench;
mod demo;
mod dist;
mod setup;
mod soak;
mod test;
mod vmtest;

use std::process::Command;

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Set-up, tests and demo of the tracer")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the project needs (rust-src, bpf-linker, Debian packages); idempotent.
    Setup,
    /// Set up, build everything, run the unit tests, then the privileged integration tests.
    Test(test::Options),
    /// Trace the lab servers under a mix of scenarios and print the report; with --pid,
    /// trace that process instead.
    Demo(demo::Options),
    /// Measure the tracer's overhead side by side with a packet capture, bpftrace and a
    /// proxy, then at scale; writes BENCHMARKS.md.
    Bench(bench::Options),
    /// Run the tracer as a service for a long time (metrics scraped every second, labels
    /// on, a steady rate of short connections) and record its memory; writes its section
    /// of BENCHMARKS.md.
    Soak(soak::Options),
    /// Boot Debian's 5.10, 6.1 and 6.12 kernels under qemu and run `tracer doctor` and
    /// an accuracy subset inside each; then arm64 guests (6.1, 6.12) with a smaller subset.
    VmTest(vmtest::Options),
    /// Build the release: static x86_64 and aarch64 binaries in target/dist/tracer-
    /// VERSION-ARCH-linux-musl.tar.gz with their SHA-256, checked as a user without Rust
    /// would run them.
    Dist,
}

fn main() {
    let result = match Cli::parse().command {
        Cmd::Setup => setup::run(),
        Cmd::Test(opts) => test::run(&opts),
        Cmd::Demo(opts) => demo::run(&opts),
        Cmd::Bench(opts) => bench::run(&opts),
        Cmd::Soak(opts) => soak::run(&opts),
        Cmd::VmTest(opts) => vmtest::run(&opts),
        Cmd::Dist => dist::run(),
    };
    if let Err(err) = result {
        eprintln!("xtask: error: {err:#}");
        std::process::exit(1);
    }
}

/// Runs a command to completion; the error names the command.
pub fn exec(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("failed to start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// A child process stopped when dropped: SIGTERM, then SIGKILL after two seconds.
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        for _ in 0..100 {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}
