//! TLS connections, followed through uprobes on the TLS library (OpenSSL's `SSL_read`,
//! `SSL_write`, `SSL_do_handshake`, ...).
//!
//! On a TLS connection the socket carries records: handshake flights, session tickets,
//! alerts and close_notify besides the application's data. What the application reads
//! and writes is the plaintext that the library's calls return and take, so there the
//! request boundaries are drawn:
//! - a thread entering one of the library's calls is noted (`TLS_CALLS`); a socket call
//!   it makes inside ties the `SSL *` to the socket (`TLS_SOCKS`) and marks the
//!   connection hooked, after which the socket's own reads and writes start and end no
//!   request;
//! - `SSL_read` returning plaintext is the request's read (its arrival: the data the
//!   call read from the socket), `SSL_write`'s entry ends think and its return is the
//!   response's write (by then its records are queued on the socket, so delivery is
//!   still the peer's acknowledgement of them);
//! - the handshake runs from the ClientHello's first byte queued on the server's socket
//!   (the client's: its write) until `SSL_do_handshake` returns success.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user},
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use tracer_common::{kind, origin, tls, tls_op, TlsCall, TlsDone};

use crate::{
    conn::{current_tid, dir, header, now, state_mut, SockState},
    io,
    kernel::read,
    maps::{
        filter_by_port, is_traced_tgid, note_tls_call, reserve, tls_calls_open, tls_hooks, LAST_RECORDS_READ,
        TLS_CALLS, TLS_SOCKS,
    },
    off, upstream,
};

/// What a socket call does (for [`socket_call`]).
pub const READ: u32 = 0;
pub const WRITE_START: u32 = 1;
pub const WRITE: u32 = 2;

/// Whether the calling process is traced (or any may be, in port mode).
#[inline(always)]
fn caller_traced() -> bool {
    filter_by_port() || is_traced_tgid((bpf_get_current_pid_tgid() >> 32) as u32)
}

/// A thread enters a read or the handshake of the TLS library (calls with a return
/// probe, which ends what is noted here: nothing is left behind to be taken for a later
/// call, even when the library's objects and the sockets are reused at the same
/// addresses).
#[inline(always)]
fn enter(ssl: u64, op: u32, count_ptr: u64, buf: u64) {
    if ssl == 0 || !caller_traced() {
        return;
    }
    let call = TlsCall { ssl, count_ptr, arrival_ns: 0, op, _pad: 0, buf };
    if TLS_CALLS.insert(&current_tid(), &call, 0).is_ok() {
        note_tls_call(true);
    }
}

#[uprobe]
pub fn ssl_read(ctx: ProbeContext) -> u32 {
    enter(ctx.arg(0).unwrap_or(0), tls_op::READ, 0, ctx.arg(1).unwrap_or(0));
    0
}

#[uprobe]
pub fn ssl_read_ex(ctx: ProbeContext) -> u32 {
    enter(ctx.arg(0).unwrap_or(0), tls_op::READ_EX, ctx.arg(3).unwrap_or(0), ctx.arg(1).unwrap_or(0));
    0
}

/// `SSL_write` and `SSL_write_ex` (one program: the object is their first argument).
#[uprobe]
pub fn ssl_write(ctx: ProbeContext) -> u32 {
    if caller_traced() {
        write_begins(ctx.arg(0).unwrap_or(0), ctx.arg(1).unwrap_or(0), ctx.arg(2).unwrap_or(0));
    }
    0
}

#[uprobe]
pub fn ssl_do_handshake(ctx: ProbeContext) -> u32 {
    enter(ctx.arg(0).unwrap_or(0), tls_op::HANDSHAKE, 0, 0);
    0
}

/// The application closes the TLS session: its close_notify is no response.
#[uprobe]
pub fn ssl_shutdown(ctx: ProbeContext) -> u32 {
    if caller_traced() {
        if let Some((_, st)) = hooked(ctx.arg(0).unwrap_or(0)) {
            st.tls |= tls::SHUTDOWN;
        }
    }
    0
}

/// The hooked connection under `ssl`, if known.
#[inline(always)]
fn hooked(ssl: u64) -> Option<(u64, &'static mut SockState)> {
    let sk = *unsafe { TLS_SOCKS.get(&ssl) }?;
    let st = state_mut(sk)?;
    (st.tls & tls::HOOKED != 0).then_some((sk, st))
}

/// The connection under `ssl` for an application that feeds the library from buffers
/// of its own (memory BIOs: Node.js): no socket call happens inside its calls, so the
/// object is tied to the TLS connection (followed from its records so far) that the
/// calling thread read last — such an application reads the socket, then hands the
/// bytes to the library in the same run of work. From then on it is hooked.
#[inline(always)]
fn adopt(ssl: u64) -> Option<(u64, &'static mut SockState)> {
    let sk = *unsafe { LAST_RECORDS_READ.get(&current_tid()) }?;
    let st = state_mut(sk)?;
    if st.tls & tls::RECORDS == 0 || st.tls & tls::DONE == 0 {
        return None;
    }
    st.tls |= tls::HOOKED;
    let _ = TLS_SOCKS.insert(&ssl, &sk, 0);
    // Said to userspace as a handshake event with no times: how it is followed now.
    if let Some(mut slot) = reserve::<TlsDone>() {
        let e = slot.as_mut_ptr();
        unsafe {
            (*e).header = header(kind::TLS_DONE, st.owner, sk, now());
            (*e).start_ns = 0;
            (*e).end_ns = 0;
            (*e).method = st.tls;
            (*e)._pad = 0;
        }
        slot.submit();
    }
    Some((sk, st))
}

/// The application hands plaintext to write: the server has finished thinking, the
/// client begins its request (unless the handshake still has to run first). `buf` and
/// `len`: the plaintext.
#[inline(always)]
fn write_begins(ssl: u64, buf: u64, len: u64) {
    if ssl == 0 {
        return;
    }
    let Some((sk, st)) = hooked(ssl).or_else(|| adopt(ssl)) else { return };
    if st.dir == dir::WRITING || st.owner == 0 || (st.tls_start_ns != 0 && st.tls & tls::DONE == 0) {
        return;
    }
    let ts = now();
    if origin::is_client(st.origin) {
        upstream::begin_request(sk, st, ts, buf, len);
    } else {
        io::begin_response(sk, st, ts, buf, len);
    }
}

/// The return of `SSL_read`, `SSL_read_ex` and `SSL_do_handshake` (a write's return
/// needs no probe: its records were written by socket calls inside it, which count).
#[uretprobe]
pub fn ssl_return(ctx: RetProbeContext) -> u32 {
    let tid = current_tid();
    let Some(call) = (unsafe { TLS_CALLS.get(&tid) }).copied() else { return 0 };
    if TLS_CALLS.remove(&tid).is_ok() {
        note_tls_call(false);
    }
    let ret = ctx.ret::<i64>() as i32;
    let Some((sk, st)) = hooked(call.ssl).or_else(|| adopt(call.ssl)) else { return 0 };
    let ts = now();
    let bytes = match call.op {
        tls_op::HANDSHAKE => {
            if ret == 1 {
                handshake_done(sk, st, ts);
            }
            return 0;
        }
        tls_op::READ if ret > 0 => ret as u64,
        tls_op::READ_EX if ret == 1 && call.count_ptr != 0 => {
            unsafe { bpf_probe_read_user(call.count_ptr as *const u64) }.unwrap_or(0)
        }
        _ => 0,
    };
    if bytes == 0 {
        return 0;
    }
    // An application that never called the handshake: it ran inside this call.
    handshake_done(sk, st, ts);
    if call.arrival_ns != 0 {
        st.pending_data_ns = call.arrival_ns;
    } else if st.pending_data_ns == 0 {
        // Handed over from the library's buffer, read from the socket by an earlier call.
        st.pending_data_ns = st.tls_read_ns;
    }
    st.tls_read_ns = 0;
    if origin::is_client(st.origin) {
        upstream::on_read(sk, st, bytes, ts, call.buf);
        return 0;
    }
    if st.owner == 0 && !crate::accept::adopt_unseen(sk, st) {
        return 0;
    }
    io::read_request::<false>(sk, st, bytes, ts, call.buf);
    0
}

/// The handshake of `sk` completed at `ts` (once).
#[inline(always)]
pub fn handshake_done(sk: u64, st: &mut SockState, ts: u64) {
    if st.tls & tls::DONE != 0 {
        return;
    }
    st.tls |= tls::DONE;
    if st.tls_start_ns == 0 {
        // Open before tracing started: its handshake was not seen.
        return;
    }
    let Some(mut slot) = reserve::<TlsDone>() else { return };
    let e = slot.as_mut_ptr();
    unsafe {
        (*e).header = header(kind::TLS_DONE, st.owner, sk, ts);
        (*e).start_ns = st.tls_start_ns;
        (*e).end_ns = ts;
        (*e).method = st.tls;
        (*e)._pad = 0;
    }
    slot.submit();
}

/// Whether the receive queue of `sk` is empty (everything received has been read).
#[inline(always)]
pub fn queue_empty(sk: u64) -> bool {
    // Not two `Option`s compared: for that the compiler merged their payloads with a
    // shift, which 5.10's verifier refused on the register still holding the socket (a
    // typed pointer in a trampoline program).
    let rcv_nxt = read::<u32>(sk, off!(tcp_rcv_nxt)).unwrap_or(0);
    let copied = read::<u32>(sk, off!(tcp_copied_seq)).unwrap_or(1);
    rcv_nxt == copied
}

/// Whether a socket call on a traced connection is TLS's business (see [`socket_call`]),
/// asked only where it may be: uprobes are on a library, and the connection was seen
/// inside one of its calls or some thread is inside one now (else no subprogram call).
#[inline(always)]
pub fn is_library_call(sk: u64, st: &mut SockState, what: u32, len: u64) -> bool {
    tls_hooks() && (st.tls & tls::HOOKED != 0 || tls_calls_open()) && socket_call(sk, st, what, len)
}

/// A socket call (`what`: [`READ`], [`WRITE_START`], [`WRITE`] of `len` bytes) on a
/// traced connection.
/// Returns true when it is TLS's business: the calling thread is inside a call of the
/// TLS library, or the connection is one such calls were seen on. Such socket calls
/// start and end no request; they tie the library's connection object to the socket,
/// time the handshake's start, and keep the arrival of what a read call consumes.
// A BPF subprogram of its own: inlined into the receive hook, older verifiers (5.10,
// 6.1) refused the compiler's arithmetic on the state pointer.
#[inline(never)]
pub fn socket_call(sk: u64, st: &mut SockState, what: u32, len: u64) -> bool {
    let client = origin::is_client(st.origin);
    // No thread inside a hooked call (a plain server that links the library): no lookup.
    let inside = if tls_calls_open() { TLS_CALLS.get_ptr_mut(&current_tid()) } else { None };
    let Some(call) = inside.map(|c| unsafe { &mut *c }) else {
        if st.tls & tls::HOOKED == 0 {
            return false;
        }
        // A hooked connection's socket written outside the library's reads and
        // handshake: the records of what the application writes (inside `SSL_write`,
        // or moved by the application itself), `len` their bytes; after `SSL_shutdown`,
        // its close_notify.
        if what == WRITE && st.dir == dir::WRITING && st.tls & tls::SHUTDOWN == 0 {
            if client {
                upstream::on_write(sk, st, len, now());
            } else {
                io::write_response::<false>(sk, st, len, now());
            }
        }
        return true;
    };
    if !client && st.owner == 0 && !crate::accept::adopt_unseen(sk, st) {
        return true;
    }
    if st.tls & tls::HOOKED == 0 {
        st.tls |= tls::HOOKED;
        let fresh = st.origin == origin::ACCEPTED || st.origin == origin::CONNECTED;
        if fresh && st.requests == 0 && st.dir == dir::IDLE {
            // The handshake begins: the client's ClientHello is written now; on the
            // server it was queued by the first data (or came with the final ACK).
            st.tls_start_ns = if client {
                now()
            } else if st.pending_data_ns != 0 {
                st.pending_data_ns
            } else if st.established_ns != 0 {
                st.established_ns
            } else {
                now()
            };
        }
    }
    if unsafe { TLS_SOCKS.get(&call.ssl) }.copied() != Some(sk) {
        let _ = TLS_SOCKS.insert(&call.ssl, &sk, 0);
    }
    if what == READ {
        if st.pending_data_ns != 0 {
            call.arrival_ns = st.pending_data_ns;
            st.tls_read_ns = st.pending_data_ns;
        }
        // What is left in the queue is still to be read (the request after the
        // client's Finished, say): its arrival stays noted.
        if queue_empty(sk) {
            st.pending_data_ns = 0;
        }
    }
    true
}
