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

    /// The cgroup of container `id` (its full ID or an unambiguous prefix of 12 or more
    /// characters), found by the names container runtimes give their cgroups: Docker's
    /// `docker-ID.scope` (systemd) or `docker/ID` (cgroupfs), containerd's
    /// `cri-containerd-ID.scope`, CRI-O's `crio-ID.scope`, Podman's `libpod-ID.scope`,
    /// and a bare ID directory (cgroupfs drivers, Kubernetes pods' containers).
    pub fn container(id: &str) -> Result<Self> {
        let id = id.trim().to_ascii_lowercase();
        if id.len() < 12 || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!("--container {id}: a container ID is 12 to 64 hexadecimal characters");
        }
        let root = cgroup2_root().context("--container: no cgroup v2 hierarchy is mounted")?;
        let mut found = Vec::new();
        let mut queue = vec![(root, 0)];
        let mut seen = 0;
        while let Some((dir, depth)) = queue.pop() {
            seen += 1;
            if seen > 200_000 {
                break;
            }
            let Ok(entries) = fs::read_dir(&dir) else { continue };
            for e in entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())) {
                let name = e.file_name();
                if container_id_of(&name.to_string_lossy()).is_some_and(|full| full.starts_with(&id)) {
                    found.push(e.path());
                } else if depth < 12 {
                    queue.push((e.path(), depth + 1));
                }
            }
        }
        match found.as_slice() {
            [one] => Ok(Self { dir: one.clone() }),
            [] => bail!(
                "--container {id}: no cgroup of that container (looked for docker-ID.scope, docker/ID, \
                 cri-containerd-ID.scope, crio-ID.scope, libpod-ID.scope and ID directories); is it running here?"
            ),
            many => bail!(
                "--container {id}: {} cgroups match ({}); give more of the ID",
                many.len(),
                many.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
            ),
        }
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

/// The directory of the cgroup (v2) with id `id` (its directory's inode number), found
/// by walking the hierarchy; `None` when no cgroup has it (any more).
pub fn path_of(id: u64) -> Option<PathBuf> {
    let root = Cgroup { dir: cgroup2_root()? };
    root.tree().into_iter().find(|d| fs::metadata(d).is_ok_and(|m| m.ino() == id))
}

/// The container ID a cgroup directory's name carries, if it is a container's: a
/// runtime's prefix and `.scope`, or the bare 64-character ID. A runtime's monitor
/// (`crio-conmon-ID`, `libpod-conmon-ID`) is not the container.
fn container_id_of(name: &str) -> Option<&str> {
    let stem = name.strip_suffix(".scope").unwrap_or(name);
    ["docker-", "cri-containerd-", "crio-", "libpod-", ""].iter().find_map(|prefix| {
        let id = stem.strip_prefix(prefix)?;
        (id.len() == 64 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))).then_some(id)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_cgroups_are_named_by_their_runtimes() {
        let id = &"0123456789abcdef".repeat(4);
        for name in [
            format!("docker-{id}.scope"),
            id.clone(),
            format!("cri-containerd-{id}.scope"),
            format!("crio-{id}.scope"),
            format!("libpod-{id}.scope"),
        ] {
            assert_eq!(container_id_of(&name), Some(id.as_str()), "{name}");
        }
        for name in [
            format!("crio-conmon-{id}.scope"),
            format!("libpod-conmon-{id}.scope"),
            "system.slice".to_owned(),
            format!("docker-{}.scope", &id[..12]),
        ] {
            assert_eq!(container_id_of(&name), None, "{name}");
        }
    }

    #[test]
    fn a_container_id_is_hexadecimal_and_long_enough() {
        for bad in ["abc", "not-an-id-at-all", "zzzzzzzzzzzzzzzz"] {
            assert!(format!("{:#}", Cgroup::container(bad).unwrap_err()).contains("12 to 64 hexadecimal"), "{bad}");
        }
    }

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

    #[test]
    fn a_cgroup_is_found_by_its_id() {
        let Some(root) = cgroup2_root() else { return };
        let own = crate::tls::cgroup_of(std::process::id()).unwrap();
        let id = fs::metadata(&own).unwrap().ino();
        assert_eq!(path_of(id), Some(own));
        assert_eq!(path_of(fs::metadata(&root).unwrap().ino()), Some(root));
        assert_eq!(path_of(u64::MAX), None);
    }
}
