//! Empty library target: `tracer` depends on this crate at build time so that cargo
//! rebuilds the kernel programs (the binary target, built for BPF by `tracer/build.rs`)
//! whenever they change.
#![no_std]
