//! `cargo xtask dist`: the release. A static binary (musl, the kernel programs inside it)
//! with the README, in a tarball beside its SHA-256, for x86_64 and for aarch64; then
//! each tarball is checked as a user would get it: unpacked in a directory of its own,
//! its checksum verified, the binary's ELF header read (the machine, no program
//! interpreter: static) and the binary run with an empty environment (no PATH, no
//! toolchain), `--version` and, as root, `tracer doctor` — the aarch64 one's `--version`
//! under qemu's user-mode emulation (its `doctor` runs in `cargo xtask vm-test`'s arm64
//! guest, on an arm64 kernel). Then `deploy/`: the x86_64 container image built
//! from `deploy/Containerfile` with buildah (saved as an OCI archive beside the
//! tarball) and the binary run inside it, and the DaemonSet manifest validated against
//! the Kubernetes schema (`kubernetes-validate`, from PyPI into `target/deploy/venv`).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::{cargo, exec, is_root, setup, workspace_root};

/// A release target: its Rust target (musl: static), the architecture in the tarball's
/// name, and its ELF machine number (`e_machine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub triple: &'static str,
    pub arch: &'static str,
    elf_machine: u16,
}

pub const X86_64: Target = Target { triple: "x86_64-unknown-linux-musl", arch: "x86_64", elf_machine: 62 };
/// Linked by the toolchain's own rust-lld (`.cargo/config.toml`): no cross C toolchain.
pub const AARCH64: Target = Target { triple: "aarch64-unknown-linux-musl", arch: "aarch64", elf_machine: 183 };
pub const TARGETS: &[Target] = &[X86_64, AARCH64];

impl Target {
    /// The tarball's name without `.tar.gz`, and the directory inside it.
    pub fn release_name(&self) -> String {
        format!("tracer-{}-{}-linux-musl", env!("CARGO_PKG_VERSION"), self.arch)
    }

    /// Where the release build leaves this target's binaries.
    pub fn bins(&self) -> PathBuf {
        workspace_root().join("target").join(self.triple).join("release")
    }
}

/// The packages of every static build: the release's tracer, and the lab the kernel
/// matrix's guests run. Built together by `dist` and `vm-test` alike, so that their
/// features unify the same way and the guests boot the very binary in the tarball (built
/// apart, the tracer would be built twice, differently).
pub const STATIC_PACKAGES: &[&str] = &["tracer", "tracer-tests"];

/// The release build's binaries of `packages` for `target` (static, for musl). The kernel
/// programs are built for the same architecture (aya-build passes the target's to them:
/// a kprobe reads its arguments from that architecture's registers).
pub fn build_static(target: Target, packages: &[&str]) -> Result<PathBuf> {
    setup::rust_target(target.triple)?;
    let mut cmd = cargo();
    cmd.args(["build", "--release", "--target", target.triple, "--bins"]);
    for p in packages {
        cmd.args(["--package", p]);
    }
    exec(&mut cmd)?;
    Ok(target.bins())
}

pub fn run() -> Result<()> {
    setup::run()?;
    setup::debian_packages(DIST_PACKAGES)?;
    let mut tarballs = Vec::new();
    for target in TARGETS {
        let tarball = package(*target)?;
        check(*target, &tarball)?;
        tarballs.push(tarball);
    }
    image(&tarballs[0])?;
    manifest()
}

/// Debian packages `dist` alone uses: qemu's user-mode emulation runs the aarch64
/// binary's `--version` on this machine.
const DIST_PACKAGES: &[(&str, &str)] = &[("qemu-user-static", "/usr/bin/qemu-aarch64-static")];

/// The container image of `deploy/Containerfile` with the tarball's binary, built with
/// buildah (vfs storage, chroot isolation: no daemon, no overlay mounts), the binary run
/// inside it, the image saved as an OCI archive beside the tarball.
fn image(tarball: &Path) -> Result<()> {
    let version = env!("CARGO_PKG_VERSION");
    let name = X86_64.release_name();
    let context = workspace_root().join("target/deploy/context");
    let _ = fs::remove_dir_all(&context);
    fs::create_dir_all(&context)?;
    exec(
        Command::new("tar")
            .current_dir(&context)
            .arg("-xzf")
            .arg(tarball)
            .args(["--strip-components=1", &format!("{name}/tracer")]),
    )?;
    fs::copy(workspace_root().join("deploy/Containerfile"), context.join("Containerfile"))?;
    let tag = format!("localhost/tracer:{version}");
    let buildah = || {
        let mut cmd = Command::new("buildah");
        cmd.args(["--storage-driver", "vfs"]);
        cmd
    };
    exec(buildah().current_dir(&context).args([
        "bud",
        "--isolation",
        "chroot",
        "--quiet",
        "-t",
        &tag,
        "-f",
        "Containerfile",
        ".",
    ]))?;
    let container = String::from_utf8(buildah().args(["from", &tag]).output()?.stdout)?.trim().to_owned();
    let said = buildah().args(["run", "--isolation", "chroot", &container, "--", "/tracer", "--version"]).output();
    let _ = buildah().args(["rm", &container]).output();
    let said = said?;
    let text = String::from_utf8_lossy(&said.stdout);
    if !said.status.success() || !text.contains(version) {
        bail!("`/tracer --version` in the image said {text:?} ({})", said.status);
    }
    let archive = workspace_root().join(format!("target/dist/tracer-{version}-image.oci.tar"));
    let _ = fs::remove_file(&archive);
    exec(buildah().arg("push").arg("--quiet").arg(&tag).arg(format!("oci-archive:{}:{tag}", archive.display())))?;
    let _ = buildah().args(["rmi", &tag]).output();
    eprintln!("dist: image {tag} (deploy/Containerfile) runs the binary; saved as {}", archive.display());
    Ok(())
}

/// The DaemonSet manifest against the Kubernetes schema of two releases, strictly
/// (unknown fields refused).
fn manifest() -> Result<()> {
    let venv = workspace_root().join("target/deploy/venv");
    let validate = venv.join("bin/kubernetes-validate");
    if !validate.exists() {
        exec(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        exec(Command::new(venv.join("bin/pip")).args(["install", "--quiet", "kubernetes-validate"]))?;
    }
    let daemonset = workspace_root().join("deploy/daemonset.yaml");
    for version in ["1.29.0", "1.33.0"] {
        exec(Command::new(&validate).args(["--strict", "-k", version]).arg(&daemonset))
            .with_context(|| format!("deploy/daemonset.yaml against Kubernetes {version}"))?;
    }
    Ok(())
}

/// Builds `target`'s tarball and its checksum file; the tarball's path.
fn package(target: Target) -> Result<PathBuf> {
    let bins = build_static(target, STATIC_PACKAGES)?;
    let name = target.release_name();
    let dist = workspace_root().join("target/dist");
    let staging = dist.join(&name);
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging)?;
    fs::copy(bins.join("tracer"), staging.join("tracer"))?;
    fs::copy(workspace_root().join("README.md"), staging.join("README.md"))?;
    let tarball = dist.join(format!("{name}.tar.gz"));
    // Owned by root, no timestamps of this machine's users: the same files give the same
    // listing wherever it is unpacked.
    exec(
        Command::new("tar")
            .current_dir(&dist)
            .args(["--owner=0", "--group=0", "--numeric-owner", "-czf"])
            .arg(&tarball)
            .arg(&name),
    )?;
    let sum = Command::new("sha256sum").current_dir(&dist).arg(tarball.file_name().expect("a file name")).output()?;
    if !sum.status.success() {
        bail!("sha256sum failed: {}", String::from_utf8_lossy(&sum.stderr));
    }
    fs::write(dist.join(format!("{name}.tar.gz.sha256")), &sum.stdout)?;
    eprintln!("dist: {} ({:.1} MB)", tarball.display(), fs::metadata(&tarball)?.len() as f64 / 1e6);
    Ok(tarball)
}

/// Unpacks `tarball` elsewhere and runs what it holds as a user without Rust would (an
/// aarch64 binary under qemu's user-mode emulation, `--version` only: the BPF system call
/// is not emulated).
fn check(target: Target, tarball: &Path) -> Result<()> {
    let unpacked = std::env::temp_dir().join(format!("tracer-dist-check-{}-{}", target.arch, std::process::id()));
    let _ = fs::remove_dir_all(&unpacked);
    fs::create_dir_all(&unpacked)?;
    fs::copy(tarball, unpacked.join(tarball.file_name().expect("a file name")))?;
    let sum_file = format!("{}.sha256", tarball.display());
    fs::copy(&sum_file, unpacked.join(Path::new(&sum_file).file_name().expect("a file name")))?;
    let result = (|| -> Result<()> {
        let sum_name = Path::new(&sum_file).file_name().expect("a file name").to_owned();
        exec(Command::new("sha256sum").current_dir(&unpacked).arg("--check").arg(&sum_name))
            .context("the tarball does not match its checksum")?;
        exec(Command::new("tar").current_dir(&unpacked).arg("-xzf").arg(tarball.file_name().expect("a file name")))?;
        let name = tarball.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".tar.gz")).expect("named");
        let tracer = unpacked.join(name).join("tracer");
        // Static and for the target's machine: no program interpreter (dynamic loader).
        let elf = Elf::read(&fs::read(&tracer)?).with_context(|| format!("reading {}", tracer.display()))?;
        if elf.machine != target.elf_machine {
            bail!(
                "{} is for ELF machine {}, not {} ({})",
                tracer.display(),
                elf.machine,
                target.elf_machine,
                target.arch
            );
        }
        if elf.interpreter {
            bail!("{} names a program interpreter (a dynamic loader): not a static binary", tracer.display());
        }
        let native = target.arch == std::env::consts::ARCH;
        let run = |arg: &str| {
            let mut cmd = if native {
                Command::new(&tracer)
            } else {
                let mut cmd = Command::new(format!("/usr/bin/qemu-{}-static", target.arch));
                cmd.arg(&tracer);
                cmd
            };
            cmd.env_clear().arg(arg).output().with_context(|| format!("running {} {arg}", tracer.display()))
        };
        let version = run("--version")?;
        let said = String::from_utf8_lossy(&version.stdout);
        if !version.status.success() || !said.contains(env!("CARGO_PKG_VERSION")) {
            bail!("`tracer --version` from the tarball, with an empty environment, said {said:?}");
        }
        let doctor = native && is_root();
        if doctor {
            let doctor = run("doctor")?;
            let text = String::from_utf8_lossy(&doctor.stdout);
            // 0: every phase available, 1: some not; 2 would be an error.
            if !matches!(doctor.status.code(), Some(0 | 1)) || !text.contains("hooks:") {
                bail!("`tracer doctor` from the tarball failed ({}): {text}", doctor.status);
            }
        }
        eprintln!(
            "dist: checked in {}: checksum, static {} ELF, `--version`{} with an empty environment{}",
            unpacked.display(),
            target.arch,
            if doctor { " and `doctor`" } else { "" },
            if native { "" } else { " (under qemu-user)" }
        );
        Ok(())
    })();
    let _ = fs::remove_dir_all(&unpacked);
    result
}

/// What the release check reads from an ELF file's headers.
#[derive(Debug, PartialEq, Eq)]
struct Elf {
    /// `e_machine`: 62 x86_64, 183 aarch64.
    machine: u16,
    /// Whether a program header names an interpreter (`PT_INTERP`): a dynamic binary.
    interpreter: bool,
}

impl Elf {
    /// The headers of a 64-bit little-endian ELF file.
    fn read(bytes: &[u8]) -> Result<Self> {
        let u16_at = |at: usize| bytes.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
        let u32_at = |at: usize| bytes.get(at..at + 4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
        let u64_at = |at: usize| bytes.get(at..at + 8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
        if bytes.get(..6) != Some(b"\x7fELF\x02\x01") {
            bail!("not a 64-bit little-endian ELF file");
        }
        let truncated = || anyhow::anyhow!("truncated ELF headers");
        let machine = u16_at(18).ok_or_else(truncated)?;
        let phoff = u64_at(32).ok_or_else(truncated)? as usize;
        let (phentsize, phnum) = (u16_at(54).ok_or_else(truncated)? as usize, u16_at(56).ok_or_else(truncated)?);
        let mut interpreter = false;
        for i in 0..usize::from(phnum) {
            const PT_INTERP: u32 = 3;
            interpreter |= u32_at(phoff + i * phentsize).ok_or_else(truncated)? == PT_INTERP;
        }
        Ok(Self { machine, interpreter })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ELF header for `machine` with program headers of the types `types`.
    fn elf(machine: u16, types: &[u32]) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..6].copy_from_slice(b"\x7fELF\x02\x01");
        b[18..20].copy_from_slice(&machine.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&(types.len() as u16).to_le_bytes());
        for t in types {
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&t.to_le_bytes());
            b.extend(ph);
        }
        b
    }

    #[test]
    fn the_elf_header_says_the_machine_and_whether_the_binary_is_static() {
        // PT_LOAD, PT_DYNAMIC, PT_GNU_STACK: a static-pie binary.
        assert_eq!(Elf::read(&elf(183, &[1, 2, 0x6474e551])).unwrap(), Elf { machine: 183, interpreter: false });
        assert_eq!(Elf::read(&elf(62, &[6, 3, 1])).unwrap(), Elf { machine: 62, interpreter: true });
        assert!(Elf::read(b"#!/bin/sh\n").is_err());
        let mut cut = elf(62, &[1, 3]);
        cut.truncate(100);
        assert!(Elf::read(&cut).unwrap_err().to_string().contains("truncated"));
    }

    #[test]
    fn tarballs_are_named_by_architecture() {
        let v = env!("CARGO_PKG_VERSION");
        assert_eq!(X86_64.release_name(), format!("tracer-{v}-x86_64-linux-musl"));
        assert_eq!(AARCH64.release_name(), format!("tracer-{v}-aarch64-linux-musl"));
        assert!(AARCH64.bins().ends_with("target/aarch64-unknown-linux-musl/release"));
    }
}
