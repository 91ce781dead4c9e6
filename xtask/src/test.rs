//! `cargo xtask test`: the whole suite, as CI runs it.

use anyhow::{bail, Result};

use crate::{cargo, exec, is_root, setup};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Only run integration tests whose name contains this.
    #[arg(long)]
    pub filter: Option<String>,
}

pub fn run(opts: &Options) -> Result<()> {
    setup::run()?;
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
    exec(&mut cmd)
}
