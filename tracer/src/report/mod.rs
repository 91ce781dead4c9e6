//! Reports: the same snapshot of the statistics rendered as text or JSON.

pub mod json;
pub mod text;

use std::net::SocketAddr;

use crate::{
    checks::Verdict,
    listeners::ListenerId,
    stats::Stats,
    timeline::{ClosedConnection, Outcome, Record},
    upstream::Callee,
};

/// Why a report is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportKind {
    Interval,
    Final,
}

impl ReportKind {
    pub fn name(self) -> &'static str {
        match self {
            ReportKind::Interval => "interval",
            ReportKind::Final => "final",
        }
    }
}

pub struct Snapshot<'a> {
    pub kind: ReportKind,
    pub stats: &'a Stats,
    /// Seconds covered by the report.
    pub elapsed_s: f64,
    /// Verdicts of the `--check`s (final report only).
    pub checks: &'a [Verdict],
}

/// One request or connection setup slower than `--slow`: every phase it went through.
#[derive(Debug, Clone, PartialEq)]
pub struct Slow {
    /// "request" or "connection".
    pub what: &'static str,
    pub listener: ListenerId,
    pub pid: u32,
    pub remote: Option<SocketAddr>,
    /// Labels on: the request's label (the first, when pipelined).
    pub label: Option<String>,
    pub total_ns: u64,
    /// The phases that happened, in order.
    pub phases: Vec<(&'static str, u64)>,
    pub largest: &'static str,
    /// The part of think spent waiting on upstream peers.
    pub think_waits: Vec<(Callee, u64)>,
}

impl Slow {
    /// The slow request or connection setup in `record`, if it took longer than
    /// `threshold_ns`. Only answered requests are timed, so only they can be slow.
    pub fn from_record(record: &Record, threshold_ns: u64) -> Option<Slow> {
        let mut label = None;
        let (what, listener, pid, remote, phases, think_waits) = match record {
            Record::Opened { listener, remote, pid, handshake_ns, accept_wait_ns, .. } => (
                "connection",
                *listener,
                *pid,
                Some(*remote),
                vec![("handshake", *handshake_ns), ("accept_wait", *accept_wait_ns)],
                Vec::new(),
            ),
            Record::Tls { listener, remote, pid, tls_ns, .. } => {
                ("tls handshake", *listener, *pid, Some(*remote), vec![("tls", *tls_ns)], Vec::new())
            }
            Record::Exchange { outcome, .. } if *outcome != Outcome::Answered => return None,
            Record::Exchange {
                listener,
                remote,
                pid,
                recv_wait_ns,
                think_ns,
                send_ns,
                delivery_ns,
                think_waits,
                labels,
                ..
            } => (
                "request",
                *listener,
                *pid,
                *remote,
                vec![
                    ("recv_wait", *recv_wait_ns),
                    ("think", *think_ns),
                    ("send", *send_ns),
                    ("delivery", *delivery_ns),
                ],
                {
                    label = labels.as_ref().and_then(|l| l.requests.first().cloned());
                    think_waits.clone()
                },
            ),
            _ => return None,
        };
        let phases: Vec<(&'static str, u64)> = phases.into_iter().filter_map(|(n, v)| Some((n, v?))).collect();
        let total_ns: u64 = phases.iter().map(|(_, v)| v).sum();
        if total_ns <= threshold_ns {
            return None;
        }
        let largest = phases.iter().max_by_key(|(_, v)| *v).map(|(n, _)| *n)?;
        Some(Slow { what, listener, pid, remote, label, total_ns, phases, largest, think_waits })
    }
}

/// One output format.
pub trait Format {
    fn connection(&self, conn: &ClosedConnection) -> String;
    fn slow(&self, slow: &Slow) -> String;
    fn report(&self, snapshot: &Snapshot<'_>) -> String;
}

/// Human-readable duration with three significant digits: `850ns`, `12.3µs`, `1.50ms`, `2.00s`.
pub fn duration(ns: u64) -> String {
    let (value, unit) = match ns {
        0..1_000 => return format!("{ns}ns"),
        1_000..1_000_000 => (ns as f64 / 1e3, "µs"),
        1_000_000..1_000_000_000 => (ns as f64 / 1e6, "ms"),
        _ => (ns as f64 / 1e9, "s"),
    };
    three_digits(value, unit)
}

/// `value` with three significant digits (it is at least 1), and its unit.
pub fn three_digits(value: f64, unit: &str) -> String {
    if value >= 100.0 {
        format!("{value:.0}{unit}")
    } else if value >= 10.0 {
        format!("{value:.1}{unit}")
    } else {
        format!("{value:.2}{unit}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn exchange(think_ms: u64, aborted: bool) -> Record {
        Record::Exchange {
            listener: ListenerId::new(8080, 0),
            remote: Some("10.1.2.3:40000".parse().unwrap()),
            pid: 42,
            recv_wait_ns: Some(MS),
            think_ns: Some(think_ms * MS),
            send_ns: Some(2 * MS),
            delivery_ns: None,
            bytes_in: 1,
            bytes_out: 1,
            outcome: if aborted { Outcome::Aborted } else { Outcome::Answered },
            think_waits: vec![],
            labels: None,
        }
    }

    #[test]
    fn slow_requests_name_their_largest_phase() {
        assert_eq!(Slow::from_record(&exchange(10, false), 50 * MS), None);
        let slow = Slow::from_record(&exchange(100, false), 50 * MS).unwrap();
        assert_eq!(slow.total_ns, 103 * MS);
        assert_eq!(slow.largest, "think");
        assert_eq!(slow.phases, vec![("recv_wait", MS), ("think", 100 * MS), ("send", 2 * MS)]);
        assert_eq!(Slow::from_record(&exchange(100, true), 50 * MS), None);
        let setup = Record::Opened {
            listener: ListenerId::new(8080, 0),
            remote: "10.1.2.3:40000".parse().unwrap(),
            pid: 42,
            handshake_ns: Some(MS),
            accept_wait_ns: Some(80 * MS),
            synack_retransmits: 0,
        };
        assert_eq!(Slow::from_record(&setup, 50 * MS).unwrap().largest, "accept_wait");
    }

    #[test]
    fn durations_keep_three_digits() {
        assert_eq!(duration(0), "0ns");
        assert_eq!(duration(999), "999ns");
        assert_eq!(duration(12_345), "12.3µs");
        assert_eq!(duration(1_500_000), "1.50ms");
        assert_eq!(duration(300_000_000), "300ms");
        assert_eq!(duration(2_000_000_000), "2.00s");
    }
}
