//! `cargo xtask dist`: the release. A static x86_64 binary (musl, the kernel programs
//! inside it) with the README, in a tarball beside its SHA-256; then the tarball is
//! checked as a user would get it: unpacked in a directory of its own, its checksum
//! verified, and the binary run with an empty environment (no PATH, no toolchain),
//! `--version` and, as root, `tracer doctor`. Then `deploy/`: the container image built
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

pub const MUSL: &str = "x86_64-unknown-linux-musl";

/// The musl target of the toolchain, added when missing.
pub fn musl_target() -> Result<()> {
    let targets = String::from_utf8(Command::new("rustup").args(["target", "list", "--installed"]).output()?.stdout)?;
    if !targets.lines().any(|t| t == MUSL) {
        exec(Command::new("rustup").args(["target", "add", MUSL]))?;
    }
    Ok(())
}

/// The release build's binaries of `packages` (static, for musl).
pub fn build_static(packages: &[&str]) -> Result<PathBuf> {
    musl_target()?;
    let mut cmd = cargo();
    cmd.args(["build", "--release", "--target", MUSL, "--bins"]);
    for p in packages {
        cmd.args(["--package", p]);
    }
    exec(&mut cmd)?;
    Ok(workspace_root().join("target").join(MUSL).join("release"))
}

pub fn run() -> Result<()> {
    setup::run()?;
    let tarball = package()?;
    check(&tarball)?;
    image(&tarball)?;
    manifest()
}

/// The container image of `deploy/Containerfile` with the tarball's binary, built with
/// buildah (vfs storage, chroot isolation: no daemon, no overlay mounts), the binary run
/// inside it, the image saved as an OCI archive beside the tarball.
fn image(tarball: &Path) -> Result<()> {
    let version = env!("CARGO_PKG_VERSION");
    let name = format!("tracer-{version}-x86_64-linux-musl");
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

/// Builds the tarball and its checksum file; the tarball's path.
fn package() -> Result<PathBuf> {
    let bins = build_static(&["tracer"])?;
    let name = format!("tracer-{}-x86_64-linux-musl", env!("CARGO_PKG_VERSION"));
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

/// Unpacks `tarball` elsewhere and runs what it holds as a user without Rust would.
fn check(tarball: &Path) -> Result<()> {
    let unpacked = std::env::temp_dir().join(format!("tracer-dist-check-{}", std::process::id()));
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
        // Static: no program interpreter (the dynamic loader) named in the binary.
        let bytes = fs::read(&tracer)?;
        if bytes.windows(b"ld-linux".len()).any(|w| w == b"ld-linux") {
            bail!("{} names a dynamic loader: not a static binary", tracer.display());
        }
        let version = Command::new(&tracer).env_clear().arg("--version").output()?;
        let said = String::from_utf8_lossy(&version.stdout);
        if !version.status.success() || !said.contains(env!("CARGO_PKG_VERSION")) {
            bail!("`tracer --version` from the tarball, with an empty environment, said {said:?}");
        }
        if is_root() {
            let doctor = Command::new(&tracer).env_clear().arg("doctor").output()?;
            let text = String::from_utf8_lossy(&doctor.stdout);
            // 0: every phase available, 1: some not; 2 would be an error.
            if !matches!(doctor.status.code(), Some(0 | 1)) || !text.contains("hooks:") {
                bail!("`tracer doctor` from the tarball failed ({}): {text}", doctor.status);
            }
        }
        eprintln!(
            "dist: checked in {}: checksum, static, `--version`{} with an empty environment",
            unpacked.display(),
            if is_root() { " and `doctor`" } else { "" }
        );
        Ok(())
    })();
    let _ = fs::remove_dir_all(&unpacked);
    result
}
