//! The client side: outcomes of connects, and the attribution of a server request's
//! think time to the upstream calls its thread waited on.
//!
//! The rule: while a server request is in `think` (from its last read to its first
//! write, on the thread that did the last read), every upstream request the same thread
//! made counts from the request's last write to the thread's first read of the response.
//! The part of that wait inside the think interval is attributed to the upstream peer;
//! what remains of think is local. Waits of one thread never overlap (a thread waits on
//! one call at a time), so the attributed parts never exceed think.
//!
//! Limits: a server that hands the request to another thread (a thread pool behind an
//! event loop, async runtimes that move tasks between threads) waits on its upstream
//! calls from a thread other than the one that read the request; those waits show as
//! local. Calls made in parallel by several threads for one request are attributed only
//! when made by the reading thread.

use std::{collections::VecDeque, net::SocketAddr};

use rustc_hash::FxHashMap;

/// How a connect() ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ConnectOutcome {
    Established,
    Refused,
    TimedOut,
    Reset,
    HostUnreachable,
    NetworkUnreachable,
    /// The application closed the socket before the connect completed (its own timeout).
    Abandoned,
    Other(i32),
}

impl ConnectOutcome {
    pub fn from_error(error: i32) -> Self {
        match error {
            0 => Self::Established,
            tracer_common::CONNECT_ABANDONED => Self::Abandoned,
            libc::ECONNREFUSED => Self::Refused,
            libc::ETIMEDOUT => Self::TimedOut,
            libc::ECONNRESET => Self::Reset,
            libc::EHOSTUNREACH => Self::HostUnreachable,
            libc::ENETUNREACH => Self::NetworkUnreachable,
            other => Self::Other(other),
        }
    }

    pub fn name(self) -> String {
        match self {
            Self::Established => "established".into(),
            Self::Refused => "refused".into(),
            Self::TimedOut => "timed_out".into(),
            Self::Reset => "reset".into(),
            Self::HostUnreachable => "host_unreachable".into(),
            Self::NetworkUnreachable => "network_unreachable".into(),
            Self::Abandoned => "abandoned".into(),
            Self::Other(errno) => format!("errno_{errno}"),
        }
    }
}

/// One wait of a thread on an upstream peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wait {
    pub peer: SocketAddr,
    pub start_ns: u64,
    pub end_ns: u64,
}

/// Per thread, the recent upstream waits, oldest first.
#[derive(Default)]
pub struct Waits {
    by_thread: FxHashMap<u32, VecDeque<Wait>>,
}

/// Waits kept per thread; a thread making more upstream calls than this without serving
/// a request loses the oldest (they could only matter to a think time that long).
const PER_THREAD: usize = 512;
/// Threads remembered; beyond this the store starts over (threads come and go).
const THREADS: usize = 65_536;

impl Waits {
    pub fn record(&mut self, tid: u32, wait: Wait) {
        if wait.end_ns <= wait.start_ns {
            return;
        }
        if self.by_thread.len() >= THREADS && !self.by_thread.contains_key(&tid) {
            self.by_thread.clear();
        }
        let waits = self.by_thread.entry(tid).or_default();
        if waits.len() >= PER_THREAD {
            waits.pop_front();
        }
        waits.push_back(wait);
    }

    /// The time of `[from, to]` thread `tid` spent waiting, per peer (in the order first
    /// seen). Waits that ended before `from` are forgotten: the thread's later requests
    /// start later still.
    pub fn attribute(&mut self, tid: u32, from: u64, to: u64) -> Vec<(SocketAddr, u64)> {
        let mut out: Vec<(SocketAddr, u64)> = Vec::new();
        let Some(waits) = self.by_thread.get_mut(&tid) else { return out };
        while waits.front().is_some_and(|w| w.end_ns <= from) {
            waits.pop_front();
        }
        for w in waits.iter() {
            let overlap = w.end_ns.min(to).saturating_sub(w.start_ns.max(from));
            if overlap == 0 {
                continue;
            }
            match out.iter_mut().find(|(p, _)| *p == w.peer) {
                Some((_, ns)) => *ns += overlap,
                None => out.push((w.peer, overlap)),
            }
        }
        if waits.is_empty() {
            self.by_thread.remove(&tid);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn peer(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 5], port))
    }

    #[test]
    fn waits_inside_think_are_attributed_per_peer() {
        let mut w = Waits::default();
        // Thread 7: two calls to :5432 and one to :6379 during think [100, 200] ms.
        w.record(7, Wait { peer: peer(5432), start_ns: 110 * MS, end_ns: 150 * MS });
        w.record(7, Wait { peer: peer(6379), start_ns: 150 * MS, end_ns: 160 * MS });
        w.record(7, Wait { peer: peer(5432), start_ns: 170 * MS, end_ns: 190 * MS });
        // Another thread's wait does not count.
        w.record(8, Wait { peer: peer(5432), start_ns: 100 * MS, end_ns: 200 * MS });
        assert_eq!(w.attribute(7, 100 * MS, 200 * MS), vec![(peer(5432), 60 * MS), (peer(6379), 10 * MS)]);
    }

    #[test]
    fn only_the_overlap_counts_and_old_waits_are_dropped() {
        let mut w = Waits::default();
        w.record(7, Wait { peer: peer(1), start_ns: 10 * MS, end_ns: 20 * MS });
        w.record(7, Wait { peer: peer(1), start_ns: 90 * MS, end_ns: 130 * MS });
        assert_eq!(w.attribute(7, 100 * MS, 200 * MS), vec![(peer(1), 30 * MS)]);
        // The wait that ended at 20 ms is gone; the one ending at 130 ms stays for a
        // request whose think overlaps it.
        assert_eq!(w.by_thread[&7].len(), 1);
        assert_eq!(w.attribute(7, 300 * MS, 400 * MS), vec![]);
        assert!(w.by_thread.is_empty());
    }

    #[test]
    fn connect_errors_are_named() {
        assert_eq!(ConnectOutcome::from_error(libc::ECONNREFUSED).name(), "refused");
        assert_eq!(ConnectOutcome::from_error(tracer_common::CONNECT_ABANDONED).name(), "abandoned");
        assert_eq!(ConnectOutcome::from_error(0), ConnectOutcome::Established);
        assert_eq!(ConnectOutcome::from_error(5).name(), "errno_5");
    }
}
