//! Decoding of the records the kernel programs put in the ring buffer.

use std::mem::size_of;

use anyhow::{bail, Result};
use tracer_common::{
    kind, Bind, ClosingExchange, ConnClose, ConnOpen, EventHeader, Payload, ProcessEvent, Request, ResetSent,
    ShortRequest, SynAckRetransmit, TlsDone, UpstreamConnect, UpstreamRequest,
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Open(ConnOpen),
    Request(Request),
    Close(ConnClose),
    /// A connection's last exchange and its close, from one record.
    ClosedAfter(Request, ConnClose),
    SynAckRetransmit(SynAckRetransmit),
    ResetSent(ResetSent),
    UpstreamConnect(UpstreamConnect),
    UpstreamRequest(UpstreamRequest),
    ProcessExit(ProcessEvent),
    ProcessFork(ProcessEvent),
    Bind(Bind),
    TlsDone(TlsDone),
    /// The first bytes of a request or response, for its label.
    Payload(Payload, Vec<u8>),
    /// A connection's exchange, then the first bytes of its next request, from one record.
    RequestThenPayload(Request, Payload, Vec<u8>),
}

fn read<T: Copy>(bytes: &[u8]) -> Result<T> {
    if bytes.len() < size_of::<T>() {
        bail!("event record of {} bytes is shorter than its type ({} bytes)", bytes.len(), size_of::<T>());
    }
    // SAFETY: length checked; every wire type is plain old data of integers.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// A payload record (`kind::PAYLOAD`) and its bytes, borrowed from the ring: the tracer
/// takes them in place, with no copy.
pub fn payload(bytes: &[u8]) -> Result<(Payload, &[u8])> {
    let p: Payload = read(bytes)?;
    let data = &bytes[size_of::<Payload>()..];
    if data.len() < p.len as usize {
        bail!("payload record holds {} bytes, not the {} it says", data.len(), p.len);
    }
    Ok((p, &data[..p.len as usize]))
}

/// An exchange and the next request's first bytes (`kind::REQUEST_SHORT_PAYLOAD`), the
/// bytes borrowed from the ring.
pub fn request_then_payload(bytes: &[u8]) -> Result<(Request, Payload, &[u8])> {
    let exchange: ShortRequest = read(bytes)?;
    let (p, data) = payload(&bytes[size_of::<ShortRequest>()..])?;
    Ok((exchange.expand(), p, data))
}

pub fn decode(bytes: &[u8]) -> Result<Event> {
    let header: EventHeader = read(bytes)?;
    Ok(match header.kind {
        kind::CONN_OPEN => Event::Open(read(bytes)?),
        kind::REQUEST => Event::Request(read(bytes)?),
        kind::REQUEST_SHORT => Event::Request(read::<ShortRequest>(bytes)?.expand()),
        kind::CONN_CLOSE => Event::Close(read(bytes)?),
        kind::CONN_CLOSE_EXCHANGE => {
            let both: ClosingExchange = read(bytes)?;
            let mut close = both.close;
            close.header.kind = kind::CONN_CLOSE;
            Event::ClosedAfter(both.request.expand(), close)
        }
        kind::SYNACK_RETRANSMIT => Event::SynAckRetransmit(read(bytes)?),
        kind::RESET_SENT => Event::ResetSent(read(bytes)?),
        kind::UPSTREAM_CONNECT => Event::UpstreamConnect(read(bytes)?),
        kind::UPSTREAM_REQUEST => Event::UpstreamRequest(read(bytes)?),
        kind::PROCESS_EXIT => Event::ProcessExit(read(bytes)?),
        kind::PROCESS_FORK => Event::ProcessFork(read(bytes)?),
        kind::BIND => Event::Bind(read(bytes)?),
        kind::TLS_DONE => Event::TlsDone(read(bytes)?),
        kind::PAYLOAD => {
            let (p, data) = payload(bytes)?;
            Event::Payload(p, data.to_vec())
        }
        kind::REQUEST_SHORT_PAYLOAD => {
            let (req, p, data) = request_then_payload(bytes)?;
            Event::RequestThenPayload(req, p, data.to_vec())
        }
        other => bail!("unknown event kind {other}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracer_common::{flags, side};

    fn bytes_of<T>(v: &T) -> Vec<u8> {
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()).to_vec() }
    }

    #[test]
    fn decodes_by_kind() {
        let mut req = Request::default();
        req.header.kind = kind::REQUEST;
        req.bytes_in = 42;
        assert_eq!(decode(&bytes_of(&req)).unwrap(), Event::Request(req));
    }

    #[test]
    fn expands_the_one_line_request() {
        let base = 5_000_000_000;
        let short = ShortRequest {
            kind: kind::REQUEST_SHORT,
            flags: flags::ARRIVAL_UNKNOWN as u16,
            tid: 12,
            sock: 0xffff_8888_0000_1000,
            base_ns: base,
            // no arrival; first read at the base; the rest after it, the acknowledgement
            // at the longest span the form carries
            offsets: [0, 1, 101, 2_001, 3_001, ShortRequest::MAX_SPAN_NS as u32 + 1],
            bytes_in: 80,
            bytes_out: u32::MAX,
        };
        let Event::Request(req) = decode(&bytes_of(&short)).unwrap() else { panic!("not a request") };
        assert_eq!(req.header.sock, short.sock);
        assert_eq!(req.header.tgid, 0, "the connection's, filled in from its open event");
        assert_eq!((req.tid, req.header.tid), (12, 12));
        assert_eq!(req.arrival_ns, 0);
        assert_eq!(
            [req.first_read_ns, req.last_read_ns, req.first_write_ns, req.last_write_ns, req.acked_ns],
            [base, base + 100, base + 2_000, base + 3_000, base + ShortRequest::MAX_SPAN_NS]
        );
        assert_eq!((req.bytes_in, req.bytes_out), (80, u32::MAX as u64));
        assert_eq!(req.flags, flags::ARRIVAL_UNKNOWN);
        for ns in [base, base + 1, base + ShortRequest::MAX_SPAN_NS] {
            let offset = ShortRequest::offset(base, ns);
            assert_ne!(offset, 0, "a time is never taken for none");
            assert_eq!(base + offset as u64 - 1, ns);
        }
        assert_eq!(ShortRequest::offset(base, 0), 0);
    }

    #[test]
    fn splits_the_closing_exchange_into_exchange_then_close() {
        let sock = 0xffff_8888_0000_2000;
        let mut both = ClosingExchange::default();
        both.close.header = EventHeader { kind: kind::CONN_CLOSE_EXCHANGE, tgid: 9, sock, ..Default::default() };
        both.close.bytes_in = 120;
        both.close.requests = 1;
        both.close.flags = flags::UNDELIVERED;
        both.request = ShortRequest {
            kind: kind::REQUEST_SHORT,
            flags: flags::UNDELIVERED as u16,
            tid: 9,
            sock,
            base_ns: 1_000,
            offsets: [1, 11, 21, 31, 41, 0],
            bytes_in: 120,
            bytes_out: 300,
        };
        let Event::ClosedAfter(req, close) = decode(&bytes_of(&both)).unwrap() else {
            panic!("not a closing exchange")
        };
        assert_eq!(close.header.kind, kind::CONN_CLOSE, "the close as a close event carries it");
        assert_eq!((close.header.sock, close.header.tgid, close.bytes_in, close.requests), (sock, 9, 120, 1));
        assert_eq!((req.header.sock, req.first_read_ns, req.last_write_ns, req.acked_ns), (sock, 1_010, 1_040, 0));
        assert_eq!((req.bytes_in, req.bytes_out, req.flags), (120, 300, flags::UNDELIVERED));
        assert!(decode(&bytes_of(&both)[..150]).is_err(), "a record cut short is refused");
    }

    #[test]
    fn splits_an_exchange_and_the_next_requests_bytes() {
        let sock = 0xffff_8888_0000_3000;
        let exchange = ShortRequest {
            kind: kind::REQUEST_SHORT_PAYLOAD,
            tid: 7,
            sock,
            base_ns: 2_000,
            offsets: [1, 11, 21, 31, 41, 51],
            bytes_in: 80,
            bytes_out: 500,
            ..Default::default()
        };
        let asked = b"GET /next HTTP/1.1\r\n";
        let head = Payload {
            header: EventHeader { kind: kind::PAYLOAD, tgid: 7, sock, ..Default::default() },
            side: side::REQUEST,
            len: asked.len() as u16,
            total: 90,
        };
        let mut record = bytes_of(&exchange);
        record.extend(bytes_of(&head));
        record.extend_from_slice(asked);
        let Event::RequestThenPayload(req, p, data) = decode(&record).unwrap() else {
            panic!("not an exchange with a payload")
        };
        assert_eq!(req.header.kind, kind::REQUEST, "the exchange as a request event carries it");
        assert_eq!((req.header.sock, req.first_read_ns, req.acked_ns, req.bytes_out), (sock, 2_010, 2_050, 500));
        assert_eq!((p, data.as_slice()), (head, &asked[..]));
        let (_, _, borrowed) = request_then_payload(&record).unwrap();
        assert_eq!(borrowed, asked);
        assert!(decode(&record[..record.len() - 1]).is_err(), "bytes missing from the payload are refused");
        assert!(decode(&record[..50]).is_err(), "a record cut short is refused");
    }

    #[test]
    fn rejects_short_and_unknown_records() {
        let mut req = Request::default();
        req.header.kind = kind::REQUEST;
        assert!(decode(&bytes_of(&req)[..40]).is_err());
        req.header.kind = 99;
        assert!(decode(&bytes_of(&req)).is_err());
    }
}
