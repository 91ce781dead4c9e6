//! The traced processes: validation of user-given PIDs and their descendants in /proc.

use std::{
    collections::{HashMap, HashSet},
    fs,
};

use anyhow::{bail, Result};

/// Parent PID of a process from /proc/PID/stat (the field after the parenthesised name).
fn parent_of(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Checks that `pid` names a user-space process.
pub fn validate(pid: u32) -> Result<()> {
    let stat = match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s,
        Err(_) => bail!("no process with PID {pid}; check it with `ps -p {pid}`"),
    };
    // Kernel threads have no memory map and descend from kthreadd (PID 2).
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if pid == 2 || (cmdline.is_empty() && parent_of(&stat) == Some(2)) {
        bail!("PID {pid} is a kernel thread, not a server process");
    }
    Ok(())
}

/// `roots` and every process descending from them, as /proc shows them now.
pub fn with_descendants(roots: &[u32]) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            if let Some(ppid) = fs::read_to_string(format!("/proc/{pid}/stat")).ok().as_deref().and_then(parent_of) {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut seen: HashSet<u32> = HashSet::new();
    let mut stack: Vec<u32> = roots.to_vec();
    let mut out = Vec::new();
    while let Some(pid) = stack.pop() {
        if seen.insert(pid) {
            out.push(pid);
            stack.extend(children.get(&pid).into_iter().flatten());
        }
    }
    out
}

/// Every process /proc shows now.
pub fn all() -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten().filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok()).collect()
}

/// Whether `pid` still runs (a zombie, exited but not yet reaped, does not).
/// What a report says of a process: its command name and its cgroup (v2 path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    pub command: String,
    pub cgroup: Option<String>,
}

/// Process `pid` as it is now (`?` for a name that cannot be read: gone already).
pub fn info(pid: u32) -> ProcessInfo {
    let command = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim().chars().filter(|c| !c.is_control()).collect())
        .unwrap_or_else(|_| "?".to_owned());
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()
        .and_then(|t| t.lines().find_map(|l| l.strip_prefix("0::").map(str::to_owned)));
    ProcessInfo { command, cgroup }
}

pub fn is_alive(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    let state = stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next());
    !matches!(state, Some("Z" | "X"))
}

/// Socket inodes process `pid` has open.
pub fn socket_inodes(pid: u32) -> HashSet<u64> {
    let mut out = HashSet::new();
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else { return out };
    for entry in dir.flatten() {
        if let Ok(target) = fs::read_link(entry.path()) {
            let target = target.to_string_lossy();
            if let Some(inode) = target.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
                if let Ok(inode) = inode.parse() {
                    out.insert(inode);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_comes_after_the_name_even_with_spaces() {
        assert_eq!(parent_of("123 (my (odd) name) S 77 123 123 0"), Some(77));
    }

    #[test]
    fn own_process_is_valid_and_its_own_descendant() {
        let me = std::process::id();
        validate(me).unwrap();
        assert!(with_descendants(&[me]).contains(&me));
        assert!(validate(u32::MAX - 1).is_err());
    }
}
