//! Reads of kernel structures at offsets resolved from BTF.

use aya_ebpf::helpers::{
    bpf_get_current_task, bpf_probe_read_kernel,
    generated::{bpf_get_current_task_btf, bpf_skc_to_tcp_sock},
};
use tracer_common::{ConnAddr, AF_INET, AF_INET6};

use crate::{
    maps::{bump, TupleKey},
    off,
};

pub const IPPROTO_TCP: u16 = 6;
pub const SOCK_STREAM: u16 = 1;

#[inline(always)]
pub fn read<T>(base: u64, offset: u32) -> Option<T> {
    match unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T) } {
        Ok(v) => Some(v),
        Err(_) => {
            bump(tracer_common::counter::READ_ERRORS);
            None
        }
    }
}

/// A field at `offset` in a kernel structure: loaded in place when `BTF` says `base` is a
/// pointer whose type the verifier knows (a BTF-typed tracepoint's argument; the
/// offsets are constants to it, from the frozen read-only data), which costs one load
/// where `read` costs a helper call; else through `read`. (A typed load of a bad
/// address gives zeros, as the verifier arranges.)
#[inline(always)]
pub fn load<const BTF: bool, T: Copy>(base: u64, offset: u32) -> Option<T> {
    if BTF {
        Some(unsafe { core::ptr::read_volatile((base + offset as u64) as *const T) })
    } else {
        read(base, offset)
    }
}

/// `sk`'s `struct tcp_sock`, through which `load` may reach the TCP fields (past the
/// `struct sock` a typed tracepoint argument points to): the typed pointer the kernel's
/// cast gives where `BTF`, else `sk` itself (the same address). `None`: not a TCP socket.
#[inline(always)]
pub fn tcp_sock<const BTF: bool>(sk: u64) -> Option<u64> {
    if !BTF {
        return Some(sk);
    }
    let tp = unsafe { bpf_skc_to_tcp_sock(sk as *mut core::ffi::c_void) } as u64;
    if tp == 0 {
        return None;
    }
    Some(tp)
}

/// The start of `struct sock_common` on every kernel the tracer knows: the addresses,
/// the ports and the family, in this order. Read in one go when the offsets from BTF
/// say the layout holds (one helper call instead of five).
#[repr(C)]
#[derive(Clone, Copy)]
struct Head {
    daddr: u32,
    rcv_saddr: u32,
    _hash: u32,
    dport: u16,
    num: u16,
    family: u16,
    _state: u16,
}

/// Whether the fields of [`Head`] sit where it says, from `skc_daddr` on.
#[inline(always)]
fn head_layout() -> bool {
    let at = off!(skc_daddr);
    off!(skc_rcv_saddr) == at + 4
        && off!(skc_dport) == at + 12
        && off!(skc_num) == at + 14
        && off!(skc_family) == at + 16
}

/// The 4-tuple of a `struct sock` (or `struct request_sock`, which starts with the same
/// `struct sock_common`). IPv4 addresses come out IPv4-mapped.
#[inline(always)]
pub fn conn_addr(sk: u64) -> ConnAddr {
    conn_addr_of::<false>(sk)
}

/// [`conn_addr`], with every field loaded in place where `BTF` says `sk` is a typed
/// pointer (a typed tracepoint's `struct sock`, a `struct tcp_sock` from the kernel's
/// cast): one load per field, as a typed load may not span two.
#[inline(always)]
pub fn conn_addr_of<const BTF: bool>(sk: u64) -> ConnAddr {
    let (family, local_port, remote_port, v4) = if !BTF && head_layout() {
        let head = read::<Head>(sk, off!(skc_daddr));
        match head {
            Some(h) => (h.family, h.num, h.dport, (h.rcv_saddr, h.daddr)),
            None => (0, 0, 0, (0, 0)),
        }
    } else {
        let family = load::<BTF, u16>(sk, off!(skc_family)).unwrap_or(0);
        let v4 = if family == AF_INET {
            (load::<BTF, u32>(sk, off!(skc_rcv_saddr)).unwrap_or(0), load::<BTF, u32>(sk, off!(skc_daddr)).unwrap_or(0))
        } else {
            (0, 0)
        };
        let ports =
            (load::<BTF, u16>(sk, off!(skc_num)).unwrap_or(0), load::<BTF, u16>(sk, off!(skc_dport)).unwrap_or(0));
        (family, ports.0, ports.1, v4)
    };
    // Every field assigned once (a `Default` start compiles to a byte-wise memset).
    let (local_addr, remote_addr) = if family == AF_INET {
        (mapped(v4.0), mapped(v4.1))
    } else if family == AF_INET6 {
        v6_addrs::<BTF>(sk)
    } else {
        (words(0, 0), words(0, 0))
    };
    ConnAddr {
        family,
        local_port,
        remote_port: u16::from_be(remote_port),
        _pad: 0,
        netns: 0,
        _pad1: 0,
        local_addr,
        remote_addr,
    }
}

/// The local and remote IPv6 addresses of `sk`: through a helper, one read when the
/// remote one is right before the local one, as on every kernel the tracer knows.
#[inline(always)]
fn v6_addrs<const BTF: bool>(sk: u64) -> ([u8; 16], [u8; 16]) {
    let remote_at = off!(skc_v6_daddr);
    if !BTF && off!(skc_v6_rcv_saddr) == remote_at + 16 {
        let both = read::<[[u8; 16]; 2]>(sk, remote_at).unwrap_or([[0; 16]; 2]);
        return (both[1], both[0]);
    }
    (
        load::<BTF, [u8; 16]>(sk, off!(skc_v6_rcv_saddr)).unwrap_or([0; 16]),
        load::<BTF, [u8; 16]>(sk, remote_at).unwrap_or([0; 16]),
    )
}

/// [`conn_addr_of`] with the socket's network namespace: for the events that name a
/// listener (the same port in two namespaces is two listeners).
#[inline(always)]
pub fn conn_addr_in_netns<const BTF: bool>(sk: u64) -> ConnAddr {
    let mut addr = conn_addr_of::<BTF>(sk);
    addr.netns = netns_of::<BTF>(sk);
    addr
}

/// The inode number of `sk`'s network namespace (0 if unreadable).
#[inline(always)]
pub fn netns_of<const BTF: bool>(sk: u64) -> u32 {
    match load::<BTF, u64>(sk, off!(skc_net)) {
        Some(net) if net != 0 => load::<BTF, u32>(net, off!(net_ns_inum)).unwrap_or(0),
        _ => 0,
    }
}

/// An IPv4 address (as stored, network order) as IPv4-mapped IPv6 (`::ffff:a.b.c.d`),
/// built from two words.
#[inline(always)]
fn mapped(v4: u32) -> [u8; 16] {
    words(0, 0xffff_0000 | (v4 as u64) << 32)
}

/// Sixteen address bytes from two words (two stores, not a byte-wise memset).
#[inline(always)]
fn words(low: u64, high: u64) -> [u8; 16] {
    unsafe { core::mem::transmute::<[u64; 2], [u8; 16]>([low, high]) }
}

#[inline(always)]
pub fn tuple_key(addr: &ConnAddr) -> TupleKey {
    TupleKey { local_port: addr.local_port, remote_port: addr.remote_port, _pad: 0, remote_addr: addr.remote_addr }
}

/// A TCP socket over IPv4 or IPv6 (not UDP, Unix, MPTCP, ...).
#[inline(always)]
pub fn is_inet_tcp(sk: u64) -> bool {
    let family = read::<u16>(sk, off!(skc_family)).unwrap_or(0);
    if family != AF_INET && family != AF_INET6 {
        return false;
    }
    read::<u16>(sk, off!(sk_protocol)) == Some(IPPROTO_TCP) && read::<u16>(sk, off!(sk_type)) == Some(SOCK_STREAM)
}

/// Whether the current task may be had as a typed pointer (see `ProgramConfig::task_btf`;
/// a constant the verifier sees, so that an older kernel never meets the helper).
#[inline(always)]
fn task_btf() -> bool {
    unsafe { core::ptr::read_volatile(&crate::maps::CONFIG.task_btf) != 0 }
}

/// The `struct sock` behind file descriptor `fd` of the current task.
#[inline(always)]
pub fn sock_of_fd(fd: u32) -> Option<u64> {
    let (max_fds, fd_array) = if task_btf() {
        // The task as a typed pointer: its file table is three loads in place.
        let task = unsafe { bpf_get_current_task_btf() } as u64;
        let files = load::<true, u64>(task, off!(task_files))?;
        let fdt = load::<true, u64>(files, off!(files_fdt))?;
        (load::<true, u32>(fdt, off!(fdtable_max_fds))?, load::<true, u64>(fdt, off!(fdtable_fd))?)
    } else {
        fdtable_of(unsafe { bpf_get_current_task() } as u64)?
    };
    if fd >= max_fds {
        return None;
    }
    let file: u64 = read(fd_array, fd * 8)?;
    let socket: u64 = read(file, off!(file_private_data))?;
    let sk: u64 = read(socket, off!(socket_sk))?;
    (sk != 0).then_some(sk)
}

/// The size and the array of `task`'s file table, through helper reads.
#[inline(always)]
fn fdtable_of(task: u64) -> Option<(u32, u64)> {
    let files: u64 = read(task, off!(task_files))?;
    let fdt: u64 = read(files, off!(files_fdt))?;
    // `struct fdtable` starts with its size and its array (one read for both where the
    // offsets from BTF say so, as on every kernel the tracer knows).
    Some(if off!(fdtable_max_fds) == 0 && off!(fdtable_fd) == 8 {
        let head: [u64; 2] = read(fdt, 0)?;
        (head[0] as u32, head[1])
    } else {
        (read::<u32>(fdt, off!(fdtable_max_fds))?, read::<u64>(fdt, off!(fdtable_fd))?)
    })
}
