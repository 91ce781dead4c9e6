//! Per-connection timelines: turns the kernel's events into phase durations.
//!
//! The kernel reports timestamps at phase boundaries; this module decides which phases
//! are known and how long each took. Phases of one request never overlap: `recv_wait`
//! starts no earlier than the moment accept() returned the connection, so a request
//! queued during `accept_wait` is not counted twice.

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use rustc_hash::FxHashMap;

use tracer_common::{
    flags, origin, side, Bind, ConnAddr, ConnClose, ConnOpen, Payload, Request, TlsDone, UpstreamConnect,
    UpstreamRequest,
};

use crate::{
    events::Event,
    labels::{self, Decoder, Routes},
    listeners::ListenerId,
    upstream::{Callee, ConnectOutcome, RequestKey, Wait, Waits},
};

/// The server-side phases, in the order they happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    Handshake,
    AcceptWait,
    Tls,
    RecvWait,
    Think,
    Send,
    Delivery,
}

impl Phase {
    pub const ALL: [Phase; 7] =
        [Phase::Handshake, Phase::AcceptWait, Phase::Tls, Phase::RecvWait, Phase::Think, Phase::Send, Phase::Delivery];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Handshake => "handshake",
            Phase::AcceptWait => "accept_wait",
            Phase::Tls => "tls",
            Phase::RecvWait => "recv_wait",
            Phase::Think => "think",
            Phase::Send => "send",
            Phase::Delivery => "delivery",
        }
    }
}

/// How an exchange on a server connection ended: every request the server read is
/// either answered (and timed: it has a think sample) or aborted; a peer's goodbye and
/// a message the server sent unasked are no requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The server began a response.
    Answered,
    /// The connection was reset, or the server closed it, before any response.
    Aborted,
    /// The peer's last message before it closed the connection in an orderly way, which
    /// the server did not answer (a protocol's goodbye, e.g. PostgreSQL's Terminate).
    ClosedByPeer,
    /// The server wrote with no request read (a greeting, on server-first protocols).
    Unsolicited,
}

impl Outcome {
    /// Whether it counts in `requests`.
    pub fn is_request(self) -> bool {
        matches!(self, Outcome::Answered | Outcome::Aborted)
    }
}

/// What the first bytes of an exchange said (`--labels`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Labels {
    /// One label per request of the exchange, in order (pipelined requests each).
    pub requests: Vec<String>,
    /// HTTP status codes of the responses, in order.
    pub statuses: Vec<u16>,
    /// Error responses (PostgreSQL ErrorResponse, Redis error replies).
    pub errors: u32,
}

impl Labels {
    /// Requests the exchange stands for: pipelined requests each, and at least one.
    pub fn count(labels: &Option<Box<Labels>>) -> u64 {
        labels.as_ref().map_or(1, |l| l.requests.len().max(1) as u64)
    }
}

/// A connection's protocol, and what its current exchange's bytes said.
#[derive(Default)]
struct Labelling {
    /// Set once the protocol is known; `None` while it is not (yet).
    decoder: Option<Decoder>,
    /// Request payloads looked at without recognising a protocol.
    tries: u8,
    current: Labels,
}

/// Request payloads of a connection looked at for its protocol before giving up.
const DETECT_TRIES: u8 = 3;

/// What a finished piece of a timeline contributes to the statistics.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// A connection was accepted (or first seen) by the traced process.
    Opened {
        listener: ListenerId,
        /// The client, and the traced process that accepted it.
        remote: SocketAddr,
        pid: u32,
        handshake_ns: Option<u64>,
        accept_wait_ns: Option<u64>,
        synack_retransmits: u32,
    },
    /// One request/response exchange.
    Exchange {
        listener: ListenerId,
        /// The client (unknown when the connection's open event was lost).
        remote: Option<SocketAddr>,
        pid: u32,
        recv_wait_ns: Option<u64>,
        think_ns: Option<u64>,
        send_ns: Option<u64>,
        delivery_ns: Option<u64>,
        bytes_in: u64,
        bytes_out: u64,
        outcome: Outcome,
        /// The part of think spent waiting on each upstream peer (and label).
        think_waits: Vec<(Callee, u64)>,
        /// Labels on: what the exchange's bytes said.
        labels: Option<Box<Labels>>,
    },
    Closed(ClosedConnection),
    /// A connect() by the traced process ended.
    Connect {
        peer: SocketAddr,
        connect_ns: Option<u64>,
        syn_retransmits: u32,
        outcome: ConnectOutcome,
    },
    /// One upstream request; `bytes_in` is what was read since the previous one.
    Upstream {
        peer: SocketAddr,
        upstream_ns: Option<u64>,
        bytes_out: u64,
        bytes_in: u64,
        answered: bool,
        /// Labels on: what the request's bytes said.
        labels: Option<Box<Labels>>,
    },
    /// A server connection's TLS handshake completed.
    Tls {
        listener: ListenerId,
        /// The client, and the traced process that accepted it.
        remote: SocketAddr,
        pid: u32,
        /// From the ClientHello's arrival (or accept(), if later) to the handshake's end.
        tls_ns: Option<u64>,
        /// Bits of `tracer_common::tls`: how the connection is followed.
        method: u32,
    },
    /// A server connection's TLS is followed another way from now on (an application
    /// feeding OpenSSL from buffers of its own: hooked after its handshake).
    TlsFollowed {
        listener: ListenerId,
        method: u32,
    },
    /// The TLS handshake of a connection the traced process opened completed.
    UpstreamTls {
        peer: SocketAddr,
        /// From the ClientHello's write to the handshake's end.
        tls_ns: Option<u64>,
    },
    /// An upstream request that no server request could be found for.
    Unattributed {
        peer: SocketAddr,
    },
    /// An upstream connection closed: the bytes read since its last request.
    UpstreamClosed {
        peer: SocketAddr,
        bytes_in: u64,
    },
    SynAckRetransmit {
        listener: ListenerId,
    },
    /// The server reset a connection as it closed it (abortive close).
    ResetAfterClose {
        listener: ListenerId,
    },
}

impl Record {
    /// An answered exchange on `listener` that thought `think_ns` (recv_wait 1 µs, send
    /// 0, 10 bytes in, 20 out), for the statistics' and reports' tests.
    #[cfg(test)]
    pub fn answered(port: u16, think_ns: u64) -> Record {
        Record::Exchange {
            listener: ListenerId::new(port, 0),
            remote: None,
            pid: 1,
            recv_wait_ns: Some(1_000),
            think_ns: Some(think_ns),
            send_ns: Some(0),
            delivery_ns: None,
            bytes_in: 10,
            bytes_out: 20,
            outcome: Outcome::Answered,
            think_waits: vec![],
            labels: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClosedConnection {
    pub listener: ListenerId,
    pub tgid: u32,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// From accept() (or first sight) to close.
    pub duration_ns: Option<u64>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub requests: u32,
    pub aborted: bool,
    pub reset_sent: bool,
    pub reset_received: bool,
}

struct Conn {
    listener: ListenerId,
    local: SocketAddr,
    remote: SocketAddr,
    seen_ns: u64,
    accepted_ns: u64,
    /// The first read of the last request whose exchange was handled: upstream waits
    /// bound to it or to an earlier one come too late to count.
    settled_ns: u64,
    /// The process that accepted it (exchanges in the short form do not carry it).
    pid: u32,
}

/// An upstream connection: its peer and the bytes already reported.
struct Client {
    peer: SocketAddr,
    bytes_in: u64,
}

#[derive(Default)]
pub struct Timeline {
    // Keyed by kernel socket addresses: a fast non-cryptographic hash is enough.
    conns: FxHashMap<u64, Conn>,
    clients: FxHashMap<u64, Client>,
    waits: Waits,
    /// Labels on: the `--route` patterns, and per connection its protocol and labels.
    routes: Option<Routes>,
    labelling: FxHashMap<u64, Labelling>,
}

fn span(from: u64, to: u64) -> Option<u64> {
    (from != 0 && to != 0 && to >= from).then(|| to - from)
}

/// An address as the kernel stores it for `family`: IPv4 sockets' addresses come
/// IPv4-mapped from the programs and are shown as IPv4; an IPv6 socket's address stays
/// IPv6, IPv4-mapped ones included (`[::ffff:127.0.0.1]:80`), as the socket sees it.
pub fn socket_addr(family: u16, addr: &[u8; 16], port: u16) -> SocketAddr {
    let v6 = Ipv6Addr::from(*addr);
    let ip = match v6.to_ipv4_mapped() {
        Some(v4) if family != tracer_common::AF_INET6 => IpAddr::V4(v4),
        _ => IpAddr::V6(v6),
    };
    SocketAddr::new(ip, port)
}

pub fn endpoints(addr: &ConnAddr) -> (SocketAddr, SocketAddr) {
    (
        socket_addr(addr.family, &addr.local_addr, addr.local_port),
        socket_addr(addr.family, &addr.remote_addr, addr.remote_port),
    )
}

impl Timeline {
    pub fn new() -> Self {
        Self::default()
    }

    /// A timeline that labels requests from their payloads (`--labels`).
    pub fn with_labels(routes: Routes) -> Self {
        Self { routes: Some(routes), ..Self::default() }
    }

    /// Connections opened and not yet closed.
    pub fn open_connections(&self) -> usize {
        self.conns.len()
    }

    pub fn apply(&mut self, event: &Event, out: &mut Vec<Record>) {
        match event {
            Event::Open(open) => self.opened(open, out),
            Event::Request(req) => self.exchange(req, out),
            Event::Close(close) => self.closed(close, out),
            Event::ClosedAfter(req, close) => {
                self.exchange(req, out);
                self.closed(close, out);
            }
            Event::SynAckRetransmit(r) => {
                out.push(Record::SynAckRetransmit { listener: ListenerId::new(r.addr.local_port, r.addr.netns) })
            }
            Event::ResetSent(r) => {
                out.push(Record::ResetAfterClose { listener: ListenerId::new(r.addr.local_port, r.addr.netns) })
            }
            Event::UpstreamConnect(c) => self.connected(c, out),
            Event::UpstreamRequest(r) => self.upstream_request(r, out),
            Event::Bind(b) => self.bind(b, out),
            Event::TlsDone(t) => self.tls_done(t, out),
            Event::Payload(p, data) => self.payload(p, data),
            Event::RequestThenPayload(req, p, data) => {
                self.exchange(req, out);
                self.payload(p, data);
            }
            Event::ProcessExit(_) | Event::ProcessFork(_) => {}
        }
    }

    /// The end of tracing: upstream requests still waiting to be tied to a server
    /// request never will be.
    pub fn finish(&mut self, out: &mut Vec<Record>) {
        out.extend(self.waits.drain_unbound().into_iter().map(|peer| Record::Unattributed { peer }));
    }

    /// The first bytes of a request or response: its labels, kept for the exchange's
    /// event, which comes next.
    pub fn payload(&mut self, p: &Payload, data: &[u8]) {
        let Some(routes) = &self.routes else { return };
        let l = self.labelling.entry(p.header.sock).or_default();
        if side::is_request(p.side) {
            if l.decoder.is_none() && l.tries < DETECT_TRIES {
                l.tries += 1;
                l.decoder = labels::detect(data).map(Decoder::new);
            }
            l.current = Labels::default();
            if let Some(d) = &mut l.decoder {
                l.current.requests = d.requests(data, p.len as u32 >= p.total, routes);
            }
        } else if let Some(d) = &mut l.decoder {
            let r = d.responses(data);
            l.current.statuses = r.statuses;
            l.current.errors = r.errors;
        }
    }

    /// The labels of connection `sock`'s exchange that just ended.
    fn take_labels(&mut self, sock: u64) -> Option<Box<Labels>> {
        self.routes.as_ref()?;
        let current = std::mem::take(&mut self.labelling.get_mut(&sock)?.current);
        (!current.requests.is_empty() || !current.statuses.is_empty() || current.errors != 0).then(|| Box::new(current))
    }

    fn opened(&mut self, open: &ConnOpen, out: &mut Vec<Record>) {
        let accepted = open.origin == origin::ACCEPTED;
        let (local, remote) = endpoints(&open.addr);
        let listener = ListenerId::new(open.addr.local_port, open.addr.netns);
        self.conns.insert(
            open.header.sock,
            Conn {
                listener,
                local,
                remote,
                seen_ns: open.header.ts_ns,
                accepted_ns: if accepted { open.accepted_ns } else { 0 },
                settled_ns: 0,
                pid: open.header.tgid,
            },
        );
        out.push(Record::Opened {
            listener,
            remote,
            pid: open.header.tgid,
            handshake_ns: if accepted { span(open.synack_ns, open.established_ns) } else { None },
            accept_wait_ns: if accepted { span(open.established_ns, open.accepted_ns) } else { None },
            synack_retransmits: open.synack_retransmits,
        });
    }

    fn exchange(&mut self, req: &Request, out: &mut Vec<Record>) {
        let (listener, accepted_ns, remote, pid) = match self.conns.get_mut(&req.header.sock) {
            Some(c) => {
                // Handled now: its upstream waits still to come are late.
                c.settled_ns = c.settled_ns.max(req.first_read_ns);
                (c.listener, c.accepted_ns, Some(c.remote), c.pid)
            }
            // The open event was lost: the exchange still counts, under an unknown listener.
            None => (ListenerId::default(), 0, None, 0),
        };
        let outcome = if req.flags & flags::CLOSED_BY_PEER != 0 {
            Outcome::ClosedByPeer
        } else if req.first_read_ns == 0 {
            Outcome::Unsolicited
        } else if req.flags & flags::ABORTED != 0 || req.first_write_ns == 0 {
            Outcome::Aborted
        } else {
            Outcome::Answered
        };
        let labels = self.take_labels(req.header.sock);
        let key = RequestKey { sock: req.header.sock, first_read_ns: req.first_read_ns };
        let think_waits = if outcome == Outcome::Answered {
            self.waits.attribute(key, req.last_read_ns, req.first_write_ns)
        } else {
            self.waits.forget(key);
            Vec::new()
        };
        let arrival = if req.arrival_ns != 0 { req.arrival_ns.max(accepted_ns) } else { 0 };
        let recv_wait_ns = if outcome == Outcome::Answered { span(arrival, req.first_read_ns) } else { None };
        let (think_ns, send_ns, delivery_ns) = if outcome == Outcome::Answered {
            let delivery = if req.flags & flags::UNDELIVERED != 0 || req.acked_ns == 0 || req.last_write_ns == 0 {
                None
            } else {
                // Acknowledged during the last write itself: nothing left to deliver.
                Some(req.acked_ns.saturating_sub(req.last_write_ns))
            };
            // Every answered request has its think: a response begun before the request
            // was read to its end (a server streaming its answer) thought for no time.
            let think = req.first_write_ns.saturating_sub(req.last_read_ns.max(req.first_read_ns));
            (Some(think), span(req.first_write_ns, req.last_write_ns), delivery)
        } else {
            (None, None, None)
        };
        out.push(Record::Exchange {
            listener,
            remote,
            pid: if req.header.tgid != 0 { req.header.tgid } else { pid },
            recv_wait_ns,
            think_ns,
            send_ns,
            delivery_ns,
            bytes_in: req.bytes_in,
            bytes_out: req.bytes_out,
            outcome,
            think_waits,
            labels,
        });
    }

    /// Whether the exchange of server request `key` was handled already (a wait bound to
    /// it now is late): per connection, requests are handled in the order they were
    /// read, so that is one comparison with the connection's last. A connection no
    /// longer known has closed, every exchange of it handled; one opened after the
    /// request's first read reuses the socket of the request's, which has.
    fn settled(&self, key: RequestKey) -> bool {
        match self.conns.get(&key.sock) {
            Some(c) => key.first_read_ns <= c.settled_ns || key.first_read_ns < c.seen_ns,
            None => true,
        }
    }

    fn bind(&mut self, b: &Bind, out: &mut Vec<Record>) {
        let key = RequestKey { sock: b.header.sock, first_read_ns: b.first_read_ns };
        let settled = self.settled(key);
        let given_up = self.waits.bind(b.header.tid, key, settled, b.since_ns);
        out.extend(given_up.into_iter().map(|peer| Record::Unattributed { peer }));
    }

    fn tls_done(&mut self, t: &TlsDone, out: &mut Vec<Record>) {
        if let Some(client) = self.clients.get(&t.header.sock) {
            out.push(Record::UpstreamTls { peer: client.peer, tls_ns: span(t.start_ns, t.end_ns) });
        } else if let Some(c) = self.conns.get(&t.header.sock).filter(|_| t.start_ns == 0 && t.end_ns == 0) {
            out.push(Record::TlsFollowed { listener: c.listener, method: t.method });
        } else if let Some(c) = self.conns.get(&t.header.sock) {
            // As for recv_wait: what came while the connection waited to be accepted is
            // accept_wait's.
            let start = if c.accepted_ns != 0 { t.start_ns.max(c.accepted_ns) } else { t.start_ns };
            out.push(Record::Tls {
                listener: c.listener,
                remote: c.remote,
                pid: c.pid,
                tls_ns: span(start, t.end_ns),
                method: t.method,
            });
        }
    }

    fn connected(&mut self, c: &UpstreamConnect, out: &mut Vec<Record>) {
        let (_, peer) = endpoints(&c.addr);
        let outcome = ConnectOutcome::from_error(c.error);
        if outcome == ConnectOutcome::Established {
            self.clients.insert(c.header.sock, Client { peer, bytes_in: 0 });
        }
        out.push(Record::Connect {
            peer,
            connect_ns: if outcome == ConnectOutcome::Established { span(c.start_ns, c.end_ns) } else { None },
            syn_retransmits: c.syn_retransmits,
            outcome,
        });
    }

    fn upstream_request(&mut self, r: &UpstreamRequest, out: &mut Vec<Record>) {
        let (_, peer) = endpoints(&r.addr);
        self.clients.entry(r.header.sock).or_insert(Client { peer, bytes_in: 0 }).bytes_in += r.bytes_in;
        let answered = r.flags & flags::ABORTED == 0;
        let labels = self.take_labels(r.header.sock);
        let callee =
            Callee { peer, label: labels.as_ref().and_then(|l| l.requests.first()).map(|l| Arc::from(l.as_str())) };
        // The last write's return, or (when the response came first) its start.
        let last_write_ns = if r.last_write_ns != 0 { r.last_write_ns } else { r.first_write_ns };
        if answered && r.first_read_ns != 0 {
            // The request was waited on from its last write until its response was read.
            let wait = Wait { callee, begun_ns: r.first_write_ns, start_ns: last_write_ns, end_ns: r.first_read_ns };
            let bound =
                (r.bound_sock != 0).then_some(RequestKey { sock: r.bound_sock, first_read_ns: r.bound_first_read_ns });
            let settled = bound.is_some_and(|key| self.settled(key));
            let given_up = self.waits.record(bound, settled, r.header.tid, wait);
            out.extend(given_up.into_iter().map(|peer| Record::Unattributed { peer }));
        }
        // Every answered request is timed: to the response's first byte queued on the
        // socket, or, when that was not seen, to its first read. A response can arrive
        // before the call writing the request has returned (a fast peer on loopback).
        let response_ns = if r.response_ns != 0 { r.response_ns } else { r.first_read_ns };
        out.push(Record::Upstream {
            peer,
            upstream_ns: if answered && response_ns != 0 {
                Some(response_ns.saturating_sub(last_write_ns))
            } else {
                None
            },
            bytes_out: r.bytes_out,
            bytes_in: r.bytes_in,
            answered,
            labels,
        });
    }

    fn closed(&mut self, close: &ConnClose, out: &mut Vec<Record>) {
        self.labelling.remove(&close.header.sock);
        if let Some(client) = self.clients.remove(&close.header.sock) {
            out.push(Record::UpstreamClosed {
                peer: client.peer,
                bytes_in: close.bytes_in.saturating_sub(client.bytes_in),
            });
            return;
        }
        let conn = self.conns.remove(&close.header.sock);
        // The kernel may already have released the local port when the socket reaches
        // CLOSE: the addresses seen at open are the reliable ones.
        let (local, remote) = match &conn {
            Some(c) => (c.local, c.remote),
            None => endpoints(&close.addr),
        };
        out.push(Record::Closed(ClosedConnection {
            // Its open was lost: the namespace is unknown (0).
            listener: conn.as_ref().map_or(ListenerId::new(local.port(), 0), |c| c.listener),
            tgid: close.header.tgid,
            local,
            remote,
            duration_ns: conn.and_then(|c| span(c.seen_ns, close.header.ts_ns)),
            bytes_in: close.bytes_in,
            bytes_out: close.bytes_out,
            requests: close.requests,
            aborted: close.flags & flags::ABORTED != 0,
            reset_sent: close.flags & flags::RESET_SENT != 0,
            reset_received: close.flags & flags::RESET_RECEIVED != 0,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracer_common::{kind, EventHeader, AF_INET, AF_INET6};

    use crate::timeline::Outcome;

    const SOCK: u64 = 0xffff_8880_0000_1000;
    const MS: u64 = 1_000_000;

    fn addr() -> ConnAddr {
        ConnAddr {
            family: AF_INET,
            local_port: 8080,
            remote_port: 40000,
            local_addr: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1],
            remote_addr: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 2],
            ..ConnAddr::default()
        }
    }

    fn header(kind: u16, ts_ns: u64) -> EventHeader {
        EventHeader { kind, tgid: 7, tid: 7, ts_ns, sock: SOCK, ..Default::default() }
    }

    fn open(synack: u64, established: u64, accepted: u64) -> Event {
        Event::Open(ConnOpen {
            header: header(kind::CONN_OPEN, accepted),
            addr: addr(),
            origin: origin::ACCEPTED,
            synack_retransmits: 0,
            synack_ns: synack,
            established_ns: established,
            accepted_ns: accepted,
            first_data_ns: 0,
        })
    }

    fn request(times: [u64; 6], flags: u32, index: u32) -> Event {
        Event::Request(Request {
            header: header(kind::REQUEST, times[5].max(times[4])),
            arrival_ns: times[0],
            first_read_ns: times[1],
            last_read_ns: times[2],
            first_write_ns: times[3],
            last_write_ns: times[4],
            acked_ns: times[5],
            bytes_in: 100,
            bytes_out: 10,
            index,
            flags,
            tid: 7,
            _pad: 0,
        })
    }

    fn run(events: &[Event]) -> Vec<Record> {
        let mut timeline = Timeline::new();
        let mut out = Vec::new();
        for e in events {
            timeline.apply(e, &mut out);
        }
        out
    }

    #[test]
    fn accepted_connection_gets_handshake_and_accept_wait() {
        let out = run(&[open(1 * MS, 3 * MS, 10 * MS)]);
        assert_eq!(
            out[0],
            Record::Opened {
                listener: ListenerId::new(8080, 0),
                remote: "127.0.0.2:40000".parse().unwrap(),
                pid: 7,
                handshake_ns: Some(2 * MS),
                accept_wait_ns: Some(7 * MS),
                synack_retransmits: 0
            }
        );
    }

    #[test]
    fn chunked_request_and_response_give_one_exchange() {
        // Request read in several chunks (first read 12, last 15), response written in
        // pieces (first write 115, last 415), acknowledged at 416.
        let out = run(&[
            open(1 * MS, 2 * MS, 10 * MS),
            request([11 * MS, 12 * MS, 15 * MS, 115 * MS, 415 * MS, 416 * MS], 0, 0),
        ]);
        let Record::Exchange { recv_wait_ns, think_ns, send_ns, delivery_ns, outcome, .. } = out[1].clone() else {
            panic!("expected an exchange, got {:?}", out[1]);
        };
        assert_eq!(recv_wait_ns, Some(1 * MS));
        assert_eq!(think_ns, Some(100 * MS));
        assert_eq!(send_ns, Some(300 * MS));
        assert_eq!(delivery_ns, Some(1 * MS));
        assert_eq!(outcome, Outcome::Answered);
    }

    #[test]
    fn recv_wait_does_not_overlap_accept_wait() {
        // The request arrived at 3 ms while the connection sat in the accept queue until 50.
        let out =
            run(&[open(1 * MS, 2 * MS, 50 * MS), request([3 * MS, 51 * MS, 51 * MS, 52 * MS, 52 * MS, 52 * MS], 0, 0)]);
        let Record::Exchange { recv_wait_ns, .. } = out[1] else { panic!() };
        assert_eq!(recv_wait_ns, Some(1 * MS));
    }

    #[test]
    fn aborted_request_counts_but_is_not_timed() {
        let out = run(&[open(1 * MS, 2 * MS, 3 * MS), request([4 * MS, 5 * MS, 6 * MS, 0, 0, 0], flags::ABORTED, 0)]);
        assert_eq!(
            out[1],
            Record::Exchange {
                listener: ListenerId::new(8080, 0),
                remote: Some("127.0.0.2:40000".parse().unwrap()),
                pid: 7,
                recv_wait_ns: None,
                think_ns: None,
                send_ns: None,
                delivery_ns: None,
                bytes_in: 100,
                bytes_out: 10,
                outcome: Outcome::Aborted,
                think_waits: vec![],
                labels: None,
            }
        );
    }

    #[test]
    fn undelivered_response_has_no_delivery() {
        let out = run(&[
            open(1 * MS, 2 * MS, 3 * MS),
            request([4 * MS, 5 * MS, 6 * MS, 7 * MS, 8 * MS, 0], flags::UNDELIVERED, 0),
        ]);
        let Record::Exchange { think_ns, delivery_ns, .. } = out[1] else { panic!() };
        assert_eq!(think_ns, Some(1 * MS));
        assert_eq!(delivery_ns, None);
    }

    #[test]
    fn ack_during_the_write_is_zero_delivery() {
        let out = run(&[open(1 * MS, 2 * MS, 3 * MS), request([4 * MS, 5 * MS, 6 * MS, 7 * MS, 8 * MS, 8 * MS], 0, 0)]);
        let Record::Exchange { delivery_ns, .. } = out[1] else { panic!() };
        assert_eq!(delivery_ns, Some(0));
    }

    #[test]
    fn pipelined_requests_on_keep_alive_are_separate_exchanges() {
        let out = run(&[
            open(1 * MS, 2 * MS, 3 * MS),
            request([4 * MS, 5 * MS, 5 * MS, 6 * MS, 6 * MS, 6 * MS], 0, 0),
            // The second request arrived during the first's think time: its recv_wait
            // runs from that arrival.
            request([5 * MS + 500_000, 7 * MS, 7 * MS, 9 * MS, 9 * MS, 10 * MS], 0, 1),
        ]);
        let thinks: Vec<_> = out
            .iter()
            .filter_map(|r| match r {
                Record::Exchange { think_ns, recv_wait_ns, .. } => Some((*recv_wait_ns, *think_ns)),
                _ => None,
            })
            .collect();
        assert_eq!(thinks, vec![(Some(1 * MS), Some(1 * MS)), (Some(1_500_000), Some(2 * MS))]);
    }

    #[test]
    fn close_reports_addresses_duration_and_bytes() {
        let close = Event::Close(ConnClose {
            header: header(kind::CONN_CLOSE, 30 * MS),
            addr: addr(),
            bytes_in: 500,
            bytes_out: 700,
            requests: 2,
            flags: 0,
        });
        let out = run(&[open(1 * MS, 2 * MS, 10 * MS), close]);
        let Record::Closed(c) = &out[1] else { panic!() };
        assert_eq!(c.local.to_string(), "127.0.0.1:8080");
        assert_eq!(c.remote.to_string(), "127.0.0.2:40000");
        assert_eq!(c.duration_ns, Some(20 * MS));
        assert_eq!((c.bytes_in, c.bytes_out, c.requests), (500, 700, 2));
    }

    fn closed_at(ts: u64, bytes_in: u64, bytes_out: u64, requests: u32) -> ConnClose {
        ConnClose { header: header(kind::CONN_CLOSE, ts), addr: addr(), bytes_in, bytes_out, requests, flags: 0 }
    }

    #[test]
    fn a_closing_record_gives_its_exchange_then_its_close() {
        let Event::Request(req) = request([4 * MS, 5 * MS, 6 * MS, 7 * MS, 8 * MS, 9 * MS], 0, 0) else { panic!() };
        let close = closed_at(30 * MS, 100, 10, 1);
        let out = run(&[open(1 * MS, 2 * MS, 3 * MS), Event::ClosedAfter(req, close)]);
        assert_eq!(out.len(), 3, "{out:?}");
        let Record::Exchange { listener, think_ns, delivery_ns, outcome, .. } = &out[1] else { panic!("{out:?}") };
        assert_eq!((*listener, *think_ns, *delivery_ns), (ListenerId::new(8080, 0), Some(1 * MS), Some(1 * MS)));
        assert_eq!(*outcome, Outcome::Answered);
        let Record::Closed(c) = &out[2] else { panic!("{out:?}") };
        assert_eq!((c.requests, c.duration_ns), (1, Some(27 * MS)));
        assert_eq!(run(&[open(1 * MS, 2 * MS, 3 * MS), Event::Close(close)]).len(), 2);
    }

    /// An upstream request on the connection to `port` written by thread `tid`, bound
    /// to the server request first read at `bound` on `SOCK` (0: none known).
    fn upstream(tid: u32, port: u16, last_write: u64, response: u64, first_read: u64) -> Event {
        bound_upstream(tid, port, 0, last_write, response, first_read)
    }

    fn bound_upstream(tid: u32, port: u16, bound: u64, last_write: u64, response: u64, first_read: u64) -> Event {
        let mut addr = addr();
        addr.local_port = 50000 + port;
        addr.remote_port = port;
        Event::UpstreamRequest(UpstreamRequest {
            header: EventHeader {
                kind: kind::UPSTREAM_REQUEST,
                tgid: 7,
                tid,
                ts_ns: first_read,
                sock: port as u64,
                ..Default::default()
            },
            addr,
            first_write_ns: last_write,
            last_write_ns: last_write,
            response_ns: response,
            first_read_ns: first_read,
            bytes_out: 20,
            bytes_in: 0,
            flags: 0,
            origin: origin::CONNECTED,
            bound_sock: if bound != 0 { SOCK } else { 0 },
            bound_first_read_ns: bound,
        })
    }

    fn think_waits_of(out: &[Record]) -> Vec<(Option<u64>, Vec<(u16, u64)>)> {
        out.iter()
            .filter_map(|r| match r {
                Record::Exchange { think_ns, think_waits, .. } => {
                    Some((*think_ns, think_waits.iter().map(|(c, ns)| (c.peer.port(), *ns)).collect()))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn think_is_attributed_to_the_upstream_calls_made_for_it() {
        // Request first read at 5 ms, last at 10, response begun at 100. The call to
        // :5432 (12–80 ms, response queued at 78) was made for it; the call to :6379 on
        // another thread meanwhile was not (bound to nothing: unattributed at the end).
        let mut timeline = Timeline::new();
        let mut out = Vec::new();
        for e in [
            open(1 * MS, 2 * MS, 3 * MS),
            upstream(9, 6379, 20 * MS, 30 * MS, 31 * MS),
            bound_upstream(7, 5432, 5 * MS, 12 * MS, 78 * MS, 80 * MS),
            request([4 * MS, 5 * MS, 10 * MS, 100 * MS, 100 * MS, 101 * MS], 0, 0),
        ] {
            timeline.apply(&e, &mut out);
        }
        timeline.finish(&mut out);
        let upstream_ns: Vec<_> = out
            .iter()
            .filter_map(|r| match r {
                Record::Upstream { peer, upstream_ns, .. } => Some((peer.port(), *upstream_ns)),
                _ => None,
            })
            .collect();
        assert_eq!(upstream_ns, vec![(6379, Some(10 * MS)), (5432, Some(66 * MS))]);
        assert_eq!(think_waits_of(&out), vec![(Some(90 * MS), vec![(5432, 68 * MS)])]);
        assert_eq!(out.last(), Some(&Record::Unattributed { peer: "127.0.0.2:6379".parse().unwrap() }));
    }

    /// Server request `index` on connection `sock`: read at `read`, answered at `write`.
    fn request_on(sock: u64, read: u64, write: u64) -> Event {
        let Event::Request(mut r) = request([read, read, read, write, write, write], 0, 0) else { unreachable!() };
        r.header.sock = sock;
        Event::Request(r)
    }

    #[test]
    fn an_event_loop_interleaving_requests_charges_each_its_own_wait() {
        // One thread reads four requests on four connections 1 ms apart; each waits
        // 80 ms on the upstream, the waits overlapping. Each think (81 ms) is charged
        // its own 80 ms, not the up to 320 ms of waits on the thread during it.
        let mut events = Vec::new();
        for i in 0..4u64 {
            let mut o = open(0, 0, i * MS + 1);
            if let Event::Open(o) = &mut o {
                o.header.sock = SOCK + i;
            }
            events.push(o);
        }
        for i in 0..4u64 {
            let Event::UpstreamRequest(mut u) =
                bound_upstream(7, 9000 + i as u16, (i + 1) * MS, (i + 1) * MS, (i + 81) * MS, (i + 81) * MS)
            else {
                unreachable!()
            };
            u.bound_sock = SOCK + i;
            events.push(Event::UpstreamRequest(u));
        }
        for i in 0..4u64 {
            events.push(request_on(SOCK + i, (i + 1) * MS, (i + 82) * MS));
        }
        let waits = think_waits_of(&run(&events));
        assert_eq!(waits.len(), 4);
        for (i, (think, charged)) in waits.into_iter().enumerate() {
            assert_eq!(think, Some(81 * MS));
            assert_eq!(charged, vec![(9000 + i as u16, 80 * MS)], "request {i}");
        }
    }

    fn unattributed_ports(out: &[Record]) -> Vec<u16> {
        out.iter()
            .filter_map(|r| match r {
                Record::Unattributed { peer } => Some(peer.port()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_wait_for_a_request_already_answered_is_unattributed() {
        // Request A (read at 5 ms) is answered; a wait bound to it arrives after its
        // exchange (:5432), then one for request B (read at 60 ms, still to answer):
        // the first is late, the second counts for B. After the close, a wait bound to
        // B is late too, as is one for an earlier connection on a socket reopened since.
        let reopened = open(1 * MS, 2 * MS, 300 * MS);
        let close = closed_at(200 * MS, 0, 0, 2);
        let out = run(&[
            open(1 * MS, 2 * MS, 3 * MS),
            request([4 * MS, 5 * MS, 10 * MS, 50 * MS, 50 * MS, 51 * MS], 0, 0),
            bound_upstream(7, 5432, 5 * MS, 12 * MS, 40 * MS, 41 * MS),
            bound_upstream(7, 6379, 60 * MS, 62 * MS, 70 * MS, 71 * MS),
            request([60 * MS, 60 * MS, 61 * MS, 100 * MS, 100 * MS, 101 * MS], 0, 1),
            Event::Close(close),
            bound_upstream(7, 7000, 60 * MS, 62 * MS, 70 * MS, 71 * MS),
            reopened,
            bound_upstream(7, 7001, 60 * MS, 62 * MS, 70 * MS, 71 * MS),
        ]);
        assert_eq!(unattributed_ports(&out), vec![5432, 7000, 7001]);
        assert_eq!(think_waits_of(&out), vec![(Some(40 * MS), vec![]), (Some(39 * MS), vec![(6379, 9 * MS)])]);
    }

    #[test]
    fn a_response_read_on_another_thread_counts_for_the_request_that_made_the_call() {
        // Written by thread 7 for the request, read back by thread 9 (the event's tid is
        // the writer's; the reader plays no part).
        let out = run(&[
            open(1 * MS, 2 * MS, 3 * MS),
            bound_upstream(9, 5432, 5 * MS, 12 * MS, 40 * MS, 41 * MS),
            request([4 * MS, 5 * MS, 10 * MS, 50 * MS, 50 * MS, 51 * MS], 0, 0),
        ]);
        assert_eq!(think_waits_of(&out), vec![(Some(40 * MS), vec![(5432, 29 * MS)])]);
    }

    #[test]
    fn a_worker_pool_binds_its_calls_to_the_response_it_writes() {
        // A reader thread reads the request (think from 10 ms); worker 20 makes the call
        // (12–60 ms) with no request of its own, then begins the response at 70 ms: the
        // kernel's bind ties the call to that request.
        let bind = Event::Bind(Bind {
            header: EventHeader {
                kind: kind::BIND,
                tgid: 7,
                tid: 20,
                ts_ns: 70 * MS,
                sock: SOCK,
                ..Default::default()
            },
            first_read_ns: 5 * MS,
            since_ns: 0,
        });
        let out = run(&[
            open(1 * MS, 2 * MS, 3 * MS),
            upstream(20, 5432, 12 * MS, 59 * MS, 60 * MS),
            bind,
            request([4 * MS, 5 * MS, 10 * MS, 70 * MS, 70 * MS, 71 * MS], 0, 0),
        ]);
        assert_eq!(think_waits_of(&out), vec![(Some(60 * MS), vec![(5432, 48 * MS)])]);
    }

    #[test]
    fn every_request_is_timed_or_aborted_and_goodbyes_are_no_requests() {
        let mut stats = crate::stats::Stats::default();
        let out = run(&[
            open(1 * MS, 2 * MS, 3 * MS),
            // Answered; its think begins at the write's start even though the write
            // returned long after (the timestamps are the kernel's).
            request([4 * MS, 5 * MS, 6 * MS, 7 * MS, 107 * MS, 108 * MS], 0, 0),
            // Reset mid-think.
            request([110 * MS, 111 * MS, 111 * MS, 0, 0, 0], flags::ABORTED, 1),
            // A goodbye before the peer's orderly close.
            request([120 * MS, 121 * MS, 121 * MS, 0, 0, 0], flags::CLOSED_BY_PEER, 2),
            // A greeting the server wrote unasked.
            request([0, 0, 0, 1 * MS, 1 * MS, 2 * MS], 0, 3),
        ]);
        for r in &out {
            stats.apply(r);
        }
        let l = &stats.on_port(8080);
        assert_eq!((l.requests, l.aborted, l.closed_by_peer), (2, 1, 1));
        assert_eq!(l.requests, l.phases[&Phase::Think].len() + l.aborted);
        // (Histograms keep three significant digits.)
        assert!(l.phases[&Phase::Think].max().abs_diff(1 * MS) < MS / 500, "{}", l.phases[&Phase::Think].max());
        assert_eq!(l.phases[&Phase::Send].len(), 1);
    }

    #[test]
    fn an_upstream_response_before_the_write_returned_is_still_timed() {
        // The response was queued (20.5 ms) before the request's write call returned
        // (21 ms): no negative span, a zero one; with no arrival seen, the first read.
        let out = run(&[upstream(7, 5432, 21 * MS, 20 * MS + MS / 2, 22 * MS), upstream(7, 5432, 30 * MS, 0, 35 * MS)]);
        let timed: Vec<_> = out
            .iter()
            .filter_map(|r| match r {
                Record::Upstream { upstream_ns, .. } => Some(*upstream_ns),
                _ => None,
            })
            .collect();
        assert_eq!(timed, vec![Some(0), Some(5 * MS)]);
    }

    #[test]
    fn upstream_bytes_in_are_not_lost_at_close() {
        let mut timeline = Timeline::new();
        let mut out = Vec::new();
        let mut connect = UpstreamConnect::default();
        connect.header.sock = 5432;
        connect.addr = addr();
        timeline.apply(&Event::UpstreamConnect(connect), &mut out);
        let Event::UpstreamRequest(mut req) = upstream(7, 5432, MS, 2 * MS, 3 * MS) else { panic!() };
        req.bytes_in = 0;
        timeline.apply(&Event::UpstreamRequest(req), &mut out);
        req.bytes_in = 300; // the first response, read before the second request
        timeline.apply(&Event::UpstreamRequest(req), &mut out);
        let close =
            ConnClose { header: EventHeader { sock: 5432, ..Default::default() }, bytes_in: 500, ..Default::default() };
        timeline.apply(&Event::Close(close), &mut out);
        assert_eq!(
            out.last(),
            Some(&Record::UpstreamClosed { peer: "127.0.0.2:40000".parse().unwrap(), bytes_in: 200 })
        );
    }

    #[test]
    fn ipv6_addresses_stay_ipv6() {
        let mut a = [0u8; 16];
        a[15] = 1;
        assert_eq!(socket_addr(AF_INET6, &a, 80).to_string(), "[::1]:80");
        let mapped = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1];
        assert_eq!(socket_addr(AF_INET6, &mapped, 80).to_string(), "[::ffff:127.0.0.1]:80");
        assert_eq!(socket_addr(AF_INET, &mapped, 80).to_string(), "127.0.0.1:80");
    }

    fn tls_done(sock: u64, start: u64, end: u64) -> Event {
        Event::TlsDone(TlsDone {
            header: EventHeader { kind: kind::TLS_DONE, tgid: 7, tid: 7, ts_ns: end, sock, ..Default::default() },
            start_ns: start,
            end_ns: end,
            method: tracer_common::tls::HOOKED | tracer_common::tls::DONE,
            _pad: 0,
        })
    }

    #[test]
    fn a_tls_handshake_is_its_own_phase_and_no_request() {
        // Accepted at 10 ms; the ClientHello came at 9 ms, while the connection waited to
        // be accepted: that part is accept_wait's. The handshake ends at 14 ms and the
        // one request (read at 15 ms) is the only exchange.
        let out = run(&[
            open(1 * MS, 2 * MS, 10 * MS),
            tls_done(SOCK, 9 * MS, 14 * MS),
            request([15 * MS, 15 * MS, 15 * MS, 20 * MS, 20 * MS, 21 * MS], 0, 0),
        ]);
        let tls: Vec<_> = out.iter().filter(|r| matches!(r, Record::Tls { .. })).collect();
        let remote = endpoints(&addr()).1;
        assert_eq!(
            tls,
            [&Record::Tls { listener: ListenerId::new(8080, 0), remote, pid: 7, tls_ns: Some(4 * MS), method: 3 }]
        );
        let exchanges = out.iter().filter(|r| matches!(r, Record::Exchange { .. })).count();
        assert_eq!(exchanges, 1);
        let mut stats = crate::stats::Stats::default();
        for r in &out {
            stats.apply(r);
        }
        let l = &stats.on_port(8080);
        assert_eq!((l.requests, l.tls_connections), (1, 1));
        assert_eq!(l.phases[&Phase::Tls].len(), 1);
        assert_eq!(l.tls_method(), Some(("OpenSSL uprobes", None)));
    }

    #[test]
    fn an_upstream_tls_handshake_belongs_to_its_peer() {
        let mut a = addr();
        a.local_port = 50443;
        a.remote_port = 443;
        let connect = Event::UpstreamConnect(UpstreamConnect {
            header: EventHeader { kind: kind::UPSTREAM_CONNECT, tgid: 7, tid: 7, sock: 443, ..Default::default() },
            addr: a,
            start_ns: MS,
            end_ns: 2 * MS,
            syn_retransmits: 0,
            error: 0,
        });
        let out = run(&[connect, tls_done(443, 2 * MS, 5 * MS)]);
        let peer = endpoints(&a).1;
        assert!(out.contains(&Record::UpstreamTls { peer, tls_ns: Some(3 * MS) }), "{out:?}");
        // A handshake on a connection never seen is ignored, not misfiled.
        assert!(run(&[tls_done(999, MS, 2 * MS)]).is_empty());
    }

    fn payload(which: u16, bytes: &[u8], total: u32) -> Event {
        Event::Payload(
            Payload {
                header: header(kind::PAYLOAD, 0),
                side: which,
                len: bytes.len() as u16,
                total,
                ..Default::default()
            },
            bytes.to_vec(),
        )
    }

    fn labelled(events: &[Event]) -> (Vec<Record>, crate::stats::Stats) {
        let mut timeline = Timeline::with_labels(Routes::default());
        let mut out = Vec::new();
        for e in events {
            timeline.apply(e, &mut out);
        }
        let mut stats = crate::stats::Stats::default();
        for r in &out {
            stats.apply(r);
        }
        (out, stats)
    }

    #[test]
    fn an_exchange_takes_the_labels_of_its_request_and_response() {
        let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes();
        let mut events = vec![open(MS, 2 * MS, 3 * MS)];
        for (i, (path, status)) in
            [("/products/1", "200 OK"), ("/products/2", "200 OK"), ("/nope", "404 Not Found")].into_iter().enumerate()
        {
            let t = 10 * MS * (i as u64 + 1);
            let asked = get(path);
            events.push(payload(side::REQUEST, &asked, asked.len() as u32));
            let response = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").into_bytes();
            events.push(payload(side::RESPONSE, &response, response.len() as u32));
            events.push(request([t, t + MS, t + MS, t + 2 * MS, t + 3 * MS, t + 4 * MS], 0, i as u32));
        }
        let (out, stats) = labelled(&events);
        let labels: Vec<Vec<String>> = out
            .iter()
            .filter_map(|r| match r {
                Record::Exchange { labels, .. } => Some(labels.as_ref().map_or(vec![], |l| l.requests.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(labels, [vec!["GET /products/{id}"], vec!["GET /products/{id}"], vec!["GET /nope"]]);
        let l = &stats.on_port(8080);
        let ranked = l.endpoints.ranked();
        assert_eq!(ranked.len(), 2);
        let products = l.endpoints.get("GET /products/{id}").unwrap();
        assert_eq!((products.requests, products.statuses[1], products.think.len()), (2, 2, 2));
        assert_eq!(products.bytes_in, 200);
        assert_eq!(l.endpoints.get("GET /nope").unwrap().statuses[3], 1);
        // Labels gone with the connection: a reused socket address starts afresh.
        let (_, stats) = labelled(&[payload(side::RESPONSE, b"HTTP/1.1 200 OK\r\n\r\n", 19)]);
        assert!(stats.listeners.is_empty());
    }

    #[test]
    fn an_exchange_with_the_next_requests_bytes_is_the_two_in_turn() {
        // Three exchanges on a kept-alive connection, as separate events and as the
        // programs send them with labels on: each exchange but the last in one record
        // with the next request's first bytes.
        let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes();
        let paths = ["/products/1", "/nope", "/products/2"];
        let status = |i: usize| if i == 1 { "HTTP/1.1 404 Not Found\r\n\r\n" } else { "HTTP/1.1 200 OK\r\n\r\n" };
        let exchange = |i: usize| {
            let t = 10 * MS * (i as u64 + 1);
            request([t, t + MS, t + MS, t + 2 * MS, t + 3 * MS, t + 4 * MS], 0, i as u32)
        };
        let mut separate = vec![open(MS, 2 * MS, 3 * MS)];
        let mut merged = separate.clone();
        for (i, path) in paths.into_iter().enumerate() {
            let asked = payload(side::REQUEST, &get(path), get(path).len() as u32);
            let answer = payload(side::RESPONSE, status(i).as_bytes(), status(i).len() as u32);
            separate.extend([asked.clone(), answer.clone(), exchange(i)]);
            match (i, asked) {
                (0, asked) => merged.push(asked),
                (_, Event::Payload(p, data)) => {
                    let Event::Request(before) = exchange(i - 1) else { unreachable!() };
                    merged.push(Event::RequestThenPayload(before, p, data));
                }
                _ => unreachable!(),
            }
            merged.push(answer);
        }
        merged.push(exchange(paths.len() - 1));
        let (separate_out, separate_stats) = labelled(&separate);
        let (merged_out, merged_stats) = labelled(&merged);
        assert_eq!(merged_out, separate_out);
        let l = merged_stats.on_port(8080);
        assert_eq!(l.requests, 3);
        assert_eq!(l.endpoints.get("GET /products/{id}").unwrap().requests, 2);
        assert_eq!(l.endpoints.get("GET /nope").unwrap().statuses[3], 1);
        assert_eq!(separate_stats.on_port(8080).requests, 3);
    }

    #[test]
    fn pipelined_requests_count_each() {
        let mut batch = Vec::new();
        for _ in 0..16 {
            batch.extend_from_slice(b"*2\r\n$3\r\nGET\r\n$16\r\nkey:__rand_int__\r\n");
        }
        let events = [
            open(MS, 2 * MS, 3 * MS),
            payload(side::REQUEST, &batch, batch.len() as u32),
            request([4 * MS, 5 * MS, 5 * MS, 6 * MS, 6 * MS, 7 * MS], 0, 0),
        ];
        let (_, stats) = labelled(&events);
        let l = &stats.on_port(8080);
        assert_eq!(l.requests, 16);
        let get = l.endpoints.get("GET").unwrap();
        assert_eq!((get.requests, get.think.len()), (16, 1), "one exchange, timed once");
        // Without labels the same exchange is one request.
        let (_, plain) = {
            let mut t = Timeline::new();
            let mut out = Vec::new();
            for e in &events {
                t.apply(e, &mut out);
            }
            let mut stats = crate::stats::Stats::default();
            out.iter().for_each(|r| stats.apply(r));
            (out, stats)
        };
        assert_eq!(plain.on_port(8080).requests, 1);
    }
}
