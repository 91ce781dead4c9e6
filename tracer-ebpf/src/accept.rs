//! accept()/accept4() return: the connection gets its owner, or is forgotten when the
//! accepting process is not traced. Here from the syscall tracepoints (the socket is
//! found through the new descriptor) and from the cgroup hook on the peer's address,
//! which accept() asks for; `fallback` has the same from `inet_csk_accept`.

use aya_ebpf::{
    cty::c_void,
    helpers::{bpf_get_current_pid_tgid, generated::bpf_skc_to_tcp_sock},
    macros::{cgroup_sock_addr, tracepoint},
    programs::{SockAddrContext, TracePointContext},
};
use tracer_common::{counter, origin};

use crate::{
    conn::{emit_open, now, remove_state, state_mut, SockState},
    kernel::{conn_addr_in_netns, read, sock_of_fd},
    maps::{
        bump, filter_by_port, is_traced_port, is_traced_tgid, known_untraced, mark_state_port, setup_wanted,
        trace_tgid, HOOKED_NS,
    },
    off,
};

/// Offset of `ret` in the `syscalls:sys_exit_*` records (after the 8-byte common header
/// and the 8-byte syscall number): fixed by the syscall tracepoint ABI.
const SYS_EXIT_RET: usize = 16;

#[tracepoint(category = "syscalls", name = "sys_exit_accept4")]
pub fn sys_exit_accept4(ctx: TracePointContext) -> i32 {
    on_accept_return(&ctx);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_accept")]
pub fn sys_exit_accept(ctx: TracePointContext) -> i32 {
    on_accept_return(&ctx);
    0
}

#[inline(always)]
fn on_accept_return(ctx: &TracePointContext) {
    let Ok(fd) = (unsafe { ctx.read_at::<i64>(SYS_EXIT_RET) }) else { return };
    if fd < 0 {
        return;
    }
    // A server not traced (in process mode): no walk of its file table. A state its
    // connection may have (on a port a traced process listens on too) goes at its close.
    if !filter_by_port() && known_untraced((bpf_get_current_pid_tgid() >> 32) as u32) {
        return;
    }
    let Some(sk) = sock_of_fd(fd as u32) else { return };
    on_accepted(sk);
}

/// The peer's address of an IPv4 socket is asked for, in a process of a cgroup the
/// program is attached to: by accept() (with an address to fill in), which has just
/// taken the connection from its listener's queue, or by getpeername(). No other process
/// pays for it, and no other system call: where nothing else hooks accept (no kprobes,
/// no BPF trampolines), this replaces the syscall tracepoints, which tax every system
/// call on the machine. The accepts that ask for no address are not seen here: the
/// connection's first read or write takes it (`adopt_unseen`), and userspace adds the
/// syscall tracepoints from the first of them on.
#[cgroup_sock_addr(getpeername4)]
pub fn accept_peer4(ctx: SockAddrContext) -> i32 {
    on_peer_address(&ctx);
    1
}

/// [`accept_peer4`] for IPv6 sockets (IPv4 clients of an IPv6 listener among them).
#[cgroup_sock_addr(getpeername6)]
pub fn accept_peer6(ctx: SockAddrContext) -> i32 {
    on_peer_address(&ctx);
    1
}

#[inline(always)]
fn on_peer_address(ctx: &SockAddrContext) {
    if !filter_by_port() && known_untraced((bpf_get_current_pid_tgid() >> 32) as u32) {
        return;
    }
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    if sk.is_null() {
        return;
    }
    // The socket as the kernel's own pointer (the key of its state).
    let tp = unsafe { bpf_skc_to_tcp_sock(sk as *mut c_void) };
    if tp.is_null() {
        return;
    }
    let sk = tp as u64;
    match state_mut(sk) {
        // An accepted connection not yet owned: only accept() asks for its peer so
        // early (getpeername() comes after, on a descriptor accept() returned).
        Some(st) if st.owner == 0 && !origin::is_client(st.origin) => {
            // A typed pointer: its addresses are loaded in place.
            take_ownership::<true>(sk, st);
        }
        Some(_) => {}
        // No state: a missed setup when accept() is asking. getpeername() on a
        // connection the traced process opened is told by its port, which no traced
        // process listens on.
        None => {
            let port = read::<u16>(sk, off!(skc_num)).unwrap_or(0);
            let listening = if filter_by_port() { is_traced_port(port) } else { setup_wanted(port) };
            if listening {
                crate::setup::accepted_without_state(sk);
            }
        }
    }
}

/// accept() is returning connection `sk` to the current process.
#[inline(always)]
pub fn on_accepted(sk: u64) {
    let Some(st) = state_mut(sk) else {
        crate::setup::accepted_without_state(sk);
        return;
    };
    if st.owner == 0 {
        take_ownership::<false>(sk, st);
    }
}

/// The current process accepted `sk` (now, or unseen before its first read or write):
/// it becomes the owner, or the connection is forgotten when the process is not traced.
/// Whether it is traced.
///
/// An accept is unseen when the accept hook is on the peer's address (`accept_peer4`)
/// and the process asked accept() for none, or when the call was already under way as
/// tracing started (a server blocked in accept()) and its hook is on the function's
/// return (fexit, kretprobe): such a return is not caught. Its first read or write
/// stands in for it.
// Inlined: as a subprogram its frame would add to the receive path's, past the
// 512 bytes a call chain may use on kernels before 6.13.
#[inline(always)]
pub fn take_ownership<const BTF: bool>(sk: u64, st: &mut SockState) -> bool {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if !filter_by_port() && !is_traced_tgid(tgid) {
        remove_state(sk);
        return false;
    }
    if filter_by_port() && !is_traced_tgid(tgid) {
        // Port mode: the process serving the port is traced from now on, so that its
        // upstream calls are seen too.
        trace_tgid(tgid);
    }
    let ts = now();
    st.owner = tgid;
    mark_state_port(st.local_port as u16);
    let first_data_ns = st.pending_data_ns;
    emit_open(sk, st, &conn_addr_in_netns::<BTF>(sk), ts, first_data_ns);
    true
}

/// The first read or write of an accepted connection that has no owner yet: its accept
/// was not seen (see [`take_ownership`]). Counted when a traced process takes it and the
/// connection was established after every hook was in place (before, its accept may
/// have come before the accept hook): its accept wait runs to this call, and userspace
/// learns that accept needs another hook.
#[inline(always)]
pub fn adopt_unseen(sk: u64, st: &mut SockState) -> bool {
    let established_ns = st.established_ns;
    let traced = take_ownership::<false>(sk, st);
    if traced {
        let hooked_ns = HOOKED_NS.get(0).copied().unwrap_or(0);
        if hooked_ns != 0 && established_ns > hooked_ns {
            bump(counter::UNSEEN_ACCEPTS);
        }
    }
    traced
}
