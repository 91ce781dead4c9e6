//! SYN-ACK retransmits: remember when the first SYN-ACK of the handshake went out, so
//! `handshake` covers the retransmits and the final ACKs dropped on a full accept queue.

use tracer_common::{kind, ConnAddr, EventHeader, SynAckRetransmit};

use crate::{
    conn::now,
    kernel::{conn_addr, netns_of, read, tuple_key},
    maps::{filter_by_port, is_traced_port, reserve, setup_wanted, SynAckInfo, SYNACKS},
    off,
};

tracepoint_hook! {
    fn tcp_retransmit_synack / raw_tcp_retransmit_synack (ctx) {
        let req: u64 = ctx.arg(1);
        let addr = conn_addr(req);
        if filter_by_port() && !is_traced_port(addr.local_port) {
            return 0;
        }
        let key = tuple_key(&addr);
        match SYNACKS.get_ptr_mut(&key) {
            // Only the state hook takes an entry out, for a connection it records.
            None if !setup_wanted(addr.local_port) => {}
            Some(info) => unsafe { (*info).retransmits += 1 },
            None => {
                // tcp_request_sock.snt_synack: first SYN-ACK, tcp_clock_us (CLOCK_MONOTONIC µs).
                let first_us = read::<u64>(req, off!(treq_snt_synack)).unwrap_or(0);
                let info = SynAckInfo {
                    first_synack_ns: first_us * 1000,
                    retransmits: 1,
                    _pad: 0,
                };
                let _ = SYNACKS.insert(&key, &info, 0);
            }
        }
        if let Some(mut slot) = reserve::<SynAckRetransmit>() {
            slot.write(SynAckRetransmit {
                header: EventHeader {
                    kind: kind::SYNACK_RETRANSMIT,
                    ts_ns: now(),
                    sock: req,
                    ..EventHeader::default()
                },
                addr: ConnAddr { netns: netns_of::<false>(req), ..addr },
            });
            slot.submit();
        }
        0
    }
}
