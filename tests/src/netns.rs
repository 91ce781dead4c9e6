//! Network namespaces the tests create, so that queue overflows, firewall rules and
//! their counters touch nothing else on the machine.

use std::{
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{bail, Context as _, Result};

/// A named network namespace with its loopback up; deleted when dropped.
pub struct Netns {
    pub name: String,
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

impl Netns {
    pub fn new() -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!("tracer-test-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Self { name };
        run(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]))?;
        Ok(ns)
    }

    /// `program` run inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        run(self.command("sysctl").args(["-q", "-w", &format!("{key}={value}")]))
    }

    /// Loads an nftables ruleset into the namespace.
    pub fn nft(&self, ruleset: &str) -> Result<()> {
        let path = std::env::temp_dir().join(format!("{}.nft", self.name));
        std::fs::write(&path, ruleset)?;
        let result = run(self.command("nft").arg("-f").arg(&path));
        let _ = std::fs::remove_file(&path);
        result
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run(Command::new("ip").args(["netns", "delete", &self.name]));
    }
}

/// A counter of the `TcpExt` section of a process's namespace, from
/// `/proc/PID/net/netstat` (e.g. `ListenDrops`).
pub fn tcp_ext_counter(pid: u32, name: &str) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/netstat"))?;
    let mut lines = text.lines();
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if !names.starts_with("TcpExt:") {
            continue;
        }
        for (n, v) in names.split_whitespace().zip(values.split_whitespace()).skip(1) {
            if n == name {
                return Ok(v.parse()?);
            }
        }
    }
    bail!("no TcpExt counter {name} in /proc/{pid}/net/netstat")
}
