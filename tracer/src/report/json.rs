//! JSON output: one JSON object per line, each with a `type` field ("connection" or
//! "report"). Field names are stable; the README documents them.

use std::{collections::BTreeMap, net::SocketAddr};

use serde::Serialize;

use super::{Format, Slow, Snapshot};
use crate::{
    endpoints::{EndpointStats, Endpoints, Sketch, OTHER, STATUS_CLASSES},
    listeners::ListenerId,
    stats::{ListenerStats, PeerStats},
    timeline::{ClosedConnection, Phase},
};

pub struct Json;

#[derive(Serialize)]
struct ConnectionJson {
    r#type: &'static str,
    pid: u32,
    local: String,
    remote: String,
    duration_ns: Option<u64>,
    bytes_in: u64,
    bytes_out: u64,
    requests: u32,
    aborted: bool,
    reset_sent: bool,
    reset_received: bool,
}

#[derive(Serialize)]
pub struct PhaseJson {
    pub count: u64,
    pub mean_ns: u64,
    pub p50_ns: u64,
    pub p90_ns: u64,
    pub p99_ns: u64,
    pub p999_ns: u64,
    pub max_ns: u64,
}

#[derive(Serialize)]
struct ListenerJson {
    port: u16,
    /// The inode number of its network namespace (`/proc/PID/ns/net`), and whether that
    /// is another than the tracer's (a container's).
    netns: u32,
    other_netns: bool,
    /// The addresses its listening sockets are bound to.
    addresses: Vec<String>,
    connections: u64,
    requests: u64,
    aborted: u64,
    closed_by_peer: u64,
    bytes_in: u64,
    bytes_out: u64,
    synack_retransmits: u64,
    listen_drops: u64,
    resets_sent: u64,
    resets_received: u64,
    phases: serde_json::Map<String, serde_json::Value>,
    think_attribution: ThinkJson,
    /// Present when TLS handshakes were seen on the listener.
    #[serde(skip_serializing_if = "Option::is_none")]
    tls: Option<TlsJson>,
    /// Labels on: per request label, most total time first, `other` last.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    endpoints: Vec<EndpointJson>,
    /// The processes that accepted its connections.
    processes: Vec<ProcessJson>,
}

#[derive(Serialize)]
struct ProcessJson {
    pid: u32,
    command: String,
    cgroup: Option<String>,
}

#[derive(Serialize)]
struct EndpointJson {
    label: String,
    requests: u64,
    /// Listeners: requests aborted; peers: requests unanswered.
    aborted: u64,
    bytes_in: u64,
    bytes_out: u64,
    /// HTTP responses per status class.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    statuses: BTreeMap<&'static str, u64>,
    /// Error responses (PostgreSQL ErrorResponse, Redis error replies).
    errors: u64,
    /// `other` only: the distinct labels folded into it.
    #[serde(skip_serializing_if = "Option::is_none")]
    folded_labels: Option<usize>,
    phases: BTreeMap<&'static str, PhaseJson>,
}

#[derive(Serialize)]
struct TlsJson {
    /// How its TLS connections are followed.
    method: &'static str,
    /// Handshakes seen complete.
    connections: u64,
    /// What is approximate with that method (absent when nothing is).
    #[serde(skip_serializing_if = "Option::is_none")]
    approximate: Option<&'static str>,
}

#[derive(Serialize)]
struct ThinkJson {
    think_ns: u64,
    local_ns: u64,
    /// Largest first.
    peers: Vec<PeerWaitJson>,
}

#[derive(Serialize)]
struct PeerWaitJson {
    peer: String,
    /// Labels on: the upstream requests' label.
    #[serde(skip_serializing_if = "Option::is_none")]
    label: Option<String>,
    wait_ns: u64,
}

impl PeerWaitJson {
    fn new(callee: &crate::upstream::Callee, wait_ns: u64) -> Self {
        Self { peer: callee.peer.to_string(), label: callee.label.as_deref().map(str::to_owned), wait_ns }
    }
}

#[derive(Serialize)]
struct UpstreamJson {
    peer: String,
    connections: u64,
    syn_retransmits: u64,
    connect_failures: BTreeMap<String, u64>,
    requests: u64,
    unanswered: u64,
    unattributed: u64,
    bytes_in: u64,
    bytes_out: u64,
    phases: BTreeMap<&'static str, serde_json::Value>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    endpoints: Vec<EndpointJson>,
}

#[derive(Serialize)]
struct ReportJson {
    r#type: &'static str,
    kind: &'static str,
    elapsed_s: f64,
    events: u64,
    lost_events: u64,
    untracked_connections: u64,
    missed_setups: u64,
    /// Connections whose accept was seen only at their first read or write.
    unseen_accepts: u64,
    /// Runs of the tracer's programs the kernel skipped, by program.
    skipped_runs: BTreeMap<String, u64>,
    /// Events were lost or connections went untracked: counts and histograms miss some.
    incomplete: bool,
    tracked_sockets: u64,
    /// Phases this kernel cannot measure, with the reason.
    unavailable_phases: BTreeMap<&'static str, String>,
    listeners: Vec<ListenerJson>,
    upstreams: Vec<UpstreamJson>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    checks: Vec<CheckJson>,
}

/// A phase of an endpoint, from its compact histogram.
fn sketch_json(s: &Sketch) -> PhaseJson {
    PhaseJson {
        count: s.len(),
        mean_ns: s.mean().round() as u64,
        p50_ns: s.quantile(0.5),
        p90_ns: s.quantile(0.9),
        p99_ns: s.quantile(0.99),
        p999_ns: s.quantile(0.999),
        max_ns: s.max(),
    }
}

fn endpoints_json(table: &Endpoints, phases: &[&'static str]) -> Vec<EndpointJson> {
    table
        .ranked()
        .into_iter()
        .map(|(label, e): (&str, &EndpointStats)| EndpointJson {
            label: label.to_owned(),
            requests: e.requests,
            aborted: e.aborted,
            bytes_in: e.bytes_in,
            bytes_out: e.bytes_out,
            statuses: STATUS_CLASSES
                .iter()
                .zip(e.statuses)
                .filter(|(_, n)| *n > 0)
                .map(|(class, n)| (*class, n))
                .collect(),
            errors: e.errors,
            folded_labels: (label == OTHER && table.folded() > 0).then(|| table.folded()),
            phases: phases.iter().filter_map(|p| Some((*p, sketch_json(e.phase(p)?)))).collect(),
        })
        .collect()
}

#[derive(Serialize)]
struct CheckJson {
    check: String,
    passed: bool,
    /// Nanoseconds for phase statistics, the count otherwise; null when not measured.
    value: Option<f64>,
    unit: &'static str,
    message: String,
}

#[derive(Serialize)]
struct SlowJson {
    r#type: &'static str,
    what: &'static str,
    /// The listener's port, and its network namespace's inode number.
    listener: u16,
    netns: u32,
    pid: u32,
    remote: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    label: Option<String>,
    total_ns: u64,
    largest: &'static str,
    phases: BTreeMap<&'static str, u64>,
    think_waits: Vec<PeerWaitJson>,
}

pub fn phase_json(hist: &hdrhistogram::Histogram<u64>) -> PhaseJson {
    let q = |q: f64| if hist.is_empty() { 0 } else { hist.value_at_quantile(q) };
    PhaseJson {
        count: hist.len(),
        mean_ns: if hist.is_empty() { 0 } else { hist.mean().round() as u64 },
        p50_ns: q(0.5),
        p90_ns: q(0.9),
        p99_ns: q(0.99),
        p999_ns: q(0.999),
        max_ns: if hist.is_empty() { 0 } else { hist.max() },
    }
}

/// A phase's statistics, or `{"unavailable": reason}` when this kernel cannot measure it.
fn phase_value(
    name: &str,
    hist: &hdrhistogram::Histogram<u64>,
    unavailable: &BTreeMap<&'static str, String>,
) -> serde_json::Value {
    match unavailable.get(name) {
        Some(why) => serde_json::json!({ "unavailable": why }),
        None => serde_json::to_value(phase_json(hist)).expect("serializable"),
    }
}

fn listener_json(id: ListenerId, l: &ListenerStats, unavailable: &BTreeMap<&'static str, String>) -> ListenerJson {
    let phases = Phase::ALL
        .into_iter()
        .map(|p| (p.name().to_owned(), phase_value(p.name(), &l.phases[&p], unavailable)))
        .collect();
    ListenerJson {
        port: id.port,
        netns: id.netns,
        other_netns: id.elsewhere(),
        addresses: l.addresses.iter().map(|a| a.to_string()).collect(),
        connections: l.connections,
        requests: l.requests,
        aborted: l.aborted,
        closed_by_peer: l.closed_by_peer,
        bytes_in: l.bytes_in,
        bytes_out: l.bytes_out,
        synack_retransmits: l.synack_retransmits,
        listen_drops: l.listen_drops,
        resets_sent: l.resets_sent,
        resets_received: l.resets_received,
        phases,
        think_attribution: ThinkJson {
            think_ns: l.think_total_ns,
            local_ns: l.think_local_ns(),
            peers: {
                let mut peers: Vec<_> =
                    l.think_waits.iter().map(|(callee, ns)| PeerWaitJson::new(callee, *ns)).collect();
                peers.sort_by(|a, b| b.wait_ns.cmp(&a.wait_ns));
                peers
            },
        },
        tls: l.tls_method().map(|(method, approximate)| TlsJson {
            method,
            connections: l.tls_connections,
            approximate,
        }),
        endpoints: endpoints_json(&l.endpoints, &["time", "recv_wait", "think", "send", "delivery"]),
        processes: l
            .processes
            .iter()
            .map(|(pid, p)| ProcessJson { pid: *pid, command: p.command.clone(), cgroup: p.cgroup.clone() })
            .collect(),
    }
}

fn upstream_json(peer: &SocketAddr, p: &PeerStats, unavailable: &BTreeMap<&'static str, String>) -> UpstreamJson {
    UpstreamJson {
        peer: peer.to_string(),
        connections: p.connections,
        syn_retransmits: p.syn_retransmits,
        connect_failures: p.failures.iter().map(|(o, n)| (o.name(), *n)).collect(),
        requests: p.requests,
        unanswered: p.unanswered,
        unattributed: p.unattributed,
        bytes_in: p.bytes_in,
        bytes_out: p.bytes_out,
        phases: BTreeMap::from([
            ("connect", phase_value("connect", &p.connect, unavailable)),
            ("tls", phase_value("tls", &p.tls, unavailable)),
            ("upstream", phase_value("upstream", &p.upstream, unavailable)),
        ]),
        endpoints: endpoints_json(&p.endpoints, &["upstream"]),
    }
}

impl Format for Json {
    fn connection(&self, c: &ClosedConnection) -> String {
        serde_json::to_string(&ConnectionJson {
            r#type: "connection",
            pid: c.tgid,
            local: c.local.to_string(),
            remote: c.remote.to_string(),
            duration_ns: c.duration_ns,
            bytes_in: c.bytes_in,
            bytes_out: c.bytes_out,
            requests: c.requests,
            aborted: c.aborted,
            reset_sent: c.reset_sent,
            reset_received: c.reset_received,
        })
        .expect("serializable")
            + "\n"
    }

    fn slow(&self, s: &Slow) -> String {
        serde_json::to_string(&SlowJson {
            r#type: "slow",
            what: s.what,
            listener: s.listener.port,
            netns: s.listener.netns,
            pid: s.pid,
            remote: s.remote.map(|r| r.to_string()),
            label: s.label.clone(),
            total_ns: s.total_ns,
            largest: s.largest,
            phases: s.phases.iter().copied().collect(),
            think_waits: s.think_waits.iter().map(|(callee, ns)| PeerWaitJson::new(callee, *ns)).collect(),
        })
        .expect("serializable")
            + "\n"
    }

    fn report(&self, s: &Snapshot<'_>) -> String {
        serde_json::to_string(&ReportJson {
            r#type: "report",
            kind: s.kind.name(),
            elapsed_s: s.elapsed_s,
            events: s.stats.events,
            lost_events: s.stats.lost_events,
            untracked_connections: s.stats.state_full,
            missed_setups: s.stats.missed_setups,
            unseen_accepts: s.stats.unseen_accepts,
            skipped_runs: s.stats.skipped_runs.clone(),
            incomplete: s.stats.lost_events > 0 || s.stats.state_full > 0 || s.stats.missed_setups > 0,
            tracked_sockets: s.stats.tracked_sockets,
            unavailable_phases: s.stats.unavailable.clone(),
            listeners: s.stats.listeners.iter().map(|(id, l)| listener_json(*id, l, &s.stats.unavailable)).collect(),
            upstreams: s.stats.peers.iter().map(|(peer, p)| upstream_json(peer, p, &s.stats.unavailable)).collect(),
            checks: s
                .checks
                .iter()
                .map(|v| CheckJson {
                    check: v.check.clone(),
                    passed: v.passed,
                    value: v.value,
                    unit: if v.is_duration { "ns" } else { "count" },
                    message: v.message.clone(),
                })
                .collect(),
        })
        .expect("serializable")
            + "\n"
    }
}
