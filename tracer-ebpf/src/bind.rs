//! Which server request an upstream request is made for.
//!
//! Per thread, the server request it works for: the one it read most recently (an event
//! loop, a goroutine or a request's own thread issues its upstream write in the same
//! run of work in which it read the request), or the one whose upstream response it
//! read most recently (the run of work that goes on with a request after one call —
//! its next call, its retry — is that request's). An upstream request begun on a thread
//! is bound to it, once, at its first write (or, for a connection's first request, at
//! the connect() that opened it: an event loop writes only once the connect has
//! completed, possibly after reading other requests). A binding counts only while its
//! server request is still being answered (read, no response begun): a thread never
//! charges a request it no longer works for. A thread's binding ends when it begins
//! writing that request's response.
//!
//! A thread that has never read a server request and begins upstream requests (a
//! worker handed the request by a reader thread) has them counted; when it then begins
//! writing a server response, a `Bind` event ties those requests to it. Userspace does
//! the rest (`tracer/src/upstream.rs`).

use tracer_common::{kind, Bind, ThreadWork};

use crate::{
    conn::{current_tid, dir, header, SockState},
    maps::{reserve, SOCKS, THREADS},
};

/// The current thread read server request (`sk`, `first_read_ns`).
#[inline(always)]
pub fn note_read(sk: u64, first_read_ns: u64) {
    let tid = current_tid();
    match THREADS.get_ptr_mut(&tid) {
        Some(work) => {
            let work = unsafe { &mut *work };
            // Written only when it changes: a request read in many pieces writes once.
            if work.sock != sk || work.first_read_ns != first_read_ns {
                work.sock = sk;
                work.first_read_ns = first_read_ns;
                work.reader = 1;
            }
        }
        None => {
            let work = ThreadWork { sock: sk, first_read_ns, since_ns: 0, unbound: 0, reader: 1 };
            let _ = THREADS.insert(&tid, &work, 0);
        }
    }
}

/// The current thread read the response of an upstream request made for server request
/// (`sock`, `first_read_ns`): what it does next goes on with that request.
#[inline(always)]
pub fn note_upstream_response(sock: u64, first_read_ns: u64) {
    if sock == 0 {
        return;
    }
    let tid = current_tid();
    if let Some(work) = THREADS.get_ptr_mut(&tid) {
        let work = unsafe { &mut *work };
        work.sock = sock;
        work.first_read_ns = first_read_ns;
    }
}

/// The current thread begins writing the response of server request `st` on `sk`.
#[inline(always)]
pub fn note_response(sk: u64, st: &SockState, ts: u64) {
    let tid = current_tid();
    let Some(work) = THREADS.get_ptr_mut(&tid) else { return };
    let work = unsafe { &mut *work };
    if work.unbound != 0 && work.reader == 0 && st.first_read_ns != 0 {
        if let Some(mut slot) = reserve::<Bind>() {
            let e = slot.as_mut_ptr();
            unsafe {
                (*e).header = header(kind::BIND, st.owner, sk, ts);
                (*e).first_read_ns = st.first_read_ns;
                (*e).since_ns = work.since_ns;
            }
            slot.submit();
        }
    }
    work.unbound = 0;
    work.since_ns = ts;
    if work.sock == sk {
        // Answered: what this thread begins next is not for this request.
        work.sock = 0;
    }
}

/// Whether server request (`sock`, `first_read_ns`) is still being answered: read, and
/// no response begun.
#[inline(always)]
pub fn still_open(sock: u64, first_read_ns: u64) -> bool {
    match SOCKS.get_ptr(sock) {
        Some(st) => unsafe { (*st).dir == dir::READING && (*st).first_read_ns == first_read_ns },
        None => false,
    }
}

/// The server request the current thread works for, as (socket, first read); or (0, 0),
/// counting an upstream request begun without one when `begins_request`.
#[inline(always)]
pub fn current_request(begins_request: bool) -> (u64, u64) {
    let tid = current_tid();
    match THREADS.get_ptr_mut(&tid) {
        Some(work) => {
            let work = unsafe { &mut *work };
            if work.sock != 0 && still_open(work.sock, work.first_read_ns) {
                return (work.sock, work.first_read_ns);
            }
            if begins_request {
                work.unbound += 1;
            }
        }
        None if begins_request => {
            let work = ThreadWork { sock: 0, first_read_ns: 0, since_ns: 0, unbound: 1, reader: 0 };
            let _ = THREADS.insert(&tid, &work, 0);
        }
        None => {}
    }
    (0, 0)
}
