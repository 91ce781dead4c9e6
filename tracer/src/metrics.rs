//! Prometheus exposition (`--metrics-addr ADDR`): `GET /metrics` answers the statistics
//! so far in the OpenMetrics text format, which Prometheus scrapes.
//!
//! The tracer's event loop renders the page from its statistics now and then
//! ([`RENDER_EVERY`]) and at the end; a thread of its own answers the scrapes from the
//! last rendering, so a scrape never waits on (or slows) the event loop. Histograms are
//! cumulative since the tracer started, as Prometheus expects of them; their buckets
//! ([`BUCKETS_S`]) go from a microsecond to ten seconds, because accept and receive
//! waits live in microseconds where the usual web defaults start at 5 ms.

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result};
use hdrhistogram::Histogram;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, NoLabelSet},
    metrics::MetricType,
    registry::Registry,
};

use crate::{endpoints::Sketch, listeners::ListenerId, stats::Stats, timeline::Phase};

/// Upper bounds of the histogram buckets, seconds (`+Inf` is implied).
pub const BUCKETS_S: [f64; 22] = [
    0.000_001,
    0.000_002_5,
    0.000_005,
    0.000_01,
    0.000_025,
    0.000_05,
    0.000_1,
    0.000_25,
    0.000_5,
    0.001,
    0.002_5,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
];

/// How often the event loop renders the page.
pub const RENDER_EVERY: Duration = Duration::from_millis(500);

/// The OpenMetrics text format's content type.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The page the scrapes get, shared with the serving thread.
#[derive(Clone, Default)]
pub struct Page(Arc<Mutex<String>>);

impl Page {
    /// Renders `stats` as the page.
    pub fn update(&self, stats: &Stats) {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Snapshot::of(stats)));
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &registry).is_ok() {
            *self.0.lock().expect("not poisoned") = text;
        }
    }

    fn text(&self) -> String {
        self.0.lock().expect("not poisoned").clone()
    }
}

/// Listens on `addr` and answers scrapes from `page` in a thread of its own.
pub fn serve(addr: SocketAddr, page: Page) -> Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .with_context(|| format!("--metrics-addr {addr}: cannot listen there (in use, or not a local address?)"))?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new().name("metrics".into()).spawn(move || {
        for stream in listener.incoming().flatten() {
            let _ = answer(stream, &page);
        }
    })?;
    Ok(bound)
}

/// One HTTP exchange: `GET /metrics` gets the page, anything else 404.
fn answer(stream: TcpStream, page: &Page) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // The rest of the request's headers, unread, would reset the connection on close.
    let mut line = String::new();
    while reader.read_line(&mut line)? > 2 {
        line.clear();
    }
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => ("200 OK", CONTENT_TYPE, page.text()),
        _ => ("404 Not Found", "text/plain; charset=utf-8", "only /metrics here\n".to_owned()),
    };
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

type Labels = Vec<(&'static str, String)>;

/// One histogram series: labels, sum (seconds), count, cumulative bucket counts.
#[derive(Debug)]
struct Series {
    labels: Labels,
    sum: f64,
    count: u64,
    buckets: Vec<(f64, u64)>,
}

impl Series {
    fn of_histogram(labels: Labels, h: &Histogram<u64>) -> Self {
        let at_most = |ns: u64| if h.is_empty() { 0 } else { h.count_between(0, ns) };
        // HDR keeps no exact sum: its mean (within its 0.1% precision) times the count.
        let sum = if h.is_empty() { 0.0 } else { h.mean() * h.len() as f64 / 1e9 };
        Self { labels, sum, count: h.len(), buckets: buckets(h.len(), at_most) }
    }

    fn of_sketch(labels: Labels, s: &Sketch) -> Self {
        let sum = s.mean() * s.len() as f64 / 1e9;
        Self { labels, sum, count: s.len(), buckets: buckets(s.len(), |ns| s.count_at_most(ns)) }
    }
}

/// The samples of each bucket of [`BUCKETS_S`] and the rest (`+Inf`), as the encoder
/// wants them (it makes them cumulative), from the count of samples at most each bound.
fn buckets(count: u64, at_most: impl Fn(u64) -> u64) -> Vec<(f64, u64)> {
    let mut below = 0;
    let mut out: Vec<(f64, u64)> = BUCKETS_S
        .iter()
        .map(|&le| {
            let cumulative = at_most((le * 1e9).round() as u64).max(below);
            let n = cumulative - below;
            below = cumulative;
            (le, n)
        })
        .collect();
    out.push((f64::INFINITY, count.saturating_sub(below)));
    out
}

/// Everything one scrape shows, taken from the statistics at rendering.
#[derive(Debug, Default)]
struct Snapshot {
    /// Histograms by metric name, each with its help.
    histograms: Vec<(&'static str, &'static str, Vec<Series>)>,
    /// Counters by metric name (without `_total`, which the encoder adds).
    counters: Vec<(&'static str, &'static str, Vec<(Labels, u64)>)>,
}

impl Snapshot {
    fn of(stats: &Stats) -> Self {
        // A listener's labels: the addresses its sockets are bound to (`:PORT` until
        // they are known), its network namespace, and the command names and cgroup of
        // the processes that accepted its connections (a pre-forking server's workers
        // share theirs; the cgroup only when all share it).
        let listener = |id: &ListenerId| {
            let mut labels = Vec::new();
            if let Some(l) = stats.listeners.get(id) {
                let bound = l.addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(",");
                labels.push(("listener", if bound.is_empty() { format!(":{}", id.port) } else { bound }));
                labels.push(("netns", id.netns.to_string()));
                let commands: BTreeSet<&str> = l.processes.values().map(|p| p.command.as_str()).collect();
                let cgroups: BTreeSet<Option<&str>> = l.processes.values().map(|p| p.cgroup.as_deref()).collect();
                if !commands.is_empty() {
                    labels.push(("process", commands.into_iter().collect::<Vec<_>>().join(",")));
                }
                if let [Some(cgroup)] = cgroups.into_iter().collect::<Vec<_>>().as_slice() {
                    labels.push(("cgroup", cgroup.to_string()));
                }
            }
            labels
        };
        let mut phases = Vec::new();
        let mut endpoint_phases = Vec::new();
        for (id, l) in &stats.listeners {
            for phase in Phase::ALL {
                if stats.unavailable.contains_key(phase.name()) {
                    continue;
                }
                let mut labels = listener(id);
                labels.push(("phase", phase.name().to_owned()));
                phases.push(Series::of_histogram(labels, &l.phases[&phase]));
            }
            for (label, e) in l.endpoints.ranked() {
                for phase in ["recv_wait", "think", "send", "delivery"] {
                    let Some(sketch) = e.phase(phase) else { continue };
                    let mut labels = listener(id);
                    labels.push(("endpoint", label.to_string()));
                    labels.push(("phase", phase.to_owned()));
                    endpoint_phases.push(Series::of_sketch(labels, sketch));
                }
            }
        }
        let mut upstream = Vec::new();
        let mut upstream_endpoints = Vec::new();
        for (peer, p) in &stats.peers {
            for (phase, h) in [("connect", &p.connect), ("tls", &p.tls), ("upstream", &p.upstream)] {
                upstream.push(Series::of_histogram(vec![("peer", peer.to_string()), ("phase", phase.into())], h));
            }
            for (label, e) in p.endpoints.ranked() {
                upstream_endpoints.push(Series::of_sketch(
                    vec![("peer", peer.to_string()), ("endpoint", label.to_string())],
                    &e.upstream,
                ));
            }
        }
        let per_listener = |f: fn(&crate::stats::ListenerStats) -> u64| -> Vec<(Labels, u64)> {
            stats.listeners.iter().map(|(id, l)| (listener(id), f(l))).collect()
        };
        let per_peer = |f: fn(&crate::stats::PeerStats) -> u64| -> Vec<(Labels, u64)> {
            stats.peers.iter().map(|(peer, p)| (vec![("peer", peer.to_string())], f(p))).collect()
        };
        let global = |v: u64| vec![(Labels::new(), v)];
        Self {
            histograms: vec![
                ("tracer_request_phase_seconds", "Server phases of connections and requests, per listener", phases),
                (
                    "tracer_endpoint_phase_seconds",
                    "Request phases per listener and request label (--labels)",
                    endpoint_phases,
                ),
                ("tracer_upstream_phase_seconds", "Phases of the traced processes' upstream calls, per peer", upstream),
                (
                    "tracer_upstream_endpoint_seconds",
                    "Upstream waits per peer and request label (--labels)",
                    upstream_endpoints,
                ),
            ],
            counters: vec![
                ("tracer_connections", "Connections accepted", per_listener(|l| l.connections)),
                ("tracer_requests", "Requests read (timed, or aborted)", per_listener(|l| l.requests)),
                ("tracer_aborted", "Requests the connection closed on before a response", per_listener(|l| l.aborted)),
                ("tracer_received_bytes", "Bytes of requests read", per_listener(|l| l.bytes_in)),
                ("tracer_sent_bytes", "Bytes of responses written", per_listener(|l| l.bytes_out)),
                ("tracer_synack_retransmits", "SYN-ACKs sent again", per_listener(|l| l.synack_retransmits)),
                ("tracer_listen_drops", "Connection attempts dropped on full queues", per_listener(|l| l.listen_drops)),
                ("tracer_resets_sent", "Connections the server's kernel reset", per_listener(|l| l.resets_sent)),
                ("tracer_resets_received", "Connections the peer reset", per_listener(|l| l.resets_received)),
                ("tracer_upstream_requests", "Requests to upstream peers", per_peer(|p| p.requests)),
                (
                    "tracer_upstream_unanswered",
                    "Upstream requests closed on with no response",
                    per_peer(|p| p.unanswered),
                ),
                (
                    "tracer_connect_failures",
                    "Failed connects to upstream peers",
                    per_peer(|p| p.failures.values().sum()),
                ),
                ("tracer_lost_events", "Events the ring buffer could not take", global(stats.lost_events)),
                (
                    "tracer_untracked_connections",
                    "Connections not tracked (per-socket state full)",
                    global(stats.state_full),
                ),
            ],
        }
    }
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (name, help, series) in &self.histograms {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
            for s in series {
                let labels: Vec<(&str, &str)> = s.labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
                metric.encode_family(&labels)?.encode_histogram::<NoLabelSet>(s.sum, s.count, &s.buckets, None)?;
            }
        }
        for (name, help, values) in &self.counters {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (labels, value) in values {
                if labels.is_empty() {
                    metric.encode_counter::<NoLabelSet, u64, f64>(value, None)?;
                    continue;
                }
                let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
                metric.encode_family(&labels)?.encode_counter::<NoLabelSet, u64, f64>(value, None)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::timeline::Record;

    #[test]
    fn the_page_holds_cumulative_buckets_and_totals() {
        let mut stats = Stats::default();
        for think_ms in [1u64, 3, 20, 20, 40] {
            stats.apply(&Record::answered(8080, think_ms * 1_000_000));
        }
        let page = Page::default();
        page.update(&stats);
        let netns = crate::listeners::own_netns();
        assert!(page.text().contains(&format!("tracer_requests_total{{listener=\":8080\",netns=\"{netns}\"}} 5")));
        // Once its sockets' addresses are known, they name it.
        let l = stats.listener(ListenerId::new(8080, 0));
        l.addresses.extend(["0.0.0.0:8080".parse::<std::net::SocketAddr>().unwrap(), "[::]:8080".parse().unwrap()]);
        page.update(&stats);
        let text = page.text();
        let listener = format!("listener=\"0.0.0.0:8080,[::]:8080\",netns=\"{netns}\"");
        assert!(text.contains("# TYPE tracer_request_phase_seconds histogram"), "{text}");
        let bucket = |le: &str| {
            let key = format!("tracer_request_phase_seconds_bucket{{le=\"{le}\",{listener},phase=\"think\"}} ");
            text.lines().find_map(|l| l.strip_prefix(key.as_str())).map(|v| v.parse::<u64>().unwrap())
        };
        assert_eq!(bucket("0.0025"), Some(1));
        assert_eq!(bucket("0.025"), Some(4));
        assert_eq!(bucket("+Inf"), Some(5));
        assert!(text.contains(&format!("tracer_requests_total{{{listener}}} 5")), "{text}");
        assert!(text.contains("tracer_lost_events_total 0"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn label_values_are_escaped_once_in_the_text() {
        let mut stats = Stats::default();
        stats.apply(&Record::answered(8080, 1_000_000));
        let l = stats.listener(ListenerId::new(8080, 0));
        l.processes.insert(1, crate::procs::ProcessInfo { command: "a\"b\\c\nd".into(), cgroup: None });
        let page = Page::default();
        page.update(&stats);
        assert!(page.text().contains(r#"process="a\"b\\c\nd""#), "{}", page.text());
    }
}
