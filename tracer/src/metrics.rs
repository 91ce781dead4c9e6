//! Prometheus exposition (`--metrics-addr ADDR`): `GET /metrics` answers the statistics
//! so far in the OpenMetrics text format, which Prometheus scrapes. With
//! `--native-histograms`, a scraper that asks for the Prometheus protobuf format (as
//! Prometheus does with its native histograms on) gets that instead, each histogram with
//! native buckets ([`NATIVE_SCHEMA`]) beside the classic ones.
//!
//! A thread of its own answers the scrapes. The page is rendered when asked for: a
//! scrape asks, and the tracer's event loop, which looks every 50 ms, renders the
//! statistics of that moment and hands them over (the scrape waits at most
//! [`SCRAPE_WAIT`] for it, then gets the last rendering); a tracer nobody scrapes spends
//! nothing on rendering. Histograms are
//! cumulative since the tracer started, as Prometheus expects of them; their buckets
//! ([`BUCKETS_S`]) go from a microsecond to ten seconds, because accept and receive
//! waits live in microseconds where the usual web defaults start at 5 ms.

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Condvar, Mutex, MutexGuard,
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use hdrhistogram::Histogram;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, NativeHistogram, NativeHistogramBuckets, NoLabelSet},
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

/// The native histograms' schema: 2^(2^-3) growth, eight buckets per power of two, each
/// about 9% wide (bucket `i` holds (2^((i-1)/8), 2^(i/8)] seconds) — finer than the
/// classic buckets' 2.5x steps, coarse enough that a phase spread from a microsecond to
/// seconds fills some 200 buckets at most.
pub const NATIVE_SCHEMA: i32 = 3;

/// The native histograms' zero threshold, seconds: 2^-30 (0.93 ns), a bucket boundary of
/// the schema just under the tracer's nanosecond resolution, so the zero bucket holds
/// exactly the 0 ns samples and a 1 ns one has a bucket of its own.
pub const NATIVE_ZERO_THRESHOLD: f64 = 1.0 / (1u64 << 30) as f64;

/// How long a scrape waits for its rendering before it takes the last one.
pub const SCRAPE_WAIT: Duration = Duration::from_secs(2);

/// The OpenMetrics text format's content type.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The Prometheus protobuf format's content type (length-delimited `MetricFamily`s).
const PROTOBUF_CONTENT_TYPE: &str =
    "application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; encoding=delimited";

/// The page the scrapes get, shared with the serving thread.
#[derive(Clone, Default)]
pub struct Page {
    native_histograms: bool,
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    rendered: Mutex<Rendered>,
    /// Scrapes asked for so far.
    asked: AtomicU64,
    /// Signalled at each rendering.
    done: Condvar,
}

/// The last rendering: the text, and the protobuf with native histograms when they are on.
#[derive(Default)]
struct Rendered {
    text: String,
    protobuf: Option<Vec<u8>>,
    /// The scrapes asked for before it began: they are answered.
    answers: u64,
}

impl Page {
    /// A page in the text format, and with `native_histograms` in the protobuf format too.
    pub fn new(native_histograms: bool) -> Self {
        Self { native_histograms, ..Self::default() }
    }

    /// Whether a scrape waits for a rendering.
    pub fn wanted(&self) -> bool {
        self.shared.asked.load(Ordering::SeqCst) > self.lock().answers
    }

    fn lock(&self) -> MutexGuard<'_, Rendered> {
        self.shared.rendered.lock().expect("not poisoned")
    }

    /// A scrape: asks for a rendering and waits for it (at most [`SCRAPE_WAIT`]; then
    /// the last one).
    fn fresh(&self) -> MutexGuard<'_, Rendered> {
        let ticket = self.shared.asked.fetch_add(1, Ordering::SeqCst) + 1;
        let guard = self.lock();
        let (guard, _) =
            self.shared.done.wait_timeout_while(guard, SCRAPE_WAIT, |r| r.answers < ticket).expect("not poisoned");
        guard
    }

    /// Renders `stats` as the page.
    pub fn update(&self, stats: &Stats) {
        let asked = self.shared.asked.load(Ordering::SeqCst);
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Snapshot::of(stats, self.native_histograms)));
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &registry).is_err() {
            return;
        }
        let protobuf = if self.native_histograms {
            match prometheus_client::encoding::prometheus_protobuf::encode_to_vec(&registry) {
                Ok(bytes) => Some(bytes),
                Err(_) => return,
            }
        } else {
            None
        };
        *self.lock() = Rendered { text, protobuf, answers: asked };
        self.shared.done.notify_all();
    }

    #[cfg(test)]
    fn text(&self) -> String {
        self.lock().text.clone()
    }

    #[cfg(test)]
    fn protobuf(&self) -> Option<Vec<u8>> {
        self.lock().protobuf.clone()
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

/// One HTTP exchange: `GET /metrics` gets the page (in the protobuf format when the
/// request's `Accept` prefers it and the page has it), anything else 404.
fn answer(stream: TcpStream, page: &Page) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // The rest of the request's headers (read to the end: unread, they would reset the
    // connection on close).
    let mut accept = String::new();
    let mut line = String::new();
    while reader.read_line(&mut line)? > 2 {
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("accept") {
                accept.push_str(value.trim());
                accept.push(',');
            }
        }
        line.clear();
    }
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => {
            let rendered = page.fresh();
            match rendered.protobuf.as_ref().filter(|_| prefers_protobuf(&accept)) {
                Some(bytes) => ("200 OK", PROTOBUF_CONTENT_TYPE, bytes.clone()),
                None => ("200 OK", CONTENT_TYPE, rendered.text.clone().into_bytes()),
            }
        }
        _ => ("404 Not Found", "text/plain; charset=utf-8", b"only /metrics here\n".to_vec()),
    };
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nVary: Accept\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(&body)?;
    stream.flush()
}

/// Whether an `Accept` header prefers the Prometheus protobuf format (length-delimited
/// `io.prometheus.client.MetricFamily`) to text: offered with a q-value above 0 and at
/// least that of every text range (`*/*` counts as text). Prometheus with native
/// histograms on sends it first at q=1, the text formats lower; without, it sends none.
fn prefers_protobuf(accept: &str) -> bool {
    let (mut protobuf, mut text) = (0.0f64, 0.0f64);
    for range in accept.split(',') {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("").to_ascii_lowercase();
        let (mut q, mut proto, mut encoding) = (1.0, "", "");
        for param in parts {
            let Some((key, value)) = param.split_once('=') else { continue };
            let value = value.trim().trim_matches('"');
            match key.trim().to_ascii_lowercase().as_str() {
                "q" => q = value.parse().unwrap_or(0.0),
                "proto" => proto = value,
                "encoding" => encoding = value,
                _ => {}
            }
        }
        match media.as_str() {
            "application/vnd.google.protobuf"
                if proto == "io.prometheus.client.MetricFamily" && encoding == "delimited" =>
            {
                protobuf = protobuf.max(q)
            }
            "application/openmetrics-text" | "text/plain" | "text/*" | "*/*" => text = text.max(q),
            _ => {}
        }
    }
    protobuf > 0.0 && protobuf >= text
}

type Labels = Vec<(&'static str, String)>;

/// One histogram series: labels, sum (seconds), count, bucket counts (classic; native too
/// when they are on).
#[derive(Debug)]
struct Series {
    labels: Labels,
    sum: f64,
    count: u64,
    buckets: Vec<(f64, u64)>,
    native: Option<NativeBuckets>,
}

impl Series {
    fn of_histogram(labels: Labels, h: &Histogram<u64>, native: bool) -> Self {
        let at_most = |ns: u64| if h.is_empty() { 0 } else { h.count_between(0, ns) };
        // HDR keeps no exact sum: its mean (within its 0.1% precision) times the count.
        let sum = if h.is_empty() { 0.0 } else { h.mean() * h.len() as f64 / 1e9 };
        let native = native.then(|| NativeBuckets::of_histogram(h));
        Self { labels, sum, count: h.len(), buckets: buckets(h.len(), at_most), native }
    }

    fn of_sketch(labels: Labels, s: &Sketch, native: bool) -> Self {
        let sum = s.mean() * s.len() as f64 / 1e9;
        let native = native.then(|| NativeBuckets::of_sketch(s));
        Self { labels, sum, count: s.len(), buckets: buckets(s.len(), |ns| s.count_at_most(ns)), native }
    }
}

/// A histogram's native buckets ([`NATIVE_SCHEMA`], positive values only: durations).
#[derive(Debug)]
struct NativeBuckets {
    /// Samples of at most [`NATIVE_ZERO_THRESHOLD`].
    zero: u64,
    /// (bucket index, samples) of the non-empty buckets, lowest first.
    buckets: Vec<(i32, u64)>,
}

impl NativeBuckets {
    /// Re-bins the values an HDR histogram recorded, each at the middle of its HDR bucket
    /// (which is within 0.05% of the value recorded, against 9% native buckets).
    fn of_histogram(h: &Histogram<u64>) -> Self {
        Self::of_values(h.iter_recorded().map(|v| (h.median_equivalent(v.value_iterated_to()), v.count_at_value())))
    }

    /// Re-bins a sketch's samples, each at the top of its sketch bucket (within 1/128 of
    /// the value recorded). By way of `Sketch::to_histogram` instead, 400 sketches of
    /// 1,000 buckets took 40–60 ms a rendering rather than 12 ms (release build).
    fn of_sketch(s: &Sketch) -> Self {
        Self::of_values(s.values())
    }

    /// The buckets of `(nanoseconds, samples)` pairs. Both sources give them lowest first,
    /// so a value usually falls in the bucket of the one before: only a new bucket costs a
    /// logarithm and a search.
    fn of_values(values: impl IntoIterator<Item = (u64, u64)>) -> Self {
        let mut zero = 0;
        let mut buckets: Vec<(i32, u64)> = Vec::new();
        let (mut lower, mut upper) = (f64::INFINITY, f64::NEG_INFINITY);
        for (ns, n) in values.into_iter().filter(|(_, n)| *n > 0) {
            let seconds = ns as f64 / 1e9;
            if seconds <= NATIVE_ZERO_THRESHOLD {
                zero += n;
                continue;
            }
            if seconds > lower && seconds <= upper {
                buckets.last_mut().expect("the bucket of the bounds").1 += n;
                continue;
            }
            let index = native_index(seconds);
            match buckets.binary_search_by_key(&index, |(i, _)| *i) {
                Ok(at) => buckets[at].1 += n,
                Err(at) => buckets.insert(at, (index, n)),
            }
            // The bounds stand for the last bucket only, as the next value likely falls there.
            if buckets.last().map(|(i, _)| *i) == Some(index) {
                (lower, upper) = (native_upper_bound(index - 1), native_upper_bound(index));
            } else {
                (lower, upper) = (f64::INFINITY, f64::NEG_INFINITY);
            }
        }
        Self { zero, buckets }
    }
}

/// The upper bound of native bucket `index`, seconds.
fn native_upper_bound(index: i32) -> f64 {
    (index as f64 / (1 << NATIVE_SCHEMA) as f64).exp2()
}

/// The native bucket of `seconds` (above the zero threshold).
fn native_index(seconds: f64) -> i32 {
    let index = (seconds.log2() * (1 << NATIVE_SCHEMA) as f64).ceil() as i32;
    // The logarithm's rounding may put a value on a boundary on its wrong side.
    if native_upper_bound(index - 1) >= seconds {
        index - 1
    } else if native_upper_bound(index) < seconds {
        index + 1
    } else {
        index
    }
}

/// The protobuf format's sparse form of native buckets: runs of buckets as spans, where
/// gaps of up to two empty buckets are cheaper filled (a zero delta) than a new span (as
/// the Go client does); an empty histogram gets one empty span, which marks it native.
fn spans_and_deltas(buckets: &[(i32, u64)]) -> (Vec<(i32, u32)>, Vec<i64>) {
    const MAX_FILLED_GAP: i32 = 2;
    let (mut spans, mut deltas): (Vec<(i32, u32)>, Vec<i64>) = (Vec::new(), Vec::new());
    let (mut previous, mut last): (Option<i32>, i64) = (None, 0);
    for &(index, n) in buckets {
        match previous {
            Some(p) if index - p - 1 <= MAX_FILLED_GAP => {
                let span = spans.last_mut().expect("a span is open");
                for _ in p + 1..index {
                    deltas.push(-last);
                    last = 0;
                    span.1 += 1;
                }
                span.1 += 1;
            }
            Some(p) => spans.push((index - p - 1, 1)),
            None => spans.push((index, 1)),
        }
        deltas.push(n as i64 - last);
        last = n as i64;
        previous = Some(index);
    }
    if spans.is_empty() {
        spans.push((0, 0));
    }
    (spans, deltas)
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
    /// The statistics' snapshot, with native buckets when `native` is on.
    fn of(stats: &Stats, native: bool) -> Self {
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
                phases.push(Series::of_histogram(labels, &l.phases[&phase], native));
            }
            for (label, e) in l.endpoints.ranked() {
                for phase in ["recv_wait", "think", "send", "delivery"] {
                    let Some(sketch) = e.phase(phase) else { continue };
                    let mut labels = listener(id);
                    labels.push(("endpoint", label.to_string()));
                    labels.push(("phase", phase.to_owned()));
                    endpoint_phases.push(Series::of_sketch(labels, sketch, native));
                }
            }
        }
        let mut upstream = Vec::new();
        let mut upstream_endpoints = Vec::new();
        for (peer, p) in &stats.peers {
            for (phase, h) in [("connect", &p.connect), ("tls", &p.tls), ("upstream", &p.upstream)] {
                upstream.push(Series::of_histogram(
                    vec![("peer", peer.to_string()), ("phase", phase.into())],
                    h,
                    native,
                ));
            }
            for (label, e) in p.endpoints.ranked() {
                upstream_endpoints.push(Series::of_sketch(
                    vec![("peer", peer.to_string()), ("endpoint", label.to_string())],
                    &e.upstream,
                    native,
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
                (
                    "tracer_missed_setups",
                    "Server connections accepted with no handshake or accept_wait recorded",
                    global(stats.missed_setups),
                ),
                (
                    "tracer_unseen_accepts",
                    "Connections whose accept was seen only at their first read or write",
                    global(stats.unseen_accepts),
                ),
                (
                    "tracer_skipped_program_runs",
                    "Runs of the tracer's programs the kernel skipped (already running on the CPU)",
                    stats.skipped_runs.iter().map(|(name, n)| (vec![("program", name.clone())], *n)).collect(),
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
                let mut family = metric.encode_family(&labels)?;
                match &s.native {
                    Some(native) => {
                        let (spans, deltas) = spans_and_deltas(&native.buckets);
                        let native = NativeHistogram {
                            schema: NATIVE_SCHEMA,
                            zero_threshold: NATIVE_ZERO_THRESHOLD,
                            zero_count: native.zero,
                            negative: NativeHistogramBuckets { spans: &[], deltas: &[] },
                            positive: NativeHistogramBuckets { spans: &spans, deltas: &deltas },
                            created: None,
                        };
                        family.encode_histogram_with_native::<NoLabelSet>(s.sum, s.count, &s.buckets, None, native)?
                    }
                    None => family.encode_histogram::<NoLabelSet>(s.sum, s.count, &s.buckets, None)?,
                }
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
    use prometheus_client::encoding::prometheus_protobuf::prometheus_data_model::{self as proto, MetricFamily};
    use prost::Message as _;

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
        assert!(text.contains("tracer_missed_setups_total 0"), "{text}");
        assert!(text.contains("tracer_unseen_accepts_total 0"), "{text}");
        // Only the programs that had runs skipped have a series.
        assert!(!text.contains("tracer_skipped_program_runs_total{"), "{text}");
        stats.skipped_runs.insert("inet_sock_set_state".into(), 3);
        page.update(&stats);
        let text = page.text();
        assert!(text.contains("tracer_skipped_program_runs_total{program=\"inet_sock_set_state\"} 3"), "{text}");
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

    /// The families of a protobuf answer, decoded.
    fn decode(mut bytes: &[u8]) -> Vec<MetricFamily> {
        let mut families = Vec::new();
        while !bytes.is_empty() {
            families.push(MetricFamily::decode_length_delimited(&mut bytes).expect("a delimited MetricFamily"));
        }
        families
    }

    /// The (bucket index, samples) pairs a protobuf native histogram's spans and deltas say.
    fn native_buckets(h: &proto::Histogram) -> Vec<(i32, u64)> {
        let (mut out, mut index, mut count, mut deltas) = (Vec::new(), 0, 0i64, h.positive_delta.iter());
        for span in &h.positive_span {
            index += span.offset;
            for _ in 0..span.length {
                count += deltas.next().expect("a delta per bucket");
                if count > 0 {
                    out.push((index, count as u64));
                }
                index += 1;
            }
        }
        out
    }

    fn labels(m: &proto::Metric) -> Vec<(&str, &str)> {
        m.label.iter().map(|l| (l.name.as_str(), l.value.as_str())).collect()
    }

    #[test]
    fn native_bucket_bounds_are_powers_of_two_to_the_eighth() {
        // A bound belongs to the bucket below it: (2^((i-1)/8), 2^(i/8)].
        assert_eq!(native_index(1.0), 0);
        assert_eq!(native_index(1.000_001), 1);
        assert_eq!(native_index(2.0), 8);
        assert_eq!(native_index(0.5), -8);
        assert_eq!(native_index(2f64.powf(0.125)), 1);
        assert_eq!(native_index(1e-9), -239);
        assert_eq!(native_index(10.0), 27);
        assert_eq!(native_index(NATIVE_ZERO_THRESHOLD), -240);
    }

    #[test]
    fn native_buckets_of_known_samples() {
        let mut h = crate::stats::new_histogram();
        for (ns, n) in [(0, 2), (1, 1), (1_000, 3), (1_030, 1), (20_000_000, 5), (25_000_000, 1)] {
            h.record_n(ns, n).unwrap();
        }
        let native = NativeBuckets::of_histogram(&h);
        // 0 ns in the zero bucket; 1 ns in (2^-30, 2^-29.875]; 1 µs and 1.03 µs in
        // (0.954 µs, 1.040 µs]; 20 ms in (18.58 ms, 20.26 ms]; 25 ms in (24.10 ms, 26.28 ms].
        assert_eq!(native.zero, 2);
        assert_eq!(native.buckets, vec![(-239, 1), (-159, 4), (-45, 5), (-42, 1)]);
        assert_eq!(native.buckets.iter().map(|(_, n)| n).sum::<u64>() + native.zero, h.len());
        // The two empty buckets between -45 and -42 are filled rather than a new span.
        let (spans, deltas) = spans_and_deltas(&native.buckets);
        assert_eq!(spans, vec![(-239, 1), (79, 1), (113, 4)]);
        assert_eq!(deltas, vec![1, 3, 1, -5, 0, 1]);
        let series = Series::of_histogram(Labels::new(), &h, true);
        assert_eq!(series.count, 13);
        let sum_s = (3 * 1_000 + 1_030 + 1 + 5 * 20_000_000 + 25_000_000) as f64 / 1e9;
        assert!((series.sum - sum_s).abs() < sum_s * 1e-3, "{} against {sum_s}", series.sum);

        // Values out of order land in their buckets all the same.
        let shuffled = NativeBuckets::of_values([(20_000_000, 1), (1_000, 2), (0, 1), (20_000_001, 1), (1_000, 1)]);
        assert_eq!((shuffled.zero, shuffled.buckets), (1, vec![(-159, 3), (-45, 2)]));

        // An empty histogram: one empty span, which marks it native to a parser.
        let empty = NativeBuckets::of_histogram(&crate::stats::new_histogram());
        assert_eq!((empty.zero, spans_and_deltas(&empty.buckets)), (0, (vec![(0, 0)], vec![])));
    }

    #[test]
    fn a_sketchs_zero_samples_stay_in_the_zero_bucket() {
        let mut s = Sketch::default();
        for ns in [0, 0, 1, 1_000, 20_000_000] {
            s.record(ns);
        }
        let native = NativeBuckets::of_sketch(&s);
        assert_eq!(native.zero, 2);
        assert_eq!(native.buckets, vec![(-239, 1), (-159, 1), (-45, 1)]);
    }

    #[test]
    fn the_protobuf_answer_decodes_to_what_was_put_in() {
        let mut stats = Stats::default();
        for think_ms in [1u64, 3, 20, 20, 40] {
            stats.apply(&Record::answered(8080, think_ms * 1_000_000));
        }
        let l = stats.listener(ListenerId::new(8080, 0));
        l.processes.insert(1, crate::procs::ProcessInfo { command: r#"a"b\c"#.into(), cgroup: None });
        let page = Page::new(true);
        page.update(&stats);
        let families = decode(&page.protobuf().expect("native histograms on: a protobuf rendering"));
        let family = |name: &str| families.iter().find(|f| f.name == name).unwrap_or_else(|| panic!("no {name}"));

        let phases = family("tracer_request_phase_seconds");
        assert_eq!(phases.r#type, proto::MetricType::Histogram as i32);
        let netns = crate::listeners::own_netns().to_string();
        let phase = |name: &str| {
            phases.metric.iter().find(|m| labels(m).contains(&("phase", name))).unwrap().histogram.clone().unwrap()
        };
        // The same label set as the text format, the value unescaped (the text escapes it).
        let think_metric = phases.metric.iter().find(|m| labels(m).contains(&("phase", "think"))).unwrap();
        assert_eq!(
            labels(think_metric),
            vec![("listener", ":8080"), ("netns", netns.as_str()), ("process", r#"a"b\c"#), ("phase", "think")]
        );
        assert!(page.text().contains(&format!(
            r#"tracer_request_phase_seconds_count{{listener=":8080",netns="{netns}",process="a\"b\\c",phase="think"}} 5"#
        )));

        let think = phase("think");
        assert_eq!(think.sample_count, 5);
        assert!((think.sample_sum - 0.084).abs() < 0.084e-3, "{}", think.sample_sum);
        assert_eq!((think.schema, think.zero_threshold, think.zero_count), (3, NATIVE_ZERO_THRESHOLD, 0));
        // 1 ms in (0.95, 1.04] ms, 3 ms in (2.76, 3.02], 20 ms in (18.58, 20.26], 40 ms in
        // (37.16, 40.53].
        assert_eq!(native_buckets(&think), vec![(-79, 1), (-67, 1), (-45, 2), (-37, 1)]);
        // The classic buckets are there too, cumulative, `+Inf` last.
        let classic = |le: f64| think.bucket.iter().find(|b| b.upper_bound == le).map(|b| b.cumulative_count);
        assert_eq!((classic(0.0025), classic(0.025), classic(f64::INFINITY)), (Some(1), Some(4), Some(5)));
        assert_eq!(think.bucket.len(), BUCKETS_S.len() + 1);

        // recv_wait was 1 µs each; send 0 ns each: the zero bucket.
        assert_eq!(native_buckets(&phase("recv_wait")), vec![(-159, 5)]);
        let send = phase("send");
        assert_eq!((send.zero_count, native_buckets(&send)), (5, vec![]));
        // No sample: still native (an empty span), as Prometheus recognizes it.
        let handshake = phase("handshake");
        assert_eq!((handshake.sample_count, handshake.positive_span.len()), (0, 1));

        let requests = family("tracer_requests_total");
        assert_eq!(requests.r#type, proto::MetricType::Counter as i32);
        assert_eq!(requests.metric[0].counter.as_ref().map(|c| c.value), Some(5.0));
        assert_eq!(family("tracer_lost_events_total").metric[0].label, vec![]);
    }

    #[test]
    fn without_native_histograms_there_is_no_protobuf_rendering() {
        let page = Page::default();
        page.update(&Stats::default());
        assert!(page.protobuf().is_none());
        assert!(page.text().ends_with("# EOF\n"));
    }

    #[test]
    fn protobuf_only_when_the_scraper_prefers_it() {
        // Prometheus 2.42 with --enable-feature=native-histograms, and without.
        let with = "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited,application/openmetrics-text;version=1.0.0;q=0.8,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        let without = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert!(prefers_protobuf(with));
        assert!(!prefers_protobuf(without));
        assert!(!prefers_protobuf(""));
        assert!(!prefers_protobuf("*/*"));
        // Another message or encoding is not ours; a lower q loses to text; q=0 refuses.
        assert!(!prefers_protobuf(
            "application/vnd.google.protobuf;proto=io.prometheus.client.Other;encoding=delimited"
        ));
        assert!(!prefers_protobuf(
            "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=text"
        ));
        assert!(!prefers_protobuf("application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited;q=0.5,text/plain"));
        assert!(!prefers_protobuf(
            "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited;q=0"
        ));
        assert!(prefers_protobuf("Application/Vnd.Google.Protobuf; proto=io.prometheus.client.MetricFamily; encoding=delimited; q=0.9, text/plain; q=0.2"));
    }

    /// A `GET /metrics` with this `Accept` header: the response's content type and body.
    fn scrape(addr: SocketAddr, accept: &str) -> (String, Vec<u8>) {
        use std::io::Read as _;
        let mut stream = TcpStream::connect(addr).unwrap();
        write!(stream, "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: {accept}\r\n\r\n").unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).unwrap();
        let end = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8(response[..end].to_vec()).unwrap();
        let content_type = head.lines().find_map(|l| l.strip_prefix("Content-Type: ")).unwrap().to_owned();
        (content_type, response[end + 4..].to_vec())
    }

    #[test]
    fn the_endpoint_answers_each_scraper_in_the_format_it_asks_for() {
        let mut stats = Stats::default();
        stats.apply(&Record::answered(8080, 20_000_000));
        let page = Page::new(true);
        let addr = serve("127.0.0.1:0".parse().unwrap(), page.clone()).unwrap();
        // The event loop's part: render when a scrape waits, the statistics of then.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let renderer = {
            let (page, stop) = (page.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut renderings = 0;
                while !stop.load(Ordering::SeqCst) {
                    if page.wanted() {
                        stats.apply(&Record::answered(8080, 20_000_000));
                        page.update(&stats);
                        renderings += 1;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                renderings
            })
        };
        let started = std::time::Instant::now();
        let (content_type, body) =
            scrape(addr, "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited");
        assert_eq!(content_type, PROTOBUF_CONTENT_TYPE);
        assert!(decode(&body).iter().any(|f| f.name == "tracer_request_phase_seconds"));
        let (content_type, body) = scrape(addr, "application/openmetrics-text;version=1.0.0,*/*;q=0.1");
        assert_eq!(content_type, CONTENT_TYPE);
        // Each scrape got a rendering of its own, made after it asked: the second saw
        // three requests (the first, and one more before each rendering).
        let text = String::from_utf8(body).unwrap();
        assert!(text.ends_with("# EOF\n"));
        assert!(text.contains("tracer_requests_total{listener=\":8080\""), "{text}");
        assert!(text.lines().any(|l| l.starts_with("tracer_requests_total") && l.ends_with(" 3")), "{text}");
        assert!(started.elapsed() < SCRAPE_WAIT, "a scrape waited for the timeout");
        stop.store(true, Ordering::SeqCst);
        assert_eq!(renderer.join().unwrap(), 2, "one rendering per scrape, none unasked");
    }
}
