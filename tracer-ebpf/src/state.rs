//! TCP state changes: a passive connection is established (queued for accept), an
//! active one starts connecting, a connection closes.

use tracer_common::origin;

use crate::{
    conn::{dir, emit_close, init_state, insert_state, now, remove_state, state_mut, SockState},
    kernel::{conn_addr, conn_addr_of, load, read, tcp_sock, tuple_key},
    maps::{
        connects_open, filter_by_port, is_traced_port, is_traced_tgid, mark_state_port, note_pending_listener,
        setup_wanted, state_port_marked, ClosedConn, RECENTLY_CLOSED, SYNACKS,
    },
    off, upstream,
};

pub const TCP_ESTABLISHED: i32 = 1;
pub const TCP_SYN_SENT: i32 = 2;
pub const TCP_SYN_RECV: i32 = 3;
const TCP_FIN_WAIT1: i32 = 4;
pub const TCP_FIN_WAIT2: i32 = 5;
pub const TCP_TIME_WAIT: i32 = 6;
pub const TCP_CLOSE: i32 = 7;
pub const TCP_CLOSE_WAIT: i32 = 8;
const TCP_LAST_ACK: i32 = 9;
pub const TCP_LISTEN: i32 = 10;
pub const TCP_CLOSING: i32 = 11;

tracepoint_hook! {
    fn inet_sock_set_state / raw_inet_sock_set_state (ctx) {
        let sk: u64 = ctx.arg(0);
        let old: i32 = ctx.arg(1);
        let new: i32 = ctx.arg(2);
        match (old, new) {
            (TCP_SYN_RECV, TCP_ESTABLISHED) => {
                on_passive_established::<BTF, true>(sk);
            }
            (_, TCP_SYN_SENT) => upstream::on_connect_start(sk),
            (_, TCP_LISTEN) => on_listen(sk),
            _ => on_state_change::<BTF>(sk, old, new),
        }
        0
    }
}

/// A state change of `sk` from `old` to `new` past its setup, connect start or listen:
/// from the state tracepoint, or from the socket-operation program for the connections
/// it has asked the kernel to tell it of (`socket_ops`). Either may be of a socket with
/// no state.
#[inline(always)]
pub fn on_state_change<const BTF: bool>(sk: u64, old: i32, new: i32) {
    match (old, new) {
        (TCP_SYN_SENT, TCP_ESTABLISHED) if connects_open() => on_active_established(sk),
        // A connect that failed or was given up.
        (TCP_SYN_SENT, TCP_CLOSE) => upstream::on_connect_closed(sk),
        // The arms below look up a state, which only a socket on a marked port has.
        (_, TCP_CLOSE) if closing_may_have_state::<BTF>(sk) => on_close::<BTF>(sk, old),
        // Our FIN is acknowledged, so is every byte before it.
        (_, TCP_FIN_WAIT2) | (TCP_CLOSING, TCP_TIME_WAIT) if may_have_state::<BTF>(sk) => on_all_acked(sk),
        // The peer closed its side (before we closed ours, or as we did).
        (TCP_ESTABLISHED, TCP_CLOSE_WAIT) | (TCP_FIN_WAIT1, TCP_CLOSING) if may_have_state::<BTF>(sk) => {
            on_peer_fin(sk)
        }
        _ => {}
    }
}

/// Whether `sk`, still holding its port, may have a state: every state's port is marked
/// (`insert_state`), from the state's creation on (a connecting socket's from its
/// establishment: the arms for a connect do not ask). The other end of a connection on
/// this machine and the servers not traced are told by an array read, with no lookup.
/// Where the port takes a helper call to read (a raw tracepoint), which costs about
/// what it spares, the lookup is made anyway.
#[inline(always)]
fn may_have_state<const BTF: bool>(sk: u64) -> bool {
    !BTF || state_port_marked(load::<BTF, u16>(sk, off!(skc_num)).unwrap_or(0))
}

/// [`may_have_state`] for a socket closing: the kernel has given its port back by then
/// (`skc_num` reads 0), but the socket still says it as its source port.
#[inline(always)]
fn closing_may_have_state<const BTF: bool>(sk: u64) -> bool {
    if !BTF {
        return true;
    }
    // The source port is in `struct inet_sock`, past the `struct sock` the tracepoint
    // types `sk` as: loaded through the socket as a `struct tcp_sock`.
    let Some(tp) = tcp_sock::<BTF>(sk) else { return true };
    state_port_marked(u16::from_be(load::<BTF, u16>(tp, off!(inet_sport)).unwrap_or(0)))
}

/// A socket starts listening: a traced process's listener has its port marked, so that
/// its connections' setups are recorded (see `maps::setup_wanted`). Its port is bound by
/// now unless listen() picks one, just after this: then it is marked at the first setup
/// on a port not marked.
#[inline(never)]
pub fn on_listen(sk: u64) {
    crate::setup::note_running();
    if filter_by_port() || !is_traced_tgid((aya_ebpf::helpers::bpf_get_current_pid_tgid() >> 32) as u32) {
        return;
    }
    match read::<u16>(sk, off!(skc_num)).unwrap_or(0) {
        0 => note_pending_listener(sk),
        port => mark_state_port(port),
    }
}

/// The final ACK of a handshake was processed: the connection is queued on its
/// listener. The owner is unknown until accept() returns it. Whether the connection has
/// a state now (recorded here or by the other program). `TWIN`: a second program is
/// told of the same change (the state tracepoint's, see `setup`), and the first of the
/// two to run records it; without it (the socket-operation program taking every state
/// change), the only one.
// A BPF subprogram of its own: its stack frame does not add to the hook's.
#[inline(never)]
pub fn on_passive_established<const BTF: bool, const TWIN: bool>(sk: u64) -> bool {
    let local_port = load::<BTF, u16>(sk, off!(skc_num)).unwrap_or(0);
    if filter_by_port() && !is_traced_port(local_port) {
        return false;
    }
    // In process mode, a port no traced process listens on.
    if !setup_wanted(local_port) {
        return false;
    }
    if TWIN && crate::setup::handled_just_now(sk) {
        return true;
    }
    let ts = now();
    let mut fresh = core::mem::MaybeUninit::<SockState>::uninit();
    let st = init_state(fresh.as_mut_ptr(), origin::ACCEPTED);
    st.established_ns = ts;
    st.local_port = local_port as u32;
    // The child inherits the request's SYN-ACK retransmits: only then is the first
    // SYN-ACK's time to be found in SYNACKS (the common case needs no lookup).
    let Some(tp) = tcp_sock::<BTF>(sk) else { return false };
    let retransmitted = load::<BTF, u32>(tp, off!(tcp_total_retrans)).unwrap_or(1) != 0;
    let key = if retransmitted { Some(tuple_key(&conn_addr(sk))) } else { None };
    if let Some(info) = key.as_ref().and_then(|key| SYNACKS.get_ptr(key)) {
        // A SYN-ACK was retransmitted: the request socket told us when the first went out.
        let info = unsafe { *info };
        st.synack_ns = info.first_synack_ns;
        st.synack_retransmits = info.retransmits;
        if let Some(key) = key.as_ref() {
            let _ = SYNACKS.remove(key);
        }
    } else {
        // No retransmit: the kernel measured the SYN-ACK round trip into srtt just before
        // this state change (srtt_us holds 8 × the first sample, in microseconds).
        let srtt_us8 = load::<BTF, u32>(tp, off!(tcp_srtt_us)).unwrap_or(0) as u64;
        let rtt_ns = (srtt_us8 >> 3) * 1000;
        if rtt_ns > 0 && rtt_ns < ts {
            st.synack_ns = ts - rtt_ns;
        }
    }
    let inserted = insert_state(sk, st);
    if TWIN {
        crate::setup::note_handled(sk);
    }
    inserted
}

/// Each arm of the state hook is a BPF subprogram of its own, with its own stack frame:
/// kernels before 6.13 limit the frames of a call chain to 512 bytes together, so the
/// hook's own frame must stay small.
#[inline(never)]
fn on_active_established(sk: u64) {
    if let Some(st) = state_mut(sk) {
        upstream::on_connect_end(sk, st, 0);
    }
}

#[inline(always)]
fn on_all_acked(sk: u64) {
    if let Some(st) = state_mut(sk) {
        all_acked(st);
    }
}

#[inline(never)]
fn on_peer_fin(sk: u64) {
    if let Some(st) = state_mut(sk) {
        st.peer_fin_ns = now();
    }
}

#[inline(always)]
fn all_acked(st: &mut SockState) {
    if st.dir == dir::WRITING && st.acked_ns == 0 {
        st.acked_ns = now();
    }
}

// The close path's parts are BPF subprograms of their own, so that the frames of a
// call chain stay within the 512 bytes kernels before 6.13 allow.
#[inline(never)]
fn on_close<const BTF: bool>(sk: u64, old: i32) {
    let Some(st) = state_mut(sk) else { return };
    if old == TCP_LAST_ACK {
        // The peer closed first and has now acknowledged our FIN (one lookup for both).
        all_acked(st);
    }
    if old == TCP_FIN_WAIT2 && st.peer_fin_ns == 0 {
        // We closed first; the peer's FIN closes the connection (TIME_WAIT goes on in
        // a socket of its own).
        st.peer_fin_ns = now();
    }
    if old == TCP_LAST_ACK || old == TCP_FIN_WAIT2 || old == TCP_CLOSING || old == TCP_TIME_WAIT {
        st.conn_flags |= tracer_common::flags::ORDERLY_CLOSE;
    }
    if origin::is_client(st.origin) {
        if st.dir == dir::WRITING {
            // A request that got no response.
            upstream::emit_unanswered(sk, st);
        }
        close_event::<BTF>(sk, st);
    } else if st.owner != 0 {
        close_event::<BTF>(sk, st);
        // An abortive close (straight from an open state, in the application's close)
        // sends its reset after this state change; an orderly one never does, nor does a
        // connection the peer reset.
        let reset_by_peer = st.conn_flags & tracer_common::flags::RESET_RECEIVED != 0;
        if (old == TCP_ESTABLISHED || old == TCP_CLOSE_WAIT || old == TCP_FIN_WAIT1) && !reset_by_peer {
            let remote_port = load::<BTF, u16>(sk, off!(skc_dport)).unwrap_or(0);
            let closed = ClosedConn { owner: st.owner, local_port: st.local_port as u16, remote_port };
            let _ = RECENTLY_CLOSED.insert(&sk, &closed, 0);
        }
    }
    // (A connect that never completed closes from SYN_SENT: `on_connect_closed`.)
    remove_state(sk);
}

#[inline(never)]
fn close_event<const BTF: bool>(sk: u64, st: &mut SockState) {
    let addr = conn_addr_of::<BTF>(sk);
    emit_close(sk, st, &addr, now());
}
