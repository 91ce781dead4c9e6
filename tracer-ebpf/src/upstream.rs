//! Connections the traced process opens: connect time (with SYN retransmits and the
//! outcome of failed connects) and, per request, the wait for the response.
//!
//! On a client socket a request starts when the process writes after it has read (or
//! first writes). The request's upstream wait ends when the first byte of the response
//! is queued on the socket; its event is emitted at the process's first read of the
//! response, so it reaches userspace before the server request whose think time it
//! belongs to.

use aya_ebpf::helpers::bpf_get_current_pid_tgid;
use tracer_common::{flags, kind, origin, side, ConnAddr, UpstreamConnect, UpstreamRequest, CONNECT_ABANDONED};

use crate::{
    bind,
    conn::{
        current_tid, dir, header, init_state, insert_state, now, remove_state, scratch_state, state_mut, SockState,
    },
    kernel::{conn_addr, read, tuple_key},
    labels::{capture, labels},
    maps::{is_traced_tgid, mark_state_port, note_connect, reserve, EXISTING_CLIENTS},
    off,
};

/// connect() moved the socket to SYN_SENT.
// A BPF subprogram of its own: its stack frame does not add to the hook's.
#[inline(never)]
pub fn on_connect_start(sk: u64) {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if !is_traced_tgid(tgid) {
        return;
    }
    let mut fresh = core::mem::MaybeUninit::<SockState>::uninit();
    let st = init_state(fresh.as_mut_ptr(), origin::CONNECTED);
    st.owner = tgid;
    st.tid = current_tid();
    st.synack_ns = now(); // connect start
                          // The first request on the connection is made for the request the connecting thread
                          // works for now: an event loop writes it once connected, maybe after other reads.
    (st.bound_sock, st.bound_first_read_ns) = bind::current_request(false);
    if insert_state(sk, st) {
        note_connect(true);
    }
}

/// SYN_SENT → ESTABLISHED (`error` 0) or → CLOSE (the socket error, or abandoned).
#[inline(always)]
pub fn on_connect_end(sk: u64, st: &mut SockState, error: i32) {
    note_connect(false);
    let ts = now();
    if error == 0 {
        st.established_ns = ts;
        // Its port is known now (not yet at the state change to SYN_SENT).
        mark_state_port(read::<u16>(sk, off!(skc_num)).unwrap_or(0));
    }
    let Some(mut slot) = reserve::<UpstreamConnect>() else { return };
    let e = slot.as_mut_ptr();
    unsafe {
        (*e).header = header(kind::UPSTREAM_CONNECT, st.owner, sk, ts);
        (*e).header.tid = st.tid;
        (*e).addr = conn_addr(sk);
        (*e).start_ns = st.synack_ns;
        (*e).end_ns = ts;
        (*e).syn_retransmits = st.synack_retransmits;
        (*e).error = error;
    }
    slot.submit();
}

/// A connecting socket closed (SYN_SENT → CLOSE): the connect failed with the socket's
/// error, or the application gave up on it. Called straight from the state hook, as a
/// subprogram of its own: kernels before 6.13 allow a call chain 512 bytes of frames.
#[inline(never)]
pub fn on_connect_closed(sk: u64) {
    let Some(st) = state_mut(sk) else { return };
    if st.origin == origin::CONNECTED && st.established_ns == 0 {
        let err = read::<i32>(sk, off!(sk_err)).unwrap_or(0);
        on_connect_end(sk, st, if err != 0 { err } else { CONNECT_ABANDONED });
    }
    remove_state(sk);
}

/// The first write of a request (from the write's start, or its return when the start
/// was not seen).
#[inline(always)]
///
/// `plain` (and its `len`): the plaintext a TLS connection's library is handed, or 0.
pub fn begin_request(sk: u64, st: &mut SockState, ts: u64, plain: u64, len: u64) {
    if labels() && (st.tls == 0 || plain != 0) {
        capture(sk, st.owner, side::UPSTREAM_REQUEST as u32, len, plain);
    }
    st.dir = dir::WRITING;
    st.first_write_ns = ts;
    // Data that came before this request is no response to it.
    st.pending_data_ns = 0;
    // The connect's binding serves the first request, if that server request is still
    // being answered (a pool may hand the new connection to another request).
    if st.requests != 0 || st.bound_sock == 0 || !bind::still_open(st.bound_sock, st.bound_first_read_ns) {
        (st.bound_sock, st.bound_first_read_ns) = bind::current_request(true);
    }
}

#[inline(always)]
pub fn on_write(sk: u64, st: &mut SockState, len: u64, ts: u64) {
    if st.dir != dir::WRITING {
        begin_request(sk, st, ts, 0, u64::MAX);
    }
    st.last_write_ns = ts;
    st.tid = current_tid();
    st.req_out += len;
    st.total_out += len;
}

#[inline(always)]
pub fn on_read(sk: u64, st: &mut SockState, len: u64, ts: u64, plain: u64) {
    if st.dir == dir::WRITING {
        st.first_read_ns = ts;
        if labels() && (st.tls == 0 || plain != 0) {
            // Before the request's event, which takes what it says.
            capture(sk, st.owner, side::UPSTREAM_RESPONSE as u32, len, plain);
        }
        emit_request(sk, st, 0);
        st.dir = dir::READING;
        bind::note_upstream_response(st.bound_sock, st.bound_first_read_ns);
    }
    st.req_in += len;
    st.total_in += len;
}

/// Emits the request in progress and starts counting the next.
#[inline(always)]
pub fn emit_request(sk: u64, st: &mut SockState, extra_flags: u32) {
    let response_ns = if st.pending_data_ns >= st.first_write_ns { st.pending_data_ns } else { 0 };
    if let Some(mut slot) = reserve::<UpstreamRequest>() {
        let e = slot.as_mut_ptr();
        unsafe {
            (*e).header = header(kind::UPSTREAM_REQUEST, st.owner, sk, now());
            (*e).header.tid = st.tid;
            (*e).addr = conn_addr(sk);
            (*e).first_write_ns = st.first_write_ns;
            (*e).last_write_ns = st.last_write_ns;
            (*e).response_ns = response_ns;
            (*e).first_read_ns = st.first_read_ns;
            (*e).bytes_out = st.req_out;
            (*e).bytes_in = st.req_in;
            (*e).flags = extra_flags;
            (*e).origin = st.origin;
            (*e).bound_sock = st.bound_sock;
            (*e).bound_first_read_ns = st.bound_first_read_ns;
        }
        slot.submit();
    }
    st.requests += 1;
    st.req_out = 0;
    st.req_in = 0;
    st.first_read_ns = 0;
}

/// A traced process `tgid` writes to (or reads from) a TCP connection the tracer has not
/// seen it open. When userspace found it among the process's upstream connections at
/// start, it is tracked from here on.
#[inline(always)]
pub fn adopt_existing(sk: u64, tgid: u32) -> bool {
    let addr: ConnAddr = conn_addr(sk);
    let key = tuple_key(&addr);
    if EXISTING_CLIENTS.get_ptr(&key).is_none() {
        return false;
    }
    let _ = EXISTING_CLIENTS.remove(&key);
    let Some(st) = scratch_state(origin::EXISTING_CONNECTED) else { return false };
    st.owner = tgid;
    st.tid = current_tid();
    st.local_port = addr.local_port as u32;
    insert_state(sk, st)
}

tracepoint_hook! {
    /// `tcp_retransmit_skb(sk, skb, ...)`: counts the SYNs of a traced connect sent again.
    fn tcp_retransmit_skb / raw_tcp_retransmit_skb (ctx) {
        let sk: u64 = ctx.arg(0);
        if let Some(st) = state_mut(sk) {
            if st.origin == origin::CONNECTED && st.established_ns == 0 {
                st.synack_retransmits += 1;
            }
        }
        0
    }
}

/// Flags for a request cut short by the connection's close.
pub const NO_RESPONSE: u32 = flags::ABORTED;

/// The request in progress when the connection closed, which got no response. A
/// subprogram of its own for the close path (see `state::on_close`).
#[inline(never)]
pub fn emit_unanswered(sk: u64, st: &mut SockState) {
    if st.tls & tracer_common::tls::RECORDS != 0 && st.req_out <= crate::conn::ALERT_BYTES {
        // Followed from its TLS records: an alert-sized last write is the client's
        // close_notify, no request.
        return;
    }
    emit_request(sk, st, NO_RESPONSE);
}
