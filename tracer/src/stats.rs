//! Statistics: one HDR histogram per listener and phase, plus counters.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
};

use hdrhistogram::Histogram;

use crate::{
    endpoints::{EndpointStats, Endpoints, OTHER},
    listeners::{own_netns, ListenerId},
    timeline::{Labels, Outcome, Phase, Record},
    upstream::{Callee, ConnectOutcome},
};

/// Histograms cover 1 ns to 1 hour with 3 significant digits.
const MAX_NS: u64 = 3_600_000_000_000;

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_NS, 3).expect("valid histogram bounds")
}

/// One histogram per server phase, indexed by the phase: four are recorded per request,
/// so finding them is an array index rather than a map lookup.
#[derive(Clone)]
pub struct PhaseHistograms([Histogram<u64>; Phase::ALL.len()]);

impl Default for PhaseHistograms {
    fn default() -> Self {
        Self(std::array::from_fn(|_| new_histogram()))
    }
}

impl std::ops::Index<&Phase> for PhaseHistograms {
    type Output = Histogram<u64>;

    fn index(&self, phase: &Phase) -> &Histogram<u64> {
        &self.0[*phase as usize]
    }
}

impl std::ops::IndexMut<&Phase> for PhaseHistograms {
    fn index_mut(&mut self, phase: &Phase) -> &mut Histogram<u64> {
        &mut self.0[*phase as usize]
    }
}

#[derive(Clone)]
pub struct ListenerStats {
    pub phases: PhaseHistograms,
    pub connections: u64,
    /// Requests read: each is either timed (a think sample) or `aborted`.
    pub requests: u64,
    pub aborted: u64,
    /// Peers' last messages before an orderly close, left unanswered: no requests.
    pub closed_by_peer: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub synack_retransmits: u64,
    /// SYNs and handshake ACKs dropped because the listener's queues were full.
    pub listen_drops: u64,
    /// Connections the server's kernel reset.
    pub resets_sent: u64,
    /// Connections the peer reset.
    pub resets_received: u64,
    /// Sum of the think samples, and the part of it spent waiting on each upstream peer.
    pub think_total_ns: u64,
    pub think_waits: BTreeMap<Callee, u64>,
    /// Connections whose TLS handshake was seen complete.
    pub tls_connections: u64,
    /// How they were followed: bits of `tracer_common::tls` over all of them.
    pub tls_methods: u32,
    /// Labels on: per request label.
    pub endpoints: Endpoints,
    /// The processes that accepted its connections (at most [`PROCESSES_KEPT`]), as
    /// they were when first seen.
    pub processes: BTreeMap<u32, crate::procs::ProcessInfo>,
    /// The addresses its listening sockets are bound to (from sock_diag; empty until
    /// they were read).
    pub addresses: BTreeSet<SocketAddr>,
}

/// Processes kept per listener (a pre-forking server has one per worker).
pub const PROCESSES_KEPT: usize = 64;

impl ListenerStats {
    /// How the listener's TLS connections are followed, and what is approximate with
    /// that method; `None` when no TLS handshake was seen.
    pub fn tls_method(&self) -> Option<(&'static str, Option<&'static str>)> {
        if self.tls_connections == 0 {
            return None;
        }
        use tracer_common::tls::{HOOKED, RECORDS};
        Some(match (self.tls_methods & HOOKED != 0, self.tls_methods & RECORDS != 0) {
            (true, false) => ("OpenSSL uprobes", None),
            // Memory buffers (Node.js): hooked once the handshake was read from the records.
            (true, true) => ("OpenSSL uprobes, handshake from records", Some(HANDSHAKE_FROM_RECORDS)),
            _ => ("record layer only", Some(RECORD_LAYER_APPROXIMATE)),
        })
    }

    /// Think time not spent waiting on an upstream peer.
    pub fn think_local_ns(&self) -> u64 {
        self.think_total_ns.saturating_sub(self.think_waits.values().sum())
    }
}

/// What the record layer alone cannot tell exactly.
pub const RECORD_LAYER_APPROXIMATE: &str = "the handshake ends where the server has read the client's \
     Finished; in TLS 1.3 alerts, session tickets and key updates look like data, so a ticket \
     written after a request was read ends its think; bytes are the records'";

/// What is approximate when only the handshake is read from the records.
pub const HANDSHAKE_FROM_RECORDS: &str = "the handshake ends where the server has read the client's Finished";

/// One upstream peer (remote address and port) of the traced processes.
#[derive(Clone)]
pub struct PeerStats {
    pub connect: Histogram<u64>,
    /// TLS handshakes on connections to the peer.
    pub tls: Histogram<u64>,
    pub upstream: Histogram<u64>,
    /// Connects that succeeded.
    pub connections: u64,
    pub syn_retransmits: u64,
    /// Failed connects by outcome.
    pub failures: BTreeMap<ConnectOutcome, u64>,
    pub requests: u64,
    /// Requests the connection closed on before any response (the others are timed).
    pub unanswered: u64,
    /// Requests no server request could be found for (see `upstream`).
    pub unattributed: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Labels on: per request label.
    pub endpoints: Endpoints,
}

impl Default for PeerStats {
    fn default() -> Self {
        Self {
            connect: new_histogram(),
            tls: new_histogram(),
            upstream: new_histogram(),
            connections: 0,
            syn_retransmits: 0,
            failures: BTreeMap::new(),
            requests: 0,
            unanswered: 0,
            unattributed: 0,
            bytes_in: 0,
            bytes_out: 0,
            endpoints: Endpoints::default(),
        }
    }
}

impl Default for ListenerStats {
    fn default() -> Self {
        Self {
            phases: PhaseHistograms::default(),
            connections: 0,
            requests: 0,
            aborted: 0,
            closed_by_peer: 0,
            bytes_in: 0,
            bytes_out: 0,
            synack_retransmits: 0,
            listen_drops: 0,
            resets_sent: 0,
            resets_received: 0,
            think_total_ns: 0,
            think_waits: BTreeMap::new(),
            tls_connections: 0,
            tls_methods: 0,
            endpoints: Endpoints::default(),
            processes: BTreeMap::new(),
            addresses: BTreeSet::new(),
        }
    }
}

impl ListenerStats {
    fn record(&mut self, phase: Phase, ns: Option<u64>) {
        if let Some(ns) = ns {
            self.phases[&phase].saturating_record(ns);
        }
    }
}

/// Everything the reports show.
#[derive(Clone, Default)]
pub struct Stats {
    /// Keyed by local port and network namespace.
    pub listeners: BTreeMap<ListenerId, ListenerStats>,
    /// Upstream peers, keyed by remote address and port.
    pub peers: BTreeMap<SocketAddr, PeerStats>,
    pub events: u64,
    pub lost_events: u64,
    pub read_errors: u64,
    pub state_full: u64,
    /// Server connections accepted with no setup record (`counter::MISSED_SETUPS`).
    pub missed_setups: u64,
    /// Traced connections whose accept the accept hook did not see, established after
    /// it was in place (`counter::UNSEEN_ACCEPTS`): their accept wait runs to their
    /// first read or write.
    pub unseen_accepts: u64,
    /// Runs of the tracer's programs the kernel skipped, by program (`Probes::skipped_runs`).
    pub skipped_runs: BTreeMap<String, u64>,
    /// Phases this kernel cannot measure, with the reason: reported as unavailable,
    /// never as zero.
    pub unavailable: BTreeMap<&'static str, String>,
    /// Per-socket state entries in the kernel at the last report (connections being
    /// traced right now); it returns to the number of open connections after a burst.
    pub tracked_sockets: u64,
    /// Labels kept per listener and per peer (`--max-labels`); the rest are `other`.
    pub max_labels: MaxLabels,
}

/// `--max-labels`.
#[derive(Clone, Copy, Debug)]
pub struct MaxLabels(pub usize);

impl Default for MaxLabels {
    fn default() -> Self {
        Self(crate::endpoints::DEFAULT_MAX_LABELS)
    }
}

impl Stats {
    /// The listener `id`. One whose namespace is unknown (its connection's open event
    /// was lost) is the listener on its port that is already known, else the tracer's
    /// namespace's.
    pub fn listener(&mut self, id: ListenerId) -> &mut ListenerStats {
        let id = if id.netns != 0 {
            id
        } else {
            self.listeners.keys().find(|k| k.port == id.port).copied().unwrap_or(ListenerId::new(id.port, own_netns()))
        };
        self.listeners.entry(id).or_default()
    }

    /// The one listener on `port` (tests).
    #[cfg(test)]
    pub fn on_port(&self, port: u16) -> &ListenerStats {
        let mut on = self.listeners_on(port);
        let (_, l) = on.next().unwrap_or_else(|| panic!("no listener :{port}"));
        assert!(on.next().is_none(), "more than one listener :{port}");
        l
    }

    /// The listeners on `port`, in every namespace.
    pub fn listeners_on(&self, port: u16) -> impl Iterator<Item = (&ListenerId, &ListenerStats)> {
        self.listeners.range(ListenerId::new(port, 0)..=ListenerId::new(port, u32::MAX))
    }

    pub fn apply(&mut self, record: &Record) {
        match record {
            Record::Opened { listener, handshake_ns, accept_wait_ns, synack_retransmits, pid, .. } => {
                let l = self.listener(*listener);
                l.connections += 1;
                if *pid != 0 && l.processes.len() < PROCESSES_KEPT && !l.processes.contains_key(pid) {
                    l.processes.insert(*pid, crate::procs::info(*pid));
                }
                l.record(Phase::Handshake, *handshake_ns);
                l.record(Phase::AcceptWait, *accept_wait_ns);
                let _ = synack_retransmits; // counted from the retransmit events themselves
            }
            Record::Exchange {
                listener,
                remote: _,
                pid: _,
                recv_wait_ns,
                think_ns,
                send_ns,
                delivery_ns,
                bytes_in,
                bytes_out,
                outcome,
                think_waits,
                labels,
            } => {
                let max_labels = self.max_labels.0;
                // A callee's label as its peer's table knows it (folded ones are `other`).
                let waits: Vec<(Callee, u64)> =
                    think_waits.iter().map(|(c, ns)| (self.callee_as_known(c), *ns)).collect();
                let l = self.listener(*listener);
                if let Some(think) = think_ns {
                    l.think_total_ns += think;
                    for (callee, ns) in waits {
                        *l.think_waits.entry(callee).or_default() += ns;
                    }
                }
                if let Some(labels) = labels {
                    let time = [recv_wait_ns, think_ns, send_ns, delivery_ns].iter().filter_map(|p| **p).sum::<u64>();
                    let phases = [*recv_wait_ns, *think_ns, *send_ns, *delivery_ns];
                    for_each_endpoint(&mut l.endpoints, max_labels, labels, *bytes_in, *bytes_out, |e| {
                        e.aborted += (*outcome == Outcome::Aborted) as u64;
                        if *outcome != Outcome::Answered {
                            return;
                        }
                        e.time.record(time);
                        for (sketch, ns) in
                            [&mut e.recv_wait, &mut e.think, &mut e.send, &mut e.delivery].into_iter().zip(phases)
                        {
                            if let Some(ns) = ns {
                                sketch.record(ns);
                            }
                        }
                    });
                }
                l.requests += if outcome.is_request() { Labels::count(labels) } else { 0 };
                l.aborted += (*outcome == Outcome::Aborted) as u64;
                l.closed_by_peer += (*outcome == Outcome::ClosedByPeer) as u64;
                l.bytes_in += bytes_in;
                l.bytes_out += bytes_out;
                l.record(Phase::RecvWait, *recv_wait_ns);
                l.record(Phase::Think, *think_ns);
                l.record(Phase::Send, *send_ns);
                l.record(Phase::Delivery, *delivery_ns);
            }
            Record::Closed(c) => {
                let l = self.listener(c.listener);
                l.resets_sent += c.reset_sent as u64;
                l.resets_received += c.reset_received as u64;
            }
            Record::ResetAfterClose { listener } => self.listener(*listener).resets_sent += 1,
            Record::Connect { peer, connect_ns, syn_retransmits, outcome } => {
                let p = self.peers.entry(*peer).or_default();
                p.syn_retransmits += *syn_retransmits as u64;
                if *outcome == ConnectOutcome::Established {
                    p.connections += 1;
                    if let Some(ns) = connect_ns {
                        p.connect.saturating_record(*ns);
                    }
                } else {
                    *p.failures.entry(*outcome).or_default() += 1;
                }
            }
            Record::Upstream { peer, upstream_ns, bytes_out, bytes_in, answered, labels } => {
                let max_labels = self.max_labels.0;
                let p = self.peers.entry(*peer).or_default();
                if let Some(labels) = labels {
                    for_each_endpoint(&mut p.endpoints, max_labels, labels, *bytes_in, *bytes_out, |e| {
                        e.aborted += !answered as u64;
                        if let Some(ns) = upstream_ns {
                            e.upstream.record(*ns);
                        }
                    });
                }
                p.requests += Labels::count(labels);
                p.bytes_out += bytes_out;
                p.bytes_in += bytes_in;
                if !answered {
                    p.unanswered += 1;
                }
                if let Some(ns) = upstream_ns {
                    p.upstream.saturating_record(*ns);
                }
            }
            Record::Tls { listener, tls_ns, method, .. } => {
                let l = self.listener(*listener);
                l.tls_connections += 1;
                l.tls_methods |= method;
                l.record(Phase::Tls, *tls_ns);
            }
            Record::TlsFollowed { listener, method } => self.listener(*listener).tls_methods |= method,
            Record::UpstreamTls { peer, tls_ns } => {
                if let Some(ns) = tls_ns {
                    self.peers.entry(*peer).or_default().tls.saturating_record(*ns);
                }
            }
            Record::Unattributed { peer } => self.peers.entry(*peer).or_default().unattributed += 1,
            Record::UpstreamClosed { peer, bytes_in } => self.peers.entry(*peer).or_default().bytes_in += bytes_in,
            Record::SynAckRetransmit { listener } => self.listener(*listener).synack_retransmits += 1,
        }
    }

    /// `callee` with its label as its peer's endpoint table names it.
    fn callee_as_known(&self, callee: &Callee) -> Callee {
        let Some(label) = &callee.label else { return callee.clone() };
        match self.peers.get(&callee.peer).map(|p| p.endpoints.name_of(label)) {
            Some(OTHER) => Callee { peer: callee.peer, label: Some(OTHER.into()) },
            _ => callee.clone(),
        }
    }

    /// Requests in all listeners.
    pub fn total_requests(&self) -> u64 {
        self.listeners.values().map(|l| l.requests).sum()
    }

    pub fn total_connections(&self) -> u64 {
        self.listeners.values().map(|l| l.connections).sum()
    }
}

/// Counts an exchange's requests in the endpoints of their labels: each label its
/// requests (pipelined ones each), its share of the bytes, and its status classes and
/// errors; `then(endpoint)` is called once per distinct label, to record the exchange's
/// times once for each.
fn for_each_endpoint(
    table: &mut Endpoints,
    max_labels: usize,
    labels: &Labels,
    bytes_in: u64,
    bytes_out: u64,
    mut then: impl FnMut(&mut EndpointStats),
) {
    let n = labels.requests.len() as u64;
    if n == 0 {
        return;
    }
    for (i, label) in labels.requests.iter().enumerate() {
        let e = table.entry(label, max_labels);
        e.requests += 1;
        // Bytes shared evenly between pipelined requests, the remainder to the first.
        let share = |total: u64| total / n + if i == 0 { total % n } else { 0 };
        e.bytes_in += share(bytes_in);
        e.bytes_out += share(bytes_out);
        if let Some(status) = labels.statuses.get(i) {
            e.count_status(*status);
        }
        if i == 0 {
            e.errors += labels.errors as u64;
        }
        // Once per distinct label (pipelined requests are a handful).
        if !labels.requests[..i].contains(label) {
            then(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exchange(think_ms: u64) -> Record {
        let mut r = Record::answered(80, think_ms * 1_000_000);
        if let Record::Exchange { think_waits, .. } = &mut r {
            *think_waits = vec![(SocketAddr::from(([10, 0, 0, 5], 5432)).into(), think_ms * 1_000_000 / 2)];
        }
        r
    }

    #[test]
    fn exchanges_fill_histograms_and_counters() {
        let mut stats = Stats::default();
        for ms in 1..=100 {
            stats.apply(&exchange(ms));
        }
        let l = &stats.on_port(80);
        assert_eq!(l.requests, 100);
        assert_eq!((l.bytes_in, l.bytes_out), (1000, 2000));
        let think = &l.phases[&Phase::Think];
        assert_eq!(think.len(), 100);
        let p50 = think.value_at_quantile(0.5) as f64 / 1e6;
        assert!((p50 - 50.0).abs() < 0.1, "p50 {p50}");
        // A zero-length phase is still a sample.
        assert_eq!(l.phases[&Phase::Send].len(), 100);
        assert_eq!(l.phases[&Phase::Delivery].len(), 0);
        // Half of every think was spent waiting on the database.
        assert_eq!(l.think_total_ns, 5050 * 1_000_000);
        assert_eq!(l.think_local_ns(), 2525 * 1_000_000);
    }
}
