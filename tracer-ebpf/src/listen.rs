//! Listen-queue overflows seen from the drop tracepoint: a handshake-completing ACK the
//! listener dropped because its accept queue was full.
//!
//! The kernel counts every listen drop in the listener's drop counter (which userspace
//! reads through sock_diag), but an overflowed ACK is counted there twice. Counting those
//! ACKs here lets userspace report exactly the listen drops.

use aya_ebpf::{helpers::bpf_get_socket_cookie, macros::btf_tracepoint, programs::BtfTracePointContext};

use crate::maps::{drop_reason_listen_overflow, ACK_OVERFLOWS};

/// `kfree_skb(skb, location, reason, rx_sk)`: runs for every dropped packet, so it does
/// nothing but compare the reason unless it is a listen overflow.
#[btf_tracepoint(function = "kfree_skb")]
pub fn kfree_skb(ctx: BtfTracePointContext) -> i32 {
    let reason: u32 = ctx.arg(2);
    if reason != drop_reason_listen_overflow() {
        return 0;
    }
    let rx_sk: *mut core::ffi::c_void = ctx.arg(3);
    if rx_sk.is_null() {
        return 0;
    }
    let cookie = unsafe { bpf_get_socket_cookie(rx_sk) };
    match ACK_OVERFLOWS.get_ptr_mut(&cookie) {
        Some(n) => unsafe { *n += 1 },
        None => {
            let _ = ACK_OVERFLOWS.insert(&cookie, &1, 0);
        }
    }
    0
}
