//! Kernel programs of the tracer.
//!
//! The programs keep one `SockState` per traced connection and emit an event only at
//! phase boundaries (connection accepted, request/response exchange finished, connection
//! closed), so a keep-alive request costs one event however it is chunked.
//!
//! One module per hook family: `state` (TCP state changes), `accept` (accept syscalls),
//! `io` (send, receive, data arrival, acknowledgements), `setup` (the state change that
//! starts a server connection, once more, and setups missed), `sockops` (the cgroups'
//! socket-operation program: setups and, where it can, every state change of the
//! traced connections), `retransmit` (SYN-ACK retransmits), `listen` (ACKs dropped on a
//! full accept queue), `reset` (resets sent and received), `upstream` (connections the
//! traced process opens), `process` (fork and exit of traced processes), `bind` (which
//! server request an upstream request is made for).
#![no_std]
#![no_main]
// Atomic adds: the BPF target has no atomic types with read-modify-write operations.
#![feature(core_intrinsics)]
#![allow(internal_features)]

#[macro_use]
mod hook;

mod accept;
mod bind;
mod conn;
mod fallback;
mod io;
mod kernel;
mod labels;
mod listen;
mod maps;
mod process;
mod records;
mod reset;
mod retransmit;
mod setup;
mod sockops;
mod state;
mod tls;
mod upstream;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
