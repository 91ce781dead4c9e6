//! `--cgroup PATH`: the processes of a cgroup (v2) and of the cgroups below it, now and
//! later. The programs decide in the kernel, by the cgroup id of the process that
//! accepts, connects or reads (`CGROUPS`); userspace lists the cgroups' ids and their
//! processes (for the listeners' drops, TLS libraries and connections already open).

use std::{
    collections::BTreeSet,
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};

use crate::tls::cgroup2_root;

/// A traced cgroup: its directory in the cgroup v2 hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    pub dir: PathBuf,
}

impl Cgroup {
    /// `path` as given: a directory of the cgroup v2 hierarchy, or a path inside it (as
    /// `/proc/PID/cgroup` shows it, e.g. `/system.slice/nginx.service`).
    pub fn resolve(path: &str) -> Result<Self> {
        let root = cgroup2_root().context("--cgroup: no cgroup v2 hierarchy is mounted")?;
        let given = Path::new(path);
        let dir = if given.starts_with(&root) { given.to_path_buf() } else { root.join(path.trim_start_matches('/')) };
        if !dir.join("cgroup.procs").exists() {
            bail!("--cgroup {path}: {} is not a cgroup (v2) directory", dir.display());
        }
        Ok(Self { dir })
    }

    /// The directories of the cgroup and of every cgroup below it.
    fn tree(&self) -> Vec<PathBuf> {
        let mut out = vec![self.dir.clone()];
        let mut i = 0;
        while i < out.len() {
            if let Ok(entries) = fs::read_dir(&out[i]) {
                out.extend(entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()));
            }
            i += 1;
        }
        out
    }

    /// The cgroup ids (a cgroup v2 directory's inode number) of the tree.
    pub fn ids(&self) -> Vec<u64> {
        self.tree().iter().filter_map(|d| fs::metadata(d).ok()).map(|m| m.ino()).collect()
    }

    /// The processes in the tree now.
    pub fn processes(&self) -> BTreeSet<u32> {
        self.tree()
            .iter()
            .filter_map(|d| fs::read_to_string(d.join("cgroup.procs")).ok())
            .flat_map(|text| text.lines().filter_map(|l| l.trim().parse().ok()).collect::<Vec<u32>>())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_outside_the_hierarchy_is_refused() {
        if cgroup2_root().is_none() {
            return;
        }
        let e = Cgroup::resolve("/no/such/cgroup-for-the-tracer").unwrap_err();
        assert!(format!("{e:#}").contains("not a cgroup"), "{e:#}");
    }

    #[test]
    fn the_root_lists_itself_and_this_process() {
        let Some(root) = cgroup2_root() else { return };
        let cg = Cgroup::resolve(root.to_str().unwrap()).unwrap();
        assert!(!cg.ids().is_empty());
        assert!(cg.processes().contains(&std::process::id()));
    }
}
