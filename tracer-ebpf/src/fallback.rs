//! The same hooks for kernels without the `sock_send_length`, `sock_recv_length` and
//! `sk_data_ready` tracepoints (before 6.3/6.4): fexit on `tcp_sendmsg`/`tcp_recvmsg`,
//! fentry on `sock_def_readable` (TCP's data-ready callback). Userspace attaches these
//! only when the tracepoint is missing; they feed the same per-socket state.

use aya_ebpf::{
    macros::{fentry, fexit},
    programs::{FEntryContext, FExitContext},
};

use crate::io::{on_data_ready, on_recv_return, on_send_return};

/// `int tcp_sendmsg(struct sock *sk, struct msghdr *msg, size_t size)`.
#[fexit(function = "tcp_sendmsg")]
pub fn tcp_sendmsg_exit(ctx: FExitContext) -> i32 {
    on_send_return(ctx.arg(0), ctx.arg(3));
    0
}

/// `int tcp_recvmsg(sk, msg, len, flags, addr_len)` (5.19 and later).
#[fexit(function = "tcp_recvmsg")]
pub fn tcp_recvmsg_exit(ctx: FExitContext) -> i32 {
    on_recv_return(ctx.arg(0), ctx.arg(5), ctx.arg(3));
    0
}

/// `int tcp_recvmsg(sk, msg, len, nonblock, flags, addr_len)` (before 5.19).
#[fexit(function = "tcp_recvmsg")]
pub fn tcp_recvmsg_exit_nonblock(ctx: FExitContext) -> i32 {
    on_recv_return(ctx.arg(0), ctx.arg(6), ctx.arg(4));
    0
}

/// `void sock_def_readable(struct sock *sk)`: data queued on a socket.
#[fentry(function = "sock_def_readable")]
pub fn sock_def_readable(ctx: FEntryContext) -> i32 {
    on_data_ready(ctx.arg(0));
    0
}
