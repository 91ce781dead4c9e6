//! Wire types shared by the kernel programs and the userspace tracer.
//!
//! Every type is `#[repr(C)]` with explicit widths and explicit padding, and its size is
//! pinned by a compile-time assertion: the two sides are built by different compilers
//! for different targets and must agree byte for byte.
#![no_std]

use core::mem::size_of;

/// Kinds of events in the ring buffer; the first field of every event.
pub mod kind {
    /// A connection the traced process accepted (or one it already had open).
    pub const CONN_OPEN: u16 = 1;
    /// One request/response exchange on a traced connection.
    pub const REQUEST: u16 = 2;
    /// A traced connection closed.
    pub const CONN_CLOSE: u16 = 3;
    /// A listener retransmitted a SYN-ACK.
    pub const SYNACK_RETRANSMIT: u16 = 4;
    /// A traced process (thread group) exited.
    pub const PROCESS_EXIT: u16 = 5;
    /// A traced process forked a new process.
    pub const PROCESS_FORK: u16 = 6;
    /// The server's kernel reset a traced connection right after closing it (closed with
    /// unread data, SO_LINGER 0, aborted). Resets while the connection is open are
    /// carried by its [`ConnClose`] instead.
    pub const RESET_SENT: u16 = 7;
    /// A connect() by a traced process finished: established, refused, timed out, ...
    pub const UPSTREAM_CONNECT: u16 = 8;
    /// The first byte of an upstream response was read: one upstream request is timed.
    pub const UPSTREAM_REQUEST: u16 = 9;
    /// [`REQUEST`] in one cache line ([`ShortRequest`]): the usual form.
    pub const REQUEST_SHORT: u16 = 10;
    /// A thread that had started upstream requests with no server request to tie them to
    /// began writing a server response ([`Bind`]): those requests were made for it.
    pub const BIND: u16 = 11;
    /// A connection's TLS handshake completed ([`TlsDone`]).
    pub const TLS_DONE: u16 = 12;
    /// The first bytes of a request or response, for its label ([`Payload`]; only with
    /// labels on). Variable length: [`Payload::len`] bytes follow the fixed part.
    pub const PAYLOAD: u16 = 13;
    /// A connection closed with an exchange still to report ([`ClosingExchange`]): the
    /// exchange and the close in one record (a short connection's last two events).
    pub const CONN_CLOSE_EXCHANGE: u16 = 14;
    /// With labels on, the usual form of a kept-alive connection's exchange: the read
    /// that begins a request reports the exchange before it and copies the new request's
    /// first bytes, and both go in one record — the exchange ([`ShortRequest`], with this
    /// kind), then the payload as its own record would be ([`Payload`] and its bytes).
    pub const REQUEST_SHORT_PAYLOAD: u16 = 15;
}

/// Which bytes a [`Payload`] holds.
pub mod side {
    /// The first read of a request on a server connection.
    pub const REQUEST: u16 = 1;
    /// The first write of a server connection's response.
    pub const RESPONSE: u16 = 2;
    /// The first write of a request on an upstream connection.
    pub const UPSTREAM_REQUEST: u16 = 3;
    /// The first read of an upstream response.
    pub const UPSTREAM_RESPONSE: u16 = 4;

    /// Bytes copied of a request: its request line, statement or commands (pipelined
    /// ones too; a redis-benchmark pipeline of 16 SETs is 736 bytes).
    pub const REQUEST_BYTES: u32 = 1024;
    /// Bytes copied of a response: its status line or first messages.
    pub const RESPONSE_BYTES: u32 = 128;

    /// Whether `side` is a request (the direction whose bytes are labelled).
    pub const fn is_request(side: u16) -> bool {
        side == REQUEST || side == UPSTREAM_REQUEST
    }
}

/// How the programs follow a TLS connection ([`SockState::tls`], [`TlsDone::method`]).
pub mod tls {
    /// Seen inside the TLS library's calls (uprobes on OpenSSL): requests and responses
    /// are the plaintext the application reads and writes, and the socket's own reads and
    /// writes (handshake flights, tickets, alerts) make no request.
    pub const HOOKED: u32 = 1 << 0;
    /// The handshake is complete (its [`super::TlsDone`] was emitted, if timed).
    pub const DONE: u32 = 1 << 1;
    /// Followed from the record layer alone (no library hook): the server's first write
    /// was a handshake record, and the client's records are read as they arrive
    /// ([`super::RecordState`]) to tell where its handshake ends.
    pub const RECORDS: u32 = 1 << 2;
    /// The application called `SSL_shutdown`: what it writes now is its close_notify.
    pub const SHUTDOWN: u32 = 1 << 3;
    /// A client's write under way is handshake records: its return is no request.
    pub const HANDSHAKE_WRITE: u32 = 1 << 4;
}

/// TLS record content types.
pub mod record {
    pub const CHANGE_CIPHER_SPEC: u8 = 20;
    pub const ALERT: u8 = 21;
    pub const HANDSHAKE: u8 = 22;
    pub const APPLICATION_DATA: u8 = 23;
    /// The largest record body a peer may send (2^14 plus expansion).
    pub const MAX_BODY: u32 = (1 << 14) + 2048;
    /// Record headers looked at per segment: more records than this in one segment and
    /// the rest of the connection is not followed.
    pub const MAX_PER_SEGMENT: usize = 16;

    /// [`super::RecordState::state`].
    pub const PARSING: u8 = 0;
    /// The client's last handshake record was seen (`done_seq` is valid).
    pub const DONE: u8 = 1;
    /// Not TLS after all, or a header was missed: the connection is not followed.
    pub const LOST: u8 = 2;
    /// The record after the handshake (the first request's) was seen too (`app_end`).
    pub const APP: u8 = 3;
}

/// Where a client's TLS records are, as its segments arrive (the `RECORDS` map's value):
/// from its second flight on, every record header is read until the one that ends its
/// handshake — its Finished, i.e. the record after its ChangeCipherSpec (TLS 1.2, and
/// TLS 1.3 in compatibility mode) or its first encrypted record (TLS 1.3 without one).
/// What follows is application data.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecordState {
    /// Sequence number of the next record header (or of the one partly seen).
    pub hdr_seq: u32,
    /// Sequence number just past the client's last handshake record (when `DONE`).
    pub done_seq: u32,
    /// The header's bytes seen so far (`have` of them), the first in the lowest byte
    /// (shifts, not indexes: the verifier bounds those easily).
    pub hdr: u64,
    pub have: u8,
    /// Non-zero once the client's ChangeCipherSpec was seen.
    pub ccs: u8,
    /// One of [`record`]'s `PARSING`, `DONE`, `APP`, `LOST`.
    pub state: u8,
    pub _pad: u8,
    /// Sequence number just past the first record after the handshake (when `APP`):
    /// until the server has read it whole, what it writes is no response (TLS 1.3
    /// session tickets, written while the request's record is half read).
    pub app_end: u32,
}
const _: () = assert!(size_of::<RecordState>() == 24);

/// What a server's read on a connection followed from its records was
/// ([`RecordState::classify_read`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordRead {
    /// Handshake records only; the handshake goes on.
    Handshake,
    /// The last of the client's handshake records: the server's handshake is complete.
    HandshakeEnds,
    /// It reached past the handshake: the first request begins with its last `n` bytes
    /// (the handshake is complete too).
    Request(u64),
    /// The records cannot be followed (not TLS, a header missed, or the segment program
    /// never saw them): plain TCP from here.
    Lost,
}

impl RecordState {
    /// The server read `len` bytes, after which it has read everything before sequence
    /// number `copied` (`tcp_sock.copied_seq`).
    pub fn classify_read(&self, copied: u32, len: u64) -> RecordRead {
        if self.state == record::LOST {
            return RecordRead::Lost;
        }
        let want = self.hdr_seq.wrapping_add(self.have as u32);
        if self.state == record::PARSING && copied.wrapping_sub(want) as i32 > 0 {
            // A header byte was read that was never seen arriving.
            return RecordRead::Lost;
        }
        let past = copied.wrapping_sub(self.done_seq) as i32;
        if self.state == record::PARSING || past < 0 {
            RecordRead::Handshake
        } else if past == 0 {
            RecordRead::HandshakeEnds
        } else {
            RecordRead::Request(if (past as u64) < len { past as u64 } else { len })
        }
    }

    /// Whether the server, having read everything before sequence number `copied`, may
    /// be writing a response: not before it has read the first request's record whole
    /// (what it writes until then, such as TLS 1.3 session tickets, is no response).
    pub fn response_may_start(&self, copied: u32) -> bool {
        self.state != record::APP || copied.wrapping_sub(self.app_end) as i32 >= 0
    }

    /// Starts following records at sequence number `seq`.
    pub fn at(seq: u32) -> Self {
        Self { hdr_seq: seq, ..Self::default() }
    }

    /// A segment of `len` payload bytes starting at sequence number `seq` arrived;
    /// `byte_at(i)` reads its `i`-th byte. Segments may come in any order and again
    /// (retransmits): only the one holding the next header byte needed moves it on.
    #[inline(always)]
    pub fn feed(&mut self, seq: u32, len: u32, mut byte_at: impl FnMut(u32) -> Option<u8>) {
        for _ in 0..record::MAX_PER_SEGMENT {
            if self.state != record::PARSING && self.state != record::DONE {
                return;
            }
            let want = self.hdr_seq.wrapping_add(self.have as u32);
            let mut at = want.wrapping_sub(seq);
            if (at as i32) < 0 || at >= len {
                // Not in this segment: before it (a retransmit, or a segment that came
                // out of order ahead of the one needed) or after it.
                return;
            }
            for _ in 0..5 {
                if self.have >= 5 {
                    break;
                }
                if at >= len {
                    // The header goes on in the next segment.
                    return;
                }
                let Some(b) = byte_at(at) else {
                    self.state = record::LOST;
                    return;
                };
                self.hdr |= (b as u64) << ((self.have as u64 & 7) * 8);
                self.have += 1;
                at += 1;
            }
            let byte = |i: u64| (self.hdr >> (i * 8)) as u8;
            let kind = byte(0);
            let body = u16::from_be_bytes([byte(3), byte(4)]) as u32;
            if !(record::CHANGE_CIPHER_SPEC..=record::APPLICATION_DATA).contains(&kind)
                || byte(1) != 3
                || body > record::MAX_BODY
            {
                self.state = record::LOST;
                return;
            }
            let end = self.hdr_seq.wrapping_add(5 + body);
            if self.state == record::DONE {
                self.app_end = end;
                self.state = record::APP;
                return;
            }
            if kind == record::CHANGE_CIPHER_SPEC {
                self.ccs = 1;
            } else if self.ccs != 0 || kind == record::APPLICATION_DATA {
                self.done_seq = end;
                self.state = record::DONE;
            }
            self.hdr_seq = end;
            self.have = 0;
            self.hdr = 0;
        }
    }
}

/// The operations of the TLS library that the programs hook (a thread's [`TlsCall::op`]).
pub mod tls_op {
    /// `SSL_read`: returns the plaintext bytes read.
    pub const READ: u32 = 1;
    /// `SSL_read_ex`: returns 1 and stores the bytes read through its fourth argument.
    pub const READ_EX: u32 = 2;
    /// `SSL_do_handshake` (which `SSL_accept` and `SSL_connect` call): 1 once complete.
    pub const HANDSHAKE: u32 = 5;
}

/// How a traced connection came to be known.
pub mod origin {
    /// Accepted by the traced process while the tracer ran: every phase is known.
    pub const ACCEPTED: u32 = 1;
    /// Already open when tracing started; first seen on a read. Measured from its next
    /// request on.
    pub const EXISTING: u32 = 2;
    /// Opened by the traced process with connect(): an upstream call.
    pub const CONNECTED: u32 = 3;
    /// An upstream connection the traced process already had open when tracing started.
    pub const EXISTING_CONNECTED: u32 = 4;

    /// Connections the traced process opened (its upstream calls).
    pub const fn is_client(origin: u32) -> bool {
        origin == CONNECTED || origin == EXISTING_CONNECTED
    }
}

/// Bits of [`Request::flags`] and [`ConnClose::flags`].
pub mod flags {
    /// The connection closed while a request was read but no response written.
    pub const ABORTED: u32 = 1 << 0;
    /// The connection closed before the peer acknowledged the whole response.
    pub const UNDELIVERED: u32 = 1 << 1;
    /// The server's kernel sent a reset on the connection (only in [`ConnClose::flags`]).
    pub const RESET_SENT: u32 = 1 << 2;
    /// The peer reset the connection (only in [`ConnClose::flags`]).
    pub const RESET_RECEIVED: u32 = 1 << 3;
    /// The request was read before a write was ever seen on the socket, and the first
    /// data arrival is unknown (connection older than the tracer).
    pub const ARRIVAL_UNKNOWN: u32 = 1 << 4;
    /// The peer closed the connection in an orderly way (its FIN, then ours) after a last
    /// message the server did not answer: a message that expects no answer (a
    /// protocol's goodbye), not an aborted request. In [`Request::flags`] for that
    /// message and in [`ConnClose::flags`].
    pub const CLOSED_BY_PEER: u32 = 1 << 5;
    /// Programs only ([`SockState::conn_flags`]): the connection closed in an orderly
    /// way, FINs both ways and no reset.
    pub const ORDERLY_CLOSE: u32 = 1 << 6;
}

/// [`SockState::acked_ns`] while the first write of a response is under way: its bytes
/// are not all queued yet, so no acknowledgement can deliver it (the write's return
/// sets what to wait for). Never sent to userspace in an event.
pub const ACK_PENDING: u64 = u64::MAX;

/// A message left unanswered is the peer's goodbye when the peer's FIN came within
/// this long of the message (or twice the connection's smoothed RTT, if longer): a
/// client sends its goodbye and closes in two consecutive calls (microseconds apart,
/// milliseconds when it is preempted between them on a busy machine), while a client
/// that gives up on a request it is waiting for closes much later.
pub const GOODBYE_WINDOW_NS: u64 = 20_000_000;

/// Address families as the kernel numbers them.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Common start of every event.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    pub kind: u16,
    pub _pad0: u16,
    /// Thread group id (the "PID" users see) of the process involved.
    pub tgid: u32,
    /// Thread id.
    pub tid: u32,
    pub _pad1: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the event was emitted.
    pub ts_ns: u64,
    /// Kernel address of the `struct sock`: the connection's identity while it lives.
    pub sock: u64,
}
const _: () = assert!(size_of::<EventHeader>() == 32);

/// The 4-tuple of a connection. IPv4 addresses are stored as IPv4-mapped IPv6.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnAddr {
    pub family: u16,
    /// Local port, host byte order.
    pub local_port: u16,
    /// Remote port, host byte order.
    pub remote_port: u16,
    pub _pad: u16,
    /// The inode number of the socket's network namespace (as `/proc/PID/ns/net` shows
    /// it), where the event needs it (a server connection's open, a SYN-ACK retransmit,
    /// a reset after close); 0 where it was not read.
    pub netns: u32,
    pub _pad1: u32,
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
}
const _: () = assert!(size_of::<ConnAddr>() == 48);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnOpen {
    pub header: EventHeader,
    pub addr: ConnAddr,
    /// One of [`origin`].
    pub origin: u32,
    /// SYN-ACK retransmits before the handshake completed.
    pub synack_retransmits: u32,
    /// When the first SYN-ACK was sent (0 if unknown).
    pub synack_ns: u64,
    /// When the connection became ESTABLISHED and was queued on the listener (0 if unknown).
    pub established_ns: u64,
    /// When accept() returned it; `header.ts_ns` for accepted connections.
    pub accepted_ns: u64,
    /// First data queued on the socket before the application first read (0 if none).
    pub first_data_ns: u64,
}
const _: () = assert!(size_of::<ConnOpen>() == 120);

/// One exchange: a request read by the server, then its response written and delivered.
/// Timestamps are CLOCK_MONOTONIC nanoseconds; 0 means "did not happen / unknown".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Request {
    pub header: EventHeader,
    /// First byte of the request queued on the socket.
    pub arrival_ns: u64,
    pub first_read_ns: u64,
    pub last_read_ns: u64,
    pub first_write_ns: u64,
    pub last_write_ns: u64,
    /// When the peer acknowledged the last byte of the response.
    pub acked_ns: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// 0-based index of the request on its connection.
    pub index: u32,
    /// Bits of [`flags`].
    pub flags: u32,
    /// The thread that last read the request: the one whose `think` this is.
    pub tid: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<Request>() == 112);

/// A [`Request`] in 56 bytes, which with the ring buffer's 8-byte record header fill one
/// cache line: emitted whenever every time of the exchange lies within 4.29 s of its
/// earliest, both byte counts fit in 32 bits and the flags in 16, i.e. nearly always.
/// Writing one line instead of two per request is measurably cheaper for the hook.
/// What it leaves out: the emission time and request index (unused by userspace) and
/// the tgid, which is the connection's (from its open event).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShortRequest {
    pub kind: u16,
    pub flags: u16,
    pub tid: u32,
    pub sock: u64,
    /// The earliest of the times.
    pub base_ns: u64,
    /// Arrival, first read, last read, first write, last write, acknowledgement: each
    /// `ns - base_ns + 1`, or 0 for "did not happen / unknown".
    pub offsets: [u32; 6],
    pub bytes_in: u32,
    pub bytes_out: u32,
}
const _: () = assert!(size_of::<ShortRequest>() == 56);

impl ShortRequest {
    /// The longest span of times it can carry.
    pub const MAX_SPAN_NS: u64 = u32::MAX as u64 - 1;

    /// `ns` as an offset from `base_ns` (which must not be later; the span must fit).
    #[inline(always)]
    pub fn offset(base_ns: u64, ns: u64) -> u32 {
        if ns == 0 {
            0
        } else {
            (ns - base_ns + 1) as u32
        }
    }

    /// The full event (tgid 0: the connection's to be filled in; index and emission
    /// time 0).
    pub fn expand(&self) -> Request {
        let at = |i: usize| match self.offsets[i] {
            0 => 0,
            o => self.base_ns + o as u64 - 1,
        };
        Request {
            header: EventHeader { kind: kind::REQUEST, tid: self.tid, sock: self.sock, ..EventHeader::default() },
            arrival_ns: at(0),
            first_read_ns: at(1),
            last_read_ns: at(2),
            first_write_ns: at(3),
            last_write_ns: at(4),
            acked_ns: at(5),
            bytes_in: self.bytes_in as u64,
            bytes_out: self.bytes_out as u64,
            index: 0,
            flags: self.flags as u32,
            tid: self.tid,
            _pad: 0,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnClose {
    pub header: EventHeader,
    pub addr: ConnAddr,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub requests: u32,
    /// Bits of [`flags`].
    pub flags: u32,
}
const _: () = assert!(size_of::<ConnClose>() == 104);

/// A connection's last exchange and its close, emitted together
/// ([`kind::CONN_CLOSE_EXCHANGE`] in the close's header): one record instead of two
/// for every connection that closes after its last request.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClosingExchange {
    pub close: ConnClose,
    /// The exchange, reported before the close.
    pub request: ShortRequest,
}
const _: () = assert!(size_of::<ClosingExchange>() == 160);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SynAckRetransmit {
    pub header: EventHeader,
    pub addr: ConnAddr,
}
const _: () = assert!(size_of::<SynAckRetransmit>() == 80);

/// A connect() by a traced process ended. `header.tid` is the connecting thread.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UpstreamConnect {
    pub header: EventHeader,
    pub addr: ConnAddr,
    /// connect() started (SYN_SENT).
    pub start_ns: u64,
    /// Established, or given up.
    pub end_ns: u64,
    /// SYNs sent again.
    pub syn_retransmits: u32,
    /// 0 when established; the socket error (errno: ECONNREFUSED, ETIMEDOUT, ...) when
    /// the connect failed; [`CONNECT_ABANDONED`] when the application closed the socket
    /// before the connect completed (a connect timeout of its own).
    pub error: i32,
}
const _: () = assert!(size_of::<UpstreamConnect>() == 104);

/// [`UpstreamConnect::error`] of a connect the application gave up on.
pub const CONNECT_ABANDONED: i32 = -1;

/// One upstream request: the traced process wrote a request on a connection it opened
/// and started reading the response. `header.tid` is the thread that wrote the request
/// (the one that waited).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UpstreamRequest {
    pub header: EventHeader,
    pub addr: ConnAddr,
    pub first_write_ns: u64,
    pub last_write_ns: u64,
    /// First byte of the response queued on the socket (0: unknown, or no response).
    pub response_ns: u64,
    /// The application's first read of the response (0: none, the connection closed).
    pub first_read_ns: u64,
    /// Bytes of this request.
    pub bytes_out: u64,
    /// Bytes read on the connection since the previous event (the previous response).
    pub bytes_in: u64,
    /// Bits of [`flags`]: `ABORTED` when the connection closed with no response.
    pub flags: u32,
    /// One of [`origin`] (CONNECTED or EXISTING_CONNECTED).
    pub origin: u32,
    /// The server request this one was made for: the server connection's socket and
    /// that request's first read (see [`ThreadWork`]); 0 when none was known (a [`Bind`]
    /// may tie it later).
    pub bound_sock: u64,
    pub bound_first_read_ns: u64,
}
const _: () = assert!(size_of::<UpstreamRequest>() == 152);

/// Thread `header.tid` began writing the response of the server request on
/// `header.sock` that was first read at `first_read_ns`; upstream requests the thread
/// started since `since_ns` with no server request known were made for that one (a
/// worker handed the request by another thread).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bind {
    pub header: EventHeader,
    pub first_read_ns: u64,
    pub since_ns: u64,
}
const _: () = assert!(size_of::<Bind>() == 48);

/// The TLS handshake of connection `header.sock` completed. With both times 0: the
/// connection is followed another way from now on (`method`), no handshake.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TlsDone {
    pub header: EventHeader,
    /// Server side: the first byte of the ClientHello queued on the socket. Client side:
    /// the ClientHello's write.
    pub start_ns: u64,
    /// The library's handshake call returned success (or, when the application never
    /// called it, its first read or write of plaintext returned).
    pub end_ns: u64,
    /// Bits of [`tls`]: how the connection is followed.
    pub method: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<TlsDone>() == 56);

/// The first bytes of a request or response ([`side`]), copied from the application's
/// buffer by the call that read or wrote them, for userspace to derive the request's
/// label from: `len` bytes (at most [`side::REQUEST_BYTES`]) follow this fixed part in
/// the same record. Nothing else of the payload is ever copied.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Payload {
    pub header: EventHeader,
    /// One of [`side`].
    pub side: u16,
    /// Bytes copied (following this struct).
    pub len: u16,
    /// Bytes the call carried (of its first buffer): more than `len` when cut.
    pub total: u32,
}
const _: () = assert!(size_of::<Payload>() == 40);

/// A thread inside a call of the TLS library (the `TLS_CALLS` map's value).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TlsCall {
    /// The library's connection object (`SSL *`).
    pub ssl: u64,
    /// `SSL_read_ex`: where the call stores its byte count.
    pub count_ptr: u64,
    /// The arrival of the last data the call read from the socket (0: none read).
    pub arrival_ns: u64,
    /// One of [`tls_op`].
    pub op: u32,
    pub _pad: u32,
    /// Reads: the application's buffer the plaintext goes to (for labels).
    pub buf: u64,
}
const _: () = assert!(size_of::<TlsCall>() == 40);

/// Per thread of a traced process (the `THREADS` map's value): the server request it
/// read most recently, which its next upstream request is made for, and the upstream
/// requests it started with no server request known.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadWork {
    /// Socket of the server connection (0: none, or its response is under way).
    pub sock: u64,
    /// That request's first read.
    pub first_read_ns: u64,
    /// When this thread last began writing a server response (0: never).
    pub since_ns: u64,
    /// Upstream requests begun since `since_ns` with no server request known.
    pub unbound: u32,
    /// Non-zero once the thread has read a server request: a reader's upstream requests
    /// with no request known are never tied by a `Bind` (its next response is another
    /// request's).
    pub reader: u32,
}
const _: () = assert!(size_of::<ThreadWork>() == 32);

/// A reset the server sent on a traced connection it had just closed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResetSent {
    pub header: EventHeader,
    pub addr: ConnAddr,
}
const _: () = assert!(size_of::<ResetSent>() == 80);

/// Process lifecycle: `header.tgid` is the process; for a fork, `child` is the new one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessEvent {
    pub header: EventHeader,
    pub child: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<ProcessEvent>() == 40);

/// The largest event.
/// Bytes the programs reserve in the ring buffer for an event of `size` bytes: rounded
/// up so that with the kernel's 8-byte record header every record fills whole 64-byte
/// cache lines. Records then start on line boundaries, and the per-request event
/// ([`ShortRequest`]) is one line, which the program writes without touching a second.
pub const fn record_bytes(size: usize) -> usize {
    (size + 8).div_ceil(64) * 64 - 8
}

pub const MAX_EVENT_SIZE: usize = size_of::<UpstreamRequest>();

/// Offsets into kernel structures, resolved by userspace from the running kernel's BTF
/// and handed to the programs before load. Rust kernel programs get no CO-RE
/// relocations, so nothing here may be a compile-time constant.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    // struct sock_common (at the start of struct sock and struct request_sock)
    pub skc_family: u32,
    pub skc_num: u32,
    pub skc_dport: u32,
    pub skc_rcv_saddr: u32,
    pub skc_daddr: u32,
    pub skc_v6_rcv_saddr: u32,
    pub skc_v6_daddr: u32,
    // struct sock
    pub sk_protocol: u32,
    pub sk_type: u32,
    // struct tcp_sock
    pub tcp_srtt_us: u32,
    pub tcp_snd_una: u32,
    pub tcp_write_seq: u32,
    // struct tcp_request_sock
    pub treq_snt_synack: u32,
    // struct sk_buff -> cb, and struct tcp_skb_cb inside it
    pub skb_cb: u32,
    pub tcp_skb_cb_ack_seq: u32,
    // struct task_struct, files_struct, fdtable, file, socket
    pub task_pid: u32,
    pub task_tgid: u32,
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdtable_fd: u32,
    pub fdtable_max_fds: u32,
    pub file_private_data: u32,
    pub socket_sk: u32,
    /// struct sock.sk_err
    pub sk_err: u32,
    /// struct tcp_sock.total_retrans (a passive child inherits its SYN-ACK retransmits)
    pub tcp_total_retrans: u32,
    /// struct tcp_sock.bytes_sent and .bytes_retrans (u64 each)
    pub tcp_bytes_sent: u32,
    pub tcp_bytes_retrans: u32,
    /// struct tcp_skb_cb.seq, followed by .end_seq (checked at start; both are read at
    /// once): a segment carries data when they differ
    pub tcp_skb_cb_seq: u32,
    /// struct sock_common.skc_state (one byte)
    pub skc_state: u32,
    /// struct tcp_sock.lsndtime (u32 jiffies): set when the kernel creates a passive
    /// connection and again at each data send, so until the application first writes,
    /// the jiffy its handshake completed
    pub tcp_lsndtime: u32,
    /// struct tcp_sock.rcv_nxt and .copied_seq (u32 each): data is left in the receive
    /// queue after a read when they differ
    pub tcp_rcv_nxt: u32,
    pub tcp_copied_seq: u32,
    /// struct msghdr.msg_iter, and in struct iov_iter: its type (one byte read), how far
    /// it has gone, and the pointer to its buffer (`ubuf`) or iovec array (`__iov`),
    /// which share one place: where a write's bytes are in user memory
    pub msghdr_iter: u32,
    pub iov_iter_type: u32,
    pub iov_iter_offset: u32,
    pub iov_iter_ptr: u32,
    /// Values of `enum iter_type` (ITER_UBUF: u32::MAX on kernels without it), and the
    /// mask that takes the type from the field (older kernels keep the direction in its
    /// lowest bit)
    pub iter_ubuf: u32,
    pub iter_iovec: u32,
    pub iter_type_mask: u32,
    /// struct iov_iter.count: the bytes the write carries
    pub iov_iter_count: u32,
    /// struct sock_common.skc_net (a pointer to the socket's struct net), and the inode
    /// number of that namespace (struct net.ns.inum)
    pub skc_net: u32,
    pub net_ns_inum: u32,
    /// struct inet_sock.inet_sport (network order): the local port, still there as the
    /// connection closes, when `skc_num` has already been given back
    pub inet_sport: u32,
}
const _: () = assert!(size_of::<KernelOffsets>() == 172);

/// Where a traced server connection is in its request/response cycle.
pub mod dir {
    /// Nothing read or written yet (or the connection predates tracing).
    pub const IDLE: u32 = 0;
    /// Reading a request.
    pub const READING: u32 = 1;
    /// Writing (or delivering) its response.
    pub const WRITING: u32 = 2;
}

/// The programs' state of one traced connection (the `SOCKS` map's value). Userspace
/// reads it only at the end, to report exchanges still waiting for their connection's
/// next request.
///
/// Laid out by cache line. The kernel's hash map keeps each entry as a 48-byte header,
/// the 8-byte key and this value; 200 bytes make an entry exactly four 64-byte lines, so
/// every entry starts on a line boundary and the groups below never share a line:
/// - the header's line (header, key, `origin` and `owner`): written only when the entry
///   is created, so the lookup that compares the key never waits for another CPU;
/// - the second line: what the per-segment hook (softirq, often on the other CPU) reads
///   and writes, beside the handshake's times, which are written once;
/// - the last two: the application's side of the current request and the totals.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockState {
    pub origin: u32,
    /// Tgid of the process that accepted the connection; 0 while it waits in the
    /// accept queue.
    pub owner: u32,
    // Second line.
    /// One of [`dir`].
    pub dir: u32,
    /// Sequence number just past the last byte written; the response is delivered when
    /// the peer acknowledges it.
    pub ack_target: u32,
    /// Sequence number just past the furthest data received (0: none yet): a segment
    /// ending beyond it brings new data, one that does not is a retransmit.
    pub rcv_end: u32,
    pub synack_retransmits: u32,
    /// First data queued since the last read, i.e. the start of the next request.
    pub pending_data_ns: u64,
    pub acked_ns: u64,
    pub synack_ns: u64,
    pub established_ns: u64,
    /// When the peer's FIN arrived (0: not yet).
    pub peer_fin_ns: u64,
    /// TLS through the library: the arrival of the data the last library call read from
    /// the socket, for a request the library hands over later from its own buffer (read
    /// with the client's Finished, say).
    pub tls_read_ns: u64,
    // Third and fourth lines.
    /// Per request.
    pub arrival_ns: u64,
    pub first_read_ns: u64,
    pub last_read_ns: u64,
    pub first_write_ns: u64,
    pub last_write_ns: u64,
    pub req_in: u64,
    pub req_out: u64,
    /// Per connection.
    pub total_in: u64,
    pub total_out: u64,
    pub requests: u32,
    pub req_flags: u32,
    /// Connection-wide bits of `flags` (resets).
    pub conn_flags: u32,
    /// The listener's port. The kernel clears the socket's own copy when it closes.
    pub local_port: u32,
    /// Server connections: the thread that last read the request (whose think it is).
    /// Upstream connections: the thread that wrote the request (the one that waits).
    pub tid: u32,
    /// Accepted connections: non-zero once the segment program has seen the client's
    /// first byte and it begins no TLS handshake record, so that the server's first
    /// write need not be read to tell (see `records::detect`). Written once.
    pub no_hello: u32,
    /// Upstream connections: the server request the current upstream request is made
    /// for (see [`ThreadWork`]); for a connection's first request, the one the
    /// connecting thread had read when it called connect().
    pub bound_sock: u64,
    pub bound_first_read_ns: u64,
    /// When the TLS handshake began (0: not TLS, or not seen).
    pub tls_start_ns: u64,
    /// Bits of [`tls`] (0: plain, or not known to be TLS).
    pub tls: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<SockState>() == 200);
const _: () = assert!(core::mem::offset_of!(SockState, dir) == 8 && core::mem::offset_of!(SockState, arrival_ns) == 72);

/// A connection as the programs look it up before they know its socket: local port,
/// remote port and remote address (IPv4-mapped for IPv4).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TupleKey {
    pub local_port: u16,
    pub remote_port: u16,
    pub _pad: u32,
    pub remote_addr: [u8; 16],
}
const _: () = assert!(size_of::<TupleKey>() == 24);

/// Settings the programs read; set by userspace before load.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgramConfig {
    /// Non-zero: a connection is traced when its listener's port is in `PORTS`, whoever
    /// accepts it. Zero: when the accepting process is in `PIDS`.
    pub filter_by_port: u32,
    /// Value of `SKB_DROP_REASON_TCP_LISTEN_OVERFLOW` in this kernel's
    /// `enum skb_drop_reason` (u32::MAX when the kernel has none).
    pub drop_reason_listen_overflow: u32,
    /// Bytes waiting in the ring buffer that make the programs wake userspace at once
    /// (below this, events wait for its next timed drain).
    pub wakeup_bytes: u32,
    /// Non-zero when uprobes on a TLS library may be attached: the socket hooks then ask
    /// whether the calling thread is inside one of its calls.
    pub tls_hooks: u32,
    /// Non-zero when the record-layer program is attached: a server connection whose
    /// first write is a TLS handshake record is followed from its records.
    pub tls_records: u32,
    /// Non-zero when request labels are on (`--labels`): the first bytes of requests and
    /// responses are copied to userspace ([`Payload`]).
    pub labels: u32,
    /// Non-zero (`--cgroup`): a process is traced when it runs in one of the cgroups of
    /// `CGROUPS` (by cgroup v2 id) as it accepts, connects or reads, or is in `PIDS`.
    pub filter_by_cgroup: u32,
    /// Non-zero (`--all`, with `filter_by_port`): every port is traced, whoever accepts.
    pub all_ports: u32,
    /// Non-zero where the kernel has `bpf_get_current_task_btf` (5.11+): the accept
    /// hook walks from the task to its file table with loads in place, not helper calls.
    pub task_btf: u32,
}
const _: () = assert!(size_of::<ProgramConfig>() == 36);

/// Indexes of the per-CPU `COUNTERS` array.
pub mod counter {
    /// Events that did not fit in the ring buffer.
    pub const LOST_EVENTS: u32 = 0;
    /// Kernel reads of socket fields that failed.
    pub const READ_ERRORS: u32 = 1;
    /// Per-socket state entries that could not be created (map full).
    pub const STATE_FULL: u32 = 2;
    /// Server connections accepted by a traced process (or on a traced port) with no
    /// setup record although the kernel established them while the programs were
    /// attached: a handshake and accept wait the tracer did not see.
    pub const MISSED_SETUPS: u32 = 3;
    /// Connections of traced processes whose accept the accept hook did not see: the
    /// first read or write took their ownership. Where accept is hooked at the peer's
    /// address (`accept_peer4`), an accept that asks for no address.
    pub const UNSEEN_ACCEPTS: u32 = 4;
    pub const COUNT: u32 = 5;
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for KernelOffsets {}
    unsafe impl aya::Pod for ProgramConfig {}
    unsafe impl aya::Pod for TupleKey {}
    unsafe impl aya::Pod for SockState {}
    unsafe impl aya::Pod for ThreadWork {}
    unsafe impl aya::Pod for TlsCall {}
    unsafe impl aya::Pod for RecordState {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{vec, vec::Vec};

    use super::*;

    #[test]
    fn records_fill_whole_cache_lines() {
        // The per-request event and its 8-byte header: exactly one line.
        assert_eq!(record_bytes(size_of::<ShortRequest>()), 56);
        assert_eq!(record_bytes(1), 56);
        assert_eq!(record_bytes(57), 120);
        for size in [
            size_of::<ConnOpen>(),
            size_of::<Request>(),
            size_of::<ConnClose>(),
            size_of::<SynAckRetransmit>(),
            size_of::<UpstreamConnect>(),
            size_of::<UpstreamRequest>(),
            size_of::<ResetSent>(),
            size_of::<ProcessEvent>(),
            size_of::<Bind>(),
            size_of::<TlsDone>(),
        ] {
            let reserved = record_bytes(size);
            assert!(reserved >= size && reserved < size + 64, "{size} → {reserved}");
            assert_eq!((reserved + 8) % 64, 0, "{size} → {reserved}");
        }
    }

    #[test]
    fn the_state_entry_is_four_lines() {
        // The kernel's hash-map entry: a 48-byte header, the 8-byte key, the value.
        assert_eq!((48 + size_of::<u64>() + size_of::<SockState>()) % 64, 0);
        assert_eq!(48 + 8 + core::mem::offset_of!(SockState, dir), 64);
        assert_eq!(48 + 8 + core::mem::offset_of!(SockState, arrival_ns), 128);
    }

    /// The records `(type, body length)` as bytes on the wire (bodies of zeros).
    fn wire(records: &[(u8, u16)]) -> Vec<u8> {
        let mut out = Vec::new();
        for &(kind, len) in records {
            out.extend_from_slice(&[kind, 3, 3]);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend(core::iter::repeat_n(0u8, len as usize));
        }
        out
    }

    /// Feeds `bytes` (starting at sequence number `start`) in segments of the given
    /// sizes, in order.
    fn feed_in(st: &mut RecordState, start: u32, bytes: &[u8], sizes: &[usize]) {
        let mut at = 0;
        for &size in sizes {
            let seg = &bytes[at..at + size];
            st.feed(start.wrapping_add(at as u32), size as u32, |i| seg.get(i as usize).copied());
            at += size;
        }
        assert_eq!(at, bytes.len());
    }

    const TLS12_FLIGHT: [(u8, u16); 3] =
        [(record::HANDSHAKE, 37), (record::CHANGE_CIPHER_SPEC, 1), (record::HANDSHAKE, 40)];
    const TLS13_FLIGHT: [(u8, u16); 2] = [(record::CHANGE_CIPHER_SPEC, 1), (record::APPLICATION_DATA, 53)];

    #[test]
    fn the_handshake_ends_after_the_record_that_follows_change_cipher_spec() {
        for flight in [&TLS12_FLIGHT[..], &TLS13_FLIGHT[..]] {
            let handshake = wire(flight);
            let mut bytes = handshake.clone();
            bytes.extend(wire(&[(record::APPLICATION_DATA, 100)]));
            let mut st = RecordState::at(1000);
            // Several records in one segment, the request after them.
            feed_in(&mut st, 1000, &bytes, &[bytes.len()]);
            assert_eq!(st.state, record::APP, "{flight:?}");
            assert_eq!(st.done_seq, 1000 + handshake.len() as u32);
            assert_eq!(st.app_end, 1000 + bytes.len() as u32);
        }
        // TLS 1.3 without the compatibility ChangeCipherSpec: the first encrypted record.
        let bytes = wire(&[(record::APPLICATION_DATA, 53), (record::APPLICATION_DATA, 90)]);
        let mut st = RecordState::at(7);
        feed_in(&mut st, 7, &bytes, &[bytes.len()]);
        assert_eq!((st.state, st.done_seq, st.app_end), (record::APP, 7 + 58, 7 + 58 + 95));
    }

    #[test]
    fn headers_split_across_segments_and_sequence_numbers_wrapping() {
        let bytes = wire(&TLS12_FLIGHT);
        let start = u32::MAX - 20;
        // Every split of the stream into a segment of one byte, then the rest.
        for cut in 1..bytes.len() {
            let mut st = RecordState::at(start);
            feed_in(&mut st, start, &bytes, &[cut, bytes.len() - cut]);
            assert_eq!((st.state, st.done_seq), (record::DONE, start.wrapping_add(bytes.len() as u32)), "cut {cut}");
        }
        // One byte per segment.
        let mut st = RecordState::at(start);
        feed_in(&mut st, start, &bytes, &vec![1; bytes.len()]);
        assert_eq!(st.state, record::DONE);
    }

    #[test]
    fn retransmits_and_out_of_order_segments_do_not_move_it() {
        let bytes = wire(&TLS13_FLIGHT);
        let (a, b) = bytes.split_at(3);
        let mut st = RecordState::at(100);
        // The second segment first: nothing to read there yet.
        st.feed(103, b.len() as u32, |i| b.get(i as usize).copied());
        assert_eq!((st.have, st.state), (0, record::PARSING));
        st.feed(100, 3, |i| a.get(i as usize).copied());
        // The first segment again (a retransmit): no change.
        st.feed(100, 3, |i| a.get(i as usize).copied());
        assert_eq!(st.have, 3);
        st.feed(103, b.len() as u32, |i| b.get(i as usize).copied());
        assert_eq!((st.state, st.done_seq), (record::DONE, 100 + bytes.len() as u32));
    }

    #[test]
    fn anything_but_a_record_header_stops_following() {
        let mut st = RecordState::at(0);
        let http = b"GET / HTTP/1.1\r\n";
        st.feed(0, http.len() as u32, |i| http.get(i as usize).copied());
        assert_eq!(st.state, record::LOST);
        // A byte that cannot be read.
        let mut st = RecordState::at(0);
        st.feed(0, 10, |_| None);
        assert_eq!(st.state, record::LOST);
    }

    /// A server's reads, as the programs see them: the client's second flight and its
    /// request arrive, the server reads them (record by record, or all at once), and
    /// each read is classified.
    #[test]
    fn a_servers_reads_are_handshake_until_the_finished_then_the_request() {
        let flight = wire(&TLS13_FLIGHT);
        let request = wire(&[(record::APPLICATION_DATA, 120)]);
        let start = 5000u32;
        let fin_end = start + flight.len() as u32;
        let req_end = fin_end + request.len() as u32;
        let mut bytes = flight.clone();
        bytes.extend(&request);

        // Both arrive in one segment before the server reads.
        let mut st = RecordState::at(start);
        feed_in(&mut st, start, &bytes, &[bytes.len()]);
        // OpenSSL without read-ahead: header, then body, record by record.
        let mut copied = start;
        let mut seen = Vec::new();
        for len in [5u32, 1, 5, 53, 5, 120] {
            copied += len;
            seen.push(st.classify_read(copied, len as u64));
        }
        assert_eq!(
            seen,
            [
                RecordRead::Handshake,
                RecordRead::Handshake,
                RecordRead::Handshake,
                RecordRead::HandshakeEnds,
                RecordRead::Request(5),
                RecordRead::Request(120)
            ]
        );
        // Tickets written after the request's header was read, before its body: no
        // response yet; once the body is read, one may start.
        assert!(!st.response_may_start(fin_end + 5));
        assert!(st.response_may_start(req_end));

        // A server that reads everything at once: the read begins the request, with the
        // request's bytes only.
        assert_eq!(st.classify_read(req_end, bytes.len() as u64), RecordRead::Request(request.len() as u64));

        // Before the client's flight has arrived whole, a read of its first part.
        let mut st = RecordState::at(start);
        feed_in(&mut st, start, &flight[..6], &[6]);
        assert_eq!(st.classify_read(start + 6, 6), RecordRead::Handshake);
        // A read of bytes whose headers the segment program never saw.
        let st = RecordState::at(start);
        assert_eq!(st.classify_read(start + 80, 80), RecordRead::Lost);
    }
}
