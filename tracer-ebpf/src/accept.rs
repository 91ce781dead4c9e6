//! accept()/accept4() return: the connection gets its owner, or is forgotten when the
//! accepting process is not traced. Here from the syscall tracepoints (the socket is
//! found through the new descriptor); `fallback` has the same from `inet_csk_accept`.

use aya_ebpf::{helpers::bpf_get_current_pid_tgid, macros::tracepoint, programs::TracePointContext};

use crate::{
    conn::{emit_open, now, remove_state, state_mut, SockState},
    kernel::{conn_addr, sock_of_fd},
    maps::{filter_by_port, is_traced_tgid, known_untraced, mark_state_port, trace_tgid},
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

/// accept() is returning connection `sk` to the current process.
#[inline(always)]
pub fn on_accepted(sk: u64) {
    let Some(st) = state_mut(sk) else {
        crate::setup::accepted_without_state(sk);
        return;
    };
    if st.owner == 0 {
        take_ownership(sk, st);
    }
}

/// The current process accepted `sk` (now, or unseen before its first read or write):
/// it becomes the owner, or the connection is forgotten when the process is not traced.
/// Whether it is traced.
///
/// An accept is unseen when the call was already under way as tracing started (a
/// server blocked in accept()) and its hook is on the function's return (fexit,
/// kretprobe): such a return is not caught. Its first read or write stands in for it.
// Inlined: as a subprogram its frame would add to the receive path's, past the
// 512 bytes a call chain may use on kernels before 6.13.
#[inline(always)]
pub fn take_ownership(sk: u64, st: &mut SockState) -> bool {
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
    emit_open(sk, st, &conn_addr(sk), ts, first_data_ns);
    true
}
