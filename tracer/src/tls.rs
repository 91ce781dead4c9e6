//! TLS libraries in the traced processes: where their read, write, handshake and
//! shutdown calls are, for the uprobes that follow TLS connections as plaintext.
//!
//! OpenSSL is found as a shared library (`libssl.so.3`, `libssl.so.1.1`, ... in the
//! process's memory map) or inside the executable itself when it exports the library's
//! symbols (`node`). A statically linked, stripped binary, Go's crypto/tls and rustls
//! have no such symbols: their connections are followed from the record layer alone.

use std::{
    collections::HashSet,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _};

/// A function of the library and the entry program that hooks it.
pub struct Entry {
    pub symbol: &'static str,
    pub program: &'static str,
    /// Without it the library cannot be followed.
    pub required: bool,
    /// Its return is probed too (`ssl_return`): every probe hit is a trap into the
    /// kernel, which costs the application microseconds, so only where the result
    /// matters (what a read returned, whether the handshake completed).
    pub returns: bool,
}

pub const ENTRIES: &[Entry] = &[
    Entry { symbol: "SSL_read", program: "ssl_read", required: true, returns: true },
    Entry { symbol: "SSL_write", program: "ssl_write", required: true, returns: false },
    Entry { symbol: "SSL_do_handshake", program: "ssl_do_handshake", required: true, returns: true },
    // OpenSSL 1.1.1 and later.
    Entry { symbol: "SSL_read_ex", program: "ssl_read_ex", required: false, returns: true },
    Entry { symbol: "SSL_write_ex", program: "ssl_write", required: false, returns: false },
    Entry { symbol: "SSL_shutdown", program: "ssl_shutdown", required: false, returns: false },
];

pub const RETURN_PROGRAM: &str = "ssl_return";

/// One TLS library file, with its functions' offsets in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Library {
    /// Device and inode: the same file mapped by several processes is hooked once per
    /// process (or once for all).
    pub id: (u64, u64),
    /// The path the process mapped it from, as it names it.
    pub name: String,
    /// Where the tracer opens it (through the process's root, for containers).
    pub path: PathBuf,
    /// File offsets of the functions of `ENTRIES` found (same order; `None`: absent).
    pub offsets: Vec<Option<u64>>,
}

/// Files mapped executable by `pid`: (device, inode, path).
fn mapped_files(pid: u32) -> Vec<((u64, u64), String)> {
    let Ok(maps) = fs::read_to_string(format!("/proc/{pid}/maps")) else { return Vec::new() };
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for line in maps.lines() {
        // address perms offset dev inode path
        let mut fields = line.split_whitespace();
        let (Some(_), Some(perms), Some(_), Some(dev), Some(inode)) =
            (fields.next(), fields.next(), fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let path: String = fields.collect::<Vec<_>>().join(" ");
        // Not a file that can be opened again: anonymous memory, or deleted since mapped.
        if !perms.contains('x') || !path.starts_with('/') || path.ends_with(" (deleted)") || path.starts_with("/memfd:")
        {
            continue;
        }
        let Some((major, minor)) = dev.split_once(':') else { continue };
        let (Ok(major), Ok(minor), Ok(inode)) =
            (u64::from_str_radix(major, 16), u64::from_str_radix(minor, 16), inode.parse::<u64>())
        else {
            continue;
        };
        let id = ((major << 20) | minor, inode);
        if seen.insert(id) {
            out.push((id, path));
        }
    }
    out
}

/// Whether a mapped file may hold the library: a libssl, or the executable itself.
fn candidate(path: &str, exe: Option<&str>) -> bool {
    let base = path.rsplit('/').next().unwrap_or(path);
    base.starts_with("libssl.so") || base.starts_with("libssl-") || Some(path) == exe
}

/// The TLS libraries process `pid` has mapped now, except those in `known` (by id);
/// files found without TLS functions go in `without`, and are not read again.
pub fn libraries(pid: u32, known: &HashSet<(u64, u64)>, without: &mut HashSet<(u64, u64)>) -> Vec<Library> {
    let exe = fs::read_link(format!("/proc/{pid}/exe")).ok().map(|p| p.to_string_lossy().into_owned());
    let mut out = Vec::new();
    for (id, name) in mapped_files(pid) {
        if known.contains(&id) || without.contains(&id) || !candidate(&name, exe.as_deref()) {
            continue;
        }
        let path = Path::new(&format!("/proc/{pid}/root")).join(name.trim_start_matches('/'));
        match symbol_offsets(&path) {
            Ok(Some(offsets)) => out.push(Library { id, name, path, offsets }),
            Ok(None) => {
                without.insert(id);
            }
            Err(e) => log::debug!("{name}: {e:#}"),
        }
    }
    out
}

/// Where the cgroup v2 hierarchy is mounted, if it is (the record-layer program
/// attaches to cgroups there): `/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones.
pub fn cgroup2_root() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, kind) = (f.next()?, f.next()?, f.next()?);
        (kind == "cgroup2").then(|| PathBuf::from(dir))
    })
}

/// The cgroup (v2) directory of process `pid`.
pub fn cgroup_of(pid: u32) -> Option<PathBuf> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = cgroup2_root()?.join(path.trim_start_matches('/'));
    dir.is_dir().then_some(dir)
}

/// An OpenSSL library installed on the host, if any (for `tracer doctor`).
pub fn system_library() -> Option<Library> {
    const DIRS: &[&str] = &[
        "/usr/lib/x86_64-linux-gnu",
        "/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib64",
        "/lib64",
        "/usr/lib",
        "/usr/local/lib",
    ];
    for dir in DIRS {
        let Ok(entries) = fs::read_dir(dir) else { continue };
        let mut names: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libssl.so.")))
            .collect();
        names.sort();
        for path in names.into_iter().rev() {
            if let Ok(Some(offsets)) = symbol_offsets(&path) {
                let name = path.display().to_string();
                return Some(Library { id: (0, 0), name, path, offsets });
            }
        }
    }
    None
}

/// File offsets of `ENTRIES` in the ELF file at `path`; `None` when a required one is
/// missing (not a TLS library, or stripped).
pub fn symbol_offsets(path: &Path) -> Result<Option<Vec<Option<u64>>>> {
    let data = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let file = object::File::parse(&*data).with_context(|| format!("parsing {}", path.display()))?;
    let mut offsets: Vec<Option<u64>> = vec![None; ENTRIES.len()];
    for symbol in file.dynamic_symbols().chain(file.symbols()) {
        let Ok(name) = symbol.name() else { continue };
        let Some(i) = ENTRIES.iter().position(|e| e.symbol == name) else { continue };
        if offsets[i].is_some() || symbol.is_undefined() || symbol.address() == 0 {
            continue;
        }
        let Some(index) = symbol.section_index() else { continue };
        let Ok(section) = file.section_by_index(index) else { continue };
        let Some((file_start, _)) = section.file_range() else { continue };
        let Some(in_section) = symbol.address().checked_sub(section.address()) else { continue };
        offsets[i] = Some(file_start + in_section);
    }
    if ENTRIES.iter().zip(&offsets).any(|(e, o)| e.required && o.is_none()) {
        return Ok(None);
    }
    Ok(Some(offsets))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libssl_and_the_executable_are_candidates() {
        assert!(candidate("/usr/lib/x86_64-linux-gnu/libssl.so.3", None));
        assert!(candidate("/usr/lib/libssl.so.1.1", Some("/usr/sbin/nginx")));
        assert!(candidate("/usr/bin/node", Some("/usr/bin/node")));
        assert!(!candidate("/usr/lib/x86_64-linux-gnu/libcrypto.so.3", Some("/usr/sbin/nginx")));
        assert!(!candidate("/usr/lib/x86_64-linux-gnu/libc.so.6", None));
    }

    #[test]
    fn a_library_without_the_functions_is_none() {
        // The test binary itself exports no SSL_read.
        let exe = std::env::current_exe().unwrap();
        assert_eq!(symbol_offsets(&exe).unwrap(), None);
    }
}
