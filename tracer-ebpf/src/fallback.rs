//! The same hooks for kernels without the `sock_send_length` and `sock_recv_length`
//! tracepoints (before 6.3/6.4), and for accept without the syscall tracepoints'
//! descriptor walk:
//!
//! - BPF trampolines: fexit on `tcp_sendmsg`/`tcp_recvmsg`/`inet_csk_accept`, and the
//!   BPF LSM's `sock_graft` hook for accept;
//! - kprobes, where trampolines are missing or not permitted: the same functions, with a
//!   kprobe at entry keeping the arguments the return probe needs, per thread.
//!
//! Userspace attaches these only when an earlier implementation in its table does not
//! load or attach; they feed the same per-socket state.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{fentry, fexit, kprobe, kretprobe, lsm, map},
    maps::HashMap,
    programs::{FEntryContext, FExitContext, LsmContext, ProbeContext, RetProbeContext},
};

use crate::{
    accept::on_accepted,
    conn::state_mut,
    io::{on_recv_return, on_send_return, on_write_start},
    maps::{filter_by_port, is_traced_tgid},
};

/// `int tcp_sendmsg(struct sock *sk, struct msghdr *msg, size_t size)`.
#[fexit]
pub fn tcp_sendmsg_exit(ctx: FExitContext) -> i32 {
    on_send_return::<false>(ctx.arg(0), ctx.arg(3));
    0
}

/// The start of a write, for kernels without the `tcp_sendmsg_locked` tracepoint.
#[fentry]
pub fn tcp_sendmsg_enter(ctx: FEntryContext) -> i32 {
    on_write_start(ctx.arg(0), ctx.arg(1));
    0
}

/// The same from a kprobe (a second one on `tcp_sendmsg`: the send hook's entry probe
/// is there only when its return probe is).
#[kprobe]
pub fn tcp_sendmsg_start(ctx: ProbeContext) -> u32 {
    if let Some(sk) = ctx.arg::<u64>(0) {
        on_write_start(sk, ctx.arg::<u64>(1).unwrap_or(0));
    }
    0
}

/// `int tcp_recvmsg(sk, msg, len, flags, addr_len)` (5.19 and later).
#[fexit]
pub fn tcp_recvmsg_exit(ctx: FExitContext) -> i32 {
    on_recv_return::<false>(ctx.arg(0), ctx.arg(5), ctx.arg(3));
    0
}

/// `int tcp_recvmsg(sk, msg, len, nonblock, flags, addr_len)` (before 5.19).
#[fexit]
pub fn tcp_recvmsg_exit_nonblock(ctx: FExitContext) -> i32 {
    on_recv_return::<false>(ctx.arg(0), ctx.arg(6), ctx.arg(4));
    0
}

/// The BPF LSM's `sock_graft(struct sock *sk, struct socket *parent)`: accept() gives the
/// connection `sk` its socket, in the accepting task (the same hook on every kernel, and
/// only accepts pay for it). Other families' accepts pass too: only sockets in the state
/// map are taken.
#[lsm(hook = "sock_graft")]
pub fn sock_graft(ctx: LsmContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    if sk != 0 {
        on_accepted(sk);
    }
    0
}

/// `struct sock *inet_csk_accept(sk, flags, err, kern)` (before 6.10). Listed before the
/// two-argument form: the verifier rejects reading a fifth slot of a two-argument
/// function, while the reverse order would read `err` as the result.
#[fexit]
pub fn inet_csk_accept_exit_flags(ctx: FExitContext) -> i32 {
    let sk: u64 = ctx.arg(4);
    if sk != 0 {
        on_accepted(sk);
    }
    0
}

/// `struct sock *inet_csk_accept(struct sock *sk, struct proto_accept_arg *arg)` (6.10+).
#[fexit]
pub fn inet_csk_accept_exit(ctx: FExitContext) -> i32 {
    let sk: u64 = ctx.arg(2);
    if sk != 0 {
        on_accepted(sk);
    }
    0
}

/// Which argument of `tcp_recvmsg` holds the flags: 3, or 4 on kernels before 5.19
/// (which pass `nonblock` before them). Set by the loader from the function's BTF.
#[unsafe(no_mangle)]
pub static RECVMSG_FLAGS_ARG: u32 = 3;

/// A call in progress on a thread: what the return probe needs of its arguments.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Call {
    pub sk: u64,
    pub flags: i32,
    pub _pad: u32,
}

/// Calls of `tcp_recvmsg` and `tcp_sendmsg` in progress, by thread (pid_tgid).
#[map]
static RECV_CALLS: HashMap<u64, Call> = HashMap::with_max_entries(16384, 0);
#[map]
static SEND_CALLS: HashMap<u64, Call> = HashMap::with_max_entries(16384, 0);

/// Whether a call on `sk` can matter: a tracked connection, or one a traced process (or,
/// in port mode, any process) may adopt. Keeps the per-thread map for the others empty.
#[inline(always)]
fn worth_following(sk: u64) -> bool {
    state_mut(sk).is_some() || filter_by_port() || is_traced_tgid((bpf_get_current_pid_tgid() >> 32) as u32)
}

#[kprobe]
pub fn tcp_recvmsg_entry(ctx: ProbeContext) -> u32 {
    let Some(sk) = ctx.arg::<u64>(0) else { return 0 };
    if !worth_following(sk) {
        return 0;
    }
    // Both registers read, then one chosen: a context read at an offset chosen at run
    // time is refused by the verifier.
    let (third, fourth) = (ctx.arg::<i32>(3).unwrap_or(0), ctx.arg::<i32>(4).unwrap_or(0));
    let flags = if unsafe { core::ptr::read_volatile(&RECVMSG_FLAGS_ARG) } == 4 { fourth } else { third };
    let _ = RECV_CALLS.insert(&bpf_get_current_pid_tgid(), &Call { sk, flags, _pad: 0 }, 0);
    0
}

#[kretprobe]
pub fn tcp_recvmsg_return(ctx: RetProbeContext) -> u32 {
    let thread = bpf_get_current_pid_tgid();
    let Some(call) = (unsafe { RECV_CALLS.get(&thread) }).copied() else { return 0 };
    let _ = RECV_CALLS.remove(&thread);
    on_recv_return::<false>(call.sk, ctx.ret::<i32>(), call.flags);
    0
}

#[kprobe]
pub fn tcp_sendmsg_entry(ctx: ProbeContext) -> u32 {
    let Some(sk) = ctx.arg::<u64>(0) else { return 0 };
    if !worth_following(sk) {
        return 0;
    }
    let _ = SEND_CALLS.insert(&bpf_get_current_pid_tgid(), &Call { sk, flags: 0, _pad: 0 }, 0);
    0
}

#[kretprobe]
pub fn tcp_sendmsg_return(ctx: RetProbeContext) -> u32 {
    let thread = bpf_get_current_pid_tgid();
    let Some(call) = (unsafe { SEND_CALLS.get(&thread) }).copied() else { return 0 };
    let _ = SEND_CALLS.remove(&thread);
    on_send_return::<false>(call.sk, ctx.ret::<i32>());
    0
}

/// `inet_csk_accept` returns the accepted connection whatever its argument list.
#[kretprobe]
pub fn inet_csk_accept_return(ctx: RetProbeContext) -> u32 {
    let sk: u64 = ctx.ret();
    if sk != 0 {
        on_accepted(sk);
    }
    0
}
