//! Which server request an upstream request is made for.
//!
//! Per thread, the server request it read most recently: an event loop, a goroutine or
//! a request's own thread issues its upstream write in the same run of work in which it
//! read the request, so an upstream request begun on a thread is bound to that thread's
//! most recent server request — once, at its first write (or, for a connection's first
//! request, at the connect() that opened it: an event loop writes only once the connect
//! has completed, possibly after reading other requests). A thread's binding ends when
//! it begins writing that request's response.
//!
//! A thread that begins upstream requests with no server request of its own (a worker
//! handed the request by a reader thread) has them counted; when it then begins writing
//! a server response, a `Bind` event ties those requests to it. Userspace does the rest
//! (`tracer/src/upstream.rs`).

use tracer_common::{kind, Bind, ThreadWork};

use crate::{
    conn::{current_tid, header, SockState},
    maps::{reserve, THREADS},
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
            }
        }
        None => {
            let work = ThreadWork { sock: sk, first_read_ns, since_ns: 0, unbound: 0, _pad: 0 };
            let _ = THREADS.insert(&tid, &work, 0);
        }
    }
}

/// The current thread begins writing the response of server request `st` on `sk`.
#[inline(always)]
pub fn note_response(sk: u64, st: &SockState, ts: u64) {
    let tid = current_tid();
    let Some(work) = THREADS.get_ptr_mut(&tid) else { return };
    let work = unsafe { &mut *work };
    if work.unbound != 0 {
        if let Some(mut slot) = reserve::<Bind>() {
            let e = slot.as_mut_ptr();
            unsafe {
                (*e).header = header(kind::BIND, st.owner, sk, ts);
                (*e).first_read_ns = st.first_read_ns;
                (*e).since_ns = work.since_ns;
            }
            slot.submit();
        }
        work.unbound = 0;
    }
    work.since_ns = ts;
    if work.sock == sk {
        // Answered: what this thread begins next is not for this request.
        work.sock = 0;
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
            if work.sock != 0 {
                return (work.sock, work.first_read_ns);
            }
            if begins_request {
                work.unbound += 1;
            }
        }
        None if begins_request => {
            let work = ThreadWork { sock: 0, first_read_ns: 0, since_ns: 0, unbound: 1, _pad: 0 };
            let _ = THREADS.insert(&tid, &work, 0);
        }
        None => {}
    }
    (0, 0)
}
