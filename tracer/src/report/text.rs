//! The text report: per listener, one row per phase with its percentiles and a
//! log-scale histogram bar, fitting 80 columns.

use std::fmt::Write as _;

use hdrhistogram::Histogram;

use super::{duration, three_digits, Format, Slow, Snapshot};
use crate::{
    endpoints::{EndpointStats, Endpoints, Sketch, OTHER, STATUS_CLASSES},
    listeners::ListenerId,
    stats::{ListenerStats, PeerStats},
    timeline::{ClosedConnection, Phase},
};

pub struct Text;

/// Bucket edges of the bar chart: 1µs, 10µs, ..., 10s (one character per decade, with
/// everything below 1µs in the first and above 10s in the last).
const BAR_DECADES: [u64; 8] =
    [1_000, 10_000, 100_000, 1_000_000, 10_000_000, 100_000_000, 1_000_000_000, 10_000_000_000];
const BLOCKS: [char; 9] = [' ', '▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// One character per decade from <1µs to ≥10s; the height is the share of samples there.
pub fn bar(hist: &Histogram<u64>) -> String {
    let total = hist.len();
    if total == 0 {
        return String::new();
    }
    let mut counts = [0u64; BAR_DECADES.len() + 1];
    for v in hist.iter_recorded() {
        let value = v.value_iterated_to();
        let bucket = BAR_DECADES.iter().position(|&edge| value < edge).unwrap_or(BAR_DECADES.len());
        counts[bucket] += v.count_at_value();
    }
    counts
        .iter()
        .map(|&c| {
            if c == 0 {
                '·'
            } else {
                // Any sample shows at least the lowest block.
                let level = ((c as f64 / total as f64) * 8.0).ceil() as usize;
                BLOCKS[level.clamp(1, 8)]
            }
        })
        .collect()
}

type Unavailable = std::collections::BTreeMap<&'static str, String>;

fn phase_row(out: &mut String, name: &str, hist: &Histogram<u64>, unavailable: &Unavailable) {
    if let Some(why) = unavailable.get(name) {
        // Not measurable on this kernel: say so rather than print zeros.
        let line: String = format!("  {name:<11} unavailable: {why}").chars().take(80).collect();
        let _ = writeln!(out, "{line}");
        return;
    }
    if hist.is_empty() {
        let _ = writeln!(out, "  {:<11} {:>7}  {:>7} {:>7} {:>7} {:>7} {:>7}", name, 0, "-", "-", "-", "-", "-");
        return;
    }
    let q = |q: f64| duration(hist.value_at_quantile(q));
    let _ = writeln!(
        out,
        "  {:<11} {:>7}  {:>7} {:>7} {:>7} {:>7} {:>7} {}",
        name,
        hist.len(),
        q(0.5),
        q(0.9),
        q(0.99),
        q(0.999),
        duration(hist.max()),
        bar(hist),
    );
}

pub fn listener_section(out: &mut String, id: ListenerId, l: &ListenerStats, unavailable: &Unavailable) {
    let _ = writeln!(
        out,
        "listener {id}  connections {}  requests {}  aborted {}  in {}B  out {}B",
        l.connections, l.requests, l.aborted, l.bytes_in, l.bytes_out
    );
    // Where it listens: its sockets' addresses, and its network namespace when that is
    // not the tracer's (a container's).
    let mut on: Vec<String> = l.addresses.iter().map(|a| a.to_string()).collect();
    if id.elsewhere() {
        let netns = format!("in network namespace {}", id.netns);
        match on.last_mut() {
            Some(last) => *last = format!("{last} {netns}"),
            None => on.push(netns),
        }
    }
    if !on.is_empty() {
        let _ = writeln!(out, "  {}", wrap("on ", &on));
    }
    let _ = writeln!(
        out,
        "  synack_retransmits {}  listen_drops {}  resets sent {} received {}",
        l.synack_retransmits, l.listen_drops, l.resets_sent, l.resets_received
    );
    if !l.processes.is_empty() {
        let names: Vec<String> = l.processes.iter().map(|(pid, p)| format!("{} ({pid})", p.command)).collect();
        let _ = writeln!(out, "  {}", wrap("processes: ", &names));
    }
    if l.closed_by_peer != 0 {
        let _ = writeln!(out, "  closed_by_peer {} (last messages before the peer's orderly close)", l.closed_by_peer);
    }
    if let Some((method, approximate)) = l.tls_method() {
        let _ = writeln!(out, "  tls: {method} ({} handshakes)", l.tls_connections);
        if let Some(what) = approximate {
            let _ = writeln!(out, "  {}", wrap("approximate: ", &[what.to_owned()]));
        }
    }
    header_row(out);
    for phase in Phase::ALL {
        // A plain-TCP listener has no TLS phase to show.
        if phase == Phase::Tls && l.tls_connections == 0 && !unavailable.contains_key(phase.name()) {
            continue;
        }
        phase_row(out, phase.name(), &l.phases[&phase], unavailable);
    }
    if let Some(line) = diagnosis(l) {
        let _ = writeln!(out, "  {line}");
    }
    if let Some(line) = think_attribution(l) {
        let _ = writeln!(out, "  {line}");
    }
    endpoint_table(out, &l.endpoints, &["time", "think"], "out/req", |e| e.bytes_out);
}

/// Endpoints shown in the text report per listener or peer (JSON has them all).
const TOP_ENDPOINTS: usize = 10;
/// Columns of an endpoint's label in the text report.
const LABEL_COLUMNS: usize = 26;

/// `label` cut to `width` characters (the text report's column; JSON has it whole).
fn fit(label: &str, width: usize) -> String {
    if label.chars().count() <= width {
        label.to_owned()
    } else {
        label.chars().take(width - 1).chain(['…']).collect()
    }
}

/// Bytes, three significant digits: `320B`, `12.3kB`, `1.20MB`.
pub fn bytes(n: f64) -> String {
    let (value, unit) = match n {
        n if n < 1e3 => return format!("{n:.0}B"),
        n if n < 1e6 => (n / 1e3, "kB"),
        n if n < 1e9 => (n / 1e6, "MB"),
        n => (n / 1e9, "GB"),
    };
    three_digits(value, unit)
}

/// The endpoints of a listener or peer, most total time first: requests, p50 and p99
/// of each of `phases`, and `per_request` bytes; then their status classes and errors.
fn endpoint_table(
    out: &mut String,
    table: &Endpoints,
    phases: &[&str],
    per_request: &str,
    bytes_of: impl Fn(&EndpointStats) -> u64,
) {
    if table.is_empty() {
        return;
    }
    let ranked = table.ranked();
    let mut head = format!("  {:<LABEL_COLUMNS$} {:>6}", "endpoint", "count");
    for p in phases {
        let p = if *p == "upstream" { "up" } else { p };
        head += &format!(" {:>7} {:>7}", format!("{p} p50"), "p99");
    }
    let _ = writeln!(out, "{head} {per_request:>7}");
    let row = |sketch: Option<&Sketch>, q: f64| match sketch {
        Some(s) if !s.is_empty() => duration(s.quantile(q)),
        _ => "-".to_owned(),
    };
    for (label, e) in ranked.iter().take(TOP_ENDPOINTS) {
        let name = match *label {
            OTHER if table.folded() >= crate::endpoints::FOLDED_REMEMBERED => {
                format!("{OTHER} ({}+ labels)", table.folded())
            }
            OTHER => format!("{OTHER} ({} labels)", table.folded()),
            l => l.to_owned(),
        };
        let mut line = format!("  {:<LABEL_COLUMNS$} {:>6}", fit(&name, LABEL_COLUMNS), e.requests);
        for p in phases {
            line += &format!(" {:>7} {:>7}", row(e.phase(p), 0.5), row(e.phase(p), 0.99));
        }
        let per = if e.requests == 0 { 0.0 } else { bytes_of(e) as f64 / e.requests as f64 };
        let _ = writeln!(out, "{line} {:>7}", bytes(per));
    }
    if ranked.len() > TOP_ENDPOINTS {
        let _ = writeln!(out, "  … {} more endpoints (all in --output json)", ranked.len() - TOP_ENDPOINTS);
    }
    let outcomes: Vec<String> = ranked
        .iter()
        .filter_map(|(label, e)| {
            let mut parts: Vec<String> = STATUS_CLASSES
                .iter()
                .zip(e.statuses)
                .filter(|(class, n)| *n > 0 && **class != "2xx")
                .map(|(class, n)| format!("{class} {n}"))
                .collect();
            if e.errors > 0 {
                parts.push(format!("errors {}", e.errors));
            }
            if e.aborted > 0 {
                parts.push(format!("aborted {}", e.aborted));
            }
            (!parts.is_empty()).then(|| format!("{} {}", fit(label, LABEL_COLUMNS), parts.join(" ")))
        })
        .collect();
    if !outcomes.is_empty() {
        let _ = writeln!(out, "  {}", wrap("not 2xx: ", &outcomes));
    }
}

fn header_row(out: &mut String) {
    let _ = writeln!(
        out,
        "  {:<11} {:>7}  {:>7} {:>7} {:>7} {:>7} {:>7} {}",
        "phase", "count", "p50", "p90", "p99", "p99.9", "max", "1µ 10µ…10s"
    );
}

/// How think splits between waits on upstream peers (largest first, at most three) and
/// local work; nothing when no request waited on a peer.
pub fn think_attribution(l: &ListenerStats) -> Option<String> {
    if l.think_total_ns == 0 || l.think_waits.is_empty() {
        return None;
    }
    let pct = |ns: u64| 100.0 * ns as f64 / l.think_total_ns as f64;
    let mut waits: Vec<_> = l.think_waits.iter().collect();
    waits.sort_by(|a, b| b.1.cmp(a.1));
    let mut parts: Vec<String> = waits.iter().take(3).map(|(peer, ns)| format!("{:.0}% {peer}", pct(**ns))).collect();
    if waits.len() > 3 {
        let rest: u64 = waits[3..].iter().map(|(_, ns)| **ns).sum();
        parts.push(format!("{:.0}% other peers", pct(rest)));
    }
    parts.push(format!("{:.0}% local", pct(l.think_local_ns())));
    Some(wrap("think waits on: ", &parts))
}

/// `head` and the comma-separated `parts`, broken into lines that fit 80 columns once
/// indented by two; continuation lines are indented further.
fn wrap(head: &str, parts: &[String]) -> String {
    const WIDTH: usize = 78;
    let mut out = head.to_owned();
    let mut line_len = head.chars().count();
    for (i, part) in parts.iter().enumerate() {
        let piece = if i + 1 < parts.len() { format!("{part},") } else { part.clone() };
        let len = piece.chars().count();
        if i > 0 {
            if line_len + 1 + len > WIDTH {
                out.push_str("\n    ");
                line_len = 2;
            } else {
                out.push(' ');
                line_len += 1;
            }
        }
        out.push_str(&piece);
        line_len += len;
    }
    out
}

pub fn peer_section(out: &mut String, peer: &std::net::SocketAddr, p: &PeerStats, unavailable: &Unavailable) {
    let _ = writeln!(
        out,
        "upstream {peer}  connections {}  requests {}  in {}B  out {}B",
        p.connections, p.requests, p.bytes_in, p.bytes_out
    );
    let _ = writeln!(
        out,
        "  syn_retransmits {}  unanswered {}  unattributed {}",
        p.syn_retransmits, p.unanswered, p.unattributed
    );
    if !p.failures.is_empty() {
        let failures: Vec<String> = p.failures.iter().map(|(o, n)| format!("{} {n}", o.name())).collect();
        let _ = writeln!(out, "  {}", wrap("failed connects: ", &failures));
    }
    header_row(out);
    phase_row(out, "connect", &p.connect, unavailable);
    if !p.tls.is_empty() {
        phase_row(out, "tls", &p.tls, unavailable);
    }
    phase_row(out, "upstream", &p.upstream, unavailable);
    endpoint_table(out, &p.endpoints, &["upstream"], "in/req", |e| e.bytes_in);
}

/// Where a typical connection's time goes: each phase's mean as a share of the sum of
/// the means, largest first (phases under 1% left out).
pub fn diagnosis(l: &ListenerStats) -> Option<String> {
    let means: Vec<(Phase, f64)> =
        Phase::ALL.into_iter().filter(|p| !l.phases[p].is_empty()).map(|p| (p, l.phases[&p].mean())).collect();
    let total: f64 = means.iter().map(|(_, m)| m).sum();
    if total <= 0.0 {
        return None;
    }
    let mut shares: Vec<(Phase, f64)> = means.into_iter().map(|(p, m)| (p, 100.0 * m / total)).collect();
    shares.sort_by(|a, b| b.1.total_cmp(&a.1));
    let parts: Vec<String> = shares
        .iter()
        .filter(|(_, pct)| *pct >= 1.0)
        .take(3)
        .map(|(p, pct)| format!("{} {:.0}%", p.name(), pct))
        .collect();
    Some(format!("time goes to: {}", parts.join(", ")))
}

impl Format for Text {
    fn connection(&self, c: &ClosedConnection) -> String {
        format!(
            "conn pid={} {} <- {} duration={} in={}B out={}B requests={}{}",
            c.tgid,
            c.local,
            c.remote,
            c.duration_ns.map(duration).unwrap_or_else(|| "?".into()),
            c.bytes_in,
            c.bytes_out,
            c.requests,
            if c.aborted { " aborted" } else { "" },
        ) + match (c.reset_sent, c.reset_received) {
            (true, true) => " reset-both",
            (true, false) => " reset-sent",
            (false, true) => " reset-received",
            (false, false) => "",
        }
    }

    fn slow(&self, s: &Slow) -> String {
        let phases: Vec<String> = s
            .phases
            .iter()
            .map(|(name, ns)| {
                if *name == s.largest {
                    format!("[{name} {}]", duration(*ns))
                } else {
                    format!("{name} {}", duration(*ns))
                }
            })
            .collect();
        let mut line = format!(
            "slow {} {}{} <- {} pid {}: {} = {}",
            s.what,
            s.listener,
            s.label.as_ref().map_or_else(String::new, |l| format!(" {l}")),
            s.remote.map_or_else(|| "?".to_owned(), |r| r.to_string()),
            s.pid,
            duration(s.total_ns),
            phases.join(" + ")
        );
        if !s.think_waits.is_empty() {
            let waits: Vec<String> =
                s.think_waits.iter().map(|(peer, ns)| format!("{peer} {}", duration(*ns))).collect();
            line += &format!("; think waited on {}", waits.join(", "));
        }
        line
    }

    fn report(&self, s: &Snapshot<'_>) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "== tracer {} report: {:.1}s, {} events, {} lost, {} setups missed ==",
            s.kind.name(),
            s.elapsed_s,
            s.stats.events,
            s.stats.lost_events,
            s.stats.missed_setups
        );
        if s.stats.lost_events > 0 {
            let _ = writeln!(
                out,
                "warning: {} events were lost (ring buffer full): counts and histograms are incomplete; raise --ring-buffer-size",
                s.stats.lost_events
            );
        }
        if s.stats.state_full > 0 {
            let _ = writeln!(
                out,
                "warning: {} connections were not tracked (per-socket state full); raise --max-sockets",
                s.stats.state_full
            );
        }
        if s.stats.missed_setups > 0 {
            let _ = writeln!(
                out,
                "warning: {} accepted connections have no handshake or accept_wait (their setup was not seen)",
                s.stats.missed_setups
            );
        }
        if s.stats.unseen_accepts > 0 {
            let _ = writeln!(
                out,
                "note: the accept of {} connections was seen only at their first read or write (their accept_wait runs to it)",
                s.stats.unseen_accepts
            );
        }
        if !s.stats.skipped_runs.is_empty() {
            let runs: Vec<String> = s.stats.skipped_runs.iter().map(|(name, n)| format!("{name} {n}")).collect();
            let _ = writeln!(
                out,
                "note: the kernel skipped runs of programs already running on the same CPU (hit again from an interrupt): {}; \
                 a connection's setup has a second program, other phases of those moments may be missing",
                runs.join(", ")
            );
        }
        if s.stats.read_errors > 0 {
            let _ = writeln!(
                out,
                "warning: {} kernel reads of socket fields failed; some addresses or phases may be missing",
                s.stats.read_errors
            );
        }
        if s.stats.listeners.is_empty() {
            let _ = writeln!(out, "no connections seen");
        }
        for (id, l) in &s.stats.listeners {
            listener_section(&mut out, *id, l, &s.stats.unavailable);
        }
        for (peer, p) in &s.stats.peers {
            peer_section(&mut out, peer, p, &s.stats.unavailable);
        }
        if !s.checks.is_empty() {
            let failed = s.checks.iter().filter(|v| !v.passed).count();
            let _ = writeln!(out, "checks: {} passed, {failed} failed", s.checks.len() - failed);
            for verdict in s.checks {
                let _ = writeln!(out, "  {verdict}");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::new_histogram;

    #[test]
    fn bar_puts_samples_in_their_decade() {
        let mut h = new_histogram();
        for _ in 0..10 {
            h.record(50_000_000).unwrap(); // 50 ms: the 10ms..100ms decade
        }
        assert_eq!(bar(&h), "·····█···");
        h.record(500).unwrap();
        assert_eq!(bar(&h).chars().next(), Some('▁'));
    }

    #[test]
    fn diagnosis_names_the_dominant_phase_first() {
        let mut l = ListenerStats::default();
        l.phases[&Phase::Think].record(90_000_000).unwrap();
        l.phases[&Phase::RecvWait].record(10_000_000).unwrap();
        l.phases[&Phase::Send].record(1_000).unwrap();
        let text = diagnosis(&l).unwrap();
        assert!(text.starts_with("time goes to: think 90%, recv_wait 10%"), "{text}");
        assert!(!text.contains("send"), "{text}");
        assert_eq!(diagnosis(&ListenerStats::default()), None);
    }

    #[test]
    fn think_attribution_names_peers_and_local() {
        let mut l = ListenerStats::default();
        assert_eq!(think_attribution(&l), None);
        l.think_total_ns = 1_000;
        l.think_waits.insert("10.0.0.5:5432".parse::<std::net::SocketAddr>().unwrap().into(), 900);
        l.think_waits.insert("10.0.0.6:5432".parse::<std::net::SocketAddr>().unwrap().into(), 50);
        assert_eq!(think_attribution(&l).unwrap(), "think waits on: 90% 10.0.0.5:5432, 5% 10.0.0.6:5432, 5% local");
    }

    #[test]
    fn rows_fit_80_columns() {
        let mut l = ListenerStats::default();
        for p in Phase::ALL {
            for v in [1_000u64, 999_000_000, 3_000_000_000_000] {
                l.phases[&p].record(v).unwrap();
            }
        }
        l.think_total_ns = 1_000_000;
        for (i, port) in [5432, 5433, 5434, 5435].into_iter().enumerate() {
            let peer = std::net::SocketAddr::from(([0xfe80, 0, 0, 0, 0, 0, 0, 1 + i as u16], port));
            l.think_waits.insert(peer.into(), 100_000);
        }
        let mut p = PeerStats::default();
        p.failures.insert(crate::upstream::ConnectOutcome::NetworkUnreachable, 12);
        p.failures.insert(crate::upstream::ConnectOutcome::Abandoned, 3);
        p.connect.record(3_000_000_000_000).unwrap();
        let mut out = String::new();
        let unavailable = Unavailable::from([(
            "delivery",
            "the acknowledgements hook (tcp_probe) is unavailable: a long reason that goes on and on".to_owned(),
        )]);
        listener_section(&mut out, ListenerId::new(65535, 0), &l, &unavailable);
        peer_section(&mut out, &"[fe80::1]:65535".parse().unwrap(), &p, &unavailable);
        assert!(out.contains("  delivery    unavailable: the acknowledgements hook"), "{out}");
        for line in out.lines() {
            assert!(line.chars().count() <= 80, "{} columns: {line}", line.chars().count());
        }
    }
}
