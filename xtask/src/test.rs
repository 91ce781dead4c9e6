//! `cargo xtask test`: the whole suite, as CI runs it: the source layout (rustfmt), unit
//! tests, the privileged integration tests on this kernel, the release tarball checked
//! as a user would run it (`dist`), then the kernel matrix under qemu (`vm-test`).

use anyhow::{bail, Result};

use crate::{cargo, dist, exec, is_root, setup, vmtest};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Only run integration tests whose name contains this (skips the kernel matrix).
    #[arg(long)]
    pub filter: Option<String>,
    /// Skip the kernel matrix (`cargo xtask vm-test`), which boots Debian's kernels.
    #[arg(long)]
    pub skip_vm: bool,
}

pub fn run(opts: &Options) -> Result<()> {
    setup::run()?;
    // The layout first: it takes a second, and `cargo fmt` must never rewrite the tree.
    exec(cargo().args(["fmt", "--all", "--check"]))
        .map_err(|e| e.context("the source is not laid out as rustfmt.toml says: run `cargo fmt --all`"))?;
    exec(cargo().args(["build", "--package", "tracer", "--package", "tracer-tests", "--all-targets"]))?;
    exec(cargo().args(["test", "--package", "tracer", "--package", "tracer-common", "--package", "xtask"]))?;
    if !is_root() {
        bail!("the integration tests load eBPF programs: run `cargo xtask test` as root");
    }
    let mut cmd = cargo();
    cmd.args(["test", "--package", "tracer-tests", "--", "--test-threads=1"]);
    if let Some(filter) = &opts.filter {
        cmd.arg(filter);
    }
    exec(&mut cmd)?;
    if opts.filter.is_some() || opts.skip_vm {
        eprintln!("xtask: release and kernel matrix skipped");
        return Ok(());
    }
    // The release as a user gets it, then the same static binary on the other kernels
    // the tracer supports.
    dist::run()?;
    vmtest::run(&vmtest::Options::default())
}
