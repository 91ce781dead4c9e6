//! The socket-operation program, on the cgroups of the traced processes and of their
//! listeners: the kernel calls it for their TCP sockets alone, and never skips it.
//!
//! It is told of every passive connection those listeners establish, just before the
//! state change (see `setup`). Where the kernel also lets a TCP iterator set a socket's
//! operation flags (6.12+), it takes the state changes of the traced connections too,
//! in place of the state tracepoint, which runs for every state change of every socket
//! on the machine: it asks the kernel to tell it of the state changes of each traced
//! connection as it is established or starts connecting, and the iterator
//! ([`flag_open_sockets`]) asks the same for the connections open as tracing starts
//! (and when a cgroup is added). Userspace turns this on (`STATE_CALLS`) only once the
//! iterator has shown it works here; until then the state tracepoint is the hook.

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_SOCK_OPS_TCP_LISTEN_CB,
    },
    cty::c_void,
    helpers::generated::{bpf_getsockopt, bpf_setsockopt, bpf_skc_to_tcp_sock},
    macros::{map, sock_ops},
    maps::Array,
    programs::SockOpsContext,
};

use crate::{
    kernel::load,
    off,
    setup::note_running,
    state::{
        on_listen, on_passive_established, on_state_change, TCP_CLOSE, TCP_CLOSE_WAIT, TCP_CLOSING, TCP_ESTABLISHED,
        TCP_FIN_WAIT2, TCP_LISTEN, TCP_SYN_SENT, TCP_TIME_WAIT,
    },
    upstream,
};

/// Non-zero: the state changes of the traced connections come from [`socket_ops`] (the
/// state tracepoint is not attached). Written by userspace.
#[map]
static STATE_CALLS: Array<u32> = Array::with_max_entries(1, 0);

#[inline(always)]
fn state_calls() -> bool {
    STATE_CALLS.get(0).is_some_and(|on| *on != 0)
}

/// What the iterator did in its last run (userspace clears it before each): sockets
/// flagged, sockets the kernel refused to flag, and the last refusal's error.
#[map]
static FLAGGING: Array<i64> = Array::with_max_entries(3, 0);

#[inline(always)]
fn note_flagging(index: u32, value: i64) {
    if let Some(slot) = FLAGGING.get_ptr_mut(index) {
        unsafe {
            if index == 2 {
                *slot = value;
            } else {
                *slot += value;
            }
        }
    }
}

/// `SOL_TCP`, and the socket option that holds a TCP socket's operation flags.
const SOL_TCP: i32 = 6;
const TCP_BPF_SOCK_OPS_CB_FLAGS: i32 = 1008;

#[sock_ops]
pub fn socket_ops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    let states = state_calls();
    // The kernel calls it for the listener's initial timeout, window and ECN too, and
    // for the other operations of every socket in the cgroup: those end here.
    let wanted = match op {
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => true,
        // Only the changes the state hook acts on (see `on_state_change`): a passive
        // connection's establishment was the call before, and a close's LAST_ACK or
        // FIN_WAIT1 is of no use.
        BPF_SOCK_OPS_STATE_CB => states && acted_on(ctx.arg(0) as i32, ctx.arg(1) as i32),
        BPF_SOCK_OPS_TCP_CONNECT_CB | BPF_SOCK_OPS_TCP_LISTEN_CB => states,
        _ => false,
    };
    if !wanted {
        return 1;
    }
    let Some(tp) = tcp_socket(&ctx) else { return 1 };
    match op {
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            // With the state calls on, the state tracepoint is not attached: this is the
            // only program told of the setup. Every connection is asked for, traced or
            // not yet: one whose setup is not recorded (its port not marked yet, the
            // state map full) may get its state at its first read all the same
            // (`io::adopt`), and its close must be seen then.
            if states {
                on_passive_established::<true, false>(tp);
                ask_for_states(&ctx);
            } else {
                on_passive_established::<true, true>(tp);
            }
        }
        // A state change of a socket with no state costs a port mark's read (as on the
        // tracepoint).
        BPF_SOCK_OPS_STATE_CB => on_state_change::<true>(tp, ctx.arg(0) as i32, ctx.arg(1) as i32),
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            upstream::on_connect_start(tp);
            // Every connect, as every passive connection above.
            ask_for_states(&ctx);
        }
        BPF_SOCK_OPS_TCP_LISTEN_CB => on_listen(tp),
        _ => {}
    }
    1
}

/// Whether the state hook acts on a change from `old` to `new` (past a setup, a connect's
/// start and a listen, which have operations of their own).
#[inline(always)]
fn acted_on(old: i32, new: i32) -> bool {
    match new {
        TCP_ESTABLISHED => old == TCP_SYN_SENT,
        TCP_CLOSE | TCP_FIN_WAIT2 | TCP_CLOSE_WAIT | TCP_CLOSING | TCP_TIME_WAIT => true,
        _ => false,
    }
}

/// [`socket_ops`] for kernels whose socket-operation programs may not call what the
/// state hook needs (the current task's ids, on 5.10): told of the setups alone, it
/// records them before the state tracepoint, which takes every other state change.
#[sock_ops]
pub fn setups(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        if let Some(tp) = tcp_socket(&ctx) {
            on_passive_established::<true, true>(tp);
        }
    }
    1
}

/// The operation's socket as the kernel's own typed pointer (the key of its state, and
/// its fields loaded in place); `None` when it has no full TCP socket.
#[inline(always)]
fn tcp_socket(ctx: &SockOpsContext) -> Option<u64> {
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return None;
    }
    let tp = unsafe { bpf_skc_to_tcp_sock(sk as *mut c_void) };
    (!tp.is_null()).then_some(tp as u64)
}

/// Asks the kernel to call [`socket_ops`] at each state change of this socket.
#[inline(always)]
fn ask_for_states(ctx: &SockOpsContext) {
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
}

/// Context of a TCP iterator program (`struct bpf_iter__tcp`): its second field is the
/// socket, null at the end.
#[repr(C)]
struct TcpIterContext {
    meta: *const c_void,
    sk_common: *const c_void,
}

/// Run by userspace over every TCP socket of a network namespace: asks the kernel to
/// tell [`socket_ops`] of the state changes of each open connection, which had none of
/// its calls as it was established (before tracing started, or before its cgroup was
/// added). Every connection is flagged, traced or not: which are traced is known only
/// at their first read or write. Outside the cgroups the program is attached to, a flag
/// costs a connection nothing unless another socket-operation program is attached
/// there, which is then told of its state changes too (and ignores them, as such
/// programs do with the operations they do not know). The flags stay after tracing.
/// Listeners are not flagged (their connections are, as they are established).
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub extern "C" fn flag_open_sockets(ctx: *mut c_void) -> i32 {
    note_running();
    let skc = unsafe { (*(ctx as *const TcpIterContext)).sk_common };
    if skc.is_null() {
        return 0;
    }
    let tp = unsafe { bpf_skc_to_tcp_sock(skc as *mut c_void) };
    if tp.is_null() {
        return 0;
    }
    let state = load::<true, u8>(tp as u64, off!(skc_state)).unwrap_or(0) as i32;
    if state == TCP_LISTEN || state == TCP_CLOSE {
        return 0;
    }
    // Read and written by the helpers through the pointer alone.
    let mut flags: i32 = 0;
    let flags_ptr = &raw mut flags;
    let mut rc = unsafe { bpf_getsockopt(tp.cast(), SOL_TCP, TCP_BPF_SOCK_OPS_CB_FLAGS, flags_ptr.cast(), 4) };
    if rc == 0 {
        unsafe { flags_ptr.write_volatile(flags_ptr.read_volatile() | BPF_SOCK_OPS_STATE_CB_FLAG as i32) };
        rc = unsafe { bpf_setsockopt(tp.cast(), SOL_TCP, TCP_BPF_SOCK_OPS_CB_FLAGS, flags_ptr.cast(), 4) };
    }
    if rc == 0 {
        note_flagging(0, 1);
    } else {
        note_flagging(1, 1);
        note_flagging(2, rc);
    }
    0
}
