//! Builds the kernel programs (`tracer-ebpf`, for the BPF target, with the nightly
//! toolchain and bpf-linker) and leaves the object in OUT_DIR for `include_bytes!`.
use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let metadata_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("tracer crate has no parent directory"))?
        .join("tracer-ebpf");
    let root_dir = metadata_dir.to_str().ok_or_else(|| anyhow!("non-UTF-8 path {}", metadata_dir.display()))?;
    aya_build::build_ebpf([Package { name: "tracer-ebpf", root_dir, ..Default::default() }], Toolchain::default())
        .context("building the kernel programs (tracer-ebpf); `cargo xtask setup` installs bpf-linker and rust-src")
}
