//! Per-connection state and the events emitted from it.

use aya_ebpf::helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns};
use tracer_common::{
    counter, flags, kind, origin, ClosingExchange, ConnAddr, ConnClose, ConnOpen, EventHeader, Request, ShortRequest,
    ACK_PENDING, GOODBYE_WINDOW_NS,
};

use crate::maps::{bump, mark_state_port, reserve, SOCKS};

pub use tracer_common::{dir, SockState};

#[inline(always)]
pub fn now() -> u64 {
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
pub fn current_tid() -> u32 {
    bpf_get_current_pid_tgid() as u32
}

#[inline(always)]
pub fn header(kind: u16, tgid: u32, sk: u64, ts_ns: u64) -> EventHeader {
    let tid = bpf_get_current_pid_tgid() as u32;
    EventHeader { kind, _pad0: 0, tgid, tid, _pad1: 0, ts_ns, sock: sk }
}

#[inline(always)]
pub fn state_mut(sk: u64) -> Option<&'static mut SockState> {
    SOCKS.get_ptr_mut(sk).map(|p| unsafe { &mut *p })
}

/// Makes `*st` a fresh state of `origin`: all zeros (direction idle, nothing seen) but
/// the origin, written eight bytes per store. (Assigning a whole struct compiles to a
/// call to the BPF library's memset, which clears one byte at a time: some 800
/// instructions for the 200 bytes.)
#[inline(always)]
pub fn init_state<'a>(st: *mut SockState, origin: u32) -> &'a mut SockState {
    let words = st.cast::<u64>();
    for i in 0..size_of::<SockState>() / 8 {
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
    let st = unsafe { &mut *st };
    st.origin = origin;
    st
}

/// A fresh state of `origin`, built in the per-CPU scratch map (not on the stack).
#[inline(always)]
pub fn scratch_state(origin: u32) -> Option<&'static mut SockState> {
    Some(init_state(crate::maps::NEW_STATE.get_ptr_mut(0)?, origin))
}

#[inline(always)]
pub fn insert_state(sk: u64, state: &SockState) -> bool {
    if SOCKS.insert(sk, state, 0).is_err() {
        bump(counter::STATE_FULL);
        return false;
    }
    // Every state's port is marked: the state hook and the segment hook look up only
    // the sockets on marked ports. (A connecting socket has no port yet: it is marked
    // once established.)
    mark_state_port(state.local_port as u16);
    true
}

/// Stops tracking `sk`.
#[inline(always)]
pub fn remove_state(sk: u64) {
    let _ = SOCKS.remove(&sk);
}

/// The connection's open record; `addr` with its network namespace.
pub fn emit_open(sk: u64, st: &SockState, addr: &ConnAddr, ts: u64, first_data_ns: u64) {
    // Events are filled in place in the ring buffer: building them on the 512-byte BPF
    // stack first would not fit beside the connection state.
    let Some(mut slot) = reserve::<ConnOpen>() else { return };
    let e = slot.as_mut_ptr();
    unsafe {
        (*e).header = header(kind::CONN_OPEN, st.owner, sk, ts);
        (*e).addr = *addr;
        (*e).origin = st.origin;
        (*e).synack_retransmits = st.synack_retransmits;
        (*e).synack_ns = st.synack_ns;
        (*e).established_ns = st.established_ns;
        (*e).accepted_ns = ts;
        (*e).first_data_ns = first_data_ns;
    }
    slot.submit();
}

/// The exchange in progress on a connection, as its event gives it.
struct Exchange {
    flags: u32,
    times: [u64; 6],
    base: u64,
    /// Whether it fits a [`ShortRequest`].
    short: bool,
}

/// The exchange in progress (if there is one), with `extra_flags`.
#[inline(always)]
fn exchange(st: &mut SockState, extra_flags: u32) -> Option<Exchange> {
    if st.first_read_ns == 0 && st.first_write_ns == 0 {
        return None;
    }
    let mut flags = st.req_flags | extra_flags;
    if st.acked_ns == ACK_PENDING {
        // Its first write never returned (the connection closed, or the next request
        // came, meanwhile): how far it got is unknown, so is its delivery.
        st.acked_ns = 0;
        flags |= flags::UNDELIVERED;
    }
    let times = [st.arrival_ns, st.first_read_ns, st.last_read_ns, st.first_write_ns, st.last_write_ns, st.acked_ns];
    let (mut base, mut last) = (u64::MAX, 0);
    for t in times {
        if t != 0 && t < base {
            base = t;
        }
        if t > last {
            last = t;
        }
    }
    let short = last - base <= ShortRequest::MAX_SPAN_NS
        && st.req_in <= u32::MAX as u64
        && st.req_out <= u32::MAX as u64
        && flags <= u16::MAX as u32;
    Some(Exchange { flags, times, base, short })
}

/// Writes exchange `x` of `sk` as a [`ShortRequest`] at `e`.
#[inline(always)]
fn write_short(e: *mut ShortRequest, sk: u64, st: &SockState, x: &Exchange) {
    unsafe {
        (*e).kind = kind::REQUEST_SHORT;
        (*e).flags = x.flags as u16;
        (*e).tid = st.tid;
        (*e).sock = sk;
        (*e).base_ns = x.base;
        for (i, t) in x.times.into_iter().enumerate() {
            (*e).offsets[i] = ShortRequest::offset(x.base, t);
        }
        (*e).bytes_in = st.req_in as u32;
        (*e).bytes_out = st.req_out as u32;
    }
}

/// Emit the exchange in progress (if there is one) and reset the per-request fields.
#[inline(always)]
pub fn finish_request(sk: u64, st: &mut SockState, ts: u64, extra_flags: u32) {
    if let Some(x) = exchange(st, extra_flags) {
        emit_exchange(sk, st, ts, &x);
    }
}

/// [`finish_request`], except that an exchange that fits a [`ShortRequest`] is written
/// at `at` instead of to the ring, to go out with the next request's first bytes (see
/// `labels::capture`). Whether it was.
#[inline(always)]
pub fn stage_exchange(sk: u64, st: &mut SockState, ts: u64, at: *mut ShortRequest) -> bool {
    let Some(x) = exchange(st, 0) else { return false };
    if !x.short {
        emit_exchange(sk, st, ts, &x);
        return false;
    }
    write_short(at, sk, st, &x);
    request_done(st, x.flags);
    true
}

/// Emits exchange `x` (one line when it fits) and resets the per-request fields.
#[inline(always)]
fn emit_exchange(sk: u64, st: &mut SockState, ts: u64, x: &Exchange) {
    if x.short {
        if let Some(mut slot) = reserve::<ShortRequest>() {
            write_short(slot.as_mut_ptr(), sk, st, x);
            slot.submit();
        }
    } else if let Some(mut slot) = reserve::<Request>() {
        let e = slot.as_mut_ptr();
        unsafe {
            (*e).header = header(kind::REQUEST, st.owner, sk, ts);
            (*e).arrival_ns = st.arrival_ns;
            (*e).first_read_ns = st.first_read_ns;
            (*e).last_read_ns = st.last_read_ns;
            (*e).first_write_ns = st.first_write_ns;
            (*e).last_write_ns = st.last_write_ns;
            (*e).acked_ns = st.acked_ns;
            (*e).bytes_in = st.req_in;
            (*e).bytes_out = st.req_out;
            (*e).index = st.requests;
            (*e).flags = x.flags;
            (*e).tid = st.tid;
            (*e)._pad = 0;
        }
        slot.submit();
    }
    request_done(st, x.flags);
}

/// The exchange is reported: counted, and the per-request fields reset.
#[inline(always)]
fn request_done(st: &mut SockState, flags: u32) {
    if flags & flags::CLOSED_BY_PEER == 0 {
        st.requests += 1;
    }
    st.req_flags = 0;
    // Volatile stores: the compiler merges plain ones into a call to the BPF library's
    // memset, which clears one byte at a time (40 stores on every request).
    for field in [
        &mut st.arrival_ns,
        &mut st.first_read_ns,
        &mut st.last_read_ns,
        &mut st.first_write_ns,
        &mut st.last_write_ns,
        &mut st.acked_ns,
        &mut st.req_in,
        &mut st.req_out,
    ] {
        unsafe { core::ptr::write_volatile(field, 0) };
    }
}

/// Whether the unanswered message in `st` was the peer's goodbye (see
/// [`GOODBYE_WINDOW_NS`]).
#[inline(always)]
fn goodbye(sk: u64, st: &SockState) -> bool {
    let orderly =
        st.conn_flags & (flags::RESET_SENT | flags::RESET_RECEIVED) == 0 && st.conn_flags & flags::ORDERLY_CLOSE != 0;
    let message_ns = if st.arrival_ns != 0 { st.arrival_ns } else { st.first_read_ns };
    if !orderly || st.peer_fin_ns == 0 || message_ns == 0 {
        return false;
    }
    if close_notify_sized(st) {
        // Followed from its records: the peer's close_notify, however late its FIN.
        return true;
    }
    let srtt_ns = (crate::kernel::read::<u32>(sk, crate::off!(tcp_srtt_us)).unwrap_or(0) as u64 >> 3) * 1000;
    let window = if 2 * srtt_ns > GOODBYE_WINDOW_NS { 2 * srtt_ns } else { GOODBYE_WINDOW_NS };
    st.peer_fin_ns.saturating_sub(message_ns) <= window
}

/// The largest write that may be a TLS alert record (close_notify) with its header.
pub const ALERT_BYTES: u64 = 64;

/// The largest close_notify of an AEAD cipher with its record's header (TLS 1.2 with
/// AES-GCM: 5 + an 8-byte explicit nonce + 2 + a 16-byte tag; TLS 1.3's is 24), and
/// smaller than any request: the smallest HTTP/1 request line alone takes 16 bytes, and
/// the cipher adds 22 or more.
pub const CLOSE_NOTIFY_BYTES: u64 = 31;

/// Whether the message read last on a connection followed from its TLS records is too
/// small to be anything but an alert (the peer's close_notify). Its timing then does not
/// matter: a busy or slow client may close its socket long after its goodbye.
#[inline(always)]
fn close_notify_sized(st: &SockState) -> bool {
    st.tls & tracer_common::tls::RECORDS != 0 && st.req_in <= CLOSE_NOTIFY_BYTES
}

/// Whether the last exchange of a connection followed from its TLS records (closing at
/// `ts`) was the client's close_notify and the server's: a message of alert size (or
/// less) answered with at most an alert, with the peer's FIN (or reset) right after it.
#[inline(always)]
fn tls_goodbye(st: &SockState, ts: u64) -> bool {
    if st.tls & tracer_common::tls::RECORDS == 0 || st.dir != dir::WRITING {
        return false;
    }
    if st.req_in > ALERT_BYTES || st.req_out > ALERT_BYTES {
        return false;
    }
    let message_ns = if st.arrival_ns != 0 { st.arrival_ns } else { st.first_read_ns };
    let end = if st.peer_fin_ns != 0 { st.peer_fin_ns } else { ts };
    message_ns != 0 && (close_notify_sized(st) || end.saturating_sub(message_ns) <= GOODBYE_WINDOW_NS)
}

pub fn emit_close(sk: u64, st: &mut SockState, addr: &ConnAddr, ts: u64) {
    let mut pending = 0;
    if !origin::is_client(st.origin) {
        if st.dir == dir::READING {
            // A message read and not answered: the peer's goodbye when the connection
            // closed in an orderly way and the peer's FIN followed the message at once,
            // else a request cut short (a reset, the server's close, a client that gave
            // up waiting).
            pending |= if goodbye(sk, st) { flags::CLOSED_BY_PEER } else { flags::ABORTED };
        } else if tls_goodbye(st, ts) {
            // Followed from its records, a TLS connection's last message may be the
            // client's close_notify, and what the server wrote back its own.
            pending |= flags::CLOSED_BY_PEER;
        } else if st.dir == dir::WRITING && st.acked_ns == 0 {
            pending |= flags::UNDELIVERED;
        }
        match exchange(st, pending) {
            // The usual end of a short connection: its exchange and its close in one record.
            Some(x) if x.short => {
                let Some(mut slot) = reserve::<ClosingExchange>() else { return };
                let e = slot.as_mut_ptr();
                write_short(unsafe { &raw mut (*e).request }, sk, st, &x);
                request_done(st, x.flags);
                write_close(unsafe { &raw mut (*e).close }, sk, st, addr, ts, pending);
                unsafe { (*e).close.header.kind = kind::CONN_CLOSE_EXCHANGE };
                slot.submit();
                return;
            }
            // (Not `finish_request`: `exchange` has already taken a pending
            // acknowledgement into the flags.)
            Some(x) => emit_exchange(sk, st, ts, &x),
            None => {}
        }
    }
    let Some(mut slot) = reserve::<ConnClose>() else { return };
    write_close(slot.as_mut_ptr(), sk, st, addr, ts, pending);
    slot.submit();
}

#[inline(always)]
fn write_close(e: *mut ConnClose, sk: u64, st: &SockState, addr: &ConnAddr, ts: u64, pending: u32) {
    unsafe {
        (*e).header = header(kind::CONN_CLOSE, st.owner, sk, ts);
        (*e).addr = *addr;
        (*e).bytes_in = st.total_in;
        (*e).bytes_out = st.total_out;
        (*e).requests = st.requests;
        (*e).flags = pending | (st.conn_flags & !flags::ORDERLY_CLOSE);
    }
}
