//! TLS followed from the record layer alone, for servers whose TLS library has no hook
//! (Go's crypto/tls, rustls, Java, a stripped static binary) or when uprobes are off.
//!
//! - The server's first write on an accepted connection is looked at in user memory:
//!   a handshake record header (`16 03 ..`) makes it a TLS connection. What it read
//!   before (the ClientHello) was the handshake's start, not a request.
//! - From then on a cgroup socket-buffer program reads the header of every record the
//!   client sends (`tracer_common::RecordState`) until the one that ends its handshake
//!   (its Finished).
//! - The server's reads up to that record are handshake; the one that reaches past it
//!   reads the first request. Its writes before that, and any write with no request
//!   read (TLS 1.3 session tickets), are no response.
//!
//! What stays approximate (the report says so): the handshake ends where the server has
//! read the client's Finished; TLS 1.3 hides alerts, tickets and key updates inside
//! application-data records.

use aya_ebpf::{helpers::bpf_probe_read_user, macros::cgroup_skb, programs::SkBuffContext};
use tracer_common::{origin, record, tls, RecordRead, RecordState};

use crate::{
    conn::{current_tid, dir, now, SockState},
    kernel::read,
    maps::{mark_record_port, record_port_marked, tls_hooks, LAST_RECORDS_READ, RECORDS},
    off,
    tls::{handshake_done, queue_empty},
};

/// Every segment received by a socket of the traced processes' cgroups: the record
/// headers of connections being followed. Never drops anything. (Where the segment hook
/// is a cgroup program too, `io::segments` does this in the same run.)
#[cgroup_skb(ingress)]
pub fn tls_records(ctx: SkBuffContext) -> i32 {
    let port = unsafe { (*ctx.skb.skb).local_port };
    // Most segments are of connections never followed so: one array read, no lookup.
    if record_port_marked(port as u16) {
        if let (Some((sk, _)), Some(tcp)) = (socket_of(&ctx), TcpHeader::read(&ctx)) {
            follow(&ctx, sk, &tcp);
        }
    }
    1
}

/// The socket a segment is for: its address (the key of its state, as the kernel's
/// `struct sock *`; no helper call to cast it) and its TCP state.
#[inline(always)]
pub fn socket_of(ctx: &SkBuffContext) -> Option<(u64, u32)> {
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return None;
    }
    Some((sk as u64, unsafe { (*sk).state }))
}

/// What a cgroup socket-buffer program reads of a segment's TCP header (it sees the
/// packet from its network header, before TCP has processed it).
pub struct TcpHeader {
    pub seq: u32,
    pub ack_seq: u32,
    /// Where the payload starts, from the network header.
    pub payload: u32,
    /// Payload bytes.
    pub len: u32,
    /// SYN and FIN, each of which takes a sequence number.
    pub syn: bool,
    pub fin: bool,
}

impl TcpHeader {
    /// Read in place from the packet's linear part, where the headers are (no helper
    /// call).
    #[inline(always)]
    pub fn read(ctx: &SkBuffContext) -> Option<TcpHeader> {
        let skb = ctx.skb.skb;
        let data = unsafe { (*skb).data } as usize;
        let end = unsafe { (*skb).data_end } as usize;
        // (A shorter check, `data + 1`, compiles to `data >= end`, from which the
        // verifier learns no bytes it may read.)
        if data + 20 > end {
            return None;
        }
        let first = unsafe { *(data as *const u8) };
        let ip_len = match first >> 4 {
            4 => (first & 0xf) as usize * 4,
            6 => 40,
            _ => return None,
        };
        // Bytes 4 to 13 of the TCP header: sequence and acknowledgement numbers, data
        // offset and flags.
        let tcp = data + ip_len;
        if tcp + 14 > end {
            return None;
        }
        let byte = |i: usize| unsafe { *((tcp + i) as *const u8) };
        let seq = u32::from_be_bytes([byte(4), byte(5), byte(6), byte(7)]);
        let ack_seq = u32::from_be_bytes([byte(8), byte(9), byte(10), byte(11)]);
        let doff = (byte(12) >> 4) as u32 * 4;
        let flags = byte(13);
        let payload = ip_len as u32 + doff;
        let len = ctx.len().checked_sub(payload)?;
        // FIN is bit 0, SYN bit 1.
        Some(TcpHeader { seq, ack_seq, payload, len, syn: flags & 2 != 0, fin: flags & 1 != 0 })
    }

    /// The sequence number after the segment (as TCP's own `end_seq`).
    #[inline(always)]
    pub fn end_seq(&self) -> u32 {
        self.seq.wrapping_add(self.len).wrapping_add(self.syn as u32 + self.fin as u32)
    }
}

/// The record headers in the payload of a segment of `tp`, when its connection is being
/// followed from its records.
#[inline(always)]
pub fn follow(ctx: &SkBuffContext, tp: u64, tcp: &TcpHeader) -> Option<()> {
    let rs = unsafe { &mut *RECORDS.get_ptr_mut(tp)? };
    if rs.state != record::PARSING && rs.state != record::DONE {
        return None;
    }
    if tcp.len == 0 {
        return None;
    }
    let payload = tcp.payload;
    rs.feed(tcp.seq, tcp.len, |i| ctx.load::<u8>((payload + i) as usize).ok());
    Some(())
}

/// Where the bytes a write of `msg` (a `struct msghdr *`) carries start in user memory
/// (of its first buffer), and how many it carries.
#[inline(always)]
fn write_buffer(msg: u64) -> Option<(u64, u64)> {
    let iter = msg + off!(msghdr_iter) as u64;
    let (kind, at, ptr, count) = iter_fields(iter)?;
    let kind = kind & off!(iter_type_mask);
    let base = if kind == off!(iter_ubuf) {
        ptr
    } else if kind == off!(iter_iovec) {
        // The first iovec's base.
        read::<u64>(ptr, 0)?
    } else {
        return None;
    };
    Some((base + at, count))
}

/// The type, offset, buffer pointer and count of the `struct iov_iter` at `iter`: its
/// first 32 bytes in one read where they hold them all (every kernel the tracer knows),
/// else one read per field.
#[inline(always)]
fn iter_fields(iter: u64) -> Option<(u32, u64, u64, u64)> {
    let (at, ptr, count) = (off!(iov_iter_offset), off!(iov_iter_ptr), off!(iov_iter_count));
    let type_at = off!(iov_iter_type);
    let word = |o: u32| o < 32 && o % 8 == 0;
    if type_at < 8 && word(at) && word(ptr) && word(count) {
        let head = read::<[u64; 4]>(iter, 0)?;
        let pick = |o: u32| match o {
            0 => head[0],
            8 => head[1],
            16 => head[2],
            _ => head[3],
        };
        // The type is the byte at its offset of the first word (little-endian).
        let kind = (head[0] >> (type_at * 8)) as u8 as u32;
        return Some((kind, pick(at), pick(ptr), pick(count)));
    }
    Some((read::<u8>(iter, type_at)? as u32, read(iter, at)?, read(iter, ptr)?, read(iter, count)?))
}

/// The first bytes a write of `msg` carries.
#[inline(always)]
fn write_bytes(msg: u64) -> Option<[u8; 2]> {
    let (at, _) = write_buffer(msg)?;
    unsafe { bpf_probe_read_user(at as *const [u8; 2]) }.ok()
}

/// A write on upstream connection `sk` begins (`msg`: what it writes). A client's first
/// write that is a TLS handshake record (its ClientHello) makes the connection followed
/// from the records it writes, until the one that ends its handshake (its Finished):
/// until then its writes are no request. Returns true when this write is handshake
/// only; false when the connection is not followed so, or this write carries the first
/// request (after the Finished).
// A BPF subprogram of its own: inlined into the write-start hook, the verifier found a
// register read on a path where the compiler had left it unset.
#[inline(never)]
pub fn client_write(sk: u64, st: &mut SockState, msg: u64) -> bool {
    if st.tls & tls::DONE != 0 {
        return false;
    }
    if st.tls & tls::RECORDS == 0 {
        if st.tls != 0 || st.requests != 0 || st.dir != dir::IDLE || st.origin != origin::CONNECTED || msg == 0 {
            return false;
        }
        let Some(b) = write_bytes(msg) else { return false };
        if b[0] != record::HANDSHAKE || b[1] != 3 {
            return false;
        }
        let Some(seq) = read::<u32>(sk, off!(tcp_write_seq)) else { return false };
        st.tls = tls::RECORDS;
        st.tls_start_ns = now();
        mark_record_port(sk);
        let _ = RECORDS.insert(&sk, &RecordState::at(seq), 0);
    }
    let Some(rs) = RECORDS.get_ptr_mut(&sk) else {
        st.tls |= tls::DONE;
        return false;
    };
    let rs = unsafe { &mut *rs };
    let (Some((base, len)), Some(seq)) = (write_buffer(msg), read::<u32>(sk, off!(tcp_write_seq))) else {
        return true;
    };
    rs.feed(seq, len as u32, |i| unsafe { bpf_probe_read_user((base + i as u64) as *const u8) }.ok());
    let handshake_only = match rs.state {
        record::PARSING => true,
        record::LOST => {
            let _ = RECORDS.remove(&sk);
            st.tls |= tls::DONE;
            false
        }
        // The client's Finished is in this write: its handshake is done; a request may
        // follow it in the same write (APP) or come with the next.
        state => {
            handshake_done(sk, st, now());
            let _ = RECORDS.remove(&sk);
            state == record::DONE
        }
    };
    if handshake_only {
        st.tls |= tls::HANDSHAKE_WRITE;
    }
    handshake_only
}

/// The return of a write on upstream connection `sk`: true when it wrote handshake
/// records only (see [`client_write`]).
#[inline(always)]
pub fn client_handshake_written(st: &mut SockState) -> bool {
    if st.tls & tls::HANDSHAKE_WRITE == 0 {
        return false;
    }
    st.tls &= !tls::HANDSHAKE_WRITE;
    true
}

/// The server's first write on accepted connection `sk` begins (`msg`: what it writes).
/// Returns true when it is a TLS handshake record: the connection is followed from its
/// records from here, and this write is no response.
#[inline(never)]
pub fn detect(sk: u64, st: &mut SockState, msg: u64) -> bool {
    let Some(bytes) = write_bytes(msg) else { return false };
    if bytes[0] != record::HANDSHAKE || bytes[1] != 3 {
        return false;
    }
    let Some(rcv_nxt) = read::<u32>(sk, off!(tcp_rcv_nxt)) else { return false };
    // What was read (the ClientHello) began the handshake.
    st.tls = tls::RECORDS;
    st.tls_start_ns = if st.arrival_ns != 0 { st.arrival_ns } else { st.first_read_ns };
    st.dir = dir::IDLE;
    st.req_flags = 0;
    for field in [&mut st.arrival_ns, &mut st.first_read_ns, &mut st.last_read_ns, &mut st.req_in] {
        unsafe { core::ptr::write_volatile(field, 0) };
    }
    mark_record_port(sk);
    let _ = RECORDS.insert(&sk, &RecordState::at(rcv_nxt), 0);
    true
}

/// A read of `len` bytes on `sk`, followed from its records while the client's handshake
/// is not read to its end. [`HANDSHAKE_READ`]: a handshake read (no request); else the
/// bytes of it that belong to the first request (and the connection is followed as
/// usual from here).
#[inline(never)]
pub fn on_read(sk: u64, st: &mut SockState, len: u64) -> u64 {
    if tls_hooks() {
        let _ = LAST_RECORDS_READ.insert(&current_tid(), &sk, 0);
    }
    let Some(rs) = (unsafe { RECORDS.get(&sk) }).copied() else {
        // Evicted: follow it as plain TCP from here, untimed.
        st.tls |= tls::DONE;
        return len;
    };
    let copied = read::<u32>(sk, off!(tcp_copied_seq)).unwrap_or(0);
    match rs.classify_read(copied, len) {
        RecordRead::Lost => {
            let _ = RECORDS.remove(&sk);
            st.tls |= tls::DONE;
            len
        }
        RecordRead::Handshake => {
            handshake_read(sk, st);
            HANDSHAKE_READ
        }
        // The client's Finished has been read: the server's handshake is complete. The
        // entry stays until the first request's record has been read whole.
        RecordRead::HandshakeEnds => {
            handshake_done(sk, st, now());
            handshake_read(sk, st);
            HANDSHAKE_READ
        }
        RecordRead::Request(bytes) => {
            handshake_done(sk, st, now());
            bytes
        }
    }
}

/// [`on_read`]'s answer for a read of handshake records only.
pub const HANDSHAKE_READ: u64 = u64::MAX;

/// A read of handshake records: data left queued (the request that followed) keeps its
/// arrival.
#[inline(always)]
fn handshake_read(sk: u64, st: &mut SockState) {
    if queue_empty(sk) {
        st.pending_data_ns = 0;
    }
}

/// Whether a write on `sk` (followed from its records) is no response: the handshake's
/// flights, and what the server writes before it has read the first request's record
/// whole (TLS 1.3 session tickets).
#[inline(never)]
pub fn not_a_response(sk: u64, st: &SockState) -> bool {
    if st.tls & tls::RECORDS == 0 || origin::is_client(st.origin) {
        return false;
    }
    if st.tls & tls::DONE == 0 || st.dir == dir::IDLE {
        return true;
    }
    let Some(rs) = (unsafe { RECORDS.get(&sk) }).copied() else { return false };
    if !rs.response_may_start(read::<u32>(sk, off!(tcp_copied_seq)).unwrap_or(0)) {
        return true;
    }
    // The request's record is read: nothing more to follow.
    let _ = RECORDS.remove(&sk);
    false
}
