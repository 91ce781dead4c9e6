//! Installs what building and testing need, skipping whatever is already there:
//! the nightly toolchain's rust-src, rustfmt for the workspace's toolchain (the test
//! command checks the layout), the musl targets of the static release (x86_64 and
//! aarch64), bpf-linker built against the nightly's own LLVM, and the Debian packages the
//! tests use.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context as _, Result};

use crate::{exec, is_root};

/// Debian packages the tests use, each with a file that shows it is installed.
const PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "/usr/sbin/ip"),
    ("nftables", "/usr/sbin/nft"),
    ("nginx", "/usr/sbin/nginx"),
    ("curl", "/usr/bin/curl"),
    ("openssl", "/usr/bin/openssl"),
    ("python3", "/usr/bin/python3"),
    ("procps", "/usr/sbin/sysctl"),
    ("postgresql", "/usr/share/doc/postgresql/copyright"),
    ("nodejs", "/usr/bin/node"),
    ("bsdutils", "/usr/bin/script"),
    // The tests run their own servers on free ports (tests/src/redis.rs); none uses the
    // instance the package may start on 6379.
    ("redis-server", "/usr/bin/redis-server"),
    ("redis-tools", "/usr/bin/redis-benchmark"),
    // A real Prometheus scrapes `--metrics-addr` in the tests (its own, on a free port).
    ("prometheus", "/usr/bin/prometheus"),
    // `cargo xtask dist`: the container image (deploy/Containerfile) and a virtual
    // environment for the Kubernetes manifest's validator.
    ("buildah", "/usr/bin/buildah"),
    ("python3-venv", "/usr/share/doc/python3-venv"),
];

const NIGHTLY: &str = "nightly";

pub fn run() -> Result<()> {
    let start = Instant::now();
    rust_src()?;
    rustfmt()?;
    for target in crate::dist::TARGETS {
        rust_target(target.triple)?;
    }
    bpf_linker()?;
    debian_packages(PACKAGES)?;
    eprintln!("setup: everything in place ({:.0?})", start.elapsed());
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.stderr(Stdio::inherit()).output().with_context(|| format!("failed to start {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn rust_src() -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with(NIGHTLY)) {
        eprintln!("setup: installing the nightly toolchain");
        exec(Command::new("rustup").args(["toolchain", "install", NIGHTLY, "--profile", "minimal"]))?;
    }
    component("rust-src", Some(NIGHTLY))
}

/// rustfmt for the toolchain that builds the workspace (`cargo fmt` runs with it).
fn rustfmt() -> Result<()> {
    component("rustfmt", None)
}

/// Adds rustup component `name` to `toolchain` (default: the active one) when missing.
fn component(name: &str, toolchain: Option<&str>) -> Result<()> {
    let on = |cmd: &mut Command| {
        if let Some(t) = toolchain {
            cmd.args(["--toolchain", t]);
        }
    };
    let mut list = Command::new("rustup");
    list.args(["component", "list", "--installed"]);
    on(&mut list);
    if output(&mut list)?.lines().any(|l| l.starts_with(name)) {
        return Ok(());
    }
    eprintln!("setup: adding {name} to the {} toolchain", toolchain.unwrap_or("active"));
    let mut add = Command::new("rustup");
    add.args(["component", "add", name]);
    on(&mut add);
    exec(&mut add)
}

/// Adds the rustup target `triple` to the active toolchain when missing.
pub fn rust_target(triple: &str) -> Result<()> {
    if output(Command::new("rustup").args(["target", "list", "--installed"]))?.lines().any(|t| t == triple) {
        return Ok(());
    }
    eprintln!("setup: adding the {triple} target");
    exec(Command::new("rustup").args(["target", "add", triple]))
}

fn bpf_linker_works() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo"))
}

/// bpf-linker must use the same LLVM as the nightly rustc that emits the bitcode, so it
/// is built against the nightly's own libLLVM through a prefix of two symlinks: one for
/// the linker (`libLLVM.so`) and one with the library's name for the run-time loader.
fn bpf_linker() -> Result<()> {
    if bpf_linker_works() {
        return Ok(());
    }
    let sysroot = output(Command::new("rustc").args([&format!("+{NIGHTLY}"), "--print", "sysroot"]))?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    let libllvm = std::fs::read_dir(&lib_dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libLLVM.so.")))
        .with_context(|| format!("no libLLVM.so.* in {}", lib_dir.display()))?;
    let version = output(Command::new("rustc").args([&format!("+{NIGHTLY}"), "-vV"]))?;
    let major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc -vV does not tell its LLVM version")?
        .to_owned();
    let prefix = cargo_home().join("bpf-linker-llvm");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    for name in ["libLLVM.so".into(), libllvm.file_name().expect("file name").to_owned()] {
        let link = prefix_lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link).with_context(|| format!("linking {}", link.display()))?;
    }
    eprintln!("setup: building bpf-linker against LLVM {major} of the nightly toolchain (about two minutes)");
    exec(
        Command::new("cargo")
            .args(["install", "bpf-linker", "--no-default-features", "--features", &format!("llvm-{major}")])
            .env("LLVM_PREFIX", &prefix),
    )?;
    if !bpf_linker_works() {
        bail!("bpf-linker was installed but does not run; is {} on PATH?", cargo_home().join("bin").display());
    }
    Ok(())
}

/// Installs the packages of `packages` (name, a file it installs) that are missing.
pub fn debian_packages(packages: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().filter(|(_, file)| !Path::new(file).exists()).map(|(p, _)| *p).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!("missing Debian packages {missing:?}: run `cargo xtask setup` as root to install them");
    }
    eprintln!("setup: installing Debian packages {missing:?}");
    exec(Command::new("apt-get").args(["update", "-q"]))?;
    exec(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}
