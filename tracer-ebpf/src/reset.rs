//! Resets on traced connections, sent by the server's kernel or received from the peer.
//! A reset on an open connection only marks it (its close event carries the mark); one
//! sent just after the connection closed (an abortive close: unread data, SO_LINGER 0)
//! becomes an event of its own.

use tracer_common::{flags, kind, EventHeader, ResetSent};

use crate::{
    conn::{now, state_mut},
    kernel::{conn_addr_in_netns, read},
    maps::{reserve, RECENTLY_CLOSED},
    off,
};

tracepoint_hook! {
    /// `tcp_send_reset(sk, skb, reason)`; `sk` is null for segments that match no socket.
    fn tcp_send_reset / raw_tcp_send_reset (ctx) {
        let sk: u64 = ctx.arg(0);
        if sk == 0 {
            return 0;
        }
        if let Some(st) = state_mut(sk) {
            st.conn_flags |= flags::RESET_SENT;
            return 0;
        }
        let Some(closed) = RECENTLY_CLOSED.get_ptr(&sk) else { return 0 };
        let closed = unsafe { *closed };
        let _ = RECENTLY_CLOSED.remove(&sk);
        if read::<u16>(sk, off!(skc_dport)) != Some(closed.remote_port) {
            // Another socket at the same address since (a client of it on this machine).
            return 0;
        }
        let Some(mut slot) = reserve::<ResetSent>() else { return 0 };
        let e = slot.as_mut_ptr();
        unsafe {
            (*e).header = EventHeader {
                kind: kind::RESET_SENT,
                tgid: closed.owner,
                ts_ns: now(),
                sock: sk,
                ..EventHeader::default()
            };
            (*e).addr = conn_addr_in_netns::<false>(sk);
            (*e).addr.local_port = closed.local_port as u16;
        }
        slot.submit();
        0
    }
}

tracepoint_hook! {
    /// `tcp_receive_reset(sk)`: runs before the connection is torn down.
    fn tcp_receive_reset / raw_tcp_receive_reset (ctx) {
        let sk: u64 = ctx.arg(0);
        if let Some(st) = state_mut(sk) {
            st.conn_flags |= flags::RESET_RECEIVED;
        }
        0
    }
}
