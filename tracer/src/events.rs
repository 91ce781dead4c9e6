//! Decoding of the records the kernel programs put in the ring buffer.

use std::mem::size_of;

use anyhow::{bail, Result};
use tracer_common::{
    kind, ConnClose, ConnOpen, EventHeader, ProcessEvent, Request, ResetSent, SynAckRetransmit, UpstreamConnect,
    UpstreamRequest,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Open(ConnOpen),
    Request(Request),
    Close(ConnClose),
    SynAckRetransmit(SynAckRetransmit),
    ResetSent(ResetSent),
    UpstreamConnect(UpstreamConnect),
    UpstreamRequest(UpstreamRequest),
    ProcessExit(ProcessEvent),
    ProcessFork(ProcessEvent),
}

fn read<T: Copy>(bytes: &[u8]) -> Result<T> {
    if bytes.len() < size_of::<T>() {
        bail!(
            "event record of {} bytes is shorter than its type ({} bytes)",
            bytes.len(),
            size_of::<T>()
        );
    }
    // SAFETY: length checked; every wire type is plain old data of integers.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

pub fn decode(bytes: &[u8]) -> Result<Event> {
    let header: EventHeader = read(bytes)?;
    Ok(match header.kind {
        kind::CONN_OPEN => Event::Open(read(bytes)?),
        kind::REQUEST => Event::Request(read(bytes)?),
        kind::CONN_CLOSE => Event::Close(read(bytes)?),
        kind::SYNACK_RETRANSMIT => Event::SynAckRetransmit(read(bytes)?),
        kind::RESET_SENT => Event::ResetSent(read(bytes)?),
        kind::UPSTREAM_CONNECT => Event::UpstreamConnect(read(bytes)?),
        kind::UPSTREAM_REQUEST => Event::UpstreamRequest(read(bytes)?),
        kind::PROCESS_EXIT => Event::ProcessExit(read(bytes)?),
        kind::PROCESS_FORK => Event::ProcessFork(read(bytes)?),
        other => bail!("unknown event kind {other}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn rejects_short_and_unknown_records() {
        let mut req = Request::default();
        req.header.kind = kind::REQUEST;
        assert!(decode(&bytes_of(&req)[..40]).is_err());
        req.header.kind = 99;
        assert!(decode(&bytes_of(&req)).is_err());
    }
}
