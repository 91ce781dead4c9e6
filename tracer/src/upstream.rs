//! The client side: outcomes of connects, and the attribution of a server request's
//! think time to the upstream requests made for it.
//!
//! The rule (causal): every upstream request is charged to at most one server request,
//! the one it was made for. The kernel programs bind it when it is first written, to the
//! server request its thread read most recently (for a connection's first request, the
//! one the thread had read when it called connect()), and a thread's binding ends when
//! it begins writing that request's response (`tracer-ebpf/src/bind.rs`). Event loops
//! (nginx, Node.js), goroutines and thread-per-request servers all issue an upstream
//! write in the same run of work in which they read the request. A thread that starts
//! upstream requests with no server request of its own (a worker handed the request by
//! a reader thread) has them tied to the next response it begins to write: the kernel
//! says so with a `Bind`.
//!
//! A server request's attributed wait is the union of its upstream waits (each from the
//! request's last write to the first read of its response) clipped to its think
//! interval, so it never exceeds think; where waits overlap (calls in parallel), the
//! time goes to the call that ends last, the one the request was still waiting for.
//! `local` is think minus that union. Upstream requests that no rule ties to a server
//! request are counted as `unattributed` per peer, never guessed.

use std::{collections::VecDeque, net::SocketAddr, sync::Arc};

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

/// Whom an upstream request went to: the peer, and with labels on, the request's label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Callee {
    pub peer: SocketAddr,
    pub label: Option<Arc<str>>,
}

impl From<SocketAddr> for Callee {
    fn from(peer: SocketAddr) -> Self {
        Self { peer, label: None }
    }
}

impl std::fmt::Display for Callee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.label {
            Some(label) => write!(f, "{} {label}", self.peer),
            None => write!(f, "{}", self.peer),
        }
    }
}

/// One upstream request's wait: from its last write to the first read of its response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wait {
    pub callee: Callee,
    /// When the upstream request was first written (when it was bound).
    pub begun_ns: u64,
    pub start_ns: u64,
    pub end_ns: u64,
}

/// A server request: its connection's socket and its first read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestKey {
    pub sock: u64,
    pub first_read_ns: u64,
}

/// Upstream waits on their way to the server request they were made for.
#[derive(Default)]
pub struct Waits {
    /// Bound waits, until their server request's exchange arrives.
    bound: FxHashMap<RequestKey, Vec<Wait>>,
    /// `bound`'s keys in the order they came (with keys since taken, pruned now and
    /// then), to give up the oldest beyond [`BOUND`].
    order: VecDeque<RequestKey>,
    /// Per thread, waits begun with no server request known, until a bind ties them.
    unbound: FxHashMap<u32, VecDeque<Wait>>,
}

/// Server requests with waits kept; beyond this the oldest are given up (their
/// exchange was lost, or is older than any think time worth measuring).
const BOUND: usize = 65_536;
/// Waits kept per server request.
const PER_REQUEST: usize = 512;
/// Unbound waits kept per thread; beyond this the oldest are unattributed.
const PER_THREAD: usize = 512;
/// Threads with unbound waits remembered; beyond this they are unattributed.
const THREADS: usize = 16_384;

impl Waits {
    /// Keeps `wait` for the server request it is bound to, or for its thread `tid` when
    /// none is known. `settled`: the bound request's exchange was handled already (the
    /// caller knows its connections), so the wait came too late to count for it. Returns
    /// the peers of waits given up as unattributed meanwhile.
    pub fn record(&mut self, bound: Option<RequestKey>, settled: bool, tid: u32, wait: Wait) -> Vec<SocketAddr> {
        let mut given_up = Vec::new();
        match bound {
            Some(key) => self.bind_one(key, settled, wait, &mut given_up),
            None => {
                if self.unbound.len() >= THREADS && !self.unbound.contains_key(&tid) {
                    given_up.extend(self.unbound.drain().flat_map(|(_, w)| w).map(|w| w.callee.peer));
                }
                let waits = self.unbound.entry(tid).or_default();
                if waits.len() >= PER_THREAD {
                    given_up.extend(waits.pop_front().map(|w| w.callee.peer));
                }
                waits.push_back(wait);
            }
        }
        given_up
    }

    fn bind_one(&mut self, key: RequestKey, settled: bool, wait: Wait, given_up: &mut Vec<SocketAddr>) {
        if settled {
            given_up.push(wait.callee.peer);
            return;
        }
        let waits = self.bound.entry(key).or_default();
        if waits.len() >= PER_REQUEST {
            given_up.push(wait.callee.peer);
            return;
        }
        if waits.is_empty() {
            self.order.push_back(key);
        }
        waits.push(wait);
        while self.bound.len() > BOUND {
            let Some(oldest) = self.order.pop_front() else { break };
            if let Some(waits) = self.bound.remove(&oldest) {
                given_up.extend(waits.iter().map(|w| w.callee.peer));
            }
        }
        if self.order.len() > 2 * self.bound.len() + 1024 {
            let bound = &self.bound;
            self.order.retain(|k| bound.contains_key(k));
        }
    }

    /// Thread `tid` began writing the response of server request `key` (`settled`: as
    /// for [`Waits::record`]): its unbound waits begun since `since_ns` were made for it.
    /// Returns the peers of waits given up as unattributed: older ones, which no request
    /// can claim any more.
    pub fn bind(&mut self, tid: u32, key: RequestKey, settled: bool, since_ns: u64) -> Vec<SocketAddr> {
        let mut given_up = Vec::new();
        for wait in self.unbound.remove(&tid).unwrap_or_default() {
            if wait.begun_ns >= since_ns {
                self.bind_one(key, settled, wait, &mut given_up);
            } else {
                given_up.push(wait.callee.peer);
            }
        }
        given_up
    }

    /// The waits of server request `key` inside its think `[from, to]`, per peer (in
    /// the order first charged). Its exchange is handled: the caller settles it.
    pub fn attribute(&mut self, key: RequestKey, from: u64, to: u64) -> Vec<(Callee, u64)> {
        match self.bound.remove(&key) {
            Some(waits) => charge(&waits, from, to),
            None => Vec::new(),
        }
    }

    /// Server request `key` got no think time: its waits count nowhere.
    pub fn forget(&mut self, key: RequestKey) {
        self.bound.remove(&key);
    }

    /// The peers of every wait still waiting for a bind: at the end of tracing, these
    /// are unattributed.
    pub fn drain_unbound(&mut self) -> Vec<SocketAddr> {
        self.unbound.drain().flat_map(|(_, w)| w).map(|w| w.callee.peer).collect()
    }
}

/// The union of `waits` clipped to `[from, to]`, per peer: each stretch of time covered
/// by several waits goes to the one that ends last.
fn charge(waits: &[Wait], from: u64, to: u64) -> Vec<(Callee, u64)> {
    let clipped: Vec<(u64, u64, &Callee)> = waits
        .iter()
        .map(|w| (w.start_ns.max(from), w.end_ns.min(to), &w.callee))
        .filter(|(start, end, _)| end > start)
        .collect();
    let mut points: Vec<u64> = clipped.iter().flat_map(|(s, e, _)| [*s, *e]).collect();
    points.sort_unstable();
    points.dedup();
    let mut out: Vec<(Callee, u64)> = Vec::new();
    for stretch in points.windows(2) {
        let (a, b) = (stretch[0], stretch[1]);
        let waiting_on = clipped.iter().filter(|(s, e, _)| *s <= a && *e >= b).max_by_key(|(_, e, _)| *e);
        let Some((_, _, callee)) = waiting_on else { continue };
        match out.iter_mut().find(|(c, _)| c == *callee) {
            Some((_, ns)) => *ns += b - a,
            None => out.push(((*callee).clone(), b - a)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn callee(port: u16) -> Callee {
        peer(port).into()
    }

    fn peer(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 5], port))
    }

    fn wait(port: u16, start_ms: u64, end_ms: u64) -> Wait {
        Wait { callee: peer(port).into(), begun_ns: start_ms * MS, start_ns: start_ms * MS, end_ns: end_ms * MS }
    }

    fn key(sock: u64, first_read_ms: u64) -> RequestKey {
        RequestKey { sock, first_read_ns: first_read_ms * MS }
    }

    impl Waits {
        /// `record` for a request still to be answered.
        fn record_for(&mut self, bound: Option<RequestKey>, tid: u32, wait: Wait) -> Vec<SocketAddr> {
            self.record(bound, false, tid, wait)
        }
    }

    #[test]
    fn waits_inside_think_are_attributed_per_peer() {
        let mut w = Waits::default();
        // Request A (think 100–200 ms): two calls to :5432 and one to :6379.
        w.record_for(Some(key(1, 90)), 7, wait(5432, 110, 150));
        w.record_for(Some(key(1, 90)), 7, wait(6379, 150, 160));
        w.record_for(Some(key(1, 90)), 7, wait(5432, 170, 190));
        // Another request's wait, on the same thread and at the same time, is not A's.
        w.record_for(Some(key(2, 95)), 7, wait(5432, 100, 200));
        assert_eq!(w.attribute(key(1, 90), 100 * MS, 200 * MS), vec![(callee(5432), 60 * MS), (callee(6379), 10 * MS)]);
        // Taken once.
        assert_eq!(w.attribute(key(1, 90), 100 * MS, 200 * MS), vec![]);
    }

    #[test]
    fn interleaved_requests_on_one_thread_are_each_charged_their_own_call() {
        // One event loop (thread 7) interleaves four requests, each waiting 80 ms on
        // the upstream while the others are read: the old per-thread rule charged each
        // request every wait overlapping its think (up to 4 × 80 ms); each request is
        // charged its own 80 ms, never more than its think.
        let mut w = Waits::default();
        for i in 0..4u64 {
            w.record_for(Some(key(10 + i, i)), 7, wait(8080, i + 1, i + 81));
        }
        for i in 0..4u64 {
            let think = (i + 1) * MS..(i + 82) * MS;
            let charged = w.attribute(key(10 + i, i), think.start, think.end);
            assert_eq!(charged, vec![(callee(8080), 80 * MS)], "request {i}");
        }
    }

    #[test]
    fn overlapping_calls_count_once_and_go_to_the_call_ending_last() {
        // Two calls in parallel (:1 for 10–50 ms, :2 for 20–80 ms) inside a think of
        // 0–100 ms: 70 ms of waiting, 10 ms to :1 alone, then :2 (ending last) 60 ms.
        let mut w = Waits::default();
        w.record_for(Some(key(1, 0)), 7, wait(1, 10, 50));
        w.record_for(Some(key(1, 0)), 8, wait(2, 20, 80));
        assert_eq!(w.attribute(key(1, 0), 0, 100 * MS), vec![(callee(1), 10 * MS), (callee(2), 60 * MS)]);
    }

    #[test]
    fn waits_are_clipped_to_think() {
        let mut w = Waits::default();
        w.record_for(Some(key(1, 0)), 7, wait(1, 90, 130));
        assert_eq!(w.attribute(key(1, 0), 100 * MS, 200 * MS), vec![(callee(1), 30 * MS)]);
    }

    #[test]
    fn a_response_read_on_another_thread_still_counts_for_its_request() {
        // The wait is bound when the request is written; the thread that reads the
        // response (here 9) plays no part.
        let mut w = Waits::default();
        w.record_for(Some(key(1, 0)), 9, wait(1, 10, 50));
        assert_eq!(w.attribute(key(1, 0), 5 * MS, 60 * MS), vec![(callee(1), 40 * MS)]);
    }

    #[test]
    fn a_worker_handed_the_request_binds_its_calls_when_it_answers() {
        // Worker thread 20 calls :1 (10–50 ms) with no request of its own, then begins
        // the response of request (5, 0): the call is that request's. Its next call
        // (60–90 ms) is for the next request it answers (6, 55), not this one; a call
        // begun before the worker's previous response can no longer be claimed.
        let mut w = Waits::default();
        w.record_for(None, 20, wait(1, 10, 50));
        assert_eq!(w.bind(20, key(5, 0), false, 0), vec![]);
        w.record_for(None, 20, wait(1, 52, 53));
        w.record_for(None, 20, wait(1, 60, 90));
        assert_eq!(w.bind(20, key(6, 55), false, 55 * MS), vec![peer(1)]);
        assert_eq!(w.attribute(key(5, 0), 1 * MS, 55 * MS), vec![(callee(1), 40 * MS)]);
        assert_eq!(w.attribute(key(6, 55), 56 * MS, 95 * MS), vec![(callee(1), 30 * MS)]);
        // Calls no bind ever ties are unattributed at the end.
        w.record_for(None, 21, wait(1, 100, 110));
        assert_eq!(w.drain_unbound(), vec![peer(1)]);
    }

    #[test]
    fn a_wait_bound_to_a_settled_request_is_unattributed_and_nothing_grows() {
        let mut w = Waits::default();
        assert_eq!(w.attribute(key(1, 0), 0, 10 * MS), vec![]);
        // Its response came after the request was answered: it cannot count for it.
        assert_eq!(w.record(Some(key(1, 0)), true, 7, wait(1, 5, 20)), vec![peer(1)]);
        assert_eq!(w.bind(7, key(1, 0), true, 0), vec![]);
        w.record_for(None, 7, wait(1, 6, 21));
        assert_eq!(w.bind(7, key(1, 0), true, 0), vec![peer(1)]);
        // Many requests bound and answered: the bookkeeping stays bounded.
        for i in 0..200_000u64 {
            assert_eq!(w.record_for(Some(key(2, i)), 7, wait(1, i, i + 1)), vec![]);
            w.attribute(key(2, i), i * MS, (i + 1) * MS);
        }
        assert!(w.bound.is_empty());
        assert!(w.order.len() <= 1024 + 1, "{}", w.order.len());
    }

    #[test]
    fn connect_errors_are_named() {
        assert_eq!(ConnectOutcome::from_error(libc::ECONNREFUSED).name(), "refused");
        assert_eq!(ConnectOutcome::from_error(tracer_common::CONNECT_ABANDONED).name(), "abandoned");
        assert_eq!(ConnectOutcome::from_error(0), ConnectOutcome::Established);
        assert_eq!(ConnectOutcome::from_error(5).name(), "errno_5");
    }
}
