//! Send, receive, data arrival and acknowledgements on traced connections.
//!
//! No event here: these hooks run per syscall or per packet, so they only update the
//! connection's state. An exchange is emitted when the next request starts or the
//! connection closes.

use aya_ebpf::helpers::bpf_get_current_pid_tgid;
use tracer_common::{flags, origin, side, tls as tls_flags, ACK_PENDING};

use crate::{
    bind,
    conn::{current_tid, dir, emit_open, finish_request, insert_state, now, scratch_state, state_mut, SockState},
    kernel::{conn_addr_in_netns, is_inet_tcp, load, read, tcp_sock},
    labels::{capture, labels, stage_before_capture, AFTER_EXCHANGE},
    maps::{filter_by_port, is_traced_port, is_traced_tgid, known_untraced, state_port_marked, tls_records},
    off, records, tls, upstream,
};

const MSG_PEEK: i32 = 2;

tracepoint_hook! {
    fn sock_recv_length / raw_sock_recv_length (ctx) {
        on_recv_return::<true>(ctx.arg(0), ctx.arg(1), ctx.arg(2));
        0
    }
}

tracepoint_hook! {
    fn sock_send_length / raw_sock_send_length (ctx) {
        on_send_return::<BTF>(ctx.arg(0), ctx.arg(1));
        0
    }
}

tracepoint_hook! {
    /// `tcp_sendmsg_locked(sk, msg, skb, size_goal)`: a write is under way (once per
    /// segment it fills; only the first of a response does anything).
    fn tcp_sendmsg_locked / raw_tcp_sendmsg_locked (ctx) {
        on_write_start(ctx.arg(0), ctx.arg(1));
        0
    }
}

/// A receive call on `sk` returned `ret` (bytes, or an error); peeks consume nothing.
/// `ATOMIC`: the hook runs with preemption off (a tracepoint), see [`read_request`].
#[inline(always)]
pub fn on_recv_return<const ATOMIC: bool>(sk: u64, ret: i32, msg_flags: i32) {
    if ret > 0 && msg_flags & MSG_PEEK == 0 {
        on_read::<ATOMIC>(sk, ret as u64);
    }
}

/// A send call on `sk` returned `ret` (bytes, or an error).
#[inline(always)]
pub fn on_send_return<const BTF: bool>(sk: u64, ret: i32) {
    if ret > 0 {
        on_write::<BTF>(sk, ret as u64);
    }
}

tracepoint_hook! {
    /// Every segment an established connection receives: its data arrival and its
    /// acknowledgements, from one hook (a data-ready hook would be a second program run
    /// per request, for the same moment to within microseconds).
    fn tcp_probe / raw_tcp_probe (ctx) {
        on_segment::<BTF>(ctx.arg(0), ctx.arg(1));
        0
    }
}

#[inline(always)]
fn on_segment<const BTF: bool>(sk: u64, skb: u64) {
    // Most segments of a busy machine are of sockets not traced (the other end of a
    // traced connection, other servers): their port says so without a lookup. Typed
    // hooks only: where the port takes a helper call to read (raw tracepoints), the
    // lookup it would spare costs about as much.
    if BTF && !state_port_marked(load::<BTF, u16>(sk, off!(skc_num)).unwrap_or(0)) {
        return;
    }
    let Some(st) = state_mut(sk) else { return };
    let cb = skb + off!(skb_cb) as u64;
    // seq and end_seq in one read (end_seq follows seq: checked at start).
    let seqs = load::<BTF, u64>(cb, off!(tcp_skb_cb_seq)).unwrap_or(0);
    segment_received(st, seqs as u32, (seqs >> 32) as u32, || load::<BTF, u32>(cb, off!(tcp_skb_cb_ack_seq)));
}

/// Every segment received by a socket of the machine (the program is attached to the
/// root cgroup): the segment hook as a cgroup program, which also follows TLS records
/// (`records::tls_records`), one program run per segment for both. It sees a segment
/// as the socket is found for it, before TCP processes it (a segment that finds the
/// socket busy waits in its backlog after this).
#[aya_ebpf::macros::cgroup_skb(ingress)]
pub fn segments(ctx: aya_ebpf::programs::SkBuffContext) -> i32 {
    let port = unsafe { (*ctx.skb.skb).local_port } as u16;
    let followed = crate::maps::record_port_marked(port);
    let marked = state_port_marked(port);
    if !marked && !followed {
        return 1;
    }
    let Some((sk, tcp_state)) = records::socket_of(&ctx) else { return 1 };
    // As the tracepoint: the segments of established connections (a listener's, and the
    // handshake's SYN-ACK at a connecting socket, are no data; the acknowledgements
    // after a close are the state hook's).
    let st = if marked && tcp_state == crate::state::TCP_ESTABLISHED as u32 { state_mut(sk) } else { None };
    if st.is_none() && !followed {
        return 1;
    }
    let Some(tcp) = records::TcpHeader::read(&ctx) else { return 1 };
    if let Some(st) = st {
        if st.rcv_end == 0 && tcp.len != 0 && st.origin == origin::ACCEPTED && tls_records() {
            // The connection's first data: a client that begins no TLS handshake spares
            // the server's first write the read that would tell (one helper call here,
            // once per connection, where the payload may lie past the linear part).
            if ctx.load::<u8>(tcp.payload as usize).is_ok_and(|b| b != tracer_common::record::HANDSHAKE) {
                st.no_hello = 1;
            }
        }
        segment_received(st, tcp.seq, tcp.end_seq(), || Some(tcp.ack_seq));
    }
    if followed {
        records::follow(&ctx, sk, &tcp);
    }
    1
}

/// A segment from `seq` to `end_seq` was received on a connection with state `st`:
/// data arrival, and the acknowledgement it carries (`ack_seq`, read only when needed).
#[inline(always)]
fn segment_received(st: &mut SockState, seq: u32, end_seq: u32, ack_seq: impl FnOnce() -> Option<u32>) {
    // The clock is read at most once: a request often brings the previous response's ACK.
    let mut ts = 0;
    // New data: the segment ends beyond the furthest seen (a retransmit of data already
    // received does not count).
    if end_seq != seq && (st.rcv_end == 0 || end_seq.wrapping_sub(st.rcv_end) as i32 > 0) {
        st.rcv_end = end_seq;
        // The first new data since the application last read. Every read clears it, so
        // data of the request being read never counts for the next one, while the next
        // request's first bytes count even when they come before the hook of the
        // response's write has run (a fast client on loopback).
        if st.pending_data_ns == 0 {
            ts = now();
            st.pending_data_ns = ts;
        }
    }
    if st.dir != dir::WRITING || st.acked_ns != 0 || origin::is_client(st.origin) {
        return;
    }
    let Some(ack_seq) = ack_seq() else { return };
    if (ack_seq.wrapping_sub(st.ack_target) as i32) >= 0 {
        st.acked_ns = if ts != 0 { ts } else { now() };
    }
}

/// A send or receive by a process this CPU last found not traced (the other end of a
/// connection on the same machine, or any busy process): ignored before the socket's
/// state is looked up. Traced sockets are the traced processes' own, so in process
/// mode another process's sends and receives are not the tracer's business; in port
/// mode any process may serve a traced port, so every call is looked up.
#[inline(always)]
fn untraced_caller() -> bool {
    !filter_by_port() && known_untraced((bpf_get_current_pid_tgid() >> 32) as u32)
}

/// A write on `sk` begins: the server has finished thinking (a write that blocks on a
/// full send buffer is `send`, not `think`), the client has begun its request. The
/// write's return hook does the rest; it also stands in for this one when it did not run.
///
/// `msg` (the `struct msghdr *` written) tells a TLS server's first write, a handshake
/// record, when the connection is not followed through its TLS library.
#[inline(always)]
pub fn on_write_start(sk: u64, msg: u64) {
    if untraced_caller() {
        return;
    }
    let Some(st) = state_mut(sk) else { return };
    if st.dir == dir::WRITING || st.owner == 0 {
        return;
    }
    if tls::is_library_call(sk, st, tls::WRITE_START, 0) {
        return;
    }
    if st.tls == 0
        && st.no_hello == 0
        && tls_records()
        && msg != 0
        && st.requests == 0
        && st.dir == dir::READING
        && st.origin == origin::ACCEPTED
        && records::detect(sk, st, msg)
    {
        return;
    }
    if records::not_a_response(sk, st) {
        return;
    }
    if origin::is_client(st.origin) && records::client_write(sk, st, msg) {
        return;
    }
    let ts = now();
    if origin::is_client(st.origin) {
        upstream::begin_request(sk, st, ts, 0, u64::MAX);
    } else {
        begin_response(sk, st, ts, 0, u64::MAX);
    }
}

/// The first write of a response.
#[inline(always)]
///
/// `plain` (and its `len`): the plaintext a TLS connection's library is handed, or 0
/// (the system call's buffer has the bytes).
pub fn begin_response(sk: u64, st: &mut SockState, ts: u64, plain: u64, len: u64) {
    if labels() && (st.tls == 0 || plain != 0) {
        capture(sk, st.owner, side::RESPONSE as u32, len, plain);
    }
    st.dir = dir::WRITING;
    st.first_write_ns = ts;
    // Nothing to deliver until the write returns and says up to which byte (an ACK of
    // the previous response's bytes must not deliver this one).
    st.acked_ns = ACK_PENDING;
    bind::note_response(sk, st, ts);
}

#[inline(always)]
fn on_read<const ATOMIC: bool>(sk: u64, len: u64) {
    if untraced_caller() {
        return;
    }
    let Some(st) = state_mut(sk).or_else(|| adopt(sk, false)) else { return };
    if tls::is_library_call(sk, st, tls::READ, len) {
        return;
    }
    let ts = now();
    if origin::is_client(st.origin) {
        upstream::on_read(sk, st, len, ts, 0);
        return;
    }
    if st.owner == 0 && !crate::accept::adopt_unseen(sk, st) {
        // Accepted by a process not traced (or an accept not seen: see take_ownership).
        return;
    }
    let mut len = len;
    if st.tls & (tls_flags::RECORDS | tls_flags::DONE) == tls_flags::RECORDS {
        len = records::on_read(sk, st, len);
        if len == records::HANDSHAKE_READ {
            return;
        }
    }
    read_request::<ATOMIC>(sk, st, len, ts, 0);
}

/// The server read `len` bytes of a request on `sk` (from the socket, or as plaintext
/// from the TLS library into `plain`; 0: the system call's buffer).
///
/// With labels on, the exchange this read ends goes out with the new request's first
/// bytes, staged in the per-CPU buffer until they are copied: only where the hook runs
/// with preemption off (`ATOMIC`: a tracepoint), as no other program run on this CPU
/// may then take the buffer in between. Elsewhere (a trampoline, the TLS library's
/// probes) it goes out at once, as without labels.
#[inline(always)]
pub fn read_request<const ATOMIC: bool>(sk: u64, st: &mut SockState, len: u64, ts: u64, plain: u64) {
    if st.dir != dir::READING {
        let capturing = labels() && (st.tls == 0 || plain != 0);
        let mut which = side::REQUEST as u32;
        if st.dir == dir::WRITING {
            if !(capturing && ATOMIC) {
                finish_request(sk, st, ts, 0);
            } else if stage_before_capture(sk, st, ts) {
                // Out with the request's first bytes, in one record.
                which |= AFTER_EXCHANGE;
            }
        }
        st.dir = dir::READING;
        st.first_read_ns = ts;
        st.arrival_ns = st.pending_data_ns;
        if st.arrival_ns == 0 && st.requests == 0 && st.origin == origin::ACCEPTED && st.tls == 0 {
            // No segment of the first request reached the established connection: it
            // came with the handshake's final ACK (the state change's moment). (On TLS
            // that moment began the TLS handshake.)
            st.arrival_ns = st.established_ns;
        }
        if st.arrival_ns == 0 {
            st.req_flags |= flags::ARRIVAL_UNKNOWN;
        }
        if capturing {
            capture(sk, st.owner, which, len, plain);
        }
    }
    st.pending_data_ns = 0;
    st.last_read_ns = ts;
    st.tid = current_tid();
    st.req_in += len;
    st.total_in += len;
    bind::note_read(sk, st.first_read_ns);
}

#[inline(always)]
fn on_write<const BTF: bool>(sk: u64, len: u64) {
    if untraced_caller() {
        return;
    }
    let Some(st) = state_mut(sk).or_else(|| adopt(sk, true)) else { return };
    if tls::is_library_call(sk, st, tls::WRITE, len) {
        return;
    }
    let ts = now();
    if origin::is_client(st.origin) {
        if !records::client_handshake_written(st) {
            upstream::on_write(sk, st, len, ts);
        }
        return;
    }
    if st.owner == 0 && !crate::accept::adopt_unseen(sk, st) {
        return;
    }
    if records::not_a_response(sk, st) {
        return;
    }
    write_response::<BTF>(sk, st, len, ts);
}

/// The server wrote `len` bytes of a response on `sk` (to the socket, or as plaintext
/// to the TLS library, which has queued its records on the socket by the time it
/// returns).
#[inline(always)]
pub fn write_response<const BTF: bool>(sk: u64, st: &mut SockState, len: u64, ts: u64) {
    if st.dir != dir::WRITING {
        begin_response(sk, st, ts, 0, u64::MAX);
    }
    st.req_out += len;
    st.total_out += len;
    note_sent::<BTF>(sk, st, ts);
}

/// Bytes of the response are queued on `sk`: it is delivered once the peer acknowledges
/// everything written so far.
#[inline(always)]
pub fn note_sent<const BTF: bool>(sk: u64, st: &mut SockState, ts: u64) {
    st.last_write_ns = ts;
    // On loopback the peer's ACK is often processed inside this very write, before the
    // hook runs: check what is already acknowledged.
    let (write_seq, snd_una) = match tcp_sock::<BTF>(sk) {
        Some(tp) => (
            load::<BTF, u32>(tp, off!(tcp_write_seq)).unwrap_or(0),
            load::<BTF, u32>(tp, off!(tcp_snd_una)).unwrap_or(0),
        ),
        None => (0, 0),
    };
    st.ack_target = write_seq;
    st.acked_ns = if snd_una.wrapping_sub(write_seq) as i32 >= 0 { ts } else { 0 };
}

/// A socket with no state was read or written: most often another process's, which
/// the first check rejects. A connection of a traced process (or port) that was open
/// before tracing started is adopted: an upstream one (userspace listed it) on its next
/// read or write, a server one on its next read, the start of its next request.
#[inline(always)]
fn adopt(sk: u64, writing: bool) -> Option<&'static mut SockState> {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let tgid_traced = is_traced_tgid(tgid);
    if !tgid_traced && !filter_by_port() {
        return None;
    }
    if !is_inet_tcp(sk) {
        return None;
    }
    if tgid_traced && upstream::adopt_existing(sk, tgid) {
        return state_mut(sk);
    }
    if writing {
        return None;
    }
    let local_port = read::<u16>(sk, off!(skc_num)).unwrap_or(0);
    if filter_by_port() && !is_traced_port(local_port) {
        return None;
    }
    let st = scratch_state(origin::EXISTING)?;
    st.owner = tgid;
    st.local_port = local_port as u32;
    if !insert_state(sk, st) {
        return None;
    }
    emit_open(sk, st, &conn_addr_in_netns::<false>(sk), now(), 0);
    state_mut(sk)
}
