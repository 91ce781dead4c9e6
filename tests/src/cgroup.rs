//! Cgroups (v2) the tests create for `--cgroup`: a directory of the hierarchy of their
//! own, removed on drop (once its processes are gone, back in the root).

use std::{
    fs,
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, Result};

pub struct TestCgroup {
    pub dir: PathBuf,
    /// The path `--cgroup` takes: relative to the hierarchy's root.
    pub path: String,
}

/// Where the cgroup v2 hierarchy is mounted.
fn root() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .context("no cgroup v2 hierarchy mounted")
}

impl TestCgroup {
    pub fn new() -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!("tracer-test-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let dir = root()?.join(&name);
        fs::create_dir(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
        Ok(Self { dir, path: format!("/{name}") })
    }

    /// A cgroup named `name` inside this one (drop it first).
    pub fn child(&self, name: &str) -> Result<Self> {
        let dir = self.dir.join(name);
        fs::create_dir(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
        Ok(Self { dir, path: format!("{}/{name}", self.path) })
    }

    /// Moves process `pid` into the cgroup.
    pub fn add(&self, pid: u32) -> Result<()> {
        fs::write(self.dir.join("cgroup.procs"), pid.to_string())
            .with_context(|| format!("moving {pid} into {}", self.dir.display()))
    }

    /// Makes `cmd` start inside the cgroup (it moves itself there before it execs).
    pub fn start_inside(&self, cmd: &mut Command) {
        let procs = self.dir.join("cgroup.procs");
        unsafe {
            cmd.pre_exec(move || fs::write(&procs, std::process::id().to_string()));
        }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Whatever still runs there goes back to the root first: a cgroup with
        // processes cannot be removed.
        if let (Ok(procs), Ok(root)) = (fs::read_to_string(self.dir.join("cgroup.procs")), root()) {
            for pid in procs.lines() {
                let _ = fs::write(root.join("cgroup.procs"), pid);
            }
        }
        let _ = fs::remove_dir(&self.dir);
    }
}
